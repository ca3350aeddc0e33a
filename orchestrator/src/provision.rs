//! Creates, or checks, the streams and consumers the orchestrator needs.
//!
//! Idempotent: a second run finds everything in place. An existing stream whose
//! settings differ from what jetsaga relies on is a startup error naming the
//! stream and the setting, never silently changed.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use jetsaga_sagas::streams;

use crate::config::Streams;

/// Durable consumer of participants' replies.
pub const REPLIES_CONSUMER: &str = "orchestrator-replies";
/// Durable consumer of start requests.
pub const STARTS_CONSUMER: &str = "orchestrator-starts";
/// Durable consumer of fired timers.
pub const TIMERS_CONSUMER: &str = "orchestrator-timers";
/// Durable consumer of max-deliveries advisories (see [`crate::dead`]).
pub const ADVISORIES_CONSUMER: &str = "orchestrator-advisories";
/// The subject fired timers arrive on.
pub const TIMER_FIRED: &str = jetsaga_sagas::protocol::subject::TIMERS_FIRED;

pub use jetsaga_runtime::streams::{Error, config as stream_config};

/// Creates or checks every stream in [`streams::ALL`].
///
/// # Errors
///
/// [`Error::NoJetStream`] without JetStream; [`Error::Mismatch`] for an existing stream with
/// other settings.
pub async fn streams(js: &jetstream::Context, settings: &Streams) -> Result<(), Error> {
    jetsaga_runtime::streams::check_jetstream(js).await?;
    jetsaga_runtime::streams::ensure_all(js, &streams::ALL, settings).await
}

/// The settings of the orchestrator's durable consumers.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerSettings {
    /// Redelivery after this long without an ack.
    pub ack_wait: Duration,
    /// Deliveries before giving up.
    pub max_deliver: i64,
    /// Unacknowledged messages at once.
    pub max_ack_pending: i64,
}

/// Creates (or updates) a durable pull consumer.
pub async fn consumer(
    js: &jetstream::Context,
    stream: &str,
    name: &str,
    filter: &str,
    settings: ConsumerSettings,
) -> Result<consumer::PullConsumer, Error> {
    let stream = js.get_stream(stream).await.map_err(|e| Error::Api {
        what: format!("look up stream {stream}"),
        source: e.into(),
    })?;
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            filter_subject: filter.to_owned(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            max_deliver: settings.max_deliver,
            max_ack_pending: settings.max_ack_pending,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Api {
            what: format!("create consumer {name}"),
            source: e.into(),
        })
}
