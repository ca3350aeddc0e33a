//! The `[streams]` section and the one way streams and KV buckets are created or checked.
//!
//! [`ensure`] creates a stream from its [`Spec`] when it is missing and, when it exists,
//! compares every setting jetsaga relies on (subjects, retention, storage, replicas, max age,
//! duplicate window, per-subject limit, direct get, TTL and schedule flags) and refuses a
//! mismatch naming the stream and the setting; it never changes an existing stream. The
//! orchestrator and every participant call it with the same `[streams]` settings, so any of
//! them may start first.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use jetsaga_sagas::streams::{self as specs, Retention, Spec};
use serde::{Deserialize, Serialize};

use crate::config;

/// Where JetStream keeps the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Storage {
    /// On disk (the default).
    File,
    /// In memory (tests, benchmarks).
    Memory,
}

impl From<Storage> for stream::StorageType {
    fn from(storage: Storage) -> Self {
        match storage {
            Storage::File => Self::File,
            Storage::Memory => Self::Memory,
        }
    }
}

/// Stream settings: the same `[streams]` section in every binary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Streams {
    /// File or memory storage.
    pub storage: Storage,
    /// Replicas per stream and bucket (3 in a 3-node cluster).
    pub replicas: usize,
    /// How long commands, replies, events and timers are kept: the longest a
    /// message may wait for its consumer. Live sagas' journals are never aged
    /// out, and saga definitions must finish their waits well within it.
    #[serde(with = "config::duration")]
    pub retention: Duration,
    /// How long a finished (completed or compensated) saga's record stays: its
    /// state, its journal, and the idempotency of its start key.
    #[serde(with = "config::duration")]
    pub finished_retention: Duration,
    /// How long a command is kept for its participant (`Nats-TTL`): a command not taken in
    /// this time is one whose step timed out long ago (the saga retried or compensated), so
    /// keeping it only fills the stream. At least the duplicate window; every step timeout
    /// of every definition must be shorter.
    #[serde(with = "config::duration")]
    pub command_ttl: Duration,
    /// The most bytes each stream may hold. At the limit new messages are
    /// refused (nothing is dropped), and the orchestrator holds new starts from
    /// 90 % of it on (admission control) so that running sagas still have room to finish.
    pub max_bytes: bytesize::ByteSize,
}

impl Default for Streams {
    fn default() -> Self {
        Self {
            storage: Storage::File,
            replicas: 1,
            retention: specs::DEFAULT_RETENTION,
            finished_retention: DEFAULT_FINISHED_RETENTION,
            command_ttl: DEFAULT_COMMAND_TTL,
            max_bytes: bytesize::ByteSize::gib(2),
        }
    }
}

/// How long a command is kept by default.
pub const DEFAULT_COMMAND_TTL: Duration = Duration::from_secs(10 * 60);

/// How long a finished saga is kept by default.
pub const DEFAULT_FINISHED_RETENTION: Duration = Duration::from_secs(24 * 3600);

impl Streams {
    /// Checks the section.
    ///
    /// # Errors
    ///
    /// Naming the invalid field.
    pub fn validate(&self) -> Result<(), config::Error> {
        if !(1..=5).contains(&self.replicas) {
            return Err(config::Error::field(
                "streams.replicas",
                "must be between 1 and 5",
            ));
        }
        if self.retention < specs::DEDUP {
            return Err(config::Error::field(
                "streams.retention",
                format!(
                    "must be at least the duplicate window, {}",
                    humantime::format_duration(specs::DEDUP)
                ),
            ));
        }
        if self.command_ttl < specs::DEDUP {
            return Err(config::Error::field(
                "streams.command-ttl",
                format!(
                    "must be at least the duplicate window, {}: a command re-published after \
                     it expired would be dropped as a duplicate",
                    humantime::format_duration(specs::DEDUP)
                ),
            ));
        }
        if self.finished_retention < Duration::from_secs(1) {
            return Err(config::Error::field(
                "streams.finished-retention",
                "must be at least 1s",
            ));
        }
        if self.max_bytes < bytesize::ByteSize::mib(1) {
            return Err(config::Error::field(
                "streams.max-bytes",
                "must be at least 1 MiB",
            ));
        }
        Ok(())
    }
}

