//! Access tokens: who may read (in private mode) and who may upload.
//!
//! Clients send a token as HTTP Basic credentials (what Nix sends from its netrc file: any
//! login, the token as password) or as `Authorization: Bearer <token>`. The config holds only
//! `sha256:<hex>` of each token; a presented token is hashed and compared with every configured
//! hash in constant time, without stopping at the first match.

use axum::http::{header, HeaderMap};
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD};
use base64::Engine as _;
use subtle::ConstantTimeEq as _;

use crate::config::{AuthConfig, Scope, TokenHash};

/// The outcome of checking a request's credentials for a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; the token's name, if one was needed.
    Allowed(Option<String>),
    /// No credentials were sent (401).
    Missing,
    /// Credentials were sent but match no token (403).
    Invalid,
    /// A valid token without the needed scope (403).
    InsufficientScope(String),
}

struct Token {
    name: String,
    hash: TokenHash,
    read: bool,
    write: bool,
}

pub struct Tokens {
    tokens: Vec<Token>,
    private: bool,
}

/// A fresh token: `cellar_` and 32 random bytes, URL-safe base64 (netrc-safe).
pub fn generate() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b)?;
    Ok(format!("cellar_{}", URL_SAFE_NO_PAD.encode(b)))
}

/// What goes into the config for `token` (`sha256:<hex>`).
pub fn hash(token: &str) -> String {
    TokenHash::of(token).to_string()
}

/// The token a request carries, if any (an empty one is none: `user:` in Basic).
fn presented(headers: &HeaderMap) -> Option<String> {
    carried(headers).filter(|t| !t.is_empty())
}

fn carried(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = BASE64.decode(rest).ok()?;
        let s = String::from_utf8(decoded).ok()?;
        let (_user, pass) = s.split_once(':')?;
        return Some(pass.to_owned());
    }
    None
}

impl Tokens {
    pub fn from_config(c: &AuthConfig) -> Self {
        let tokens = c
            .tokens
            .iter()
            .map(|t| {
                let write = t.scopes.contains(&Scope::Write);
                Token {
                    name: t.name.clone(),
                    hash: t.hash,
                    read: write || t.scopes.contains(&Scope::Read),
                    write,
                }
            })
            .collect();
        Self {
            tokens,
            private: c.private,
        }
    }

    /// Whether some token may upload: the root's answers to builders then differ from
    /// readers' (see `crate::http::nar::head`).
    pub fn any_writer(&self) -> bool {
        self.tokens.iter().any(|t| t.write)
    }

    /// Whether a request with `headers` may do something needing `scope`.
    pub fn check(&self, headers: &HeaderMap, scope: Scope) -> Decision {
        if scope == Scope::Read && !self.private {
            return Decision::Allowed(None);
        }
        let Some(token) = presented(headers) else {
            return Decision::Missing;
        };
        let h = TokenHash::of(&token);
        let mut found: Option<&Token> = None;
        for t in &self.tokens {
            if bool::from(t.hash.0.ct_eq(&h.0)) {
                found = Some(t);
            }
        }
        match found {
            None => Decision::Invalid,
            Some(t) => {
                let ok = match scope {
                    Scope::Read => t.read,
                    Scope::Write => t.write,
                };
                if ok {
                    Decision::Allowed(Some(t.name.clone()))
                } else {
                    Decision::InsufficientScope(t.name.clone())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenConfig;
    use axum::http::HeaderValue;

    fn tokens(private: bool) -> (Tokens, String, String) {
        let w = generate().unwrap();
        let r = generate().unwrap();
        let cfg = AuthConfig {
            private,
            tokens: vec![
                TokenConfig {
                    name: "builder".into(),
                    hash: TokenHash::of(&w),
                    scopes: vec![Scope::Write],
                },
                TokenConfig {
                    name: "reader".into(),
                    hash: TokenHash::of(&r),
                    scopes: vec![Scope::Read],
                },
            ],
        };
        (Tokens::from_config(&cfg), w, r)
    }

    fn basic(pass: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = format!("Basic {}", BASE64.encode(format!("anyuser:{pass}")));
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(&v).unwrap());
        h
    }

    fn bearer(tok: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {tok}")).unwrap(),
        );
        h
    }

    #[test]
    fn scopes_and_schemes() {
        let (t, w, r) = tokens(false);
        assert_eq!(
            t.check(&HeaderMap::new(), Scope::Read),
            Decision::Allowed(None)
        );
        assert_eq!(t.check(&HeaderMap::new(), Scope::Write), Decision::Missing);
        assert_eq!(
            t.check(&basic(&w), Scope::Write),
            Decision::Allowed(Some("builder".into()))
        );
        assert_eq!(
            t.check(&bearer(&w), Scope::Write),
            Decision::Allowed(Some("builder".into()))
        );
        assert_eq!(
            t.check(&basic(&r), Scope::Write),
            Decision::InsufficientScope("reader".into())
        );
        assert_eq!(t.check(&basic("wrong"), Scope::Write), Decision::Invalid);
        assert_eq!(
            t.check(&bearer(&format!("{w}x")), Scope::Write),
            Decision::Invalid
        );
    }

    /// An empty password (`curl -u user:`) is no token, even against the hash of the empty
    /// token (which the config refuses: a hash made from an unset variable).
    #[test]
    fn an_empty_password_is_no_token() {
        let cfg = AuthConfig {
            private: false,
            tokens: vec![TokenConfig {
                name: "unset".into(),
                hash: TokenHash::of(""),
                scopes: vec![Scope::Write],
            }],
        };
        let t = Tokens::from_config(&cfg);
        assert_eq!(t.check(&basic(""), Scope::Write), Decision::Missing);
    }

    #[test]
    fn private_mode_needs_a_token_to_read() {
        let (t, w, r) = tokens(true);
        assert_eq!(t.check(&HeaderMap::new(), Scope::Read), Decision::Missing);
        assert!(matches!(
            t.check(&basic(&r), Scope::Read),
            Decision::Allowed(_)
        ));
        assert!(matches!(
            t.check(&basic(&w), Scope::Read),
            Decision::Allowed(_)
        ));
        assert_eq!(t.check(&basic("nope"), Scope::Read), Decision::Invalid);
    }

    #[test]
    fn tokens_are_netrc_safe_and_hashes_stable() {
        let t = generate().unwrap();
        assert!(t.starts_with("cellar_"));
        assert!(!t.contains(char::is_whitespace));
        assert_eq!(
            hash("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
