use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Counters of everything the mock was asked.
///
/// `requests_total` counts at arrival, before any latency, stall or fault, so calls a
/// client abandons mid-flight are counted; the outcomes count when answered, so
/// `succeeded + rejected` may lag behind `requests_total` (never answered, or not yet).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Requests received on the completion endpoints (counted at arrival).
    pub requests_total: u64,
    /// Answered with a completion.
    pub succeeded: u64,
    /// Answered with an error (of which `rate_limited` were 429 rate limits).
    pub rejected: u64,
    /// Answered 429 because a rate limit had no room.
    pub rate_limited: u64,
    /// `rate_limited` by what had no room: `requests`, `tokens`, `input_tokens`,
    /// `output_tokens` or `concurrent`.
    pub rate_limited_by_dim: BTreeMap<String, u64>,
    /// Per key (redacted: first 3 and last 4 characters).
    pub by_key: BTreeMap<String, KeyStats>,
}

/// Counters of one key.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct KeyStats {
    /// Requests (counted at arrival).
    pub requests: u64,
    /// Completions.
    pub succeeded: u64,
    /// Errors.
    pub rejected: u64,
    /// 429 rate limits.
    pub rate_limited: u64,
    /// Prompt tokens billed.
    pub prompt_tokens: u64,
    /// Completion tokens billed.
    pub completion_tokens: u64,
    /// Most admitted requests in flight at once (from admission until the answer's body
    /// is over), counted as `Limits::max_concurrent` counts them: with `per_model`, the
    /// most of any one model.
    pub max_in_flight_seen: u64,
}

impl Stats {
    /// Counts one completion request from `key` the moment it arrives.
    pub(crate) fn arrived(&mut self, key: &str) {
        self.requests_total += 1;
        self.by_key.entry(crate::redact(key)).or_default().requests += 1;
    }

    /// Counts one 429 rate-limit answer for `key`, refused on `dim`.
    pub(crate) fn count_limited(&mut self, key: &str, dim: &str) {
        self.count(key, None);
        self.rate_limited += 1;
        *self.rate_limited_by_dim.entry(dim.to_owned()).or_default() += 1;
        if let Some(k) = self.by_key.get_mut(&crate::redact(key)) {
            k.rate_limited += 1;
        }
    }

    /// Counts one answer for `key`: `Some((prompt, completion))` on success. The request
    /// itself was counted at arrival ([`Stats::arrived`]).
    pub(crate) fn count(&mut self, key: &str, usage: Option<(u64, u64)>) {
        let k = self.by_key.entry(crate::redact(key)).or_default();
        match usage {
            Some((p, c)) => {
                self.succeeded += 1;
                k.succeeded += 1;
                k.prompt_tokens += p;
                k.completion_tokens += c;
            }
            None => {
                self.rejected += 1;
                k.rejected += 1;
            }
        }
    }

    /// Notes that `key` had `n` requests in flight at once.
    pub(crate) fn saw_in_flight(&mut self, key: &str, n: u64) {
        let k = self.by_key.entry(crate::redact(key)).or_default();
        k.max_in_flight_seen = k.max_in_flight_seen.max(n);
    }
}
