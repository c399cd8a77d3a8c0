use crate::protocol::{JobId, JobState};
use crate::validate::ValidationError;

/// Everything the SDK can fail with. Messages never contain credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The job was refused before anything was written.
    #[error("invalid job: {0}")]
    Invalid(#[from] ValidationError),
    /// A service could not be reached at connect time.
    #[error("cannot connect to {service}: {reason}; check that it is running and that the URL is right (scripts/services.sh starts the local services)")]
    Connect {
        /// `PostgreSQL` or `RabbitMQ`.
        service: &'static str,
        /// What the driver said (credentials removed).
        reason: String,
    },
    /// The database schema is absent or old.
    #[error("the llmq database schema is missing ({0}); run `llmq migrate` first")]
    SchemaMissing(String),
    /// A database call failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A broker call failed.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker refused or returned the message; nothing was kept.
    #[error("the broker did not accept job {0} ({1}); nothing was kept, enqueue again")]
    NotConfirmed(JobId, &'static str),
    /// No such job (or not visible to this tenant).
    #[error("job {0} not found")]
    NotFound(JobId),
    /// `cancel` on a job that is running or finished.
    #[error("job {id} is {state} and can no longer be cancelled (only queued, waiting_budget and retrying jobs can)")]
    NotCancellable {
        /// The job.
        id: JobId,
        /// Its state.
        state: JobState,
    },
    /// `wait` ran out of time; the job goes on.
    #[error("timed out waiting for job {id}; it is still {state}")]
    Timeout {
        /// The job.
        id: JobId,
        /// Its state when the wait ended.
        state: JobState,
    },
}

/// `Result` with the SDK's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
