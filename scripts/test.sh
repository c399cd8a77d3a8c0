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
