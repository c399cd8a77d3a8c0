//! `GET /v1/jobs/{id}/events`: every transition in order, the streamed text equal to the
//! final result, and a reconnect with `Last-Event-ID` that loses nothing.

use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures_util::StreamExt;
use llmq_mock_provider::{Faults, MockConfig};
use llmq_tests::{spawn_app_with, AppOptions, TestApp};
use serde_json::{json, Value};

async fn submit(app: &TestApp, prompt: &str, attempts: u32) -> String {
    let r: Value = reqwest::Client::new()
        .post(format!("{}/v1/jobs", app.api_url()))
        .json(&json!({
            "tenant": "acme",
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 200,
            "max_attempts": attempts,
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["id"].as_str().unwrap().to_owned()
}

/// Reads events until the stream ends, or until `stop` says so (then drops the connection).
async fn read(
    app: &TestApp,
    id: &str,
    last_event_id: Option<&str>,
    stop: impl Fn(&Event) -> bool,
) -> Vec<Event> {
    let mut req = reqwest::Client::new().get(format!("{}/v1/jobs/{id}/events", app.api_url()));
    if let Some(l) = last_event_id {
        req = req.header("last-event-id", l);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut events = resp.bytes_stream().eventsource();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while let Ok(Some(Ok(e))) = tokio::time::timeout_at(deadline, events.next()).await {
        let done = stop(&e);
        out.push(e);
        if done {
            break;
        }
    }
    out
}

fn data(e: &Event) -> Value {
    serde_json::from_str(&e.data).unwrap()
}

fn states(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == "state")
        .map(|e| data(e)["state"].as_str().unwrap().to_owned())
        .collect()
}

/// The text of the last attempt that wrote any.
fn text(events: &[Event]) -> String {
    let mut attempt = None;
    let mut out = String::new();
    for e in events.iter().filter(|e| e.event == "delta") {
        let d = data(e);
        if attempt != d["attempt"].as_u64() {
            attempt = d["attempt"].as_u64();
            out.clear();
        }
        out.push_str(d["text"].as_str().unwrap());
    }
    out
}

fn slow_stream() -> MockConfig {
    MockConfig {
        latency: Duration::from_millis(100),
        chunk_delay: Duration::from_millis(40),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_shows_every_transition_in_order_and_the_streamed_text_is_the_result() {
    let app = spawn_app_with(AppOptions {
        mock: slow_stream(),
        api: true,
        ..Default::default()
    })
    .await;
    let prompt = "write me a sentence of a good many words so that it streams in pieces";
    let id = submit(&app, prompt, 3).await;
    let events = read(&app, &id, None, |_| false).await;

    assert_eq!(states(&events), ["queued", "running", "succeeded"]);
    let result = events.last().unwrap();
    assert_eq!(result.event, "result", "the stream ends with the result");
    let status = data(result);
    assert_eq!(status["state"], "succeeded");
    let content = status["result"]["content"].as_str().unwrap();
    assert_eq!(content, format!("mock reply to: {prompt}"));
    assert_eq!(text(&events), content, "streamed text equals the result");
    let deltas = events.iter().filter(|e| e.event == "delta").count();
    assert!(deltas >= 2, "the text arrives in pieces, got {deltas}");
    // Deltas sit between `running` and `succeeded`.
    let pos = |name: &str, st: Option<&str>| {
        events
            .iter()
            .position(|e| e.event == name && st.is_none_or(|s| data(e)["state"] == s))
            .unwrap()
    };
    assert!(pos("state", Some("running")) < pos("delta", None));
    assert!(pos("delta", None) < pos("state", Some("succeeded")));
    // Every event but the result has an id to resume from.
    assert!(events
        .iter()
        .filter(|e| e.event != "result")
        .all(|e| !e.id.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_last_event_id_loses_nothing() {
    let app = spawn_app_with(AppOptions {
        mock: slow_stream(),
        api: true,
        ..Default::default()
    })
    .await;
    let prompt = "a long answer please, long enough to be cut in the middle of its stream";
    let id = submit(&app, prompt, 3).await;
    // Disconnect after the first piece of text.
    let first = read(&app, &id, None, |e| e.event == "delta").await;
    let last_id = first.last().unwrap().id.clone();
    assert!(last_id.contains('.'), "a text position: {last_id}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rest = read(&app, &id, Some(&last_id), |_| false).await;

    let mut all = first.clone();
    all.extend(rest.iter().cloned());
    assert_eq!(
        states(&all),
        ["queued", "running", "succeeded"],
        "no state lost or repeated"
    );
    let status = data(all.last().unwrap());
    let content = status["result"]["content"].as_str().unwrap();
    assert_eq!(text(&all), content, "no text lost or repeated");
    assert!(
        !text(&rest).is_empty(),
        "the second connection carried on with the text"
    );

    // Resuming from the terminal transition gives just the result.
    let terminal = all.iter().rfind(|e| e.event == "state").unwrap().id.clone();
    let tail = read(&app, &id, Some(&terminal), |_| false).await;
    assert_eq!(tail.len(), 1, "{tail:?}");
    assert_eq!(tail[0].event, "result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_attempt_starts_its_text_again() {
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            faults: Faults {
                stream_error_rate: 1.0,
                ..Default::default()
            },
            ..slow_stream()
        },
        api: true,
        ..Default::default()
    })
    .await;
    let id = submit(
        &app,
        "first attempt breaks halfway, the second one is fine",
        3,
    )
    .await;
    // Let the first attempt fail mid-stream, then heal the provider.
    let events = read(&app, &id, None, |e| {
        e.event == "state" && data(e)["state"] == "retrying"
    })
    .await;
    app.mock.set_faults(Faults::default());
    let last = events.last().unwrap().id.clone();
    let rest = read(&app, &id, Some(&last), |_| false).await;
    let mut all = events;
    all.extend(rest);
    let st = states(&all);
    assert_eq!(&st[..3], ["queued", "running", "retrying"], "{st:?}");
    assert_eq!(st.last().unwrap(), "succeeded", "{st:?}");
    let status = data(all.last().unwrap());
    assert_eq!(text(&all), status["result"]["content"].as_str().unwrap());
    let retry = all
        .iter()
        .find(|e| e.event == "state" && data(e)["state"] == "retrying")
        .unwrap();
    assert_eq!(
        data(retry)["detail"]["error_class"],
        "upstream",
        "{}",
        retry.data
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_an_unknown_job_are_404() {
    let app = spawn_app_with(AppOptions {
        api: true,
        workers: 0,
        ..Default::default()
    })
    .await;
    let r = reqwest::get(format!(
        "{}/v1/jobs/{}/events",
        app.api_url(),
        uuid::Uuid::now_v7()
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_the_api_down_ends_open_streams() {
    let app = spawn_app_with(AppOptions {
        api: true,
        workers: 0,
        ..Default::default()
    })
    .await;
    let id = submit(&app, "nobody will run me", 3).await;
    let reader = {
        let url = app.api_url();
        let id = id.clone();
        tokio::spawn(async move {
            let resp = reqwest::get(format!("{url}/v1/jobs/{id}/events"))
                .await
                .unwrap();
            let mut events = resp.bytes_stream().eventsource();
            let mut n = 0;
            while let Some(Ok(_)) = events.next().await {
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.shutdown.cancel();
    let n = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the stream ended when the API shut down")
        .unwrap();
    assert!(n >= 1, "it had sent the queued state first");
}

fn two_streams(s: &mut llmq_worker::Settings, _: &str) {
    s.api.max_event_streams = 2;
}

async fn open_stream(app: &TestApp, id: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{}/v1/jobs/{id}/events", app.api_url()))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_cap_are_refused_with_503_and_retry_after() {
    let app = spawn_app_with(AppOptions {
        api: true,
        workers: 0,
        configure: Some(two_streams),
        ..Default::default()
    })
    .await;
    let id = submit(&app, "nobody will run me", 3).await;
    let first = open_stream(&app, &id).await;
    let second = open_stream(&app, &id).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = open_stream(&app, &id).await;
    assert_eq!(third.status(), 503);
    let retry_after: u64 = third.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_streams", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("api.max_event_streams"),
        "{body}"
    );
    // Polling still works meanwhile.
    let status = app.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(status["state"], "queued");

    // A reader that goes away gives its place back.
    drop(first);
    let mut again = None;
    for _ in 0..100 {
        let r = open_stream(&app, &id).await;
        if r.status() == 200 {
            again = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = again.expect("a place came free once the first reader left");

    // Streams that end (the job is cancelled) give theirs back too.
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/jobs/{id}", app.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for resp in [second, again] {
        let mut events = resp.bytes_stream().eventsource();
        let mut last = None;
        while let Ok(Some(Ok(e))) =
            tokio::time::timeout(Duration::from_secs(30), events.next()).await
        {
            last = Some(e.event);
        }
        assert_eq!(
            last.as_deref(),
            Some("result"),
            "the stream ended with the result"
        );
    }
    let mut fresh = None;
    for _ in 0..50 {
        let r = open_stream(&app, &id).await;
        if r.status() == 200 {
            fresh = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fresh.is_some(), "places came back when the streams ended");
}

fn one_events_connection(s: &mut llmq_worker::Settings, _: &str) {
    s.api.events_db_connections = 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_watchers_leave_enqueues_their_connections() {
    let app = spawn_app_with(AppOptions {
        api: true,
        workers: 0,
        configure: Some(one_events_connection),
        ..Default::default()
    })
    .await;
    // Far more watchers than the streams' pool has connections (1), following jobs that
    // stay queued.
    let mut watchers = Vec::new();
    let mut ids = Vec::new();
    for i in 0..40 {
        let id = submit(&app, &format!("watched {i}"), 3).await;
        let resp = open_stream(&app, &id).await;
        assert_eq!(resp.status(), 200);
        watchers.push(resp.bytes_stream().eventsource());
        ids.push(id);
    }
    // Every watcher got its first event: they are all being served.
    for w in &mut watchers {
        let e = tokio::time::timeout(Duration::from_secs(30), w.next())
            .await
            .expect("an event in time")
            .unwrap()
            .unwrap();
        assert_eq!(e.event, "state");
    }
    // Enqueues and status reads keep working beside them.
    let http = reqwest::Client::new();
    let mut posts = Vec::new();
    for i in 0..30 {
        let http = http.clone();
        let url = format!("{}/v1/jobs", app.api_url());
        posts.push(tokio::spawn(async move {
            http.post(url)
                .json(&json!({"model": "gpt-4o-mini", "max_tokens": 8,
                              "messages": [{"role": "user", "content": format!("beside the watchers {i}")}]}))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for p in posts {
        assert_eq!(p.await.unwrap(), 202);
    }
    let status = app.get_json(&format!("/v1/jobs/{}", ids[0])).await;
    assert_eq!(status["state"], "queued");
    // And the watchers still hear about their jobs: cancel one, its stream ends with the
    // result.
    let r = http
        .delete(format!("{}/v1/jobs/{}", app.api_url(), ids[7]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let w = &mut watchers[7];
    let mut rest = Vec::new();
    while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_secs(30), w.next()).await {
        rest.push(e);
    }
    assert_eq!(states(&rest), ["cancelled"]);
    assert_eq!(rest.last().unwrap().event, "result");
}
