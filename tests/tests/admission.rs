//! The shared budget against real Redis: atomic multi-dimension reservations, FIFO slots,
//! idempotent settling, exact refunds, fleet pauses, and the fail-closed fallback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmq_mock_provider::{Limits as MockLimits, MockConfig};
use llmq_producer_sdk::{ChatMessage, JobState, NewJob};
use llmq_tests::{redis_url, spawn_app_with, AppOptions};
use llmq_worker::admission::{Admission, Admit, Paced, Scope};
use llmq_worker::provider::Remaining;
use llmq_worker::settings::{LimitScope, ModelRateLimit, RateLimitSettings};
use llmq_worker::Settings;
use redis::AsyncCommands;
use secrecy::SecretString;

fn settings(limits: RateLimitSettings, refund: bool) -> Settings {
    let mut s = Settings::defaults().unwrap();
    s.redis_url = SecretString::from(redis_url());
    s.admission.namespace = format!("llmqt-adm-{}", uuid::Uuid::new_v4().simple());
    s.admission.safety_margin = 0.0;
    // The bucket mechanics alone; tests of what the headers teach use `learning`.
    s.admission.learn_from_headers = false;
    let p = s.providers.get_mut("openai").unwrap();
    p.rate_limit = Some(limits);
    p.refund_unused = refund;
    s
}

/// [`settings`] with the provider's headers setting the budget (the default outside tests).
fn learning(limits: RateLimitSettings) -> Settings {
    let mut s = settings(limits, false);
    s.admission.learn_from_headers = true;
    s
}

fn limits(rpm: u64, tpm: u64) -> RateLimitSettings {
    RateLimitSettings {
        rpm: Some(rpm),
        tpm: Some(tpm),
        request_burst_secs: 1.0,
        token_burst_secs: 60.0,
        ..Default::default()
    }
}

async fn tat(scope: &Scope, dim: &str) -> Option<f64> {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let v: Option<String> = c
        .hget(scope.hash_of(dim).unwrap(), format!("tat:{dim}"))
        .await
        .unwrap();
    v.map(|s| s.parse().unwrap())
}

