//! Who a connection speaks for: signed tokens, the id alphabet, and the one
//! function that turns an upgrade request into an [`Identity`].
//!
//! Tokens are standard JWTs signed with HS256 by the operator's login service
//! (or `ridelock token`), with the claims `sub` (the driver or rider id),
//! `role` (`driver`, `rider` or `ops`) and `exp`. The engine only verifies
//! them: with a secret configured, the id comes from a verified `sub` and
//! nothing the client writes in the URL can change it. Without one (open
//! mode, for local use) the `id` query parameter is taken at its word.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Longest driver or rider id accepted, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Shortest secret accepted: HS256 with fewer than 32 bytes of key is
/// guessable offline from one captured token.
pub const MIN_SECRET_LEN: usize = 32;

/// What a token lets its holder be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A driver app, on `/ws/driver`.
    Driver,
    /// A rider app, on `/ws/rider`.
    Rider,
    /// An operator: `/metrics` on the public port and the ops map
    /// (`/ws/ops`).
    Ops,
}

impl Role {
    /// The role as written in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Driver => "driver",
            Role::Rider => "rider",
            Role::Ops => "ops",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "driver" => Ok(Role::Driver),
            "rider" => Ok(Role::Rider),
            "ops" => Ok(Role::Ops),
            other => Err(format!("unknown role {other:?}: driver, rider or ops")),
        }
    }
}

/// The claims of a ridelock token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The driver's or rider's id (an operator's name for `ops`).
    pub sub: String,
    /// What the holder may be.
    pub role: Role,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// Who a WebSocket connection speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A driver app.
    Driver(Arc<str>),
    /// A rider app.
    Rider(Arc<str>),
    /// An operator watching the ops map (the token's subject; in open mode
    /// anyone, and unnamed).
    Ops(Arc<str>),
}

/// A verified identity and until when it holds (`None` in open mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Who the connection is.
    pub identity: Identity,
    /// When the token expires, in Unix seconds; the connection is closed
    /// then (after the leeway).
    pub expires_at: Option<u64>,
}

/// Why a connection was refused before the upgrade (HTTP 401 with this as its
/// one-line body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the `Authorization` header nor in `?token=`.
    #[error("missing token: send Authorization: Bearer TOKEN, or ?token=TOKEN from a browser")]
    Missing,
    /// Not a JWT, or not one signed with this engine's secret and HS256.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// `exp` has passed.
    #[error("token expired: get a fresh one")]
    Expired,
    /// A valid token for another endpoint (a rider token on `/ws/driver`).
    #[error("token is for role {token}, this endpoint needs {needed}")]
    WrongRole {
        /// The token's role.
        token: &'static str,
        /// The endpoint's role.
        needed: &'static str,
    },
    /// `sub` (or, in open mode, `id`) is not a valid id.
    #[error("{0}")]
    BadId(String),
}

/// Why a secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read the auth secret file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The trimmed secret is too short.
    #[error("the auth secret in {path} is {len} bytes; use at least {MIN_SECRET_LEN} random bytes (e.g. `openssl rand -base64 48`)")]
    TooShort {
        /// The file.
        path: String,
        /// Its trimmed length.
        len: usize,
    },
}

/// Reads a secret file: its bytes with surrounding whitespace trimmed (so a
/// trailing newline from `echo` or an editor is not part of the key).
pub fn read_secret(path: &Path) -> Result<Vec<u8>, SecretError> {
    let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let secret = bytes.trim_ascii().to_vec();
    if secret.len() < MIN_SECRET_LEN {
        return Err(SecretError::TooShort {
            path: path.display().to_string(),
            len: secret.len(),
        });
    }
    Ok(secret)
}

