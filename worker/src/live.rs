//! The live side of a job: the text a model is writing, while it writes it.
//!
//! The worker's [`Relay`] collects the deltas of one attempt and, every
//! [`FLUSH_EVERY`], writes them at their byte offset into a Redis string
//! `<ns>:text:<job>:<attempt>` (kept an hour) and publishes the job id on `<ns>:live`, in
//! one pipelined round trip. The API's
//! [`Hub`] turns those notices, and the job events on the broker, into wake-ups for the
//! SSE streams that follow a job; each stream then reads what is new (transitions from
//! PostgreSQL, text from Redis by byte offset), so a reconnect with `Last-Event-ID`
//! resumes exactly where it left off. Redis being down costs the live text, never the
//! result: the final answer is always in the job's record.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::settings::Settings;

/// How often a relay writes what it collected.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// How long the text of an attempt is kept after its last write.
const TEXT_TTL_MS: u64 = 3_600_000;

/// Redis key of the text of `job`'s `attempt`.
pub fn text_key(namespace: &str, job: Uuid, attempt: u32) -> String {
    format!("{namespace}:text:{job}:{attempt}")
}

/// Redis channel carrying the ids of jobs with new text.
pub fn channel(namespace: &str) -> String {
    format!("{namespace}:live")
}

fn pool(settings: &Settings) -> anyhow::Result<deadpool_redis::Pool> {
    let mut cfg = deadpool_redis::Config::from_url(settings.redis_url.expose_secret());
    cfg.pool = Some(deadpool_redis::PoolConfig::new(
        usize::from(settings.worker.concurrency).clamp(4, 64),
    ));
    cfg.create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .map_err(|e| anyhow::anyhow!("redis_url is not usable: {e}"))
}

/// Where workers write live text.
#[derive(Clone)]
pub struct LiveText {
    pool: deadpool_redis::Pool,
    namespace: String,
}

impl LiveText {
    /// From the settings' Redis URL and admission namespace.
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            pool: pool(settings)?,
            namespace: settings.admission.namespace.clone(),
        })
    }

    /// A relay for one attempt of `job`.
    pub fn relay(&self, job: Uuid, attempt: u32) -> Relay {
        let pending = Arc::new(Mutex::new(String::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(flush_loop(
            self.clone(),
            text_key(&self.namespace, job, attempt),
            job,
            pending.clone(),
            stop.clone(),
        ));
        Relay {
            pending,
            stop,
            task: Some(task),
        }
    }

    /// Writes `text` at byte `offset` of the attempt's text (SETRANGE: writing the same
    /// bytes again after a timeout that hid a success is harmless).
    async fn write(&self, key: &str, job: Uuid, offset: usize, text: &str) -> bool {
        let write = async {
            let mut conn = self.pool.get().await.ok()?;
            redis::pipe()
                .cmd("SETRANGE")
                .arg(key)
                .arg(offset)
                .arg(text)
                .ignore()
                .pexpire(key, i64::try_from(TEXT_TTL_MS).unwrap_or(i64::MAX))
                .ignore()
                .publish(channel(&self.namespace), job.to_string())
                .ignore()
                .query_async::<()>(&mut *conn)
                .await
                .ok()
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(500), write).await,
            Ok(Some(()))
        )
    }
}

