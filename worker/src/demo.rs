//! `llmq demo`: pushes a batch of sample jobs through the HTTP API with a progress bar,
//! follows them to the end and prints where to watch them.

use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

const PROMPTS: &[&str] = &[
    "Write a haiku about message queues.",
    "Explain rate limits to a five-year-old.",
    "Name three reasons a network call can fail.",
    "Summarise the CAP theorem in one sentence.",
    "Suggest a name for a friendly robot.",
    "What is exponential backoff with jitter?",
];

/// A progress bar on a terminal; plain lines at each quarter otherwise (logs, CI).
fn bar(len: u64, msg: &'static str) -> ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let pb = ProgressBar::hidden();
        pb.set_length(len);
        pb.set_message(msg);
        return pb;
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg);
    pb
}

fn tick(pb: &ProgressBar) {
    pb.inc(1);
    if pb.is_hidden() {
        let (pos, len) = (pb.position(), pb.length().unwrap_or(0));
        if len > 0 && (pos == len || (pos * 4 / len) != ((pos - 1) * 4 / len)) {
            eprintln!("{:>10} {pos}/{len}", pb.message());
        }
    }
}

/// Enqueues `jobs` sample jobs at `api` (e.g. `http://127.0.0.1:8080`) and waits for them.
pub async fn run(api: &str, jobs: usize, model: &str, timeout: Duration) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let api = api.trim_end_matches('/');
    let started = Instant::now();
    let pb = bar(jobs as u64, "enqueued");
    let ids: Vec<anyhow::Result<String>> = stream::iter(0..jobs)
        .map(|i| {
            let http = http.clone();
            let pb = pb.clone();
            async move {
                let body = json!({
                    "tenant": "demo",
                    "model": model,
                    "messages": [{"role": "user", "content": PROMPTS[i % PROMPTS.len()]}],
                    "max_tokens": 64,
                    "metadata": {"demo_index": i},
                });
                let resp = http
                    .post(format!("{api}/v1/jobs"))
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot reach the API at {api}: {e}; is `llmq api` running?"
                        )
                    })?;
                let status = resp.status();
                let v: Value = resp.json().await?;
                if !status.is_success() {
                    anyhow::bail!("the API refused a job ({status}): {v}");
                }
                tick(&pb);
                Ok(v["id"].as_str().unwrap_or_default().to_owned())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    pb.finish();
    let ids: Vec<String> = ids.into_iter().collect::<anyhow::Result<_>>()?;

    let pb = bar(ids.len() as u64, "finished");
    let mut pending = ids.clone();
    let mut by_state = std::collections::BTreeMap::<String, usize>::new();
    let deadline = Instant::now() + timeout;
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for id in pending {
            let v: Value = http
                .get(format!("{api}/v1/jobs/{id}"))
                .send()
                .await?
                .json()
                .await?;
            let state = v["state"].as_str().unwrap_or("unknown").to_owned();
            if matches!(
                state.as_str(),
                "succeeded" | "failed" | "cancelled" | "expired"
            ) {
                *by_state.entry(state).or_default() += 1;
                tick(&pb);
            } else {
                still.push(id);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    pb.finish();
    let summary: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    println!(
        "\n{} jobs in {:.1}s: {}{}",
        ids.len(),
        started.elapsed().as_secs_f64(),
        summary.join(", "),
        if pending.is_empty() {
            String::new()
        } else {
            format!(", {} still running", pending.len())
        }
    );
    if let Some(first) = ids.first() {
        let v: Value = http
            .get(format!("{api}/v1/jobs/{first}"))
            .send()
            .await?
            .json()
            .await?;
        println!("\nexample result:\n{}", serde_json::to_string_pretty(&v)?);
        println!("\nwatch a job:   curl -s {api}/v1/jobs/{first}");
        println!("its events:    curl -sN {api}/v1/jobs/{first}/events");
    }
    println!("web page:      {api}/   (type a prompt, watch it wait, generate, arrive)");
    println!("API document:  {api}/openapi.json");
    println!("health:        curl -s {api}/healthz");
    println!("submit one:    curl -s -X POST {api}/v1/jobs -H 'content-type: application/json' \\\n                 -d '{{\"model\":\"{model}\",\"max_tokens\":64,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'");
    if !pending.is_empty() {
        anyhow::bail!("{} jobs did not finish within {:?}", pending.len(), timeout);
    }
    Ok(())
}
