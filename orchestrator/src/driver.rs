//! The driver: the only code that runs sagas against JetStream.
//!
//! One task owns every saga this instance holds in memory. For each input (a
//! reply, a start, a fired timer, an operator request) it loads the saga if
//! needed, calls the pure [`Saga::apply`], and hands the persistence and the
//! effects to an I/O future. Inputs for one saga are applied one at a time, in
//! arrival order; different sagas proceed concurrently, so thousands of I/O
//! futures are in flight while the driver itself never waits on the network.
//!
//! Each I/O future: arms the timer if it must move earlier, appends the journal
//! record with optimistic concurrency, then publishes commands and events, and
//! only when JetStream acknowledged all of it acks the input. A conflict (another
//! instance was first) reloads the saga and re-applies the input.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use chrono::{DateTime, Timelike, Utc};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use jetsaga_sagas::protocol::{self, Body, header};
use jetsaga_sagas::{Action, Cause, Definition, Input, Phase, Rejected, Saga};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::dead;
use crate::definitions::Registry;
use crate::metrics::Metrics;
use crate::store::{self, Outbound, Record, Store, Stored};

/// Where an input came from, and so how to settle it.
#[derive(Debug)]
pub(crate) enum Origin {
    /// A JetStream message: acked when done, nak'd on failure, terminated if poison.
    Message(Box<jetstream::Message>),
    /// A library or HTTP call waiting for the answer.
    Api(oneshot::Sender<Result<Answer, ApiError>>),
    /// Nothing to settle.
    None,
}

/// What an operator or client call gets back.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A saga was started (`created`) or already existed for the key.
    Started {
        /// The saga.
        saga_id: String,
        /// False when the key had already started this saga.
        created: bool,
    },
    /// The input was applied; the saga is now in this state.
    Applied {
        /// The saga's state after the transition.
        phase: Phase,
    },
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No such saga type.
    #[error("unknown saga type \"{0}\"")]
    UnknownType(String),
    /// The start input failed validation.
    #[error("{0}")]
    InvalidInput(String),
    /// No such saga.
    #[error("saga {0} not found")]
    NotFound(String),
    /// The saga's state does not allow it.
    #[error("{0}")]
    NotAllowed(String),
    /// The orchestrator is stopping.
    #[error("the orchestrator is shutting down")]
    ShuttingDown,
    /// NATS or the journal failed; the call may be retried.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// One unit of work for one saga.
#[derive(Debug)]
pub(crate) enum Work {
    /// Start a saga (its id derives from type and key).
    Start {
        def: Arc<Definition>,
        key: String,
        input: serde_json::Value,
        traceparent: Option<String>,
        origin: Origin,
    },
    /// Apply an input to an existing saga.
    Input { input: Input, origin: Origin },
}

impl Work {
    /// Whether this input can be the first sign of a transition that was stored but
    /// whose commands were never published (its process died in between). Such a
    /// transition's own input is redelivered, and its timer fires; a first delivery
    /// of a reply cannot be it (the reply answers a command that was published).
    fn may_follow_an_interrupted_transition(&self) -> bool {
        match self {
            Work::Start { .. } => true,
            Work::Input { input, origin } => match origin {
                Origin::Message(message) => {
                    *input == Input::Wake || message.info().map_or(true, |info| info.delivered > 1)
                }
                Origin::Api(_) | Origin::None => true,
            },
        }
    }

    fn origin(&mut self) -> &mut Origin {
        match self {
            Work::Start { origin, .. } | Work::Input { origin, .. } => origin,
        }
    }
}

/// A request from a [`crate::Handle`].
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) saga_id: String,
    pub(crate) work: Work,
}

/// The namespace of saga ids derived from (type, key).
const SAGA_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6a65_7473_6167_6100_8000_0000_0000_0001);

/// The saga id a start key maps to: the same key always yields the same saga.
pub fn saga_id(saga_type: &str, key: &str) -> String {
    // Length-prefixed so that no (type, key) pair can collide with another.
    let name = format!("{}:{saga_type}{key}", saga_type.len());
    uuid::Uuid::new_v5(&SAGA_ID_NAMESPACE, name.as_bytes()).to_string()
}

/// Which consumer a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Replies,
    Starts,
    Timers,
}

