//! The HTTP API: enqueue a job, read its status, health. Errors are mapped to responses in
//! one place (`ApiError`), as JSON `{"error": {"code", "message"}}`; what it answers is
//! described in `openapi.json`, served as this server applies it (see `openapi.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use llmq_producer_sdk::{
    ChatMessage, ChatRequest, Client, ClientConfig, JobEnvelope, JobId, JobStatus, Route,
    ValidationError, DEFAULT_MAX_ATTEMPTS, PROTOCOL_VERSION,
};
use secrecy::ExposeSecret;
use serde::{Deserialize, Deserializer, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;

mod auth;
mod events;
mod openapi;

pub use auth::{new_token, token_hash};
use auth::{Caller, Tenants};
pub use openapi::SOURCE as OPENAPI;

#[derive(Clone)]
struct AppState {
    metrics: Arc<crate::metrics::ApiMetrics>,
    tenants: Tenants,
    admission: Arc<crate::admission::Admission>,
    settings: Arc<Settings>,
    hub: crate::live::Hub,
    producer: Arc<Producer>,
    pool: PgPool,
    breaker: Arc<crate::breaker::Breaker>,
    providers: Arc<Vec<String>>,
    streams: Arc<events::Streams>,
    openapi: bytes::Bytes,
}

/// How often the API checks its broker connection, and reopens it when lost.
const BROKER_CHECK_EVERY: Duration = Duration::from_secs(2);
/// The longest one attempt to reopen the broker connection may take.
const BROKER_RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The producer client of the API. The client reopens its broker channel only when it
/// next publishes, so after a broker restart an idle API would stay disconnected (and
/// `/healthz` unhealthy) until some enqueue came along. This holder replaces the client
/// with a freshly connected one as soon as the connection is seen lost, from a background
/// check and from `/healthz`.
struct Producer {
    client: std::sync::RwLock<Client>,
    config: ClientConfig,
    pool: PgPool,
    /// Held while reconnecting: one attempt at a time.
    reconnecting: tokio::sync::Mutex<()>,
}

impl Producer {
    /// The current client (cheap: a few reference counts).
    fn client(&self) -> Client {
        match self.client.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether the broker connection is up, after reopening it if it was lost. While
    /// another caller is reconnecting, says how things stand without waiting.
    async fn ensure_connected(&self) -> bool {
        if self.client().is_connected().await {
            return true;
        }
        let Ok(_one_at_a_time) = self.reconnecting.try_lock() else {
            return false;
        };
        if self.client().is_connected().await {
            return true;
        }
        let fresh = tokio::time::timeout(
            BROKER_RECONNECT_TIMEOUT,
            Client::connect_with_pool(self.config.clone(), self.pool.clone()),
        )
        .await;
        match fresh {
            Ok(Ok(client)) => {
                match self.client.write() {
                    Ok(mut c) => *c = client,
                    Err(poisoned) => *poisoned.into_inner() = client,
                }
                tracing::info!("broker connection reopened");
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "broker still unreachable; trying again shortly");
                false
            }
            Err(_) => {
                tracing::debug!("reopening the broker connection timed out; trying again shortly");
                false
            }
        }
    }

    /// Checks the connection every [`BROKER_CHECK_EVERY`] until `shutdown`.
    fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let mut was_up = true;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(BROKER_CHECK_EVERY) => {}
                }
                let up = self.ensure_connected().await;
                if was_up && !up {
                    tracing::warn!("broker connection lost; reopening it in the background");
                }
                was_up = up;
            }
        });
    }
}

/// A running API server.
pub struct ApiHandle {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// Resolves when the server has stopped.
    pub join: JoinHandle<std::io::Result<()>>,
}

