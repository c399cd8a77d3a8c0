//! `GET /v1/jobs/{id}/events`: Server-Sent Events of a job.
//!
//! Events, in order:
//! - `state` (id `<seq>`): each recorded transition (`{job_id, state, at, attempt,
//!   detail}`), from `job_transitions`, so none is ever missed;
//! - `delta` (id `<seq>.<offset>`): text the model wrote during the attempt whose
//!   `running` transition is `<seq>` (`{attempt, text}`); `<offset>` is the byte length of
//!   that attempt's text so far. A new `running` state starts a new text;
//! - `position` (no id): while queued, the place in line and expected start
//!   (`{position, expected_start_at}`), whenever they change;
//! - `result` (no id): the job's full status once it is terminal; the stream then ends.
//!
//! A client that reconnects with `Last-Event-ID` (or `?last_event_id=`) gets exactly what
//! came after that event.
//!
//! Streams are a bounded resource: at most `api.max_event_streams` are open at once (one
//! more is `503 too_many_streams` with a `Retry-After`), and they read PostgreSQL through
//! a small pool of their own (`api.events_db_connections`), never the one enqueues use. A
//! stream reads only when woken: by the worker's notices (see [`crate::live`]), or by the
//! one shared poller ([`Streams`]), which checks every watched job's last transition (and
//! the head of the queue, for places in line) each second in a single query; a stream
//! also re-reads on its own every [`RECHECK_EVERY`] in case a wake-up was lost.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures_util::Stream;
use llmq_producer_sdk::{JobId, JobState};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{ApiError, AppState};

/// What a refused stream is told to wait, in seconds (`Retry-After`).
pub(crate) const RETRY_AFTER_SECS: u16 = 5;
/// How often the shared poller looks at every watched job.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How often a stream re-reads on its own, whatever it was told.
const RECHECK_EVERY: Duration = Duration::from_secs(5);

/// The open event streams: their cap, their database pool and the jobs they watch.
pub(crate) struct Streams {
    permits: Arc<Semaphore>,
    max: u32,
    /// The streams' own pool.
    pool: PgPool,
    /// Watched job → followers, and the last transition and head of the queue seen.
    watched: Mutex<HashMap<uuid::Uuid, Watched>>,
}

#[derive(Default)]
struct Watched {
    followers: usize,
    /// (last transition's seq, whether it is `queued`), once polled.
    last: Option<(i64, bool)>,
}

/// A stream's place among the open ones; gives it back when dropped.
pub(crate) struct Slot {
    streams: Arc<Streams>,
    job: uuid::Uuid,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut w) = self.streams.watched.lock() {
            if let Some(entry) = w.get_mut(&self.job) {
                entry.followers = entry.followers.saturating_sub(1);
                if entry.followers == 0 {
                    w.remove(&self.job);
                }
            }
        }
    }
}

impl Streams {
    /// Up to `max` streams reading through `pool`; the shared poller wakes them through
    /// `hub` until `shutdown`.
    pub(crate) fn start(
        max: u32,
        pool: PgPool,
        hub: crate::live::Hub,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let streams = Arc::new(Self {
            permits: Arc::new(Semaphore::new(usize::try_from(max).unwrap_or(usize::MAX))),
            max,
            pool,
            watched: Mutex::new(HashMap::new()),
        });
        tokio::spawn(poll(streams.clone(), hub, shutdown));
        streams
    }

    /// A place for one more stream following `job`, if the cap allows.
    fn open(self: &Arc<Self>, job: uuid::Uuid) -> Result<Slot, ApiError> {
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyStreams(self.max))?;
        if let Ok(mut w) = self.watched.lock() {
            w.entry(job).or_default().followers += 1;
        }
        Ok(Slot {
            streams: self.clone(),
            job,
            _permit: permit,
        })
    }
}

