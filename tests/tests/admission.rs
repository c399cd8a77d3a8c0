//! The shared budget against real Redis: atomic multi-dimension reservations, FIFO slots,
//! idempotent settling, exact refunds, fleet pauses, and the fail-closed fallback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmq_mock_provider::{Limits as MockLimits, MockConfig};
use llmq_producer_sdk::{ChatMessage, JobState, NewJob};
use llmq_tests::{redis_url, spawn_app_with, AppOptions};
use llmq_worker::admission::{Admission, Admit, Scope};
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
    let p = s.providers.get_mut("openai").unwrap();
    p.rate_limit = Some(limits);
    p.refund_unused = refund;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_budget_learns_the_accounts_count_from_headers_less_what_it_has_not_seen() {
    // 600 RPM per second, 900k TPM over a minute; no state in Redis.
    let admission = Admission::new(&settings(limits(600, 900_000), false)).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    // The first call starts from an empty bucket (nothing is known yet): its 5,000
    // tokens wait a third of a second for room (paced)...
    let (wait, first) = go(admission.acquire(&scope, scope.demand(4_000, 1_000)).await);
    assert!(wait >= Duration::from_millis(300), "{wait:?}");
    // ...and two more are admitted before its answer arrives.
    let (_, second) = go(admission.acquire(&scope, scope.demand(4_000, 1_000)).await);
    let (_, _third) = go(admission.acquire(&scope, scope.demand(4_000, 1_000)).await);
    let empty = level(&scope, "tokens", 900_000.0, 900_000.0).await;
    assert!(empty < 0.0, "started full: {empty}");
    // The first call's answer: the idle account has 599 of 600 requests and 895,000 of
    // 900,000 tokens left of the minute after it.
    let headers = Remaining {
        requests: Some(599),
        tokens: Some(895_000),
        limits: [Some(600), Some(900_000), None, None],
        ..Default::default()
    };
    let seen = scope.seen(&headers);
    // The request bucket holds a second's worth: a minute's count cannot say how much
    // of its second is left, so it takes nothing.
    assert_eq!(seen, vec![None, Some(895_000)]);
    admission
        .settle(&first, &[1, 5_000], &seen, Duration::from_millis(300))
        .await;
    // Learned: the account's count, less the 10,000 admitted after that call (the
    // provider had not seen them), a quarter second's worth (15,000 a second) and the
    // largest call admitted (5,000) for calls admitted just before it that may have
    // reached it later.
    let l = level(&scope, "tokens", 900_000.0, 900_000.0).await;
    assert!(
        (875_000.0..=880_000.0).contains(&l),
        "tokens level after learning: {l}"
    );
    assert!(level(&scope, "requests", 600.0, 10.0).await < 1.0);
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
async fn a_429_drains_only_the_dimension_it_names() {
    let admission = Admission::new(&settings(limits(600, 900_000), false)).unwrap();
    let scope = admission.scope("openai", "gpt-4o-mini").unwrap();
    // A paced call (its 5,000 tokens waited for room) whose answer sets the tokens.
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
    assert!(level(&scope, "requests", 600.0, 10.0).await <= 0.5);
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
    // 2,000 tokens at 1,000/s from an empty bucket: about 2 s, not at once.
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
        // A second's worth less the 0.1 s calls may leave late: 588 * 0.9 / 60.
        (scope.dims[0].burst - 8.82).abs() < 1e-6,
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
