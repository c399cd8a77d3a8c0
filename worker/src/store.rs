//! PostgreSQL: the durable record of every job, attempt and transition.
//!
//! Success path, two writes: [`claim`] (state `running`, attempt counted) and
//! [`record`] (result, attempt evidence and transition in one statement).

use chrono::{DateTime, Utc};
use llmq_producer_sdk::{CompletionResult, JobId, JobState};
use sqlx::PgPool;

/// Applies the embedded migrations (`migrations/`); safe to run concurrently.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("../migrations").run(pool).await
}

/// A job's state as the worker needs it before deciding anything.
pub async fn load_state(pool: &PgPool, id: JobId) -> Result<Option<JobState>, sqlx::Error> {
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
        .bind(id.0)
        .fetch_optional(pool)
        .await?;
    Ok(state.and_then(|s| s.parse().ok()))
}

/// Marks the job `running` and counts the attempt; `None` when another delivery owns it
/// or it is terminal. A `running` job is taken over only by a *redelivered* message (the
/// broker redelivers only after the previous holder's channel died); a second copy that is
/// not a redelivery (a republished duplicate) leaves the running job to its holder.
pub async fn claim(
    pool: &PgPool,
    id: JobId,
    redelivered: bool,
) -> Result<Option<u32>, sqlx::Error> {
    let attempt: Option<i32> = sqlx::query_scalar(
        "WITH j AS (
            UPDATE jobs SET state = 'running', attempts = attempts + 1,
                            started_at = coalesce(started_at, now()),
                            published_at = coalesce(published_at, now()), updated_at = now()
            WHERE id = $1 AND (state IN ('queued', 'waiting_budget', 'retrying')
                               OR ($2 AND state = 'running'))
            RETURNING id, attempts)
         INSERT INTO job_transitions (job_id, state, attempt)
         SELECT id, 'running', attempts FROM j
         RETURNING attempt",
    )
    .bind(id.0)
    .bind(redelivered)
    .fetch_optional(pool)
    .await?;
    Ok(attempt.map(|a| u32::try_from(a).unwrap_or(0)))
}

/// Records that the job waits for rate-limit budget until `expected_start` (no attempt
/// is counted). False when the job is terminal, or `running` under another delivery (a
/// `running` job is taken over only by a redelivered message, as in [`claim`]).
pub async fn mark_waiting(
    pool: &PgPool,
    id: JobId,
    expected_start: DateTime<Utc>,
    redelivered: bool,
) -> Result<bool, sqlx::Error> {
    let detail = serde_json::json!({ "expected_start_at": expected_start });
    hold(
        pool,
        id,
        JobState::WaitingBudget,
        expected_start,
        detail,
        redelivered,
    )
    .await
}

/// Records that the job goes back through a delay queue until `next_at` because its budget
/// slot is too far away (no attempt counted): state `retrying`. False when the job is
/// terminal or `running` under another delivery (as in [`claim`]).
pub async fn defer(
    pool: &PgPool,
    id: JobId,
    next_at: DateTime<Utc>,
    redelivered: bool,
) -> Result<bool, sqlx::Error> {
    let detail = serde_json::json!({ "next_attempt_at": next_at, "reason": "budget" });
    hold(pool, id, JobState::Retrying, next_at, detail, redelivered).await
}

/// A live job waits in `state` until `until`, without an attempt counted.
async fn hold(
    pool: &PgPool,
    id: JobId,
    state: JobState,
    until: DateTime<Utc>,
    detail: serde_json::Value,
    redelivered: bool,
) -> Result<bool, sqlx::Error> {
    let changed: Option<uuid::Uuid> = sqlx::query_scalar(
        "WITH j AS (
            UPDATE jobs SET state = $4, expected_start_at = $2,
                            published_at = coalesce(published_at, now()), updated_at = now()
            WHERE id = $1 AND (state IN ('queued', 'waiting_budget', 'retrying')
                               OR ($3 AND state = 'running'))
            RETURNING id, attempts)
         INSERT INTO job_transitions (job_id, state, attempt, detail)
         SELECT id, $4, attempts, $5 FROM j
         RETURNING job_id",
    )
    .bind(id.0)
    .bind(until)
    .bind(redelivered)
    .bind(state.as_str())
    .bind(sqlx::types::Json(detail))
    .fetch_optional(pool)
    .await?;
    Ok(changed.is_some())
}

