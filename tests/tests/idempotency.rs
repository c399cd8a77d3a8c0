//! The same idempotency key (per tenant) yields one job and one provider call.

use std::time::Duration;

use llmq_producer_sdk::{ChatMessage, Client, JobState, NewJob};
use llmq_tests::spawn_app;
use serde_json::{json, Value};

fn job(key: &str) -> NewJob {
    NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("once only")])
        .max_tokens(16)
        .idempotency_key(key)
}

async fn enqueue_twice(
    client: &Client,
) -> (llmq_producer_sdk::Enqueued, llmq_producer_sdk::Enqueued) {
    let a = client
        .enqueue_envelope(job("order-42").into_envelope())
        .await
        .unwrap();
    let b = client
        .enqueue_envelope(job("order-42").into_envelope())
        .await
        .unwrap();
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_twice_is_one_job_and_one_provider_call() {
    let app = spawn_app().await;
    let client = app.client().await;
    let (first, second) = enqueue_twice(&client).await;
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(first.id, second.id);

    // The same key through the HTTP API, and for another tenant (a different job).
    let http = reqwest::Client::new();
    let body = json!({"tenant": "acme", "model": "gpt-4o-mini", "max_tokens": 16,
        "messages": [{"role": "user", "content": "once only"}], "idempotency_key": "order-42"});
    let r = http
        .post(format!("{}/v1/jobs", app.api_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["id"], first.id.to_string());
    assert_eq!(v["duplicate"], true);
    let other = client
        .enqueue(
            NewJob::new("globex", "gpt-4o-mini", vec![ChatMessage::user("x")])
                .max_tokens(16)
                .idempotency_key("order-42"),
        )
        .await
        .unwrap();
    assert_ne!(other, first.id);

    app.wait_for(first.id, JobState::Succeeded, Duration::from_secs(30))
        .await;
    app.wait_for(other, JobState::Succeeded, Duration::from_secs(30))
        .await;
    // Let any stray duplicate delivery be processed before counting calls.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 2);
    assert_eq!(
        app.mock.stats().requests_total,
        2,
        "one provider call per distinct job"
    );
    assert_eq!(app.queue_depth(&app.topology().work_queue()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_with_one_key_make_one_job() {
    let app = spawn_app().await;
    let client = app.client().await;
    let mut handles = Vec::new();
    for _ in 0..16 {
        let c = client.clone();
        handles.push(tokio::spawn(async move {
            c.enqueue(job("race-key")).await.unwrap()
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.push(h.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "all enqueues return the first job's id");
    app.wait_for(ids[0], JobState::Succeeded, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.mock.stats().requests_total, 1);
}
