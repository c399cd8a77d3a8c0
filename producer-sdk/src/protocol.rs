//! Protocol v1: the job envelope, its states and the events published about it.
//!
//! Everything that crosses the broker or the database between a producer and a worker is
//! defined here, once; the worker depends on this crate so the two sides cannot drift.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The only envelope version this build understands. Unknown versions are rejected.
pub const PROTOCOL_VERSION: u32 = 1;

/// A job's id: a UUIDv7, so ids sort by creation time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    /// A fresh, time-ordered id.
    ///
    /// ```
    /// let a = llmq_producer_sdk::JobId::new();
    /// let b = llmq_producer_sdk::JobId::new();
    /// assert!(a < b);
    /// ```
    #[must_use]
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Where a job should be sent: a model route name known to the workers' configuration,
/// optionally pinned to one configured provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Model name as the provider knows it (e.g. `gpt-4o-mini`).
    pub model: String,
    /// Provider name from the worker configuration (e.g. `openai`); `None` = the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// Who wrote a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// System instructions.
    System,
    /// OpenAI's newer name for system instructions.
    Developer,
    /// The end user.
    User,
    /// The model.
    Assistant,
}

/// One chat message, OpenAI chat-completions shape (text content).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Author of the message.
    pub role: Role,
    /// Text of the message.
    pub content: String,
    /// Optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
            name: None,
        }
    }
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
            name: None,
        }
    }
}

/// The request in OpenAI chat-completions shape. Fields llmq does not interpret are kept in
/// `extra` and passed through to the provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The conversation; must not be empty.
    pub messages: Vec<ChatMessage>,
    /// Upper bound of generated tokens; required (budgets are reserved from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    /// Other OpenAI parameters, passed through untouched.
    #[serde(flatten, default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// W3C trace context carried with the job so its spans join the producer's trace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// `traceparent` header value.
    pub traceparent: String,
    /// `tracestate` header value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// The job envelope, version 1: the message body on the work queue and the record's source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEnvelope {
    /// Always [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The job's id.
    pub id: JobId,
    /// Tenant (producer) that owns the job.
    pub tenant: String,
    /// Enqueuing twice with the same key (per tenant) returns the first job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Primary route.
    pub route: Route,
    /// Routes to try, in order, when the primary cannot answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<Route>,
    /// The chat-completions request.
    pub request: ChatRequest,
    /// 0 (lowest) to 9 (highest).
    #[serde(default)]
    pub priority: u8,
    /// After this instant the job is `expired` instead of run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// Provider attempts before the job fails.
    pub max_attempts: u32,
    /// Free-form data the producer wants back with the result.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// When the producer created the job.
    pub created_at: DateTime<Utc>,
    /// Trace context of the producer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<TraceContext>,
}

/// Why bytes could not be read as a job envelope.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not JSON, or JSON of the wrong shape.
    #[error("malformed job envelope: {0}; send a JSON object matching protocol v1 (see producer-sdk docs)")]
    Malformed(String),
    /// The `version` field is absent.
    #[error("job envelope has no `version` field; set \"version\": 1")]
    MissingVersion,
    /// A version this build does not understand.
    #[error("unsupported job envelope version {0}; this build understands version {PROTOCOL_VERSION} only: upgrade the worker or send version {PROTOCOL_VERSION}")]
    UnsupportedVersion(u64),
}

