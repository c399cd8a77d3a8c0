//! Admission: the fleet's shared budget of requests and tokens per minute.
//!
//! Flow for one job: [`Admission::scope`] finds the limits a call to (provider, model) is
//! charged against (the model's, the key's, or both); [`Scope::demand`] turns the request
//! into amounts per dimension (1 request, estimated tokens); [`Admission::acquire`]
//! reserves them all at once in Redis and answers "go in Δ" (FIFO slots, never a busy
//! poll); the worker waits Δ, checks that no fleet pause began meanwhile, calls the
//! provider, then [`Admission::settle`]s against `usage` (idempotent) and the provider's
//! `x-ratelimit-remaining-*` headers, which set a budget whose state was unknown and keep
//! it on the provider's own count. A rate-limit 429 pauses the fleet for that scope and
//! drains only the dimension the provider named ([`Admission::pause`]).
//!
//! Redis unreachable: each replica falls back to a local limiter holding its share of the
//! limit (never fails open), returns to Redis as soon as it answers, and charges what it
//! admitted meanwhile to the shared budget.

mod estimate;
mod local;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use llmq_producer_sdk::Usage;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use estimate::prompt_tokens;

use crate::settings::{AdmissionMode, LimitScope, ProviderSettings, RateLimitSettings, Settings};

/// The budget script (see the file for its calling convention and results).
const BUDGET_SCRIPT: &str = include_str!("llmq_budget_v3.lua");
/// The concurrency-lease script.
const LEASES_SCRIPT: &str = include_str!("llmq_leases_v1.lua");

/// Calls admitted up to this long before one may still reach the provider after it (so
/// its header did not count them): a header's count is taken less this much of the rate.
const UNSEEN_SLACK: Duration = Duration::from_millis(250);

/// How long the fleet's queue seen at an acquire is taken to still hold.
const PROMISES_KEPT: Duration = Duration::from_secs(60);

/// How much later than others a call may reach the provider after its slot: it leaves
/// late (the claim's write, a busy replica; see `llmq_budget_send_lateness_seconds`) or
/// takes longer on the way (a new connection). A bucket of a short window keeps this
/// much of its rate in hand; it costs one such share once per burst, not a rate.
const SEND_JITTER: Duration = Duration::from_millis(200);

/// How long the calls after a budget's first call (its probe) wait for the probe's answer
/// to set the bucket before they go on from the bucket assumed empty.
const PROBE: Duration = Duration::from_secs(2);

/// How long a lease on a concurrency slot lasts unless renewed; a running call renews
/// it every third of this, so a replica that dies frees its slots within this.
const LEASE: Duration = Duration::from_secs(30);

/// What a dimension counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DimKind {
    /// Requests.
    Requests,
    /// Prompt plus output tokens.
    Tokens,
    /// Prompt tokens.
    InputTokens,
    /// Output tokens.
    OutputTokens,
}

impl DimKind {
    /// Its name in Redis, metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            DimKind::Requests => "requests",
            DimKind::Tokens => "tokens",
            DimKind::InputTokens => "input_tokens",
            DimKind::OutputTokens => "output_tokens",
        }
    }

    fn of(self, requests: u64, prompt: u64, output: u64) -> u64 {
        match self {
            DimKind::Requests => requests,
            DimKind::Tokens => prompt.saturating_add(output),
            DimKind::InputTokens => prompt,
            DimKind::OutputTokens => output,
        }
    }
}

/// One dimension of a limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Dim {
    /// What it counts.
    pub kind: DimKind,
    /// Index into [`Scope::hashes`]: the budget (model's or key's) it belongs to.
    pub hash: usize,
    /// Units per minute, after the safety margin.
    pub per_minute: f64,
    /// Units the bucket holds.
    pub burst: f64,
    /// Seconds' worth the bucket holds (60: the minute providers' headers count).
    pub window_secs: f64,
    /// The provider's headers may set this bucket (`admission.learn_from_headers`).
    pub learn: bool,
}

impl Dim {
    /// `requests`, `tokens`, `input_tokens` or `output_tokens`.
    pub fn name(&self) -> &'static str {
        self.kind.as_str()
    }
}

/// The limits one call is charged against: its model's, its key's, or both.
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    /// The hash tag every key of the scope shares (one Redis Cluster slot), e.g.
    /// `{llmq:rl:openai}`; settle markers hang off it.
    pub key: String,
    /// The Redis hashes of its budgets, e.g. `{llmq:rl:openai}:model:gpt-4o`.
    pub hashes: Vec<String>,
    /// `provider/model`, for logs and metrics.
    pub label: String,
    /// Its dimensions.
    pub dims: Vec<Dim>,
    /// Whether unused reserved tokens are given back at settle.
    pub refund_unused: bool,
    /// Caps on calls in flight: (index into `hashes`, cap).
    pub concurrency: Vec<(usize, u64)>,
}

