//! Prometheus metrics (OpenMetrics text at `/metrics`): what a worker replica did, and
//! what the API served. Labels are provider names, classes and states, never keys or URLs.
//!
//! Worker (`worker.metrics_bind`):
//! - `llmq_jobs_total{state,class}`: jobs this replica finished (succeeded, failed, expired)
//! - `llmq_provider_calls_total{provider,outcome,class}`: every provider call; outcome is
//!   `succeeded`, `retryable` or `fatal` (the call's class, whatever then became of the job)
//! - `llmq_provider_latency_seconds{provider}`: call latency
//! - `llmq_tokens_total{provider,kind}`: prompt and completion tokens reported by `usage`
//! - `llmq_budget_wait_seconds{provider}`: time from reservation to the budget slot
//! - `llmq_budget_send_lateness_seconds{provider}`: how late a call left after its budget
//!   slot began (calls that leave late bunch up at the provider)
//! - `llmq_retries_total{class}`: retries scheduled (including `circuit_open` waits)
//! - `llmq_fleet_pauses_total{provider}`: provider 429s that paused the fleet
//! - `llmq_circuit_state{provider}`: 0 closed, 1 half-open, 2 open (as last seen)
//! - `llmq_jobs_in_flight`: deliveries being processed by this replica
//! - `llmq_queue_messages{queue}`: messages ready in the work and dead-letter queues
//! - `llmq_job_panics_total`: job tasks that panicked (their delivery was handed back)
//! - `llmq_jobs_repaired_total{action}`: live jobs whose message was lost, `republished`
//!   or `failed` by the repair sweep
//!
//! API (`/metrics` on `api.bind`):
//! - `llmq_api_jobs_enqueued_total{duplicate}`, `llmq_api_event_streams` (open SSE streams)

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A label set: `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_buckets() -> Histogram {
    // 10 ms .. ~82 s
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

fn lateness_buckets() -> Histogram {
    Histogram::new([
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ])
}

fn wait_buckets() -> Histogram {
    // 50 ms .. ~14 min
    Histogram::new(exponential_buckets(0.05, 2.0, 15))
}

/// The worker's metrics.
pub struct Metrics {
    registry: Registry,
    /// Jobs finished by state and class.
    pub jobs: Family<Labels, Counter>,
    /// Provider calls by provider, outcome and class.
    pub calls: Family<Labels, Counter>,
    /// Provider call latency.
    pub latency: Histograms,
    /// Tokens by provider and kind.
    pub tokens: Family<Labels, Counter>,
    /// Budget waits.
    pub budget_wait: Histograms,
    /// Lateness of calls after their budget slot.
    pub send_lateness: Histograms,
    /// Retries by class.
    pub retries: Family<Labels, Counter>,
    /// Fleet pauses by provider.
    pub fleet_pauses: Family<Labels, Counter>,
    /// Circuit state by provider.
    pub circuit: Family<Labels, Gauge>,
    /// Deliveries in progress.
    pub in_flight: Gauge,
    /// Ready messages by queue.
    pub queue_messages: Family<Labels, Gauge>,
    /// Job tasks that panicked.
    pub panics: Counter,
    /// Jobs the repair sweep republished or failed.
    pub repaired: Family<Labels, Counter>,
}

impl Metrics {
    /// A registry with every worker metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("llmq");
        let m = Self {
            jobs: Family::default(),
            calls: Family::default(),
            latency: Family::new_with_constructor(latency_buckets as fn() -> Histogram),
            tokens: Family::default(),
            budget_wait: Family::new_with_constructor(wait_buckets as fn() -> Histogram),
            send_lateness: Family::new_with_constructor(lateness_buckets as fn() -> Histogram),
            retries: Family::default(),
            fleet_pauses: Family::default(),
            circuit: Family::default(),
            in_flight: Gauge::default(),
            queue_messages: Family::default(),
            panics: Counter::default(),
            repaired: Family::default(),
            registry: Registry::default(),
        };
        registry.register("jobs", "Jobs finished by this replica", m.jobs.clone());
        registry.register("provider_calls", "Provider calls", m.calls.clone());
        registry.register(
            "provider_latency_seconds",
            "Provider call latency",
            m.latency.clone(),
        );
        registry.register("tokens", "Tokens reported by providers", m.tokens.clone());
        registry.register(
            "budget_wait_seconds",
            "Time from budget reservation to the slot",
            m.budget_wait.clone(),
        );
        registry.register(
            "budget_send_lateness_seconds",
            "How late a call left after its budget slot began",
            m.send_lateness.clone(),
        );
        registry.register("retries", "Retries scheduled", m.retries.clone());
        registry.register(
            "fleet_pauses",
            "Provider rate-limit 429s that paused the fleet",
            m.fleet_pauses.clone(),
        );
        registry.register(
            "circuit_state",
            "Circuit state as last seen: 0 closed, 1 half-open, 2 open",
            m.circuit.clone(),
        );
        registry.register(
            "jobs_in_flight",
            "Deliveries being processed",
            m.in_flight.clone(),
        );
        registry.register(
            "queue_messages",
            "Messages ready in a queue",
            m.queue_messages.clone(),
        );
        registry.register(
            "job_panics",
            "Job tasks that panicked; their delivery was handed back",
            m.panics.clone(),
        );
        registry.register(
            "jobs_repaired",
            "Live jobs whose message was lost, republished or failed by the repair sweep",
            m.repaired.clone(),
        );
        Arc::new(Self { registry, ..m })
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Records a circuit state string (`closed`, `half_open`, `open`).
    pub fn circuit_seen(&self, provider: &str, state: &str) {
        let v = match state {
            "open" => 2,
            "half_open" => 1,
            _ => 0,
        };
        self.circuit
            .get_or_create(&vec![("provider", provider.to_owned())])
            .set(v);
    }
}

/// The API's metrics.
pub struct ApiMetrics {
    registry: Registry,
    /// Jobs enqueued through the API, by whether the idempotency key was seen before.
    pub enqueued: Family<Labels, Counter>,
    /// Open SSE streams.
    pub streams: Gauge,
}

impl ApiMetrics {
    /// A registry with every API metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("llmq_api");
        let enqueued = Family::<Labels, Counter>::default();
        let streams = Gauge::default();
        registry.register(
            "jobs_enqueued",
            "Jobs enqueued through the API",
            enqueued.clone(),
        );
        registry.register("event_streams", "Open SSE streams", streams.clone());
        Arc::new(Self {
            registry,
            enqueued,
            streams,
        })
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The HTTP response for a metrics text.
pub fn response(text: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Serves `/metrics` of `metrics` on `bind` until `stop`; returns the bound address.
pub async fn serve(
    bind: &str,
    metrics: Arc<Metrics>,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {bind} (worker.metrics_bind): {e}"))?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move { response(m.render()) }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    tracing::info!(%addr, "worker metrics at /metrics");
    Ok(addr)
}
