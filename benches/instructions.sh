#!/usr/bin/env bash
# Instructions per transaction in the proxy (user space), counted by valgrind's callgrind:
# repeatable for one build, unlike timings on a noisy machine. pgvalve runs under callgrind
# in front of a throwaway PostgreSQL; counters are zeroed after a warm-up, then
# `pgbench -S -c CLIENTS -t TXNS` runs and the count is divided by the transactions.
#
#   benches/instructions.sh                          # transaction mode, 32 clients, pool 20
#   POOL_MODE=session POOL_SIZE=32 benches/instructions.sh
#   BIN=/path/to/other/pgvalve benches/instructions.sh   # another build
#   PROTOCOL=prepared benches/instructions.sh            # pgbench -M prepared (or extended)
#   CONFIG=benches/guardrails.toml benches/instructions.sh  # pgvalve with that config too
#   SCRIPT=benches/commented.sql benches/instructions.sh    # that pgbench script, not -S
#   VG_ARGS=--separate-callers=3 KEEP=/tmp/cg benches/instructions.sh  # more valgrind options
#
# Needs valgrind (apt-get install valgrind) besides what benches/pgbench.sh needs.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${CLIENTS:-32}; TXNS=${TXNS:-200}; PROTOCOL=${PROTOCOL:-simple}
MAXC=$CLIENTS; POOL_MODE=${POOL_MODE:-transaction}; POOL_SIZE=${POOL_SIZE:-20}
SERVER_LEG=${SERVER_LEG:-unix}; NO_PGBOUNCER_INSTALL=1
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
source benches/setup.sh
"$PGBENCH" -i -q -s 10 -h 127.0.0.1 -p "$PGPORT" -U bench bench >/dev/null 2>&1
CPORT=$(free_port)
# As benches/setup.sh: no headroom, and one slot more for the lock monitor's connection.
PGVALVE_HEADROOM=0 valgrind --tool=callgrind ${VG_ARGS:-} --callgrind-out-file="$WORK/cg.out" "${BIN:-$PGVALVE}" run --upstream "$UPSTREAM" \
  --listen "127.0.0.1:$CPORT" --pool-mode "$POOL_MODE" --pool-size "$((POOL_SIZE + 1))" \
  --max-client-connections 5000 --max-server-connections 0 ${CONFIG:+-c "$CONFIG"} >"$WORK/cg.log" 2>&1 &
VG=$!
PIDS+=($VG)
for _ in $(seq 1 60); do
  "$PSQL" -qXtA -h 127.0.0.1 -p "$CPORT" -U bench -c "select 1" bench >/dev/null 2>&1 && break
  sleep 1
done
WHAT=(-S); [[ -n "${SCRIPT:-}" ]] && WHAT=(-f "$SCRIPT")
"$PGBENCH" "${WHAT[@]}" -n -M "$PROTOCOL" -c "$CLIENTS" -j 2 -t 50 -h 127.0.0.1 -p "$CPORT" -U bench bench >/dev/null 2>&1
callgrind_control -z "$VG" >/dev/null
"$PGBENCH" "${WHAT[@]}" -n -M "$PROTOCOL" -c "$CLIENTS" -j 2 -t "$TXNS" -h 127.0.0.1 -p "$CPORT" -U bench bench >/dev/null 2>&1
callgrind_control -d "$VG" >/dev/null
sleep 1
OUT=$(ls -t "$WORK"/cg.out* | head -1)
TOTAL=$(callgrind_annotate "$OUT" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
echo "pool_mode=$POOL_MODE pool_size=$POOL_SIZE clients=$CLIENTS protocol=$PROTOCOL${CONFIG:+ config=$CONFIG}${SCRIPT:+ script=$SCRIPT}: $((TOTAL / (CLIENTS * TXNS))) instructions per transaction"
if [[ -n "${KEEP:-}" ]]; then cp "$OUT" "$KEEP"; echo "callgrind output: $KEEP (callgrind_annotate $KEEP)"; fi
