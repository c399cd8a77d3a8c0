//! Each bad input gets a clear error, and nothing is written or published.

use llmq_producer_sdk::{ChatMessage, Error, NewJob, ValidationError};
use llmq_tests::{spawn_app_with, AppOptions};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_sdk_refuse_bad_jobs_and_write_nothing() {
    let app = spawn_app_with(AppOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/jobs", app.api_url());
    let good = || json!({"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]});

    let mut cases: Vec<(&str, Value, u16, &str, &str)> = Vec::new();
    let mut v = good();
    v["messages"] = json!([]);
    cases.push((
        "no messages",
        v,
        422,
        "empty_messages",
        "send at least one message",
    ));
    let mut v = good();
    v.as_object_mut().unwrap().remove("max_tokens");
    cases.push((
        "no max_tokens",
        v,
        422,
        "missing_max_tokens",
        "max_tokens is missing",
    ));
    let mut v = good();
    v["max_tokens"] = json!(0);
    cases.push((
        "zero max_tokens",
        v,
        422,
        "max_tokens_out_of_range",
        "outside 1..=",
    ));
    let mut v = good();
    v["max_tokens"] = json!(1_000_000);
    cases.push((
        "huge max_tokens",
        v,
        422,
        "max_tokens_out_of_range",
        "lower it",
    ));
    // params that repeat a field the envelope owns (the message would not decode) or
    // that would change the call's cost behind the budget.
    let mut v = good();
    v["params"] = json!({"max_tokens": 8});
    cases.push((
        "params repeating max_tokens",
        v,
        422,
        "param_not_allowed",
        "params.max_tokens",
    ));
    let mut v = good();
    v["params"] = json!({"n": 4});
    cases.push((
        "params asking for four completions",
        v,
        422,
        "param_not_allowed",
        "params.n",
    ));
    let mut v = good();
    v["params"] = json!({"max_completion_tokens": 100000});
    cases.push((
        "params bypassing max_tokens",
        v,
        422,
        "param_not_allowed",
        "use max_tokens",
    ));
    let mut v = good();
    v["fallbacks"] = json!(vec![json!({"model": "gpt-4o-mini"}); 9]);
    cases.push((
        "too many fallbacks",
        v,
        422,
        "too_many_fallbacks",
        "limit of 8",
    ));
    let mut v = good();
    v["version"] = json!(2);
    cases.push((
        "unknown version",
        v,
        422,
        "unsupported_version",
        "send version 1",
    ));
    let mut v = good();
    v["messages"] = json!([{"role": "user", "content": "x".repeat(300_000)}]);
    cases.push((
        "body over the limit",
        v,
        413,
        "body_too_large",
        "shorter prompt",
    ));
    let mut v = good();
    v["model"] = json!("mock-small");
    v["messages"] = json!([{"role": "user", "content": "word ".repeat(3_000)}]);
    v["max_tokens"] = json!(1_000);
    cases.push((
        "prompt over the context",
        v,
        422,
        "context_length_exceeded",
        "exceeds the model's context",
    ));
    let mut v = good();
    v["max_tokns"] = json!(5);
    cases.push(("unknown field", v, 400, "invalid_json", "max_tokns"));
    let mut v = good();
    v["messages"] = json!([{"role": "wizard", "content": "hi"}]);
    cases.push(("unknown role", v, 400, "invalid_json", "wizard"));

    for (name, body, status, code, needle) in cases {
        let r = http.post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{name}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{name}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{name}: message `{msg}` should contain `{needle}`"
        );
    }

    // Not JSON at all.
    let r = http
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A body far over the limit is cut off by the server.
    let r = http
        .post(&url)
        .header("content-type", "application/json")
        .body(vec![b' '; 2 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // The SDK refuses the same way, before touching anything.
    let client = app.client().await;
    let err = client
        .enqueue(NewJob::new("acme", "gpt-4o-mini", vec![]).max_tokens(5))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Invalid(ValidationError::EmptyMessages)),
        "{err}"
    );
    let err = client
        .enqueue(NewJob::new(
            "acme",
            "gpt-4o-mini",
            vec![ChatMessage::user("hi")],
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_tokens is missing"), "{err}");

    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let transitions: i64 = sqlx::query_scalar("SELECT count(*) FROM job_transitions")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!((jobs, transitions), (0, 0), "nothing written");
    assert_eq!(
        app.queue_depth(&app.topology().work_queue()).await,
        0,
        "nothing published"
    );
}
