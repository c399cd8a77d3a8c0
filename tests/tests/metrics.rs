//! Prometheus metrics: a worker's `/metrics` counts provider calls, finished jobs by state
//! and class, latency, tokens and queue depth; the API's counts enqueued jobs. No key or
//! URL appears in either.

use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use llmq_mock_provider::Faults;
use llmq_producer_sdk::{ChatMessage, JobState, NewJob};
use llmq_tests::{spawn_app_with, AppOptions};

static PORT: AtomicU16 = AtomicU16::new(0);

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_api_metrics_count_what_happened() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    PORT.store(port, Ordering::SeqCst);
    let app = spawn_app_with(AppOptions {
        api: true,
        configure: Some(|s, _| {
            s.worker.metrics_bind = Some(format!("127.0.0.1:{}", PORT.load(Ordering::SeqCst)));
        }),
        ..Default::default()
    })
    .await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..2 {
        let r: serde_json::Value = http
            .post(format!("{}/v1/jobs", app.api_url()))
            .json(&serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 8,
                "messages": [{"role": "user", "content": format!("api {i}")}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(r["id"].as_str().unwrap().parse().unwrap());
    }
    let client = app.client().await;
    ids.push(
        client
            .enqueue(
                NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("sdk")]).max_tokens(8),
            )
            .await
            .unwrap(),
    );
    for id in &ids {
        assert_eq!(
            app.wait_terminal(*id, Duration::from_secs(30)).await.state,
            JobState::Succeeded
        );
    }
    app.mock.set_faults(Faults {
        error_rate: 1.0,
        ..Default::default()
    });
    let failing = client
        .enqueue(
            NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("fails")])
                .max_tokens(8)
                .max_attempts(1),
        )
        .await
        .unwrap();
    assert_eq!(
        app.wait_terminal(failing, Duration::from_secs(30))
            .await
            .state,
        JobState::Failed
    );

    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut text = String::new();
    // Queue depth is sampled every 5 s; the counters are there at once.
    for _ in 0..60 {
        text = http.get(&url).send().await.unwrap().text().await.unwrap();
        if text.contains("llmq_queue_messages{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = |series: &str| value(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert_eq!(
        v(r#"llmq_provider_calls_total{provider="openai",outcome="succeeded",class="none"}"#),
        3.0
    );
    assert_eq!(
        v(r#"llmq_provider_calls_total{provider="openai",outcome="retryable",class="upstream"}"#),
        1.0
    );
    assert_eq!(v(r#"llmq_jobs_total{state="succeeded",class="none"}"#), 3.0);
    assert_eq!(
        v(r#"llmq_jobs_total{state="failed",class="upstream"}"#),
        1.0
    );
    assert_eq!(
        v(r#"llmq_provider_latency_seconds_count{provider="openai"}"#),
        4.0
    );
    assert!(v(r#"llmq_tokens_total{provider="openai",kind="completion"}"#) >= 3.0);
    assert_eq!(v("llmq_jobs_in_flight"), 0.0);
    assert!(text.contains(&format!(
        "llmq_queue_messages{{queue=\"{}.work\"}}",
        app.prefix
    )));
    assert!(!text.contains("sk-"), "no key in metrics");

    let api = http
        .get(format!("{}/metrics", app.api_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        value(&api, r#"llmq_api_jobs_enqueued_total{duplicate="false"}"#),
        Some(2.0),
        "{api}"
    );
    assert!(!api.contains("sk-"), "no key in metrics");
}
