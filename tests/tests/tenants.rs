//! Tenants: bearer tokens (only their hashes configured), 401 without one, 404 for another
//! tenant's job on every job endpoint, and a tenant's job list with filters and pages.

use llmq_tests::{spawn_app_with, AppOptions, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const ACME: &str = "llmq_acme_test_token_0000000000000000000000";
const GLOBEX: &str = "llmq_globex_test_token_111111111111111111111";

fn with_tenants(s: &mut llmq_worker::Settings, _: &str) {
    s.api
        .tenants
        .insert("acme".into(), llmq_worker::api::token_hash(ACME));
    s.api
        .tenants
        .insert("globex".into(), llmq_worker::api::token_hash(GLOBEX));
}

async fn app() -> TestApp {
    spawn_app_with(AppOptions {
        api: true,
        workers: 0,
        configure: Some(with_tenants),
        ..Default::default()
    })
    .await
}

async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", app.api_url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn job(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": text}]})
}

async fn create(app: &TestApp, token: &str, text: &str) -> String {
    let (code, body) = call(app, Method::POST, "/v1/jobs", Some(token), Some(job(text))).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unknown_tokens_are_401_and_other_tenants_jobs_are_404() {
    let app = app().await;
    let id = create(&app, ACME, "acme's job").await;
    let paths = [
        (Method::POST, "/v1/jobs".to_owned(), Some(job("x"))),
        (Method::GET, "/v1/jobs".to_owned(), None),
        (Method::GET, format!("/v1/jobs/{id}"), None),
        (Method::GET, format!("/v1/jobs/{id}/events"), None),
        (Method::DELETE, format!("/v1/jobs/{id}"), None),
    ];
    for (method, path, body) in &paths {
        for token in [None, Some("llmq_not_a_real_token"), Some("")] {
            let (code, b) = call(&app, method.clone(), path, token, body.clone()).await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{method} {path} {token:?}");
            assert_eq!(b["error"]["code"], "unauthorized");
        }
    }
    // Operator views need a token too.
    let (code, _) = call(&app, Method::GET, "/v1/circuits", None, None).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _) = call(&app, Method::GET, "/v1/circuits", Some(GLOBEX), None).await;
    assert_eq!(code, StatusCode::OK);
    let r = reqwest::get(format!("{}/v1/jobs/{id}", app.api_url()))
        .await
        .unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");

    // Another tenant: as if the job did not exist.
    for (method, path, _) in &paths[2..] {
        let (code, b) = call(&app, method.clone(), path, Some(GLOBEX), None).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "{method} {path}: {b}");
    }
    // Its owner sees it (and the cross-tenant DELETE did nothing).
    let (code, b) = call(
        &app,
        Method::GET,
        &format!("/v1/jobs/{id}"),
        Some(ACME),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(b["tenant"], "acme");
    assert_eq!(b["state"], "queued");

    // A token cannot enqueue for someone else.
    let mut other = job("sneaky");
    other["tenant"] = json!("globex");
    let (code, b) = call(&app, Method::POST, "/v1/jobs", Some(ACME), Some(other)).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{b}");
    // The owner cancels it.
    let (code, b) = call(
        &app,
        Method::DELETE,
        &format!("/v1/jobs/{id}"),
        Some(ACME),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{b}");
    assert_eq!(b["state"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_lists_its_own_jobs_with_filters_and_pages() {
    let app = app().await;
    let mut mine = Vec::new();
    for i in 0..5 {
        mine.push(create(&app, ACME, &format!("acme {i}")).await);
    }
    for i in 0..2 {
        create(&app, GLOBEX, &format!("globex {i}")).await;
    }
    let (code, _) = call(
        &app,
        Method::DELETE,
        &format!("/v1/jobs/{}", mine[1]),
        Some(ACME),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK);

    // Pages of 2, newest first, only acme's.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?limit=2&cursor={c}"),
            None => "/v1/jobs?limit=2".to_owned(),
        };
        let (code, page) = call(&app, Method::GET, &path, Some(ACME), None).await;
        assert_eq!(code, StatusCode::OK, "{page}");
        pages += 1;
        for j in page["jobs"].as_array().unwrap() {
            assert_eq!(j["tenant"], "acme");
            seen.push(j["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut newest_first = mine.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    // Filters.
    let (_, page) = call(
        &app,
        Method::GET,
        "/v1/jobs?state=cancelled",
        Some(ACME),
        None,
    )
    .await;
    let ids: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [mine[1].as_str()]);
    let (_, page) = call(
        &app,
        Method::GET,
        "/v1/jobs?state=queued,running&model=gpt-4o-mini",
        Some(ACME),
        None,
    )
    .await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 4);
    let (_, page) = call(&app, Method::GET, "/v1/jobs", Some(GLOBEX), None).await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 2);
    let (code, b) = call(&app, Method::GET, "/v1/jobs?state=done", Some(ACME), None).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(b["error"]["code"], "bad_state");
    let (code, _) = call(
        &app,
        Method::GET,
        "/v1/jobs?tenant=globex",
        Some(ACME),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
}
