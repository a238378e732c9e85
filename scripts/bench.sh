#!/usr/bin/env bash
# End-to-end benchmark: runs a server and the load tester on this machine
# and reports, per scenario, delivered packets per second, server CPU time
# per delivered packet (from the server process's own CPU time), loss,
# one-way latency percentiles and server memory per stream. Each scenario
# runs against this project's server and then against Janus VideoRoom
# (Debian package `janus`) with the same load, so the ratio holds on a
# noisy machine.
#
#   scripts/bench.sh            the full set of scenarios (minutes)
#   scripts/bench.sh --smoke    two short scenarios (seconds), as CI runs it
#   scripts/bench.sh --sweep    capacity sweep: livestream 1->N and meeting
#                               NxN grow until loss > 1% or p99 > 50 ms
#   BENCH_TARGETS="sfu"         only our server (default "sfu janus")
#   BENCH_SCENARIOS="meeting-10x10 10 0 15 800k;..."  these scenarios instead
#   JANUS_EVENT_LOOPS=N         Janus's media on N shared event loops (default:
#                               one per CPU, its setting for many handles; 0:
#                               Janus's own default, a thread per handle)
set -euo pipefail
cd "$(dirname "$0")/.."

mode=full
case "${1:-}" in
  --smoke) mode=smoke ;;
  --sweep) mode=sweep ;;
  "") ;;
  *) echo "usage: $0 [--smoke|--sweep]" >&2; exit 2 ;;
esac
targets="${BENCH_TARGETS:-sfu janus}"
janus_loops="${JANUS_EVENT_LOOPS:-$(nproc)}"
if [[ " $targets " == *" janus "* ]] && ! command -v janus >/dev/null; then
  echo "janus is not installed (apt-get install janus), or set BENCH_TARGETS=sfu" >&2
  exit 1
fi

cargo build --release -q -p sfu-server -p loadtest
server_bin="$PWD/target/release/sfu-server"
loadtest_bin="$PWD/target/release/loadtest"
out="$(mktemp -d)"
trap 'kill "${server_pid:-0}" 2>/dev/null || true; rm -rf "$out"' EXIT

