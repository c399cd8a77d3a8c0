#!/usr/bin/env bash
# The main job, on one machine without Docker: makes sure RabbitMQ, Redis and PostgreSQL
# run, builds llmq, migrates, starts the mock provider, the API and two workers, pushes a
# batch of sample jobs with a progress bar and prints where to watch them.
#
#   bash scripts/demo.sh          start everything and push the batch
#   bash scripts/demo.sh stop     stop what the last run started
#
# Environment: LLMQ_DEMO_JOBS (default 60), LLMQ_API__BIND (default 127.0.0.1:8080),
# MOCK_BIND (default 127.0.0.1:8089), MOCK_LATENCY_MS (default 400).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=.run
mkdir -p "$RUN"

stop() {
  local f
  for f in "$RUN"/*.pid; do
    [ -e "$f" ] || continue
    local pid; pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
    rm -f "$f"
  done
  # Give workers their drain period.
  for _ in $(seq 1 100); do
    pgrep -f "target/debug/(llmq|mock-provider)" >/dev/null 2>&1 || break
    sleep 0.1
  done
}

if [ "${1:-}" = "stop" ]; then
  stop
  echo "stopped"
  exit 0
fi

stop
bash scripts/services.sh
echo "building llmq (first build takes a few minutes)…"
cargo build --bins --quiet

export LLMQ_API__BIND="${LLMQ_API__BIND:-127.0.0.1:8080}"
MOCK_BIND="${MOCK_BIND:-127.0.0.1:8089}"
export LLMQ_PROVIDERS__OPENAI__BASE_URL="${LLMQ_PROVIDERS__OPENAI__BASE_URL:-http://$MOCK_BIND/v1}"
API="http://$LLMQ_API__BIND"

target/debug/llmq migrate

start() { # name, command…
  local name=$1; shift
  "$@" >"$RUN/$name.log" 2>&1 &
  echo $! >"$RUN/$name.pid"
}
# Answers stream one word every 60 ms, so the page shows the text being written.
start mock-provider target/debug/mock-provider --bind "$MOCK_BIND" --latency-ms "${MOCK_LATENCY_MS:-400}" \
  --chunk-delay-ms "${MOCK_CHUNK_DELAY_MS:-60}"
start api target/debug/llmq api
# A small concurrency per worker so the batch takes long enough to watch.
export LLMQ_WORKER__CONCURRENCY="${LLMQ_WORKER__CONCURRENCY:-4}"
start worker-1 target/debug/llmq worker
start worker-2 target/debug/llmq worker

for _ in $(seq 1 100); do
  curl -fsS "$API/healthz" >/dev/null 2>&1 && break
  sleep 0.2
done
if ! curl -fsS "$API/healthz" >/dev/null 2>&1; then
  echo "the API did not come up; see $RUN/api.log:" >&2
  tail -n 20 "$RUN/api.log" >&2
  exit 1
fi

target/debug/llmq demo --api "$API" --jobs "${LLMQ_DEMO_JOBS:-60}"

cat <<MSG

running (logs in $RUN/):
  web page       $API/         (submit a prompt and watch it live)
  API            $API          ($RUN/api.log; OpenAPI at $API/openapi.json)
  workers        2             ($RUN/worker-1.log, $RUN/worker-2.log)
  mock provider  http://$MOCK_BIND  (stats: curl -s http://$MOCK_BIND/_mock/stats)
  RabbitMQ       amqp://127.0.0.1:5672 (queue llmq.work, dead letters llmq.dead)
  PostgreSQL     postgres://127.0.0.1:5432/llmq (tables jobs, job_attempts, job_transitions)
stop them with:  bash scripts/demo.sh stop
MSG
