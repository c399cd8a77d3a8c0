//! Goodput under injected faults: N jobs against mock-provider answering 10% 5xx, 2%
//! connection resets and a full outage in the middle, then the same jobs without faults.
//! Prints whether every job succeeded (lost, stuck), provider calls per job, completion
//! time against the fault-free run, and failed attempts per class. Asserts nothing.
//!
//! ```text
//! cargo run -p llmq-tests --bin goodput -- --jobs 2000 --outage-secs 20
//! cargo run -p llmq-tests --bin goodput -- --ci     # 400 jobs, 8 s outage
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use llmq_mock_provider::{Faults, MockConfig};
use llmq_producer_sdk::{ChatMessage, NewJob};
use llmq_tests::{spawn_app_with, AppOptions};

#[derive(Parser)]
#[command(about = "Goodput of llmq under provider faults")]
struct Cli {
    /// Jobs per run.
    #[arg(long, default_value_t = 2000)]
    jobs: usize,
    /// Full outage length, seconds, starting when half the jobs are done.
    #[arg(long, default_value_t = 20)]
    outage_secs: u64,
    /// Fraction of calls answered 500.
    #[arg(long, default_value_t = 0.10)]
    error_rate: f64,
    /// Fraction of connections reset.
    #[arg(long, default_value_t = 0.02)]
    reset_rate: f64,
    /// CI mode: 400 jobs, 8 s outage.
    #[arg(long)]
    ci: bool,
    /// In-process workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Jobs in flight per worker.
    #[arg(long, default_value_t = 32)]
    concurrency: u16,
}

struct Run {
    secs: f64,
    states: Vec<(String, i64)>,
    calls: u64,
    classes: Vec<(String, i64)>,
    circuit_waits: i64,
}

async fn run(
    cli: &Cli,
    jobs: usize,
    outage: Option<Duration>,
    faults: Faults,
) -> anyhow::Result<Run> {
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            latency: Duration::from_millis(20),
            faults: faults.clone(),
            ..Default::default()
        },
        api: false,
        workers: 0,
        concurrency: cli.concurrency,
        rate_limit: None,
        configure: Some(|s, _| {
            s.worker.retry_base_ms = 500;
            s.worker.retry_cap_ms = 30_000;
        }),
    })
    .await;
    let mut app = app;
    let client = app.client().await;
    for i in 0..jobs {
        client
            .enqueue(
                NewJob::new(
                    "bench",
                    "gpt-4o-mini",
                    vec![ChatMessage::user(format!("goodput {i}"))],
                )
                .max_tokens(16)
                .max_attempts(10),
            )
            .await?;
    }
    let started = Instant::now();
    for _ in 0..cli.workers {
        app.start_worker();
    }
    let mut outage_started: Option<Instant> = None;
    let mut outage_done = outage.is_none();
    let deadline = started + Duration::from_secs(900);
    loop {
        let terminal: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE state IN ('succeeded','failed','cancelled','expired')",
        )
        .fetch_one(&app.pool)
        .await?;
        if let (Some(len), false) = (outage, outage_done) {
            match outage_started {
                None if terminal >= i64::try_from(jobs / 2)? => {
                    eprintln!(
                        "  outage begins at {:.1}s ({terminal} jobs done)",
                        started.elapsed().as_secs_f64()
                    );
                    app.mock.set_faults(Faults {
                        outage: true,
                        ..faults.clone()
                    });
                    outage_started = Some(Instant::now());
                }
                Some(t) if t.elapsed() >= len => {
                    eprintln!("  outage ends at {:.1}s", started.elapsed().as_secs_f64());
                    app.mock.set_faults(faults.clone());
                    outage_done = true;
                }
                _ => {}
            }
        }
        if terminal >= i64::try_from(jobs)? || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let states = sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")
        .fetch_all(&app.pool)
        .await?;
    let classes = sqlx::query_as(
        "SELECT coalesce(error_class, '?'), count(*) FROM job_attempts WHERE outcome <> 'succeeded' GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await?;
    let circuit_waits = sqlx::query_scalar("SELECT count(*) FROM job_transitions WHERE detail->>'error_class' = 'circuit_open' AND state = 'retrying' AND attempt = 0")
        .fetch_one(&app.pool)
        .await?;
    Ok(Run {
        secs,
        states,
        calls: app.mock.stats().requests_total,
        classes,
        circuit_waits,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    llmq_worker::telemetry::init();
    let (jobs, outage) = if cli.ci {
        (400, 8)
    } else {
        (cli.jobs, cli.outage_secs)
    };
    eprintln!(
        "[faults] {jobs} jobs, {:.0}% 5xx, {:.0}% resets, {outage}s outage in the middle",
        cli.error_rate * 100.0,
        cli.reset_rate * 100.0
    );
    let faulty = run(
        &cli,
        jobs,
        (outage > 0).then(|| Duration::from_secs(outage)),
        Faults {
            error_rate: cli.error_rate,
            reset_rate: cli.reset_rate,
            ..Default::default()
        },
    )
    .await?;
    eprintln!("[clean] {jobs} jobs, no faults");
    let clean = run(&cli, jobs, None, Faults::default()).await?;

    let count = |r: &Run, s: &str| r.states.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
    let stuck = |r: &Run| {
        r.states
            .iter()
            .filter(|(k, _)| {
                !matches!(k.as_str(), "succeeded" | "failed" | "cancelled" | "expired")
            })
            .map(|(_, n)| n)
            .sum::<i64>()
    };
    println!(
        "\ngoodput: {jobs} jobs, {} workers × {} in flight, mock latency 20 ms",
        cli.workers, cli.concurrency
    );
    println!("{:<34}{:>18}{:>18}", "", "with faults", "without faults");
    println!(
        "{:<34}{:>18}{:>18}",
        "succeeded",
        count(&faulty, "succeeded"),
        count(&clean, "succeeded")
    );
    println!(
        "{:<34}{:>18}{:>18}",
        "failed",
        count(&faulty, "failed"),
        count(&clean, "failed")
    );
    println!(
        "{:<34}{:>18}{:>18}",
        "lost (no record)",
        jobs as i64 - faulty.states.iter().map(|(_, n)| n).sum::<i64>(),
        jobs as i64 - clean.states.iter().map(|(_, n)| n).sum::<i64>()
    );
    println!(
        "{:<34}{:>18}{:>18}",
        "stuck (not terminal)",
        stuck(&faulty),
        stuck(&clean)
    );
    println!(
        "{:<34}{:>18.2}{:>18.2}",
        "provider calls per job",
        faulty.calls as f64 / jobs as f64,
        clean.calls as f64 / jobs as f64
    );
    println!(
        "{:<34}{:>17.1}s{:>17.1}s",
        "completion time", faulty.secs, clean.secs
    );
    println!(
        "{:<34}{:>18}{:>18}",
        "waits on an open circuit", faulty.circuit_waits, clean.circuit_waits
    );
    println!("failed attempts by class (with faults):");
    for (class, n) in &faulty.classes {
        println!("  {class:<32}{n:>18}");
    }
    Ok(())
}
