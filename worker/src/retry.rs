//! Backoff: full jitter over `min(cap, base · 2^attempt)`, unless the provider said when.

use std::time::Duration;

use rand::Rng;

/// The delay before attempt `attempt + 1`, given the provider's Retry-After (re-read on
/// every attempt) or, without it, full jitter.
pub fn delay(
    attempt: u32,
    retry_after: Option<Duration>,
    base: Duration,
    cap: Duration,
) -> Duration {
    if let Some(d) = retry_after {
        return d;
    }
    let exp = base.saturating_mul(2u32.saturating_pow(attempt.min(20)));
    let ceiling = exp.min(cap);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_delay_wins_and_jitter_stays_under_cap() {
        let base = Duration::from_millis(500);
        let cap = Duration::from_secs(10);
        assert_eq!(
            delay(3, Some(Duration::from_secs(7)), base, cap),
            Duration::from_secs(7)
        );
        for attempt in 0..30 {
            let d = delay(attempt, None, base, cap);
            assert!(d <= cap.min(base * 2u32.pow(attempt.min(20))));
        }
    }
}
