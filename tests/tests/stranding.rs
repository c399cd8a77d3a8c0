//! No job is stranded: each test reproduces a way a job used to stay non-terminal (or a
//! replica used to stall) and checks that the job now ends.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use llmq_producer_sdk::{ChatMessage, ChatRequest, JobId, JobState, NewJob, Usage};
use llmq_tests::{spawn_app_with, AppOptions};
use llmq_worker::provider::{CallError, Observer, Provider, ProviderReply, Remaining};
use llmq_worker::settings::{ProviderKind, RateLimitSettings};
use llmq_worker::store;
use tokio_util::sync::CancellationToken;

fn no_worker() -> AppOptions {
    AppOptions {
        workers: 0,
        ..Default::default()
    }
}

/// Takes the job's message off the work queue as a worker would, leaves it unacked, and
/// marks the record `running` (the holder's claim); dropping the returned connection is
/// the holder's crash: the broker redelivers the message, flagged redelivered.
async fn hold_and_claim(app: &llmq_tests::TestApp, id: JobId) -> lapin::Connection {
    let (conn, ch) = app.channel().await;
    let mut consumer = ch
        .basic_consume(
            &app.topology().work_queue(),
            "crashing-holder",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("the job's message arrives")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&delivery.data).contains(&id.to_string()));
    assert_eq!(
        store::claim(&app.pool, id, false).await.unwrap(),
        Some(1),
        "the holder claims attempt 1"
    );
    conn
}

/// `rpm` paced per second (the bucket holds one request), with `max_wait_secs`.
fn paced_budget(s: &mut llmq_worker::Settings, rpm: u64, max_wait_secs: u64) {
    s.admission.max_wait_secs = max_wait_secs;
    if let Some(p) = s.providers.get_mut("openai") {
        p.rate_limit = Some(RateLimitSettings {
            rpm: Some(rpm),
            request_burst_secs: 1.0,
            token_burst_secs: 60.0,
            ..Default::default()
        });
    }
}

fn slow_budget(s: &mut llmq_worker::Settings, _mock: &str) {
    // 6 RPM paced per second: with no state the bucket starts empty, so the first slot is
    // about 10 s away, past max_wait.
    paced_budget(s, 6, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_job_sent_back_for_budget_still_runs() {
    let mut app = spawn_app_with(AppOptions {
        configure: Some(slow_budget),
        ..no_worker()
    })
    .await;
    let client = app.client().await;
    let id = client
        .enqueue(
            NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("taken over")]).max_tokens(8),
        )
        .await
        .unwrap();
    let holder = hold_and_claim(&app, id).await;
    holder.close(200, "crash").await.unwrap();
    app.start_worker();
    // Redelivered to the worker with its record `running`; its slot is past max_wait, so
    // it goes back through a delay queue. That copy must still run.
    let s = app
        .wait_for(id, JobState::Succeeded, Duration::from_secs(60))
        .await;
    assert_eq!(s.result.unwrap().content, "mock reply to: taken over");
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM job_transitions WHERE job_id = $1 ORDER BY seq")
            .bind(id.0)
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert!(
        states.iter().any(|s| s == "retrying"),
        "the deferral is recorded: {states:?}"
    );
    assert_eq!(app.mock.stats().requests_total, 1, "one provider call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_holder_records_and_publishes_nothing_after_a_takeover() {
    let app = spawn_app_with(no_worker()).await;
    let client = app.client().await;
    let id = client
        .enqueue(NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("twice")]).max_tokens(8))
        .await
        .unwrap();
    // The first holder claims attempt 1, loses its broker connection; a redelivery
    // elsewhere takes the job over as attempt 2.
    assert_eq!(store::claim(&app.pool, id, false).await.unwrap(), Some(1));
    assert_eq!(store::claim(&app.pool, id, true).await.unwrap(), Some(2));
    let late = llmq_producer_sdk::CompletionResult {
        content: "the stale holder's text".into(),
        finish_reason: None,
        provider: "openai".into(),
        model: "gpt-4o-mini".into(),
        provider_request_id: None,
        usage: Usage::default(),
    };
    let t = |attempt, result| store::Transition {
        state: JobState::Succeeded,
        attempt,
        result,
        error: None,
        evidence: None,
        detail: None,
    };
    assert!(
        !store::record(&app.pool, id, &t(1, Some(&late)))
            .await
            .unwrap(),
        "attempt 1 is fenced off once attempt 2 owns the job"
    );
    assert!(store::record(&app.pool, id, &t(2, None)).await.unwrap());
    let succeeded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_transitions WHERE job_id = $1 AND state = 'succeeded'",
    )
    .bind(id.0)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(succeeded, 1, "one terminal transition");
}

