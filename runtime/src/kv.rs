//! Reading and compare-and-set writing of KV records, the way every participant keeps state.
//!
//! A write may carry a TTL (`Nats-TTL`, in a bucket created with TTL support by
//! [`crate::streams::ensure_bucket`]): the key, and its subject in the server's index, is gone
//! that long after the write. Participants write their final records so.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;

/// A KV request failed (not a conflict: those are answers, see [`write`]).
#[derive(Debug, thiserror::Error)]
#[error("kv {what} {key}: {source}")]
pub struct Error {
    /// `read`, `create`, `update` or `keys`.
    pub what: &'static str,
    /// The key.
    pub key: String,
    /// What the server or client said.
    #[source]
    pub source: async_nats::Error,
}

fn failed<E: Into<async_nats::Error>>(what: &'static str, key: &str) -> impl FnOnce(E) -> Error {
    let key = key.to_owned();
    move |e| Error {
        what,
        key,
        source: e.into(),
    }
}

/// Where a read is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Any replica (direct get when the bucket allows it): may miss the latest writes, which
    /// is fine for a decision that then writes under compare-and-set.
    Any,
    /// The stream leader (`STREAM.MSG.GET`): for decisions that write nothing, which no
    /// compare-and-set would catch if the read were stale.
    Leader,
}

/// The value and revision of `key`, or `None` if it is absent or deleted.
///
/// # Errors
///
/// [`Error`] if the bucket cannot be read.
pub async fn entry(
    store: &kv::Store,
    key: &str,
    read: Read,
) -> Result<Option<(Bytes, u64)>, Error> {
    match read {
        Read::Any => match store.entry(key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                Ok(Some((entry.value, entry.revision)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(failed("read", key)(e)),
        },
        Read::Leader => {
            // What `Store::entry` does when the bucket has no direct get.
            let subject = format!("{}{key}", store.prefix);
            match store.stream.get_last_raw_message_by_subject(&subject).await {
                Ok(message) => {
                    // A delete, a purge, or the marker the server leaves when a TTL expires.
                    let deleted = message
                        .headers
                        .get("KV-Operation")
                        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
                        || message.headers.get("Nats-Marker-Reason").is_some();
                    Ok((!deleted).then_some((message.payload, message.sequence)))
                }
                Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
                Err(e) => Err(failed("read", key)(e)),
            }
        }
    }
}

/// Writes `value` if the record is still at `revision` (`None`: absent) and returns the new
/// revision; `None` on a conflict (re-read and decide again). The record stays until
/// overwritten; see [`write_with_ttl`] for one that expires.
///
/// # Errors
///
/// [`Error`] if the write failed for another reason than a conflict.
pub async fn write(
    store: &kv::Store,
    key: &str,
    value: Bytes,
    revision: Option<u64>,
) -> Result<Option<u64>, Error> {
    match revision {
        None => match store.create(key, value).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists || is_conflict(&e) => Ok(None),
            Err(e) => Err(failed("create", key)(e)),
        },
        Some(revision) => match store.update(key, value, revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if is_conflict(&e) => Ok(None),
            Err(e) => Err(failed("update", key)(e)),
        },
    }
}

/// Whether a write failed because its `Nats-Expected-Last-Subject-Sequence` (a KV
/// revision, a journal's last record) no longer matched: a conflict to re-read and decide
/// again on, not a failure. Looks through `error`'s sources (a KV update error wraps the
/// publish error, which wraps the server's).
///
/// A single server answers a lost compare-and-set with error code 10071, which async-nats
/// 0.51 maps to `WrongLastSequence`; a clustered stream's leader answers 10164
/// (`JSStreamWrongLastSequenceConstantErr`), which it leaves as `Other`. Both are conflicts.
pub fn is_conflict(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(e) = e.downcast_ref::<jetstream::context::PublishError>()
            && e.kind() == PublishErrorKind::WrongLastSequence
        {
            return true;
        }
        if let Some(e) = e.downcast_ref::<kv::UpdateError>()
            && e.kind() == kv::UpdateErrorKind::WrongLastRevision
        {
            return true;
        }
        if let Some(e) = e.downcast_ref::<jetstream::Error>()
            && matches!(
                e.error_code(),
                jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                    | jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
            )
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// The `Nats-TTL` header value of `ttl`: whole seconds (as async-nats writes it), at least one.
pub fn ttl_header(ttl: Duration) -> String {
    ttl.as_secs().max(1).to_string()
}

/// [`write`], and the record (its key, and the key's subject in the server's index) expires
/// `ttl` after this write (whole seconds, at least one). `js` is the JetStream context the
/// put goes through (the one `store` was opened with). The bucket must allow per-message TTLs.
///
/// # Errors
///
/// [`Error`] if the write failed for another reason than a conflict.
pub async fn write_with_ttl(
    js: &jetstream::Context,
    store: &kv::Store,
    key: &str,
    value: Bytes,
    revision: Option<u64>,
    ttl: Duration,
) -> Result<Option<u64>, Error> {
    let Some(revision) = revision else {
        return match store.create_with_ttl(key, value, ttl).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists || is_conflict(&e) => Ok(None),
            Err(e) => Err(failed("create", key)(e)),
        };
    };
    // async-nats 0.51 has no update with a TTL: the put `Store::update` makes, plus `Nats-TTL`.
    if store.use_jetstream_prefix {
        return Err(failed("update", key)(
            "a write with a TTL needs the default JetStream API prefix",
        ));
    }
    let subject = format!(
        "{}{key}",
        store.put_prefix.as_ref().unwrap_or(&store.prefix)
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        revision.to_string(),
    );
    headers.insert(async_nats::header::NATS_MESSAGE_TTL, ttl_header(ttl));
    let published = match js.publish_with_headers(subject, headers, value).await {
        Ok(ack) => ack.await,
        Err(e) => Err(e),
    };
    match published {
        Ok(ack) => Ok(Some(ack.sequence)),
        Err(e) if is_conflict(&e) => Ok(None),
        Err(e) => Err(failed("update", key)(e)),
    }
}

/// Every key in the bucket.
///
/// # Errors
///
/// [`Error`] if the bucket cannot be listed.
pub async fn keys(store: &kv::Store) -> Result<Vec<String>, Error> {
    use futures::TryStreamExt;
    store
        .keys()
        .await
        .map_err(failed("keys", ""))?
        .try_collect()
        .await
        .map_err(failed("keys", ""))
}

/// Every live key of the bucket with its value, each read from the stream leader: for audits
/// and checks, which must not take a lagging replica's older copy for the state.
///
/// # Errors
///
/// [`Error`] if the bucket cannot be listed or read.
pub async fn values(store: &kv::Store) -> Result<Vec<(String, Bytes)>, Error> {
    let mut out = Vec::new();
    for key in keys(store).await? {
        if let Some((value, _)) = entry(store, &key, Read::Leader).await? {
            out.push((key, value));
        }
    }
    Ok(out)
}