impl JobEnvelope {
    /// Reads an envelope, rejecting unknown versions instead of guessing.
    ///
    /// ```
    /// use llmq_producer_sdk::{JobEnvelope, DecodeError};
    /// let err = JobEnvelope::decode(br#"{"version": 7}"#).unwrap_err();
    /// assert!(matches!(err, DecodeError::UnsupportedVersion(7)));
    /// ```
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        #[derive(Deserialize)]
        struct Probe {
            version: Option<serde_json::Value>,
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        match probe.version {
            None => return Err(DecodeError::MissingVersion),
            Some(v) => match v.as_u64() {
                Some(1) => {}
                Some(other) => return Err(DecodeError::UnsupportedVersion(other)),
                None => {
                    return Err(DecodeError::Malformed(format!(
                        "`version` must be a positive integer, got {v}"
                    )))
                }
            },
        }
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))
    }

    /// The envelope as JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Durably recorded and on the work queue.
    Queued,
    /// Taken by a worker, waiting for rate-limit budget.
    WaitingBudget,
    /// Provider call in flight.
    Running,
    /// A transient error happened; the next attempt is scheduled.
    Retrying,
    /// The provider answered; the result is recorded.
    Succeeded,
    /// Non-retryable error or attempts exhausted; dead-lettered.
    Failed,
    /// Cancelled by its producer.
    Cancelled,
    /// Deadline passed before it could run.
    Expired,
}

impl JobState {
    /// All states, in life order.
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::WaitingBudget,
        JobState::Running,
        JobState::Retrying,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Expired,
    ];

    /// The state's wire name (`waiting_budget`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::WaitingBudget => "waiting_budget",
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Expired => "expired",
        }
    }

    /// Whether the job can no longer change.
    ///
    /// ```
    /// use llmq_producer_sdk::JobState;
    /// assert!(JobState::Succeeded.is_terminal());
    /// assert!(!JobState::Retrying.is_terminal());
    /// ```
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Expired
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown state name.
#[derive(Debug, thiserror::Error)]
#[error("unknown job state `{0}`")]
pub struct UnknownState(pub String);

impl FromStr for JobState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// Token usage as reported by the provider.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Generated (output) tokens.
    pub completion_tokens: u64,
    /// Sum of both.
    pub total_tokens: u64,
}

/// A finished completion, normalised across providers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompletionResult {
    /// The generated text.
    pub content: String,
    /// Why generation stopped (`stop`, `length`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Provider that answered (configuration name).
    pub provider: String,
    /// Model that answered.
    pub model: String,
    /// The provider's request id, for support tickets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_request_id: Option<String>,
    /// Token usage.
    pub usage: Usage,
}

/// The last error a job met, in short.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorSummary {
    /// Error class (`rate_limited`, `network`, `bad_request`, …).
    pub class: String,
    /// Human-readable message (never contains secrets).
    pub message: String,
}

/// A job's status as a producer or frontend reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job's id.
    pub id: JobId,
    /// Owner.
    pub tenant: String,
    /// Current state.
    pub state: JobState,
    /// Requested model.
    pub model: String,
    /// Provider attempts so far.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// When the terminal state was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// When the job is expected to start: while `waiting_budget` its rate-limit slot;
    /// while `retrying` its next attempt; while `queued` the API's estimate from the
    /// place in line and the route's budget (see the README, "Queue position and ETA").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_start_at: Option<DateTime<Utc>>,
    /// While `queued`: the place in line, 1 being next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// The result, once succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CompletionResult>,
    /// The last error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<ErrorSummary>,
    /// Producer's metadata, echoed back.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// A transition of one job, as published on the events exchange (routing key
/// `<tenant>.<state>`) and recorded in the job's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// Always [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The job.
    pub job_id: JobId,
    /// Its owner.
    pub tenant: String,
    /// The state entered.
    pub state: JobState,
    /// When it was entered.
    pub at: DateTime<Utc>,
    /// Attempt number the transition belongs to (0 before the first call).
    pub attempt: u32,
    /// The result, on `succeeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CompletionResult>,
    /// The error, on `failed` / `retrying`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorSummary>,
}

impl JobEvent {
    /// A transition of `job_id` into `state` now, without result or error.
    pub fn new(job_id: JobId, tenant: impl Into<String>, state: JobState, attempt: u32) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            job_id,
            tenant: tenant.into(),
            state,
            at: Utc::now(),
            attempt,
            result: None,
            error: None,
        }
    }

    /// The routing key on the events exchange: `<tenant>.<state>`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.tenant, self.state)
    }
}
