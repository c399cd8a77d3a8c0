#!/usr/bin/env bash
# Goodput benchmark (prints figures, asserts nothing): jobs against mock-provider with
# 10% 5xx, 2% connection resets and a full outage in the middle, beside a fault-free run.
#   bash scripts/bench-goodput.sh [--jobs 2000] [--outage-secs 20] [--ci]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh >/dev/null
cargo build --workspace --bins --quiet
# Worker logs are noise here; RUST_LOG=info shows every job.
export RUST_LOG="${RUST_LOG:-error}"
exec target/debug/goodput "$@"
