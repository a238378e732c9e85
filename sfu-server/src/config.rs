//! Settings: flags, `SFU_*` environment variables and a TOML file.
//!
//! Precedence, highest first: a flag on the command line, its `SFU_*`
//! variable, the key of the same name in the file given by `--config` (or
//! `SFU_CONFIG`), the built-in default. File keys are the flag names
//! without the dashes' prefix, with `-` or `_`: `http_addr = "0.0.0.0:7880"`.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::auth::Keys;
use crate::limits::Rate;

pub const DEV_API_KEY: &str = "devkey";
pub const DEV_API_SECRET: &str = "devsecret";

#[derive(Parser, Debug)]
#[command(
    name = "sfu-server",
    version,
    about = "Selective forwarding unit for group video calls",
    args_override_self = true
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
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate a TOML configuration file (with the environment's `SFU_*`
    /// variables applied over it, as the server would) and print the
    /// settings it gives.
    Check {
        /// The file to check.
        file: PathBuf,
    },
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
    /// A TOML file of settings (keys named as these flags); flags and
    /// `SFU_*` variables override it.
    #[arg(long, env = "SFU_CONFIG")]
    pub config: Option<PathBuf>,
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
    #[arg(long, env = "SFU_API_SECRET", hide_env_values = true, value_parser = |s: &str| Ok::<_, String>(Secret(s.to_owned())))]
    pub api_secret: Option<Secret>,
    /// A file of further API keys, one `key: secret` per line (`#`
    /// comments). Tokens issued by any of them are accepted; the server
    /// signs with `--api-key` or, without it, the file's first key. The
    /// file must not be readable by group or others.
    #[arg(long, env = "SFU_KEYS_FILE")]
    pub keys_file: Option<PathBuf>,
    /// Seconds a room that nobody has joined yet stays open.
    #[arg(long, env = "SFU_EMPTY_ROOM_TIMEOUT", default_value_t = 300)]
    pub empty_room_timeout: u64,
    /// Seconds a room stays open after its last participant leaves (for
    /// someone rejoining).
    #[arg(long, env = "SFU_DEPARTURE_TIMEOUT", default_value_t = 20)]
    pub departure_timeout: u64,
    /// Seconds a participant whose signalling connection dropped stays in
    /// the room, media and all, for its client to reconnect and resume the
    /// same session (0: leave at once).
    #[arg(long, env = "SFU_RECONNECT_GRACE", default_value_t = 15)]
    pub reconnect_grace: u64,
    /// Send runs of media datagrams to one client as UDP GSO messages
    /// (Linux; falls back by itself where the kernel refuses them). Off by
    /// default: with it on, a client behind a NAT in the test matrix lost
    /// its path when another client changed network, in some runs.
    #[arg(long, env = "SFU_UDP_GSO", default_value_t = false, action = ArgAction::Set)]
    pub udp_gso: bool,
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
    /// STUN servers given to clients, comma separated
    /// (`stun:stun.example.com:3478`).
    #[arg(long, env = "SFU_STUN_URLS", value_delimiter = ',')]
    pub stun_urls: Vec<String>,
    /// TURN servers given to clients with short-lived credentials, comma
    /// separated (`turn:turn.example.com:3478?transport=udp`,
    /// `turns:turn.example.com:5349`); they must share --turn-secret
    /// (coturn: `use-auth-secret`, `static-auth-secret`).
    #[arg(long, env = "SFU_TURN_URLS", value_delimiter = ',')]
    pub turn_urls: Vec<String>,
    /// The TURN servers' shared secret. In development mode it defaults to
    /// the development API secret.
    #[arg(long, env = "SFU_TURN_SECRET", hide_env_values = true, value_parser = |s: &str| Ok::<_, String>(Secret(s.to_owned())))]
    pub turn_secret: Option<Secret>,
    /// Lifetime of TURN credentials, seconds.
    #[arg(long, env = "SFU_TURN_TTL", default_value_t = 21_600)]
    pub turn_ttl: u64,
    /// Where clients' TURN servers come from: `auto` (the embedded server
    /// if --turn-listen, else --turn-urls with --turn-secret, else none),
    /// `embedded`, `coturn` (--turn-urls sharing --turn-secret), `static`
    /// (--ice-servers-file as it is), `twilio` (Network Traversal Service,
    /// with TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN), or `none`.
    #[arg(long, env = "SFU_ICE_PROVIDER", default_value = "auto", value_parser = ["auto", "embedded", "coturn", "static", "twilio", "none"])]
    pub ice_provider: String,
    /// For `--ice-provider static`: a JSON file with a list of ICE servers
    /// (`[{"urls": [...], "username": "...", "credential": "..."}]`).
    #[arg(long, env = "SFU_ICE_SERVERS_FILE")]
    pub ice_servers_file: Option<PathBuf>,
    /// Twilio account SID, for `--ice-provider twilio`.
    #[arg(long, env = "TWILIO_ACCOUNT_SID")]
    pub twilio_account_sid: Option<String>,
    /// Twilio auth token (set it in the environment, not on the command
    /// line).
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true, value_parser = |s: &str| Ok::<_, String>(Secret(s.to_owned())))]
    pub twilio_auth_token: Option<Secret>,
    /// Twilio's API base URL.
    #[arg(
        long,
        env = "SFU_TWILIO_API_BASE",
        default_value = "https://api.twilio.com"
    )]
    pub twilio_api_base: String,
    /// Run the embedded TURN server: TURN over UDP and TCP on this address
    /// (the usual port is 3478). Its credentials use --turn-secret; clients
    /// are given its URLs unless --turn-urls names others.
    #[arg(long, env = "SFU_TURN_LISTEN")]
    pub turn_listen: Option<SocketAddr>,
    /// TURN over TLS on this address (5349, or 443 to pass firewalls that
    /// only let HTTPS out), with the --tls-cert certificate (a self-signed
    /// one without it).
    #[arg(long, env = "SFU_TURN_TLS_LISTEN")]
    pub turn_tls_listen: Option<SocketAddr>,
    /// Address TURN relays bind to (default: the TURN listen address). They
    /// are announced to clients at --public-ip when set, so a host behind
    /// 1:1 NAT (a cloud instance, a container) binds to its own interface
    /// and is reached at its public address.
    #[arg(long, env = "SFU_TURN_RELAY_IP")]
    pub turn_relay_ip: Option<IpAddr>,
    /// Ports TURN relays bind in, `LOW-HIGH`.
    #[arg(long, env = "SFU_TURN_RELAY_PORTS", default_value = "49152-65535", value_parser = parse_port_range)]
    pub turn_relay_ports: (u16, u16),
    /// Let TURN relays reach loopback, private and link-local addresses
    /// (refused by default, except the SFU's own media address).
    #[arg(long, env = "SFU_TURN_ALLOW_PRIVATE")]
    pub turn_allow_private: bool,
    /// TURN allocations one user may hold at once (0 = no cap).
    #[arg(long, env = "SFU_TURN_MAX_ALLOCATIONS", default_value_t = 10)]
    pub turn_max_allocations: usize,
    /// Bits per second one TURN allocation may relay each way (0 = no cap).
    #[arg(long, env = "SFU_TURN_MAX_BITRATE", default_value_t = 20_000_000)]
    pub turn_max_bitrate: u64,
    /// The TURN realm.
    #[arg(long, env = "SFU_TURN_REALM", default_value = "sfu")]
    pub turn_realm: String,
    /// TLS certificate chain (PEM) for HTTPS/WSS; with --tls-key.
    #[arg(long, env = "SFU_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for HTTPS/WSS; with --tls-cert.
    #[arg(long, env = "SFU_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve HTTPS/WSS with a self-signed certificate made at start (for
    /// development off localhost: browsers allow the camera only on secure
    /// pages).
    #[arg(long, env = "SFU_TLS_SELF_SIGNED", conflicts_with = "tls_cert")]
    pub tls_self_signed: bool,
    /// Behind a TLS-terminating proxy: redirect requests the proxy marks
    /// `X-Forwarded-Proto: http` to https.
    #[arg(long, env = "SFU_HTTPS_REDIRECT")]
    pub https_redirect: bool,
    /// Origins allowed to call the REST API from browsers (CORS), comma
    /// separated, e.g. `https://app.example.com`; `*` allows any. Empty:
    /// no cross-origin calls.
    #[arg(long, env = "SFU_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
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
            config: None,
            keys_file: None,
            http_addr: "127.0.0.1:0".parse().expect("literal address"),
            media_addr: "127.0.0.1:0".parse().expect("literal address"),
            public_ip: None,
            api_key: None,
            api_secret: None,
            empty_room_timeout: 300,
            departure_timeout: 20,
            reconnect_grace: 15,
            udp_gso: false,
            max_participants: 0,
            max_tracks_per_participant: 16,
            max_rooms: 0,
            stun_urls: Vec::new(),
            turn_urls: Vec::new(),
            turn_secret: None,
            turn_ttl: 21_600,
            ice_provider: "auto".into(),
            ice_servers_file: None,
            twilio_account_sid: None,
            twilio_auth_token: None,
            twilio_api_base: "https://api.twilio.com".into(),
            turn_listen: None,
            turn_tls_listen: None,
            turn_relay_ip: None,
            turn_relay_ports: (49152, 65535),
            turn_allow_private: false,
            turn_max_allocations: 10,
            turn_max_bitrate: 20_000_000,
            turn_realm: "sfu".into(),
            tls_cert: None,
            tls_key: None,
            tls_self_signed: false,
            https_redirect: false,
            cors_origins: Vec::new(),
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
        let file = match &self.keys_file {
            Some(path) => read_keys_file(path)?,
            None => Vec::new(),
        };
        let secret = self.api_secret.as_ref().map(|s| s.0.clone());
        let pair = match (&nonempty(&self.api_key), &nonempty(&secret)) {
            (Some(key), Some(secret)) => Some((key.clone(), secret.clone())),
            (None, None) => None,
            _ => anyhow::bail!(
                "set both SFU_API_KEY and SFU_API_SECRET, or neither for development mode"
            ),
        };
        let mut all: Vec<(String, String)> = pair.into_iter().chain(file).collect();
        if all.is_empty() {
            return Ok((Keys::new(DEV_API_KEY, DEV_API_SECRET), true));
        }
        for (key, secret) in &all {
            anyhow::ensure!(!key.is_empty(), "an API key is empty");
            anyhow::ensure!(
                secret.len() >= 16,
                "the secret of API key {key:?} must be at least 16 characters"
            );
        }
        let (key, secret) = all.remove(0);
        let mut keys = Keys::new(key, secret);
        for (key, secret) in all {
            keys.add(key, secret);
        }
        Ok((keys, false))
    }
}