/// Checks an id: 1 to [`MAX_ID_LEN`] bytes of ASCII letters, digits and
/// `-`, `_`, `.`, `:`, `@`. Ids reach other parties (a rider sees the driver's
/// id) and Redis keys, so control characters, bidirectional overrides and
/// anything that decoded from invalid percent-escapes are refused rather than
/// passed on or collapsed into one replacement character.
pub fn check_id(id: &str) -> Result<(), AuthError> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || "-_.:@".contains(c);
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.chars().all(valid_char) {
        return Err(AuthError::BadId(format!(
            "an id is 1 to {MAX_ID_LEN} of the characters A-Z a-z 0-9 - _ . : @"
        )));
    }
    Ok(())
}

/// Verifies tokens against one secret.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier { .. }") // never the key
    }
}

impl Verifier {
    /// A verifier for tokens signed with `secret`, accepting a token up to
    /// `leeway` after its `exp` (clock skew between the issuer and the engine).
    pub fn new(secret: &[u8], leeway: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway.as_secs();
        validation.set_required_spec_claims(&["exp", "sub"]);
        // A token that says it is not valid yet is not.
        validation.validate_nbf = true;
        // Only HS256: a token naming another algorithm (`none`, RS256 with the
        // secret as a "public key") is refused.
        validation.algorithms = vec![Algorithm::HS256];
        Verifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// The claims of `token` if it is signed with this secret, unexpired and
    /// for `role`, and names a valid id.
    pub fn verify(&self, token: &str, role: Role) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => {
                    AuthError::Invalid("signature does not match".into())
                }
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("only HS256 is accepted".into()),
                // No audience is configured, and jsonwebtoken then refuses
                // any token that names one.
                ErrorKind::InvalidAudience => {
                    AuthError::Invalid("tokens with an aud claim are not accepted".into())
                }
                ErrorKind::MissingRequiredClaim(claim) => {
                    AuthError::Invalid(format!("missing claim {claim}"))
                }
                ErrorKind::ImmatureSignature => AuthError::Invalid("not valid yet (nbf)".into()),
                ErrorKind::InvalidClaimFormat(claim) => {
                    AuthError::Invalid(format!("claim {claim} has the wrong type"))
                }
                ErrorKind::Json(_) => AuthError::Invalid(
                    "claims must be sub (string), role (driver, rider or ops) and exp (seconds)"
                        .into(),
                ),
                _ => AuthError::Invalid("not a JWT".into()),
            })?
            .claims;
        if claims.role != role {
            return Err(AuthError::WrongRole {
                token: claims.role.as_str(),
                needed: role.as_str(),
            });
        }
        // A signed token with an unusable id is the issuer's mistake, but
        // still not a login: 401 like any other invalid token.
        check_id(&claims.sub).map_err(|e| AuthError::Invalid(format!("sub: {e}")))?;
        Ok(claims)
    }
}

