//! HTTP Basic authentication, compared in constant time.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Credentials;

/// The credentials one part of the API accepts. Only SHA-256 digests of
/// `user:password` are kept, so every comparison has the same length and
/// takes the same time whatever the guess.
#[derive(Clone)]
pub struct BasicAuth {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BasicAuth({} accepted)", self.digests.len())
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl BasicAuth {
    pub fn new(credentials: &Credentials) -> Self {
        let digests = credentials
            .passwords
            .iter()
            .map(|p| digest(format!("{}:{}", credentials.username, p.expose()).as_bytes()))
            .collect();
        BasicAuth { digests }
    }

    /// Whether the request's `Authorization` header carries accepted
    /// credentials.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some((scheme, encoded)) = value.trim().split_once(' ') else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case("basic") {
            return false;
        }
        let encoded = encoded.trim();
        let Ok(decoded) = STANDARD
            .decode(encoded)
            .or_else(|_| STANDARD_NO_PAD.decode(encoded))
        else {
            return false;
        };
        if !decoded.contains(&b':') {
            return false;
        }
        let given = digest(&decoded);
        // Compare with every accepted digest, without stopping early.
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |acc, d| acc | d.ct_eq(&given))
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use axum::http::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    fn basic(user: &str, pass: &str) -> HeaderMap {
        headers(&format!(
            "Basic {}",
            STANDARD.encode(format!("{user}:{pass}"))
        ))
    }

    #[test]
    fn accepts_current_and_previous_only() {
        let auth = BasicAuth::new(&Credentials {
            username: "qualia".into(),
            passwords: vec![Secret::new("new-pass"), Secret::new("old-pass")],
        });
        assert!(auth.allows(&basic("qualia", "new-pass")));
        assert!(auth.allows(&basic("qualia", "old-pass")));
        assert!(!auth.allows(&basic("qualia", "other")));
        assert!(!auth.allows(&basic("someone", "new-pass")));
        assert!(!auth.allows(&HeaderMap::new()));
        assert!(!auth.allows(&headers("Bearer abc")));
        assert!(!auth.allows(&headers("Basic !!!")));
        assert!(!auth.allows(&headers(&format!("Basic {}", STANDARD.encode("nocolon")))));
        // Scheme is case-insensitive; padding may be left off.
        let no_pad = STANDARD_NO_PAD.encode("qualia:new-pass");
        assert!(auth.allows(&headers(&format!("basic {no_pad}"))));
    }
}
