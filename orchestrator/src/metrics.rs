//! The orchestrator's Prometheus metrics. Names and labels live here only; labels
//! are bounded (saga type, step, outcome, state), never a saga id.

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
/// Sagas in this instance's memory, by state.
pub const SAGAS_IN_FLIGHT: &str = "jetsaga_sagas_in_flight";
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
/// Optimistic-concurrency conflicts (another writer was first).
pub const CONFLICTS: &str = "jetsaga_state_conflicts_total";
/// 1 while connected to NATS.
pub const NATS_CONNECTED: &str = "jetsaga_nats_connected";

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
    /// See [`NATS_CONNECTED`].
    pub nats_connected: IntGauge,
    /// Kept for `/metrics`.
    pub registry: Registry,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
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
        let started = counter(SAGAS_STARTED, "Sagas started.", &["saga_type"])?;
        let finished = counter(
            SAGAS_FINISHED,
            "Sagas finished, by outcome.",
            &["saga_type", "outcome"],
        )?;
        let saga_duration = histogram(
            SAGA_DURATION,
            "Saga duration, start to outcome.",
            &["saga_type", "outcome"],
        )?;
        let step_duration = histogram(
            STEP_DURATION,
            "Step duration, first command to outcome.",
            &["saga_type", "step"],
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new(
                SAGAS_IN_FLIGHT,
                "Sagas held in this instance's memory between inputs, by state.",
            ),
            &["state"],
        )?;
        registry.register(Box::new(in_flight.clone()))?;
        let transitions = counter(
            TRANSITIONS,
            "Transitions persisted, by cause.",
            &["saga_type", "cause"],
        )?;
        let retries = counter(
            RETRIES,
            "Commands re-sent after a backoff.",
            &["saga_type", "step"],
        )?;
        let timeouts = counter(
            TIMEOUTS,
            "Step or compensation timeouts.",
            &["saga_type", "step"],
        )?;
        let compensations = counter(
            COMPENSATIONS,
            "Compensation commands sent.",
            &["saga_type", "step"],
        )?;
        let duplicates = IntCounter::new(
            DUPLICATES,
            "Replies and inputs ignored as duplicate or stale.",
        )?;
        registry.register(Box::new(duplicates.clone()))?;
        let dead_letters = counter(
            DEAD_LETTERS,
            "Messages dead-lettered, by source.",
            &["source"],
        )?;
        let conflicts =
            IntCounter::new(CONFLICTS, "Optimistic-concurrency conflicts on saga state.")?;
        registry.register(Box::new(conflicts.clone()))?;
        let nats_connected = IntGauge::new(NATS_CONNECTED, "1 while connected to NATS.")?;
        registry.register(Box::new(nats_connected.clone()))?;
        Ok(Self {
            started,
            finished,
            saga_duration,
            step_duration,
            in_flight,
            transitions,
            retries,
            timeouts,
            compensations,
            duplicates,
            dead_letters,
            conflicts,
            nats_connected,
            registry,
        })
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
