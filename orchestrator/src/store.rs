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
use jetsaga_sagas::protocol::{Body, header};
use jetsaga_sagas::{Action, Definition, Entry, Saga};
use serde::{Deserialize, Serialize};

/// The subject of a saga's journal.
pub fn journal_subject(saga_id: &str) -> String {
    format!("saga.journal.{saga_id}")
}

/// A command or event a transition published, recorded by reference so that a
/// transition interrupted after its record was stored can be completed later
/// (the body is rebuilt from the saga, see [`outbound`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Effect {
    /// A command, by id.
    Command {
        /// Its command id.
        id: String,
    },
    /// A domain event.
    Event {
        /// Its name.
        name: String,
        /// When it occurred.
        at: DateTime<Utc>,
    },
}

/// A message ready to publish.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// Where it goes.
    pub subject: String,
    /// Its `Nats-Msg-Id`, for JetStream de-duplication.
    pub msg_id: String,
    /// Further headers (saga id, step, attempt, command id, trace context).
    pub headers: Vec<(&'static str, String)>,
    /// The JSON body.
    pub body: Bytes,
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
    pub effects: Vec<Effect>,
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

/// The message an action publishes and the effect that records it; `None` for
/// actions that publish nothing (timers, finish).
pub fn outbound(action: &Action, traceparent: Option<&str>) -> Option<(Effect, Outbound)> {
    let trace = traceparent.map(|tp| (header::TRACEPARENT, tp.to_owned()));
    match action {
        Action::Send { subject, command } => {
            let mut headers = vec![
                (header::SAGA_ID, command.saga_id.clone()),
                (header::SAGA_TYPE, command.saga_type.clone()),
                (header::STEP, command.step.clone()),
                (header::ATTEMPT, command.attempt.to_string()),
                (header::COMMAND_ID, command.command_id.clone()),
            ];
            headers.extend(trace);
            let effect = Effect::Command {
                id: command.command_id.clone(),
            };
            let message = Outbound {
                subject: subject.clone(),
                msg_id: command.command_id.clone(),
                headers,
                body: Bytes::from(command.encode()),
            };
            Some((effect, message))
        }
        Action::Publish { subject, event } => {
            let mut headers = vec![
                (header::SAGA_ID, event.saga_id.clone()),
                (header::SAGA_TYPE, event.saga_type.clone()),
            ];
            headers.extend(trace);
            let effect = Effect::Event {
                name: event.event.clone(),
                at: event.occurred_at,
            };
            let message = Outbound {
                msg_id: format!("{}:{}", event.saga_id, event.event),
                subject: subject.clone(),
                headers,
                body: Bytes::from(event.encode()),
            };
            Some((effect, message))
        }
        Action::SetTimer { .. } | Action::ClearTimer | Action::Finish { .. } => None,
    }
}

/// The messages of a stored record's effects, rebuilt from its saga.
pub fn rebuild(record: &Record, def: &Definition) -> Vec<Outbound> {
    let saga = &record.saga;
    record
        .effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Command { id } => saga.resend(def, id),
            Effect::Event { name, at } => Some(saga.event(name, *at)),
        })
        .filter_map(|action| outbound(&action, saga.traceparent.as_deref()).map(|(_, m)| m))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_effects_rebuild_the_same_messages() {
        let def = Definition::parse("order.toml", crate::definitions::ORDER_CREATION).unwrap();
        let input = serde_json::json!({"customer_id": "c", "email": "a@b.co",
            "items": [{"sku": "sku-1", "quantity": 1}], "amount_cents": 10, "currency": "EUR",
            "card_token": "tok_decline"});
        let now = Utc::now();
        let (mut saga, _) = Saga::start(
            &def,
            "s1".into(),
            "k".into(),
            input,
            Some("00-a-b-01".into()),
            now,
        )
        .unwrap();
        let reserve = jetsaga_sagas::Input::Reply {
            command_id: "s1:reserve-stock:do:1".into(),
            outcome: jetsaga_sagas::protocol::Outcome::Ok {
                result: serde_json::Value::Null,
            },
        };
        saga.apply(&def, reserve, now).unwrap();
        let decline = jetsaga_sagas::Input::Reply {
            command_id: "s1:take-payment:do:1".into(),
            outcome: jetsaga_sagas::protocol::Outcome::Failed {
                error: jetsaga_sagas::protocol::Failure::new("card_declined", "no", false),
            },
        };
        let transition = saga.apply(&def, decline, now).unwrap();
        let (effects, messages): (Vec<_>, Vec<_>) = transition
            .actions
            .iter()
            .filter_map(|a| outbound(a, saga.traceparent.as_deref()))
            .unzip();
        assert_eq!(
            effects,
            vec![Effect::Command {
                id: "s1:reserve-stock:undo:1".into()
            }]
        );
        let record = Record {
            entry: transition.entry,
            saga,
            effects,
            timer_at: None,
        };
        let stored: Record = serde_json::from_slice(&serde_json::to_vec(&record).unwrap()).unwrap();
        let rebuilt = rebuild(&stored, &def);
        assert_eq!(rebuilt.len(), messages.len());
        for (a, b) in rebuilt.iter().zip(&messages) {
            assert_eq!(
                (&a.subject, &a.msg_id, &a.headers, &a.body),
                (&b.subject, &b.msg_id, &b.headers, &b.body)
            );
        }
    }
}
