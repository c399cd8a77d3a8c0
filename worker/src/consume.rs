//! The worker loop: consume → decide → call provider → classify → record → ack.
//!
//! Flow of one delivery ([`Worker::process_one`]):
//! 1. decode the envelope; malformed or unknown version → dead-letter with the reason.
//! 2. read the job's record: unknown id → dead-letter; already terminal (a redelivery) →
//!    ack without calling the provider.
//! 3. deadline passed → `expired`.
//! 4. claim (`running`, attempt counted), call the provider, classify the outcome.
//! 5. record the outcome durably (result or evidence), then: success → publish result
//!    event; retryable → park in a delay queue; fatal/exhausted → dead-letter. Ack last.
//!
//! A store failure never drops a message: the step is retried with backoff; if the worker
//! must stop first, the message is left unacked and the broker hands it to another worker.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use llmq_producer_sdk::{
    CompletionResult, ErrorSummary, JobEnvelope, JobEvent, JobState, Route, Topology,
};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::admission::{self, Admission, Admit};
use crate::breaker::{Breaker, Permit, Signal};
use crate::outcome::{classify, ErrorClass, Failure, Outcome};
use crate::provider::{self, CallError, Observer, Provider, Remaining};
use crate::publish::{with_header, Publisher};
use crate::retry;
use crate::settings::Settings;
use crate::store::{self, AttemptRecord, Transition};

/// What happened to one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// Result recorded and published.
    Succeeded,
    /// Parked for another attempt.
    Retrying {
        /// Error class of the failed attempt.
        class: &'static str,
        /// Delay tier, seconds.
        delay_secs: u64,
    },
    /// Failed for good and dead-lettered.
    Failed {
        /// Error class.
        class: &'static str,
    },
    /// Deadline passed before it ran.
    Expired,
    /// A redelivery of a finished job: acked, no provider call.
    AlreadyFinished,
    /// Its budget slot was too far away: back to the queue through a delay queue.
    Deferred,
    /// A second copy of a job another delivery is running: acked, no provider call.
    Duplicate,
    /// Not a job this worker can run: dead-lettered with the reason.
    DeadLettered {
        /// Why.
        reason: String,
    },
    /// Left unacked for the broker to hand to another worker (shutdown mid-step).
    HandedBack,
}

/// Everything needed to process deliveries on one broker connection.
pub struct Worker {
    pool: PgPool,
    publisher: Publisher,
    providers: Arc<BTreeMap<String, Arc<dyn Provider>>>,
    default_provider: String,
    retry_base: Duration,
    retry_cap: Duration,
    /// Cancelled when the drain deadline passes: store retries give up and hand back.
    hard_stop: CancellationToken,
    admission: Arc<Admission>,
    breaker: Arc<Breaker>,
    live: crate::live::LiveText,
    cancels: Arc<crate::live::Cancels>,
    metrics: Arc<crate::metrics::Metrics>,
    held: Arc<Held>,
    owed: Arc<OwedEvents>,
    claim_lead: Arc<ClaimLead>,
}

/// Terminal events whose publish failed (the broker was away when the job ended): sent
/// again by the sweep once a channel works, so a job that finished during a broker
/// restart still gets its one terminal event. Kept across broker sessions, in memory
/// (a replica that dies loses them; the record holds every outcome), at most
/// [`OwedEvents::MAX`].
#[derive(Default)]
struct OwedEvents(std::sync::Mutex<Vec<JobEvent>>);

impl OwedEvents {
    const MAX: usize = 100_000;

    fn push(&self, event: JobEvent) {
        if let Ok(mut owed) = self.0.lock() {
            if owed.len() < Self::MAX {
                owed.push(event);
            }
        }
    }

    fn take(&self) -> Vec<JobEvent> {
        self.0
            .lock()
            .map(|mut owed| std::mem::take(&mut *owed))
            .unwrap_or_default()
    }

    /// Publishes what is owed; what still fails stays owed.
    async fn settle(&self, publisher: &Publisher) {
        let owed = self.take();
        if owed.is_empty() {
            return;
        }
        let n = owed.len();
        let mut sent = 0;
        for event in owed {
            match publisher.event(&event).await {
                Ok(()) => sent += 1,
                Err(_) => self.push(event),
            }
        }
        info!(
            sent,
            of = n,
            "published terminal events owed since the broker was away"
        );
    }
}

/// The jobs whose deliveries this replica is working on, for the repair sweep's
/// heartbeat ([`store::touch_held`]).
#[derive(Default)]
struct Held(std::sync::Mutex<BTreeMap<uuid::Uuid, usize>>);

impl Held {
    fn hold(self: &Arc<Self>, id: uuid::Uuid) -> HeldGuard {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(id).or_default() += 1;
        }
        HeldGuard(self.clone(), id)
    }

    fn ids(&self) -> Vec<uuid::Uuid> {
        self.0
            .lock()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }
}

/// Drops the job from [`Held`] when its delivery is done (or its task panicked).
struct HeldGuard(Arc<Held>, uuid::Uuid);

impl Drop for HeldGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.0 .0.lock() {
            if let Some(n) = m.get_mut(&self.1) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.1);
                }
            }
        }
    }
}

/// Which of a job's routes a message is on, and the attempt number where that route
/// began (each route gets `max_attempts` of its own). Carried in message headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RouteCursor {
    idx: usize,
    start: u32,
}

impl RouteCursor {
    fn of(delivery: &Delivery, routes: usize) -> Self {
        let get = |name: &str| {
            delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(name))
                .and_then(|v| match v {
                    AMQPValue::LongUInt(n) => Some(*n),
                    AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
                    _ => None,
                })
        };
        let idx = usize::try_from(get("x-llmq-route").unwrap_or(0))
            .unwrap_or(0)
            .min(routes.saturating_sub(1));
        Self {
            idx,
            start: get("x-llmq-route-start").unwrap_or(0),
        }
    }

    fn stamp(self, props: lapin::BasicProperties) -> lapin::BasicProperties {
        let props = with_header(
            &props,
            "x-llmq-route",
            AMQPValue::LongUInt(u32::try_from(self.idx).unwrap_or(0)),
        );
        with_header(
            &props,
            "x-llmq-route-start",
            AMQPValue::LongUInt(self.start),
        )
    }
}

/// How many times a job was sent back to the queue because its budget slot was too far.
const DEFERRALS_HEADER: &str = "x-llmq-deferrals";

/// The furthest slot a job that was sent back for budget accepts: its wait doubles each
/// time up to this, well inside RabbitMQ's default 30-minute consumer timeout.
const MAX_GROWN_WAIT: Duration = Duration::from_secs(15 * 60);

/// The furthest budget slot a job accepts after it was sent back `deferrals` times:
/// `max_wait` (at least 1 s), doubled each time, up to [`MAX_GROWN_WAIT`] (or `max_wait`
/// when that is longer). A large job therefore gets a slot behind steady small ones.
fn grown_max_wait(max_wait: Duration, deferrals: u32) -> Duration {
    let base = max_wait.max(Duration::from_secs(1));
    base.saturating_mul(1 << deferrals.min(16))
        .min(MAX_GROWN_WAIT.max(base))
}

