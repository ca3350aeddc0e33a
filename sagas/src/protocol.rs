//! The wire protocol between the orchestrator, participants and clients.
//!
//! Every body is JSON with a `protocol` version; every message also carries the
//! headers in [`header`]. `docs/PROTOCOL.md` describes the same thing for
//! participants written in other languages.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks.
pub const VERSION: u32 = 1;

/// Header names.
pub mod header {
    /// The saga a message belongs to.
    pub const SAGA_ID: &str = "Jetsaga-Saga-Id";
    /// The saga type (definition name).
    pub const SAGA_TYPE: &str = "Jetsaga-Saga-Type";
    /// The step name.
    pub const STEP: &str = "Jetsaga-Step";
    /// The 1-based attempt number of the command.
    pub const ATTEMPT: &str = "Jetsaga-Attempt";
    /// The stable command id: the participant's idempotency key.
    pub const COMMAND_ID: &str = "Jetsaga-Command-Id";
    /// Set (to `true`) on a command the orchestrator publishes again while
    /// recovering a saga: it may already have been handled, so the participant must
    /// look for its recorded reply even on a first delivery.
    pub const RESENT: &str = "Jetsaga-Resent";
    /// The client's idempotency key of a start request.
    pub const START_KEY: &str = "Jetsaga-Start-Key";
    /// Why a message was dead-lettered.
    pub const DEAD_REASON: &str = "Jetsaga-Dead-Reason";
    /// The subject a dead letter was first published on.
    pub const DEAD_SUBJECT: &str = "Jetsaga-Dead-Subject";
    /// On a dead letter whose copy would not fit in the server's `max_payload`: the
    /// original body's length in bytes; the letter keeps only its first bytes.
    pub const DEAD_TRUNCATED: &str = "Jetsaga-Dead-Truncated";
    /// JetStream's de-duplication id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// JetStream's optimistic concurrency: the append succeeds only if the
    /// subject's last sequence is still this one (0: the subject is empty).
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
    /// A message schedule (`@at <RFC 3339 time>`): the stream publishes the message
    /// to [`SCHEDULE_TARGET`] when it is due.
    pub const SCHEDULE: &str = "Nats-Schedule";
    /// Where a scheduled message is delivered.
    pub const SCHEDULE_TARGET: &str = "Nats-Schedule-Target";
    /// A per-message time to live (`1s`).
    pub const TTL: &str = "Nats-TTL";
    /// `sub`: the message replaces every earlier one on its subject.
    pub const ROLLUP: &str = "Nats-Rollup";
    /// On a journal record: the saga's phase after it (`running`, `compensating`,
    /// `completed`, `compensated`, `failed`).
    pub const PHASE: &str = "Jetsaga-Phase";
    /// On a journal record: the saga's business key, when it is printable ASCII of
    /// at most 256 bytes (the record body always has it).
    pub const KEY: &str = "Jetsaga-Key";
    /// On a journal record: when the saga's armed timer fires (RFC 3339).
    pub const TIMER_AT: &str = "Jetsaga-Timer-At";
    /// On a journal record: when the saga started (RFC 3339).
    pub const CREATED: &str = "Jetsaga-Created";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
}

/// Subject names.
pub mod subject {
    /// Where commands for `participant`'s `action` are published.
    pub fn command(participant: &str, action: &str) -> String {
        format!("saga.cmd.{participant}.{action}")
    }

    /// Everything a participant consumes.
    pub fn commands_of(participant: &str) -> String {
        format!("saga.cmd.{participant}.>")
    }

    /// Where the reply to a command is published. One subject per command, so the
    /// last message on it is the recorded reply.
    pub fn reply(participant: &str, command_id: &str) -> String {
        format!("saga.reply.{participant}.{command_id}")
    }

    /// Where clients publish start requests for a saga type.
    pub fn start(saga_type: &str) -> String {
        format!("saga.start.{saga_type}")
    }

    /// Where a domain event is published.
    pub fn event(name: &str) -> String {
        format!("saga.event.{name}")
    }

