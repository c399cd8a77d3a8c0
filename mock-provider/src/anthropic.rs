//! Anthropic `POST /v1/messages`, bodies and headers as Anthropic sends them.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::faults::Injected;
use crate::limits::{Charge, Dim, KeyBuckets, Refusal};
use crate::{reply, request_id, tokens, AppState};

/// `anthropic-ratelimit-*` headers (resets as RFC 3339 instants): requests (the minute
/// window, even when a shorter one is enforced too), input and output tokens, and
/// `tokens-*` for whichever of those two has the least room (the most restrictive).
fn ratelimit_headers(b: &KeyBuckets) -> HeaderMap {
    let mut h = HeaderMap::new();
    let now = chrono_like_now();
    let tokens = [&b.input, &b.output]
        .into_iter()
        .flatten()
        .min_by_key(|t| t.remaining());
    for (name, bucket) in [
        ("requests", b.requests.as_ref()),
        ("input-tokens", b.input.as_ref()),
        ("output-tokens", b.output.as_ref()),
        ("tokens", tokens),
    ] {
        let Some(bucket) = bucket else { continue };
        let reset = rfc3339(now + bucket.reset_in());
        let pairs = [
            (
                format!("anthropic-ratelimit-{name}-limit"),
                bucket.limit.to_string(),
            ),
            (
                format!("anthropic-ratelimit-{name}-remaining"),
                bucket.remaining().to_string(),
            ),
            (format!("anthropic-ratelimit-{name}-reset"), reset),
        ];
        for (k, v) in pairs {
            if let (Ok(k), Ok(v)) = (
                axum::http::HeaderName::try_from(k),
                HeaderValue::from_str(&v),
            ) {
                h.insert(k, v);
            }
        }
    }
    h
}

fn chrono_like_now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

/// RFC 3339 UTC with second precision, e.g. `2026-11-22T23:15:04Z`.
fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn respond(status: StatusCode, body: Value, rid: &str) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(rid) {
        resp.headers_mut().insert("request-id", v);
    }
    resp
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let rid = request_id();
    respond(
        status,
        json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": rid}),
        &rid,
    )
}

pub(crate) async fn messages(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim()
        .to_owned();
    let parsed = state.arrive(&key, &body);
    let faults = state.faults();
    if faults.hang {
        return crate::faults::hang().await;
    }
    let count = |usage: Option<(u64, u64)>| {
        if let Ok(mut s) = state.stats.lock() {
            s.count(&key, usage);
        }
    };
    if key.is_empty() {
        count(None);
        return error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "x-api-key header is required",
        );
    }
    if !state.key_ok(&key) {
        count(None);
        return error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid x-api-key",
        );
    }
    if headers.get("anthropic-version").is_none() {
        count(None);
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    if let Some(stall) = faults.stall() {
        tokio::time::sleep(stall).await;
        count(None);
        return crate::faults::gateway_timeout(true);
    }
    if let Some(injected) = faults.pick(&key, true) {
        count(None);
        return match injected {
            Injected::Answer(r) => r,
            Injected::Reset => crate::faults::reset(),
            Injected::Truncate => crate::faults::truncate(),
        };
    }
    let Some(req) = parsed else {
        count(None);
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "There was an error parsing the body of your request as JSON.",
        );
    };
    let Some(model) = req.get("model").and_then(Value::as_str) else {
        count(None);
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "model: Field required",
        );
    };
    let Some(max_tokens) = req.get("max_tokens").and_then(Value::as_u64) else {
        count(None);
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "max_tokens: Field required",
        );
    };
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if messages.is_empty() {
        count(None);
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "messages: at least one message is required",
        );
    }
    let mut input_tokens = req.get("system").and_then(Value::as_str).map_or(0, tokens);
    let mut last_user = String::new();
    for m in &messages {
        let content = crate::content_text(m.get("content"));
        input_tokens += tokens(&content) + 3;
        if m.get("role").and_then(Value::as_str) == Some("user") {
            last_user = content;
        }
    }
    let admission = state.admit(
        &key,
        model,
        Charge {
            input: input_tokens,
            output: max_tokens,
            ..Charge::default()
        },
    );
    let limit_headers = ratelimit_headers(&admission.buckets);
    let slot = match admission.decision {
        Ok(slot) => slot,
        Err(refused) => {
            let mut r = refusal(refused, model);
            r.headers_mut().extend(limit_headers);
            return r;
        }
    };
    state.log_admitted(input_tokens + max_tokens, model);
    if !state.config.latency.is_zero() {
        tokio::time::sleep(state.config.latency).await;
    }
    let (content, cut) = reply(&last_user, Some(max_tokens));
    let output_tokens = tokens(&content);
    count(Some((input_tokens, output_tokens)));
    let rid = request_id();
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let plan = crate::stream::Plan {
            events: sse_events(model, &content, cut, input_tokens, output_tokens),
            chunk_delay: state.config.chunk_delay,
            stall: faults.stream_stall(),
            error_event: faults.stream_error().then(|| {
                crate::stream::named(
                    "error",
                    &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
                )
            }),
            cut_mid_event: faults.stream_cut_mid_event(),
        };
        let mut ok = crate::stream::respond(plan, &rid);
        ok.headers_mut().extend(limit_headers);
        return crate::hold(ok, slot);
    }
    let mut ok = respond(
        StatusCode::OK,
        json!({
            "id": format!("msg_{}", uuid::Uuid::new_v4().simple()),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": content}],
            "stop_reason": if cut { "max_tokens" } else { "end_turn" },
            "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}
        }),
        &rid,
    );
    ok.headers_mut().extend(limit_headers);
    crate::hold(ok, slot)
}