/// Evidence of one provider call.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// Attempt number (1-based).
    pub attempt: u32,
    /// When the call started.
    pub started_at: DateTime<Utc>,
    /// Provider name.
    pub provider: String,
    /// Base URL host.
    pub base_url_host: String,
    /// Endpoint path.
    pub endpoint: String,
    /// Model called.
    pub model: String,
    /// HTTP status, when there was a response.
    pub http_status: Option<u16>,
    /// `succeeded`, `retry` or `fatal`.
    pub outcome: &'static str,
    /// Error class.
    pub error_class: Option<&'static str>,
    /// Failed layer.
    pub failed_layer: Option<&'static str>,
    /// Provider error type.
    pub error_type: Option<String>,
    /// Provider error code.
    pub error_code: Option<String>,
    /// Message.
    pub error_message: Option<String>,
    /// Provider request id.
    pub provider_request_id: Option<String>,
    /// Call latency.
    pub latency_ms: u32,
    /// Prompt tokens used.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens used.
    pub completion_tokens: Option<u64>,
}

/// A state change to record.
#[derive(Debug, Clone)]
pub struct Transition<'a> {
    /// State entered.
    pub state: JobState,
    /// Attempt it belongs to.
    pub attempt: u32,
    /// Result, on success.
    pub result: Option<&'a CompletionResult>,
    /// Error class and message, on failure/retry.
    pub error: Option<(&'a str, &'a str)>,
    /// Call evidence, when a call was made.
    pub evidence: Option<&'a AttemptRecord>,
    /// Extra detail for the history (e.g. next attempt time).
    pub detail: Option<serde_json::Value>,
}

/// Records a transition (and the attempt's evidence) in one statement. Returns false when
/// nothing changed: the job was already terminal, or (for a transition of attempt N > 0)
/// its record has moved on to a later attempt, i.e. another delivery took the job over
/// while this one was calling (the attempt number fences stale holders).
pub async fn record<'e>(
    db: impl sqlx::PgExecutor<'e>,
    id: JobId,
    t: &Transition<'_>,
) -> Result<bool, sqlx::Error> {
    let e = t.evidence;
    let to_i64 = |v: Option<u64>| v.map(|x| i64::try_from(x).unwrap_or(i64::MAX));
    let changed: Option<uuid::Uuid> = sqlx::query_scalar(
        "WITH j AS (
            UPDATE jobs SET state = $2,
                            result = coalesce($3, result),
                            error_class = coalesce($4, error_class),
                            error_message = coalesce($5, error_message),
                            finished_at = CASE WHEN $6 THEN now() ELSE finished_at END,
                            published_at = coalesce(published_at, now()),
                            expected_start_at = CASE WHEN $2 = 'retrying'
                                THEN ($25::jsonb ->> 'next_attempt_at')::timestamptz
                                ELSE expected_start_at END,
                            updated_at = now()
            WHERE id = $1 AND state NOT IN ('succeeded', 'failed', 'cancelled', 'expired')
              AND ($24 = 0 OR attempts = $24)
            RETURNING id),
         a AS (
            INSERT INTO job_attempts (job_id, attempt, started_at, finished_at, provider, base_url_host,
                endpoint, model, http_status, outcome, error_class, failed_layer, error_type, error_code,
                error_message, provider_request_id, latency_ms, prompt_tokens, completion_tokens)
            SELECT id, $7, $8, now(), $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23
            FROM j WHERE $7 IS NOT NULL
            ON CONFLICT (job_id, attempt) DO NOTHING)
         INSERT INTO job_transitions (job_id, state, attempt, detail)
         SELECT id, $2, $24, $25 FROM j
         RETURNING job_id",
    )
    .bind(id.0)
    .bind(t.state.as_str())
    .bind(t.result.map(sqlx::types::Json))
    .bind(t.error.map(|(c, _)| c))
    .bind(t.error.map(|(_, m)| m))
    .bind(t.state.is_terminal())
    .bind(e.map(|e| i32::try_from(e.attempt).unwrap_or(i32::MAX)))
    .bind(e.map(|e| e.started_at))
    .bind(e.map(|e| e.provider.as_str()))
    .bind(e.map(|e| e.base_url_host.as_str()))
    .bind(e.map(|e| e.endpoint.as_str()))
    .bind(e.map(|e| e.model.as_str()))
    .bind(e.and_then(|e| e.http_status).map(i32::from))
    .bind(e.map(|e| e.outcome))
    .bind(e.and_then(|e| e.error_class))
    .bind(e.and_then(|e| e.failed_layer))
    .bind(e.and_then(|e| e.error_type.as_deref()))
    .bind(e.and_then(|e| e.error_code.as_deref()))
    .bind(e.and_then(|e| e.error_message.as_deref()))
    .bind(e.and_then(|e| e.provider_request_id.as_deref()))
    .bind(e.map(|e| i32::try_from(e.latency_ms).unwrap_or(i32::MAX)))
    .bind(to_i64(e.and_then(|e| e.prompt_tokens)))
    .bind(to_i64(e.and_then(|e| e.completion_tokens)))
    .bind(i32::try_from(t.attempt).unwrap_or(i32::MAX))
    .bind(t.detail.as_ref().map(sqlx::types::Json))
    .fetch_optional(db)
    .await?;
    Ok(changed.is_some())
}

