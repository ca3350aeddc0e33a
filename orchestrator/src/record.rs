//! The journal's record format and the messages a record implies, with no I/O.
//!
//! Every transition appends one [`Record`] to the saga's journal subject: the
//! journal entry (and the entries before it), the saga after it, the effects it
//! caused and the armed timer. The effects are kept by reference, so a
//! transition interrupted after its record was stored is completed later from
//! the record alone ([`rebuild`]). Because each record carries the whole
//! journal, the journal stream keeps one message per subject (each record
//! replaces the one before), and a finished saga's record expires with a TTL
//! ([`headers`]): what a finished saga keeps is one message, for a bounded time.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use jetsaga_sagas::protocol::{self, Body, header};
use jetsaga_sagas::{Action, Definition, Entry, Saga};
use serde::{Deserialize, Serialize};

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
    /// Whether it expires (a command, after `streams.command-ttl`); events are kept.
    pub expires: bool,
}

/// The most earlier entries a record carries; a saga that retried for days
/// keeps its newest ones and counts the rest in [`Record::omitted`].
pub(crate) const MAX_EARLIER: usize = 200;

/// One message of the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The journal before this record, oldest first (at most [`MAX_EARLIER`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<Entry>,
    /// How many of the oldest entries were dropped from `earlier`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted: u64,
    /// What happened.
    pub entry: Entry,
    /// The saga after it.
    pub saga: Saga,
    /// What it caused to be published. A record of an ignored input (which
    /// publishes nothing) carries the effects of the record before it, unless
    /// this instance saw them acknowledged: recovery completes the last record's
    /// effects only, so they must not be hidden behind it.
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

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Record {
    /// The record of `entry` following `previous` (none for a start): it carries
    /// the journal so far.
    pub fn next(
        previous: Option<&Record>,
        entry: Entry,
        saga: Saga,
        effects: Vec<Effect>,
        timer_at: Option<DateTime<Utc>>,
    ) -> Self {
        let (mut earlier, mut omitted) = match previous {
            Some(p) => {
                let mut earlier = Vec::with_capacity(p.earlier.len() + 1);
                earlier.extend_from_slice(&p.earlier);
                earlier.push(p.entry.clone());
                (earlier, p.omitted)
            }
            None => (Vec::new(), 0),
        };
        if earlier.len() > MAX_EARLIER {
            let drop = earlier.len() - MAX_EARLIER;
            earlier.drain(..drop);
            omitted += drop as u64;
        }
        Self {
            earlier,
            omitted,
            entry,
            saga,
            effects,
            timer_at,
        }
    }

    /// The saga's journal as this record knows it, oldest first.
    pub fn journal(&self) -> Vec<Entry> {
        let mut entries = self.earlier.clone();
        entries.push(self.entry.clone());
        entries
    }

    /// The record as it is stored: its JSON ([`Record::to_json`]) compressed
    /// into one zstd frame that states its size.
    pub fn encode(&self) -> Result<Bytes, CodecError> {
        let json = self.to_json().map_err(CodecError::Json)?;
        COMPRESSOR
            .with_borrow_mut(|c| c.compress(&json))
            .map(Bytes::from)
            .map_err(CodecError::Zstd)
    }

    /// The record as JSON, uncompressed (what [`Record::decode`] also accepts:
    /// the records of jetsaga before compression).
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// A stored record: a zstd frame of its JSON, or the JSON itself.
    pub fn decode(payload: &[u8]) -> Result<Self, CodecError> {
        if !payload.starts_with(&ZSTD_MAGIC) {
            return serde_json::from_slice(payload).map_err(CodecError::Json);
        }
        let size = match zstd::zstd_safe::get_frame_content_size(payload) {
            Ok(Some(size)) if size <= MAX_DECODED as u64 => size as usize,
            Ok(Some(size)) => return Err(CodecError::TooLarge(size)),
            _ => return Err(CodecError::NoSize),
        };
        let json = DECOMPRESSOR
            .with_borrow_mut(|d| d.decompress(payload, size))
            .map_err(CodecError::Zstd)?;
        serde_json::from_slice(&json).map_err(CodecError::Json)
    }
}

/// How a stored record starts when it is compressed (a zstd frame); JSON starts with `{`.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The largest JSON a stored record may decompress to: far above any record the
/// server's `max_payload` (at most 64 MiB) lets through at JSON's ratios, and a
/// bound on what a corrupt or hostile frame can make the orchestrator allocate.
const MAX_DECODED: usize = 256 << 20;

/// zstd's fastest level: records are ~3× smaller (a finished three-step saga's
/// ~2.7 KB of JSON in under 1 KB) for a few µs each.
const LEVEL: i32 = 1;

