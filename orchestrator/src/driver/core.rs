//! The driver's scheduler, with no I/O: per-saga slots, queues, the cache and
//! its eviction, and every decision about what to write and how to settle.
//!
//! The executor feeds it inputs ([`Core::handle_message`], [`Core::handle_input`])
//! and the outcomes of the I/O it asked for ([`Core::handle_io_done`]), and takes
//! the next requests with [`Core::poll_io`]. Time is passed in. What the executor
//! settles and answers (JetStream messages, reply channels) is opaque here: its
//! types come from [`Handles`], so tests drive the core with plain values.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use jetsaga_sagas::protocol::{self, Body};
use jetsaga_sagas::{Action, Cause, Definition, Input, Phase, Rejected, Saga, Transition};

use super::plan::{self, round_up};
use super::{ApiError, Error, IDLE_EVICTION, IoErrorKind, Source, Started};
use crate::definitions::Registry;
use crate::metrics::Metrics;
use crate::record::{Effect, Outbound, Record, Stored, rebuild};
use crate::trace::Tracer;

/// The executor's types for what the core hands back to be settled or answered.
pub(crate) trait Handles {
    /// A message to ack, nak or dead-letter (cloned to mark it in progress).
    type Message: std::fmt::Debug + Clone;
    /// Where the answer to a start goes.
    type StartReply: std::fmt::Debug;
    /// Where the answer to an operator input goes.
    type PhaseReply: std::fmt::Debug;
}

/// Where an input came from, and so how it is settled.
#[derive(Debug)]
pub(crate) enum Origin<M, R> {
    /// A JetStream message: acked, nak'd or dead-lettered.
    Message {
        message: M,
        source: Source,
        /// How often it was delivered, if known.
        delivered: Option<u64>,
        /// When it arrived or was last marked in progress.
        progressed: DateTime<Utc>,
        /// When the server stored it, by the server's clock, if known.
        stored_at: Option<DateTime<Utc>>,
    },
    /// A caller waiting for the answer.
    Api(R),
    /// The timer sweep: a wake for a saga whose recorded timer is overdue.
    /// Nothing is settled; a wake that fails is swept again later.
    Sweep,
}

/// How much later than the transition that finished a saga its finishing reply
/// may look stored, by the server's clock against the orchestrator's.
const FINISHED_REPLY_SKEW: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// One unit of work for one saga.
#[derive(Debug)]
pub(crate) enum Work<H: Handles> {
    /// Start a saga (its id derives from type and key).
    Start {
        saga_id: String,
        def: Arc<Definition>,
        key: String,
        input: serde_json::Value,
        traceparent: Option<String>,
        /// When the client made the request, if it said.
        requested_at: Option<DateTime<Utc>>,
        origin: Origin<H::Message, H::StartReply>,
    },
    /// Apply an input to an existing saga.
    Input {
        saga_id: String,
        input: Input,
        origin: Origin<H::Message, H::PhaseReply>,
    },
}

impl<H: Handles> Work<H> {
    /// The message it came from, and when that was last marked in progress.
    fn message_mut(&mut self) -> Option<(&H::Message, &mut DateTime<Utc>)> {
        match self {
            Work::Start {
                origin:
                    Origin::Message {
                        message,
                        progressed,
                        ..
                    },
                ..
            }
            | Work::Input {
                origin:
                    Origin::Message {
                        message,
                        progressed,
                        ..
                    },
                ..
            } => Some((message, progressed)),
            Work::Start { .. } | Work::Input { .. } => None,
        }
    }

    fn saga_id(&self) -> &str {
        match self {
            Work::Start { saga_id, .. } | Work::Input { saga_id, .. } => saga_id,
        }
    }

    /// Whether it is a redelivery of the reply whose transition finished the
    /// saga (the last one that was not an ignored input). A copy of that reply
    /// (a participant answering a redelivered command again) stored well after
    /// the saga finished cannot be it, redelivered or not: the finishing reply
    /// was stored before the transition it caused (give or take
    /// [`FINISHED_REPLY_SKEW`] of clock skew between orchestrator and server).
    fn redelivers_what_finished(&self, stored: &Stored) -> bool {
        let Work::Input {
            input: Input::Reply { command_id, .. },
            origin:
                Origin::Message {
                    delivered,
                    stored_at,
                    ..
                },
            ..
        } = self
        else {
            return false;
        };
        let record = &stored.record;
        let finishing = std::iter::once(&record.entry)
            .chain(record.earlier.iter().rev())
            .find(|entry| entry.cause != Cause::Ignored);
        delivered.is_some_and(|n| n > 1)
            && finishing.is_some_and(|entry| {
                entry.command_id.as_deref() == Some(command_id)
                    && stored_at.is_none_or(|at| at <= entry.at + FINISHED_REPLY_SKEW)
            })
    }

    /// Whether it is a timer's wake (a fire, or the sweep's).
    fn is_wake(&self) -> bool {
        matches!(
            self,
            Work::Input {
                input: Input::Wake,
                ..
            }
        )
    }

    /// Whether this input, applied to `stored`, can be the first sign of a
    /// transition that was stored but whose commands were never published (its
    /// process died in between). Such a transition's own input is redelivered, and
    /// its timer fires; a first delivery of a reply cannot be it (the reply answers
    /// a command that was published). A start of a finished saga cannot be it
    /// either: the transition that finished it was caused by another input, which
    /// is redelivered itself (a start of a known saga changes nothing).
    ///
    /// A finished saga's events are re-published freely only inside JetStream's
    /// de-duplication window after it finished (its last transition,
    /// `updated_at`, not its last record: an `ignored` record written later
    /// carries the same events but sends none of its own): there a copy is
    /// dropped by the server. Past it a re-publish would be stored twice, so a
    /// late reply or timer fire of a finished saga sends nothing — except a
    /// redelivery of the reply that finished it: that transition's input was
    /// never seen acked, so its events may never have gone out (its publish
    /// failed and the redeliveries took longer than the window: an events
    /// stream unavailable that long, repeated failures under node loss), and a
    /// lost event is worse than a second copy.
    fn may_follow_an_interrupted_transition(&self, stored: &Stored, now: DateTime<Utc>) -> bool {
        let finished = stored.record.saga.phase().is_finished();
        let dedup = chrono::TimeDelta::from_std(jetsaga_sagas::streams::DEDUP)
            .unwrap_or(chrono::TimeDelta::MAX);
        if finished && now - stored.record.saga.updated_at >= dedup {
            return self.redelivers_what_finished(stored);
        }
        match self {
            Work::Start { .. } => !finished,
            Work::Input { input, origin, .. } => match origin {
                Origin::Message { delivered, .. } => {
                    *input == Input::Wake || delivered.is_none_or(|n| n > 1)
                }
                Origin::Api(_) | Origin::Sweep => true,
            },
        }
    }
}

/// A message as the core needs to see it.
#[derive(Debug)]
pub(crate) struct Incoming<'a, M> {
    pub(crate) source: Source,
    pub(crate) subject: &'a str,
    pub(crate) payload: &'a [u8],
    pub(crate) traceparent: Option<String>,
    pub(crate) delivered: Option<u64>,
    /// When the server stored it, by the server's clock.
    pub(crate) stored_at: Option<DateTime<Utc>>,
    pub(crate) message: M,
}

