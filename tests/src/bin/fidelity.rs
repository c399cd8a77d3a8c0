//! Rate-limit fidelity benchmark: K `llmq worker` processes share one provider account
//! (mock-provider enforcing 600 RPM paced per second and 90,000 TPM) under at least twice
//! the demand it can serve, with job sizes mixed from 200 to 8,000 tokens. Prints the
//! provider-side 429s, the utilisation of the binding limit in steady state, the busiest
//! 1 s and 60 s windows and the budget wait of small and large jobs; then the same
//! workload with a naive per-replica limiter, for comparison. A program that prints
//! figures: it asserts nothing.
//!
//! ```text
//! cargo run -p llmq-tests --bin fidelity -- --workers 8 --secs 180
//! cargo run -p llmq-tests --bin fidelity -- --ci        # 60 s per mode
//! ```
//! Needs the local services (scripts/services.sh) and `cargo build --bins` first.

use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Parser;
use llmq_mock_provider::{Admitted, Limits, MockConfig};
use llmq_producer_sdk::{ChatMessage, NewJob};
use llmq_tests::{spawn_app_with, AppOptions, TestApp};

#[derive(Parser)]
#[command(about = "Rate-limit fidelity: llmq's shared budget vs a naive per-replica limiter")]
struct Cli {
    /// Worker processes.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Measured seconds per mode.
    #[arg(long, default_value_t = 180)]
    secs: u64,
    /// CI mode: 60 s per mode.
    #[arg(long)]
    ci: bool,
    /// Provider RPM (enforced per second).
    #[arg(long, default_value_t = 600)]
    rpm: u64,
    /// Provider TPM.
    #[arg(long, default_value_t = 90_000)]
    tpm: u64,
    /// Modes to run: global (llmq) and/or naive.
    #[arg(long, value_delimiter = ',', default_value = "global,naive")]
    modes: Vec<String>,
    /// Jobs in flight per worker.
    #[arg(long, default_value_t = 4)]
    concurrency: u16,
    /// Mock provider latency, ms.
    #[arg(long, default_value_t = 300)]
    latency_ms: u64,
}

struct Report {
    mode: String,
    rate_limited: u64,
    admitted: u64,
    token_util: f64,
    request_util: f64,
    max_req_1s: usize,
    max_req_60s: usize,
    max_tok_60s: u64,
    small: (f64, f64),
    large: (f64, f64),
    succeeded: i64,
    demand_x: f64,
}

/// Job sizes (total tokens = prompt + max_tokens) from 200 to 8,000, deterministic.
fn sizes(n: usize) -> Vec<u64> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            200 + x % 7_801
        })
        .collect()
}