/// What kind of provisioning failure this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No JetStream on the server or account.
    NoJetStream,
    /// An existing stream or bucket has other settings.
    Mismatch,
    /// The server cannot reserve a stream's byte bound.
    NoStorage,
    /// A JetStream request failed.
    Api,
}

/// Why a stream or bucket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server has no JetStream, or the account may not use it.
    #[error("JetStream is not available on this server: {0}")]
    NoJetStream(#[source] async_nats::Error),
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
    /// The server's JetStream storage cannot hold one more stream of `streams.max-bytes`.
    #[error(
        "stream {stream} needs {max_bytes} of JetStream storage reserved (streams.max-bytes) and \
         the server has no room for it: raise nats-server's jetstream max_file_store \
         (max_memory_store with memory storage; by default it is 75% of the disk that is free \
         when the server starts) or lower streams.max-bytes"
    )]
    NoStorage {
        /// The stream.
        stream: String,
        /// Its byte bound.
        max_bytes: bytesize::ByteSize,
        /// The server's answer.
        #[source]
        source: async_nats::Error,
    },
    /// A JetStream API call failed.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: async_nats::Error,
    },
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NoJetStream(_) => ErrorKind::NoJetStream,
            Self::Mismatch { .. } => ErrorKind::Mismatch,
            Self::NoStorage { .. } => ErrorKind::NoStorage,
            Self::Api { .. } => ErrorKind::Api,
        }
    }
}

fn api<E: Into<async_nats::Error>>(what: impl Into<String>) -> impl FnOnce(E) -> Error {
    let what = what.into();
    move |source| Error::Api {
        what,
        source: source.into(),
    }
}

/// The JetStream config of `spec` with the operator's settings (the default retention of the
/// spec is replaced by `streams.retention`).
pub fn config(spec: &Spec, settings: &Streams) -> stream::Config {
    let max_age = if spec.max_age == specs::DEFAULT_RETENTION {
        settings.retention
    } else {
        spec.max_age
    };
    let retention = match spec.retention {
        Retention::Limits => stream::RetentionPolicy::Limits,
        Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
    };
    stream::Config {
        name: spec.name.to_owned(),
        subjects: spec.subjects.iter().map(|s| (*s).to_owned()).collect(),
        retention,
        storage: settings.storage.into(),
        num_replicas: settings.replicas.max(1),
        max_age,
        max_messages_per_subject: spec.max_msgs_per_subject.unwrap_or(-1),
        allow_direct: spec.allow_direct,
        allow_message_schedules: spec.allow_msg_schedules,
        allow_message_ttl: spec.allow_msg_ttl,
        duplicate_window: spec.duplicate_window,
        allow_rollup: spec.allow_rollup,
        max_bytes: i64::try_from(spec.max_bytes.unwrap_or(settings.max_bytes.as_u64()))
            .unwrap_or(i64::MAX),
        discard: if spec.discard_new {
            stream::DiscardPolicy::New
        } else {
            stream::DiscardPolicy::Old
        },
        ..Default::default()
    }
}

/// Fails with [`Error::NoJetStream`] unless the account can use JetStream.
///
/// # Errors
///
/// [`Error::NoJetStream`].
pub async fn check_jetstream(js: &jetstream::Context) -> Result<(), Error> {
    js.query_account()
        .await
        .map(|_| ())
        .map_err(|e| Error::NoJetStream(e.into()))
}

/// Creates or checks each of `specs` with `settings`.
///
/// # Errors
///
/// [`Error::Mismatch`] naming the first setting that differs; [`Error::Api`] when JetStream
/// cannot be asked.
pub async fn ensure_all(
    js: &jetstream::Context,
    specs: &[&Spec],
    settings: &Streams,
) -> Result<(), Error> {
    for spec in specs {
        ensure(js, spec, settings).await?;
    }
    Ok(())
}