/// A secret: printed as `<redacted>` by `Debug`, so logging a
/// configuration never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `key: secret` lines; blank lines and `#` comments skipped.
fn read_keys_file(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("keys file {}", path.display()))?
            .permissions()
            .mode();
        anyhow::ensure!(
            mode & 0o077 == 0,
            "keys file {} is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading keys file {}", path.display()))?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, secret) = line
            .split_once(':')
            .with_context(|| format!("{}:{}: expected `key: secret`", path.display(), n + 1))?;
        keys.push((key.trim().to_owned(), secret.trim().to_owned()));
    }
    anyhow::ensure!(!keys.is_empty(), "keys file {} has no keys", path.display());
    Ok(keys)
}

/// Parses the command line with the `--config` file (or `SFU_CONFIG`)
/// applied under flags and environment variables.
pub fn load_cli(args: Vec<OsString>) -> anyhow::Result<Cli> {
    let file = config_path(&args).or_else(|| std::env::var_os("SFU_CONFIG").map(PathBuf::from));
    let mut all = args.clone();
    if let Some(path) = file {
        let extra = file_args(&path)?;
        all = args
            .iter()
            .take(1)
            .cloned()
            .chain(extra)
            .chain(args.iter().skip(1).cloned())
            .collect();
    }
    let matches = Cli::command().try_get_matches_from(all)?;
    Ok(Cli::from_arg_matches(&matches)?)
}

