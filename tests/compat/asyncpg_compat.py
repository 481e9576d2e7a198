"""asyncpg's prepared statements and statement-cache invalidation, through pgvalve or directly.

Run by tests/it/compat.rs (which creates the virtualenv and starts PostgreSQL and pgvalve):
    python asyncpg_compat.py HOST PORT DDL_PORT DBNAME USER PASSWORD CONNECTIONS

HOST:PORT is where the clients connect (pgvalve in transaction mode, or PostgreSQL itself);
DDL_PORT is PostgreSQL, where the schema changes are made (as a migration would, beside the
application). asyncpg prepares every query as a named statement and caches it per connection,
executes cached statements without describing them again, and re-prepares (outside a
transaction) when PostgreSQL says a cached plan changed its result type.

Patterns, each result checked: several connections preparing the same queries and fetching
with parameters; the statement cache reused; executemany; a cursor in a transaction; prepared
statements closed explicitly (dropped, LRU-evicted, reload_schema_state) and prepared again
under the same name; ALTER TABLE changing a result column's type, then the same query from the
old connections (silently re-prepared outside a transaction, InvalidCachedStatementError
inside one) and from new ones (no error); ALTER TYPE of a composite type and of an enum, then
the old and new connections again. Prints one JSON object: "ok", "checks", and "seen", the
outcomes in order (compared between the run through pgvalve and the direct run). Exits
non-zero on a wrong result.
"""
import asyncio
import gc
import json
import sys
import traceback

import asyncpg

HOST, PORT, DDL_PORT, NAME, USER, PASSWORD, CONNECTIONS = sys.argv[1:8]
CONNECTIONS = int(CONNECTIONS)

seen = []
checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


def note(what):
    seen.append(what)


def phase(what):
    print(f"-- {what}", file=sys.stderr, flush=True)


async def connect(port=PORT, **kw):
    return await asyncpg.connect(
        host=HOST, port=int(port), user=USER, password=PASSWORD, database=NAME, **kw
    )


async def outcome(coro):
    """The result, or the exception's class name (asyncpg's own classes)."""
    try:
        return await coro
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError) as e:
        return type(e).__name__


async def setup(ddl):
    await ddl.execute(
        """
        DROP TABLE IF EXISTS apc_items, apc_alter, apc_comp, apc_mood_t;
        DROP TYPE IF EXISTS apc_pair, apc_mood;
        CREATE TABLE apc_items (id int PRIMARY KEY, owner int, name text, qty int);
        CREATE TABLE apc_alter (a int, b int);
        INSERT INTO apc_alter VALUES (1, 2);
        CREATE TYPE apc_pair AS (x int, y text);
        CREATE TABLE apc_comp (id int, p apc_pair);
        INSERT INTO apc_comp VALUES (1, ROW(1, 'a'));
        CREATE TYPE apc_mood AS ENUM ('low', 'high');
        CREATE TABLE apc_mood_t (id int, m apc_mood);
        INSERT INTO apc_mood_t VALUES (1, 'low');
        """
    )


async def one_client(i, c):
    """Prepared statements with parameters, the cache, executemany, a cursor."""
    stmt = await c.prepare("SELECT $1::int * 2 AS d, $2::text || '-' || $1::text AS l")
    check([t.name for t in stmt.get_parameters()] == ["int4", "text"], "parameter types")
    check([a.name for a in stmt.get_attributes()] == ["d", "l"], "columns")
    for j in range(20):
        v = i * 100 + j
        r = await stmt.fetchrow(v, f"c{i}")
        check((r["d"], r["l"]) == (v * 2, f"c{i}-{v}"), f"client {i} got {r!r} for {v}")
    for j in range(20):  # the statement cache: one Parse, then Bind/Execute
        check(await c.fetchval("SELECT $1::int + $2::int", j, i) == i + j, "cached query")
    rows = [(i * 1000 + k, i, f"n{i}-{k}", k) for k in range(10)]
    await c.executemany("INSERT INTO apc_items VALUES ($1, $2, $3, $4)", rows)
    got = await c.fetch("SELECT id, owner, name, qty FROM apc_items WHERE owner = $1 ORDER BY id", i)
    check([tuple(r) for r in got] == rows, f"client {i} rows")
    async with c.transaction():
        ids = [r["id"] async for r in c.cursor("SELECT id FROM apc_items WHERE owner = $1 ORDER BY id", i, prefetch=3)]
    check(ids == [r[0] for r in rows], "cursor")
    try:
        async with c.transaction():
            await c.execute("UPDATE apc_items SET qty = -1 WHERE owner = $1", i)
            check(await c.fetchval("SELECT min(qty) FROM apc_items WHERE owner = $1", i) == -1, "in tx")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    check(await c.fetchval("SELECT min(qty) FROM apc_items WHERE owner = $1", i) == 0, "rolled back")


