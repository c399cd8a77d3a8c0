#!/usr/bin/env bash
# Makes sure RabbitMQ, Redis and PostgreSQL are installed (Debian packages) and running on
# 127.0.0.1, and that the `llmq` database exists. Idempotent: safe to run at any time.
#
#   bash scripts/services.sh           install what is missing, start what is stopped
#   bash scripts/services.sh --check   only check; exit 1 naming what is down
#
# LLMQ_WITH_COMPOSE=1 also installs docker-compose (to validate docker-compose.yml).
set -euo pipefail

CHECK_ONLY=0
[ "${1:-}" = "--check" ] && CHECK_ONLY=1
export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0

say() { printf '%-10s %s\n' "$1" "$2"; }

apt_install() {
  if [ "$APT_UPDATED" = 0 ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need() { # command, package…
  local cmd=$1; shift
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [ "$CHECK_ONLY" = 1 ]; then return 1; fi
  say "$cmd" "not installed; installing $* (apt-get)"
  apt_install "$@"
}

wait_for() { # name, seconds, command…
  local name=$1 secs=$2; shift 2
  for _ in $(seq 1 $((secs * 2))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "$name did not become ready within ${secs}s" >&2
  return 1
}

failed=()

# --- PostgreSQL -------------------------------------------------------------------------
pg_ready() { pg_isready -h 127.0.0.1 -p 5432 -q; }
if need pg_isready postgresql postgresql-client; then
  if ! pg_ready; then
    if [ "$CHECK_ONLY" = 1 ]; then failed+=(postgresql); else
      ver=$(ls /etc/postgresql | sort -V | tail -1)
      pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
      wait_for postgresql 60 pg_ready || failed+=(postgresql)
    fi
  fi
else failed+=(postgresql); fi
if [ "$CHECK_ONLY" = 0 ] && pg_ready; then
  # Password login over TCP (a fresh Debian install uses scram for 127.0.0.1).
  if ! PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; then
    runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'" >/dev/null
  fi
  if [ "$(PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname = 'llmq'")" != 1 ]; then
    PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d postgres -qc 'CREATE DATABASE llmq' >/dev/null
  fi
fi
pg_ready && say postgresql "ok   postgres://postgres:***@127.0.0.1:5432/llmq"

# --- Redis ------------------------------------------------------------------------------
redis_ready() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }
if need redis-server redis-server && need redis-cli redis-tools; then
  if ! redis_ready; then
    if [ "$CHECK_ONLY" = 1 ]; then failed+=(redis); else
      redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
      wait_for redis 20 redis_ready || failed+=(redis)
    fi
  fi
else failed+=(redis); fi
redis_ready && say redis "ok   redis://127.0.0.1:6379"

# --- RabbitMQ ---------------------------------------------------------------------------
amqp_port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if need rabbitmq-server rabbitmq-server; then
  if ! amqp_port_open; then
    if [ "$CHECK_ONLY" = 1 ]; then failed+=(rabbitmq); else
      rabbitmq-server -detached >/dev/null 2>&1 || true
      wait_for rabbitmq 120 amqp_port_open || failed+=(rabbitmq)
      rabbitmqctl -q await_startup >/dev/null 2>&1 || true
    fi
  fi
else failed+=(rabbitmq); fi
amqp_port_open && say rabbitmq "ok   amqp://guest:***@127.0.0.1:5672/%2f"

# --- docker-compose (static validation only) --------------------------------------------
if [ "${LLMQ_WITH_COMPOSE:-0}" = 1 ] && [ "$CHECK_ONLY" = 0 ]; then
  if ! command -v docker-compose >/dev/null 2>&1; then
    say docker-compose "installing (apt-get) to validate docker-compose.yml"
    apt_install docker-compose || say docker-compose "not installable here; compose check will use the Python validator"
  fi
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "not running: ${failed[*]} (see the messages above; start commands are in scripts/services.sh)" >&2
  exit 1
fi