impl Scope {
    /// Amounts to reserve for a call with `prompt` estimated tokens and `max_tokens`.
    pub fn demand(&self, prompt: u64, max_tokens: u64) -> Vec<u64> {
        self.dims
            .iter()
            .map(|d| d.kind.of(1, prompt, max_tokens))
            .collect()
    }

    /// What a finished call actually used, per dimension.
    /// Each is held to what the bucket holds: a provider's absurd `usage` (say 10^15
    /// tokens) must not push the fleet's budget years ahead.
    pub fn actual(&self, usage: &Usage) -> Vec<u64> {
        self.dims
            .iter()
            .map(|d| {
                d.kind
                    .of(1, usage.prompt_tokens, usage.completion_tokens)
                    .min(d.burst.ceil().max(1.0) as u64)
            })
            .collect()
    }

    /// What the provider's headers say is left, per dimension, in the units of each
    /// bucket. Providers count the minute. For a bucket of a shorter window (requests
    /// paced per second), the provider's own short bucket sees the same calls and refills
    /// at the same rate as its minute, so it holds at least its size less the minute's
    /// shortfall (`left - (limit - size)`); that needs the header's limit, and without it
    /// such a bucket learns nothing. It only ever tightens such a bucket (another client
    /// on the key), never loosens it.
    pub fn seen(&self, r: &crate::provider::Remaining) -> Vec<Option<u64>> {
        self.dims
            .iter()
            .map(|d| {
                let left = r.for_dim(d.name())?;
                if d.window_secs >= 60.0 {
                    return Some(left);
                }
                let limit = r.limit_for_dim(d.name())?;
                let size = limit as f64 * d.window_secs / 60.0;
                let short = limit.saturating_sub(left) as f64;
                Some((size - short).max(0.0).floor() as u64)
            })
            .collect()
    }

    /// The lease set of budget `i`: beside the budget hashes, never one of them (a
    /// model's name cannot turn a budget hash into a lease set).
    fn lease_key(&self, i: usize) -> String {
        let budget = self.hashes.get(i).map_or("", String::as_str);
        let suffix = budget.strip_prefix(self.key.as_str()).unwrap_or(budget);
        format!("{}:leases{suffix}", self.key)
    }

    /// The Redis hash holding the first dimension called `name`.
    pub fn hash_of(&self, name: &str) -> Option<&str> {
        let d = self.dims.iter().find(|d| d.name() == name)?;
        self.hashes.get(d.hash).map(String::as_str)
    }

    /// Which dimensions a provider 429 says were exceeded, from its error type, message
    /// and remaining-budget headers (OpenAI: `type` "requests"/"tokens", "… per min
    /// (RPM)"; Anthropic: "… input tokens per minute"). All of them when it does not say.
    pub fn exceeded(
        &self,
        error_type: Option<&str>,
        message: &str,
        remaining: &[Option<u64>],
    ) -> Vec<bool> {
        let text = format!("{} {}", error_type.unwrap_or(""), message).to_lowercase();
        if text.contains("concurrent") {
            // A cap on calls in flight, not a rate: no bucket is drained.
            return vec![false; self.dims.len()];
        }
        let named = |kind: DimKind| -> bool {
            // A bucket of a short window reads 0 whenever the minute is a little
            // spent, which says nothing about which limit ran out.
            let zero = self
                .dims
                .iter()
                .zip(remaining)
                .any(|(d, r)| d.kind == kind && d.window_secs >= 60.0 && *r == Some(0));
            zero || match kind {
                DimKind::Requests => {
                    error_type == Some("requests")
                        || text.contains("(rpm)")
                        || text.contains("requests per min")
                }
                DimKind::InputTokens => {
                    text.contains("input tokens per min") || text.contains("(itpm)")
                }
                DimKind::OutputTokens => {
                    text.contains("output tokens per min") || text.contains("(otpm)")
                }
                DimKind::Tokens => {
                    error_type == Some("tokens")
                        || text.contains("(tpm)")
                        || (text.contains("tokens per min")
                            && !text.contains("input tokens per min")
                            && !text.contains("output tokens per min"))
                }
            }
        };
        let marks: Vec<bool> = self.dims.iter().map(|d| named(d.kind)).collect();
        if marks.iter().any(|m| *m) {
            marks
        } else {
            vec![true; self.dims.len()]
        }
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
    /// Per dimension, what a provider header seen for this call cannot have counted.
    pub seq: Vec<Admitted>,
    /// Settled at most once: the settle marker's name.
    pub id: uuid::Uuid,
}

impl Reservation {
    /// The script's arguments for what a header says of dimension `i`: remaining (-1
    /// unknown), gen, seq and paced.
    fn seen_args(&self, i: usize, remaining: &[Option<u64>]) -> [String; 4] {
        let a = self.seq.get(i).copied().unwrap_or(Admitted {
            gen: -1,
            seq: -1,
            paced: Paced::No,
        });
        [
            remaining
                .get(i)
                .copied()
                .flatten()
                .map_or("-1".to_owned(), |v| v.to_string()),
            a.gen.to_string(),
            a.seq.to_string(),
            (a.paced as u8).to_string(),
        ]
    }
}

/// Where a reservation stands in one dimension's count of admissions.
#[derive(Debug, Clone, Copy)]
pub struct Admitted {
    /// When the count began (a restarted Redis begins anew).
    pub gen: i64,
    /// Units admitted up to and including this call.
    pub seq: i64,
    /// Whether the provider's answer to this call may loosen the dimension.
    pub paced: Paced,
}

/// How a call's slot stood against the calls admitted before it, in one dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Paced {
    /// Admitted in a burst, or another call admitted before it got a later slot: the
    /// provider's answer to it may not count calls our count says it has seen, so it
    /// only ever tightens.
    No = 0,
    /// This dimension alone held the call at least a quarter second and no call
    /// admitted before it got a later slot: the answer counts them all but the calls
    /// whose slots fell within that quarter second (allowed for), and may loosen.
    Yes = 1,
    /// Paced, and no call admitted before it has a slot within a quarter second of its
    /// own: the answer counts them all but one that left far behind its slot (the
    /// largest call lately is kept in hand for it, not the quarter second).
    Alone = 2,
}