/// Binds `settings.api.bind` and serves until `shutdown` is cancelled.
pub async fn start(
    settings: &Settings,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<ApiHandle> {
    if settings.api.max_event_streams == 0 {
        anyhow::bail!("configuration error: `api.max_event_streams` must be at least 1 (set it in the config file or as LLMQ_API__MAX_EVENT_STREAMS)");
    }
    if settings.api.events_db_connections == 0 {
        anyhow::bail!("configuration error: `api.events_db_connections` must be at least 1 (set it in the config file or as LLMQ_API__EVENTS_DB_CONNECTIONS)");
    }
    let mut config = ClientConfig::new(
        settings.amqp_url.expose_secret(),
        settings.database_url.expose_secret(),
    );
    config.queue_prefix.clone_from(&settings.queue_prefix);
    config.limits = settings.limits.clone();
    let client = Client::connect_with_pool(config.clone(), pool.clone()).await?;
    let producer = Arc::new(Producer {
        client: std::sync::RwLock::new(client),
        config,
        pool: pool.clone(),
        reconnecting: tokio::sync::Mutex::new(()),
    });
    producer.clone().watch(shutdown.clone());
    // The event streams read through a pool of their own, so watchers never hold the
    // connections enqueues need.
    let events_pool = PgPoolOptions::new()
        .max_connections(settings.api.events_db_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy(settings.database_url.expose_secret())
        .map_err(|e| anyhow::anyhow!("database_url is not usable: {e}"))?;
    let hub = crate::live::Hub::start(settings, shutdown.clone())?;
    let streams = events::Streams::start(
        settings.api.max_event_streams,
        events_pool.clone(),
        hub.clone(),
        shutdown.clone(),
    );
    let body_limit = settings.limits.max_body_bytes + 64 * 1024;
    let app = Router::new()
        .route("/v1/jobs", post(create_job).get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/events", get(events::job_events))
        .route("/healthz", get(healthz))
        .route("/", get(page))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/v1/circuits", get(circuits))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(AppState {
            metrics: crate::metrics::ApiMetrics::new(),
            tenants: Tenants::new(&settings.api.tenants),
            admission: Arc::new(crate::admission::Admission::new(settings)?),
            settings: Arc::new(settings.clone()),
            hub,
            producer,
            pool,
            breaker: Arc::new(crate::breaker::Breaker::new(settings)?),
            providers: Arc::new(settings.providers.keys().cloned().collect()),
            streams,
            openapi: openapi::document(settings)?.into(),
        });
    if settings.api.tenants.is_empty() {
        tracing::warn!("no api.tenants configured: the API is open to anyone who can reach it and takes the tenant from each request; configure tenant tokens (`llmq token NAME`) for anything but local use");
    }
    let listener = tokio::net::TcpListener::bind(&settings.api.bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (api.bind): {e}", settings.api.bind))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "API listening");
    let join = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        events_pool.close().await;
        served
    });
    Ok(ApiHandle { addr, join })
}

/// `POST /v1/jobs` body. Unknown fields are refused so typos do not pass silently; other
/// OpenAI parameters go in `params`. Integers may be written with a zero fraction (`8.0`):
/// JSON Schema counts those as integers, so clients generated from the document may.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateJob {
    #[serde(default, deserialize_with = "opt_whole")]
    version: Option<u32>,
    #[serde(default)]
    tenant: Option<String>,
    model: String,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    fallbacks: Vec<Route>,
    messages: Vec<ChatMessage>,
    #[serde(default, deserialize_with = "opt_whole")]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stop: Option<Vec<String>>,
    #[serde(default)]
    params: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default, deserialize_with = "whole")]
    priority: u8,
    #[serde(default)]
    deadline: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "opt_whole")]
    max_attempts: Option<u32>,
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
}

/// An integer written as `12` or `12.0`.
fn whole<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error;
    let n = serde_json::Number::deserialize(d)?;
    let v = match (n.as_u64(), n.as_f64()) {
        (Some(v), _) => v,
        (None, Some(f)) if f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&f) => f as u64,
        _ => return Err(D::Error::custom(format!("{n} is not a whole number >= 0"))),
    };
    T::try_from(v).map_err(|_| D::Error::custom(format!("{n} is too large")))
}

/// [`whole`], or `null`.
fn opt_whole<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    #[derive(Deserialize)]
    #[serde(transparent)]
    struct Whole<T: TryFrom<u64>>(#[serde(deserialize_with = "whole")] T);
    Ok(Option::<Whole<T>>::deserialize(d)?.map(|w| w.0))
}

#[derive(Serialize)]
struct Created {
    id: JobId,
    state: &'static str,
    duplicate: bool,
    status_url: String,
}

