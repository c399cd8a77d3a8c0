//! `/healthz` of `llmq api` comes back by itself after the broker drops the API's
//! connection (as a RabbitMQ restart does), with no request that publishes in between.
//!
//! The shared broker cannot be restarted under a parallel test suite, so the test closes
//! the API's connection from the broker side instead (`rabbitmqctl close_connection`),
//! in a vhost of its own so that it finds the API's connection and nobody else's.

use std::process::Command;
use std::time::Duration;

use llmq_tests::{spawn_app_with, AppOptions};
use secrecy::SecretString;

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (the local RabbitMQ of scripts/services.sh, as root)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A vhost of this test's own, deleted (with everything in it) when dropped.
struct Vhost(String);

impl Vhost {
    fn create() -> Self {
        let name = format!("llmqt_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Self(name)
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }

    /// Broker-side ids of this vhost's connections named `name` by their client.
    fn connections(&self, name: &str) -> Vec<String> {
        let wanted = format!("{{\"connection_name\",\"{name}\"}}");
        rabbitmqctl(&["list_connections", "pid", "vhost", "client_properties"])
            .lines()
            .filter_map(|line| {
                let mut cols = line.splitn(3, '\t');
                let (pid, vhost, props) = (cols.next()?, cols.next()?, cols.next()?);
                (vhost == self.0 && props.contains(&wanted)).then(|| pid.to_owned())
            })
            .collect()
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_recovers_by_itself_after_the_broker_drops_the_api() {
    if std::env::var("LLMQ_TEST_AMQP_URL").is_ok() {
        eprintln!("skipped: needs rabbitmqctl of the local broker, and LLMQ_TEST_AMQP_URL points elsewhere");
        return;
    }
    let vhost = Vhost::create();
    let mut app = spawn_app_with(AppOptions {
        api: false,
        workers: 0,
        ..Default::default()
    })
    .await;
    app.settings.amqp_url = SecretString::from(vhost.url());
    let api = llmq_worker::api::start(&app.settings, app.pool.clone(), app.shutdown.child_token())
        .await
        .expect("start API");
    let health = format!("http://{}/healthz", api.addr);
    assert_eq!(reqwest::get(&health).await.unwrap().status(), 200);

    let before = vhost.connections("llmq-producer");
    assert_eq!(before.len(), 1, "the API's producer connection: {before:?}");
    rabbitmqctl(&[
        "close_connection",
        &before[0],
        "test: as if the broker restarted",
    ]);

    // No enqueue, no other traffic: only /healthz, as a load balancer would ask.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut answers = Vec::new();
    loop {
        let code = reqwest::get(&health).await.unwrap().status().as_u16();
        answers.push(code);
        let now = vhost.connections("llmq-producer");
        if code == 200 && now.len() == 1 && now[0] != before[0] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz still not back 30 s after the broker dropped the API (answers {answers:?}, producer connections {now:?}, was {before:?})"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("/healthz after the drop: {answers:?}");
    let body: serde_json::Value = reqwest::get(&health).await.unwrap().json().await.unwrap();
    assert_eq!(body["rabbitmq"], true, "{body}");

    // And the reopened connection publishes: an enqueue goes through.
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/jobs", api.addr))
        .json(&serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 8,
                                  "messages": [{"role": "user", "content": "after the drop"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    app.shutdown.cancel();
}
