#!/usr/bin/env bash
# pgbench select-only against a throwaway PostgreSQL: directly, through pgvalve, and through
# PgBouncer when it is installed, interleaved in one run; prints tps and ratios to direct.
#
#   benches/pgbench.sh                      # 8,32,128 clients, 10 s per run, 1 rep, session mode
#   CLIENTS=32 DURATION=20 REPS=3 benches/pgbench.sh
#   SERVER_LEG=unix benches/pgbench.sh      # proxies reach PostgreSQL over its Unix socket
#   PGVALVE_ARGS="--worker-threads 1" benches/pgbench.sh
#   POOL_MODE=transaction POOL_SIZE=20 benches/pgbench.sh
#   RULES_CONFIG=benches/rules.toml CLIENTS=128 benches/pgbench.sh   # + "rules": a second
#                                           # pgvalve with that config, vs "pgvalve" without
#   PGVALVE_B=/tmp/old/pgvalve benches/pgbench.sh   # A/B: the second pgvalve is another binary
#   ALSO_PREPARED=1 POOL_MODE=transaction benches/pgbench.sh  # + pgvalve with -M prepared, in
#                                           # the same run, vs pgvalve with PGBENCH_MODE
#   ALSO_SCRIPT=benches/commented.sql benches/pgbench.sh  # + pgvalve running that pgbench
#                                           # script (-f) instead of -S, in the same run
#   NO_PGBOUNCER=1 benches/pgbench.sh       # leave PgBouncer out (fewer runs)
#   RELAY_FLOOR=1 benches/pgbench.sh        # + "floor": a logic-free C byte relay (needs cc;
#                                           # RELAY_THREADS loops, default 2), the extra hop alone
#   RATE=6000 benches/pgbench.sh            # pgbench -R: a fixed offered load, so CPU per
#                                           # transaction compares at the same tps (each run's
#                                           # line on stderr splits it into user and kernel)
#
# Needs PostgreSQL server binaries and pgbench; PgBouncer is optional (apt-get install pgbouncer).
# Runs PostgreSQL (and PgBouncer) as the `postgres` user when started as root.
set -euo pipefail
cd "$(dirname "$0")/.."
# 1000 clients need more than the usual 1024 file descriptors (PgBouncer and pgvalve alike).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

CLIENTS=${CLIENTS:-8,32,128}
DURATION=${DURATION:-10}
REPS=${REPS:-1}
SCALE=${SCALE:-10}
POOL_MODE=${POOL_MODE:-session}
MODE=${PGBENCH_MODE:-simple}
# How the proxies reach PostgreSQL: tcp (127.0.0.1) or unix (its socket directory). Clients
# (pgbench) always connect over TCP, to PostgreSQL and to the proxies alike.
SERVER_LEG=${SERVER_LEG:-tcp}
IFS=, read -r -a CLIENT_LIST <<<"$CLIENTS"
MAXC=0; for c in "${CLIENT_LIST[@]}"; do ((c > MAXC)) && MAXC=$c; done
# Session mode keeps one server connection per client: size the pools to the largest run.
POOL_SIZE=${POOL_SIZE:-$MAXC}

# Starts PostgreSQL, pgvalve (and a second pgvalve with RULES_CONFIG) and PgBouncer; sets
# TARGETS, PGPORT, WORK, AS, BINDIR, PGBENCH, PSQL.
source benches/setup.sh
# "name@mode" runs that target with another pgbench mode.
[[ -n "${ALSO_PREPARED:-}" ]] && TARGETS+=("pgvalve@prepared:$VPORT")
[[ -n "${ALSO_SCRIPT:-}" ]] && TARGETS+=("pgvalve@script:$VPORT")
"$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PGPORT" -U bench bench >/dev/null 2>&1

