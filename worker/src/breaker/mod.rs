//! The circuit breaker per (provider, key), shared by the fleet in Redis: a provider that
//! keeps failing stops receiving calls for a while (jobs take their fallback route or wait
//! without spending attempts), then a few probes decide whether it is back.
//! The script (`llmq_breaker_v2.lua`) holds the state machine; this file calls it.
//! A half-open probe is a [`Permit`] that must come back: recorded with the call's
//! outcome, or released when the job leaves without calling (dropped permits release
//! themselves); the script also leases probes, so a crashed holder's probe lapses.
//! Redis unreachable: calls are allowed (the budget, not the breaker, is what must fail
//! closed).

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use serde::Deserialize;
use tracing::warn;

use crate::outcome::ErrorClass;
use crate::settings::Settings;

const BREAKER_SCRIPT: &str = include_str!("llmq_breaker_v2.lua");

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
    /// A probe not given back within this long (its holder crashed) stops counting.
    #[serde(default = "default_probe_lease_secs")]
    pub probe_lease_secs: u64,
}

fn default_probe_lease_secs() -> u64 {
    60
}

/// What a call outcome means to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The provider answered.
    Success,
    /// Counts toward opening (upstream, network, timeout).
    Failure,
    /// Opens at once (quota exhausted, auth: the key cannot serve anyone).
    Fatal,
    /// Says nothing about the provider's health (rate limit, bad request).
    Neutral,
}

impl Signal {
    /// The signal of a failed call's class.
    pub fn of(class: ErrorClass) -> Self {
        match class {
            ErrorClass::Upstream | ErrorClass::Network | ErrorClass::Timeout => Signal::Failure,
            ErrorClass::QuotaExhausted | ErrorClass::Auth => Signal::Fatal,
            // A 403 is about one model or one request (a model the key may not use), not
            // the provider's health: it must not close the provider to every tenant.
            ErrorClass::Permission
            | ErrorClass::RateLimited
            | ErrorClass::BadRequest
            | ErrorClass::RequestTooLarge => Signal::Neutral,
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

/// The answer of [`Breaker::check`].
#[derive(Debug)]
pub enum Permit {
    /// Call now. A half-open probe comes with a lease that goes back when the permit is
    /// recorded ([`Breaker::record`]) or dropped.
    Call(Option<ProbeLease>),
    /// The circuit is open for this much longer.
    Open(Duration),
}

impl Permit {
    /// How long the circuit stays open, or `None` when the call may go ahead.
    pub fn open_for(&self) -> Option<Duration> {
        match self {
            Permit::Call(_) => None,
            Permit::Open(d) => Some(*d),
        }
    }
}

/// A half-open probe held by one job; given back to the fleet when dropped unrecorded.
#[derive(Debug)]
pub struct ProbeLease {
    breaker: Arc<Breaker>,
    provider: String,
    round: i64,
    armed: bool,
}

impl Drop for ProbeLease {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (breaker, provider) = (self.breaker.clone(), std::mem::take(&mut self.provider));
        let round = self.round.to_string();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = breaker
                    .eval::<Vec<String>>(&provider, "release", Some(&round))
                    .await
                {
                    warn!(error = %e, provider, "could not give back a circuit probe; its lease lapses");
                }
            });
        }
    }
}

/// The fleet's breakers.
#[derive(Debug)]
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

    pub(crate) async fn eval<T: redis::FromRedisValue>(
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
            .arg(s.consecutive_failures)
            .arg(s.probe_lease_secs.max(1) * 1000);
        if let Some(o) = outcome {
            inv.arg(o);
        }
        Ok(tokio::time::timeout(Duration::from_millis(500), inv.invoke_async(&mut conn)).await??)
    }

    /// Whether `provider` may be called now; while half-open, the permit holds a probe.
    pub async fn check(self: &Arc<Self>, provider: &str) -> Permit {
        match self
            .eval::<(i64, i64, String, i64)>(provider, "allow", None)
            .await
        {
            Ok((1, _, _, round)) => Permit::Call((round > 0).then(|| ProbeLease {
                breaker: self.clone(),
                provider: provider.to_owned(),
                round,
                armed: true,
            })),
            Ok((_, ms, _, _)) => Permit::Open(Duration::from_millis(ms.max(0).unsigned_abs())),
            Err(e) => {
                warn!(error = %e, provider, "circuit breaker unreachable; allowing the call");
                Permit::Call(None)
            }
        }
    }

    /// Records the outcome of a call made under `permit` (its probe, if any, is spent).
    pub async fn record_call(
        &self,
        permit: Permit,
        provider: &str,
        signal: Signal,
    ) -> Option<String> {
        if let Permit::Call(Some(mut lease)) = permit {
            lease.armed = false;
        }
        self.record(provider, signal).await
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
