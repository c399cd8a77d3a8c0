//! # llmq producer SDK
//!
//! The wire protocol of llmq (job envelope v1, states, events) and the client a web
//! backend uses to enqueue completion jobs, read their status and wait for results.
//! The llmq worker depends on this crate, so producer and worker cannot drift.
//!
//! ## Layout
//! - [`protocol`]: envelope, states, events, results (serde, versioned).
//! - [`mod@validate`]: the checks a job passes before anything is written.
//! - [`topology`]: queue and exchange names shared with the worker.
//! - [`Client`]: enqueue (durable record, then publish with confirms), status, wait.
//!
//! ## Example
//! ```no_run
//! # async fn run() -> Result<(), llmq_producer_sdk::Error> {
//! use std::time::Duration;
//! use llmq_producer_sdk::{ChatMessage, Client, NewJob};
//!
//! let client = Client::connect(
//!     "amqp://guest:guest@127.0.0.1:5672/%2f",
//!     "postgres://postgres:postgres@127.0.0.1:5432/llmq",
//! )
//! .await?;
//! let job = NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("Write a haiku")])
//!     .max_tokens(128)
//!     .idempotency_key("haiku-1");
//! let id = client.enqueue(job).await?;
//! let status = client.wait(id, Duration::from_secs(60)).await?;
//! assert!(status.state.is_terminal());
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod client;
mod error;
mod job;
pub mod protocol;
pub mod topology;
pub mod validate;
mod watch;

pub use client::{connect_amqp, fetch_status, publish_job, Client, ClientConfig, Enqueued};
pub use error::{Error, Result};
pub use job::{NewJob, DEFAULT_MAX_ATTEMPTS};
pub use protocol::{
    ChatMessage, ChatRequest, CompletionResult, DecodeError, ErrorSummary, JobEnvelope, JobEvent,
    JobId, JobState, JobStatus, Role, Route, TraceContext, Usage, PROTOCOL_VERSION,
};
pub use topology::Topology;
pub use validate::{estimate_prompt_tokens, valid_tenant, validate, Limits, ValidationError};
