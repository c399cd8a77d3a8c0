//! Rate-limit fidelity benchmark: what a user sees. A FIXED batch of jobs is enqueued,
//! then K `llmq worker` processes share one provider account (mock-provider behaving like
//! an idle real account: every bucket full at the start, requests enforced per second)
//! until every job is terminal. The figure is the wall time from the provider's first
//! admission to its last, against the least the limits allow, as a ratio (utilisation).
//! A program that prints figures: it asserts nothing.
//!
//! Rows (each a clean start: its own database, queues, mock provider and Redis namespace,
//! except where a row reuses the previous one's on purpose):
//! - `W-RPM fresh`: 600 jobs of ~50 tokens, 600 RPM (10/s). Ideal (N - 10) / 10 = 59 s.
//! - `W-RPM warm`: the same batch again on the same mock and the same Redis namespace,
//!   started `--warm-wait-secs` after the previous batch's last admission.
//! - `W-TPM fresh` / `W-TPM warm`: 400 jobs of 200..=8,000 tokens, 900,000 TPM and 600
//!   RPM. Ideal max((S - 900,000) / 15,000, (N - 10) / 10), S the tokens charged.
//! - `W-RPM Redis restart`: W-RPM fresh with Redis shut down (nosave) 20 s after the
//!   first admission and started again 3 s later.
//! - `W-RPM 3 models, per-key limit`: W-RPM spread over three models that share the key's
//!   limit; the workers are told the limit is per key.
//!
//! ```text
//! cargo run -p llmq-tests --bin fidelity -- --rows w-rpm,w-tpm --naive
//! cargo run -p llmq-tests --bin fidelity -- --ci        # W-RPM halved, about 9 min
//! ```
//! Needs the local services (scripts/services.sh) and `cargo build --workspace --bins`
//! first. The restart row shuts the machine's Redis down and starts it again.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use llmq_mock_provider::{Admitted, Limits, MockConfig};
use llmq_producer_sdk::{ChatMessage, NewJob};
use llmq_tests::{spawn_app_with, AppOptions, TestApp, REDIS_ARGS};

#[derive(Parser)]
#[command(about = "Rate-limit fidelity: wall time of fixed batches against the ideal")]
struct Cli {
    /// `llmq worker` processes.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Jobs in flight per worker process.
    #[arg(long, default_value_t = 4)]
    concurrency: u16,
    /// Mock provider latency, ms.
    #[arg(long, default_value_t = 300)]
    latency_ms: u64,
    /// Rows to run (comma-separated): all, w-rpm, w-tpm, restart, per-key.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    rows: Vec<RowSet>,
    /// Also run the naive per-replica limiter for the fresh rows (not the restart row:
    /// the naive limiter keeps nothing in Redis).
    #[arg(long, conflicts_with = "ci")]
    naive: bool,
    /// CI mode: W-RPM batches halved (300 jobs; W-TPM keeps 400 so tokens bind), no naive runs.
    #[arg(long)]
    ci: bool,
    /// Seconds between a batch's last admission and the start of its warm repeat.
    #[arg(long, default_value_t = 60)]
    warm_wait_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RowSet {
    /// Every row.
    All,
    /// W-RPM fresh and warm.
    #[value(name = "w-rpm")]
    WRpm,
    /// W-TPM fresh and warm.
    #[value(name = "w-tpm")]
    WTpm,
    /// W-RPM with a Redis restart.
    Restart,
    /// W-RPM over three models under one per-key limit.
    PerKey,
}

const RPM: u64 = 600;
const TPM_RPM_ROWS: u64 = 10_000_000;
const TPM_TPM_ROWS: u64 = 900_000;
/// Token buckets hold a minute's worth (the provider's and llmq's).
const TOKEN_BURST_SECS: f64 = 60.0;
/// Redis is shut down this long after the restart row's first admission.
const RESTART_AFTER_MS: u64 = 20_000;
const REDIS_DOWN: Duration = Duration::from_secs(3);
const TERMINAL: &str = "('succeeded', 'failed', 'cancelled', 'expired')";
const SEND_LATENESS: &str = "llmq_budget_send_lateness_seconds_bucket";

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

/// Which workload a row runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Small jobs: requests bind.
    Rpm,
    /// Mixed sizes: tokens bind.
    Tpm,
}

