//! What a transition records: one journal [`Entry`] per accepted input.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Phase;
use crate::protocol::Failure;

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
    /// A step or compensation failed (or a step's result broke its schema).
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
    /// The command waited for went out again (a recovery): its wait restarted.
    Resent,
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
    /// For an operator's action: who (the name of the API token used). Absent in
    /// journals written before operators had names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
}

/// What one input did to a saga, as its handler saw it; [`Saga::apply`](super::Saga::apply)
/// adds what only it knows (number, time, phases) to make the [`Entry`].
#[derive(Debug)]
pub(super) struct Change {
    pub(super) cause: Cause,
    pub(super) actor: Actor,
    pub(super) step: String,
    pub(super) command_id: Option<String>,
    pub(super) error: Option<String>,
    pub(super) operator: Option<String>,
}

impl Change {
    /// A change the orchestrator made on its own (a reply, a timer).
    pub(super) fn orchestrator(
        cause: Cause,
        step: &str,
        command_id: Option<String>,
        error: Option<&Failure>,
    ) -> Self {
        Self {
            cause,
            actor: Actor::Orchestrator,
            step: step.to_owned(),
            command_id,
            error: error.map(describe),
            operator: None,
        }
    }

    /// A change an operator asked for.
    pub(super) fn operator(
        cause: Cause,
        step: &str,
        error: Option<&Failure>,
        operator: String,
    ) -> Self {
        Self {
            cause,
            actor: Actor::Operator,
            step: step.to_owned(),
            command_id: None,
            error: error.map(describe),
            operator: Some(operator),
        }
    }

    /// The journal line of transition number `seq`.
    pub(super) fn into_entry(self, seq: u64, at: DateTime<Utc>, from: Phase, to: Phase) -> Entry {
        Entry {
            seq,
            at,
            actor: self.actor,
            cause: self.cause,
            step: Some(self.step),
            command_id: self.command_id,
            from: Some(from),
            to,
            error: self.error,
            operator: self.operator,
        }
    }
}

fn describe(failure: &Failure) -> String {
    format!("{}: {}", failure.code, failure.message)
}
