//! The sandbox's decisions on their own: who tasks run as for each way the agent can be
//! started, which programs the patterns let through, how a program name is found, and
//! what environment a task gets.

use super::*;
use clap::Parser;

/// A password database of root, nobody, a `toor` alias of root and an ordinary user.
struct Fake;

fn acct(name: &str, uid: u32, gid: u32, home: Option<&str>) -> Account {
    Account {
        name: name.into(),
        uid,
        gid,
        home: home.map(PathBuf::from),
    }
}

impl Accounts for Fake {
    fn by_name(&self, name: &str) -> Result<Option<Account>, String> {
        Ok(match name {
            "root" => Some(acct("root", 0, 0, Some("/root"))),
            "toor" => Some(acct("toor", 0, 0, None)),
            "nobody" => Some(acct("nobody", 65534, 65534, None)),
            "alice" => Some(acct("alice", 1000, 1000, Some("/home/alice"))),
            _ => None,
        })
    }

    fn by_uid(&self, uid: u32) -> Result<Option<Account>, String> {
        Ok(match uid {
            0 => Some(acct("root", 0, 0, Some("/root"))),
            1000 => Some(acct("alice", 1000, 1000, Some("/home/alice"))),
            _ => None,
        })
    }
}

/// A database without `nobody`, as in a minimal image.
struct NoNobody;

impl Accounts for NoNobody {
    fn by_name(&self, _: &str) -> Result<Option<Account>, String> {
        Ok(None)
    }
    fn by_uid(&self, _: u32) -> Result<Option<Account>, String> {
        Ok(None)
    }
}

fn args(flags: &[&str]) -> SandboxArgs {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        sandbox: SandboxArgs,
    }
    let argv = std::iter::once("taskmanager").chain(flags.iter().copied());
    Cli::try_parse_from(argv).expect("flags parse").sandbox
}

fn sandbox(flags: &[&str], euid: u32) -> Result<Sandbox, String> {
    args(flags).resolve(euid, euid, &Fake)
}

#[test]
fn root_runs_tasks_as_nobody_by_default() {
    let s = sandbox(&[], 0).expect("valid");
    assert_eq!(
        s.user,
        TaskUser {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
            home: None,
            switch: true,
        }
    );
    assert!(matches!(s.commands, Commands::Any));
}

#[test]
fn root_runs_tasks_as_the_named_user() {
    let s = sandbox(&["--run-as", "alice"], 0).expect("valid");
    assert_eq!((s.user.uid, s.user.gid, s.user.switch), (1000, 1000, true));
    assert_eq!(s.user.home, Some(PathBuf::from("/home/alice")));
}

#[test]
fn root_tasks_need_allow_root_tasks() {
    for user in ["root", "toor"] {
        let err = sandbox(&["--run-as", user], 0).expect_err("refused");
        assert!(err.contains("--allow-root-tasks"), "{err}");
        assert!(err.contains(&format!("--run-as {user:?}")), "{err}");
        let s = sandbox(&["--run-as", user, "--allow-root-tasks"], 0).expect("allowed");
        assert_eq!(s.user.uid, 0);
        assert!(!s.user.switch, "root stays root: nothing to switch");
    }
}

#[test]
fn an_unknown_user_is_a_start_up_error_naming_the_flag() {
    let err = sandbox(&["--run-as", "ghost"], 0).expect_err("refused");
    assert!(err.contains("--run-as \"ghost\": no such user"), "{err}");
    let err = args(&[]).resolve(0, 0, &NoNobody).expect_err("refused");
    assert!(
        err.contains("--run-as") && err.contains("\"nobody\""),
        "the default is named: {err}"
    );
}

#[test]
fn a_non_root_agent_runs_tasks_as_itself_and_cannot_switch() {
    let s = sandbox(&[], 1000).expect("valid");
    assert_eq!(
        s.user,
        TaskUser {
            name: "alice".into(),
            uid: 1000,
            gid: 1000,
            home: Some(PathBuf::from("/home/alice")),
            switch: false,
        }
    );
    // Its own name is accepted; nobody's is not (only root can switch user).
    assert!(sandbox(&["--run-as", "alice"], 1000).is_ok());
    let err = sandbox(&["--run-as", "nobody"], 1000).expect_err("refused");
    assert!(
        err.contains("--run-as") && err.contains("not as root"),
        "{err}"
    );
    // A uid without a name (containers run arbitrary uids) still works.
    let s = sandbox(&[], 4242).expect("valid");
    assert_eq!((s.user.name.as_str(), s.user.uid), ("uid 4242", 4242));
}

