//! The producer client: enqueue, read status, wait for a result.
//!
//! Enqueue flow: validate → insert the durable record (idempotent per tenant key) →
//! publish with publisher confirms → on any broker refusal delete the record, so a failed
//! enqueue leaves nothing half-written.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::protocol::{CompletionResult, ErrorSummary, JobEnvelope, JobId, JobState, JobStatus};
use crate::topology::Topology;
use crate::validate::{validate, Limits};
use crate::NewJob;

/// Settings of a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `amqp://user:pass@host:5672/vhost`
    pub amqp_url: String,
    /// `postgres://user:pass@host:5432/db`
    pub database_url: String,
    /// Queue/exchange name prefix; must match the workers'.
    pub queue_prefix: String,
    /// Bounds checked before anything is written.
    pub limits: Limits,
    /// Database connections kept open.
    pub max_db_connections: u32,
}

impl ClientConfig {
    /// Defaults (`llmq` prefix, default limits) for these URLs.
    pub fn new(amqp_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            database_url: database_url.into(),
            queue_prefix: "llmq".into(),
            limits: Limits::default(),
            max_db_connections: 10,
        }
    }
}

/// The result of [`Client::enqueue_envelope`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enqueued {
    /// The job's id (the first job's, for a repeated idempotency key).
    pub id: JobId,
    /// True when the idempotency key matched an existing job and nothing new was enqueued.
    pub duplicate: bool,
}

