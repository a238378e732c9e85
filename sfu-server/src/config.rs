//! Settings, from flags or `SFU_*` environment variables.

use std::net::{IpAddr, SocketAddr};

use clap::{Args, Parser, Subcommand};

use crate::auth::Keys;
use crate::limits::Rate;

pub const DEV_API_KEY: &str = "devkey";
pub const DEV_API_SECRET: &str = "devsecret";

#[derive(Parser, Debug)]
#[command(
    name = "sfu-server",
    version,
    about = "Selective forwarding unit for group video calls"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print an access token signed with the configured API key.
    Token(TokenArgs),
}

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Room the token joins (or administers, with --admin).
    #[arg(long)]
    pub room: Option<String>,
    /// Participant identity.
    #[arg(long)]
    pub identity: Option<String>,
    /// Display name.
    #[arg(long, default_value = "")]
    pub name: String,
    /// Grant room administration (create, list, admin) instead of joining.
    #[arg(long)]
    pub admin: bool,
    /// Lifetime: seconds, or with a unit: 30m, 6h, 7d.
    #[arg(long, default_value = "6h")]
    pub ttl: String,
}

#[derive(Args, Debug, Clone)]
pub struct Config {
    /// HTTP/WebSocket listen address.
    #[arg(long, env = "SFU_HTTP_ADDR", default_value = "127.0.0.1:7880")]
    pub http_addr: SocketAddr,
    /// Media UDP listen address (one port for all media).
    #[arg(long, env = "SFU_MEDIA_ADDR", default_value = "127.0.0.1:7882")]
    pub media_addr: SocketAddr,
    /// IP address advertised to clients as the media candidate (defaults to
    /// the media listen address).
    #[arg(long, env = "SFU_PUBLIC_IP")]
    pub public_ip: Option<IpAddr>,
    /// API key (token issuer). Without key and secret the server runs in
    /// development mode with well-known credentials.
    #[arg(long, env = "SFU_API_KEY")]
    pub api_key: Option<String>,
    /// API secret that signs tokens. Prefer the environment variable: flags
    /// show in process listings.
    #[arg(long, env = "SFU_API_SECRET", hide_env_values = true)]
    pub api_secret: Option<String>,
    /// Seconds an empty room stays open.
    #[arg(long, env = "SFU_EMPTY_ROOM_TIMEOUT", default_value_t = 300)]
    pub empty_room_timeout: u64,
    /// Default participant cap per room (0 = no cap).
    #[arg(long, env = "SFU_MAX_PARTICIPANTS", default_value_t = 0)]
    pub max_participants: usize,
    /// Tracks (media sections of its publish offer) per participant; 0 =
    /// no cap.
    #[arg(long, env = "SFU_MAX_TRACKS_PER_PARTICIPANT", default_value_t = 16)]
    pub max_tracks_per_participant: usize,
    /// Rooms open at once on this server; 0 = no cap.
    #[arg(long, env = "SFU_MAX_ROOMS", default_value_t = 0)]
    pub max_rooms: usize,
    /// Serve the browser SDK and demo page from this directory instead of
    /// the copies built into the binary (for working on them).
    #[arg(long, env = "SFU_WEB_DIR")]
    pub web_dir: Option<std::path::PathBuf>,
    /// REST requests per client address: RATE[/BURST] per second, 0 = no
    /// limit. Over it: HTTP 429 with Retry-After.
    #[arg(long, env = "SFU_REST_RATE_LIMIT", default_value = "20/60", value_parser = parse_rate)]
    pub rest_rate_limit: Rate,
    /// Signalling WebSocket connects per client address: RATE[/BURST] per
    /// second, 0 = no limit. Over it: HTTP 429 with Retry-After.
    #[arg(long, env = "SFU_CONNECT_RATE_LIMIT", default_value = "5/20", value_parser = parse_rate)]
    pub connect_rate_limit: Rate,
    /// Signalling messages per session: RATE[/BURST] per second, 0 = no
    /// limit. Over it, messages are refused with a `rate_limited` error.
    #[arg(long, env = "SFU_SIGNAL_RATE_LIMIT", default_value = "50/200", value_parser = parse_rate)]
    pub signal_rate_limit: Rate,
    /// Apply the per-address limits to loopback clients too. In
    /// development mode they are exempt (load tests and browser tests run
    /// on loopback); otherwise they are always limited.
    #[arg(long, env = "SFU_LIMIT_LOOPBACK")]
    pub limit_loopback: bool,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "SFU_LOG", default_value = "info,rtc=error,rtc_dtls=error")]
    pub log: String,
}

impl Config {
    /// Development mode on loopback with ports chosen by the system: for
    /// tests and for embedding the server in another program.
    pub fn ephemeral() -> Config {
        Config {
            http_addr: "127.0.0.1:0".parse().expect("literal address"),
            media_addr: "127.0.0.1:0".parse().expect("literal address"),
            public_ip: None,
            api_key: None,
            api_secret: None,
            empty_room_timeout: 300,
            max_participants: 0,
            max_tracks_per_participant: 16,
            max_rooms: 0,
            web_dir: None,
            rest_rate_limit: Rate::OFF,
            connect_rate_limit: Rate::OFF,
            signal_rate_limit: Rate::OFF,
            limit_loopback: false,
            log: "warn".into(),
        }
    }

    /// The signing keys, and whether they are the development defaults.
    pub fn keys(&self) -> anyhow::Result<(Keys, bool)> {
        let nonempty = |v: &Option<String>| v.clone().filter(|s| !s.is_empty());
        match (&nonempty(&self.api_key), &nonempty(&self.api_secret)) {
            (Some(key), Some(secret)) => {
                anyhow::ensure!(!key.is_empty(), "API key is empty");
                anyhow::ensure!(
                    secret.len() >= 16,
                    "API secret must be at least 16 characters"
                );
                Ok((Keys::new(key.clone(), secret.clone()), false))
            }
            (None, None) => Ok((Keys::new(DEV_API_KEY, DEV_API_SECRET), true)),
            _ => anyhow::bail!(
                "set both SFU_API_KEY and SFU_API_SECRET, or neither for development mode"
            ),
        }
    }
}

/// `RATE[/BURST]`: events a second, and how many may come at once (the
/// rate, at least 1, when not given). `0` turns the limit off.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let (rate, burst) = match text.split_once('/') {
        Some((r, b)) => (r, Some(b)),
        None => (text, None),
    };
    let per_second: f64 = rate
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: expected RATE[/BURST], e.g. 20/60"))?;
    if !per_second.is_finite() || per_second < 0.0 {
        return Err(format!("{text:?}: the rate must be 0 or more"));
    }
    if per_second == 0.0 {
        return Ok(Rate::OFF);
    }
    let burst = match burst {
        Some(b) => b
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|b| *b >= 1)
            .ok_or_else(|| format!("{text:?}: the burst must be a whole number, at least 1"))?,
        None => per_second.ceil().max(1.0) as u32,
    };
    Ok(Rate { per_second, burst })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_and_without_burst() {
        assert_eq!(
            parse_rate("20/60"),
            Ok(Rate {
                per_second: 20.0,
                burst: 60
            })
        );
        assert_eq!(
            parse_rate("0.5"),
            Ok(Rate {
                per_second: 0.5,
                burst: 1
            })
        );
        assert_eq!(parse_rate("0"), Ok(Rate::OFF));
        for bad in ["", "x", "-1", "5/0", "5/x", "inf"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
