//! Admission: the fleet's shared budget of requests and tokens per minute.
//!
//! Flow for one job: [`Admission::scope`] finds the limits of its (provider, model);
//! [`Scope::demand`] turns the request into amounts per dimension (1 request, estimated
//! tokens); [`Admission::acquire`] reserves them all at once in Redis and answers "go in
//! Δ" (FIFO slots, never a busy poll); the worker waits Δ, checks that no fleet pause
//! began meanwhile, calls the provider, then [`Admission::settle`]s against `usage`
//! (idempotent; provider `x-ratelimit-remaining-*` only tighten). A rate-limit 429 pauses
//! the whole fleet for that scope ([`Admission::pause`]).
//!
//! Redis unreachable: each replica falls back to a local limiter holding its share of the
//! limit (never fails open) and returns to Redis as soon as it answers.

mod estimate;
mod local;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use llmq_producer_sdk::{JobId, Usage};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use estimate::prompt_tokens;

use crate::settings::{AdmissionMode, ProviderKind, ProviderSettings, Settings};

/// The script (see the file for its calling convention and results).
const GCRA_SCRIPT: &str = include_str!("llmq_gcra_v1.lua");

/// One dimension of a limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Dim {
    /// `requests`, `tokens`, `input_tokens` or `output_tokens`.
    pub name: &'static str,
    /// Units per minute, after the safety margin.
    pub per_minute: f64,
    /// Units the bucket holds.
    pub burst: f64,
}

/// The limits of one (provider account, model).
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    /// Redis hash key, hash-tagged so every key of the scope is in one slot.
    pub key: String,
    /// `provider/model`, for logs and metrics.
    pub label: String,
    /// Its dimensions.
    pub dims: Vec<Dim>,
    /// Whether unused reserved tokens are given back at settle.
    pub refund_unused: bool,
}

impl Scope {
    /// Amounts to reserve for a call with `prompt` estimated tokens and `max_tokens`.
    pub fn demand(&self, prompt: u64, max_tokens: u64) -> Vec<u64> {
        self.dims
            .iter()
            .map(|d| match d.name {
                "requests" => 1,
                "tokens" => prompt + max_tokens,
                "input_tokens" => prompt,
                _ => max_tokens,
            })
            .collect()
    }

    /// What a finished call actually used, per dimension.
    /// Each is held to what the bucket holds: a provider's absurd `usage` (say 10^15
    /// tokens) must not push the fleet's budget years ahead.
    pub fn actual(&self, usage: &Usage) -> Vec<u64> {
        self.dims
            .iter()
            .map(|d| {
                let used = match d.name {
                    "requests" => 1,
                    "tokens" => usage.prompt_tokens.saturating_add(usage.completion_tokens),
                    "input_tokens" => usage.prompt_tokens,
                    _ => usage.completion_tokens,
                };
                used.min(d.burst.ceil().max(1.0) as u64)
            })
            .collect()
    }
}

/// A reservation to settle after the call.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// The scope charged.
    pub scope: Arc<Scope>,
    /// Amounts reserved, per dimension.
    pub amounts: Vec<u64>,
    /// Charged in Redis (false: the local limiter, nothing to settle).
    pub global: bool,
}

/// The answer to [`Admission::acquire`].
#[derive(Debug)]
pub enum Admit {
    /// Reserved: start in `wait`.
    Go {
        /// Time until the slot starts.
        wait: Duration,
        /// What was charged.
        reservation: Reservation,
    },
    /// The demand exceeds what the limit can ever hold: no retry will help.
    TooLarge {
        /// Dimension.
        dim: &'static str,
        /// Asked.
        amount: u64,
        /// What the bucket holds.
        capacity: u64,
    },
    /// The slot is further away than `admission.max_wait_secs`; nothing charged.
    TooBusy {
        /// How far the slot was.
        wait: Duration,
    },
}