/// One batch: what is enqueued and under which limits.
#[derive(Clone)]
struct Workload {
    kind: Kind,
    n: usize,
    models: &'static [&'static str],
    rpm: u64,
    tpm: u64,
}

impl Workload {
    fn rpm(n: usize) -> Self {
        Self {
            kind: Kind::Rpm,
            n,
            models: &["gpt-4o-mini"],
            rpm: RPM,
            tpm: TPM_RPM_ROWS,
        }
    }

    fn tpm(n: usize) -> Self {
        Self {
            kind: Kind::Tpm,
            n,
            models: &["gpt-4o-mini"],
            rpm: RPM,
            tpm: TPM_TPM_ROWS,
        }
    }

    fn per_key(n: usize) -> Self {
        Self {
            models: &["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"],
            ..Self::rpm(n)
        }
    }

    /// The provider's limits: every bucket full when a key is first seen, requests
    /// enforced per second. The limit is the key's across every model.
    fn limits(&self) -> Limits {
        Limits {
            rpm: Some(self.rpm),
            tpm: Some(self.tpm),
            per_second: true,
            per_model: false,
            ..Default::default()
        }
    }

    /// Jobs as (model, prompt tokens, max_tokens, nominal total tokens).
    fn jobs(&self) -> Vec<(&'static str, u64, u64, u64)> {
        let totals = match self.kind {
            // A short prompt (26 tokens, counted +4 by the provider) and 20 out: 50.
            Kind::Rpm => vec![50; self.n],
            Kind::Tpm => sizes(self.n),
        };
        totals
            .into_iter()
            .enumerate()
            .map(|(i, total)| {
                let model = self.models[i % self.models.len()];
                match self.kind {
                    Kind::Rpm => (model, 26, 20, total),
                    Kind::Tpm => {
                        let max_tokens = (total / 5).clamp(50, 1_000);
                        let prompt = total.saturating_sub(max_tokens + 10).max(20);
                        (model, prompt, max_tokens, total)
                    }
                }
            })
            .collect()
    }

    /// The least time from the first admission to the last, from buckets full at the
    /// start: requests at rpm/60 a second after a second's worth, tokens at tpm/60 a
    /// second after a minute's worth (`requests` calls charged `tokens` in all).
    fn ideal_secs(&self, requests: usize, tokens: u64) -> f64 {
        let rps = self.rpm as f64 / 60.0;
        let by_requests = (requests as f64 - rps) / rps;
        let tps = self.tpm as f64 / 60.0;
        let by_tokens = (tokens as f64 - tps * TOKEN_BURST_SECS) / tps;
        by_requests.max(by_tokens).max(0.0)
    }

    /// Which limit the ideal is set by.
    fn binding(&self, requests: usize, tokens: u64) -> &'static str {
        let rps = self.rpm as f64 / 60.0;
        let tps = self.tpm as f64 / 60.0;
        if (tokens as f64 - tps * TOKEN_BURST_SECS) / tps > (requests as f64 - rps) / rps {
            "tokens bind"
        } else {
            "requests bind"
        }
    }
}

/// One fixed batch's run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// llmq's shared budget through Redis.
    Global,
    /// A naive limiter per replica, each believing it owns the whole limit.
    Naive,
}

impl Mode {
    fn setting(self) -> &'static str {
        match self {
            Mode::Global => "global",
            Mode::Naive => "local",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Global => "llmq",
            Mode::Naive => "naive",
        }
    }
}

