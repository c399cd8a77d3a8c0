//! Streamed answers: the text and usage equal the whole-body answer for both dialects; an
//! error event after a `200`, a stream that goes silent, and a port that refuses
//! connections are each classified by the layer that failed, and the job still ends well.

use std::time::Duration;

use llmq_mock_provider::{Faults, MockConfig};
use llmq_producer_sdk::{ChatMessage, JobId, JobState, NewJob};
use llmq_tests::{spawn_app_with, AppOptions, TestApp};

/// outcome, error_class, failed_layer, http_status, error_type
type AttemptRow = (
    String,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<String>,
);

async fn attempts(app: &TestApp, id: JobId) -> Vec<AttemptRow> {
    sqlx::query_as(
        "SELECT outcome, error_class, failed_layer, http_status, error_type
         FROM job_attempts WHERE job_id = $1 ORDER BY attempt",
    )
    .bind(id.0)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

async fn one_job(app: &TestApp, text: &str, provider: Option<&str>, attempts: u32) -> JobId {
    let mut job = NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user(text)])
        .max_tokens(64)
        .max_attempts(attempts);
    if let Some(p) = provider {
        job = job.provider(p);
    }
    app.client().await.enqueue(job).await.unwrap()
}

fn add_anthropic(s: &mut llmq_worker::Settings, mock_url: &str) {
    let mut p = s.providers["openai"].clone();
    p.kind = llmq_worker::settings::ProviderKind::Anthropic;
    p.base_url = mock_url.to_owned();
    s.providers.insert("anthropic".into(), p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_and_whole_answers_record_the_same_text_and_usage() {
    // Streamed (the default) for both dialects, paced one word per 5 ms.
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            chunk_delay: Duration::from_millis(5),
            ..Default::default()
        },
        configure: Some(add_anthropic),
        ..Default::default()
    })
    .await;
    let text = "tell me about streams in several words please";
    let a = one_job(&app, text, None, 3).await;
    let b = one_job(&app, text, Some("anthropic"), 3).await;
    let sa = app.wait_terminal(a, Duration::from_secs(30)).await;
    let sb = app.wait_terminal(b, Duration::from_secs(30)).await;
    drop(app);

    // The same jobs with streaming switched off.
    let app = spawn_app_with(AppOptions {
        configure: Some(|s, url| {
            add_anthropic(s, url);
            for p in s.providers.values_mut() {
                p.stream = false;
            }
        }),
        ..Default::default()
    })
    .await;
    let c = one_job(&app, text, None, 3).await;
    let d = one_job(&app, text, Some("anthropic"), 3).await;
    let sc = app.wait_terminal(c, Duration::from_secs(30)).await;
    let sd = app.wait_terminal(d, Duration::from_secs(30)).await;

    for (streamed, whole) in [(&sa, &sc), (&sb, &sd)] {
        assert_eq!(streamed.state, JobState::Succeeded, "{streamed:?}");
        assert_eq!(whole.state, JobState::Succeeded, "{whole:?}");
        let (rs, rw) = (
            streamed.result.as_ref().unwrap(),
            whole.result.as_ref().unwrap(),
        );
        assert_eq!(rs.content, format!("mock reply to: {text}"));
        assert_eq!(rs.content, rw.content);
        assert_eq!(rs.usage, rw.usage);
        assert_eq!(rs.finish_reason, rw.finish_reason);
        assert!(rs.provider_request_id.is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_event_after_the_200_is_upstream_and_retried() {
    for provider in [None, Some("anthropic")] {
        let app = spawn_app_with(AppOptions {
            mock: MockConfig {
                faults: Faults {
                    stream_error_rate: 1.0,
                    ..Default::default()
                },
                ..Default::default()
            },
            configure: Some(add_anthropic),
            ..Default::default()
        })
        .await;
        let id = one_job(&app, "error event please", provider, 2).await;
        let status = app.wait_terminal(id, Duration::from_secs(40)).await;
        assert_eq!(status.state, JobState::Failed, "{status:?}");
        assert_eq!(app.mock.stats().requests_total, 2, "{provider:?}");
        let rows = attempts(&app, id).await;
        let want_type = if provider.is_some() {
            "overloaded_error"
        } else {
            "server_error"
        };
        for r in &rows {
            assert_eq!(r.1.as_deref(), Some("upstream"), "{rows:?}");
            assert_eq!(r.2.as_deref(), Some("upstream"), "{rows:?}");
            assert_eq!(r.3, Some(200), "{rows:?}");
            assert_eq!(r.4.as_deref(), Some(want_type), "{rows:?}");
        }
        let last = status.last_error.unwrap();
        assert!(
            last.message.contains("error event after the 200"),
            "{last:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_goes_silent_is_a_timeout() {
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            faults: Faults {
                stream_stall_ms: 4_000,
                ..Default::default()
            },
            ..Default::default()
        },
        configure: Some(|s, _| {
            s.providers.get_mut("openai").unwrap().stall_timeout_secs = 1;
        }),
        ..Default::default()
    })
    .await;
    let id = one_job(&app, "stall after the first chunk", None, 2).await;
    let status = app.wait_terminal(id, Duration::from_secs(40)).await;
    assert_eq!(status.state, JobState::Failed, "{status:?}");
    assert_eq!(app.mock.stats().requests_total, 2);
    let rows = attempts(&app, id).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!(r.1.as_deref(), Some("timeout"), "{rows:?}");
        assert_eq!(r.2.as_deref(), Some("network"), "{rows:?}");
    }
    assert!(
        status
            .last_error
            .unwrap()
            .message
            .contains("stream stalled"),
        "stall named"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_network_and_the_job_succeeds_when_the_port_opens() {
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            faults: Faults {
                refuse_ms: 2_500,
                ..Default::default()
            },
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let id = one_job(&app, "knock knock", None, 10).await;
    let status = app.wait_terminal(id, Duration::from_secs(60)).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    let rows = attempts(&app, id).await;
    assert!(
        rows.len() >= 2,
        "the first attempt met a closed port: {rows:?}"
    );
    for r in &rows[..rows.len() - 1] {
        assert_eq!(r.0, "retry", "{rows:?}");
        assert_eq!(
            r.1.as_deref(),
            Some("network"),
            "never a rate limit: {rows:?}"
        );
        assert_eq!(r.2.as_deref(), Some("network"), "{rows:?}");
        assert_eq!(r.3, None, "no HTTP status from a refused port: {rows:?}");
    }
    // Refused connections never reached the provider: it saw exactly one request.
    assert_eq!(app.mock.stats().requests_total, 1);

    // And at run time, through the admin endpoint.
    let r = reqwest::Client::new()
        .put(format!("http://{}/_mock/faults", app.mock.addr))
        .json(&serde_json::json!({"refuse_ms": 1500}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = tokio::net::TcpStream::connect(app.mock.addr).await;
    assert!(refused.is_err(), "port should be closed during the window");
    let id = one_job(&app, "knock again", None, 10).await;
    let status = app.wait_terminal(id, Duration::from_secs(60)).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
}
