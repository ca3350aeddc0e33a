//! The notification participant: "sends" one email per order on `order.confirmed` and
//! `order.cancelled`.
//!
//! It consumes domain events (not commands) with the durable consumer `notification` on
//! `saga.event.order.>` and records each email as `email.<saga_id>` in KV with a create-only
//! write that expires after `notification.record-ttl`: a second delivery of the event finds the
//! record and sends nothing, and an event older than 90 % of the TTL is not sent (its record
//! may be gone). Undecodable events, and events still failing transiently on their last
//! delivery, are terminated and dead-lettered to `saga.dead.participant.notification`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message, consumer, kv};
use jetsaga_participant::streams;
use jetsaga_runtime::consume::{self, Consumer, Handler, Pull};
use jetsaga_runtime::dead_letter;
use jetsaga_sagas::protocol::{Body, Event};
use jetsaga_sagas::streams::EVENTS;
use prometheus::{IntCounterVec, Opts};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::{self, Load, Metrics, Nats, Streams, Telemetry};
use crate::faults::Faults;
use crate::{Error, service};

/// The participant's name (dead-letter source, consumer name).
pub const NAME: &str = "notification";
/// Emails recorded, by `event` and `result` (`sent`, `duplicate`, `expired`: an event past
/// the record horizon, not sent).
pub const EMAILS_TOTAL: &str = "jetsaga_notification_emails_total";
/// Events dead-lettered (undecodable, or failing on their last delivery).
pub const DEAD_LETTERS_TOTAL: &str = "jetsaga_notification_dead_letters_total";

/// The notification's own settings (section `[notification]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Settings {
    /// The KV bucket.
    pub bucket: String,
    /// The durable consumer's name.
    pub consumer: String,
    /// Events handled at the same time.
    pub concurrency: usize,
    /// Deliveries of an event that keeps failing transiently (its email record cannot be
    /// written: the bucket is unavailable) before it is dead-lettered to
    /// `saga.dead.participant.notification`; `-1` (the default): never — it is redelivered
    /// with a backoff that doubles from 200 ms to 30 s for as long as the outage lasts.
    pub max_deliver: i64,
    /// Redelivery after this long without an ack.
    #[serde(with = "config::duration")]
    pub ack_wait: Duration,
    /// How long an email record is kept; then its key expires. An event stored longer ago
    /// than 90 % of it is acknowledged without sending (result `expired`), so a very late
    /// redelivery never sends a second email. At least 1 s.
    #[serde(with = "config::duration")]
    pub record_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            bucket: "jetsaga_notification".to_owned(),
            consumer: NAME.to_owned(),
            concurrency: 32,
            max_deliver: -1,
            ack_wait: jetsaga_participant::DEFAULT_ACK_WAIT,
            record_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// The configuration of `jetsaga-notification`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    /// NATS connection.
    pub nats: Nats,
    /// Storage, replicas and retention of the streams and the bucket (as the orchestrator's).
    pub streams: Streams,
    /// The metrics endpoint (default `127.0.0.1:9103`).
    pub metrics: Metrics,
    /// Logs and traces.
    pub telemetry: Telemetry,
    /// Injected failures (the action is the event name, e.g. `order.confirmed`).
    pub faults: Faults,
    /// Consumer and bucket.
    pub notification: Settings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats: Nats::default(),
            streams: Streams::default(),
            metrics: Metrics::on_port(9103),
            telemetry: Telemetry::default(),
            faults: Faults::default(),
            notification: Settings::default(),
        }
    }
}

impl Load for Config {
    fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }
}

impl config::Validate for Config {
    fn validate(&self) -> Result<(), config::Error> {
        self.nats.validate()?;
        self.streams.validate()?;
        self.metrics.validate()?;
        self.telemetry.validate()?;
        self.faults.validate()?;
        let s = &self.notification;
        service::validate_bucket("notification.bucket", &s.bucket)?;
        if !jetsaga_sagas::definition::is_subject_token(&s.consumer) {
            return Err(config::Error::field(
                "notification.consumer",
                "must be one subject token",
            ));
        }
        if !(1..=4096).contains(&s.concurrency) {
            return Err(config::Error::field(
                "notification.concurrency",
                "must be between 1 and 4096",
            ));
        }
        if s.max_deliver < 1 && s.max_deliver != -1 {
            return Err(config::Error::field(
                "notification.max-deliver",
                "must be -1 (never dead-letter a transient failure) or at least 1",
            ));
        }
        service::validate_record_ttl("notification.record-ttl", s.record_ttl, Duration::ZERO)?;
        if s.ack_wait < Duration::from_secs(1) {
            return Err(config::Error::field(
                "notification.ack-wait",
                "must be at least 1s",
            ));
        }
        Ok(())
    }
}