/// Creates the stream of `spec` when it is missing; checks it when it exists.
///
/// # Errors
///
/// As [`ensure_all`].
pub async fn ensure(
    js: &jetstream::Context,
    spec: &Spec,
    settings: &Streams,
) -> Result<stream::Stream, Error> {
    ensure_config(js, config(spec, settings)).await
}

async fn ensure_config(
    js: &jetstream::Context,
    wanted: stream::Config,
) -> Result<stream::Stream, Error> {
    let mut existing = match js.get_stream(&wanted.name).await {
        Ok(stream) => stream,
        Err(e) if is_not_found(&e) => match js.create_stream(wanted.clone()).await {
            Ok(stream) => return Ok(stream),
            // Another process may have created it between the look-up and the create.
            Err(create) => match js.get_stream(&wanted.name).await {
                Ok(stream) => stream,
                Err(_) if is_out_of_storage(&create) => {
                    return Err(Error::NoStorage {
                        stream: wanted.name.clone(),
                        max_bytes: bytesize::ByteSize::b(
                            u64::try_from(wanted.max_bytes).unwrap_or(0),
                        ),
                        source: create.into(),
                    });
                }
                Err(_) => return Err(api(format!("create stream {}", wanted.name))(create)),
            },
        },
        Err(e) => return Err(api(format!("look up stream {}", wanted.name))(e)),
    };
    let found = existing
        .info()
        .await
        .map_err(api(format!("stream info {}", wanted.name)))?
        .config
        .clone();
    verify(&found, &wanted)?;
    Ok(existing)
}

fn is_out_of_storage(e: &jetstream::context::CreateStreamError) -> bool {
    matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(ref j)
        if j.error_code() == jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED)
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// Compares an existing stream's config with the wanted one, setting by setting.
///
/// # Errors
///
/// [`Error::Mismatch`] naming the first setting that differs.
pub fn verify(found: &stream::Config, wanted: &stream::Config) -> Result<(), Error> {
    fn check<T: PartialEq + std::fmt::Debug>(
        stream: &str,
        setting: &'static str,
        found: &T,
        wanted: &T,
    ) -> Result<(), Error> {
        if found == wanted {
            return Ok(());
        }
        Err(Error::Mismatch {
            stream: stream.to_owned(),
            setting,
            found: format!("{found:?}"),
            needed: format!("{wanted:?}"),
        })
    }
    let name = wanted.name.as_str();
    // The server reports "no limit" as -1 where a create may have said 0.
    let per_subject = |n: i64| if n <= 0 { -1 } else { n };
    check(name, "subjects", &found.subjects, &wanted.subjects)?;
    check(
        name,
        "allow_direct",
        &found.allow_direct,
        &wanted.allow_direct,
    )?;
    check(
        name,
        "allow_msg_schedules",
        &found.allow_message_schedules,
        &wanted.allow_message_schedules,
    )?;
    check(
        name,
        "allow_msg_ttl",
        &found.allow_message_ttl,
        &wanted.allow_message_ttl,
    )?;
    check(
        name,
        "max_msgs_per_subject",
        &per_subject(found.max_messages_per_subject),
        &per_subject(wanted.max_messages_per_subject),
    )?;
    check(name, "retention", &found.retention, &wanted.retention)?;
    check(name, "storage", &found.storage, &wanted.storage)?;
    check(
        name,
        "replicas",
        &found.num_replicas.max(1),
        &wanted.num_replicas.max(1),
    )?;
    check(name, "max_age", &found.max_age, &wanted.max_age)?;
    check(name, "max_bytes", &found.max_bytes, &wanted.max_bytes)?;
    check(name, "discard", &found.discard, &wanted.discard)?;
    check(
        name,
        "allow_rollup",
        &found.allow_rollup,
        &wanted.allow_rollup,
    )?;
    check(
        name,
        "duplicate_window",
        &found.duplicate_window,
        &wanted.duplicate_window,
    )?;
    Ok(())
}

