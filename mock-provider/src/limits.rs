//! Rate limits enforced the way providers describe them: one continuously refilled bucket
//! per dimension, admission charged up front (OpenAI counts the prompt plus `max_tokens`),
//! all or nothing across the buckets, buckets start full (an account idle for a minute).
//!
//! Buckets belong to an API key (a relay or gateway's view), or to a (key, model) pair
//! with [`Limits::per_model`] (OpenAI's and Anthropic's). With `per_second`, requests are
//! also enforced per second ("600 RPM may be enforced as 10 per second"): a one-second
//! bucket of rpm/60 next to the minute bucket, which alone is reported in the headers.
//! [`Limits::max_concurrent`] caps the requests of a key in flight at once, as some
//! gateways do; a [`Slot`] counts one until dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Limits applied to every key (or every (key, model) with `per_model`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// OpenAI tokens per minute (prompt + max_tokens, charged at admission).
    pub tpm: Option<u64>,
    /// Anthropic input tokens per minute.
    pub input_tpm: Option<u64>,
    /// Anthropic output tokens per minute (max_tokens, charged at admission).
    pub output_tpm: Option<u64>,
    /// Also enforce requests per second (a bucket of rpm/60), as providers may; the
    /// headers still report the minute window.
    pub per_second: bool,
    /// Token buckets hold this many seconds' worth (default 60: a minute's worth).
    pub token_burst_secs: Option<f64>,
    /// One set of buckets per (key, model), as OpenAI and Anthropic do; `false` (the
    /// default) shares them across every model of a key, as a relay or gateway does.
    pub per_model: bool,
    /// At most this many requests in flight at once per key (per (key, model) with
    /// `per_model`), counted from admission until the answer's body is over; more are
    /// answered 429 at once.
    pub max_concurrent: Option<u64>,
}

#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    pub limit: u64,
    capacity: f64,
    per_ms: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    /// `limit` per minute, holding `burst_secs` worth; starts full.
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
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyBuckets {
    /// Requests per minute: enforced and reported.
    pub requests: Option<Bucket>,
    /// Requests per second (`per_second`): enforced, never reported.
    requests_per_second: Option<Bucket>,
    pub tokens: Option<Bucket>,
    pub input: Option<Bucket>,
    pub output: Option<Bucket>,
}

impl KeyBuckets {
    fn new(l: &Limits, now: Instant) -> Self {
        let token_burst = l.token_burst_secs.unwrap_or(60.0);
        Self {
            requests: l.rpm.map(|r| Bucket::new(r, 60.0, now)),
            requests_per_second: l
                .rpm
                .filter(|_| l.per_second)
                .map(|r| Bucket::new(r, 1.0, now)),
            tokens: l.tpm.map(|t| Bucket::new(t, token_burst, now)),
            input: l.input_tpm.map(|t| Bucket::new(t, token_burst, now)),
            output: l.output_tpm.map(|t| Bucket::new(t, token_burst, now)),
        }
    }

    /// Every enforced bucket with its dimension (both request buckets are `Requests`).
    fn enforced(&mut self) -> impl Iterator<Item = (Dim, &mut Bucket)> {
        [
            (Dim::Requests, &mut self.requests),
            (Dim::Requests, &mut self.requests_per_second),
            (Dim::Tokens, &mut self.tokens),
            (Dim::Input, &mut self.input),
            (Dim::Output, &mut self.output),
        ]
        .into_iter()
        .filter_map(|(dim, b)| b.as_mut().map(|b| (dim, b)))
    }

    /// The bucket reported for `dim` (for requests, the minute window).
    fn reported(&self, dim: Dim) -> Option<&Bucket> {
        match dim {
            Dim::Requests => self.requests.as_ref(),
            Dim::Tokens => self.tokens.as_ref(),
            Dim::Input => self.input.as_ref(),
            Dim::Output => self.output.as_ref(),
        }
    }
}

/// What one request is charged at admission, besides one request.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Charge {
    /// OpenAI tokens (prompt + max_tokens).
    pub tokens: u64,
    /// Anthropic input tokens.
    pub input: u64,
    /// Anthropic output tokens (max_tokens).
    pub output: u64,
}

impl Charge {
    fn of(self, dim: Dim) -> u64 {
        match dim {
            Dim::Requests => 1,
            Dim::Tokens => self.tokens,
            Dim::Input => self.input,
            Dim::Output => self.output,
        }
    }
}