impl Source {
    fn dead_letter_source(self) -> &'static str {
        match self {
            Source::Replies => "orchestrator.replies",
            Source::Starts => "orchestrator.starts",
            Source::Timers => "orchestrator.timers",
        }
    }
}

/// The I/O side shared by every future.
#[derive(Debug, Clone)]
pub(crate) struct Io {
    pub(crate) js: jetstream::Context,
    pub(crate) store: Store,
    pub(crate) metrics: Metrics,
}

/// What a saga's slot knows about it.
#[derive(Debug)]
enum Known {
    /// Not loaded yet.
    Unknown,
    /// Loaded: no such saga.
    Absent,
    /// Loaded: its last record.
    Present(Box<Stored>),
}

#[derive(Debug)]
struct Slot {
    known: Known,
    busy: bool,
    queue: VecDeque<Work>,
    /// When work last arrived; idle sagas leave memory (see `housekeeping`).
    touched: std::time::Instant,
}

/// How long a saga may sit in memory without input. Another instance may have moved
/// it on (active-active), so an idle copy is dropped and reloaded when needed.
const IDLE_EVICTION: Duration = Duration::from_secs(15);

/// What an I/O future reports back to the driver.
enum Done {
    Loaded {
        saga_id: String,
        result: Result<Option<Box<Stored>>, store::Error>,
        work: Work,
    },
    Persisted {
        saga_id: String,
        stored: Box<Stored>,
    },
    Conflict {
        saga_id: String,
        work: Work,
    },
    Failed {
        saga_id: String,
        work: Work,
        error: String,
    },
    /// The work finished without changing what the slot knows.
    Released {
        saga_id: String,
        known: Option<Known>,
    },
}

/// The driver task's state.
pub(crate) struct Driver {
    io: Io,
    registry: Arc<Registry>,
    slots: HashMap<String, Slot>,
    inflight: FuturesUnordered<BoxFuture<'static, Done>>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("sagas", &self.slots.len())
            .field("inflight", &self.inflight.len())
            .finish()
    }
}

impl Driver {
    pub(crate) fn new(io: Io, registry: Arc<Registry>) -> Self {
        Self {
            io,
            registry,
            slots: HashMap::new(),
            inflight: FuturesUnordered::new(),
        }
    }

