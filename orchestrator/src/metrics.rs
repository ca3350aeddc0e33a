//! The orchestrator's Prometheus metrics. Names and labels live here only; labels
//! are bounded (saga type, step, direction, outcome, state, source, the matched
//! HTTP route), never a saga id.

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use jetsaga_sagas::{Cause, Definition, Entry, Phase, Saga};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Sagas started, by type.
pub const SAGAS_STARTED: &str = "jetsaga_sagas_started_total";
/// Sagas that reached completed, compensated or failed, by type and outcome.
pub const SAGAS_FINISHED: &str = "jetsaga_sagas_finished_total";
/// Saga duration from start to its outcome.
pub const SAGA_DURATION: &str = "jetsaga_saga_duration_seconds";
/// Step duration from its first command to its outcome.
pub const STEP_DURATION: &str = "jetsaga_step_duration_seconds";
/// Unfinished (and failed) sagas in the journal, by type and state (see [`crate::census`]).
pub const SAGAS_IN_FLIGHT: &str = "jetsaga_sagas_in_flight";
/// Failed sagas waiting for an operator, by type (see [`crate::census`]).
pub const SAGAS_FAILED_WAITING: &str = "jetsaga_sagas_failed_waiting";
/// Running or compensating sagas unchanged for twice their step's timeout, by
/// type (see [`crate::census`]).
pub const SAGAS_STUCK: &str = "jetsaga_sagas_stuck";
/// Sagas the saga listing holds (see [`crate::index`]).
pub const LISTING_SAGAS: &str = "jetsaga_listing_sagas";
/// Finished sagas dropped from the listing for `engine.listing-max-finished`.
pub const LISTING_UNLISTED: &str = "jetsaga_listing_unlisted_total";
/// When the last census of the journal finished (Unix seconds).
pub const CENSUS_TIMESTAMP: &str = "jetsaga_census_last_success_timestamp_seconds";
/// Sagas held in this instance's memory between inputs, by state.
pub const SAGAS_IN_MEMORY: &str = "jetsaga_sagas_in_memory";
/// Transitions persisted, by cause.
pub const TRANSITIONS: &str = "jetsaga_transitions_total";
/// Commands re-sent after a backoff.
pub const RETRIES: &str = "jetsaga_step_retries_total";
/// Step or compensation timeouts.
pub const TIMEOUTS: &str = "jetsaga_step_timeouts_total";
/// Compensation commands sent.
pub const COMPENSATIONS: &str = "jetsaga_compensations_total";
/// Inputs ignored as duplicate or stale.
pub const DUPLICATES: &str = "jetsaga_duplicate_replies_ignored_total";
/// Messages dead-lettered, by source.
pub const DEAD_LETTERS: &str = "jetsaga_dead_letters_total";
/// Optimistic-concurrency conflicts on the journal (another writer was first).
pub const CONFLICTS: &str = "jetsaga_state_conflicts_total";
/// Step timeouts that found their reply already stored and applied it instead.
pub const STORED_REPLIES: &str = "jetsaga_timeouts_answered_by_stored_reply_total";
/// Timer writes requested, by operation (`set`, `clear`).
pub const TIMER_WRITES: &str = "jetsaga_timer_writes_total";
/// 1 while connected to NATS.
pub const NATS_CONNECTED: &str = "jetsaga_nats_connected";
/// Gauge: 1 while new starts are taken, 0 while admission control holds them.
pub const ADMISSION_OPEN: &str = "jetsaga_admission_open";
/// Gauge: how many sagas may be under way before new starts wait; -1 without a bound.
pub const ADMISSION_LIMIT: &str = "jetsaga_admission_limit";
/// Reconnections to NATS after the first connect.
pub const NATS_RECONNECTS: &str = "jetsaga_nats_reconnects_total";
/// HTTP requests, by method, matched route and status.
pub const HTTP_REQUESTS: &str = "jetsaga_http_requests_total";
/// HTTP request duration, by method and matched route.
pub const HTTP_DURATION: &str = "jetsaga_http_request_duration_seconds";

