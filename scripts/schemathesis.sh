#!/usr/bin/env bash
# The OpenAPI document (GET /openapi.json) is a contract clients are generated from. This
# runs schemathesis against a real `llmq api` with a worker and the mock provider on
# free ports, twice: once open (no tenants) and once with a tenant token configured. Any
# failed check (undocumented status, body off its schema, a documented value refused, an
# undocumented one accepted, a 5xx, ...) fails the script.
#
#   bash scripts/schemathesis.sh                     both runs, 30 examples per operation
#   SCHEMATHESIS_MAX_EXAMPLES=100 bash scripts/schemathesis.sh
#   SCHEMATHESIS_SEED=1234 bash scripts/schemathesis.sh   repeat a run (it prints its seed)
#
# It uses the local services (scripts/services.sh), its own PostgreSQL database
# (llmq_schema_<random>, dropped at the end), its own RabbitMQ vhost and queue prefix and
# its own Redis key prefix, and stops everything it started on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION="${SCHEMATHESIS_VERSION:-4.32.5}"
MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-30}"
VENV="$PWD/target/schemathesis-venv"
# schemathesis keeps a cache of crashes (replayed first next time) in its working directory.
WORK="$PWD/target/schemathesis-work"
ADMIN_DB="${LLMQ_TEST_ADMIN_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"
AMQP_BASE="${LLMQ_SCHEMA_AMQP_BASE:-amqp://guest:guest@127.0.0.1:5672}"
REDIS_URL="${LLMQ_TEST_REDIS_URL:-redis://127.0.0.1:6379}"

bash scripts/services.sh >/dev/null

# schemathesis in a venv of its own under target/, installed once per version.
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -qF "version $SCHEMATHESIS_VERSION"; then
  echo "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build --quiet -p llmq-worker -p llmq-mock-provider --bins

RAND=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
NAME="llmq_schema_$RAND"
PREFIX="llmqs.$RAND"
RUN="$PWD/target/schemathesis-run/$RAND"
mkdir -p "$RUN" "$WORK"
DB_URL="${ADMIN_DB%/*}/$NAME"

PIDS=()
VHOST=""
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
  psql -q "$ADMIN_DB" -c "DROP DATABASE IF EXISTS $NAME WITH (FORCE)" >/dev/null 2>&1 || true
  if [ -n "$VHOST" ]; then
    rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1 || true
  fi
  redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX*" 2>/dev/null |
    xargs -r redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_http() { # url, name, log
  for _ in $(seq 1 150); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "$2 did not come up; the end of $3:" >&2
  tail -n 30 "$3" >&2
  return 1
}

start() { # log, command...
  local log=$1; shift
  "$@" >"$log" 2>&1 &
  PIDS+=($!)
}

# A vhost of our own when rabbitmqctl can make one (everything in it goes with it);
# otherwise the default vhost with our queue prefix.
AMQP_URL="$AMQP_BASE/%2f"
if rabbitmqctl -q add_vhost "$NAME" >/dev/null 2>&1; then
  VHOST="$NAME"
  rabbitmqctl -q set_permissions -p "$VHOST" guest ".*" ".*" ".*" >/dev/null
  AMQP_URL="$AMQP_BASE/$VHOST"
fi
psql -q "$ADMIN_DB" -c "CREATE DATABASE $NAME" >/dev/null

MOCK_PORT=$(free_port)
export RUST_LOG="${RUST_LOG:-warn}"
export LLMQ_DATABASE_URL="$DB_URL"
export LLMQ_AMQP_URL="$AMQP_URL"
export LLMQ_REDIS_URL="$REDIS_URL"
export LLMQ_QUEUE_PREFIX="$PREFIX"
export LLMQ_ADMISSION__NAMESPACE="$PREFIX"
export LLMQ_PROVIDERS__OPENAI__BASE_URL="http://127.0.0.1:$MOCK_PORT/v1"
export LLMQ_WORKER__SHUTDOWN_GRACE_SECS=5
target/debug/llmq migrate >"$RUN/migrate.log" 2>&1

start "$RUN/mock.log" target/debug/mock-provider --bind "127.0.0.1:$MOCK_PORT"
MOCK_PIDS=("${PIDS[@]}")

RESULTS=()
FAILED=0

# One schemathesis run against a fresh API and worker; extra arguments go to schemathesis.
# Every check runs but `use_after_free`, which expects a DELETEd resource to be 404
# afterwards: DELETE /v1/jobs/{id} cancels a job, and the cancelled job stays readable
# (state `cancelled`), as documented.
run() { # label, extra schemathesis args...
  local label=$1; shift
  local port; port=$(free_port)
  local api="http://127.0.0.1:$port"
  PIDS=("${MOCK_PIDS[@]}")
  LLMQ_API__BIND="127.0.0.1:$port" start "$RUN/api-$label.log" target/debug/llmq api
  start "$RUN/worker-$label.log" target/debug/llmq worker
  wait_http "$api/healthz" "the API ($label)" "$RUN/api-$label.log"
  echo
  echo "--- schemathesis, $label: $api/openapi.json (max $MAX_EXAMPLES examples per operation)"
  local started=$SECONDS rc=0
  (cd "$WORK" && "$VENV/bin/schemathesis" run "$api/openapi.json" \
    --checks all \
    --exclude-checks use_after_free \
    --max-examples "$MAX_EXAMPLES" \
    --request-timeout 20 \
    --seed "${SCHEMATHESIS_SEED:-$RANDOM}" \
    --no-color \
    --suppress-health-check too_slow,filter_too_much \
    --report junit --report-dir "$RUN/report-$label" \
    "$@") || rc=$?
  RESULTS+=("$label: $([ "$rc" = 0 ] && echo passed || echo "FAILED (exit $rc)") in $((SECONDS - started)) s")
  [ "$rc" = 0 ] || FAILED=1
  # Stop this run's API and worker, keep the mock.
  local pid
  for pid in "${PIDS[@]}"; do
    case " ${MOCK_PIDS[*]} " in *" $pid "*) continue ;; esac
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  PIDS=("${MOCK_PIDS[@]}")
}

# Open: no tenants, the document declares no security.
run open

# With a tenant: every /v1 operation needs the bearer token.
MADE=$(target/debug/llmq token acme)
TOKEN=$(sed -n 's/^  \(llmq_[0-9a-f]*\)$/\1/p' <<<"$MADE")
HASH=$(sed -n 's/^  acme = "\([0-9a-f]*\)"$/\1/p' <<<"$MADE")
[ -n "$TOKEN" ] && [ -n "$HASH" ] || { echo "could not make a tenant token: $MADE" >&2; exit 1; }
LLMQ_API__TENANTS__ACME="$HASH" run tenant -H "Authorization: Bearer $TOKEN"

echo
echo "=== schemathesis summary (reports and logs in $RUN)"
for r in "${RESULTS[@]}"; do echo "  $r"; done
exit "$FAILED"
