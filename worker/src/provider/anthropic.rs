//! Anthropic messages (`POST {base}/messages`), normalised to the same reply as OpenAI's.

use futures_util::future::BoxFuture;
use llmq_producer_sdk::{ChatRequest, Role, Usage};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{Answer, HttpAccount, Opened, Streamed};
use super::{CallError, Deltas, Observer, Provider, ProviderReply, Remaining};
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
        observer: &'a Observer<'a>,
    ) -> BoxFuture<'a, Result<ProviderReply, CallError>> {
        Box::pin(async move {
            let a = &self.account;
            let mut wire = body(model, request);
            if a.stream {
                if let Some(obj) = wire.as_object_mut() {
                    obj.insert("stream".into(), true.into());
                }
            }
            let opened = a
                .open(
                    a.post(request.max_tokens.unwrap_or(1024))
                        .header("x-api-key", a.api_key.expose_secret())
                        .header("anthropic-version", ANTHROPIC_VERSION)
                        .json(&wire),
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

fn stop_reason(r: String) -> String {
    match r.as_str() {
        "end_turn" | "stop_sequence" => "stop".to_owned(),
        "max_tokens" => "length".to_owned(),
        _ => r,
    }
}

fn whole(answer: Answer) -> Result<ProviderReply, CallError> {
    let (status, headers, bytes, rid) = (
        answer.status,
        answer.headers,
        answer.body,
        answer.request_id,
    );
    let parsed: Message = serde_json::from_slice(&bytes).map_err(|e| CallError::Decode {
        status,
        message: format!("response is not an Anthropic message: {e}"),
        error_type: None,
        request_id: rid.clone(),
    })?;
    let content: String = parsed.content.into_iter().filter_map(|b| b.text).collect();
    let u = parsed.usage;
    Ok(ProviderReply {
        content,
        finish_reason: parsed.stop_reason.map(stop_reason),
        model: parsed.model,
        request_id: rid,
        usage: Usage {
            prompt_tokens: u.input_tokens,
            completion_tokens: u.output_tokens,
            total_tokens: u.input_tokens.saturating_add(u.output_tokens),
        },
        status,
        remaining: Remaining::from_headers(&headers),
    })
}

/// Reads the typed events until `message_stop`; an `error` event after the 200, or an
/// end without `message_stop`, is an upstream failure.
async fn streamed(
    mut s: Streamed,
    model: &str,
    deltas: &Deltas<'_>,
) -> Result<ProviderReply, CallError> {
    let mut content = String::new();
    let mut finish_reason = None;
    let (mut input, mut output) = (0u64, 0u64);
    let mut answered_model = None;
    loop {
        let Some(event) = s.next().await? else {
            return Err(s.broken(
                format!(
                    "stream ended before message_stop after {} characters (truncated)",
                    content.len()
                ),
                None,
            ));
        };
        if event.data.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&event.data)
            .map_err(|e| s.broken(format!("stream event is not JSON: {e}"), None))?;
        let kind = v
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(&event.event);
        match kind {
            "message_start" => {
                let m = v.get("message");
                answered_model = m
                    .and_then(|m| m.get("model"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let u = m.and_then(|m| m.get("usage"));
                input = u
                    .and_then(|u| u.get("input_tokens"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                output = u
                    .and_then(|u| u.get("output_tokens"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
            }
            "content_block_delta" => {
                if let Some(text) = v.pointer("/delta/text").and_then(Value::as_str) {
                    if !text.is_empty() {
                        deltas(text);
                        content.push_str(text);
                    }
                }
            }
            "message_delta" => {
                if let Some(r) = v.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    finish_reason = Some(stop_reason(r.to_owned()));
                }
                if let Some(n) = v.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                    output = n;
                }
            }
            "message_stop" => break,
            "error" => {
                let t = v.pointer("/error/type").and_then(Value::as_str);
                let msg = v
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                return Err(s.broken(
                    format!("error event after the 200: {msg}"),
                    t.map(str::to_owned),
                ));
            }
            _ => {}
        }
    }
    Ok(ProviderReply {
        content,
        finish_reason,
        model: answered_model.unwrap_or_else(|| model.to_owned()),
        request_id: s.request_id.clone(),
        usage: Usage {
            prompt_tokens: input,
            completion_tokens: output,
            total_tokens: input.saturating_add(output),
        },
        status: s.status,
        remaining: Remaining::from_headers(&s.headers),
    })
}
