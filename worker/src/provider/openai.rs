//! OpenAI chat completions (`POST {base}/chat/completions`).

use std::time::Duration;

use futures_util::future::BoxFuture;
use llmq_producer_sdk::{ChatRequest, Usage};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{request_id, retry_after, transport_error, CallError, Provider, ProviderReply};
use crate::settings::ProviderSettings;

/// An OpenAI-compatible account.
pub struct OpenAi {
    name: String,
    url: String,
    host: String,
    api_key: SecretString,
    http: reqwest::Client,
    timeout_base: Duration,
    timeout_per_1k: Duration,
}

impl OpenAi {
    /// A client for this account.
    pub fn new(name: &str, s: &ProviderSettings) -> anyhow::Result<Self> {
        let base = reqwest::Url::parse(&s.base_url)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(s.connect_timeout_ms))
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Self {
            name: name.to_owned(),
            url: format!("{}/chat/completions", s.base_url.trim_end_matches('/')),
            host: base.host_str().unwrap_or_default().to_owned(),
            api_key: s.api_key.clone(),
            http,
            timeout_base: Duration::from_secs(s.timeout_base_secs),
            timeout_per_1k: Duration::from_secs(s.timeout_per_1k_tokens_secs),
        })
    }
}

#[derive(Deserialize)]
struct Completion {
    model: String,
    choices: Vec<Choice>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: Option<u64>,
}

impl Provider for OpenAi {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> crate::settings::ProviderKind {
        crate::settings::ProviderKind::Openai
    }

    fn host(&self) -> &str {
        &self.host
    }

    fn endpoint(&self) -> &'static str {
        "/chat/completions"
    }

    fn complete<'a>(
        &'a self,
        model: &'a str,
        request: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ProviderReply, CallError>> {
        Box::pin(async move {
            let mut body =
                serde_json::to_value(request).map_err(|e| CallError::Transport(e.to_string()))?;
            if let Some(obj) = body.as_object_mut() {
                obj.insert("model".into(), model.into());
            }
            let max_tokens = request.max_tokens.unwrap_or(1024);
            let timeout =
                self.timeout_base + self.timeout_per_1k.mul_f64(f64::from(max_tokens) / 1000.0);
            let resp = self
                .http
                .post(&self.url)
                .bearer_auth(self.api_key.expose_secret())
                .timeout(timeout)
                .json(&body)
                .send()
                .await
                .map_err(transport_error)?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let rid = request_id(&headers);
            let bytes = resp.bytes().await.map_err(transport_error)?;
            if !(200..300).contains(&status) {
                let mut body = String::from_utf8_lossy(&bytes).into_owned();
                body.truncate(4096);
                return Err(CallError::Http {
                    status,
                    body,
                    retry_after: retry_after(&headers),
                    request_id: rid,
                });
            }
            let parsed: Completion =
                serde_json::from_slice(&bytes).map_err(|e| CallError::Decode {
                    status,
                    message: format!("response is not a chat completion: {e}"),
                    request_id: rid.clone(),
                })?;
            let Some(choice) = parsed.choices.into_iter().next() else {
                return Err(CallError::Decode {
                    status,
                    message: "completion has no choices".into(),
                    request_id: rid,
                });
            };
            let usage = parsed.usage.map_or(Usage::default(), |u| Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                total_tokens: u
                    .total_tokens
                    .unwrap_or(u.prompt_tokens + u.completion_tokens),
            });
            Ok(ProviderReply {
                content: choice.message.content.unwrap_or_default(),
                finish_reason: choice.finish_reason,
                model: parsed.model,
                request_id: rid,
                usage,
                status,
                remaining: super::Remaining::from_headers(&headers),
            })
        })
    }
}
