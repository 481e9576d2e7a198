# Sourced by the bench scripts: a throwaway PostgreSQL (role and database "bench"), pgvalve in
# front of it (a second one with RULES_CONFIG when set) and PgBouncer when installed, all
# with POOL_MODE and POOL_SIZE; sets TARGETS (name:port ...), PGPORT, WORK, BINDIR, PGBENCH,
# PSQL and stops everything on exit. Needs MAXC (the largest client count).
export PGPASSWORD=bench
find_bindir() {
  if [[ -n "${PGVALVE_PG_BINDIR:-}" ]]; then echo "$PGVALVE_PG_BINDIR"; return; fi
  if command -v pg_config >/dev/null && [[ -x "$(pg_config --bindir)/initdb" ]]; then pg_config --bindir; return; fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}
BINDIR=$(find_bindir)
[[ -x "$BINDIR/initdb" ]] || { echo "no PostgreSQL binaries (apt-get install -y postgresql)" >&2; exit 1; }
PGBENCH="$BINDIR/pgbench"; PSQL="$BINDIR/psql"

echo "building pgvalve (release)..." >&2
cargo build --release --quiet --bin pgvalve
PGVALVE="$PWD/target/release/pgvalve"

WORK=$(mktemp -d /tmp/pgvalve-bench-XXXXXX)
chmod 755 "$WORK"
AS=()
if [[ $(id -u) == 0 ]]; then chown postgres: "$WORK"; AS=(runuser -u postgres --); fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PGPORT=$(free_port); VPORT=$(free_port); BPORT=$(free_port); RPORT=$(free_port)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  "${AS[@]}" "$BINDIR/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "bench" >"$WORK/pw"; [[ ${#AS[@]} -gt 0 ]] && chown postgres: "$WORK/pw"
"${AS[@]}" "$BINDIR/initdb" -D "$WORK/data" -U postgres --pwfile="$WORK/pw" --auth-local=trust \
  --auth-host=scram-sha-256 -E UTF8 --locale=C --no-sync >/dev/null
"${AS[@]}" "$BINDIR/pg_ctl" -D "$WORK/data" -l "$WORK/pg.log" -w -o \
  "-p $PGPORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=$((MAXC * 4 + 20)) -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=256MB" \
  start >/dev/null
"${AS[@]}" "$PSQL" -qX -h "$WORK" -p "$PGPORT" -U postgres -c "CREATE ROLE bench LOGIN PASSWORD 'bench'" -c "CREATE DATABASE bench OWNER bench" >/dev/null

SERVER_HOST=127.0.0.1; [[ $SERVER_LEG == unix ]] && SERVER_HOST=$WORK
UPSTREAM="postgres://bench:bench@$(python3 -c 'import sys,urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$SERVER_HOST"):$PGPORT"
start_pgvalve() {  # port log [extra args...]; BIN overrides the binary
  local port=$1 log=$2; shift 2
  # No headroom (as PgBouncer): session-mode runs size the pool to the clients, and pgbench
  # starts only once every client is in. By environment, which older builds ignore.
  # One slot more than PgBouncer's pool: pgvalve's lock monitor holds one of the pool's
  # slots, so its clients get the same POOL_SIZE connections as PgBouncer's.
  PGVALVE_HEADROOM=${PGVALVE_HEADROOM:-0} "${BIN:-$PGVALVE}" run --upstream "$UPSTREAM" --listen "127.0.0.1:$port" \
    --pool-mode "$POOL_MODE" --pool-size "$((POOL_SIZE + 1))" --max-client-connections 5000 \
    --max-server-connections 0 ${PGVALVE_ARGS:-} "$@" >"$log" 2>&1 &
  PIDS+=($!)
}
start_pgvalve "$VPORT" "$WORK/pgvalve.log"
TARGETS=(direct:$PGPORT pgvalve:$VPORT)
# A second pgvalve ("rules"): with RULES_CONFIG, and/or another binary PGVALVE_B (A/B runs).
if [[ -n "${RULES_CONFIG:-}" || -n "${PGVALVE_B:-}" ]]; then
  BIN="${PGVALVE_B:-$PGVALVE}" start_pgvalve "$RPORT" "$WORK/pgvalve-rules.log" ${RULES_CONFIG:+-c "$RULES_CONFIG"}
  TARGETS+=(rules:$RPORT)
fi
# RELAY_FLOOR=1: "floor", a logic-free byte relay in C (benches/relay_floor.c) with
# RELAY_THREADS event loops (default 2): what any proxy's extra hop costs on this machine.
if [[ -n "${RELAY_FLOOR:-}" ]]; then
  FPORT=$(free_port)
  FLOOR_UPSTREAM=127.0.0.1:$PGPORT; [[ $SERVER_LEG == unix ]] && FLOOR_UPSTREAM=$WORK/.s.PGSQL.$PGPORT
  cc -O2 -pthread -o "$WORK/relay_floor" benches/relay_floor.c
  "$WORK/relay_floor" "$FPORT" "$FLOOR_UPSTREAM" "${RELAY_THREADS:-2}" >"$WORK/relay_floor.log" 2>&1 &
  FLOOR_PID=$!
  PIDS+=($FLOOR_PID)
  TARGETS+=(floor:$FPORT)
fi
PGBOUNCER=$(command -v pgbouncer || ls /usr/sbin/pgbouncer 2>/dev/null || true)
[[ -n "${NO_PGBOUNCER:-}" ]] && PGBOUNCER=
if [[ -z "$PGBOUNCER" && -z "${NO_PGBOUNCER:-}" && $(id -u) == 0 && -z "${NO_PGBOUNCER_INSTALL:-}" ]]; then
  echo "installing pgbouncer from the system's packages (NO_PGBOUNCER_INSTALL=1 to skip)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null 2>&1 || true
  PGBOUNCER=$(command -v pgbouncer || ls /usr/sbin/pgbouncer 2>/dev/null || true)
fi
if [[ -n "$PGBOUNCER" ]]; then
  VERIFIER=$("${AS[@]}" "$PSQL" -qXtA -h "$WORK" -p "$PGPORT" -U postgres -c "SELECT rolpassword FROM pg_authid WHERE rolname='bench'")
  printf '"bench" "%s"\n' "$VERIFIER" >"$WORK/userlist.txt"
  cat >"$WORK/pgbouncer.ini" <<INI
[databases]
bench = host=$SERVER_HOST port=$PGPORT dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BPORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = $POOL_MODE
default_pool_size = $POOL_SIZE
max_client_conn = 5000
max_db_connections = 0
log_connections = 0
log_disconnections = 0
INI
  [[ ${#AS[@]} -gt 0 ]] && chown postgres: "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
  # runuser applies the user's PAM limits: raise the descriptor limit in the exec'd shell.
  "${AS[@]}" bash -c "ulimit -n 65536 2>/dev/null || ulimit -n \$(ulimit -Hn); exec '$PGBOUNCER' '$WORK/pgbouncer.ini'" >"$WORK/pgbouncer.log" 2>&1 &
  PIDS+=($!)
  TARGETS+=(pgbouncer:$BPORT)
else
  echo "pgbouncer not installed: comparing direct and pgvalve only" >&2
fi
sleep 1

