#!/usr/bin/env bash
# Runs llmq's whole test suite against real RabbitMQ, Redis and PostgreSQL on localhost.
# Installs and starts the services first when they are missing (scripts/services.sh), and
# Chromium for the web page's test (scripts/browser.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh
# The web page is tested in headless Chromium.
bash scripts/browser.sh
# The SIGTERM test runs the real `llmq` binary, so build the binaries first.
cargo build --workspace --bins
cargo test --workspace "$@"
# Chaos scenarios (tests/tests/chaos.rs) restart the shared RabbitMQ, PostgreSQL and Redis,
# so they run after everything above has finished, one at a time; each prints a summary
# line. Skipped when arguments pick some tests (`scripts/test.sh NAME`) or with
# LLMQ_SKIP_CHAOS=1.
if [ $# -eq 0 ] && [ "${LLMQ_SKIP_CHAOS:-0}" != 1 ]; then
  cargo test -p llmq-tests --test chaos -- --ignored --test-threads=1 --nocapture
fi
