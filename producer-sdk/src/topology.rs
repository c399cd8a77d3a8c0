//! The broker topology both sides agree on, derived from one prefix.
//!
//! - `<prefix>.work`: durable quorum work queue; messages that exceed the redelivery limit
//!   are dead-lettered to `<prefix>.dead`.
//! - `<prefix>.dead`: the dead-letter queue an operator lists and replays.
//! - `<prefix>.delay.<N>s`: retry delay queues; a message waits there N seconds and is
//!   dead-lettered back to the work queue, so a waiting retry holds no worker.
//! - `<prefix>.events`: topic exchange of job transitions, routing key `<tenant>.<state>`.

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

/// How many times a message may be delivered before the broker dead-letters it (a message
/// that crashes workers ends in the dead-letter queue instead of looping).
pub const DELIVERY_LIMIT: i64 = 5;

/// A job whose message has come back this many times without an outcome (workers that
/// crashed, lost their connection or drained while holding it) is failed as
/// `undeliverable` by the worker and dead-lettered with that reason, one return before
/// the broker would dead-letter it blindly (leaving its record unfinished).
pub const UNDELIVERABLE_AFTER: i64 = DELIVERY_LIMIT - 1;

/// Retry delay tiers, in seconds. A retry waits in the smallest tier at least as long as
/// the delay it needs, so a provider's Retry-After is never shortened; each tier is its own
/// queue with a fixed TTL, so no message waits behind a longer one.
pub const DELAY_TIERS_SECS: [u64; 10] = [1, 2, 5, 10, 15, 20, 30, 60, 120, 300];

/// Names of the queues and exchanges for one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    /// Topology under `prefix` (e.g. `llmq`, or a unique prefix per test).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The work queue.
    pub fn work_queue(&self) -> String {
        format!("{}.work", self.prefix)
    }

    /// The dead-letter queue.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The events topic exchange.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// The delay queue of one tier (see [`DELAY_TIERS_SECS`]).
    pub fn delay_queue(&self, tier_secs: u64) -> String {
        format!("{}.delay.{}s", self.prefix, tier_secs)
    }

    /// The tier a delay waits in: the smallest at least as long, or the longest.
    pub fn delay_tier(delay: std::time::Duration) -> u64 {
        let want = delay.as_secs_f64();
        DELAY_TIERS_SECS
            .into_iter()
            .find(|t| *t as f64 >= want)
            .unwrap_or(DELAY_TIERS_SECS[DELAY_TIERS_SECS.len() - 1])
    }

    /// The tier for a wait that is re-checked when it ends (an open circuit): the next
    /// tier up when that is at most a second or a quarter late, else the longest tier not
    /// above `delay` (the job re-checks early and waits the rest). A job comes back close
    /// to when it is needed, in few round trips.
    pub fn recheck_tier(delay: std::time::Duration) -> u64 {
        let want = delay.as_secs_f64();
        let up = Self::delay_tier(delay);
        if (up as f64) - want <= (want * 0.25).max(1.0) {
            return up;
        }
        DELAY_TIERS_SECS
            .into_iter()
            .rev()
            .find(|t| *t as f64 <= want)
            .unwrap_or(DELAY_TIERS_SECS[0])
    }

    /// Declares the topology and a private queue (exclusive, gone with `channel`) bound to
    /// the events exchange with `binding` (e.g. `#`, `acme.*`, `#.cancelled`), and consumes
    /// it without acks: for listeners that only need to be woken.
    pub async fn follow_events(
        &self,
        channel: &Channel,
        binding: &str,
    ) -> Result<lapin::Consumer, lapin::Error> {
        self.declare(channel).await?;
        let q = channel
            .queue_declare(
                "",
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                q.name().as_str(),
                &self.events_exchange(),
                binding,
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .basic_consume(
                q.name().as_str(),
                "",
                lapin::options::BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
    }

    /// Declares every queue and exchange (idempotent).
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let mut dead_args = FieldTable::default();
        dead_args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
        channel
            .queue_declare(&self.dead_queue(), durable, dead_args)
            .await?;

        let mut work_args = FieldTable::default();
        work_args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
        work_args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString("".into()),
        );
        work_args.insert(
            ShortString::from("x-dead-letter-routing-key"),
            AMQPValue::LongString(self.dead_queue().into()),
        );
        work_args.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        channel
            .queue_declare(&self.work_queue(), durable, work_args)
            .await?;

        for tier in DELAY_TIERS_SECS {
            let mut args = FieldTable::default();
            args.insert(
                ShortString::from("x-message-ttl"),
                AMQPValue::LongLongInt(i64::try_from(tier * 1000).unwrap_or(i64::MAX)),
            );
            args.insert(
                ShortString::from("x-dead-letter-exchange"),
                AMQPValue::LongString("".into()),
            );
            args.insert(
                ShortString::from("x-dead-letter-routing-key"),
                AMQPValue::LongString(self.work_queue().into()),
            );
            channel
                .queue_declare(&self.delay_queue(tier), durable, args)
                .await?;
        }

        channel
            .exchange_declare(
                &self.events_exchange(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Topology;
    use std::time::Duration;

    #[test]
    fn tiers_round_up_for_backoff_and_down_for_rechecks() {
        let s = Duration::from_secs_f64;
        assert_eq!(Topology::delay_tier(s(0.2)), 1);
        assert_eq!(Topology::delay_tier(s(5.5)), 10);
        assert_eq!(Topology::delay_tier(s(10_000.0)), 300);
        assert_eq!(Topology::recheck_tier(s(0.2)), 1);
        assert_eq!(Topology::recheck_tier(s(1.5)), 2);
        assert_eq!(Topology::recheck_tier(s(4.3)), 5);
        assert_eq!(Topology::recheck_tier(s(5.5)), 5);
        assert_eq!(Topology::recheck_tier(s(14.9)), 15);
        assert_eq!(Topology::recheck_tier(s(40.0)), 30);
        assert_eq!(Topology::recheck_tier(s(10_000.0)), 300);
    }
}
