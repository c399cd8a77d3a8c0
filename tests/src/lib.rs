//! Test harness: every test gets its own PostgreSQL database, its own queue prefix and
//! its own mock provider, against the real services, and removes them when dropped.
//!
//! Services are the local ones (`scripts/services.sh`); override with
//! `LLMQ_TEST_ADMIN_DATABASE_URL` and `LLMQ_TEST_AMQP_URL`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use llmq_mock_provider::{MockConfig, MockHandle};
use llmq_producer_sdk::{Client, ClientConfig, JobId, JobState, JobStatus, Topology};
use llmq_worker::Settings;
use secrecy::SecretString;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Admin connection used to create and drop the per-test databases.
pub fn admin_database_url() -> String {
    std::env::var("LLMQ_TEST_ADMIN_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

/// Redis used by the tests.
pub fn redis_url() -> String {
    std::env::var("LLMQ_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The arguments scripts/services.sh starts Redis with.
pub const REDIS_ARGS: [&str; 10] = [
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
];

/// Broker used by the tests.
pub fn amqp_url() -> String {
    std::env::var("LLMQ_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn with_database(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) => format!("{}/{db}", &url[..i]),
        None => format!("{url}/{db}"),
    }
}

/// One isolated llmq: database, queue prefix, mock provider, API and workers.
pub struct TestApp {
    /// The test's database name.
    pub db_name: String,
    /// URL of the test's database.
    pub database_url: String,
    /// Queue prefix.
    pub prefix: String,
    /// Pool on the test's database.
    pub pool: PgPool,
    /// The mock provider.
    pub mock: MockHandle,
    /// Settings the in-process API and workers use.
    pub settings: Settings,
    /// API address, once started.
    pub api_addr: Option<SocketAddr>,
    /// Cancels everything started in-process.
    pub shutdown: CancellationToken,
    workers: Vec<CancellationToken>,
}

/// Options of [`spawn_app_with`].
#[derive(Clone, Debug)]
pub struct AppOptions {
    /// Mock provider behaviour.
    pub mock: MockConfig,
    /// Start the API.
    pub api: bool,
    /// In-process workers to start.
    pub workers: usize,
    /// Worker concurrency.
    pub concurrency: u16,
    /// Rate limits for the `openai` provider (the mock).
    pub rate_limit: Option<llmq_worker::settings::RateLimitSettings>,
    /// Last changes to the settings before anything starts (given the mock's base URL).
    pub configure: Option<fn(&mut Settings, &str)>,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            mock: MockConfig::default(),
            api: true,
            workers: 1,
            concurrency: 16,
            rate_limit: None,
            configure: None,
        }
    }
}

/// A fresh app with the API and one worker.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

/// A fresh app as `opts` says.
pub async fn spawn_app_with(opts: AppOptions) -> TestApp {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let db_name = format!("llmq_t_{}", &suffix[..16]);
    let admin = admin_database_url();
    let admin_pool = PgPool::connect(&admin)
        .await
        .expect("connect to PostgreSQL (run scripts/services.sh)");
    sqlx::query(&format!("CREATE DATABASE {db_name}"))
        .execute(&admin_pool)
        .await
        .expect("create test database");
    admin_pool.close().await;
    let database_url = with_database(&admin, &db_name);
    let pool = PgPool::connect(&database_url)
        .await
        .expect("connect to test database");
    llmq_worker::migrate(&pool).await.expect("migrate");

    let mock = llmq_mock_provider::spawn("127.0.0.1:0", opts.mock.clone())
        .await
        .expect("start mock provider");
    let prefix = format!("llmqt.{}", &suffix[..16]);
    let mut settings = Settings::defaults().expect("default settings");
    settings.database_url = SecretString::from(database_url.clone());
    settings.amqp_url = SecretString::from(amqp_url());
    settings.queue_prefix.clone_from(&prefix);
    settings.admission.namespace.clone_from(&prefix);
    settings.redis_url = SecretString::from(redis_url());
    settings.api.bind = "127.0.0.1:0".into();
    settings.worker.concurrency = opts.concurrency;
    settings.worker.shutdown_grace_secs = 10;
    settings.worker.retry_base_ms = 100;
    settings.worker.retry_cap_ms = 1000;
    if let Some(p) = settings.providers.get_mut("openai") {
        p.base_url = mock.base_url();
        p.api_key = SecretString::from("sk-test-0123456789abcdef".to_owned());
    }
    if let Some(p) = settings.providers.get_mut("openai") {
        p.rate_limit.clone_from(&opts.rate_limit);
    }
    if let Some(configure) = opts.configure {
        configure(&mut settings, &mock.base_url());
    }
    settings.validate().expect("valid test settings");

    let mut app = TestApp {
        db_name,
        database_url,
        prefix,
        pool,
        mock,
        settings,
        api_addr: None,
        shutdown: CancellationToken::new(),
        workers: Vec::new(),
    };
    if opts.api {
        let handle =
            llmq_worker::api::start(&app.settings, app.pool.clone(), app.shutdown.child_token())
                .await
                .expect("start API");
        app.api_addr = Some(handle.addr);
    }
    for _ in 0..opts.workers {
        app.start_worker();
    }
    app
}

impl TestApp {
    /// Starts one more in-process worker; returns its stop token.
    pub fn start_worker(&mut self) -> CancellationToken {
        let token = self.shutdown.child_token();
        let settings = self.settings.clone();
        let pool = self.pool.clone();
        let t = token.clone();
        tokio::spawn(async move {
            if let Err(e) = llmq_worker::consume::run(settings, pool, t).await {
                eprintln!("worker stopped with error: {e:#}");
            }
        });
        self.workers.push(token.clone());
        token
    }

    /// A producer client for this app.
    pub async fn client(&self) -> Client {
        let mut config = ClientConfig::new(amqp_url(), self.database_url.clone());
        config.queue_prefix.clone_from(&self.prefix);
        config.limits = self.settings.limits.clone();
        Client::connect_with(config)
            .await
            .expect("connect producer client")
    }

    /// `http://127.0.0.1:PORT`
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr.expect("API started"))
    }

    /// `GET <api><path>` as JSON, whatever the status.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(format!("{}{path}", self.api_url()))
            .await
            .expect("API reachable")
            .json()
            .await
            .expect("a JSON body")
    }

    /// The topology of this app.
    pub fn topology(&self) -> Topology {
        Topology::new(self.prefix.clone())
    }

    /// Polls until the job is in `state` (or terminal in another state: then panics).
    pub async fn wait_for(&self, id: JobId, state: JobState, timeout: Duration) -> JobStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = llmq_producer_sdk::fetch_status(&self.pool, id, None)
                .await
                .expect("read status")
                .expect("job exists");
            if s.state == state {
                return s;
            }
            if s.state.is_terminal() {
                panic!(
                    "job {id} ended {} while waiting for {state}: {:?}",
                    s.state, s.last_error
                );
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "job {id} still {} after {timeout:?}, waiting for {state}",
                    s.state
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until the job is terminal, whatever the state.
    pub async fn wait_terminal(&self, id: JobId, timeout: Duration) -> JobStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = llmq_producer_sdk::fetch_status(&self.pool, id, None)
                .await
                .expect("read status")
                .expect("job exists");
            if s.state.is_terminal() {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} still {} after {timeout:?}",
                s.state
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes dead letters until `n` arrived (or 5 s passed).
    pub async fn wait_dead_letters(&self, n: usize) -> Vec<(Vec<u8>, Option<String>)> {
        let mut out = Vec::new();
        for _ in 0..50 {
            out.extend(self.drain_dead_letters().await);
            if out.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        out
    }

    /// Waits until every job in the database is terminal; returns counts by state.
    pub async fn wait_all_terminal(&self, expected: i64, timeout: Duration) -> Vec<(String, i64)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rows: Vec<(String, i64)> =
                sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")
                    .fetch_all(&self.pool)
                    .await
                    .expect("count jobs");
            let terminal: i64 = rows
                .iter()
                .filter(|(s, _)| s.parse::<JobState>().is_ok_and(JobState::is_terminal))
                .map(|(_, n)| n)
                .sum();
            if terminal >= expected {
                return rows;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("only {terminal}/{expected} jobs terminal after {timeout:?}: {rows:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens a channel on a fresh broker connection.
    pub async fn channel(&self) -> (lapin::Connection, lapin::Channel) {
        let conn = llmq_producer_sdk::connect_amqp(&amqp_url(), "llmq-tests")
            .await
            .expect("connect broker");
        let ch = conn.create_channel().await.expect("channel");
        (conn, ch)
    }

    /// Messages waiting in `queue`.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let (_c, ch) = self.channel().await;
        ch.queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue exists")
        .message_count()
    }

    /// Takes every message from the dead-letter queue: (body, reason header).
    pub async fn drain_dead_letters(&self) -> Vec<(Vec<u8>, Option<String>)> {
        let (_c, ch) = self.channel().await;
        let mut out = Vec::new();
        while let Some(msg) = ch
            .basic_get(&self.topology().dead_queue(), BasicGetOptions::default())
            .await
            .expect("basic_get")
        {
            let reason = msg
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-llmq-reason").cloned())
                .and_then(|v| match v {
                    lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
                    _ => None,
                });
            msg.ack(BasicAckOptions::default()).await.expect("ack");
            out.push((msg.data.clone(), reason));
        }
        out
    }

    /// Path of the `llmq` binary next to the test executable (built by `cargo build --bins`).
    pub fn llmq_binary() -> anyhow::Result<PathBuf> {
        // Test executables live in target/<profile>/deps, binaries in target/<profile>.
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("exe dir")?;
        for candidate in [
            dir.join("llmq"),
            dir.parent().context("target dir")?.join("llmq"),
        ] {
            if candidate.exists() {
                return Ok(candidate);
            }
        }
        anyhow::bail!("the llmq binary is missing next to {}: run `cargo build --workspace --bins` first (scripts/test.sh does)", exe.display())
    }

    /// Environment for an `llmq` child process pointing at this app.
    pub fn child_env(&self) -> Vec<(String, String)> {
        use secrecy::ExposeSecret;
        let p = &self.settings.providers["openai"];
        vec![
            ("LLMQ_DATABASE_URL".into(), self.database_url.clone()),
            ("LLMQ_AMQP_URL".into(), amqp_url()),
            ("LLMQ_QUEUE_PREFIX".into(), self.prefix.clone()),
            ("LLMQ_ADMISSION__NAMESPACE".into(), self.prefix.clone()),
            ("LLMQ_REDIS_URL".into(), redis_url()),
            (
                "LLMQ_WORKER__CONCURRENCY".into(),
                self.settings.worker.concurrency.to_string(),
            ),
            ("LLMQ_WORKER__SHUTDOWN_GRACE_SECS".into(), "20".into()),
            (
                "LLMQ_PROVIDERS__OPENAI__BASE_URL".into(),
                p.base_url.clone(),
            ),
            (
                "LLMQ_PROVIDERS__OPENAI__API_KEY".into(),
                p.api_key.expose_secret().to_owned(),
            ),
        ]
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.mock.shutdown();
        let db_name = self.db_name.clone();
        let topology = self.topology();
        let pool = self.pool.clone();
        // Drop runs outside async context guarantees: clean up on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                pool.close().await;
                if let Ok(conn) =
                    llmq_producer_sdk::connect_amqp(&amqp_url(), "llmq-tests-cleanup").await
                {
                    if let Ok(ch) = conn.create_channel().await {
                        let mut queues = vec![topology.work_queue(), topology.dead_queue()];
                        queues.extend(
                            llmq_producer_sdk::topology::DELAY_TIERS_SECS
                                .iter()
                                .map(|t| topology.delay_queue(*t)),
                        );
                        for q in queues {
                            let _ = ch.queue_delete(&q, QueueDeleteOptions::default()).await;
                        }
                        let _ = ch
                            .exchange_delete(
                                &topology.events_exchange(),
                                ExchangeDeleteOptions::default(),
                            )
                            .await;
                    }
                    let _ = conn.close(200, "done").await;
                }
                if let Ok(admin) = PgPool::connect(&admin_database_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
                        .execute(&admin)
                        .await;
                }
            });
        })
        .join();
    }
}
