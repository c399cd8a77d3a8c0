//! `classify`: the one function from a provider answer (or transport error) to what
//! happens next. It reads the body and headers, not the status code alone.

use std::time::Duration;

use serde_json::Value;

use crate::provider::{CallError, ProviderReply};

/// What kind of failure, by the layer that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Provider rate limit (429 `rate_limit_exceeded` / `rate_limit_error`).
    RateLimited,
    /// Out of credit (429 `insufficient_quota`, Anthropic spend limit).
    QuotaExhausted,
    /// Bigger than the TPM limit itself.
    RequestTooLarge,
    /// 400 / 404 / 413 / 422.
    BadRequest,
    /// 401.
    Auth,
    /// 403.
    Permission,
    /// 5xx, 529, broken or truncated answers.
    Upstream,
    /// Connection refused/reset, DNS, TLS.
    Network,
    /// Connect or read timeout.
    Timeout,
}

impl ErrorClass {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::QuotaExhausted => "quota_exhausted",
            ErrorClass::RequestTooLarge => "request_too_large",
            ErrorClass::BadRequest => "bad_request",
            ErrorClass::Auth => "auth",
            ErrorClass::Permission => "permission",
            ErrorClass::Upstream => "upstream",
            ErrorClass::Network => "network",
            ErrorClass::Timeout => "timeout",
        }
    }

    /// The layer that failed, as an operator reads it.
    pub fn layer(self) -> &'static str {
        match self {
            ErrorClass::RateLimited => "rate_limit",
            ErrorClass::QuotaExhausted => "quota",
            ErrorClass::RequestTooLarge | ErrorClass::BadRequest => "request",
            ErrorClass::Auth | ErrorClass::Permission => "identity",
            ErrorClass::Upstream => "upstream",
            ErrorClass::Network | ErrorClass::Timeout => "network",
        }
    }

    /// Whether another attempt can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorClass::RateLimited
                | ErrorClass::Upstream
                | ErrorClass::Network
                | ErrorClass::Timeout
        )
    }
}

/// The evidence of one failed call (no secrets: bodies are provider error JSON).
#[derive(Debug, Clone)]
pub struct Failure {
    /// Class.
    pub class: ErrorClass,
    /// HTTP status, when there was a response.
    pub http_status: Option<u16>,
    /// Provider error type (`invalid_request_error`, …).
    pub error_type: Option<String>,
    /// Provider error code (`rate_limit_exceeded`, …).
    pub error_code: Option<String>,
    /// Message.
    pub message: String,
    /// Provider request id.
    pub request_id: Option<String>,
}

/// What to do with a job after a call.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Record the result.
    Succeeded(ProviderReply),
    /// Try again after the provider's delay (or our backoff when `None`).
    RetryAfter(Option<Duration>, Failure),
    /// Do not try again.
    Fatal(Failure),
}

/// Maps one call's result to an [`Outcome`].
pub fn classify(result: Result<ProviderReply, CallError>) -> Outcome {
    let failure = match result {
        Ok(reply) => return Outcome::Succeeded(reply),
        Err(CallError::Http {
            status,
            body,
            retry_after,
            request_id,
        }) => {
            let (error_type, error_code, message) = parse_error_body(&body);
            let class = class_of_http(
                status,
                error_type.as_deref(),
                error_code.as_deref(),
                &message,
            );
            let f = Failure {
                class,
                http_status: Some(status),
                error_type,
                error_code,
                message: if message.is_empty() {
                    format!("HTTP {status}")
                } else {
                    message
                },
                request_id,
            };
            if class.is_retryable() {
                return Outcome::RetryAfter(retry_after, f);
            }
            return Outcome::Fatal(f);
        }
        Err(CallError::Connect(m)) | Err(CallError::Transport(m)) => Failure {
            class: ErrorClass::Network,
            http_status: None,
            error_type: None,
            error_code: None,
            message: m,
            request_id: None,
        },
        Err(CallError::Timeout(m)) => Failure {
            class: ErrorClass::Timeout,
            http_status: None,
            error_type: None,
            error_code: None,
            message: m,
            request_id: None,
        },
        Err(CallError::Decode {
            status,
            message,
            error_type,
            request_id,
        }) => Failure {
            class: ErrorClass::Upstream,
            http_status: Some(status),
            error_type,
            error_code: None,
            message,
            request_id,
        },
    };
    Outcome::RetryAfter(None, failure)
}