fn slow_budget_long_wait(s: &mut llmq_worker::Settings, _mock: &str) {
    // 12 RPM paced per second: the first slot is about 5 s away, within max_wait.
    paced_budget(s, 12, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_during_the_budget_wait_expires_the_job_uncalled() {
    let app = spawn_app_with(AppOptions {
        configure: Some(slow_budget_long_wait),
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let id = client
        .enqueue(
            NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("too late")])
                .max_tokens(8)
                .deadline(chrono::Utc::now() + chrono::Duration::seconds(2)),
        )
        .await
        .unwrap();
    let s = app.wait_terminal(id, Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Expired, "{:?}", s.last_error);
    assert_eq!(app.mock.stats().requests_total, 0, "no provider call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_of_a_live_job_fails_the_job_with_the_reason() {
    let app = spawn_app_with(AppOptions::default()).await;
    let broken_id = JobId::new();
    sqlx::query(
        "INSERT INTO jobs (id, tenant, state, model, max_attempts, envelope, created_at, published_at)
         VALUES ($1, 'acme', 'queued', 'gpt-4o-mini', 3, '{}'::jsonb, now(), now())",
    )
    .bind(broken_id.0)
    .execute(&app.pool)
    .await
    .unwrap();
    let body = format!(
        r#"{{"version":1,"id":"{broken_id}","tenant":"acme","route":{{"model":"gpt-4o-mini"}},"request":{{"messages":[],"max_tokens":8,"max_tokens":9}},"max_attempts":3,"created_at":"2026-11-29T00:00:00Z"}}"#
    );
    let (_c, ch) = app.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "",
        &app.topology().work_queue(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let s = app.wait_terminal(broken_id, Duration::from_secs(30)).await;
    assert_eq!(s.state, JobState::Failed);
    let e = s.last_error.expect("the reason is recorded");
    assert_eq!(e.class, "malformed");
    assert!(e.message.contains("duplicate field"), "{}", e.message);
    let dead = app.wait_dead_letters(1).await;
    assert_eq!(dead.len(), 1, "and the message is dead-lettered");
}

fn quick_repair(s: &mut llmq_worker::Settings, _mock: &str) {
    s.worker.repair_after_secs = 2;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_job_whose_message_was_lost_is_republished_or_failed() {
    let mut app = spawn_app_with(AppOptions {
        configure: Some(quick_repair),
        ..no_worker()
    })
    .await;
    let client = app.client().await;
    let mut ids = Vec::new();
    for prompt in ["lost while queued", "lost while running", "lost too often"] {
        ids.push(
            client
                .enqueue(
                    NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user(prompt)])
                        .max_tokens(8),
                )
                .await
                .unwrap(),
        );
    }
    // The broker loses every message (e.g. dead-lettered from a queue without a leader).
    let (_c, ch) = app.channel().await;
    ch.queue_purge(
        &app.topology().work_queue(),
        lapin::options::QueuePurgeOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        store::claim(&app.pool, ids[1], false).await.unwrap(),
        Some(1)
    );
    sqlx::query("UPDATE jobs SET repairs = $2 WHERE id = $1")
        .bind(ids[2].0)
        .bind(store::MAX_REPAIRS)
        .execute(&app.pool)
        .await
        .unwrap();
    app.start_worker();
    for id in &ids[..2] {
        let s = app
            .wait_for(*id, JobState::Succeeded, Duration::from_secs(60))
            .await;
        assert!(s.result.is_some());
    }
    let s = app.wait_terminal(ids[2], Duration::from_secs(60)).await;
    assert_eq!(s.state, JobState::Failed);
    let e = s.last_error.unwrap();
    assert_eq!(e.class, "lost");
    assert!(e.message.contains("llmq dlq replay"), "{}", e.message);
    let dead = app.wait_dead_letters(1).await;
    assert_eq!(dead.len(), 1, "a copy waits in the dead-letter queue");
    assert_eq!(
        app.mock.stats().requests_total,
        2,
        "one call per republished job"
    );
}

/// An adapter that panics on the first call of each prompt starting with "boom", and
/// answers every other call.
struct PanicsOnce {
    seen: Mutex<HashSet<String>>,
}

impl Provider for PanicsOnce {
    fn name(&self) -> &str {
        "openai"
    }
    fn kind(&self) -> ProviderKind {
        ProviderKind::Openai
    }
    fn host(&self) -> &str {
        "in-process"
    }
    fn endpoint(&self) -> &'static str {
        "/test"
    }
    fn complete<'a>(
        &'a self,
        model: &'a str,
        request: &'a ChatRequest,
        _observer: &'a Observer<'a>,
    ) -> BoxFuture<'a, Result<ProviderReply, CallError>> {
        Box::pin(async move {
            let prompt = request.messages[0].content.clone();
            let first = self.seen.lock().unwrap().insert(prompt.clone());
            if first && prompt.starts_with("boom") {
                panic!("adapter bug on {prompt}");
            }
            Ok(ProviderReply {
                content: format!("ok: {prompt}"),
                finish_reason: Some("stop".into()),
                model: model.to_owned(),
                request_id: None,
                usage: Usage::default(),
                status: 200,
                remaining: Remaining::default(),
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_job_task_hands_its_delivery_back_and_the_replica_keeps_consuming() {
    let app = spawn_app_with(AppOptions {
        concurrency: 2,
        ..no_worker()
    })
    .await;
    let mut providers: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
    providers.insert(
        "openai".into(),
        Arc::new(PanicsOnce {
            seen: Mutex::new(HashSet::new()),
        }),
    );
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    tokio::spawn(llmq_worker::consume::run_with(
        app.settings.clone(),
        app.pool.clone(),
        providers,
        stop.clone(),
    ));
    let client = app.client().await;
    let mut ids = Vec::new();
    // Three times the replica's concurrency of panicking jobs, then ordinary ones.
    for i in 0..6 {
        ids.push(
            client
                .enqueue(
                    NewJob::new(
                        "acme",
                        "gpt-4o-mini",
                        vec![ChatMessage::user(format!("boom {i}"))],
                    )
                    .max_tokens(8),
                )
                .await
                .unwrap(),
        );
    }
    for i in 0..10 {
        ids.push(
            client
                .enqueue(
                    NewJob::new(
                        "acme",
                        "gpt-4o-mini",
                        vec![ChatMessage::user(format!("fine {i}"))],
                    )
                    .max_tokens(8),
                )
                .await
                .unwrap(),
        );
    }
    for id in ids {
        let s = app
            .wait_for(id, JobState::Succeeded, Duration::from_secs(60))
            .await;
        assert!(s.result.unwrap().content.starts_with("ok: "));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_call_is_not_taken_for_lost() {
    let app = spawn_app_with(AppOptions {
        configure: Some(quick_repair),
        mock: llmq_mock_provider::MockConfig {
            latency: Duration::from_secs(8),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let id = client
        .enqueue(
            NewJob::new(
                "acme",
                "gpt-4o-mini",
                vec![ChatMessage::user("slow but alive")],
            )
            .max_tokens(8),
        )
        .await
        .unwrap();
    // The call outlasts repair_after (2 s) four times; its holder keeps the job alive.
    let s = app
        .wait_for(id, JobState::Succeeded, Duration::from_secs(60))
        .await;
    assert_eq!(s.attempts, 1);
    assert_eq!(app.mock.stats().requests_total, 1, "one provider call");
    let repairs: i32 = sqlx::query_scalar("SELECT repairs FROM jobs WHERE id = $1")
        .bind(id.0)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(repairs, 0);
}
