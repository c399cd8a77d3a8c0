//! `llmq dlq`: list, show and replay dead-lettered jobs.
//!
//! The dead-letter queue holds failed jobs (with `x-llmq-reason` and `x-llmq-error-class`
//! headers), messages no worker could read, and messages that exceeded the redelivery
//! limit. Listing takes the messages without acking and hands them back when done, so it
//! changes nothing. Replay resets a failed job to `queued` (keeping its attempt history,
//! with as many attempts again as it had), republishes it with confirms, and only then
//! removes its dead letter.

use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions};
use lapin::types::AMQPValue;
use llmq_producer_sdk::{JobEnvelope, JobId, Topology};
use secrecy::ExposeSecret;
use sqlx::PgPool;

use crate::settings::Settings;

/// One dead letter as an operator reads it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// The job, when the body is a readable envelope.
    pub job_id: Option<JobId>,
    /// Why it is here.
    pub reason: String,
    /// Error class.
    pub class: String,
    /// When it was dead-lettered.
    pub at: String,
    /// Body size.
    pub bytes: usize,
}

fn header(m: &BasicGetMessage, name: &str) -> Option<String> {
    m.delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)
        .and_then(|v| match v {
            AMQPValue::LongString(s) => Some(s.to_string()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        })
}

fn describe(m: &BasicGetMessage) -> DeadLetter {
    let job_id = JobEnvelope::decode(&m.delivery.data).ok().map(|e| e.id);
    let reason = header(m, "x-llmq-reason").unwrap_or_else(|| {
        if m.delivery
            .properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key("x-death"))
        {
            "exceeded the redelivery limit (it crashed or stalled workers)".into()
        } else {
            "no reason recorded".into()
        }
    });
    DeadLetter {
        job_id,
        reason,
        class: header(m, "x-llmq-error-class").unwrap_or_else(|| "unknown".into()),
        at: header(m, "x-llmq-dead-lettered-at").unwrap_or_default(),
        bytes: m.delivery.data.len(),
    }
}

/// Takes every dead letter (unacked) from a fresh channel.
async fn take_all(
    channel: &lapin::Channel,
    topology: &Topology,
) -> anyhow::Result<Vec<BasicGetMessage>> {
    let mut out = Vec::new();
    while let Some(m) = channel
        .basic_get(&topology.dead_queue(), BasicGetOptions::default())
        .await?
    {
        out.push(m);
    }
    Ok(out)
}

async fn open(
    settings: &Settings,
) -> anyhow::Result<(lapin::Connection, lapin::Channel, Topology)> {
    let conn =
        llmq_producer_sdk::connect_amqp(settings.amqp_url.expose_secret(), "llmq-dlq").await?;
    let channel = conn.create_channel().await?;
    let topology = Topology::new(settings.queue_prefix.clone());
    topology.declare(&channel).await?;
    Ok((conn, channel, topology))
}

/// Every dead letter, oldest first; the queue is left as it was.
pub async fn list(settings: &Settings) -> anyhow::Result<Vec<DeadLetter>> {
    let (conn, channel, topology) = open(settings).await?;
    let messages = take_all(&channel, &topology).await?;
    let out = messages.iter().map(describe).collect();
    // Closing the channel hands every unacked message back, in order.
    let _ = channel.close(200, "listed").await;
    let _ = conn.close(200, "done").await;
    Ok(out)
}

/// What `replay` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Jobs back on the work queue.
    pub replayed: Vec<JobId>,
    /// Dead letters left in place, with why.
    pub skipped: Vec<String>,
}

/// Replays the dead letter of `job` (or every one with `job = None`).
pub async fn replay(
    settings: &Settings,
    pool: &PgPool,
    job: Option<JobId>,
) -> anyhow::Result<Replayed> {
    let (conn, channel, topology) = open(settings).await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let messages = take_all(&channel, &topology).await?;
    let mut done = Replayed::default();
    for m in messages {
        let d = describe(&m);
        let wanted = job.is_none() || d.job_id == job;
        let Some(id) = d.job_id.filter(|_| wanted) else {
            if wanted {
                done.skipped.push(format!(
                    "unreadable message ({} bytes): {}",
                    d.bytes, d.reason
                ));
            }
            m.delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await?;
            continue;
        };
        match reset_for_replay(pool, id).await? {
            Some(envelope) => {
                llmq_producer_sdk::publish_job(&publish, &topology, &envelope, envelope.encode())
                    .await?;
                m.delivery.acker.ack(BasicAckOptions::default()).await?;
                done.replayed.push(id);
            }
            None => {
                done.skipped
                    .push(format!("job {id}: no record, or it is not failed"));
                m.delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await?;
            }
        }
    }
    if let Some(id) = job {
        if done.replayed.is_empty() && done.skipped.is_empty() {
            anyhow::bail!(
                "job {id} is not in the dead-letter queue; `llmq dlq list` shows what is"
            );
        }
    }
    let _ = channel.close(200, "replayed").await;
    let _ = conn.close(200, "done").await;
    Ok(done)
}