/// Why the limiter refused a request (it charged nothing).
pub(crate) enum Refusal {
    /// The named dimension has no room for `requested` now (`limit` and `used` are those of
    /// its reported window: for requests, the minute's even when the second refused).
    Limited {
        dim: Dim,
        wait: Duration,
        requested: u64,
        limit: u64,
        used: u64,
    },
    /// More than the dimension could ever hold.
    TooLarge {
        dim: Dim,
        requested: u64,
        limit: u64,
    },
    /// `limit` requests of the key are already in flight.
    Busy { limit: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dim {
    Requests,
    Tokens,
    Input,
    Output,
}

impl Dim {
    /// The name counted in [`crate::Stats::rate_limited_by_dim`].
    pub fn name(self) -> &'static str {
        match self {
            Dim::Requests => "requests",
            Dim::Tokens => "tokens",
            Dim::Input => "input_tokens",
            Dim::Output => "output_tokens",
        }
    }
}

/// Whose buckets: (API key, model), the model empty unless `per_model`.
type LimitKey = (String, String);

/// Requests in flight per [`LimitKey`].
type InFlight = Arc<Mutex<HashMap<LimitKey, u64>>>;

/// One admitted request counted in flight for its key until dropped.
pub(crate) struct Slot {
    counts: InFlight,
    key: LimitKey,
    /// The key's requests in flight with this one, when it was admitted.
    pub in_flight: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[derive(Default)]
pub(crate) struct Limiter {
    pub limits: Limits,
    keys: HashMap<LimitKey, KeyBuckets>,
    in_flight: InFlight,
}

impl Limiter {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    fn limit_key(&self, key: &str, model: &str) -> LimitKey {
        let model = if self.limits.per_model { model } else { "" };
        (key.to_owned(), model.to_owned())
    }

    /// Admits one request of `key` for `model`: within `max_concurrent`, and charged on
    /// every bucket at once (the slot counts it in flight until dropped), or refused and
    /// charged nothing.
    pub fn admit(&mut self, key: &str, model: &str, charge: Charge) -> Result<Slot, Refusal> {
        let now = Instant::now();
        let id = self.limit_key(key, model);
        let b = self
            .keys
            .entry(id.clone())
            .or_insert_with(|| KeyBuckets::new(&self.limits, now));
        let mut worst: Option<(Dim, Duration)> = None;
        for (dim, bucket) in b.enforced() {
            bucket.refill(now);
            let requested = charge.of(dim);
            if requested as f64 > bucket.capacity {
                let limit = bucket.limit;
                return Err(Refusal::TooLarge {
                    dim,
                    requested,
                    limit,
                });
            }
            if let Some(w) = bucket.wait_for(requested as f64) {
                if worst.is_none_or(|(_, ww)| w > ww) {
                    worst = Some((dim, w));
                }
            }
        }
        let mut counts = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let in_flight = counts.get(&id).copied().unwrap_or(0);
        if let Some(limit) = self.limits.max_concurrent.filter(|&m| in_flight >= m) {
            return Err(Refusal::Busy { limit });
        }
        if let Some((dim, wait)) = worst {
            let (limit, used) = b.reported(dim).map_or((0, 0), |r| (r.limit, r.used()));
            return Err(Refusal::Limited {
                dim,
                wait,
                requested: charge.of(dim),
                limit,
                used,
            });
        }
        for (dim, bucket) in b.enforced() {
            bucket.level -= charge.of(dim) as f64;
        }
        counts.insert(id.clone(), in_flight + 1);
        Ok(Slot {
            counts: self.in_flight.clone(),
            key: id,
            in_flight: in_flight + 1,
        })
    }

