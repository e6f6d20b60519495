#!/usr/bin/env bash
# A private PostgreSQL cluster for the Prefect server: start | stop | status | url.
#   DUBFLOW_PGDATA (default .dubflow/pgdata), DUBFLOW_PGPORT (default 5433).
# Local (the default): loopback only, trust auth, the `postgres` superuser.
# Shared (DUBFLOW_PG_ROLE set; `make server HOST=...` sets it): Prefect connects as that role with a password
#   (kept 0600 in DUBFLOW_PG_PASSWORD_FILE, made on first start), scram-sha-256 on every TCP connection; the
#   superuser only on the cluster's own socket. DUBFLOW_PG_LISTEN (default 127.0.0.1) and DUBFLOW_PG_ALLOW
#   (a CIDR, e.g. 10.0.0.0/24) open it to the Prefect API replicas on other hosts.
# Installs PostgreSQL from apt when it is missing. As root, the server runs as the `postgres` user.
set -euo pipefail
PGDATA="${DUBFLOW_PGDATA:-$PWD/.dubflow/pgdata}"
PGPORT="${DUBFLOW_PGPORT:-5433}"
ROLE="${DUBFLOW_PG_ROLE:-}"
PWFILE="${DUBFLOW_PG_PASSWORD_FILE:-$(dirname "$PGDATA")/pg-password}"
LISTEN="${DUBFLOW_PG_LISTEN:-127.0.0.1}"
ALLOW="${DUBFLOW_PG_ALLOW:-}"
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

psql_admin() {  # the superuser, over the cluster's own socket (in PGDATA: only its owner reaches it)
  as_owner "$BIN/psql" -h "$PGDATA" -p "$PGPORT" -U postgres -v ON_ERROR_STOP=1 -qtA "$@"
}

write_hba() {  # who may connect how; rewritten on every start so the mode asked for is the mode in force
  if [ -z "$ROLE" ]; then
    [ "$LISTEN" = 127.0.0.1 ] || { echo "postgres.sh: DUBFLOW_PG_LISTEN=$LISTEN needs a role with a password (DUBFLOW_PG_ROLE)" >&2; exit 1; }
    printf 'local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' >"$PGDATA/pg_hba.conf"
  else
    {
      echo "local all postgres trust"
      echo "host $DB $ROLE 127.0.0.1/32 scram-sha-256"
      echo "host $DB $ROLE ::1/128 scram-sha-256"
      [ -z "$ALLOW" ] || echo "host $DB $ROLE $ALLOW scram-sha-256"
    } >"$PGDATA/pg_hba.conf"
  fi
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$PGDATA/pg_hba.conf"
  return 0
}

password() {
  if [ ! -s "$PWFILE" ]; then
    mkdir -p "$(dirname "$PWFILE")"
    (umask 077; od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$PWFILE")
  fi
  cat "$PWFILE"
}

ensure_role() {  # the role owns the database and everything in it (tables made in local mode included)
  local pw; pw="$(password)"
  if ! psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname='$ROLE'" | grep -q 1; then
    psql_admin -c "CREATE ROLE \"$ROLE\" LOGIN"
  fi
  # the password on stdin, not on a command line that `ps` shows
  echo "ALTER ROLE \"$ROLE\" WITH LOGIN PASSWORD :'pw';" | psql_admin -v pw="$pw" >/dev/null
  psql_admin -c "ALTER DATABASE $DB OWNER TO \"$ROLE\"" >/dev/null
  psql_admin -d "$DB" >/dev/null <<SQL
SELECT format('ALTER TABLE public.%I OWNER TO "$ROLE"', tablename) FROM pg_tables WHERE schemaname = 'public' \gexec
SELECT format('ALTER SEQUENCE public.%I OWNER TO "$ROLE"', sequencename) FROM pg_sequences WHERE schemaname = 'public' \gexec
SELECT format('ALTER VIEW public.%I OWNER TO "$ROLE"', viewname) FROM pg_views WHERE schemaname = 'public' \gexec
SQL
}

start() {
  ensure_installed
  mkdir -p "$PGDATA"
  [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$PGDATA" && chmod 700 "$PGDATA"
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    as_owner "$BIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  write_hba
  local opts="-p $PGPORT -k $PGDATA -c listen_addresses=$LISTEN -c password_encryption=scram-sha-256"
  if as_owner "$BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    as_owner "$BIN/pg_ctl" -D "$PGDATA" reload >/dev/null   # pg_hba.conf as just written
  else
    as_owner "$BIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t 60 start -o "$opts" >/dev/null
  fi
  if ! psql_admin -c "SELECT 1 FROM pg_database WHERE datname='$DB'" | grep -q 1; then
    as_owner "$BIN/createdb" -h "$PGDATA" -p "$PGPORT" -U postgres "$DB"
  fi
  [ -z "$ROLE" ] || ensure_role
  url
}

stop() {
  BIN="$(pg_bin)"
  if [ -n "$BIN" ] && [ -f "$PGDATA/PG_VERSION" ]; then
    as_owner "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

url() {
  if [ -n "$ROLE" ]; then
    echo "postgresql+asyncpg://$ROLE:$(password)@127.0.0.1:$PGPORT/$DB"
  else
    echo "postgresql+asyncpg://postgres@127.0.0.1:$PGPORT/$DB"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) BIN="$(pg_bin)"; as_owner "$BIN/pg_ctl" -D "$PGDATA" status ;;
  url) url ;;
  *) echo "usage: scripts/postgres.sh start|stop|status|url" >&2; exit 2 ;;
esac
