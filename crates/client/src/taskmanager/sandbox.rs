//! What a command task may run and as whom: the `--run-as`, `--allow-root-tasks`,
//! `--allow-command` and `--builtin-tasks-only` flags, validated once at start-up into a
//! [`Sandbox`], and for each command task the checked program, the clean environment
//! and the task directory the run-as user owns ([`Sandbox::launch`]).
//!
//! It owns the decision, never the process: the runner spawns what [`Launch`] says, and
//! switches user in the child with [`drop_privileges`]. A refusal is an `Err(reason)`
//! that names the flag which controls it; the runner fails the attempt with it, so the
//! user reads it in `dispatchctl job status`.
//!
//! It must never hand a task the agent's own environment, never run a task as root
//! unless `--allow-root-tasks` was given, and never start a program other than the one
//! whose canonical path it checked against the `--allow-command` patterns.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use glob::{MatchOptions, Pattern};

/// PATH of a task whose job sets none: no current directory, no agent-specific entries.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// LANG of a task whose job sets none.
pub const DEFAULT_LANG: &str = "C.UTF-8";
/// The user tasks run as when a root TaskManager is given no `--run-as`.
pub const DEFAULT_RUN_AS: &str = "nobody";

/// The task-sandbox flags of the `taskmanager` binary, flattened into its `Args`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SandboxArgs {
    /// User command tasks run as. A TaskManager started as root switches tasks to this
    /// user (default `nobody`); one started as another user runs tasks as itself and
    /// accepts only its own name here.
    #[arg(long, value_name = "USER", env = "TASKMANAGER_RUN_AS")]
    pub run_as: Option<String>,
    /// Allow command tasks to run as root (`--run-as root`, or any user with uid 0).
    #[arg(long, env = "TASKMANAGER_ALLOW_ROOT_TASKS")]
    pub allow_root_tasks: bool,
    /// Only programs whose canonical absolute path matches one of these globs may be
    /// started by command tasks (`*` does not cross `/`); repeatable. Without any, every
    /// program is allowed.
    #[arg(
        long = "allow-command",
        value_name = "GLOB",
        env = "TASKMANAGER_ALLOW_COMMANDS",
        value_delimiter = ','
    )]
    pub allow_commands: Vec<String>,
    /// Refuse every command task; run only the built-in sleep and fail tasks.
    #[arg(long, env = "TASKMANAGER_BUILTIN_TASKS_ONLY")]
    pub builtin_tasks_only: bool,
}

/// A user account as the password database describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory, if it exists as a directory.
    pub home: Option<PathBuf>,
}

/// Where accounts are looked up; the system's password database outside tests.
pub trait Accounts {
    /// The account named `name`, if any.
    fn by_name(&self, name: &str) -> Result<Option<Account>, String>;
    /// The account with user id `uid`, if any.
    fn by_uid(&self, uid: u32) -> Result<Option<Account>, String>;
}

/// The system's password database (NSS, through `getpwnam_r`/`getpwuid_r`).
pub struct SystemAccounts;

fn account_of(u: nix::unistd::User) -> Account {
    Account {
        name: u.name,
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        home: Some(u.dir).filter(|d| d.is_dir()),
    }
}

impl Accounts for SystemAccounts {
    fn by_name(&self, name: &str) -> Result<Option<Account>, String> {
        nix::unistd::User::from_name(name)
            .map(|u| u.map(account_of))
            .map_err(|e| format!("cannot look up user {name:?}: {e}"))
    }

    fn by_uid(&self, uid: u32) -> Result<Option<Account>, String> {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .map(|u| u.map(account_of))
            .map_err(|e| format!("cannot look up uid {uid}: {e}"))
    }
}

/// Who command tasks run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskUser {
    /// Name, for messages (`uid N` for an agent's own uid without a name).
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory (HOME of the tasks); the task directory when `None`.
    pub home: Option<PathBuf>,
    /// Whether the child switches to `uid`/`gid` (the agent runs as root and the task
    /// user is another identity); otherwise tasks run as the agent itself.
    pub switch: bool,
}

/// Which command tasks may start.
#[derive(Clone, Debug)]
pub enum Commands {
    /// Every program (no `--allow-command`).
    Any,
    /// Programs whose canonical path matches one of the patterns.
    Only(Vec<Pattern>),
    /// None at all (`--builtin-tasks-only`).
    BuiltinOnly,
}

/// The validated sandbox of a TaskManager's command tasks.
#[derive(Clone, Debug)]
pub struct Sandbox {
    /// Who tasks run as.
    pub user: TaskUser,
    /// Which programs they may start.
    pub commands: Commands,
}

/// A checked command task, ready to spawn.
#[derive(Debug)]
pub struct Launch {
    /// The canonical path of the program that was checked; spawned as is (`argv[0]` stays
    /// what the job said), so no second PATH lookup can pick another file.
    pub program: PathBuf,
    /// The task's whole environment.
    pub env: BTreeMap<String, String>,
    /// The task's stdout, `stdout.log` in its directory.
    pub stdout: std::fs::File,
    /// The task's stderr, `stderr.log` in its directory.
    pub stderr: std::fs::File,
}

