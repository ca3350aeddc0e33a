//! The side effects a transition returns, and the commands and events a saga sends.

use chrono::{DateTime, Utc};

use super::{End, Saga, State, Wait};
use crate::definition::Definition;
use crate::protocol::{self, CommandId, Direction, subject};

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
        /// When to deliver [`Input::Wake`](super::Input::Wake).
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
    /// The saga finished (see [`Phase::end`](super::Phase::end)): nothing more will happen to it.
    Finish {
        /// Completed or compensated.
        end: End,
    },
    /// A compensation kept failing: the saga is parked, with no timer, until an
    /// operator retries it. It is not finished.
    Park {
        /// The step that failed (its compensation, or itself past the pivot).
        step: String,
    },
}

impl Saga {
    /// Sends the next forward attempt of step `index`.
    pub(super) fn send_forward(
        &mut self,
        def: &Definition,
        index: usize,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) {
        let spec = &def.steps[index];
        let attempt = self.steps[index].begin_attempt(now);
        self.state = State::Running {
            step: index,
            wait: Wait::Reply {
                attempt,
                timeout_at: after(now, spec.timeout),
            },
        };
        actions.push(self.command(def, index, Direction::Forward, &spec.action, attempt));
    }

    /// The [`Action::Send`] of a command this saga sent earlier, rebuilt from its id
    /// (the orchestrator re-publishes it when recovering); `None` if the id does not
    /// belong to this saga and definition.
    pub fn resend(&self, def: &Definition, command_id: &str) -> Option<Action> {
        let id = CommandId::parse(command_id).ok()?;
        let index = def.step_index(&id.step)?;
        if id.saga_id != self.id {
            return None;
        }
        let spec = &def.steps[index];
        let action = match id.direction {
            Direction::Forward => spec.action.as_str(),
            Direction::Compensate => spec.compensation.as_deref()?,
        };
        Some(self.command(def, index, id.direction, action, id.attempt))
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

    pub(super) fn command_id(&self, step: &str, direction: Direction, attempt: u32) -> CommandId {
        CommandId {
            saga_id: self.id.clone(),
            step: step.to_owned(),
            direction,
            attempt,
        }
    }

    /// The command for attempt `attempt` of step `index`'s `action` (its forward
    /// action or its compensation, as `direction` says).
    pub(super) fn command(
        &self,
        def: &Definition,
        index: usize,
        direction: Direction,
        action: &str,
        attempt: u32,
    ) -> Action {
        let spec = &def.steps[index];
        let command_id = self.command_id(&spec.name, direction, attempt).to_string();
        Action::Send {
            subject: subject::command(&spec.participant, action),
            command: protocol::Command {
                protocol: protocol::VERSION,
                reply_to: subject::reply(&spec.participant, &command_id),
                command_id,
                saga_id: self.id.clone(),
                saga_type: self.saga_type.clone(),
                step: spec.name.clone(),
                action: action.to_owned(),
                compensation: direction == Direction::Compensate,
                attempt,
                input: self.input.clone(),
            },
        }
    }
}

/// `now + d`, saturating.
pub(super) fn after(now: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}
