//! The fleet's circuit breaker opens, probes and closes; a job's fallback route answers
//! when its primary is down or its circuit is open.

use std::sync::Arc;
use std::time::Duration;

use llmq_producer_sdk::{ChatMessage, JobState, NewJob, Route};
use llmq_tests::{redis_url, spawn_app_with, AppOptions};
use llmq_worker::breaker::{Breaker, Permit, Signal};
use llmq_worker::Settings;
use secrecy::SecretString;
use serde_json::Value;

fn breaker_settings() -> Settings {
    let mut s = Settings::defaults().unwrap();
    s.redis_url = SecretString::from(redis_url());
    s.admission.namespace = format!("llmqt-cb-{}", uuid::Uuid::new_v4().simple());
    s.breaker.min_calls = 4;
    s.breaker.failure_ratio = 0.5;
    s.breaker.cooldown_secs = 1;
    s.breaker.half_open_probes = 2;
    s.breaker.close_after = 2;
    s
}

#[tokio::test]
async fn opens_on_failure_rate_probes_and_closes() {
    let b = Arc::new(Breaker::new(&breaker_settings()).unwrap());
    assert!(b.check("p").await.open_for().is_none());
    b.record("p", Signal::Success).await;
    b.record("p", Signal::Neutral).await;
    b.record("p", Signal::Failure).await;
    b.record("p", Signal::Failure).await;
    assert_eq!(
        b.state("p").await.state,
        "closed",
        "2 of 3 failed, under min_calls"
    );
    b.record("p", Signal::Failure).await;
    let s = b.state("p").await;
    assert_eq!(s.state, "open", "3 of 4 calls failed");
    assert!(
        b.check("p").await.open_for().is_some(),
        "no calls while open"
    );

    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let probe1 = b.check("p").await;
    assert!(matches!(probe1, Permit::Call(Some(_))), "probe 1");
    let probe2 = b.check("p").await;
    assert!(matches!(probe2, Permit::Call(Some(_))), "probe 2");
    assert!(
        b.check("p").await.open_for().is_some(),
        "only two probes while half-open"
    );
    assert_eq!(b.state("p").await.state, "half_open");
    b.record_call(probe1, "p", Signal::Success).await;
    b.record_call(probe2, "p", Signal::Success).await;
    assert_eq!(b.state("p").await.state, "closed");

    // Quota exhaustion opens it at once; a failed probe opens it again.
    b.record("p", Signal::Fatal).await;
    assert_eq!(b.state("p").await.state, "open");
}

#[tokio::test]
async fn failures_in_a_row_open_it_after_a_busy_healthy_window() {
    let mut s = breaker_settings();
    s.breaker.consecutive_failures = 3;
    let b = Breaker::new(&s).unwrap();
    for _ in 0..50 {
        b.record("r", Signal::Success).await;
    }
    b.record("r", Signal::Failure).await;
    b.record("r", Signal::Failure).await;
    assert_eq!(b.state("r").await.state, "closed");
    b.record("r", Signal::Failure).await;
    assert_eq!(
        b.state("r").await.state,
        "open",
        "3 in a row after 50 successes"
    );
}