/// Puts a failed job back to `queued` with as many attempts again as it had; returns the
/// envelope to publish, or `None` when the job is missing or not failed.
async fn reset_for_replay(pool: &PgPool, id: JobId) -> anyhow::Result<Option<JobEnvelope>> {
    let mut tx = pool.begin().await?;
    let row: Option<(sqlx::types::Json<JobEnvelope>, i32, String)> =
        sqlx::query_as("SELECT envelope, attempts, state FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((envelope, attempts, state)) = row else {
        return Ok(None);
    };
    if state != "failed" {
        return Ok(None);
    }
    let mut envelope = envelope.0;
    envelope.max_attempts += u32::try_from(attempts).unwrap_or(0);
    sqlx::query(
        "UPDATE jobs SET state = 'queued', envelope = $2, max_attempts = $3, finished_at = NULL,
                         repairs = 0, updated_at = now()
         WHERE id = $1",
    )
    .bind(id.0)
    .bind(sqlx::types::Json(&envelope))
    .bind(i32::try_from(envelope.max_attempts).unwrap_or(i32::MAX))
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO job_transitions (job_id, state, attempt, detail) VALUES ($1, 'queued', $2, '{\"replayed\": true}')")
        .bind(id.0)
        .bind(attempts)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(envelope))
}

/// `llmq dlq …`
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List dead letters, oldest first (the queue is left as it was).
    List {
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead job: its reason, its record and every attempt's evidence.
    Show {
        /// Job id.
        id: String,
    },
    /// Put failed jobs back on the work queue.
    Replay {
        /// Job id to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Replay every dead job.
        #[arg(long)]
        all: bool,
    },
}

/// attempt, outcome, class, layer, http status, message, request id, latency, where, model
type EvidenceRow = (
    i32,
    String,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<String>,
    Option<String>,
    i32,
    String,
    String,
);

fn parse_id(id: &str) -> anyhow::Result<JobId> {
    id.parse().map_err(|_| {
        anyhow::anyhow!("`{id}` is not a job id (a UUID); `llmq dlq list` shows the ids")
    })
}

/// Runs one `llmq dlq` command, printing for an operator.
pub async fn run(settings: &Settings, pool: &PgPool, command: Command) -> anyhow::Result<()> {
    match command {
        Command::List { json } => {
            let letters = list(settings).await?;
            if json {
                for l in &letters {
                    println!("{}", serde_json::to_string(l)?);
                }
            } else {
                println!(
                    "{:<38} {:<18} {:<26} reason",
                    "job", "class", "dead-lettered at"
                );
                for l in &letters {
                    let id = l
                        .job_id
                        .map_or_else(|| "(unreadable)".to_owned(), |i| i.to_string());
                    println!("{id:<38} {:<18} {:<26} {}", l.class, l.at, l.reason);
                }
                println!("{} dead letter(s)", letters.len());
            }
        }
        Command::Show { id } => {
            let id = parse_id(&id)?;
            let letter = list(settings)
                .await?
                .into_iter()
                .find(|l| l.job_id == Some(id));
            match &letter {
                Some(l) => println!("dead letter: {} ({}) at {}", l.reason, l.class, l.at),
                None => println!("job {id} is not in the dead-letter queue"),
            }
            let status = llmq_producer_sdk::fetch_status(pool, id, None).await?;
            println!("record: {}", serde_json::to_string_pretty(&status)?);
            let attempts: Vec<EvidenceRow> = sqlx::query_as(
                "SELECT attempt, outcome, error_class, failed_layer, http_status, error_message, provider_request_id,
                        latency_ms, provider || ' ' || base_url_host || endpoint, model
                 FROM job_attempts WHERE job_id = $1 ORDER BY attempt",
            )
            .bind(id.0)
            .fetch_all(pool)
            .await?;
            for a in attempts {
                println!(
                    "attempt {}: {} class={} layer={} http={} latency={}ms at {} model={} request_id={} message={}",
                    a.0, a.1, a.2.unwrap_or_default(), a.3.unwrap_or_default(),
                    a.4.map(|s| s.to_string()).unwrap_or_else(|| "-".into()), a.7, a.8, a.9,
                    a.6.unwrap_or_else(|| "-".into()), a.5.unwrap_or_default()
                );
            }
        }
        Command::Replay { id, all } => {
            let job = match (id, all) {
                (Some(id), false) => Some(parse_id(&id)?),
                _ => None,
            };
            let done = replay(settings, pool, job).await?;
            for id in &done.replayed {
                println!("replayed {id}");
            }
            for s in &done.skipped {
                println!("skipped: {s}");
            }
            println!(
                "{} replayed, {} skipped",
                done.replayed.len(),
                done.skipped.len()
            );
        }
    }
    Ok(())
}