thread_local! {
    static COMPRESSOR: std::cell::RefCell<zstd::bulk::Compressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(LEVEL).expect("zstd level 1 exists"));
    static DECOMPRESSOR: std::cell::RefCell<zstd::bulk::Decompressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().expect("a zstd decompressor"));
}

/// Why a record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Its JSON is not a record.
    #[error("not a journal record: {0}")]
    Json(#[source] serde_json::Error),
    /// Its zstd frame is corrupt.
    #[error("corrupt zstd frame: {0}")]
    Zstd(#[source] std::io::Error),
    /// Its zstd frame does not state its size.
    #[error("zstd frame without its content size")]
    NoSize,
    /// Its zstd frame decompresses to more than a record may be.
    #[error("zstd frame of {0} bytes, above the {MAX_DECODED}-byte bound of a record")]
    TooLarge(u64),
}

/// The headers of a stored record: what the saga listing reads without the body
/// (id, type, phase, step, key, timer, start time) and, once the saga is
/// finished, the TTL (`finished_retention`) after which the record goes.
pub fn headers(
    record: &Record,
    finished_retention: std::time::Duration,
) -> Vec<(&'static str, String)> {
    let saga = &record.saga;
    let phase = saga.phase();
    let mut headers = vec![
        (header::SAGA_ID, saga.id.clone()),
        (header::SAGA_TYPE, saga.saga_type.clone()),
        (header::PHASE, phase.as_str().to_owned()),
        (header::CREATED, saga.created_at.to_rfc3339()),
    ];
    if let Some(step) = saga.current_step() {
        headers.push((header::STEP, step.to_owned()));
    }
    if saga.key.len() <= 256 && saga.key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        headers.push((header::KEY, saga.key.clone()));
    }
    if let Some(at) = record.timer_at {
        headers.push((header::TIMER_AT, at.to_rfc3339()));
    }
    if phase.is_finished() {
        headers.push((
            header::TTL,
            format!("{}s", finished_retention.as_secs().max(1)),
        ));
    }
    headers
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
            // A command names its attempt's span (see `crate::trace`), the same on every instance.
            headers.extend(traceparent.map(|tp| {
                (
                    header::TRACEPARENT,
                    protocol::command_traceparent(tp, &command.command_id),
                )
            }));
            let effect = Effect::Command {
                id: command.command_id.clone(),
            };
            let message = Outbound {
                subject: subject.clone(),
                msg_id: command.command_id.clone(),
                headers,
                body: Bytes::from(command.encode()),
                expires: true,
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
                expires: false,
            };
            Some((effect, message))
        }
        Action::SetTimer { .. }
        | Action::ClearTimer
        | Action::Finish { .. }
        | Action::Park { .. } => None,
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

