//! ICE servers for clients: STUN URLs, and TURN with short-lived
//! credentials in the coturn REST form, so a coturn configured with the
//! same `static-auth-secret` accepts them:
//! `username = "<expiry unix time>:<identity>"`,
//! `password = base64(HMAC-SHA1(secret, username))`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sfu_core::signal::IceServer;

/// Where clients find STUN and TURN, and how their TURN credentials are
/// made.
#[derive(Clone, Default, Debug)]
pub struct IceConfig {
    pub stun_urls: Vec<String>,
    pub provider: TurnProvider,
    /// Lifetime of TURN credentials, seconds.
    pub ttl: u64,
}

/// Where TURN servers and their credentials come from.
#[derive(Clone, Default)]
pub enum TurnProvider {
    /// No TURN.
    #[default]
    None,
    /// TURN servers sharing a secret with this server (the embedded one,
    /// or coturn with `use-auth-secret`): credentials minted here.
    SharedSecret { urls: Vec<String>, secret: String },
    /// A fixed list given to everyone as it is.
    Static(Vec<IceServer>),
    /// Twilio's Network Traversal Service.
    Twilio(Arc<Twilio>),
}

impl std::fmt::Debug for TurnProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TurnProvider::None => f.write_str("None"),
            TurnProvider::SharedSecret { urls, .. } => f
                .debug_struct("SharedSecret")
                .field("urls", urls)
                .field("secret", &"<redacted>")
                .finish(),
            TurnProvider::Static(servers) => f
                .debug_tuple("Static")
                .field(&servers.iter().map(|s| &s.urls).collect::<Vec<_>>())
                .finish(),
            TurnProvider::Twilio(t) => f
                .debug_struct("Twilio")
                .field("api_base", &t.api_base)
                .field("account_sid", &t.account_sid)
                .field("auth_token", &"<redacted>")
                .finish(),
        }
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
    /// The ICE servers to give `identity` now (`now`: Unix seconds). A
    /// provider that cannot be reached leaves TURN out (and says so in the
    /// log) rather than failing the join.
    pub async fn servers_for(&self, identity: &str, now: u64) -> Vec<IceServer> {
        let mut out = Vec::new();
        if !self.stun_urls.is_empty() {
            out.push(IceServer {
                urls: self.stun_urls.clone(),
                username: None,
                credential: None,
            });
        }
        match &self.provider {
            TurnProvider::None => {}
            TurnProvider::SharedSecret { urls, secret } => {
                let (username, password) = credentials(secret, identity, now + self.ttl);
                out.push(IceServer {
                    urls: urls.clone(),
                    username: Some(username),
                    credential: Some(password),
                });
            }
            TurnProvider::Static(servers) => out.extend(servers.iter().cloned()),
            TurnProvider::Twilio(twilio) => match twilio.servers().await {
                Ok(servers) => out.extend(servers),
                Err(e) => {
                    tracing::warn!(error = %e, "Twilio ICE servers unavailable; clients get no TURN")
                }
            },
        }
        out
    }
}

/// Twilio's Network Traversal Service: ICE servers with credentials from
/// its Tokens endpoint, fetched once and shared until near their expiry.
pub struct Twilio {
    /// `https://api.twilio.com` (another base for a local stand-in).
    pub api_base: String,
    pub account_sid: String,
    auth_token: String,
    /// Lifetime asked for, seconds.
    ttl: u64,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<TwilioCache>,
}

#[derive(Default)]
struct TwilioCache {
    servers: Option<(Vec<IceServer>, Instant)>,
    /// After a failed fetch, no new attempt before this.
    retry_at: Option<(String, Instant)>,
}

/// How long a failed Twilio fetch is remembered before the next attempt.
const TWILIO_RETRY: Duration = Duration::from_secs(30);

impl Twilio {
    pub fn new(api_base: &str, account_sid: &str, auth_token: &str, ttl: u64) -> Twilio {
        Twilio {
            api_base: api_base.trim_end_matches('/').to_owned(),
            account_sid: account_sid.to_owned(),
            auth_token: auth_token.to_owned(),
            ttl,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            cache: tokio::sync::Mutex::new(TwilioCache::default()),
        }
    }

