//! What every HTTP provider adapter shares: the client with its timeouts, the account's
//! identity, and turning a response into bytes or a [`CallError`] with its evidence.

use std::time::Duration;

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
        })
    }

    /// A POST to the endpoint with the read timeout scaled by `max_tokens`.
    pub fn post(&self, max_tokens: u32) -> reqwest::RequestBuilder {
        let timeout =
            self.timeout_base + self.timeout_per_1k.mul_f64(f64::from(max_tokens) / 1000.0);
        self.http.post(&self.url).timeout(timeout)
    }

    /// Sends, reads the whole body, and maps transport errors and non-2xx statuses.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Result<Answer, CallError> {
        let resp = request.send().await.map_err(transport_error)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let rid = request_id(&headers);
        let body = resp.bytes().await.map_err(transport_error)?;
        if !(200..300).contains(&status) {
            let mut text = String::from_utf8_lossy(&body).into_owned();
            text.truncate(4096);
            return Err(CallError::Http {
                status,
                body: text,
                retry_after: retry_after(&headers),
                request_id: rid,
            });
        }
        Ok(Answer {
            status,
            headers,
            body,
            request_id: rid,
        })
    }
}
