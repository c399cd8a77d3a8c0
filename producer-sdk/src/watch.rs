//! Following jobs push-style: one listener per [`Client`](crate::Client) on the events
//! exchange (an exclusive queue bound to `#`), started on first use, fanning events out
//! to [`Client::wait`](crate::Client::wait) and [`Client::events`](crate::Client::events).
//! Events are a wake-up, not the record: every reader re-reads PostgreSQL when woken, and
//! also once a second, so a lost event or a broker outage only slows it down.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::broadcast;

use crate::protocol::JobEvent;
use crate::topology::Topology;

/// How long a reader waits for an event before it looks anyway.
pub(crate) const FALLBACK_POLL: Duration = Duration::from_secs(1);

/// A running listener; it stops (and closes its connection) when this is dropped, that
/// is with the last clone of its [`Client`](crate::Client).
pub(crate) struct Listener {
    pub(crate) events: broadcast::Sender<JobEvent>,
    _stop: tokio::sync::watch::Sender<()>,
}

/// Starts the listener.
pub(crate) fn start(amqp_url: String, topology: Topology) -> Listener {
    let (tx, _) = broadcast::channel(1024);
    let weak = tx.downgrade();
    let (stop_tx, mut stop) = tokio::sync::watch::channel(());
    tokio::spawn(async move {
        loop {
            let session = async {
                let conn = crate::connect_amqp(&amqp_url, "llmq-producer-events").await?;
                let ch = conn.create_channel().await?;
                let mut consumer = topology.follow_events(&ch, "#").await?;
                while let Some(delivery) = consumer.next().await {
                    let delivery = delivery?;
                    let Some(tx) = weak.upgrade() else {
                        return Ok(());
                    };
                    if let Ok(e) = serde_json::from_slice::<JobEvent>(&delivery.data) {
                        let _ = tx.send(e);
                    }
                }
                Ok::<_, crate::Error>(())
            };
            tokio::select! {
                r = session => if let Err(e) = r {
                    tracing::debug!(error = %e, "job event listener: broker unavailable; polling meanwhile");
                },
                // The Client is gone: the connection closes as the session is dropped.
                _ = stop.changed() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(FALLBACK_POLL) => {}
                _ = stop.changed() => return,
            }
        }
    });
    Listener {
        events: tx,
        _stop: stop_tx,
    }
}

/// Waits until an event of `job` arrives or `max` passes.
pub(crate) async fn until_event(
    rx: &mut broadcast::Receiver<JobEvent>,
    job: crate::JobId,
    max: Duration,
) {
    let _ = tokio::time::timeout(max, async {
        loop {
            match rx.recv().await {
                Ok(e) if e.job_id == job => return,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => {
                    tokio::time::sleep(max).await;
                    return;
                }
            }
        }
    })
    .await;
}
