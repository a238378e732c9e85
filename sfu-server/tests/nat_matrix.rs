//! The NAT matrix: the server in a network namespace of its own on an
//! emulated public network, clients in others behind emulated NATs
//! (iptables in router namespaces), all created and removed here:
//!
//! | cell | client network |
//! |---|---|
//! | open | on the public network, no NAT |
//! | cone | behind a port-preserving NAT (`MASQUERADE`) |
//! | symmetric | behind a NAT that picks a random port per mapping (`MASQUERADE --random-fully`) |
//! | tcp-only | behind a NAT that lets out only TCP to the signalling port and the TURN-over-TLS port |
//!
//! Pairs of `webrtc`-crate clients in the UDP cells join one room, publish
//! and must receive each other's media; each reports the selected candidate
//! path of both its connections and the time to the first media. Headless
//! Chromium runs in every cell, the tcp-only one included (TURN over TLS):
//! `tests/browser/nat.mjs`, started from here with the namespaces' names.
//!
//! Needs root, iproute2 and iptables (the test command installs them). It
//! fails, not skips, when it cannot build the networks.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loadtest::client::{IceSettings, PublishOptions};

const SERVER_IP: &str = "198.18.0.1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    Open,
    Cone,
    Symmetric,
    TcpOnly,
}

impl Cell {
    fn name(self) -> &'static str {
        match self {
            Cell::Open => "open",
            Cell::Cone => "cone",
            Cell::Symmetric => "symmetric",
            Cell::TcpOnly => "tcp-only",
        }
    }
}

