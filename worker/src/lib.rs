//! # llmq worker
//!
//! Consumes completion jobs from RabbitMQ, calls the provider, records every outcome in
//! PostgreSQL and publishes results; also serves the HTTP API and the operator commands.
//!
//! ## Layout (in the order a job meets it)
//! - [`settings`]: one typed settings struct (defaults → file → environment).
//! - [`consume`]: the worker loop and [`consume::Worker::process_one`].
//! - [`admission`]: the fleet's shared RPM/TPM budget (Redis, one Lua script).
//! - [`breaker`]: circuit breakers per provider, shared by the fleet in Redis.
//! - [`provider`]: one adapter per provider behind one trait.
//! - [`outcome`]: `classify`, the one map from a provider answer to what happens next.
//! - [`retry`]: backoff with full jitter, or the provider's Retry-After.
//! - [`publish`]: events, delay queues and dead letters (publisher confirms).
//! - [`store`]: the durable record (jobs, attempts, transitions).
//! - [`api`]: the HTTP API.
//! - [`dlq`]: list, show and replay dead-lettered jobs.
//! - [`doctor`]: the layer-by-layer diagnostic of a provider.
//! - [`demo`]: the sample batch the README's first command pushes.

pub mod admission;
pub mod api;
pub mod breaker;
pub mod consume;
pub mod demo;
pub mod dlq;
pub mod doctor;
pub mod live;
pub mod metrics;
pub mod outcome;
pub mod provider;
pub mod publish;
pub mod retry;
pub mod settings;
pub mod store;
pub mod telemetry;

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgPool, PgPoolOptions};

pub use settings::Settings;

/// Connects to PostgreSQL, with a message that says what to do when it is down.
pub async fn connect_db(settings: &Settings) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(u32::from(settings.worker.concurrency).clamp(4, 50))
        .acquire_timeout(Duration::from_secs(10))
        .connect(settings.database_url.expose_secret())
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to PostgreSQL (database_url): {e}; is it running? `bash scripts/services.sh` starts the local services"
            )
        })
}

/// Applies migrations, naming the fix when they cannot be applied.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    store::migrate(pool)
        .await
        .map_err(|e| anyhow::anyhow!("cannot apply database migrations: {e}"))
}
