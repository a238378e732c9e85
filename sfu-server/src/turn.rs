//! ICE servers for clients: STUN URLs, and TURN with short-lived
//! credentials in the coturn REST form, so a coturn configured with the
//! same `static-auth-secret` accepts them:
//! `username = "<expiry unix time>:<identity>"`,
//! `password = base64(HMAC-SHA1(secret, username))`.

use sfu_core::signal::IceServer;

/// Where clients find STUN and TURN, and how their TURN credentials are
/// made.
#[derive(Clone, Default)]
pub struct IceConfig {
    pub stun_urls: Vec<String>,
    pub turn_urls: Vec<String>,
    /// The shared secret of the TURN servers (`static-auth-secret`).
    pub turn_secret: Option<String>,
    /// Lifetime of TURN credentials, seconds.
    pub ttl: u64,
}

impl std::fmt::Debug for IceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IceConfig")
            .field("stun_urls", &self.stun_urls)
            .field("turn_urls", &self.turn_urls)
            .field(
                "turn_secret",
                &self.turn_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// A TURN username and password for `identity`, valid until `expires`
/// (Unix seconds).
pub fn credentials(secret: &str, identity: &str, expires: u64) -> (String, String) {
    let username = format!("{expires}:{identity}");
    let password = crate::turn_server::password_for(secret, &username);
    (username, password)
}

impl IceConfig {
    /// The ICE servers to give `identity` now (`now`: Unix seconds).
    pub fn servers_for(&self, identity: &str, now: u64) -> Vec<IceServer> {
        let mut out = Vec::new();
        if !self.stun_urls.is_empty() {
            out.push(IceServer {
                urls: self.stun_urls.clone(),
                username: None,
                credential: None,
            });
        }
        if let (false, Some(secret)) = (self.turn_urls.is_empty(), &self.turn_secret) {
            let (username, password) = credentials(secret, identity, now + self.ttl);
            out.push(IceServer {
                urls: self.turn_urls.clone(),
                username: Some(username),
                credential: Some(password),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};

    #[test]
    fn hmac_sha1_matches_rfc_2202() {
        // RFC 2202, test case 2: key "Jefe".
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79");
    }

    #[test]
    fn credentials_in_the_coturn_rest_form() {
        let (user, pass) = credentials("Jefe", "alice", 1_800_000_000);
        assert_eq!(user, "1800000000:alice");
        // base64(HMAC-SHA1("Jefe", "1800000000:alice")), computed with
        // openssl: printf %s 1800000000:alice | openssl dgst -sha1 -hmac Jefe -binary | base64
        assert_eq!(pass, OPENSSL_REFERENCE);
        let ice = IceConfig {
            stun_urls: vec!["stun:stun.example.com:3478".into()],
            turn_urls: vec!["turn:turn.example.com:3478?transport=udp".into()],
            turn_secret: Some("Jefe".into()),
            ttl: 600,
        };
        let servers = ice.servers_for("bob", 1_000);
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].username, None);
        assert_eq!(servers[1].username.as_deref(), Some("1600:bob"));
        assert_eq!(
            servers[1].credential.as_deref(),
            Some(credentials("Jefe", "bob", 1600).1.as_str())
        );
        assert!(!format!("{ice:?}").contains("Jefe"));
        // No secret or no TURN URLs: no TURN entry.
        let stun_only = IceConfig {
            turn_secret: None,
            ..ice
        };
        assert_eq!(stun_only.servers_for("bob", 1_000).len(), 1);
    }

    const OPENSSL_REFERENCE: &str = "Y43q3cA3hS9cV3VI4dgDAdu7e/4=";
}