/// The record of a sent email.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Email {
    /// Recipient.
    pub to: String,
    /// Subject line.
    pub subject: String,
    /// The event that caused it.
    pub event: String,
    /// The order's saga.
    pub saga_id: String,
    /// When it was "sent".
    pub sent_at: chrono::DateTime<chrono::Utc>,
}

/// The recorded email of `saga_id`, if any, read from the stream leader.
///
/// # Errors
///
/// [`Error::Kv`] if the bucket cannot be read.
pub async fn email(store: &kv::Store, saga_id: &str) -> Result<Option<Email>, Error> {
    let key = format!("email.{saga_id}");
    match jetsaga_runtime::kv::entry(store, &key, jetsaga_runtime::kv::Read::Leader).await {
        Ok(Some((value, _))) => serde_json::from_slice(&value)
            .map(Some)
            .map_err(|e| Error::Kv(e.to_string())),
        Ok(None) => Ok(None),
        Err(e) => Err(Error::Kv(e.to_string())),
    }
}

struct Notifier {
    store: kv::Store,
    record_ttl: Duration,
    max_deliver: i64,
    js: jetstream::Context,
    faults: Faults,
    emails: IntCounterVec,
    dead_letters: prometheus::IntCounter,
}

/// Runs the notification participant until `shutdown` resolves.
///
/// # Errors
///
/// When NATS, the bucket, the metrics endpoint or the consumer cannot be set up.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    let client = service::connect(&config.nats, "jetsaga-notification").await?;
    let js = jetstream::new(client.clone());
    streams::ensure(&js, &streams::NEEDED, &config.streams).await?;
    let store = service::bucket(&js, &config.notification.bucket, &config.streams).await?;

    let registry = prometheus::Registry::new();
    let emails = IntCounterVec::new(
        Opts::new(EMAILS_TOTAL, "Emails recorded, by event and result."),
        &["event", "result"],
    )?;
    let dead_letters = prometheus::IntCounter::new(DEAD_LETTERS_TOTAL, "Events dead-lettered.")?;
    registry.register(Box::new(emails.clone()))?;
    registry.register(Box::new(dead_letters.clone()))?;
    let tracker = TaskTracker::new();
    let token = CancellationToken::new();
    if let Some(address) = config.metrics.address() {
        service::serve_metrics(address, registry, &tracker, token.clone()).await?;
    }

    let s = &config.notification;
    let stream = js
        .get_stream(EVENTS.name)
        .await
        .map_err(|e| Error::Nats(e.to_string()))?;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(s.consumer.clone()),
            filter_subject: jetsaga_sagas::protocol::subject::event("order.>"),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: s.ack_wait,
            max_deliver: s.max_deliver,
            max_ack_pending: (s.concurrency * 4) as i64,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Nats(format!("consumer {}: {e}", s.consumer)))?;
    let notifier = Arc::new(Notifier {
        store,
        record_ttl: s.record_ttl,
        max_deliver: s.max_deliver,
        js,
        faults: config.faults,
        emails,
        dead_letters,
    });
    info!(consumer = %s.consumer, "notification started");

    let settings = consume::Settings {
        concurrency: s.concurrency,
        pull: Pull {
            batch: s.concurrency,
            ..Pull::default()
        },
        ack_wait: s.ack_wait,
        grace: s.ack_wait,
    };
    Consumer::new(consumer, client.clone(), settings)
        .run(notifier, shutdown)
        .await;
    token.cancel();
    tracker.close();
    tracker.wait().await;
    if let Err(e) = client.drain().await {
        warn!(error = %e, "draining the nats connection failed");
    }
    info!("notification stopped");
    Ok(())
}