/// A slot under a scope's concurrency caps, held for one call.
#[derive(Debug)]
pub enum Lease {
    /// The scope has no cap.
    None,
    /// Leased in Redis (lapses if not renewed).
    Global {
        /// The scope whose caps it counts against.
        scope: Arc<Scope>,
        /// The lease's member name.
        member: String,
    },
    /// This replica's share of each cap, while Redis is unreachable.
    Local(Vec<tokio::sync::OwnedSemaphorePermit>),
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
    /// The slot is further away than the wait allowed; nothing charged.
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
    learn: bool,
    max_wait: Duration,
    max_pause: Duration,
    timeout: Duration,
    pool: Option<deadpool_redis::Pool>,
    script: redis::Script,
    leases: redis::Script,
    local_leases: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    providers: RwLock<BTreeMap<String, ProviderSettings>>,
    local: Mutex<HashMap<String, Arc<local::LocalScope>>>,
    replicas: Mutex<Replicas>,
    owed: Mutex<HashMap<String, Owed>>,
    promised: Mutex<HashMap<String, (Instant, Duration)>>,
    redis_down: AtomicBool,
    instance: String,
}

/// How many replicas share the limits, as the local fallback sees it: the most seen live
/// lately. A lower count is believed only after it has held for a minute, so a Redis that
/// restarted (and lost every heartbeat) never makes a replica take the whole limit.
struct Replicas {
    n: u32,
    lower_since: Option<Instant>,
}

/// What the local fallback admitted on a scope while Redis was unreachable, oldest first;
/// calls close together share an entry.
type Owed = (Arc<Scope>, VecDeque<OwedEntry>);

/// Local admissions made between `first` and `last`, with their amounts per dimension.
struct OwedEntry {
    first: Instant,
    last: Instant,
    amounts: Vec<u64>,
}

/// Local admissions this close together are kept as one entry of the owed ledger (or a
/// 600th of the scope's longest window, so a ledger never holds more than 600 entries).
const OWED_GRAIN: Duration = Duration::from_millis(100);

const REPLICAS_LOWER_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
enum RedisError {
    #[error("Redis did not answer within the timeout")]
    Timeout,
    #[error("{0}")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
}