    /// The cached servers, or fresh ones when the cache is near expiry.
    /// One request at a time: callers arriving meanwhile wait for it.
    pub async fn servers(&self) -> Result<Vec<IceServer>, String> {
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        if let Some((servers, refresh_at)) = &cache.servers {
            if now < *refresh_at {
                return Ok(servers.clone());
            }
        }
        if let Some((error, retry_at)) = &cache.retry_at {
            if now < *retry_at {
                return Err(error.clone());
            }
        }
        match self.fetch().await {
            Ok((servers, ttl)) => {
                cache.servers = Some((servers.clone(), Instant::now() + refresh_after(ttl)));
                cache.retry_at = None;
                Ok(servers)
            }
            Err(e) => {
                cache.retry_at = Some((e.clone(), Instant::now() + TWILIO_RETRY));
                Err(e)
            }
        }
    }

    async fn fetch(&self) -> Result<(Vec<IceServer>, u64), String> {
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Tokens.json",
            self.api_base, self.account_sid
        );
        let response = self
            .http
            .post(&url)
            .basic_auth(&self.account_sid, Some(&self.auth_token))
            .form(&[("Ttl", self.ttl.to_string())])
            .send()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("POST {url}: HTTP {status}"));
        }
        let body: serde_json::Value = response
            .json()
            .await
            .map_err(|e| format!("POST {url}: not JSON: {e}"))?;
        parse_twilio_token(&body)
    }
}

/// The ICE servers and their lifetime (seconds) in a Twilio token.
fn parse_twilio_token(body: &serde_json::Value) -> Result<(Vec<IceServer>, u64), String> {
    let list = body["ice_servers"]
        .as_array()
        .ok_or("the token has no ice_servers list")?;
    let mut servers = Vec::new();
    for entry in list {
        let url = entry["urls"]
            .as_str()
            .or_else(|| entry["url"].as_str())
            .ok_or("an ICE server without urls")?;
        servers.push(IceServer {
            urls: vec![url.to_owned()],
            username: entry["username"].as_str().map(str::to_owned),
            credential: entry["credential"].as_str().map(str::to_owned),
        });
    }
    // Twilio sends the ttl as a string of seconds.
    let ttl = body["ttl"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .or_else(|| body["ttl"].as_u64())
        .unwrap_or(86_400);
    Ok((servers, ttl))
}

/// When to fetch a new token: after four fifths of its lifetime, at least
/// a minute from now (shorter tokens are fetched each minute).
fn refresh_after(ttl: u64) -> Duration {
    Duration::from_secs((ttl * 4 / 5).max(60))
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
            provider: TurnProvider::SharedSecret {
                urls: vec!["turn:turn.example.com:3478?transport=udp".into()],
                secret: "Jefe".into(),
            },
            ttl: 600,
        };
        let servers = block_on(ice.servers_for("bob", 1_000));
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].username, None);
        assert_eq!(servers[1].username.as_deref(), Some("1600:bob"));
        assert_eq!(
            servers[1].credential.as_deref(),
            Some(credentials("Jefe", "bob", 1600).1.as_str())
        );
        assert!(!format!("{ice:?}").contains("Jefe"));
        // No TURN provider: no TURN entry.
        let stun_only = IceConfig {
            provider: TurnProvider::None,
            ..ice
        };
        assert_eq!(block_on(stun_only.servers_for("bob", 1_000)).len(), 1);
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn twilio_tokens_are_read_and_refreshed_before_they_expire() {
        // The shape of a Tokens response (values made up).
        let body = serde_json::json!({
            "account_sid": "ACxxxxxxxx",
            "date_created": "Wed, 25 Nov 2026 10:00:00 +0000",
            "date_updated": "Wed, 25 Nov 2026 10:00:00 +0000",
            "ice_servers": [
                {"url": "stun:global.stun.twilio.com:3478", "urls": "stun:global.stun.twilio.com:3478"},
                {"url": "turn:global.turn.twilio.com:3478?transport=udp", "urls": "turn:global.turn.twilio.com:3478?transport=udp", "username": "u1", "credential": "c1"}
            ],
            "password": "c1",
            "ttl": "3600",
            "username": "u1"
        });
        let (servers, ttl) = parse_twilio_token(&body).unwrap();
        assert_eq!(ttl, 3600);
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[1].username.as_deref(), Some("u1"));
        assert_eq!(servers[0].credential, None);
        assert_eq!(refresh_after(3600), Duration::from_secs(2880));
        assert_eq!(refresh_after(30), Duration::from_secs(60));
        assert!(parse_twilio_token(&serde_json::json!({"ttl": "1"})).is_err());
    }

    const OPENSSL_REFERENCE: &str = "Y43q3cA3hS9cV3VI4dgDAdu7e/4=";
}
