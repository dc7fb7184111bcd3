//! Who is calling, and may they: bearer tokens, roles and peer certificates, checked by
//! the edge before any handler runs or any request is forwarded.
//!
//! A call names the [`Access`] it needs in its service's table. Client calls carry
//! `authorization: Bearer <secret>`; the secret is hashed and looked up in the replicated
//! tokens, so a revocation takes effect here as soon as this replica applies it (a
//! forwarded call is checked again by the leader, which has applied it when it was
//! committed). Peer calls (RaftService) need, when TLS is on, a client certificate of the
//! cluster's CA valid for the DNS name `replica-<id>` of the member the message claims to
//! come from; the handler makes that comparison once it has decoded the sender.
//!
//! Tokens are enforced once the cluster holds any token, and from the start on a replica
//! configured for TLS or with a bootstrap token (so that no window exists before the
//! first token commits). This module never logs a secret or a header value.

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, ServerName};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};

use super::status::ApiError;
use crate::raft::sm_store::SharedState;
use crate::raft::NodeId;
use dispatcher_core::state::{hash_secret, Permission, TaskManagerId, Token};

/// The request header that carries the token.
pub const AUTHORIZATION: &str = "authorization";

/// What a call needs, as its service table declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read jobs, TaskManagers, status (roles read, submit, admin).
    Read,
    /// Submit or cancel jobs (roles submit, admin).
    Submit,
    /// The TaskManager protocol (roles taskmanager, admin; the handler checks the id).
    TaskManager,
    /// Membership, backups, tokens (role admin).
    Admin,
    /// Replica-to-replica traffic: a replica certificate when TLS is on, no token.
    Peer,
}

impl Access {
    fn permission(self) -> Option<Permission> {
        match self {
            Access::Read => Some(Permission::Read),
            Access::Submit => Some(Permission::Submit),
            Access::TaskManager => Some(Permission::TaskManager),
            Access::Admin => Some(Permission::Admin),
            Access::Peer => None,
        }
    }
}

/// The caller of one request, as the edge established it.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    /// The token presented, when tokens are enforced.
    token: Option<Token>,
    /// Tokens are not enforced: the caller may do anything (a cluster without tokens).
    open: bool,
    /// The TLS client certificate chain, when one was presented.
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// Whether this replica serves TLS (peers must then present a certificate).
    tls: bool,
    /// The header to pass on when the call is forwarded to the leader.
    authorization: Option<AsciiMetadataValue>,
    /// The token is not known here yet (this replica may lag behind its creation): the
    /// call may only be forwarded, and the leader decides.
    deferred: bool,
    /// The address the call came from (the far end of its connection).
    remote: Option<std::net::SocketAddr>,
}

impl Caller {
    /// The caller, as having called from `remote`.
    pub fn from_address(mut self, remote: Option<std::net::SocketAddr>) -> Self {
        self.remote = remote;
        self
    }

    /// The address the call came from, when the transport told.
    pub fn remote(&self) -> Option<std::net::SocketAddr> {
        self.remote
    }

    /// A caller with every right: for a cluster without tokens, and for tests.
    pub fn open() -> Self {
        Caller {
            open: true,
            ..Default::default()
        }
    }

    /// The principal that ownership records name: `token:<name>`, or empty when tokens
    /// are not enforced.
    pub fn principal(&self) -> String {
        self.token
            .as_ref()
            .map(Token::principal)
            .unwrap_or_default()
    }

    /// Whether the caller sees job environment values (admin tokens, or no tokens at all).
    pub fn sees_secrets(&self) -> bool {
        self.open || self.token.as_ref().is_some_and(|t| t.role.sees_secrets())
    }

    /// The stored hash of the caller's token, when it presented one that was checked.
    pub fn token_hash(&self) -> Option<&str> {
        self.token.as_ref().map(|t| t.hash.as_str())
    }

    /// Whether the caller is an administrator (or tokens are not enforced).
    pub fn is_admin(&self) -> bool {
        self.open
            || self
                .token
                .as_ref()
                .is_some_and(|t| t.role == dispatcher_core::state::Role::Admin)
    }

    /// Whether the caller may act for TaskManager `id`.
    pub fn may_act_for(&self, id: &TaskManagerId) -> bool {
        self.open || self.token.as_ref().is_some_and(|t| t.may_act_for(id))
    }

    /// Refuses a TaskManager call for an id the caller is not bound to.
    pub fn require_task_manager(&self, id: &TaskManagerId) -> Result<(), ApiError> {
        if self.may_act_for(id) {
            return Ok(());
        }
        let name = self.token.as_ref().map(|t| t.name.as_str()).unwrap_or("");
        Err(ApiError::PermissionDenied(format!(
            "token {name:?} may not act for TaskManager {id}: a taskmanager token acts only for the ids it was created with (--task-manager)"
        )))
    }

