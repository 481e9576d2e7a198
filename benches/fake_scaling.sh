#!/usr/bin/env bash
# The proxy alone (issue 22): pgbench -S through pgvalve in transaction mode, with PostgreSQL
# replaced by benches/fake_server.rs (a fake server answering pgbench's queries from memory),
# for pgvalve's [proxy] worker_threads = 1 and 2; and pgbench against the fake directly, the
# ceiling. Prints tps, pgvalve's CPU per transaction (from /proc/PID/stat, before and after
# each run) and transactions per second of proxy CPU, plus the fake server's CPU per
# transaction (to show it is not the bottleneck).
#
#   benches/fake_scaling.sh                          # workers 1,2; 32,128,512 clients; 10 s
#   DURATION=3 benches/fake_scaling.sh               # a quick check that it all runs
#   WORKERS=1,2,4 CLIENTS=32,128 REPS=3 benches/fake_scaling.sh
#   PREPARED_AT=128,512 benches/fake_scaling.sh      # -M prepared at these counts (""=none)
#   FAKE_THREADS=2 benches/fake_scaling.sh           # the fake on 2 threads (default 1 loop)
#   AUTH=scram benches/fake_scaling.sh               # clients log in with SCRAM (default trust)
#   BIN=/path/to/other/pgvalve benches/fake_scaling.sh   # another build of pgvalve
#
# Each pgvalve runs with benches/fake-server.toml (lock monitor off, auth trust) and
# --pool-mode transaction --pool-size $POOL_SIZE (20) --worker-threads W. pgbench runs
# `-n -S -T $DURATION -c C -j $JOBS (2)`. The fake server alone, by hand:
#   cargo bench --bench fake_server -- --listen 127.0.0.1:15432 [--threads N] [--scale 10]
# Needs pgbench (PostgreSQL's client package); no PostgreSQL server.
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-32,128,512}
WORKERS=${WORKERS:-1,2}
PREPARED_AT=${PREPARED_AT-128}
POOL_SIZE=${POOL_SIZE:-20}
JOBS=${JOBS:-2}
REPS=${REPS:-1}
FAKE_THREADS=${FAKE_THREADS:-1}
AUTH=${AUTH:-trust}
IFS=, read -r -a CLIENT_LIST <<<"$CLIENTS"
IFS=, read -r -a WORKER_LIST <<<"$WORKERS"
IFS=, read -r -a PREPARED_LIST <<<"$PREPARED_AT"

PGBENCH=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -1)
[[ -x "$PGBENCH" ]] || { echo "pgbench not found (apt-get install -y postgresql-client)" >&2; exit 1; }

