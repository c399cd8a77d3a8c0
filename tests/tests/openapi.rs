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
