#!/usr/bin/env bash
# Rate-limit fidelity benchmark (prints figures, asserts nothing): what a user sees. Each
# row enqueues a FIXED batch, then starts K `llmq worker` processes (concurrency C each)
# against mock-provider behaving like an idle real account (buckets full at the start,
# requests enforced per second, 300 ms latency) and waits until every job is terminal.
# It prints, per row: the least time the limits allow (ideal), the provider's first to
# last admission (llmq s), utilisation = ideal / actual, provider 429s, the worst and
# p99 send jitter (llmq_budget_send_lateness_seconds), jobs not succeeded, and with
# --naive the same for a naive per-replica limiter.
#
# Rows (--rows all|w-rpm,w-tpm,restart,per-key):
#   W-RPM fresh / warm    600 jobs of ~50 tokens, 600 RPM; the warm row repeats the batch
#                         on the same provider and Redis namespace 60 s after the last
#                         admission (ideal 59 s)
#   W-TPM fresh / warm    400 jobs of 200..8,000 tokens, 900,000 TPM (ideal ~49 s)
#   W-RPM Redis restart   W-RPM with Redis shut down 20 s in and started 3 s later
#                         (restarts the machine's Redis: run it alone)
#   W-RPM 3 models,       W-RPM over three models sharing the key's limit, the workers
#     per-key limit       told the limit is per key
#
#   bash scripts/bench-fidelity.sh [--workers 8] [--concurrency 4] [--latency-ms 300]
#       [--rows all] [--naive] [--warm-wait-secs 60]
#   bash scripts/bench-fidelity.sh --ci    # all rows, W-RPM batches halved, no naive; ~9 min
# Worker logs: target/bench-fidelity/. FIDELITY_DUMP=<dir> also writes each row's
# provider admissions (ms since the mock started, tokens charged, model) as CSV there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh >/dev/null
cargo build --workspace --bins --quiet
exec target/debug/fidelity "$@"
