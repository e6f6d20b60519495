#!/usr/bin/env bash
# Register prefect.yaml's work pools and deployments with the running server ($PREFECT_API_URL).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}"
: "${PREFECT_API_URL:?set PREFECT_API_URL (make server prints it), e.g. http://127.0.0.1:4200/api}"
export DUBFLOW_ROOT="${DUBFLOW_ROOT:-$PWD}" DUBFLOW_WORKSPACE="${DUBFLOW_WORKSPACE:-$PWD/dubflow-work}"
export DUBFLOW_INBOX="${DUBFLOW_INBOX:-$PWD/manifests/inbox}"
mkdir -p "$DUBFLOW_INBOX"
for pool in dub-cpu dub-gpu; do
  "$PYTHON" -m prefect work-pool inspect "$pool" >/dev/null 2>&1 || \
    "$PYTHON" -m prefect work-pool create "$pool" --type process >/dev/null
done
"$PYTHON" -m prefect --no-prompt deploy --all
if [ -n "${DUBFLOW_ALERT_WEBHOOK:-}" ]; then
  "$PYTHON" -m flows.alerts --webhook "$DUBFLOW_ALERT_WEBHOOK"
fi
