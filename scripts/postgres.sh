#!/usr/bin/env bash
# A private PostgreSQL cluster for the Prefect server: start | stop | status | url.
#   DUBFLOW_PGDATA (default .dubflow/pgdata), DUBFLOW_PGPORT (default 5433). Loopback only, trust auth.
# Installs PostgreSQL from apt when it is missing. As root, the server runs as the `postgres` user.
set -euo pipefail
PGDATA="${DUBFLOW_PGDATA:-$PWD/.dubflow/pgdata}"
PGPORT="${DUBFLOW_PGPORT:-5433}"
DB=prefect

pg_bin() {
  local bin
  bin="$(ls -d /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -1 || true)"
  [ -n "$bin" ] || bin="$(command -v pg_ctl 2>/dev/null || true)"
  [ -n "$bin" ] && dirname "$bin"
}

ensure_installed() {
  if [ -z "$(pg_bin)" ]; then
    echo "installing PostgreSQL from apt ..." >&2
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
  fi
  BIN="$(pg_bin)"
  [ -n "$BIN" ] || { echo "postgres.sh: PostgreSQL is not installed and apt could not install it" >&2; exit 1; }
}

as_owner() {  # postgres refuses to run as root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  ensure_installed
  mkdir -p "$PGDATA"
  [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$PGDATA" && chmod 700 "$PGDATA"
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    as_owner "$BIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  if ! as_owner "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    as_owner "$BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t 60 start \
      -o "-p $PGPORT -k $PGDATA -c listen_addresses=127.0.0.1" >/dev/null
  fi
  if ! as_owner "$BIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1; then
    as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PGPORT" -U postgres "$DB"
  fi
  url
}

stop() {
  BIN="$(pg_bin)"
  if [ -n "$BIN" ] && [ -f "$PGDATA/PG_VERSION" ]; then
    as_owner "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

url() { echo "postgresql+asyncpg://postgres@127.0.0.1:$PGPORT/$DB"; }

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) BIN="$(pg_bin)"; as_owner "$BIN/pg_ctl" -D "$PGDATA" status ;;
  url) url ;;
  *) echo "usage: scripts/postgres.sh start|stop|status|url" >&2; exit 2 ;;
esac