/// `*` and `?` never match `/`: `/opt/jobs/*` allows `/opt/jobs/run` but not
/// `/opt/jobs/sub/run`.
const MATCH: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

impl SandboxArgs {
    /// Validates the flags against the agent's identity and the password database.
    pub fn into_sandbox(self) -> Result<Sandbox, String> {
        let euid = nix::unistd::geteuid().as_raw();
        let egid = nix::unistd::getegid().as_raw();
        self.resolve(euid, egid, &SystemAccounts)
    }

    /// [`Self::into_sandbox`] for an agent running as `euid`/`egid`, looking users up in
    /// `accounts`.
    pub fn resolve(
        self,
        euid: u32,
        egid: u32,
        accounts: &impl Accounts,
    ) -> Result<Sandbox, String> {
        let user = task_user(
            self.run_as.as_deref(),
            self.allow_root_tasks,
            euid,
            egid,
            accounts,
        )?;
        let patterns: Vec<&String> = self
            .allow_commands
            .iter()
            .filter(|p| !p.is_empty())
            .collect();
        let commands = match (self.builtin_tasks_only, patterns.is_empty()) {
            (true, false) => {
                return Err(
                    "--builtin-tasks-only refuses every command task; it cannot be combined \
                     with --allow-command"
                        .into(),
                )
            }
            (true, true) => Commands::BuiltinOnly,
            (false, true) => Commands::Any,
            (false, false) => Commands::Only(
                patterns
                    .into_iter()
                    .map(|p| parse_pattern(p))
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(Sandbox { user, commands })
    }
}

fn parse_pattern(p: &str) -> Result<Pattern, String> {
    if !p.starts_with('/') {
        return Err(format!(
            "--allow-command {p:?} must be an absolute path pattern: it is matched against \
             the program's canonical absolute path"
        ));
    }
    Pattern::new(p).map_err(|e| format!("--allow-command {p:?} is not a valid glob: {e}"))
}

/// Who tasks run as, or why the TaskManager must not start.
pub fn task_user(
    requested: Option<&str>,
    allow_root: bool,
    euid: u32,
    egid: u32,
    accounts: &impl Accounts,
) -> Result<TaskUser, String> {
    if euid != 0 {
        // Only root may switch user: a non-root agent runs tasks as itself.
        let own = accounts.by_uid(euid)?;
        if let Some(name) = requested {
            let wanted = accounts
                .by_name(name)?
                .ok_or_else(|| format!("--run-as {name:?}: no such user"))?;
            if wanted.uid != euid {
                return Err(format!(
                    "--run-as {name:?}: this TaskManager runs as uid {euid}, not as root, so it \
                     cannot switch tasks to another user; start it as root, or drop --run-as to \
                     run tasks as itself"
                ));
            }
        }
        return Ok(TaskUser {
            name: own
                .as_ref()
                .map(|a| a.name.clone())
                .unwrap_or_else(|| format!("uid {euid}")),
            uid: euid,
            gid: egid,
            home: own.and_then(|a| a.home),
            switch: false,
        });
    }
    let name = requested.unwrap_or(DEFAULT_RUN_AS);
    let account = accounts.by_name(name)?.ok_or_else(|| match requested {
        Some(_) => format!("--run-as {name:?}: no such user"),
        None => format!(
            "--run-as defaults to {name:?} for a TaskManager running as root, and there is no \
             such user; create it, or name another user with --run-as"
        ),
    })?;
    if account.uid == 0 && !allow_root {
        return Err(format!(
            "--run-as {name:?}: tasks would run as root (uid 0); pass --allow-root-tasks to \
             allow that, or name an unprivileged user"
        ));
    }
    Ok(TaskUser {
        switch: (account.uid, account.gid) != (euid, egid),
        name: account.name,
        uid: account.uid,
        gid: account.gid,
        home: account.home,
    })
}

impl Sandbox {
    /// The identity tasks run as, for the start-up log line.
    pub fn describe(&self) -> String {
        let switch = if self.user.switch {
            ""
        } else {
            ", the TaskManager's own"
        };
        format!(
            "{} (uid {}, gid {}{switch})",
            self.user.name, self.user.uid, self.user.gid
        )
    }

    /// Checks a command task and prepares its directory: the program must be allowed
    /// here, and `task_dir` is created, with empty `stdout.log` and `stderr.log` that the
    /// task user owns. Returns what to spawn, or the reason the task is refused.
    pub fn launch(
        &self,
        argv: &[String],
        job_env: &BTreeMap<String, String>,
        identity: &BTreeMap<String, String>,
        task_dir: &Path,
    ) -> Result<Launch, String> {
        let program = match &self.commands {
            Commands::BuiltinOnly => {
                return Err(
                    "command tasks are not allowed on this TaskManager, only built-in \
                            tasks (--builtin-tasks-only)"
                        .into(),
                )
            }
            Commands::Any | Commands::Only(_) => argv.first().ok_or("empty argv")?,
        };
        let home = self
            .user
            .home
            .clone()
            .unwrap_or_else(|| task_dir.to_path_buf());
        let env = task_env(job_env, identity, &home);
        let path_var = env.get("PATH").map(String::as_str).unwrap_or(DEFAULT_PATH);
        let found = resolve(program, path_var, task_dir, is_executable).ok_or_else(|| {
            if program.contains('/') {
                format!("command {program} not found or not executable")
            } else {
                format!("command {program:?} not found on PATH {path_var}")
            }
        })?;
        let canonical = std::fs::canonicalize(&found)
            .map_err(|e| format!("command {}: {e}", found.display()))?;
        if let Commands::Only(patterns) = &self.commands {
            if !allowed(patterns, &canonical) {
                let shown = if Path::new(program) == canonical {
                    canonical.display().to_string()
                } else {
                    format!("{program} ({})", canonical.display())
                };
                return Err(format!(
                    "command {shown} is not allowed on this TaskManager (--allow-command)"
                ));
            }
        }
        let (stdout, stderr) = self.prepare_dir(task_dir)?;
        Ok(Launch {
            program: canonical,
            env,
            stdout,
            stderr,
        })
    }

    /// Creates the task directory and its log files, owned by the task user. The logs are
    /// created afresh and never followed through a link: a directory left by an earlier
    /// task of that user may hold a link planted to make the agent (root) truncate or
    /// hand over another file.
    fn prepare_dir(&self, dir: &Path) -> Result<(std::fs::File, std::fs::File), String> {
        let err =
            |what: &Path, e: std::io::Error| format!("task directory {}: {e}", what.display());
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if let Some(parent) = dir.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| err(parent, e))?;
                }
                std::fs::create_dir(dir).map_err(|e| err(dir, e))?;
            }
            Err(e) => return Err(err(dir, e)),
        }
        let meta = std::fs::symlink_metadata(dir).map_err(|e| err(dir, e))?;
        if !meta.is_dir() {
            return Err(format!(
                "task directory {} is not a directory",
                dir.display()
            ));
        }
        let open = |name: &str| -> Result<std::fs::File, String> {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(err(&path, e)),
            }
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| err(&path, e))?;
            if self.user.switch {
                std::os::unix::fs::fchown(&file, Some(self.user.uid), Some(self.user.gid))
                    .map_err(|e| err(&path, e))?;
            }
            Ok(file)
        };
        let files = (open("stdout.log")?, open("stderr.log")?);
        if self.user.switch {
            std::os::unix::fs::lchown(dir, Some(self.user.uid), Some(self.user.gid))
                .map_err(|e| err(dir, e))?;
        }
        Ok(files)
    }
}