    /// Runs until `token` is cancelled, then finishes the work in flight.
    pub(crate) async fn run(
        mut self,
        mut messages: mpsc::Receiver<(Source, jetstream::Message)>,
        mut requests: mpsc::Receiver<Request>,
        token: CancellationToken,
    ) {
        let mut gauges = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                biased;
                Some(done) = self.inflight.next(), if !self.inflight.is_empty() => self.on_done(done),
                _ = gauges.tick() => self.housekeeping(),
                Some((source, message)) = messages.recv() => self.on_message(source, message),
                Some(request) = requests.recv() => self.dispatch(request.saga_id, request.work),
                () = token.cancelled() => break,
            }
        }
        // Stop taking new work; what is queued behind busy sagas is left unacked and
        // JetStream redelivers it (to this or another instance).
        requests.close();
        messages.close();
        while let Some(done) = self.inflight.next().await {
            self.on_done(done);
            for slot in self.slots.values_mut() {
                for mut work in slot.queue.drain(..) {
                    settle_unavailable(work.origin(), ApiError::ShuttingDown);
                }
            }
        }
        while let Ok(mut request) = requests.try_recv() {
            settle_unavailable(request.work.origin(), ApiError::ShuttingDown);
        }
    }

    /// Drops sagas idle in memory for [`IDLE_EVICTION`] and counts the rest by state.
    fn housekeeping(&mut self) {
        self.slots.retain(|_, slot| {
            slot.busy || !slot.queue.is_empty() || slot.touched.elapsed() < IDLE_EVICTION
        });
        let mut counts = [0i64; Phase::ALL.len()];
        for slot in self.slots.values() {
            if let Known::Present(stored) = &slot.known {
                let phase = stored.record.saga.phase();
                if let Some(i) = Phase::ALL.iter().position(|p| *p == phase) {
                    counts[i] += 1;
                }
            }
        }
        for (phase, count) in Phase::ALL.iter().zip(counts) {
            self.io
                .metrics
                .in_flight
                .with_label_values(&[phase.as_str()])
                .set(count);
        }
    }

    fn on_message(&mut self, source: Source, message: jetstream::Message) {
        match self.decode(source, &message) {
            Ok((saga_id, work_of)) => {
                self.dispatch(saga_id, work_of(Origin::Message(Box::new(message))))
            }
            Err(reason) => self.dead_letter(source, Box::new(message), reason),
        }
    }

    /// Turns a message into the saga it concerns and a work builder, or a reason
    /// to dead-letter it.
    #[allow(clippy::type_complexity)]
    fn decode(
        &self,
        source: Source,
        message: &jetstream::Message,
    ) -> Result<(String, Box<dyn FnOnce(Origin) -> Work + Send>), String> {
        match source {
            Source::Replies => {
                let reply = protocol::Reply::decode(&message.payload).map_err(|e| e.to_string())?;
                let command =
                    protocol::CommandId::parse(&reply.command_id).map_err(|e| e.to_string())?;
                if command.saga_id != reply.saga_id {
                    return Err(format!(
                        "reply names saga {} but its command id belongs to saga {}",
                        reply.saga_id, command.saga_id
                    ));
                }
                let input = Input::Reply {
                    command_id: reply.command_id,
                    outcome: reply.outcome,
                };
                Ok((
                    reply.saga_id,
                    Box::new(move |origin| Work::Input { input, origin }),
                ))
            }
            Source::Starts => {
                let saga_type = message
                    .subject
                    .strip_prefix("saga.start.")
                    .ok_or_else(|| format!("unexpected start subject {}", message.subject))?;
                let def = self
                    .registry
                    .latest(saga_type)
                    .ok_or_else(|| format!("unknown saga type \"{saga_type}\""))?
                    .clone();
                let start = protocol::Start::decode(&message.payload).map_err(|e| e.to_string())?;
                if start.key.is_empty() {
                    return Err("invalid Start: empty key".to_owned());
                }
                jetsaga_sagas::order::validate_input(def.input, &start.input)
                    .map_err(|e| e.to_string())?;
                let traceparent = header_value(message.headers.as_ref(), header::TRACEPARENT);
                let id = saga_id(&def.name, &start.key);
                Ok((
                    id,
                    Box::new(move |origin| Work::Start {
                        def,
                        key: start.key,
                        input: start.input,
                        traceparent,
                        origin,
                    }),
                ))
            }
            Source::Timers => {
                let id = message
                    .subject
                    .strip_prefix("saga.timer.fire.")
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| format!("unexpected timer subject {}", message.subject))?
                    .to_owned();
                Ok((
                    id,
                    Box::new(|origin| Work::Input {
                        input: Input::Wake,
                        origin,
                    }),
                ))
            }
        }
    }

    fn dead_letter(&mut self, source: Source, message: Box<jetstream::Message>, reason: String) {
        tracing::warn!(source = source.dead_letter_source(), subject = %message.subject, %reason, "dead-lettering a poison message");
        self.io
            .metrics
            .dead_letters
            .with_label_values(&[source.dead_letter_source()])
            .inc();
        let js = self.io.js.clone();
        self.inflight.push(
            async move {
                dead::publish_and_term(&js, source.dead_letter_source(), *message, &reason).await;
                Done::Released {
                    saga_id: String::new(),
                    known: None,
                }
            }
            .boxed(),
        );
    }

    /// Queues work for a saga, or starts it if the saga is idle.
    pub(crate) fn dispatch(&mut self, saga_id: String, work: Work) {
        let slot = self.slots.entry(saga_id.clone()).or_insert_with(|| Slot {
            known: Known::Unknown,
            busy: false,
            queue: VecDeque::new(),
            touched: std::time::Instant::now(),
        });
        slot.touched = std::time::Instant::now();
        if slot.busy {
            slot.queue.push_back(work);
            return;
        }
        slot.busy = true;
        self.begin(saga_id, work, false);
    }

    /// Runs work on an idle (now busy) saga.
    fn begin(&mut self, saga_id: String, work: Work, leader: bool) {
        let Some(slot) = self.slots.get_mut(&saga_id) else {
            return;
        };
        if matches!(slot.known, Known::Unknown) {
            let io = self.io.clone();
            let registry = self.registry.clone();
            let replay = work.may_follow_an_interrupted_transition();
            self.inflight.push(
                async move {
                    let result = io.store.load(&saga_id, leader).await;
                    // A record loaded from the journal may belong to a transition whose
                    // effects were interrupted (a crash between persisting and
                    // publishing): publishing them again is harmless (de-duplicated by
                    // message id and, past the window, by the participants' command ids).
                    let result = match result {
                        Ok(Some(stored)) if replay => {
                            let saga = &stored.record.saga;
                            let messages = registry
                                .get(&saga.saga_type, saga.version)
                                .map(|def| store::rebuild(&stored.record, def))
                                .unwrap_or_default();
                            match publish_effects(&io.js, &messages, true).await {
                                Ok(()) => Ok(Some(Box::new(stored))),
                                Err(e) => Err(store::Error::Nats(e)),
                            }
                        }
                        Ok(stored) => Ok(stored.map(Box::new)),
                        Err(e) => Err(e),
                    };
                    Done::Loaded {
                        saga_id,
                        result,
                        work,
                    }
                }
                .boxed(),
            );
            return;
        }
        let known = std::mem::replace(&mut slot.known, Known::Unknown);
        self.apply(saga_id, known, work);
    }

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Loaded {
                saga_id,
                result,
                work,
            } => match result {
                Ok(found) => {
                    let known = match found {
                        Some(stored) => Known::Present(stored),
                        None => Known::Absent,
                    };
                    self.apply(saga_id, known, work);
                }
                Err(e) => self.fail(saga_id, work, e.to_string()),
            },
            Done::Persisted { saga_id, stored } => {
                let finished = stored.record.saga.phase() != Phase::Running
                    && stored.record.saga.phase() != Phase::Compensating;
                if let Some(slot) = self.slots.get_mut(&saga_id) {
                    slot.known = if finished {
                        // Finished sagas leave memory; their state stays in the journal.
                        Known::Unknown
                    } else {
                        Known::Present(stored)
                    };
                }
                self.next(saga_id);
            }
            Done::Conflict { saga_id, work } => {
                self.io.metrics.conflicts.inc();
                if let Some(slot) = self.slots.get_mut(&saga_id) {
                    slot.known = Known::Unknown;
                }
                self.begin(saga_id, work, true);
            }
            Done::Failed {
                saga_id,
                work,
                error,
            } => self.fail(saga_id, work, error),
            Done::Released { saga_id, known } => {
                if saga_id.is_empty() {
                    return;
                }
                if let (Some(slot), Some(known)) = (self.slots.get_mut(&saga_id), known) {
                    slot.known = known;
                }
                self.next(saga_id);
            }
        }
    }

    fn fail(&mut self, saga_id: String, mut work: Work, error: String) {
        tracing::warn!(saga_id, %error, "saga work failed; it will be retried");
        if let Some(slot) = self.slots.get_mut(&saga_id) {
            slot.known = Known::Unknown;
        }
        let origin = std::mem::replace(work.origin(), Origin::None);
        self.settle_later(origin, Err(ApiError::Unavailable(error)));
        self.next(saga_id);
    }

    /// The saga's current work is over: start the next one or forget the slot.
    fn next(&mut self, saga_id: String) {
        let Some(slot) = self.slots.get_mut(&saga_id) else {
            return;
        };
        match slot.queue.pop_front() {
            Some(work) => self.begin(saga_id, work, false),
            None => {
                slot.busy = false;
                if !matches!(slot.known, Known::Present(_)) {
                    self.slots.remove(&saga_id);
                }
            }
        }
    }

    /// Applies work to a loaded saga.
    fn apply(&mut self, saga_id: String, known: Known, work: Work) {
        let now = Utc::now();
        match (work, known) {
            (Work::Start { origin, .. }, Known::Present(stored)) => {
                self.release(
                    saga_id.clone(),
                    Known::Present(stored),
                    origin,
                    Ok(Answer::Started {
                        saga_id,
                        created: false,
                    }),
                );
            }
            (
                Work::Start {
                    def,
                    key,
                    input,
                    traceparent,
                    origin,
                },
                Known::Absent | Known::Unknown,
            ) => match Saga::start(&def, saga_id.clone(), key, input, traceparent, now) {
                Ok((saga, transition)) => {
                    self.io
                        .metrics
                        .started
                        .with_label_values(&[&def.name])
                        .inc();
                    let work = Work::Start {
                        def: def.clone(),
                        key: saga.key.clone(),
                        input: saga.input.clone(),
                        traceparent: saga.traceparent.clone(),
                        origin,
                    };
                    self.persist(saga_id, &def, saga, transition, None, 0, work);
                }
                Err(invalid) => match origin {
                    Origin::Message(message) => {
                        self.dead_letter(Source::Starts, message, invalid.to_string());
                        self.release(
                            saga_id,
                            Known::Absent,
                            Origin::None,
                            Err(ApiError::InvalidInput(String::new())),
                        );
                    }
                    origin => self.release(
                        saga_id,
                        Known::Absent,
                        origin,
                        Err(ApiError::InvalidInput(invalid.0)),
                    ),
                },
            },
            (Work::Input { input, origin }, Known::Absent | Known::Unknown) => match origin {
                Origin::Message(message) if matches!(input, Input::Reply { .. }) => {
                    self.dead_letter(Source::Replies, message, format!("unknown saga {saga_id}"));
                    self.release(
                        saga_id,
                        Known::Absent,
                        Origin::None,
                        Err(ApiError::NotFound(String::new())),
                    );
                }
                origin => {
                    // A timer for a saga that no longer exists (retention) is simply dropped.
                    let error = ApiError::NotFound(saga_id.clone());
                    self.release(saga_id, Known::Absent, origin, Err(error));
                }
            },
            (Work::Input { input, origin }, Known::Present(stored)) => {
                self.apply_input(saga_id, *stored, input, origin, now);
            }
        }
    }

    fn apply_input(
        &mut self,
        saga_id: String,
        stored: Stored,
        input: Input,
        origin: Origin,
        now: DateTime<Utc>,
    ) {
        let saga_type = stored.record.saga.saga_type.clone();
        let version = stored.record.saga.version;
        let Some(def) = self.registry.get(&saga_type, version).cloned() else {
            let error = format!("definition {saga_type} version {version} is not loaded");
            tracing::error!(saga_id, %error);
            if let Origin::Message(message) = origin {
                self.inflight.push(
                    async move {
                        let _ = message
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(30))))
                            .await;
                        Done::Released {
                            saga_id,
                            known: None,
                        }
                    }
                    .boxed(),
                );
                return;
            }
            return self.release(
                saga_id,
                Known::Present(Box::new(stored)),
                origin,
                Err(ApiError::Unavailable(error)),
            );
        };
        let mut saga = stored.record.saga.clone();
        let mut timer_at = stored.record.timer_at;
        if input == Input::Wake {
            // The timer that fired is gone: whatever comes next must arm a new one.
            timer_at = None;
        }
        match saga.apply(&def, input.clone(), now) {
            Ok(transition) => {
                let expected = stored.seq;
                self.persist(
                    saga_id,
                    &def,
                    saga,
                    transition,
                    timer_at,
                    expected,
                    Work::Input { input, origin },
                );
            }
            Err(Rejected::NotDue | Rejected::Finished) if input == Input::Wake => {
                // An early or stale timer: re-arm for what is really due.
                let next = saga.next_timer(&def).map(round_up);
                let mut stored = stored;
                stored.record.timer_at = next;
                let io = self.io.clone();
                self.inflight.push(
                    async move {
                        let armed = match next {
                            Some(at) => set_timer(&io.js, &saga_id, at).await,
                            None => Ok(()),
                        };
                        match armed {
                            Ok(()) => {
                                settle(
                                    origin,
                                    Ok(Answer::Applied {
                                        phase: stored.record.saga.phase(),
                                    }),
                                )
                                .await;
                                Done::Released {
                                    saga_id,
                                    known: Some(Known::Present(Box::new(stored))),
                                }
                            }
                            Err(error) => Done::Failed {
                                saga_id,
                                work: Work::Input { input, origin },
                                error,
                            },
                        }
                    }
                    .boxed(),
                );
            }
            Err(rejected @ (Rejected::Duplicate | Rejected::Stale | Rejected::Finished))
                if matches!(input, Input::Reply { .. }) =>
            {
                // Late and duplicate replies change nothing but are journaled.
                self.io.metrics.duplicates.inc();
                let entry = saga.ignored_entry(&input, &rejected, now);
                let record = Record {
                    entry,
                    saga,
                    effects: Vec::new(),
                    timer_at,
                };
                let job = Job {
                    record,
                    messages: Vec::new(),
                    arm: None,
                    clear: false,
                    expected: stored.seq,
                };
                self.spawn_persist(saga_id, job, Work::Input { input, origin });
            }
            Err(Rejected::UnknownCommand(reason)) => {
                let known = Known::Present(Box::new(stored));
                match origin {
                    Origin::Message(message) => {
                        self.dead_letter(Source::Replies, message, reason);
                        self.release(
                            saga_id,
                            known,
                            Origin::None,
                            Ok(Answer::Applied {
                                phase: Phase::Running,
                            }),
                        );
                    }
                    origin => {
                        self.release(saga_id, known, origin, Err(ApiError::NotAllowed(reason)))
                    }
                }
            }
            Err(rejected) => {
                let phase = stored.record.saga.phase();
                let known = Known::Present(Box::new(stored));
                let answer = match rejected {
                    Rejected::Finished => Err(ApiError::NotAllowed(format!(
                        "the saga is already {}",
                        phase.as_str()
                    ))),
                    other => Err(ApiError::NotAllowed(other.to_string())),
                };
                self.release(saga_id, known, origin, answer);
            }
        }
    }

    /// Ends work that changes nothing: settle the origin, keep what is known.
    fn release(
        &mut self,
        saga_id: String,
        known: Known,
        origin: Origin,
        answer: Result<Answer, ApiError>,
    ) {
        self.inflight.push(
            async move {
                settle(origin, answer).await;
                Done::Released {
                    saga_id,
                    known: Some(known),
                }
            }
            .boxed(),
        );
    }

    fn settle_later(&mut self, origin: Origin, answer: Result<Answer, ApiError>) {
        self.inflight.push(
            async move {
                settle(origin, answer).await;
                Done::Released {
                    saga_id: String::new(),
                    known: None,
                }
            }
            .boxed(),
        );
    }

    /// Turns a transition into a record plus timer moves, and starts its I/O.
    #[allow(clippy::too_many_arguments)]
    fn persist(
        &mut self,
        saga_id: String,
        def: &Definition,
        saga: Saga,
        transition: jetsaga_sagas::Transition,
        mut timer_at: Option<DateTime<Utc>>,
        expected: u64,
        work: Work,
    ) {
        let metrics = &self.io.metrics;
        let mut effects = Vec::new();
        let mut messages = Vec::new();
        let mut arm = None;
        let mut clear = false;
        for action in transition.actions {
            match &action {
                Action::Send { .. } | Action::Publish { .. } => {
                    if let Action::Send { command, .. } = &action
                        && command.compensation
                    {
                        metrics
                            .compensations
                            .with_label_values(&[&saga.saga_type, &command.step])
                            .inc();
                    }
                    if let Some((effect, message)) =
                        store::outbound(&action, saga.traceparent.as_deref())
                    {
                        effects.push(effect);
                        messages.push(message);
                    }
                }
                Action::SetTimer { at } => {
                    // Timers only ever move earlier on the wire: a later due time is
                    // served by letting the armed timer fire early and re-arming then.
                    let at = round_up(*at);
                    if timer_at.is_none_or(|armed| at < armed) {
                        arm = Some(at);
                        timer_at = Some(at);
                    }
                }
                Action::ClearTimer => {
                    clear = timer_at.is_some();
                    timer_at = None;
                }
                Action::Finish { phase } => {
                    let phase = *phase;
                    metrics
                        .finished
                        .with_label_values(&[&saga.saga_type, phase.as_str()])
                        .inc();
                    let took = (transition.entry.at - saga.created_at)
                        .num_milliseconds()
                        .max(0) as f64
                        / 1000.0;
                    metrics
                        .saga_duration
                        .with_label_values(&[&saga.saga_type, phase.as_str()])
                        .observe(took);
                }
            }
        }
        let entry = &transition.entry;
        let cause = cause_label(entry.cause);
        metrics
            .transitions
            .with_label_values(&[&saga.saga_type, cause])
            .inc();
        if let Some(step) = &entry.step {
            match entry.cause {
                Cause::StepTimeout => metrics
                    .timeouts
                    .with_label_values(&[&saga.saga_type, step])
                    .inc(),
                Cause::RetryDue => metrics
                    .retries
                    .with_label_values(&[&saga.saga_type, step])
                    .inc(),
                Cause::ReplyOk => {
                    if let Some(record) = def.step_index(step).map(|i| &saga.steps[i])
                        && let Some(started) = record.started_at
                    {
                        let took = (entry.at - started).num_milliseconds().max(0) as f64 / 1000.0;
                        metrics
                            .step_duration
                            .with_label_values(&[&saga.saga_type, step])
                            .observe(took);
                    }
                }
                _ => {}
            }
        }
        let record = Record {
            entry: transition.entry,
            saga,
            effects,
            timer_at,
        };
        let job = Job {
            record,
            messages,
            arm,
            clear,
            expected,
        };
        self.spawn_persist(saga_id, job, work);
    }

    fn spawn_persist(&mut self, saga_id: String, job: Job, work: Work) {
        let io = self.io.clone();
        self.inflight.push(persist(io, saga_id, job, work).boxed());
    }
}