/// The answer to a request the limiter refused, as Anthropic words it: 429
/// `rate_limit_error` naming the limit per minute with `retry-after` (a request larger
/// than a bucket could ever hold is a 400).
fn refusal(refused: Refusal, model: &str) -> Response {
    let contact = "You may also contact sales at https://claude.com/contact-sales to discuss your options for a rate limit increase.";
    match refused {
        Refusal::Busy { limit } => error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            &format!("Number of concurrent connections has exceeded your rate limit of {} concurrent requests (org: org-mock, model: {model}). Please try again later. {contact}", thousands(limit)),
        ),
        Refusal::TooLarge { dim, requested, .. } => error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("prompt is too long: {requested} tokens > the {} limit", dim_name(dim)),
        ),
        Refusal::Limited { dim, wait, limit, .. } => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                &format!("This request would exceed your organization's rate limit of {} {} per minute (org: org-mock, model: {model}). For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or try again later. {contact}", thousands(limit), dim_name(dim)),
            );
            if let Ok(v) = HeaderValue::from_str(&wait.as_secs_f64().ceil().max(1.0).to_string()) {
                r.headers_mut().insert("retry-after", v);
            }
            r
        }
    }
}

/// `1234567` as `1,234,567`, as Anthropic writes its limits.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut rest = digits.as_str();
    let mut groups = Vec::new();
    while rest.len() > 3 {
        let (head, group) = rest.split_at(rest.len() - 3);
        groups.push(group);
        rest = head;
    }
    groups.push(rest);
    groups.reverse();
    groups.join(",")
}

/// The events of a streamed message, as Anthropic sends them: `message_start` (with the
/// input usage), a text block of one delta per word with a `ping`, `message_delta` (stop
/// reason and output usage), `message_stop`.
fn sse_events(model: &str, content: &str, cut: bool, input: u64, output: u64) -> Vec<String> {
    use crate::stream::named;
    let mut events = vec![
        named(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": format!("msg_{}", uuid::Uuid::new_v4().simple()),
                "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": input, "output_tokens": 1}}}),
        ),
        named(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
        ),
        named("ping", &json!({"type": "ping"})),
    ];
    events.extend(crate::stream::words(content).map(|w| {
        named(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": w}}),
        )
    }));
    events.push(named(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(named(
        "message_delta",
        &json!({"type": "message_delta",
            "delta": {"stop_reason": if cut { "max_tokens" } else { "end_turn" }, "stop_sequence": null},
            "usage": {"output_tokens": output}}),
    ));
    events.push(named("message_stop", &json!({"type": "message_stop"})));
    events
}

fn dim_name(dim: Dim) -> &'static str {
    match dim {
        Dim::Requests => "requests",
        Dim::Input | Dim::Tokens => "input tokens",
        Dim::Output => "output tokens",
    }
}
