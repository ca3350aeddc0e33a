//! Saga persistence on the journal stream.
//!
//! Each saga has one subject, `saga.journal.<saga id>`. Every transition appends
//! one [`Record`]: the journal entry plus the saga's state after it and the
//! effects it caused. The last record is therefore the current state, and the
//! whole subject is the saga's audit log. Appends carry
//! `Nats-Expected-Last-Subject-Sequence`, so two writers can never both apply a
//! transition to the same state: the loser reloads and re-applies.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream::DirectGetErrorKind};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use jetsaga_sagas::protocol::{self, header};
use jetsaga_sagas::{Entry, Saga};
use serde::{Deserialize, Serialize};

/// The subject of a saga's journal.
pub fn journal_subject(saga_id: &str) -> String {
    format!("saga.journal.{saga_id}")
}

/// One command or event a transition publishes; kept in the record so that a
/// transition interrupted after its record was stored can be completed later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outbound {
    /// Where it goes.
    pub subject: String,
    /// Its `Nats-Msg-Id`, for JetStream de-duplication.
    pub msg_id: String,
    /// Further headers (saga id, step, attempt, command id, trace context).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The JSON body.
    pub body: serde_json::Value,
}

/// One message of the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// What happened.
    pub entry: Entry,
    /// The saga after it.
    pub saga: Saga,
    /// What it caused to be published.
    #[serde(default)]
    pub effects: Vec<Outbound>,
    /// The saga's armed timer after it, if any.
    #[serde(default)]
    pub timer_at: Option<DateTime<Utc>>,
}

/// A record with its stream sequence (the CAS token for the next append).
#[derive(Debug, Clone)]
pub struct Stored {
    /// The record.
    pub record: Record,
    /// Its sequence in the journal stream.
    pub seq: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Someone else appended first: reload and re-apply.
    #[error("concurrent update of saga")]
    Conflict,
    /// A stored record could not be decoded.
    #[error("corrupt journal record at sequence {seq}: {reason}")]
    Corrupt {
        /// Where.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// NATS failed.
    #[error("journal: {0}")]
    Nats(String),
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
            .map_err(|e| Error::Nats(e.to_string()))?;
        Ok(Self { js, stream })
    }

    /// The current state of a saga: the last record of its journal. `leader`
    /// reads from the stream leader (after a conflict, a replica may lag).
    pub async fn load(&self, saga_id: &str, leader: bool) -> Result<Option<Stored>, Error> {
        let subject = journal_subject(saga_id);
        let message = if leader {
            match self.stream.get_last_raw_message_by_subject(&subject).await {
                Ok(m) => m,
                Err(e)
                    if matches!(
                        e.kind(),
                        jetstream::stream::LastRawMessageErrorKind::NoMessageFound
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(Error::Nats(e.to_string())),
            }
        } else {
            match self.stream.direct_get_last_for_subject(&subject).await {
                Ok(m) => m,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::Nats(e.to_string())),
            }
        };
        decode(message.sequence, &message.payload).map(|record| {
            Some(Stored {
                record,
                seq: message.sequence,
            })
        })
    }

    /// Appends a record if the journal's last sequence is still `expected` (0: new saga).
    pub async fn append(
        &self,
        saga_id: &str,
        record: &Record,
        expected: u64,
    ) -> Result<u64, Error> {
        let mut headers = HeaderMap::new();
        headers.insert(header::SAGA_ID, saga_id);
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        let body =
            serde_json::to_vec(record).map_err(|e| Error::Nats(format!("encode record: {e}")))?;
        let ack = self
            .js
            .publish_with_headers(journal_subject(saga_id), headers, Bytes::from(body))
            .await
            .map_err(|e| Error::Nats(e.to_string()))?
            .await;
        match ack {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(Error::Conflict),
            Err(e) => Err(Error::Nats(e.to_string())),
        }
    }

    /// Every record of a saga's journal, oldest first.
    pub async fn history(&self, saga_id: &str) -> Result<Vec<Record>, Error> {
        let subject = journal_subject(saga_id);
        let mut records = Vec::new();
        let mut next = 0;
        loop {
            let message = match self
                .stream
                .direct_get_next_for_subject(&subject, Some(next))
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(Error::Nats(e.to_string())),
            };
            records.push(decode(message.sequence, &message.payload)?);
            next = message.sequence + 1;
        }
        Ok(records)
    }
}

fn decode(seq: u64, payload: &[u8]) -> Result<Record, Error> {
    serde_json::from_slice(payload).map_err(|e| Error::Corrupt {
        seq,
        reason: e.to_string(),
    })
}

/// A command as it is published and recorded.
pub fn outbound_command(
    command: &protocol::Command,
    subject: String,
    traceparent: Option<&str>,
) -> Outbound {
    let mut headers = vec![
        (header::SAGA_ID.to_owned(), command.saga_id.clone()),
        (header::SAGA_TYPE.to_owned(), command.saga_type.clone()),
        (header::STEP.to_owned(), command.step.clone()),
        (header::ATTEMPT.to_owned(), command.attempt.to_string()),
        (header::COMMAND_ID.to_owned(), command.command_id.clone()),
    ];
    if let Some(tp) = traceparent {
        headers.push((header::TRACEPARENT.to_owned(), tp.to_owned()));
    }
    Outbound {
        subject,
        msg_id: command.command_id.clone(),
        headers,
        body: serde_json::to_value(command).unwrap_or_default(),
    }
}

/// A domain event as published and recorded; its msg id makes re-publishing harmless.
pub fn outbound_event(
    event: &protocol::Event,
    subject: String,
    traceparent: Option<&str>,
) -> Outbound {
    let mut headers = vec![
        (header::SAGA_ID.to_owned(), event.saga_id.clone()),
        (header::SAGA_TYPE.to_owned(), event.saga_type.clone()),
    ];
    if let Some(tp) = traceparent {
        headers.push((header::TRACEPARENT.to_owned(), tp.to_owned()));
    }
    Outbound {
        msg_id: format!("{}:{}", event.saga_id, event.event),
        subject,
        headers,
        body: serde_json::to_value(event).unwrap_or_default(),
    }
}