/// [`record`] for a job known only by id (its message could not be decoded): the tenant
/// when the transition was recorded, `None` when there is no such live job.
pub async fn record_if_exists(
    pool: &PgPool,
    id: JobId,
    t: &Transition<'_>,
) -> Result<Option<String>, sqlx::Error> {
    if !record(pool, id, t).await? {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT tenant FROM jobs WHERE id = $1")
        .bind(id.0)
        .fetch_optional(pool)
        .await
}

/// Publishes jobs whose producer recorded them but died before publishing (the outbox
/// sweep): queued, never confirmed, older than `min_age` and unchanged for as long (a job
/// the repair sweep just reset is left to the replica that reset it). Rows are locked while published,
/// so concurrent sweeps on other replicas skip them.
pub async fn publish_orphans(
    pool: &PgPool,
    channel: &lapin::Channel,
    topology: &llmq_producer_sdk::Topology,
    min_age: std::time::Duration,
) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(
        uuid::Uuid,
        sqlx::types::Json<llmq_producer_sdk::JobEnvelope>,
    )> = sqlx::query_as(
        "SELECT id, envelope FROM jobs
         WHERE published_at IS NULL AND state = 'queued'
           AND created_at < now() - make_interval(secs => $1)
           AND updated_at < now() - make_interval(secs => $1)
         ORDER BY created_at LIMIT 100
         FOR UPDATE SKIP LOCKED",
    )
    .bind(min_age.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    let mut published = Vec::with_capacity(rows.len());
    for (id, envelope) in &rows {
        let body = envelope.0.encode();
        llmq_producer_sdk::publish_job(channel, topology, &envelope.0, body).await?;
        published.push(*id);
    }
    sqlx::query("UPDATE jobs SET published_at = now() WHERE id = ANY($1)")
        .bind(&published)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(published.len())
}

/// What the repair sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repaired {
    /// Jobs whose message was published again.
    pub republished: usize,
    /// Jobs failed because their message was lost too many times.
    pub failed: usize,
}

/// A live job lost its message this many times: the next time it is failed, not
/// republished.
pub const MAX_REPAIRS: i32 = 3;

