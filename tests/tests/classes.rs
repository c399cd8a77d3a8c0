//! One case per error class against mock-provider's injected faults: the class, the number
//! of provider calls (1 for non-retryable), the final state and the evidence recorded.

use std::time::Duration;

use llmq_mock_provider::{Faults, Limits as MockLimits, MockConfig};
use llmq_producer_sdk::{ChatMessage, JobState, JobStatus, NewJob};
use llmq_tests::{spawn_app_with, AppOptions, TestApp};

/// outcome, error_class, failed_layer, http_status
type AttemptRow = (String, Option<String>, Option<String>, Option<i32>);

struct Case {
    name: &'static str,
    faults: Faults,
    limits: Option<MockLimits>,
    configure: Option<fn(&mut llmq_worker::Settings, &str)>,
    max_tokens: u32,
    max_attempts: u32,
    state: JobState,
    /// Class of every failed attempt.
    class: &'static str,
    layer: &'static str,
    calls: u64,
}

fn base(name: &'static str, faults: Faults, class: &'static str, layer: &'static str) -> Case {
    Case {
        name,
        faults,
        limits: None,
        configure: None,
        max_tokens: 8,
        max_attempts: 3,
        state: JobState::Failed,
        class,
        layer,
        calls: 3,
    }
}

async fn run(case: Case) -> (TestApp, JobStatus, Vec<AttemptRow>) {
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            faults: case.faults.clone(),
            limits: case.limits.clone(),
            ..Default::default()
        },
        configure: case.configure,
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let id = client
        .enqueue(
            NewJob::new(
                "acme",
                "gpt-4o-mini",
                vec![ChatMessage::user(format!("case {}", case.name))],
            )
            .max_tokens(case.max_tokens)
            .max_attempts(case.max_attempts),
        )
        .await
        .unwrap();
    let status = app.wait_terminal(id, Duration::from_secs(40)).await;
    let attempts = sqlx::query_as("SELECT outcome, error_class, failed_layer, http_status FROM job_attempts WHERE job_id = $1 ORDER BY attempt")
        .bind(id.0)
        .fetch_all(&app.pool)
        .await
        .unwrap();
    (app, status, attempts)
}