/// How long the server keeps the delete marker it leaves when a KV record's TTL expires: the
/// shortest it allows, so an expired key's subject is gone a second later.
pub const BUCKET_MARKER_TTL: Duration = Duration::from_secs(1);

/// The KV bucket `name` (one value per key, per-message TTLs allowed), created with
/// `settings` when missing and checked (history, storage, replicas, TTLs) when it exists.
///
/// # Errors
///
/// [`Error::Mismatch`] for a bucket with other settings; [`Error::Api`] when it can be neither
/// opened nor created.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    name: &str,
    description: &str,
    settings: &Streams,
) -> Result<kv::Store, Error> {
    let wanted = kv::Config {
        bucket: name.to_owned(),
        description: description.to_owned(),
        history: 1,
        num_replicas: settings.replicas.max(1),
        storage: settings.storage.into(),
        // Per-message TTLs, so final records can expire (`kv::write_with_ttl`).
        limit_markers: Some(BUCKET_MARKER_TTL),
        ..Default::default()
    };
    let store = match js.get_key_value(name).await {
        Ok(store) => store,
        Err(_) => match js.create_key_value(wanted.clone()).await {
            Ok(store) => return Ok(store),
            // Another instance may have created it meanwhile.
            Err(create) => js
                .get_key_value(name)
                .await
                .map_err(|_| api(format!("create bucket {name}"))(create))?,
        },
    };
    let mut stream = js
        .get_stream(format!("KV_{name}"))
        .await
        .map_err(api(format!("look up bucket {name}")))?;
    let found = stream
        .info()
        .await
        .map_err(api(format!("bucket info {name}")))?
        .config
        .clone();
    let mismatch = |setting, found: String, needed: String| Error::Mismatch {
        stream: found_name(name),
        setting,
        found,
        needed,
    };
    if found.max_messages_per_subject != wanted.history {
        return Err(mismatch(
            "history",
            found.max_messages_per_subject.to_string(),
            wanted.history.to_string(),
        ));
    }
    if !found.allow_message_ttl {
        return Err(mismatch(
            "allow_msg_ttl",
            "false".to_owned(),
            "true".to_owned(),
        ));
    }
    if found.storage != wanted.storage {
        return Err(mismatch(
            "storage",
            format!("{:?}", found.storage),
            format!("{:?}", wanted.storage),
        ));
    }
    if found.num_replicas.max(1) != wanted.num_replicas {
        return Err(mismatch(
            "replicas",
            found.num_replicas.to_string(),
            wanted.num_replicas.to_string(),
        ));
    }
    Ok(store)
}

fn found_name(bucket: &str) -> String {
    format!("KV_{bucket}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_map_one_to_one() {
        let settings = Streams {
            replicas: 3,
            ..Streams::default()
        };
        let replies = config(&specs::REPLIES, &settings);
        assert_eq!(replies.name, "JETSAGA_REPLIES");
        assert_eq!(
            replies.subjects,
            vec![jetsaga_sagas::protocol::subject::REPLIES.to_owned()]
        );
        assert!(replies.allow_direct);
        assert_eq!(replies.num_replicas, 3);
        assert_eq!(replies.max_age, specs::REPLIES.max_age);
        assert_eq!(replies.max_messages_per_subject, -1);
        let memory = Streams {
            storage: Storage::Memory,
            retention: Duration::from_secs(3600),
            ..Streams::default()
        };
        let timers = config(&specs::TIMERS, &memory);
        assert_eq!(timers.num_replicas, 1);
        assert_eq!(timers.max_messages_per_subject, 1);
        assert_eq!(timers.max_age, Duration::from_secs(3600));
        assert!(timers.allow_message_schedules && timers.allow_message_ttl);
        assert_eq!(timers.storage, stream::StorageType::Memory);
        let dead = config(&specs::DEAD_LETTERS, &memory);
        assert_eq!(
            dead.max_age,
            specs::DEAD_LETTERS.max_age,
            "not a retention stream"
        );
    }
}