/// Label names.
pub mod label {
    /// The saga definition name.
    pub const SAGA_TYPE: &str = "saga_type";
    /// The step name.
    pub const STEP: &str = "step";
    /// `forward` or `compensation`.
    pub const DIRECTION: &str = "direction";
    /// A saga phase (finished sagas) or a step outcome (`ok`, `failed`).
    pub const OUTCOME: &str = "outcome";
    /// A saga phase.
    pub const STATE: &str = "state";
    /// What caused a transition.
    pub const CAUSE: &str = "cause";
    /// Where a dead letter came from.
    pub const SOURCE: &str = "source";
    /// `set` or `clear`.
    pub const OP: &str = "op";
    /// The HTTP method.
    pub const METHOD: &str = "method";
    /// The matched route template (`/v1/sagas/{id}`), or `unmatched`.
    pub const ROUTE: &str = "route";
    /// The HTTP status code.
    pub const STATUS: &str = "status";
}

/// Every metric the orchestrator exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// See [`SAGAS_STARTED`].
    pub started: IntCounterVec,
    /// See [`SAGAS_FINISHED`].
    pub finished: IntCounterVec,
    /// See [`SAGA_DURATION`].
    pub saga_duration: HistogramVec,
    /// See [`STEP_DURATION`].
    pub step_duration: HistogramVec,
    /// See [`SAGAS_IN_FLIGHT`].
    pub in_flight: IntGaugeVec,
    /// See [`SAGAS_FAILED_WAITING`].
    pub failed_waiting: IntGaugeVec,
    /// See [`SAGAS_STUCK`].
    pub stuck: IntGaugeVec,
    /// See [`CENSUS_TIMESTAMP`].
    pub census_timestamp: IntGauge,
    /// See [`LISTING_SAGAS`].
    pub listing_sagas: IntGauge,
    /// See [`LISTING_UNLISTED`].
    pub listing_unlisted: IntCounter,
    /// See [`SAGAS_IN_MEMORY`].
    pub in_memory: IntGaugeVec,
    /// See [`TRANSITIONS`].
    pub transitions: IntCounterVec,
    /// See [`RETRIES`].
    pub retries: IntCounterVec,
    /// See [`TIMEOUTS`].
    pub timeouts: IntCounterVec,
    /// See [`COMPENSATIONS`].
    pub compensations: IntCounterVec,
    /// See [`DUPLICATES`].
    pub duplicates: IntCounter,
    /// See [`DEAD_LETTERS`].
    pub dead_letters: IntCounterVec,
    /// See [`CONFLICTS`].
    pub conflicts: IntCounter,
    /// See [`STORED_REPLIES`].
    pub stored_replies: IntCounter,
    /// See [`TIMER_WRITES`].
    pub timer_writes: IntCounterVec,
    /// See [`NATS_CONNECTED`].
    pub nats_connected: IntGauge,
    /// See [`ADMISSION_OPEN`].
    pub admission_open: IntGauge,
    /// See [`ADMISSION_LIMIT`].
    pub admission_limit: IntGauge,
    /// See [`NATS_RECONNECTS`].
    pub nats_reconnects: IntCounter,
    /// See [`HTTP_REQUESTS`].
    pub http_requests: IntCounterVec,
    /// See [`HTTP_DURATION`].
    pub http_duration: HistogramVec,
    /// Kept for `/metrics`.
    pub registry: Registry,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The sources a dead letter can come from (registered at 0 so the series exist).