/// What one transition writes.
struct Job {
    /// The journal record.
    record: Record,
    /// The commands and events to publish after it.
    messages: Vec<Outbound>,
    /// A timer to arm first.
    arm: Option<DateTime<Utc>>,
    /// Whether to clear the timer at the end.
    clear: bool,
    /// The journal sequence the record must follow.
    expected: u64,
}

/// The I/O of one transition, in the order that keeps it crash-safe.
async fn persist(io: Io, saga_id: String, job: Job, mut work: Work) -> Done {
    let Job {
        record,
        messages,
        arm,
        clear,
        expected,
    } = job;
    // 1. A timer that must move earlier is armed before the record is stored, so a
    //    stored non-terminal saga always has a timer that will wake it (and so
    //    finish its effects) even if this process dies right after the append.
    if let Some(at) = arm
        && let Err(error) = set_timer(&io.js, &saga_id, at).await
    {
        return Done::Failed {
            saga_id,
            work,
            error,
        };
    }
    // 2. The transition itself, with optimistic concurrency.
    let seq = match io.store.append(&saga_id, &record, expected).await {
        Ok(seq) => seq,
        Err(store::Error::Conflict) => return Done::Conflict { saga_id, work },
        Err(e) => {
            return Done::Failed {
                saga_id,
                work,
                error: e.to_string(),
            };
        }
    };
    // 3. Its effects, pipelined, then the timer clear.
    let mut result = publish_effects(&io.js, &messages, false).await;
    if result.is_ok() && clear {
        result = clear_timer(&io.js, &saga_id).await;
    }
    if let Err(error) = result {
        // The record is stored; the effects are re-published when the saga is
        // next loaded (the input is redelivered or its timer fires).
        return Done::Failed {
            saga_id,
            work,
            error,
        };
    }
    // 4. Only now is the input done.
    let answer = match &work {
        Work::Start { .. } => Answer::Started {
            saga_id: saga_id.clone(),
            created: true,
        },
        Work::Input { .. } => Answer::Applied {
            phase: record.saga.phase(),
        },
    };
    settle(std::mem::replace(work.origin(), Origin::None), Ok(answer)).await;
    Done::Persisted {
        saga_id,
        stored: Box::new(Stored { record, seq }),
    }
}

