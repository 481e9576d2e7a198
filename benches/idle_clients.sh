#!/usr/bin/env bash
# Memory per idle client: IDLE (default 10000) clients log in to pgvalve (transaction pooling,
# trust auth so the measurement is not a SCRAM benchmark) and stay connected doing nothing;
# pgvalve's resident memory (VmRSS) before and after gives the cost of one idle client.
# Then a query through pgvalve proves it still serves. Also the CPU pgvalve uses while idle
# (with one idle client, then with all of them): milliseconds of CPU per second and wakeups
# (context switches of all its threads) per second, over IDLE_SECS (default 5).
#
#   benches/idle_clients.sh
#   IDLE=20000 benches/idle_clients.sh
#   BIN=/path/to/other/pgvalve benches/idle_clients.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
IDLE=${IDLE:-10000}; IDLE_SECS=${IDLE_SECS:-5}
POOL_MODE=transaction; POOL_SIZE=10; SERVER_LEG=tcp; MAXC=10
source benches/setup.sh
IPORT=$(free_port)
cat >"$WORK/idle.toml" <<TOML
[proxy]
listen = "127.0.0.1:$IPORT"
max_client_connections = $((IDLE + 100))
auth_type = "trust"
[pool]
pool_mode = "transaction"
pool_size = 10
[locks]
enabled = false
[databases.bench]
host = "127.0.0.1"
port = $PGPORT
[users.bench]
password = "bench"
TOML
"${BIN:-$PGVALVE}" run -c "$WORK/idle.toml" >"$WORK/idle.log" 2>&1 &
PID=$!; PIDS+=($PID)
# Until it accepts (a BIN that wraps it, say in valgrind, starts slowly).
for _ in $(seq 1 120); do
  "$PSQL" -qXtA -h 127.0.0.1 -p "$IPORT" -U bench -c "select 1" bench >/dev/null 2>&1 && break
  sleep 0.5
done
rss() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
python3 - "$IPORT" "$IDLE" "$PID" "$IDLE_SECS" <<'PY'
import asyncio, glob, os, struct, sys
port, n, pid, secs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
def cpu():
    # (CPU seconds, context switches) of the whole process, all threads.
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    ticks = int(f[11]) + int(f[12])
    switches = 0
    for st in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            for l in open(st):
                if "ctxt_switches" in l:  # voluntary and not
                    switches += int(l.split()[1])
        except FileNotFoundError:
            pass
    return ticks / os.sysconf("SC_CLK_TCK"), switches
async def idle_cpu():
    (c0, s0) = cpu()
    await asyncio.sleep(secs)
    (c1, s1) = cpu()
    return (c1 - c0) * 1000 / secs, (s1 - s0) / secs
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
def startup():
    body = b"user\0bench\0database\0bench\0application_name\0idle\0\0"
    return struct.pack("!ii", len(body) + 8, 196608) + body
async def login(conns):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(startup())
    buf = b""
    while True:
        chunk = await r.read(4096)
        if not chunk: raise RuntimeError("closed during login")
        buf += chunk
        if b"Z\0\0\0\x05I" in buf: break
    conns.append((r, w))
async def crowd():
    # n clients, logging in 200 at a time.
    conns = []
    for i in range(0, n, 200):
        await asyncio.gather(*(login(conns) for _ in range(min(200, n - i))))
    return conns
async def main():
    # Warm up: one client, so pools and buffers that exist once are in the baseline.
    warm = []
    await login(warm)
    await asyncio.sleep(1)
    before = rss()
    idle_ms, idle_sw = await idle_cpu()
    conns = await crowd()
    await asyncio.sleep(2)
    after = rss()
    crowd_ms, crowd_sw = await idle_cpu()
    # Still serving: a query from the warm client.
    r, w = warm[0]
    q = b"SELECT 1\0"
    w.write(b"Q" + struct.pack("!i", len(q) + 4) + q)
    buf = b""
    while b"Z\0\0\0\x05I" not in buf:
        buf += await r.read(4096)
    for _, w in conns:
        w.close()
    await asyncio.sleep(3)
    gone = rss()
    # Again: memory that was freed is reused (retained by the allocator, not leaked) when a
    # second round of the same size adds (almost) nothing.
    conns = await crowd()
    await asyncio.sleep(2)
    again = rss()
    for _, w in conns:
        w.close()
    await asyncio.sleep(3)
    third = await crowd()
    await asyncio.sleep(2)
    again3 = rss()
    for _, w in third:
        w.close()
    print(f"{n} idle clients: pgvalve RSS {before} KiB -> {after} KiB, "
          f"{(after - before) * 1024 / n:.0f} bytes per idle client; still serving: yes; "
          f"after they disconnect: {gone} KiB; with {n} idle clients again: {again} KiB, a third time: {again3} KiB")
    print(f"pgvalve idle: {idle_ms:.1f} ms CPU and {idle_sw:.0f} context switches per second with one idle client, "
          f"{crowd_ms:.1f} ms and {crowd_sw:.0f} with {n + 1}")
asyncio.run(main())
PY
