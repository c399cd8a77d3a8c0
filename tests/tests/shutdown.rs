//! A worker process stopped with SIGTERM mid-batch exits 0 and loses no job.

use std::process::Stdio;
use std::time::Duration;

use llmq_mock_provider::MockConfig;
use llmq_producer_sdk::{ChatMessage, NewJob};
use llmq_tests::{spawn_app_with, AppOptions, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_batch_drains_exits_zero_and_loses_nothing() {
    let mut app = spawn_app_with(AppOptions {
        workers: 0,
        concurrency: 8,
        mock: MockConfig {
            latency: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let total = 120;
    for i in 0..total {
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
            .unwrap();
    }

    let mut child = tokio::process::Command::new(TestApp::llmq_binary().unwrap())
        .arg("worker")
        .envs(app.child_env())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start llmq worker");

    // Wait until the worker is mid-batch: some jobs done, many left.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        if done >= 10 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker made no progress"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = child.id().expect("pid");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(40), child.wait())
        .await
        .expect("worker exits within its grace")
        .unwrap();
    assert_eq!(exit.code(), Some(0), "clean exit on SIGTERM");

    let done_after_stop: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(done_after_stop < total, "the stop happened mid-batch");
    // In-flight jobs were finished, not abandoned: nothing is left `running`.
    let running: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'running'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(running, 0, "in-flight jobs drained before exit");

    // Another worker picks up the rest: every job succeeds, none lost.
    app.start_worker();
    let counts = app.wait_all_terminal(total, Duration::from_secs(90)).await;
    assert_eq!(counts, vec![("succeeded".to_string(), total)]);
    let calls = app.mock.stats().succeeded;
    assert_eq!(
        calls,
        u64::try_from(total).unwrap(),
        "exactly one provider call per job"
    );
}