async fn check(case: Case) {
    let (name, state, class, layer, calls) =
        (case.name, case.state, case.class, case.layer, case.calls);
    let (app, status, attempts) = run(case).await;
    assert_eq!(status.state, state, "{name}: {status:?}");
    assert_eq!(
        app.mock.stats().requests_total,
        calls,
        "{name}: provider calls"
    );
    let failed: Vec<_> = attempts.iter().filter(|a| a.0 != "succeeded").collect();
    assert!(!failed.is_empty(), "{name}: no failed attempt recorded");
    for a in failed {
        assert_eq!(a.1.as_deref(), Some(class), "{name}: {attempts:?}");
        assert_eq!(a.2.as_deref(), Some(layer), "{name}: {attempts:?}");
    }
    if state == JobState::Failed {
        assert_eq!(
            status.last_error.as_ref().map(|e| e.class.as_str()),
            Some(class),
            "{name}"
        );
        let dead = app.wait_dead_letters(1).await;
        assert!(
            dead[0].1.as_deref().unwrap_or_default().starts_with(class),
            "{name}: {dead:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_upstream_and_retried_until_attempts_run_out() {
    check(base(
        "500",
        Faults {
            error_rate: 1.0,
            ..Default::default()
        },
        "upstream",
        "upstream",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_is_upstream_and_retried() {
    check(base(
        "503",
        Faults {
            overloaded_rate: 1.0,
            ..Default::default()
        },
        "upstream",
        "upstream",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_is_upstream() {
    check(base(
        "outage",
        Faults {
            outage: true,
            ..Default::default()
        },
        "upstream",
        "upstream",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_is_network_never_a_rate_limit() {
    let mut c = base(
        "reset",
        Faults {
            reset_rate: 1.0,
            ..Default::default()
        },
        "network",
        "network",
    );
    c.calls = 3;
    check(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_body_is_upstream() {
    check(base(
        "truncated",
        Faults {
            truncate_rate: 1.0,
            ..Default::default()
        },
        "upstream",
        "upstream",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_past_the_read_timeout_is_timeout() {
    let mut c = base(
        "stall",
        Faults {
            stall_ms: 2_500,
            ..Default::default()
        },
        "timeout",
        "network",
    );
    c.max_attempts = 2;
    c.calls = 2;
    c.configure = Some(|s, _| {
        let p = s.providers.get_mut("openai").unwrap();
        p.timeout_base_secs = 1;
        p.timeout_per_1k_tokens_secs = 0;
    });
    check(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_quota_is_not_retried() {
    let mut c = base(
        "quota",
        Faults {
            quota_keys: vec!["sk-test-0123456789abcdef".into()],
            ..Default::default()
        },
        "quota_exhausted",
        "quota",
    );
    c.max_attempts = 5;
    c.calls = 1;
    check(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_key_is_auth_and_not_retried() {
    let mut c = base(
        "401",
        Faults {
            unauthorized_keys: vec!["sk-test-0123456789abcdef".into()],
            ..Default::default()
        },
        "auth",
        "identity",
    );
    c.max_attempts = 5;
    c.calls = 1;
    check(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_length_is_bad_request_and_not_retried() {
    let mut c = base(
        "context",
        Faults {
            context_limit: Some(20),
            ..Default::default()
        },
        "bad_request",
        "request",
    );
    c.max_tokens = 100;
    c.max_attempts = 5;
    c.calls = 1;
    check(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_rate_limit_is_rate_limited_then_succeeds_after_retry_after() {
    // No llmq budget configured: the provider's own limiter answers 429 with Retry-After.
    let mut app = spawn_app_with(AppOptions {
        mock: MockConfig {
            limits: Some(MockLimits {
                rpm: Some(60),
                per_second: true,
                ..Default::default()
            }),
            ..Default::default()
        },
        workers: 0,
        ..Default::default()
    })
    .await;
    // Use up the one request of this second, so our job meets the 429.
    let r = reqwest::Client::new()
        .post(format!("{}/chat/completions", app.mock.base_url()))
        .bearer_auth("sk-test-0123456789abcdef")
        .json(&serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let client = app.client().await;
    let id = client
        .enqueue(
            NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("after 429")])
                .max_tokens(8)
                .max_attempts(5),
        )
        .await
        .unwrap();
    app.start_worker();
    let status = app.wait_terminal(id, Duration::from_secs(30)).await;
    let attempts: Vec<AttemptRow> =
        sqlx::query_as("SELECT outcome, error_class, failed_layer, http_status FROM job_attempts WHERE job_id = $1 ORDER BY attempt")
            .bind(id.0)
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    assert!(app.mock.stats().rate_limited >= 1);
    let first = &attempts[0];
    assert_eq!(
        (first.1.as_deref(), first.2.as_deref(), first.3),
        (Some("rate_limited"), Some("rate_limit"), Some(429))
    );
    assert_eq!(attempts.last().unwrap().0, "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_is_permission_and_not_retried() {
    let mut c = base(
        "403",
        Faults {
            forbidden_keys: vec!["sk-test-0123456789abcdef".into()],
            ..Default::default()
        },
        "permission",
        "identity",
    );
    c.max_attempts = 5;
    c.calls = 1;
    check(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_request_too_large_is_not_retried() {
    // No llmq budget configured: the provider itself says the request exceeds its TPM.
    let mut c = base(
        "too large",
        Faults::default(),
        "request_too_large",
        "request",
    );
    c.limits = Some(MockLimits {
        tpm: Some(100),
        ..Default::default()
    });
    c.max_tokens = 500;
    c.max_attempts = 5;
    c.calls = 1;
    check(c).await;
}
