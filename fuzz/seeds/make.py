"""Writes the seed inputs of each fuzz target into seeds/<target>/ (run from fuzz/)."""
import os
import struct


def msg(tag, body=b""):
    return tag + struct.pack("!i", len(body) + 4) + body


def cstr(s):
    return s.encode() + b"\0"


def startup(params, minor=0):
    body = struct.pack("!i", (3 << 16) | minor) + b"".join(cstr(k) + cstr(v) for k, v in params) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def parse(name, sql, types=0):
    return msg(b"P", cstr(name) + cstr(sql) + struct.pack("!h", types) + b"\0\0\0\x17" * types)


def bind(portal, stmt, values):
    body = cstr(portal) + cstr(stmt) + struct.pack("!h", 0) + struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", len(v)) + v
    return msg(b"B", body + struct.pack("!h", 0))


SYNC, FLUSH = msg(b"S"), msg(b"H")
client = [
    msg(b"Q", cstr("select 1")),
    msg(b"Q", cstr("SET search_path = x; select pg_advisory_lock(1)")),
    parse("s1", "select $1::int", 1) + bind("", "s1", [b"1"]) + msg(b"E", b"\0\0\0\0\0") + SYNC,
    parse("s1", "select 1") + msg(b"D", b"Ss1\0") + SYNC + msg(b"C", b"Ss1\0") + SYNC,
    parse("", "begin") + bind("", "", []) + msg(b"E", b"\0\0\0\0\0") + FLUSH + SYNC,
    msg(b"Q", cstr("DEALLOCATE ALL")) + msg(b"Q", cstr("PREPARE p AS select 1")),
    msg(b"Q", cstr("copy t from stdin")) + msg(b"d", b"1\n") + msg(b"c") + SYNC,
    msg(b"X"),
]
server = [
    msg(b"1") + msg(b"2") + msg(b"D", b"\0\1\0\0\0\1" + b"1") + msg(b"C", cstr("SELECT 1")) + msg(b"Z", b"I"),
    msg(b"S", cstr("TimeZone") + cstr("UTC")) + msg(b"Z", b"T"),
    msg(b"E", b"SERROR\0C0A000\0Mcached plan must not change result type\0\0") + msg(b"Z", b"E"),
    msg(b"3") + msg(b"n") + msg(b"t", b"\0\0") + msg(b"T", b"\0\0") + msg(b"s") + msg(b"Z", b"I"),
    msg(b"G", b"\0\0\0") + msg(b"N", b"SNOTICE\0\0") + msg(b"A", b"\0\0\0\1x\0y\0"),
]
seeds = {
    "frames": [b"\x40\x07" + c + s for c, s in zip(client, server)],
    "startup": [
        startup([("user", "u"), ("database", "d"), ("application_name", "app"), ("options", "-c search_path=x --geqo=off")]),
        startup([("user", "u"), ("_pq_.x", "1")], minor=2),
        struct.pack("!ii", 8, 80877103),
        struct.pack("!ii", 8, 80877104),
        struct.pack("!iiii", 16, 80877102, 42, 7),
    ],
    "messages": [
        b"p" + cstr("SCRAM-SHA-256") + struct.pack("!i", 32) + b"n,,n=,r=rOprNGfwEbeRWgbNEkqO%hvY",
        b"p" + b"c=biws,r=rOprNGfwEbeRWgbNEkqOabc,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        b"E" + b"SFATAL\0C28P01\0Mpassword authentication failed\0Hhint\0\0",
        b"R" + struct.pack("!i", 10) + cstr("SCRAM-SHA-256") + b"\0",
        b"R" + struct.pack("!i", 11) + b"r=abc,s=QSXCR+Q6sek8bf92,i=4096",
        b"K" + struct.pack("!ii", 1, 2),
        b"S" + cstr("server_version") + cstr("15.1"),
        b"Q" + b"SET LOCAL x = 1; DECLARE c CURSOR WITH HOLD FOR select 1; LISTEN x; create temp table t()",
    ],
    "transaction_traffic": [b"\x09\x80" + c + s for c in client for s in server[:2]],
}
for target, inputs in seeds.items():
    os.makedirs(f"seeds/{target}", exist_ok=True)
    for i, data in enumerate(inputs):
        with open(f"seeds/{target}/seed-{i:02}", "wb") as f:
            f.write(data)
