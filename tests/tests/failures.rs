//! Failed calls are classified by the layer that failed, retried only when another
//! attempt can succeed (through the durable delay queues), and kept as evidence.

use std::time::Duration;

use llmq_mock_provider::MockConfig;
use llmq_producer_sdk::{ChatMessage, JobState, NewJob};
use llmq_tests::{spawn_app_with, AppOptions};

/// attempt, outcome, error_class, failed_layer, http_status, base_url_host
type AttemptRow = (
    i32,
    String,
    Option<String>,
    Option<String>,
    Option<i32>,
    String,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_network_retried_then_failed_with_evidence() {
    let app = spawn_app_with(AppOptions {
        configure: Some(|s, _| {
            // Nothing listens on port 1: connection refused.
            s.providers.get_mut("openai").unwrap().base_url = "http://127.0.0.1:1/v1".into();
        }),
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let id = client
        .enqueue(
            NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("hi")])
                .max_tokens(8)
                .max_attempts(2),
        )
        .await
        .unwrap();
    let s = app.wait_terminal(id, Duration::from_secs(15)).await;
    assert_eq!(s.state, JobState::Failed);
    let err = s.last_error.unwrap();
    assert_eq!(
        err.class, "network",
        "a refused connection is a network fault, never a rate limit"
    );
    assert_eq!(s.attempts, 2);

    let rows: Vec<AttemptRow> = sqlx::query_as(
        "SELECT attempt, outcome, error_class, failed_layer, http_status, base_url_host FROM job_attempts WHERE job_id = $1 ORDER BY attempt",
    )
    .bind(id.0)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].1, "retry");
    assert_eq!(rows[1].1, "fatal");
    for r in &rows {
        assert_eq!(r.2.as_deref(), Some("network"));
        assert_eq!(r.3.as_deref(), Some("network"));
        assert_eq!(r.4, None);
        assert_eq!(r.5, "127.0.0.1");
    }
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM job_transitions WHERE job_id = $1 ORDER BY seq")
            .bind(id.0)
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        states,
        ["queued", "running", "retrying", "running", "failed"]
    );
    let dead = app.wait_dead_letters(1).await;
    assert!(
        dead[0]
            .1
            .as_deref()
            .unwrap_or_default()
            .starts_with("network"),
        "{dead:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_is_auth_and_not_retried() {
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            accept_keys: Some(vec!["sk-the-only-good-key".into()]),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let id = client
        .enqueue(
            NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("hi")])
                .max_tokens(8)
                .max_attempts(5),
        )
        .await
        .unwrap();
    let s = app.wait_terminal(id, Duration::from_secs(15)).await;
    assert_eq!(s.state, JobState::Failed);
    assert_eq!(s.last_error.as_ref().unwrap().class, "auth");
    assert_eq!(s.attempts, 1);
    assert_eq!(
        app.mock.stats().requests_total,
        1,
        "exactly one provider call"
    );
    let (code, layer, rid): (Option<String>, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT error_code, failed_layer, provider_request_id FROM job_attempts WHERE job_id = $1",
    )
    .bind(id.0)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(code.as_deref(), Some("invalid_api_key"));
    assert_eq!(layer.as_deref(), Some("identity"));
    assert!(rid.unwrap().starts_with("req_"));
    // The key never lands in the record.
    let msg: String = sqlx::query_scalar("SELECT error_message FROM jobs WHERE id = $1")
        .bind(id.0)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(!msg.contains("sk-test-0123456789abcdef"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_deadline_expires_without_a_call() {
    let app = spawn_app_with(AppOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let id = client
        .enqueue(
            NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("late")])
                .max_tokens(8)
                .deadline(chrono::Utc::now() + chrono::Duration::milliseconds(200)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut app = app;
    app.start_worker();
    let s = app.wait_terminal(id, Duration::from_secs(15)).await;
    assert_eq!(s.state, JobState::Expired);
    assert_eq!(app.mock.stats().requests_total, 0);
}
