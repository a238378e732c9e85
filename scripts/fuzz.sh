#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) with libFuzzer for a given
# time each and prints executions, coverage and the outcome per target.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   default 60
#
# Installs cargo-fuzz if missing. The targets need the nightly-only
# sanitizer flags; RUSTC_BOOTSTRAP=1 allows them on the stable toolchain.
# Crashes are kept in fuzz/artifacts/<target>/ with the input that caused
# them; reproduce one with `cargo fuzz run --fuzz-dir fuzz <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build --fuzz-dir fuzz
status=0
printf '| target | seconds | executions | exec/s | coverage | outcome |\n|---|---|---|---|---|---|\n'
for target in $(cargo fuzz list --fuzz-dir fuzz); do
  log="$(mktemp)"
  if cargo fuzz run --fuzz-dir fuzz "$target" -- -max_total_time="$secs" >"$log" 2>&1; then
    outcome="no crash"
  else
    outcome="CRASH: $(grep -m1 -E 'panicked|ERROR' "$log" | cut -c1-120)"
    status=1
  fi
  line=$(grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "$log" | tail -n 1 || true)
  runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
  execs=$(echo "$line" | sed -n 's/.*exec\/s: \([0-9]*\).*/\1/p')
  cov=$(echo "$line" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
  printf '| %s | %s | %s | %s | %s | %s |\n' "$target" "$secs" "${runs:-?}" "${execs:-?}" "${cov:-?}" "$outcome"
  rm -f "$log"
done
exit $status
