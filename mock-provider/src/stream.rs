//! Streamed (`text/event-stream`) answers, paced like a model writing: one event per
//! chunk, `MockConfig::chunk_delay` apart, with the streaming faults (an error event after
//! the 200, a stall after the first chunk, an end in the middle of an event).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;

/// How one stream is played out.
pub(crate) struct Plan {
    /// Complete SSE events (each ends with a blank line).
    pub events: Vec<String>,
    /// Pause before each event after the first.
    pub chunk_delay: Duration,
    /// After the first event, go silent this long (a stalled stream).
    pub stall: Option<Duration>,
    /// Replace the second half of the stream with this error event and end there.
    pub error_event: Option<String>,
    /// Unless `error_event`: after half the events, send the first half of the next one
    /// (cut inside its JSON) and end the body there.
    pub cut_mid_event: bool,
}

/// The 200 response playing `plan`, with the provider's request id.
pub(crate) fn respond(plan: Plan, request_id: &str) -> Response {
    let mut events = plan.events;
    if let Some(err) = plan.error_event {
        events.truncate(events.len() / 2);
        events.push(err);
    } else if plan.cut_mid_event {
        let keep = events.len() / 2;
        let half = events.get(keep).map(|e| half_event(e));
        events.truncate(keep);
        events.extend(half);
    }
    let delay = plan.chunk_delay;
    let stall = plan.stall;
    let stream = futures_util::stream::unfold(
        (events.into_iter(), 0usize),
        move |(mut it, n)| async move {
            let event = it.next()?;
            if n == 1 {
                if let Some(s) = stall {
                    tokio::time::sleep(s).await;
                }
            }
            if n > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Some((Ok::<_, std::io::Error>(Bytes::from(event)), (it, n + 1)))
        },
    );
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", v.clone());
        h.insert("request-id", v);
    }
    resp
}

/// The first half of `event`, cut inside its `data:` JSON (no terminating blank line).
fn half_event(event: &str) -> String {
    let json = event.find("data: ").map_or(0, |i| i + "data: ".len());
    let mut cut = json + (event.len() - json) / 2;
    while !event.is_char_boundary(cut) {
        cut -= 1;
    }
    event.get(..cut).unwrap_or(event).to_owned()
}

/// `data: <json>` followed by a blank line (OpenAI's framing).
pub(crate) fn data(json: &serde_json::Value) -> String {
    format!("data: {json}\n\n")
}

/// `event: <name>` + `data: <json>` (Anthropic's framing).
pub(crate) fn named(name: &str, json: &serde_json::Value) -> String {
    format!("event: {name}\ndata: {json}\n\n")
}

/// The words of `content` as chunks (each keeps its trailing space).
pub(crate) fn words(content: &str) -> impl Iterator<Item = &str> {
    content.split_inclusive(' ')
}