/// The settings a file gives, with the environment's `SFU_*` variables
/// over it (what `config check` prints).
pub fn check_file(path: &Path) -> anyhow::Result<Config> {
    let args: Vec<OsString> = std::iter::once(OsString::from("sfu-server"))
        .chain(file_args(path)?)
        .collect();
    let matches = Cli::command().try_get_matches_from(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    cli.config.keys()?;
    Ok(cli.config)
}

/// The value of `--config` on the command line, if given.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_str()?;
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// The file's settings as command-line arguments, leaving out those whose
/// environment variable is set (the variable wins). Unknown keys and
/// values of the wrong shape are errors.
fn file_args(path: &Path) -> anyhow::Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("parsing config file {}", path.display()))?;
    let command = Cli::command();
    let mut out = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()) && flag != "config")
            .with_context(|| format!("{}: unknown setting {key:?}", path.display()))?;
        if arg
            .get_env()
            .is_some_and(|env| std::env::var_os(env).is_some())
        {
            continue;
        }
        let is_switch = matches!(arg.get_action(), ArgAction::SetTrue);
        match value {
            toml::Value::Boolean(b) if is_switch => {
                if b {
                    out.push(OsString::from(format!("--{flag}")));
                }
            }
            toml::Value::Boolean(b) => out.push(format!("--{flag}={b}").into()),
            toml::Value::String(v) if !is_switch => out.push(format!("--{flag}={v}").into()),
            toml::Value::Integer(v) if !is_switch => out.push(format!("--{flag}={v}").into()),
            toml::Value::Float(v) if !is_switch => out.push(format!("--{flag}={v}").into()),
            other => anyhow::bail!(
                "{}: setting {key:?} has the wrong type ({})",
                path.display(),
                other.type_str()
            ),
        }
    }
    Ok(out)
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

