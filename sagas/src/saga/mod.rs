//! The saga state machine: one enum of states and one pure transition function.
//!
//! [`Saga::start`] creates a saga; [`Saga::apply`] moves it on one [`Input`] at a
//! time and returns the side effects as [`Action`]s plus the journal [`Entry`]
//! describing the transition. Nothing here reads the clock or touches I/O: the
//! caller passes `now` and carries out the actions.
//!
//! One module per family of transitions:
//! - `state`: where a saga is ([`State`], [`Wait`], [`Phase`], [`End`], the step records);
//! - `journal`: what a transition records ([`Entry`], [`Actor`], [`Cause`]);
//! - `action`: the side effects ([`Action`]) and the commands and events a saga sends;
//! - `start`: [`Saga::start`];
//! - `reply`: a participant's reply;
//! - `wake`: the timer (step timeouts, ends of backoff, the deadline);
//! - `operator`: an operator's retry and abort;
//! - `compensation`: failures, retries and the way back.

mod action;
mod compensation;
mod journal;
mod operator;
mod reply;
mod start;
mod state;
mod wake;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use action::Action;
pub use journal::{Actor, Cause, Entry};
pub use state::{End, Phase, State, StepRecord, StepStatus, Wait};

use crate::definition::{Definition, StepKind};
use crate::protocol::{self, CommandId, Outcome};

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
    /// The trace context the saga was started in (the root span's parent), when the
    /// orchestrator made a root span of its own below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_traceparent: Option<String>,
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
    Retry {
        /// Who asked (the name of the operator's token), for the journal.
        operator: String,
    },
    /// An operator aborts a running saga, which compensates it.
    Abort {
        /// Why, for the journal.
        reason: String,
        /// Who asked (the name of the operator's token), for the journal.
        operator: String,
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
    /// The id of the saga's trace (32 lowercase hex digits), from its `traceparent`;
    /// `None` when it has none or it is malformed.
    pub fn trace_id(&self) -> Option<&str> {
        self.traceparent
            .as_deref()
            .and_then(protocol::TraceParent::parse)
            .map(|tp| tp.trace_id)
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

    /// The step the saga is at (running, compensating or parked on), if any.
    pub fn current_step(&self) -> Option<&str> {
        match &self.state {
            State::Running { step, .. }
            | State::Compensating { step, .. }
            | State::Failed { step, .. } => self.steps.get(*step).map(|s| s.name.as_str()),
            State::Completed | State::Compensated { .. } => None,
        }
    }

    /// When the saga's timer should fire next, if it needs one.
    pub fn next_timer(&self, def: &Definition) -> Option<DateTime<Utc>> {
        match &self.state {
            State::Running { step, wait } => {
                let due = wait.due();
                // A step the definition lacks (a corrupt record) keeps the deadline.
                if def
                    .steps
                    .get(*step)
                    .is_some_and(|s| s.kind == StepKind::Retriable)
                {
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
        // The state's step index comes from a stored record: it must name a step.
        let step_fits = match &self.state {
            State::Running { step, .. }
            | State::Compensating { step, .. }
            | State::Failed { step, .. } => *step < def.steps.len(),
            State::Completed | State::Compensated { .. } => true,
        };
        if def.name != self.saga_type
            || def.version != self.version
            || def.steps.len() != self.steps.len()
            || !step_fits
        {
            return Err(Rejected::WrongDefinition(format!(
                "{} v{}",
                self.saga_type, self.version
            )));
        }
        if self.phase().is_finished() {
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
            Input::Retry { operator } => self.on_retry(def, operator, now, &mut actions),
            Input::Abort { reason, operator } => {
                self.on_abort(def, reason, operator, now, &mut actions)
            }
        };
        let change = match outcome {
            Ok(change) => change,
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
        if phase != before.phase() {
            match &self.state {
                State::Completed => {
                    for name in &def.events.completed {
                        actions.push(self.event(name, now));
                    }
                    actions.push(Action::Finish {
                        end: End::Completed,
                    });
                }
                State::Compensated { .. } => {
                    for name in &def.events.compensated {
                        actions.push(self.event(name, now));
                    }
                    actions.push(Action::Finish {
                        end: End::Compensated,
                    });
                }
                State::Failed { step, .. } => actions.push(Action::Park {
                    step: def.steps[*step].name.clone(),
                }),
                State::Running { .. } | State::Compensating { .. } => {}
            }
        }
        self.transitions += 1;
        self.updated_at = now;
        let entry = change.into_entry(self.transitions, now, before.phase(), phase);
        Ok(Transition { entry, actions })
    }

    /// Command `command_id` went out again (the orchestrator completed a
    /// transition whose publish may have been lost in a crash): if the saga waits
    /// for its reply, the wait restarts at `now`, so the crash costs no attempt.
    /// `None` when the saga waits for something else.
    pub fn resent(
        &mut self,
        def: &Definition,
        command_id: &str,
        now: DateTime<Utc>,
    ) -> Option<Transition> {
        let id = CommandId::parse(command_id).ok()?;
        let timer_before = self.next_timer(def);
        let before = self.phase();
        let (index, direction, wait) = match &mut self.state {
            State::Running { step, wait } => (*step, crate::protocol::Direction::Forward, wait),
            State::Compensating { step, wait, .. } => {
                (*step, crate::protocol::Direction::Compensate, wait)
            }
            State::Completed | State::Compensated { .. } | State::Failed { .. } => return None,
        };
        let spec = def.steps.get(index)?;
        let Wait::Reply {
            attempt,
            timeout_at,
        } = wait
        else {
            return None;
        };
        if id.saga_id != self.id
            || id.step != spec.name
            || id.direction != direction
            || id.attempt != *attempt
        {
            return None;
        }
        *timeout_at = action::after(now, spec.timeout);
        let mut actions = Vec::new();
        let timer_after = self.next_timer(def);
        if timer_after != timer_before
            && let Some(at) = timer_after
        {
            actions.push(Action::SetTimer { at });
        }
        self.transitions += 1;
        self.updated_at = now;
        let entry = Entry {
            seq: self.transitions,
            at: now,
            actor: Actor::Orchestrator,
            cause: Cause::Resent,
            step: Some(spec.name.clone()),
            command_id: Some(command_id.to_owned()),
            from: Some(before),
            to: before,
            error: None,
            operator: None,
        };
        Some(Transition { entry, actions })
    }

    /// The journal line for an input that was rejected; `seq` stays at the last transition.
    pub fn ignored_entry(&self, input: &Input, why: &Rejected, now: DateTime<Utc>) -> Entry {
        let (step, command_id) = match input {
            Input::Reply { command_id, .. } => (
                CommandId::parse(command_id).ok().map(|c| c.step),
                Some(command_id.clone()),
            ),
            Input::Wake | Input::Retry { .. } | Input::Abort { .. } => (None, None),
        };
        let (actor, operator) = match input {
            Input::Retry { operator } | Input::Abort { operator, .. } => {
                (Actor::Operator, Some(operator.clone()))
            }
            Input::Reply { .. } | Input::Wake => (Actor::Orchestrator, None),
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
            operator,
        }
    }
}
