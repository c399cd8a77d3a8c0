//! The circuit breaker per (provider, key), shared by the fleet in Redis: a provider that
//! keeps failing stops receiving calls for a while (jobs take their fallback route or wait
//! without spending attempts), then a few probes decide whether it is back.
//! The script (`llmq_breaker_v1.lua`) holds the state machine; this file calls it.
//! Redis unreachable: calls are allowed (the budget, not the breaker, is what must fail
//! closed).

use std::time::Duration;

use secrecy::ExposeSecret;
use serde::Deserialize;
use tracing::warn;

use crate::outcome::ErrorClass;
use crate::settings::Settings;

const BREAKER_SCRIPT: &str = include_str!("llmq_breaker_v1.lua");

/// Breaker thresholds.
#[derive(Debug, Clone, Deserialize)]
pub struct BreakerSettings {
    /// Failure-rate window.
    pub window_secs: u64,
    /// Calls in the window before the rate counts.
    pub min_calls: u32,
    /// Failure ratio that opens the circuit.
    pub failure_ratio: f64,
    /// Failures in a row that open it whatever the ratio.
    pub consecutive_failures: u32,
    /// How long it stays open after failures.
    pub cooldown_secs: u64,
    /// How long it stays open after quota exhaustion or an auth failure.
    pub fatal_cooldown_secs: u64,
    /// Calls let through while half-open.
    pub half_open_probes: u32,
    /// Successful probes that close it.
    pub close_after: u32,
}

/// What a call outcome means to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The provider answered.
    Success,
    /// Counts toward opening (upstream, network, timeout).
    Failure,
    /// Opens at once (quota exhausted, auth, permission).
    Fatal,
    /// Says nothing about the provider's health (rate limit, bad request).
    Neutral,
}

impl Signal {
    /// The signal of a failed call's class.
    pub fn of(class: ErrorClass) -> Self {
        match class {
            ErrorClass::Upstream | ErrorClass::Network | ErrorClass::Timeout => Signal::Failure,
            ErrorClass::QuotaExhausted | ErrorClass::Auth | ErrorClass::Permission => Signal::Fatal,
            ErrorClass::RateLimited | ErrorClass::BadRequest | ErrorClass::RequestTooLarge => {
                Signal::Neutral
            }
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Signal::Success => "success",
            Signal::Failure => "failure",
            Signal::Fatal => "fatal",
            Signal::Neutral => "neutral",
        }
    }
}

/// A circuit's state as operators read it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CircuitState {
    /// Provider name.
    pub provider: String,
    /// `closed`, `open`, `half_open` or `unknown` (Redis unreachable).
    pub state: String,
    /// While open: milliseconds until probes are let through.
    pub open_ms_left: u64,
}

/// The fleet's breakers.
pub struct Breaker {
    pool: deadpool_redis::Pool,
    script: redis::Script,
    namespace: String,
    settings: BreakerSettings,
}

impl Breaker {
    /// Breakers in the Redis of `settings` (connects lazily).
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let pool = deadpool_redis::Config::from_url(settings.redis_url.expose_secret())
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .map_err(|e| anyhow::anyhow!("redis_url is not usable: {e}"))?;
        Ok(Self {
            pool,
            script: redis::Script::new(BREAKER_SCRIPT),
            namespace: settings.admission.namespace.clone(),
            settings: settings.breaker.clone(),
        })
    }

    fn key(&self, provider: &str) -> String {
        format!("{{{}:cb:{provider}}}", self.namespace)
    }

    async fn eval<T: redis::FromRedisValue>(
        &self,
        provider: &str,
        op: &str,
        outcome: Option<&str>,
    ) -> anyhow::Result<T> {
        let s = &self.settings;
        let mut conn = tokio::time::timeout(Duration::from_millis(500), self.pool.get()).await??;
        let mut inv = self.script.prepare_invoke();
        inv.key(self.key(provider))
            .arg(op)
            .arg(s.window_secs * 1000)
            .arg(s.min_calls)
            .arg(s.failure_ratio)
            .arg(s.cooldown_secs * 1000)
            .arg(s.fatal_cooldown_secs * 1000)
            .arg(s.half_open_probes)
            .arg(s.close_after)
            .arg(s.consecutive_failures);
        if let Some(o) = outcome {
            inv.arg(o);
        }
        Ok(tokio::time::timeout(Duration::from_millis(500), inv.invoke_async(&mut conn)).await??)
    }

    /// `None` to call `provider` now; `Some(d)` when its circuit is open for `d` more.
    pub async fn check(&self, provider: &str) -> Option<Duration> {
        match self
            .eval::<(i64, i64, String)>(provider, "allow", None)
            .await
        {
            Ok((1, _, _)) => None,
            Ok((_, ms, _)) => Some(Duration::from_millis(ms.max(0).unsigned_abs())),
            Err(e) => {
                warn!(error = %e, provider, "circuit breaker unreachable; allowing the call");
                None
            }
        }
    }

    /// Records a call's outcome; returns the circuit's state after it, when known.
    pub async fn record(&self, provider: &str, signal: Signal) -> Option<String> {
        match self
            .eval::<Vec<String>>(provider, "record", Some(signal.as_str()))
            .await
        {
            Ok(state) => {
                let state = state.into_iter().next();
                if signal != Signal::Success && state.as_deref() == Some("open") {
                    warn!(
                        provider,
                        signal = signal.as_str(),
                        "circuit open: no calls to this provider until it cools down"
                    );
                }
                state
            }
            Err(e) => {
                warn!(error = %e, provider, "could not record the call in the circuit breaker");
                None
            }
        }
    }

    /// The state of `provider`'s circuit.
    pub async fn state(&self, provider: &str) -> CircuitState {
        let (state, open_ms_left) = match self.eval::<(String, i64)>(provider, "state", None).await
        {
            Ok((s, ms)) => (s, ms.max(0).unsigned_abs()),
            Err(_) => ("unknown".to_owned(), 0),
        };
        CircuitState {
            provider: provider.to_owned(),
            state,
            open_ms_left,
        }
    }
}
