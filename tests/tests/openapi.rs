//! `/openapi.json` describes the API that is served: every documented operation answers
//! (not 404/405), and the job status, job page and error bodies have exactly the fields the
//! document names.

use llmq_tests::{spawn_app_with, AppOptions, TestApp};
use serde_json::{json, Value};

async fn doc(app: &TestApp) -> Value {
    let r = reqwest::get(format!("{}/openapi.json", app.api_url()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    r.json().await.unwrap()
}

fn properties<'a>(doc: &'a Value, schema: &str) -> Vec<&'a str> {
    doc["components"]["schemas"][schema]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {schema} has properties"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn assert_described(doc: &Value, schema: &str, body: &Value) {
    let props = properties(doc, schema);
    for key in body.as_object().unwrap().keys() {
        assert!(
            props.contains(&key.as_str()),
            "{schema} in openapi.json lacks `{key}`"
        );
    }
    for req in doc["components"]["schemas"][schema]["required"]
        .as_array()
        .unwrap()
    {
        assert!(
            body.get(req.as_str().unwrap()).is_some(),
            "{schema}: required `{req}` missing from {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_matches_what_is_served() {
    let app = spawn_app_with(AppOptions {
        api: true,
        ..Default::default()
    })
    .await;
    let doc = doc(&app).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));

    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{}/v1/jobs", app.api_url()))
        .json(
            &json!({"model": "gpt-4o-mini", "max_tokens": 8, "metadata": {"k": "v"},
                      "messages": [{"role": "user", "content": "described?"}]}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_described(&doc, "Created", &created);
    let id = created["id"].as_str().unwrap().to_owned();
    let client = app.client().await;
    client
        .wait(id.parse().unwrap(), std::time::Duration::from_secs(30))
        .await
        .unwrap();

    // Every documented operation is served.
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let url = format!("{}{}", app.api_url(), path.replace("{id}", &id));
        for method in ops.as_object().unwrap().keys() {
            let m = match method.as_str() {
                "get" => reqwest::Method::GET,
                "post" => reqwest::Method::POST,
                "delete" => reqwest::Method::DELETE,
                "parameters" => continue,
                other => panic!("unexpected method {other}"),
            };
            let mut req = http.request(m.clone(), &url);
            if m == reqwest::Method::POST {
                req = req.json(&json!({}));
            }
            let code = req.send().await.unwrap().status().as_u16();
            assert!(
                code != 404 && code != 405,
                "{method} {path} is documented but answers {code}"
            );
        }
    }

    // Bodies carry only documented fields.
    let status = app.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(status["state"], "succeeded");
    assert_described(&doc, "JobStatus", &status);
    assert_described(&doc, "CompletionResult", &status["result"]);
    assert_described(&doc, "Usage", &status["result"]["usage"]);
    let page = app.get_json("/v1/jobs").await;
    assert_described(&doc, "JobPage", &page);
    assert_described(&doc, "JobSummary", &page["jobs"][0]);
    let err = app.get_json("/v1/jobs/not-a-uuid").await;
    assert_described(&doc, "Error", &err);
    let health = app.get_json("/healthz").await;
    assert_described(&doc, "Health", &health);
    let circuits = app.get_json("/v1/circuits").await;
    assert_described(&doc, "CircuitState", &circuits[0]);

    // The page is served as HTML.
    let page = http
        .get(format!("{}/", app.api_url()))
        .send()
        .await
        .unwrap();
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("id=\"prompt\""));
}

const ACME: &str = "llmq_acme_openapi_test_token_00000000000000";

fn with_tenant(s: &mut llmq_worker::Settings, _: &str) {
    s.api
        .tenants
        .insert("acme".into(), llmq_worker::api::token_hash(ACME));
    s.api.max_event_streams = 1;
    s.limits.max_output_tokens = 1000;
}

/// The status codes the document lists for `method` on `path`.
fn documented(doc: &Value, method: &str, path: &str) -> Vec<String> {
    doc["paths"][path][method]["responses"]
        .as_object()
        .unwrap_or_else(|| panic!("{method} {path} is not documented"))
        .keys()
        .cloned()
        .collect()
}