async fn create_job(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<CreateJob>, JsonRejection>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let Json(req) = body?;
    let tenant = match (caller, req.tenant) {
        (Caller::Tenant(t), Some(asked)) if asked != t => {
            return Err(ApiError::Forbidden(format!(
                "this token belongs to tenant `{t}`, not `{asked}`: leave `tenant` out or set it to `{t}`"
            )))
        }
        (Caller::Tenant(t), _) => t,
        (Caller::Open, asked) => asked.unwrap_or_else(|| "default".into()),
    };
    let envelope = JobEnvelope {
        version: req.version.unwrap_or(PROTOCOL_VERSION),
        id: JobId::new(),
        tenant,
        idempotency_key: req.idempotency_key,
        route: Route {
            model: req.model,
            provider: req.provider,
        },
        fallbacks: req.fallbacks,
        request: ChatRequest {
            messages: req.messages,
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            stop: req.stop,
            extra: req.params,
        },
        priority: req.priority,
        deadline: req.deadline,
        max_attempts: req.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        metadata: req.metadata,
        created_at: Utc::now(),
        trace_context: None,
    };
    let enqueued = state.producer.client().enqueue_envelope(envelope).await?;
    state
        .metrics
        .enqueued
        .get_or_create(&vec![("duplicate", enqueued.duplicate.to_string())])
        .inc();
    let code = if enqueued.duplicate {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        code,
        Json(Created {
            id: enqueued.id,
            state: "queued",
            duplicate: enqueued.duplicate,
            status_url: format!("/v1/jobs/{}", enqueued.id),
        }),
    ))
}

/// A job id: a UUID in its hyphenated form (what `format: uuid` means), nothing looser.
fn parse_id(id: &str) -> Result<JobId, ApiError> {
    let bad = || ApiError::BadRequest("bad_job_id", format!("`{id}` is not a job id (a UUID)"));
    if id.len() != 36 {
        return Err(bad());
    }
    id.parse().map_err(|_| bad())
}

/// The `{id}` of a `/v1/jobs/{id}…` path; a malformed one is `400 bad_job_id` (as JSON,
/// like every other error).
struct JobIdPath(JobId);

impl FromRequestParts<AppState> for JobIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest("bad_job_id", e.body_text()))?;
        parse_id(&raw).map(Self)
    }
}

/// `NotFound` unless the job exists and `caller` may see it.
async fn visible(pool: &PgPool, caller: &Caller, id: JobId) -> Result<(), ApiError> {
    let tenant: Option<String> = sqlx::query_scalar("SELECT tenant FROM jobs WHERE id = $1")
        .bind(id.0)
        .fetch_optional(pool)
        .await
        .map_err(|e| ApiError::Unavailable(format!("database: {e}; try again")))?;
    match (tenant, caller.scope()) {
        (Some(t), Some(scope)) if t == scope => Ok(()),
        (Some(_), None) => Ok(()),
        _ => Err(ApiError::NotFound(id)),
    }
}

async fn get_job(
    State(state): State<AppState>,
    caller: Caller,
    JobIdPath(id): JobIdPath,
) -> Result<Json<JobStatus>, ApiError> {
    let client = state.producer.client();
    let mut status = match caller.scope() {
        Some(t) => client.status_for_tenant(id, t).await?,
        None => client.status(id).await?,
    };
    add_eta(&state, &state.pool, &mut status).await;
    Ok(Json(status))
}

/// While queued: the expected start, from the place in line and the route's budget. The
/// shared bucket says when a job of this one's demand could start if the `position - 1`
/// jobs ahead (taken to ask as much as this one) went first; jobs already admitted are
/// in the bucket. No limit on the route: no estimate. Reads the job through `pool`.
async fn add_eta(state: &AppState, pool: &PgPool, status: &mut JobStatus) {
    let (Some(position), llmq_producer_sdk::JobState::Queued) = (status.position, status.state)
    else {
        return;
    };
    let envelope: Option<sqlx::types::Json<JobEnvelope>> =
        sqlx::query_scalar("SELECT envelope FROM jobs WHERE id = $1")
            .bind(status.id.0)
            .fetch_optional(pool)
            .await
            .ok()
            .flatten();
    let Some(env) = envelope.map(|e| e.0) else {
        return;
    };
    let provider = env
        .route
        .provider
        .clone()
        .unwrap_or_else(|| state.settings.default_provider.clone());
    let Some(kind) = state.settings.providers.get(&provider).map(|p| p.kind) else {
        return;
    };
    let Some(scope) = state.admission.scope(&provider, &env.route.model) else {
        return;
    };
    let prompt = crate::admission::prompt_tokens(kind, &env.route.model, &env.request.messages);
    let amounts = scope.demand(prompt, u64::from(env.request.max_tokens.unwrap_or(0)));
    if let Some(wait) = state
        .admission
        .estimate_start(&scope, &amounts, position.saturating_sub(1))
        .await
    {
        status.expected_start_at = Some(
            Utc::now()
                + chrono::Duration::milliseconds(
                    i64::try_from(wait.as_millis()).unwrap_or(i64::MAX),
                ),
        );
    }
}

