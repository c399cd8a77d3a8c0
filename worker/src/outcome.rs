//! `classify`: the one function from a provider answer (or transport error) to what
//! happens next. It reads the body and headers, not the status code alone.

use std::sync::LazyLock;
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

    /// Whether this route can never serve the job (the key is out of quota or refused, or
    /// may not use the model), so the job's next route should be tried at once.
    pub fn route_cannot_serve(self) -> bool {
        matches!(
            self,
            ErrorClass::QuotaExhausted | ErrorClass::Auth | ErrorClass::Permission
        )
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

/// The longest provider message kept as evidence, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1000;

/// The longest prefix of `s` that is at most `max_bytes` long and ends on a character
/// boundary (a byte offset can fall inside a multi-byte character).
pub fn cut(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Key-like strings providers echo in their errors: API keys (whole or masked),
/// organisation and project ids, bearer tokens.
static SECRET_LIKE: LazyLock<Option<regex::Regex>> = LazyLock::new(|| {
    regex::Regex::new(
        r"(?i)\b(?:sk|rk|pk)[-_][A-Za-z0-9_*\-.]{4,}|\b(?:org|proj|acct)[-_][A-Za-z0-9]{6,}|\bbearer\s+\S+|\b[A-Za-z0-9_\-]{32,}\b",
    )
    .ok()
});

/// `message` with whatever looks like a key or an account id replaced by `[redacted]`, so
/// evidence can be recorded, logged and shown to tenants.
pub fn redact(message: &str) -> String {
    match SECRET_LIKE.as_ref() {
        Some(re) => re.replace_all(message, "[redacted]").into_owned(),
        None => message.to_owned(),
    }
}

/// A provider's text made fit for the record: redacted (before it is cut, so no key is
/// left half-matched at the cut), cut on a character boundary.
fn evidence_text(message: &str) -> String {
    let redacted = redact(message);
    let cut_to = cut(&redacted, MAX_MESSAGE_BYTES);
    let mut text = storable(cut_to.to_owned());
    if cut_to.len() < redacted.len() {
        text.push_str(" …");
    }
    text
}

/// `s` without U+0000, which PostgreSQL cannot store (a provider may send it in any text):
/// each becomes U+FFFD.
pub fn storable(s: String) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s
    }
}

fn storable_opt(s: Option<String>) -> Option<String> {
    s.map(storable)
}

/// Maps one call's result to an [`Outcome`].
pub fn classify(result: Result<ProviderReply, CallError>) -> Outcome {
    let failure = classify_failure(result);
    match failure {
        Ok(reply) => Outcome::Succeeded(ProviderReply {
            content: storable(reply.content),
            finish_reason: storable_opt(reply.finish_reason),
            model: storable(reply.model),
            request_id: storable_opt(reply.request_id),
            ..reply
        }),
        Err((after, mut f)) => {
            f.message = evidence_text(&f.message);
            f.error_type = storable_opt(f.error_type);
            f.error_code = storable_opt(f.error_code);
            f.request_id = storable_opt(f.request_id);
            if f.class.is_retryable() {
                Outcome::RetryAfter(after, f)
            } else {
                Outcome::Fatal(f)
            }
        }
    }
}

type Classified = Result<ProviderReply, (Option<Duration>, Failure)>;

fn classify_failure(result: Result<ProviderReply, CallError>) -> Classified {
    let failure = match result {
        Ok(reply) => return Ok(reply),
        Err(CallError::Http {
            status,
            body,
            retry_after,
            request_id,
            ..
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
            return Err((retry_after, f));
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
    Err((None, failure))
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
        return (None, None, cut(body.trim(), 300).to_owned());
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
            remaining: Default::default(),
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
    fn huge_non_ascii_bodies_are_cut_on_character_boundaries() {
        let cjk = "服务器暂时不可用，请稍后再试。🙂".repeat(600);
        let json = format!(r#"{{"error":{{"message":"{cjk}","type":"server_error"}}}}"#);
        for body in [cjk.as_str(), json.as_str(), cut(&cjk, 4097)] {
            let Outcome::RetryAfter(_, f) = classify(http(503, body)) else {
                panic!("a 503 is retried");
            };
            assert_eq!(f.class, ErrorClass::Upstream);
            assert!(f.message.len() <= MAX_MESSAGE_BYTES + 4);
        }
        for n in 0..12 {
            assert!(cut("é🙂x", n).len() <= n);
        }
    }

    #[test]
    fn nul_characters_never_reach_the_record() {
        let reply = ProviderReply {
            content: "a\0b".into(),
            finish_reason: Some("st\0p".into()),
            model: "m\0".into(),
            request_id: Some("req\0".into()),
            usage: Default::default(),
            status: 200,
            remaining: Default::default(),
        };
        let Outcome::Succeeded(r) = classify(Ok(reply)) else {
            panic!("a reply succeeds");
        };
        assert_eq!(r.content, "a\u{FFFD}b");
        assert!(!format!("{r:?}").contains("\\0"));
        let Outcome::RetryAfter(_, f) = classify(http(
            500,
            "{\"error\":{\"message\":\"bad\\u0000news\",\"type\":\"server\\u0000error\"}}",
        )) else {
            panic!("a 500 is retried");
        };
        assert!(!f.message.contains('\0') && !f.error_type.unwrap_or_default().contains('\0'));
    }

    #[test]
    fn key_like_text_is_redacted_from_evidence() {
        let body = r#"{"error":{"message":"Incorrect API key provided: sk-proj-abc***wxyz. Organization org-AbCdEf123456 has no access. Authorization: Bearer sk-live-secret","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        let Outcome::Fatal(f) = classify(http(401, body)) else {
            panic!("401 is fatal");
        };
        assert!(!f.message.contains("sk-"), "{}", f.message);
        assert!(!f.message.contains("org-AbCdEf"), "{}", f.message);
        assert!(
            f.message.starts_with("Incorrect API key provided"),
            "{}",
            f.message
        );
        assert_eq!(
            redact("Rate limit reached for gpt-4o on requests per min (RPM): Limit 3"),
            "Rate limit reached for gpt-4o on requests per min (RPM): Limit 3"
        );
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