/// One script call: the op, its scope, amounts per dimension and the op's own arguments.
struct Call<'a> {
    op: &'static str,
    scope: &'a Scope,
    amounts: &'a [u64],
    extra: Vec<String>,
    marker: Option<String>,
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
            learn: a.learn_from_headers,
            max_wait: Duration::from_secs(a.max_wait_secs),
            max_pause: Duration::from_secs(a.max_pause_secs),
            timeout: Duration::from_millis(a.redis_timeout_ms),
            pool,
            script: redis::Script::new(BUDGET_SCRIPT),
            leases: redis::Script::new(LEASES_SCRIPT),
            local_leases: Mutex::new(HashMap::new()),
            providers: RwLock::new(settings.providers.clone()),
            local: Mutex::new(HashMap::new()),
            replicas: Mutex::new(Replicas {
                n: a.assumed_replicas,
                lower_since: None,
            }),
            owed: Mutex::new(HashMap::new()),
            promised: Mutex::new(HashMap::new()),
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

    /// The longest wait for a slot a job accepts before it goes back to the queue.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// The limits a call to `model` on `provider` is charged against; `None` when none
    /// are configured. A key-wide limit (`scope = "key"`) applies to every model name,
    /// configured or not, and never opens a budget per name; a model named in
    /// `model_limits` is charged against its own limits as well.
    pub fn scope(&self, provider: &str, model: &str) -> Option<Arc<Scope>> {
        let providers = self.providers.read().ok()?;
        let p = providers.get(provider)?;
        let tag = format!("{{{}:rl:{provider}}}", self.namespace);
        let model_limits = p
            .model_limits
            .iter()
            .find(|m| m.model == model)
            .map(|m| &m.limits);
        let mut budgets: Vec<(String, &RateLimitSettings)> = Vec::new();
        match &p.rate_limit {
            Some(l) if l.scope == LimitScope::Key => {
                budgets.push((format!("{tag}:key"), l));
                if let Some(m) = model_limits {
                    budgets.push((format!("{tag}:model:{model}"), m));
                }
            }
            other => {
                if let Some(l) = model_limits.or(other.as_ref()) {
                    budgets.push((format!("{tag}:model:{model}"), l));
                }
            }
        }
        let keep = 1.0 - self.margin;
        let mut dims = Vec::new();
        let mut hashes = Vec::new();
        let mut concurrency = Vec::new();
        for (hash, l) in budgets {
            let index = hashes.len();
            let before = dims.len();
            for (kind, v, burst_secs) in [
                (DimKind::Requests, l.rpm, l.request_burst_secs),
                (DimKind::Tokens, l.tpm, l.token_burst_secs),
                (DimKind::InputTokens, l.input_tpm, l.token_burst_secs),
                (DimKind::OutputTokens, l.output_tpm, l.token_burst_secs),
            ] {
                if let Some(v) = v {
                    let per_minute = v as f64 * keep;
                    dims.push(Dim {
                        kind,
                        hash: index,
                        per_minute,
                        // Calls leave up to SEND_JITTER after their slot, so a burst
                        // and the calls paced after it can reach the provider that
                        // much closer together: a bucket of a short window keeps that
                        // much in hand (a minute's bucket keeps its full size, the
                        // largest call the provider takes).
                        burst: (per_minute
                            * if burst_secs < 60.0 {
                                (burst_secs - SEND_JITTER.as_secs_f64()).max(0.0)
                            } else {
                                burst_secs
                            }
                            / 60.0)
                            .max(1.0),
                        window_secs: burst_secs,
                        // A short window's count is inferred from the minute's (see
                        // `Scope::seen`): it may tighten that bucket, never set it
                        // (measured: loosening it from paced answers let the fleet
                        // over-admit requests on mixed-size batches).
                        learn: self.learn && burst_secs >= 60.0,
                    });
                }
            }
            if let Some(cap) = l.max_concurrent {
                concurrency.push((index, cap));
            }
            if dims.len() > before || l.max_concurrent.is_some() {
                hashes.push(hash);
            }
        }
        if dims.is_empty() && concurrency.is_empty() {
            return None;
        }
        Some(Arc::new(Scope {
            key: tag,
            hashes,
            label: format!("{provider}/{model}"),
            dims,
            refund_unused: p.refund_unused,
            concurrency,
        }))
    }

    /// Reserves `amounts` of `scope` for one call whose slot may be up to
    /// `admission.max_wait_secs` away.
    pub async fn acquire(&self, scope: &Arc<Scope>, amounts: Vec<u64>) -> Admit {
        self.acquire_within(scope, amounts, self.max_wait).await
    }

    /// Reserves `amounts` of `scope` for one call whose slot may be up to `max_wait` away.
    pub async fn acquire_within(
        &self,
        scope: &Arc<Scope>,
        amounts: Vec<u64>,
        max_wait: Duration,
    ) -> Admit {
        let asked = Instant::now();
        loop {
            if self.pool.is_some() {
                let call = Call {
                    op: "acquire",
                    scope,
                    amounts: &amounts,
                    extra: vec![
                        max_wait.as_millis().to_string(),
                        UNSEEN_SLACK.as_millis().to_string(),
                        PROBE.as_millis().to_string(),
                    ],
                    marker: None,
                };
                match self.eval(call).await {
                    Ok(r) if r.first() == Some(&3) => {
                        // The budget's first call is out as a probe: its answer sets
                        // the bucket, and then this call gets a slot from it.
                        self.redis_up().await;
                        if asked.elapsed() >= max_wait {
                            return Admit::TooBusy { wait: max_wait };
                        }
                        let ms = r.get(1).copied().unwrap_or(100).clamp(1, 100);
                        tokio::time::sleep(Duration::from_millis(ms.unsigned_abs())).await;
                        continue;
                    }
                    Ok(r) => {
                        self.redis_up().await;
                        return self.admit_reply(scope, amounts, &r);
                    }
                    Err(e) => self.redis_failed(&e),
                }
            }
            let local = self.local_scope(scope);
            let waited = if self.pool.is_some() {
                // Ask Redis again every second: a job must not keep admitting on the
                // local share once the shared budget is back.
                tokio::select! {
                    r = local.acquire(&amounts) => Some(r),
                    () = tokio::time::sleep(Duration::from_secs(1)) => None,
                }
            } else {
                Some(local.acquire(&amounts).await)
            };
            let Some(waited) = waited else {
                continue;
            };
            match waited {
                Ok(()) if self.pool.is_some() && !self.redis_down.load(Ordering::Relaxed) => {
                    // Redis answered while this job waited on the local share: the
                    // shared budget admits it (the local tokens stay spent).
                    continue;
                }
                Ok(()) => {
                    if self.pool.is_some() {
                        self.owe(scope, Instant::now(), &amounts);
                    }
                    return Admit::Go {
                        wait: Duration::ZERO,
                        reservation: Reservation {
                            scope: scope.clone(),
                            amounts,
                            global: false,
                            seq: Vec::new(),
                            id: uuid::Uuid::now_v7(),
                        },
                    };
                }
                Err(i) => {
                    let whole = scope.dims.get(i).map_or(0.0, |d| d.burst.floor());
                    let fits_whole = amounts.get(i).is_some_and(|a| (*a as f64) <= whole);
                    if self.mode == AdmissionMode::Local || !fits_whole {
                        return self.too_large(scope, &amounts, i);
                    }
                    // Too large for this replica's share, not for the limit: wait for
                    // Redis (and the whole budget) rather than fail the job.
                    if asked.elapsed() >= max_wait {
                        return Admit::TooBusy { wait: max_wait };
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn admit_reply(&self, scope: &Arc<Scope>, amounts: Vec<u64>, r: &[i64]) -> Admit {
        let wait = Duration::from_millis(r.get(1).copied().unwrap_or(0).max(0).unsigned_abs());
        match r.first().copied().unwrap_or(-1) {
            0 => {
                self.promise(scope, wait);
                let seq = r
                    .get(3..)
                    .unwrap_or_default()
                    .chunks_exact(3)
                    .map(|c| Admitted {
                        gen: c[0],
                        seq: c[1],
                        paced: match c[2] {
                            2 => Paced::Alone,
                            1 => Paced::Yes,
                            _ => Paced::No,
                        },
                    })
                    .collect();
                Admit::Go {
                    wait,
                    reservation: Reservation {
                        scope: scope.clone(),
                        amounts,
                        global: true,
                        seq,
                        id: uuid::Uuid::now_v7(),
                    },
                }
            }
            1 => {
                let i = usize::try_from(r.get(1).copied().unwrap_or(1) - 1).unwrap_or(0);
                self.too_large(scope, &amounts, i)
            }
            _ => Admit::TooBusy { wait },
        }
    }

    fn too_large(&self, scope: &Scope, amounts: &[u64], i: usize) -> Admit {
        let dim = scope.dims.get(i).map_or("tokens", Dim::name);
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
        let call = Call {
            op: "peek",
            scope,
            amounts,
            extra: vec![ahead.to_string()],
            marker: None,
        };
        match self.eval(call).await {
            Ok(r) => Some(Duration::from_millis(
                r.first().copied().unwrap_or(0).max(0).unsigned_abs(),
            )),
            Err(_) => None,
        }
    }

    /// Time left of a fleet pause of `scope` (checked after waiting for a slot).
    pub async fn pause_left(&self, scope: &Arc<Scope>) -> Duration {
        if self.pool.is_some() {
            let zeros = vec![0; scope.dims.len()];
            let call = Call {
                op: "check",
                scope,
                amounts: &zeros,
                extra: Vec::new(),
                marker: None,
            };
            match self.eval(call).await {
                Ok(r) => {
                    self.redis_up().await;
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
    pub async fn give_back(&self, r: &Reservation) {
        self.settle(r, &vec![0; r.amounts.len()], &[], Duration::ZERO)
            .await;
    }

    /// Settles a reservation against what the call used (`actual`, per dimension; all
    /// zeros when the call never reached the provider), the provider's remaining counts
    /// and how long the call took. A reservation is settled once; again is a no-op.
    pub async fn settle(
        &self,
        r: &Reservation,
        actual: &[u64],
        remaining: &[Option<u64>],
        took: Duration,
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
        let mut extra = vec![
            refund.to_owned(),
            took.as_millis().to_string(),
            UNSEEN_SLACK.as_millis().to_string(),
        ];
        for i in 0..r.scope.dims.len() {
            extra.push(actual.get(i).copied().unwrap_or(0).to_string());
            extra.extend(r.seen_args(i, remaining));
        }
        let call = Call {
            op: "settle",
            scope: &r.scope,
            amounts: &r.amounts,
            extra,
            marker: Some(format!("{}:settled:{}", r.scope.key, r.id)),
        };
        if let Err(e) = self.eval(call).await {
            self.redis_failed(&e);
        }
    }

    /// Takes what a streamed answer's headers say is left, as soon as they arrive (the
    /// call then settles without them).
    pub async fn learn(&self, r: &Reservation, remaining: &[Option<u64>], took: Duration) {
        if !r.global || self.pool.is_none() || remaining.iter().all(Option::is_none) {
            return;
        }
        let mut extra = vec![
            took.as_millis().to_string(),
            UNSEEN_SLACK.as_millis().to_string(),
        ];
        for i in 0..r.scope.dims.len() {
            extra.extend(r.seen_args(i, remaining));
        }
        let call = Call {
            op: "learn",
            scope: &r.scope,
            amounts: &r.amounts,
            extra,
            marker: None,
        };
        if let Err(e) = self.eval(call).await {
            self.redis_failed(&e);
        }
    }

    /// Pauses every replica's use of `scope` for `d` and drains every dimension (a 429
    /// that does not say which limit it hit).
    pub async fn pause(&self, scope: &Arc<Scope>, d: Duration) {
        self.pause_for(scope, d, &vec![true; scope.dims.len()], &[])
            .await;
    }

    /// Pauses every replica's use of `scope` for `d` (a provider rate-limit 429), held to
    /// `admission.max_pause_secs`, and drains the dimensions marked in `drain` to what the
    /// provider says is left of them (`remaining`; nothing when it does not say). The
    /// other dimensions keep their state. A shorter pause never shortens a longer one.
    pub async fn pause_for(
        &self,
        scope: &Arc<Scope>,
        d: Duration,
        drain: &[bool],
        remaining: &[Option<u64>],
    ) {
        let d = if d > self.max_pause {
            warn!(scope = %scope.label, asked_ms = d.as_millis() as u64, cap_ms = self.max_pause.as_millis() as u64, "provider asked for a longer pause than admission.max_pause_secs; capped");
            self.max_pause
        } else {
            d
        };
        let drained: Vec<&str> = scope
            .dims
            .iter()
            .zip(drain)
            .filter(|(_, x)| **x)
            .map(|(d, _)| d.name())
            .collect();
        warn!(scope = %scope.label, pause_ms = d.as_millis() as u64, exceeded = %drained.join(","), "provider rate limit: pausing the fleet for this limit");
        self.local_scope(scope).pause(d);
        if self.pool.is_some() {
            let zeros = vec![0; scope.dims.len()];
            let mut extra = vec![d.as_millis().to_string()];
            for i in 0..scope.dims.len() {
                extra.push(
                    if drain.get(i).copied().unwrap_or(true) {
                        "1"
                    } else {
                        "0"
                    }
                    .to_owned(),
                );
                extra.push(
                    remaining
                        .get(i)
                        .copied()
                        .flatten()
                        .map_or("-1".to_owned(), |v| v.to_string()),
                );
            }
            let call = Call {
                op: "pause",
                scope,
                amounts: &zeros,
                extra,
                marker: None,
            };
            if let Err(e) = self.eval(call).await {
                self.redis_failed(&e);
            }
        }
    }

    /// Waits for a slot under every concurrency cap of `scope` (none: at once) and
    /// holds it until [`Admission::release`]. With Redis unreachable, this replica's
    /// share of each cap is held locally.
    pub async fn lease(&self, scope: &Arc<Scope>) -> Lease {
        let member = uuid::Uuid::now_v7().to_string();
        if scope.concurrency.is_empty() {
            return Lease::None;
        }
        loop {
            if self.pool.is_some() {
                let mut args = vec![
                    "take".to_owned(),
                    member.clone(),
                    LEASE.as_millis().to_string(),
                ];
                args.extend(scope.concurrency.iter().map(|(_, cap)| cap.to_string()));
                match self.eval_leases(scope, &args).await {
                    Ok(r) if r.first() == Some(&1) => {
                        self.redis_up().await;
                        return Lease::Global {
                            scope: scope.clone(),
                            member,
                        };
                    }
                    Ok(r) => {
                        self.redis_up().await;
                        let ms = r.get(1).copied().unwrap_or(20).clamp(1, 100);
                        let jitter = u64::from(uuid::Uuid::now_v7().as_bytes()[15] % 10);
                        tokio::time::sleep(Duration::from_millis(ms.unsigned_abs() + jitter)).await;
                        continue;
                    }
                    Err(e) => self.redis_failed(&e),
                }
            }
            let share = self.share();
            let semaphores: Vec<Arc<tokio::sync::Semaphore>> = {
                let mut map = match self.local_leases.lock() {
                    Ok(m) => m,
                    Err(p) => p.into_inner(),
                };
                scope
                    .concurrency
                    .iter()
                    .map(|(i, cap)| {
                        let permits = ((*cap as f64 * share).floor() as usize).max(1);
                        map.entry(format!("{}:{permits}", scope.hashes[*i]))
                            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(permits)))
                            .clone()
                    })
                    .collect()
            };
            let mut permits = Vec::new();
            for s in semaphores {
                if let Ok(p) = s.acquire_owned().await {
                    permits.push(p);
                }
            }
            return Lease::Local(permits);
        }
    }

    /// Runs `call` while holding `lease`, renewing it so a long call keeps its slot.
    pub async fn holding<F: std::future::Future>(&self, lease: &Lease, call: F) -> F::Output {
        let Lease::Global { scope, member } = lease else {
            return call.await;
        };
        tokio::pin!(call);
        loop {
            tokio::select! {
                out = &mut call => return out,
                () = tokio::time::sleep(LEASE / 3) => {
                    let args = vec![
                        "renew".to_owned(),
                        member.clone(),
                        LEASE.as_millis().to_string(),
                    ];
                    let _ = self.eval_leases(scope, &args).await;
                }
            }
        }
    }

    /// Gives a concurrency slot back.
    pub async fn release(&self, lease: Lease) {
        if let Lease::Global { scope, member } = lease {
            let args = vec!["give".to_owned(), member];
            if let Err(e) = self.eval_leases(&scope, &args).await {
                self.redis_failed(&e);
            }
        }
    }

    async fn eval_leases(&self, scope: &Scope, args: &[String]) -> Result<Vec<i64>, RedisError> {
        let Some(pool) = &self.pool else {
            return Err(RedisError::Timeout);
        };
        let mut conn = tokio::time::timeout(self.timeout, pool.get())
            .await
            .map_err(|_| RedisError::Timeout)??;
        let mut inv = self.leases.prepare_invoke();
        for (i, _) in &scope.concurrency {
            inv.key(scope.lease_key(*i));
        }
        for a in args {
            inv.arg(a);
        }
        let r: Vec<i64> = tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn))
            .await
            .map_err(|_| RedisError::Timeout)??;
        Ok(r)
    }

    fn local_scope(&self, scope: &Scope) -> Arc<local::LocalScope> {
        let share = self.share();
        let mut map = match self.local.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let name = scope.hashes.join("|");
        map.entry(name.clone())
            .or_insert_with(|| {
                let local = local::LocalScope::new(scope, share);
                // Slots the shared budget already promised this replica are still sent:
                // the local share starts after the last of them, not on top of them.
                let promised = self
                    .promised
                    .lock()
                    .ok()
                    .and_then(|p| p.get(&name).copied());
                // The fleet keeps sending the slots Redis promised it, as far ahead as
                // the queue was when this replica last asked: the share starts after.
                if let Some((at, wait)) = promised {
                    if at.elapsed() < PROMISES_KEPT {
                        local.start_after(wait.min(self.max_wait));
                    }
                }
                Arc::new(local)
            })
            .clone()
    }

    /// Notes what the local fallback admitted `at`, to charge the shared budget with
    /// later. Only what the longest window of the scope still counts is kept.
    fn owe(&self, scope: &Arc<Scope>, at: Instant, amounts: &[u64]) {
        let Ok(mut o) = self.owed.lock() else {
            return;
        };
        // Keyed by the dimensions too: limits reloaded while Redis is away make another
        // ledger, never entries of another shape in one.
        let names: Vec<&str> = scope.dims.iter().map(Dim::name).collect();
        let key = format!("{}#{}", scope.hashes.join("|"), names.join(","));
        let (_, ledger) = o
            .entry(key)
            .or_insert_with(|| (scope.clone(), VecDeque::new()));
        let window = scope.dims.iter().map(|d| d.window_secs).fold(1.0, f64::max);
        let window = Duration::from_secs_f64(window.min(3_600.0));
        while ledger
            .front()
            .is_some_and(|e| at.saturating_duration_since(e.last) > window)
        {
            ledger.pop_front();
        }
        let grain = OWED_GRAIN.max(window / 600);
        match ledger.back_mut() {
            Some(e) if at.saturating_duration_since(e.first) < grain => {
                for (sum, a) in e.amounts.iter_mut().zip(amounts) {
                    *sum = sum.saturating_add(*a);
                }
                e.last = e.last.max(at);
            }
            _ => ledger.push_back(OwedEntry {
                first: at,
                last: at,
                amounts: amounts.to_vec(),
            }),
        }
    }

    /// Notes how far ahead the shared budget was promising slots on `scope` (the wait it
    /// gave this replica's latest call: the fleet's queue at that moment).
    fn promise(&self, scope: &Scope, wait: Duration) {
        let now = Instant::now();
        if let Ok(mut p) = self.promised.lock() {
            if p.len() >= 1_000 {
                p.retain(|_, (at, _)| now.duration_since(*at) < PROMISES_KEPT);
            }
            p.insert(scope.hashes.join("|"), (now, wait));
        }
    }

    /// The part of each limit this replica may use on its own: all of it in `local`
    /// mode, 1/N when it stands in for the shared budget.
    fn share(&self) -> f64 {
        match self.mode {
            AdmissionMode::Local => 1.0,
            AdmissionMode::Global => 1.0 / f64::from(self.replicas().max(1)),
        }
    }

    fn replicas(&self) -> u32 {
        self.replicas.lock().map_or(1, |r| r.n)
    }

    /// Back on Redis: says so once, and charges the shared budget with what the local
    /// fallback admitted meanwhile.
    async fn redis_up(&self) {
        if !self.redis_down.swap(false, Ordering::Relaxed) {
            return;
        }
        if let Ok(mut l) = self.local.lock() {
            l.clear();
        }
        if let Ok(mut p) = self.promised.lock() {
            p.clear();
        }
        let owed: Vec<Owed> = match self.owed.lock() {
            Ok(mut o) => o.drain().map(|(_, v)| v).collect(),
            Err(_) => Vec::new(),
        };
        let mut charged = 0usize;
        for (scope, ledger) in owed {
            // Each entry as how long ago it was admitted, then its amounts: the script
            // charges only what the bucket does not already count as spent.
            let now = Instant::now();
            let mut extra = vec![ledger.len().to_string()];
            // An entry counts as admitted at its latest call: it is charged whole if
            // any of it may still be unrefilled.
            for e in &ledger {
                extra.push(
                    now.saturating_duration_since(e.last)
                        .as_millis()
                        .to_string(),
                );
                extra.extend(e.amounts.iter().map(u64::to_string));
            }
            let zeros = vec![0; scope.dims.len()];
            let call = Call {
                op: "charge",
                scope: &scope,
                amounts: &zeros,
                extra,
                marker: None,
            };
            if self.eval(call).await.is_ok() {
                charged += 1;
            } else {
                // Still owed: charged on the next return.
                for e in ledger {
                    self.owe(&scope, e.last, &e.amounts);
                }
            }
        }
        info!(
            scopes_charged = charged,
            "Redis answers again: back on the shared budget (what was admitted meanwhile is charged to it)"
        );
    }

    fn redis_failed(&self, e: &RedisError) {
        if !self.redis_down.swap(true, Ordering::Relaxed) {
            warn!(
                error = %e,
                replicas = self.replicas(),
                "Redis unreachable: admitting with this replica's share of each limit until it returns"
            );
        }
    }

    async fn eval(&self, call: Call<'_>) -> Result<Vec<i64>, RedisError> {
        let Some(pool) = &self.pool else {
            return Err(RedisError::Timeout);
        };
        let scope = call.scope;
        let mut conn = tokio::time::timeout(self.timeout, pool.get())
            .await
            .map_err(|_| RedisError::Timeout)??;
        let mut inv = self.script.prepare_invoke();
        inv.key(call.marker.unwrap_or_else(|| format!("{}:-", scope.key)));
        for h in &scope.hashes {
            inv.key(h);
        }
        inv.arg(call.op).arg(scope.dims.len());
        for (d, a) in scope.dims.iter().zip(call.amounts) {
            inv.arg(d.hash + 2)
                .arg(d.name())
                .arg(d.per_minute)
                .arg(d.burst)
                .arg(*a)
                .arg(u8::from(d.learn));
        }
        for e in &call.extra {
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
                self.seen_replicas(n.max(1));
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

    /// Takes a live count: a higher one at once, a lower one once it has held a minute.
    fn seen_replicas(&self, n: u32) {
        let changed = {
            let Ok(mut r) = self.replicas.lock() else {
                return;
            };
            if n >= r.n {
                r.lower_since = None;
                let changed = n != r.n;
                r.n = n;
                changed
            } else {
                let since = *r.lower_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= REPLICAS_LOWER_AFTER {
                    r.n = n;
                    r.lower_since = None;
                    true
                } else {
                    false
                }
            }
        };
        if changed {
            if let Ok(mut l) = self.local.lock() {
                l.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_models_name_never_makes_a_budget_hash_a_lease_set() {
        let mut s = Settings::defaults().unwrap();
        s.providers.get_mut("openai").unwrap().rate_limit = Some(RateLimitSettings {
            rpm: Some(600),
            max_concurrent: Some(2),
            ..Default::default()
        });
        let a = Admission::new(&s).unwrap();
        let plain = a.scope("openai", "gpt-4o").unwrap();
        let sly = a.scope("openai", "gpt-4o:leases").unwrap();
        let lease = plain.lease_key(0);
        assert!(!sly.hashes.contains(&lease), "{lease} is {:?}", sly.hashes);
        assert!(
            lease.starts_with(&plain.key),
            "{lease}: not in the scope's slot"
        );
        assert_ne!(lease, sly.lease_key(0));
    }

    #[test]
    fn a_429_about_concurrency_drains_no_bucket() {
        let mut s = Settings::defaults().unwrap();
        s.providers.get_mut("openai").unwrap().rate_limit = Some(RateLimitSettings {
            rpm: Some(600),
            tpm: Some(90_000),
            ..Default::default()
        });
        let a = Admission::new(&s).unwrap();
        let sc = a.scope("openai", "m").unwrap();
        assert_eq!(
            sc.exceeded(Some("requests"), "Too many concurrent requests for m", &[]),
            vec![false, false]
        );
        assert_eq!(
            sc.exceeded(
                Some("tokens"),
                "Rate limit reached for m on tokens per min (TPM)",
                &[]
            ),
            vec![false, true]
        );
    }
}