/// Enqueues jobs and reads their status. Cheap to clone; share one per process.
///
/// ```no_run
/// # async fn run() -> Result<(), llmq_producer_sdk::Error> {
/// use std::time::Duration;
/// use llmq_producer_sdk::{ChatMessage, Client, NewJob};
///
/// let client = Client::connect(
///     "amqp://guest:guest@127.0.0.1:5672/%2f",
///     "postgres://postgres:postgres@127.0.0.1:5432/llmq",
/// )
/// .await?;
/// let id = client
///     .enqueue(NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("Say hi")]).max_tokens(64))
///     .await?;
/// let done = client.wait(id, Duration::from_secs(60)).await?;
/// println!("{}: {:?}", done.state, done.result.map(|r| r.content));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    events: Arc<tokio::sync::OnceCell<crate::watch::Listener>>,
    pool: PgPool,
    broker: Arc<tokio::sync::RwLock<Broker>>,
    amqp_url: Arc<str>,
    topology: Topology,
    limits: Limits,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("topology", &self.topology)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects with default settings.
    pub async fn connect(amqp_url: &str, database_url: &str) -> Result<Self> {
        Self::connect_with(ClientConfig::new(amqp_url, database_url)).await
    }

    /// Connects with explicit settings, declares the broker topology and checks the schema.
    pub async fn connect_with(config: ClientConfig) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(config.max_db_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&config.database_url)
            .await
            .map_err(|e| Error::Connect {
                service: "PostgreSQL",
                reason: e.to_string(),
            })?;
        Self::connect_with_pool(config, pool).await
    }

    /// Like [`Client::connect_with`], reusing an existing database pool.
    pub async fn connect_with_pool(config: ClientConfig, pool: PgPool) -> Result<Self> {
        let present: Option<String> = sqlx::query_scalar("SELECT to_regclass('jobs')::text")
            .fetch_one(&pool)
            .await?;
        if present.is_none() {
            return Err(Error::SchemaMissing("table `jobs` does not exist".into()));
        }
        let topology = Topology::new(config.queue_prefix);
        let broker = Broker::open(&config.amqp_url, &topology).await?;
        Ok(Self {
            events: Arc::new(tokio::sync::OnceCell::new()),
            pool,
            broker: Arc::new(tokio::sync::RwLock::new(broker)),
            amqp_url: config.amqp_url.into(),
            topology,
            limits: config.limits,
        })
    }

    /// Whether the broker channel is open.
    pub async fn is_connected(&self) -> bool {
        self.broker.read().await.channel.status().connected()
    }

    /// The confirm-mode channel, reopened (once, for all callers) after the broker
    /// connection was lost, e.g. by a broker restart.
    async fn channel(&self) -> Result<Channel> {
        {
            let b = self.broker.read().await;
            if b.channel.status().connected() {
                return Ok(b.channel.clone());
            }
        }
        let mut b = self.broker.write().await;
        if !b.channel.status().connected() {
            tracing::warn!("broker connection lost; reconnecting");
            *b = Broker::open(&self.amqp_url, &self.topology).await?;
        }
        Ok(b.channel.clone())
    }

    /// The limits enqueued jobs are checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Enqueues a job and returns its id at once. With an idempotency key already used by
    /// this tenant, returns the first job's id and enqueues nothing.
    pub async fn enqueue(&self, job: NewJob) -> Result<JobId> {
        Ok(self.enqueue_envelope(job.into_envelope()).await?.id)
    }

    /// Enqueues a ready envelope (used by the HTTP API).
    pub async fn enqueue_envelope(&self, envelope: JobEnvelope) -> Result<Enqueued> {
        validate(&envelope, &self.limits)?;
        let body = envelope.encode();
        let inserted: Option<Uuid> = sqlx::query_scalar(
            "WITH j AS (
                INSERT INTO jobs (id, tenant, idempotency_key, state, model, priority,
                                  max_attempts, envelope, deadline, created_at)
                VALUES ($1, $2, $3, 'queued', $4, $5, $6, $7, $8, $9)
                ON CONFLICT (tenant, idempotency_key) DO NOTHING
                RETURNING id, created_at)
             INSERT INTO job_transitions (job_id, state, at)
             SELECT id, 'queued', created_at FROM j
             RETURNING job_id",
        )
        .bind(envelope.id.0)
        .bind(&envelope.tenant)
        .bind(&envelope.idempotency_key)
        .bind(&envelope.route.model)
        .bind(i16::from(envelope.priority))
        .bind(i32::try_from(envelope.max_attempts).unwrap_or(i32::MAX))
        .bind(sqlx::types::Json(&envelope))
        .bind(envelope.deadline)
        .bind(envelope.created_at)
        .fetch_optional(&self.pool)
        .await?;

        if inserted.is_none() {
            let existing: Uuid = sqlx::query_scalar(
                "SELECT id FROM jobs WHERE tenant = $1 AND idempotency_key = $2",
            )
            .bind(&envelope.tenant)
            .bind(&envelope.idempotency_key)
            .fetch_one(&self.pool)
            .await?;
            return Ok(Enqueued {
                id: JobId(existing),
                duplicate: true,
            });
        }

        if let Err(e) = self.publish(&envelope, body).await {
            // Nothing half-written: the job never existed.
            sqlx::query("DELETE FROM jobs WHERE id = $1")
                .bind(envelope.id.0)
                .execute(&self.pool)
                .await?;
            return Err(e);
        }
        // The `queued` transition for push-style listeners; not waited for (the record and
        // the job's message are what count).
        self.announce_queued(&envelope).await;
        // Best effort: if this write is lost, a worker's sweep republishes the job, and the
        // duplicate delivery is recognised and dropped.
        if let Err(e) = sqlx::query("UPDATE jobs SET published_at = now() WHERE id = $1")
            .bind(envelope.id.0)
            .execute(&self.pool)
            .await
        {
            tracing::warn!(job_id = %envelope.id, error = %e, "could not mark the job published");
        }
        Ok(Enqueued {
            id: envelope.id,
            duplicate: false,
        })
    }

    async fn publish(&self, envelope: &JobEnvelope, body: Vec<u8>) -> Result<()> {
        let channel = self.channel().await?;
        publish_job(&channel, &self.topology, envelope, body).await
    }

    /// The job's status, whichever tenant owns it.
    pub async fn status(&self, id: JobId) -> Result<JobStatus> {
        fetch_status(&self.pool, id, None)
            .await?
            .ok_or(Error::NotFound(id))
    }

    /// The job's status if `tenant` owns it; [`Error::NotFound`] otherwise.
    pub async fn status_for_tenant(&self, id: JobId, tenant: &str) -> Result<JobStatus> {
        fetch_status(&self.pool, id, Some(tenant))
            .await?
            .ok_or(Error::NotFound(id))
    }

    /// Cancels a job that is `queued`, `waiting_budget` or `retrying`: it becomes
    /// `cancelled` and no provider call is made for it afterwards (a worker holding a
    /// budget reservation for it gives the reservation back). A running or finished job is
    /// [`Error::NotCancellable`].
    pub async fn cancel(&self, id: JobId) -> Result<JobStatus> {
        self.cancel_inner(id, None).await
    }

    /// [`Client::cancel`] for a job `tenant` owns; [`Error::NotFound`] otherwise.
    pub async fn cancel_for_tenant(&self, id: JobId, tenant: &str) -> Result<JobStatus> {
        self.cancel_inner(id, Some(tenant)).await
    }

    async fn cancel_inner(&self, id: JobId, tenant: Option<&str>) -> Result<JobStatus> {
        let cancelled: Option<(String, i32)> = sqlx::query_as(
            "WITH j AS (
                UPDATE jobs SET state = 'cancelled', finished_at = now(), updated_at = now(),
                                error_class = 'cancelled',
                                error_message = 'cancelled before it ran to the end'
                WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)
                  AND state IN ('queued', 'waiting_budget', 'retrying')
                RETURNING id, tenant, attempts)
             INSERT INTO job_transitions (job_id, state, attempt)
             SELECT id, 'cancelled', attempts FROM j
             RETURNING (SELECT tenant FROM j), attempt",
        )
        .bind(id.0)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        let Some((owner, attempt)) = cancelled else {
            let status = fetch_status(&self.pool, id, tenant)
                .await?
                .ok_or(Error::NotFound(id))?;
            return Err(Error::NotCancellable {
                id,
                state: status.state,
            });
        };
        // Tell the fleet (a worker waiting for budget for this job lets go at once) and
        // push-style listeners. The record above is what counts: a lost event only means
        // the worker notices when it next looks at the job.
        let event = crate::JobEvent::new(
            id,
            owner,
            JobState::Cancelled,
            u32::try_from(attempt).unwrap_or(0),
        );
        if let Err(e) = self.publish_event(&event).await {
            tracing::warn!(job_id = %id, error = %e, "could not publish the cancellation event");
        }
        fetch_status(&self.pool, id, tenant)
            .await?
            .ok_or(Error::NotFound(id))
    }

    /// The `queued` transition for push-style listeners; its confirm is awaited off the
    /// caller's path (the record and the job's message are what count, and an unawaited
    /// confirm would be kept by the channel forever).
    async fn announce_queued(&self, envelope: &JobEnvelope) {
        let event = crate::JobEvent {
            at: envelope.created_at,
            ..crate::JobEvent::new(envelope.id, envelope.tenant.clone(), JobState::Queued, 0)
        };
        match self.send_event(&event).await {
            Ok(confirm) => {
                tokio::spawn(async move {
                    let _ = confirm.await;
                });
            }
            Err(e) => {
                tracing::debug!(job_id = %envelope.id, error = %e, "could not publish the queued event");
            }
        }
    }

    async fn publish_event(&self, event: &crate::JobEvent) -> Result<()> {
        self.send_event(event).await?.await?;
        Ok(())
    }

    /// Publishes `event` on the events exchange; the confirm is the caller's to await.
    async fn send_event(
        &self,
        event: &crate::JobEvent,
    ) -> Result<lapin::publisher_confirm::PublisherConfirm> {
        let channel = self.channel().await?;
        let body = serde_json::to_vec(event).unwrap_or_default();
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(event.job_id.to_string().into());
        Ok(channel
            .basic_publish(
                &self.topology.events_exchange(),
                &event.routing_key(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?)
    }

    /// Waits until the job reaches a terminal state, or `timeout` passes. Woken by the
    /// job's events on the events exchange; reads the record once a second as well, so a
    /// lost event or a broker outage only makes it slower.
    pub async fn wait(&self, id: JobId, timeout: Duration) -> Result<JobStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Subscribe before reading, so an event between the two is not missed.
        let mut rx = self.subscribe().await;
        loop {
            let status = self.status(id).await?;
            if status.state.is_terminal() {
                return Ok(status);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    id,
                    state: status.state,
                });
            }
            crate::watch::until_event(&mut rx, id, crate::watch::FALLBACK_POLL.min(deadline - now))
                .await;
        }
    }

    /// The job's transitions as they happen, from the first (`queued`) on, ending after
    /// the terminal one (which carries the result or the error). Each is read from the
    /// job's recorded history, so none is missed or repeated; the events exchange only
    /// says when to look. (Text as it is generated is on the HTTP API's
    /// `GET /v1/jobs/{id}/events`.)
    pub fn events(
        &self,
        id: JobId,
    ) -> impl futures_util::Stream<Item = Result<crate::JobEvent>> + '_ {
        struct Follow {
            rx: Option<tokio::sync::broadcast::Receiver<crate::JobEvent>>,
            last_seq: i64,
            pending: std::collections::VecDeque<crate::JobEvent>,
            done: bool,
        }
        let start = Follow {
            rx: None,
            last_seq: 0,
            pending: std::collections::VecDeque::new(),
            done: false,
        };
        futures_util::stream::unfold(start, move |mut f| async move {
            loop {
                if let Some(e) = f.pending.pop_front() {
                    return Some((Ok(e), f));
                }
                if f.done {
                    return None;
                }
                let rx = match &mut f.rx {
                    Some(rx) => rx,
                    None => f.rx.insert(self.subscribe().await),
                };
                if f.last_seq > 0 {
                    crate::watch::until_event(rx, id, crate::watch::FALLBACK_POLL).await;
                }
                match self.history_since(id, f.last_seq).await {
                    Ok(events) => {
                        for (seq, e) in events {
                            f.last_seq = seq;
                            f.done |= e.state.is_terminal();
                            f.pending.push_back(e);
                            if f.done {
                                break;
                            }
                        }
                        if f.last_seq == 0 {
                            // Not even `queued`: no such job.
                            f.done = true;
                            return Some((Err(Error::NotFound(id)), f));
                        }
                    }
                    Err(e) => {
                        f.done = true;
                        return Some((Err(e), f));
                    }
                }
            }
        })
    }

    async fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::JobEvent> {
        self.events
            .get_or_init(|| async {
                crate::watch::start(self.amqp_url.to_string(), self.topology.clone())
            })
            .await
            .events
            .subscribe()
    }

    /// Transitions of `id` after `seq`, as events (the terminal one with its result or
    /// error).
    async fn history_since(&self, id: JobId, seq: i64) -> Result<Vec<(i64, crate::JobEvent)>> {
        let rows: Vec<(i64, String, DateTime<Utc>, i32, String)> = sqlx::query_as(
            "SELECT t.seq, t.state, t.at, t.attempt, j.tenant FROM job_transitions t
             JOIN jobs j ON j.id = t.job_id
             WHERE t.job_id = $1 AND t.seq > $2 ORDER BY t.seq",
        )
        .bind(id.0)
        .bind(seq)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (seq, state, at, attempt, tenant) in rows {
            let state: JobState = state.parse().map_err(|e: crate::protocol::UnknownState| {
                Error::Database(sqlx::Error::Decode(e.into()))
            })?;
            let (result, error) = if state.is_terminal() {
                let s = self.status(id).await?;
                (s.result, s.last_error)
            } else {
                (None, None)
            };
            out.push((
                seq,
                crate::JobEvent {
                    at,
                    result,
                    error,
                    ..crate::JobEvent::new(id, tenant, state, u32::try_from(attempt).unwrap_or(0))
                },
            ));
        }
        Ok(out)
    }
}

