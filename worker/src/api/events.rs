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
//! came after that event. The stream wakes on the worker's notices (see
//! [`crate::live`]) and re-checks every second in any case.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures_util::Stream;
use llmq_producer_sdk::{JobId, JobState};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};

use super::{ApiError, AppState};

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
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = super::parse_id(&id)?;
    super::visible(&state, &caller, id).await?;
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
    loop {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT seq, state, at, attempt, detail FROM job_transitions
             WHERE job_id = $1 ORDER BY seq",
        )
        .bind(id.0)
        .fetch_all(&state.pool)
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
            if let Ok(mut status) = state.producer.client().status(id).await {
                super::add_eta(state, &mut status).await;
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
            if let Ok(status) = state.producer.client().status(id).await {
                let data = serde_json::to_string(&status).unwrap_or_default();
                send(tx, Event::default().event("result").data(data)).await?;
            }
            return Ok(());
        }
        tokio::select! {
            () = wait_for(&mut wake, id.0, Duration::from_secs(1)) => {}
            // Shutting down: end the stream; the client resumes with Last-Event-ID.
            () = state.hub.shutdown.cancelled() => return Ok(()),
        }
        if tx.is_closed() {
            return Err(Ended::Gone);
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
