//! The JetStream streams jetsaga uses, as plain data.
//!
//! The orchestrator creates them all at start (and checks existing ones); a
//! participant creates the ones it needs if they are missing, from the same
//! specs, so either may start first.

use std::time::Duration;

use crate::protocol::subject;

/// How a stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Kept until `max_age` (or the per-subject limit) removes them.
    Limits,
    /// Removed once the stream's one consumer acknowledges (or terminates) them; a message
    /// not yet acknowledged stays until `max_age`.
    WorkQueue,
}

/// One stream: its name, subjects and the settings jetsaga relies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// Stream name.
    pub name: &'static str,
    /// Subjects it captures.
    pub subjects: &'static [&'static str],
    /// Retention policy.
    pub retention: Retention,
    /// How long messages are kept by default (configurable by the orchestrator).
    pub max_age: Duration,
    /// Messages kept per subject (`None`: unlimited).
    pub max_msgs_per_subject: Option<i64>,
    /// Whether direct get is enabled (state, recorded replies).
    pub allow_direct: bool,
    /// Whether message schedules are enabled (durable timers).
    pub allow_msg_schedules: bool,
    /// Whether per-message TTLs are enabled.
    pub allow_msg_ttl: bool,
    /// Whether `Nats-Rollup` headers are allowed (a finished saga's record
    /// replaces its journal).
    pub allow_rollup: bool,
    /// What happens at the byte limit: `true` refuses new messages (state is
    /// never dropped to make room), `false` drops the oldest.
    pub discard_new: bool,
    /// The `Nats-Msg-Id` de-duplication window.
    pub duplicate_window: Duration,
    /// A byte limit of its own (`None`: the deployment's `streams.max-bytes`).
    pub max_bytes: Option<u64>,
}

const DAY: Duration = Duration::from_secs(24 * 3600);
const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

/// The default retention of commands, replies, events and timers: the longest a
/// message waits for its consumer (an outage of a participant or of every
/// orchestrator). The `streams.retention` setting replaces it for those streams.
pub const DEFAULT_RETENTION: Duration = WEEK;
/// The `Nats-Msg-Id` de-duplication window of every stream; a retention shorter
/// than it is a configuration error.
pub const DEDUP: Duration = Duration::from_secs(120);
/// "Keep until deleted": a live saga's journal never ages out.
pub const FOREVER: Duration = Duration::ZERO;

const fn spec(name: &'static str, subjects: &'static [&'static str], max_age: Duration) -> Spec {
    Spec {
        name,
        subjects,
        retention: Retention::Limits,
        max_age,
        max_msgs_per_subject: None,
        allow_direct: false,
        allow_msg_schedules: false,
        allow_msg_ttl: false,
        allow_rollup: false,
        discard_new: true,
        duplicate_window: DEDUP,
        max_bytes: None,
    }
}

/// Commands to participants: `saga.cmd.<participant>.<action>`. Each carries a
/// `Nats-TTL` (the orchestrator's `streams.command-ttl`): a command is worth keeping only
/// while its step's attempt can still matter.
pub const COMMANDS: Spec = Spec {
    allow_msg_ttl: true,
    ..spec("JETSAGA_COMMANDS", &[subject::COMMANDS], WEEK)
};

/// Replies from participants: `saga.reply.<participant>.<command id>`. The last
/// message per subject is the participant's recorded reply (its idempotency record); each
/// reply carries a `Nats-TTL` (the participant's reply TTL), so its subject goes with it.
pub const REPLIES: Spec = Spec {
    allow_direct: true,
    allow_msg_ttl: true,
    ..spec("JETSAGA_REPLIES", &[subject::REPLIES], WEEK)
};

/// Start requests: `saga.start.<saga type>`. A start is removed once the orchestrator has
/// taken it (its saga is in the journal) or dead-lettered it, so the stream holds only the
/// starts still waiting — admission control holds them here — whatever the start rate; the
/// duplicate window still drops a start sent twice within it, and past it the journal makes
/// the start key idempotent.
pub const STARTS: Spec = Spec {
    retention: Retention::WorkQueue,
    ..spec("JETSAGA_STARTS", &[subject::STARTS], DAY)
};

/// Domain events: `saga.event.<name>`. At the byte limit the oldest (long
/// consumed) events make room.
pub const EVENTS: Spec = Spec {
    discard_new: false,
    ..spec("JETSAGA_EVENTS", &[subject::EVENTS], WEEK)
};

/// Saga journals: `saga.journal.<saga id>`; each message is one transition and
/// carries the saga's state after it and the journal before it, so a saga's one
/// message is all there is to know. The stream keeps one message per subject:
/// each append replaces the record before it (the server removes that one
/// message, which costs far less than a rollup's purge: a purge makes every
/// consumer of the stream recount its pending messages over all subjects).
/// Nothing ages out: a live saga (running, compensating, parked `failed`) is kept
/// as long as it lives; a finished saga's record expires with a `Nats-TTL` of
/// `streams.finished-retention`.
pub const JOURNAL: Spec = Spec {
    allow_direct: true,
    allow_msg_ttl: true,
    max_msgs_per_subject: Some(1),
    ..spec("JETSAGA_JOURNAL", &[subject::JOURNALS], FOREVER)
};

/// Durable timers: a schedule on `saga.timer.set.<saga id>` fires into
/// `saga.timer.fire.<saga id>`.
pub const TIMERS: Spec = Spec {
    allow_msg_schedules: true,
    allow_msg_ttl: true,
    max_msgs_per_subject: Some(1),
    // The server turns rollups on for schedules (a schedule replaces the last).
    allow_rollup: true,
    // The server refuses discard-new with schedules. One message per live
    // saga: at ~100 B each the byte limit is tens of millions of sagas away.
    discard_new: false,
    ..spec("JETSAGA_TIMERS", &[subject::TIMERS], WEEK)
};

/// Dead letters: `saga.dead.<source>`, with the reason and original headers.
pub const DEAD_LETTERS: Spec = Spec {
    allow_direct: true,
    ..spec(
        "JETSAGA_DEAD_LETTERS",
        &[subject::DEAD_LETTERS],
        Duration::from_secs(30 * 24 * 3600),
    )
};

/// Max-deliveries advisories, kept until the orchestrator has copied the
/// messages they name to the dead letters (also those emitted while no
/// orchestrator was running). When full, the oldest go.
pub const ADVISORIES: Spec = Spec {
    discard_new: false,
    // Advisories are small and rare: a byte limit of its own keeps the
    // storage JetStream reserves for it small.
    max_bytes: Some(64 * 1024 * 1024),
    ..spec(
        "JETSAGA_ADVISORIES",
        &[subject::MAX_DELIVERIES_ADVISORIES],
        WEEK,
    )
};

/// Every stream, in creation order.
pub const ALL: [&Spec; 8] = [
    &COMMANDS,
    &REPLIES,
    &STARTS,
    &EVENTS,
    &JOURNAL,
    &TIMERS,
    &DEAD_LETTERS,
    &ADVISORIES,
];

/// The dead-letter subject for messages that failed in `source`
/// (e.g. `orchestrator.replies`, `participant.inventory`).
pub fn dead_letter_subject(source: &str) -> String {
    subject::dead_letter(source)
}
