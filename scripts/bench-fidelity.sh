#!/usr/bin/env bash
# Rate-limit fidelity benchmark (prints figures, asserts nothing): K llmq worker
# processes against mock-provider's enforced 600 RPM / 90,000 TPM, llmq's shared budget
# beside a naive per-replica limiter. Default 180 s per mode; `--ci` runs 60 s.
#   bash scripts/bench-fidelity.sh [--workers 8] [--secs 180] [--ci]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh >/dev/null
cargo build --workspace --bins --quiet
exec target/debug/fidelity "$@"
