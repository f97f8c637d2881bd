//! The auth gate: one check in front of every route except `GET /v1/healthz`.
//! It looks only at the `Authorization` header, never at the path, so an
//! unauthenticated caller cannot tell known sandbox ids from unknown ones.

use sha2::{Digest, Sha256};

use super::error::ApiError;
use crate::config::AuthMode;

/// Decides whether a request may proceed. Keys are held only as SHA-256
/// digests and never logged.
#[derive(Clone)]
pub struct Gate {
    /// `None`: auth off.
    keys: Option<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.keys {
            None => write!(f, "Gate(off)"),
            Some(k) => write!(f, "Gate({} keys)", k.len()),
        }
    }
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

/// Equality that takes the same time wherever the inputs differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

impl Gate {
    /// The gate for the start-up decision.
    pub fn new(mode: &AuthMode) -> Self {
        match mode {
            AuthMode::Keys(keys) => Gate { keys: Some(keys.iter().map(|k| digest(k.as_bytes())).collect()) },
            AuthMode::LoopbackDev | AuthMode::Disabled => Gate { keys: None },
        }
    }

    /// True when requests are checked at all.
    pub fn enabled(&self) -> bool {
        self.keys.is_some()
    }

    /// Checks the value of the `Authorization` header.
    pub fn check(&self, authorization: Option<&str>) -> Result<(), ApiError> {
        let Some(keys) = &self.keys else { return Ok(()) };
        let token = authorization
            .map(str::trim)
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::MissingAuth)?;
        // Comparing digests hides the key length; checking every key (no
        // early return) hides which one matched.
        let d = digest(token.as_bytes());
        let matched = keys.iter().fold(false, |acc, k| acc | ct_eq(k, &d));
        if matched {
            Ok(())
        } else {
            Err(ApiError::InvalidKey)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate() {
        let g = Gate::new(&AuthMode::Keys(vec!["k1".into(), "k2".into()]));
        assert!(g.check(Some("Bearer k2")).is_ok());
        assert!(g.check(Some("bearer  k1 ")).is_ok());
        assert!(matches!(g.check(None), Err(ApiError::MissingAuth)));
        assert!(matches!(g.check(Some("Basic k1")), Err(ApiError::MissingAuth)));
        assert!(matches!(g.check(Some("Bearer")), Err(ApiError::MissingAuth)));
        assert!(matches!(g.check(Some("Bearer k3")), Err(ApiError::InvalidKey)));
        assert!(matches!(g.check(Some("Bearer k")), Err(ApiError::InvalidKey)));
        let off = Gate::new(&AuthMode::LoopbackDev);
        assert!(off.check(None).is_ok());
        assert!(!off.enabled());
    }
}