/// Publishes commands and events and waits for JetStream to store them all.
/// `resent` marks a recovery re-publish, so participants check their records.
pub(crate) async fn publish_effects(
    js: &jetstream::Context,
    effects: &[Outbound],
    resent: bool,
) -> Result<(), String> {
    let mut acks = Vec::with_capacity(effects.len());
    for effect in effects {
        let mut headers = HeaderMap::new();
        headers.insert(header::MSG_ID, effect.msg_id.as_str());
        for (name, value) in &effect.headers {
            headers.insert(*name, value.as_str());
        }
        if resent {
            headers.insert(header::RESENT, "true");
        }
        let ack = js
            .publish_with_headers(effect.subject.clone(), headers, effect.body.clone())
            .await
            .map_err(|e| format!("publish {}: {e}", effect.subject))?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await.map_err(|e| format!("publish ack: {e}"))?;
    }
    Ok(())
}

/// Schedules the saga's single timer at `at`, replacing any armed one.
async fn set_timer(
    js: &jetstream::Context,
    saga_id: &str,
    at: DateTime<Utc>,
) -> Result<(), String> {
    let mut headers = HeaderMap::new();
    headers.insert(
        "Nats-Schedule",
        format!("@at {}", at.format("%Y-%m-%dT%H:%M:%S%.3fZ")).as_str(),
    );
    headers.insert(
        "Nats-Schedule-Target",
        format!("saga.timer.fire.{saga_id}").as_str(),
    );
    headers.insert(header::SAGA_ID, saga_id);
    js.publish_with_headers(format!("saga.timer.set.{saga_id}"), headers, Bytes::new())
        .await
        .map_err(|e| format!("arm timer: {e}"))?
        .await
        .map_err(|e| format!("arm timer: {e}"))?;
    Ok(())
}

