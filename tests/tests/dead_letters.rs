//! Operators list, show and replay dead letters; jobs waiting for a retry survive a
//! worker killed with SIGKILL.

use std::process::Stdio;
use std::time::Duration;

use llmq_mock_provider::{Faults, MockConfig};
use llmq_producer_sdk::{ChatMessage, JobState, NewJob};
use llmq_tests::{spawn_app_with, AppOptions, TestApp};

const KEY: &str = "sk-test-0123456789abcdef";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_jobs_are_listed_shown_and_replayed() {
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            faults: Faults {
                unauthorized_keys: vec![KEY.into()],
                ..Default::default()
            },
            ..Default::default()
        },
        // The 401s open the provider's circuit; let it probe again soon after the fix.
        configure: Some(|s, _| s.breaker.fatal_cooldown_secs = 1),
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            client
                .enqueue(
                    NewJob::new(
                        "acme",
                        "gpt-4o-mini",
                        vec![ChatMessage::user(format!("dlq {i}"))],
                    )
                    .max_tokens(8),
                )
                .await
                .unwrap(),
        );
    }
    for id in &ids {
        app.wait_for(*id, JobState::Failed, Duration::from_secs(20))
            .await;
    }
    // Wait until all three dead letters are in (they are published before the ack).
    for _ in 0..50 {
        if app.queue_depth(&app.topology().dead_queue()).await == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // `llmq dlq list` shows them, and leaves them there.
    let out = tokio::process::Command::new(TestApp::llmq_binary().unwrap())
        .args(["dlq", "list"])
        .envs(app.child_env())
        .env("RUST_LOG", "off")
        .stderr(Stdio::inherit())
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for id in &ids {
        assert!(text.contains(&id.to_string()), "{text}");
    }
    assert!(
        text.contains("auth") && text.contains("3 dead letter(s)"),
        "{text}"
    );
    assert!(!text.contains(KEY), "the key must never be printed: {text}");
    assert_eq!(
        app.queue_depth(&app.topology().dead_queue()).await,
        3,
        "listing changed the queue"
    );

    let out = tokio::process::Command::new(TestApp::llmq_binary().unwrap())
        .args(["dlq", "show", &ids[0].to_string()])
        .envs(app.child_env())
        .env("RUST_LOG", "off")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("attempt 1: fatal class=auth layer=identity http=401"),
        "{text}"
    );

    // The key is fixed; replay one, then the rest.
    app.mock.set_faults(Faults::default());
    let done = llmq_worker::dlq::replay(&app.settings, &app.pool, Some(ids[0]))
        .await
        .unwrap();
    assert_eq!(done.replayed, vec![ids[0]]);
    let s = app
        .wait_for(ids[0], JobState::Succeeded, Duration::from_secs(20))
        .await;
    assert_eq!(
        s.attempts, 2,
        "history kept: one failed attempt, then the replayed one"
    );
    let done = llmq_worker::dlq::replay(&app.settings, &app.pool, None)
        .await
        .unwrap();
    assert_eq!(done.replayed.len(), 2);
    for id in &ids[1..] {
        app.wait_for(*id, JobState::Succeeded, Duration::from_secs(20))
            .await;
    }
    assert_eq!(app.queue_depth(&app.topology().dead_queue()).await, 0);
    let err = llmq_worker::dlq::replay(&app.settings, &app.pool, Some(ids[0]))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not in the dead-letter queue"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_jobs_wait_for_their_retry_loses_none() {
    let mut app = spawn_app_with(AppOptions {
        mock: MockConfig {
            faults: Faults {
                error_rate: 1.0,
                ..Default::default()
            },
            ..Default::default()
        },
        workers: 0,
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let total = 20;
    for i in 0..total {
        client
            .enqueue(
                NewJob::new(
                    "acme",
                    "gpt-4o-mini",
                    vec![ChatMessage::user(format!("k{i}"))],
                )
                .max_tokens(8)
                .max_attempts(10),
            )
            .await
            .unwrap();
    }
    let mut child = tokio::process::Command::new(TestApp::llmq_binary().unwrap())
        .arg("worker")
        .envs(app.child_env())
        .env("RUST_LOG", "off")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Every job failed once and waits in a delay queue for its retry.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let retrying: i64 =
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'retrying'")
                .fetch_one(&app.pool)
                .await
                .unwrap();
        if retrying == total {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {retrying} jobs retrying"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    // The provider recovers; a new worker finds every job.
    app.mock.set_faults(Faults::default());
    app.start_worker();
    let counts = app.wait_all_terminal(total, Duration::from_secs(60)).await;
    assert_eq!(counts, vec![("succeeded".to_string(), total)]);
}
