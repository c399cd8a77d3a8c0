//! `mock-provider`: serves the mock until SIGTERM or Ctrl-C.

use std::time::Duration;

use clap::Parser;
use llmq_mock_provider::{spawn, Faults, Limits, MockConfig};

/// OpenAI- and Anthropic-compatible mock LLM provider.
#[derive(Parser)]
#[command(name = "mock-provider", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "MOCK_BIND", default_value = "127.0.0.1:8089")]
    bind: String,
    /// Latency added to every response, in milliseconds.
    #[arg(long, env = "MOCK_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
    /// Delay between the chunks (words) of a streamed answer, in milliseconds.
    #[arg(long, env = "MOCK_CHUNK_DELAY_MS", default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Accept only these API keys (repeatable); any non-empty key otherwise.
    #[arg(long = "accept-key")]
    accept_keys: Vec<String>,
    /// Enforce this many requests per minute per key.
    #[arg(long, env = "MOCK_RPM")]
    rpm: Option<u64>,
    /// Enforce this many tokens per minute per key (OpenAI: prompt + max_tokens).
    #[arg(long, env = "MOCK_TPM")]
    tpm: Option<u64>,
    /// Anthropic input tokens per minute per key.
    #[arg(long, env = "MOCK_INPUT_TPM")]
    input_tpm: Option<u64>,
    /// Anthropic output tokens per minute per key.
    #[arg(long, env = "MOCK_OUTPUT_TPM")]
    output_tpm: Option<u64>,
    /// Also enforce requests per second (RPM/60 per second), as providers may.
    #[arg(long, env = "MOCK_PER_SECOND")]
    per_second: bool,
    /// Limits per key and model (as OpenAI and Anthropic) instead of per key.
    #[arg(long, env = "MOCK_PER_MODEL")]
    per_model: bool,
    /// At most this many requests in flight at once per key (per key and model with
    /// --per-model); more are answered 429.
    #[arg(long, env = "MOCK_MAX_CONCURRENT")]
    max_concurrent: Option<u64>,
    /// Token buckets hold this many seconds' worth (default 60).
    #[arg(long, env = "MOCK_TOKEN_BURST_SECS")]
    token_burst_secs: Option<f64>,
    /// Fraction of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fraction answered overloaded (503 / Anthropic 529).
    #[arg(long, default_value_t = 0.0)]
    overloaded_rate: f64,
    /// Fraction of connections reset mid-response.
    #[arg(long, default_value_t = 0.0)]
    reset_rate: f64,
    /// Fraction of 200s with a truncated body.
    #[arg(long, default_value_t = 0.0)]
    truncate_rate: f64,
    /// Stall every request this long before answering.
    #[arg(long, default_value_t = 0)]
    stall_ms: u64,
    /// Fraction of streamed answers broken by an error event after their 200.
    #[arg(long, default_value_t = 0.0)]
    stream_error_rate: f64,
    /// Streamed answers go silent this long after their first chunk.
    #[arg(long, default_value_t = 0)]
    stream_stall_ms: u64,
    /// Refuse connections (port closed) for this long after start.
    #[arg(long, default_value_t = 0)]
    refuse_ms: u64,
    /// Answer 429 insufficient_quota for this key (repeatable).
    #[arg(long = "quota-key")]
    quota_keys: Vec<String>,
    /// Answer 401 for this key (repeatable).
    #[arg(long = "unauthorized-key")]
    unauthorized_keys: Vec<String>,
    /// Answer 403 for this key (repeatable).
    #[arg(long = "forbidden-key")]
    forbidden_keys: Vec<String>,
    /// Context window: prompt + max_tokens above it is 400 context_length_exceeded.
    #[arg(long)]
    context_limit: Option<u64>,
    /// 5xx fault answers carry an error message of about this many bytes of multi-byte
    /// (CJK, emoji) text.
    #[arg(long, default_value_t = 0)]
    huge_error_body_bytes: usize,
    /// With --huge-error-body-bytes, send the text alone as text/plain (not JSON).
    #[arg(long)]
    huge_error_body_raw: bool,
    /// Every 429/503/529 answer carries retry-after and retry-after-ms with exactly this
    /// text (e.g. 1e300, -5, NaN, "").
    #[arg(long, allow_hyphen_values = true)]
    retry_after: Option<String>,
    /// Fraction of requests answered 200 with a JSON body that never ends.
    #[arg(long, default_value_t = 0.0)]
    endless_body_rate: f64,
    /// Every request answers 503 with an error body that never ends.
    #[arg(long)]
    endless_error_body: bool,
    /// Fraction of streamed answers that end in the middle of an event.
    #[arg(long, default_value_t = 0.0)]
    stream_cut_mid_event_rate: f64,
    /// Read every completion request and never answer it.
    #[arg(long)]
    hang: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let config = MockConfig {
        latency: Duration::from_millis(cli.latency_ms),
        chunk_delay: Duration::from_millis(cli.chunk_delay_ms),
        accept_keys: (!cli.accept_keys.is_empty()).then_some(cli.accept_keys),
        faults: Faults {
            error_rate: cli.error_rate,
            overloaded_rate: cli.overloaded_rate,
            reset_rate: cli.reset_rate,
            truncate_rate: cli.truncate_rate,
            outage: false,
            stall_ms: cli.stall_ms,
            quota_keys: cli.quota_keys.clone(),
            unauthorized_keys: cli.unauthorized_keys.clone(),
            forbidden_keys: cli.forbidden_keys.clone(),
            context_limit: cli.context_limit,
            stream_error_rate: cli.stream_error_rate,
            stream_stall_ms: cli.stream_stall_ms,
            refuse_ms: cli.refuse_ms,
            huge_error_body_bytes: cli.huge_error_body_bytes,
            huge_error_body_raw: cli.huge_error_body_raw,
            retry_after: cli.retry_after.clone(),
            endless_body_rate: cli.endless_body_rate,
            endless_error_body: cli.endless_error_body,
            stream_cut_mid_event_rate: cli.stream_cut_mid_event_rate,
            hang: cli.hang,
        },
        limits: (cli.rpm.is_some()
            || cli.tpm.is_some()
            || cli.input_tpm.is_some()
            || cli.output_tpm.is_some()
            || cli.max_concurrent.is_some())
        .then_some(Limits {
            rpm: cli.rpm,
            tpm: cli.tpm,
            input_tpm: cli.input_tpm,
            output_tpm: cli.output_tpm,
            per_second: cli.per_second,
            token_burst_secs: cli.token_burst_secs,
            per_model: cli.per_model,
            max_concurrent: cli.max_concurrent,
        }),
    };
    let handle = spawn(&cli.bind, config).await?;
    tracing::info!(addr = %handle.addr, "mock provider listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    handle.shutdown();
    Ok(())
}