async def explicit_closes(c):
    """Statements closed by asyncpg (garbage, LRU eviction, reload) and prepared again."""
    named = await c.prepare("SELECT $1::int + 100", name="apc_named")
    check(await named.fetchval(1) == 101, "named")
    del named
    gc.collect()
    check(await c.fetchval("SELECT 1") == 1, "close sent with the next query")
    again = await c.prepare("SELECT $1::int + 200", name="apc_named")
    check(await again.fetchval(1) == 201, "same name, new statement")
    small = await connect(statement_cache_size=2)
    for rnd in range(3):
        for k in range(5):  # 5 queries through a cache of 2: evicted statements are closed
            check(await small.fetchval(f"SELECT $1::int * {k + 1}", rnd) == rnd * (k + 1), "lru")
    await small.reload_schema_state()
    check(await small.fetchval("SELECT $1::int * 1", 7) == 7, "after reload_schema_state")
    await small.close()
    note("closes ok")


async def alter_table(ddl, old):
    """A result column changes type under cached statements of open connections."""
    q = "SELECT * FROM apc_alter"
    for c in old:
        check(tuple(await c.fetchrow(q)) == (1, 2), "before")
    await ddl.execute("ALTER TABLE apc_alter ALTER COLUMN b SET DATA TYPE text")
    # Outside a transaction asyncpg re-prepares once and retries: no error.
    for c in old[:-1]:
        note(repr(tuple(await outcome(c.fetchrow(q)))))
    fresh = await connect()
    note(repr(tuple(await outcome(fresh.fetchrow(q)))))
    # (asyncpg's prepare() leaves its implicit transaction open until the next request.)
    stmt = await fresh.prepare(q)
    note(repr([a.type.name for a in stmt.get_attributes()]))
    note(repr(tuple(await stmt.fetchrow())))
    await ddl.execute("ALTER TABLE apc_alter ALTER COLUMN b SET DATA TYPE bigint USING b::bigint")
    # In a transaction the error reaches the application; after it, the query works.
    for c in (old[0], old[-1]):
        tx = c.transaction()
        await tx.start()
        note(str(await outcome(c.fetchrow(q))))
        await tx.rollback()
        note(repr(tuple(await c.fetchrow(q))))
    newest = await connect()
    note(repr(tuple(await outcome(newest.fetchrow(q)))))
    await fresh.close()
    await newest.close()


async def alter_types(ddl, old):
    """ALTER TYPE of a composite type and of an enum under cached statements.

    asyncpg looks a type that is not built in up on the connection, with jit turned off
    around it by set_config(..., false): a session-level change, so through pgvalve each such
    connection is pinned to its server connection (here the two old ones and the new one).
    """
    qc = "SELECT p FROM apc_comp WHERE id = $1"
    qm = "SELECT m FROM apc_mood_t WHERE id = $1"
    for c in old:
        check(tuple(await c.fetchval(qc, 1)) == (1, "a"), "composite before")
        check(await c.fetchval(qm, 1) == "low", "enum before")
    await ddl.execute("ALTER TYPE apc_pair ADD ATTRIBUTE z int")
    await ddl.execute("ALTER TYPE apc_mood ADD VALUE 'mid'")
    await ddl.execute("INSERT INTO apc_mood_t VALUES (2, 'mid')")
    c = old[0]
    # asyncpg finds its composite codec outdated, drops its caches and raises; then works.
    first = await outcome(c.fetchval(qc, 1))
    note(first if isinstance(first, str) else repr(tuple(first)))
    note(repr(tuple(await c.fetchval(qc, 1))))
    note(await c.fetchval(qm, 2))
    fresh = await connect()
    note(repr(tuple(await fresh.fetchval(qc, 1))))
    note(await fresh.fetchval(qm, 2))
    await fresh.close()


async def main():
    ddl = await connect(port=DDL_PORT)
    phase("setup")
    await setup(ddl)
    conns = [await connect() for _ in range(CONNECTIONS)]
    phase("clients")
    await asyncio.gather(*(one_client(i, c) for i, c in enumerate(conns)))
    note(f"{len(conns)} clients ok")
    phase("explicit closes")
    await explicit_closes(conns[0])
    phase("alter table")
    await alter_table(ddl, conns)
    phase("alter types")
    await alter_types(ddl, conns[:2])
    for c in conns:
        await c.close()
    await ddl.close()


try:
    asyncio.run(main())
    ok = True
except Exception:  # noqa: BLE001 - report whatever went wrong
    traceback.print_exc()
    ok = False
print(json.dumps({"ok": ok, "checks": checks, "seen": seen}))
sys.exit(0 if ok else 1)
