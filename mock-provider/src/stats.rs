use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Counters of everything the mock was asked.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Requests received on the completion endpoints.
    pub requests_total: u64,
    /// Answered with a completion.
    pub succeeded: u64,
    /// Answered with an error.
    pub rejected: u64,
    /// Per key (redacted: first 3 and last 4 characters).
    pub by_key: BTreeMap<String, KeyStats>,
}

/// Counters of one key.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeyStats {
    /// Requests.
    pub requests: u64,
    /// Completions.
    pub succeeded: u64,
    /// Errors.
    pub rejected: u64,
    /// Prompt tokens billed.
    pub prompt_tokens: u64,
    /// Completion tokens billed.
    pub completion_tokens: u64,
}

impl Stats {
    /// Counts one answer for `key`: `Some((prompt, completion))` on success.
    pub(crate) fn count(&mut self, key: &str, usage: Option<(u64, u64)>) {
        self.requests_total += 1;
        let k = self.by_key.entry(crate::redact(key)).or_default();
        k.requests += 1;
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
}
