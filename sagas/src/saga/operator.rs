//! What an operator may do: retry a failed saga's compensation, abort a running saga.

use chrono::{DateTime, Utc};

use super::compensation::{Round, compensation_of};
use super::journal::Change;
use super::{Action, Cause, Rejected, Saga, State, StepStatus};
use crate::definition::{Definition, StepKind};
use crate::protocol::Failure;

impl Saga {
    /// Resumes a failed saga: a new round of attempts (a fresh budget) to
    /// compensate the step whose compensation failed, or a new attempt of the
    /// step past the pivot that failed.
    pub(super) fn on_retry(
        &mut self,
        def: &Definition,
        operator: String,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) -> Result<Change, Rejected> {
        let (index, cause) = match &self.state {
            State::Failed {
                step,
                forward: true,
                ..
            } => {
                let index = *step;
                self.send_forward(def, index, now, actions);
                return Ok(Change::operator(
                    Cause::OperatorRetry,
                    &def.steps[index].name,
                    None,
                    operator,
                ));
            }
            State::Failed { step, cause, .. } => (*step, cause.clone()),
            State::Running { .. }
            | State::Compensating { .. }
            | State::Completed
            | State::Compensated { .. } => {
                return Err(Rejected::NotAllowed(format!(
                    "only a failed saga can be retried; this one is {}",
                    self.phase().as_str()
                )));
            }
        };
        let action = compensation_of(def, index)?;
        self.send_compensation(def, index, action, Round::Begin { cause }, now, actions);
        Ok(Change::operator(
            Cause::OperatorRetry,
            &def.steps[index].name,
            None,
            operator,
        ))
    }

    /// Aborts a saga before its pivot: the current step may have been applied, so
    /// it is compensated together with the ones before it.
    pub(super) fn on_abort(
        &mut self,
        def: &Definition,
        reason: String,
        operator: String,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) -> Result<Change, Rejected> {
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
        Ok(Change::operator(
            Cause::OperatorAbort,
            &def.steps[index].name,
            Some(&failure),
            operator,
        ))
    }
}