/// The shared poller: one query a second for every watched job's last transition (and
/// one for the head of the queue when a watched job is queued); wakes the followers of
/// each job where either moved.
async fn poll(streams: Arc<Streams>, hub: crate::live::Hub, shutdown: CancellationToken) {
    let mut head: Option<i64> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(POLL_EVERY) => {}
        }
        let (ids, any_queued): (Vec<uuid::Uuid>, bool) = match streams.watched.lock() {
            Ok(w) => (
                w.keys().copied().collect(),
                w.values().any(|v| v.last.is_none_or(|(_, queued)| queued)),
            ),
            Err(_) => continue,
        };
        if ids.is_empty() {
            continue;
        }
        let last: Vec<(uuid::Uuid, i64, String)> = match sqlx::query_as(
            "SELECT DISTINCT ON (job_id) job_id, seq, state FROM job_transitions
             WHERE job_id = ANY($1) ORDER BY job_id, seq DESC",
        )
        .bind(&ids)
        .fetch_all(&streams.pool)
        .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %e, "event streams' poll failed; trying again");
                continue;
            }
        };
        let mut head_moved = false;
        if any_queued {
            let now: Option<i64> = sqlx::query_scalar(
                "SELECT min(queue_seq) FROM jobs WHERE state = 'queued' AND published_at IS NOT NULL",
            )
            .fetch_one(&streams.pool)
            .await
            .unwrap_or(head);
            head_moved = now != head;
            head = now;
        }
        let mut wake = Vec::new();
        if let Ok(mut w) = streams.watched.lock() {
            for (job, seq, state) in last {
                let Some(entry) = w.get_mut(&job) else {
                    continue;
                };
                let now = (seq, state == "queued");
                if entry.last != Some(now) || (now.1 && head_moved) {
                    entry.last = Some(now);
                    wake.push(job);
                }
            }
        }
        for job in wake {
            hub.poke(job);
        }
    }
}

/// Where a follower stands: the last transition sent, and within a `running` one, how
/// much of its text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Cursor {
    seq: i64,
    offset: Option<usize>,
}

impl Cursor {
    /// `<seq>` or `<seq>.<offset>`; anything else starts from the beginning.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let (seq, offset) = match s.trim().split_once('.') {
            Some((a, b)) => (a.parse().ok()?, Some(b.parse().ok()?)),
            None => (s.trim().parse().ok()?, None),
        };
        Some(Self { seq, offset })
    }
}

#[derive(Deserialize)]
pub(crate) struct EventsQuery {
    #[serde(default)]
    last_event_id: Option<String>,
}

#[derive(sqlx::FromRow)]
struct Row {
    seq: i64,
    state: String,
    at: DateTime<Utc>,
    attempt: i32,
    detail: Option<serde_json::Value>,
}

pub(crate) async fn job_events(
    State(state): State<AppState>,
    caller: super::Caller,
    super::JobIdPath(id): super::JobIdPath,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::BadRequest("bad_query", e.body_text()))?;
    // The cap first: refusing costs nothing, not even a database read.
    let slot = state.streams.open(id.0)?;
    super::visible(&state.streams.pool, &caller, id).await?;
    let cursor = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(q.last_event_id)
        .and_then(|s| Cursor::parse(&s))
        .unwrap_or_default();
    let (tx, rx) = mpsc::channel::<Event>(64);
    let wake = state.hub.subscribe();
    tokio::spawn(async move {
        let _slot = slot;
        state.metrics.streams.inc();
        if let Err(e) = follow(&state, id, cursor, wake, &tx).await {
            tracing::debug!(job = %id, error = %e, "event stream ended early");
        }
        state.metrics.streams.dec();
    });
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The stream's reader went away.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("client disconnected")]
    Gone,
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

async fn send(tx: &mpsc::Sender<Event>, e: Event) -> Result<(), Ended> {
    tx.send(e).await.map_err(|_| Ended::Gone)
}

