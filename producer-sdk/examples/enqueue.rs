//! Enqueue one job and wait for its result.
//!
//! ```text
//! cargo run -p llmq-producer-sdk --example enqueue -- "Write a haiku about queues"
//! ```
//! Uses `LLMQ_AMQP_URL` and `LLMQ_DATABASE_URL` (defaults: the local services).

use std::time::Duration;

use llmq_producer_sdk::{ChatMessage, Client, NewJob};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let amqp = std::env::var("LLMQ_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let db = std::env::var("LLMQ_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/llmq".into());
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Say hello".into());

    let client = Client::connect(&amqp, &db).await?;
    let id = client
        .enqueue(
            NewJob::new("example", "gpt-4o-mini", vec![ChatMessage::user(prompt)]).max_tokens(128),
        )
        .await?;
    println!("enqueued {id}");
    let status = client.wait(id, Duration::from_secs(120)).await?;
    println!(
        "{}: {}",
        status.state,
        status.result.map(|r| r.content).unwrap_or_default()
    );
    Ok(())
}
