//! The saga state machine: one enum of states and one pure transition function.
//!
//! [`Saga::start`] creates a saga; [`Saga::apply`] moves it on one [`Input`] at a
//! time and returns the side effects as [`Action`]s plus the journal [`Entry`]
//! describing the transition. Nothing here reads the clock or touches I/O: the
//! caller passes `now` and carries out the actions.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::definition::{Definition, StepKind};
use crate::order::{InvalidInput, validate_input};
use crate::protocol::{self, CommandId, Direction, Failure, Outcome, subject};

/// Where a saga is. Each variant carries only what is valid in that state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum State {
    /// Running step `step` forward.
    Running {
        /// Index of the current step.
        step: usize,
        /// What the step waits for.
        wait: Wait,
    },
    /// Undoing step `step` on the way back to the start.
    Compensating {
        /// Index of the step being compensated.
        step: usize,
        /// What the compensation waits for.
        wait: Wait,
        /// The attempt number that started this round of retries (operator retry starts a new round).
        first_attempt: u32,
        /// Why the saga is being compensated.
        cause: Failure,
    },
    /// Every step succeeded. Terminal.
    Completed,
    /// Every applied step before the pivot was undone. Terminal.
    Compensated {
        /// Why it was compensated.
        cause: Failure,
    },
    /// A compensation kept failing; the saga waits for an operator to retry it.
    Failed {
        /// Index of the step whose compensation failed.
        step: usize,
        /// The compensation's last error.
        error: Failure,
        /// Why the saga was being compensated.
        cause: Failure,
    },
}

/// What the current step (or compensation) waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "for", rename_all = "lowercase")]
pub enum Wait {
    /// The reply to attempt `attempt`, until `timeout_at`.
    Reply {
        /// The attempt whose command is out.
        attempt: u32,
        /// When that attempt times out.
        timeout_at: DateTime<Utc>,
    },
    /// The end of the backoff after attempt `attempt` failed.
    Backoff {
        /// The attempt that failed.
        attempt: u32,
        /// When the next attempt goes out.
        until: DateTime<Utc>,
    },
}

impl Wait {
    fn attempt(&self) -> u32 {
        match self {
            Self::Reply { attempt, .. } | Self::Backoff { attempt, .. } => *attempt,
        }
    }

    fn due(&self) -> DateTime<Utc> {
        match self {
            Self::Reply { timeout_at, .. } => *timeout_at,
            Self::Backoff { until, .. } => *until,
        }
    }
}

/// The state name alone, for journals, metrics and filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// See [`State::Running`].
    Running,
    /// See [`State::Compensating`].
    Compensating,
    /// See [`State::Completed`].
    Completed,
    /// See [`State::Compensated`].
    Compensated,
    /// See [`State::Failed`].
    Failed,
}

impl Phase {
    /// All phases, for metrics.
    pub const ALL: [Phase; 5] = [
        Phase::Running,
        Phase::Compensating,
        Phase::Completed,
        Phase::Compensated,
        Phase::Failed,
    ];

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
        }
    }

    /// Completed or compensated: nothing more will happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated)
    }
}

impl std::str::FromStr for Phase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown saga state \"{s}\""))
    }
}

/// What is known about one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// A command is out, or waiting to be retried.
    Running,
    /// Applied.
    Succeeded,
    /// Reported as not applied.
    Failed,
    /// Gave up without knowing whether it was applied (timeout, retryable errors).
    Uncertain,
    /// Its compensation is under way.
    Compensating,
    /// Undone.
    Compensated,
    /// Its compensation kept failing.
    CompensationFailed,
}

/// The record of one step within a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step name.
    pub name: String,
    /// Where it stands.
    pub status: StepStatus,
    /// Forward attempts sent.
    pub attempts: u32,
    /// Compensation attempts sent.
    pub compensation_attempts: u32,
    /// The participant's result on success.
    pub result: Option<serde_json::Value>,
    /// The last error seen (forward or compensation).
    pub last_error: Option<Failure>,
    /// When its first command went out.
    pub started_at: Option<DateTime<Utc>>,
    /// When it succeeded, failed or was compensated.
    pub finished_at: Option<DateTime<Utc>>,
}