async fn follow(
    state: &AppState,
    id: JobId,
    mut cursor: Cursor,
    mut wake: broadcast::Receiver<uuid::Uuid>,
    tx: &mpsc::Sender<Event>,
) -> Result<(), Ended> {
    // The attempt whose text is being relayed: (running seq, attempt).
    let mut text: Option<(i64, u32)> = None;
    let mut first = true;
    let mut last_place = None;
    let pool = &state.streams.pool;
    loop {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT seq, state, at, attempt, detail FROM job_transitions
             WHERE job_id = $1 ORDER BY seq",
        )
        .bind(id.0)
        .fetch_all(pool)
        .await?;
        if first {
            first = false;
            // Resuming inside a running attempt: carry on with its text.
            if let Some(r) = rows.iter().find(|r| r.seq == cursor.seq) {
                if r.state == "running" {
                    text = Some((r.seq, u32::try_from(r.attempt).unwrap_or(0)));
                    cursor.offset = Some(cursor.offset.unwrap_or(0));
                }
            }
        }
        let mut terminal = rows
            .iter()
            .rev()
            .find(|r| r.seq <= cursor.seq)
            .is_some_and(|r| is_terminal(&r.state));
        let from = cursor.seq;
        for r in rows.iter().filter(|r| r.seq > from) {
            // Whatever text the previous attempt still has comes before this transition.
            if let Some((seq, attempt)) = text.take() {
                relay_text(state, id, seq, attempt, &mut cursor, tx).await?;
            }
            let data = serde_json::json!({
                "job_id": id,
                "state": r.state,
                "at": r.at,
                "attempt": r.attempt,
                "detail": r.detail,
            });
            send(
                tx,
                Event::default()
                    .event("state")
                    .id(r.seq.to_string())
                    .data(data.to_string()),
            )
            .await?;
            cursor = Cursor {
                seq: r.seq,
                offset: None,
            };
            if r.state == "running" {
                text = Some((r.seq, u32::try_from(r.attempt).unwrap_or(0)));
                cursor.offset = Some(0);
            }
            terminal = is_terminal(&r.state);
            if terminal {
                break;
            }
        }
        if let Some((seq, attempt)) = text {
            relay_text(state, id, seq, attempt, &mut cursor, tx).await?;
        }
        if rows.last().is_some_and(|r| r.state == "queued") {
            if let Ok(Some(mut status)) = llmq_producer_sdk::fetch_status(pool, id, None).await {
                super::add_eta(state, pool, &mut status).await;
                let now = (
                    status.position,
                    status.expected_start_at.map(|t| t.timestamp()),
                );
                if status.state == JobState::Queued && last_place != Some(now) {
                    last_place = Some(now);
                    let data = serde_json::json!({
                        "position": status.position,
                        "expected_start_at": status.expected_start_at,
                    });
                    send(
                        tx,
                        Event::default().event("position").data(data.to_string()),
                    )
                    .await?;
                }
            }
        }
        if terminal {
            if let Ok(Some(status)) = llmq_producer_sdk::fetch_status(pool, id, None).await {
                let data = serde_json::to_string(&status).unwrap_or_default();
                send(tx, Event::default().event("result").data(data)).await?;
            }
            return Ok(());
        }
        tokio::select! {
            () = wait_for(&mut wake, id.0, RECHECK_EVERY) => {}
            // The reader went away: give its place back now.
            () = tx.closed() => return Err(Ended::Gone),
            // Shutting down: end the stream; the client resumes with Last-Event-ID.
            () = state.hub.shutdown.cancelled() => return Ok(()),
        }
    }
}

fn is_terminal(state: &str) -> bool {
    state
        .parse::<JobState>()
        .map(|s| s.is_terminal())
        .unwrap_or(false)
}

/// Sends the text of `attempt` after the cursor's offset, if any.
async fn relay_text(
    state: &AppState,
    id: JobId,
    seq: i64,
    attempt: u32,
    cursor: &mut Cursor,
    tx: &mpsc::Sender<Event>,
) -> Result<(), Ended> {
    let offset = cursor.offset.unwrap_or(0);
    let (new, read) = state.hub.text_from(id.0, attempt, offset).await;
    if read == 0 {
        return Ok(());
    }
    let end = offset + read;
    let data = serde_json::json!({"attempt": attempt, "text": new});
    send(
        tx,
        Event::default()
            .event("delta")
            .id(format!("{seq}.{end}"))
            .data(data.to_string()),
    )
    .await?;
    *cursor = Cursor {
        seq,
        offset: Some(end),
    };
    Ok(())
}

/// Until news of `job` arrives or `max` passes.
async fn wait_for(wake: &mut broadcast::Receiver<uuid::Uuid>, job: uuid::Uuid, max: Duration) {
    let _ = tokio::time::timeout(max, async {
        loop {
            match wake.recv().await {
                Ok(id) if id == job => return,
                Ok(_) => {}
                // Missed some: one of them may have been ours.
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => {
                    tokio::time::sleep(max).await;
                    return;
                }
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::Cursor;

    #[test]
    fn cursor_parses_transition_and_text_positions() {
        assert_eq!(
            Cursor::parse("42"),
            Some(Cursor {
                seq: 42,
                offset: None
            })
        );
        assert_eq!(
            Cursor::parse("42.17"),
            Some(Cursor {
                seq: 42,
                offset: Some(17)
            })
        );
        assert_eq!(Cursor::parse("x"), None);
        assert_eq!(Cursor::parse("4.x"), None);
    }
}
