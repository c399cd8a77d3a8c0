//! [`NewJob`]: what a producer fills in; it becomes a [`JobEnvelope`] when enqueued.

use chrono::{DateTime, Utc};

use crate::protocol::{
    ChatMessage, ChatRequest, JobEnvelope, JobId, Route, TraceContext, PROTOCOL_VERSION,
};

/// Default provider attempts per job.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// A job to enqueue, built fluently.
///
/// ```
/// use llmq_producer_sdk::{ChatMessage, NewJob};
/// let job = NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("Say hi")])
///     .max_tokens(64)
///     .idempotency_key("order-42")
///     .metadata("user_id", 7.into());
/// let envelope = job.into_envelope();
/// assert_eq!(envelope.version, 1);
/// assert_eq!(envelope.request.max_tokens, Some(64));
/// ```
#[derive(Clone, Debug)]
pub struct NewJob {
    envelope: JobEnvelope,
}

impl NewJob {
    /// A job for `tenant` asking `model` to answer `messages`. Set `max_tokens` before
    /// enqueuing: it is required.
    pub fn new(
        tenant: impl Into<String>,
        model: impl Into<String>,
        messages: Vec<ChatMessage>,
    ) -> Self {
        Self {
            envelope: JobEnvelope {
                version: PROTOCOL_VERSION,
                id: JobId::new(),
                tenant: tenant.into(),
                idempotency_key: None,
                route: Route {
                    model: model.into(),
                    provider: None,
                },
                fallbacks: Vec::new(),
                request: ChatRequest {
                    messages,
                    max_tokens: None,
                    temperature: None,
                    top_p: None,
                    stop: None,
                    extra: serde_json::Map::new(),
                },
                priority: 0,
                deadline: None,
                max_attempts: DEFAULT_MAX_ATTEMPTS,
                metadata: serde_json::Map::new(),
                created_at: Utc::now(),
                trace_context: None,
            },
        }
    }

    /// Upper bound of generated tokens (required).
    #[must_use]
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.envelope.request.max_tokens = Some(n);
        self
    }

    /// Sampling temperature.
    #[must_use]
    pub fn temperature(mut self, t: f32) -> Self {
        self.envelope.request.temperature = Some(t);
        self
    }

    /// Enqueuing again with the same key (same tenant) returns this job's id.
    #[must_use]
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.envelope.idempotency_key = Some(key.into());
        self
    }

    /// Pin the primary route to a configured provider.
    #[must_use]
    pub fn provider(mut self, provider: impl Into<String>) -> Self {
        self.envelope.route.provider = Some(provider.into());
        self
    }

    /// Add a fallback route, tried when earlier routes cannot answer.
    #[must_use]
    pub fn fallback(mut self, route: Route) -> Self {
        self.envelope.fallbacks.push(route);
        self
    }

    /// Priority 0 (lowest) to 9.
    #[must_use]
    pub fn priority(mut self, p: u8) -> Self {
        self.envelope.priority = p;
        self
    }

    /// The job expires instead of running after this instant.
    #[must_use]
    pub fn deadline(mut self, at: DateTime<Utc>) -> Self {
        self.envelope.deadline = Some(at);
        self
    }

    /// Provider attempts before failing.
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.envelope.max_attempts = n;
        self
    }

    /// A metadata entry echoed back with the status.
    #[must_use]
    pub fn metadata(mut self, key: impl Into<String>, value: serde_json::Value) -> Self {
        self.envelope.metadata.insert(key.into(), value);
        self
    }

    /// The producer's trace context.
    #[must_use]
    pub fn trace_context(mut self, ctx: TraceContext) -> Self {
        self.envelope.trace_context = Some(ctx);
        self
    }

    /// The envelope as it will travel.
    pub fn into_envelope(self) -> JobEnvelope {
        self.envelope
    }
}

impl From<NewJob> for JobEnvelope {
    fn from(job: NewJob) -> Self {
        job.into_envelope()
    }
}
