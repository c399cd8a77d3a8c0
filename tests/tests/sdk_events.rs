//! The producer SDK follows jobs push-style: `events()` yields every transition once, in
//! order, ending with the terminal one and its result; `wait()` wakes on events and still
//! finishes when no event ever comes (a change made behind its back).

use std::time::Duration;

use futures_util::StreamExt;
use llmq_mock_provider::{Faults, MockConfig};
use llmq_producer_sdk::{ChatMessage, Error, JobId, JobState, NewJob};
use llmq_tests::{spawn_app_with, AppOptions};

fn job(text: &str) -> NewJob {
    NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user(text)])
        .max_tokens(16)
        .max_attempts(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_yield_every_transition_then_the_result() {
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            latency: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let id = client.enqueue(job("follow me")).await.unwrap();
    let events: Vec<_> = client
        .events(id)
        .map(|e| e.unwrap())
        .collect::<Vec<_>>()
        .await;
    let states: Vec<JobState> = events.iter().map(|e| e.state).collect();
    assert_eq!(
        states,
        [JobState::Queued, JobState::Running, JobState::Succeeded]
    );
    let last = events.last().unwrap();
    assert_eq!(
        last.result.as_ref().unwrap().content,
        "mock reply to: follow me"
    );
    assert_eq!(events[1].attempt, 1);
    assert!(events.windows(2).all(|w| w[0].at <= w[1].at));

    // A failing job: retrying, then failed with its error.
    app.mock.set_faults(Faults {
        error_rate: 1.0,
        ..Default::default()
    });
    let id = client.enqueue(job("fail me")).await.unwrap();
    let events: Vec<_> = client.events(id).map(|e| e.unwrap()).collect().await;
    let states: Vec<JobState> = events.iter().map(|e| e.state).collect();
    assert_eq!(
        states,
        [
            JobState::Queued,
            JobState::Running,
            JobState::Retrying,
            JobState::Running,
            JobState::Failed
        ]
    );
    assert_eq!(
        events.last().unwrap().error.as_ref().unwrap().class,
        "upstream"
    );

    // No such job.
    let missing: Vec<_> = client.events(JobId::new()).collect().await;
    assert!(matches!(missing.as_slice(), [Err(Error::NotFound(_))]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_finishes_even_when_no_event_comes() {
    let app = spawn_app_with(AppOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let id = client
        .enqueue(job("changed behind the SDK's back"))
        .await
        .unwrap();
    let pool = app.pool.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A terminal state written without publishing any event.
        sqlx::query("UPDATE jobs SET state = 'expired', finished_at = now() WHERE id = $1")
            .bind(id.0)
            .execute(&pool)
            .await
            .unwrap();
    });
    let status = client.wait(id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.state, JobState::Expired);
    // And a wait that runs out says where the job is.
    let other = client.enqueue(job("never runs")).await.unwrap();
    match client.wait(other, Duration::from_millis(300)).await {
        Err(Error::Timeout { state, .. }) => assert_eq!(state, JobState::Queued),
        r => panic!("expected a timeout, got {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transition_is_published_by_tenant_and_state() {
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            latency: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let (_conn, ch) = app.channel().await;
    let mut consumer = app.topology().follow_events(&ch, "acme.*").await.unwrap();

    let client = app.client().await;
    let other = client
        .enqueue(
            NewJob::new(
                "globex",
                "gpt-4o-mini",
                vec![ChatMessage::user("not acme's")],
            )
            .max_tokens(8),
        )
        .await
        .unwrap();
    let id = client.enqueue(job("push me")).await.unwrap();
    client.wait(other, Duration::from_secs(30)).await.unwrap();

    let mut keys = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(Ok(d))) = tokio::time::timeout_at(deadline, consumer.next()).await {
        let e: llmq_producer_sdk::JobEvent = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(e.job_id, id, "only acme's events reach acme.*");
        keys.push(d.routing_key.to_string());
        if e.state == JobState::Succeeded {
            assert_eq!(
                e.result.unwrap().content,
                "mock reply to: push me",
                "the result rides on the terminal event"
            );
            break;
        }
    }
    assert_eq!(keys, ["acme.queued", "acme.running", "acme.succeeded"]);
}
