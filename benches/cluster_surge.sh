#!/usr/bin/env bash
# Issue 23's surge: three pgvalve instances of one cluster (budget 20) in front of one
# PostgreSQL, `pgvalve loadtest surge` spreading CLIENTS clients over the three; the loadtest
# samples PostgreSQL's connections throughout (--observe) and reports errors and p99.
#
#   benches/cluster_surge.sh                    # 600 clients, 2 rounds
#   CLIENTS=300 ROUNDS=1 benches/cluster_surge.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
CLIENTS=${CLIENTS:-600}; ROUNDS=${ROUNDS:-2}; BUDGET=${BUDGET:-20}
SERVER_LEG=${SERVER_LEG:-tcp}; MAXC=$CLIENTS; POOL_MODE=${POOL_MODE:-transaction}; POOL_SIZE=${POOL_SIZE:-20}; NO_PGBOUNCER=1
source benches/setup.sh
# The standalone pgvalve setup.sh starts is not part of this run (its lock monitor would count).
kill "${PIDS[0]}"
TARGETS=()
for i in 1 2 3; do
  port=$(free_port)
  start_pgvalve "$port" "$WORK/instance$i.log" -c benches/cluster.toml --cluster-max-server-connections "$BUDGET"
  TARGETS+=(--target "postgres://bench:bench@127.0.0.1:$port/bench")
done
sleep 3
"$PGVALVE" loadtest surge --clients "$CLIENTS" --rounds "$ROUNDS" --ramp 1s --hold 5s --pause 3s \
  "${TARGETS[@]}" --observe "postgres://postgres:bench@127.0.0.1:$PGPORT/bench" --json "$WORK/surge.json" 2>&1 | tail -40
python3 - "$WORK/surge.json" "$BUDGET" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("budget", sys.argv[2], "json keys:", sorted(r))
PY
