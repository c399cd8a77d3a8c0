//! Anthropic messages (`POST {base}/messages`), normalised to the same reply as OpenAI's.

use futures_util::future::BoxFuture;
use llmq_producer_sdk::{ChatRequest, Role, Usage};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::HttpAccount;
use super::{CallError, Provider, ProviderReply, Remaining};
use crate::settings::{ProviderKind, ProviderSettings};

/// The API version llmq speaks.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// An Anthropic account.
pub struct Anthropic {
    account: HttpAccount,
}

impl Anthropic {
    /// A client for this account.
    pub fn new(name: &str, s: &ProviderSettings) -> anyhow::Result<Self> {
        Ok(Self {
            account: HttpAccount::new(name, s, "/messages")?,
        })
    }
}

/// The chat request in Anthropic's shape: system messages go to the top-level `system`.
fn body(model: &str, request: &ChatRequest) -> Value {
    let system: Vec<&str> = request
        .messages
        .iter()
        .filter(|m| matches!(m.role, Role::System | Role::Developer))
        .map(|m| m.content.as_str())
        .collect();
    let messages: Vec<Value> = request
        .messages
        .iter()
        .filter(|m| matches!(m.role, Role::User | Role::Assistant))
        .map(|m| json!({"role": if m.role == Role::User { "user" } else { "assistant" }, "content": m.content}))
        .collect();
    let mut b = json!({
        "model": model,
        "max_tokens": request.max_tokens.unwrap_or(1024),
        "messages": messages,
    });
    if let Some(obj) = b.as_object_mut() {
        if !system.is_empty() {
            obj.insert("system".into(), system.join("\n\n").into());
        }
        if let Some(t) = request.temperature {
            obj.insert("temperature".into(), t.into());
        }
        if let Some(p) = request.top_p {
            obj.insert("top_p".into(), p.into());
        }
        if let Some(stop) = &request.stop {
            obj.insert("stop_sequences".into(), stop.clone().into());
        }
    }
    b
}

#[derive(Deserialize)]
struct Message {
    model: String,
    content: Vec<Block>,
    stop_reason: Option<String>,
    usage: WireUsage,
}

#[derive(Deserialize)]
struct Block {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    input_tokens: u64,
    output_tokens: u64,
}

impl Provider for Anthropic {
    fn name(&self) -> &str {
        &self.account.name
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    fn host(&self) -> &str {
        &self.account.host
    }

    fn endpoint(&self) -> &'static str {
        "/messages"
    }

    fn complete<'a>(
        &'a self,
        model: &'a str,
        request: &'a ChatRequest,
    ) -> BoxFuture<'a, Result<ProviderReply, CallError>> {
        Box::pin(async move {
            let a = &self.account;
            let answer = a
                .send(
                    a.post(request.max_tokens.unwrap_or(1024))
                        .header("x-api-key", a.api_key.expose_secret())
                        .header("anthropic-version", ANTHROPIC_VERSION)
                        .json(&body(model, request)),
                )
                .await?;
            let (status, headers, bytes, rid) = (
                answer.status,
                answer.headers,
                answer.body,
                answer.request_id,
            );
            let parsed: Message =
                serde_json::from_slice(&bytes).map_err(|e| CallError::Decode {
                    status,
                    message: format!("response is not an Anthropic message: {e}"),
                    request_id: rid.clone(),
                })?;
            let content: String = parsed.content.into_iter().filter_map(|b| b.text).collect();
            let finish_reason = parsed.stop_reason.map(|r| match r.as_str() {
                "end_turn" | "stop_sequence" => "stop".to_owned(),
                "max_tokens" => "length".to_owned(),
                _ => r,
            });
            let u = parsed.usage;
            Ok(ProviderReply {
                content,
                finish_reason,
                model: parsed.model,
                request_id: rid,
                usage: Usage {
                    prompt_tokens: u.input_tokens,
                    completion_tokens: u.output_tokens,
                    total_tokens: u.input_tokens + u.output_tokens,
                },
                status,
                remaining: Remaining::from_headers(&headers),
            })
        })
    }
}