async fn flush_loop(
    live: LiveText,
    key: String,
    job: Uuid,
    pending: Arc<Mutex<String>>,
    stop: CancellationToken,
) {
    let mut warned = false;
    // Bytes of this attempt's text known to be in Redis.
    let mut written = 0usize;
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            () = tokio::time::sleep(FLUSH_EVERY) => false,
        };
        let chunk = match pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => String::new(),
        };
        if !chunk.is_empty() {
            if live.write(&key, job, written, &chunk).await {
                written += chunk.len();
            } else {
                if !warned {
                    tracing::warn!(
                        "live text not written (Redis unreachable); the result is unaffected"
                    );
                    warned = true;
                }
                // Keep it for the next flush, in front of what arrived since.
                if let Ok(mut p) = pending.lock() {
                    p.insert_str(0, &chunk);
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// Collects one attempt's text and writes it in the background.
pub struct Relay {
    pending: Arc<Mutex<String>>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    /// Takes a piece of generated text (cheap: a buffer append).
    pub fn push(&self, text: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.push_str(text);
        }
    }

    /// Writes what is left and stops; call before the attempt's outcome is recorded, so a
    /// reader that sees the outcome finds the whole text.
    pub async fn finish(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Wakes the streams following a job when something about it changed.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Uuid>,
    /// Cancelled when the API shuts down: followers end their streams (clients resume
    /// elsewhere with `Last-Event-ID`).
    pub shutdown: CancellationToken,
    pool: deadpool_redis::Pool,
    namespace: String,
}

impl Hub {
    /// Starts listening on Redis (`<ns>:live`) and on the broker's events exchange until
    /// `shutdown`. Either may be down: streams also re-check every second.
    pub fn start(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let (tx, _) = broadcast::channel(4096);
        let hub = Self {
            tx,
            shutdown: shutdown.clone(),
            pool: pool(settings)?,
            namespace: settings.admission.namespace.clone(),
        };
        tokio::spawn(listen_redis(
            settings.redis_url.expose_secret().to_owned(),
            channel(&hub.namespace),
            hub.tx.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(listen_broker(
            settings.amqp_url.expose_secret().to_owned(),
            llmq_producer_sdk::Topology::new(settings.queue_prefix.clone()),
            hub.tx.clone(),
            shutdown,
        ));
        Ok(hub)
    }

    /// A receiver of job ids with news.
    pub fn subscribe(&self) -> broadcast::Receiver<Uuid> {
        self.tx.subscribe()
    }

    /// Wakes the followers of `job` (after a change made by this process).
    pub fn poke(&self, job: Uuid) {
        let _ = self.tx.send(job);
    }

    /// The text of `job`'s `attempt` from byte `offset` on, and how many bytes that was
    /// (nothing when there is none or Redis is unreachable).
    pub async fn text_from(&self, job: Uuid, attempt: u32, offset: usize) -> (String, usize) {
        let read = async {
            let mut conn = self.pool.get().await.ok()?;
            let end = -1isize;
            redis::cmd("GETRANGE")
                .arg(text_key(&self.namespace, job, attempt))
                .arg(offset)
                .arg(end)
                .query_async::<Vec<u8>>(&mut *conn)
                .await
                .ok()
        };
        match tokio::time::timeout(Duration::from_millis(500), read).await {
            Ok(Some(bytes)) => (String::from_utf8_lossy(&bytes).into_owned(), bytes.len()),
            _ => (String::new(), 0),
        }
    }
}

async fn listen_redis(
    url: String,
    channel: String,
    tx: broadcast::Sender<Uuid>,
    shutdown: CancellationToken,
) {
    use futures_util::StreamExt;
    while !shutdown.is_cancelled() {
        let session = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                if let Ok(Ok(id)) = msg.get_payload::<String>().map(|p| p.parse::<Uuid>()) {
                    let _ = tx.send(id);
                }
            }
            Ok::<_, redis::RedisError>(())
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = session => if let Err(e) = r {
                tracing::debug!(error = %e, "live text listener: Redis unavailable, retrying");
            },
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Sends the job id of every event on the events exchange.
async fn listen_broker(
    url: String,
    topology: llmq_producer_sdk::Topology,
    tx: broadcast::Sender<Uuid>,
    shutdown: CancellationToken,
) {
    use futures_util::StreamExt;
    while !shutdown.is_cancelled() {
        let session = async {
            let conn = llmq_producer_sdk::connect_amqp(&url, "llmq-events-listener").await?;
            let ch = conn.create_channel().await?;
            let mut consumer = topology.follow_events(&ch, "#").await?;
            while let Some(delivery) = consumer.next().await {
                let delivery = delivery?;
                if let Ok(e) = serde_json::from_slice::<llmq_producer_sdk::JobEvent>(&delivery.data)
                {
                    let _ = tx.send(e.job_id.0);
                }
            }
            Ok::<_, anyhow::Error>(())
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = session => if let Err(e) = r {
                tracing::debug!(error = %e, "job event listener: broker unavailable, retrying");
            },
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Jobs this worker holds while they wait for budget, and the cancellations that reach
/// them (the events exchange's `#.cancelled`), so a cancelled job lets go of its
/// reservation at once instead of when its slot comes.
#[derive(Default)]
pub struct Cancels {
    /// Per job, every watch on it (two copies of one job may wait on one worker).
    waiting: Mutex<std::collections::HashMap<Uuid, Vec<(u64, CancellationToken)>>>,
    next: std::sync::atomic::AtomicU64,
}

/// Removes its watch from [`Cancels`] when dropped.
pub struct CancelWatch {
    cancels: Arc<Cancels>,
    id: Uuid,
    n: u64,
    /// Cancelled when the job is.
    pub token: CancellationToken,
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        if let Ok(mut w) = self.cancels.waiting.lock() {
            if let Some(list) = w.get_mut(&self.id) {
                list.retain(|(n, _)| *n != self.n);
                if list.is_empty() {
                    w.remove(&self.id);
                }
            }
        }
    }
}

impl Cancels {
    /// Subscribes on the worker's broker `connection` and listens until `stop` or until
    /// the connection goes (its session ends then too). Returns once the subscription is
    /// bound, so a worker starts consuming only when it can hear cancellations.
    pub async fn start(
        connection: &lapin::Connection,
        topology: &llmq_producer_sdk::Topology,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, lapin::Error> {
        use futures_util::StreamExt;
        let channel = connection.create_channel().await?;
        let mut events = topology.follow_events(&channel, "#.cancelled").await?;
        let cancels = Arc::new(Self::default());
        let c = cancels.clone();
        tokio::spawn(async move {
            let _channel = channel;
            loop {
                let delivery = tokio::select! {
                    () = stop.cancelled() => return,
                    d = events.next() => match d {
                        Some(Ok(d)) => d,
                        _ => return,
                    },
                };
                let Ok(e) = serde_json::from_slice::<llmq_producer_sdk::JobEvent>(&delivery.data)
                else {
                    continue;
                };
                if let Ok(w) = c.waiting.lock() {
                    for (_, t) in w.get(&e.job_id.0).into_iter().flatten() {
                        t.cancel();
                    }
                }
            }
        });
        Ok(cancels)
    }

    /// Watches `id` for a cancellation while the returned guard lives.
    pub fn watch(self: &Arc<Self>, id: Uuid) -> CancelWatch {
        let token = CancellationToken::new();
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut w) = self.waiting.lock() {
            w.entry(id).or_default().push((n, token.clone()));
        }
        CancelWatch {
            cancels: self.clone(),
            id,
            n,
            token,
        }
    }
}