/// A small count carried in a message header (0 when absent or not a count).
fn header_u32(delivery: &Delivery, name: &str) -> u32 {
    match delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
    {
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

/// How long before its budget slot a job is claimed, so the call leaves at the slot: a
/// decaying estimate of the claim's time (twice it, 5..250 ms).
#[derive(Default)]
struct ClaimLead(std::sync::atomic::AtomicU64);

impl ClaimLead {
    fn get(&self) -> Duration {
        let us = self.0.load(std::sync::atomic::Ordering::Relaxed);
        Duration::from_micros(us.saturating_mul(2))
            .clamp(Duration::from_millis(5), Duration::from_millis(250))
    }

    fn observe(&self, took: Duration) {
        let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let _ = self.0.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |old| {
                Some(if took > old {
                    took
                } else {
                    old - (old - took) / 8
                })
            },
        );
    }
}

/// How many times the broker has had this message back (`x-delivery-count`, set by
/// quorum queues on redeliveries).
fn delivery_count(delivery: &Delivery) -> i64 {
    let value = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned());
    match value {
        Some(AMQPValue::LongLongInt(n)) => n,
        Some(AMQPValue::LongInt(n)) => i64::from(n),
        Some(AMQPValue::LongUInt(n)) => i64::from(n),
        Some(AMQPValue::ShortInt(n)) => i64::from(n),
        Some(AMQPValue::ShortUInt(n)) => i64::from(n),
        Some(AMQPValue::ShortShortInt(n)) => i64::from(n),
        Some(AMQPValue::ShortShortUInt(n)) => i64::from(n),
        Some(AMQPValue::Timestamp(n)) => i64::try_from(n).unwrap_or(i64::MAX),
        _ => 0,
    }
}