echo "building pgvalve and the fake server (release)..." >&2
# One release build of both (`cargo bench` would build the crate again in its own profile).
PGVALVE="${BIN:-$PWD/target/release/pgvalve}"
FAKE=$(cargo build --release --quiet --bin pgvalve --bench fake_server --message-format=json |
  python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "fake_server" and m.get("executable"):
        print(m["executable"])' | tail -1)
[[ -x "$FAKE" ]] || { echo "could not build benches/fake_server.rs" >&2; exit 1; }

WORK=$(mktemp -d /tmp/pgvalve-fake-XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
FPORT=$(free_port); VPORT=$(free_port)
FAKE_PID=""; VALVE_PID=""
cleanup() {
  [[ -n "$VALVE_PID" ]] && kill "$VALVE_PID" 2>/dev/null || true
  [[ -n "$FAKE_PID" ]] && kill "$FAKE_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
wait_port() {  # port: until something accepts there (10 s at most)
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; return 1
}

"$FAKE" --listen "127.0.0.1:$FPORT" --threads "$FAKE_THREADS" >"$WORK/fake.log" 2>&1 &
FAKE_PID=$!
wait_port "$FPORT"

# AUTH=scram: only the lock monitor off (the quick start's SCRAM with the upstream password).
CONFIG=benches/fake-server.toml; [[ $AUTH == trust ]] || CONFIG=benches/locks-off.toml
export PGPASSWORD=bench
start_pgvalve() {  # worker threads
  PGVALVE_HEADROOM=0 "$PGVALVE" run --upstream "postgres://bench:bench@127.0.0.1:$FPORT" \
    --listen "127.0.0.1:$VPORT" --pool-mode transaction --pool-size "$POOL_SIZE" \
    --max-client-connections 5000 --max-server-connections 0 --worker-threads "$1" \
    -c "$CONFIG" >"$WORK/pgvalve-$1.log" 2>&1 &
  VALVE_PID=$!
  wait_port "$VPORT"
}
stop_pgvalve() {
  kill "$VALVE_PID" 2>/dev/null || true
  wait "$VALVE_PID" 2>/dev/null || true
  VALVE_PID=""
}

TICK=$(getconf CLK_TCK)
cpu_ticks() { [[ -n "$1" ]] && awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
ROWS=()
run() {  # label workers port clients mode: one pgbench run, one table row
  local label=$1 workers=$2 port=$3 c=$4 mode=$5
  local v0 v1 f0 f1 out tps xacts
  v0=$(cpu_ticks "$VALVE_PID"); f0=$(cpu_ticks "$FAKE_PID")
  out=$(timeout $((DURATION + 120)) "$PGBENCH" -n -S -M "$mode" -T "$DURATION" -c "$c" -j "$JOBS" \
    -h 127.0.0.1 -p "$port" -U bench bench 2>&1 || true)
  v1=$(cpu_ticks "$VALVE_PID"); f1=$(cpu_ticks "$FAKE_PID")
  tps=$(sed -nE 's/^tps = ([0-9.]+).*/\1/p' <<<"$out" | tail -1)
  xacts=$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' <<<"$out" | tail -1)
  [[ -n "$tps" && -n "$xacts" && "$xacts" -gt 0 ]] || {
    echo "run $label c=$c $mode failed: $(tail -3 <<<"$out")" >&2; tps=0; xacts=0; }
  ROWS+=("$(awk -v l="$label" -v w="$workers" -v c="$c" -v m="$mode" -v tps="$tps" -v x="$xacts" \
    -v dv=$((v1 - v0)) -v df=$((f1 - f0)) -v hz="$TICK" -v proxy="$VALVE_PID" 'BEGIN{
      us = (x > 0 ? dv * 1e6 / hz / x : 0); fus = (x > 0 ? df * 1e6 / hz / x : 0)
      per = (dv > 0 ? x / (dv / hz) : 0)
      if (proxy == "") printf "%-8s %7s %7s %-9s %10.0f %12s %14s %12.1f", l, w, c, m, tps, "-", "-", fus
      else printf "%-8s %7s %7s %-9s %10.0f %12.1f %14.0f %12.1f", l, w, c, m, tps, us, per, fus }')")
  echo "${ROWS[-1]}" >&2
}

for ((rep = 1; rep <= REPS; rep++)); do
  # The ceiling: pgbench against the fake server, no proxy.
  for c in "${CLIENT_LIST[@]}"; do run direct - "$FPORT" "$c" simple; done
  for c in "${PREPARED_LIST[@]}"; do run direct - "$FPORT" "$c" prepared; done
  for w in "${WORKER_LIST[@]}"; do
    start_pgvalve "$w"
    for c in "${CLIENT_LIST[@]}"; do run pgvalve "$w" "$VPORT" "$c" simple; done
    for c in "${PREPARED_LIST[@]}"; do run pgvalve "$w" "$VPORT" "$c" prepared; done
    stop_pgvalve
  done
done

echo
echo "pgbench -n -S -T $DURATION -j $JOBS against the fake server (benches/fake_server.rs, $FAKE_THREADS thread(s)),"
echo "pgvalve transaction mode, pool_size $POOL_SIZE, lock monitor off, client auth $AUTH; $(nproc) cores, $REPS rep(s)"
printf '%-8s %7s %7s %-9s %10s %12s %14s %12s\n' target workers clients mode tps "proxy_us/tx" "tx/proxy_cpu_s" "fake_us/tx"
printf '%s\n' "${ROWS[@]}"
