//! `llmq doctor` names the failing layer: a refused port (network), a bad key (identity),
//! an exhausted quota (quota), and says healthy for a healthy provider; it never prints
//! the key.

use std::process::Output;

use llmq_mock_provider::{Faults, MockConfig};
use llmq_tests::TestApp;

const KEY: &str = "sk-doctor-0123456789abcdef";

async fn doctor(base_url: &str) -> Output {
    tokio::process::Command::new(TestApp::llmq_binary().unwrap())
        .args(["doctor", "--model", "gpt-4o-mini"])
        .env("LLMQ_PROVIDERS__OPENAI__BASE_URL", base_url)
        .env("LLMQ_PROVIDERS__OPENAI__API_KEY", KEY)
        .env("RUST_LOG", "off")
        .output()
        .await
        .unwrap()
}

async fn mock(faults: Faults) -> llmq_mock_provider::MockHandle {
    llmq_mock_provider::spawn(
        "127.0.0.1:0",
        MockConfig {
            faults,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

fn text(o: &Output) -> String {
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!t.contains(KEY), "the key was printed: {t}");
    t
}

#[tokio::test]
async fn healthy_provider_passes_every_layer() {
    let m = mock(Faults::default()).await;
    let o = doctor(&m.base_url()).await;
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("verdict: healthy"), "{t}");
    assert!(t.contains("sk-…cdef"), "redacted key shown: {t}");
    for layer in [
        "network",
        "identity",
        "quota",
        "rate_limit",
        "request",
        "upstream",
    ] {
        assert!(
            t.lines()
                .any(|l| l.trim_start().starts_with(layer) && l.contains(" ok ")),
            "{layer}: {t}"
        );
    }
}

#[tokio::test]
async fn refused_port_is_the_network_layer() {
    let o = doctor("http://127.0.0.1:1/v1").await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("verdict: the network layer failed") && t.contains("refused"),
        "{t}"
    );
}

#[tokio::test]
async fn bad_key_is_the_identity_layer() {
    let m = mock(Faults {
        unauthorized_keys: vec![KEY.into()],
        ..Default::default()
    })
    .await;
    let o = doctor(&m.base_url()).await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("verdict: the identity layer failed: auth (HTTP 401"),
        "{t}"
    );
}

#[tokio::test]
async fn exhausted_quota_is_the_quota_layer() {
    let m = mock(Faults {
        quota_keys: vec![KEY.into()],
        ..Default::default()
    })
    .await;
    let o = doctor(&m.base_url()).await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains(
            "verdict: the quota layer failed: quota_exhausted (HTTP 429, type insufficient_quota"
        ),
        "{t}"
    );
}
