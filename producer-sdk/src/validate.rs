//! Checks a job before anything is written: a job that fails here leaves no trace.

use serde::{Deserialize, Serialize};

use crate::protocol::{JobEnvelope, PROTOCOL_VERSION};

/// Bounds a job must respect to be accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Largest encoded envelope, in bytes.
    pub max_body_bytes: usize,
    /// Most messages in one request.
    pub max_messages: usize,
    /// Largest `max_tokens` accepted.
    pub max_output_tokens: u32,
    /// Context window of models not listed in `context_by_model`: estimated prompt
    /// tokens + `max_tokens` must fit in it.
    pub context_tokens: u32,
    /// Context window per model name.
    pub context_by_model: std::collections::BTreeMap<String, u32>,
    /// Largest `max_attempts` accepted.
    pub max_attempts: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 256 * 1024,
            max_messages: 1024,
            max_output_tokens: 16_384,
            context_tokens: 128_000,
            context_by_model: std::collections::BTreeMap::new(),
            max_attempts: 20,
        }
    }
}

impl Limits {
    /// The context window of `model`.
    pub fn context_for(&self, model: &str) -> u32 {
        self.context_by_model
            .get(model)
            .copied()
            .unwrap_or(self.context_tokens)
    }
}

/// Why a job was refused. Each message says what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// `version` is not the one this build speaks.
    #[error("unsupported envelope version {0}: send version {PROTOCOL_VERSION}")]
    UnsupportedVersion(u32),
    /// Tenant missing.
    #[error("tenant is empty: set the tenant that owns the job")]
    EmptyTenant,
    /// Tenant with characters that would break routing keys.
    #[error("tenant `{0}` is not a valid name: use 1-64 letters, digits, `_` or `-`")]
    BadTenant(String),
    /// Model missing.
    #[error("route.model is empty: name the model to call, e.g. \"gpt-4o-mini\"")]
    EmptyModel,
    /// No messages.
    #[error("request.messages is empty: send at least one message")]
    EmptyMessages,
    /// Too many messages.
    #[error("request.messages has {got} messages, more than the limit of {limit}: shorten the conversation")]
    TooManyMessages {
        /// Messages sent.
        got: usize,
        /// The limit.
        limit: usize,
    },
    /// `max_tokens` absent.
    #[error("request.max_tokens is missing: set it (1..={limit}); budgets are reserved from it")]
    MissingMaxTokens {
        /// The largest value accepted.
        limit: u32,
    },
    /// `max_tokens` zero or too large.
    #[error("request.max_tokens is {got}, outside 1..={limit}: lower it")]
    MaxTokensOutOfRange {
        /// Value sent.
        got: u32,
        /// The largest value accepted.
        limit: u32,
    },
    /// Prompt + `max_tokens` cannot fit the model's context.
    #[error("the prompt (about {prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of {context_tokens} tokens: shorten the prompt or lower max_tokens")]
    ContextOverflow {
        /// Estimated prompt tokens.
        prompt_tokens: u64,
        /// Requested output tokens.
        max_tokens: u32,
        /// The model's context.
        context_tokens: u32,
    },
    /// `max_attempts` zero or too large.
    #[error("max_attempts is {got}, outside 1..={limit}")]
    MaxAttemptsOutOfRange {
        /// Value sent.
        got: u32,
        /// The largest value accepted.
        limit: u32,
    },
    /// Priority above 9.
    #[error("priority is {0}, outside 0..=9")]
    PriorityOutOfRange(u8),
    /// Encoded job too big.
    #[error("the job is {size} bytes, over the limit of {limit} bytes: send a shorter prompt")]
    BodyTooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Idempotency key too long.
    #[error("idempotency_key is {0} bytes, over the limit of 200")]
    IdempotencyKeyTooLong(usize),
    /// `params` repeats a field the envelope owns, or one the worker must control.
    #[error("params.{field} is not allowed: {why}")]
    ParamNotAllowed {
        /// The offending field.
        field: String,
        /// What to do instead.
        why: &'static str,
    },
    /// U+0000 somewhere in the job (PostgreSQL cannot store it).
    #[error("the job holds the character U+0000 (in a message, a name, metadata, params or a key), which cannot be stored: remove it")]
    NulCharacter,
    /// A number PostgreSQL would store but not give back intact.
    #[error("the number {0} (in metadata or params) is beyond ±1e308, which cannot be stored and read back: send it as a string")]
    NumberOutOfRange(String),
    /// More fallback routes than accepted.
    #[error("fallbacks has {got} routes, more than the limit of {limit}: keep the chain short")]
    TooManyFallbacks {
        /// Routes sent.
        got: usize,
        /// The limit.
        limit: usize,
    },
}

/// The largest number a job may carry: PostgreSQL keeps JSON numbers as exact decimals
/// and writes them back in full, and the last few `f64`s below `f64::MAX` written so do
/// not parse again, which would leave the job's status unreadable.
pub const MAX_NUMBER: f64 = 1e308;

