//! # mock-provider
//!
//! An OpenAI- and Anthropic-compatible LLM server for llmq's tests, demo and benchmarks
//! (there is no network here). It answers like the real APIs: same bodies, `usage`,
//! request-id headers, error shapes, enforced RPM/TPM limits and injected faults.
//!
//! ## Layout
//! - [`MockConfig`]: behaviour (latency, accepted keys, limits, faults).
//! - `openai`: `POST /v1/chat/completions`, also `"stream": true` (SSE chunks, a usage
//!   chunk with `stream_options.include_usage`, then `data: [DONE]`).
//! - `anthropic`: `POST /v1/messages`.
//! - `limits` ([`Limits`]): RPM/TPM per key (or per key and model), optionally also per
//!   second, and a cap on requests in flight, with the providers' 429 bodies and headers.
//! - `faults` ([`Faults`]): 5xx, overload, resets, truncated bodies, stalls, per-key
//!   quota/auth failures, a context window, and hostile answers (huge multi-byte error
//!   bodies, verbatim `retry-after`, endless bodies, streams cut mid-event, hangs);
//!   changeable at run time (`PUT /_mock/faults`).
//! - [`Stats`]: what was asked (counted at arrival) and answered, per key
//!   (`GET /_mock/stats`, `POST /_mock/reset`).
//! - Calls per prompt: how many completion requests arrived for each last user message
//!   ([`MockHandle::calls`], `GET /_mock/calls`), to count duplicate calls per job.
//! - In flight: completion requests arrived whose answer is not over yet
//!   ([`MockHandle::in_flight`]); drops back when a client goes away mid-answer.
//!
//! Token estimate (`usage`): `ceil(chars / 4)` per message content plus 4 per message for
//! the prompt; `ceil(chars / 4)`, at least 1, for the completion.
//!
//! Replies are deterministic so tests can assert them: the content is
//! `"mock reply to: <last user message>"`, cut to `max_tokens` tokens.

mod anthropic;
mod faults;
mod limits;
mod openai;
mod stats;
mod stream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use faults::Faults;
pub use limits::Limits;
pub use stats::{KeyStats, Stats};

/// How the mock behaves.
#[derive(Clone, Debug, Default)]
pub struct MockConfig {
    /// Added before every response (before the first chunk of a streamed one).
    pub latency: Duration,
    /// Between the chunks of a streamed answer (one chunk per word).
    pub chunk_delay: Duration,
    /// Keys accepted; `None` accepts any non-empty key.
    pub accept_keys: Option<Vec<String>>,
    /// Rate limits enforced per key; `None` enforces none.
    pub limits: Option<Limits>,
    /// Faults injected from the start.
    pub faults: Faults,
}

/// One admitted completion, for the fidelity benchmark: milliseconds since the mock
/// started, the tokens charged and the model asked for.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Admitted {
    /// When, in ms since start.
    pub at_ms: u64,
    /// Tokens charged at admission.
    pub tokens: u64,
    /// The request's `model`.
    #[serde(default)]
    pub model: String,
}

/// A completion request's admission: what the limiter decided, and the buckets it was
/// decided on (for the rate-limit headers, success or not).
pub(crate) struct Admission {
    /// The slot counting it in flight (hold it until the answer is over), or why not.
    pub decision: Result<limits::Slot, limits::Refusal>,
    pub buckets: limits::KeyBuckets,
}

/// Completion requests arrived per last user message.
type Calls = BTreeMap<String, u64>;

#[derive(Clone)]
pub(crate) struct AppState {
    pub config: Arc<MockConfig>,
    pub stats: Arc<Mutex<Stats>>,
    pub calls: Arc<Mutex<Calls>>,
    pub limiter: Arc<Mutex<limits::Limiter>>,
    pub admitted: Arc<Mutex<Vec<Admitted>>>,
    pub started: std::time::Instant,
    pub faults: Arc<std::sync::RwLock<Faults>>,
    pub refuse: Arc<tokio::sync::Notify>,
    pub in_flight: Arc<AtomicU64>,
}

/// One completion counted in flight until dropped.
struct InFlight(Arc<AtomicU64>);