/// The environment of a command task: PATH, HOME and LANG defaults, the job's variables
/// over them, and the agent's task-identity variables (`DISPATCHER_*`) over those.
/// Nothing of the agent's own environment.
pub fn task_env(
    job_env: &BTreeMap<String, String>,
    identity: &BTreeMap<String, String>,
    home: &Path,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("HOME".to_string(), home.display().to_string()),
        ("LANG".to_string(), DEFAULT_LANG.to_string()),
    ]);
    env.extend(job_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(identity.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// The file `program` names, as `execvp` would find it: a name with a `/` is a path
/// (relative ones from `cwd`, the task's working directory); a bare name is looked up in
/// the directories of `path_var`, the first executable file winning (an empty entry is
/// the working directory, as for `execvp`).
pub fn resolve(
    program: &str,
    path_var: &str,
    cwd: &Path,
    is_exec: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    if program.is_empty() {
        return None;
    }
    if program.contains('/') {
        let path = cwd.join(program);
        return is_exec(&path).then_some(path);
    }
    path_var
        .split(':')
        .map(|dir| {
            if dir.is_empty() {
                cwd.join(program)
            } else {
                cwd.join(dir).join(program)
            }
        })
        .find(|p| is_exec(p))
}

/// A regular file with an execute bit (for its owner, group or others).
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether a canonical program path matches one of the `--allow-command` patterns.
pub fn allowed(patterns: &[Pattern], canonical: &Path) -> bool {
    patterns
        .iter()
        .any(|p| p.matches_path_with(canonical, MATCH))
}

/// Switches the forked child to `uid`/`gid` with no supplementary groups. Runs between
/// fork and exec (`pre_exec`), after the child moved into its task directory: std's own
/// `uid()`/`gid()` switch before that `chdir`, which would require every directory above
/// the work directory to be searchable by the task user. Only async-signal-safe calls,
/// no allocation.
pub fn drop_privileges(uid: u32, gid: u32) -> std::io::Result<()> {
    use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
    // Groups first: once the uid is dropped the child may no longer change them.
    setgroups(&[])?;
    setgid(Gid::from_raw(gid))?;
    setuid(Uid::from_raw(uid))?;
    Ok(())
}

#[cfg(test)]
mod tests;