/// A started order-creation saga, for the tests of this crate.
#[cfg(test)]
pub(crate) fn started_order(
    saga_id: &str,
    card: &str,
    traceparent: Option<&str>,
    now: DateTime<Utc>,
) -> (std::sync::Arc<Definition>, Saga, jetsaga_sagas::Transition) {
    let def = crate::definitions::Registry::builtin()
        .latest("order-creation")
        .cloned()
        .expect("the built-in definition");
    let input = serde_json::json!({"customer_id": "c", "email": "a@b.co",
        "items": [{"sku": "sku-1", "quantity": 1}], "amount_cents": 10, "currency": "EUR",
        "card_token": card});
    let key = format!("key-of-{saga_id}");
    let (saga, transition) = Saga::start(
        &def,
        saga_id.to_owned(),
        key,
        input,
        traceparent.map(str::to_owned),
        now,
    )
    .expect("a valid order");
    (def, saga, transition)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_effects_rebuild_the_same_messages() {
        let now = Utc::now();
        let (def, mut saga, _) = started_order("s1", "tok_decline", Some("00-a-b-01"), now);
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
        let record = Record::next(None, transition.entry, saga, effects, None);
        let stored = Record::decode(&record.encode().unwrap()).unwrap();
        let rebuilt = rebuild(&stored, &def);
        assert_eq!(rebuilt.len(), messages.len());
        for (a, b) in rebuilt.iter().zip(&messages) {
            assert_eq!(
                (&a.subject, &a.msg_id, &a.headers, &a.body),
                (&b.subject, &b.msg_id, &b.headers, &b.body)
            );
        }
    }

    /// The `record` fuzz target starts from real records (`fuzz/corpus/record`): each one of
    /// an order that completes and of one that is declined and compensated. They must still
    /// decode and encode to themselves; `JETSAGA_WRITE_FUZZ_SEEDS=1` writes them anew.
    #[test]
    fn fuzz_seeds_are_current_records() {
        use jetsaga_sagas::Input;
        use jetsaga_sagas::protocol::{Failure, Outcome};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/record");
        let write = std::env::var_os("JETSAGA_WRITE_FUZZ_SEEDS").is_some();
        let now = DateTime::from_timestamp(1_767_225_600, 0).unwrap();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ok = || Outcome::Ok {
            result: serde_json::json!({"fuzz": [1, 2.5, "x"]}),
        };
        let declined = Outcome::Failed {
            error: Failure::new("card_declined", "no", false),
        };
        let runs = [
            (
                "completed",
                "tok_ok",
                vec![
                    ("reserve-stock:do:1", ok()),
                    ("take-payment:do:1", ok()),
                    ("confirm-order:do:1", ok()),
                ],
            ),
            (
                "compensated",
                "tok_decline",
                vec![
                    ("reserve-stock:do:1", ok()),
                    ("take-payment:do:1", declined),
                    ("reserve-stock:undo:1", ok()),
                ],
            ),
        ];
        for (name, card, replies) in runs {
            let saga_id = format!("seed-{name}");
            let (def, mut saga, start) = started_order(&saga_id, card, Some(tp), now);
            let mut previous: Option<Record> = None;
            let mut transition = start;
            let mut replies = replies.into_iter();
            for i in 1.. {
                let effects = transition
                    .actions
                    .iter()
                    .filter_map(|a| outbound(a, Some(tp)).map(|(effect, _)| effect))
                    .collect();
                let timer = saga.next_timer(&def);
                let record = Record::next(
                    previous.as_ref(),
                    transition.entry,
                    saga.clone(),
                    effects,
                    timer,
                );
                // Each seed as JSON (the records of jetsaga before compression, and
                // readable), and as it is stored today: a zstd frame.
                for (extension, bytes) in [
                    ("json", Bytes::from(record.to_json().unwrap())),
                    ("zst", record.encode().unwrap()),
                ] {
                    let path = dir.join(format!("{name}-{i}.{extension}"));
                    if write {
                        std::fs::create_dir_all(&dir).unwrap();
                        std::fs::write(&path, &bytes).unwrap();
                    }
                    let stored =
                        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    let decoded = Record::decode(&stored).unwrap();
                    assert_eq!(
                        decoded.to_json().unwrap(),
                        record.to_json().unwrap(),
                        "{} is not a current record",
                        path.display()
                    );
                    assert_eq!(decoded.encode().unwrap(), record.encode().unwrap());
                }
                previous = Some(record);
                let Some((command, outcome)) = replies.next() else {
                    break;
                };
                let input = Input::Reply {
                    command_id: format!("{saga_id}:{command}"),
                    outcome,
                };
                transition = saga.apply(&def, input, now).unwrap();
            }
        }
    }

    /// A stored record is compressed, and what is not a record's frame is refused
    /// with its reason: a corrupt frame, one without its size, one that claims
    /// more than a record may be (nothing that size is allocated), JSON that is
    /// not a record.
    #[test]
    fn records_are_compressed_and_bad_frames_are_refused() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/record");
        let json = std::fs::read(dir.join("completed-4.json")).unwrap();
        let record = Record::decode(&json).unwrap();
        let stored = record.encode().unwrap();
        assert!(stored.starts_with(&ZSTD_MAGIC));
        assert!(
            stored.len() * 2 < json.len(),
            "{} bytes compressed from {}",
            stored.len(),
            json.len()
        );
        assert_eq!(Record::decode(&stored).unwrap().to_json().unwrap(), json);

        let mut corrupt = stored.to_vec();
        let middle = corrupt.len() / 2;
        corrupt.truncate(middle);
        assert!(matches!(
            Record::decode(&corrupt),
            Err(CodecError::Zstd(_) | CodecError::NoSize)
        ));

        // A frame written without its content size (streaming, size unknown).
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        std::io::Write::write_all(&mut encoder, &json).unwrap();
        let unsized_frame = encoder.finish().unwrap();
        assert!(matches!(
            Record::decode(&unsized_frame),
            Err(CodecError::NoSize)
        ));

        // A frame header that states one byte more than a record may be, and no
        // content after it: refused from the header, before anything is allocated.
        // (Descriptor 0xE0: an 8-byte content size, a single segment.)
        let claimed = MAX_DECODED as u64 + 1;
        let mut big = ZSTD_MAGIC.to_vec();
        big.push(0xE0);
        big.extend_from_slice(&claimed.to_le_bytes());
        let error = Record::decode(&big).unwrap_err();
        assert!(
            matches!(error, CodecError::TooLarge(n) if n == claimed),
            "{error}"
        );
        assert!(error.to_string().contains("bound of a record"), "{error}");

        let not_a_record = zstd::bulk::compress(br#"{"saga": 1}"#, 1).unwrap();
        assert!(matches!(
            Record::decode(&not_a_record),
            Err(CodecError::Json(_))
        ));
    }
}