fn prompt_of(tokens: u64) -> String {
    const WORDS: &[&str] = &[
        "queue ",
        "budget ",
        "token ",
        "limit ",
        "replica ",
        "worker ",
        "provider ",
        "retry ",
    ];
    let mut s = String::new();
    let mut i = 0;
    while (s.len() as u64) < tokens * 4 {
        s.push_str(WORDS[i % WORDS.len()]);
        i += 1;
    }
    s.truncate(usize::try_from(tokens * 4).unwrap_or(usize::MAX));
    s
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn max_in_window(log: &[Admitted], window_ms: u64, weight: impl Fn(&Admitted) -> u64) -> u64 {
    let mut best = 0;
    let mut sum = 0;
    let mut j = 0;
    for i in 0..log.len() {
        sum += weight(&log[i]);
        while log[i].at_ms - log[j].at_ms >= window_ms {
            sum -= weight(&log[j]);
            j += 1;
        }
        best = best.max(sum);
    }
    best
}

async fn run_mode(cli: &Cli, mode: &str, secs: u64) -> anyhow::Result<Report> {
    let limits = Limits {
        rpm: Some(cli.rpm),
        tpm: Some(cli.tpm),
        per_second: true,
        ..Default::default()
    };
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            latency: Duration::from_millis(cli.latency_ms),
            limits: Some(limits),
            ..Default::default()
        },
        api: false,
        workers: 0,
        concurrency: cli.concurrency,
        rate_limit: None,
        configure: None,
    })
    .await;
    let client = app.client().await;

    // Backlog: at least twice what the limit serves in the run.
    let capacity_jobs = (cli.tpm as f64 * secs as f64 / 60.0) / 4_100.0;
    let n = ((capacity_jobs * 2.2).ceil() as usize).max(20);
    let mut expected = 0u64;
    for (i, total) in sizes(n).into_iter().enumerate() {
        let max_tokens = (total / 5).clamp(50, 1_000);
        let prompt_tokens = total.saturating_sub(max_tokens + 10).max(20);
        expected += total;
        let job = NewJob::new(
            "bench",
            "gpt-4o-mini",
            vec![ChatMessage::user(prompt_of(prompt_tokens))],
        )
        .max_tokens(u32::try_from(max_tokens)?)
        .max_attempts(20)
        .metadata("size", total.into())
        .metadata("i", i.into());
        client.enqueue(job).await?;
    }
    let demand_x = expected as f64 / (cli.tpm as f64 * secs as f64 / 60.0);
    eprintln!("[{mode}] {n} jobs queued ({demand_x:.1}x the run's token capacity); starting {} workers for {secs}s", cli.workers);

    let admission_mode = if mode == "naive" { "local" } else { "global" };
    let mut env = app.child_env();
    env.extend([
        ("LLMQ_ADMISSION__MODE".to_owned(), admission_mode.to_owned()),
        (
            "LLMQ_PROVIDERS__OPENAI__RATE_LIMIT__RPM".to_owned(),
            cli.rpm.to_string(),
        ),
        (
            "LLMQ_PROVIDERS__OPENAI__RATE_LIMIT__TPM".to_owned(),
            cli.tpm.to_string(),
        ),
        (
            "LLMQ_PROVIDERS__OPENAI__RATE_LIMIT__REQUEST_BURST_SECS".to_owned(),
            "1".to_owned(),
        ),
        (
            "LLMQ_PROVIDERS__OPENAI__RATE_LIMIT__TOKEN_BURST_SECS".to_owned(),
            "60".to_owned(),
        ),
        (
            "LLMQ_WORKER__CONCURRENCY".to_owned(),
            cli.concurrency.to_string(),
        ),
        (
            "LLMQ_WORKER__SHUTDOWN_GRACE_SECS".to_owned(),
            "2".to_owned(),
        ),
        ("RUST_LOG".to_owned(), "error".to_owned()),
    ]);
    let bin = TestApp::llmq_binary()?;
    let mut children = Vec::new();
    for _ in 0..cli.workers {
        children.push(
            tokio::process::Command::new(&bin)
                .arg("worker")
                .envs(env.iter().cloned())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    let started = Instant::now();
    let run_start_ms = app.mock.elapsed_ms();
    let mut last = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let s = app.mock.stats();
        if s.requests_total != last {
            eprintln!(
                "[{mode}] {:>4}s  provider: {} admitted, {} rate-limited",
                started.elapsed().as_secs(),
                s.succeeded,
                s.rate_limited
            );
            last = s.requests_total;
        }
    }
    let stats = app.mock.stats();
    let log = app.mock.admitted();
    for mut c in children {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }

    // Steady state: from 15 s after the workers started to the end of the run. The rate
    // is measured between the first and the last admission in that window (the tokens
    // admitted after the first, over the time between them), so a partial job at either
    // edge does not bias it.
    let from = run_start_ms + 15_000;
    let window: Vec<&Admitted> = log.iter().filter(|a| a.at_ms >= from).collect();
    let (token_util, request_util) = match (window.first(), window.last()) {
        (Some(first), Some(last)) if last.at_ms > first.at_ms => {
            let minutes = (last.at_ms - first.at_ms) as f64 / 60_000.0;
            let tokens: u64 = window.iter().skip(1).map(|a| a.tokens).sum();
            (
                tokens as f64 / (cli.tpm as f64 * minutes),
                (window.len() - 1) as f64 / (cli.rpm as f64 * minutes),
            )
        }
        _ => (0.0, 0.0),
    };

    // Budget wait: from entering waiting_budget to running, by job size.
    let rows: Vec<(i64, f64)> = sqlx::query_as(
        "SELECT (j.envelope->'metadata'->>'size')::bigint,
                coalesce(extract(epoch FROM (r.at - w.at)), 0)::float8
         FROM jobs j
         JOIN LATERAL (SELECT min(at) AS at FROM job_transitions WHERE job_id = j.id AND state = 'running') r ON r.at IS NOT NULL
         LEFT JOIN LATERAL (SELECT min(at) AS at FROM job_transitions WHERE job_id = j.id AND state = 'waiting_budget') w ON true",
    )
    .fetch_all(&app.pool)
    .await?;
    let mut small: Vec<f64> = rows
        .iter()
        .filter(|(s, _)| *s <= 1_500)
        .map(|(_, w)| *w)
        .collect();
    let mut large: Vec<f64> = rows
        .iter()
        .filter(|(s, _)| *s >= 5_000)
        .map(|(_, w)| *w)
        .collect();
    let succeeded: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
        .fetch_one(&app.pool)
        .await?;
    Ok(Report {
        mode: mode.to_owned(),
        rate_limited: stats.rate_limited,
        admitted: stats.succeeded,
        token_util,
        request_util,
        max_req_1s: max_in_window(&log, 1_000, |_| 1) as usize,
        max_req_60s: max_in_window(&log, 60_000, |_| 1) as usize,
        max_tok_60s: max_in_window(&log, 60_000, |a| a.tokens),
        small: (percentile(&mut small, 0.5), percentile(&mut small, 0.99)),
        large: (percentile(&mut large, 0.5), percentile(&mut large, 0.99)),
        succeeded,
        demand_x,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let secs = if cli.ci { 60 } else { cli.secs };
    let mut reports = Vec::new();
    for mode in &cli.modes {
        reports.push(run_mode(&cli, mode, secs).await?);
    }
    println!(
        "\nfidelity: {} worker processes, concurrency {} each; mock-provider {} RPM (per second) / {} TPM, {} ms latency; {} s per mode",
        cli.workers, cli.concurrency, cli.rpm, cli.tpm, cli.latency_ms, secs
    );
    let name = |r: &Report| {
        if r.mode == "naive" {
            "naive per-replica".to_owned()
        } else {
            "llmq global".to_owned()
        }
    };
    print!("{:<36}", "");
    for r in &reports {
        print!("{:>20}", name(r));
    }
    println!();
    let row = |label: &str, f: &dyn Fn(&Report) -> String| {
        print!("{label:<36}");
        for r in &reports {
            print!("{:>20}", f(r));
        }
        println!();
    };
    row("demand (x token capacity)", &|r| {
        format!("{:.1}x", r.demand_x)
    });
    row("provider 429s", &|r| r.rate_limited.to_string());
    row("provider-admitted calls", &|r| r.admitted.to_string());
    row("TPM utilisation, binding (steady)", &|r| {
        format!("{:.1}%", r.token_util * 100.0)
    });
    row("RPM utilisation (steady)", &|r| {
        format!("{:.1}%", r.request_util * 100.0)
    });
    row("max requests in any 1 s", &|r| {
        format!("{} (limit {})", r.max_req_1s, cli.rpm / 60)
    });
    row("max requests in any 60 s", &|r| {
        format!("{} (limit {})", r.max_req_60s, cli.rpm)
    });
    row("max tokens in any 60 s", &|r| {
        format!("{} (limit {})", r.max_tok_60s, cli.tpm)
    });
    row("budget wait small jobs p50/p99 (s)", &|r| {
        format!("{:.1}/{:.1}", r.small.0, r.small.1)
    });
    row("budget wait large jobs p50/p99 (s)", &|r| {
        format!("{:.1}/{:.1}", r.large.0, r.large.1)
    });
    row("jobs succeeded in the run", &|r| r.succeeded.to_string());
    Ok(())
}