/// Signs a token for `id` in `role`, valid for `ttl` from now: what
/// `ridelock token` prints, and what tests and the simulator use.
pub fn mint(secret: &[u8], role: Role, id: &str, ttl: Duration) -> String {
    let claims = Claims {
        sub: id.to_string(),
        role,
        exp: unix_now() + ttl.as_secs(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    // HS256 over serde-serialisable claims has no failure path.
    .expect("HS256 tokens always encode")
}

/// Seconds since the Unix epoch (token expiries are in these).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The endpoint a WebSocket path serves, if any.
pub fn endpoint_role(path: &str) -> Option<Role> {
    match path {
        "/ws/driver" => Some(Role::Driver),
        "/ws/rider" => Some(Role::Rider),
        "/ws/ops" => Some(Role::Ops),
        _ => None,
    }
}

/// The bearer token of a request: the `Authorization: Bearer` header, else
/// the `token` query parameter (browsers can't set headers on WebSockets).
pub fn bearer_token<'a>(authorization: Option<&'a str>, query: Option<&'a str>) -> Option<String> {
    if let Some(value) = authorization {
        let (scheme, token) = value.trim().split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    query_param(query, "token")
}

/// A query parameter, percent-decoded (invalid escapes become U+FFFD, which
/// no id accepts).
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Decides who a WebSocket connection is. With a verifier, only a valid token
/// for the endpoint's role counts and any `id` parameter is ignored; without
/// one (open mode), `id` is taken at its word.
pub fn authenticate(
    verifier: Option<&Verifier>,
    role: Role,
    authorization: Option<&str>,
    query: Option<&str>,
) -> Result<Verified, AuthError> {
    let (id, expires_at) = match verifier {
        Some(verifier) => {
            let token = bearer_token(authorization, query).ok_or(AuthError::Missing)?;
            let claims = verifier.verify(&token, role)?;
            (claims.sub, Some(claims.exp))
        }
        // The ops feed is read-only and names nobody: in open mode it needs
        // no id, as `/metrics` needs none.
        None if role == Role::Ops => (String::new(), None),
        None => {
            let id = query_param(query, "id").unwrap_or_default();
            check_id(&id)?;
            (id, None)
        }
    };
    let identity = match role {
        Role::Driver => Identity::Driver(id.into()),
        Role::Rider => Identity::Rider(id.into()),
        Role::Ops => Identity::Ops(id.into()),
    };
    Ok(Verified {
        identity,
        expires_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

    fn verifier() -> Verifier {
        Verifier::new(SECRET, Duration::ZERO)
    }

    #[test]
    fn a_minted_token_verifies_for_its_role_only() {
        let token = mint(SECRET, Role::Driver, "d1", Duration::from_secs(60));
        let claims = verifier().verify(&token, Role::Driver).unwrap();
        assert_eq!(claims.sub, "d1");
        assert_eq!(claims.role, Role::Driver);
        assert!(claims.exp >= unix_now() + 59);
        assert_eq!(
            verifier().verify(&token, Role::Rider),
            Err(AuthError::WrongRole {
                token: "driver",
                needed: "rider"
            })
        );
    }

    #[test]
    fn wrong_secret_expired_and_garbage_are_refused() {
        let other = mint(
            b"another-secret-of-thirty-two-bytes!!",
            Role::Driver,
            "d1",
            Duration::from_secs(60),
        );
        assert!(matches!(
            verifier().verify(&other, Role::Driver),
            Err(AuthError::Invalid(_))
        ));
        let claims = Claims {
            sub: "d1".into(),
            role: Role::Driver,
            exp: unix_now() - 10,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(
            verifier().verify(&expired, Role::Driver),
            Err(AuthError::Expired)
        );
        // Within the leeway it still counts.
        let lenient = Verifier::new(SECRET, Duration::from_secs(30));
        assert!(lenient.verify(&expired, Role::Driver).is_ok());
        for garbage in ["", "x", "a.b.c", "Bearer", "\u{0}\u{ffff}"] {
            assert!(
                matches!(
                    verifier().verify(garbage, Role::Driver),
                    Err(AuthError::Invalid(_))
                ),
                "{garbage:?}"
            );
        }
    }

    /// A token with these claims, signed with the test secret by `algorithm`.
    fn signed(claims: serde_json::Value, algorithm: Algorithm) -> String {
        jsonwebtoken::encode(
            &Header::new(algorithm),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    #[test]
    fn only_hs256_tokens_with_sub_and_exp_pass() {
        let exp = unix_now() + 60;
        let good = serde_json::json!({"sub": "d1", "role": "driver", "exp": exp});
        assert!(verifier()
            .verify(&signed(good.clone(), Algorithm::HS256), Role::Driver)
            .is_ok());
        // The same claims under HS512 or HS384: refused, whatever the key.
        for algorithm in [Algorithm::HS384, Algorithm::HS512] {
            let token = signed(good.clone(), algorithm);
            assert!(matches!(
                verifier().verify(&token, Role::Driver),
                Err(AuthError::Invalid(_))
            ));
        }
        // alg "none" with no signature.
        use base64::Engine as _;
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let none = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
            b64(&good)
        );
        assert!(matches!(
            verifier().verify(&none, Role::Driver),
            Err(AuthError::Invalid(_))
        ));
        // Missing exp, missing sub, exp of the wrong type, not yet valid.
        for claims in [
            serde_json::json!({"sub": "d1", "role": "driver"}),
            serde_json::json!({"role": "driver", "exp": exp}),
            serde_json::json!({"sub": "d1", "role": "driver", "exp": "tomorrow"}),
            serde_json::json!({"sub": "d1", "role": "driver", "exp": exp, "nbf": exp}),
            serde_json::json!({"sub": "d1", "role": "admin", "exp": exp}),
            serde_json::json!({"sub": 7, "role": "driver", "exp": exp}),
        ] {
            let token = signed(claims.clone(), Algorithm::HS256);
            assert!(
                matches!(
                    verifier().verify(&token, Role::Driver),
                    Err(AuthError::Invalid(_))
                ),
                "{claims}"
            );
        }
        // A far-future exp is valid (the connection deadline clamps it).
        let far = serde_json::json!({"sub": "d1", "role": "driver", "exp": u64::MAX / 2});
        assert!(verifier()
            .verify(&signed(far, Algorithm::HS256), Role::Driver)
            .is_ok());
    }

    #[test]
    fn a_token_with_an_invalid_sub_is_refused() {
        for sub in ["", "d 1", "d\u{202e}1", "d\n1", &"x".repeat(65)] {
            let token = mint(SECRET, Role::Rider, sub, Duration::from_secs(60));
            assert!(
                matches!(
                    verifier().verify(&token, Role::Rider),
                    Err(AuthError::Invalid(_))
                ),
                "{sub:?}"
            );
        }
    }

    #[test]
    fn the_id_alphabet() {
        for ok in ["d1", "driver-42_x.y:z@fleet", &"x".repeat(64)] {
            assert!(check_id(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "d 1",
            "\u{fffd}",
            "d\u{202e}",
            "d\u{7}",
            "é",
            "d/1",
            "d%1",
            "d+1",
        ] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn open_mode_takes_the_id_and_refuses_undecodable_ones() {
        let v = authenticate(None, Role::Driver, None, Some("id=d1")).unwrap();
        assert_eq!(v.identity, Identity::Driver("d1".into()));
        assert_eq!(v.expires_at, None);
        // %ff and %fe would both decode to U+FFFD: refused, not collapsed.
        for query in ["id=%ff", "id=%fe", "id=%e2%80%ae", "id=", "x=1"] {
            assert!(
                authenticate(None, Role::Driver, None, Some(query)).is_err(),
                "{query}"
            );
        }
    }

    #[test]
    fn with_a_secret_the_token_names_the_id_whatever_the_url_says() {
        let token = mint(SECRET, Role::Driver, "d1", Duration::from_secs(60));
        let v = verifier();
        let query = format!("id=d2&token={token}");
        let by_query = authenticate(Some(&v), Role::Driver, None, Some(&query)).unwrap();
        assert_eq!(by_query.identity, Identity::Driver("d1".into()));
        let header = format!("Bearer {token}");
        let by_header = authenticate(Some(&v), Role::Driver, Some(&header), Some("id=d2")).unwrap();
        assert_eq!(by_header.identity, Identity::Driver("d1".into()));
        assert_eq!(
            authenticate(Some(&v), Role::Driver, None, Some("id=d2")),
            Err(AuthError::Missing)
        );
        // A header with another scheme is not silently replaced by the query.
        assert_eq!(
            authenticate(Some(&v), Role::Driver, Some("Basic abc"), Some(&query)),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn a_short_secret_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("ridelock-secret-{}", std::process::id()));
        std::fs::write(&dir, b"  short\n").unwrap();
        assert!(matches!(
            read_secret(&dir),
            Err(SecretError::TooShort { len: 5, .. })
        ));
        std::fs::write(&dir, [SECRET, b"\n"].concat()).unwrap();
        assert_eq!(read_secret(&dir).unwrap(), SECRET);
        std::fs::remove_file(&dir).unwrap();
    }
}