    /// The saga type a start subject names, if it is one.
    pub fn start_type(subject: &str) -> Option<&str> {
        subject
            .strip_prefix("saga.start.")
            .filter(|t| !t.is_empty())
    }

    /// Where a saga's journal lives: one subject per saga.
    pub fn journal(saga_id: &str) -> String {
        format!("saga.journal.{saga_id}")
    }

    /// Where a saga's single timer is scheduled (one message per subject).
    pub fn timer_set(saga_id: &str) -> String {
        format!("saga.timer.set.{saga_id}")
    }

    /// Where a saga's timer fires.
    pub fn timer_fire(saga_id: &str) -> String {
        format!("saga.timer.fire.{saga_id}")
    }

    /// The saga a fired timer's subject names, if it is one.
    pub fn fired_saga(subject: &str) -> Option<&str> {
        subject
            .strip_prefix("saga.timer.fire.")
            .filter(|id| !id.is_empty())
    }

    /// Where dead letters from `source` go (e.g. `orchestrator.replies`,
    /// `participant.inventory`).
    pub fn dead_letter(source: &str) -> String {
        format!("saga.dead.{source}")
    }

    /// The subject all commands live under.
    pub const COMMANDS: &str = "saga.cmd.>";
    /// The subject all replies live under.
    pub const REPLIES: &str = "saga.reply.>";
    /// The subject all start requests live under.
    pub const STARTS: &str = "saga.start.>";
    /// The subject all domain events live under.
    pub const EVENTS: &str = "saga.event.>";
    /// The subject all journals live under.
    pub const JOURNALS: &str = "saga.journal.>";
    /// The subject all timers (schedules and firings) live under.
    pub const TIMERS: &str = "saga.timer.>";
    /// The subject fired timers arrive on.
    pub const TIMERS_FIRED: &str = "saga.timer.fire.>";
    /// The subject all dead letters live under.
    pub const DEAD_LETTERS: &str = "saga.dead.>";
    /// JetStream's advisories for messages that exhausted a consumer's
    /// deliveries (kept in a stream, so none is missed while no orchestrator runs).
    pub const MAX_DELIVERIES_ADVISORIES: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>";
}

/// The namespace of saga ids derived from (type, key).
const SAGA_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6a65_7473_6167_6100_8000_0000_0000_0001);

/// The saga id a start key maps to: the same (type, key) always yields the same
/// saga, on every instance.
pub fn saga_id(saga_type: &str, key: &str) -> String {
    // Length-prefixed so that no (type, key) pair can collide with another.
    let name = format!("{}:{saga_type}{key}", saga_type.len());
    uuid::Uuid::new_v5(&SAGA_ID_NAMESPACE, name.as_bytes()).to_string()
}

/// The `Nats-Msg-Id` of a start request: `start:<saga type>:<key>:<digest of
/// the input>` (a name-based UUID of the input's JSON, in hex). Two saga types never share an id for the same key, and a start
/// corrected after a refusal (a new input) is not taken for a duplicate of it;
/// the same start published again is.
pub fn start_msg_id(saga_type: &str, key: &str, input: &serde_json::Value) -> String {
    let digest = uuid::Uuid::new_v5(&SAGA_ID_NAMESPACE, input.to_string().as_bytes());
    format!("start:{saga_type}:{key}:{}", digest.simple())
}

/// A W3C `traceparent` (`00-<trace id>-<span id>-<flags>`), borrowed from its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent<'a> {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: &'a str,
    /// 16 lowercase hex digits, not all zero.
    pub span_id: &'a str,
    /// 2 hex digits (`01`: sampled).
    pub flags: &'a str,
}