fn go(a: Admit) -> (Duration, llmq_worker::admission::Reservation) {
    match a {
        Admit::Go { wait, reservation } => (wait, reservation),
        other => panic!("expected a slot, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_acquirers_never_over_admit() {
    // 1200 RPM paced per second (20/s), tokens not binding.
    let admission = Arc::new(Admission::new(&settings(limits(1200, 6_000_000), false)).unwrap());
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let (a, s) = (admission.clone(), scope.clone());
        tasks.push(tokio::spawn(async move {
            let (wait, _) = go(a.acquire(&s, s.demand(100 + i, 50)).await);
            tokio::time::sleep(wait).await;
            t0.elapsed().as_secs_f64()
        }));
    }
    let mut starts = Vec::new();
    for t in tasks {
        starts.push(t.await.unwrap());
    }
    starts.sort_by(f64::total_cmp);
    // Buckets start empty: by time t at most 20·t requests may have started (+1 for
    // timer granularity), and no 1 s window holds more than 20 (+1).
    for (i, t) in starts.iter().enumerate() {
        assert!(
            (i as f64) <= 20.0 * t + 1.0,
            "request {i} started at {t:.3}s: over the rate"
        );
    }
    for (i, t) in starts.iter().enumerate() {
        let in_window = starts[i..].iter().take_while(|u| **u < t + 1.0).count();
        assert!(
            in_window <= 21,
            "{in_window} requests within 1 s from {t:.3}s"
        );
    }
    // Both dimensions were charged for every reservation: tokens' TAT moved by exactly
    // the sum of token amounts over the empty start (tokens never bound).
    let tokens_tat = tat(&scope, "tokens").await.unwrap();
    let requests_tat = tat(&scope, "requests").await.unwrap();
    assert!(tokens_tat > 0.0 && requests_tat > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_or_too_busy_charges_nothing() {
    let mut s = settings(limits(600, 1000), false);
    s.admission.max_wait_secs = 60;
    let admission = Admission::new(&s).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    // More tokens than the bucket ever holds: refused, nothing charged in any dimension.
    match admission.acquire(&scope, scope.demand(900, 500)).await {
        Admit::TooLarge {
            dim,
            amount,
            capacity,
        } => {
            assert_eq!((dim, amount, capacity), ("tokens", 1400, 1000));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        tat(&scope, "requests").await,
        None,
        "requests charged without tokens"
    );
    // A slot further than max_wait: refused, nothing charged.
    let (_, _) = go(admission.acquire(&scope, scope.demand(400, 400)).await);
    let before = (tat(&scope, "requests").await, tat(&scope, "tokens").await);
    assert!(matches!(
        admission.acquire(&scope, scope.demand(400, 400)).await,
        Admit::TooBusy { .. }
    ));
    assert_eq!(
        (tat(&scope, "requests").await, tat(&scope, "tokens").await),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_fifo_for_mixed_sizes() {
    let admission = Admission::new(&settings(limits(6000, 60_000), false)).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    let t0 = Instant::now();
    let mut starts = Vec::new();
    for (prompt, max) in [
        (100, 100),
        (20_000, 4_000),
        (50, 50),
        (10, 10),
        (8_000, 2_000),
        (100, 100),
    ] {
        let asked = t0.elapsed();
        let (wait, _) = go(admission.acquire(&scope, scope.demand(prompt, max)).await);
        starts.push((asked + wait).as_secs_f64());
    }
    for w in starts.windows(2) {
        assert!(
            w[1] + 0.005 >= w[0],
            "a later job got an earlier slot: {starts:?}"
        );
    }
    // The large job does not hold back forever: its slot is finite and near its size.
    assert!(starts[1] < 30.0, "{starts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_is_idempotent_and_a_refund_of_r_admits_exactly_r_more() {
    let admission = Admission::new(&settings(limits(6000, 60_000), true)).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    let mut reservations = Vec::new();
    for _ in 0..5 {
        reservations.push(go(admission.acquire(&scope, scope.demand(2_000, 1_000)).await).1);
    }
    let per_token_ms = 60_000.0 / 60_000.0;
    let before = tat(&scope, "tokens").await.unwrap();
    // Used 1,000 fewer tokens than reserved: refund R = 1000 tokens.
    let r = &reservations[4];
    admission.settle(r, &[1, 2_000], &[], Duration::ZERO).await;
    let after = tat(&scope, "tokens").await.unwrap();
    assert!(
        (before - after - 1_000.0 * per_token_ms).abs() < 0.01,
        "refund moved TAT by {}",
        before - after
    );
    // Settling the same reservation again changes nothing.
    admission.settle(r, &[1, 2_000], &[], Duration::ZERO).await;
    assert!((tat(&scope, "tokens").await.unwrap() - after).abs() < 0.001);
    // Excess is charged: 500 more tokens than reserved.
    admission
        .settle(&reservations[3], &[1, 3_500], &[], Duration::ZERO)
        .await;
    assert!((tat(&scope, "tokens").await.unwrap() - after - 500.0 * per_token_ms).abs() < 0.01);
}

/// Seconds' worth of tokens the bucket holds now (its level), from its TAT and Redis time.
async fn level(scope: &Scope, dim: &str, per_minute: f64, burst: f64) -> f64 {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
    let now = secs as f64 * 1000.0 + micros as f64 / 1000.0;
    let interval = 60_000.0 / per_minute;
    let tat = tat(scope, dim).await.unwrap();
    (now + burst * interval - tat) / interval
}

/// What an idle account of 600 RPM and 900k TPM reports after one call: 599 requests
/// and 895,000 tokens left of the minute.
fn idle_account() -> Remaining {
    Remaining {
        requests: Some(599),
        tokens: Some(895_000),
        limits: [Some(600), Some(900_000), None, None],
        ..Default::default()
    }
}

/// Whether a call of 5,000 tokens is still without a slot after half a second (it waits
/// for a probe's answer).
async fn held_back(admission: &Admission, scope: &Arc<Scope>) -> bool {
    tokio::time::timeout(
        Duration::from_millis(500),
        admission.acquire(scope, scope.demand(4_000, 1_000)),
    )
    .await
    .is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_budget_probes_with_one_call_and_learns_the_accounts_count() {
    // 600 RPM per second, 900k TPM over a minute; no state in Redis.
    let admission = Admission::new(&learning(limits(600, 900_000))).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    // Nothing is known: the first call goes at once, as the probe...
    let (wait, probe) = go(admission.acquire(&scope, scope.demand(4_000, 1_000)).await);
    assert!(wait < Duration::from_millis(150), "{wait:?}");
    // ...and the next waits for its answer rather than take a slot from a bucket only
    // assumed empty.
    assert!(
        held_back(&admission, &scope).await,
        "a second call got a slot before the probe's answer"
    );
    // The probe's answer from an idle account.
    let headers = idle_account();
    let seen = scope.seen(&headers);
    // The request bucket holds a second's worth (10): the provider's second holds at
    // least its size less the minute's shortfall, 10 - 1.
    assert_eq!(seen, vec![Some(9), Some(895_000)]);
    admission
        .settle(&probe, &[1, 5_000], &seen, Duration::from_millis(300))
        .await;
    // Learned: the account's count less a quarter second's worth (15,000 a second)
    // and the largest call admitted (5,000) for calls that may reach it later.
    let l = level(&scope, "tokens", 900_000.0, 900_000.0).await;
    assert!(
        (886_000.0..=892_000.0).contains(&l),
        "tokens level after learning: {l}"
    );
    // The calls after it are admitted from what was learned, at once.
    let (wait, second) = go(admission.acquire(&scope, scope.demand(4_000, 1_000)).await);
    assert!(wait < Duration::from_millis(200), "{wait:?}");
    // A lower count tightens.
    admission
        .settle(
            &second,
            &[1, 5_000],
            &[None, Some(100_000)],
            Duration::from_millis(300),
        )
        .await;
    let tightened = level(&scope, "tokens", 900_000.0, 900_000.0).await;
    assert!(
        tightened < 110_000.0,
        "a lower count did not tighten: {tightened}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_never_reaches_the_provider_frees_the_calls_waiting_on_it() {
    let admission = Admission::new(&learning(limits(600, 900_000))).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    let (_, probe) = go(admission.acquire(&scope, scope.demand(4_000, 1_000)).await);
    // Its job was handed back before the call (or the call failed without headers):
    // nothing will be learned from it, and nobody waits out the probe's 2 s for that.
    admission.give_back(&probe).await;
    let next = tokio::time::timeout(
        Duration::from_millis(1_500),
        admission.acquire(&scope, scope.demand(4_000, 1_000)),
    )
    .await;
    assert!(
        next.is_ok(),
        "a call kept waiting on a probe that was given back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_lost_by_redis_is_probed_again_though_calls_in_flight_settle_first() {
    let admission = Admission::new(&learning(limits(600, 900_000))).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    let (_, probe) = go(admission.acquire(&scope, scope.demand(4_000, 1_000)).await);
    let headers = idle_account();
    let seen = scope.seen(&headers);
    admission
        .settle(&probe, &[1, 5_000], &seen, Duration::from_millis(300))
        .await;
    let (_, in_flight) = go(admission.acquire(&scope, scope.demand(4_000, 1_000)).await);
    // Redis restarted empty; the call in flight then settles against the new state.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = c.del(&scope.hashes).await.unwrap();
    admission
        .settle(&in_flight, &[1, 5_000], &seen, Duration::from_millis(300))
        .await;
    // The budget is still unknown: the next call is a probe (at once, bar the request
    // bucket's first tenth of a second), and the one after it waits for its answer.
    let (wait, _) = go(admission.acquire(&scope, scope.demand(4_000, 1_000)).await);
    assert!(wait < Duration::from_millis(150), "not probed: {wait:?}");
    assert!(
        held_back(&admission, &scope).await,
        "a second call got a slot before the probe's answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_to_a_call_paced_apart_from_the_others_is_taken_whole() {
    // 60,000 TPM: 1,000 tokens a second. The probe's answer says nothing is left.
    let admission = Admission::new(&learning(limits(600, 60_000))).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    let (_, probe) = go(admission.acquire(&scope, scope.demand(400, 100)).await);
    let empty = Remaining {
        tokens: Some(0),
        limits: [Some(600), Some(60_000), None, None],
        ..Default::default()
    };
    admission
        .settle(
            &probe,
            &[1, 500],
            &scope.seen(&empty),
            Duration::from_millis(300),
        )
        .await;
    // A call paced by the tokens, its slot a second after the probe's: no call
    // admitted before it can reach the provider after it. The next is 0.1 s behind it.
    let (wait, alone) = go(admission.acquire(&scope, scope.demand(400, 100)).await);
    assert!(wait >= Duration::from_millis(500), "{wait:?}");
    let (_, next) = go(admission.acquire(&scope, scope.demand(90, 10)).await);
    assert_eq!(alone.seq[1].paced, Paced::Alone, "{:?}", alone.seq);
    assert_eq!(next.seq[1].paced, Paced::Yes, "{:?}", next.seq);
    let headers = Remaining {
        tokens: Some(50_000),
        limits: [Some(600), Some(60_000), None, None],
        ..Default::default()
    };
    admission
        .settle(
            &alone,
            &[1, 500],
            &scope.seen(&headers),
            Duration::from_millis(300),
        )
        .await;
    // The account's count less the 100 admitted after it and the largest call (one
    // that left far behind its slot), but no quarter second's worth.
    let l = level(&scope, "tokens", 60_000.0, 60_000.0).await;
    assert!((49_390.0..=50_000.0).contains(&l), "tokens level: {l}");
    // The next call's answer (a call might have overtaken it) keeps a quarter second's
    // rate in hand as well: it never loosens as far.
    let before = tat(&scope, "tokens").await.unwrap();
    admission
        .settle(
            &next,
            &[1, 100],
            &scope.seen(&headers),
            Duration::from_millis(300),
        )
        .await;
    let after = tat(&scope, "tokens").await.unwrap();
    assert!(after >= before, "loosened: tat {before} -> {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_drains_only_the_dimension_it_names() {
    let admission = Admission::new(&learning(limits(600, 900_000))).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    // The budget's first call (the probe), whose answer sets the tokens.
    let (_, r) = go(admission.acquire(&scope, scope.demand(4_000, 1_000)).await);
    admission
        .settle(
            &r,
            &[1, 100],
            &[None, Some(800_000)],
            Duration::from_millis(10),
        )
        .await;
    let tokens_before = level(&scope, "tokens", 900_000.0, 900_000.0).await;
    assert!(tokens_before > 700_000.0, "{tokens_before}");
    // OpenAI's 429 on requests: only the request bucket is drained.
    let drain = scope.exceeded(
        Some("requests"),
        "Rate limit reached for gpt-4o-mini in organization org-x on requests per min (RPM): Limit 600, Used 600, Requested 1.",
        &[Some(0), Some(799_000)],
    );
    assert_eq!(drain, vec![true, false]);
    admission
        .pause_for(
            &scope,
            Duration::from_millis(35),
            &drain,
            &[Some(0), Some(799_000)],
        )
        .await;
    let tokens_after = level(&scope, "tokens", 900_000.0, 900_000.0).await;
    assert!(
        tokens_after > tokens_before - 1_000.0,
        "a request 429 drained tokens: {tokens_before} -> {tokens_after}"
    );
    assert!(level(&scope, "requests", 600.0, 8.0).await <= 0.5);
    // Anthropic's words name its dimensions too; a 429 that says nothing drains all.
    let anthropic = Admission::new(&{
        let mut s = settings(
            RateLimitSettings {
                rpm: Some(50),
                input_tpm: Some(40_000),
                output_tpm: Some(8_000),
                ..limits(50, 1)
            },
            false,
        );
        s.providers
            .get_mut("openai")
            .unwrap()
            .rate_limit
            .as_mut()
            .unwrap()
            .tpm = None;
        s
    })
    .unwrap();
    let a = anthropic.scope("openai", "claude").unwrap();
    assert_eq!(
        a.exceeded(Some("rate_limit_error"), "This request would exceed your organization's rate limit of 8,000 output tokens per minute.", &[]),
        vec![false, false, true]
    );
    assert_eq!(
        a.exceeded(None, "Too Many Requests", &[]),
        vec![true, true, true]
    );
    // A pause is capped by admission.max_pause_secs.
    let mut s = settings(limits(600, 900_000), false);
    s.admission.max_pause_secs = 2;
    let capped = Admission::new(&s).unwrap();
    let sc = capped.scope("openai", "gpt-4o-mini").unwrap();
    capped.pause(&sc, Duration::from_secs(3600)).await;
    assert!(capped.pause_left(&sc).await <= Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_wide_limit_is_shared_by_every_model_and_charged_with_a_models_own() {
    let mut s = settings(
        RateLimitSettings {
            scope: LimitScope::Key,
            ..limits(600, 900_000)
        },
        false,
    );
    s.providers.get_mut("openai").unwrap().model_limits = vec![ModelRateLimit {
        model: "gpt-4o".into(),
        limits: limits(60, 30_000),
    }];
    let admission = Admission::new(&s).unwrap();
    let mini = admission.scope("openai", "gpt-4o-mini").unwrap();
    let other = admission.scope("openai", "never-configured-model").unwrap();
    let big = admission.scope("openai", "gpt-4o").unwrap();
    // Unconfigured names charge the key's budget, never one of their own.
    assert_eq!(mini.hashes, other.hashes);
    assert_eq!(mini.hashes.len(), 1);
    assert!(mini.hashes[0].ends_with(":key"), "{:?}", mini.hashes);
    // A configured model is charged against its own limits and the key's at once.
    assert_eq!(big.hashes.len(), 2);
    assert_eq!(big.hashes[0], mini.hashes[0]);
    assert_eq!(big.dims.len(), 4);
    // The key's 10 requests per second, shared: 10 calls over three model names fill it.
    for i in 0..10 {
        let sc = [&mini, &other, &big][i % 3];
        go(admission.acquire(sc, sc.demand(10, 10)).await);
    }
    let (wait, _) = go(admission.acquire(&other, other.demand(10, 10)).await);
    assert!(wait >= Duration::from_millis(900), "{wait:?}");
    // Per-model (the default): each name its own budget.
    let per_model = Admission::new(&settings(limits(600, 900_000), false)).unwrap();
    assert_ne!(
        per_model.scope("openai", "a").unwrap().hashes,
        per_model.scope("openai", "b").unwrap().hashes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_is_never_shortened() {
    let admission = Admission::new(&settings(limits(600, 90_000), false)).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    admission.pause(&scope, Duration::from_secs(10)).await;
    admission.pause(&scope, Duration::from_secs(1)).await;
    let left = admission.pause_left(&scope).await;
    assert!(left > Duration::from_secs(9), "pause shortened to {left:?}");
    // A new slot starts after the pause, not during it.
    let (wait, _) = go(admission.acquire(&scope, scope.demand(10, 10)).await);
    assert!(wait >= Duration::from_secs(9), "{wait:?}");
}

/// An app whose mock enforces (mock_rpm, mock_tpm) per second/minute and whose workers
/// budget for (rpm, tpm).
fn limited_app_options(mock_rpm: u64, mock_tpm: u64, rpm: u64, tpm: u64) -> AppOptions {
    AppOptions {
        mock: MockConfig {
            limits: Some(MockLimits {
                rpm: Some(mock_rpm),
                tpm: Some(mock_tpm),
                per_second: true,
                ..Default::default()
            }),
            ..Default::default()
        },
        rate_limit: Some(limits(rpm, tpm)),
        workers: 2,
        concurrency: 16,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_wait_for_budget_and_the_provider_sees_no_429() {
    let opts = limited_app_options(300, 30_000, 300, 30_000);
    let app = spawn_app_with(opts).await;
    let client = app.client().await;
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(
            client
                .enqueue(
                    NewJob::new(
                        "acme",
                        "gpt-4o-mini",
                        vec![ChatMessage::user(format!("budgeted {i}"))],
                    )
                    .max_tokens(200),
                )
                .await
                .unwrap(),
        );
    }
    // Someone is seen waiting for budget with an expected start.
    let mut seen_waiting = false;
    for _ in 0..100 {
        for id in &ids {
            let s = client.status(*id).await.unwrap();
            if s.state == JobState::WaitingBudget {
                assert!(s.expected_start_at.is_some());
                seen_waiting = true;
            }
        }
        if seen_waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen_waiting, "no job showed waiting_budget");
    let counts = app.wait_all_terminal(40, Duration::from_secs(120)).await;
    assert_eq!(counts, vec![("succeeded".to_string(), 40)]);
    let stats = app.mock.stats();
    assert_eq!(
        stats.rate_limited, 0,
        "the provider returned 429s: {stats:?}"
    );
    assert_eq!(stats.succeeded, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_too_large_for_the_limit_fails_at_once_without_a_call() {
    let opts = limited_app_options(600, 1_000, 600, 1_000);
    let app = spawn_app_with(opts).await;
    let client = app.client().await;
    let id = client
        .enqueue(
            NewJob::new("acme", "gpt-4o-mini", vec![ChatMessage::user("big")]).max_tokens(5_000),
        )
        .await
        .unwrap();
    let s = app
        .wait_for(id, JobState::Failed, Duration::from_secs(20))
        .await;
    assert_eq!(s.last_error.unwrap().class, "request_too_large");
    assert_eq!(s.attempts, 1);
    assert_eq!(app.mock.stats().requests_total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_provider_call_during_a_fleet_pause() {
    let opts = limited_app_options(6_000, 1_000_000, 6_000, 1_000_000);
    let app = spawn_app_with(opts).await;
    // Another replica saw a 429 with retry-after 3 s.
    let admission = Admission::new(&app.settings).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    let paused_at = Instant::now();
    admission.pause(&scope, Duration::from_secs(3)).await;
    let client = app.client().await;
    for i in 0..10 {
        client
            .enqueue(
                NewJob::new(
                    "acme",
                    "gpt-4o-mini",
                    vec![ChatMessage::user(format!("p{i}"))],
                )
                .max_tokens(10),
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2_500).saturating_sub(paused_at.elapsed())).await;
    assert_eq!(
        app.mock.stats().requests_total,
        0,
        "a worker called the provider during the pause"
    );
    let counts = app.wait_all_terminal(10, Duration::from_secs(60)).await;
    assert_eq!(counts, vec![("succeeded".to_string(), 10)]);
    assert!(paused_at.elapsed() >= Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_unreachable_admission_continues_at_the_local_share() {
    let mut opts = limited_app_options(120, 100_000, 120, 100_000);
    opts.workers = 1;
    opts.configure = Some(|s, _| {
        // Nothing listens there: every Redis call fails.
        s.redis_url = SecretString::from("redis://127.0.0.1:1".to_owned());
    });
    let app = spawn_app_with(opts).await;
    let client = app.client().await;
    for i in 0..12 {
        client
            .enqueue(
                NewJob::new(
                    "acme",
                    "gpt-4o-mini",
                    vec![ChatMessage::user(format!("r{i}"))],
                )
                .max_tokens(10),
            )
            .await
            .unwrap();
    }
    let counts = app.wait_all_terminal(12, Duration::from_secs(60)).await;
    assert_eq!(counts, vec![("succeeded".to_string(), 12)]);
    let stats = app.mock.stats();
    assert_eq!(
        stats.rate_limited, 0,
        "failing open would have hit the provider's limit: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anthropic_jobs_stay_under_input_and_output_token_limits() {
    let opts = AppOptions {
        mock: MockConfig {
            limits: Some(MockLimits {
                rpm: Some(600),
                input_tpm: Some(6_000),
                output_tpm: Some(3_000),
                per_second: true,
                ..Default::default()
            }),
            ..Default::default()
        },
        workers: 2,
        configure: Some(|s, mock_url| {
            let mut p = s.providers["openai"].clone();
            p.kind = llmq_worker::settings::ProviderKind::Anthropic;
            p.base_url = mock_url.to_owned();
            p.rate_limit = Some(RateLimitSettings {
                rpm: Some(600),
                input_tpm: Some(6_000),
                output_tpm: Some(3_000),
                request_burst_secs: 1.0,
                token_burst_secs: 60.0,
                ..Default::default()
            });
            s.providers.insert("anthropic".into(), p);
        }),
        ..Default::default()
    };
    let app = spawn_app_with(opts).await;
    let client = app.client().await;
    for i in 0..12 {
        client
            .enqueue(
                NewJob::new(
                    "acme",
                    "claude-sonnet-4",
                    vec![
                        ChatMessage::system("be brief"),
                        ChatMessage::user(format!("claude {i} {}", "x".repeat(400))),
                    ],
                )
                .provider("anthropic")
                .max_tokens(100),
            )
            .await
            .unwrap();
    }
    let counts = app.wait_all_terminal(12, Duration::from_secs(90)).await;
    assert_eq!(counts, vec![("succeeded".to_string(), 12)]);
    let stats = app.mock.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    let content: String = sqlx::query_scalar("SELECT result->>'content' FROM jobs LIMIT 1")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(content.starts_with("mock reply to: claude"), "{content}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_lost_by_redis_starts_empty_not_full() {
    let admission = Admission::new(&settings(limits(6000, 60_000), false)).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    let (first, _) = go(admission.acquire(&scope, scope.demand(1_000, 1_000)).await);
    // 2,000 tokens at 1,000/s from an empty bucket (no headers to learn from): about
    // 2 s, not at once.
    assert!(first >= Duration::from_millis(1_900), "{first:?}");
    // Redis restarted empty: the scope's state is gone; it starts empty again.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = c.del(&scope.hashes).await.unwrap();
    let (again, _) = go(admission.acquire(&scope, scope.demand(1_000, 1_000)).await);
    assert!(again >= Duration::from_millis(1_900), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_change_without_a_restart_and_keep_the_safety_margin() {
    let mut s = settings(limits(600, 90_000), false);
    s.admission.safety_margin = 0.02;
    let admission = Admission::new(&s).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    assert!(
        (scope.dims[1].per_minute - 88_200.0).abs() < 1e-6,
        "{:?}",
        scope.dims
    );
    s.providers.get_mut("openai").unwrap().rate_limit = Some(limits(600, 30_000));
    admission.reload(&s);
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    assert!(
        (scope.dims[1].per_minute - 29_400.0).abs() < 1e-6,
        "{:?}",
        scope.dims
    );
    assert!(
        // A second's worth less the 0.2 s calls may reach the provider late: 588 * 0.8 / 60.
        (scope.dims[0].burst - 7.84).abs() < 1e-6,
        "requests paced per second: {:?}",
        scope.dims
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cap_on_calls_in_flight_holds_across_replicas() {
    // A gateway allowing 3 calls at once on the key; two replicas of 16 slots each.
    let app = spawn_app_with(AppOptions {
        mock: MockConfig {
            latency: Duration::from_millis(200),
            limits: Some(MockLimits {
                max_concurrent: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        },
        rate_limit: Some(RateLimitSettings {
            max_concurrent: Some(3),
            ..Default::default()
        }),
        workers: 2,
        concurrency: 16,
        ..Default::default()
    })
    .await;
    let client = app.client().await;
    for i in 0..30 {
        client
            .enqueue(
                NewJob::new(
                    "acme",
                    "gpt-4o-mini",
                    vec![ChatMessage::user(format!("c{i}"))],
                )
                .max_tokens(10),
            )
            .await
            .unwrap();
    }
    let counts = app.wait_all_terminal(30, Duration::from_secs(120)).await;
    assert_eq!(counts, vec![("succeeded".to_string(), 30)]);
    let stats = app.mock.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    let peak = stats
        .by_key
        .values()
        .map(|k| k.max_in_flight_seen)
        .max()
        .unwrap();
    assert!(peak <= 3, "{peak} calls in flight at once");
    assert!(peak >= 2, "the cap was never used: {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relays_per_key_limit_over_three_models_sees_no_429() {
    // The provider limits the key across models (a relay): 300 RPM, paced per second.
    let mut opts = limited_app_options(300, 10_000_000, 300, 10_000_000);
    if let Some(l) = opts.rate_limit.as_mut() {
        l.scope = LimitScope::Key;
    }
    let app = spawn_app_with(opts).await;
    let client = app.client().await;
    let models = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini"];
    for i in 0..60 {
        client
            .enqueue(
                NewJob::new(
                    "acme",
                    models[i % 3],
                    vec![ChatMessage::user(format!("k{i}"))],
                )
                .max_tokens(10),
            )
            .await
            .unwrap();
    }
    let counts = app.wait_all_terminal(60, Duration::from_secs(120)).await;
    assert_eq!(counts, vec![("succeeded".to_string(), 60)]);
    let stats = app.mock.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
}

/// A TCP relay to Redis that can be cut (every connection dropped, new ones closed at
/// once) and restored: Redis unreachable for one replica while it keeps running.
struct Cut {
    url: String,
    up: tokio::sync::watch::Sender<bool>,
}

impl Cut {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let target = redis_url()
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_owned();
        let (up, watch) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut watch = watch.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    if !*watch.borrow() {
                        return;
                    }
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { url, up }
    }

    fn set(&self, up: bool) {
        self.up.send_replace(up);
    }
}

/// A replica on its own (share 1) behind `cut`: 600 RPM in buckets of 10 s less the
/// 0.2 s kept in hand (98 calls).
fn cut_replica(cut: &Cut) -> Admission {
    let mut l = limits(600, 10_000_000);
    l.request_burst_secs = 10.0;
    let mut s = settings(l, false);
    s.redis_url = SecretString::from(cut.url.clone());
    s.admission.assumed_replicas = 1;
    s.admission.redis_timeout_ms = 1_000;
    Admission::new(&s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_admissions_are_charged_on_return_unless_the_empty_start_counts_them() {
    let cut = Cut::start().await;
    let admission = cut_replica(&cut);
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    let one = || scope.demand(1, 1);
    // Known state, then Redis out of reach (the state lives on): 20 calls on the local
    // share, then back. What the local share admitted is spent: charged on return.
    go(admission.acquire(&scope, one()).await);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let full = level(&scope, "requests", 600.0, 98.0).await;
    assert!(full > 97.0, "the bucket refilled: {full}");
    cut.set(false);
    for _ in 0..20 {
        let (_, r) = go(admission.acquire(&scope, one()).await);
        assert!(!r.global, "admitted through Redis while it was cut off");
    }
    cut.set(true);
    let (_, r) = go(admission.acquire(&scope, one()).await);
    assert!(r.global);
    let after = level(&scope, "requests", 600.0, 98.0).await;
    assert!(
        after < 85.0,
        "20 local admissions were not charged on return: {after}"
    );

    // Redis restarted empty (the state is gone) while this replica admitted locally:
    // the state starts empty, which already counts them; charging them again would
    // waste 20 calls of the account.
    cut.set(false);
    for _ in 0..20 {
        go(admission.acquire(&scope, one()).await);
    }
    let client = redis::Client::open(redis_url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = c.del(&scope.hashes).await.unwrap();
    cut.set(true);
    let (_, r) = go(admission.acquire(&scope, one()).await);
    assert!(r.global);
    let fresh = level(&scope, "requests", 600.0, 98.0).await;
    assert!(
        (-10.0..10.0).contains(&fresh),
        "an empty start less this call, not less the local calls again: {fresh}"
    );
}