impl StepRecord {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            status: StepStatus::Pending,
            attempts: 0,
            compensation_attempts: 0,
            result: None,
            last_error: None,
            started_at: None,
            finished_at: None,
        }
    }

    /// Whether the step may have been applied and so must be undone.
    fn may_be_applied(&self) -> bool {
        matches!(
            self.status,
            StepStatus::Succeeded | StepStatus::Uncertain | StepStatus::Running
        )
    }
}

/// One saga: its identity, input, per-step records and state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saga {
    /// Unique id.
    pub id: String,
    /// The definition name.
    pub saga_type: String,
    /// The definition version it started with and keeps.
    pub version: u32,
    /// The client's idempotency key.
    pub key: String,
    /// The validated start input.
    pub input: serde_json::Value,
    /// W3C trace context of the saga's root span, so later steps join the trace.
    pub traceparent: Option<String>,
    /// When it started.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Past this, a saga before its pivot is compensated.
    pub deadline_at: DateTime<Utc>,
    /// Transitions applied so far (the start included).
    pub transitions: u64,
    /// One record per step of the definition.
    pub steps: Vec<StepRecord>,
    /// Where it is.
    pub state: State,
}

/// An input to [`Saga::apply`]. Starting is [`Saga::start`].
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A participant answered.
    Reply {
        /// The command answered.
        command_id: String,
        /// Ok or failed.
        outcome: Outcome,
    },
    /// The saga's timer fired: whatever is due at `now` (a step timeout, the end of
    /// a backoff, the deadline) happens; if nothing is due it is a stale timer.
    Wake,
    /// An operator resumes a failed saga.
    Retry,
    /// An operator aborts a running saga, which compensates it.
    Abort {
        /// Why, for the journal.
        reason: String,
    },
}

/// Who caused a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Actor {
    /// The orchestrator on its own (starts, replies, timers).
    Orchestrator,
    /// An operator's retry or abort.
    Operator,
}

/// What input a journal entry records, resolved (a timer becomes a timeout, a
/// retry or the deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The saga started.
    Start,
    /// A step or compensation succeeded.
    ReplyOk,
    /// A step or compensation failed.
    ReplyFailed,
    /// A step or compensation got no reply in time.
    StepTimeout,
    /// A backoff ended and the command went out again.
    RetryDue,
    /// The saga deadline passed before the pivot.
    Deadline,
    /// An operator retried the saga.
    OperatorRetry,
    /// An operator aborted the saga.
    OperatorAbort,
    /// An input that changed nothing (duplicate, stale, late): journaled only.
    Ignored,
}

/// One line of a saga's journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Transition number, 1 for the start. Ignored inputs repeat the last number.
    pub seq: u64,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Who caused it.
    pub actor: Actor,
    /// What happened.
    pub cause: Cause,
    /// The step it concerns, if any.
    pub step: Option<String>,
    /// The command it concerns, if any.
    pub command_id: Option<String>,
    /// The state before (none for the start).
    pub from: Option<Phase>,
    /// The state after.
    pub to: Phase,
    /// The error involved, if any.
    pub error: Option<String>,
}

/// Side effects, carried out by the caller in order, after persisting the saga.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish a command to a participant.
    Send {
        /// `saga.cmd.<participant>.<action>`.
        subject: String,
        /// The body.
        command: protocol::Command,
    },
    /// (Re)set the saga's single timer to fire at `at`, replacing any earlier one.
    SetTimer {
        /// When to deliver [`Input::Wake`].
        at: DateTime<Utc>,
    },
    /// The saga needs no timer any more.
    ClearTimer,
    /// Publish a domain event.
    Publish {
        /// `saga.event.<name>`.
        subject: String,
        /// The body.
        event: protocol::Event,
    },
    /// The saga reached a terminal state, or was parked as failed for an operator.
    Finish {
        /// Completed, compensated or failed.
        phase: Phase,
    },
}

/// The result of a transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The journal line.
    pub entry: Entry,
    /// What to do now.
    pub actions: Vec<Action>,
}