struct Call {
    method: reqwest::Method,
    /// Template in the document.
    path: &'static str,
    /// What is requested.
    url: String,
    token: bool,
    body: Option<String>,
}

impl Call {
    fn new(method: reqwest::Method, path: &'static str, url: impl Into<String>) -> Self {
        Self {
            method,
            path,
            url: url.into(),
            token: true,
            body: None,
        }
    }
    fn anonymous(mut self) -> Self {
        self.token = false;
        self
    }
    fn json(mut self, v: Value) -> Self {
        self.body = Some(v.to_string());
        self
    }
    fn raw(mut self, body: String) -> Self {
        self.body = Some(body);
        self
    }
}

fn job_body(extra: Value) -> Value {
    let mut job = json!({"model": "gpt-4o-mini", "max_tokens": 8,
                         "messages": [{"role": "user", "content": "documented?"}]});
    for (k, v) in extra.as_object().unwrap() {
        job[k] = v.clone();
    }
    job
}

/// Every answer the API gives, errors included, is one the document lists for that
/// operation, with a JSON error body; and the request the document calls valid is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_is_one_the_document_lists() {
    use reqwest::Method;
    let app = spawn_app_with(AppOptions {
        api: true,
        workers: 0,
        configure: Some(with_tenant),
        ..Default::default()
    })
    .await;
    let http = reqwest::Client::new();
    let doc: Value = http
        .get(format!("{}/openapi.json", app.api_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let created: Value = http
        .post(format!("{}/v1/jobs", app.api_url()))
        .bearer_auth(ACME)
        .json(&job_body(json!({})))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    // A finished job, for the 409.
    let done: Value = http
        .post(format!("{}/v1/jobs", app.api_url()))
        .bearer_auth(ACME)
        .json(&job_body(json!({"idempotency_key": "to-cancel"})))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let done = done["id"].as_str().unwrap().to_owned();
    let r = http
        .delete(format!("{}/v1/jobs/{done}", app.api_url()))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // One open stream: the cap (api.max_event_streams = 1) is reached.
    let stream = http
        .get(format!("{}/v1/jobs/{id}/events", app.api_url()))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);

    let unknown = uuid::Uuid::now_v7();
    let jobs = "/v1/jobs";
    let job = "/v1/jobs/{id}";
    let events = "/v1/jobs/{id}/events";
    let cases: Vec<(Call, u16, &str)> = vec![
        (
            Call::new(Method::POST, jobs, jobs)
                .json(job_body(json!({})))
                .anonymous(),
            401,
            "unauthorized",
        ),
        (
            Call::new(Method::POST, jobs, jobs).json(job_body(json!({"tenant": "globex"}))),
            403,
            "wrong_tenant",
        ),
        (
            Call::new(Method::POST, jobs, jobs).raw("{\"model\": ".into()),
            400,
            "invalid_json",
        ),
        (
            Call::new(Method::POST, jobs, jobs)
                .json(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})),
            422,
            "missing_max_tokens",
        ),
        (
            Call::new(Method::POST, jobs, jobs).json(job_body(json!({"max_tokens": 1001}))),
            422,
            "max_tokens_out_of_range",
        ),
        (
            Call::new(Method::POST, jobs, jobs).json(job_body(
                json!({"messages": [{"role": "user", "content": "a\u{0}b"}]}),
            )),
            422,
            "nul_character",
        ),
        (
            Call::new(Method::POST, jobs, jobs).json(job_body(json!({"metadata": {"k\u{0}": 1}}))),
            422,
            "nul_character",
        ),
        (
            Call::new(Method::POST, jobs, jobs)
                .json(job_body(json!({"metadata": {"big": f64::MAX}}))),
            422,
            "number_out_of_range",
        ),
        (
            Call::new(Method::POST, jobs, jobs).json(job_body(
                json!({"messages": [{"role": "user", "content": "x".repeat(400_000)}]}),
            )),
            413,
            "body_too_large",
        ),
        // JSON Schema's integers include 8.0; so does the API.
        (
            Call::new(Method::POST, jobs, jobs).json(job_body(
                json!({"max_tokens": 8.0, "priority": 1.0, "max_attempts": 2.0}),
            )),
            202,
            "",
        ),
        (
            Call::new(Method::GET, jobs, "/v1/jobs?state=queued,running"),
            200,
            "",
        ),
        (
            Call::new(Method::GET, jobs, "/v1/jobs?state=queued,"),
            400,
            "bad_state",
        ),
        (
            Call::new(Method::GET, jobs, "/v1/jobs?state=%20queued"),
            400,
            "bad_state",
        ),
        (
            Call::new(Method::GET, jobs, "/v1/jobs?limit=501"),
            400,
            "bad_limit",
        ),
        (
            Call::new(Method::GET, jobs, "/v1/jobs?limit=0"),
            400,
            "bad_limit",
        ),
        (
            Call::new(Method::GET, jobs, "/v1/jobs?tenant=no%20such"),
            400,
            "bad_tenant",
        ),
        (
            Call::new(Method::GET, jobs, "/v1/jobs?tenant=globex"),
            403,
            "wrong_tenant",
        ),
        (
            Call::new(Method::GET, jobs, "/v1/jobs?model=a%00"),
            400,
            "bad_model",
        ),
        (
            Call::new(Method::GET, jobs, "/v1/jobs?cursor=nope"),
            400,
            "bad_job_id",
        ),
        (
            Call::new(Method::GET, jobs, jobs).anonymous(),
            401,
            "unauthorized",
        ),
        (
            Call::new(Method::GET, job, "/v1/jobs/not-a-uuid"),
            400,
            "bad_job_id",
        ),
        (
            Call::new(Method::GET, job, format!("/v1/jobs/{}", unknown.simple())),
            400,
            "bad_job_id",
        ),
        (
            Call::new(Method::GET, job, "/v1/jobs/%FF%FE"),
            400,
            "bad_job_id",
        ),
        (
            Call::new(Method::GET, job, format!("/v1/jobs/{unknown}")),
            404,
            "not_found",
        ),
        (
            Call::new(Method::DELETE, job, "/v1/jobs/not-a-uuid"),
            400,
            "bad_job_id",
        ),
        (
            Call::new(Method::DELETE, job, format!("/v1/jobs/{unknown}")),
            404,
            "not_found",
        ),
        (
            Call::new(Method::DELETE, job, format!("/v1/jobs/{done}")),
            409,
            "not_cancellable",
        ),
        (
            Call::new(Method::DELETE, job, format!("/v1/jobs/{id}")).anonymous(),
            401,
            "unauthorized",
        ),
        (
            Call::new(Method::GET, events, "/v1/jobs/not-a-uuid/events"),
            400,
            "bad_job_id",
        ),
        (
            Call::new(Method::GET, events, format!("/v1/jobs/{id}/events")).anonymous(),
            401,
            "unauthorized",
        ),
        (
            Call::new(Method::GET, events, format!("/v1/jobs/{id}/events")),
            503,
            "too_many_streams",
        ),
        (
            Call::new(Method::GET, "/v1/circuits", "/v1/circuits").anonymous(),
            401,
            "unauthorized",
        ),
    ];
    for (call, want, code) in cases {
        let what = format!("{} {}", call.method, call.url);
        let mut req = http.request(
            call.method.clone(),
            format!("{}{}", app.api_url(), call.url),
        );
        if call.token {
            req = req.bearer_auth(ACME);
        }
        if let Some(b) = call.body {
            req = req.header("content-type", "application/json").body(b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let content_type = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let retry_after = r.headers().get("retry-after").is_some();
        let body = r.text().await.unwrap();
        assert_eq!(status, want, "{what}: {body}");
        let listed = documented(&doc, &call.method.as_str().to_lowercase(), call.path);
        assert!(
            listed.contains(&status.to_string()),
            "{what} answers {status}, which the document does not list for it ({listed:?})"
        );
        if !code.is_empty() {
            assert!(
                content_type.starts_with("application/json"),
                "{what}: {content_type}"
            );
            let err: Value = serde_json::from_str(&body).unwrap();
            assert_described(&doc, "Error", &err);
            assert_eq!(err["error"]["code"], code, "{what}: {body}");
        }
        if code == "too_many_streams" {
            assert!(retry_after, "{what}: a Retry-After says when to come back");
        }
    }
    drop(stream);
}

/// The document declares bearer security only when the API enforces it (tenants
/// configured), carries this server's limits, and requires `max_tokens`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_and_limits_are_what_this_server_enforces() {
    let open = spawn_app_with(AppOptions {
        api: true,
        workers: 0,
        ..Default::default()
    })
    .await;
    let d = doc(&open).await;
    assert!(
        d.get("security").is_none(),
        "the open API enforces no security"
    );
    assert!(
        !d.to_string().contains("\"401\""),
        "nothing answers 401 in open mode"
    );
    // Open mode takes any request, whatever Authorization it carries.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/jobs", open.api_url()))
        .bearer_auth("not-a-token")
        .json(&job_body(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let create = &d["components"]["schemas"]["CreateJob"];
    assert!(
        create["required"]
            .as_array()
            .unwrap()
            .contains(&json!("max_tokens")),
        "max_tokens is required: {}",
        create["required"]
    );
    assert_eq!(create["properties"]["max_tokens"]["maximum"], 16384);

    let tenants = spawn_app_with(AppOptions {
        api: true,
        workers: 0,
        configure: Some(with_tenant),
        ..Default::default()
    })
    .await;
    let d = doc(&tenants).await;
    assert_eq!(d["security"], json!([{"bearer": []}]));
    assert_eq!(
        d["components"]["schemas"]["CreateJob"]["properties"]["max_tokens"]["maximum"], 1000,
        "this server's limits.max_output_tokens"
    );
    for public in ["/healthz", "/metrics", "/openapi.json", "/"] {
        assert_eq!(d["paths"][public]["get"]["security"], json!([]), "{public}");
        let r = reqwest::get(format!("{}{public}", tenants.api_url()))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{public} needs no token");
    }
}

/// Each event of a job's stream has the shape the document gives its name, down to the
/// `result` of a job that expired before it could run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_events_match_their_schemas() {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    let app = spawn_app_with(AppOptions {
        api: true,
        ..Default::default()
    })
    .await;
    let d = doc(&app).await;
    let per_event = &d["paths"]["/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"]
        ["text/event-stream"]["schema"];
    assert_eq!(per_event["$ref"], "#/components/schemas/JobStreamEvent");
    let stream_schema = &d["components"]["schemas"]["JobStreamEvent"];
    let mut schema_of = std::collections::HashMap::new();
    for branch in stream_schema["allOf"].as_array().unwrap() {
        let name = branch["if"]["properties"]["event"]["const"]
            .as_str()
            .unwrap();
        let reference = branch["then"]["properties"]["data"]["contentSchema"]["$ref"]
            .as_str()
            .unwrap();
        schema_of.insert(
            name.to_owned(),
            reference
                .trim_start_matches("#/components/schemas/")
                .to_owned(),
        );
    }

    let http = reqwest::Client::new();
    for extra in [
        json!({"deadline": "2000-01-01T00:00:00Z"}),
        json!({"metadata": {"k": "v"}}),
    ] {
        let created: Value = http
            .post(format!("{}/v1/jobs", app.api_url()))
            .json(&job_body(extra))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap();
        let resp = http
            .get(format!("{}/v1/jobs/{id}/events", app.api_url()))
            .send()
            .await
            .unwrap();
        let mut events = resp.bytes_stream().eventsource();
        let mut names = Vec::new();
        while let Ok(Some(Ok(e))) =
            tokio::time::timeout(std::time::Duration::from_secs(30), events.next()).await
        {
            let schema = schema_of
                .get(&e.event)
                .unwrap_or_else(|| panic!("event `{}` is not documented", e.event));
            let data: Value = serde_json::from_str(&e.data).unwrap();
            assert_described(&d, schema, &data);
            if e.event == "state" {
                assert!(e.id.chars().all(|c| c.is_ascii_digit()), "{}", e.id);
            }
            if e.event == "result" {
                if let Some(err) = data.get("last_error") {
                    assert_described(&d, "ErrorSummary", err);
                }
            }
            names.push(e.event);
        }
        assert_eq!(
            names.last().map(String::as_str),
            Some("result"),
            "{names:?}"
        );
    }
}
