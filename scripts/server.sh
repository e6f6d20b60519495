#!/usr/bin/env bash
# The local Prefect server: start [--sqlite] | stop | status.
# PostgreSQL by default (scripts/postgres.sh starts a private cluster); --sqlite is the zero-setup choice.
#   DUBFLOW_SERVER_DIR (default .dubflow), DUBFLOW_SERVER_PORT (default 4200), PYTHON (default: .venv's python).
#   DUBFLOW_SERVER_HOST (default 127.0.0.1; `make server HOST=`): the interface the API listens on. Beyond
#     loopback the API requires its auth string (PREFECT_SERVER_API_AUTH_STRING, else the one kept in
#     $DUBFLOW_SERVER_DIR/api-auth, made on first start) and PostgreSQL gets a password-protected role.
#   DUBFLOW_SERVER_PUBLIC_URL: the API's address as browsers and other hosts see it (e.g. behind a TLS proxy).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${DUBFLOW_SERVER_DIR:-$PWD/.dubflow}"
PORT="${DUBFLOW_SERVER_PORT:-4200}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}"
PIDFILE="$DIR/prefect-server.pid"
HOSTFILE="$DIR/prefect-server.host"
export PREFECT_HOME="${PREFECT_HOME:-$DIR/prefect-home}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT=false

loopback() { case "$1" in 127.0.0.1|localhost|::1) return 0 ;; *) return 1 ;; esac; }

# where this host reaches the server: the recorded interface (0.0.0.0 is reached on loopback)
reach() {
  local h="${DUBFLOW_SERVER_HOST:-$( [ -f "$HOSTFILE" ] && cat "$HOSTFILE" || echo 127.0.0.1 )}"
  case "$h" in 0.0.0.0|::|"") echo 127.0.0.1 ;; *:*) echo "[$h]" ;; *) echo "$h" ;; esac
}

healthy() {  # /api/health answers without the auth string (Prefect exempts it for probes)
  "$PYTHON" -c "import urllib.request as u; u.urlopen('http://$(reach):$PORT/api/health', timeout=2)" 2>/dev/null
}

auth_string() {  # the API's credentials (user:password) for a server beyond loopback; kept 0600 in $DIR
  if [ -n "${PREFECT_SERVER_API_AUTH_STRING:-}" ]; then return; fi
  if [ ! -s "$DIR/api-auth" ]; then
    (umask 077; echo "dubflow:$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >"$DIR/api-auth")
  fi
  PREFECT_SERVER_API_AUTH_STRING="$(cat "$DIR/api-auth")"
  export PREFECT_SERVER_API_AUTH_STRING
}

start() {
  mkdir -p "$DIR"
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "Prefect server already running (pid $(cat "$PIDFILE")): http://$(reach):$PORT"; return
  fi
  local host="${DUBFLOW_SERVER_HOST:-127.0.0.1}"
  echo "$host" >"$HOSTFILE"
  if ! loopback "$host"; then
    auth_string   # nothing listens on the network without authentication
    export DUBFLOW_PG_ROLE="${DUBFLOW_PG_ROLE:-prefect}" DUBFLOW_PG_PASSWORD_FILE="${DUBFLOW_PG_PASSWORD_FILE:-$DIR/pg-password}"
  fi
  export PREFECT_UI_API_URL="${DUBFLOW_SERVER_PUBLIC_URL:-http://$(reach):$PORT/api}"   # the UI's browser side calls this
  if [ "${1:-}" = "--sqlite" ]; then
    unset PREFECT_API_DATABASE_CONNECTION_URL
    db="SQLite ($PREFECT_HOME/prefect.db)"
  else
    export DUBFLOW_PGDATA="${DUBFLOW_PGDATA:-$DIR/pgdata}"
    PREFECT_API_DATABASE_CONNECTION_URL="$(scripts/postgres.sh start)"
    export PREFECT_API_DATABASE_CONNECTION_URL
    db="PostgreSQL ($(echo "$PREFECT_API_DATABASE_CONNECTION_URL" | sed -E 's#//([^:/@]+):[^@]*@#//\1:***@#'))"
  fi
  setsid "$PYTHON" -m prefect server start --host "$host" --port "$PORT" >"$DIR/prefect-server.log" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 180); do
    healthy && break
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -20 "$DIR/prefect-server.log" >&2; exit 1; }
    sleep 0.5
  done
  healthy || { echo "server.sh: the Prefect server did not answer in 90 s; see $DIR/prefect-server.log" >&2; exit 1; }
  echo "Prefect server on $db"
  echo "UI:  http://$(reach):$PORT"
  echo "use: export PREFECT_API_URL=${DUBFLOW_SERVER_PUBLIC_URL:-http://$(reach):$PORT/api}"
  if ! loopback "$host"; then
    local from="\$PREFECT_SERVER_API_AUTH_STRING"; [ -s "$DIR/api-auth" ] && from="\$(cat $DIR/api-auth)"
    echo "     export PREFECT_API_AUTH_STRING=\"$from\"   # the API refuses requests without it"
    echo "for production put TLS in front (README: a reverse proxy to 127.0.0.1:$PORT)"
  fi
}

stop() {
  if [ -f "$PIDFILE" ]; then
    kill -TERM -- "-$(cat "$PIDFILE")" 2>/dev/null || true   # its own session: the server and its children
    for _ in $(seq 1 40); do kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break; sleep 0.25; done
    rm -f "$PIDFILE"
  fi
  DUBFLOW_PGDATA="${DUBFLOW_PGDATA:-$DIR/pgdata}" scripts/postgres.sh stop
  echo "Prefect server stopped"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) healthy && echo "Prefect server: http://$(reach):$PORT" || { echo "Prefect server: not running"; exit 1; } ;;
  *) echo "usage: scripts/server.sh start [--sqlite] | stop | status" >&2; exit 2 ;;
esac
