//! Tenants: each producer sends `Authorization: Bearer <token>`; the API keeps only the
//! SHA-256 of each token (`api.tenants`), hashes what it is sent and looks it up. A
//! tenant sees and cancels only its own jobs: anyone else's id is 404, as if it did not
//! exist. With no tenants configured the API is open (development, the demo) and the
//! tenant comes from the request.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};

/// Token hash → tenant.
#[derive(Clone, Default)]
pub(crate) struct Tenants(Arc<HashMap<[u8; 32], String>>);

impl Tenants {
    /// From `api.tenants` (validated: 64 hex characters each).
    pub(crate) fn new(config: &std::collections::BTreeMap<String, String>) -> Self {
        let mut map = HashMap::new();
        for (name, hex_hash) in config {
            let mut h = [0u8; 32];
            if hex::decode_to_slice(hex_hash, &mut h).is_ok() {
                map.insert(h, name.clone());
            }
        }
        Self(Arc::new(map))
    }

    /// Whether callers must authenticate.
    pub(crate) fn enabled(&self) -> bool {
        !self.0.is_empty()
    }

    fn lookup(&self, token: &str) -> Option<&String> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.0.get(&digest)
    }
}

/// The SHA-256 of a token, hex, as `api.tenants` holds it.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token (`llmq_` + 40 hex characters).
pub fn new_token() -> String {
    let bytes: [u8; 20] = rand::random();
    format!("llmq_{}", hex::encode(bytes))
}

/// Who is calling: a tenant, or anyone (open mode).
#[derive(Clone, Debug)]
pub(crate) enum Caller {
    Tenant(String),
    Open,
}

impl Caller {
    /// The tenant whose jobs this caller may see (`None`: all).
    pub(crate) fn scope(&self) -> Option<&str> {
        match self {
            Caller::Tenant(t) => Some(t),
            Caller::Open => None,
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if !state.tenants.enabled() {
            return Ok(Caller::Open);
        }
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(value) = header else {
            return Err(ApiError::Unauthorized(
                "missing `Authorization: Bearer <token>`: every request needs the tenant's token",
            ));
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .unwrap_or_default();
        match state.tenants.lookup(token) {
            Some(t) => Ok(Caller::Tenant(t.clone())),
            None => Err(ApiError::Unauthorized(
                "the bearer token is not one of a configured tenant; check it, or make one with `llmq token NAME`",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_by_their_hash_only() {
        let token = new_token();
        assert!(token.starts_with("llmq_") && token.len() == 45);
        let mut cfg = std::collections::BTreeMap::new();
        cfg.insert("acme".to_owned(), token_hash(&token));
        let t = Tenants::new(&cfg);
        assert!(t.enabled());
        assert_eq!(t.lookup(&token).map(String::as_str), Some("acme"));
        assert_eq!(t.lookup("llmq_wrong"), None);
        // The hash itself is not a token.
        assert_eq!(t.lookup(&token_hash(&token)), None);
    }
}