/// An I/O request: what the executor must do next.
#[derive(Debug)]
pub(crate) enum Io<H: Handles> {
    /// Read the saga's last record (from the stream leader after a conflict);
    /// answered by [`Done::Loaded`].
    Load { saga_id: String, leader: bool },
    /// Publish a loaded record's effects again, marked as resent (it may follow
    /// an interrupted transition); answered by [`Done::Published`].
    Publish {
        saga_id: String,
        messages: Vec<Outbound>,
    },
    /// Write one transition; answered by [`Done::Written`].
    Write { saga_id: String, write: Write },
    /// Read the last message on `subject` of the replies stream: the reply to a
    /// command whose attempt is about to time out may be stored already (the
    /// instance it was delivered to is slow or stopped); answered by
    /// [`Done::ReplyFound`].
    FindReply { saga_id: String, subject: String },
    /// Arm the saga's timer alone (a wake came early); answered by [`Done::TimerSet`].
    SetTimer { saga_id: String, at: DateTime<Utc> },
    /// Ack or nak a message.
    Settle { message: H::Message, settle: Settle },
    /// Tell JetStream a message is still being worked on (it waits behind
    /// other work for its saga, or for its I/O), so it is not redelivered.
    Progress { message: H::Message },
    /// Copy a poison message to the dead-letter stream, then terminate it.
    DeadLetter {
        message: H::Message,
        source: Source,
        reason: String,
    },
    /// Answer a caller.
    Answer(Answer<H>),
}

/// The writes of one transition, carried out in this order by one future: a
/// stored non-terminal saga always has a timer that will wake it (and so finish
/// its effects) even if the process dies right after the append.
#[derive(Debug)]
pub(crate) struct Write {
    /// 1. A timer to arm first (it moves earlier).
    pub(crate) set_timer: Option<DateTime<Utc>>,
    /// 2. The record, appended if the journal is still at `expected`.
    pub(crate) append: Append,
    /// 3. Its commands and events.
    pub(crate) publish: Vec<Outbound>,
    /// 4. Whether to clear the timer (the saga needs none).
    pub(crate) clear_timer: bool,
}

/// A journal append with optimistic concurrency.
#[derive(Debug)]
pub(crate) struct Append {
    /// Its headers.
    pub(crate) headers: Vec<(&'static str, String)>,
    /// The encoded record.
    pub(crate) body: Bytes,
    /// The journal sequence it must follow (0: a new saga).
    pub(crate) expected: u64,
}

/// How a message is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Done with it.
    Ack,
    /// Redeliver it after the delay.
    Nak(Duration),
    /// Never redeliver it (the core pairs this with a dead letter).
    Term,
}

/// An answer to a caller, typed by the request.
#[derive(Debug)]
pub(crate) enum Answer<H: Handles> {
    Started(H::StartReply, Result<Started, ApiError>),
    Phase(H::PhaseReply, Result<Phase, ApiError>),
}

/// The outcome of an I/O request.
#[derive(Debug)]
pub(crate) enum Done {
    Loaded {
        saga_id: String,
        result: Result<Option<Box<Stored>>, Error>,
    },
    /// With the message ids JetStream already had (de-duplicated: they
    /// went out before).
    Published {
        saga_id: String,
        result: Result<Vec<String>, Error>,
    },
    /// The journal sequence of the appended record.
    Written {
        saga_id: String,
        result: Result<u64, Error>,
    },
    TimerSet {
        saga_id: String,
        result: Result<(), Error>,
    },
    /// The payload of the stored reply, if there is one.
    ReplyFound {
        saga_id: String,
        result: Result<Option<Bytes>, Error>,
    },
}

impl Done {
    fn saga_id(&self) -> &str {
        match self {
            Done::Loaded { saga_id, .. }
            | Done::Published { saga_id, .. }
            | Done::Written { saga_id, .. }
            | Done::TimerSet { saga_id, .. }
            | Done::ReplyFound { saga_id, .. } => saga_id,
        }
    }
}

/// Why a message can never be applied: it is dead-lettered (a caller is refused).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Poison {
    #[error(transparent)]
    Decode(#[from] protocol::DecodeError),
    #[error("reply names saga {reply} but its command id belongs to saga {command}")]
    ForeignCommand { reply: String, command: String },
    #[error("unexpected {consumer:?} subject {subject}")]
    Subject { consumer: Source, subject: String },
    #[error("unknown saga type \"{0}\"")]
    UnknownType(String),
    #[error("invalid Start: empty key")]
    EmptyKey,
    #[error("{0}")]
    InvalidInput(String),
    #[error("unknown saga {0}")]
    UnknownSaga(String),
    #[error("{0}")]
    UnknownCommand(String),
    #[error("the loaded definition does not fit the saga: {0}")]
    WrongDefinition(String),
    #[error("{0}")]
    KeyHorizon(String),
    #[error("its transition cannot be stored: {0} (the server's max_payload)")]
    TooLarge(String),
}

impl Poison {
    /// What a caller is told instead.
    fn refusal(self) -> ApiError {
        match self {
            Poison::UnknownType(saga_type) => ApiError::UnknownType(saga_type),
            Poison::UnknownSaga(saga_id) => ApiError::NotFound(saga_id),
            Poison::UnknownCommand(reason) => ApiError::NotAllowed(reason),
            other @ Poison::WrongDefinition(_) => ApiError::NotAllowed(other.to_string()),
            Poison::InvalidInput(reason) => ApiError::InvalidInput(reason),
            Poison::KeyHorizon(reason) => ApiError::KeyHorizon(reason),
            other @ Poison::TooLarge(_) => ApiError::InvalidInput(other.to_string()),
            other @ (Poison::Decode(_)
            | Poison::ForeignCommand { .. }
            | Poison::Subject { .. }
            | Poison::EmptyKey) => ApiError::InvalidInput(other.to_string()),
        }
    }
}

/// How a unit of work ended.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Applied, ignored, or already there: the saga is in `phase`; `created`
    /// when this work started it.
    Done { phase: Phase, created: bool },
    /// It can never apply, but is no poison (a timer of a saga that is gone, an
    /// operator action the state does not allow).
    Refused(ApiError),
    /// Malformed, or contradicts the saga.
    Poison(Poison),
    /// I/O failed; it may work later.
    Failed(Error),
}

/// The first redelivery delay after a transient failure.
pub(crate) const NAK_BASE: Duration = Duration::from_secs(1);
/// The longest redelivery delay.
pub(crate) const NAK_MAX: Duration = Duration::from_secs(30);

/// The shortest delay of a re-armed timer: a wake that is not due never re-arms
/// into the past (or the present), so it cannot turn into a hot loop.
pub(crate) const REARM_MIN: Duration = Duration::from_millis(250);

/// How long the timer sweep leaves a saga it woke alone while its recorded
/// timer stays the same (a wake that was not due re-arms the timer without a
/// new record): the sweep costs at most one wake per saga this often.
pub(crate) const SWEEP_AGAIN: Duration = Duration::from_secs(60);

/// The most command ids [`Core`] keeps of replies too large to apply; past it,
/// the set starts again empty (each forgotten one costs one more dead letter).
const MAX_OVERSIZED: usize = 4096;

/// The largest clock skew a re-arm makes up for.
const MAX_SKEW: chrono::Duration = chrono::Duration::minutes(5);

