//! `mock-provider`: serves the mock until SIGTERM or Ctrl-C.

use std::time::Duration;

use clap::Parser;
use llmq_mock_provider::{spawn, MockConfig};

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
    /// Accept only these API keys (repeatable); any non-empty key otherwise.
    #[arg(long = "accept-key")]
    accept_keys: Vec<String>,
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
        accept_keys: (!cli.accept_keys.is_empty()).then_some(cli.accept_keys),
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
