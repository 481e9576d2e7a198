#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600), one after another, and prints each
# run's executions and whether it crashed. Crashes land in artifacts/<target>/.
# Usage (from the repository root or fuzz/): bash fuzz/run.sh [SECONDS] [TARGET...]
set -u
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(frames startup messages transaction_traffic)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
export RUSTC_BOOTSTRAP=1 # cargo-fuzz passes nightly flags; a stable compiler accepts them so
RUSTC_BOOTSTRAP=1 cargo fuzz build -s none -O >/dev/null 2>&1 || { echo "fuzz build failed"; exit 1; }
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="artifacts/$t/run.log"
  cargo fuzz run -s none -O "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" >"$log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  crashes=$(ls "artifacts/$t" | grep -c -E '^(crash|oom|timeout|leak)-' || true)
  echo "$t: ${secs}s, ${execs:-?} executions, exit $rc, $crashes crash/oom/timeout files"
done