#[test]
fn allow_command_patterns_are_validated() {
    let s = sandbox(
        &[
            "--allow-command",
            "/usr/bin/*",
            "--allow-command",
            "/opt/**",
        ],
        0,
    )
    .expect("valid");
    assert!(matches!(s.commands, Commands::Only(ref p) if p.len() == 2));
    let err = sandbox(&["--allow-command", "bin/*"], 0).expect_err("relative");
    assert!(err.contains("--allow-command \"bin/*\"") && err.contains("absolute"));
    let err = sandbox(&["--allow-command", "/usr/[bin"], 0).expect_err("bad glob");
    assert!(err.contains("not a valid glob"), "{err}");
    let err = sandbox(&["--builtin-tasks-only", "--allow-command", "/bin/*"], 0).expect_err("both");
    assert!(err.contains("--builtin-tasks-only") && err.contains("--allow-command"));
    let s = sandbox(&["--builtin-tasks-only"], 0).expect("valid");
    assert!(matches!(s.commands, Commands::BuiltinOnly));
}

fn patterns(ps: &[&str]) -> Vec<Pattern> {
    ps.iter()
        .map(|p| parse_pattern(p).expect("valid"))
        .collect()
}

#[test]
fn a_star_does_not_cross_a_directory() {
    let ps = patterns(&["/usr/bin/*", "/opt/jobs/**/run-*"]);
    assert!(allowed(&ps, Path::new("/usr/bin/id")));
    assert!(!allowed(&ps, Path::new("/usr/bin/sub/id")));
    assert!(!allowed(&ps, Path::new("/usr/sbin/id")));
    assert!(allowed(&ps, Path::new("/opt/jobs/a/b/run-x")));
    assert!(allowed(&ps, Path::new("/opt/jobs/run-x")));
    assert!(!allowed(&ps, Path::new("/opt/jobs/a/other")));
    assert!(
        !allowed(&[], Path::new("/usr/bin/id")),
        "no pattern, no match"
    );
}

#[test]
fn a_bare_name_is_looked_up_on_path_in_order() {
    let exec = |p: &Path| p == Path::new("/b/tool") || p == Path::new("/c/tool");
    let cwd = Path::new("/task");
    assert_eq!(
        resolve("tool", "/a:/b:/c", cwd, exec),
        Some(PathBuf::from("/b/tool"))
    );
    assert_eq!(resolve("tool", "/a", cwd, exec), None);
    assert_eq!(resolve("", "/b", cwd, exec), None);
    // An empty PATH entry is the working directory, as for execvp.
    let here = |p: &Path| p == Path::new("/task/tool");
    assert_eq!(
        resolve("tool", "/a::/b", cwd, here),
        Some(PathBuf::from("/task/tool"))
    );
}

