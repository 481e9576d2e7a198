#!/usr/bin/env bash
# Noisy neighbour, side by side in one run: a greedy app (GREEDY clients looping on
# GREEDY_SQL without pause) and a polite app (POLITE clients running POLITE_SQL every THINK)
# share one pool of POOL_SIZE server connections in transaction mode, through pgvalve and
# through PgBouncer (and directly, for reference). Prints each group's latency percentiles
# and errors per target (`pgvalve loadtest noisy-neighbor`).
#
#   benches/noisy_neighbor.sh
#   DURATION=30s GREEDY=200 POLITE=20 POOL_SIZE=20 benches/noisy_neighbor.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
GREEDY=${GREEDY:-200}; POLITE=${POLITE:-20}
GREEDY_SQL=${GREEDY_SQL:-SELECT pg_sleep(0.05)}; POLITE_SQL=${POLITE_SQL:-SELECT 1}
THINK=${THINK:-20ms}; DURATION=${DURATION:-20s}
POOL_MODE=${POOL_MODE:-transaction}; POOL_SIZE=${POOL_SIZE:-20}
SERVER_LEG=${SERVER_LEG:-tcp}
MAXC=$((GREEDY + POLITE))
source benches/setup.sh
sleep 1
declare -A OUT
for t in "${TARGETS[@]}"; do
  name=${t%%:*}; port=${t##*:}
  echo "== $name: $GREEDY greedy x '$GREEDY_SQL' + $POLITE polite x '$POLITE_SQL' every $THINK, $DURATION" >&2
  OUT[$name]=$("$PGVALVE" loadtest noisy-neighbor --target "postgres://bench:bench@127.0.0.1:$port/bench" \
    --duration "$DURATION" --greedy "$GREEDY" --polite "$POLITE" --greedy-sql "$GREEDY_SQL" \
    --polite-sql "$POLITE_SQL" --think "$THINK")
  echo "${OUT[$name]}" >&2
done
echo
echo "noisy neighbour: $GREEDY greedy + $POLITE polite, pool_mode=$POOL_MODE pool_size=$POOL_SIZE, $DURATION, $(nproc) cores"
printf '%-10s %12s %12s %12s %12s %14s %12s\n' target "polite p50" "polite p99" "polite max" "polite err" "greedy tps" "greedy err"
for t in "${TARGETS[@]}"; do
  name=${t%%:*}
  awk -v n="$name" '$1=="polite"{p50=$5; p99=$7; mx=$9; pe=$11} $1=="greedy"{gt=$4; ge=$11}
    END{printf "%-10s %10s ms %10s ms %10s ms %12s %14s %12s\n", n, p50, p99, mx, pe, gt, ge}' <<<"${OUT[$name]}"
done
