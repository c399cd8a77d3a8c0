//! OpenAI `POST /v1/chat/completions`, bodies and headers as OpenAI sends them.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::faults::Injected;
use crate::limits::{openai_duration, Charge, Dim, KeyBuckets, Refusal};
use crate::{reply, request_id, tokens, AppState};

/// `x-ratelimit-*` headers as OpenAI sends them on every response (requests: the minute
/// window, even when a shorter one is enforced too).
fn ratelimit_headers(b: &KeyBuckets) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, bucket) in [("requests", &b.requests), ("tokens", &b.tokens)] {
        let Some(bucket) = bucket else { continue };
        let pairs = [
            (
                format!("x-ratelimit-limit-{name}"),
                bucket.limit.to_string(),
            ),
            (
                format!("x-ratelimit-remaining-{name}"),
                bucket.remaining().to_string(),
            ),
            (
                format!("x-ratelimit-reset-{name}"),
                openai_duration(bucket.reset_in()),
            ),
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

fn respond(status: StatusCode, body: Value, started: std::time::Instant) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&request_id()) {
        h.insert("x-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&started.elapsed().as_millis().to_string()) {
        h.insert("openai-processing-ms", v);
    }
    resp
}

fn error(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
    started: std::time::Instant,
) -> Response {
    respond(
        status,
        json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
        started,
    )
}

fn masked(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 8 {
        return "***".into();
    }
    let head: String = chars[..5].iter().collect();
    let tail: String = chars[chars.len() - 3..].iter().collect();
    format!("{head}***{tail}")
}

pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
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
        return error(StatusCode::UNAUTHORIZED, "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", "invalid_request_error", None, None, started);
    }
    if !state.key_ok(&key) {
        count(None);
        let msg = format!("Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.", masked(&key));
        return error(
            StatusCode::UNAUTHORIZED,
            &msg,
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
            started,
        );
    }
    if let Some(stall) = faults.stall() {
        tokio::time::sleep(stall).await;
        count(None);
        return crate::faults::gateway_timeout(false);
    }
    if let Some(injected) = faults.pick(&key, false) {
        count(None);
        return match injected {
            Injected::Answer(r) => r,
            Injected::Reset => crate::faults::reset(),
            Injected::Truncate => crate::faults::truncate(),
        };
    }
    let Some(req) = parsed else {
        count(None);
        return error(StatusCode::BAD_REQUEST, "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)", "invalid_request_error", None, None, started);
    };
    let Some(model) = req.get("model").and_then(Value::as_str) else {
        count(None);
        return error(
            StatusCode::BAD_REQUEST,
            "you must provide a model parameter",
            "invalid_request_error",
            None,
            None,
            started,
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
            "[] is too short - 'messages'",
            "invalid_request_error",
            Some("messages"),
            None,
            started,
        );
    }
    let mut prompt_tokens = 0;
    let mut last_user = String::new();
    for (i, m) in messages.iter().enumerate() {
        let Some(role) = m.get("role").and_then(Value::as_str) else {
            count(None);
            let param = format!("messages[{i}].role");
            return error(
                StatusCode::BAD_REQUEST,
                &format!("Missing required parameter: '{param}'."),
                "invalid_request_error",
                Some(&param),
                Some("missing_required_parameter"),
                started,
            );
        };
        let content = crate::content_text(m.get("content"));
        prompt_tokens += tokens(&content) + 4;
        if role == "user" {
            last_user = content;
        }
    }
    let max_tokens = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64);
    if let Some(limit) = faults.context_limit {
        let asked = prompt_tokens + max_tokens.unwrap_or(0);
        if asked > limit {
            count(None);
            let msg = format!(
                "This model's maximum context length is {limit} tokens. However, you requested {asked} tokens ({prompt_tokens} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
                max_tokens.unwrap_or(0)
            );
            return error(
                StatusCode::BAD_REQUEST,
                &msg,
                "invalid_request_error",
                Some("messages"),
                Some("context_length_exceeded"),
                started,
            );
        }
    }
    // Admission: the prompt plus max_tokens, charged up front as OpenAI does.
    let charged = prompt_tokens + max_tokens.unwrap_or(0);
    let admission = state.admit(
        &key,
        model,
        Charge {
            tokens: charged,
            ..Charge::default()
        },
    );
    let limit_headers = ratelimit_headers(&admission.buckets);
    let slot = match admission.decision {
        Ok(slot) => slot,
        Err(refused) => {
            let mut r = refusal(refused, model, started);
            r.headers_mut().extend(limit_headers);
            return r;
        }
    };
    state.log_admitted(charged, model);
    if !state.config.latency.is_zero() {
        tokio::time::sleep(state.config.latency).await;
    }
    let (content, cut) = reply(&last_user, max_tokens);
    let completion_tokens = tokens(&content);
    count(Some((prompt_tokens, completion_tokens)));
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        let events = sse_events(&Completion {
            model,
            created,
            content: &content,
            cut,
            usage: include_usage.then_some((prompt_tokens, completion_tokens)),
        });
        let plan = crate::stream::Plan {
            events,
            chunk_delay: state.config.chunk_delay,
            stall: faults.stream_stall(),
            error_event: faults.stream_error().then(|| {
                crate::stream::data(&json!({"error": {
                    "message": "The server had an error while processing your request. Sorry about that!",
                    "type": "server_error", "param": null, "code": null}}))
            }),
            cut_mid_event: faults.stream_cut_mid_event(),
        };
        let mut ok = crate::stream::respond(plan, &request_id());
        if let Ok(v) = HeaderValue::from_str(&started.elapsed().as_millis().to_string()) {
            ok.headers_mut().insert("openai-processing-ms", v);
        }
        ok.headers_mut().extend(limit_headers);
        return crate::hold(ok, slot);
    }
    let mut ok = respond(
        StatusCode::OK,
        json!({
            "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": null},
                "logprobs": null,
                "finish_reason": if cut { "length" } else { "stop" }
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens
            },
            "system_fingerprint": "fp_mock"
        }),
        started,
    );
    ok.headers_mut().extend(limit_headers);
    crate::hold(ok, slot)
}

