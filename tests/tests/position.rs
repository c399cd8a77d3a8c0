//! Queue position and ETA while queued: the place in line counts down, and the ETA of a
//! job behind others under a known limit is close to when it actually started.

use std::time::Duration;

use chrono::{DateTime, Utc};
use llmq_producer_sdk::{ChatMessage, JobId, JobState, NewJob};
use llmq_tests::{spawn_app_with, AppOptions, TestApp};
use llmq_worker::settings::RateLimitSettings;
use serde_json::Value;

/// One worker taking one job at a time, 120 requests a minute: a job every 0.5 s.
async fn app() -> TestApp {
    spawn_app_with(AppOptions {
        api: true,
        workers: 1,
        concurrency: 1,
        rate_limit: Some(RateLimitSettings {
            rpm: Some(120),
            tpm: Some(10_000_000),
            request_burst_secs: 1.0,
            token_burst_secs: 60.0,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
}

async fn status(app: &TestApp, id: JobId) -> Value {
    app.get_json(&format!("/v1/jobs/{id}")).await
}

async fn enqueue(app: &TestApp, n: usize) -> Vec<JobId> {
    let client = app.client().await;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            client
                .enqueue(
                    NewJob::new(
                        "acme",
                        "gpt-4o-mini",
                        vec![ChatMessage::user(format!("job {i}"))],
                    )
                    .max_tokens(8),
                )
                .await
                .unwrap(),
        );
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn position_counts_down_while_queued() {
    let app = app().await;
    let ids = enqueue(&app, 10).await;
    let last = *ids.last().unwrap();
    let mut seen: Vec<u64> = Vec::new();
    loop {
        let s = status(&app, last).await;
        if s["state"] != "queued" {
            assert!(
                s.get("position").is_none(),
                "no position once out of line: {s}"
            );
            break;
        }
        let p = s["position"].as_u64().expect("a queued job has a position");
        if seen.last() != Some(&p) {
            seen.push(p);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen[0] >= 8, "the last of 10 starts far back: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[1] < w[0]),
        "only ever counts down: {seen:?}"
    );
    assert!(seen.len() >= 4, "seen counting down: {seen:?}");
    assert_eq!(
        *seen.last().unwrap(),
        1,
        "next in line before it left: {seen:?}"
    );
    let s = app.wait_terminal(last, Duration::from_secs(30)).await;
    assert_eq!(s.state, JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eta_of_a_job_behind_others_is_within_a_quarter_of_its_actual_start() {
    let app = app().await;
    let ids = enqueue(&app, 12).await;
    let last = *ids.last().unwrap();
    let asked_at = Utc::now();
    let s = status(&app, last).await;
    assert_eq!(s["state"], "queued", "{s}");
    let eta: DateTime<Utc> = s["expected_start_at"]
        .as_str()
        .expect("a queued job on a limited route has an ETA")
        .parse()
        .unwrap();
    app.wait_terminal(last, Duration::from_secs(60)).await;
    let started: DateTime<Utc> = sqlx::query_scalar(
        "SELECT at FROM job_transitions WHERE job_id = $1 AND state = 'running' ORDER BY seq LIMIT 1",
    )
    .bind(last.0)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let predicted = (eta - asked_at).num_milliseconds() as f64;
    let actual = (started - asked_at).num_milliseconds() as f64;
    println!("ETA {predicted:.0} ms after asking, started {actual:.0} ms after");
    assert!(actual > 2_000.0, "the job really waited: {actual} ms");
    assert!(
        (predicted - actual).abs() <= 0.25 * actual,
        "ETA {predicted} ms vs actual {actual} ms"
    );
}
