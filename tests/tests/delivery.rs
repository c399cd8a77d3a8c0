//! Broker-side guarantees: malformed messages are dead-lettered with their reason and the
//! worker keeps going; a redelivered finished job is acked without a second provider call.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use llmq_producer_sdk::{ChatMessage, JobState, NewJob};
use llmq_tests::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_their_reason_and_work_goes_on() {
    let app = spawn_app().await;
    let (_conn, ch) = app.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let work = app.topology().work_queue();
    let unknown_version =
        br#"{"version": 9, "id": "0190f5b2-0000-7000-8000-000000000000"}"#.to_vec();
    let no_record = NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("hi")])
        .max_tokens(8)
        .into_envelope();
    for body in [
        b"this is not json".to_vec(),
        unknown_version,
        no_record.encode(),
    ] {
        ch.basic_publish(
            "",
            &work,
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    let client = app.client().await;
    let good = client
        .enqueue(
            NewJob::new(
                "acme",
                "gpt-4o-mini",
                vec![ChatMessage::user("still works")],
            )
            .max_tokens(8),
        )
        .await
        .unwrap();
    let s = app
        .wait_for(good, JobState::Succeeded, Duration::from_secs(30))
        .await;
    assert_eq!(s.result.unwrap().content, "mock reply to: still works");

    let dead = app.wait_dead_letters(3).await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    let reasons: Vec<String> = dead
        .iter()
        .map(|(_, r)| r.clone().expect("reason header"))
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("malformed job envelope")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unsupported job envelope version 9")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("has no record")),
        "{reasons:?}"
    );
    assert!(
        dead.iter().any(|(b, _)| b == b"this is not json"),
        "original body kept"
    );
    assert_eq!(
        app.mock.stats().requests_total,
        1,
        "only the good job reached the provider"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_finished_job_is_acked_without_a_second_call() {
    let app = spawn_app().await;
    let client = app.client().await;
    let job = NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("once")])
        .max_tokens(8)
        .into_envelope();
    let id = client.enqueue_envelope(job.clone()).await.unwrap().id;
    app.wait_for(id, JobState::Succeeded, Duration::from_secs(30))
        .await;
    assert_eq!(app.mock.stats().requests_total, 1);

    // The broker hands the same message out again (as after a lost ack).
    let (_conn, ch) = app.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "",
        &app.topology().work_queue(),
        BasicPublishOptions::default(),
        &job.encode(),
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    for _ in 0..100 {
        if app.queue_depth(&app.topology().work_queue()).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.queue_depth(&app.topology().work_queue()).await, 0);
    assert_eq!(
        app.mock.stats().requests_total,
        1,
        "no second provider call"
    );
    assert_eq!(client.status(id).await.unwrap().state, JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_coming_back_fails_its_job_instead_of_vanishing() {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
    use lapin::types::FieldTable;

    let mut app = llmq_tests::spawn_app_with(llmq_tests::AppOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let id = client
        .enqueue(
            NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("poison")]).max_tokens(8),
        )
        .await
        .unwrap();
    // A worker that dies holding the message, again and again: the broker gets it back
    // each time.
    let returns = llmq_producer_sdk::topology::UNDELIVERABLE_AFTER;
    {
        let (_conn, ch) = app.channel().await;
        ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
        let mut consumer = ch
            .basic_consume(
                &app.topology().work_queue(),
                "crashing-worker",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for _ in 0..returns {
            let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("the message comes back")
                .unwrap()
                .unwrap();
            d.nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
        }
        ch.close(200, "done").await.unwrap();
    }
    // A real worker now gets it once more: it fails the job (no provider call) and
    // dead-letters the message with the reason, instead of the broker dropping it into
    // the dead-letter queue while the record says `queued` forever.
    app.start_worker();
    let status = app.wait_terminal(id, Duration::from_secs(30)).await;
    assert_eq!(status.state, JobState::Failed, "{status:?}");
    let err = status.last_error.unwrap();
    assert_eq!(err.class, "undeliverable");
    assert!(err.message.contains("llmq dlq replay"), "{}", err.message);
    assert_eq!(app.mock.stats().requests_total, 0);
    let dead = app.wait_dead_letters(1).await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .1
            .as_deref()
            .unwrap_or_default()
            .contains("times without an outcome"),
        "{dead:?}"
    );
}
