#!/usr/bin/env bash
# Runs every test: formatting and lints, the Rust unit and integration tests,
# the browser end-to-end tests in headless Chromium, and the end-to-end
# benchmark in smoke mode (ours and Janus). Installs what it needs on a
# fresh Debian machine (Chromium, Node.js, Janus, coturn, iproute2,
# iptables, Node packages, cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs npm)
# Janus VideoRoom: the peer the end-to-end benchmark compares against.
command -v janus >/dev/null 2>&1 || need_apt+=(janus)
# coturn: the external TURN server the relay test reaches the SFU through.
command -v turnserver >/dev/null 2>&1 || need_apt+=(coturn)
# Network namespaces and NAT for the NAT matrix test.
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
echo "== npm packages for the browser test"
(cd tests/browser && { npm ci --no-audit --no-fund --silent 2>/dev/null || npm install --no-audit --no-fund --silent; })

echo "== cargo fmt / clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== cargo test"
cargo test --workspace

echo "== browser end to end (headless Chromium)"
cargo build --release -p sfu-server --quiet
SFU_BIN="$PWD/target/release/sfu-server" node tests/browser/e2e.mjs
SFU_BIN="$PWD/target/release/sfu-server" node tests/browser/simulcast.mjs
SFU_BIN="$PWD/target/release/sfu-server" node tests/browser/turn.mjs
SFU_BIN="$PWD/target/release/sfu-server" node tests/browser/diagnostics.mjs

echo "== end-to-end benchmark, smoke mode (server + load tester)"
scripts/bench.sh --smoke

echo "== fuzz targets, 10 s each (scripts/fuzz.sh SECONDS for longer runs)"
scripts/fuzz.sh 10