/// Most fallback routes a job may carry.
pub const MAX_FALLBACKS: usize = 8;

/// Fields `params` may not carry, and what to do instead: the envelope owns them (a
/// duplicate would make the message undecodable), or they would change what the call
/// costs behind the budget's back, or the worker sets them itself.
const RESERVED_PARAMS: &[(&str, &str)] = &[
    (
        "messages",
        "set request.messages (the top-level `messages`)",
    ),
    (
        "max_tokens",
        "set max_tokens at the top level, not in params",
    ),
    (
        "temperature",
        "set temperature at the top level, not in params",
    ),
    ("top_p", "set top_p at the top level, not in params"),
    ("stop", "set stop at the top level, not in params"),
    ("model", "set model (and fallbacks) at the top level"),
    (
        "max_completion_tokens",
        "use max_tokens: budgets are reserved from it",
    ),
    (
        "n",
        "one completion per job: enqueue one job per completion wanted",
    ),
    (
        "best_of",
        "one completion per job: enqueue one job per completion wanted",
    ),
    ("stream", "the worker decides how to read the answer"),
    (
        "stream_options",
        "the worker decides how to read the answer",
    ),
];

/// A tenant name: 1-64 ASCII letters, digits, `_` or `-` (it is a routing-key word on the
/// events exchange, `<tenant>.<state>`).
pub fn valid_tenant(t: &str) -> bool {
    (1..=64).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ValidationError {
    /// A stable machine-readable code for the error (`empty_messages`, …).
    pub fn code(&self) -> &'static str {
        match self {
            ValidationError::UnsupportedVersion(_) => "unsupported_version",
            ValidationError::EmptyTenant => "empty_tenant",
            ValidationError::BadTenant(_) => "bad_tenant",
            ValidationError::EmptyModel => "empty_model",
            ValidationError::EmptyMessages => "empty_messages",
            ValidationError::TooManyMessages { .. } => "too_many_messages",
            ValidationError::MissingMaxTokens { .. } => "missing_max_tokens",
            ValidationError::MaxTokensOutOfRange { .. } => "max_tokens_out_of_range",
            ValidationError::ContextOverflow { .. } => "context_length_exceeded",
            ValidationError::MaxAttemptsOutOfRange { .. } => "max_attempts_out_of_range",
            ValidationError::PriorityOutOfRange(_) => "priority_out_of_range",
            ValidationError::BodyTooLarge { .. } => "body_too_large",
            ValidationError::IdempotencyKeyTooLong(_) => "idempotency_key_too_long",
            ValidationError::ParamNotAllowed { .. } => "param_not_allowed",
            ValidationError::TooManyFallbacks { .. } => "too_many_fallbacks",
            ValidationError::NulCharacter => "nul_character",
            ValidationError::NumberOutOfRange(_) => "number_out_of_range",
        }
    }
}

/// A conservative prompt-size estimate in tokens: about one token per 3 bytes of text plus
/// a few per message for the chat framing. It over-counts typical English (≈4 bytes per
/// token), so a prompt it accepts fits. The worker refines this with a real tokenizer.
///
/// ```
/// use llmq_producer_sdk::{estimate_prompt_tokens, ChatMessage};
/// assert_eq!(estimate_prompt_tokens(&[ChatMessage::user("abcdef")]), 2 + 4);
/// ```
pub fn estimate_prompt_tokens(messages: &[crate::ChatMessage]) -> u64 {
    messages
        .iter()
        .map(|m| (m.content.len() as u64).div_ceil(3) + 4)
        .sum()
}

/// Checks an envelope against `limits`.
pub fn validate(job: &JobEnvelope, limits: &Limits) -> Result<(), ValidationError> {
    if job.version != PROTOCOL_VERSION {
        return Err(ValidationError::UnsupportedVersion(job.version));
    }
    if job.tenant.trim().is_empty() {
        return Err(ValidationError::EmptyTenant);
    }
    if !valid_tenant(&job.tenant) {
        return Err(ValidationError::BadTenant(job.tenant.clone()));
    }
    if job.route.model.trim().is_empty() || job.fallbacks.iter().any(|r| r.model.trim().is_empty())
    {
        return Err(ValidationError::EmptyModel);
    }
    if job.fallbacks.len() > MAX_FALLBACKS {
        return Err(ValidationError::TooManyFallbacks {
            got: job.fallbacks.len(),
            limit: MAX_FALLBACKS,
        });
    }
    if let Some(key) = &job.idempotency_key {
        if key.len() > 200 {
            return Err(ValidationError::IdempotencyKeyTooLong(key.len()));
        }
    }
    let req = &job.request;
    if let Some((field, why)) = RESERVED_PARAMS
        .iter()
        .find(|(field, _)| req.extra.contains_key(*field))
    {
        return Err(ValidationError::ParamNotAllowed {
            field: (*field).to_owned(),
            why,
        });
    }
    if req.messages.is_empty() {
        return Err(ValidationError::EmptyMessages);
    }
    if req.messages.len() > limits.max_messages {
        return Err(ValidationError::TooManyMessages {
            got: req.messages.len(),
            limit: limits.max_messages,
        });
    }
    let max_tokens = req.max_tokens.ok_or(ValidationError::MissingMaxTokens {
        limit: limits.max_output_tokens,
    })?;
    if max_tokens == 0 || max_tokens > limits.max_output_tokens {
        return Err(ValidationError::MaxTokensOutOfRange {
            got: max_tokens,
            limit: limits.max_output_tokens,
        });
    }
    if job.max_attempts == 0 || job.max_attempts > limits.max_attempts {
        return Err(ValidationError::MaxAttemptsOutOfRange {
            got: job.max_attempts,
            limit: limits.max_attempts,
        });
    }
    if job.priority > 9 {
        return Err(ValidationError::PriorityOutOfRange(job.priority));
    }
    let size = job.encode().len();
    if size > limits.max_body_bytes {
        return Err(ValidationError::BodyTooLarge {
            size,
            limit: limits.max_body_bytes,
        });
    }
    if let Ok(v) = serde_json::to_value(job) {
        storable(&v)?;
    }
    let prompt_tokens = estimate_prompt_tokens(&req.messages);
    let context_tokens = limits.context_for(&job.route.model);
    if prompt_tokens + u64::from(max_tokens) > u64::from(context_tokens) {
        return Err(ValidationError::ContextOverflow {
            prompt_tokens,
            max_tokens,
            context_tokens,
        });
    }
    Ok(())
}