/// `GET /v1/jobs` filters and page.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Whose jobs (with a token: only the token's tenant).
    #[serde(default)]
    tenant: Option<String>,
    /// Comma-separated states, no spaces.
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    model: Option<String>,
    /// Jobs older than this id (the previous page's `next_cursor`).
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

/// One line of a job list.
#[derive(Serialize, sqlx::FromRow)]
struct JobSummary {
    id: uuid::Uuid,
    tenant: String,
    state: String,
    model: String,
    attempts: i32,
    error_class: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
struct JobPage {
    jobs: Vec<JobSummary>,
    /// Pass as `cursor` for the next (older) page; null on the last one.
    next_cursor: Option<uuid::Uuid>,
}

/// `GET /v1/jobs`: the caller's jobs, newest first, by pages.
async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<JobPage>, ApiError> {
    let axum::extract::Query(q) = query.map_err(|e| {
        ApiError::BadRequest(
            "bad_query",
            format!("{}; filters are state, model, cursor, limit", e.body_text()),
        )
    })?;
    if let Some(asked) = q
        .tenant
        .as_deref()
        .filter(|t| !llmq_producer_sdk::valid_tenant(t))
    {
        return Err(ApiError::BadRequest(
            "bad_tenant",
            format!("`{asked}` is not a tenant name: 1-64 letters, digits, `_` or `-`"),
        ));
    }
    if q.model.as_deref().is_some_and(|m| m.contains('\0')) {
        return Err(ApiError::BadRequest(
            "bad_model",
            "`model` holds the character U+0000; no model is named so".into(),
        ));
    }
    let tenant = match (&caller, q.tenant) {
        (Caller::Tenant(t), Some(asked)) if &asked != t => {
            return Err(ApiError::Forbidden(format!(
                "this token belongs to tenant `{t}`; it cannot list `{asked}`'s jobs"
            )))
        }
        (Caller::Tenant(t), _) => Some(t.clone()),
        (Caller::Open, asked) => asked,
    };
    let states: Option<Vec<String>> = match q.state {
        None => None,
        Some(list) => {
            // Exactly `state(,state)*`, as the document's pattern says.
            let mut out = Vec::new();
            for s in list.split(',') {
                let parsed: llmq_producer_sdk::JobState = s.parse().map_err(|_| {
                    ApiError::BadRequest(
                        "bad_state",
                        format!("`{s}` is not a state: give one or more of queued, waiting_budget, running, retrying, succeeded, failed, cancelled, expired, separated by commas without spaces"),
                    )
                })?;
                out.push(parsed.to_string());
            }
            Some(out)
        }
    };
    let cursor = q.cursor.as_deref().map(parse_id).transpose()?;
    let limit = match q.limit.unwrap_or(50) {
        l @ 1..=500 => i64::from(l),
        l => {
            return Err(ApiError::BadRequest(
                "bad_limit",
                format!("limit {l} is outside 1..=500: page with `cursor` for more"),
            ))
        }
    };
    let mut jobs: Vec<JobSummary> = sqlx::query_as(
        "SELECT id, tenant, state, model, attempts, error_class, created_at, updated_at, finished_at
         FROM jobs
         WHERE ($1::text IS NULL OR tenant = $1)
           AND ($2::text[] IS NULL OR state = ANY($2))
           AND ($3::text IS NULL OR model = $3)
           AND ($4::uuid IS NULL OR id < $4)
         ORDER BY id DESC
         LIMIT $5",
    )
    .bind(tenant)
    .bind(states)
    .bind(q.model)
    .bind(cursor.map(|c| c.0))
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await
    .map_err(|e| ApiError::Unavailable(format!("database: {e}; try again")))?;
    let more = jobs.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    jobs.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = if more {
        jobs.last().map(|j| j.id)
    } else {
        None
    };
    Ok(Json(JobPage { jobs, next_cursor }))
}

/// `DELETE /v1/jobs/{id}`: cancel a queued, budget-waiting or retrying job.
async fn cancel_job(
    State(state): State<AppState>,
    caller: Caller,
    JobIdPath(id): JobIdPath,
) -> Result<Json<JobStatus>, ApiError> {
    let client = state.producer.client();
    let status = match caller.scope() {
        Some(t) => client.cancel_for_tenant(id, t).await?,
        None => client.cancel(id).await?,
    };
    state.hub.poke(id.0);
    Ok(Json(status))
}

/// Prometheus metrics of this API process (workers serve their own on
/// `worker.metrics_bind`).
async fn metrics(State(state): State<AppState>) -> Response {
    crate::metrics::response(state.metrics.render())
}

/// The OpenAPI 3.1 document as this server applies it (see `openapi.rs`; tests check that
/// it names every route and field, and schemathesis that the API keeps to it).
async fn openapi(State(state): State<AppState>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        state.openapi.clone(),
    )
        .into_response()
}

