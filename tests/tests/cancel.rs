//! Cancellation: `DELETE /v1/jobs/{id}` (and `Client::cancel`) while a job is queued,
//! waiting for budget or retrying makes it `cancelled`; no provider call follows and a
//! budget reservation is given back. Running or finished jobs answer 409.

use std::time::Duration;

use chrono::Utc;
use llmq_mock_provider::{Faults, MockConfig};
use llmq_producer_sdk::{ChatMessage, Error, JobId, JobState, NewJob};
use llmq_tests::{spawn_app_with, AppOptions, TestApp};
use llmq_worker::settings::RateLimitSettings;
use serde_json::Value;

fn job(text: &str) -> NewJob {
    NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user(text)])
        .max_tokens(16)
        .max_attempts(5)
}

async fn delete(app: &TestApp, id: JobId) -> (u16, Value) {
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/jobs/{id}", app.api_url()))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn transitions(app: &TestApp, id: JobId) -> Vec<String> {
    sqlx::query_scalar("SELECT state FROM job_transitions WHERE job_id = $1 ORDER BY seq")
        .bind(id.0)
        .fetch_all(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_queued_means_no_provider_call() {
    let mut app = spawn_app_with(AppOptions {
        api: true,
        workers: 0,
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let id = client.enqueue(job("never run me")).await.unwrap();
    let (code, body) = delete(&app, id).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["state"], "cancelled");
    // Again: it is finished now.
    let (code, body) = delete(&app, id).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "not_cancellable");
    // Unknown job.
    let (code, _) = delete(&app, JobId::new()).await;
    assert_eq!(code, 404);

    // A worker now takes the message and drops it without calling the provider.
    let next = client.enqueue(job("run me")).await.unwrap();
    app.start_worker();
    assert_eq!(
        app.wait_terminal(next, Duration::from_secs(30)).await.state,
        JobState::Succeeded
    );
    assert_eq!(
        app.mock.stats().requests_total,
        1,
        "only the second job ran"
    );
    assert_eq!(client.status(id).await.unwrap().state, JobState::Cancelled);
    assert_eq!(transitions(&app, id).await, ["queued", "cancelled"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_waiting_for_budget_returns_the_reservation() {
    // 12 requests a minute: one slot every 5 s.
    let app = spawn_app_with(AppOptions {
        rate_limit: Some(RateLimitSettings {
            rpm: Some(12),
            tpm: Some(1_000_000),
            request_burst_secs: 1.0,
            token_burst_secs: 60.0,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let a = client.enqueue(job("first")).await.unwrap();
    let b = client
        .enqueue(job("second, to be cancelled"))
        .await
        .unwrap();
    let waiting = app
        .wait_for(b, JobState::WaitingBudget, Duration::from_secs(20))
        .await;
    let b_slot = waiting.expected_start_at.unwrap();
    // The shared bucket's request clock, to see the reservation come back.
    let admission = llmq_worker::admission::Admission::new(&app.settings).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    let redis = redis::Client::open(llmq_tests::redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let tat = |v: Option<String>| v.map(|s| s.parse::<f64>().unwrap()).unwrap_or(0.0);
    let before = tat(redis::AsyncCommands::hget(
        &mut conn,
        scope.hash_of("requests").unwrap(),
        "tat:requests",
    )
    .await
    .unwrap());
    let cancelled = client.cancel(b).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    // The worker holding b hears of it on the events exchange and gives the slot back at
    // once (not when the slot comes): the request clock moves back by one interval.
    let interval_ms = 60_000.0
        / scope
            .dims
            .iter()
            .find(|d| d.name() == "requests")
            .unwrap()
            .per_minute;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = tat(redis::AsyncCommands::hget(
            &mut conn,
            scope.hash_of("requests").unwrap(),
            "tat:requests",
        )
        .await
        .unwrap());
        if now < before {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reservation was not returned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        Utc::now() < b_slot,
        "returned before b's slot came, so it was the cancellation that returned it"
    );
    assert!(
        (before - after - interval_ms).abs() < 1.0,
        "exactly one request's worth came back: {} ms, interval {interval_ms} ms",
        before - after
    );

    // The next job runs; b never reaches the provider.
    let c = client.enqueue(job("third")).await.unwrap();
    for id in [a, c] {
        assert_eq!(
            app.wait_terminal(id, Duration::from_secs(30)).await.state,
            JobState::Succeeded
        );
    }
    assert_eq!(
        app.mock.stats().requests_total,
        2,
        "b never reached the provider"
    );
    assert_eq!(client.status(b).await.unwrap().state, JobState::Cancelled);
    assert!(matches!(
        client.cancel(a).await,
        Err(Error::NotCancellable {
            state: JobState::Succeeded,
            ..
        })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_retrying_stops_further_calls() {
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            faults: Faults {
                error_rate: 1.0,
                ..Default::default()
            },
            ..Default::default()
        },
        api: true,
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let id = client.enqueue(job("fails, then cancelled")).await.unwrap();
    app.wait_for(id, JobState::Retrying, Duration::from_secs(20))
        .await;
    let (code, body) = delete(&app, id).await;
    assert_eq!(code, 200, "{body}");
    app.mock.set_faults(Faults::default());
    let calls = app.mock.stats().requests_total;
    // Past the retry's delay tier (1 s): the message comes back and is dropped.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(app.queue_depth(&app.topology().work_queue()).await, 0);
    assert_eq!(
        app.mock.stats().requests_total,
        calls,
        "no call after cancel"
    );
    assert_eq!(client.status(id).await.unwrap().state, JobState::Cancelled);
    let t = transitions(&app, id).await;
    assert_eq!(t.last().unwrap(), "cancelled", "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_cannot_be_cancelled() {
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            latency: Duration::from_secs(2),
            ..Default::default()
        },
        api: true,
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let id = client.enqueue(job("slow")).await.unwrap();
    app.wait_for(id, JobState::Running, Duration::from_secs(20))
        .await;
    let (code, body) = delete(&app, id).await;
    assert_eq!(code, 409, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("running"));
    assert_eq!(
        app.wait_terminal(id, Duration::from_secs(30)).await.state,
        JobState::Succeeded
    );
}