    /// Checks that a peer message claiming to come from replica `sender` was sent by
    /// that replica: with TLS, its client certificate must be valid for `replica-<id>`.
    /// Without TLS nothing can be checked (see docs/security.md).
    pub fn check_peer(&self, sender: NodeId) -> Result<(), ApiError> {
        if !self.tls {
            return Ok(());
        }
        let name = format!("replica-{sender}");
        let Some(leaf) = self.certs.as_ref().and_then(|c| c.first()) else {
            return Err(ApiError::PermissionDenied(
                "replica traffic needs a replica certificate of the cluster's CA".into(),
            ));
        };
        let valid = ServerName::try_from(name.as_str())
            .ok()
            .and_then(|server_name| {
                let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
                cert.verify_is_valid_for_subject_name(&server_name).ok()
            })
            .is_some();
        if valid {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied(format!(
                "the message claims to come from replica {sender}, but the peer's certificate is not valid for {name}"
            )))
        }
    }

    /// Whether authentication was left to the leader (see [`Authenticator::authenticate`]).
    pub fn is_deferred(&self) -> bool {
        self.deferred
    }

    /// The authorization header to forward with the call.
    pub fn authorization(&self) -> Option<&AsciiMetadataValue> {
        self.authorization.as_ref()
    }
}

/// Authenticates and authorizes calls against this replica's applied tokens.
#[derive(Clone)]
pub struct Authenticator {
    state: SharedState,
    /// Enforce tokens even before any exists (TLS or a bootstrap token configured).
    always: bool,
    /// This replica serves TLS.
    tls: bool,
}

impl Authenticator {
    /// An authenticator over `state`. `always`: refuse calls without a token even while
    /// the cluster has none yet. `tls`: peers must present replica certificates.
    pub fn new(state: SharedState, always: bool, tls: bool) -> Self {
        Authenticator { state, always, tls }
    }

    /// Establishes the caller of a request that needs `access`, or refuses it:
    /// UNAUTHENTICATED without a known token, PERMISSION_DENIED with the wrong role or
    /// without a peer certificate.
    ///
    /// `forwardable`: the call will go to the leader unless this replica leads. A token
    /// this replica does not know (yet: it may lag behind the token's creation) then
    /// gives a deferred caller, which may only be forwarded; the leader, which applied
    /// every committed token, decides. Without it, a token created a moment ago would be
    /// refused by a lagging follower.
    pub fn authenticate(
        &self,
        rpc: &str,
        access: Access,
        metadata: &MetadataMap,
        certs: Option<Arc<Vec<CertificateDer<'static>>>>,
        forwardable: bool,
    ) -> Result<Caller, ApiError> {
        let mut caller = Caller {
            certs,
            tls: self.tls,
            authorization: metadata.get(AUTHORIZATION).cloned(),
            ..Default::default()
        };
        let Some(permission) = access.permission() else {
            if self.tls && caller.certs.is_none() {
                return Err(ApiError::PermissionDenied(format!(
                    "{rpc} is replica traffic: it needs a replica certificate of the cluster's CA"
                )));
            }
            caller.open = true;
            return Ok(caller);
        };
        let guard = self.state.read();
        let state = &guard.state;
        if !self.always && !state.has_tokens() {
            caller.open = true;
            return Ok(caller);
        }
        let rpc = method_name(rpc);
        let rpc = rpc.as_str();
        let needs = permission.roles();
        let Some(secret) = bearer(metadata) else {
            return Err(ApiError::Unauthenticated(format!(
                "{rpc} needs a token with role {needs}: send `authorization: Bearer <token>` (dispatchctl --token-file or DISPATCHER_TOKEN)"
            )));
        };
        let Some(token) = state.token_by_hash(&hash_secret(secret)) else {
            if forwardable {
                caller.deferred = true;
                return Ok(caller);
            }
            if !state.has_tokens() {
                // Tokens are required here but none has reached this replica yet: the
                // bootstrap token commits once a leader is elected. Retrying helps.
                return Err(ApiError::Unavailable(format!(
                    "this replica knows no token yet (the bootstrap token is created once a leader is elected by a replica started with --bootstrap-token-file); {rpc} needs role {needs}"
                )));
            }
            return Err(ApiError::Unauthenticated(format!(
                "the token is not known to the cluster (never issued, or revoked); {rpc} needs a token with role {needs}"
            )));
        };
        if !token.role.allows(permission) {
            return Err(ApiError::PermissionDenied(format!(
                "token {:?} has role {}; {rpc} needs role {needs}",
                token.name, token.role
            )));
        }
        caller.token = Some(token.clone());
        Ok(caller)
    }
}

/// `submit_job` as gRPC names it: `SubmitJob`.
fn method_name(rpc: &str) -> String {
    rpc.split('_')
        .map(|word| {
            let mut chars = word.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// The secret of an `authorization: Bearer <secret>` header, if well formed.
fn bearer(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, secret) = value.split_once(' ')?;
    let secret = secret.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !secret.is_empty()).then_some(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(AUTHORIZATION, v.parse().expect("ascii"));
        m
    }

    #[test]
    fn messages_name_methods_as_grpc_does() {
        assert_eq!(method_name("submit_job"), "SubmitJob");
        assert_eq!(method_name("status"), "Status");
    }

    #[test]
    fn only_a_well_formed_bearer_header_yields_a_secret() {
        assert_eq!(bearer(&with_header("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&with_header("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&with_header("Basic abc")), None);
        assert_eq!(bearer(&with_header("Bearer ")), None);
        assert_eq!(bearer(&MetadataMap::new()), None);
    }

    #[test]
    fn without_tls_peer_checks_pass_and_with_tls_a_certificate_is_needed() {
        let plain = Caller::open();
        assert!(plain.check_peer(2).is_ok());
        let tls = Caller {
            tls: true,
            ..Caller::default()
        };
        assert!(matches!(
            tls.check_peer(2),
            Err(ApiError::PermissionDenied(_))
        ));
    }
}
