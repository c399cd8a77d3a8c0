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
//! - `limits` ([`Limits`]): RPM/TPM per key, with the providers' 429 bodies and headers.
//! - `faults` ([`Faults`]): 5xx, overload, resets, truncated bodies, stalls, per-key
//!   quota/auth failures, a context window; changeable at run time (`PUT /_mock/faults`).
//! - [`Stats`]: what was asked and answered, per key (`GET /_mock/stats`,
//!   `POST /_mock/reset`).
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

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

pub use faults::Faults;
pub use limits::Limits;
pub use stats::{KeyStats, Stats};

/// How the mock behaves.
#[derive(Clone, Debug, Default)]
pub struct MockConfig {
    /// Added before every response.
    pub latency: Duration,
    /// Keys accepted; `None` accepts any non-empty key.
    pub accept_keys: Option<Vec<String>>,
    /// Rate limits enforced per key; `None` enforces none.
    pub limits: Option<Limits>,
    /// Faults injected from the start.
    pub faults: Faults,
}

/// One admitted completion, for the fidelity benchmark: milliseconds since the mock
/// started and the tokens charged.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct Admitted {
    /// When, in ms since start.
    pub at_ms: u64,
    /// Tokens charged at admission.
    pub tokens: u64,
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub config: Arc<MockConfig>,
    pub stats: Arc<Mutex<Stats>>,
    pub limiter: Arc<Mutex<limits::Limiter>>,
    pub admitted: Arc<Mutex<Vec<Admitted>>>,
    pub started: std::time::Instant,
    pub faults: Arc<std::sync::RwLock<Faults>>,
}

impl AppState {
    pub(crate) fn faults(&self) -> Faults {
        self.faults.read().map(|f| f.clone()).unwrap_or_default()
    }

    pub(crate) fn log_admitted(&self, tokens: u64) {
        let at_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Ok(mut log) = self.admitted.lock() {
            log.push(Admitted { at_ms, tokens });
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
    admitted: Arc<Mutex<Vec<Admitted>>>,
    started: std::time::Instant,
    faults: Arc<std::sync::RwLock<Faults>>,
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

    /// Milliseconds since the mock started (the clock of [`Admitted::at_ms`]).
    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Replaces the injected faults (takes effect for the next request).
    pub fn set_faults(&self, faults: Faults) {
        if let Ok(mut f) = self.faults.write() {
            *f = faults;
        }
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
        .route("/_mock/stats", get(get_stats))
        .route("/_mock/reset", post(reset_stats))
        .route("/_mock/admitted", get(get_admitted))
        .route("/_mock/faults", get(get_faults).put(put_faults))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state)
}

async fn get_stats(axum::extract::State(state): axum::extract::State<AppState>) -> Json<Stats> {
    Json(state.stats.lock().map(|s| s.clone()).unwrap_or_default())
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
    if let Ok(mut f) = state.faults.write() {
        *f = faults.clone();
    }
    Json(faults)
}

async fn reset_stats(axum::extract::State(state): axum::extract::State<AppState>) -> Json<Stats> {
    if let Ok(mut s) = state.stats.lock() {
        *s = Stats::default();
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
    let admitted = Arc::new(Mutex::new(Vec::new()));
    let limiter = Arc::new(Mutex::new(limits::Limiter::new(
        config.limits.clone().unwrap_or_default(),
    )));
    let started = std::time::Instant::now();
    let faults = Arc::new(std::sync::RwLock::new(config.faults.clone()));
    let state = AppState {
        faults: faults.clone(),
        config: Arc::new(config),
        stats: stats.clone(),
        limiter,
        admitted: admitted.clone(),
        started,
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router(state))
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok(MockHandle {
        addr,
        stats,
        admitted,
        started,
        faults,
        shutdown,
    })
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
