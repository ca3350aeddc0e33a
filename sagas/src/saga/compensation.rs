//! Failures, retries and the way back: what happens when an attempt fails, and how
//! the steps that may have been applied are undone.

use chrono::{DateTime, Utc};

use super::action::after;
use super::{Action, Rejected, Saga, State, StepStatus, Wait};
use crate::definition::{Definition, RetryPolicy, StepKind};
use crate::protocol::{Direction, Failure};

/// A round of compensation attempts: what a compensating saga knows besides its step and wait.
#[derive(Debug, Clone)]
pub(super) struct Undo {
    /// The attempt that began this round's retry budget.
    pub(super) first_attempt: u32,
    /// Why the saga is being compensated.
    pub(super) cause: Failure,
}

/// Which round a compensation command belongs to.
#[derive(Debug, Clone)]
pub(super) enum Round {
    /// A fresh retry budget starts with this attempt.
    Begin {
        /// Why the saga is being compensated.
        cause: Failure,
    },
    /// Another attempt of a round under way.
    Continue(Undo),
}

/// How a forward attempt failed.
#[derive(Debug, Clone)]
pub(super) enum Setback {
    /// The participant answered with a failure.
    Reported(Failure),
    /// The step may have been applied whatever the failure says: no reply came in
    /// time, or the result breaks the step's result schema.
    MayBeApplied(Failure),
}

impl Saga {
    /// A forward attempt failed or timed out: retry per the step's policy, or give
    /// up and compensate.
    pub(super) fn forward_failed(
        &mut self,
        def: &Definition,
        index: usize,
        attempt: u32,
        setback: Setback,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) {
        let (failure, may_be_applied) = match setback {
            Setback::Reported(failure) => (failure, false),
            Setback::MayBeApplied(failure) => (failure, true),
        };
        let spec = &def.steps[index];
        self.steps[index].last_error = Some(failure.clone());
        if spec.kind == StepKind::Retriable && !failure.retryable && !may_be_applied {
            // Past the pivot there is no way back, and retrying what the
            // participant refused for good would only repeat the refusal: park.
            self.steps[index].status = StepStatus::Failed;
            self.steps[index].finished_at = Some(now);
            self.state = State::Failed {
                step: index,
                error: failure.clone(),
                cause: failure,
                forward: true,
            };
            return;
        }
        let retry = spec.kind == StepKind::Retriable
            || (failure.retryable && spec.retry.allows_another(attempt));
        if retry {
            let key = self.command_id(&spec.name, Direction::Forward, attempt);
            let until = backoff_until(&spec.retry, attempt, &key.to_string(), now);
            self.state = State::Running {
                step: index,
                wait: Wait::Backoff { attempt, until },
            };
            return;
        }
        self.steps[index].finished_at = Some(now);
        let uncertain = failure.retryable || may_be_applied;
        if uncertain && spec.kind == StepKind::Pivot && spec.compensation.is_none() {
            // The pivot may have been applied and nothing undoes it: compensating
            // the steps before it would leave its effect behind (a charge with
            // the stock released). Park for an operator, whose retry sends it again.
            self.steps[index].status = StepStatus::Uncertain;
            self.state = State::Failed {
                step: index,
                error: failure.clone(),
                cause: failure,
                forward: true,
            };
            return;
        }
        self.steps[index].status = if uncertain {
            StepStatus::Uncertain
        } else {
            StepStatus::Failed
        };
        self.compensate_from(def, index + 1, failure, now, actions);
    }

    /// A compensation attempt failed or timed out: retry it within the round's
    /// budget (every failure is retried: compensations must eventually succeed), or
    /// park the saga as failed.
    pub(super) fn compensation_failed(
        &mut self,
        def: &Definition,
        index: usize,
        attempt: u32,
        undo: Undo,
        failure: Failure,
        now: DateTime<Utc>,
    ) {
        let Undo {
            first_attempt,
            cause,
        } = undo;
        let policy = &def.compensation_retry;
        self.steps[index].last_error = Some(failure.clone());
        // A corrupt record may name a later first attempt: count it as the first.
        let used = (attempt + 1).saturating_sub(first_attempt).max(1);
        if policy.allows_another(used) {
            let key = self.command_id(&def.steps[index].name, Direction::Compensate, attempt);
            let until = backoff_until(policy, used, &key.to_string(), now);
            self.state = State::Compensating {
                step: index,
                wait: Wait::Backoff { attempt, until },
                first_attempt,
                cause,
            };
            return;
        }
        self.steps[index].finished_at = Some(now);
        self.steps[index].status = StepStatus::CompensationFailed;
        self.state = State::Failed {
            step: index,
            error: failure,
            cause,
            forward: false,
        };
    }

    /// Compensates the nearest step below `below` that may have been applied, or
    /// finishes as compensated when there is none.
    pub(super) fn compensate_from(
        &mut self,
        def: &Definition,
        below: usize,
        cause: Failure,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) {
        let next = (0..below).rev().find_map(|i| {
            let spec = &def.steps[i];
            let action = spec.compensation.as_deref()?;
            (self.steps[i].may_be_applied() && spec.kind != StepKind::Retriable)
                .then_some((i, action))
        });
        match next {
            Some((index, action)) => {
                let round = Round::Begin { cause };
                self.send_compensation(def, index, action, round, now, actions);
            }
            None => self.state = State::Compensated { cause },
        }
    }

    /// Sends the next attempt of step `index`'s compensation `action`.
    pub(super) fn send_compensation(
        &mut self,
        def: &Definition,
        index: usize,
        action: &str,
        round: Round,
        now: DateTime<Utc>,
        actions: &mut Vec<Action>,
    ) {
        let attempt = self.steps[index].begin_compensation_attempt(now);
        let Undo {
            first_attempt,
            cause,
        } = match round {
            Round::Begin { cause } => Undo {
                first_attempt: attempt,
                cause,
            },
            Round::Continue(undo) => undo,
        };
        self.state = State::Compensating {
            step: index,
            wait: Wait::Reply {
                attempt,
                timeout_at: after(now, def.steps[index].timeout),
            },
            first_attempt,
            cause,
        };
        actions.push(self.command(def, index, Direction::Compensate, action, attempt));
    }
}

/// Step `index`'s compensation action. A saga only ever compensates steps that have
/// one, so `None` means the definition is not the one the saga ran with.
pub(super) fn compensation_of(def: &Definition, index: usize) -> Result<&str, Rejected> {
    def.steps[index].compensation.as_deref().ok_or_else(|| {
        Rejected::WrongDefinition(format!(
            "{}: step \"{}\" has no compensation",
            def.name, def.steps[index].name
        ))
    })
}

/// When the next attempt goes out after the `used`-th attempt of a budget failed;
/// the jitter derives from `key` so that replays agree.
fn backoff_until(policy: &RetryPolicy, used: u32, key: &str, now: DateTime<Utc>) -> DateTime<Utc> {
    after(now, policy.backoff(used, spread(key)))
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