/// Cancels the saga's timer: a plain message replaces the schedule (one message
/// per subject) and expires by itself.
async fn clear_timer(js: &jetstream::Context, saga_id: &str) -> Result<(), String> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-TTL", "1s");
    js.publish_with_headers(format!("saga.timer.set.{saga_id}"), headers, Bytes::new())
        .await
        .map_err(|e| format!("clear timer: {e}"))?
        .await
        .map_err(|e| format!("clear timer: {e}"))?;
    Ok(())
}

/// Schedules fire to the millisecond; rounding up to a whole millisecond (plus a
/// little) keeps a timer from firing just before what it waits for is due.
fn round_up(at: DateTime<Utc>) -> DateTime<Utc> {
    let millis = at.timestamp_millis() + 1 + i64::from(!at.nanosecond().is_multiple_of(1_000_000));
    DateTime::from_timestamp_millis(millis).unwrap_or(at)
}

/// Acks, naks or answers the origin of finished work.
async fn settle(origin: Origin, answer: Result<Answer, ApiError>) {
    match origin {
        Origin::Message(message) => {
            let kind = match &answer {
                Ok(_)
                | Err(
                    ApiError::NotFound(_) | ApiError::NotAllowed(_) | ApiError::InvalidInput(_),
                ) => AckKind::Ack,
                Err(_) => AckKind::Nak(Some(Duration::from_secs(1))),
            };
            if let Err(e) = message.ack_with(kind).await {
                tracing::warn!(error = %e, "ack failed; the message will be redelivered");
            }
        }
        Origin::Api(reply) => {
            let _ = reply.send(answer);
        }
        Origin::None => {}
    }
}

