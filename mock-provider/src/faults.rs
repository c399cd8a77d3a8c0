//! Faults the mock injects on demand, set at start (`MockConfig::faults`, CLI flags) or
//! at runtime (`PUT /_mock/faults`, [`crate::MockHandle::set_faults`]). Each answers the
//! way the real providers fail: same status, body and headers; and some the way hostile
//! ones do (huge multi-byte error bodies, absurd `retry-after`, bodies that never end,
//! streams cut mid-event, requests never answered).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
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
    /// When > 0, the 5xx fault answers (`error_rate`, `overloaded_rate`, `outage`) carry
    /// an error message of about this many bytes of multi-byte text (CJK with emoji, 3 and
    /// 4 bytes a character) in the provider's error object (OpenAI
    /// `{"error":{"message":…,"type":"server_error",…}}`, Anthropic
    /// `{"type":"error","error":{"type":…,"message":…}}`): for clients that cut bodies at
    /// a byte offset, which lands inside a character.
    pub huge_error_body_bytes: usize,
    /// With `huge_error_body_bytes`, send that text alone as `text/plain` (a body that is
    /// not JSON) instead of the error object.
    pub huge_error_body_raw: bool,
    /// When set, every 429, 503 and 529 answer (faults and rate limits, both APIs) carries
    /// `retry-after` and `retry-after-ms` with exactly this text instead of the computed
    /// values (e.g. `"1e300"`, `"-5"`, `"NaN"`, `""`); neither is sent when the text is not
    /// a valid header value.
    pub retry_after: Option<String>,
    /// Fraction of requests answered `200` (`application/json`) with a body that never
    /// ends: the start of a completion, then 8 KB of filler inside its text every 5 ms
    /// until the client goes away.
    pub endless_body_rate: f64,
    /// Every request answers `503` with an error body that never ends (the start of the
    /// provider's error object, then filler inside its message, as `endless_body_rate`).
    pub endless_error_body: bool,
    /// Fraction of streamed answers that send half their events, then the first half of
    /// the next one (cut inside its `data:` JSON, no blank line) and end the body cleanly.
    pub stream_cut_mid_event_rate: f64,
    /// Every completion request is read (and counted) but never answered: it waits until
    /// the client goes away.
    pub hang: bool,
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
        if self.endless_error_body {
            return Some(Injected::Answer(endless_error(anthropic)));
        }
        if self.outage {
            return Some(Injected::Answer(self.server_fault(
                anthropic,
                StatusCode::SERVICE_UNAVAILABLE,
                true,
            )));
        }
        let mut rng = rand::thread_rng();
        let r: f64 = rng.gen();
        let mut edge = self.error_rate;
        if r < edge {
            return Some(Injected::Answer(self.server_fault(
                anthropic,
                StatusCode::INTERNAL_SERVER_ERROR,
                false,
            )));
        }
        edge += self.overloaded_rate;
        if r < edge {
            let status = if anthropic {
                StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return Some(Injected::Answer(self.server_fault(anthropic, status, true)));
        }
        edge += self.reset_rate;
        if r < edge {
            return Some(Injected::Reset);
        }
        edge += self.truncate_rate;
        if r < edge {
            return Some(Injected::Truncate);
        }
        edge += self.endless_body_rate;
        if r < edge {
            return Some(Injected::Answer(endless_body(anthropic)));
        }
        None
    }

    /// A 5xx fault answer (internal error, or overloaded when `overload`): the provider's
    /// own body, or the huge multi-byte one.
    fn server_fault(&self, anthropic: bool, status: StatusCode, overload: bool) -> Response {
        if self.huge_error_body_bytes > 0 {
            let kind = if overload {
                "overloaded_error"
            } else {
                "api_error"
            };
            let text = multibyte_text(self.huge_error_body_bytes);
            return huge_error(anthropic, status, kind, &text, self.huge_error_body_raw);
        }
        if overload {
            overloaded(anthropic, status)
        } else {
            internal_error(anthropic)
        }
    }

    /// Puts `retry_after`, verbatim, in place of the computed `retry-after` and
    /// `retry-after-ms` of a 429, 503 or 529 answer.
    pub(crate) fn override_retry_after(&self, resp: &mut Response) {
        let Some(value) = &self.retry_after else {
            return;
        };
        if !matches!(resp.status().as_u16(), 429 | 503 | 529) {
            return;
        }
        let valid = HeaderValue::from_str(value).ok();
        let h = resp.headers_mut();
        for name in ["retry-after", "retry-after-ms"] {
            h.remove(name);
            if let Some(v) = &valid {
                h.insert(name, v.clone());
            }
        }
    }

    /// Whether this streamed answer breaks with an error event.
    pub(crate) fn stream_error(&self) -> bool {
        chance(self.stream_error_rate)
    }

    /// Whether this streamed answer stops in the middle of an event.
    pub(crate) fn stream_cut_mid_event(&self) -> bool {
        chance(self.stream_cut_mid_event_rate)
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

fn chance(rate: f64) -> bool {
    rate > 0.0 && rand::thread_rng().gen::<f64>() < rate
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

fn internal_error(anthropic: bool) -> Response {
    if anthropic {
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
    }
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

/// What a 5xx answer's huge body repeats: 3-byte CJK and 4-byte emoji.
const MULTIBYTE: &str = "服务器暂时不可用，请稍后再试。🙏🔥";

/// Repeats [`MULTIBYTE`] up to `bytes` bytes (a few less: it ends on a whole character).
fn multibyte_text(bytes: usize) -> String {
    let mut text = String::with_capacity(bytes);
    for c in MULTIBYTE.chars().cycle() {
        if text.len() + c.len_utf8() > bytes {
            break;
        }
        text.push(c);
    }
    text
}

/// A 5xx whose error message is `text`: in the provider's error object (`kind` is
/// Anthropic's error type), or alone as `text/plain` when `raw`.
fn huge_error(anthropic: bool, status: StatusCode, kind: &str, text: &str, raw: bool) -> Response {
    if raw {
        with_request_id(
            (
                status,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                text.to_owned(),
            )
                .into_response(),
        )
    } else if anthropic {
        anthropic_error(status, kind, text)
    } else {
        openai_error(status, text, "server_error", None)
    }
}

/// The filler an endless body sends, and how often.
static FILLER: [u8; 8192] = [b'x'; 8192];
const FILLER_EVERY: Duration = Duration::from_millis(5);

/// A JSON answer that starts with `prefix` and never ends. The filler is generated as the
/// body is polled, with no task of its own: when the client goes away the connection
/// drops the body and the generator with it.
fn endless(status: StatusCode, prefix: &'static str) -> Response {
    let head = futures_util::stream::iter([Bytes::from_static(prefix.as_bytes())]);
    let filler = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(FILLER_EVERY).await;
        Some((Bytes::from_static(&FILLER), ()))
    });
    let body = futures_util::StreamExt::map(
        futures_util::StreamExt::chain(head, filler),
        Ok::<_, std::convert::Infallible>,
    );
    with_request_id(
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            Body::from_stream(body),
        )
            .into_response(),
    )
}

/// A 200 whose completion never ends (filler inside its text).
fn endless_body(anthropic: bool) -> Response {
    endless(
        StatusCode::OK,
        if anthropic {
            r#"{"id":"msg_mock","type":"message","role":"assistant","model":"mock","content":[{"type":"text","text":""#
        } else {
            r#"{"id":"chatcmpl-mock","object":"chat.completion","model":"mock","choices":[{"index":0,"message":{"role":"assistant","content":""#
        },
    )
}

/// A 503 whose error object never ends (filler inside its message).
fn endless_error(anthropic: bool) -> Response {
    endless(
        StatusCode::SERVICE_UNAVAILABLE,
        if anthropic {
            r#"{"type":"error","error":{"type":"overloaded_error","message":""#
        } else {
            r#"{"error":{"type":"server_error","param":null,"code":null,"message":""#
        },
    )
}

/// An answer that never comes: waits until the client goes away (the connection drops
/// this future).
pub(crate) async fn hang() -> Response {
    std::future::pending().await
}