/// A port range `LOW-HIGH` (inclusive), `LOW <= HIGH`, no port 0.
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?}: expected LOW-HIGH, such as 49152-65535"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo > hi {
        return Err(format!("{text:?}: the low port is above the high one"));
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in the temp directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str, mode: u32) -> TempFile {
            let path = std::env::temp_dir().join(format!("sfu-{}-{name}", std::process::id()));
            std::fs::write(&path, text).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            }
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn args(list: &[&str]) -> Vec<OsString> {
        std::iter::once("sfu-server")
            .chain(list.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn file_settings_sit_under_flags_and_environment() {
        let file = TempFile::new(
            "layers.toml",
            "http_addr = \"127.0.0.1:9000\"\nmax-rooms = 3\nmax_participants = 7\nlimit_loopback = true\nrest_rate_limit = \"1/2\"\nempty_room_timeout = 60\nudp_gso = false\n",
            0o644,
        );
        let path = file.0.to_str().unwrap();
        // The file alone.
        let cli = load_cli(args(&["--config", path])).unwrap();
        assert_eq!(
            cli.config.http_addr,
            "127.0.0.1:9000".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(cli.config.max_rooms, 3);
        assert!(cli.config.limit_loopback);
        assert!(!cli.config.udp_gso);
        assert_eq!(
            cli.config.rest_rate_limit,
            Rate {
                per_second: 1.0,
                burst: 2
            }
        );
        // A flag beats the file.
        let cli = load_cli(args(&[
            "--config",
            path,
            "--max-rooms",
            "5",
            "--udp-gso=true",
        ]))
        .unwrap();
        assert_eq!(cli.config.max_rooms, 5);
        assert!(cli.config.udp_gso);
        // So does an environment variable (the only test here that sets
        // this one).
        std::env::set_var("SFU_EMPTY_ROOM_TIMEOUT", "11");
        let cli = load_cli(args(&[&format!("--config={path}")]));
        std::env::remove_var("SFU_EMPTY_ROOM_TIMEOUT");
        assert_eq!(cli.unwrap().config.empty_room_timeout, 11);
        // Subcommands still parse after the file's settings.
        let cli = load_cli(args(&["--config", path, "token", "--admin"])).unwrap();
        assert!(matches!(cli.command, Some(Command::Token(_))));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let unknown = TempFile::new("unknown.toml", "htp_addr = \"x\"\n", 0o644);
        let e = check_file(&unknown.0).unwrap_err().to_string();
        assert!(e.contains("unknown setting \"htp_addr\""), "{e}");
        let wrong = TempFile::new("wrong.toml", "max_rooms = [1]\n", 0o644);
        let e = check_file(&wrong.0).unwrap_err().to_string();
        assert!(e.contains("wrong type"), "{e}");
        let value = TempFile::new("value.toml", "http_addr = \"nowhere\"\n", 0o644);
        assert!(check_file(&value.0).is_err());
        let syntax = TempFile::new("syntax.toml", "http_addr = \n", 0o644);
        assert!(check_file(&syntax.0).is_err());
        let short = TempFile::new(
            "short.toml",
            "api_key = \"k\"\napi_secret = \"short\"\n",
            0o644,
        );
        let e = check_file(&short.0).unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
        let ok = TempFile::new("ok.toml", "max_participants = 50\n", 0o644);
        assert_eq!(check_file(&ok.0).unwrap().max_participants, 50);
    }

    #[test]
    fn keys_files_give_several_keys_and_must_be_private() {
        let text =
            "# production keys\nfirst: first-secret-0123456\n\nsecond : second-secret-0123456\n";
        let open = TempFile::new("open-keys", text, 0o644);
        let mut config = Config::ephemeral();
        config.keys_file = Some(open.0.clone());
        let e = config.keys().unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        let private = TempFile::new("private-keys", text, 0o600);
        config.keys_file = Some(private.0.clone());
        let (keys, dev) = config.keys().unwrap();
        assert!(!dev);
        assert_eq!(keys.api_key, "first");
        assert_eq!(keys.key_count(), 2);
        let bad = TempFile::new("bad-keys", "no colon here\n", 0o600);
        config.keys_file = Some(bad.0.clone());
        assert!(config.keys().unwrap_err().to_string().contains(":1:"));
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let mut config = Config::ephemeral();
        config.api_secret = Some(Secret("very-secret-value-123".into()));
        assert!(!format!("{config:?}").contains("very-secret"));
    }

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