impl Handler for Notifier {
    async fn handle(&self, msg: &Message) -> AckKind {
        let event = match Event::decode(&msg.payload) {
            Ok(event) => event,
            Err(e) => {
                error!(subject = %msg.subject, reason = %e, "undecodable event: dead-lettering it");
                let source = format!("participant.{NAME}");
                let kind = dead_letter::settle(&self.js, &source, msg, &e.to_string()).await;
                if matches!(kind, AckKind::Term) {
                    self.dead_letters.inc();
                }
                return kind;
            }
        };
        let label = match event.event.as_str() {
            "order.confirmed" | "order.cancelled" => event.event.as_str(),
            _ => "other",
        };
        if let Some(jetsaga_participant::Handled::Retry { reason, .. }) =
            self.faults.inject(label).await
        {
            return self
                .transient(msg, &format!("injected failure: {reason}"))
                .await;
        }
        let subject_line = match label {
            "order.confirmed" => "Your order is confirmed",
            "order.cancelled" => "Your order was cancelled",
            _ => {
                debug!(event = %event.event, "not an order email; skipping");
                return AckKind::Ack;
            }
        };
        let age = msg
            .info()
            .ok()
            .and_then(|i| {
                std::time::SystemTime::now()
                    .duration_since(std::time::SystemTime::from(i.published))
                    .ok()
            })
            .unwrap_or_default();
        if service::past_horizon(age, self.record_ttl) {
            // Its email record may have expired: sending now could send it twice.
            warn!(saga_id = %event.saga_id, age_secs = age.as_secs(), "event past the record horizon; not sending");
            self.emails.with_label_values(&[label, "expired"]).inc();
            return AckKind::Ack;
        }
        if !service::is_key_safe(&event.saga_id) {
            warn!(saga_id = %event.saga_id, "saga id cannot be a key; skipping");
            return AckKind::Ack;
        }
        let email = Email {
            to: event
                .input
                .get("email")
                .and_then(|e| e.as_str())
                .unwrap_or_default()
                .to_owned(),
            subject: subject_line.to_owned(),
            event: event.event.clone(),
            saga_id: event.saga_id.clone(),
            sent_at: chrono::Utc::now(),
        };
        let value = match serde_json::to_vec(&email) {
            Ok(value) => value.into(),
            Err(e) => {
                return self
                    .transient(msg, &format!("cannot encode the email record: {e}"))
                    .await;
            }
        };
        match self
            .store
            .create_with_ttl(format!("email.{}", event.saga_id), value, self.record_ttl)
            .await
        {
            Ok(_) => {
                info!(to = %email.to, subject = %email.subject, saga_id = %email.saga_id, "email sent");
                self.emails.with_label_values(&[label, "sent"]).inc();
                AckKind::Ack
            }
            Err(e)
                if e.kind() == kv::CreateErrorKind::AlreadyExists
                    || jetsaga_runtime::kv::is_conflict(&e) =>
            {
                debug!(saga_id = %event.saga_id, "email already sent");
                self.emails.with_label_values(&[label, "duplicate"]).inc();
                AckKind::Ack
            }
            Err(e) => {
                self.transient(msg, &format!("cannot record the email: {e}"))
                    .await
            }
        }
    }
}

/// The first redelivery delay of an event that failed transiently.
const RETRY_BASE: Duration = Duration::from_millis(200);
/// The longest.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// How long an event that failed on its `delivered`-th delivery waits: doubling from
/// [`RETRY_BASE`] up to [`RETRY_MAX`].
fn redelivery_delay(delivered: i64) -> Duration {
    let doublings = u32::try_from(delivered.saturating_sub(1).clamp(0, 16)).unwrap_or(16);
    RETRY_BASE.saturating_mul(1 << doublings).min(RETRY_MAX)
}

impl Notifier {
    /// A transient failure: redelivered after a backoff that grows with the delivery count,
    /// except on the consumer's last delivery (with `max-deliver` set), where the event is
    /// dead-lettered (with `reason`) rather than dropped by JetStream with only an advisory
    /// nobody may be listening to.
    async fn transient(&self, msg: &Message, reason: &str) -> AckKind {
        let delivered = msg.info().map_or(1, |i| i.delivered);
        if self.max_deliver < 0 || delivered < self.max_deliver {
            warn!(%reason, delivered, "cannot handle the event; will be redelivered");
            return AckKind::Nak(Some(redelivery_delay(delivered)));
        }
        let reason = format!("{reason} (after {delivered} deliveries)");
        error!(%reason, subject = %msg.subject, "giving up on the event: dead-lettering it");
        let source = format!("participant.{NAME}");
        let kind = dead_letter::settle(&self.js, &source, msg, &reason).await;
        if matches!(kind, AckKind::Term) {
            self.dead_letters.inc();
        }
        kind
    }
}
