#!/usr/bin/env bash
# The whole test suite, with its own set-up. README's test command; .ci/run calls it.
#
# Needs: cargo, Node 20 + npm (realtime-js client tests), the PostgreSQL 15 server binaries,
# Chromium, systemd-analyze, the openssl CLI and nats-server (installed here from Debian packages when missing
# and we are root). Missing tools fail the
# run loudly; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "tools/test.sh: $*" >&2; exit 1; }

command -v cargo >/dev/null || fail "cargo is missing"
command -v node >/dev/null || fail "node is missing (Node 20 is required for the realtime-js tests)"
command -v npm >/dev/null || fail "npm is missing (required for the realtime-js tests)"

pg_bin() {
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  done
  return 1
}
if ! pg_bin >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tools/test.sh: installing the PostgreSQL server binaries (Debian package postgresql-15)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null \
      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  pg_bin >/dev/null || fail "PostgreSQL server binaries (initdb, pg_ctl) not found and could not be installed"
fi

# Headless Chromium for the browser tests (tests/browser.rs): the Debian package, never a
# downloaded browser build.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "tools/test.sh: installing Chromium (Debian package chromium)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
  fi
  command -v chromium >/dev/null || fail "Chromium not found and could not be installed (Debian package chromium): the browser tests need it"
fi

# systemd-analyze (tests/deploy.rs), the openssl CLI (tests/tls.rs makes its CA with it) and
# nats-server (tests/cluster.rs starts its own `nats-server -js`).
for tool in systemd-analyze:systemd openssl:openssl nats-server:nats-server; do
  if ! command -v "${tool%%:*}" >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "tools/test.sh: installing ${tool%%:*} (Debian package ${tool#*:})"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tool#*:}" >/dev/null || true
    fi
    command -v "${tool%%:*}" >/dev/null || fail "${tool%%:*} not found and could not be installed (Debian package ${tool#*:})"
  fi
done

# Node packages for the official-client tests, pinned by tests/js/package-lock.json.
if [ -f tests/js/package-lock.json ]; then
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
fi

exec cargo test --workspace --all-targets "$@"
