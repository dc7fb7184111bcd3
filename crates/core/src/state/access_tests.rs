//! Scenario tests of tokens and TaskManager ownership in `apply`.

use super::invariants;
use super::tests::tm;
use super::*;

fn token(name: &str, role: Role, secret_byte: char, tms: &[&str]) -> Token {
    Token {
        name: name.into(),
        role,
        hash: secret_byte.to_string().repeat(64),
        task_managers: tms.iter().map(|s| s.to_string()).collect(),
        created_at: 5_000,
    }
}

fn apply(state: &mut DispatcherState, c: Command) -> Result<Response, Rejection> {
    let before = state.digest().expect("digest");
    let r = state.apply(c);
    if r.is_err() {
        assert_eq!(
            state.digest().expect("digest"),
            before,
            "a rejection changed the state"
        );
    }
    invariants::check(state).unwrap_or_else(|v| panic!("invariant broken: {v}"));
    r
}

fn create(state: &mut DispatcherState, t: Token) -> Result<Response, Rejection> {
    apply(
        state,
        Command::CreateToken {
            token: t,
            bootstrap: false,
        },
    )
}

#[test]
fn tokens_are_found_by_hash_and_a_revoked_one_is_gone_at_once() {
    let mut s = DispatcherState::default();
    assert!(!s.has_tokens());
    let refused = create(&mut s, token("ci", Role::Submit, 'b', &[]));
    assert!(
        matches!(refused, Err(Rejection::Invalid { ref field, .. }) if field == "role"),
        "the first token must be an admin: {refused:?}"
    );
    create(&mut s, token("root", Role::Admin, 'a', &[])).expect("admin");
    create(&mut s, token("ci", Role::Submit, 'b', &[])).expect("submit");
    assert!(s.has_tokens());
    assert_eq!(
        s.token_by_hash(&"b".repeat(64)).map(|t| t.role),
        Some(Role::Submit)
    );
    assert_eq!(
        create(&mut s, token("ci", Role::Submit, 'b', &[])),
        Ok(Response::TokenCreated {
            name: "ci".into(),
            created: false
        }),
        "a retried create is a no-op"
    );
    assert_eq!(
        create(&mut s, token("ci", Role::Read, 'c', &[])),
        Err(Rejection::TokenExists { name: "ci".into() })
    );
    assert!(
        create(&mut s, token("other", Role::Read, 'b', &[])).is_err(),
        "one secret cannot carry two names"
    );
    apply(&mut s, Command::RevokeToken { name: "ci".into() }).expect("revoke");
    assert!(s.token_by_hash(&"b".repeat(64)).is_none());
    assert_eq!(
        apply(&mut s, Command::RevokeToken { name: "ci".into() }),
        Err(Rejection::UnknownToken { name: "ci".into() })
    );
}

#[test]
fn the_last_admin_token_cannot_be_revoked_and_bootstrap_happens_once() {
    let mut s = DispatcherState::default();
    let boot = |s: &mut DispatcherState, byte| {
        apply(
            s,
            Command::CreateToken {
                token: token("bootstrap", Role::Admin, byte, &[]),
                bootstrap: true,
            },
        )
    };
    assert_eq!(
        boot(&mut s, 'a'),
        Ok(Response::TokenCreated {
            name: "bootstrap".into(),
            created: true
        })
    );
    // A restart of the bootstrapper with another file changes nothing.
    assert_eq!(
        boot(&mut s, 'f'),
        Ok(Response::TokenCreated {
            name: "bootstrap".into(),
            created: false
        })
    );
    assert!(s.token_by_hash(&"f".repeat(64)).is_none());
    assert_eq!(
        apply(
            &mut s,
            Command::RevokeToken {
                name: "bootstrap".into()
            }
        ),
        Err(Rejection::LastAdminToken {
            name: "bootstrap".into()
        })
    );
    create(&mut s, token("ops", Role::Admin, 'c', &[])).expect("second admin");
    apply(
        &mut s,
        Command::RevokeToken {
            name: "bootstrap".into(),
        },
    )
    .expect("not the last admin any more");
}