/// Refuses what PostgreSQL could not store, or not give back intact: U+0000 anywhere in
/// the job's text or keys, or a number beyond ±[`MAX_NUMBER`].
fn storable(v: &serde_json::Value) -> Result<(), ValidationError> {
    use serde_json::Value;
    match v {
        Value::String(s) if s.contains('\0') => Err(ValidationError::NulCharacter),
        Value::Number(n) if n.as_f64().is_some_and(|f| f.abs() > MAX_NUMBER) => {
            Err(ValidationError::NumberOutOfRange(n.to_string()))
        }
        Value::Array(a) => a.iter().try_for_each(storable),
        Value::Object(o) => o.iter().try_for_each(|(k, v)| {
            if k.contains('\0') {
                return Err(ValidationError::NulCharacter);
            }
            storable(v)
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChatMessage, NewJob};

    fn job() -> JobEnvelope {
        NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("hi")])
            .max_tokens(16)
            .into_envelope()
    }

    #[test]
    fn accepts_a_good_job() {
        assert_eq!(validate(&job(), &Limits::default()), Ok(()));
    }

    #[test]
    fn params_may_not_repeat_or_bypass_what_the_envelope_owns() {
        for field in [
            "max_tokens",
            "messages",
            "n",
            "max_completion_tokens",
            "stream",
        ] {
            let mut j = job();
            j.request.extra.insert(field.into(), serde_json::json!(8));
            let err = validate(&j, &Limits::default()).unwrap_err();
            assert_eq!(err.code(), "param_not_allowed");
            assert!(err.to_string().contains(field), "{err}");
        }
        let mut j = job();
        j.request.extra.insert("seed".into(), serde_json::json!(7));
        assert_eq!(validate(&j, &Limits::default()), Ok(()));
        let mut j = job();
        j.request.messages[0].content.push('\0');
        assert_eq!(
            validate(&j, &Limits::default()),
            Err(ValidationError::NulCharacter)
        );
        let mut j = job();
        j.fallbacks = vec![j.route.clone(); MAX_FALLBACKS + 1];
        assert!(matches!(
            validate(&j, &Limits::default()),
            Err(ValidationError::TooManyFallbacks { .. })
        ));
    }

    #[test]
    fn each_bad_input_has_its_error() {
        let l = Limits::default();
        let mut j = job();
        j.request.messages.clear();
        assert_eq!(validate(&j, &l), Err(ValidationError::EmptyMessages));
        let mut j = job();
        j.request.max_tokens = None;
        assert!(matches!(
            validate(&j, &l),
            Err(ValidationError::MissingMaxTokens { .. })
        ));
        let mut j = job();
        j.request.max_tokens = Some(0);
        assert!(matches!(
            validate(&j, &l),
            Err(ValidationError::MaxTokensOutOfRange { .. })
        ));
        let mut j = job();
        j.version = 2;
        assert_eq!(
            validate(&j, &l),
            Err(ValidationError::UnsupportedVersion(2))
        );
        let mut j = job();
        j.request.messages = vec![ChatMessage::user("x".repeat(300_000))];
        assert!(matches!(
            validate(&j, &l),
            Err(ValidationError::BodyTooLarge { .. })
        ));
        let mut j = job();
        j.request.messages = vec![ChatMessage::user("x".repeat(400_000))];
        let small = Limits {
            max_body_bytes: 1 << 20,
            ..l.clone()
        };
        assert!(matches!(
            validate(&j, &small),
            Err(ValidationError::ContextOverflow { .. })
        ));
    }
}
