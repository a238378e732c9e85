use sfu_server::auth::{join_claims, parse_ttl, Claims, VideoGrant};
use sfu_server::config::{Cli, Command, ConfigCommand, TokenArgs};
use tracing_subscriber::EnvFilter;

fn print_token(cli: &Cli, args: &TokenArgs) -> anyhow::Result<()> {
    let (keys, _) = cli.config.keys()?;
    let ttl = parse_ttl(&args.ttl).map_err(anyhow::Error::msg)?;
    let claims = if args.admin {
        let now = sfu_server::auth::unix_now();
        Claims {
            iss: keys.api_key.clone(),
            sub: args.identity.clone().unwrap_or_else(|| "admin".into()),
            name: args.name.clone(),
            exp: now + ttl,
            nbf: now.saturating_sub(1),
            video: VideoGrant {
                room: args.room.clone().unwrap_or_default(),
                room_create: true,
                room_list: true,
                room_admin: true,
                ..Default::default()
            },
        }
    } else {
        let room = args
            .room
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--room is required for a join token"))?;
        let identity = args
            .identity
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--identity is required for a join token"))?;
        join_claims(&keys, room, identity, &args.name, ttl)
    };
    println!("{}", keys.sign(&claims));
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = match sfu_server::config::load_cli(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(e) => match e.downcast::<clap::Error>() {
            // --help, --version and usage errors print as clap prints them.
            Ok(clap_error) => clap_error.exit(),
            Err(e) => return Err(e),
        },
    };
    match &cli.command {
        Some(Command::Token(args)) => return print_token(&cli, args),
        Some(Command::Config(ConfigCommand::Check { file })) => {
            let config = sfu_server::config::check_file(file)?;
            println!("{}: ok\n{config:#?}", file.display());
            return Ok(());
        }
        None => {}
    }
    let mut filter = EnvFilter::try_new(&cli.config.log).unwrap_or_else(|_| EnvFilter::new("info"));
    if !cli.config.log.contains("stun_proto") {
        // The TURN server's auth logs every first (challenged) request as
        // an error; that is the protocol working.
        if let Ok(quiet) = "stun_proto::auth=off".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let server = sfu_server::start(&cli.config).await?;
    if server.dev_mode {
        eprintln!(
            "\n  !!! DEVELOPMENT MODE: API key \"{}\" / secret \"{}\" are public development credentials.\n  !!! Set SFU_API_KEY and SFU_API_SECRET before exposing this server.\n",
            sfu_server::config::DEV_API_KEY,
            sfu_server::config::DEV_API_SECRET
        );
    }
    tracing::info!(http = %server.http_addr, media = %server.media_addr, "listening");
    println!("Demo: {}/", server.base_url());
    shutdown_signal().await;
    tracing::info!("shutting down: closing rooms");
    server.shutdown(std::time::Duration::from_secs(5)).await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