#[test]
fn bad_tokens_are_refused_with_the_field() {
    let mut s = DispatcherState::default();
    create(&mut s, token("root", Role::Admin, 'a', &[])).expect("admin");
    for (t, field) in [
        (token("", Role::Read, 'b', &[]), "name"),
        (token("a b", Role::Read, 'b', &[]), "name"),
        (token("x", Role::TaskManager, 'b', &[]), "task_managers"),
        (token("x", Role::Read, 'b', &["tm-1"]), "task_managers"),
        (
            token("x", Role::TaskManager, 'b', &["a*b*"]),
            "task_managers[0]",
        ),
        (
            Token {
                hash: "XYZ".into(),
                ..token("x", Role::Read, 'b', &[])
            },
            "hash",
        ),
    ] {
        match create(&mut s, t) {
            Err(Rejection::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected {field} to be refused, got {other:?}"),
        }
    }
}

#[test]
fn a_live_task_manager_id_belongs_to_whoever_registered_it() {
    let mut s = DispatcherState::default();
    let register = |s: &mut DispatcherState, instance: &str, owner: &str| {
        let mut spec = tm("tm-1", 2);
        spec.instance = instance.into();
        apply(
            s,
            Command::RegisterTaskManagerAs {
                spec,
                owner: owner.into(),
                now: 1_000,
            },
        )
    };
    register(&mut s, "i1", "token:tm").expect("first registration");
    assert_eq!(s.owner_of(&"tm-1".into()), Some("token:tm"));
    assert_eq!(
        register(&mut s, "i2", "token:intruder"),
        Err(Rejection::TaskManagerOwned {
            id: "tm-1".into(),
            owner: "token:tm".into()
        })
    );
    // The owner restarting is fine.
    register(&mut s, "i2", "token:tm").expect("the owner re-registers");
    apply(
        &mut s,
        Command::UnregisterTaskManager {
            id: "tm-1".into(),
            instance: "i2".into(),
            now: 2_000,
        },
    )
    .expect("unregister");
    assert_eq!(s.owner_of(&"tm-1".into()), None, "the id is free again");
    register(&mut s, "i3", "token:other").expect("a free id can be taken");
}

#[test]
fn a_state_without_tokens_encodes_as_before_and_one_with_tokens_round_trips() {
    let mut s = DispatcherState::default();
    apply(
        &mut s,
        Command::RegisterTaskManager {
            spec: tm("tm-1", 1),
            now: 10,
        },
    )
    .expect("tm");
    let plain = s.encode().expect("encode");
    let again = DispatcherState::restore(&plain).expect("restore");
    assert_eq!(again.encode().expect("encode"), plain);

    create(&mut s, token("root", Role::Admin, 'a', &[])).expect("admin");
    apply(
        &mut s,
        Command::RegisterTaskManagerAs {
            spec: tm("tm-2", 1),
            owner: "token:root".into(),
            now: 20,
        },
    )
    .expect("owned tm");
    let with_access = s.encode().expect("encode");
    assert_ne!(with_access, plain);
    let restored = DispatcherState::restore(&with_access).expect("restore v2");
    assert_eq!(restored.digest().ok(), s.digest().ok());
    assert_eq!(restored.owner_of(&"tm-2".into()), Some("token:root"));
    assert!(
        restored.token_by_hash(&"a".repeat(64)).is_some(),
        "the hash index is rebuilt"
    );
}

#[test]
fn restoring_a_backup_keeps_the_new_clusters_admin_beside_the_backups_tokens() {
    let mut old = DispatcherState::default();
    create(&mut old, token("old-admin", Role::Admin, 'a', &[])).expect("admin");
    let backup = old.encode().expect("encode");

    let mut new = DispatcherState::default();
    apply(
        &mut new,
        Command::CreateToken {
            token: token("bootstrap", Role::Admin, 'b', &[]),
            bootstrap: true,
        },
    )
    .expect("bootstrap");
    apply(&mut new, Command::RestoreState { state: backup }).expect("restore");
    assert!(
        new.token_by_hash(&"a".repeat(64)).is_some(),
        "the old admin works"
    );
    assert!(
        new.token_by_hash(&"b".repeat(64)).is_some(),
        "the new admin still works"
    );
}

#[test]
fn a_command_task_never_prints_its_environment_values() {
    let task = TaskSpec::Command {
        argv: vec!["run".into()],
        env: [("API_KEY".to_string(), "hunter2".to_string())].into(),
    };
    let printed = format!("{task:?}");
    assert!(
        printed.contains("API_KEY") && !printed.contains("hunter2"),
        "{printed}"
    );
}
