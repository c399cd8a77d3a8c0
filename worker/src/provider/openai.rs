//! OpenAI chat completions (`POST {base}/chat/completions`).

use futures_util::future::BoxFuture;
use llmq_producer_sdk::{ChatRequest, Usage};
use secrecy::ExposeSecret;
use serde::Deserialize;

use serde_json::{json, Value};

use super::http::{Answer, HttpAccount, Opened, Streamed};
use super::{CallError, Deltas, Observer, Provider, ProviderReply};
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
        observer: &'a Observer<'a>,
    ) -> BoxFuture<'a, Result<ProviderReply, CallError>> {
        Box::pin(async move {
            let mut body =
                serde_json::to_value(request).map_err(|e| CallError::Transport(e.to_string()))?;
            let a = &self.account;
            if let Some(obj) = body.as_object_mut() {
                obj.insert("model".into(), model.into());
                if a.stream {
                    obj.insert("stream".into(), true.into());
                    obj.insert("stream_options".into(), json!({"include_usage": true}));
                }
            }
            let opened = a
                .open(
                    a.post(request.max_tokens.unwrap_or(1024))
                        .bearer_auth(a.api_key.expose_secret())
                        .json(&body),
                )
                .await?;
            match opened {
                Opened::Whole(answer) => whole(answer),
                Opened::Stream(stream) => {
                    (observer.head)(&super::Remaining::from_headers(&stream.headers));
                    streamed(stream, model, observer.text).await
                }
            }
        })
    }
}

fn whole(answer: Answer) -> Result<ProviderReply, CallError> {
    let (status, headers, bytes, rid) = (
        answer.status,
        answer.headers,
        answer.body,
        answer.request_id,
    );
    let parsed: Completion = serde_json::from_slice(&bytes).map_err(|e| CallError::Decode {
        status,
        message: format!("response is not a chat completion: {e}"),
        error_type: None,
        request_id: rid.clone(),
    })?;
    let Some(choice) = parsed.choices.into_iter().next() else {
        return Err(CallError::Decode {
            status,
            message: "completion has no choices".into(),
            error_type: None,
            request_id: rid,
        });
    };
    Ok(ProviderReply {
        content: choice.message.content.unwrap_or_default(),
        finish_reason: choice.finish_reason,
        model: parsed.model,
        request_id: rid,
        usage: parsed.usage.map_or(Usage::default(), WireUsage::normalise),
        status,
        remaining: super::Remaining::from_headers(&headers),
    })
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

/// Reads `data:` chunks until `[DONE]`; an `error` object after the 200, or an end
/// without `[DONE]`, is an upstream failure.
async fn streamed(
    mut s: Streamed,
    model: &str,
    deltas: &Deltas<'_>,
) -> Result<ProviderReply, CallError> {
    let mut content = String::new();
    let mut finish_reason = None;
    let mut usage = None;
    let mut answered_model = None;
    loop {
        let Some(event) = s.next().await? else {
            return Err(s.broken(
                format!(
                    "stream ended before [DONE] after {} characters (truncated)",
                    content.len()
                ),
                None,
            ));
        };
        let data = event.data.trim();
        if data == "[DONE]" {
            break;
        }
        if data.is_empty() {
            continue;
        }
        let chunk: Chunk = serde_json::from_str(data)
            .map_err(|e| s.broken(format!("stream chunk is not JSON: {e}"), None))?;
        if let Some(err) = chunk.error {
            let kind = err.get("type").and_then(Value::as_str).map(str::to_owned);
            let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
            return Err(s.broken(format!("error event after the 200: {msg}"), kind));
        }
        if answered_model.is_none() {
            answered_model = chunk.model;
        }
        if let Some(u) = chunk.usage {
            usage = Some(u.normalise());
        }
        for c in chunk.choices {
            if let Some(text) = c.delta.and_then(|d| d.content) {
                if !text.is_empty() {
                    deltas(&text);
                    content.push_str(&text);
                }
            }
            if c.finish_reason.is_some() {
                finish_reason = c.finish_reason;
            }
        }
    }
    Ok(ProviderReply {
        content,
        finish_reason,
        model: answered_model.unwrap_or_else(|| model.to_owned()),
        request_id: s.request_id.clone(),
        usage: usage.unwrap_or_default(),
        status: s.status,
        remaining: super::Remaining::from_headers(&s.headers),
    })
}

impl WireUsage {
    fn normalise(self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self
                .total_tokens
                .unwrap_or(self.prompt_tokens.saturating_add(self.completion_tokens)),
        }
    }
}
