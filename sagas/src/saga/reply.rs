//! A participant's reply to the command the saga waits for.

use chrono::{DateTime, Utc};

use super::compensation::{Setback, Undo};
use super::journal::Change;
use super::{Action, Cause, Rejected, Saga, State, StepStatus, Wait};
use crate::definition::{Definition, StepKind};
use crate::protocol::{CommandId, Direction, Failure, Outcome};

impl Saga {
    pub(super) fn on_reply(
        &mut self,
        def: &Definition,
        command_id: &str,
        outcome: Outcome,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) -> Result<Change, Rejected> {
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
        let change = |cause, error: Option<&Failure>| {
            Change::orchestrator(cause, &id.step, Some(command_id.to_owned()), error)
        };
        match &self.state {
            State::Running { step, wait } => {
                awaited(*step, wait, Direction::Forward, index, &id)?;
                Ok(match outcome {
                    Outcome::Ok { result } => {
                        match self.forward_ok(def, index, id.attempt, result, now, actions) {
                            None => change(Cause::ReplyOk, None),
                            Some(broken) => change(Cause::ReplyFailed, Some(&broken)),
                        }
                    }
                    Outcome::Failed { error } => {
                        let setback = Setback::Reported(error.clone());
                        self.forward_failed(def, index, id.attempt, setback, now, actions);
                        change(Cause::ReplyFailed, Some(&error))
                    }
                })
            }
            State::Compensating {
                step,
                wait,
                first_attempt,
                cause,
            } => {
                awaited(*step, wait, Direction::Compensate, index, &id)?;
                let undo = Undo {
                    first_attempt: *first_attempt,
                    cause: cause.clone(),
                };
                Ok(match outcome {
                    Outcome::Ok { .. } => {
                        let record = &mut self.steps[index];
                        record.status = StepStatus::Compensated;
                        record.finished_at = Some(now);
                        self.compensate_from(def, index, undo.cause, now, actions);
                        change(Cause::ReplyOk, None)
                    }
                    Outcome::Failed { error } => {
                        let failure = error.clone();
                        self.compensation_failed(def, index, id.attempt, undo, failure, now);
                        change(Cause::ReplyFailed, Some(&error))
                    }
                })
            }
            State::Failed {
                step,
                error,
                cause,
                forward: false,
            } if *step == index
                && error.code == super::wake::TIMEOUT
                && id.direction == Direction::Compensate
                && id.attempt == self.steps[index].compensation_attempts
                && matches!(outcome, Outcome::Ok { .. }) =>
            {
                // A late success of the attempt whose timeout parked the saga: the
                // compensation did happen, so the saga goes on undoing (or is
                // compensated) as if the reply had come in time. (An attempt that
                // was answered with a failure has had its answer.)
                let cause = cause.clone();
                let record = &mut self.steps[index];
                record.status = StepStatus::Compensated;
                record.finished_at = Some(now);
                self.compensate_from(def, index, cause, now, actions);
                Ok(change(Cause::ReplyOk, None))
            }
            State::Completed | State::Compensated { .. } | State::Failed { .. } => {
                Err(Rejected::Stale)
            }
        }
    }

    /// Step `index` succeeded with `result`: go on, or compensate if the deadline
    /// passed. A result that breaks the step's result schema counts as a failure
    /// of a step that may have been applied; it is returned for the journal.
    fn forward_ok(
        &mut self,
        def: &Definition,
        index: usize,
        attempt: u32,
        result: serde_json::Value,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) -> Option<Failure> {
        let spec = &def.steps[index];
        if let Some(Err(invalid)) = spec.result_schema.as_ref().map(|s| s.check(&result)) {
            let violations: Vec<String> =
                invalid.violations.iter().map(ToString::to_string).collect();
            let message = format!(
                "the result breaks the step's result schema: {}",
                violations.join("; ")
            );
            let failure = Failure::new("invalid_result", message, false);
            let setback = Setback::MayBeApplied(failure.clone());
            self.forward_failed(def, index, attempt, setback, now, actions);
            return Some(failure);
        }
        let record = &mut self.steps[index];
        record.finished_at = Some(now);
        record.status = StepStatus::Succeeded;
        // A null result is no result: `Some(null)` would come back as `None` from the
        // JSON the driver persists, and the saga must reload as itself.
        record.result = (!result.is_null()).then_some(result);
        let next_before_pivot = def
            .steps
            .get(index + 1)
            .is_some_and(|s| s.kind != StepKind::Retriable);
        if next_before_pivot && self.deadline_at <= now {
            // Past the deadline nothing new starts before the pivot: the reply came
            // too late to go on, so undo instead.
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
        None
    }
}

/// Whether a reply to `id` answers what step `current` waits for in `direction`.
fn awaited(
    current: usize,
    wait: &Wait,
    direction: Direction,
    index: usize,
    id: &CommandId,
) -> Result<(), Rejected> {
    if current != index || direction != id.direction || wait.attempt() != id.attempt {
        return Err(Rejected::Stale);
    }
    match wait {
        Wait::Reply { .. } => Ok(()),
        Wait::Backoff { .. } => Err(Rejected::Duplicate),
    }
}