clk_tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# user and system ticks, "u:s"
cpu_split() { awk '{print $14 ":" $15}' "/proc/$1/stat"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Janus gathers no loopback candidates: clients and Janus meet on the
# address of the default route's interface.
local_ip() {
  python3 -c 'import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.connect(("192.0.2.1", 9)); print(s.getsockname()[0])
except OSError:
    print("127.0.0.1")'
}

# Starts a server of kind $1; sets server_pid and url (what the load tester
# is pointed at).
start_sfu() {
  "$server_bin" --http-addr 127.0.0.1:0 --media-addr 127.0.0.1:0 --udp-gso=true --log error >"$out/server.out" 2>"$out/server.err" &
  server_pid=$!
  for _ in $(seq 200); do grep -q '^Demo:' "$out/server.out" 2>/dev/null && break; sleep 0.05; done
  url=$(sed -n 's/^Demo: \(http[^ ]*\)\/$/\1/p' "$out/server.out")
  [ -n "$url" ] || { echo "server did not start" >&2; cat "$out/server.err" >&2; exit 1; }
}

start_janus() {
  local dir="$out/janus" port lib
  port=$(free_port)
  lib=$(dirname "$(dpkg -L janus | grep -m1 '/plugins/libjanus_videoroom.so$')")/..
  mkdir -p "$dir"
  # Only the VideoRoom plugin and the WebSocket transport; warnings and
  # errors logged; no session timeout.
  cat >"$dir/janus.jcfg" <<EOF
general: {
	configs_folder = "$dir"
	plugins_folder = "$lib/plugins"
	transports_folder = "$lib/transports"
	events_folder = "$lib/events"
	loggers_folder = "$lib/loggers"
	debug_level = 3
	session_timeout = 0
$( [ "$janus_loops" != 0 ] && printf '\tevent_loops = %s\n' "$janus_loops" )
}
nat: {
	ice_enforce_list = "$bind_ip"
}
plugins: {
	disable = "libjanus_audiobridge.so,libjanus_duktape.so,libjanus_echotest.so,libjanus_lua.so,libjanus_nosip.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_streaming.so,libjanus_textroom.so,libjanus_videocall.so,libjanus_voicemail.so"
}
transports: {
	disable = "libjanus_http.so,libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_pfunix.so,libjanus_rabbitmq.so"
}
loggers: {
	disable = "libjanus_jsonlog.so"
}
events: {
	broadcast = false
}
EOF
  printf 'general: {\n}\n' >"$dir/janus.plugin.videoroom.jcfg"
  cat >"$dir/janus.transport.websockets.jcfg" <<EOF
general: {
	json = "plain"
	ws = true
	ws_port = $port
	ws_ip = "127.0.0.1"
	wss = false
}
admin: {
	admin_ws = false
	admin_wss = false
}
EOF
  janus -F "$dir" -C "$dir/janus.jcfg" >"$out/server.out" 2>&1 &
  server_pid=$!
  local up=0
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then up=1; break; fi
    sleep 0.05
  done
  [ "$up" = 1 ] || { echo "janus did not start" >&2; tail -n 20 "$out/server.out" >&2; exit 1; }
  url="ws://127.0.0.1:$port"
}

# window_mark PID N FILE: waits until FILE has N progress lines (or PID
# exits) and prints "N:<server user ticks>:<server system ticks>:<PID's
# ticks>" (PID is the load tester; its ticks are 0 once it has exited).
window_mark() {
  local n=$2 lines
  while kill -0 "$1" 2>/dev/null; do
    lines=$(grep -c 's  clients' "$3" 2>/dev/null || true)
    [ "${lines:-0}" -ge "$n" ] && break
    sleep 0.02
  done
  echo "$n:$(cpu_split "$server_pid"):$(cpu_ticks "$1" 2>/dev/null || echo 0)"
}

bind_ip=$(local_ip)
status=0
results="$out/results.tsv"
: >"$results"

# run TARGET NAME PUBLISHERS SUBSCRIBERS SECONDS BITRATE [loadtest flags...]
# Prints a table row, appends "target name cpu_per_pkt loss p99" to
# $results, and returns non-zero when the run failed or lost over 5%.
run() {
  local target=$1 name=$2 pubs=$3 subs=$4 secs=$5 rate=$6
  shift 6
  "start_$target"
  local ticks0 rss0 t0 t1 ticks1 rss1 w0 w1 rc=0 lt
  ticks0=$(cpu_ticks "$server_pid"); rss0=$(rss_kb "$server_pid")
  t0=$(date +%s.%N)
  "$loadtest_bin" --target "$target" --url "$url" --bind-ip "$bind_ip" \
    --publishers "$pubs" --subscribers "$subs" --duration "$secs" \
    --video-bitrate "$rate" --json "$out/$name.json" "$@" >"$out/$name.txt" 2>"$out/$name.err" &
  lt=$!
  # Steady state: server CPU between the load tester's progress lines 2
  # and N-1 (joins and teardown excluded).
  w0=$(window_mark "$lt" 2 "$out/$name.err")
  w1=$(window_mark "$lt" $((secs - 1)) "$out/$name.err")
  wait "$lt" || rc=1
  t1=$(date +%s.%N)
  ticks1=$(cpu_ticks "$server_pid"); rss1=$(rss_kb "$server_pid")
  kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
  if [ ! -s "$out/$name.json" ]; then
    echo "| $name | $target | load tester failed: $(tail -n 3 "$out/$name.err" | tr '\n' ' ') |"
    return 1
  fi
  python3 - "$out/$name.json" "$name" "$target" "$ticks0" "$ticks1" "$clk_tck" "$t0" "$t1" "$rss0" "$rss1" "$results" "$w0" "$w1" <<'PY' || rc=1
import json, sys
path, name, target, k0, k1, hz, t0, t1, r0, r1, results, w0, w1 = sys.argv[1:]
r = json.load(open(path))
# Packets that reached subscribers (RTP media, retransmissions that filled
# a gap included, RTCP not): the same count for both servers.
delivered = r["packets_delivered"]
cpu_us = (int(k1) - int(k0)) / int(hz) * 1e6
streams = max(1, len(r["tracks"]))
whole = cpu_us / delivered if delivered else float("nan")
# The steady-state window: progress samples i and j (1-based lines).
(i, ui, si, li), (j, uj, sj, lj) = (w0.split(":"), w1.split(":"))
tl = r["timeline"]
i, j = int(i), int(j)
steady = user = system = tester = float("nan")
# CPU time comes in clock ticks (10 ms): a window with fewer than 10 of
# them (a short smoke run on a fast machine) says too little, and the
# whole run's figure stands instead.
ticks = (int(uj) + int(sj)) - (int(ui) + int(si))
pkts = tl[j - 1]["packets_received"] - tl[i - 1]["packets_received"] if 0 < i < j <= len(tl) else 0
if pkts > 0 and ticks >= 10:
    user = (int(uj) - int(ui)) / int(hz) * 1e6 / pkts
    system = (int(sj) - int(si)) / int(hz) * 1e6 / pkts
    steady = user + system
# The load tester's own CPU over the same window: what a machine driving
# this load needs (its ticks read 0 once it has exited).
if pkts > 0 and int(li) > 0 and int(lj) - int(li) >= 10:
    tester = (int(lj) - int(li)) / int(hz) * 1e6 / pkts
per_pkt = steady if steady == steady else whole
print(f"| {name} | {target} | {streams} | {delivered / r['seconds']:,.0f} | {per_pkt:.2f} | {user:.2f} / {system:.2f} | {whole:.2f} | "
      f"{r['loss_pct']:.2f} | {r['latency_p50_ms']:.1f} | {r['latency_p95_ms']:.1f} | "
      f"{r['latency_p99_ms']:.1f} | {(int(r1) - int(r0)) / streams:.0f} | {tester:.2f} |")
with open(results, "a") as f:
    f.write(f"{target}\t{name}\t{per_pkt:.3f}\t{r['loss_pct']:.3f}\t{r['latency_p99_ms']:.2f}\n")
if delivered <= 0 or r["loss_pct"] > 5:
    print(f"{name} ({target}): no media or over 5% loss", file=sys.stderr)
    sys.exit(1)
PY
  return $rc
}

header() {
  printf '| scenario | server | streams | delivered pkt/s | server CPU µs / pkt, steady | of which user / kernel | µs / pkt, whole run | loss %% | p50 ms | p95 ms | p99 ms | server KiB / stream | load tester µs / pkt |\n'
  printf '|---|---|---|---|---|---|---|---|---|---|---|---|---|\n'
}

ratios() {
  python3 - "$results" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
ours = {n: float(c) for t, n, c, *_ in rows if t == "sfu"}
theirs = {n: float(c) for t, n, c, *_ in rows if t == "janus"}
both = [n for n in ours if n in theirs]
if both:
    print()
    print("| scenario | Janus CPU per packet / ours |")
    print("|---|---|")
    for n in both:
        ratio = f"{theirs[n] / ours[n]:.2f}x" if ours[n] > 0 else "n/a (no CPU time measured for ours)"
        print(f"| {n} | {ratio} |")
PY
}

case $mode in
  smoke|full)
    if [ "$mode" = smoke ]; then
      # name publishers subscribers seconds bitrate extra-flags
      scenarios=(
        "meeting-3x3 3 0 4 500k"
        "livestream-1x10 1 10 4 800k"
      )
    else
      scenarios=(
        "meeting-3x3 3 0 20 800k"
        "meeting-3x3-spread 3 0 20 800k --spread"
        "meeting-6x6 6 0 20 800k"
        "meetings-30-of-3x3 3 0 20 800k --rooms 30"
        "livestream-1x20 1 20 20 1.2M"
        "livestream-1x50 1 50 20 1.2M"
        "audio-1x100 1 100 20 100k --audio-only"
      )
    fi
    # BENCH_SCENARIOS="name pubs subs secs rate [flags];..." replaces the set.
    if [ -n "${BENCH_SCENARIOS:-}" ]; then
      IFS=';' read -r -a scenarios <<<"$BENCH_SCENARIOS"
    fi
    header
    for s in "${scenarios[@]}"; do
      read -r name pubs subs secs rate extra <<<"$s"
      for target in $targets; do
        # shellcheck disable=SC2086
        run "$target" "$name" "$pubs" "$subs" "$secs" "$rate" $extra || status=1
      done
    done
    ratios
    ;;
  sweep)
    # The knee: the first size where loss exceeds 1% or p99 exceeds 50 ms.
    # The load tester shares this machine's cores with the server, so the
    # knee found here is that of the pair, a lower bound for the server.
    header
    knee() {
      python3 - "$results" "$1" "$2" <<'PY'
import sys
for l in open(sys.argv[1]):
    t, n, c, loss, p99 = l.rstrip("\n").split("\t")
    if t == sys.argv[2] and n == sys.argv[3]:
        sys.exit(0 if float(loss) > 1 or float(p99) > 50 else 1)
sys.exit(0)
PY
    }
    for target in $targets; do
      for n in 25 50 100 150 200 300 400 500 600 800; do
        run "$target" "livestream-1x$n" 1 "$n" 15 1.2M || true
        if knee "$target" "livestream-1x$n"; then echo "| knee | $target | livestream 1->$n |"; break; fi
      done
      for n in 4 6 8 10 12 14 16 20 24 28 32; do
        run "$target" "meeting-${n}x$n" "$n" 0 15 800k || true
        if knee "$target" "meeting-${n}x$n"; then echo "| knee | $target | meeting ${n}x$n |"; break; fi
      done
    done
    ratios
    ;;
esac
echo
echo "machine: $(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo); clients bound to $bind_ip for Janus, loopback for ours"
exit $status