#[tokio::test]
async fn a_failed_probe_opens_it_again() {
    let b = Arc::new(Breaker::new(&breaker_settings()).unwrap());
    for _ in 0..4 {
        b.record("q", Signal::Failure).await;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let probe = b.check("q").await;
    assert!(probe.open_for().is_none());
    b.record_call(probe, "q", Signal::Failure).await;
    assert_eq!(b.state("q").await.state, "open");
}

/// Opens `provider`'s circuit and waits out the 1 s cooldown: the next checks are probes.
async fn half_open(b: &Breaker, provider: &str) {
    for _ in 0..4 {
        b.record(provider, Signal::Failure).await;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
}

#[tokio::test]
async fn a_probe_dropped_without_a_call_goes_back_to_the_fleet() {
    let b = Arc::new(Breaker::new(&breaker_settings()).unwrap());
    half_open(&b, "d").await;
    // Jobs that took the two probes and left without calling (too large, cancelled,
    // duplicate, handed back, panicked): their permits drop.
    for _ in 0..5 {
        let p1 = b.check("d").await;
        let p2 = b.check("d").await;
        assert!(matches!(p1, Permit::Call(Some(_))) && matches!(p2, Permit::Call(Some(_))));
        drop((p1, p2));
        // The release is sent in the background.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = b.check("d").await;
    assert!(
        matches!(p, Permit::Call(Some(_))),
        "probes were given back, not leaked: {:?}",
        b.state("d").await
    );
}

#[tokio::test]
async fn a_probe_whose_holder_died_lapses_after_its_lease() {
    let mut s = breaker_settings();
    s.breaker.probe_lease_secs = 1;
    let b = Arc::new(Breaker::new(&s).unwrap());
    half_open(&b, "k").await;
    // Two holders crash: nothing gives their probes back.
    std::mem::forget(b.check("k").await);
    std::mem::forget(b.check("k").await);
    assert!(b.check("k").await.open_for().is_some(), "both probes held");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(
        matches!(b.check("k").await, Permit::Call(Some(_))),
        "the lost probes lapsed"
    );
}

#[tokio::test]
async fn a_403_does_not_open_the_circuit_for_everyone() {
    use llmq_worker::outcome::ErrorClass;
    assert_eq!(Signal::of(ErrorClass::Permission), Signal::Neutral);
    let b = Arc::new(Breaker::new(&breaker_settings()).unwrap());
    for _ in 0..20 {
        b.record("f", Signal::of(ErrorClass::Permission)).await;
    }
    assert_eq!(b.state("f").await.state, "closed");
    assert_eq!(Signal::of(ErrorClass::Auth), Signal::Fatal);
}

fn with_dead_primary(s: &mut Settings, _mock: &str) {
    let mut primary = s.providers["openai"].clone();
    primary.base_url = "http://127.0.0.1:1/v1".into();
    s.providers.insert("primary".into(), primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_answers_when_the_primary_is_down() {
    let app = spawn_app_with(AppOptions {
        configure: Some(with_dead_primary),
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    let id = client
        .enqueue(
            NewJob::new("acme", "gpt-4o", vec![ChatMessage::user("fall back")])
                .provider("primary")
                .fallback(Route {
                    model: "gpt-4o-mini".into(),
                    provider: Some("openai".into()),
                })
                .max_tokens(8)
                .max_attempts(2),
        )
        .await
        .unwrap();
    let s = app
        .wait_for(id, JobState::Succeeded, Duration::from_secs(30))
        .await;
    let r = s.result.unwrap();
    assert_eq!(
        (r.provider.as_str(), r.model.as_str()),
        ("openai", "gpt-4o-mini"),
        "the record says which route answered"
    );
    let attempts: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT provider, model, error_class FROM job_attempts WHERE job_id = $1 ORDER BY attempt",
    )
    .bind(id.0)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        attempts,
        vec![
            ("primary".into(), "gpt-4o".into(), Some("network".into())),
            ("primary".into(), "gpt-4o".into(), Some("network".into())),
            ("openai".into(), "gpt-4o-mini".into(), None),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_sends_jobs_straight_to_the_fallback_and_shows_in_the_api() {
    let app = spawn_app_with(AppOptions {
        configure: Some(with_dead_primary),
        ..Default::default()
    })
    .await;
    let breaker = Breaker::new(&app.settings).unwrap();
    breaker.record("primary", Signal::Fatal).await;
    let circuits: Value = reqwest::get(format!("{}/v1/circuits", app.api_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let primary = circuits
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["provider"] == "primary")
        .unwrap()
        .clone();
    assert_eq!(primary["state"], "open", "{circuits}");

    let client = app.client().await;
    let id = client
        .enqueue(
            NewJob::new(
                "acme",
                "gpt-4o",
                vec![ChatMessage::user("skip the open circuit")],
            )
            .provider("primary")
            .fallback(Route {
                model: "gpt-4o-mini".into(),
                provider: Some("openai".into()),
            })
            .max_tokens(8),
        )
        .await
        .unwrap();
    let s = app
        .wait_for(id, JobState::Succeeded, Duration::from_secs(30))
        .await;
    assert_eq!(s.attempts, 1, "no call to the open primary");
    assert_eq!(s.result.unwrap().provider, "openai");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sporadic_failures_from_64_concurrent_callers_never_open_it() {
    let mut s = Settings::defaults().unwrap();
    s.redis_url = SecretString::from(redis_url());
    s.admission.namespace = format!("llmqt-cb-{}", uuid::Uuid::new_v4().simple());
    let b = std::sync::Arc::new(Breaker::new(&s).unwrap());
    let mut tasks = Vec::new();
    for t in 0..64u64 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut x: u64 = 12_345 + t * 7_919;
            let mut denied = 0;
            for _ in 0..40 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if b.check("p").await.open_for().is_some() {
                    denied += 1;
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                b.record(
                    "p",
                    if x % 100 < 5 {
                        Signal::Failure
                    } else {
                        Signal::Success
                    },
                )
                .await;
            }
            denied
        }));
    }
    let mut denied = 0;
    for t in tasks {
        denied += t.await.unwrap();
    }
    assert_eq!(
        denied,
        0,
        "5% failures opened the circuit: {:?}",
        b.state("p").await
    );
}

#[tokio::test]
async fn a_probe_from_an_earlier_round_given_back_late_frees_nothing() {
    let b = Arc::new(Breaker::new(&breaker_settings()).unwrap());
    half_open(&b, "s").await;
    let stale = b.check("s").await;
    assert!(matches!(stale, Permit::Call(Some(_))));
    // Another probe fails: open again, then a new half-open round after the cooldown.
    let failed = b.check("s").await;
    b.record_call(failed, "s", Signal::Failure).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let p1 = b.check("s").await;
    let p2 = b.check("s").await;
    assert!(matches!(p1, Permit::Call(Some(_))) && matches!(p2, Permit::Call(Some(_))));
    drop(stale);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        b.check("s").await.open_for().is_some(),
        "the stale probe's return did not free a probe of the new round"
    );
    drop((p1, p2));
}
