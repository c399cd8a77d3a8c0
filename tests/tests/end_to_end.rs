//! The whole path of a job: enqueue (SDK and HTTP API) → worker → provider → record.

use std::time::Duration;

use llmq_producer_sdk::{ChatMessage, JobId, JobState, NewJob};
use llmq_tests::{spawn_app_with, AppOptions};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sdk_and_api_jobs_all_succeed_with_content_and_usage_recorded() {
    let app = spawn_app_with(AppOptions {
        workers: 2,
        concurrency: 32,
        ..Default::default()
    })
    .await;
    let client = app.client().await;

    let mut sdk_ids = Vec::new();
    for i in 0..200 {
        let job = NewJob::new(
            "acme",
            "gpt-4o-mini",
            vec![ChatMessage::user(format!("sdk prompt {i}"))],
        )
        .max_tokens(32)
        .metadata("i", i.into());
        sdk_ids.push((i, client.enqueue(job).await.expect("enqueue")));
    }

    let http = reqwest::Client::new();
    let mut api_ids = Vec::new();
    for i in 0..50 {
        let resp = http
            .post(format!("{}/v1/jobs", app.api_url()))
            .json(&json!({
                "tenant": "web",
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": format!("api prompt {i}")}],
                "max_tokens": 32
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["state"], "queued");
        api_ids.push((i, v["id"].as_str().unwrap().parse::<JobId>().unwrap()));
    }

    let counts = app.wait_all_terminal(250, Duration::from_secs(120)).await;
    assert_eq!(counts, vec![("succeeded".to_string(), 250)]);

    for (i, id) in &sdk_ids {
        let s = client.status(*id).await.unwrap();
        assert_eq!(s.state, JobState::Succeeded);
        let r = s.result.expect("result recorded");
        assert_eq!(r.content, format!("mock reply to: sdk prompt {i}"));
        assert!(r.usage.prompt_tokens > 0 && r.usage.completion_tokens > 0);
        assert_eq!(
            r.usage.total_tokens,
            r.usage.prompt_tokens + r.usage.completion_tokens
        );
        assert!(r.provider_request_id.is_some());
        assert_eq!(s.metadata["i"], json!(i));
        assert_eq!(s.attempts, 1);
    }
    for (i, id) in &api_ids {
        let v: Value = http
            .get(format!("{}/v1/jobs/{id}", app.api_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["state"], "succeeded");
        assert_eq!(v["tenant"], "web");
        assert_eq!(
            v["result"]["content"],
            format!("mock reply to: api prompt {i}")
        );
        assert!(v["result"]["usage"]["total_tokens"].as_u64().unwrap() > 0);
    }

    // Every call has its evidence row and every job its transitions, in order.
    let attempts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_attempts WHERE outcome = 'succeeded' AND http_status = 200",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 250);
    let (id0, _) = (sdk_ids[0].1, ());
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM job_transitions WHERE job_id = $1 ORDER BY seq")
            .bind(id0.0)
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(states, ["queued", "running", "succeeded"]);
    assert_eq!(app.mock.stats().succeeded, 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_job_id_is_404_and_bad_id_is_400() {
    let app = spawn_app_with(AppOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/v1/jobs/{}", app.api_url(), JobId::new()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    let r = http
        .get(format!("{}/v1/jobs/not-a-uuid", app.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .get(format!("{}/healthz", app.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