#[test]
fn a_name_with_a_slash_is_a_path_from_the_task_directory() {
    let exec = |p: &Path| p == Path::new("/task/bin/run") || p == Path::new("/b/tool");
    let cwd = Path::new("/task");
    assert_eq!(
        resolve("bin/run", "/b", cwd, exec),
        Some(PathBuf::from("/task/bin/run"))
    );
    assert_eq!(
        resolve("/b/tool", "", cwd, exec),
        Some(PathBuf::from("/b/tool"))
    );
    assert_eq!(resolve("./tool", "/b", cwd, exec), None, "no PATH lookup");
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_task_gets_defaults_the_job_env_and_its_identity_only() {
    let identity = map(&[("DISPATCHER_JOB_ID", "j1"), ("DISPATCHER_SUBTASK", "0")]);
    let env = task_env(&map(&[("SECRET", "s")]), &identity, Path::new("/home/x"));
    assert_eq!(
        env,
        map(&[
            ("DISPATCHER_JOB_ID", "j1"),
            ("DISPATCHER_SUBTASK", "0"),
            ("HOME", "/home/x"),
            ("LANG", DEFAULT_LANG),
            ("PATH", DEFAULT_PATH),
            ("SECRET", "s"),
        ])
    );
}

#[test]
fn the_job_may_set_path_home_and_lang_but_not_the_task_identity() {
    let identity = map(&[("DISPATCHER_JOB_ID", "j1")]);
    let job = map(&[
        ("PATH", "/opt/bin"),
        ("LANG", "C"),
        ("HOME", "/srv"),
        ("DISPATCHER_JOB_ID", "forged"),
    ]);
    let env = task_env(&job, &identity, Path::new("/task"));
    assert_eq!(env["PATH"], "/opt/bin");
    assert_eq!(env["LANG"], "C");
    assert_eq!(env["HOME"], "/srv");
    assert_eq!(env["DISPATCHER_JOB_ID"], "j1");
}

/// A sandbox running tasks as this process (no switch), with these commands.
fn local(commands: Commands) -> Sandbox {
    Sandbox {
        user: TaskUser {
            name: "me".into(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            home: None,
            switch: false,
        },
        commands,
    }
}

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// A directory with an executable `bin/real` and a link `links/alias` to it.
fn programs() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    std::fs::write(bin.join("real"), "#!/bin/sh\n").expect("program");
    std::fs::set_permissions(bin.join("real"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::create_dir(dir.path().join("links")).expect("links");
    std::os::unix::fs::symlink(bin.join("real"), dir.path().join("links/alias")).expect("link");
    dir
}

#[test]
fn launch_checks_the_canonical_path_and_spawns_it() {
    let progs = programs();
    let root = std::fs::canonicalize(progs.path()).expect("canonical");
    let task = progs.path().join("tasks/t1");
    let job = map(&[("PATH", &format!("{}/links", root.display()))]);
    // The link's own directory is allowed, its target's is not: refused.
    let only_links = Commands::Only(patterns(&[&format!("{}/links/*", root.display())]));
    let err = local(only_links)
        .launch(&argv(&["alias"]), &job, &BTreeMap::new(), &task)
        .expect_err("refused");
    assert_eq!(
        err,
        format!(
            "command alias ({}/bin/real) is not allowed on this TaskManager (--allow-command)",
            root.display()
        )
    );
    assert!(!task.exists(), "a refused task leaves no directory");
    let only_bin = Commands::Only(patterns(&[&format!("{}/bin/*", root.display())]));
    let launch = local(only_bin)
        .launch(&argv(&["alias"]), &job, &BTreeMap::new(), &task)
        .expect("allowed");
    assert_eq!(launch.program, root.join("bin/real"));
    assert_eq!(launch.env["HOME"], task.display().to_string());
    assert!(task.join("stdout.log").is_file() && task.join("stderr.log").is_file());
}

#[test]
fn launch_refuses_unknown_programs_and_builtin_only() {
    let progs = programs();
    let task = progs.path().join("tasks/t2");
    let none = BTreeMap::new();
    let err = local(Commands::Any)
        .launch(&argv(&["no-such-program-x"]), &none, &none, &task)
        .expect_err("not found");
    assert_eq!(
        err,
        format!("command \"no-such-program-x\" not found on PATH {DEFAULT_PATH}")
    );
    let err = local(Commands::BuiltinOnly)
        .launch(&argv(&["/bin/sh"]), &none, &none, &task)
        .expect_err("builtin only");
    assert!(err.contains("(--builtin-tasks-only)"), "{err}");
    let err = local(Commands::Any)
        .launch(&[], &none, &none, &task)
        .expect_err("empty");
    assert_eq!(err, "empty argv");
}

#[test]
fn launch_replaces_a_planted_link_instead_of_following_it() {
    let progs = programs();
    let task = progs.path().join("tasks/t3");
    std::fs::create_dir_all(&task).expect("task dir");
    let victim = progs.path().join("victim");
    std::fs::write(&victim, "keep me").expect("victim");
    std::os::unix::fs::symlink(&victim, task.join("stdout.log")).expect("planted link");
    let none = BTreeMap::new();
    local(Commands::Any)
        .launch(&argv(&["/bin/sh"]), &none, &none, &task)
        .expect("launch");
    assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "keep me");
    let meta = std::fs::symlink_metadata(task.join("stdout.log")).expect("log");
    assert!(meta.is_file(), "a fresh file, not the link");
}
