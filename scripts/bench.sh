#!/usr/bin/env bash
# End-to-end benchmark: runs the server and the load tester on this machine
# and reports, per scenario, forwarded packets per second, server CPU time
# per forwarded packet (from the server process's own CPU time), loss,
# one-way latency percentiles and server memory per subscriber stream.
#
#   scripts/bench.sh           the full set of scenarios (minutes)
#   scripts/bench.sh --smoke   two short scenarios (seconds), as CI runs it
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1

cargo build --release -q -p sfu-server -p loadtest
server_bin="$PWD/target/release/sfu-server"
loadtest_bin="$PWD/target/release/loadtest"
out="$(mktemp -d)"
trap 'kill "${server_pid:-0}" 2>/dev/null || true; rm -rf "$out"' EXIT

if [ "$smoke" = 1 ]; then
  # name publishers subscribers seconds bitrate extra-flags
  scenarios=(
    "meeting-3x3 3 0 4 500k"
    "livestream-1x10 1 10 4 800k"
  )
else
  scenarios=(
    "meeting-3x3 3 0 20 800k"
    "meeting-6x6 6 0 20 800k"
    "livestream-1x20 1 20 20 1.2M"
    "livestream-1x50 1 50 20 1.2M"
    "audio-1x100 1 100 20 0 --audio-only"
  )
fi

clk_tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
metric() {
  python3 -c 'import sys, urllib.request
for line in urllib.request.urlopen(sys.argv[1] + "/metrics").read().decode().splitlines():
    name, _, value = line.partition(" ")
    if name == sys.argv[2]: print(value)' "$1" "$2"
}

printf '| scenario | streams | forwarded pkt/s | server CPU µs / forwarded pkt | loss %% | p50 ms | p95 ms | p99 ms | server KiB / stream |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
status=0
for s in "${scenarios[@]}"; do
  read -r name pubs subs secs rate extra <<<"$s"
  "$server_bin" --http-addr 127.0.0.1:0 --media-addr 127.0.0.1:0 --log error >"$out/server.out" 2>"$out/server.err" &
  server_pid=$!
  for _ in $(seq 100); do grep -q '^Demo:' "$out/server.out" 2>/dev/null && break; sleep 0.05; done
  url=$(sed -n 's/^Demo: \(http[^ ]*\)\/$/\1/p' "$out/server.out")
  [ -n "$url" ] || { echo "server did not start" >&2; cat "$out/server.err" >&2; exit 1; }
  ticks0=$(cpu_ticks "$server_pid"); rss0=$(rss_kb "$server_pid")
  fwd0=$(metric "$url" sfu_rtp_packets_forwarded_total)
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  "$loadtest_bin" --url "$url" --publishers "$pubs" --subscribers "$subs" --duration "$secs" \
    --video-bitrate "${rate/#0/100k}" --json "$out/$name.json" $extra >"$out/$name.txt" 2>/dev/null || status=1
  rss1=$(rss_kb "$server_pid")
  t1=$(date +%s.%N)
  # The server reports its counters once a second.
  sleep 1.2
  ticks1=$(cpu_ticks "$server_pid")
  fwd1=$(metric "$url" sfu_rtp_packets_forwarded_total)
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
  python3 - "$out/$name.json" "$name" "$ticks0" "$ticks1" "$clk_tck" "$fwd0" "$fwd1" "$t0" "$t1" "$rss0" "$rss1" <<'PY' || status=1
import json, sys
path, name, k0, k1, hz, f0, f1, t0, t1, r0, r1 = sys.argv[1:]
r = json.load(open(path))
fwd = int(f1) - int(f0)
cpu_us = (int(k1) - int(k0)) / int(hz) * 1e6
streams = max(1, len(r["tracks"]))
secs = float(t1) - float(t0)
per_pkt = cpu_us / fwd if fwd else float("nan")
print(f"| {name} | {streams} | {fwd / secs:,.0f} | {per_pkt:.2f} | {r['loss_pct']:.2f} | "
      f"{r['latency_p50_ms']:.1f} | {r['latency_p95_ms']:.1f} | {r['latency_p99_ms']:.1f} | "
      f"{(int(r1) - int(r0)) / streams:.0f} |")
# Sanity: media flowed and was counted.
if fwd <= 0 or r["packets_received"] <= 0 or r["loss_pct"] > 5:
    print(f"{name}: no media or too much loss", file=sys.stderr)
    sys.exit(1)
PY
done
echo
echo "machine: $(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
exit $status
