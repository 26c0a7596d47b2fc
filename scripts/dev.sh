#!/bin/sh
# Setup and entry points for a fresh Debian/Ubuntu machine with Python 3.11+.
#   scripts/dev.sh run    venv + install, dev keys, relay on 127.0.0.1:9443
#   scripts/dev.sh test   venv + test deps (redis-server via apt when absent), lint, types, tests
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STATE=${BEACH_RESCUE_STATE_DIR:-$PWD/.state}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "dev.sh: need root (or sudo) to run: $*" >&2; exit 1; fi
}

apt_install() {
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

venv() {
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        echo "dev.sh: Python 3.11+ required ($PY is $("$PY" --version 2>&1))" >&2; exit 1; }
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; "$PY" -m venv "$VENV"; }
    fi
    stamp="$VENV/.installed"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e '.[dev]'
        touch "$stamp"
    fi
}

case "${1:-}" in
run)
    shift
    venv
    export BEACH_RESCUE_STATE_DIR="$STATE"
    # Development credentials for the embedded control plane (never use these in production).
    export BEACH_RESCUE_SERVICE_KEYS="${BEACH_RESCUE_SERVICE_KEYS:-dev-service-key}"
    export BEACH_RESCUE_ADMIN_KEY="${BEACH_RESCUE_ADMIN_KEY:-dev-admin-key}"
    "$VENV/bin/beach-rescue" token mint --session demo >/dev/null  # creates dev keys once
    cat <<TXT
beach-rescue: relay on ws://127.0.0.1:9443/ws (development keys in $STATE/keys)
  mint a token:  BEACH_RESCUE_STATE_DIR=$STATE $VENV/bin/beach-rescue token mint --session demo
     or via API: curl -s -X POST http://127.0.0.1:9443/v1/fallback/token \\
                   -H 'Authorization: Bearer $BEACH_RESCUE_SERVICE_KEYS' -d '{"session_id":"demo"}'
  connect:       ws://127.0.0.1:9443/ws?session=demo&token=<token>
  check it:      $VENV/bin/beach-rescue probe --url ws://127.0.0.1:9443/ws --keys $STATE/keys
  health:        curl http://127.0.0.1:9443/healthz
TXT
    exec "$VENV/bin/beach-rescue" serve "$@"
    ;;
test)
    shift
    command -v redis-server >/dev/null || apt_install redis-server
    command -v promtool >/dev/null || apt_install prometheus
    command -v haproxy >/dev/null || apt_install haproxy
    venv
    "$VENV/bin/ruff" check rescue supervisor tests benches load
    "$VENV/bin/mypy"
    exec "$VENV/bin/pytest" "$@"
    ;;
*)
    echo "usage: scripts/dev.sh run|test [args...]" >&2
    exit 2
    ;;
esac
