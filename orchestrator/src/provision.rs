//! Creates, or checks, the streams and consumers the orchestrator needs.
//!
//! Idempotent: a second run finds everything in place. An existing stream whose
//! settings differ from what jetsaga relies on is a startup error naming the
//! stream and the setting, never silently changed.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use jetsaga_sagas::streams::{self, Spec};

use crate::config::{Storage, Streams};

/// Durable consumer of participants' replies.
pub const REPLIES_CONSUMER: &str = "orchestrator-replies";
/// Durable consumer of start requests.
pub const STARTS_CONSUMER: &str = "orchestrator-starts";
/// Durable consumer of fired timers.
pub const TIMERS_CONSUMER: &str = "orchestrator-timers";
/// The subject fired timers arrive on.
pub const TIMER_FIRED: &str = jetsaga_sagas::protocol::subject::TIMERS_FIRED;

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server has no JetStream, or the account may not use it.
    #[error("JetStream is not available on this server: {0}")]
    NoJetStream(String),
    /// An existing stream is configured differently.
    #[error(
        "stream {stream} exists with a different {setting}: found {found}, jetsaga needs {needed}"
    )]
    Mismatch {
        /// The stream.
        stream: String,
        /// The setting.
        setting: &'static str,
        /// What the server has.
        found: String,
        /// What jetsaga needs.
        needed: String,
    },
    /// A JetStream API call failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The cause.
        source: async_nats::Error,
    },
}

fn api(what: impl Into<String>) -> impl FnOnce(async_nats::Error) -> Error {
    let what = what.into();
    move |source| Error::Api { what, source }
}

/// The JetStream config for a stream spec with the operator's storage settings.
pub fn stream_config(spec: &Spec, settings: &Streams) -> stream::Config {
    let max_age = if spec.max_age == streams::DEFAULT_RETENTION {
        settings.retention
    } else {
        spec.max_age
    };
    stream::Config {
        name: spec.name.to_owned(),
        subjects: spec.subjects.iter().map(|s| (*s).to_owned()).collect(),
        retention: stream::RetentionPolicy::Limits,
        storage: match settings.storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        },
        num_replicas: settings.replicas,
        max_age,
        max_messages_per_subject: spec.max_msgs_per_subject.unwrap_or(-1),
        allow_direct: spec.allow_direct,
        allow_message_schedules: spec.allow_msg_schedules,
        allow_message_ttl: spec.allow_msg_ttl,
        duplicate_window: spec.duplicate_window,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// Creates or checks every stream in [`streams::ALL`].
pub async fn streams(js: &jetstream::Context, settings: &Streams) -> Result<(), Error> {
    js.query_account()
        .await
        .map_err(|e| Error::NoJetStream(e.to_string()))?;
    for spec in streams::ALL {
        ensure_stream(js, &stream_config(spec, settings)).await?;
    }
    Ok(())
}

async fn ensure_stream(js: &jetstream::Context, wanted: &stream::Config) -> Result<(), Error> {
    let mut existing = match js.get_stream(&wanted.name).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return js
                .create_stream(wanted.clone())
                .await
                .map(|_| ())
                .map_err(|e| api(format!("create stream {}", wanted.name))(e.into()));
        }
        Err(e) => return Err(api(format!("look up stream {}", wanted.name))(e.into())),
    };
    let found = existing
        .info()
        .await
        .map_err(|e| api(format!("stream info {}", wanted.name))(e.into()))?
        .config
        .clone();
    let mismatch = |setting, found: String, needed: String| Error::Mismatch {
        stream: wanted.name.clone(),
        setting,
        found,
        needed,
    };
    if found.subjects != wanted.subjects {
        return Err(mismatch(
            "subjects",
            format!("{:?}", found.subjects),
            format!("{:?}", wanted.subjects),
        ));
    }
    if found.allow_direct != wanted.allow_direct {
        return Err(mismatch(
            "allow_direct",
            found.allow_direct.to_string(),
            wanted.allow_direct.to_string(),
        ));
    }
    if found.allow_message_schedules != wanted.allow_message_schedules {
        return Err(mismatch(
            "allow_msg_schedules",
            found.allow_message_schedules.to_string(),
            wanted.allow_message_schedules.to_string(),
        ));
    }
    if found.max_messages_per_subject != wanted.max_messages_per_subject {
        return Err(mismatch(
            "max_msgs_per_subject",
            found.max_messages_per_subject.to_string(),
            wanted.max_messages_per_subject.to_string(),
        ));
    }
    if found.retention != wanted.retention {
        return Err(mismatch(
            "retention",
            format!("{:?}", found.retention),
            format!("{:?}", wanted.retention),
        ));
    }
    if found.storage != wanted.storage {
        return Err(mismatch(
            "storage",
            format!("{:?}", found.storage),
            format!("{:?}", wanted.storage),
        ));
    }
    if found.num_replicas != wanted.num_replicas {
        return Err(mismatch(
            "replicas",
            found.num_replicas.to_string(),
            wanted.num_replicas.to_string(),
        ));
    }
    Ok(())
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
    let stream = js
        .get_stream(stream)
        .await
        .map_err(|e| api(format!("look up stream {stream}"))(e.into()))?;
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
        .map_err(|e| api(format!("create consumer {name}"))(e.into()))
}