/// The "generating, please wait" page: one HTML file, no build step.
async fn page() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        include_str!("page.html"),
    )
        .into_response()
}

/// `GET /v1/circuits`: the breaker state of every configured provider.
async fn circuits(
    State(state): State<AppState>,
    _caller: Caller,
) -> Json<Vec<crate::breaker::CircuitState>> {
    let mut out = Vec::new();
    for p in state.providers.iter() {
        out.push(state.breaker.state(p).await);
    }
    Json(out)
}

async fn healthz(State(state): State<AppState>) -> Response {
    let db = sqlx::query("SELECT 1").execute(&state.pool).await.is_ok();
    // A lost connection is reopened here too, not only in the background.
    let broker = state.producer.ensure_connected().await;
    let body = serde_json::json!({
        "status": if db && broker { "ok" } else { "degraded" },
        "postgres": db,
        "rabbitmq": broker,
    });
    let code = if db && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Every error the API returns, mapped to a status and a JSON body in one place.
#[derive(Debug)]
enum ApiError {
    BadRequest(&'static str, String),
    Invalid(ValidationError),
    NotFound(JobId),
    Unauthorized(&'static str),
    Forbidden(String),
    Conflict(&'static str, String),
    Unavailable(String),
    /// As many event streams are open as `api.max_event_streams` allows.
    TooManyStreams(u32),
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::BadRequest(
                "body_too_large",
                "the request body is over the size limit: send a shorter prompt".into(),
            );
        }
        ApiError::BadRequest(
            "invalid_json",
            format!(
                "{}; see \"POST /v1/jobs\" in the README for the job fields",
                r.body_text()
            ),
        )
    }
}

impl From<llmq_producer_sdk::Error> for ApiError {
    fn from(e: llmq_producer_sdk::Error) -> Self {
        match e {
            llmq_producer_sdk::Error::Invalid(v) => ApiError::Invalid(v),
            llmq_producer_sdk::Error::NotFound(id) => ApiError::NotFound(id),
            e @ llmq_producer_sdk::Error::NotCancellable { .. } => {
                ApiError::Conflict("not_cancellable", e.to_string())
            }
            other => {
                tracing::error!(error = %other, "request failed on a backing service");
                ApiError::Unavailable(format!("{other}; nothing was enqueued, try again"))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            ApiError::BadRequest(code, m) if code == "body_too_large" => {
                (StatusCode::PAYLOAD_TOO_LARGE, code, m)
            }
            ApiError::BadRequest(code, m) => (StatusCode::BAD_REQUEST, code, m),
            ApiError::Invalid(v) => {
                let status = if matches!(v, ValidationError::BodyTooLarge { .. }) {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::UNPROCESSABLE_ENTITY
                };
                (status, v.code(), v.to_string())
            }
            ApiError::NotFound(id) => (
                StatusCode::NOT_FOUND,
                "not_found",
                format!("job {id} not found"),
            ),
            ApiError::Unauthorized(m) => {
                let mut r = (
                    StatusCode::UNAUTHORIZED,
                    Json(serde_json::json!({ "error": { "code": "unauthorized", "message": m } })),
                )
                    .into_response();
                r.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, "wrong_tenant", m),
            ApiError::Conflict(code, m) => (StatusCode::CONFLICT, code, m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
            ApiError::TooManyStreams(max) => {
                let mut r = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(serde_json::json!({ "error": {
                        "code": "too_many_streams",
                        "message": format!("{max} event streams are open, as many as this API serves at once (api.max_event_streams): try again in {} s, or poll GET /v1/jobs/{{id}} meanwhile", events::RETRY_AFTER_SECS),
                    } })),
                )
                    .into_response();
                r.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from(events::RETRY_AFTER_SECS),
                );
                return r;
            }
        };
        (
            status,
            Json(serde_json::json!({ "error": { "code": code, "message": message } })),
        )
            .into_response()
    }
}
