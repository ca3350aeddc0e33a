//! The saga's timer: a step timeout, the end of a backoff, or the deadline.

use chrono::{DateTime, Utc};

use super::compensation::{Round, Setback, Undo, compensation_of};
use super::journal::Change;
use super::{Action, Cause, Rejected, Saga, State, StepStatus, Wait};
use crate::definition::{Definition, StepKind, format_duration};
use crate::protocol::{Direction, Failure};

impl Saga {
    pub(super) fn on_wake(
        &mut self,
        def: &Definition,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) -> Result<Change, Rejected> {
        match &self.state {
            State::Running { step, wait } => {
                let (index, wait) = (*step, wait.clone());
                self.wake_forward(def, index, wait, now, actions)
            }
            State::Compensating {
                step,
                wait,
                first_attempt,
                cause,
            } => {
                let (index, wait) = (*step, wait.clone());
                let undo = Undo {
                    first_attempt: *first_attempt,
                    cause: cause.clone(),
                };
                self.wake_compensation(def, index, wait, undo, now, actions)
            }
            State::Failed { .. } | State::Completed | State::Compensated { .. } => {
                Err(Rejected::NotDue)
            }
        }
    }

    fn wake_forward(
        &mut self,
        def: &Definition,
        index: usize,
        wait: Wait,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) -> Result<Change, Rejected> {
        let name = def.steps[index].name.clone();
        if def.steps[index].kind != StepKind::Retriable && self.deadline_at <= now {
            let failure = Failure::new(
                "deadline_exceeded",
                "the saga deadline passed before the pivot",
                false,
            );
            let record = &mut self.steps[index];
            record.status = StepStatus::Uncertain;
            record.last_error = Some(failure.clone());
            record.finished_at = Some(now);
            self.compensate_from(def, index + 1, failure.clone(), now, actions);
            return Ok(Change::orchestrator(
                Cause::Deadline,
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
                let failure = timeout(def, index);
                let command = self.command_id(&name, Direction::Forward, attempt);
                let setback = Setback::MayBeApplied(failure.clone());
                self.forward_failed(def, index, attempt, setback, now, actions);
                Ok(Change::orchestrator(
                    Cause::StepTimeout,
                    &name,
                    Some(command.to_string()),
                    Some(&failure),
                ))
            }
            Wait::Backoff { .. } => {
                self.send_forward(def, index, now, actions);
                Ok(Change::orchestrator(Cause::RetryDue, &name, None, None))
            }
        }
    }

    fn wake_compensation(
        &mut self,
        def: &Definition,
        index: usize,
        wait: Wait,
        undo: Undo,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) -> Result<Change, Rejected> {
        let name = def.steps[index].name.clone();
        if wait.due() > now {
            return Err(Rejected::NotDue);
        }
        match wait {
            Wait::Reply { attempt, .. } => {
                let failure = timeout(def, index);
                let command = self.command_id(&name, Direction::Compensate, attempt);
                self.compensation_failed(def, index, attempt, undo, failure.clone(), now);
                Ok(Change::orchestrator(
                    Cause::StepTimeout,
                    &name,
                    Some(command.to_string()),
                    Some(&failure),
                ))
            }
            Wait::Backoff { .. } => {
                let action = compensation_of(def, index)?;
                let round = Round::Continue(undo);
                self.send_compensation(def, index, action, round, now, actions);
                Ok(Change::orchestrator(Cause::RetryDue, &name, None, None))
            }
        }
    }
}

/// The error code of an attempt that got no reply in time.
pub(super) const TIMEOUT: &str = "timeout";

/// The failure of an attempt of step `index` that got no reply in time.
fn timeout(def: &Definition, index: usize) -> Failure {
    Failure::new(
        TIMEOUT,
        format!(
            "no reply within {}",
            format_duration(def.steps[index].timeout)
        ),
        true,
    )
}