/// Why an input changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The saga is completed or compensated.
    #[error("saga already finished")]
    Finished,
    /// A reply for a command that was already answered.
    #[error("duplicate reply")]
    Duplicate,
    /// A reply for an older attempt, another step or a finished compensation.
    #[error("stale reply")]
    Stale,
    /// A timer fired but nothing is due (the step answered first).
    #[error("timer not due")]
    NotDue,
    /// A reply names a step the definition does not have, or is malformed.
    #[error("unknown command: {0}")]
    UnknownCommand(String),
    /// An operator action that the state does not allow.
    #[error("{0}")]
    NotAllowed(String),
    /// The definition passed in is not the one the saga runs.
    #[error("definition mismatch: saga runs {0}")]
    WrongDefinition(String),
}

impl Saga {
    /// Starts a saga: validates the input, then sends the first command.
    pub fn start(
        def: &Definition,
        id: String,
        key: String,
        input: serde_json::Value,
        traceparent: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<(Saga, Transition), InvalidInput> {
        validate_input(def.input, &input)?;
        let deadline = chrono::Duration::from_std(def.deadline).unwrap_or(chrono::Duration::MAX);
        let mut saga = Saga {
            id,
            saga_type: def.name.clone(),
            version: def.version,
            key,
            input,
            traceparent,
            created_at: now,
            updated_at: now,
            deadline_at: now
                .checked_add_signed(deadline)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            transitions: 1,
            steps: def.steps.iter().map(|s| StepRecord::new(&s.name)).collect(),
            // Replaced right below by sending the first command.
            state: State::Completed,
        };
        let mut actions = Vec::new();
        saga.send_forward(def, 0, now, &mut actions);
        if let Some(at) = saga.next_timer(def) {
            actions.push(Action::SetTimer { at });
        }
        let entry = Entry {
            seq: 1,
            at: now,
            actor: Actor::Orchestrator,
            cause: Cause::Start,
            step: Some(def.steps[0].name.clone()),
            command_id: None,
            from: None,
            to: Phase::Running,
            error: None,
        };
        Ok((saga, Transition { entry, actions }))
    }

    /// The state name.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::Running { .. } => Phase::Running,
            State::Compensating { .. } => Phase::Compensating,
            State::Completed => Phase::Completed,
            State::Compensated { .. } => Phase::Compensated,
            State::Failed { .. } => Phase::Failed,
        }
    }

    /// When the saga's timer should fire next, if it needs one.
    pub fn next_timer(&self, def: &Definition) -> Option<DateTime<Utc>> {
        match &self.state {
            State::Running { step, wait } => {
                let due = wait.due();
                if def.steps[*step].kind == StepKind::Retriable {
                    Some(due)
                } else {
                    Some(due.min(self.deadline_at))
                }
            }
            State::Compensating { wait, .. } => Some(wait.due()),
            State::Completed | State::Compensated { .. } | State::Failed { .. } => None,
        }
    }

    /// Applies one input. On `Err` the saga is unchanged.
    pub fn apply(
        &mut self,
        def: &Definition,
        input: Input,
        now: DateTime<Utc>,
    ) -> Result<Transition, Rejected> {
        if def.name != self.saga_type
            || def.version != self.version
            || def.steps.len() != self.steps.len()
        {
            return Err(Rejected::WrongDefinition(format!(
                "{} v{}",
                self.saga_type, self.version
            )));
        }
        if self.phase().is_terminal() {
            return Err(Rejected::Finished);
        }
        let before = self.clone();
        let timer_before = self.next_timer(def);
        let mut actions = Vec::new();
        let outcome = match input {
            Input::Reply {
                command_id,
                outcome,
            } => self.on_reply(def, &command_id, outcome, now, &mut actions),
            Input::Wake => self.on_wake(def, now, &mut actions),
            Input::Retry => self.on_retry(def, now, &mut actions),
            Input::Abort { reason } => self.on_abort(def, reason, now, &mut actions),
        };
        let mut entry = match outcome {
            Ok(entry) => entry,
            Err(rejected) => {
                *self = before;
                return Err(rejected);
            }
        };
        let timer_after = self.next_timer(def);
        if timer_after != timer_before {
            actions.push(match timer_after {
                Some(at) => Action::SetTimer { at },
                None => Action::ClearTimer,
            });
        }
        let phase = self.phase();
        if phase != before.phase()
            && matches!(phase, Phase::Completed | Phase::Compensated | Phase::Failed)
        {
            let events = match phase {
                Phase::Completed => &def.events.completed,
                Phase::Compensated => &def.events.compensated,
                Phase::Running | Phase::Compensating | Phase::Failed => &Vec::new(),
            };
            for name in events {
                actions.push(self.event(name, now));
            }
            actions.push(Action::Finish { phase });
        }
        self.transitions += 1;
        self.updated_at = now;
        entry.seq = self.transitions;
        entry.at = now;
        entry.from = Some(before.phase());
        entry.to = phase;
        Ok(Transition { entry, actions })
    }

    /// The journal line for an input that was rejected; `seq` stays at the last transition.
    pub fn ignored_entry(&self, input: &Input, why: &Rejected, now: DateTime<Utc>) -> Entry {
        let (step, command_id) = match input {
            Input::Reply { command_id, .. } => (
                CommandId::parse(command_id).ok().map(|c| c.step),
                Some(command_id.clone()),
            ),
            Input::Wake | Input::Retry | Input::Abort { .. } => (None, None),
        };
        let actor = match input {
            Input::Retry | Input::Abort { .. } => Actor::Operator,
            Input::Reply { .. } | Input::Wake => Actor::Orchestrator,
        };
        Entry {
            seq: self.transitions,
            at: now,
            actor,
            cause: Cause::Ignored,
            step,
            command_id,
            from: Some(self.phase()),
            to: self.phase(),
            error: Some(why.to_string()),
        }
    }

    fn entry(
        cause: Cause,
        actor: Actor,
        step: &str,
        command_id: Option<String>,
        error: Option<&Failure>,
    ) -> Entry {
        Entry {
            seq: 0,
            at: DateTime::<Utc>::MIN_UTC,
            actor,
            cause,
            step: Some(step.to_owned()),
            command_id,
            from: None,
            to: Phase::Running,
            error: error.map(|e| format!("{}: {}", e.code, e.message)),
        }
    }

    fn on_reply(
        &mut self,
        def: &Definition,
        command_id: &str,
        outcome: Outcome,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) -> Result<Entry, Rejected> {
        let id =
            CommandId::parse(command_id).map_err(|e| Rejected::UnknownCommand(e.to_string()))?;
        if id.saga_id != self.id {
            return Err(Rejected::UnknownCommand(format!(
                "command {command_id} is not of saga {}",
                self.id
            )));
        }
        let Some(index) = def.step_index(&id.step) else {
            return Err(Rejected::UnknownCommand(format!(
                "no step \"{}\" in {}",
                id.step, def.name
            )));
        };
        let (current, direction, wait) = match &self.state {
            State::Running { step, wait } => (*step, Direction::Forward, wait),
            State::Compensating { step, wait, .. } => (*step, Direction::Compensate, wait),
            State::Failed { .. } | State::Completed | State::Compensated { .. } => {
                return Err(Rejected::Stale);
            }
        };
        if current != index || direction != id.direction || wait.attempt() != id.attempt {
            return Err(Rejected::Stale);
        }
        if !matches!(wait, Wait::Reply { .. }) {
            return Err(Rejected::Duplicate);
        }
        let (cause, failure) = match outcome {
            Outcome::Ok { result } => {
                let step = &mut self.steps[index];
                step.finished_at = Some(now);
                match direction {
                    Direction::Forward => {
                        step.status = StepStatus::Succeeded;
                        // A null result is no result: `Some(null)` would come back as `None`
                        // from the JSON the driver persists, and the saga must reload as itself.
                        step.result = (!result.is_null()).then_some(result);
                        let next_before_pivot = def
                            .steps
                            .get(index + 1)
                            .is_some_and(|s| s.kind != StepKind::Retriable);
                        if next_before_pivot && self.deadline_at <= now {
                            // Past the deadline nothing new starts before the pivot: the
                            // reply came too late to go on, so undo instead.
                            let failure = Failure::new(
                                "deadline_exceeded",
                                "the saga deadline passed before the pivot",
                                false,
                            );
                            self.compensate_from(def, index + 1, failure, now, actions);
                        } else if index + 1 < def.steps.len() {
                            self.send_forward(def, index + 1, now, actions);
                        } else {
                            self.state = State::Completed;
                        }
                    }
                    Direction::Compensate => {
                        step.status = StepStatus::Compensated;
                        let cause = match &self.state {
                            State::Compensating { cause, .. } => cause.clone(),
                            _ => unreachable_cause(),
                        };
                        self.compensate_from(def, index, cause, now, actions);
                    }
                }
                (Cause::ReplyOk, None)
            }
            Outcome::Failed { error } => {
                self.failed(
                    def,
                    index,
                    direction,
                    id.attempt,
                    error.clone(),
                    false,
                    now,
                    actions,
                );
                (Cause::ReplyFailed, Some(error))
            }
        };
        Ok(Self::entry(
            cause,
            Actor::Orchestrator,
            &id.step,
            Some(command_id.to_owned()),
            failure.as_ref(),
        ))
    }

    fn on_wake(
        &mut self,
        def: &Definition,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) -> Result<Entry, Rejected> {
        let (index, direction, wait) = match &self.state {
            State::Running { step, wait } => (*step, Direction::Forward, wait.clone()),
            State::Compensating { step, wait, .. } => (*step, Direction::Compensate, wait.clone()),
            State::Failed { .. } | State::Completed | State::Compensated { .. } => {
                return Err(Rejected::NotDue);
            }
        };
        let name = def.steps[index].name.clone();
        let before_pivot = def.steps[index].kind != StepKind::Retriable;
        if direction == Direction::Forward && before_pivot && self.deadline_at <= now {
            let failure = Failure::new(
                "deadline_exceeded",
                "the saga deadline passed before the pivot",
                false,
            );
            self.steps[index].status = StepStatus::Uncertain;
            self.steps[index].last_error = Some(failure.clone());
            self.steps[index].finished_at = Some(now);
            self.compensate_from(def, index + 1, failure.clone(), now, actions);
            return Ok(Self::entry(
                Cause::Deadline,
                Actor::Orchestrator,
                &name,
                None,
                Some(&failure),
            ));
        }
        if wait.due() > now {
            return Err(Rejected::NotDue);
        }
        match wait {
            Wait::Reply { attempt, .. } => {
                let timeout = def.steps[index].timeout;
                let failure = Failure::new(
                    "timeout",
                    format!(
                        "no reply within {}",
                        crate::definition::format_duration(timeout)
                    ),
                    true,
                );
                let command = self.command_id(&name, direction, attempt).to_string();
                self.failed(
                    def,
                    index,
                    direction,
                    attempt,
                    failure.clone(),
                    true,
                    now,
                    actions,
                );
                Ok(Self::entry(
                    Cause::StepTimeout,
                    Actor::Orchestrator,
                    &name,
                    Some(command),
                    Some(&failure),
                ))
            }
            Wait::Backoff { .. } => {
                match direction {
                    Direction::Forward => self.send_forward(def, index, now, actions),
                    Direction::Compensate => self.send_compensation(def, index, now, actions),
                }
                Ok(Self::entry(
                    Cause::RetryDue,
                    Actor::Orchestrator,
                    &name,
                    None,
                    None,
                ))
            }
        }
    }

    fn on_retry(
        &mut self,
        def: &Definition,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) -> Result<Entry, Rejected> {
        let State::Failed { step, cause, .. } = &self.state else {
            return Err(Rejected::NotAllowed(format!(
                "only a failed saga can be retried; this one is {}",
                self.phase().as_str()
            )));
        };
        let (index, cause) = (*step, cause.clone());
        self.begin_compensation(def, index, cause, now, actions);
        Ok(Self::entry(
            Cause::OperatorRetry,
            Actor::Operator,
            &def.steps[index].name,
            None,
            None,
        ))
    }

    fn on_abort(
        &mut self,
        def: &Definition,
        reason: String,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) -> Result<Entry, Rejected> {
        let index = match &self.state {
            State::Running { step, .. } => *step,
            State::Compensating { .. } => {
                return Err(Rejected::NotAllowed(
                    "the saga is already compensating".to_owned(),
                ));
            }
            State::Failed { .. } => {
                return Err(Rejected::NotAllowed(
                    "the saga failed while compensating; retry it instead".to_owned(),
                ));
            }
            State::Completed | State::Compensated { .. } => return Err(Rejected::Finished),
        };
        if def.steps[index].kind == StepKind::Retriable {
            return Err(Rejected::NotAllowed(
                "the saga is past its pivot and can no longer be compensated".to_owned(),
            ));
        }
        let failure = Failure::new("aborted", reason, false);
        self.steps[index].status = StepStatus::Uncertain;
        self.steps[index].finished_at = Some(now);
        self.compensate_from(def, index + 1, failure.clone(), now, actions);
        Ok(Self::entry(
            Cause::OperatorAbort,
            Actor::Operator,
            &def.steps[index].name,
            None,
            Some(&failure),
        ))
    }

    /// A command failed or timed out: retry per policy, or give up.
    #[allow(clippy::too_many_arguments)]
    fn failed(
        &mut self,
        def: &Definition,
        index: usize,
        direction: Direction,
        attempt: u32,
        failure: Failure,
        timed_out: bool,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) {
        let spec = &def.steps[index];
        self.steps[index].last_error = Some(failure.clone());
        let (policy, budget_used) = match (&self.state, direction) {
            (State::Compensating { first_attempt, .. }, Direction::Compensate) => {
                (&def.compensation_retry, attempt + 1 - first_attempt)
            }
            _ => (&spec.retry, attempt),
        };
        let retry = match direction {
            Direction::Forward => {
                spec.kind == StepKind::Retriable
                    || (failure.retryable && policy.allows_another(budget_used))
            }
            // Compensations must eventually succeed: every failure is retried until the budget is spent.
            Direction::Compensate => policy.allows_another(budget_used),
        };
        if retry {
            let spread = spread(&self.command_id(&spec.name, direction, attempt).to_string());
            let wait = chrono::Duration::from_std(policy.backoff(budget_used, spread))
                .unwrap_or(chrono::Duration::MAX);
            let until = now
                .checked_add_signed(wait)
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            let backoff = Wait::Backoff { attempt, until };
            match &mut self.state {
                State::Running { wait, .. } | State::Compensating { wait, .. } => *wait = backoff,
                State::Completed | State::Compensated { .. } | State::Failed { .. } => {}
            }
            return;
        }
        self.steps[index].finished_at = Some(now);
        match direction {
            Direction::Forward => {
                self.steps[index].status = if failure.retryable || timed_out {
                    StepStatus::Uncertain
                } else {
                    StepStatus::Failed
                };
                self.compensate_from(def, index + 1, failure, now, actions);
            }
            Direction::Compensate => {
                self.steps[index].status = StepStatus::CompensationFailed;
                let cause = match &self.state {
                    State::Compensating { cause, .. } => cause.clone(),
                    _ => unreachable_cause(),
                };
                self.state = State::Failed {
                    step: index,
                    error: failure,
                    cause,
                };
            }
        }
    }

    /// Compensates the nearest step below `below` that may have been applied, or
    /// finishes as compensated when there is none.
    fn compensate_from(
        &mut self,
        def: &Definition,
        below: usize,
        cause: Failure,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) {
        let next = (0..below).rev().find(|&i| {
            self.steps[i].may_be_applied()
                && def.steps[i].compensation.is_some()
                && def.steps[i].kind != StepKind::Retriable
        });
        let Some(index) = next else {
            self.state = State::Compensated { cause };
            return;
        };
        self.begin_compensation(def, index, cause, now, actions);
    }

    /// Starts a round of attempts to compensate step `index` (a fresh retry budget).
    fn begin_compensation(
        &mut self,
        def: &Definition,
        index: usize,
        cause: Failure,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) {
        let first_attempt = self.steps[index].compensation_attempts + 1;
        self.state = State::Compensating {
            step: index,
            // Replaced at once by the command's reply wait.
            wait: Wait::Backoff {
                attempt: 0,
                until: now,
            },
            first_attempt,
            cause,
        };
        self.send_compensation(def, index, now, actions);
    }

    fn send_forward(
        &mut self,
        def: &Definition,
        index: usize,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) {
        let spec = &def.steps[index];
        let step = &mut self.steps[index];
        step.attempts += 1;
        step.status = StepStatus::Running;
        step.started_at.get_or_insert(now);
        let attempt = step.attempts;
        self.state = State::Running {
            step: index,
            wait: Wait::Reply {
                attempt,
                timeout_at: after(now, spec.timeout),
            },
        };
        actions.push(self.command(def, index, Direction::Forward, attempt));
    }

    fn send_compensation(
        &mut self,
        def: &Definition,
        index: usize,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) {
        let spec = &def.steps[index];
        let step = &mut self.steps[index];
        step.compensation_attempts += 1;
        step.status = StepStatus::Compensating;
        let attempt = step.compensation_attempts;
        if let State::Compensating { wait, .. } = &mut self.state {
            *wait = Wait::Reply {
                attempt,
                timeout_at: after(now, spec.timeout),
            };
        }
        actions.push(self.command(def, index, Direction::Compensate, attempt));
    }

    /// The [`Action::Send`] of a command this saga sent earlier, rebuilt from its id
    /// (the orchestrator re-publishes it when recovering); `None` if the id does not
    /// belong to this saga and definition.
    pub fn resend(&self, def: &Definition, command_id: &str) -> Option<Action> {
        let id = CommandId::parse(command_id).ok()?;
        let index = def.step_index(&id.step)?;
        if id.saga_id != self.id
            || (id.direction == Direction::Compensate && def.steps[index].compensation.is_none())
        {
            return None;
        }
        Some(self.command(def, index, id.direction, id.attempt))
    }

    /// The [`Action::Publish`] of domain event `name` as published at `at`.
    pub fn event(&self, name: &str, at: DateTime<Utc>) -> Action {
        Action::Publish {
            subject: subject::event(name),
            event: protocol::Event {
                protocol: protocol::VERSION,
                event: name.to_owned(),
                saga_id: self.id.clone(),
                saga_type: self.saga_type.clone(),
                key: self.key.clone(),
                input: self.input.clone(),
                occurred_at: at,
            },
        }
    }

    fn command_id(&self, step: &str, direction: Direction, attempt: u32) -> CommandId {
        CommandId {
            saga_id: self.id.clone(),
            step: step.to_owned(),
            direction,
            attempt,
        }
    }

    fn command(
        &self,
        def: &Definition,
        index: usize,
        direction: Direction,
        attempt: u32,
    ) -> Action {
        let spec = &def.steps[index];
        let action = match direction {
            Direction::Forward => spec.action.clone(),
            // Only steps with a compensation are ever compensated (see compensate_from).
            Direction::Compensate => spec.compensation.clone().unwrap_or_default(),
        };
        let command_id = self.command_id(&spec.name, direction, attempt).to_string();
        Action::Send {
            subject: subject::command(&spec.participant, &action),
            command: protocol::Command {
                protocol: protocol::VERSION,
                reply_to: subject::reply(&spec.participant, &command_id),
                command_id,
                saga_id: self.id.clone(),
                saga_type: self.saga_type.clone(),
                step: spec.name.clone(),
                action,
                compensation: direction == Direction::Compensate,
                attempt,
                input: self.input.clone(),
            },
        }
    }
}

/// A compensation always runs inside `State::Compensating`; this keeps the code
/// total without a panic should that ever not hold.
fn unreachable_cause() -> Failure {
    Failure::new(
        "internal",
        "compensation outside the compensating state",
        false,
    )
}

fn after(now: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// A deterministic value in `[0, 1)` from a command id (FNV-1a), so that replaying
/// the same inputs yields the same backoff jitter.
fn spread(text: &str) -> f64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash >> 11) as f64 / (1u64 << 53) as f64
}