fn settle_unavailable(origin: &mut Origin, error: ApiError) {
    if let Origin::Api(reply) = std::mem::replace(origin, Origin::None) {
        let _ = reply.send(Err(error));
    }
}

fn header_value(headers: Option<&HeaderMap>, name: &str) -> Option<String> {
    headers?.get(name).map(|v| v.as_str().to_owned())
}

fn cause_label(cause: Cause) -> &'static str {
    match cause {
        Cause::Start => "start",
        Cause::ReplyOk => "reply_ok",
        Cause::ReplyFailed => "reply_failed",
        Cause::StepTimeout => "step_timeout",
        Cause::RetryDue => "retry_due",
        Cause::Deadline => "deadline",
        Cause::OperatorRetry => "operator_retry",
        Cause::OperatorAbort => "operator_abort",
        Cause::Ignored => "ignored",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_timers_round_up() {
        assert_eq!(
            saga_id("order-creation", "k1"),
            saga_id("order-creation", "k1")
        );
        assert_ne!(
            saga_id("order-creation", "k1"),
            saga_id("order-creation", "k2")
        );
        assert_ne!(saga_id("a", "b\nc"), saga_id("a\nb", "c"));
        let t = DateTime::parse_from_rfc3339("2026-01-01T00:00:01.2004Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(round_up(t).to_rfc3339(), "2026-01-01T00:00:01.202+00:00");
        let whole = DateTime::parse_from_rfc3339("2026-01-01T00:00:01Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            round_up(whole).to_rfc3339(),
            "2026-01-01T00:00:01.001+00:00"
        );
    }
}
