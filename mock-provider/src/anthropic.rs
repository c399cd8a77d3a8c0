//! Anthropic `POST /v1/messages`, bodies and headers as Anthropic sends them.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::{reply, request_id, tokens, AppState};

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
    if !state.config.latency.is_zero() {
        tokio::time::sleep(state.config.latency).await;
    }
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim()
        .to_owned();
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
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
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
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        };
        input_tokens += tokens(&content) + 3;
        if m.get("role").and_then(Value::as_str) == Some("user") {
            last_user = content;
        }
    }
    let (content, cut) = reply(&last_user, Some(max_tokens));
    let output_tokens = tokens(&content);
    count(Some((input_tokens, output_tokens)));
    let rid = request_id();
    respond(
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
    )
}
