//! Where a saga is: its state enum, what a step waits for, the state names, and
//! the per-step records.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::protocol::Failure;

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
    /// Every step succeeded. Finished.
    Completed,
    /// Every applied step before the pivot was undone. Finished.
    Compensated {
        /// Why it was compensated.
        cause: Failure,
    },
    /// A compensation kept failing, or a step past the pivot (retried until it
    /// succeeds) failed for good: the saga is parked until an operator retries it.
    /// Not finished (see [`Phase::is_finished`]).
    Failed {
        /// Index of the step that failed (its compensation, unless `forward`).
        step: usize,
        /// Its last error.
        error: Failure,
        /// Why the saga was being compensated (for `forward`, the error itself).
        cause: Failure,
        /// The step failed forward, past the pivot: a retry sends it again.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        forward: bool,
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
    /// The attempt this wait concerns.
    pub(super) fn attempt(&self) -> u32 {
        match self {
            Self::Reply { attempt, .. } | Self::Backoff { attempt, .. } => *attempt,
        }
    }

    /// When the wait ends.
    pub(super) fn due(&self) -> DateTime<Utc> {
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

    /// How the saga ended, if it is finished.
    ///
    /// This is the one definition of "finished": completed or compensated, nothing
    /// more will ever happen to the saga; [`Saga::apply`](super::Saga::apply) rejects
    /// every input with [`Rejected::Finished`](super::Rejected::Finished) and the
    /// transition that got there carries [`Action::Finish`](super::Action::Finish).
    ///
    /// A **failed** saga is not finished: it is parked ([`Action::Park`](super::Action::Park)),
    /// with no timer, waiting for an operator's [`Input::Retry`](super::Input::Retry). Whoever
    /// runs sagas must keep it reachable like any other live saga — not forget it or
    /// count it as done.
    pub fn end(self) -> Option<End> {
        match self {
            Self::Completed => Some(End::Completed),
            Self::Compensated => Some(End::Compensated),
            Self::Running | Self::Compensating | Self::Failed => None,
        }
    }

    /// Whether the saga is finished; see [`Phase::end`] for what that means.
    pub fn is_finished(self) -> bool {
        self.end().is_some()
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

/// How a finished saga ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum End {
    /// Every step succeeded.
    Completed,
    /// Every applied step before the pivot was undone.
    Compensated,
}

impl End {
    /// The phase a saga that ended this way is in.
    pub fn phase(self) -> Phase {
        match self {
            Self::Completed => Phase::Completed,
            Self::Compensated => Phase::Compensated,
        }
    }

    /// Lowercase name (the phase's).
    pub fn as_str(self) -> &'static str {
        self.phase().as_str()
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
    /// Gave up without knowing whether it was applied (timeout, retryable errors,
    /// a result that breaks the step's result schema).
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
    /// When its latest command (forward or compensation) went out: the start of that
    /// attempt's span, whichever instance ends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime<Utc>>,
}

impl StepRecord {
    pub(super) fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            status: StepStatus::Pending,
            attempts: 0,
            compensation_attempts: 0,
            result: None,
            last_error: None,
            started_at: None,
            finished_at: None,
            sent_at: None,
        }
    }

    /// Whether the step may have been applied and so must be undone.
    pub(super) fn may_be_applied(&self) -> bool {
        matches!(
            self.status,
            StepStatus::Succeeded | StepStatus::Uncertain | StepStatus::Running
        )
    }

    /// Records a forward attempt going out; returns its number.
    pub(super) fn begin_attempt(&mut self, now: DateTime<Utc>) -> u32 {
        self.attempts += 1;
        self.status = StepStatus::Running;
        self.started_at.get_or_insert(now);
        self.sent_at = Some(now);
        self.attempts
    }

    /// Records a compensation attempt going out; returns its number.
    pub(super) fn begin_compensation_attempt(&mut self, now: DateTime<Utc>) -> u32 {
        self.compensation_attempts += 1;
        self.sent_at = Some(now);
        self.status = StepStatus::Compensating;
        self.compensation_attempts
    }
}