impl InFlight {
    fn enter(count: &Arc<AtomicU64>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Replaces the faults; a `refuse_ms` window wakes the serving loop to close the port.
fn apply_faults(slot: &std::sync::RwLock<Faults>, refuse: &tokio::sync::Notify, faults: Faults) {
    let window = faults.refuse_ms;
    if let Ok(mut f) = slot.write() {
        *f = faults;
    }
    if window > 0 {
        refuse.notify_one();
    }
}

impl AppState {
    /// Takes the pending refusal window (one-shot).
    fn take_refuse(&self) -> Duration {
        self.faults.write().map_or(Duration::ZERO, |mut f| {
            Duration::from_millis(std::mem::take(&mut f.refuse_ms))
        })
    }

    /// Counts a completion request from `key` the moment it arrives (before any latency,
    /// stall or fault) and records its last user message; returns the parsed body, if it
    /// is JSON.
    pub(crate) fn arrive(&self, key: &str, body: &[u8]) -> Option<Value> {
        if let Ok(mut s) = self.stats.lock() {
            s.arrived(key);
        }
        let req = serde_json::from_slice::<Value>(body).ok();
        if let Some(prompt) = req.as_ref().and_then(last_user) {
            if let Ok(mut calls) = self.calls.lock() {
                *calls.entry(prompt).or_default() += 1;
            }
        }
        req
    }

    pub(crate) fn faults(&self) -> Faults {
        self.faults.read().map(|f| f.clone()).unwrap_or_default()
    }

    /// Admits one request of `key` for `model` (see [`limits::Limiter::admit`]) and counts
    /// the outcome: refusals as answered, the in-flight peak of admissions.
    pub(crate) fn admit(&self, key: &str, model: &str, charge: limits::Charge) -> Admission {
        let (decision, buckets) = {
            let mut l = self
                .limiter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let d = l.admit(key, model, charge);
            (d, l.buckets(key, model).cloned().unwrap_or_default())
        };
        if let Ok(mut s) = self.stats.lock() {
            match &decision {
                Ok(slot) => s.saw_in_flight(key, slot.in_flight),
                Err(limits::Refusal::Limited { dim, .. }) => s.count_limited(key, dim.name()),
                Err(limits::Refusal::Busy { .. }) => s.count_limited(key, "concurrent"),
                Err(limits::Refusal::TooLarge { .. }) => s.count(key, None),
            }
        }
        Admission { decision, buckets }
    }

    pub(crate) fn log_admitted(&self, tokens: u64, model: &str) {
        let at_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Ok(mut log) = self.admitted.lock() {
            log.push(Admitted {
                at_ms,
                tokens,
                model: model.to_owned(),
            });
        }
    }

    pub(crate) fn key_ok(&self, key: &str) -> bool {
        !key.is_empty()
            && self
                .config
                .accept_keys
                .as_ref()
                .is_none_or(|keys| keys.iter().any(|k| k == key))
    }
}

/// A running mock provider.
pub struct MockHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    stats: Arc<Mutex<Stats>>,
    calls: Arc<Mutex<Calls>>,
    admitted: Arc<Mutex<Vec<Admitted>>>,
    started: std::time::Instant,
    faults: Arc<std::sync::RwLock<Faults>>,
    refuse: Arc<tokio::sync::Notify>,
    in_flight: Arc<AtomicU64>,
    shutdown: CancellationToken,
}

impl MockHandle {
    /// `http://ADDR/v1`, the base URL a client is configured with.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Completion requests arrived so far per last user message (OpenAI: the last
    /// `messages` entry with role `user`; Anthropic: the same from `messages`; the text of
    /// a string content or the text parts of an array), counted at arrival whatever the
    /// answer. A body that is not JSON, or has no user message, is not recorded here (it
    /// still counts in [`Stats::requests_total`]).
    pub fn calls(&self) -> BTreeMap<String, u64> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Completion requests arrived whose answer is not over: still being prepared (latency,
    /// stalls, hangs) or its body still being sent (streams, endless bodies). Falls back
    /// when the answer ends or its client goes away.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Milliseconds since the mock started (the clock of [`Admitted::at_ms`]).
    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Replaces the injected faults (takes effect for the next request; a `refuse_ms`
    /// window closes the port at once).
    pub fn set_faults(&self, faults: Faults) {
        apply_faults(&self.faults, &self.refuse, faults);
    }

    /// Every admitted completion so far.
    pub fn admitted(&self) -> Vec<Admitted> {
        self.admitted.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Stops serving.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

/// The router, for embedding.
fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/messages", post(anthropic::messages))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            around_completion,
        ))
        .route("/_mock/stats", get(get_stats))
        .route("/_mock/reset", post(reset_stats))
        .route("/_mock/calls", get(get_calls))
        .route("/_mock/admitted", get(get_admitted))
        .route("/_mock/faults", get(get_faults).put(put_faults))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

/// Around every completion: counted in flight until its body is over (or dropped with the
/// connection), and the `retry_after` fault applied to its headers.
async fn around_completion(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let guard = InFlight::enter(&state.in_flight);
    let mut resp = next.run(req).await;
    state.faults().override_retry_after(&mut resp);
    hold(resp, guard)
}

/// `resp` keeping `guard` until its body is over: dropped now when the body is already
/// complete, else with the streamed body (when it ends or is dropped with its connection).
pub(crate) fn hold<G: Send + 'static>(resp: Response, guard: G) -> Response {
    if resp.body().size_hint().exact().is_some() {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let stream = futures_util::stream::unfold(
        (body.into_data_stream(), guard),
        |(mut s, guard)| async move {
            let chunk = futures_util::StreamExt::next(&mut s).await?;
            Some((chunk, (s, guard)))
        },
    );
    Response::from_parts(parts, Body::from_stream(stream))
}

async fn get_stats(axum::extract::State(state): axum::extract::State<AppState>) -> Json<Stats> {
    Json(state.stats.lock().map(|s| s.clone()).unwrap_or_default())
}

async fn get_calls(axum::extract::State(state): axum::extract::State<AppState>) -> Json<Calls> {
    Json(state.calls.lock().map(|c| c.clone()).unwrap_or_default())
}

async fn get_admitted(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> Json<Vec<Admitted>> {
    Json(state.admitted.lock().map(|a| a.clone()).unwrap_or_default())
}

async fn get_faults(axum::extract::State(state): axum::extract::State<AppState>) -> Json<Faults> {
    Json(state.faults())
}

async fn put_faults(
    axum::extract::State(state): axum::extract::State<AppState>,
    Json(faults): Json<Faults>,
) -> Json<Faults> {
    tracing::info!(?faults, "faults changed");
    apply_faults(&state.faults, &state.refuse, faults.clone());
    Json(faults)
}

async fn reset_stats(axum::extract::State(state): axum::extract::State<AppState>) -> Json<Stats> {
    if let Ok(mut s) = state.stats.lock() {
        *s = Stats::default();
    }
    if let Ok(mut c) = state.calls.lock() {
        c.clear();
    }
    if let Ok(mut a) = state.admitted.lock() {
        a.clear();
    }
    Json(Stats::default())
}

/// Binds `bind` (e.g. `127.0.0.1:0`) and serves in the background.
pub async fn spawn(bind: &str, config: MockConfig) -> anyhow::Result<MockHandle> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(Mutex::new(Stats::default()));
    let calls = Arc::new(Mutex::new(Calls::new()));
    let admitted = Arc::new(Mutex::new(Vec::new()));
    let limiter = Arc::new(Mutex::new(limits::Limiter::new(
        config.limits.clone().unwrap_or_default(),
    )));
    let started = std::time::Instant::now();
    let faults = Arc::new(std::sync::RwLock::new(config.faults.clone()));
    let refuse = Arc::new(tokio::sync::Notify::new());
    let in_flight = Arc::new(AtomicU64::new(0));
    let state = AppState {
        in_flight: in_flight.clone(),
        refuse: refuse.clone(),
        faults: faults.clone(),
        config: Arc::new(config),
        stats: stats.clone(),
        calls: calls.clone(),
        limiter,
        admitted: admitted.clone(),
        started,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(listener, addr, state, shutdown.clone()));
    Ok(MockHandle {
        addr,
        stats,
        calls,
        admitted,
        started,
        faults,
        refuse,
        in_flight,
        shutdown,
    })
}

/// Serves until `stop`; a refusal window closes the listening socket (in-flight requests
/// finish, idle keep-alive connections close) and binds the same address again after.
async fn serve(
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    state: AppState,
    stop: CancellationToken,
) {
    let mut listener = Some(listener);
    loop {
        let l = match listener.take() {
            Some(l) => l,
            None => loop {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => break l,
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "cannot listen again yet");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                }
            },
        };
        let mut window = state.take_refuse();
        if window.is_zero() {
            let cut = CancellationToken::new();
            let signal = {
                let (stop, cut, refuse) = (stop.clone(), cut.clone(), state.refuse.clone());
                async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = refuse.notified() => {}
                    }
                    cut.cancel();
                }
            };
            let server = axum::serve(l, router(state.clone())).with_graceful_shutdown(signal);
            tokio::select! {
                _ = server => {}
                // Connections that outlive a short grace are not waited for.
                () = async { cut.cancelled().await; tokio::time::sleep(Duration::from_secs(1)).await } => {}
            }
            if stop.is_cancelled() {
                return;
            }
            window = state.take_refuse();
        } else {
            drop(l);
        }
        tracing::info!(ms = window.as_millis() as u64, %addr, "refusing connections");
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(window) => {}
        }
    }
}

/// Token estimate used for `usage`: about 4 characters per token, at least 1.
pub(crate) fn tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4).max(1)
}

/// The deterministic reply to `last_user`, cut to `max_tokens`; true when cut.
pub(crate) fn reply(last_user: &str, max_tokens: Option<u64>) -> (String, bool) {
    let full = format!("mock reply to: {last_user}");
    match max_tokens {
        Some(max) if tokens(&full) > max => {
            let keep = usize::try_from(max.saturating_mul(4)).unwrap_or(usize::MAX);
            (full.chars().take(keep).collect(), true)
        }
        _ => (full, false),
    }
}

/// The text of a message's `content`: a string, or the `text` parts of an array.
pub(crate) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// The text of the last `messages` entry with role `user` (OpenAI and Anthropic alike).
fn last_user(req: &Value) -> Option<String> {
    req.get("messages")?
        .as_array()?
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content")))
}

/// `req_` + 32 hex characters.
pub(crate) fn request_id() -> String {
    format!("req_{}", uuid::Uuid::new_v4().simple())
}

/// Key shown in stats: never the whole key.
pub(crate) fn redact(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "***".into();
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}