declare -A TPS CPU
proxy_pid() {  # target name -> pid of the proxy process (empty for direct)
  case ${1%@*} in
    pgvalve) pgrep -f -- "--listen 127.0.0.1:$VPORT" | head -1 ;;
    rules) pgrep -f -- "--listen 127.0.0.1:$RPORT" | head -1 ;;
    pgbouncer) pgrep -f -- "$WORK/pgbouncer.ini" | grep -v runuser | tail -1 ;;
    floor) echo "$FLOOR_PID" ;;
  esac
}
# Sessions PostgreSQL has opened in the bench database so far (server logins: a pool that
# keeps its connections opens none during a run; churn shows here).
sessions() { "${AS[@]}" "$PSQL" -qXtA -h "$WORK" -p "$PGPORT" -U postgres -d bench -c "SELECT pg_stat_force_next_flush(); SELECT sessions FROM pg_stat_database WHERE datname = 'bench'" 2>/dev/null | tail -1; }
cpu_ticks() { [[ -n "$1" ]] && awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
user_ticks() { [[ -n "$1" ]] && awk '{print $14}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Direct runs first; the proxies after it take turns in each rep (rotated by one), so none is
# always the one that runs while direct's backends are still exiting. Balanced when REPS is a
# multiple of the number of proxies.
PROXIES=("${TARGETS[@]:1}")
for ((rep = 1; rep <= REPS; rep++)); do
  k=$(((rep - 1) % ${#PROXIES[@]}))
  ORDER=("${TARGETS[0]}" "${PROXIES[@]:k}" "${PROXIES[@]:0:k}")
  for c in "${CLIENT_LIST[@]}"; do
    for t in "${ORDER[@]}"; do
      name=${t%%:*}; port=${t##*:}; mode=$MODE; [[ $name == *@* ]] && mode=${name#*@}
      what=(-S); [[ $mode == script ]] && { what=(-f "$ALSO_SCRIPT"); mode=$MODE; }
      pid=$(proxy_pid "$name"); t0=$(cpu_ticks "$pid"); u0=$(user_ticks "$pid"); s0=$(sessions)
      out=$(timeout $((DURATION + 120)) "$PGBENCH" -n "${what[@]}" -M "$mode" -c "$c" -j 2 -T "$DURATION" ${RATE:+-R "$RATE"} -h 127.0.0.1 -p "$port" -U bench bench 2>&1 || true)
      t1=$(cpu_ticks "$pid"); u1=$(user_ticks "$pid")
      tps=$(sed -nE 's/^tps = ([0-9.]+).*/\1/p' <<<"$out" | tail -1)
      xacts=$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' <<<"$out" | tail -1)
      # proxy CPU per transaction in microseconds (clock ticks are 1/100 s)
      CPU[$name,$c]="${CPU[$name,$c]:-} $(awk -v d=$((t1 - t0)) -v x="${xacts:-0}" 'BEGIN{printf "%.1f", (x>0 ? d*10000/x : 0)}')"
      [[ -n "$tps" ]] || { echo "run $name c=$c failed: $(tail -2 <<<"$out")" >&2; tps=0; }
      TPS[$name,$c]="${TPS[$name,$c]:-} $tps"
      s1=$(sessions)
      split=$(awk -v u=$((u1 - u0)) -v d=$((t1 - t0)) -v x="${xacts:-0}" 'BEGIN{if (x>0) printf ", CPU us/tx %.1f (user %.1f, kernel %.1f)", d*10000/x, u*10000/x, (d-u)*10000/x}')
      echo "rep $rep clients $c $name: $tps tps, $((${s1:-0} - ${s0:-0} - 1)) server logins$split" >&2
    done
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo
echo "pgbench -S -M $MODE, $DURATION s per run, median of $REPS, pool_mode=$POOL_MODE pool_size=$POOL_SIZE, server leg $SERVER_LEG, $(nproc) cores"
printf '%-8s %12s %12s %12s %14s %14s %16s %16s\n' clients direct pgvalve pgbouncer "pgvalve/direct" "pgvalve/pgbouncer" "pgvalve us/tx" "pgbouncer us/tx"
for c in "${CLIENT_LIST[@]}"; do
  d=$(median <<<"${TPS[direct,$c]}"); v=$(median <<<"${TPS[pgvalve,$c]}")
  b=$( [[ -n "${TPS[pgbouncer,$c]:-}" ]] && median <<<"${TPS[pgbouncer,$c]}" || echo "")
  rd=$(awk -v a="$v" -v b="$d" 'BEGIN{printf (b>0 ? "%.2f" : "-"), (b>0 ? a/b : 0)}')
  rb=$( [[ -n "$b" ]] && awk -v a="$v" -v b="$b" 'BEGIN{printf (b>0 ? "%.2f" : "-"), (b>0 ? a/b : 0)}' || echo "-")
  cv=$(median <<<"${CPU[pgvalve,$c]}"); cb=$( [[ -n "${CPU[pgbouncer,$c]:-}" ]] && median <<<"${CPU[pgbouncer,$c]}" || echo -)
  printf '%-8s %12s %12s %12s %14s %14s %16s %16s\n' "$c" "$d" "$v" "${b:--}" "$rd" "$rb" "$cv" "$cb"
done
if [[ -n "${ALSO_PREPARED:-}" ]]; then
  echo
  echo "pgvalve -M prepared vs pgvalve -M $MODE, same run:"
  for c in "${CLIENT_LIST[@]}"; do
    v=$(median <<<"${TPS[pgvalve,$c]}"); r=$(median <<<"${TPS[pgvalve@prepared,$c]}")
    awk -v c="$c" -v v="$v" -v r="$r" -v m="$MODE" 'BEGIN{printf "  %s clients: prepared %s tps, %s %s tps, prepared/%s %.2f\n", c, r, m, v, m, r/v}'
  done
fi
if [[ -n "${ALSO_SCRIPT:-}" ]]; then
  echo
  echo "pgvalve running $ALSO_SCRIPT vs pgvalve running -S, same run:"
  for c in "${CLIENT_LIST[@]}"; do
    v=$(median <<<"${TPS[pgvalve,$c]}"); r=$(median <<<"${TPS[pgvalve@script,$c]}")
    cr=$(median <<<"${CPU[pgvalve@script,$c]}"); cv=$(median <<<"${CPU[pgvalve,$c]}")
    awk -v c="$c" -v v="$v" -v r="$r" -v cr="$cr" -v cv="$cv" 'BEGIN{printf "  %s clients: script %s tps, -S %s tps, script/-S %.3f (%+.1f%%); CPU us/tx script %s, -S %s\n", c, r, v, r/v, (r/v-1)*100, cr, cv}'
  done
fi
if [[ -n "${RELAY_FLOOR:-}" ]]; then
  echo
  echo "floor (logic-free C relay, ${RELAY_THREADS:-2} loops, one server connection per client) vs direct, same run:"
  for c in "${CLIENT_LIST[@]}"; do
    d=$(median <<<"${TPS[direct,$c]}"); f=$(median <<<"${TPS[floor,$c]}"); v=$(median <<<"${TPS[pgvalve,$c]}")
    cf=$(median <<<"${CPU[floor,$c]}")
    awk -v c="$c" -v d="$d" -v f="$f" -v v="$v" -v cf="$cf" 'BEGIN{printf "  %s clients: floor %s tps, floor/direct %.2f, pgvalve/floor %.2f; floor CPU us/tx %s\n", c, f, (d>0 ? f/d : 0), (f>0 ? v/f : 0), cf}'
  done
fi
if [[ -n "${RULES_CONFIG:-}" || -n "${PGVALVE_B:-}" ]]; then
  echo
  echo "second pgvalve (\"rules\": ${PGVALVE_B:-same binary} ${RULES_CONFIG:+with $RULES_CONFIG}) vs pgvalve (\"none\"), same run:"
  for c in "${CLIENT_LIST[@]}"; do
    v=$(median <<<"${TPS[pgvalve,$c]}"); r=$(median <<<"${TPS[rules,$c]}")
    cr=$(median <<<"${CPU[rules,$c]}"); cv=$(median <<<"${CPU[pgvalve,$c]}")
    awk -v c="$c" -v v="$v" -v r="$r" -v cr="$cr" -v cv="$cv" 'BEGIN{printf "  %s clients: rules %s tps, none %s tps, rules/none %.3f (%+.1f%%); CPU us/tx rules %s, none %s\n", c, r, v, r/v, (r/v-1)*100, cr, cv}'
  done
fi
