//! Saga persistence on the journal stream.
//!
//! Each saga has one subject, `saga.journal.<saga id>`. Every transition appends
//! one [`Record`]: the journal so far, the saga's state after it and the effects
//! it caused. The last record is therefore both the current state and the audit
//! log. Appends carry `Nats-Expected-Last-Subject-Sequence`, so two writers can
//! never both apply a transition to the same state: the loser reloads and
//! re-applies. A finished saga's record rolls the subject up and expires (see
//! [`crate::record::headers`]).

use async_nats::HeaderMap;
use async_nats::jetstream::context::{GetStreamError, PublishError, PublishErrorKind};
use async_nats::jetstream::stream::{
    DirectGetError, DirectGetErrorKind, LastRawMessageError, LastRawMessageErrorKind,
};
use async_nats::jetstream::{self};
use bytes::Bytes;
use jetsaga_runtime::nats::put_header;
use jetsaga_sagas::protocol::{header, subject};

pub use crate::record::{Effect, Outbound, Record, Stored, headers, outbound, rebuild};

/// The subject of a saga's journal.
pub fn journal_subject(saga_id: &str) -> String {
    subject::journal(saga_id)
}

/// What kind of failure a store operation had; callers branch on this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Another writer appended first: reload and re-apply.
    Conflict,
    /// A stored record cannot be read (or a record cannot be written): retrying
    /// will not help until the journal or the code is fixed.
    Corrupt,
    /// JetStream did not answer in time.
    Timeout,
    /// JetStream refused or the connection failed.
    Unavailable,
    /// The record is larger than the server's `max_payload`: retrying will
    /// never store it.
    TooLarge,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Someone else appended first: reload and re-apply.
    #[error("concurrent update of saga")]
    Conflict,
    /// A stored record could not be decoded.
    #[error("corrupt journal record at sequence {seq}")]
    Corrupt {
        /// Where.
        seq: u64,
        /// Why.
        #[source]
        source: crate::record::CodecError,
    },
    /// A record could not be encoded.
    #[error("cannot encode a journal record")]
    Encode(#[source] crate::record::CodecError),
    /// The journal stream could not be bound.
    #[error("cannot open the journal stream")]
    Open(#[source] GetStreamError),
    /// A read failed.
    #[error("cannot read the journal")]
    Read(#[source] DirectGetError),
    /// A read from the stream leader failed.
    #[error("cannot read the journal from its leader")]
    ReadLeader(#[source] LastRawMessageError),
    /// The journal's sagas could not be listed.
    #[error("cannot list the journal's sagas")]
    List(#[source] async_nats::jetstream::stream::InfoError),
    /// An append failed (other than by a conflict).
    #[error("cannot append to the journal")]
    Append(#[source] PublishError),
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Conflict => ErrorKind::Conflict,
            Error::Corrupt { .. } | Error::Encode(_) => ErrorKind::Corrupt,
            Error::Read(e) if e.kind() == DirectGetErrorKind::TimedOut => ErrorKind::Timeout,
            Error::Append(e) if e.kind() == PublishErrorKind::TimedOut => ErrorKind::Timeout,
            Error::Append(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                ErrorKind::TooLarge
            }
            Error::Open(_)
            | Error::Read(_)
            | Error::ReadLeader(_)
            | Error::List(_)
            | Error::Append(_) => ErrorKind::Unavailable,
        }
    }
}

/// Reads and appends saga journals.
#[derive(Debug, Clone)]
pub struct Store {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
}

impl Store {
    /// Binds to the journal stream (which provisioning created).
    pub async fn new(js: jetstream::Context) -> Result<Self, Error> {
        let stream = js
            .get_stream(jetsaga_sagas::streams::JOURNAL.name)
            .await
            .map_err(Error::Open)?;
        Ok(Self { js, stream })
    }

    /// The current state of a saga: the last record of its journal. `leader`
    /// reads from the stream leader (after a conflict, a replica may lag).
    pub async fn load(&self, saga_id: &str, leader: bool) -> Result<Option<Stored>, Error> {
        let subject = journal_subject(saga_id);
        let message = if leader {
            match self.stream.get_last_raw_message_by_subject(&subject).await {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {
                    return Ok(None);
                }
                Err(e) => return Err(Error::ReadLeader(e)),
            }
        } else {
            match self.stream.direct_get_last_for_subject(&subject).await {
                Ok(m) => m,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::Read(e)),
            }
        };
        decode(message.sequence, &message.payload).map(|record| {
            Some(Stored {
                record,
                seq: message.sequence,
            })
        })
    }

    /// Appends an encoded record with its `headers` (see
    /// [`crate::record::headers`]) if the journal's last sequence is still
    /// `expected` (0: new saga).
    pub async fn append_encoded(
        &self,
        saga_id: &str,
        record_headers: &[(&'static str, String)],
        body: Bytes,
        expected: u64,
    ) -> Result<u64, Error> {
        let headers = append_headers(record_headers, expected);
        let ack = self
            .js
            .publish_with_headers(journal_subject(saga_id), headers, body)
            .await
            .map_err(Error::Append)?
            .await;
        match ack {
            Ok(ack) => Ok(ack.sequence),
            // Either code a lost compare-and-set gets (one server, or a cluster).
            Err(e) if jetsaga_runtime::kv::is_conflict(&e) => Err(Error::Conflict),
            Err(e) => Err(Error::Append(e)),
        }
    }

    /// The id of every saga in the journal (one subject each), from the stream's
    /// subject listing: one request per page of subjects, not per saga.
    pub async fn saga_ids(&self) -> Result<Vec<String>, Error> {
        use futures::TryStreamExt;
        let prefix = journal_subject("");
        let subjects = self
            .stream
            .info_with_subjects(journal_subject(">"))
            .await
            .map_err(Error::List)?;
        subjects
            .map_ok(|(subject, _)| subject.strip_prefix(&prefix).unwrap_or(&subject).to_owned())
            .try_collect()
            .await
            .map_err(Error::List)
    }

    /// A saga's journal, oldest first (empty for an unknown saga): its last
    /// record carries it, so this is one read.
    pub async fn history(&self, saga_id: &str) -> Result<Vec<jetsaga_sagas::Entry>, Error> {
        Ok(self
            .load(saga_id, false)
            .await?
            .map(|stored| stored.record.journal())
            .unwrap_or_default())
    }
}

/// The headers of an append: the record's (see [`headers`]) and the
/// expected last sequence of the saga's subject (0: new saga).
pub fn append_headers(record_headers: &[(&'static str, String)], expected: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in record_headers {
        put_header(&mut headers, name, value.as_str());
    }
    put_header(
        &mut headers,
        header::EXPECTED_LAST_SUBJECT_SEQUENCE,
        expected.to_string(),
    );
    headers
}

fn decode(seq: u64, payload: &[u8]) -> Result<Record, Error> {
    Record::decode(payload).map_err(|source| Error::Corrupt { seq, source })
}