/// Runs a command, failing the test with its output if it fails.
fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e} (needs iproute2 and iptables)"));
    assert!(
        out.status.success(),
        "{args:?} failed (needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces of one run; removed on drop.
struct Net {
    prefix: String,
    namespaces: Vec<String>,
}

/// A client's place in the matrix.
#[derive(Clone)]
struct Place {
    cell: Cell,
    ns: String,
    ip: IpAddr,
}

impl Net {
    /// The public network (a bridge in a core namespace) and the server's
    /// namespace on it.
    fn new() -> Net {
        let mut net = Net {
            prefix: format!("nm{}", std::process::id()),
            namespaces: Vec::new(),
        };
        let core = net.add_ns("core");
        sh(&["ip", "-n", &core, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &core, "link", "set", "br0", "up"]);
        let srv = net.add_ns("srv");
        net.attach_public(&srv, "srv", "eth0", &format!("{SERVER_IP}/16"));
        net
    }

    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn add_ns(&mut self, name: &str) -> String {
        let ns = self.ns(name);
        sh(&["ip", "netns", "add", &ns]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        self.namespaces.push(ns.clone());
        ns
    }

    /// Plugs `ns` into the public bridge as `dev` with `addr`.
    fn attach_public(&self, ns: &str, port: &str, dev: &str, addr: &str) {
        let core = self.ns("core");
        sh(&[
            "ip", "-n", &core, "link", "add", port, "type", "veth", "peer", "name", dev, "netns",
            ns,
        ]);
        sh(&[
            "ip", "-n", &core, "link", "set", port, "master", "br0", "up",
        ]);
        sh(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }

    /// A client namespace in `cell`, number `k` (1..=250).
    fn place(&mut self, cell: Cell, k: u8) -> Place {
        let client = self.add_ns(&format!("c{k}"));
        if cell == Cell::Open {
            let ip = format!("198.18.{k}.2");
            self.attach_public(&client, &format!("c{k}"), "eth0", &format!("{ip}/16"));
            return Place {
                cell,
                ns: client,
                ip: ip.parse().unwrap(),
            };
        }
        let router = self.add_ns(&format!("r{k}"));
        self.attach_public(
            &router,
            &format!("r{k}"),
            "wan",
            &format!("198.18.{k}.1/16"),
        );
        sh(&[
            "ip", "-n", &router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0",
            "netns", &client,
        ]);
        sh(&[
            "ip",
            "-n",
            &router,
            "addr",
            "add",
            &format!("10.{k}.0.1/24"),
            "dev",
            "lan",
        ]);
        sh(&["ip", "-n", &router, "link", "set", "lan", "up"]);
        let ip = format!("10.{k}.0.2");
        sh(&[
            "ip",
            "-n",
            &client,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &client, "link", "set", "eth0", "up"]);
        sh(&[
            "ip",
            "-n",
            &client,
            "route",
            "add",
            "default",
            "via",
            &format!("10.{k}.0.1"),
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            &router,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        let masquerade: &[&str] = match cell {
            Cell::Symmetric => &["-j", "MASQUERADE", "--random-fully"],
            _ => &["-j", "MASQUERADE"],
        };
        let mut rule = vec![
            "ip",
            "netns",
            "exec",
            &router,
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "wan",
        ];
        rule.extend_from_slice(masquerade);
        sh(&rule);
        Place {
            cell,
            ns: client,
            ip: ip.parse().unwrap(),
        }
    }

    /// Lets only TCP to these server ports out of a router's network.
    fn only_tcp_to(&self, k: u8, ports: &[u16]) {
        let router = self.ns(&format!("r{k}"));
        for port in ports {
            sh(&[
                "ip",
                "netns",
                "exec",
                &router,
                "iptables",
                "-A",
                "FORWARD",
                "-i",
                "lan",
                "-p",
                "tcp",
                "-d",
                SERVER_IP,
                "--dport",
                &port.to_string(),
                "-j",
                "ACCEPT",
            ]);
        }
        sh(&[
            "ip", "netns", "exec", &router, "iptables", "-A", "FORWARD", "-i", "lan", "-j", "DROP",
        ]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `f` on a runtime whose threads live in network namespace `ns`:
/// every socket it opens is in that namespace.
fn in_netns<F, Fut, T>(ns: &str, f: F) -> std::thread::JoinHandle<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a namespace file this thread opened; it moves
        // only this thread (and the threads it starts from now on).
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
}

/// What one client saw.
#[derive(Debug)]
struct Outcome {
    identity: String,
    cell: Cell,
    /// Time from joining to 30 video packets from the other client.
    connected_after: Option<Duration>,
    publishing: Option<String>,
    receiving: Option<String>,
}

/// A `webrtc`-crate client in `place` that joins `room`, publishes, and
/// sends until `stop` (or 30 s); it says so on `connected` once it
/// has 30 video packets from someone else.
#[allow(clippy::too_many_arguments)]
async fn client(
    server: String,
    keys: sfu_server::auth::Keys,
    room: String,
    identity: String,
    index: u8,
    place: Place,
    relay_only: bool,
    connected: std::sync::mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
) -> Outcome {
    let claims = sfu_server::auth::join_claims(&keys, &room, &identity, &identity, 600);
    let token = keys.sign(&claims);
    // ICE servers from the server, TURN over UDP (this client's TURN).
    let body: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{server}/v1/turn-credentials"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("turn-credentials")
        .json()
        .await
        .expect("JSON");
    let servers = body["iceServers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| {
            let urls: Vec<String> = s["urls"]
                .as_array()?
                .iter()
                .filter_map(|u| u.as_str())
                .filter(|u| u.starts_with("stun:") || u.contains("transport=udp"))
                .map(str::to_owned)
                .collect();
            Some((
                urls,
                s["username"].as_str().unwrap_or_default().to_owned(),
                s["credential"].as_str().unwrap_or_default().to_owned(),
            ))
        })
        .collect();
    let ice = IceSettings {
        servers,
        relay_only,
        bind_ip: Some(place.ip),
    };
    let started = Instant::now();
    let publish = PublishOptions {
        publish: true,
        ..Default::default()
    };
    let mut me = loadtest::client::Client::join_with_ice(
        &format!("ws://{server}"),
        &token,
        &identity,
        index,
        publish,
        &ice,
    )
    .await
    .expect("joins");
    let view = me.view();
    let mine = me.sid.clone();
    let deadline = started + Duration::from_secs(30);
    let mut frames = tokio::time::interval(Duration::from_millis(20));
    let mut connected_after = None;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        frames.tick().await;
        me.send_media(300, 30).await;
        if connected_after.is_none() {
            let inbox = view.inbox.lock().unwrap();
            let got = inbox
                .tracks
                .iter()
                .any(|((from, kind), t)| *from != mine && kind == "video" && t.seqs.len() >= 30);
            if got {
                connected_after = Some(started.elapsed());
                let _ = connected.send(());
            }
        }
    }
    let (publishing, receiving) = me.selected_paths().await;
    me.close().await;
    Outcome {
        identity,
        cell: place.cell,
        connected_after,
        publishing,
        receiving,
    }
}

#[test]
fn clients_behind_emulated_nats_reach_each_other_through_the_server() {
    // Quiet unless RUST_LOG asks for more (e.g. sfu_core=debug).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let mut net = Net::new();
    let open = net.place(Cell::Open, 1);
    let cone = net.place(Cell::Cone, 2);
    let symmetric = net.place(Cell::Symmetric, 3);
    let tcp_only = net.place(Cell::TcpOnly, 4);

    // The server, in its namespace, with the embedded TURN server.
    let (addrs_tx, addrs_rx) = std::sync::mpsc::channel();
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server_thread = in_netns(&net.ns("srv"), move || async move {
        let mut config = common::test_config();
        config.http_addr = format!("{SERVER_IP}:0").parse().unwrap();
        config.media_addr = format!("{SERVER_IP}:0").parse().unwrap();
        config.turn_listen = Some(format!("{SERVER_IP}:0").parse().unwrap());
        config.turn_tls_listen = Some(format!("{SERVER_IP}:0").parse().unwrap());
        // Relays bound to every interface and announced at the public
        // address, as on a host behind 1:1 NAT.
        config.turn_relay_ip = Some("0.0.0.0".parse().unwrap());
        config.public_ip = Some(SERVER_IP.parse().unwrap());
        let server = sfu_server::start(&config).await.expect("server starts");
        let turn = server.turn.expect("TURN runs");
        addrs_tx
            .send((server.http_addr, turn, server.keys.clone()))
            .unwrap();
        let _ = server_stopped.await;
        drop(server);
    });
    let (http, turn, keys): (SocketAddr, sfu_server::turn_server::TurnAddrs, _) = addrs_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("server up");
    let tls_port = turn.tls.expect("TURN over TLS").port();
    net.only_tcp_to(4, &[http.port(), tls_port]);

    // webrtc-crate clients: pairs across the UDP cells.
    // The last pair may use TURN relays only (over UDP: this client's
    // TURN), from behind both NATs.
    let pairs = [
        (open.clone(), cone.clone(), false),
        (cone.clone(), symmetric.clone(), false),
        (symmetric.clone(), open.clone(), false),
        (symmetric.clone(), cone.clone(), true),
    ];
    let mut outcomes = Vec::new();
    for (n, (a, b, relay_only)) in pairs.iter().enumerate() {
        let relay_only = *relay_only;
        let room = format!("nat-{n}");
        let stop = Arc::new(AtomicBool::new(false));
        let (connected, connections) = std::sync::mpsc::channel();
        let threads: Vec<_> = [a, b]
            .iter()
            .enumerate()
            .map(|(i, place)| {
                let (server, keys, room) = (http.to_string(), keys.clone(), room.clone());
                let (connected, stop) = (connected.clone(), stop.clone());
                let place = (*place).clone();
                let identity = format!(
                    "{}{}-{n}-{i}",
                    place.cell.name(),
                    if relay_only { "-relay" } else { "" }
                );
                in_netns(&place.ns.clone(), move || {
                    client(
                        server, keys, room, identity, i as u8, place, relay_only, connected, stop,
                    )
                })
            })
            .collect();
        // Until both receive each other (each gives up after 30 s).
        drop(connected);
        let deadline = Instant::now() + Duration::from_secs(32);
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(Instant::now());
            if connections.recv_timeout(left).is_err() {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            outcomes.push(t.join().expect("client thread"));
        }
    }

    // Chromium in every cell, tcp-only included.
    let node = Command::new("node")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/browser/nat.mjs"
        ))
        .env("SFU_URL", format!("http://{http}"))
        .env(
            "NAT_CELLS",
            [&open, &cone, &symmetric, &tcp_only]
                .iter()
                .map(|p| format!("{}={}", p.cell.name(), p.ns))
                .collect::<Vec<_>>()
                .join(","),
        )
        .output()
        .expect("node runs tests/browser/nat.mjs");
    let browser_report = String::from_utf8_lossy(&node.stdout).to_string();

    let _ = stop_server.send(());
    let _ = server_thread.join();

    eprintln!("\nwebrtc-crate clients:");
    eprintln!("| client | cell | media after | publishing path | receiving path |");
    eprintln!("|---|---|---|---|---|");
    for o in &outcomes {
        eprintln!(
            "| {} | {} | {} | {} | {} |",
            o.identity,
            o.cell.name(),
            o.connected_after
                .map(|d| format!("{} ms", d.as_millis()))
                .unwrap_or_else(|| "never".into()),
            o.publishing.as_deref().unwrap_or("-"),
            o.receiving.as_deref().unwrap_or("-"),
        );
    }
    eprintln!(
        "\nChromium:\n{browser_report}{}",
        String::from_utf8_lossy(&node.stderr)
    );
    for o in &outcomes {
        assert!(o.connected_after.is_some(), "{o:?}");
        assert!(o.publishing.is_some() && o.receiving.is_some(), "{o:?}");
        if o.identity.contains("-relay") {
            assert_eq!(o.publishing.as_deref(), Some("relay/udp"), "{o:?}");
            assert_eq!(o.receiving.as_deref(), Some("relay/udp"), "{o:?}");
        }
    }
    assert!(node.status.success(), "the Chromium cells failed");
}
