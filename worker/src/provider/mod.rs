//! Provider adapters: one file per provider behind one trait. An adapter turns a job's
//! chat request into one HTTP call and the answer into a [`ProviderReply`] or a
//! [`CallError`] carrying the evidence [`crate::outcome::classify`] needs.

mod anthropic;
mod http;
mod openai;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use llmq_producer_sdk::{ChatRequest, Usage};
use reqwest::header::HeaderMap;

use crate::settings::{ProviderKind, ProviderSettings};

pub use anthropic::Anthropic;
pub use openai::OpenAi;

/// A successful completion as the provider returned it.
#[derive(Debug, Clone)]
pub struct ProviderReply {
    /// Generated text.
    pub content: String,
    /// Why generation stopped.
    pub finish_reason: Option<String>,
    /// Model that answered.
    pub model: String,
    /// Provider request id.
    pub request_id: Option<String>,
    /// Token usage.
    pub usage: Usage,
    /// HTTP status (200).
    pub status: u16,
    /// What the provider says is left of its limits (`x-ratelimit-remaining-*`).
    pub remaining: Remaining,
}

/// Remaining budget as the provider reports it in response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Remaining {
    /// Requests left.
    pub requests: Option<u64>,
    /// Tokens left (OpenAI).
    pub tokens: Option<u64>,
    /// Input tokens left (Anthropic).
    pub input_tokens: Option<u64>,
    /// Output tokens left (Anthropic).
    pub output_tokens: Option<u64>,
    /// The limits those counts are out of (`x-ratelimit-limit-*`), in the same order.
    pub limits: [Option<u64>; 4],
}

impl Remaining {
    /// Reads OpenAI's `x-ratelimit-{remaining,limit}-*` and Anthropic's
    /// `anthropic-ratelimit-*-{remaining,limit}` headers.
    pub fn from_headers(h: &HeaderMap) -> Self {
        let num = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let pair = |openai: &str, anthropic: &str| num(openai).or_else(|| num(anthropic));
        Self {
            requests: pair(
                "x-ratelimit-remaining-requests",
                "anthropic-ratelimit-requests-remaining",
            ),
            tokens: pair(
                "x-ratelimit-remaining-tokens",
                "anthropic-ratelimit-tokens-remaining",
            ),
            input_tokens: num("anthropic-ratelimit-input-tokens-remaining"),
            output_tokens: num("anthropic-ratelimit-output-tokens-remaining"),
            limits: [
                pair(
                    "x-ratelimit-limit-requests",
                    "anthropic-ratelimit-requests-limit",
                ),
                pair(
                    "x-ratelimit-limit-tokens",
                    "anthropic-ratelimit-tokens-limit",
                ),
                num("anthropic-ratelimit-input-tokens-limit"),
                num("anthropic-ratelimit-output-tokens-limit"),
            ],
        }
    }

    /// The value for an admission dimension name.
    pub fn for_dim(&self, dim: &str) -> Option<u64> {
        match dim {
            "requests" => self.requests,
            "tokens" => self.tokens,
            "input_tokens" => self.input_tokens,
            "output_tokens" => self.output_tokens,
            _ => None,
        }
    }

    /// The limit the count of an admission dimension is out of.
    pub fn limit_for_dim(&self, dim: &str) -> Option<u64> {
        let i = match dim {
            "requests" => 0,
            "tokens" => 1,
            "input_tokens" => 2,
            "output_tokens" => 3,
            _ => return None,
        };
        self.limits[i]
    }
}

/// Why a call produced no completion, with the raw evidence.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The provider answered with a non-success status.
    Http {
        /// HTTP status.
        status: u16,
        /// Response body (providers' error JSON), truncated.
        body: String,
        /// `retry-after-ms` / `retry-after`, when sent.
        retry_after: Option<Duration>,
        /// Provider request id.
        request_id: Option<String>,
        /// What its headers say is left of its limits (a 429 says which ran out).
        remaining: Box<Remaining>,
    },
    /// Could not connect (refused, reset, DNS, TLS).
    Connect(String),
    /// Connect or read timeout.
    Timeout(String),
    /// The connection broke mid-response or another transport error.
    Transport(String),
    /// 200 with a body that is not a completion (truncated, error event).
    Decode {
        /// HTTP status.
        status: u16,
        /// What was wrong.
        message: String,
        /// The error event's type, when the stream sent one.
        error_type: Option<String>,
        /// Provider request id.
        request_id: Option<String>,
    },
}

