//! What every HTTP provider adapter shares: the client with its timeouts, the account's
//! identity, and turning a response into bytes or a [`CallError`] with its evidence.

use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use reqwest::header::HeaderMap;
use secrecy::{ExposeSecret, SecretString};

use super::{request_id, retry_after, transport_error, CallError};
use crate::settings::ProviderSettings;

/// One provider account reached over HTTP.
pub struct HttpAccount {
    /// Configuration name.
    pub name: String,
    /// Full endpoint URL.
    pub url: String,
    /// Host of the base URL, for evidence.
    pub host: String,
    /// The key (never printed).
    pub api_key: SecretString,
    http: reqwest::Client,
    timeout_base: Duration,
    timeout_per_1k: Duration,
    /// Streamed answers: whether to ask for them, and the longest silence between chunks.
    pub stream: bool,
    stall: Duration,
    max_body: usize,
}

/// Error bodies are read up to this many bytes; the rest is not waited for.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Why an answer's body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The connection failed.
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
    /// The body went past the limit.
    #[error("the answer is longer than {0} bytes; abandoned")]
    TooLarge(usize),
}

/// A successful (2xx) answer.
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: bytes::Bytes,
    /// Provider request id.
    pub request_id: Option<String>,
}

impl HttpAccount {
    /// The account of `s`, calling `path` under its base URL.
    pub fn new(name: &str, s: &ProviderSettings, path: &str) -> anyhow::Result<Self> {
        let base = reqwest::Url::parse(&s.base_url)?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(s.connect_timeout_ms))
            .pool_max_idle_per_host(64);
        // Without an override, reqwest honours HTTPS_PROXY / HTTP_PROXY / ALL_PROXY / NO_PROXY.
        if let Some(proxy) = &s.proxy {
            builder = builder.proxy(reqwest::Proxy::all(proxy.expose_secret())?);
        }
        let http = builder.build()?;
        Ok(Self {
            name: name.to_owned(),
            url: format!("{}{path}", s.base_url.trim_end_matches('/')),
            host: base.host_str().unwrap_or_default().to_owned(),
            api_key: s.api_key.clone(),
            http,
            timeout_base: Duration::from_secs(s.timeout_base_secs),
            timeout_per_1k: Duration::from_secs(s.timeout_per_1k_tokens_secs),
            stream: s.stream,
            stall: Duration::from_secs(s.stall_timeout_secs.max(1)),
            max_body: s.max_body_bytes.max(1024),
        })
    }

    /// A POST to the endpoint with the read timeout scaled by `max_tokens`.
    pub fn post(&self, max_tokens: u32) -> reqwest::RequestBuilder {
        let timeout =
            self.timeout_base + self.timeout_per_1k.mul_f64(f64::from(max_tokens) / 1000.0);
        self.http.post(&self.url).timeout(timeout)
    }

    /// Sends; a `text/event-stream` answer comes back unread as [`Opened::Stream`], any
    /// other is read whole. Transport errors and non-2xx statuses are mapped.
    pub async fn open(&self, request: reqwest::RequestBuilder) -> Result<Opened, CallError> {
        let resp = request.send().await.map_err(transport_error)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let rid = request_id(&headers);
        let is_stream = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if is_stream && (200..300).contains(&status) {
            let limit = self.max_body;
            let mut read = 0usize;
            let bytes = resp.bytes_stream().map(move |chunk| {
                let chunk = chunk.map_err(BodyError::Transport)?;
                read = read.saturating_add(chunk.len());
                if read > limit {
                    return Err(BodyError::TooLarge(limit));
                }
                Ok(chunk)
            });
            return Ok(Opened::Stream(Streamed {
                status,
                headers,
                request_id: rid,
                events: Box::pin(bytes.eventsource()),
                stall: self.stall,
            }));
        }
        let ok = (200..300).contains(&status);
        let (body, complete) =
            read_body(resp, if ok { self.max_body } else { MAX_ERROR_BODY }).await?;
        if !ok {
            // Only the start of a long error body is kept (cut on a character boundary
            // when classified); the rest is not waited for.
            let text = String::from_utf8_lossy(&body).into_owned();
            return Err(CallError::Http {
                status,
                body: text,
                retry_after: retry_after(&headers),
                request_id: rid,
                remaining: Box::new(super::Remaining::from_headers(&headers)),
            });
        }
        if !complete {
            return Err(CallError::Decode {
                status,
                message: format!(
                    "the answer is longer than {} bytes (max_body_bytes); abandoned",
                    self.max_body
                ),
                error_type: None,
                request_id: rid,
            });
        }
        Ok(Opened::Whole(Answer {
            status,
            headers,
            body,
            request_id: rid,
        }))
    }
}

/// Reads at most `limit` bytes of `resp`'s body; true when that was all of it.
async fn read_body(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<(bytes::Bytes, bool), CallError> {
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
        let room = limit.saturating_sub(body.len());
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body.freeze(), false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body.freeze(), true))
}

/// A 2xx answer: read whole, or an event stream still arriving.
pub enum Opened {
    /// JSON body.
    Whole(Answer),
    /// Server-sent events.
    Stream(Streamed),
}

type Events = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<BodyError>>> + Send>>;

/// A streamed 2xx answer, read event by event with stall detection.
pub struct Streamed {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Provider request id.
    pub request_id: Option<String>,
    events: Events,
    stall: Duration,
}

impl Streamed {
    /// The next event; `None` at the end of the stream. Silence longer than the stall
    /// timeout is a [`CallError::Timeout`]; a broken connection a transport error.
    pub async fn next(&mut self) -> Result<Option<Event>, CallError> {
        match tokio::time::timeout(self.stall, self.events.next()).await {
            Err(_) => Err(CallError::Timeout(format!(
                "stream stalled: no data for {} s after the 200",
                self.stall.as_secs()
            ))),
            Ok(None) => Ok(None),
            Ok(Some(Ok(event))) => Ok(Some(event)),
            Ok(Some(Err(EventStreamError::Transport(BodyError::Transport(e))))) => {
                Err(transport_error(e))
            }
            Ok(Some(Err(EventStreamError::Transport(e @ BodyError::TooLarge(_))))) => {
                Err(self.broken(e.to_string(), None))
            }
            Ok(Some(Err(e))) => Err(self.broken(format!("malformed event stream: {e}"), None)),
        }
    }

    /// A stream that produced no completion: upstream's fault, with this answer's evidence.
    pub fn broken(&self, message: String, error_type: Option<String>) -> CallError {
        CallError::Decode {
            status: self.status,
            message,
            error_type,
            request_id: self.request_id.clone(),
        }
    }
}
