//! Faults the mock injects on demand, set at start (`MockConfig::faults`, CLI flags) or
//! at runtime (`PUT /_mock/faults`, [`crate::MockHandle::set_faults`]). Each answers the
//! way the real providers fail: same status, body and headers.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// What to break.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Fraction of requests answered `500 server_error`.
    pub error_rate: f64,
    /// Fraction answered overloaded (OpenAI `503`, Anthropic `529 overloaded_error`).
    pub overloaded_rate: f64,
    /// Fraction whose connection is reset mid-response.
    pub reset_rate: f64,
    /// Fraction answered `200` with a body cut short (not valid JSON).
    pub truncate_rate: f64,
    /// Every request answers `503` while true (an outage window).
    pub outage: bool,
    /// Every request stalls this long before answering (past a client's read timeout).
    pub stall_ms: u64,
    /// Keys answered `429 insufficient_quota` (Anthropic: spend limit).
    pub quota_keys: Vec<String>,
    /// Keys answered `401`.
    pub unauthorized_keys: Vec<String>,
    /// Keys answered `403` (no access to the model).
    pub forbidden_keys: Vec<String>,
    /// Context window: prompt + max_tokens above it is `400 context_length_exceeded`.
    pub context_limit: Option<u64>,
    /// Fraction of streamed answers that send half the text after their `200`, then an
    /// error event (OpenAI `server_error`, Anthropic `overloaded_error`) and end.
    pub stream_error_rate: f64,
    /// Streamed answers go silent this long after their first chunk (a stalled stream).
    pub stream_stall_ms: u64,
    /// Refuse connections for this long: the port is closed (connect gets `ECONNREFUSED`),
    /// then opens again. A one-shot window, started when set; reads back as 0 after.
    pub refuse_ms: u64,
}

/// A failure chosen for one request.
pub(crate) enum Injected {
    /// A complete error response.
    Answer(Response),
    /// Reset the connection after the status line.
    Reset,
    /// A 200 whose JSON body stops halfway.
    Truncate,
}

impl Faults {
    /// The failure for a request with `key` (OpenAI or Anthropic flavour), if any.
    pub(crate) fn pick(&self, key: &str, anthropic: bool) -> Option<Injected> {
        if self.unauthorized_keys.iter().any(|k| k == key) {
            return Some(Injected::Answer(if anthropic {
                anthropic_error(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "invalid x-api-key",
                )
            } else {
                openai_error(
                    StatusCode::UNAUTHORIZED,
                    "Incorrect API key provided.",
                    "invalid_request_error",
                    Some("invalid_api_key"),
                )
            }));
        }
        if self.forbidden_keys.iter().any(|k| k == key) {
            return Some(Injected::Answer(if anthropic {
                anthropic_error(
                    StatusCode::FORBIDDEN,
                    "permission_error",
                    "Your API key does not have permission to use the specified resource.",
                )
            } else {
                openai_error(
                    StatusCode::FORBIDDEN,
                    "You are not allowed to sample from this model",
                    "invalid_request_error",
                    Some("model_not_allowed"),
                )
            }));
        }
        if self.quota_keys.iter().any(|k| k == key) {
            return Some(Injected::Answer(if anthropic {
                anthropic_error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "You have reached your specified workspace API usage limits. You will regain access on 2026-12-01 at 00:00 UTC. (enforced_spend_limit_reached)")
            } else {
                openai_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
                    "insufficient_quota",
                    Some("insufficient_quota"),
                )
            }));
        }
        if self.outage {
            return Some(Injected::Answer(overloaded(
                anthropic,
                StatusCode::SERVICE_UNAVAILABLE,
            )));
        }
        let mut rng = rand::thread_rng();
        let r: f64 = rng.gen();
        let mut edge = self.error_rate;
        if r < edge {
            return Some(Injected::Answer(if anthropic {
                anthropic_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "api_error",
                    "Internal server error",
                )
            } else {
                openai_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "The server had an error while processing your request. Sorry about that!",
                    "server_error",
                    None,
                )
            }));
        }
        edge += self.overloaded_rate;
        if r < edge {
            let status = if anthropic {
                StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return Some(Injected::Answer(overloaded(anthropic, status)));
        }
        edge += self.reset_rate;
        if r < edge {
            return Some(Injected::Reset);
        }
        edge += self.truncate_rate;
        if r < edge {
            return Some(Injected::Truncate);
        }
        None
    }

    /// Whether this streamed answer breaks with an error event.
    pub(crate) fn stream_error(&self) -> bool {
        self.stream_error_rate > 0.0 && rand::thread_rng().gen::<f64>() < self.stream_error_rate
    }

    /// The silence after a stream's first chunk, if any.
    pub(crate) fn stream_stall(&self) -> Option<Duration> {
        (self.stream_stall_ms > 0).then(|| Duration::from_millis(self.stream_stall_ms))
    }

    /// The stall before answering, if any.
    pub(crate) fn stall(&self) -> Option<Duration> {
        (self.stall_ms > 0).then(|| Duration::from_millis(self.stall_ms))
    }
}

fn with_request_id(mut r: Response) -> Response {
    if let Ok(v) = HeaderValue::from_str(&crate::request_id()) {
        r.headers_mut().insert("x-request-id", v.clone());
        r.headers_mut().insert("request-id", v);
    }
    r
}

pub(crate) fn openai_error(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: Option<&str>,
) -> Response {
    with_request_id(
        (
            status,
            axum::Json(
                json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
            ),
        )
            .into_response(),
    )
}

pub(crate) fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    with_request_id(
        (
            status,
            axum::Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
        )
            .into_response(),
    )
}

fn overloaded(anthropic: bool, status: StatusCode) -> Response {
    if anthropic {
        anthropic_error(status, "overloaded_error", "Overloaded")
    } else {
        openai_error(
            status,
            "The server is overloaded or not ready yet.",
            "server_error",
            None,
        )
    }
}

/// A response whose connection breaks after the headers.
pub(crate) fn reset() -> Response {
    let stream = futures_util::stream::iter([
        Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"{\"id\":")),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset by mock",
        )),
    ]);
    with_request_id(
        (
            StatusCode::OK,
            [("content-type", "application/json")],
            Body::from_stream(stream),
        )
            .into_response(),
    )
}

/// A 200 with half a completion.
pub(crate) fn truncate() -> Response {
    with_request_id(
        (StatusCode::OK, [("content-type", "application/json")], "{\"id\":\"chatcmpl-x\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"half an ans")
            .into_response(),
    )
}

/// What a gateway answers after a stall.
pub(crate) fn gateway_timeout(anthropic: bool) -> Response {
    if anthropic {
        anthropic_error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            "Request timed out",
        )
    } else {
        openai_error(
            StatusCode::GATEWAY_TIMEOUT,
            "Gateway timeout.",
            "server_error",
            None,
        )
    }
}
