//! Access tokens: HS256 JWTs signed with the API secret, issued by the API
//! key, carrying a grant.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// What a token allows. Field names follow the `video` grant of common SFU
/// tokens so existing tooling reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VideoGrant {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub room: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub room_join: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub room_create: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub room_list: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub room_admin: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_publish: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub can_subscribe: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The API key that signed the token.
    pub iss: String,
    /// The participant identity (join tokens) or the caller's name.
    #[serde(default)]
    pub sub: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub exp: u64,
    #[serde(default)]
    pub nbf: u64,
    #[serde(default)]
    pub video: VideoGrant,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing access token")]
    Missing,
    #[error("invalid access token: {0}")]
    Invalid(String),
    #[error("access token has expired")]
    Expired,
    #[error("access token is not valid yet")]
    NotYetValid,
    #[error("access token was issued by an unknown API key")]
    UnknownKey,
}

/// API keys and secrets: the server signs with the first and accepts
/// tokens issued by any.
#[derive(Clone)]
pub struct Keys {
    pub api_key: String,
    secret: String,
    /// Further keys accepted, by key.
    others: std::sync::Arc<std::collections::HashMap<String, String>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut others: Vec<&String> = self.others.keys().collect();
        others.sort();
        f.debug_struct("Keys")
            .field("api_key", &self.api_key)
            .field("secret", &"<redacted>")
            .field("other_keys", &others)
            .finish()
    }
}

/// Seconds of clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 10;

impl Keys {
    pub fn new(api_key: impl Into<String>, secret: impl Into<String>) -> Keys {
        Keys {
            api_key: api_key.into(),
            secret: secret.into(),
            others: Default::default(),
        }
    }

    /// Accepts tokens issued by `api_key` too.
    pub fn add(&mut self, api_key: impl Into<String>, secret: impl Into<String>) {
        std::sync::Arc::make_mut(&mut self.others).insert(api_key.into(), secret.into());
    }

    /// How many keys are accepted.
    pub fn key_count(&self) -> usize {
        1 + self.others.len()
    }

    fn secret_of(&self, api_key: &str) -> Option<&str> {
        if api_key == self.api_key {
            Some(&self.secret)
        } else {
            self.others.get(api_key).map(String::as_str)
        }
    }

    pub fn sign(&self, claims: &Claims) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(self.secret.as_bytes()),
        )
        .unwrap_or_default()
    }

    /// Checks signature (with the secret of the key named in `iss`),
    /// expiry and not-before.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let issuer = unverified_issuer(token)?;
        let secret = self.secret_of(&issuer).ok_or(AuthError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss"]);
        validation.set_issuer(&[issuer.as_str()]);
        let data = decode::<Claims>(
            token,
            &DecodingKey::from_secret(secret.as_bytes()),
            &validation,
        )
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            jsonwebtoken::errors::ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            _ => AuthError::Invalid(e.to_string()),
        })?;
        Ok(data.claims)
    }
}

/// The `iss` claim of a token, read before its signature is checked, to
/// choose the secret to check it with. Nothing else is trusted from it.
fn unverified_issuer(token: &str) -> Result<String, AuthError> {
    use base64::Engine as _;
    let malformed = || AuthError::Invalid("malformed token".into());
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| malformed())?;
    #[derive(Deserialize)]
    struct Issuer {
        iss: Option<String>,
    }
    let parsed: Issuer = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
    parsed
        .iss
        .ok_or_else(|| AuthError::Invalid("token has no issuer (iss)".into()))
}

/// Current Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A join token for one identity in one room.
pub fn join_claims(keys: &Keys, room: &str, identity: &str, name: &str, ttl_secs: u64) -> Claims {
    let now = unix_now();
    Claims {
        iss: keys.api_key.clone(),
        sub: identity.to_owned(),
        name: name.to_owned(),
        exp: now + ttl_secs,
        nbf: now.saturating_sub(1),
        video: VideoGrant {
            room: room.to_owned(),
            room_join: true,
            can_publish: Some(true),
            can_subscribe: Some(true),
            ..Default::default()
        },
    }
}

/// Parses a duration such as `3600`, `90s`, `30m`, `6h`, `2d`.
pub fn parse_ttl(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {text:?}"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?} (use s, m, h or d)"
            ))
        }
    };
    Ok(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let keys = Keys::new("k", "s3cret");
        let claims = join_claims(&keys, "r", "alice", "", 60);
        let token = keys.sign(&claims);
        assert_eq!(keys.verify(&token).unwrap(), claims);

        let other = Keys::new("k", "different");
        assert!(matches!(other.verify(&token), Err(AuthError::Invalid(_))));
        let wrong_iss = Keys::new("k2", "s3cret");
        assert_eq!(wrong_iss.verify(&token), Err(AuthError::UnknownKey));

        let mut expired = claims.clone();
        expired.exp = unix_now() - 3600;
        assert_eq!(keys.verify(&keys.sign(&expired)), Err(AuthError::Expired));
        let mut early = claims;
        early.nbf = unix_now() + 3600;
        assert_eq!(keys.verify(&keys.sign(&early)), Err(AuthError::NotYetValid));
        assert_eq!(keys.verify(""), Err(AuthError::Missing));
        assert!(matches!(keys.verify("a.b.c"), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("2m"), Ok(120));
        assert_eq!(parse_ttl("6h"), Ok(21_600));
        assert_eq!(parse_ttl("1d"), Ok(86_400));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }

    #[test]
    fn tokens_of_any_configured_key_are_accepted() {
        let mut keys = Keys::new("primary", "primary-secret-0123");
        keys.add("second", "second-secret-0123");
        let second = Keys::new("second", "second-secret-0123");
        let token = second.sign(&join_claims(&second, "r", "bob", "", 60));
        assert_eq!(keys.verify(&token).unwrap().sub, "bob");
        // The right issuer with another key's secret is refused.
        let forged = Keys::new("second", "primary-secret-0123");
        let token = forged.sign(&join_claims(&forged, "r", "eve", "", 60));
        assert!(matches!(keys.verify(&token), Err(AuthError::Invalid(_))));
        let stranger = Keys::new("third", "third-secret-012345");
        let token = stranger.sign(&join_claims(&stranger, "r", "x", "", 60));
        assert_eq!(keys.verify(&token), Err(AuthError::UnknownKey));
        assert_eq!(keys.key_count(), 2);
        assert!(!format!("{keys:?}").contains("secret-0123"));
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let keys = Keys::new("k", "topsecret");
        assert!(!format!("{keys:?}").contains("topsecret"));
    }
}
