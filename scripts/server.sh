#!/usr/bin/env bash
# The local Prefect server: start [--sqlite] | stop | status.
# PostgreSQL by default (scripts/postgres.sh starts a private cluster); --sqlite is the zero-setup choice.
#   DUBFLOW_SERVER_DIR (default .dubflow), DUBFLOW_SERVER_PORT (default 4200), PYTHON (default: .venv's python).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${DUBFLOW_SERVER_DIR:-$PWD/.dubflow}"
PORT="${DUBFLOW_SERVER_PORT:-4200}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}"
PIDFILE="$DIR/prefect-server.pid"
export PREFECT_HOME="${PREFECT_HOME:-$DIR/prefect-home}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT=false
export PREFECT_UI_API_URL="http://127.0.0.1:$PORT/api"   # the UI's browser side calls this, not :4200

healthy() {
  "$PYTHON" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/api/health', timeout=2)" 2>/dev/null
}

start() {
  mkdir -p "$DIR"
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "Prefect server already running (pid $(cat "$PIDFILE")): http://127.0.0.1:$PORT"; return
  fi
  if [ "${1:-}" = "--sqlite" ]; then
    unset PREFECT_API_DATABASE_CONNECTION_URL
    db="SQLite ($PREFECT_HOME/prefect.db)"
  else
    export DUBFLOW_PGDATA="${DUBFLOW_PGDATA:-$DIR/pgdata}"
    PREFECT_API_DATABASE_CONNECTION_URL="$(scripts/postgres.sh start)"
    export PREFECT_API_DATABASE_CONNECTION_URL
    db="PostgreSQL ($PREFECT_API_DATABASE_CONNECTION_URL)"
  fi
  setsid "$PYTHON" -m prefect server start --host 127.0.0.1 --port "$PORT" >"$DIR/prefect-server.log" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 180); do
    healthy && break
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -20 "$DIR/prefect-server.log" >&2; exit 1; }
    sleep 0.5
  done
  healthy || { echo "server.sh: the Prefect server did not answer in 90 s; see $DIR/prefect-server.log" >&2; exit 1; }
  echo "Prefect server on $db"
  echo "UI:  http://127.0.0.1:$PORT"
  echo "use: export PREFECT_API_URL=http://127.0.0.1:$PORT/api"
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
  status) healthy && echo "Prefect server: http://127.0.0.1:$PORT" || { echo "Prefect server: not running"; exit 1; } ;;
  *) echo "usage: scripts/server.sh start [--sqlite] | stop | status" >&2; exit 2 ;;
esac
