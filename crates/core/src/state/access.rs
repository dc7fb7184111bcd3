//! Who may do what: bearer tokens with roles, replicated like Nomad's ACL tokens or
//! etcd's users, and the permissions each role grants.
//!
//! A token's secret never enters the state: the edge hashes the presented secret
//! (SHA-256; the secret is 256 random bits, so no slow KDF is needed) and looks the hash
//! up. Everything here is plain data and pure functions; authentication (reading the
//! header, hashing, certificates) belongs to the server's edge.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::types::{Millis, TaskManagerId};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Everything: membership, backups, tokens, cluster configuration, jobs, TaskManagers.
    Admin,
    /// Submit and cancel jobs, and read.
    Submit,
    /// Read jobs (environment values redacted), TaskManagers and status.
    Read,
    /// The TaskManager protocol, for the TaskManager ids the token is bound to.
    TaskManager,
}

impl Role {
    /// The role's name as users type it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submit => "submit",
            Role::Read => "read",
            Role::TaskManager => "taskmanager",
        }
    }

    /// Whether the role grants `permission`.
    pub fn allows(self, permission: Permission) -> bool {
        matches!(
            (self, permission),
            (Role::Admin, _)
                | (Role::Submit, Permission::Submit | Permission::Read)
                | (Role::Read, Permission::Read)
                | (Role::TaskManager, Permission::TaskManager)
        )
    }

    /// Whether the role sees the values of job environments (secrets).
    pub fn sees_secrets(self) -> bool {
        self == Role::Admin
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// Read jobs, TaskManagers, status.
    Read,
    /// Submit and cancel jobs.
    Submit,
    /// Speak the TaskManager protocol.
    TaskManager,
    /// Administer the cluster.
    Admin,
}

impl Permission {
    /// The least role that grants it, for error messages.
    pub fn least_role(self) -> Role {
        match self {
            Permission::Read => Role::Read,
            Permission::Submit => Role::Submit,
            Permission::TaskManager => Role::TaskManager,
            Permission::Admin => Role::Admin,
        }
    }

    /// The roles that grant it, for error messages: `"admin or submit"`.
    pub fn roles(self) -> String {
        let roles: Vec<&str> = [Role::Admin, Role::Submit, Role::Read, Role::TaskManager]
            .into_iter()
            .filter(|r| r.allows(self))
            .map(Role::name)
            .collect();
        roles.join(" or ")
    }
}

/// A bearer token as the state holds it: never its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Unique name (the principal logs and ownership records show).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Lower-case hex SHA-256 of the secret.
    pub hash: String,
    /// For [`Role::TaskManager`]: the ids it may act for; an entry ending in `*` matches
    /// every id starting with the rest.
    pub task_managers: Vec<String>,
    /// Leader time of creation.
    pub created_at: Millis,
}

impl Token {
    /// Whether this token may act for TaskManager `id`: an admin for any, a TaskManager
    /// token for the ids it is bound to, nobody else.
    pub fn may_act_for(&self, id: &TaskManagerId) -> bool {
        match self.role {
            Role::Admin => true,
            Role::TaskManager => self
                .task_managers
                .iter()
                .any(|pattern| binding_matches(pattern, id.as_str())),
            _ => false,
        }
    }

    /// The principal this token acts as, as ownership records name it.
    pub fn principal(&self) -> String {
        format!("token:{}", self.name)
    }
}

/// The hash under which a token's secret is stored and looked up: lower-case hex
/// SHA-256. The secret is 256 random bits, so a fast hash is enough (no dictionary to
/// guard against).
pub fn hash_secret(secret: &str) -> String {
    crate::codec::digest_hex(secret.as_bytes())
}

/// Whether a binding (`tm-1`, or `tm-*` for a prefix) covers `id`.
pub fn binding_matches(pattern: &str, id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => pattern == id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(role: Role, tms: &[&str]) -> Token {
        Token {
            name: "t".into(),
            role,
            hash: "0".repeat(64),
            task_managers: tms.iter().map(|s| s.to_string()).collect(),
            created_at: 0,
        }
    }

    #[test]
    fn roles_grant_what_the_issue_names_and_nothing_more() {
        use Permission::*;
        let grants = |r: Role| -> Vec<Permission> {
            [Read, Submit, TaskManager, Admin]
                .into_iter()
                .filter(|p| r.allows(*p))
                .collect()
        };
        assert_eq!(grants(Role::Admin), vec![Read, Submit, TaskManager, Admin]);
        assert_eq!(grants(Role::Submit), vec![Read, Submit]);
        assert_eq!(grants(Role::Read), vec![Read]);
        assert_eq!(grants(Role::TaskManager), vec![TaskManager]);
        assert_eq!(Submit.roles(), "admin or submit");
        assert!(Role::Admin.sees_secrets() && !Role::Submit.sees_secrets());
    }

    #[test]
    fn a_task_manager_token_acts_only_for_its_bindings() {
        let t = token(Role::TaskManager, &["tm-1", "pool-*"]);
        let id = |s: &str| TaskManagerId(s.into());
        assert!(t.may_act_for(&id("tm-1")));
        assert!(
            !t.may_act_for(&id("tm-10")),
            "an exact binding is not a prefix"
        );
        assert!(t.may_act_for(&id("pool-7")));
        assert!(!t.may_act_for(&id("tm-2")));
        assert!(token(Role::Admin, &[]).may_act_for(&id("any")));
        assert!(!token(Role::Submit, &[]).may_act_for(&id("tm-1")));
    }
}
