//! The local limiter: what a replica uses when Redis cannot be reached (holding its share
//! of each limit, so the fleet together stays under it) or in `local` mode. It starts
//! empty, like the shared buckets, and never lets a job through unmetered.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::Scope;

/// One scope's limiters, one per dimension.
pub struct LocalScope {
    limiters: Vec<(DefaultDirectRateLimiter, u32)>,
    pause_until: Mutex<Option<Instant>>,
    start_after: Mutex<Option<Instant>>,
}

impl LocalScope {
    /// Limiters holding `share` (0..=1) of each of `scope`'s dimensions.
    pub fn new(scope: &Scope, share: f64) -> Self {
        let limiters = scope
            .dims
            .iter()
            .map(|d| {
                let per_minute = (d.per_minute * share).max(1e-3);
                let period = Duration::from_secs_f64(60.0 / per_minute);
                let burst = (d.burst * share).floor().clamp(1.0, f64::from(u32::MAX)) as u32;
                let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
                let quota = Quota::with_period(period)
                    .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
                    .allow_burst(burst);
                let limiter = RateLimiter::direct(quota);
                // Start empty: take the whole burst now.
                let _ = limiter.check_n(burst);
                (limiter, burst.get())
            })
            .collect();
        Self {
            limiters,
            pause_until: Mutex::new(None),
            start_after: Mutex::new(None),
        }
    }

    /// Waits until every dimension has room and takes it. `Err(i)` when dimension `i`
    /// could never hold the amount.
    pub async fn acquire(&self, amounts: &[u64]) -> Result<(), usize> {
        for ((_, cap), (i, amount)) in self.limiters.iter().zip(amounts.iter().enumerate()) {
            if *amount > u64::from(*cap) {
                return Err(i);
            }
        }
        let until = self.pause_until.lock().ok().and_then(|p| *p);
        let after = self.start_after.lock().ok().and_then(|p| *p);
        if let Some(until) = until.max(after) {
            tokio::time::sleep_until(until.into()).await;
        }
        for ((limiter, _), amount) in self.limiters.iter().zip(amounts) {
            let Some(n) = NonZeroU32::new(u32::try_from(*amount).unwrap_or(u32::MAX)) else {
                continue;
            };
            if limiter.until_n_ready(n).await.is_err() {
                return Err(0);
            }
        }
        Ok(())
    }

    /// Pauses this replica's use of the scope until `d` from now (never shortened).
    pub fn pause(&self, d: Duration) {
        if let Ok(mut p) = self.pause_until.lock() {
            let until = Instant::now() + d;
            if p.is_none_or(|old| old < until) {
                *p = Some(until);
            }
        }
    }

    /// Admits nothing before `d` from now (slots the shared budget already promised
    /// are sent first); unlike a pause, slots already held are not void.
    pub fn start_after(&self, d: Duration) {
        if let Ok(mut p) = self.start_after.lock() {
            *p = Some(Instant::now() + d);
        }
    }

    /// Time left of the pause.
    pub fn pause_left(&self) -> Duration {
        self.pause_until
            .lock()
            .ok()
            .and_then(|p| *p)
            .map_or(Duration::ZERO, |u| {
                u.saturating_duration_since(Instant::now())
            })
    }
}