/// One provider account, ready to call.
pub trait Provider: Send + Sync {
    /// Configuration name (`openai`).
    fn name(&self) -> &str;
    /// API dialect.
    fn kind(&self) -> ProviderKind;
    /// Host of the base URL, for evidence.
    fn host(&self) -> &str;
    /// Endpoint path called, for evidence.
    fn endpoint(&self) -> &'static str;
    /// Makes the call; when the answer is streamed, `observer` hears its rate-limit
    /// headers as soon as its head arrives and each piece of text as it arrives (their
    /// concatenation is the reply's content).
    fn complete<'a>(
        &'a self,
        model: &'a str,
        request: &'a ChatRequest,
        observer: &'a Observer<'a>,
    ) -> BoxFuture<'a, Result<ProviderReply, CallError>>;
}

/// Receives the text of a streamed answer as it is generated.
pub type Deltas<'a> = dyn Fn(&str) + Send + Sync + 'a;

/// What a caller hears of a streamed call while it runs.
pub struct Observer<'a> {
    /// Each piece of text as it arrives.
    pub text: &'a Deltas<'a>,
    /// The answer's remaining-budget headers, when its head arrives (before the text).
    pub head: &'a (dyn Fn(&Remaining) + Send + Sync + 'a),
}

fn ignore_text(_: &str) {}

fn ignore_head(_: &Remaining) {}

/// An [`Observer`] that hears nothing.
pub const IGNORE: Observer<'static> = Observer {
    text: &ignore_text,
    head: &ignore_head,
};

/// Builds the adapter a provider's settings describe.
pub fn build(name: &str, settings: &ProviderSettings) -> anyhow::Result<Arc<dyn Provider>> {
    match settings.kind {
        ProviderKind::Openai => Ok(Arc::new(OpenAi::new(name, settings)?)),
        ProviderKind::Anthropic => Ok(Arc::new(Anthropic::new(name, settings)?)),
    }
}

/// The longest wait a provider's Retry-After can impose (the longest delay tier): a
/// larger or absurd value is held to it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// `retry-after-ms` (OpenAI) or `retry-after` (seconds or an HTTP date), at most
/// [`MAX_RETRY_AFTER`]; negative, non-numeric or non-finite values are ignored.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs = |v: f64| {
        (v.is_finite() && v >= 0.0).then(|| {
            Duration::try_from_secs_f64(v)
                .unwrap_or(MAX_RETRY_AFTER)
                .min(MAX_RETRY_AFTER)
        })
    };
    if let Some(d) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(|ms| secs(ms / 1000.0))
    {
        return Some(d);
    }
    let v = headers.get("retry-after")?.to_str().ok()?.trim();
    if let Ok(n) = v.parse::<f64>() {
        return secs(n);
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(
        delta
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// The provider's request id header.
pub fn request_id(headers: &HeaderMap) -> Option<String> {
    ["x-request-id", "request-id"].iter().find_map(|h| {
        headers
            .get(*h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
}

/// Maps a transport error without its URL (a URL may carry a key for some providers).
pub fn transport_error(e: reqwest::Error) -> CallError {
    let e = e.without_url();
    let msg = source_chain(&e, e.to_string());
    if e.is_timeout() {
        CallError::Timeout(msg)
    } else if e.is_connect() {
        CallError::Connect(msg)
    } else {
        CallError::Transport(msg)
    }
}

fn source_chain(e: &(dyn std::error::Error + 'static), mut msg: String) -> String {
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_prefers_ms_then_seconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
    }

    #[test]
    fn absurd_retry_after_is_held_or_ignored_never_a_panic() {
        for (value, want) in [
            ("1e300", Some(MAX_RETRY_AFTER)),
            ("99999999999999999999", Some(MAX_RETRY_AFTER)),
            ("inf", None),
            ("NaN", None),
            ("-5", None),
            ("", None),
            ("soon", None),
        ] {
            for header in ["retry-after", "retry-after-ms"] {
                let mut h = HeaderMap::new();
                h.insert(header, HeaderValue::from_str(value).expect("header value"));
                assert_eq!(retry_after(&h), want, "{header}: {value}");
            }
        }
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Fri, 31 Dec 9999 23:59:59 GMT"),
        );
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
    }
}