impl<'a> TraceParent<'a> {
    /// Parses version `00` of the format; `None` if `text` is not one.
    pub fn parse(text: &'a str) -> Option<Self> {
        let mut parts = text.split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
        (parts.next().is_none()
            && version == "00"
            && hex(trace_id, 32)
            && nonzero(trace_id)
            && hex(span_id, 16)
            && nonzero(span_id)
            && hex(flags, 2))
        .then_some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The same trace and flags, naming span `span_id` instead.
    pub fn with_span(&self, span_id: u64) -> String {
        format!("00-{}-{span_id:016x}-{}", self.trace_id, self.flags)
    }
}

/// The span id of something the orchestrator traces, derived from a stable name (a
/// command id): every instance computes the same one, so a command re-sent by
/// another instance names the same span. FNV-1a, never zero.
pub fn span_id_of(name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash.max(1)
}

/// The `traceparent` a command carries: the saga's trace, naming the span of the
/// attempt (derived from the command id), so the participant's span becomes its
/// child. A malformed saga context is passed on unchanged.
pub fn command_traceparent(saga: &str, command_id: &str) -> String {
    match TraceParent::parse(saga) {
        Some(tp) => tp.with_span(span_id_of(command_id)),
        None => saga.to_owned(),
    }
}

/// Which way a command goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The step's forward action.
    Forward,
    /// The step's compensation.
    Compensate,
}

impl Direction {
    fn token(self) -> &'static str {
        match self {
            Self::Forward => "do",
            Self::Compensate => "undo",
        }
    }
}

/// The parts of a command id: `<saga id>:<step>:<do|undo>:<attempt>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CommandId {
    /// The saga.
    pub saga_id: String,
    /// The step name.
    pub step: String,
    /// Forward or compensation.
    pub direction: Direction,
    /// 1-based attempt.
    pub attempt: u32,
}

impl CommandId {
    /// Parses a command id string.
    pub fn parse(text: &str) -> Result<Self, DecodeError> {
        let bad = || {
            DecodeError::new(
                DecodeErrorKind::InvalidField,
                format!("invalid command id \"{text}\""),
            )
        };
        let mut parts = text.rsplitn(4, ':');
        let attempt = parts.next().and_then(|a| a.parse().ok()).ok_or_else(bad)?;
        let direction = match parts.next() {
            Some("do") => Direction::Forward,
            Some("undo") => Direction::Compensate,
            _ => return Err(bad()),
        };
        let step = parts.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
        let saga_id = parts.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
        Ok(Self {
            saga_id: saga_id.to_owned(),
            step: step.to_owned(),
            direction,
            attempt,
        })
    }
}

impl std::fmt::Display for CommandId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.saga_id,
            self.step,
            self.direction.token(),
            self.attempt
        )
    }
}

/// A command sent to a participant (body of a `saga.cmd.*` message).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Protocol version.
    pub protocol: u32,
    /// Idempotency key, see [`CommandId`].
    pub command_id: String,
    /// The saga.
    pub saga_id: String,
    /// The saga type.
    pub saga_type: String,
    /// The step name.
    pub step: String,
    /// The action to run (the subject's last token).
    pub action: String,
    /// True for a compensation.
    pub compensation: bool,
    /// 1-based attempt.
    pub attempt: u32,
    /// Where the participant publishes its reply.
    pub reply_to: String,
    /// The saga's start input.
    pub input: serde_json::Value,
}

/// A business or technical failure reported by a participant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Stable, machine-readable code, e.g. `insufficient_stock`.
    pub code: String,
    /// For humans.
    pub message: String,
    /// Whether trying again may succeed.
    pub retryable: bool,
}

impl Failure {
    /// A failure with these parts.
    pub fn new(code: impl Into<String>, message: impl Into<String>, retryable: bool) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            retryable,
        }
    }
}

/// What a participant answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Outcome {
    /// The action was applied.
    Ok {
        /// Anything the participant wants recorded with the step.
        #[serde(default)]
        result: serde_json::Value,
    },
    /// The action was not applied (or, if `retryable`, may be tried again).
    Failed {
        /// What went wrong.
        error: Failure,
    },
}

/// A participant's reply (body of a `saga.reply.*` message).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Protocol version.
    pub protocol: u32,
    /// The command this answers.
    pub command_id: String,
    /// The saga.
    pub saga_id: String,
    /// Ok or failed.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// A request to start a saga (body of a `saga.start.<type>` message).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Start {
    /// Protocol version.
    pub protocol: u32,
    /// The client's idempotency key: the same key always yields the same saga.
    pub key: String,
    /// The saga's input, checked against the definition's validator.
    pub input: serde_json::Value,
    /// When the client made the request (e.g. when the order was placed). A
    /// start older than the orchestrator's key horizon
    /// (`streams.finished-retention`) is refused when its key has no saga:
    /// one it started may have finished and expired since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<DateTime<Utc>>,
}