pub const DEAD_LETTER_SOURCES: [&str; 4] = [
    "orchestrator.replies",
    "orchestrator.starts",
    "orchestrator.timers",
    "max_deliveries",
];

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        use label::{
            CAUSE, DIRECTION, METHOD, OP, OUTCOME, ROUTE, SAGA_TYPE, SOURCE, STATE, STATUS, STEP,
        };
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
                let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let histogram =
            |name: &str, help: &str, labels: &[&str]| -> Result<HistogramVec, prometheus::Error> {
                let h = HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    labels,
                )?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let single_counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let single_gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let metrics = Self {
            started: counter(SAGAS_STARTED, "Sagas started.", &[SAGA_TYPE])?,
            finished: counter(
                SAGAS_FINISHED,
                "Sagas finished, by outcome.",
                &[SAGA_TYPE, OUTCOME],
            )?,
            saga_duration: histogram(
                SAGA_DURATION,
                "Saga duration, start to outcome.",
                &[SAGA_TYPE, OUTCOME],
            )?,
            step_duration: histogram(
                STEP_DURATION,
                "Step duration, first command of the direction to its reply.",
                &[SAGA_TYPE, STEP, DIRECTION, OUTCOME],
            )?,
            in_flight: gauge(
                SAGAS_IN_FLIGHT,
                "Sagas in the journal by state (running, compensating, failed), from the last census.",
                &[SAGA_TYPE, STATE],
            )?,
            failed_waiting: gauge(
                SAGAS_FAILED_WAITING,
                "Failed sagas waiting for an operator, from the last census.",
                &[SAGA_TYPE],
            )?,
            stuck: gauge(
                SAGAS_STUCK,
                "Sagas in the same step for several times its timeout, from the last census.",
                &[SAGA_TYPE],
            )?,
            census_timestamp: single_gauge(
                CENSUS_TIMESTAMP,
                "When the last census of the journal finished, in Unix seconds.",
            )?,
            listing_sagas: single_gauge(
                LISTING_SAGAS,
                "Sagas the saga listing holds: live, failed, and the newest finished.",
            )?,
            listing_unlisted: single_counter(
                LISTING_UNLISTED,
                "Finished sagas dropped from the listing to keep at most engine.listing-max-finished.",
            )?,
            in_memory: gauge(
                SAGAS_IN_MEMORY,
                "Sagas held in this instance's memory between inputs, by state.",
                &[STATE],
            )?,
            transitions: counter(
                TRANSITIONS,
                "Transitions persisted, by cause.",
                &[SAGA_TYPE, CAUSE],
            )?,
            retries: counter(
                RETRIES,
                "Commands re-sent after a backoff.",
                &[SAGA_TYPE, STEP],
            )?,
            timeouts: counter(
                TIMEOUTS,
                "Step or compensation timeouts.",
                &[SAGA_TYPE, STEP],
            )?,
            compensations: counter(
                COMPENSATIONS,
                "Compensation commands sent.",
                &[SAGA_TYPE, STEP],
            )?,
            duplicates: single_counter(
                DUPLICATES,
                "Replies and inputs ignored as duplicate or stale.",
            )?,
            dead_letters: counter(
                DEAD_LETTERS,
                "Messages dead-lettered, by source.",
                &[SOURCE],
            )?,
            conflicts: single_counter(
                CONFLICTS,
                "Optimistic-concurrency conflicts on the saga journal.",
            )?,
            stored_replies: single_counter(
                STORED_REPLIES,
                "Step timeouts that found their reply already stored and applied it instead.",
            )?,
            timer_writes: counter(TIMER_WRITES, "Timer writes requested.", &[OP])?,
            nats_connected: single_gauge(NATS_CONNECTED, "1 while connected to NATS.")?,
            admission_open: single_gauge(
                ADMISSION_OPEN,
                "1 while new starts are taken, 0 while admission control holds them.",
            )?,
            admission_limit: single_gauge(
                ADMISSION_LIMIT,
                "Sagas that may be under way before new starts wait (-1: no bound).",
            )?,
            nats_reconnects: single_counter(
                NATS_RECONNECTS,
                "Reconnections to NATS after the first connect.",
            )?,
            http_requests: counter(
                HTTP_REQUESTS,
                "HTTP requests, by matched route and status.",
                &[METHOD, ROUTE, STATUS],
            )?,
            http_duration: histogram(
                HTTP_DURATION,
                "HTTP request duration, by matched route.",
                &[METHOD, ROUTE],
            )?,
            registry,
        };
        // Series that alerts and dashboards divide by or compare exist from the start.
        for source in DEAD_LETTER_SOURCES {
            metrics.dead_letters.with_label_values(&[source]);
        }
        for op in ["set", "clear"] {
            metrics.timer_writes.with_label_values(&[op]);
        }
        Ok(metrics)
    }

    /// Registers the per-type series at 0, so "nothing failed" is a 0 and not a gap.
    pub fn register_types<'a>(&self, types: impl IntoIterator<Item = &'a str>) {
        for saga_type in types {
            self.started.with_label_values(&[saga_type]);
            self.failed_waiting.with_label_values(&[saga_type]);
            self.stuck.with_label_values(&[saga_type]);
            for phase in [Phase::Running, Phase::Compensating, Phase::Failed] {
                self.in_flight
                    .with_label_values(&[saga_type, phase.as_str()]);
            }
            for phase in [Phase::Completed, Phase::Compensated, Phase::Failed] {
                self.finished
                    .with_label_values(&[saga_type, phase.as_str()]);
            }
        }
    }

    /// Counts a transition about to be persisted: `saga` is the state after it.
    pub fn observe_transition(&self, def: &Definition, saga: &Saga, entry: &Entry) {
        let saga_type = saga.saga_type.as_str();
        self.transitions
            .with_label_values(&[saga_type, cause_label(entry.cause)])
            .inc();
        let Some(step) = &entry.step else {
            return;
        };
        match entry.cause {
            Cause::StepTimeout => self.timeouts.with_label_values(&[saga_type, step]).inc(),
            Cause::RetryDue => self.retries.with_label_values(&[saga_type, step]).inc(),
            Cause::ReplyOk | Cause::ReplyFailed => {
                // Compensation replies arrive while compensating; their start is not
                // recorded, so only forward step durations are observed.
                if entry.from == Some(Phase::Compensating) {
                    return;
                }
                let outcome = if entry.cause == Cause::ReplyOk {
                    "ok"
                } else {
                    "failed"
                };
                if let Some(record) = def.step_index(step).and_then(|i| saga.steps.get(i))
                    && let Some(started) = record.started_at
                {
                    self.step_duration
                        .with_label_values(&[saga_type, step, "forward", outcome])
                        .observe(seconds(started, entry.at));
                }
            }
            Cause::Start
            | Cause::Deadline
            | Cause::OperatorRetry
            | Cause::OperatorAbort
            | Cause::Ignored
            | Cause::Resent => {}
        }
    }

    /// Counts a finished saga.
    pub fn observe_finish(&self, saga: &Saga, phase: Phase, at: chrono::DateTime<chrono::Utc>) {
        self.finished
            .with_label_values(&[&saga.saga_type, phase.as_str()])
            .inc();
        self.saga_duration
            .with_label_values(&[&saga.saga_type, phase.as_str()])
            .observe(seconds(saga.created_at, at));
    }

    /// Counts the timer writes of a planned write.
    pub fn observe_timer_writes(&self, set: bool, clear: bool) {
        if set {
            self.timer_writes.with_label_values(&["set"]).inc();
        }
        if clear {
            self.timer_writes.with_label_values(&["clear"]).inc();
        }
    }

    /// Updates the connection gauge and the reconnect counter from the client.
    pub fn observe_connection(&self, client: &async_nats::Client) {
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        self.nats_connected.set(i64::from(connected));
        let connects = client.statistics().connects.load(Ordering::Relaxed);
        let reconnects = connects.saturating_sub(1);
        let counted = self.nats_reconnects.get();
        if reconnects > counted {
            self.nats_reconnects.inc_by(reconnects - counted);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        // Encoding into a String only fails on invalid metric families, which
        // registration already rejected.
        let _ = encoder.encode_utf8(&self.registry.gather(), &mut out);
        out
    }
}

/// Axum middleware counting requests by method, matched route template and status.
pub async fn track_http(metrics: Metrics, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let began = Instant::now();
    let response = next.run(request).await;
    metrics
        .http_requests
        .with_label_values(&[&method, &route, response.status().as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[&method, &route])
        .observe(began.elapsed().as_secs_f64());
    response
}

fn seconds(from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>) -> f64 {
    (to - from).num_milliseconds().max(0) as f64 / 1000.0
}

fn cause_label(cause: Cause) -> &'static str {
    match cause {
        Cause::Start => "start",
        Cause::ReplyOk => "reply_ok",
        Cause::ReplyFailed => "reply_failed",
        Cause::StepTimeout => "step_timeout",
        Cause::RetryDue => "retry_due",
        Cause::Deadline => "deadline",
        Cause::OperatorRetry => "operator_retry",
        Cause::OperatorAbort => "operator_abort",
        Cause::Ignored => "ignored",
        Cause::Resent => "resent",
    }
}