fn class_of_http(
    status: u16,
    error_type: Option<&str>,
    code: Option<&str>,
    message: &str,
) -> ErrorClass {
    match status {
        429 => {
            let t = error_type.unwrap_or_default();
            let c = code.unwrap_or_default();
            if c == "insufficient_quota"
                || t == "insufficient_quota"
                || c == "enforced_spend_limit_reached"
                || message.contains("spend limit")
            {
                ErrorClass::QuotaExhausted
            } else if message.starts_with("Request too large") {
                ErrorClass::RequestTooLarge
            } else {
                ErrorClass::RateLimited
            }
        }
        400 | 404 | 413 | 422 => ErrorClass::BadRequest,
        401 => ErrorClass::Auth,
        403 => ErrorClass::Permission,
        _ => ErrorClass::Upstream,
    }
}

/// (type, code, message) from an OpenAI `{"error":{…}}` or Anthropic
/// `{"type":"error","error":{…}}` body; empty message for a non-JSON body.
fn parse_error_body(body: &str) -> (Option<String>, Option<String>, String) {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        let mut m = body.trim().to_owned();
        m.truncate(300);
        return (None, None, m);
    };
    let err = v.get("error").unwrap_or(&Value::Null);
    let s = |x: Option<&Value>| x.and_then(Value::as_str).map(str::to_owned);
    (
        s(err.get("type")),
        s(err.get("code")),
        s(err.get("message")).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, body: &str) -> Result<ProviderReply, CallError> {
        Err(CallError::Http {
            status,
            body: body.into(),
            retry_after: None,
            request_id: None,
        })
    }

    fn class(o: &Outcome) -> (Option<ErrorClass>, bool) {
        match o {
            Outcome::Succeeded(_) => (None, false),
            Outcome::RetryAfter(_, f) => (Some(f.class), true),
            Outcome::Fatal(f) => (Some(f.class), false),
        }
    }

    #[test]
    fn table() {
        let cases: &[(Result<ProviderReply, CallError>, ErrorClass, bool)] = &[
            (
                http(
                    429,
                    r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-x on requests per min (RPM): Limit 3, Used 3, Requested 1.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
                ),
                ErrorClass::RateLimited,
                true,
            ),
            (
                http(
                    429,
                    r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
                ),
                ErrorClass::QuotaExhausted,
                false,
            ),
            (
                http(
                    429,
                    r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#,
                ),
                ErrorClass::RateLimited,
                true,
            ),
            (
                http(
                    429,
                    r#"{"error":{"message":"Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 50000.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#,
                ),
                ErrorClass::RequestTooLarge,
                false,
            ),
            (
                http(
                    400,
                    r#"{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
                ),
                ErrorClass::BadRequest,
                false,
            ),
            (
                http(
                    401,
                    r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
                ),
                ErrorClass::Auth,
                false,
            ),
            (
                http(
                    403,
                    r#"{"type":"error","error":{"type":"permission_error","message":"no access"}}"#,
                ),
                ErrorClass::Permission,
                false,
            ),
            (
                http(
                    404,
                    r#"{"error":{"message":"The model `x` does not exist","type":"invalid_request_error","code":"model_not_found"}}"#,
                ),
                ErrorClass::BadRequest,
                false,
            ),
            (
                http(500, "Internal Server Error"),
                ErrorClass::Upstream,
                true,
            ),
            (
                http(
                    503,
                    r#"{"error":{"message":"The server is overloaded","type":"server_error"}}"#,
                ),
                ErrorClass::Upstream,
                true,
            ),
            (
                http(
                    529,
                    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
                ),
                ErrorClass::Upstream,
                true,
            ),
            (
                Err(CallError::Connect("connection refused".into())),
                ErrorClass::Network,
                true,
            ),
            (
                Err(CallError::Transport("connection reset by peer".into())),
                ErrorClass::Network,
                true,
            ),
            (
                Err(CallError::Timeout("operation timed out".into())),
                ErrorClass::Timeout,
                true,
            ),
            (
                Err(CallError::Decode {
                    status: 200,
                    message: "EOF while parsing".into(),
                    error_type: None,
                    request_id: None,
                }),
                ErrorClass::Upstream,
                true,
            ),
            (
                Err(CallError::Decode {
                    status: 200,
                    message: "error event after the 200: Overloaded".into(),
                    error_type: Some("overloaded_error".into()),
                    request_id: Some("req_1".into()),
                }),
                ErrorClass::Upstream,
                true,
            ),
        ];
        for (input, want, retry) in cases {
            let got = class(&classify(input.clone()));
            assert_eq!(got, (Some(*want), *retry), "{input:?}");
        }
    }
}