    /// The buckets of `key` for `model`, as of its last admission.
    pub fn buckets(&self, key: &str, model: &str) -> Option<&KeyBuckets> {
        self.keys.get(&self.limit_key(key, model))
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
    fn per_second_and_minute_buckets_all_or_nothing() {
        let mut l = Limiter::new(Limits {
            rpm: Some(600),
            tpm: Some(1000),
            per_second: true,
            ..Default::default()
        });
        let tokens = Charge {
            tokens: 10,
            ..Charge::default()
        };
        for _ in 0..10 {
            assert!(l.admit("k", "m", tokens).is_ok());
        }
        // 11th request in the same second: the one-second bucket (10/s) is empty, the
        // minute bucket is not; the refusal names requests with the minute's numbers.
        match l.admit("k", "m", tokens) {
            Err(Refusal::Limited {
                dim: Dim::Requests,
                wait,
                requested: 1,
                limit: 600,
                used: 10,
            }) => assert!(wait <= Duration::from_millis(101), "{wait:?}"),
            _ => panic!("not limited on requests"),
        }
        let b = l.buckets("k", "m").unwrap();
        let requests = b.requests.as_ref().unwrap();
        assert_eq!((requests.limit, requests.remaining()), (600, 590));
        // Tokens were not charged for the refused request.
        assert_eq!(b.tokens.as_ref().unwrap().remaining(), 900);
        assert!(matches!(
            l.admit(
                "k",
                "m",
                Charge {
                    tokens: 5000,
                    ..Charge::default()
                }
            ),
            Err(Refusal::TooLarge {
                dim: Dim::Tokens,
                limit: 1000,
                ..
            })
        ));
    }

    #[test]
    fn minute_bucket_refuses_when_the_second_has_room() {
        let mut l = Limiter::new(Limits {
            rpm: Some(60),
            per_second: true,
            ..Default::default()
        });
        let charge = Charge::default();
        assert!(l.admit("k", "m", charge).is_ok());
        // Drain the minute bucket but leave the second's room.
        let id = l.limit_key("k", "m");
        let b = l.keys.get_mut(&id).unwrap();
        b.requests.as_mut().unwrap().level = 0.0;
        b.requests_per_second.as_mut().unwrap().level = 1.0;
        assert!(matches!(
            l.admit("k", "m", charge),
            Err(Refusal::Limited {
                dim: Dim::Requests,
                limit: 60,
                used: 60,
                ..
            })
        ));
        assert_eq!(
            l.buckets("k", "m")
                .unwrap()
                .requests_per_second
                .as_ref()
                .unwrap()
                .remaining(),
            1
        );
    }

    #[test]
    fn per_model_separates_buckets_per_key_shares_them() {
        let one_rpm = |per_model| Limits {
            rpm: Some(1),
            per_model,
            ..Default::default()
        };
        let c = Charge::default();
        let mut shared = Limiter::new(one_rpm(false));
        assert!(shared.admit("k", "gpt-a", c).is_ok());
        assert!(matches!(
            shared.admit("k", "gpt-b", c),
            Err(Refusal::Limited { .. })
        ));
        assert!(shared.admit("other", "gpt-b", c).is_ok());

        let mut split = Limiter::new(one_rpm(true));
        assert!(split.admit("k", "gpt-a", c).is_ok());
        assert!(split.admit("k", "gpt-b", c).is_ok());
        assert!(matches!(
            split.admit("k", "gpt-a", c),
            Err(Refusal::Limited { .. })
        ));
    }

    #[test]
    fn max_concurrent_limits_and_releases() {
        let mut l = Limiter::new(Limits {
            max_concurrent: Some(2),
            per_model: true,
            ..Default::default()
        });
        let c = Charge::default();
        let Ok(first) = l.admit("k", "m", c) else {
            panic!("first refused");
        };
        let Ok(second) = l.admit("k", "m", c) else {
            panic!("second refused");
        };
        assert_eq!((first.in_flight, second.in_flight), (1, 2));
        assert!(matches!(
            l.admit("k", "m", c),
            Err(Refusal::Busy { limit: 2 })
        ));
        // Another model of the key has its own count with per_model.
        assert!(l.admit("k", "other", c).is_ok());
        drop(first);
        let Ok(third) = l.admit("k", "m", c) else {
            panic!("not released");
        };
        assert_eq!(third.in_flight, 2);
        drop((second, third));
        assert!(l.in_flight.lock().unwrap().is_empty());
    }

    #[test]
    fn busy_charges_nothing() {
        let mut l = Limiter::new(Limits {
            rpm: Some(10),
            max_concurrent: Some(1),
            ..Default::default()
        });
        let c = Charge::default();
        let held = l.admit("k", "m", c);
        assert!(held.is_ok());
        assert!(matches!(
            l.admit("k", "m", c),
            Err(Refusal::Busy { limit: 1 })
        ));
        let requests = l.buckets("k", "m").unwrap().requests.as_ref().unwrap();
        assert_eq!(requests.remaining(), 9);
    }
}