/// The admission controller of one replica.
pub struct Admission {
    mode: AdmissionMode,
    namespace: String,
    margin: f64,
    max_wait: Duration,
    timeout: Duration,
    pool: Option<deadpool_redis::Pool>,
    script: redis::Script,
    providers: RwLock<BTreeMap<String, ProviderSettings>>,
    local: Mutex<HashMap<String, Arc<local::LocalScope>>>,
    replicas: AtomicU32,
    redis_down: AtomicBool,
    instance: String,
}

#[derive(Debug, thiserror::Error)]
enum RedisError {
    #[error("Redis did not answer within the timeout")]
    Timeout,
    #[error("{0}")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
}

impl Admission {
    /// Builds the controller; connects to Redis lazily.
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let a = &settings.admission;
        let pool = match a.mode {
            AdmissionMode::Global => {
                let mut cfg = deadpool_redis::Config::from_url(settings.redis_url.expose_secret());
                cfg.pool = Some(deadpool_redis::PoolConfig::new(
                    usize::from(settings.worker.concurrency).max(4),
                ));
                Some(
                    cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))
                        .map_err(|e| anyhow::anyhow!("redis_url is not usable: {e}"))?,
                )
            }
            AdmissionMode::Local => None,
        };
        Ok(Self {
            mode: a.mode,
            namespace: a.namespace.clone(),
            margin: a.safety_margin,
            max_wait: Duration::from_secs(a.max_wait_secs),
            timeout: Duration::from_millis(a.redis_timeout_ms),
            pool,
            script: redis::Script::new(GCRA_SCRIPT),
            providers: RwLock::new(settings.providers.clone()),
            local: Mutex::new(HashMap::new()),
            replicas: AtomicU32::new(a.assumed_replicas),
            redis_down: AtomicBool::new(false),
            instance: uuid::Uuid::now_v7().to_string(),
        })
    }

    /// Takes new limits (e.g. after SIGHUP) without a restart.
    pub fn reload(&self, settings: &Settings) {
        if let Ok(mut p) = self.providers.write() {
            *p = settings.providers.clone();
        }
        if let Ok(mut l) = self.local.lock() {
            l.clear();
        }
        info!("rate limits reloaded");
    }

    /// The limits of `model` on `provider`; `None` when none are configured.
    pub fn scope(&self, provider: &str, model: &str) -> Option<Arc<Scope>> {
        let providers = self.providers.read().ok()?;
        let p = providers.get(provider)?;
        let l = p.limits_for(model)?;
        let keep = 1.0 - self.margin;
        let mut dims = Vec::new();
        let mut push = |name: &'static str, v: Option<u64>, burst_secs: f64| {
            if let Some(v) = v {
                let per_minute = v as f64 * keep;
                dims.push(Dim {
                    name,
                    per_minute,
                    burst: (per_minute * burst_secs / 60.0).max(1.0),
                });
            }
        };
        push("requests", l.rpm, l.request_burst_secs);
        match p.kind {
            ProviderKind::Openai => push("tokens", l.tpm, l.token_burst_secs),
            ProviderKind::Anthropic => {
                push("input_tokens", l.input_tpm, l.token_burst_secs);
                push("output_tokens", l.output_tpm, l.token_burst_secs);
            }
        }
        if dims.is_empty() {
            return None;
        }
        Some(Arc::new(Scope {
            key: format!("{{{}:rl:{provider}:{model}}}", self.namespace),
            label: format!("{provider}/{model}"),
            dims,
            refund_unused: p.refund_unused,
        }))
    }

    /// Reserves `amounts` of `scope` for one call.
    pub async fn acquire(&self, scope: &Arc<Scope>, amounts: Vec<u64>) -> Admit {
        if self.pool.is_some() {
            let max_wait = self.max_wait.as_millis().to_string();
            match self
                .eval(scope, "acquire", &amounts, &[max_wait], None)
                .await
            {
                Ok(r) => {
                    self.redis_up();
                    let wait =
                        Duration::from_millis(r.get(1).copied().unwrap_or(0).max(0).unsigned_abs());
                    return match r.first().copied().unwrap_or(-1) {
                        0 => Admit::Go {
                            wait,
                            reservation: Reservation {
                                scope: scope.clone(),
                                amounts,
                                global: true,
                            },
                        },
                        1 => {
                            let i =
                                usize::try_from(r.get(1).copied().unwrap_or(1) - 1).unwrap_or(0);
                            self.too_large(scope, &amounts, i)
                        }
                        _ => Admit::TooBusy { wait },
                    };
                }
                Err(e) => self.redis_failed(&e),
            }
        }
        let local = self.local_scope(scope);
        match local.acquire(&amounts).await {
            Ok(()) => Admit::Go {
                wait: Duration::ZERO,
                reservation: Reservation {
                    scope: scope.clone(),
                    amounts,
                    global: false,
                },
            },
            Err(i) => self.too_large(scope, &amounts, i),
        }
    }

    fn too_large(&self, scope: &Scope, amounts: &[u64], i: usize) -> Admit {
        let dim = scope.dims.get(i).map_or("tokens", |d| d.name);
        let capacity = scope.dims.get(i).map_or(0, |d| d.burst.floor() as u64);
        Admit::TooLarge {
            dim,
            amount: amounts.get(i).copied().unwrap_or(0),
            capacity,
        }
    }

    /// How long until a job asking `amounts` would start if `ahead` jobs like it went
    /// first (the queue ETA; nothing is charged). `None` when Redis cannot say.
    pub async fn estimate_start(
        &self,
        scope: &Arc<Scope>,
        amounts: &[u64],
        ahead: u64,
    ) -> Option<Duration> {
        self.pool.as_ref()?;
        match self
            .eval(scope, "peek", amounts, &[ahead.to_string()], None)
            .await
        {
            Ok(r) => Some(Duration::from_millis(
                r.first().copied().unwrap_or(0).max(0).unsigned_abs(),
            )),
            Err(_) => None,
        }
    }

    /// Time left of a fleet pause of `scope` (checked after waiting for a slot).
    pub async fn pause_left(&self, scope: &Arc<Scope>) -> Duration {
        if self.pool.is_some() {
            match self.eval(scope, "check", &[], &[], None).await {
                Ok(r) => {
                    self.redis_up();
                    return Duration::from_millis(
                        r.first().copied().unwrap_or(0).max(0).unsigned_abs(),
                    );
                }
                Err(e) => self.redis_failed(&e),
            }
        }
        self.local_scope(scope).pause_left()
    }

    /// Gives a reservation back whole: the job leaves without calling the provider.
    pub async fn give_back(&self, job: JobId, r: &Reservation) {
        self.settle(job, 0, r, &vec![0; r.amounts.len()], &[]).await;
    }

    /// Settles a reservation against what the call used (`actual`, per dimension; all
    /// zeros when the call never reached the provider) and the provider's remaining
    /// counts. Idempotent per job and attempt.
    pub async fn settle(
        &self,
        job: JobId,
        attempt: u32,
        r: &Reservation,
        actual: &[u64],
        remaining: &[Option<u64>],
    ) {
        if !r.global || self.pool.is_none() {
            return;
        }
        let never_called = actual.iter().all(|a| *a == 0);
        let refund = if r.scope.refund_unused || never_called {
            "1"
        } else {
            "0"
        };
        let mut extra = vec![refund.to_owned()];
        extra.extend(actual.iter().map(u64::to_string));
        extra.extend((0..r.scope.dims.len()).map(|i| {
            remaining
                .get(i)
                .copied()
                .flatten()
                .map_or("-1".to_owned(), |v| v.to_string())
        }));
        let marker = format!("{}:settled:{job}:{attempt}", r.scope.key);
        if let Err(e) = self
            .eval(&r.scope, "settle", &r.amounts, &extra, Some(marker))
            .await
        {
            self.redis_failed(&e);
        }
    }

    /// Pauses every replica's use of `scope` for `d` (a provider rate-limit 429). A
    /// shorter pause never shortens a longer one; buckets restart empty at its end.
    pub async fn pause(&self, scope: &Arc<Scope>, d: Duration) {
        warn!(scope = %scope.label, pause_ms = d.as_millis() as u64, "provider rate limit: pausing the fleet for this limit");
        self.local_scope(scope).pause(d);
        if self.pool.is_some() {
            let zeros = vec![0; scope.dims.len()];
            if let Err(e) = self
                .eval(scope, "pause", &zeros, &[d.as_millis().to_string()], None)
                .await
            {
                self.redis_failed(&e);
            }
        }
    }

    fn local_scope(&self, scope: &Scope) -> Arc<local::LocalScope> {
        let share = match self.mode {
            AdmissionMode::Local => 1.0,
            AdmissionMode::Global => 1.0 / f64::from(self.replicas.load(Ordering::Relaxed).max(1)),
        };
        let mut map = match self.local.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(scope.key.clone())
            .or_insert_with(|| Arc::new(local::LocalScope::new(scope, share)))
            .clone()
    }

    fn redis_up(&self) {
        if self.redis_down.swap(false, Ordering::Relaxed) {
            info!("Redis answers again: back on the shared budget");
            if let Ok(mut l) = self.local.lock() {
                l.clear();
            }
        }
    }

    fn redis_failed(&self, e: &RedisError) {
        if !self.redis_down.swap(true, Ordering::Relaxed) {
            warn!(
                error = %e,
                replicas = self.replicas.load(Ordering::Relaxed),
                "Redis unreachable: admitting with this replica's share of each limit until it returns"
            );
        }
    }

    async fn eval(
        &self,
        scope: &Scope,
        op: &str,
        amounts: &[u64],
        extra: &[String],
        marker: Option<String>,
    ) -> Result<Vec<i64>, RedisError> {
        let Some(pool) = &self.pool else {
            return Err(RedisError::Timeout);
        };
        let mut conn = tokio::time::timeout(self.timeout, pool.get())
            .await
            .map_err(|_| RedisError::Timeout)??;
        let mut inv = self.script.prepare_invoke();
        inv.key(&scope.key);
        inv.key(marker.unwrap_or_else(|| format!("{}:-", scope.key)));
        inv.arg(op)
            .arg(if op == "check" { 0 } else { scope.dims.len() });
        if op != "check" {
            for (d, a) in scope.dims.iter().zip(amounts) {
                inv.arg(d.name).arg(d.per_minute).arg(d.burst).arg(*a);
            }
        }
        for e in extra {
            inv.arg(e);
        }
        let r: Vec<i64> = tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn))
            .await
            .map_err(|_| RedisError::Timeout)??;
        Ok(r)
    }

    /// Keeps this replica's heartbeat in Redis and learns how many replicas are live (the
    /// local fallback's share), every 5 s until `stop`.
    pub async fn heartbeat(self: Arc<Self>, stop: CancellationToken) {
        let Some(pool) = self.pool.clone() else {
            return;
        };
        let key = format!("{}:replicas", self.namespace);
        loop {
            let beat = async {
                let mut conn = pool.get().await.ok()?;
                let now = chrono::Utc::now().timestamp_millis();
                let (_, _, n): (i64, i64, u32) = redis::pipe()
                    .cmd("ZADD")
                    .arg(&key)
                    .arg(now)
                    .arg(&self.instance)
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now - 15_000)
                    .cmd("ZCARD")
                    .arg(&key)
                    .query_async(&mut *conn)
                    .await
                    .ok()?;
                Some(n)
            };
            if let Ok(Some(n)) = tokio::time::timeout(Duration::from_secs(2), beat).await {
                let old = self.replicas.swap(n.max(1), Ordering::Relaxed);
                if old != n.max(1) {
                    if let Ok(mut l) = self.local.lock() {
                        l.clear();
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
        if let Ok(mut conn) = pool.get().await {
            let _: Result<i64, _> = redis::cmd("ZREM")
                .arg(&key)
                .arg(&self.instance)
                .query_async(&mut *conn)
                .await;
        }
    }
}