/// The repair sweep: live jobs with nothing recorded for `quiet` (for a `retrying` job:
/// `quiet` past its next attempt time) and held by no live replica (holders touch their
/// jobs, [`touch_held`]) are taken to have lost their message (a broker failure dropped
/// it, or dead-lettered it without an outcome). Each is set `queued` and published
/// again, or, after [`MAX_REPAIRS`], failed as `lost` with the reason and a copy
/// dead-lettered for `llmq dlq replay`.
///
/// While the work queue has a backlog (`backlog`), a `queued` or `retrying` job may just
/// be waiting in line: then only `running` and `waiting_budget` jobs quiet for twice as
/// long are taken. At most `limit` jobs per call; rows are locked while their record is
/// changed, so sweeps on other replicas skip them. The record is committed before the
/// new message is published (a copy must never arrive to a record that still says
/// `running`); a publish that fails leaves the job to the outbox sweep
/// ([`publish_orphans`]). Returns what was done, and the failed jobs with their tenant.
pub async fn repair_lost(
    pool: &PgPool,
    channel: &lapin::Channel,
    publisher: &crate::publish::Publisher,
    topology: &llmq_producer_sdk::Topology,
    quiet: std::time::Duration,
    backlog: bool,
    limit: i64,
) -> anyhow::Result<(Repaired, Vec<(JobId, String)>)> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(
        uuid::Uuid,
        String,
        i32,
        sqlx::types::Json<serde_json::Value>,
    )> = sqlx::query_as(
        "SELECT id, state, repairs, envelope FROM jobs
         WHERE state IN ('queued', 'waiting_budget', 'running', 'retrying')
           AND published_at IS NOT NULL
           AND updated_at < now() - make_interval(secs => $1)
           AND (state <> 'retrying' OR expected_start_at IS NULL
                OR expected_start_at < now() - make_interval(secs => $1))
           AND (NOT $3 OR (state IN ('running', 'waiting_budget')
                           AND updated_at < now() - make_interval(secs => 2 * $1)))
         ORDER BY updated_at LIMIT $2
         FOR UPDATE SKIP LOCKED",
    )
    .bind(quiet.as_secs_f64())
    .bind(limit)
    .bind(backlog)
    .fetch_all(&mut *tx)
    .await?;
    let quiet_s = quiet.as_secs();
    let mut republish = Vec::new();
    let mut dead = Vec::new();
    for (id, state, repairs, envelope) in rows {
        let env = serde_json::from_value::<llmq_producer_sdk::JobEnvelope>(envelope.0.clone());
        match env {
            Ok(env) if repairs < MAX_REPAIRS => {
                sqlx::query(
                    "WITH j AS (
                        UPDATE jobs SET state = 'queued', repairs = repairs + 1,
                                        expected_start_at = NULL, published_at = NULL,
                                        updated_at = now()
                        WHERE id = $1 RETURNING id, attempts)
                     INSERT INTO job_transitions (job_id, state, attempt, detail)
                     SELECT id, 'queued', attempts,
                            jsonb_build_object('reason', 'repaired', 'was', $2::text,
                                               'quiet_secs', $3::bigint)
                     FROM j",
                )
                .bind(id)
                .bind(&state)
                .bind(i64::try_from(quiet_s).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
                republish.push(env);
            }
            env => {
                let message = match &env {
                    Ok(_) => format!(
                        "its message was lost {repairs} times (nothing happened to the job for {quiet_s} s while it was {state}); failed so it stops waiting; once the cause is fixed: llmq dlq replay {id}"
                    ),
                    Err(e) => format!(
                        "its message was lost and its recorded envelope cannot be read ({e}); enqueue it again"
                    ),
                };
                let t = Transition {
                    state: JobState::Failed,
                    attempt: 0,
                    result: None,
                    error: Some(("lost", &message)),
                    evidence: None,
                    detail: Some(serde_json::json!({ "reason": "lost", "was": state })),
                };
                record(&mut *tx, JobId(id), &t).await?;
                let tenant = envelope
                    .0
                    .get("tenant")
                    .and_then(|t| t.as_str())
                    .unwrap_or_default()
                    .to_owned();
                dead.push((JobId(id), tenant, envelope.0, message));
            }
        }
    }
    tx.commit().await?;

    let mut published = Vec::with_capacity(republish.len());
    for env in republish {
        let body = env.encode();
        match llmq_producer_sdk::publish_job(channel, topology, &env, body).await {
            Ok(()) => published.push(env.id.0),
            Err(e) => {
                tracing::warn!(job_id = %env.id, error = %e, "could not republish a repaired job; the outbox sweep will");
            }
        }
    }
    if let Err(e) = sqlx::query(
        "UPDATE jobs SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL",
    )
    .bind(&published)
    .execute(pool)
    .await
    {
        // Harmless: a claim sets it too, and the outbox sweep's copy would be a duplicate
        // that claims turn away.
        tracing::warn!(error = %e, "could not mark repaired jobs published");
    }
    let done = Repaired {
        republished: published.len(),
        failed: dead.len(),
    };
    let mut failed = Vec::with_capacity(dead.len());
    for (id, tenant, envelope, message) in dead {
        // Best effort: the record already says failed, with the reason.
        let props = lapin::BasicProperties::default()
            .with_message_id(id.to_string().into())
            .with_content_type("application/json".into());
        let body = serde_json::to_vec(&envelope).unwrap_or_default();
        if let Err(e) = publisher.dead_letter(&body, &props, &message, "lost").await {
            tracing::warn!(job_id = %id, error = %e, "could not copy a lost job to the dead-letter queue; its record holds the reason");
        }
        failed.push((id, tenant));
    }
    Ok((done, failed))
}

/// Marks the live jobs a replica holds (deliveries it is working on: waiting for budget,
/// calling, retrying a store step) as seen now, so the repair sweep never takes a job that
/// is merely slow for lost. Touches only jobs not touched for `every`.
pub async fn touch_held(
    pool: &PgPool,
    held: &[uuid::Uuid],
    every: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    if held.is_empty() {
        return Ok(0);
    }
    let r = sqlx::query(
        "UPDATE jobs SET updated_at = now()
         WHERE id IN (SELECT id FROM jobs
                      WHERE id = ANY($1)
                        AND state IN ('queued', 'waiting_budget', 'running', 'retrying')
                        AND updated_at < now() - make_interval(secs => $2)
                      FOR UPDATE SKIP LOCKED)",
    )
    .bind(held)
    .bind(every.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}