/// A domain event (body of a `saga.event.<name>` message).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Protocol version.
    pub protocol: u32,
    /// The event name, e.g. `order.confirmed`.
    pub event: String,
    /// The saga that produced it.
    pub saga_id: String,
    /// The saga type.
    pub saga_type: String,
    /// The start key of the saga.
    pub key: String,
    /// The saga's input.
    pub input: serde_json::Value,
    /// When the saga reached the state that published it.
    pub occurred_at: DateTime<Utc>,
}

/// What kind of decoding problem a message had; callers branch on this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// Not JSON, or JSON of the wrong shape.
    Json,
    /// A protocol version this build does not speak.
    UnsupportedVersion,
    /// A required header is absent.
    MissingHeader,
    /// A field or header has an invalid value.
    InvalidField,
}

/// A message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    kind: DecodeErrorKind,
    message: String,
}

impl DecodeError {
    /// An error of this kind.
    pub fn new(kind: DecodeErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// What went wrong, for branching.
    pub fn kind(&self) -> DecodeErrorKind {
        self.kind
    }
}

/// Types that travel as protocol bodies.
pub trait Body: Serialize + serde::de::DeserializeOwned {
    /// The version the body claims.
    fn protocol(&self) -> u32;

    /// Decodes a body and checks its version.
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let body: Self = serde_json::from_slice(bytes).map_err(|e| {
            DecodeError::new(
                DecodeErrorKind::Json,
                format!("invalid {}: {e}", short_name::<Self>()),
            )
        })?;
        if body.protocol() != VERSION {
            return Err(DecodeError::new(
                DecodeErrorKind::UnsupportedVersion,
                format!(
                    "unsupported protocol version {} (this build speaks {VERSION})",
                    body.protocol()
                ),
            ));
        }
        Ok(body)
    }