/// The producer's broker connection and its confirm-mode channel.
struct Broker {
    channel: Channel,
    _connection: Connection,
}

impl Broker {
    async fn open(url: &str, topology: &Topology) -> Result<Self> {
        let connection = connect_amqp(url, "llmq-producer").await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        topology.declare(&channel).await?;
        Ok(Self {
            channel,
            _connection: connection,
        })
    }
}

/// Opens an AMQP connection driven by the current tokio runtime.
pub async fn connect_amqp(url: &str, name: &str) -> Result<Connection> {
    let props = ConnectionProperties::default()
        .with_connection_name(name.into())
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    Connection::connect(url, props)
        .await
        .map_err(|e| Error::Connect {
            service: "RabbitMQ",
            reason: e.to_string(),
        })
}

/// Reads one job's status; `tenant` restricts it to that owner.
pub async fn fetch_status(
    pool: &PgPool,
    id: JobId,
    tenant: Option<&str>,
) -> Result<Option<JobStatus>> {
    let row = sqlx::query(
        "SELECT id, tenant, state, model, attempts, max_attempts, created_at, updated_at,
                finished_at, expected_start_at, result, error_class, error_message,
                envelope->'metadata' AS metadata, queue_seq,
                CASE WHEN state = 'queued' THEN
                    (SELECT min(q.queue_seq) FROM jobs q
                     WHERE q.state = 'queued' AND q.published_at IS NOT NULL)
                END AS head_seq,
                CASE WHEN state = 'retrying' THEN
                    (SELECT (t.detail->>'next_attempt_at')::timestamptz FROM job_transitions t
                     WHERE t.job_id = jobs.id ORDER BY t.seq DESC LIMIT 1)
                END AS next_attempt_at
         FROM jobs WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)",
    )
    .bind(id.0)
    .bind(tenant)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let state: String = row.try_get("state")?;
    let state: JobState = state.parse().map_err(|e: crate::protocol::UnknownState| {
        Error::Database(sqlx::Error::Decode(e.into()))
    })?;
    let result: Option<sqlx::types::Json<CompletionResult>> = row.try_get("result")?;
    let error_class: Option<String> = row.try_get("error_class")?;
    let error_message: Option<String> = row.try_get("error_message")?;
    let metadata: Option<sqlx::types::Json<serde_json::Map<String, serde_json::Value>>> =
        row.try_get("metadata")?;
    let attempts: i32 = row.try_get("attempts")?;
    let max_attempts: i32 = row.try_get("max_attempts")?;
    let queue_seq: i64 = row.try_get("queue_seq")?;
    let head_seq: Option<i64> = row.try_get("head_seq")?;
    // Tickets from the head of the line to this job (an upper bound: a job that left the
    // line out of order still counts until the head passes it).
    let position = (state == JobState::Queued)
        .then(|| u64::try_from(queue_seq - head_seq.unwrap_or(queue_seq).min(queue_seq) + 1).ok())
        .flatten();
    Ok(Some(JobStatus {
        id: JobId(row.try_get("id")?),
        tenant: row.try_get("tenant")?,
        state,
        model: row.try_get("model")?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        max_attempts: u32::try_from(max_attempts).unwrap_or(0),
        created_at: row.try_get::<DateTime<Utc>, _>("created_at")?,
        updated_at: row.try_get::<DateTime<Utc>, _>("updated_at")?,
        finished_at: row.try_get("finished_at")?,
        expected_start_at: match state {
            JobState::WaitingBudget => row.try_get("expected_start_at")?,
            JobState::Retrying => row.try_get("next_attempt_at")?,
            _ => None,
        },
        position,
        result: result.map(|j| j.0),
        last_error: error_class.map(|class| ErrorSummary {
            class,
            message: error_message.unwrap_or_default(),
        }),
        metadata: metadata.map(|m| m.0).unwrap_or_default(),
    }))
}

/// Publishes a job's envelope to the work queue and waits for the broker's confirm.
/// `channel` must be in confirm mode.
pub async fn publish_job(
    channel: &Channel,
    topology: &Topology,
    envelope: &JobEnvelope,
    body: Vec<u8>,
) -> Result<()> {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-llmq-version"),
        AMQPValue::LongUInt(envelope.version),
    );
    headers.insert(
        ShortString::from("x-llmq-tenant"),
        AMQPValue::LongString(envelope.tenant.clone().into()),
    );
    if let Some(tc) = &envelope.trace_context {
        headers.insert(
            ShortString::from("traceparent"),
            AMQPValue::LongString(tc.traceparent.clone().into()),
        );
    }
    let props = BasicProperties::default()
        .with_message_id(envelope.id.to_string().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let confirm = channel
        .basic_publish(
            "",
            &topology.work_queue(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            props,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(Error::NotConfirmed(
            envelope.id,
            "work queue missing; message returned",
        )),
        Confirmation::Nack(_) => Err(Error::NotConfirmed(
            envelope.id,
            "broker nacked the message",
        )),
        Confirmation::NotRequested => Err(Error::NotConfirmed(envelope.id, "confirms not enabled")),
    }
}
