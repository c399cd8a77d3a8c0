//! How many tokens a prompt will be charged, before the call.
//!
//! OpenAI models: the model's real tokenizer (tiktoken-rs, `o200k_base` for the gpt-4o
//! family and newer, the model's own otherwise), but never less than one token per 4
//! characters, which is how providers' rate limiters estimate; plus 4 tokens of chat
//! framing per message and 3 to prime the reply. Other models have no public tokenizer:
//! one token per 3 characters, a documented over-estimate for English text.

use llmq_producer_sdk::ChatMessage;
use tiktoken_rs::CoreBPE;

use crate::settings::ProviderKind;

fn bpe_for(model: &str) -> &'static CoreBPE {
    tiktoken_rs::bpe_for_model(model).unwrap_or_else(|_| tiktoken_rs::o200k_base_singleton())
}

/// Estimated prompt tokens of `messages` for `model` on a provider of `kind`.
pub fn prompt_tokens(kind: ProviderKind, model: &str, messages: &[ChatMessage]) -> u64 {
    let per_message = |text: &str| -> u64 {
        let chars = text.chars().count() as u64;
        match kind {
            ProviderKind::Openai => {
                let bpe = bpe_for(model);
                (bpe.encode_ordinary(text).len() as u64).max(chars.div_ceil(4))
            }
            ProviderKind::Anthropic => chars.div_ceil(3),
        }
    };
    messages
        .iter()
        .map(|m| per_message(&m.content) + 4)
        .sum::<u64>()
        + 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_real_tokens_and_never_less_than_chars_over_four() {
        let hello = [ChatMessage::user("hello world")];
        // "hello world" is 2 tokens; 11 chars / 4 = 3 wins; + 4 framing + 3 priming.
        assert_eq!(
            prompt_tokens(ProviderKind::Openai, "gpt-4o-mini", &hello),
            3 + 4 + 3
        );
        let long = [ChatMessage::user("tokenization ".repeat(100))];
        let n = prompt_tokens(ProviderKind::Openai, "gpt-4o-mini", &long);
        assert!(n >= 1300 / 4 + 7, "{n}");
        let claude = [ChatMessage::user("x".repeat(300))];
        assert_eq!(
            prompt_tokens(ProviderKind::Anthropic, "claude-sonnet", &claude),
            100 + 4 + 3
        );
    }
}