/// When to re-arm a timer that woke the saga before `due`, in the server's
/// time (it runs the schedule). The fire reached this instance at `now`; the
/// server stored it at `fired_at` by its own clock, so the server's clock is
/// `fired_at - now` off ours, and the new timer is shifted by as much (else a
/// server ahead of us would fire it at once again, until the clocks agree).
/// Without that timestamp, a timer armed for `armed` that fired early by our
/// clock says the server is at least that much ahead. Never sooner than
/// [`REARM_MIN`] from now, by either clock.
pub(crate) fn rearm_at(
    due: DateTime<Utc>,
    armed: Option<DateTime<Utc>>,
    fired_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let skew = match fired_at {
        Some(fired_at) => fired_at - now,
        None => armed
            .map(|armed| armed - now)
            .filter(|early| *early > chrono::Duration::zero())
            .unwrap_or_default(),
    }
    .clamp(-MAX_SKEW, MAX_SKEW);
    let floor = chrono::Duration::from_std(REARM_MIN).unwrap_or_default();
    round_up(due.max(now + floor) + skew)
}

/// How a message whose work ended so is settled: the one place that decides.
pub(crate) fn settlement(verdict: &Verdict, delivered: Option<u64>) -> Settle {
    match verdict {
        Verdict::Done { .. } | Verdict::Refused(_) => Settle::Ack,
        Verdict::Poison(_) => Settle::Term,
        Verdict::Failed(error) => Settle::Nak(backoff(error.kind(), delivered)),
    }
}

/// The redelivery delay after a failure of this kind on this delivery: doubling
/// from [`NAK_BASE`], up to [`NAK_MAX`]. A missing definition needs a deploy, so
/// it waits the longest at once.
pub(crate) fn backoff(kind: IoErrorKind, delivered: Option<u64>) -> Duration {
    match kind {
        IoErrorKind::NotLoaded => NAK_MAX,
        IoErrorKind::Conflict
        | IoErrorKind::Corrupt
        | IoErrorKind::Timeout
        | IoErrorKind::TooLarge
        | IoErrorKind::Unavailable => {
            let doublings = delivered.unwrap_or(1).saturating_sub(1).min(16) as u32;
            NAK_BASE.saturating_mul(1 << doublings).min(NAK_MAX)
        }
    }
}

/// What a slot holds.
#[derive(Debug)]
enum Entry<H: Handles> {
    /// Not in memory: the next work loads it.
    NotLoaded,
    /// Work is in progress; further inputs queue.
    CheckedOut(Running<H>),
    /// Loaded: no such saga.
    Missing,
    /// Loaded: its last record.
    Loaded(Box<Stored>),
}

/// What work starts from: a slot that is not checked out.
#[derive(Debug)]
enum Known {
    NotLoaded,
    Missing,
    Loaded(Box<Stored>),
}

impl<H: Handles> From<Known> for Entry<H> {
    fn from(known: Known) -> Self {
        match known {
            Known::NotLoaded => Entry::NotLoaded,
            Known::Missing => Entry::Missing,
            Known::Loaded(stored) => Entry::Loaded(stored),
        }
    }
}

/// Work in progress and the I/O it waits for.
#[derive(Debug)]
struct Running<H: Handles> {
    work: Work<H>,
    stage: Stage,
}

#[derive(Debug)]
enum Stage {
    /// Waits for [`Done::Loaded`]; `recheck`: the load only re-checks a
    /// decision taken from a copy that may be stale (no re-publish); `leader`:
    /// it reads from the stream leader (otherwise any replica, which may lag).
    Loading { recheck: bool, leader: bool },
    /// Waits for [`Done::Published`], then applies to `stored`.
    /// `leader`: `stored` was read from the leader.
    Republishing { stored: Box<Stored>, leader: bool },
    /// Waits for [`Done::Written`] of `record`.
    Writing(Box<Record>),
    /// Waits for [`Done::Written`] of the record of an ignored input, which
    /// published nothing: the effects it carries are still pending.
    Ignoring(Box<Record>),
    /// Waits for [`Done::Written`] of `record`, which restarted the wait for a
    /// re-sent command; then applies the work to it.
    Resending(Box<Record>),
    /// Waits for [`Done::TimerSet`]; `stored` already has the new timer.
    Rearming(Box<Stored>),
    /// Waits for [`Done::ReplyFound`]: the wake would time out `command_id`
    /// of `stored` unless its reply is stored already.
    FindingReply {
        stored: Box<Stored>,
        command_id: String,
    },
}

/// Whether a wake that would time out an attempt first looks for its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timeout {
    /// Look in the replies stream first.
    LookFirst,
    /// Looked already (or there is nothing to look for): time out.
    Decide,
}

#[derive(Debug)]
struct Slot<H: Handles> {
    entry: Entry<H>,
    queue: VecDeque<Work<H>>,
    /// When work last arrived; idle sagas leave memory (see [`Core::handle_tick`]).
    touched: DateTime<Utc>,
}

/// The scheduler.
pub(crate) struct Core<H: Handles> {
    registry: Arc<Registry>,
    metrics: Metrics,
    /// The TTL of a finished saga's record.
    finished_retention: std::time::Duration,
    slots: HashMap<String, Slot<H>>,
    io: VecDeque<Io<H>>,
    /// Set by [`Core::handle_shutdown`]: new work is refused.
    stopping: bool,
    /// Saga spans, when traces are exported.
    trace: Option<Tracer>,
    /// Sagas the timer sweep woke: the recorded timer it saw, and when.
    swept: HashMap<String, (Option<DateTime<Utc>>, DateTime<Utc>)>,
    /// Commands whose reply was dead-lettered because the record of its
    /// transition is over the server's `max_payload`: a timeout that finds such a
    /// reply stored times the command out instead of applying it again (at most
    /// [`MAX_OVERSIZED`]; forgotten at a restart, then learned again once).
    oversized: HashSet<String>,
    /// The consumers' `ack_wait`: messages held longer than a third of it are
    /// marked in progress.
    ack_wait: Duration,
}

impl<H: Handles> std::fmt::Debug for Core<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("sagas", &self.slots.len())
            .field("pending_io", &self.io.len())
            .finish()
    }
}

impl<H: Handles> Core<H> {
    pub(crate) fn new(
        registry: Arc<Registry>,
        metrics: Metrics,
        finished_retention: std::time::Duration,
    ) -> Self {
        Self {
            registry,
            metrics,
            finished_retention,
            slots: HashMap::new(),
            io: VecDeque::new(),
            stopping: false,
            trace: None,
            swept: HashMap::new(),
            oversized: HashSet::new(),
            ack_wait: Duration::from_secs(30),
        }
    }

