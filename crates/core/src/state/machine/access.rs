//! Tokens and TaskManager ownership in the state: create, revoke, look up by hash, and
//! who registered each live TaskManager id.
//!
//! Nothing here does I/O, reads a clock or draws a random number: the secret is drawn and
//! hashed at the edge, and only the hash arrives here.

use std::collections::BTreeMap;

use super::DispatcherState;
use crate::state::access::{Role, Token};
use crate::state::command::{Rejection, Response};
use crate::state::types::TaskManagerId;
use crate::state::validate::validate_token;

impl DispatcherState {
    pub(super) fn create_token(
        &mut self,
        token: Token,
        bootstrap: bool,
    ) -> Result<Response, Rejection> {
        validate_token(&token)?;
        if bootstrap && !self.tokens.is_empty() {
            return Ok(Response::TokenCreated {
                name: token.name,
                created: false,
            });
        }
        if let Some(existing) = self.tokens.get(&token.name) {
            // A retried command (same secret, same role) is accepted as a no-op.
            let retried = existing.hash == token.hash
                && existing.role == token.role
                && existing.task_managers == token.task_managers;
            return if retried {
                Ok(Response::TokenCreated {
                    name: token.name,
                    created: false,
                })
            } else {
                Err(Rejection::TokenExists { name: token.name })
            };
        }
        if self.tokens.is_empty() && token.role != Role::Admin {
            // From the first token on, every call needs one: without an admin nobody
            // could ever manage the cluster again.
            return Err(Rejection::invalid(
                "role",
                "the cluster's first token must be an admin token",
            ));
        }
        if let Some(other) = self.token_hashes.get(&token.hash) {
            // Two names for one secret would make revocation by name incomplete.
            return Err(Rejection::invalid(
                "hash",
                format!("the secret is already the token {other:?}"),
            ));
        }
        self.tick(token.created_at);
        let name = token.name.clone();
        self.token_hashes.insert(token.hash.clone(), name.clone());
        self.tokens.insert(name.clone(), token);
        Ok(Response::TokenCreated {
            name,
            created: true,
        })
    }

    pub(super) fn revoke_token(&mut self, name: &str) -> Result<Response, Rejection> {
        let Some(token) = self.tokens.get(name) else {
            return Err(Rejection::UnknownToken { name: name.into() });
        };
        let admins = self
            .tokens
            .values()
            .filter(|t| t.role == Role::Admin)
            .count();
        if token.role == Role::Admin && admins == 1 {
            return Err(Rejection::LastAdminToken { name: name.into() });
        }
        let hash = token.hash.clone();
        self.tokens.remove(name);
        self.token_hashes.remove(&hash);
        Ok(Response::TokenRevoked { name: name.into() })
    }

    /// The token whose secret hashes to `hash`, if any.
    pub fn token_by_hash(&self, hash: &str) -> Option<&Token> {
        self.tokens.get(self.token_hashes.get(hash)?)
    }

    /// Every token, by name.
    pub fn tokens(&self) -> &BTreeMap<String, Token> {
        &self.tokens
    }

    /// Whether the cluster has any token: from then on every call must carry one.
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Who registered the live TaskManager `id` (`None` when it is not registered or was
    /// registered while the cluster had no tokens).
    pub fn owner_of(&self, id: &TaskManagerId) -> Option<&str> {
        self.owners.get(id).map(String::as_str)
    }

    /// The ids that have an owner.
    pub fn owned_ids(&self) -> impl Iterator<Item = &TaskManagerId> {
        self.owners.keys()
    }

    /// Refuses a registration of `id` by `owner` when another principal holds it.
    pub(super) fn check_owner(&self, id: &TaskManagerId, owner: &str) -> Result<(), Rejection> {
        match self.owners.get(id) {
            Some(current) if current != owner => Err(Rejection::TaskManagerOwned {
                id: id.clone(),
                owner: current.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Rebuilds the hash index from the tokens.
    pub(super) fn rebuild_token_index(&mut self) {
        self.token_hashes = self
            .tokens
            .values()
            .map(|t| (t.hash.clone(), t.name.clone()))
            .collect();
    }
}
