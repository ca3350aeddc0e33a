//! The participant's Prometheus metrics: names, labels and the collectors.
//!
//! Labels are bounded: the participant name, actions it has handlers for (anything else is
//! counted as `unknown`), results and dead-letter kinds; never a saga or command id.

use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Commands handled, by `participant`, `action` and `result`.
pub const COMMANDS_TOTAL: &str = "jetsaga_participant_commands_total";
/// Commands answered from the recorded reply without running the handler.
pub const DUPLICATES_TOTAL: &str = "jetsaga_participant_duplicates_total";
/// How long handlers ran, by `participant` and `action`.
pub const HANDLER_DURATION_SECONDS: &str = "jetsaga_participant_handler_duration_seconds";
/// Messages terminated and copied to the dead-letter stream, by `participant` and `kind`.
pub const DEAD_LETTERS_TOTAL: &str = "jetsaga_participant_dead_letters_total";

/// Commands being handled right now, by `participant`.
pub const IN_FLIGHT: &str = "jetsaga_participant_commands_in_flight";
/// 1 while the participant's NATS connection is up, by `participant`.
pub const NATS_CONNECTED: &str = "jetsaga_participant_nats_connected";
/// Reconnections to NATS after the first connect, by `participant`.
pub const NATS_RECONNECTS_TOTAL: &str = "jetsaga_participant_nats_reconnects_total";

/// Label names.
pub mod label {
    /// The participant name.
    pub const PARTICIPANT: &str = "participant";
    /// The action (or `unknown`).
    pub const ACTION: &str = "action";
    /// One of the [`result`](super::result) values.
    pub const RESULT: &str = "result";
    /// Why a message was dead-lettered (`json`, `unsupported_version`, `missing_header`, `invalid_field`,
    /// `unanswered`: no reply could be recorded on the consumer's last delivery).
    pub const KIND: &str = "kind";
}

/// Values of the `result` label.
pub mod result {
    /// The handler applied the action; an ok reply was recorded.
    pub const OK: &str = "ok";
    /// A business failure was recorded.
    pub const FAILED: &str = "failed";
    /// A transient failure: the command was nak'ed for redelivery.
    pub const RETRY: &str = "retry";
    /// The handler panicked; treated as transient.
    pub const PANICKED: &str = "panicked";
    /// The last delivery failed transiently: a retryable failure was recorded.
    pub const EXHAUSTED: &str = "exhausted";
}

/// The `action` label of actions without a handler.
pub const UNKNOWN_ACTION: &str = "unknown";

/// The collectors, registered in one [`Registry`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub(crate) commands: IntCounterVec,
    pub(crate) duplicates: IntCounterVec,
    pub(crate) duration: HistogramVec,
    pub(crate) dead_letters: IntCounterVec,
    pub(crate) in_flight: IntGaugeVec,
    pub(crate) nats_connected: IntGaugeVec,
    pub(crate) nats_reconnects: IntCounterVec,
}

/// Counts a command in flight while alive.
#[derive(Debug)]
pub(crate) struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Creates the collectors and registers them in `registry`.
    ///
    /// # Errors
    ///
    /// Registration fails if `registry` already holds collectors with these names
    /// (e.g. two participants built on the same registry).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        use label::{ACTION, KIND, PARTICIPANT, RESULT};
        let commands = IntCounterVec::new(
            Opts::new(
                COMMANDS_TOTAL,
                "Commands handled by the participant, by result.",
            ),
            &[PARTICIPANT, ACTION, RESULT],
        )?;
        let duplicates = IntCounterVec::new(
            Opts::new(
                DUPLICATES_TOTAL,
                "Commands answered from the recorded reply.",
            ),
            &[PARTICIPANT, ACTION],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(HANDLER_DURATION_SECONDS, "Handler run time.").buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &[PARTICIPANT, ACTION],
        )?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                DEAD_LETTERS_TOTAL,
                "Undecodable messages terminated and dead-lettered.",
            ),
            &[PARTICIPANT, KIND],
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new(IN_FLIGHT, "Commands being handled right now."),
            &[PARTICIPANT],
        )?;
        let nats_connected = IntGaugeVec::new(
            Opts::new(NATS_CONNECTED, "1 while connected to NATS."),
            &[PARTICIPANT],
        )?;
        let nats_reconnects = IntCounterVec::new(
            Opts::new(
                NATS_RECONNECTS_TOTAL,
                "Reconnections to NATS after the first connect.",
            ),
            &[PARTICIPANT],
        )?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(nats_connected.clone()))?;
        registry.register(Box::new(nats_reconnects.clone()))?;
        registry.register(Box::new(commands.clone()))?;
        registry.register(Box::new(duplicates.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        Ok(Self {
            commands,
            duplicates,
            duration,
            dead_letters,
            in_flight,
            nats_connected,
            nats_reconnects,
        })
    }

    /// Registers `participant`'s series at 0, so "no duplicates yet" is a 0 and not a gap.
    pub(crate) fn register_actions<'a>(
        &self,
        participant: &str,
        actions: impl IntoIterator<Item = &'a str>,
    ) {
        for action in actions {
            self.duplicates.with_label_values(&[participant, action]);
            self.commands
                .with_label_values(&[participant, action, result::OK]);
        }
        self.in_flight.with_label_values(&[participant]);
        self.nats_connected.with_label_values(&[participant]);
        self.nats_reconnects.with_label_values(&[participant]);
    }

    /// Counts one command in flight until the guard drops.
    pub(crate) fn in_flight(&self, participant: &str) -> InFlight {
        let gauge = self.in_flight.with_label_values(&[participant]);
        gauge.inc();
        InFlight(gauge)
    }

    /// Keeps the connection gauge and the reconnect counter current until cancelled.
    pub(crate) async fn watch_connection(
        self,
        participant: String,
        client: async_nats::Client,
        token: tokio_util::sync::CancellationToken,
    ) {
        let connected = self.nats_connected.with_label_values(&[&participant]);
        let reconnects = self.nats_reconnects.with_label_values(&[&participant]);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = token.cancelled() => return,
            }
            let up = client.connection_state() == async_nats::connection::State::Connected;
            connected.set(i64::from(up));
            let seen = client
                .statistics()
                .connects
                .load(Ordering::Relaxed)
                .saturating_sub(1);
            if seen > reconnects.get() {
                reconnects.inc_by(seen - reconnects.get());
            }
        }
    }

    /// Counts a dead letter of `kind` for `participant`.
    pub fn dead_letter(&self, participant: &str, kind: &str) {
        self.dead_letters
            .with_label_values(&[participant, kind])
            .inc();
    }
}