    /// Marks messages held longer than a third of `ack_wait` in progress.
    pub(crate) fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }

    /// Emits saga spans with `trace` (`None`: tracing is off, nothing is built).
    pub(crate) fn with_tracer(mut self, trace: Option<Tracer>) -> Self {
        self.trace = trace;
        self
    }

    /// The next I/O request, if any.
    pub(crate) fn poll_io(&mut self) -> Option<Io<H>> {
        self.io.pop_front()
    }

    /// A message from one of the consumers.
    pub(crate) fn handle_message(
        &mut self,
        now: DateTime<Utc>,
        incoming: Incoming<'_, H::Message>,
    ) {
        let Incoming {
            source,
            subject,
            payload,
            traceparent,
            delivered,
            stored_at,
            message,
        } = incoming;
        match self.decode(source, subject, payload) {
            Ok(Decoded::Start {
                saga_id,
                def,
                start,
            }) => self.handle_input(
                now,
                Work::Start {
                    saga_id,
                    def,
                    key: start.key,
                    input: start.input,
                    traceparent,
                    requested_at: start.requested_at,
                    origin: Origin::Message {
                        message,
                        source,
                        delivered,
                        progressed: now,
                        stored_at,
                    },
                },
            ),
            Ok(Decoded::Input { saga_id, input }) => self.handle_input(
                now,
                Work::Input {
                    saga_id,
                    input,
                    origin: Origin::Message {
                        message,
                        source,
                        delivered,
                        progressed: now,
                        stored_at,
                    },
                },
            ),
            Err(poison) => {
                let origin: Origin<H::Message, H::PhaseReply> = Origin::Message {
                    message,
                    source,
                    delivered,
                    progressed: now,
                    stored_at,
                };
                self.settle(origin, Verdict::Poison(poison), Answer::Phase, |done| {
                    done.0
                });
            }
        }
    }

    fn decode(&self, source: Source, subject: &str, payload: &[u8]) -> Result<Decoded, Poison> {
        let unexpected = || Poison::Subject {
            consumer: source,
            subject: subject.to_owned(),
        };
        match source {
            Source::Replies => {
                let reply = protocol::Reply::decode(payload)?;
                let command = protocol::CommandId::parse(&reply.command_id)?;
                if command.saga_id != reply.saga_id {
                    return Err(Poison::ForeignCommand {
                        reply: reply.saga_id,
                        command: command.saga_id,
                    });
                }
                Ok(Decoded::Input {
                    saga_id: reply.saga_id,
                    input: Input::Reply {
                        command_id: reply.command_id,
                        outcome: reply.outcome,
                    },
                })
            }
            Source::Starts => {
                let saga_type = protocol::subject::start_type(subject).ok_or_else(unexpected)?;
                let def = self
                    .registry
                    .latest(saga_type)
                    .ok_or_else(|| Poison::UnknownType(saga_type.to_owned()))?
                    .clone();
                let start = protocol::Start::decode(payload)?;
                if start.key.is_empty() {
                    return Err(Poison::EmptyKey);
                }
                def.check_input(&start.input)
                    .map_err(|e| Poison::InvalidInput(e.to_string()))?;
                Ok(Decoded::Start {
                    saga_id: protocol::saga_id(&def.name, &start.key),
                    def,
                    start,
                })
            }
            Source::Timers => {
                let saga_id = protocol::subject::fired_saga(subject).ok_or_else(unexpected)?;
                Ok(Decoded::Input {
                    saga_id: saga_id.to_owned(),
                    input: Input::Wake,
                })
            }
        }
    }

    /// Queues work for its saga, or starts it if the saga is idle.
    pub(crate) fn handle_input(&mut self, now: DateTime<Utc>, work: Work<H>) {
        if self.stopping {
            return self.refuse(work);
        }
        let saga_id = work.saga_id().to_owned();
        let slot = self.slots.entry(saga_id.clone()).or_insert_with(|| Slot {
            entry: Entry::NotLoaded,
            queue: VecDeque::new(),
            touched: now,
        });
        slot.touched = now;
        let known = match std::mem::replace(&mut slot.entry, Entry::NotLoaded) {
            running @ Entry::CheckedOut(_) => {
                slot.entry = running;
                slot.queue.push_back(work);
                return;
            }
            Entry::NotLoaded => Known::NotLoaded,
            Entry::Missing => Known::Missing,
            Entry::Loaded(stored) => Known::Loaded(stored),
        };
        self.run(now, &saga_id, work, known);
    }

    /// The outcome of an I/O request.
    pub(crate) fn handle_io_done(&mut self, now: DateTime<Utc>, done: Done) {
        let saga_id = done.saga_id().to_owned();
        if let (Some(trace), Done::Written { result, .. }) = (&mut self.trace, &done) {
            trace.written(&saga_id, result.is_ok(), now);
        }
        let Some(slot) = self.slots.get_mut(&saga_id) else {
            tracing::error!(saga_id, "I/O finished for a saga with no slot");
            return;
        };
        let Entry::CheckedOut(Running { work, stage }) =
            std::mem::replace(&mut slot.entry, Entry::NotLoaded)
        else {
            tracing::error!(saga_id, "I/O finished for a saga that is not checked out");
            return;
        };
        let known = match (stage, done) {
            (Stage::Loading { recheck, leader }, Done::Loaded { result, .. }) => match result {
                // A replica that has not seen the saga yet (it started a moment ago,
                // or the replica's node has just come back) is no ground to drop an
                // input: only the leader can say a saga does not exist. A start
                // needs no second read (it writes under compare-and-set).
                Ok(None) if !leader && matches!(work, Work::Input { .. }) => self.recheck(work),
                Ok(Some(stored)) if !recheck => self.recover_or_apply(now, work, stored, leader),
                Ok(found) => self.apply(now, work, found, !leader),
                Err(error) => Some(self.fail(work, error)),
            },
            (Stage::Republishing { mut stored, leader }, Done::Published { result, .. }) => {
                match result {
                    Ok(duplicates) => match self.resent(now, &work, &stored, &duplicates) {
                        Some(write) => {
                            stored.record.effects.clear();
                            self.start_write(write, work, Known::Loaded(stored), Stage::Resending)
                        }
                        None => {
                            stored.record.effects.clear();
                            self.apply(now, work, Some(stored), !leader)
                        }
                    },
                    Err(error) => Some(self.fail(work, error)),
                }
            }
            (Stage::Writing(record), Done::Written { result, .. }) => match result {
                Ok(seq) => {
                    let phase = record.saga.phase();
                    let created = matches!(work, Work::Start { .. });
                    self.conclude(work, Verdict::Done { phase, created });
                    // Finished sagas leave memory at once; their state stays in the journal.
                    // A failed saga is parked, not finished (see `Phase::end`): it stays like
                    // any live saga until it is idle, and an operator's retry reloads it
                    // from the journal.
                    Some(if phase.is_finished() {
                        Known::NotLoaded
                    } else {
                        // JetStream acknowledged its effects: none is pending any more.
                        let mut record = *record;
                        record.effects.clear();
                        Known::Loaded(Box::new(Stored { record, seq }))
                    })
                }
                Err(error) if error.kind() == IoErrorKind::Conflict => {
                    // Another instance was first: reload (from the leader, a replica
                    // may lag) and apply the same input to what it wrote.
                    self.metrics.conflicts.inc();
                    self.load(&saga_id, work, true);
                    None
                }
                Err(error) => {
                    if error.kind() == IoErrorKind::TooLarge {
                        self.remember_oversized(&record);
                    }
                    Some(self.fail(work, error))
                }
            },
            (Stage::Ignoring(record), Done::Written { result, .. }) => match result {
                Ok(seq) => {
                    let phase = record.saga.phase();
                    self.conclude(
                        work,
                        Verdict::Done {
                            phase,
                            created: false,
                        },
                    );
                    // Effects it carries were never seen acknowledged: the copy is not
                    // kept, so the next input loads it and (the interrupted
                    // transition's own input, its timer) publishes them.
                    Some(if phase.is_finished() || !record.effects.is_empty() {
                        Known::NotLoaded
                    } else {
                        Known::Loaded(Box::new(Stored {
                            record: *record,
                            seq,
                        }))
                    })
                }
                Err(error) if error.kind() == IoErrorKind::Conflict => {
                    self.metrics.conflicts.inc();
                    self.load(&saga_id, work, true);
                    None
                }
                Err(error) => Some(self.fail(work, error)),
            },
            (Stage::Resending(record), Done::Written { result, .. }) => match result {
                Ok(seq) => {
                    let stored = Box::new(Stored {
                        record: *record,
                        seq,
                    });
                    if self.wake_not_due(now, &work, &stored) {
                        // The renewed wait armed the timer the wake needs.
                        Some(self.unchanged(work, stored))
                    } else {
                        self.apply(now, work, Some(stored), false)
                    }
                }
                Err(error) if error.kind() == IoErrorKind::Conflict => {
                    self.metrics.conflicts.inc();
                    self.load(&saga_id, work, true);
                    None
                }
                Err(error) => Some(self.fail(work, error)),
            },
            (Stage::Rearming(stored), Done::TimerSet { result, .. }) => match result {
                Ok(()) => Some(self.unchanged(work, stored)),
                Err(error) => Some(self.fail(work, error)),
            },
            (Stage::FindingReply { stored, command_id }, Done::ReplyFound { result, .. }) => {
                self.apply_found(now, work, stored, &command_id, result)
            }
            (stage, done) => {
                tracing::error!(
                    saga_id,
                    ?stage,
                    ?done,
                    "I/O outcome does not match the work"
                );
                Some(self.fail(work, Error::Internal("I/O outcome does not match the work")))
            }
        };
        if let Some(known) = known {
            self.next(now, &saga_id, known);
        }
    }

    /// Wakes sagas whose recorded timer (`None`: none) is overdue, as the
    /// listing index sees them: their timer fire was lost (an outage dropped
    /// it, or it was never armed). A wake recovers an interrupted transition's
    /// effects, applies what is due, or re-arms the timer. Sagas busy here are
    /// left alone, and one swept with the same recorded timer within
    /// [`SWEEP_AGAIN`] too.
    pub(crate) fn handle_overdue(
        &mut self,
        now: DateTime<Utc>,
        overdue: Vec<(String, Option<DateTime<Utc>>)>,
    ) {
        let again = chrono::Duration::from_std(SWEEP_AGAIN).unwrap_or(chrono::Duration::MAX);
        for (saga_id, timer_at) in overdue {
            if self.stopping {
                return;
            }
            let busy = self.slots.get(&saga_id).is_some_and(|slot| {
                matches!(slot.entry, Entry::CheckedOut(_)) || !slot.queue.is_empty()
            });
            let recent = self
                .swept
                .get(&saga_id)
                .is_some_and(|(seen, at)| *seen == timer_at && now - *at < again);
            if busy || recent {
                continue;
            }
            tracing::info!(saga_id, timer_at = ?timer_at, "waking a saga whose timer is overdue");
            self.swept.insert(saga_id.clone(), (timer_at, now));
            self.handle_input(
                now,
                Work::Input {
                    saga_id,
                    input: Input::Wake,
                    origin: Origin::Sweep,
                },
            );
        }
    }

    /// Drops sagas idle in memory for [`IDLE_EVICTION`], counts the rest by
    /// state, and marks the messages held longer than a third of `ack_wait`
    /// (queued behind other work of their saga, or waiting for its I/O) in
    /// progress: under overload JetStream would redeliver them otherwise.
    pub(crate) fn handle_tick(&mut self, now: DateTime<Utc>) {
        let period = chrono::Duration::from_std(self.ack_wait / 3).unwrap_or(chrono::Duration::MAX);
        for slot in self.slots.values_mut() {
            let running = match &mut slot.entry {
                Entry::CheckedOut(running) => Some(&mut running.work),
                Entry::NotLoaded | Entry::Missing | Entry::Loaded(_) => None,
            };
            for work in running.into_iter().chain(slot.queue.iter_mut()) {
                if let Some((message, progressed)) = work.message_mut()
                    && now - *progressed >= period
                {
                    *progressed = now;
                    self.io.push_back(Io::Progress {
                        message: message.clone(),
                    });
                }
            }
        }
        let again = chrono::Duration::from_std(SWEEP_AGAIN).unwrap_or(chrono::Duration::MAX);
        self.swept.retain(|_, (_, at)| now - *at < again);
        let idle = chrono::Duration::from_std(IDLE_EVICTION).unwrap_or(chrono::Duration::MAX);
        self.slots.retain(|_, slot| {
            matches!(slot.entry, Entry::CheckedOut(_))
                || !slot.queue.is_empty()
                || now - slot.touched < idle
        });
        let mut counts = [0i64; Phase::ALL.len()];
        for slot in self.slots.values() {
            if let Entry::Loaded(stored) = &slot.entry
                && let Some(i) = Phase::ALL
                    .iter()
                    .position(|p| *p == stored.record.saga.phase())
            {
                counts[i] += 1;
            }
        }
        for (phase, count) in Phase::ALL.iter().zip(counts) {
            self.metrics
                .in_memory
                .with_label_values(&[phase.as_str()])
                .set(count);
        }
    }

    /// Stops taking queued work: callers are told the orchestrator is stopping;
    /// queued messages are left unsettled, so JetStream redelivers them (to this
    /// or another instance). Work in progress finishes.
    pub(crate) fn handle_shutdown(&mut self) {
        self.stopping = true;
        let queued: Vec<_> = self
            .slots
            .values_mut()
            .flat_map(|slot| slot.queue.drain(..))
            .collect();
        for work in queued {
            self.refuse(work);
        }
    }

    fn refuse(&mut self, work: Work<H>) {
        let answer = match work {
            Work::Start {
                origin: Origin::Api(reply),
                ..
            } => Answer::Started(reply, Err(ApiError::ShuttingDown)),
            Work::Input {
                origin: Origin::Api(reply),
                ..
            } => Answer::Phase(reply, Err(ApiError::ShuttingDown)),
            Work::Start {
                origin: Origin::Message { .. } | Origin::Sweep,
                ..
            }
            | Work::Input {
                origin: Origin::Message { .. } | Origin::Sweep,
                ..
            } => return,
        };
        self.io.push_back(Io::Answer(answer));
    }

    /// Whether a saga is in memory (queued, in progress or cached).
    #[cfg(test)]
    pub(crate) fn holds(&self, saga_id: &str) -> bool {
        self.slots.contains_key(saga_id)
    }

    /// Runs work on an idle saga, then whatever queued behind it and finishes
    /// without I/O.
    fn run(&mut self, now: DateTime<Utc>, saga_id: &str, work: Work<H>, known: Known) {
        if let Some(known) = self.begin(now, work, known) {
            self.next(now, saga_id, known);
        }
    }

    /// The saga's current work is over: run the queued work that finishes
    /// without I/O, until one needs I/O or the queue is empty.
    fn next(&mut self, now: DateTime<Utc>, saga_id: &str, mut known: Known) {
        loop {
            let Some(slot) = self.slots.get_mut(saga_id) else {
                return;
            };
            let Some(work) = slot.queue.pop_front() else {
                // Only loaded sagas stay in memory: "missing" may stop being true
                // (another instance starts it), so it is not worth keeping.
                match known {
                    Known::Loaded(stored) => slot.entry = Entry::Loaded(stored),
                    Known::NotLoaded | Known::Missing => {
                        self.slots.remove(saga_id);
                    }
                }
                return;
            };
            match self.begin(now, work, known) {
                Some(after) => known = after,
                None => return,
            }
        }
    }

    /// Starts work; `Some` when it finished at once (with what is known after it),
    /// `None` when it is checked out waiting for I/O.
    fn begin(&mut self, now: DateTime<Utc>, work: Work<H>, known: Known) -> Option<Known> {
        match known {
            Known::NotLoaded => {
                let saga_id = work.saga_id().to_owned();
                self.load(&saga_id, work, false);
                None
            }
            Known::Missing => self.apply(now, work, None, false),
            // Loaded for earlier work that did not re-publish its pending effects
            // (they are cleared once seen acknowledged): this input may be the one
            // that must (queued behind a timer fire, the redelivered input of the
            // interrupted transition).
            Known::Loaded(stored) if !stored.record.effects.is_empty() => {
                self.recover_or_apply(now, work, stored, false)
            }
            Known::Loaded(stored) => self.apply(now, work, Some(stored), true),
        }
    }

    /// Applies work to a record read from the journal (`leader`: from the
    /// stream leader), first publishing its effects again if the work may
    /// follow an interrupted transition: a crash or a failed publish between
    /// persisting and publishing. Publishing them again is harmless
    /// (de-duplicated by message id and, past the window, by the participants'
    /// command ids).
    fn recover_or_apply(
        &mut self,
        now: DateTime<Utc>,
        work: Work<H>,
        stored: Box<Stored>,
        leader: bool,
    ) -> Option<Known> {
        if !work.may_follow_an_interrupted_transition(&stored, now) {
            return self.apply(now, work, Some(stored), !leader);
        }
        let saga = &stored.record.saga;
        match self.registry.get(&saga.saga_type, saga.version) {
            Some(def) => {
                let messages = rebuild(&stored.record, def);
                let saga_id = work.saga_id().to_owned();
                self.check_out(&saga_id, work, Stage::Republishing { stored, leader });
                self.io.push_back(Io::Publish { saga_id, messages });
                None
            }
            // Applying it fails the same way, and says why.
            None => self.apply(now, work, Some(stored), !leader),
        }
    }

    fn load(&mut self, saga_id: &str, work: Work<H>, leader: bool) {
        self.check_out(
            saga_id,
            work,
            Stage::Loading {
                recheck: false,
                leader,
            },
        );
        self.io.push_back(Io::Load {
            saga_id: saga_id.to_owned(),
            leader,
        });
    }

    /// Reloads the saga from the leader to re-check a decision that writes
    /// nothing, taken from a cached copy that may be stale.
    fn recheck(&mut self, work: Work<H>) -> Option<Known> {
        let saga_id = work.saga_id().to_owned();
        self.check_out(
            &saga_id,
            work,
            Stage::Loading {
                recheck: true,
                leader: true,
            },
        );
        self.io.push_back(Io::Load {
            saga_id,
            leader: true,
        });
        None
    }

    fn check_out(&mut self, saga_id: &str, work: Work<H>, stage: Stage) {
        if let Some(slot) = self.slots.get_mut(saga_id) {
            slot.entry = Entry::CheckedOut(Running { work, stage });
        }
    }

    /// Applies work to a loaded saga (`None`: there is no such saga); `cached`:
    /// `stored` may be stale (this instance's copy, or a replica's answer), so a
    /// decision that writes nothing is re-checked against the leader first.
    fn apply(
        &mut self,
        now: DateTime<Utc>,
        work: Work<H>,
        stored: Option<Box<Stored>>,
        cached: bool,
    ) -> Option<Known> {
        match (&work, stored) {
            (Work::Start { .. }, Some(stored)) => Some(self.unchanged(work, stored)),
            (
                Work::Start {
                    requested_at: Some(requested_at),
                    ..
                },
                None,
            ) if *requested_at + self.finished_retention < now => {
                // Its key may have run a saga whose record has expired since:
                // running it now could do the order twice.
                let horizon = humantime::format_duration(self.finished_retention);
                let reason = format!(
                    "the start was requested at {}, longer ago than the key horizon \
                     (streams.finished-retention = {horizon}); a saga it started may have \
                     finished and expired since, so it is not started again",
                    requested_at.to_rfc3339()
                );
                self.conclude(work, Verdict::Poison(Poison::KeyHorizon(reason)));
                Some(Known::Missing)
            }
            (
                Work::Start {
                    saga_id,
                    def,
                    key,
                    input,
                    traceparent,
                    ..
                },
                None,
            ) => {
                let def = def.clone();
                // Traced: the saga's context names a root span of its own, below the caller's.
                let (traceparent, caller) = match (&self.trace, traceparent) {
                    (Some(trace), caller) => {
                        let (root, caller) = trace.root(caller.as_deref());
                        (Some(root), caller)
                    }
                    (None, traceparent) => (traceparent.clone(), None),
                };
                let started = Saga::start(
                    &def,
                    saga_id.clone(),
                    key.clone(),
                    input.clone(),
                    traceparent,
                    now,
                );
                match started {
                    Ok((mut saga, transition)) => {
                        saga.caller_traceparent = caller;
                        if let Some(trace) = &mut self.trace {
                            trace.decided(&def, None, &saga, &transition.entry);
                        }
                        self.metrics.started.with_label_values(&[&def.name]).inc();
                        self.write(&def, None, saga, transition, None, 0, work)
                    }
                    Err(invalid) => {
                        self.conclude(
                            work,
                            Verdict::Poison(Poison::InvalidInput(invalid.to_string())),
                        );
                        Some(Known::Missing)
                    }
                }
            }
            (Work::Input { saga_id, input, .. }, None) => {
                let verdict = if matches!(input, Input::Reply { .. }) {
                    Verdict::Poison(Poison::UnknownSaga(saga_id.clone()))
                } else {
                    // A timer for a saga that no longer exists (retention) is simply dropped.
                    Verdict::Refused(ApiError::NotFound(saga_id.clone()))
                };
                self.conclude(work, verdict);
                Some(Known::Missing)
            }
            (Work::Input { input, .. }, Some(stored)) => {
                let input = input.clone();
                self.apply_input(now, work, input, stored, cached, Timeout::LookFirst)
            }
        }
    }

    /// Applies `input` (the work's own, or a reply found for its wake) to a
    /// loaded saga.
    fn apply_input(
        &mut self,
        now: DateTime<Utc>,
        work: Work<H>,
        input: Input,
        stored: Box<Stored>,
        cached: bool,
        timeout: Timeout,
    ) -> Option<Known> {
        let saga_type = &stored.record.saga.saga_type;
        let version = stored.record.saga.version;
        let Some(def) = self.registry.get(saga_type, version).cloned() else {
            let error = Error::NotLoaded {
                saga_type: saga_type.clone(),
                version,
            };
            tracing::error!(saga_id = work.saga_id(), %error);
            self.conclude(work, Verdict::Failed(error));
            return Some(Known::Loaded(stored));
        };
        let mut saga = stored.record.saga.clone();
        let mut timer_at = stored.record.timer_at;
        if work.is_wake() {
            // The timer that fired is gone: whatever comes next must arm a new one.
            timer_at = None;
        }
        match saga.apply(&def, input.clone(), now) {
            Ok(transition)
                if timeout == Timeout::LookFirst
                    && transition.entry.cause == Cause::StepTimeout =>
            {
                // The reply may be stored already, held by an instance that is slow or
                // stopped (it is redelivered only after the ack wait): a participant that
                // answered in time should not see its work timed out and retried.
                let found = transition
                    .entry
                    .command_id
                    .as_deref()
                    .and_then(|command_id| {
                        let parsed = protocol::CommandId::parse(command_id).ok()?;
                        let step = def.steps.iter().find(|s| s.name == parsed.step)?;
                        Some((command_id.to_owned(), step.participant.clone()))
                    });
                match found {
                    Some((command_id, participant)) => {
                        let saga_id = work.saga_id().to_owned();
                        let subject = protocol::subject::reply(&participant, &command_id);
                        self.check_out(&saga_id, work, Stage::FindingReply { stored, command_id });
                        self.io.push_back(Io::FindReply { saga_id, subject });
                        None
                    }
                    None => self.apply_input(now, work, input, stored, cached, Timeout::Decide),
                }
            }
            Ok(transition) => {
                if let Some(trace) = &mut self.trace {
                    trace.decided(&def, Some(&stored.record.saga), &saga, &transition.entry);
                }
                let previous = Some(&stored.record);
                self.write(&def, previous, saga, transition, timer_at, stored.seq, work)
            }
            Err(Rejected::NotDue | Rejected::Finished) if input == Input::Wake && cached => {
                // A stale copy could re-arm the timer too late: decide from the journal.
                self.recheck(work)
            }
            Err(Rejected::NotDue | Rejected::Finished) if input == Input::Wake => {
                // An early or stale timer: re-arm for what is really due.
                let mut stored = stored;
                // Only a first delivery fired when the server meant it to, and
                // arrived about when the server stored it.
                let (armed, fired_at) = match &work {
                    Work::Input {
                        origin:
                            Origin::Message {
                                delivered,
                                stored_at,
                                ..
                            },
                        ..
                    } if *delivered == Some(1) => (stored.record.timer_at, *stored_at),
                    Work::Input { .. } | Work::Start { .. } => (None, None),
                };
                let next = saga
                    .next_timer(&def)
                    .map(|due| rearm_at(due, armed, fired_at, now));
                stored.record.timer_at = next;
                match next {
                    Some(at) => {
                        let saga_id = work.saga_id().to_owned();
                        self.metrics.observe_timer_writes(true, false);
                        self.check_out(&saga_id, work, Stage::Rearming(stored));
                        self.io.push_back(Io::SetTimer { saga_id, at });
                        None
                    }
                    None => Some(self.unchanged(work, stored)),
                }
            }
            Err(rejected @ (Rejected::Duplicate | Rejected::Stale | Rejected::Finished))
                if matches!(input, Input::Reply { .. }) =>
            {
                // Late and duplicate replies change nothing but are journaled. The
                // record keeps the effects of the one before it: they may never have
                // been published (the instance died between its append and its
                // publish), and recovery completes the last record's effects only.
                self.metrics.duplicates.inc();
                let entry = saga.ignored_entry(&input, &rejected, now);
                let record = Record::next(
                    Some(&stored.record),
                    entry,
                    saga,
                    stored.record.effects.clone(),
                    timer_at,
                );
                let write = Pending {
                    record,
                    set_timer: None,
                    publish: Vec::new(),
                    clear_timer: false,
                    expected: stored.seq,
                };
                self.start_write(write, work, Known::Loaded(stored), Stage::Ignoring)
            }
            Err(Rejected::UnknownCommand(reason)) => {
                self.conclude(work, Verdict::Poison(Poison::UnknownCommand(reason)));
                Some(Known::Loaded(stored))
            }
            Err(Rejected::WrongDefinition(which)) => {
                // A bad deploy, not a refusal: keep the input (dead-lettered, to
                // be redriven) rather than ack and drop it.
                tracing::error!(saga_id = work.saga_id(), definition = %which, "the loaded definition does not fit the saga");
                self.conclude(work, Verdict::Poison(Poison::WrongDefinition(which)));
                Some(Known::Loaded(stored))
            }
            Err(_) if cached => {
                // Another instance may have moved the saga to where this is allowed
                // (an operator retry after a failure): never refuse from the cache.
                self.recheck(work)
            }
            Err(rejected) => {
                let reason = match rejected {
                    Rejected::Finished => {
                        format!(
                            "the saga is already {}",
                            stored.record.saga.phase().as_str()
                        )
                    }
                    other => other.to_string(),
                };
                self.conclude(work, Verdict::Refused(ApiError::NotAllowed(reason)));
                Some(Known::Loaded(stored))
            }
        }
    }

    /// Turns a transition into its writes and starts them.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        def: &Definition,
        previous: Option<&Record>,
        saga: Saga,
        transition: Transition,
        armed: Option<DateTime<Utc>>,
        expected: u64,
        work: Work<H>,
    ) -> Option<Known> {
        self.observe(def, &saga, &transition);
        let plan = plan::plan(&transition.actions, armed, saga.traceparent.as_deref());
        let record = Record::next(
            previous,
            transition.entry,
            saga,
            plan.effects,
            plan.timer_at,
        );
        let write = Pending {
            record,
            set_timer: plan.set_timer,
            publish: plan.messages,
            clear_timer: plan.clear_timer,
            expected,
        };
        self.start_write(write, work, Known::NotLoaded, Stage::Writing)
    }

    /// Goes on with a wake that would time out `command_id` once the replies
    /// stream was asked for its reply: applies the reply if it is there and
    /// still counts, otherwise times the attempt out. A failed look-up only
    /// means nothing was found.
    fn apply_found(
        &mut self,
        now: DateTime<Utc>,
        work: Work<H>,
        stored: Box<Stored>,
        command_id: &str,
        found: Result<Option<Bytes>, Error>,
    ) -> Option<Known> {
        let reply = match found {
            Ok(found) => found.and_then(|payload| protocol::Reply::decode(&payload).ok()),
            Err(error) => {
                tracing::debug!(saga_id = work.saga_id(), %error, "could not look for a stored reply");
                None
            }
        };
        let input = reply
            .filter(|r| r.command_id == command_id && r.saga_id == stored.record.saga.id)
            .filter(|r| {
                let oversized = self.oversized.contains(&r.command_id);
                if oversized {
                    tracing::warn!(
                        saga_id = work.saga_id(),
                        command_id,
                        "a timeout found its reply stored, too large to apply (dead-lettered): timing out"
                    );
                }
                !oversized
            })
            .map(|r| Input::Reply {
                command_id: r.command_id,
                outcome: r.outcome,
            })
            .filter(|input| {
                let saga = &stored.record.saga;
                self.registry
                    .get(&saga.saga_type, saga.version)
                    .is_some_and(|def| saga.clone().apply(def, input.clone(), now).is_ok())
            });
        match input {
            Some(input) => {
                tracing::info!(
                    saga_id = work.saga_id(),
                    command_id,
                    "a timeout found its reply stored: applied instead"
                );
                self.metrics.stored_replies.inc();
                self.apply_input(now, work, input, stored, false, Timeout::Decide)
            }
            None => self.apply_input(now, work, Input::Wake, stored, false, Timeout::Decide),
        }
    }

    /// Remembers the command whose reply `record` applied, when that record is
    /// over `max_payload`: its reply is dead-lettered, and a timeout must not
    /// apply it again from the replies stream (it would fail the same way at
    /// every fire, and the step would never time out).
    fn remember_oversized(&mut self, record: &Record) {
        let entry = &record.entry;
        let Some(command_id) = &entry.command_id else {
            return;
        };
        if matches!(entry.cause, Cause::ReplyOk | Cause::ReplyFailed) {
            if self.oversized.len() >= MAX_OVERSIZED {
                self.oversized.clear();
            }
            self.oversized.insert(command_id.clone());
        }
    }

    /// Whether `work` is a wake with nothing due for `stored`.
    fn wake_not_due(&self, now: DateTime<Utc>, work: &Work<H>, stored: &Stored) -> bool {
        let saga = &stored.record.saga;
        matches!(
            work,
            Work::Input {
                input: Input::Wake,
                ..
            }
        ) && self
            .registry
            .get(&saga.saga_type, saga.version)
            .is_some_and(|def| {
                matches!(
                    saga.clone().apply(def, Input::Wake, now),
                    Err(Rejected::NotDue)
                )
            })
    }

    /// The write that restarts the wait for a command `stored` re-sent (it may
    /// never have gone out before: a crash between the append and the publish),
    /// so a recovery costs no attempt; `None` if the saga waits for none of them,
    /// or JetStream had the command already (`duplicates`: it went out when it
    /// was recorded, and its wait runs from then). Its record has no pending
    /// effects: they were just acknowledged.
    fn resent(
        &mut self,
        now: DateTime<Utc>,
        work: &Work<H>,
        stored: &Stored,
        duplicates: &[String],
    ) -> Option<Pending> {
        let mut saga = stored.record.saga.clone();
        let def = self.registry.get(&saga.saga_type, saga.version)?.clone();
        let transition = stored
            .record
            .effects
            .iter()
            .find_map(|effect| match effect {
                Effect::Command { id } if duplicates.contains(id) => None,
                Effect::Command { id } => saga.resent(&def, id, now),
                Effect::Event { .. } => None,
            })?;
        self.observe(&def, &saga, &transition);
        if let Some(trace) = &mut self.trace {
            trace.decided(&def, Some(&stored.record.saga), &saga, &transition.entry);
        }
        // A wake's timer is gone: the renewed wait needs a new one.
        let armed = match work {
            Work::Input {
                input: Input::Wake, ..
            } => None,
            Work::Input { .. } | Work::Start { .. } => stored.record.timer_at,
        };
        let plan = plan::plan(&transition.actions, armed, saga.traceparent.as_deref());
        Some(Pending {
            record: Record::next(
                Some(&stored.record),
                transition.entry,
                saga,
                Vec::new(),
                plan.timer_at,
            ),
            set_timer: plan.set_timer,
            publish: Vec::new(),
            clear_timer: false,
            expected: stored.seq,
        })
    }

    /// Encodes the record and asks for the write, to be awaited in `stage`;
    /// `failed` is what stays known if the record cannot even be encoded.
    fn start_write(
        &mut self,
        write: Pending,
        work: Work<H>,
        failed: Known,
        stage: fn(Box<Record>) -> Stage,
    ) -> Option<Known> {
        let body = match write.record.encode() {
            Ok(body) => body,
            Err(e) => {
                let error = Error::Store(crate::store::Error::Encode(e));
                self.conclude(work, Verdict::Failed(error));
                return Some(failed);
            }
        };
        let headers = crate::record::headers(&write.record, self.finished_retention);
        self.metrics
            .observe_timer_writes(write.set_timer.is_some(), write.clear_timer);
        let saga_id = work.saga_id().to_owned();
        self.check_out(&saga_id, work, stage(Box::new(write.record)));
        self.io.push_back(Io::Write {
            saga_id,
            write: Write {
                set_timer: write.set_timer,
                append: Append {
                    headers,
                    body,
                    expected: write.expected,
                },
                publish: write.publish,
                clear_timer: write.clear_timer,
            },
        });
        None
    }

    /// Counts a transition in the metrics.
    fn observe(&self, def: &Definition, saga: &Saga, transition: &Transition) {
        for action in &transition.actions {
            match action {
                Action::Send { command, .. } if command.compensation => self
                    .metrics
                    .compensations
                    .with_label_values(&[&saga.saga_type, &command.step])
                    .inc(),
                // The outcome metrics count every outcome a saga reached: finished
                // (completed, compensated) or parked as failed for an operator.
                Action::Finish { .. } | Action::Park { .. } => {
                    self.metrics
                        .observe_finish(saga, saga.phase(), transition.entry.at);
                }
                Action::Send { .. }
                | Action::Publish { .. }
                | Action::SetTimer { .. }
                | Action::ClearTimer => {}
            }
        }
        self.metrics
            .observe_transition(def, saga, &transition.entry);
    }

    /// Work done without a write: the saga stays as stored.
    fn unchanged(&mut self, work: Work<H>, stored: Box<Stored>) -> Known {
        let phase = stored.record.saga.phase();
        self.conclude(
            work,
            Verdict::Done {
                phase,
                created: false,
            },
        );
        Known::Loaded(stored)
    }

    fn fail(&mut self, work: Work<H>, error: Error) -> Known {
        if error.kind() == IoErrorKind::TooLarge {
            // Retrying can never store it: keep the input, with the reason, as a
            // dead letter (the saga stays as it was, its timer still runs).
            let reason = std::error::Error::source(&error)
                .map_or_else(|| error.to_string(), |source| format!("{error}: {source}"));
            self.conclude(work, Verdict::Poison(Poison::TooLarge(reason)));
            return Known::NotLoaded;
        }
        tracing::warn!(saga_id = work.saga_id(), error = %error, source = ?std::error::Error::source(&error), "saga work failed; it will be retried");
        self.conclude(work, Verdict::Failed(error));
        Known::NotLoaded
    }

    /// Settles the origin of finished work.
    fn conclude(&mut self, work: Work<H>, verdict: Verdict) {
        match work {
            Work::Start {
                saga_id, origin, ..
            } => self.settle(origin, verdict, Answer::Started, |(_, created)| Started {
                saga_id,
                created,
            }),
            Work::Input { origin, .. } => {
                self.settle(origin, verdict, Answer::Phase, |(phase, _)| phase);
            }
        }
    }

    fn settle<R, T>(
        &mut self,
        origin: Origin<H::Message, R>,
        verdict: Verdict,
        answer: fn(R, Result<T, ApiError>) -> Answer<H>,
        done: impl FnOnce((Phase, bool)) -> T,
    ) {
        match origin {
            Origin::Message {
                message,
                source,
                delivered,
                ..
            } => match (settlement(&verdict, delivered), verdict) {
                (Settle::Term, Verdict::Poison(poison)) => {
                    let reason = poison.to_string();
                    tracing::warn!(source = source.dead_letter_source(), %reason, "dead-lettering a poison message");
                    self.metrics
                        .dead_letters
                        .with_label_values(&[source.dead_letter_source()])
                        .inc();
                    self.io.push_back(Io::DeadLetter {
                        message,
                        source,
                        reason,
                    });
                }
                (settle, _) => self.io.push_back(Io::Settle { message, settle }),
            },
            Origin::Sweep => {
                if let Verdict::Failed(error) = verdict {
                    tracing::debug!(%error, "a swept wake failed; the next sweep tries again");
                }
            }
            Origin::Api(reply) => {
                let result = match verdict {
                    Verdict::Done { phase, created } => Ok(done((phase, created))),
                    Verdict::Refused(refusal) => Err(refusal),
                    Verdict::Poison(poison) => Err(poison.refusal()),
                    Verdict::Failed(error) => Err(ApiError::from(error)),
                };
                self.io.push_back(Io::Answer(answer(reply, result)));
            }
        }
    }
}

/// A decoded message.
enum Decoded {
    Start {
        saga_id: String,
        def: Arc<Definition>,
        start: protocol::Start,
    },
    Input {
        saga_id: String,
        input: Input,
    },
}

/// A transition's writes before the record is encoded.
struct Pending {
    record: Record,
    set_timer: Option<DateTime<Utc>>,
    publish: Vec<Outbound>,
    clear_timer: bool,
    expected: u64,
}

#[cfg(test)]
mod tests;