    /// Encodes a body.
    fn encode(&self) -> Vec<u8> {
        // Serialising these plain structs cannot fail: all keys are strings.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

fn short_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

macro_rules! body {
    ($($t:ty),*) => {$(
        impl Body for $t {
            fn protocol(&self) -> u32 {
                self.protocol
            }
        }
    )*};
}
body!(Command, Reply, Start, Event);

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn traceparents_parse_strictly_and_commands_name_their_own_span() {
        let saga = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(saga).unwrap();
        assert_eq!(tp.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.span_id, "00f067aa0ba902b7");
        assert_eq!(tp.flags, "01");
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        let a = command_traceparent(saga, "s:reserve-stock:do:1");
        assert_eq!(a, command_traceparent(saga, "s:reserve-stock:do:1"));
        assert_ne!(a, command_traceparent(saga, "s:reserve-stock:do:2"));
        let child = TraceParent::parse(&a).unwrap();
        assert_eq!((child.trace_id, child.flags), (tp.trace_id, tp.flags));
        assert_eq!(
            u64::from_str_radix(child.span_id, 16).unwrap(),
            span_id_of("s:reserve-stock:do:1")
        );
        assert_eq!(command_traceparent("garbage", "c"), "garbage");
    }

    #[test]
    fn start_ids_differ_by_type_and_input_only() {
        let a = serde_json::json!({"x": 1});
        let b = serde_json::json!({"x": 2});
        assert_eq!(start_msg_id("t", "k", &a), start_msg_id("t", "k", &a));
        assert_ne!(start_msg_id("t", "k", &a), start_msg_id("u", "k", &a));
        assert_ne!(start_msg_id("t", "k", &a), start_msg_id("t", "k", &b));
        assert_ne!(start_msg_id("t", "k", &a), start_msg_id("t", "j", &a));
        assert!(start_msg_id("t", "k", &a).starts_with("start:t:k:"));
    }

    #[test]
    fn saga_ids_are_stable_and_subjects_parse_back() {
        assert_eq!(
            saga_id("order-creation", "k1"),
            saga_id("order-creation", "k1")
        );
        assert_ne!(
            saga_id("order-creation", "k1"),
            saga_id("order-creation", "k2")
        );
        assert_ne!(saga_id("a", "b\nc"), saga_id("a\nb", "c"));
        // The id of a key must never change: journals are found by it.
        assert_eq!(
            saga_id("order-creation", "k1"),
            "81fbf41b-3d1f-5ddd-9fa6-3bc6905554aa"
        );

        assert_eq!(subject::start_type(&subject::start("order")), Some("order"));
        assert_eq!(subject::start_type("saga.start."), None);
        assert_eq!(subject::start_type("saga.reply.x"), None);
        assert_eq!(
            subject::fired_saga(&subject::timer_fire("s-1")),
            Some("s-1")
        );
        assert_eq!(subject::fired_saga("saga.timer.fire."), None);
        assert_eq!(subject::timer_set("s-1"), "saga.timer.set.s-1");
        assert_eq!(subject::journal("s-1"), "saga.journal.s-1");
        assert_eq!(
            subject::dead_letter("orchestrator.replies"),
            "saga.dead.orchestrator.replies"
        );
    }

    #[test]
    fn command_ids_round_trip_and_reject_garbage() {
        let id = CommandId {
            saga_id: "0194-ab".into(),
            step: "reserve-stock".into(),
            direction: Direction::Compensate,
            attempt: 3,
        };
        let text = id.to_string();
        assert_eq!(text, "0194-ab:reserve-stock:undo:3");
        assert_eq!(CommandId::parse(&text), Ok(id));
        for bad in ["", "a:b:c:d", "a:b:do:x", ":b:do:1", "a::do:1", "a:b:do"] {
            let err = CommandId::parse(bad).unwrap_err();
            assert_eq!(err.kind(), DecodeErrorKind::InvalidField, "{bad}");
        }
    }

    #[test]
    fn bodies_round_trip_and_decoding_errors_are_typed() {
        let reply = Reply {
            protocol: VERSION,
            command_id: "s:a:do:1".into(),
            saga_id: "s".into(),
            outcome: Outcome::Failed {
                error: Failure::new("card_declined", "declined", false),
            },
        };
        let bytes = reply.encode();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["outcome"], "failed");
        assert_eq!(value["error"]["code"], "card_declined");
        assert_eq!(Reply::decode(&bytes).unwrap(), reply);

        let ok = json!({"protocol": 1, "command_id": "s:a:do:1", "saga_id": "s", "outcome": "ok", "result": {"x": 1}});
        let decoded = Reply::decode(ok.to_string().as_bytes()).unwrap();
        assert_eq!(
            decoded.outcome,
            Outcome::Ok {
                result: json!({"x": 1})
            }
        );

        assert_eq!(
            Reply::decode(b"not json").unwrap_err().kind(),
            DecodeErrorKind::Json
        );
        let wrong = json!({"protocol": 9, "command_id": "c", "saga_id": "s", "outcome": "ok"});
        assert_eq!(
            Reply::decode(wrong.to_string().as_bytes())
                .unwrap_err()
                .kind(),
            DecodeErrorKind::UnsupportedVersion
        );
        let odd = json!({"protocol": 1, "command_id": "c", "saga_id": "s", "outcome": "maybe"});
        assert_eq!(
            Reply::decode(odd.to_string().as_bytes())
                .unwrap_err()
                .kind(),
            DecodeErrorKind::Json
        );
        assert_eq!(
            Start::decode(b"{}").unwrap_err().kind(),
            DecodeErrorKind::Json
        );
    }

    #[test]
    fn subjects() {
        assert_eq!(
            subject::command("inventory", "reserve"),
            "saga.cmd.inventory.reserve"
        );
        assert_eq!(
            subject::reply("payment", "s:b:do:1"),
            "saga.reply.payment.s:b:do:1"
        );
        assert_eq!(
            subject::start("order-creation"),
            "saga.start.order-creation"
        );
        assert_eq!(
            subject::event("order.confirmed"),
            "saga.event.order.confirmed"
        );
    }
}