/// How one batch went.
struct Outcome {
    kind: Kind,
    n: usize,
    /// Jobs that did not end `succeeded` (terminal otherwise, or not terminal at all).
    not_ok: i64,
    /// Not every job terminal within the bound.
    incomplete: Option<String>,
    first_ms: Option<u64>,
    last_ms: Option<u64>,
    /// Admissions the provider logged for the batch.
    admitted: usize,
    enqueued_tokens: u64,
    rate_limited: u64,
    lateness: Option<Vec<(f64, f64)>>,
    restart: Option<Restart>,
    ideal: f64,
    /// What the ideal is computed from: (requests, tokens, where from).
    ideal_from: (usize, u64, &'static str),
    /// Which limit sets the ideal.
    binding: &'static str,
}

impl Outcome {
    fn actual_secs(&self) -> Option<f64> {
        match (self.first_ms, self.last_ms) {
            (Some(a), Some(b)) if b > a => Some((b - a) as f64 / 1_000.0),
            _ => None,
        }
    }
}

/// What the restart row did to Redis.
#[derive(Default)]
struct Restart {
    down_at_s: f64,
    back_at_s: Option<f64>,
    rate_limited_after: Option<u64>,
    problem: Option<String>,
}

/// One line of the table.
struct Row {
    label: &'static str,
    llmq: Result<Outcome, String>,
    naive: Option<Result<Outcome, String>>,
}

/// Starts Redis again if it is down when dropped (the restart row, however it ends).
struct RedisGuard;

impl Drop for RedisGuard {
    fn drop(&mut self) {
        if !redis_up() {
            eprintln!("Redis is down: starting it again");
            let _ = std::process::Command::new("redis-server")
                .args(REDIS_ARGS)
                .current_dir("/")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !redis_up() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
}

fn redis_up() -> bool {
    std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379", "ping"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"PONG"))
}

async fn redis_up_async() -> bool {
    tokio::task::spawn_blocking(redis_up).await.unwrap_or(false)
}

/// Runs a service command to its end; its output when it fails.
async fn service(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {} {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// target/bench-fidelity, next to the `llmq` binary's profile directory.
fn log_dir() -> anyhow::Result<PathBuf> {
    let bin = TestApp::llmq_binary()?;
    let target = bin
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf);
    let dir = target.join("bench-fidelity");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// One `llmq worker` child process.
struct Child {
    child: tokio::process::Child,
    metrics_port: u16,
    log: PathBuf,
    exited: bool,
}

/// (le, cumulative count) of the send-lateness histogram in a `/metrics` text, summed
/// over its label sets; `None` when the series is absent.
fn parse_lateness(text: &str) -> Option<Vec<(f64, f64)>> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    let mut seen = false;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(SEND_LATENESS) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix('{') else {
            continue;
        };
        let Some(close) = rest.find('}') else {
            continue;
        };
        let labels = &rest[..close];
        let Some(le) = labels.split(',').find_map(|l| {
            l.trim()
                .strip_prefix("le=\"")
                .and_then(|v| v.strip_suffix('"'))
        }) else {
            continue;
        };
        let le = match le {
            "+Inf" | "Inf" | "inf" => f64::INFINITY,
            v => match v.parse::<f64>() {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let Some(count) = rest[close + 1..]
            .split_whitespace()
            .next()
            .and_then(|c| c.parse::<f64>().ok())
        else {
            continue;
        };
        seen = true;
        merge_bucket(&mut out, le, count);
    }
    seen.then_some(out)
}

fn merge_bucket(into: &mut Vec<(f64, f64)>, le: f64, count: f64) {
    if let Some(b) = into.iter_mut().find(|(l, _)| *l == le) {
        b.1 += count;
    } else {
        into.push((le, count));
    }
}

fn trim_num(x: f64) -> String {
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_owned()
}

fn bound(le: f64) -> String {
    if le < 1.0 {
        format!("≤ {} ms", trim_num(le * 1_000.0))
    } else {
        format!("≤ {} s", trim_num(le))
    }
}

/// The smallest bucket bound holding at least `share` of the observations.
fn lateness_bound(h: &Option<Vec<(f64, f64)>>, share: f64) -> String {
    let Some(h) = h else {
        return "n/a".to_owned();
    };
    let mut h = h.clone();
    h.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = h.iter().map(|(_, c)| *c).fold(0.0, f64::max);
    if total <= 0.0 {
        return "no sends".to_owned();
    }
    let need = (total * share).ceil();
    match h.iter().find(|(_, c)| *c >= need) {
        Some((le, _)) if le.is_finite() => bound(*le),
        _ => {
            let largest = h
                .iter()
                .map(|(le, _)| *le)
                .filter(|le| le.is_finite())
                .fold(f64::NAN, f64::max);
            if largest.is_nan() {
                "n/a".to_owned()
            } else {
                format!("> {}", bound(largest).trim_start_matches("≤ "))
            }
        }
    }
}

/// The merged histogram as "≤ 1 ms: 12, ≤ 2 ms: 3, …" (per bucket, not cumulative).
fn histogram_line(h: &Option<Vec<(f64, f64)>>) -> String {
    let Some(h) = h else {
        return "n/a (no such metric)".to_owned();
    };
    let mut h = h.clone();
    h.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut below = 0.0;
    let mut parts = Vec::new();
    for (le, cum) in h {
        let name = if le.is_finite() {
            bound(le)
        } else {
            "more".to_owned()
        };
        parts.push(format!("{name}: {}", cum - below));
        below = cum;
    }
    parts.join(", ")
}

async fn scrape_lateness(port: u16) -> Option<Vec<(f64, f64)>> {
    let text = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    parse_lateness(&text)
}

/// Everything one batch needs.
struct Batch<'a> {
    cli: &'a Cli,
    app: &'a TestApp,
    namespace: &'a str,
    mode: Mode,
    label: &'static str,
    slug: &'static str,
    workload: &'a Workload,
    /// Scope the workers' limit to the key (all models).
    per_key: bool,
    /// Restart Redis in the middle.
    restart: bool,
    /// Start the workers no earlier than this (mock clock, ms).
    start_at_ms: Option<u64>,
}

impl Batch<'_> {
    fn tag(&self) -> String {
        format!("[{} {}]", self.label, self.mode.name())
    }

    fn env(&self, metrics_port: u16) -> Vec<(String, String)> {
        let w = self.workload;
        let mut env = self.app.child_env();
        let mut set = |k: &str, v: String| env.push((k.to_owned(), v));
        set("LLMQ_ADMISSION__MODE", self.mode.setting().to_owned());
        set("LLMQ_ADMISSION__NAMESPACE", self.namespace.to_owned());
        set("LLMQ_PROVIDERS__OPENAI__RATE_LIMIT__RPM", w.rpm.to_string());
        set("LLMQ_PROVIDERS__OPENAI__RATE_LIMIT__TPM", w.tpm.to_string());
        set(
            "LLMQ_PROVIDERS__OPENAI__RATE_LIMIT__REQUEST_BURST_SECS",
            "1".to_owned(),
        );
        set(
            "LLMQ_PROVIDERS__OPENAI__RATE_LIMIT__TOKEN_BURST_SECS",
            trim_num(TOKEN_BURST_SECS),
        );
        if self.per_key {
            set(
                "LLMQ_PROVIDERS__OPENAI__RATE_LIMIT__SCOPE",
                "key".to_owned(),
            );
        }
        set("LLMQ_WORKER__CONCURRENCY", self.cli.concurrency.to_string());
        set("LLMQ_WORKER__SHUTDOWN_GRACE_SECS", "2".to_owned());
        set(
            "LLMQ_WORKER__METRICS_BIND",
            format!("127.0.0.1:{metrics_port}"),
        );
        set("RUST_LOG", "warn,lapin=error".to_owned());
        env
    }

    fn tenant(&self) -> String {
        format!("fidelity-{}-{}", self.slug, self.mode.name())
    }

    /// (terminal, succeeded) jobs of this batch.
    async fn counts(&self) -> anyhow::Result<(i64, i64)> {
        Ok(sqlx::query_as(&format!(
            "SELECT count(*) FILTER (WHERE state IN {TERMINAL}),
                    count(*) FILTER (WHERE state = 'succeeded')
             FROM jobs WHERE tenant = $1"
        ))
        .bind(self.tenant())
        .fetch_one(&self.app.pool)
        .await?)
    }

    fn in_range(&self, log: &[Admitted], from_ms: u64, to_ms: u64) -> Vec<Admitted> {
        log.iter()
            .filter(|a| a.at_ms >= from_ms && a.at_ms <= to_ms)
            .cloned()
            .collect()
    }

    async fn enqueue(&self) -> anyhow::Result<u64> {
        let client = self.app.client().await;
        let mut enqueued = 0;
        for (i, (model, prompt, max_tokens, total)) in self.workload.jobs().into_iter().enumerate()
        {
            enqueued += total;
            let job = NewJob::new(
                self.tenant(),
                model,
                vec![ChatMessage::user(prompt_of(prompt))],
            )
            .max_tokens(u32::try_from(max_tokens)?)
            .max_attempts(20)
            .metadata("size", total.into())
            .metadata("i", i.into());
            client.enqueue(job).await?;
        }
        Ok(enqueued)
    }

    async fn start_children(&self) -> anyhow::Result<Vec<Child>> {
        let bin = TestApp::llmq_binary()?;
        let dir = log_dir()?;
        let mut children = Vec::new();
        for i in 0..self.cli.workers {
            let port = free_port()?;
            let log = dir.join(format!("{}-{}-w{i}.log", self.slug, self.mode.name()));
            let err = std::fs::File::create(&log)?;
            let child = tokio::process::Command::new(&bin)
                .arg("worker")
                .envs(self.env(port))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(err)
                .kill_on_drop(true)
                .spawn()?;
            children.push(Child {
                child,
                metrics_port: port,
                log,
                exited: false,
            });
        }
        Ok(children)
    }

    /// SIGTERM (the grace is 2 s), then SIGKILL what is left.
    async fn stop_children(&self, children: &mut [Child]) {
        for c in children.iter() {
            if let Some(pid) = c.child.id() {
                let _ = tokio::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for c in children.iter_mut() {
            if tokio::time::timeout_at(deadline, c.child.wait())
                .await
                .is_err()
            {
                let _ = c.child.start_kill();
                let _ = c.child.wait().await;
            }
        }
    }

    async fn restart_redis(&self, first_ms: u64) -> Restart {
        let mock = &self.app.mock;
        let mut r = Restart {
            down_at_s: mock.elapsed_ms().saturating_sub(first_ms) as f64 / 1_000.0,
            ..Default::default()
        };
        eprintln!("{} shutting Redis down (nosave)", self.tag());
        if let Err(e) = service(
            "redis-cli",
            &["-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"],
        )
        .await
        {
            r.problem = Some(e);
        }
        tokio::time::sleep(REDIS_DOWN).await;
        if let Err(e) = service("redis-server", &REDIS_ARGS).await {
            r.problem = Some(e);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !redis_up_async().await {
            if Instant::now() > deadline {
                r.problem = Some("Redis did not answer PING 20 s after its start".into());
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        r.back_at_s = Some(mock.elapsed_ms().saturating_sub(first_ms) as f64 / 1_000.0);
        r.rate_limited_after = Some(mock.stats().rate_limited);
        eprintln!("{} Redis answers again", self.tag());
        r
    }

    async fn run(&self) -> anyhow::Result<Outcome> {
        let w = self.workload;
        let tag = self.tag();
        let mock = &self.app.mock;
        let enqueued_tokens = self.enqueue().await?;
        let ideal_guess = w.ideal_secs(w.n, enqueued_tokens);
        eprintln!("{tag} {} jobs enqueued ({enqueued_tokens} tokens)", w.n);
        if let Some(at) = self.start_at_ms {
            let now = mock.elapsed_ms();
            if at > now {
                eprintln!(
                    "{tag} starting the workers in {:.1} s",
                    (at - now) as f64 / 1_000.0
                );
                tokio::time::sleep(Duration::from_millis(at - now)).await;
            }
        }

        let limited_before = mock.stats().rate_limited;
        let start_ms = mock.elapsed_ms();
        let started = Instant::now();
        let bound = Duration::from_secs_f64(4.0 * ideal_guess + 60.0);
        let mut children = self.start_children().await?;
        eprintln!(
            "{tag} {} workers started; bound {:.0} s",
            children.len(),
            bound.as_secs_f64()
        );

        let mut restart: Option<Restart> = None;
        let mut next_progress = started + Duration::from_secs(5);
        let mut incomplete = None;
        let n = i64::try_from(w.n)?;
        let (terminal, succeeded) = loop {
            let (terminal, succeeded) = self.counts().await?;
            if terminal >= n {
                break (terminal, succeeded);
            }
            if self.restart && restart.is_none() {
                let first = mock
                    .admitted()
                    .iter()
                    .find(|a| a.at_ms >= start_ms)
                    .map(|a| a.at_ms);
                if let Some(first) = first {
                    if mock.elapsed_ms() >= first + RESTART_AFTER_MS {
                        restart = Some(self.restart_redis(first).await);
                    }
                }
            }
            for (i, c) in children.iter_mut().enumerate() {
                if !c.exited {
                    if let Ok(Some(status)) = c.child.try_wait() {
                        c.exited = true;
                        eprintln!(
                            "{tag} worker {i} exited ({status}); see {}",
                            c.log.display()
                        );
                    }
                }
            }
            if children.iter().all(|c| c.exited) {
                incomplete = Some(format!(
                    "every worker exited with {terminal}/{n} jobs terminal"
                ));
                break (terminal, succeeded);
            }
            if Instant::now() >= next_progress {
                next_progress += Duration::from_secs(5);
                let admitted = mock
                    .admitted()
                    .iter()
                    .filter(|a| a.at_ms >= start_ms)
                    .count();
                eprintln!(
                    "{tag} {:>4} s: {terminal}/{n} jobs done, provider admitted {admitted}, 429s {}",
                    started.elapsed().as_secs(),
                    mock.stats().rate_limited - limited_before
                );
            }
            if started.elapsed() > bound {
                incomplete = Some(format!(
                    "{terminal}/{n} jobs terminal after {:.0} s (4x the ideal + 60 s)",
                    bound.as_secs_f64()
                ));
                break (terminal, succeeded);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let end_ms = mock.elapsed_ms();

        let mut lateness: Option<Vec<(f64, f64)>> = None;
        for c in &children {
            if let Some(h) = scrape_lateness(c.metrics_port).await {
                let into = lateness.get_or_insert_with(Vec::new);
                for (le, count) in h {
                    merge_bucket(into, le, count);
                }
            }
        }
        self.stop_children(&mut children).await;
        eprintln!("{tag} send lateness: {}", histogram_line(&lateness));

        let log = self.in_range(&mock.admitted(), start_ms, end_ms);
        if let Some(dir) = std::env::var_os("FIDELITY_DUMP") {
            let rows: String = log
                .iter()
                .map(|a| format!("{},{},{}\n", a.at_ms, a.tokens, a.model))
                .collect();
            let file =
                std::path::Path::new(&dir).join(format!("{}-{}.csv", self.slug, self.mode.name()));
            let _ = std::fs::write(file, rows);
        }
        let stats = mock.stats();
        let charged: u64 = log.iter().map(|a| a.tokens).sum();
        // What the provider admitted and charged, once the batch is over; what was
        // enqueued otherwise.
        let ideal_from = if incomplete.is_none() && !log.is_empty() {
            (log.len(), charged, "the provider's admissions")
        } else {
            (w.n, enqueued_tokens, "the batch enqueued")
        };
        if let Some(r) = restart.as_mut() {
            r.rate_limited_after = r.rate_limited_after.map(|at| stats.rate_limited - at);
        } else if self.restart {
            restart = Some(Restart {
                problem: Some("the batch ended before the restart was due".into()),
                ..Default::default()
            });
        }
        let outcome = Outcome {
            kind: w.kind,
            n: w.n,
            not_ok: n - succeeded,
            incomplete,
            first_ms: log.first().map(|a| a.at_ms),
            last_ms: log.last().map(|a| a.at_ms),
            admitted: log.len(),
            enqueued_tokens,
            rate_limited: stats.rate_limited - limited_before,
            lateness,
            restart,
            ideal: w.ideal_secs(ideal_from.0, ideal_from.1),
            binding: w.binding(ideal_from.0, ideal_from.1),
            ideal_from,
        };
        eprintln!(
            "{tag} done: {terminal}/{n} terminal, {} not succeeded, {} admitted, {} 429s (by limit since the mock started: {:?}), {} s first to last admission",
            outcome.not_ok,
            outcome.admitted,
            outcome.rate_limited,
            stats.rate_limited_by_dim,
            outcome
                .actual_secs()
                .map_or_else(|| "n/a".to_owned(), |s| format!("{s:.1}"))
        );
        Ok(outcome)
    }
}

/// A clean app: its own database, queues and mock provider with `workload`'s limits.
async fn fresh_app(cli: &Cli, workload: &Workload) -> TestApp {
    spawn_app_with(AppOptions {
        mock: MockConfig {
            latency: Duration::from_millis(cli.latency_ms),
            limits: Some(workload.limits()),
            ..Default::default()
        },
        api: false,
        workers: 0,
        concurrency: cli.concurrency,
        rate_limit: None,
        configure: None,
    })
    .await
}

fn fresh_namespace() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("llmq-fidelity-{}", &id[..12])
}

/// A row's settings.
struct Plan {
    label: &'static str,
    slug: &'static str,
    workload: Workload,
    per_key: bool,
    restart: bool,
}

async fn run_one(
    cli: &Cli,
    app: &TestApp,
    namespace: &str,
    mode: Mode,
    plan: &Plan,
    start_at_ms: Option<u64>,
) -> Result<Outcome, String> {
    Batch {
        cli,
        app,
        namespace,
        mode,
        label: plan.label,
        slug: plan.slug,
        workload: &plan.workload,
        per_key: plan.per_key,
        restart: plan.restart,
        start_at_ms,
    }
    .run()
    .await
    .map_err(|e| format!("{e:#}"))
}

/// A fresh row (and its warm repeat when `warm` names it), then its naive run.
async fn run_group(
    cli: &Cli,
    naive: bool,
    plan: Plan,
    warm: Option<(&'static str, &'static str)>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let namespace = fresh_namespace();
    let _guard = plan.restart.then_some(RedisGuard);
    let app = fresh_app(cli, &plan.workload).await;
    let fresh = run_one(cli, &app, &namespace, Mode::Global, &plan, None).await;
    let warm_row = warm.map(|(label, slug)| {
        let ready = match &fresh {
            Ok(o) if o.incomplete.is_none() => o.last_ms.ok_or("no admission in the fresh batch"),
            Ok(_) => Err("skipped: the fresh batch did not finish"),
            Err(_) => Err("skipped: the fresh batch failed"),
        };
        (label, slug, ready)
    });
    let fresh_index = rows.len();
    rows.push(Row {
        label: plan.label,
        llmq: fresh,
        naive: None,
    });
    if let Some((label, slug, ready)) = warm_row {
        let llmq = match ready {
            Ok(last_ms) => {
                let warm_plan = Plan {
                    label,
                    slug,
                    workload: plan.workload.clone(),
                    per_key: plan.per_key,
                    restart: false,
                };
                let at = last_ms + cli.warm_wait_secs * 1_000;
                run_one(cli, &app, &namespace, Mode::Global, &warm_plan, Some(at)).await
            }
            Err(why) => Err(why.to_owned()),
        };
        rows.push(Row {
            label,
            llmq,
            naive: None,
        });
    }
    drop(app);
    if naive && !plan.restart {
        let app = fresh_app(cli, &plan.workload).await;
        let out = run_one(cli, &app, &fresh_namespace(), Mode::Naive, &plan, None).await;
        rows[fresh_index].naive = Some(out);
    }
    rows
}

fn secs(x: Option<f64>) -> String {
    x.map_or_else(|| "n/a".to_owned(), |s| format!("{s:.1}"))
}

fn util(o: &Outcome) -> String {
    match o.actual_secs() {
        Some(a) if o.incomplete.is_none() => format!("{:.1}%", o.ideal / a * 100.0),
        _ => "n/a".to_owned(),
    }
}

fn actual(o: &Outcome) -> String {
    let s = secs(o.actual_secs());
    if o.incomplete.is_some() {
        format!("{s}*")
    } else {
        s
    }
}

fn print_table(cli: &Cli, rows: &[Row]) {
    let with_naive = rows.iter().any(|r| r.naive.is_some());
    let mut header = vec![
        "row",
        "jobs",
        "ideal s",
        "llmq s",
        "utilisation",
        "provider 429s",
        "worst send jitter",
        "p99 send jitter",
        "not succeeded",
    ];
    if with_naive {
        header.extend([
            "naive s",
            "naive utilisation",
            "naive 429s",
            "naive not succeeded",
        ]);
    }
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    let mut notes = Vec::new();
    for r in rows {
        let mut line = vec![r.label.to_owned()];
        match &r.llmq {
            Ok(o) => {
                line.extend([
                    o.n.to_string(),
                    format!("{:.1}", o.ideal),
                    actual(o),
                    util(o),
                    o.rate_limited.to_string(),
                    lateness_bound(&o.lateness, 1.0),
                    lateness_bound(&o.lateness, 0.99),
                    o.not_ok.to_string(),
                ]);
                notes.extend(outcome_notes(r.label, "llmq", o));
            }
            Err(e) => {
                line.extend(vec!["-".to_owned(); 8]);
                notes.push(format!("{}: {e}", r.label));
            }
        }
        if with_naive {
            match &r.naive {
                Some(Ok(o)) => {
                    line.extend([
                        actual(o),
                        util(o),
                        o.rate_limited.to_string(),
                        o.not_ok.to_string(),
                    ]);
                    notes.extend(outcome_notes(r.label, "naive", o));
                }
                Some(Err(e)) => {
                    line.extend(vec!["-".to_owned(); 4]);
                    notes.push(format!("{} (naive): {e}", r.label));
                }
                None => line.extend(vec!["-".to_owned(); 4]),
            }
        }
        lines.push(line);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    println!(
        "\nfidelity: {} `llmq worker` processes x concurrency {} ({} calls in flight at most); mock provider latency {} ms, buckets full at the start, requests enforced per second, token buckets a minute's worth{}",
        cli.workers,
        cli.concurrency,
        cli.workers * usize::from(cli.concurrency),
        cli.latency_ms,
        if cli.ci { "; CI batches (W-RPM halved)" } else { "" }
    );
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                let pad = w - c.chars().count();
                if i == 0 {
                    format!("{c}{}", " ".repeat(pad))
                } else {
                    format!("{}{c}", " ".repeat(pad))
                }
            })
            .collect();
        println!("{}", cells.join("  "));
    }
    println!(
        "\nllmq s: provider's first to last admission of the batch; ideal s: the least the limits allow from buckets full at the start; utilisation = ideal / actual; send jitter: how late calls left after their budget slot (smallest histogram bound holding all, or 99%, of them); * = incomplete."
    );
    for n in notes {
        println!("  {n}");
    }
}

fn outcome_notes(label: &str, mode: &str, o: &Outcome) -> Vec<String> {
    let mut notes = Vec::new();
    let (requests, tokens, from) = o.ideal_from;
    if o.kind == Kind::Tpm {
        notes.push(format!(
            "{label} ({mode}): ideal from S_total = {tokens} tokens over {requests} calls, {from} ({} tokens enqueued); {}",
            o.enqueued_tokens, o.binding
        ));
    } else if requests != o.n {
        notes.push(format!(
            "{label} ({mode}): ideal from {requests} calls, {from} ({} jobs enqueued)",
            o.n
        ));
    }
    if let Some(why) = &o.incomplete {
        notes.push(format!("{label} ({mode}): incomplete: {why}"));
    }
    if let Some(r) = &o.restart {
        match (&r.problem, r.back_at_s) {
            (None, Some(back)) => notes.push(format!(
                "{label} ({mode}): Redis shut down {:.1} s after the first admission, answering again at {back:.1} s; 429s {} in total, {} after Redis came back",
                r.down_at_s,
                o.rate_limited,
                r.rate_limited_after.unwrap_or(0)
            )),
            (Some(p), _) => notes.push(format!(
                "{label} ({mode}): restart problem: {p}; 429s {} in total",
                o.rate_limited
            )),
            (None, None) => {}
        }
    }
    notes
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let all = cli.rows.contains(&RowSet::All);
    let want = |r: RowSet| all || cli.rows.contains(&r);
    // W-TPM keeps its 400 jobs in CI: fewer would fit in the bucket that starts full
    // and the token limit would never bind.
    let (n_rpm, n_tpm) = if cli.ci { (300, 400) } else { (600, 400) };
    let naive = cli.naive && !cli.ci;
    eprintln!("fidelity: logs of the workers in {}", log_dir()?.display());

    let mut rows = Vec::new();
    if want(RowSet::WRpm) {
        let plan = Plan {
            label: "W-RPM fresh",
            slug: "w-rpm-fresh",
            workload: Workload::rpm(n_rpm),
            per_key: false,
            restart: false,
        };
        rows.extend(run_group(&cli, naive, plan, Some(("W-RPM warm", "w-rpm-warm"))).await);
    }
    if want(RowSet::WTpm) {
        let plan = Plan {
            label: "W-TPM fresh",
            slug: "w-tpm-fresh",
            workload: Workload::tpm(n_tpm),
            per_key: false,
            restart: false,
        };
        rows.extend(run_group(&cli, naive, plan, Some(("W-TPM warm", "w-tpm-warm"))).await);
    }
    if want(RowSet::Restart) {
        let plan = Plan {
            label: "W-RPM Redis restart",
            slug: "w-rpm-redis-restart",
            workload: Workload::rpm(n_rpm),
            per_key: false,
            restart: true,
        };
        rows.extend(run_group(&cli, naive, plan, None).await);
    }
    if want(RowSet::PerKey) {
        let plan = Plan {
            label: "W-RPM 3 models, per-key limit",
            slug: "w-rpm-per-key",
            workload: Workload::per_key(n_rpm),
            per_key: true,
            restart: false,
        };
        rows.extend(run_group(&cli, naive, plan, None).await);
    }
    print_table(&cli, &rows);
    Ok(())
}
