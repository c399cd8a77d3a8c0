//! `llmq`: reads settings, sets up telemetry, runs one command until a shutdown signal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use llmq_worker::{api, connect_db, consume, demo, migrate, telemetry, Settings};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "llmq",
    version,
    about = "Queue-backed worker for LLM completion jobs"
)]
struct Cli {
    /// Settings file (TOML); environment variables LLMQ_* override it.
    #[arg(long, global = true, env = "LLMQ_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply database migrations and exit.
    Migrate,
    /// Run a worker replica: consume jobs and call the provider.
    Worker,
    /// Serve the HTTP API.
    Api,
    /// Inspect and replay the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: llmq_worker::dlq::Command,
    },
    /// Diagnose a provider layer by layer (network, identity, quota, rate limit, request,
    /// upstream) with one minimal request; exits 1 when a layer fails.
    Doctor {
        /// Provider name from the settings (default: default_provider).
        #[arg(long)]
        provider: Option<String>,
        /// Model to ask for one token.
        #[arg(long, default_value = "gpt-4o-mini")]
        model: String,
    },
    /// Make a bearer token for a tenant: prints the token (give it to the producer) and
    /// the line for the settings, which keep only its SHA-256.
    Token {
        /// Tenant name (letters, digits, `_`, `-`).
        tenant: String,
    },
    /// Push a batch of sample jobs through the API and follow them to the end.
    Demo {
        /// API base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        api: String,
        /// How many jobs.
        #[arg(long, default_value_t = 60)]
        jobs: usize,
        /// Model to ask.
        #[arg(long, default_value = "gpt-4o-mini")]
        model: String,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Token { tenant } = &cli.command {
        if !llmq_producer_sdk::valid_tenant(tenant) {
            anyhow::bail!(
                "`{tenant}` is not a valid tenant name: use 1-64 letters, digits, `_` or `-`"
            );
        }
        let token = api::new_token();
        println!(
            "token for tenant `{tenant}` (shown once; llmq keeps only its hash):\n  {token}\n"
        );
        println!(
            "settings (TOML, under [api.tenants]):\n  {tenant} = \"{}\"",
            api::token_hash(&token)
        );
        println!(
            "or environment:\n  LLMQ_API__TENANTS__{}={}",
            tenant.to_uppercase(),
            api::token_hash(&token)
        );
        return Ok(());
    }
    if let Command::Demo {
        api,
        jobs,
        model,
        timeout_secs,
    } = &cli.command
    {
        return demo::run(api, *jobs, model, Duration::from_secs(*timeout_secs)).await;
    }
    let settings = Settings::load(cli.config.as_deref())?;
    if let Command::Doctor { provider, model } = &cli.command {
        let name = provider
            .clone()
            .unwrap_or_else(|| settings.default_provider.clone());
        let report = llmq_worker::doctor::run(&settings, &name, model).await?;
        print!("{}", report.render());
        if report.failed().is_some() {
            std::process::exit(1);
        }
        return Ok(());
    }
    let pool = connect_db(&settings).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    match cli.command {
        Command::Migrate => {
            migrate(&pool).await?;
            println!("migrations applied");
        }
        Command::Worker => {
            if settings.migrate_on_start {
                migrate(&pool).await?;
            }
            consume::run(settings, pool, shutdown).await?;
        }
        Command::Api => {
            if settings.migrate_on_start {
                migrate(&pool).await?;
            }
            let handle = api::start(&settings, pool, shutdown).await?;
            handle.join.await??;
        }
        Command::Dlq { command } => llmq_worker::dlq::run(&settings, &pool, command).await?,
        Command::Demo { .. } | Command::Doctor { .. } | Command::Token { .. } => {}
    }
    Ok(())
}

/// Cancels `token` on SIGTERM or Ctrl-C.
async fn signal_shutdown(token: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        } else {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutdown requested");
    token.cancel();
}
