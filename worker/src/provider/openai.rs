//! OpenAI chat completions (`POST {base}/chat/completions`).

use futures_util::future::BoxFuture;
use llmq_producer_sdk::{ChatRequest, Usage};
use secrecy::ExposeSecret;
use serde::Deserialize;

use super::http::HttpAccount;
use super::{CallError, Provider, ProviderReply};
use crate::settings::ProviderSettings;

/// An OpenAI-compatible account.
pub struct OpenAi {
    account: HttpAccount,
}

impl OpenAi {
    /// A client for this account.
    pub fn new(name: &str, s: &ProviderSettings) -> anyhow::Result<Self> {
        Ok(Self {
            account: HttpAccount::new(name, s, "/chat/completions")?,
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
        &self.account.name
    }

    fn kind(&self) -> crate::settings::ProviderKind {
        crate::settings::ProviderKind::Openai
    }

    fn host(&self) -> &str {
        &self.account.host
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
            let a = &self.account;
            let answer = a
                .send(
                    a.post(request.max_tokens.unwrap_or(1024))
                        .bearer_auth(a.api_key.expose_secret())
                        .json(&body),
                )
                .await?;
            let (status, headers, bytes, rid) = (
                answer.status,
                answer.headers,
                answer.body,
                answer.request_id,
            );
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
