#!/usr/bin/env bash
# The loadtest scenarios against PostgreSQL directly, pgvalve and PgBouncer, interleaved on
# one throwaway PostgreSQL (max_connections 110, as small as a real node's budget), in
# transaction pooling with POOL_SIZE server connections; prints one line per scenario, group
# and target (throughput, p50, p99, errors, and the peak of server connections PostgreSQL saw
# above what was open before that run: idle connections of the other targets are closed
# first, so this is what the target itself holds). A second pgvalve,
# "rules", runs with RULES_CONFIG (default benches/lock-policy.toml: max_lock_hold 1s,
# terminate, for the lock-holder scenario's "holder" identity).
#
#   benches/loadtest_compare.sh
#   DURATION=20s SURGE_CLIENTS=500 POOL_SIZE=20 benches/loadtest_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
DURATION=${DURATION:-10s}; SURGE_CLIENTS=${SURGE_CLIENTS:-300}
POOL_MODE=${POOL_MODE:-transaction}; POOL_SIZE=${POOL_SIZE:-20}
SERVER_LEG=${SERVER_LEG:-tcp}
# setup.sh sizes max_connections as MAXC * 3 + 20.
MAXC=30
RULES_CONFIG=${RULES_CONFIG:-benches/lock-policy.toml}
source benches/setup.sh
sleep 1
OBSERVE="postgres://bench:bench@127.0.0.1:$PGPORT/bench"
scenario_args() {  # sets ARGS for scenario $1
  case $1 in
    surge) ARGS=(surge --clients "$SURGE_CLIENTS" --ramp 1s --hold 4s) ;;
    noisy-neighbor) ARGS=(noisy-neighbor --duration "$DURATION" --greedy 100 --polite 10 --greedy-sql "SELECT pg_sleep(0.005)") ;;
    lock-holder) ARGS=(lock-holder --duration "$DURATION" --holders 1 --readers 20 --hold 3s) ;;
    steady) ARGS=(steady --duration "$DURATION" --clients 32 --rate 2000 --write-ratio 0.1) ;;
  esac
}
printf '%-15s %-8s %-10s %10s %10s %10s %8s %12s\n' scenario group target tps "p50 ms" "p99 ms" errors "peak conns+"
for scen in surge noisy-neighbor lock-holder steady; do
  for t in "${TARGETS[@]}"; do
    name=${t%%:*}; port=${t##*:}
    scenario_args "$scen"
    # Each target starts from an empty server: idle connections the other proxies keep in
    # their pools are closed (they notice and reconnect), so the peak counts this target's.
    "${AS[@]}" "$PSQL" -qXtA -h "$WORK" -p "$PGPORT" -U postgres -d bench -c \
      "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = 'bench'
         AND state = 'idle' AND backend_type = 'client backend' AND pid <> pg_backend_pid()" >/dev/null
    sleep 0.5
    "$PGVALVE" loadtest "${ARGS[@]}" \
      --target "postgres://bench:bench@127.0.0.1:$port/bench" --observe "$OBSERVE" \
      --json "$WORK/$scen-$name.json" >"$WORK/$scen-$name.txt" 2>"$WORK/$scen-$name.err" || {
        echo "$scen against $name failed:" >&2; cat "$WORK/$scen-$name.err" >&2; }
    python3 - "$WORK/$scen-$name.json" "$scen" "$name" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
for g in j["groups"]:
    print(f'{sys.argv[2]:<15} {g["name"]:<8} {sys.argv[3]:<10} {g["tps"]:>10.0f} {g["latency_ms"]["p50"]:>10.2f} '
          f'{g["latency_ms"]["p99"]:>10.2f} {sum(g["errors"].values()):>8} '
          f'{(j["peak_server_connections"] or 0) - (j["server_connections_before"] or 0):>12}')
PY
  done
done
echo "pool_mode=$POOL_MODE pool_size=$POOL_SIZE, PostgreSQL max_connections=$((MAXC * 3 + 20)), $(nproc) cores"
# Ratios in this run: pgvalve (and "rules") against PgBouncer and against direct.
python3 - "$WORK" <<'PY'
import json, os, sys
work = sys.argv[1]
def load(scen, target):
    p = os.path.join(work, f"{scen}-{target}.json")
    return {g["name"]: g for g in json.load(open(p))["groups"]} if os.path.exists(p) else None
print(f'\n{"scenario":<15} {"group":<8} {"target":<8} {"tps/pgb":>8} {"p99/pgb":>8} {"tps/dir":>8} {"p99/dir":>8}')
for scen in ["surge", "noisy-neighbor", "lock-holder", "steady"]:
    pgb, direct = load(scen, "pgbouncer"), load(scen, "direct")
    for target in ["pgvalve", "rules"]:
        mine = load(scen, target)
        if not mine:
            continue
        for name, g in mine.items():
            def r(ref, key):
                if not ref or name not in ref: return "-"
                a = g["tps"] if key == "tps" else g["latency_ms"]["p99"]
                b = ref[name]["tps"] if key == "tps" else ref[name]["latency_ms"]["p99"]
                return f"{a / b:.2f}" if b else "-"
            print(f'{scen:<15} {name:<8} {target:<8} {r(pgb, "tps"):>8} {r(pgb, "p99"):>8} {r(direct, "tps"):>8} {r(direct, "p99"):>8}')
PY
