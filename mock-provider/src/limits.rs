//! Rate limits enforced the way providers describe them: per key, one continuously
//! refilled bucket per dimension, admission charged up front (OpenAI counts the prompt
//! plus `max_tokens`), buckets start full. With `per_second`, requests are enforced per
//! second ("600 RPM may be enforced as 10 per second"): the request bucket holds one
//! second's worth.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Limits applied to every key.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// OpenAI tokens per minute (prompt + max_tokens, charged at admission).
    pub tpm: Option<u64>,
    /// Anthropic input tokens per minute.
    pub input_tpm: Option<u64>,
    /// Anthropic output tokens per minute (max_tokens, charged at admission).
    pub output_tpm: Option<u64>,
    /// Enforce requests per second (bucket of rpm/60) instead of per minute.
    pub per_second: bool,
    /// Token buckets hold this many seconds' worth (default 60: a minute's worth).
    pub token_burst_secs: Option<f64>,
}

#[derive(Debug)]
pub(crate) struct Bucket {
    pub limit: u64,
    capacity: f64,
    per_ms: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    fn new(limit: u64, burst_secs: f64, now: Instant) -> Self {
        let capacity = (limit as f64 * burst_secs / 60.0).max(1.0);
        Self {
            limit,
            capacity,
            per_ms: limit as f64 / 60_000.0,
            level: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let ms = now.saturating_duration_since(self.last).as_secs_f64() * 1000.0;
        self.level = (self.level + ms * self.per_ms).min(self.capacity);
        self.last = now;
    }

    /// `None` when `n` fits now, else how long until it does.
    fn wait_for(&self, n: f64) -> Option<Duration> {
        if self.level >= n {
            return None;
        }
        Some(Duration::from_secs_f64(
            (n - self.level) / self.per_ms / 1000.0,
        ))
    }

    pub fn remaining(&self) -> u64 {
        self.level.max(0.0).floor() as u64
    }

    pub fn used(&self) -> u64 {
        (self.capacity - self.level).max(0.0).ceil() as u64
    }

    /// Time until the bucket is full again.
    pub fn reset_in(&self) -> Duration {
        Duration::from_secs_f64(((self.capacity - self.level) / self.per_ms / 1000.0).max(0.0))
    }
}

/// One key's buckets.
#[derive(Debug, Default)]
pub(crate) struct KeyBuckets {
    pub requests: Option<Bucket>,
    pub tokens: Option<Bucket>,
    pub input: Option<Bucket>,
    pub output: Option<Bucket>,
}

/// What the limiter decided.
pub(crate) enum Decision {
    Admitted,
    /// The named dimension has no room for `requested` now.
    Limited {
        dim: Dim,
        wait: Duration,
        requested: u64,
    },
    /// More than the dimension could ever hold.
    TooLarge {
        dim: Dim,
        requested: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dim {
    Requests,
    Tokens,
    Input,
    Output,
}

#[derive(Default)]
pub(crate) struct Limiter {
    pub limits: Limits,
    keys: HashMap<String, KeyBuckets>,
}

impl Limiter {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            keys: HashMap::new(),
        }
    }

    /// Charges every dimension at once, or none.
    pub fn admit(&mut self, key: &str, tokens: u64, input: u64, output: u64) -> Decision {
        let now = Instant::now();
        let l = self.limits.clone();
        let token_burst = l.token_burst_secs.unwrap_or(60.0);
        let b = self
            .keys
            .entry(key.to_owned())
            .or_insert_with(|| KeyBuckets {
                requests: l
                    .rpm
                    .map(|r| Bucket::new(r, if l.per_second { 1.0 } else { 60.0 }, now)),
                tokens: l.tpm.map(|t| Bucket::new(t, token_burst, now)),
                input: l.input_tpm.map(|t| Bucket::new(t, token_burst, now)),
                output: l.output_tpm.map(|t| Bucket::new(t, token_burst, now)),
            });
        let dims: [(Dim, &mut Option<Bucket>, u64); 4] = [
            (Dim::Requests, &mut b.requests, 1),
            (Dim::Tokens, &mut b.tokens, tokens),
            (Dim::Input, &mut b.input, input),
            (Dim::Output, &mut b.output, output),
        ];
        let mut worst: Option<(Dim, Duration, u64)> = None;
        let mut active = Vec::new();
        for (dim, bucket, n) in dims {
            let Some(bucket) = bucket.as_mut() else {
                continue;
            };
            bucket.refill(now);
            if n as f64 > bucket.capacity {
                return Decision::TooLarge { dim, requested: n };
            }
            if let Some(w) = bucket.wait_for(n as f64) {
                if worst.is_none_or(|(_, ww, _)| w > ww) {
                    worst = Some((dim, w, n));
                }
            }
            active.push((bucket, n));
        }
        if let Some((dim, wait, requested)) = worst {
            return Decision::Limited {
                dim,
                wait,
                requested,
            };
        }
        for (bucket, n) in active {
            bucket.level -= n as f64;
        }
        Decision::Admitted
    }

    pub fn buckets(&self, key: &str) -> Option<&KeyBuckets> {
        self.keys.get(key)
    }
}

/// OpenAI's duration format: `20ms`, `1.5s`, `6m0s`.
pub(crate) fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{}ms", ms.max(1));
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        return format!("{}s", trim(secs));
    }
    let m = (secs / 60.0).floor();
    format!("{}m{}s", m as u64, trim(secs - m * 60.0))
}

fn trim(x: f64) -> String {
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() {
        "0".into()
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_look_like_openai() {
        assert_eq!(openai_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
    }

    #[test]
    fn all_or_nothing_and_per_second() {
        let mut l = Limiter::new(Limits {
            rpm: Some(600),
            tpm: Some(1000),
            per_second: true,
            ..Default::default()
        });
        for _ in 0..10 {
            assert!(matches!(l.admit("k", 10, 0, 0), Decision::Admitted));
        }
        // 11th request in the same second: the request bucket (10/s) is empty.
        assert!(matches!(
            l.admit("k", 10, 0, 0),
            Decision::Limited {
                dim: Dim::Requests,
                ..
            }
        ));
        // Tokens were not charged for the refused request.
        assert_eq!(
            l.buckets("k").unwrap().tokens.as_ref().unwrap().remaining(),
            900
        );
        assert!(matches!(
            l.admit("k", 5000, 0, 0),
            Decision::TooLarge {
                dim: Dim::Tokens,
                ..
            }
        ));
    }
}