/// The 429 for a request the limiter refused, as OpenAI words it: `error.type` names the
/// dimension (`requests` or `tokens`), `retry-after(-ms)` when it would fit.
fn refusal(refused: Refusal, model: &str, started: std::time::Instant) -> Response {
    let rate_limit = |message: &str, kind: &str| {
        error(
            StatusCode::TOO_MANY_REQUESTS,
            message,
            kind,
            None,
            Some("rate_limit_exceeded"),
            started,
        )
    };
    match refused {
        Refusal::Busy { limit } => rate_limit(
            &format!("Too many concurrent requests for {model} in organization org-mock: Limit {limit} concurrent requests. Please wait for a request in flight to finish and try again."),
            "requests",
        ),
        Refusal::TooLarge {
            dim,
            requested,
            limit,
        } => rate_limit(
            &format!("Request too large for {model} in organization org-mock on {}: Limit {limit}, Requested {requested}. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.", dim_words(dim)),
            "tokens",
        ),
        Refusal::Limited {
            dim,
            wait,
            requested,
            limit,
            used,
        } => {
            let kind = if dim == Dim::Requests {
                "requests"
            } else {
                "tokens"
            };
            let mut r = rate_limit(
                &format!("Rate limit reached for {model} in organization org-mock on {}: Limit {limit}, Used {used}, Requested {requested}. Please try again in {}. Visit https://platform.openai.com/account/rate-limits to learn more.", dim_words(dim), openai_duration(wait)),
                kind,
            );
            let h = r.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&wait.as_secs_f64().ceil().max(1.0).to_string()) {
                h.insert("retry-after", v);
            }
            if let Ok(v) = HeaderValue::from_str(&wait.as_millis().max(1).to_string()) {
                h.insert("retry-after-ms", v);
            }
            r
        }
    }
}

fn dim_words(dim: Dim) -> &'static str {
    match dim {
        Dim::Requests => "requests per min (RPM)",
        _ => "tokens per min (TPM)",
    }
}

/// A finished completion, for the streamed answer.
struct Completion<'a> {
    model: &'a str,
    created: u64,
    content: &'a str,
    cut: bool,
    /// `(prompt, completion)` when `stream_options.include_usage` asked for it.
    usage: Option<(u64, u64)>,
}

/// The `text/event-stream` events, as OpenAI streams them: a role chunk, one chunk per
/// word, a chunk with `finish_reason`, the usage chunk (empty `choices`) when asked for,
/// then `data: [DONE]`.
fn sse_events(c: &Completion<'_>) -> Vec<String> {
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let chunk = |delta: Value, finish: Option<&str>| {
        let mut v = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": c.created,
            "model": c.model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        });
        if c.usage.is_some() {
            v["usage"] = Value::Null;
        }
        v
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    )];
    events
        .extend(crate::stream::words(c.content).map(|word| chunk(json!({"content": word}), None)));
    events.push(chunk(
        json!({}),
        Some(if c.cut { "length" } else { "stop" }),
    ));
    if let Some((p, k)) = c.usage {
        events.push(json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": c.created,
            "model": c.model,
            "system_fingerprint": "fp_mock",
            "choices": [],
            "usage": {"prompt_tokens": p, "completion_tokens": k, "total_tokens": p + k}
        }));
    }
    let mut out: Vec<String> = events.iter().map(crate::stream::data).collect();
    out.push("data: [DONE]\n\n".to_owned());
    out
}