impl Worker {
    /// [`Worker::process_one`] behind a guard: if the job's task panics anyway, its
    /// delivery is handed back to the broker (and failed as `undeliverable` if it keeps
    /// coming back), the panic is counted and logged, and the slot is freed, so a replica
    /// never stalls while looking healthy.
    pub async fn process_guarded(&self, delivery: Delivery) -> Processed {
        struct InFlight<'a>(&'a prometheus_client::metrics::gauge::Gauge);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        self.metrics.in_flight.inc();
        let _in_flight = InFlight(&self.metrics.in_flight);
        let acker = delivery.acker.clone();
        match std::panic::AssertUnwindSafe(self.process_one(delivery))
            .catch_unwind()
            .await
        {
            Ok(Processed::HandedBack) if !self.hard_stop.is_cancelled() => {
                // Not a shutdown: give the message back now rather than when the channel
                // closes (a no-op if it was already acked or nacked).
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                let _ = acker.nack(requeue).await;
                Processed::HandedBack
            }
            Ok(done) => done,
            Err(panic) => {
                self.metrics.panics.inc();
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(panic = %what, "a job's task panicked; its delivery goes back to the broker");
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                if let Err(e) = acker.nack(requeue).await {
                    warn!(error = %e, "nack after a panic failed; the broker redelivers when the channel closes");
                }
                Processed::HandedBack
            }
        }
    }

    /// Processes one delivery to the end, acking it unless it is handed back.
    pub async fn process_one(&self, delivery: Delivery) -> Processed {
        let envelope = match JobEnvelope::decode(&delivery.data) {
            Ok(e) => e,
            Err(err) => return self.undecodable(delivery, &err).await,
        };
        let span = tracing::info_span!("job", job_id = %envelope.id, tenant = %envelope.tenant);
        self.process_envelope(delivery, envelope)
            .instrument(span)
            .await
    }

    async fn process_envelope(&self, delivery: Delivery, env: JobEnvelope) -> Processed {
        let id = env.id;
        let _held = self.held.hold(id.0);
        let Some(state) = self
            .durably("read job", || store::load_state(&self.pool, id))
            .await
        else {
            return Processed::HandedBack;
        };
        match state {
            None => {
                let reason = format!("job {id} has no record in the database; enqueue through the producer SDK or the HTTP API");
                return self.reject(delivery, &reason, "unknown_job").await;
            }
            Some(s) if s.is_terminal() => {
                info!(state = %s, "redelivery of a finished job; acking without a provider call");
                ack(&delivery).await;
                return Processed::AlreadyFinished;
            }
            Some(JobState::Running) if !delivery.redelivered => {
                info!("another delivery is running this job; acking this copy");
                ack(&delivery).await;
                return Processed::Duplicate;
            }
            Some(_) => {}
        }

        let returns = delivery_count(&delivery);
        if returns >= llmq_producer_sdk::topology::UNDELIVERABLE_AFTER {
            let message = format!(
                "its message came back {returns} times without an outcome (workers crashed, lost their connection or drained while holding it); failed so it stops cycling; once the cause is fixed: llmq dlq replay {id}"
            );
            if !self
                .end_without_call(&env, JobState::Failed, "undeliverable", &message)
                .await
            {
                return Processed::HandedBack;
            }
            return self.reject(delivery, &message, "undeliverable").await;
        }

        if env.deadline.is_some_and(|d| d <= Utc::now()) {
            let message = "deadline passed before the job could run";
            if !self
                .end_without_call(&env, JobState::Expired, "expired", message)
                .await
            {
                return Processed::HandedBack;
            }
            ack(&delivery).await;
            return Processed::Expired;
        }

        // Route: the first of the job's routes, from the one this message is on, whose
        // circuit is closed. No route open: wait for the circuit without spending an attempt.
        let routes: Vec<Route> = std::iter::once(env.route.clone())
            .chain(env.fallbacks.iter().cloned())
            .collect();
        let mut cursor = RouteCursor::of(&delivery, routes.len());
        let mut fell_back = false;
        let (route, provider_name, provider, permit) = loop {
            let route = routes[cursor.idx].clone();
            let name = route
                .provider
                .clone()
                .unwrap_or_else(|| self.default_provider.clone());
            let Some(provider) = self.providers.get(&name).cloned() else {
                let failure = Failure {
                    class: ErrorClass::BadRequest,
                    http_status: None,
                    error_type: None,
                    error_code: Some("unknown_provider".into()),
                    message: format!(
                        "provider `{name}` is not configured on this worker (have: {})",
                        self.providers
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    request_id: None,
                };
                return self.claim_and_fail(delivery, &env, failure).await;
            };
            match self.breaker.check(&name).await {
                permit @ Permit::Call(_) => break (route, name, provider, permit),
                Permit::Open(_) if cursor.idx + 1 < routes.len() => {
                    info!(provider = %name, "circuit open; taking the job's fallback route");
                    cursor.idx += 1;
                    fell_back = true;
                }
                Permit::Open(open_for) => {
                    return self
                        .wait_for_circuit(delivery, &env, &name, open_for, cursor)
                        .await
                }
            }
        };

        // Budget: reserve (1 request, estimated tokens) of this route's limits and wait
        // for the slot, claiming the job just before it starts so the call leaves at the
        // slot's instant (the spacing the budget gave calls is not lost to the claim's
        // write); make sure no fleet pause began meanwhile.
        let scope = self.admission.scope(&provider_name, &route.model);
        let mut reservation = None;
        let mut slot = tokio::time::Instant::now();
        if let Some(scope) = &scope {
            let prompt =
                admission::prompt_tokens(provider.kind(), &route.model, &env.request.messages);
            let amounts = scope.demand(prompt, u64::from(env.request.max_tokens.unwrap_or(0)));
            // A job sent back for budget before accepts a further slot each time, so a
            // large job is never deferred forever behind a stream of small ones.
            // Held below RabbitMQ's consumer timeout (30 min by default), which would
            // take the delivery back from under a waiting job.
            let deferrals = header_u32(&delivery, DEFERRALS_HEADER);
            let max_wait = grown_max_wait(self.admission.max_wait(), deferrals);
            loop {
                match self
                    .admission
                    .acquire_within(scope, amounts.clone(), max_wait)
                    .await
                {
                    Admit::TooLarge {
                        dim,
                        amount,
                        capacity,
                    } => {
                        let failure = Failure {
                            class: ErrorClass::RequestTooLarge,
                            http_status: None,
                            error_type: None,
                            error_code: Some("exceeds_rate_limit".into()),
                            message: format!(
                                "the job needs {amount} {dim} but the limit of {} holds at most {capacity}: it can never run under this limit; shorten the prompt or lower max_tokens",
                                scope.label
                            ),
                            request_id: None,
                        };
                        return self.claim_and_fail(delivery, &env, failure).await;
                    }
                    Admit::TooBusy { wait } => {
                        info!(
                            wait_s = wait.as_secs(),
                            deferrals, "budget slot too far away; back to the queue uncharged"
                        );
                        return self
                            .defer(delivery, &env, wait, cursor, deferrals.saturating_add(1))
                            .await;
                    }
                    Admit::Go {
                        wait,
                        reservation: r,
                    } => {
                        self.metrics
                            .budget_wait
                            .get_or_create(&vec![("provider", provider_name.clone())])
                            .observe(wait.as_secs_f64());
                        slot = tokio::time::Instant::now() + wait;
                        let lead = self.claim_lead.get();
                        if wait > lead.max(Duration::from_millis(50)) {
                            let start = at_after(wait);
                            let watch = self.cancels.watch(id.0);
                            match self
                                .durably("record budget wait", || {
                                    store::mark_waiting(&self.pool, id, start, delivery.redelivered)
                                })
                                .await
                            {
                                None => {
                                    self.admission.give_back(&r).await;
                                    return Processed::HandedBack;
                                }
                                Some(false) => {
                                    // Cancelled (or finished elsewhere) meanwhile.
                                    self.admission.give_back(&r).await;
                                    ack(&delivery).await;
                                    return Processed::AlreadyFinished;
                                }
                                Some(true) => {}
                            }
                            self.emit_progress(&env, JobState::WaitingBudget, 0);
                            tokio::select! {
                                () = self.hard_stop.cancelled() => {
                                    self.admission.give_back(&r).await;
                                    return Processed::HandedBack;
                                }
                                () = watch.token.cancelled() => {
                                    info!("cancelled while waiting for budget; reservation returned");
                                    self.admission.give_back(&r).await;
                                    ack(&delivery).await;
                                    return Processed::AlreadyFinished;
                                }
                                () = tokio::time::sleep_until(slot - lead) => {}
                            }
                            let paused = self.admission.pause_left(scope).await;
                            if !paused.is_zero() {
                                // A 429 paused the fleet while we waited: this slot is void.
                                self.admission.give_back(&r).await;
                                tokio::select! {
                                    () = self.hard_stop.cancelled() => return Processed::HandedBack,
                                    () = watch.token.cancelled() => {
                                        ack(&delivery).await;
                                        return Processed::AlreadyFinished;
                                    }
                                    () = tokio::time::sleep(paused) => {}
                                }
                                continue;
                            }
                        }
                        reservation = Some(r);
                        break;
                    }
                }
            }
        }

        if env.deadline.is_some_and(|d| d <= Utc::now()) {
            // The budget wait outlasted the deadline: the slot goes back unused.
            if let Some(r) = &reservation {
                self.admission.give_back(r).await;
            }
            let message = "deadline passed while the job waited for rate-limit budget";
            if !self
                .end_without_call(&env, JobState::Expired, "expired", message)
                .await
            {
                return Processed::HandedBack;
            }
            ack(&delivery).await;
            return Processed::Expired;
        }

        // A cap on calls in flight (when the limits have one): wait for a slot under it
        // before the claim, so a job that waits here spends no attempt. A call that
        // waited leaves out of its admission order, so its answer's headers are not
        // taken as the provider's count.
        let leasing = Instant::now();
        let lease = match &scope {
            Some(sc) => tokio::select! {
                l = self.admission.lease(sc) => l,
                () = self.hard_stop.cancelled() => {
                    if let Some(r) = &reservation {
                        self.admission.give_back(r).await;
                    }
                    return Processed::HandedBack;
                }
            },
            None => admission::Lease::None,
        };
        let in_order = leasing.elapsed() < Duration::from_millis(100);

        let redelivered = delivery.redelivered;
        let claiming = Instant::now();
        let Some(claimed) = self
            .durably("claim job", || store::claim(&self.pool, id, redelivered))
            .await
        else {
            if let Some(r) = &reservation {
                self.admission.give_back(r).await;
            }
            self.admission.release(lease).await;
            return Processed::HandedBack;
        };
        self.claim_lead.observe(claiming.elapsed());
        let Some(attempt) = claimed else {
            if let Some(r) = &reservation {
                self.admission.give_back(r).await;
            }
            self.admission.release(lease).await;
            info!("another delivery owns this job, or it just finished; acking this copy");
            ack(&delivery).await;
            return Processed::Duplicate;
        };
        if reservation.is_some() {
            tokio::time::sleep_until(slot).await;
            self.metrics
                .send_lateness
                .get_or_create(&vec![("provider", provider_name.clone())])
                .observe(slot.elapsed().as_secs_f64());
        }

        if fell_back {
            cursor.start = attempt - 1;
        }
        let started_at = Utc::now();
        let clock = Instant::now();
        self.emit_progress(&env, JobState::Running, attempt);
        // The text is relayed as it is written; all of it is out before the outcome is
        // recorded, so a reader that sees the outcome has seen the whole text.
        let relay = self.live.relay(id.0, attempt);
        // A streamed answer's rate-limit headers reach the budget as soon as its head
        // arrives, not when its text is over.
        let mut learned = false;
        let result = {
            let (head_tx, mut head_rx) = tokio::sync::oneshot::channel::<Remaining>();
            let head_tx = std::sync::Mutex::new(Some(head_tx));
            let on_head = |r: &Remaining| {
                if let Some(tx) = head_tx.lock().ok().and_then(|mut t| t.take()) {
                    let _ = tx.send(*r);
                }
            };
            let on_text = |t: &str| relay.push(t);
            let observer = Observer {
                text: &on_text,
                head: &on_head,
            };
            let call = self.admission.holding(
                &lease,
                provider.complete(&route.model, &env.request, &observer),
            );
            tokio::pin!(call);
            loop {
                tokio::select! {
                    out = &mut call => break out,
                    Ok(head) = &mut head_rx, if !learned && in_order => {
                        learned = true;
                        if let Some(r) = &reservation {
                            let seen = r.scope.seen(&head);
                            self.admission.learn(r, &seen, clock.elapsed()).await;
                        }
                    }
                }
            }
        };
        self.admission.release(lease).await;
        relay.finish().await;
        let latency_ms = u32::try_from(clock.elapsed().as_millis()).unwrap_or(u32::MAX);
        // What the provider's headers say is left, per dimension of the scope (a 429's
        // too: they say which limit ran out).
        let remaining: Vec<Option<u64>> = scope.as_ref().map_or_else(Vec::new, |sc| {
            let r = match &result {
                Ok(reply) => Some(&reply.remaining),
                Err(CallError::Http { remaining, .. }) => Some(&**remaining),
                Err(_) => None,
            };
            r.map_or_else(|| vec![None; sc.dims.len()], |r| sc.seen(r))
        });
        if let Some(r) = &reservation {
            let n = r.amounts.len();
            let (actual, seen): (Vec<u64>, &[Option<u64>]) = match &result {
                Ok(reply) if learned || !in_order => (r.scope.actual(&reply.usage), &[]),
                Ok(reply) => (r.scope.actual(&reply.usage), &remaining),
                // Never reached the provider, or refused by its limiter: give it back.
                Err(CallError::Connect(_)) | Err(CallError::Http { status: 429, .. }) => {
                    (vec![0; n], &[])
                }
                Err(_) => (r.amounts.clone(), &[]),
            };
            self.admission
                .settle(r, &actual, seen, clock.elapsed())
                .await;
        }
        let mut evidence = AttemptRecord {
            attempt,
            started_at,
            provider: provider.name().to_owned(),
            base_url_host: provider.host().to_owned(),
            endpoint: provider.endpoint().to_owned(),
            model: route.model.clone(),
            http_status: None,
            outcome: "succeeded",
            error_class: None,
            failed_layer: None,
            error_type: None,
            error_code: None,
            error_message: None,
            provider_request_id: None,
            latency_ms,
            prompt_tokens: None,
            completion_tokens: None,
        };

        let outcome = classify(result);
        let circuit = self
            .breaker
            .record_call(
                permit,
                &provider_name,
                match &outcome {
                    Outcome::Succeeded(_) => Signal::Success,
                    Outcome::RetryAfter(_, f) | Outcome::Fatal(f) => Signal::of(f.class),
                },
            )
            .await;
        self.count_call(&provider_name, &outcome, latency_ms, circuit.as_deref());
        let on_route = attempt - cursor.start;
        match outcome {
            Outcome::Succeeded(reply) => {
                evidence.http_status = Some(reply.status);
                evidence.provider_request_id.clone_from(&reply.request_id);
                evidence.prompt_tokens = Some(reply.usage.prompt_tokens);
                evidence.completion_tokens = Some(reply.usage.completion_tokens);
                let result = CompletionResult {
                    content: reply.content,
                    finish_reason: reply.finish_reason,
                    provider: provider.name().to_owned(),
                    model: reply.model,
                    provider_request_id: reply.request_id,
                    usage: reply.usage,
                };
                let t = Transition {
                    state: JobState::Succeeded,
                    attempt,
                    result: Some(&result),
                    error: None,
                    evidence: Some(&evidence),
                    detail: None,
                };
                match self
                    .durably("record result", || store::record(&self.pool, id, &t))
                    .await
                {
                    None => return Processed::HandedBack,
                    Some(false) => return superseded(&delivery).await,
                    Some(true) => {}
                }
                info!(
                    attempt,
                    latency_ms,
                    tokens = result.usage.total_tokens,
                    "job succeeded"
                );
                self.emit(&env, JobState::Succeeded, attempt, Some(result), None)
                    .await;
                ack(&delivery).await;
                Processed::Succeeded
            }
            Outcome::RetryAfter(after, failure)
                if failure.class == ErrorClass::RateLimited
                    && scope.is_some()
                    && on_route < env.max_attempts =>
            {
                if let Some(scope) = &scope {
                    self.metrics
                        .fleet_pauses
                        .get_or_create(&vec![("provider", provider_name.clone())])
                        .inc();
                    let drain =
                        scope.exceeded(failure.error_type.as_deref(), &failure.message, &remaining);
                    self.admission
                        .pause_for(
                            scope,
                            after.unwrap_or(Duration::from_secs(1)),
                            &drain,
                            &remaining,
                        )
                        .await;
                }
                self.retry(delivery, &env, after, failure, evidence, cursor)
                    .await
            }
            Outcome::RetryAfter(after, failure) if on_route < env.max_attempts => {
                self.retry(delivery, &env, after, failure, evidence, cursor)
                    .await
            }
            Outcome::RetryAfter(_, failure) | Outcome::Fatal(failure)
                if cursor.idx + 1 < routes.len()
                    && (failure.class.is_retryable() || failure.class.route_cannot_serve()) =>
            {
                // Retries exhausted on this route, or the route cannot serve: next route.
                let next = RouteCursor {
                    idx: cursor.idx + 1,
                    start: attempt,
                };
                self.retry(
                    delivery,
                    &env,
                    Some(Duration::ZERO),
                    failure,
                    evidence,
                    next,
                )
                .await
            }
            Outcome::RetryAfter(_, failure) | Outcome::Fatal(failure) => {
                self.fail(delivery, &env, attempt, failure, Some(evidence))
                    .await
            }
        }
    }

    async fn retry(
        &self,
        delivery: Delivery,
        env: &JobEnvelope,
        after: Option<Duration>,
        failure: Failure,
        mut evidence: AttemptRecord,
        cursor: RouteCursor,
    ) -> Processed {
        let id = env.id;
        let attempt = evidence.attempt;
        {
            fill_failure(&mut evidence, &failure, "retry");
            let mut wait = retry::delay(attempt, after, self.retry_base, self.retry_cap);
            // The provider's circuit is open: it, not this job's backoff, decides when calls
            // resume, so the job need not wait longer than the circuit (a probe that failed
            // in a long outage would otherwise sit out a backoff grown past the outage).
            if after.is_none() && Signal::of(failure.class) == Signal::Failure {
                let circuit = self.breaker.state(&evidence.provider).await;
                if circuit.state == "open" || circuit.state == "half_open" {
                    wait = wait.min(Duration::from_millis(circuit.open_ms_left.max(1000)));
                }
            }
            let tier = Topology::delay_tier(wait);
            self.metrics
                .retries
                .get_or_create(&vec![("class", failure.class.as_str().to_owned())])
                .inc();
            let next_at = at_after(Duration::from_secs(tier));
            let t = Transition {
                state: JobState::Retrying,
                attempt,
                result: None,
                error: Some((failure.class.as_str(), &failure.message)),
                evidence: Some(&evidence),
                detail: Some(
                    serde_json::json!({ "next_attempt_at": next_at, "error_class": failure.class.as_str() }),
                ),
            };
            match self
                .durably("record retry", || store::record(&self.pool, id, &t))
                .await
            {
                None => return Processed::HandedBack,
                Some(false) => return superseded(&delivery).await,
                Some(true) => {}
            }
            warn!(
                attempt,
                class = failure.class.as_str(),
                delay_s = tier,
                "attempt failed; retrying later"
            );
            let props = cursor.stamp(with_header(
                &delivery.properties,
                "x-llmq-attempt",
                AMQPValue::LongUInt(attempt),
            ));
            self.park(&delivery, props, tier).await;
            self.emit(
                env,
                JobState::Retrying,
                attempt,
                None,
                Some((failure.class.as_str(), &failure.message)),
            )
            .await;
            Processed::Retrying {
                class: failure.class.as_str(),
                delay_secs: tier,
            }
        }
    }

    /// Sends a job whose budget slot is too far away back through a delay queue, uncharged
    /// and without spending an attempt. Its record says `retrying` first: a job taken over
    /// from a dead holder is `running`, and a re-published copy of a `running` job would be
    /// acked as a duplicate on its next delivery.
    async fn defer(
        &self,
        delivery: Delivery,
        env: &JobEnvelope,
        wait: Duration,
        cursor: RouteCursor,
        deferrals: u32,
    ) -> Processed {
        let tier = Topology::delay_tier(wait.min(Duration::from_secs(60)));
        let next_at = at_after(Duration::from_secs(tier));
        let redelivered = delivery.redelivered;
        match self
            .durably("record deferral", || {
                store::defer(&self.pool, env.id, next_at, redelivered)
            })
            .await
        {
            None => return Processed::HandedBack,
            Some(false) => return superseded(&delivery).await,
            Some(true) => {}
        }
        self.emit_progress(env, JobState::Retrying, 0);
        let props = with_header(
            &delivery.properties,
            DEFERRALS_HEADER,
            AMQPValue::LongUInt(deferrals),
        );
        self.park(&delivery, cursor.stamp(props), tier).await;
        Processed::Deferred
    }

    /// Moves the message to the delay queue of `tier` and acks it; if the broker will not
    /// take the copy, the message is requeued instead (it comes back at once, not lost).
    async fn park(&self, delivery: &Delivery, props: lapin::BasicProperties, tier: u64) {
        match self
            .publisher
            .retry_later(&delivery.data, props, tier)
            .await
        {
            Ok(()) => ack(delivery).await,
            Err(e) => {
                warn!(error = %e, "could not park the message in a delay queue; requeueing it instead");
                nack(delivery, true).await;
            }
        }
    }

    /// Parks a job whose only remaining route has an open circuit, spending no attempt.
    async fn wait_for_circuit(
        &self,
        delivery: Delivery,
        env: &JobEnvelope,
        provider: &str,
        open_for: Duration,
        cursor: RouteCursor,
    ) -> Processed {
        // Back about when the circuit may let calls through again, not a tier later.
        let tier = Topology::recheck_tier(open_for);
        self.metrics
            .retries
            .get_or_create(&vec![("class", "circuit_open".to_owned())])
            .inc();
        self.metrics.circuit_seen(provider, "open");
        let message = format!("the circuit of provider `{provider}` is open (it has been failing); next try in {tier} s");
        let t = Transition {
            state: JobState::Retrying,
            attempt: 0,
            result: None,
            error: Some(("circuit_open", &message)),
            evidence: None,
            detail: Some(serde_json::json!({
                "error_class": "circuit_open",
                "provider": provider,
                "route": cursor.idx,
                "next_attempt_at": at_after(Duration::from_secs(tier)),
            })),
        };
        match self
            .durably("record circuit wait", || {
                store::record(&self.pool, env.id, &t)
            })
            .await
        {
            None => return Processed::HandedBack,
            Some(false) => return superseded(&delivery).await,
            Some(true) => {}
        }
        self.emit_progress(env, JobState::Retrying, 0);
        self.park(&delivery, cursor.stamp(delivery.properties.clone()), tier)
            .await;
        Processed::Retrying {
            class: "circuit_open",
            delay_secs: tier,
        }
    }

    /// Counts an attempt for a job that fails before any provider call, then fails it.
    async fn claim_and_fail(
        &self,
        delivery: Delivery,
        env: &JobEnvelope,
        failure: Failure,
    ) -> Processed {
        let id = env.id;
        let redelivered = delivery.redelivered;
        let Some(claimed) = self
            .durably("claim job", || store::claim(&self.pool, id, redelivered))
            .await
        else {
            return Processed::HandedBack;
        };
        let Some(attempt) = claimed else {
            ack(&delivery).await;
            return Processed::Duplicate;
        };
        self.fail(delivery, env, attempt, failure, None).await
    }

    async fn fail(
        &self,
        delivery: Delivery,
        env: &JobEnvelope,
        attempt: u32,
        failure: Failure,
        evidence: Option<AttemptRecord>,
    ) -> Processed {
        let mut evidence = evidence;
        if let Some(ev) = evidence.as_mut() {
            fill_failure(ev, &failure, "fatal");
        }
        let t = Transition {
            state: JobState::Failed,
            attempt,
            result: None,
            error: Some((failure.class.as_str(), &failure.message)),
            evidence: evidence.as_ref(),
            detail: None,
        };
        match self
            .durably("record failure", || store::record(&self.pool, env.id, &t))
            .await
        {
            None => return Processed::HandedBack,
            Some(false) => return superseded(&delivery).await,
            Some(true) => {}
        }
        warn!(
            attempt,
            class = failure.class.as_str(),
            layer = failure.class.layer(),
            "job failed"
        );
        let reason = format!(
            "{} (layer {}): {}",
            failure.class.as_str(),
            failure.class.layer(),
            failure.message
        );
        if let Err(e) = self
            .publisher
            .dead_letter(
                &delivery.data,
                &delivery.properties,
                &reason,
                failure.class.as_str(),
            )
            .await
        {
            warn!(error = %e, "could not copy the failed job to the dead-letter queue; its record holds the evidence");
        }
        self.emit(
            env,
            JobState::Failed,
            attempt,
            None,
            Some((failure.class.as_str(), &failure.message)),
        )
        .await;
        ack(&delivery).await;
        Processed::Failed {
            class: failure.class.as_str(),
        }
    }

    /// A message that is not an envelope this build can run. If its job id can be read
    /// and the job has a live record that no delivery is running, the record is failed
    /// with the reason (so nothing waits for it forever), then the message is
    /// dead-lettered.
    async fn undecodable(
        &self,
        delivery: Delivery,
        err: &llmq_producer_sdk::DecodeError,
    ) -> Processed {
        let class = match err {
            llmq_producer_sdk::DecodeError::UnsupportedVersion(_) => "unsupported_version",
            _ => "malformed",
        };
        let reason = err.to_string();
        let id = serde_json::from_slice::<serde_json::Value>(&delivery.data)
            .ok()
            .and_then(|v| {
                v.get("id")?
                    .as_str()?
                    .parse::<llmq_producer_sdk::JobId>()
                    .ok()
            });
        let running = match id {
            Some(id) => match self
                .durably("read job", || store::load_state(&self.pool, id))
                .await
            {
                None => return Processed::HandedBack,
                Some(state) => state == Some(JobState::Running),
            },
            None => false,
        };
        if let Some(id) = id.filter(|_| !running) {
            let message = format!("the worker cannot read this job's message: {reason}");
            let t = Transition {
                state: JobState::Failed,
                attempt: 0,
                result: None,
                error: Some((class, &message)),
                evidence: None,
                detail: None,
            };
            let recorded = self
                .durably("record undecodable job", || {
                    store::record_if_exists(&self.pool, id, &t)
                })
                .await;
            match recorded {
                None => return Processed::HandedBack,
                Some(Some(tenant)) => {
                    warn!(job_id = %id, class, "failed a job whose message cannot be decoded");
                    self.emit_to(
                        id,
                        &tenant,
                        JobState::Failed,
                        0,
                        None,
                        Some((class, &message)),
                    )
                    .await;
                }
                Some(None) => {}
            }
        }
        self.reject(delivery, &reason, class).await
    }

    /// Dead-letters a message this worker cannot run, then acks it.
    async fn reject(&self, delivery: Delivery, reason: &str, class: &str) -> Processed {
        warn!(reason, "dead-lettering a message");
        match self
            .publisher
            .dead_letter(&delivery.data, &delivery.properties, reason, class)
            .await
        {
            Ok(()) => ack(&delivery).await,
            // The queue's own dead-letter route keeps the message, without the reason.
            Err(_) => nack(&delivery, false).await,
        }
        Processed::DeadLettered {
            reason: reason.to_owned(),
        }
    }

    async fn emit(
        &self,
        env: &JobEnvelope,
        state: JobState,
        attempt: u32,
        result: Option<CompletionResult>,
        error: Option<(&str, &str)>,
    ) {
        self.emit_to(env.id, &env.tenant, state, attempt, result, error)
            .await;
    }

    /// Publishes a transition of job `id` of `tenant` (counting it when terminal; a
    /// terminal event that cannot be published now is owed, [`OwedEvents`]).
    async fn emit_to(
        &self,
        id: llmq_producer_sdk::JobId,
        tenant: &str,
        state: JobState,
        attempt: u32,
        result: Option<CompletionResult>,
        error: Option<(&str, &str)>,
    ) {
        if state.is_terminal() {
            self.count_terminal(state, error.map_or("none", |(c, _)| c));
        }
        let event = JobEvent {
            result,
            error: error.map(|(c, m)| ErrorSummary {
                class: c.to_owned(),
                message: m.to_owned(),
            }),
            ..JobEvent::new(id, tenant.to_owned(), state, attempt)
        };
        if let Err(e) = self.publisher.event(&event).await {
            if state.is_terminal() {
                warn!(error = %e, "could not publish the job's terminal event; it is sent again once the broker is back");
                self.owed.push(event);
            } else {
                warn!(error = %e, "could not publish the job event; the record is durable");
            }
        }
    }

    /// Records a terminal `state` reached without a provider call (no attempt counted) and
    /// publishes it; false when the store stayed unreachable past the drain deadline.
    async fn end_without_call(
        &self,
        env: &JobEnvelope,
        state: JobState,
        class: &str,
        message: &str,
    ) -> bool {
        let t = Transition {
            state,
            attempt: 0,
            result: None,
            error: Some((class, message)),
            evidence: None,
            detail: None,
        };
        let what = format!("record {state}");
        match self
            .durably(&what, || store::record(&self.pool, env.id, &t))
            .await
        {
            None => false,
            // Already terminal: its terminal event was published by whoever ended it.
            Some(false) => true,
            Some(true) => {
                self.emit(env, state, 0, None, t.error).await;
                true
            }
        }
    }

    fn count_terminal(&self, state: JobState, class: &str) {
        self.metrics
            .jobs
            .get_or_create(&vec![
                ("state", state.to_string()),
                ("class", class.to_owned()),
            ])
            .inc();
    }

    /// Counts a provider call: outcome, class, latency, tokens, and the circuit as seen.
    fn count_call(
        &self,
        provider: &str,
        outcome: &Outcome,
        latency_ms: u32,
        circuit: Option<&str>,
    ) {
        let m = &self.metrics;
        let (result, class) = match outcome {
            Outcome::Succeeded(_) => ("succeeded", "none"),
            Outcome::RetryAfter(_, f) => ("retryable", f.class.as_str()),
            Outcome::Fatal(f) => ("fatal", f.class.as_str()),
        };
        m.calls
            .get_or_create(&vec![
                ("provider", provider.to_owned()),
                ("outcome", result.to_owned()),
                ("class", class.to_owned()),
            ])
            .inc();
        m.latency
            .get_or_create(&vec![("provider", provider.to_owned())])
            .observe(f64::from(latency_ms) / 1000.0);
        if let Outcome::Succeeded(reply) = outcome {
            for (kind, n) in [
                ("prompt", reply.usage.prompt_tokens),
                ("completion", reply.usage.completion_tokens),
            ] {
                m.tokens
                    .get_or_create(&vec![
                        ("provider", provider.to_owned()),
                        ("kind", kind.to_owned()),
                    ])
                    .inc_by(n);
            }
        }
        if let Some(state) = circuit {
            m.circuit_seen(provider, state);
        }
    }

    /// Publishes a non-terminal transition without waiting for the broker's confirm (the
    /// record in PostgreSQL is what counts; this is a courtesy to listeners).
    fn emit_progress(&self, env: &JobEnvelope, state: JobState, attempt: u32) {
        let event = JobEvent::new(env.id, env.tenant.clone(), state, attempt);
        let publisher = self.publisher.clone();
        tokio::spawn(async move {
            if let Err(e) = publisher.event(&event).await {
                tracing::debug!(error = %e, "could not publish a progress event");
            }
        });
    }

    /// Runs a store step until it succeeds, or returns `None` once the drain deadline passed,
    /// or at once when PostgreSQL refused the data itself (it will refuse it again): the
    /// delivery is then handed back, and failed as undeliverable if that keeps happening.
    async fn durably<T, F, Fut>(&self, what: &str, mut op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let mut pause = Duration::from_millis(100);
        loop {
            match op().await {
                Ok(v) => return Some(v),
                Err(e) if refused_data(&e) => {
                    tracing::error!(error = %e, step = what, "the database refused this job's data; handing the delivery back");
                    return None;
                }
                Err(e) => {
                    warn!(error = %e, step = what, "database step failed; retrying");
                    tokio::select! {
                        () = self.hard_stop.cancelled() => return None,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

fn fill_failure(ev: &mut AttemptRecord, f: &Failure, outcome: &'static str) {
    ev.outcome = outcome;
    ev.http_status = f.http_status;
    ev.error_class = Some(f.class.as_str());
    ev.failed_layer = Some(f.class.layer());
    ev.error_type.clone_from(&f.error_type);
    ev.error_code.clone_from(&f.error_code);
    ev.error_message = Some(f.message.clone());
    ev.provider_request_id.clone_from(&f.request_id);
}

/// A data or constraint error (SQLSTATE classes 22 and 23): this job's data, which
/// retrying cannot change. (Statement errors, class 42, come from the deployment, a
/// missing migration or privilege, and are retried until it is fixed.)
fn refused_data(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
}

/// The record moved on without this delivery (finished, cancelled, or taken over by a
/// redelivery elsewhere after this worker's broker connection dropped): nothing of this
/// attempt is recorded or published; the message is acked.
async fn superseded(delivery: &Delivery) -> Processed {
    info!("the job's record moved on without this delivery; acking it, publishing nothing");
    ack(delivery).await;
    Processed::Duplicate
}

/// `now + d`, saturating instead of overflowing.
fn at_after(d: Duration) -> chrono::DateTime<Utc> {
    let now = Utc::now();
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC)
}

async fn ack(d: &Delivery) {
    if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
        warn!(error = %e, "ack failed; the broker will redeliver and the redelivery is deduplicated");
    }
}

async fn nack(d: &Delivery, requeue: bool) {
    if let Err(e) = d
        .acker
        .nack(BasicNackOptions {
            requeue,
            ..Default::default()
        })
        .await
    {
        warn!(error = %e, "nack failed; the broker will redeliver");
    }
}

/// Runs the worker until `shutdown` is cancelled, reconnecting to the broker when the
/// connection drops. On shutdown: stop consuming, let in-flight jobs finish within the
/// grace period, hand the rest back (unacked) and return.
pub async fn run(
    settings: Settings,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut providers: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
    for (name, p) in &settings.providers {
        providers.insert(name.clone(), provider::build(name, p)?);
    }
    run_with(settings, pool, providers, shutdown).await
}

/// [`run`] with provider adapters of the caller's own (e.g. one that is not HTTP), by
/// the names jobs route to.
pub async fn run_with(
    settings: Settings,
    pool: PgPool,
    providers: BTreeMap<String, Arc<dyn Provider>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let providers = Arc::new(providers);
    let admission = Arc::new(Admission::new(&settings)?);
    let breaker = Arc::new(Breaker::new(&settings)?);
    let metrics = crate::metrics::Metrics::new();
    if let Some(bind) = settings
        .worker
        .metrics_bind
        .as_deref()
        .filter(|b| !b.is_empty())
    {
        crate::metrics::serve(bind, metrics.clone(), shutdown.child_token()).await?;
    }
    tokio::spawn(admission.clone().heartbeat(shutdown.child_token()));
    tokio::spawn(reload_on_sighup(
        settings.source.clone(),
        admission.clone(),
        shutdown.child_token(),
    ));
    let replica = Replica {
        providers,
        admission,
        breaker,
        metrics,
        owed: Arc::new(OwedEvents::default()),
    };
    let mut pause = Duration::from_millis(500);
    loop {
        match consume_session(&settings, &pool, &replica, &shutdown).await {
            Ok(()) => return Ok(()),
            Err(e) if shutdown.is_cancelled() => {
                warn!(error = %e, "broker error during shutdown");
                return Ok(());
            }
            Err(e) => {
                warn!(
                    error = %e,
                    retry_in_ms = pause.as_millis() as u64,
                    "no broker session (RabbitMQ down or unreachable? `bash scripts/services.sh` starts it locally); reconnecting"
                );
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// What a replica keeps across broker sessions.
struct Replica {
    providers: Arc<BTreeMap<String, Arc<dyn Provider>>>,
    admission: Arc<Admission>,
    breaker: Arc<Breaker>,
    metrics: Arc<crate::metrics::Metrics>,
    owed: Arc<OwedEvents>,
}

async fn consume_session(
    settings: &Settings,
    pool: &PgPool,
    replica: &Replica,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let Replica {
        providers,
        admission,
        breaker,
        metrics,
        owed,
    } = replica;
    let topology = Topology::new(settings.queue_prefix.clone());
    let connection =
        llmq_producer_sdk::connect_amqp(settings.amqp_url.expose_secret(), "llmq-worker").await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    channel
        .basic_qos(settings.worker.concurrency, BasicQosOptions::default())
        .await?;
    let publisher = Publisher::new(&connection, topology.clone()).await?;
    let hard_stop = CancellationToken::new();
    // Background listeners of this session stop with it.
    let listeners = CancellationToken::new();
    let _stop_listeners = listeners.clone().drop_guard();
    let worker = Arc::new(Worker {
        pool: pool.clone(),
        publisher,
        providers: providers.clone(),
        default_provider: settings.default_provider.clone(),
        retry_base: Duration::from_millis(settings.worker.retry_base_ms),
        retry_cap: Duration::from_millis(settings.worker.retry_cap_ms),
        hard_stop: hard_stop.clone(),
        admission: admission.clone(),
        breaker: breaker.clone(),
        live: crate::live::LiveText::new(settings)?,
        cancels: crate::live::Cancels::start(&connection, &topology, listeners.clone()).await?,
        metrics: metrics.clone(),
        held: Arc::new(Held::default()),
        owed: owed.clone(),
        claim_lead: Arc::new(ClaimLead::default()),
    });
    let mut consumer = channel
        .basic_consume(
            &topology.work_queue(),
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(queue = %topology.work_queue(), concurrency = settings.worker.concurrency, "worker consuming");
    let tracker = TaskTracker::new();
    let session = shutdown.child_token();
    let connection = Arc::new(connection);
    let repair_after = Duration::from_secs(settings.worker.repair_after_secs.max(1));
    tokio::spawn(heartbeat(
        pool.clone(),
        worker.held.clone(),
        repair_after,
        listeners.clone(),
    ));
    tracker.spawn(sweep(
        pool.clone(),
        connection.clone(),
        topology.clone(),
        repair_after,
        owed.clone(),
        metrics.clone(),
        session.clone(),
    ));
    tracker.spawn(watch_queues(
        connection.create_channel().await?,
        topology.clone(),
        metrics.clone(),
        session.clone(),
    ));
    let result = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let worker = worker.clone();
                    tracker.spawn(async move { worker.process_guarded(delivery).await });
                }
                Some(Err(e)) => break Err(anyhow::Error::from(e)),
                None => break Err(anyhow::anyhow!("the broker closed the consumer")),
            }
        }
    };

    // Shutdown phases: (1) stop taking work; (2) let in-flight jobs finish within the
    // grace period; (3) past it, give up store retries so their messages stay unacked;
    // (4) close the channel, which hands every unacked message back to the broker.
    session.cancel();
    let _ = channel
        .basic_cancel(consumer.tag().as_str(), BasicCancelOptions::default())
        .await;
    tracker.close();
    let grace = Duration::from_secs(settings.worker.shutdown_grace_secs);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            in_flight = tracker.len(),
            "drain deadline passed; handing remaining jobs back to the queue"
        );
        hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    }
    let _ = channel.close(200, "worker stopping").await;
    let _ = connection.close(200, "worker stopping").await;
    info!("worker stopped");
    result
}

/// Every 5 s, the ready messages of the work and dead-letter queues, for the metrics.
async fn watch_queues(
    channel: lapin::Channel,
    topology: Topology,
    metrics: Arc<crate::metrics::Metrics>,
    stop: CancellationToken,
) {
    loop {
        for queue in [topology.work_queue(), topology.dead_queue()] {
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            if let Ok(q) = channel
                .queue_declare(&queue, passive, FieldTable::default())
                .await
            {
                metrics
                    .queue_messages
                    .get_or_create(&vec![("queue", queue.clone())])
                    .set(i64::from(q.message_count()));
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Every `repair_after / 3` (1..15 s), marks the jobs this replica holds as alive, so the
/// repair sweep never takes a slow job for lost ([`store::touch_held`]). Runs until the
/// broker session ends, drain included.
async fn heartbeat(pool: PgPool, held: Arc<Held>, repair_after: Duration, stop: CancellationToken) {
    let tick = (repair_after / 3).clamp(Duration::from_secs(1), Duration::from_secs(15));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
        }
        if let Err(e) = store::touch_held(&pool, &held.ids(), tick).await {
            warn!(error = %e, "could not mark held jobs as alive; will retry");
        }
    }
}

/// The sweeps that keep every live job moving, on their own confirm-mode channel:
/// - every tick, terminal events owed since the broker was away ([`OwedEvents`]);
/// - every 15 s, publishes jobs a producer recorded but never published (the outbox);
/// - every tick, republishes live jobs nobody touched for `repair_after` (their message
///   was lost), or fails them after a few losses ([`store::repair_lost`]); while the work
///   queue has a backlog, only jobs a dead replica held.
async fn sweep(
    pool: PgPool,
    connection: Arc<lapin::Connection>,
    topology: Topology,
    repair_after: Duration,
    owed: Arc<OwedEvents>,
    metrics: Arc<crate::metrics::Metrics>,
    stop: CancellationToken,
) {
    let tick = (repair_after / 3).clamp(Duration::from_secs(1), Duration::from_secs(15));
    let mut last_orphans = Instant::now();
    let mut link: Option<(lapin::Channel, Publisher)> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
        }
        if link.as_ref().is_none_or(|(ch, _)| !ch.status().connected()) {
            link = match sweep_channel(&connection, &topology).await {
                Ok(l) => Some(l),
                Err(e) => {
                    warn!(error = %e, "sweep: no broker channel; will retry");
                    continue;
                }
            };
        }
        let Some((channel, publisher)) = link.as_ref() else {
            continue;
        };
        owed.settle(publisher).await;
        if last_orphans.elapsed() >= Duration::from_secs(15) {
            last_orphans = Instant::now();
            match store::publish_orphans(&pool, channel, &topology, Duration::from_secs(30)).await {
                Ok(0) => {}
                Ok(n) => info!(jobs = n, "published jobs their producer left unpublished"),
                Err(e) => warn!(error = %e, "orphan sweep failed; will retry"),
            }
        }
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let ready = match channel
            .queue_declare(&topology.work_queue(), passive, FieldTable::default())
            .await
        {
            Ok(q) => q.message_count(),
            Err(e) => {
                warn!(error = %e, "sweep: cannot read the work queue's depth; will retry");
                continue;
            }
        };
        let repaired = store::repair_lost(
            &pool,
            channel,
            publisher,
            &topology,
            repair_after,
            ready > 0,
            100,
        )
        .await;
        match repaired {
            Ok((done, failed)) => {
                for (action, n) in [("republished", done.republished), ("failed", done.failed)] {
                    if n > 0 {
                        warn!(
                            jobs = n,
                            action,
                            quiet_s = repair_after.as_secs(),
                            "repaired live jobs whose message was lost"
                        );
                        metrics
                            .repaired
                            .get_or_create(&vec![("action", action.to_owned())])
                            .inc_by(n as u64);
                    }
                }
                for (id, tenant) in failed {
                    let event = JobEvent {
                        error: Some(ErrorSummary {
                            class: "lost".to_owned(),
                            message: "its message was lost too many times".to_owned(),
                        }),
                        ..JobEvent::new(id, tenant, JobState::Failed, 0)
                    };
                    if publisher.event(&event).await.is_err() {
                        owed.push(event);
                    }
                }
            }
            Err(e) => warn!(error = %e, "repair sweep failed; will retry"),
        }
    }
}

/// A confirm-mode channel for the sweeps' publishes, and a publisher for dead letters and
/// events.
async fn sweep_channel(
    connection: &lapin::Connection,
    topology: &Topology,
) -> Result<(lapin::Channel, Publisher), lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    let publisher = Publisher::new(connection, topology.clone()).await?;
    Ok((channel, publisher))
}

/// Re-reads the settings on SIGHUP and applies the new rate limits without a restart.
async fn reload_on_sighup(
    source: Option<std::path::PathBuf>,
    admission: Arc<Admission>,
    stop: CancellationToken,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = hup.recv() => {}
            }
            match Settings::load(source.as_deref()) {
                Ok(s) => admission.reload(&s),
                Err(e) => {
                    warn!(error = %e, "SIGHUP: settings not reloaded; keeping the current limits")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (source, admission);
        stop.cancelled().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_sent_back_for_budget_accepts_a_further_slot_each_time_up_to_a_cap() {
        let base = Duration::from_secs(5);
        assert_eq!(grown_max_wait(base, 0), base);
        assert_eq!(grown_max_wait(base, 1), Duration::from_secs(10));
        assert_eq!(grown_max_wait(base, 3), Duration::from_secs(40));
        // Capped inside RabbitMQ's consumer timeout, however often it came back (a
        // header from outside can say anything).
        assert_eq!(grown_max_wait(base, 8), MAX_GROWN_WAIT);
        assert_eq!(grown_max_wait(base, u32::MAX), MAX_GROWN_WAIT);
        // Never below the configured wait, nor below a second.
        assert_eq!(
            grown_max_wait(Duration::from_secs(3600), 2),
            Duration::from_secs(3600)
        );
        assert_eq!(grown_max_wait(Duration::ZERO, 0), Duration::from_secs(1));
    }
}
