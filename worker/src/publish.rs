//! Everything the worker sends to the broker: job events, retries into delay queues and
//! dead letters with their reason. All with publisher confirms.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use llmq_producer_sdk::{JobEvent, Topology};

/// Why a publish did not go through.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Channel or connection failure.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker nacked or returned the message.
    #[error("broker did not confirm the message to {0}")]
    NotConfirmed(String),
}

/// A confirm-mode channel and the topology's names.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    topology: Topology,
}

impl Publisher {
    /// Opens a confirm-mode channel on `connection`.
    pub async fn new(connection: &Connection, topology: Topology) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel, topology })
    }

    async fn send(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                exchange,
                key,
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                body,
                props,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            _ => Err(PublishError::NotConfirmed(format!("{exchange}/{key}"))),
        }
    }

    /// Publishes a transition on the events exchange (`<tenant>.<state>`).
    pub async fn event(&self, event: &JobEvent) -> Result<(), PublishError> {
        let body = serde_json::to_vec(event).unwrap_or_default();
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(event.job_id.to_string().into());
        self.send(
            &self.topology.events_exchange(),
            &event.routing_key(),
            &body,
            props,
            false,
        )
        .await
    }

    /// Parks a job in the delay tier of `tier_secs`; it returns to the work queue then.
    pub async fn retry_later(
        &self,
        body: &[u8],
        props: BasicProperties,
        tier_secs: u64,
    ) -> Result<(), PublishError> {
        self.send("", &self.topology.delay_queue(tier_secs), body, props, true)
            .await
    }

    /// Puts a message on the dead-letter queue with its reason and error class.
    pub async fn dead_letter(
        &self,
        body: &[u8],
        props: &BasicProperties,
        reason: &str,
        class: &str,
    ) -> Result<(), PublishError> {
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            ShortString::from("x-llmq-reason"),
            AMQPValue::LongString(reason.to_owned().into()),
        );
        headers.insert(
            ShortString::from("x-llmq-error-class"),
            AMQPValue::LongString(class.to_owned().into()),
        );
        headers.insert(
            ShortString::from("x-llmq-dead-lettered-at"),
            AMQPValue::LongString(chrono::Utc::now().to_rfc3339().into()),
        );
        let props = props.clone().with_headers(headers).with_delivery_mode(2);
        self.send("", &self.topology.dead_queue(), body, props, true)
            .await
    }
}

/// Copies the delivery's properties for a republish, with one header added.
pub fn with_header(props: &BasicProperties, key: &str, value: AMQPValue) -> BasicProperties {
    let mut headers: FieldTable = props.headers().clone().unwrap_or_default();
    headers.insert(ShortString::from(key), value);
    props.clone().with_headers(headers)
}
