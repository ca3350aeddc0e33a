//! The invariant checker behind the saga property tests (`properties.rs`) and the
//! `apply` fuzz target (`fuzz/fuzz_targets/apply.rs`, which includes this file):
//! a saga plus what a driver would know from the actions it carried out, checked
//! after every input; then answering everything with success must finish the saga.

// Helpers outside `#[test]` functions panic on purpose too.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use chrono::{DateTime, Duration, Utc};
use jetsaga_sagas::protocol::{Command, CommandId, Direction, Failure, Outcome, subject};
use jetsaga_sagas::{
    Action, Actor, Cause, Definition, Input, Phase, Rejected, Saga, State, StepKind, StepStatus,
    Transition, Wait,
};
use serde_json::{Value, json};

const ORDER: &str = include_str!("../../definitions/order-creation.toml");
const ORDER_SCHEMA: &str = include_str!("../../definitions/order-creation.input.schema.json");

/// The shipped order-creation definition.
pub(crate) fn order_definition() -> Definition {
    Definition::parse_with(
        "order-creation.toml",
        ORDER,
        |_| Ok(ORDER_SCHEMA.to_owned()),
    )
    .unwrap()
}

pub(crate) fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_225_600, 0).unwrap()
}

pub(crate) fn order_input() -> Value {
    json!({"customer_id": "c-42", "email": "ana@example.com",
        "items": [{"sku": "sku-1", "quantity": 2}], "amount_cents": 4999,
        "currency": "EUR", "card_token": "tok_ok"})
}

/// How a participant answers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Answer {
    Ok,
    Retryable,
    Final,
}

impl Answer {
    fn outcome(self) -> Outcome {
        match self {
            // The protocol's default result.
            Self::Ok => Outcome::Ok {
                result: Value::Null,
            },
            Self::Retryable => Outcome::Failed {
                error: Failure::new("busy", "try again", true),
            },
            Self::Final => Outcome::Failed {
                error: Failure::new("refused", "will not do", false),
            },
        }
    }
}

/// One random input, resolved against the saga's state when it is applied.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    /// Answer the command the saga waits for (or the last one sent).
    Current(Answer),
    /// Answer any step, direction and attempt, sent or not.
    Other {
        step: usize,
        undo: bool,
        attempt: u32,
        answer: Answer,
    },
    /// Answer an earlier command again, possibly differently.
    Earlier {
        pick: usize,
        answer: Answer,
    },
    /// Deliver an earlier reply again, unchanged.
    Replay {
        pick: usize,
    },
    /// A command id of another saga, of no step, or not a command id.
    Foreign(u8),
    /// Any text as the command id.
    Raw {
        command_id: String,
        answer: Answer,
    },
    /// Let time pass, then wake.
    Wake {
        after_ms: u64,
    },
    /// Wake when the timer is due.
    WakeDue,
    Retry,
    Abort,
}

/// The parameters of a generated definition.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    pub(crate) steps: usize,
    pub(crate) pivot: Option<usize>,
    pub(crate) pivot_compensation: bool,
    pub(crate) max_attempts: Vec<u32>,
    pub(crate) compensation_attempts: u32,
    pub(crate) timeouts_ms: Vec<u64>,
    pub(crate) jitter: f64,
    pub(crate) deadline_ms: u64,
}

impl Shape {
    pub(crate) fn toml(&self) -> String {
        let backoff = format!(
            "initial-backoff = \"50ms\", max-backoff = \"400ms\", multiplier = 2.0, jitter = {}",
            self.jitter
        );
        let mut text = format!(
            "name = \"gen\"\nversion = 1\ndeadline = \"{}ms\"\n\
             compensation-retry = {{ max-attempts = {}, {backoff} }}\n\n\
             [events]\ncompleted = [\"gen.done\"]\ncompensated = [\"gen.undone\", \"gen.audit\"]\n",
            self.deadline_ms, self.compensation_attempts
        );
        for i in 0..self.steps {
            let kind = match self.pivot {
                Some(p) if i == p => "pivot",
                Some(p) if i > p => "retriable",
                _ => "compensatable",
            };
            text += &format!(
                "\n[[steps]]\nname = \"s{i}\"\nparticipant = \"p{}\"\naction = \"do{i}\"\n\
                 kind = \"{kind}\"\ntimeout = \"{}ms\"\n",
                i % 2,
                self.timeouts_ms[i]
            );
            if kind == "compensatable" || (kind == "pivot" && self.pivot_compensation) {
                text += &format!("compensation = \"undo{i}\"\n");
            }
            if kind == "retriable" {
                text += &format!("retry = {{ {backoff} }}\n");
            } else {
                text += &format!(
                    "retry = {{ max-attempts = {}, {backoff} }}\n",
                    self.max_attempts[i]
                );
            }
        }
        text
    }
}

/// Statuses of a step that may still be applied and so still need undoing.
fn may_be_applied(status: &StepStatus) -> bool {
    matches!(
        status,
        StepStatus::Succeeded
            | StepStatus::Uncertain
            | StepStatus::Running
            | StepStatus::Compensating
            | StepStatus::CompensationFailed
    )
}

/// A saga plus what a driver would know from the actions it carried out.
struct Checker {
    def: Definition,
    saga: Saga,
    now: DateTime<Utc>,
    /// The driver's timer, as the actions set it.
    timer: Option<DateTime<Utc>>,
    /// Every command id sent, in order, with its parsed form.
    sent: Vec<CommandId>,
    ids: HashSet<String>,
    /// Replies delivered so far, for replays.
    replies: Vec<Input>,
    forward_attempts: Vec<u32>,
    compensation_attempts: Vec<u32>,
    /// The step of the latest compensation command.
    last_compensated: Option<usize>,
    /// Compensation commands sent for that step since its round began (a new
    /// step, or an operator retry).
    round: u32,
    pivot_passed: bool,
}

impl Checker {
    fn start(def: Definition, input: Value) -> Self {
        let (saga, start) =
            Saga::start(&def, "s-1".into(), "key".into(), input, None, t0()).unwrap();
        let n = def.steps.len();
        let mut checker = Self {
            saga,
            now: t0(),
            timer: None,
            sent: Vec::new(),
            ids: HashSet::new(),
            replies: Vec::new(),
            forward_attempts: vec![0; n],
            compensation_attempts: vec![0; n],
            last_compensated: None,
            round: 0,
            pivot_passed: false,
            def,
        };
        assert_eq!(start.entry.seq, 1);
        assert_eq!(start.entry.cause, Cause::Start);
        let before = checker.saga.clone();
        // The start sends like a wake would: no operator input to check against.
        checker.check_actions(&before, &Input::Wake, &start.actions);
        checker.check_state();
        checker
    }

    fn n(&self) -> usize {
        self.def.steps.len()
    }

    fn id(&self, step: usize, direction: Direction, attempt: u32) -> String {
        CommandId {
            saga_id: self.saga.id.clone(),
            step: self.def.steps[step].name.clone(),
            direction,
            attempt,
        }
        .to_string()
    }

    /// The command whose reply the saga waits for, if any.
    fn outstanding(saga: &Saga) -> Option<(usize, Direction, u32)> {
        match &saga.state {
            State::Running {
                step,
                wait: Wait::Reply { attempt, .. },
            } => Some((*step, Direction::Forward, *attempt)),
            State::Compensating {
                step,
                wait: Wait::Reply { attempt, .. },
                ..
            } => Some((*step, Direction::Compensate, *attempt)),
            // The last compensation attempt timed out and parked the saga: its
            // late success is still applied (issue 10 hole 14).
            State::Failed {
                step,
                error,
                forward: false,
                ..
            } if error.code == "timeout" => Some((
                *step,
                Direction::Compensate,
                saga.steps[*step].compensation_attempts,
            )),
            State::Running { .. }
            | State::Compensating { .. }
            | State::Completed
            | State::Compensated { .. }
            | State::Failed { .. } => None,
        }
    }

    fn resolve(&mut self, op: &Op) -> Input {
        let reply = |command_id: String, answer: Answer| Input::Reply {
            command_id,
            outcome: answer.outcome(),
        };
        match *op {
            Op::Current(answer) => {
                let id = match Self::outstanding(&self.saga) {
                    Some((step, direction, attempt)) => self.id(step, direction, attempt),
                    None => self
                        .sent
                        .last()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                };
                reply(id, answer)
            }
            Op::Other {
                step,
                undo,
                attempt,
                answer,
            } => {
                let direction = if undo {
                    Direction::Compensate
                } else {
                    Direction::Forward
                };
                reply(self.id(step % self.n(), direction, attempt), answer)
            }
            Op::Earlier { pick, answer } => {
                reply(self.sent[pick % self.sent.len()].to_string(), answer)
            }
            Op::Replay { pick } if !self.replies.is_empty() => {
                self.replies[pick % self.replies.len()].clone()
            }
            Op::Replay { .. } => Input::Wake,
            Op::Foreign(which) => {
                let id = match which {
                    0 => format!("s-2:{}:do:1", self.def.steps[0].name),
                    1 => "s-1:no-such-step:do:1".to_owned(),
                    _ => "not a command id".to_owned(),
                };
                reply(id, Answer::Ok)
            }
            Op::Raw {
                ref command_id,
                answer,
            } => reply(command_id.clone(), answer),
            Op::Wake { after_ms } => {
                // Saturating: the fuzz targets' definitions may have armed the last instant.
                self.now = i64::try_from(after_ms)
                    .ok()
                    .and_then(Duration::try_milliseconds)
                    .and_then(|d| self.now.checked_add_signed(d))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                Input::Wake
            }
            Op::WakeDue => {
                if let Some(due) = self.saga.next_timer(&self.def) {
                    self.now = self.now.max(due);
                }
                Input::Wake
            }
            Op::Retry => Input::Retry {
                operator: "ana".into(),
            },
            Op::Abort => Input::Abort {
                reason: "random abort".into(),
                operator: "ana".into(),
            },
        }
    }

    fn run(&mut self, op: &Op) {
        let input = self.resolve(op);
        // Rejections are expected here; `apply` has checked them.
        let _ = self.apply(input);
    }

    fn apply(&mut self, input: Input) -> Result<(), Rejected> {
        if matches!(input, Input::Reply { .. }) {
            self.replies.push(input.clone());
        }
        let before = self.saga.clone();
        match self.saga.apply(&self.def, input.clone(), self.now) {
            Err(rejected) => {
                assert_eq!(
                    self.saga, before,
                    "rejected {input:?} ({rejected:?}) changed the saga"
                );
                if before.phase().is_finished() {
                    assert_eq!(rejected, Rejected::Finished);
                }
                let ignored = self.saga.ignored_entry(&input, &rejected, self.now);
                assert_eq!(ignored.seq, self.saga.transitions);
                assert_eq!(
                    (ignored.from, ignored.to),
                    (Some(before.phase()), before.phase())
                );
                // What the saga waits for is never refused.
                match &input {
                    Input::Reply {
                        command_id,
                        outcome,
                    } => {
                        let waited = Self::outstanding(&before).map(|(s, d, a)| self.id(s, d, a));
                        // A parked saga takes only the late success of its last attempt.
                        let late_failure = before.phase() == Phase::Failed
                            && matches!(outcome, Outcome::Failed { .. });
                        if !late_failure {
                            assert_ne!(waited.as_ref(), Some(command_id), "{rejected:?}");
                        }
                    }
                    Input::Wake => {
                        let due = before.next_timer(&self.def);
                        assert!(
                            due.is_none_or(|due| due > self.now),
                            "a due wake was refused: {rejected:?}"
                        );
                    }
                    Input::Retry { .. } => assert_ne!(before.phase(), Phase::Failed),
                    Input::Abort { .. } => {
                        if let State::Running { step, .. } = before.state {
                            assert_eq!(
                                self.def.steps[step].kind,
                                StepKind::Retriable,
                                "abort refused before the pivot"
                            );
                        }
                    }
                }
                self.check_state();
                Err(rejected)
            }
            Ok(transition) => {
                assert!(
                    !before.phase().is_finished(),
                    "{input:?} accepted after {:?}",
                    before.phase()
                );
                let entry = &transition.entry;
                assert_eq!(entry.seq, before.transitions + 1);
                assert_eq!(entry.seq, self.saga.transitions);
                assert_eq!(
                    (entry.from, entry.to),
                    (Some(before.phase()), self.saga.phase())
                );
                assert_eq!(entry.at, self.now);
                assert_ne!(entry.cause, Cause::Ignored);
                let operator = matches!(input, Input::Retry { .. } | Input::Abort { .. });
                assert_eq!(entry.actor == Actor::Operator, operator);
                if let Input::Reply {
                    command_id,
                    outcome,
                } = &input
                {
                    // Only the reply the saga waits for is ever applied.
                    let waited = Self::outstanding(&before).map(|(s, d, a)| self.id(s, d, a));
                    assert_eq!(
                        waited.as_ref(),
                        Some(command_id),
                        "applied a reply it did not wait for"
                    );
                    assert_eq!(entry.command_id.as_ref(), Some(command_id));
                    assert_eq!(
                        entry.error.is_some(),
                        matches!(outcome, Outcome::Failed { .. })
                    );
                }
                if matches!(
                    entry.cause,
                    Cause::StepTimeout | Cause::Deadline | Cause::OperatorAbort
                ) {
                    assert!(entry.error.is_some());
                }
                if matches!(input, Input::Wake) {
                    // The timer that fired is spent: a new one must be set, or none be needed.
                    assert!(
                        transition
                            .actions
                            .iter()
                            .any(|a| matches!(a, Action::SetTimer { .. } | Action::ClearTimer)),
                        "a wake left the fired timer in place: {:?}",
                        transition.actions
                    );
                }
                let round = self.round;
                self.check_actions(&before, &input, &transition.actions);
                self.check_policy(&before, &input, &transition, round);
                // The driver persists the saga as JSON after every transition: what it
                // reloads must be the same saga, and the rest of the run goes on from it.
                let reloaded: Saga =
                    serde_json::from_value(serde_json::to_value(&self.saga).unwrap()).unwrap();
                assert_eq!(
                    reloaded, self.saga,
                    "the saga changed through a JSON round trip"
                );
                self.saga = reloaded;
                self.check_state();
                Ok(())
            }
        }
    }

    fn check_actions(&mut self, before: &Saga, input: &Input, actions: &[Action]) {
        let sends = actions
            .iter()
            .filter(|a| matches!(a, Action::Send { .. }))
            .count();
        let timers = actions
            .iter()
            .filter(|a| matches!(a, Action::SetTimer { .. } | Action::ClearTimer))
            .count();
        assert!(sends <= 1 && timers <= 1, "{actions:?}");
        // Commands first, then the timer, then events, then the finish.
        let rank = |a: &Action| match a {
            Action::Send { .. } => 0,
            Action::SetTimer { .. } | Action::ClearTimer => 1,
            Action::Publish { .. } => 2,
            Action::Finish { .. } | Action::Park { .. } => 3,
        };
        assert!(
            actions.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])),
            "{actions:?}"
        );

        let phase = self.saga.phase();
        // A transition into completed or compensated finishes the saga; one into
        // failed parks it (not finished: an operator may retry it).
        let finishing = phase != before.phase() && phase.is_finished();
        let parking = phase != before.phase() && phase == Phase::Failed;
        let finishes: Vec<Phase> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Finish { end } => Some(end.phase()),
                Action::Park { step } => {
                    let State::Failed { step: index, .. } = &self.saga.state else {
                        panic!("parked outside the failed state: {:?}", self.saga.state)
                    };
                    assert_eq!(step, &self.def.steps[*index].name);
                    Some(Phase::Failed)
                }
                Action::Send { .. }
                | Action::SetTimer { .. }
                | Action::ClearTimer
                | Action::Publish { .. } => None,
            })
            .collect();
        assert_eq!(
            finishes,
            if finishing || parking {
                vec![phase]
            } else {
                vec![]
            }
        );
        let published: Vec<&str> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish { event, subject: s } => {
                    assert_eq!(s, &subject::event(&event.event));
                    assert_eq!(event.occurred_at, self.now);
                    Some(event.event.as_str())
                }
                _ => None,
            })
            .collect();
        let expected: Vec<&str> = match (finishing, phase) {
            (true, Phase::Completed) => self
                .def
                .events
                .completed
                .iter()
                .map(String::as_str)
                .collect(),
            (true, Phase::Compensated) => self
                .def
                .events
                .compensated
                .iter()
                .map(String::as_str)
                .collect(),
            _ => Vec::new(),
        };
        assert_eq!(published, expected);

        for action in actions {
            match action {
                Action::Send {
                    subject: to,
                    command,
                } => self.check_command(before, input, to, command),
                Action::SetTimer { at } => self.timer = Some(*at),
                Action::ClearTimer => self.timer = None,
                Action::Publish { .. } | Action::Finish { .. } | Action::Park { .. } => {}
            }
        }
    }

    fn check_command(&mut self, before: &Saga, input: &Input, to: &str, command: &Command) {
        let id = CommandId::parse(&command.command_id).unwrap();
        assert!(
            self.ids.insert(command.command_id.clone()),
            "command id {} sent twice",
            command.command_id
        );
        assert_eq!(id.saga_id, "s-1");
        assert_eq!(id.step, command.step);
        assert_eq!(id.attempt, command.attempt);
        assert_eq!(id.direction == Direction::Compensate, command.compensation);
        let index = self.def.step_index(&id.step).unwrap();
        let spec = &self.def.steps[index];
        assert_eq!(
            command.reply_to,
            subject::reply(&spec.participant, &command.command_id)
        );
        match id.direction {
            Direction::Forward => {
                assert_eq!(to, subject::command(&spec.participant, &spec.action));
                assert!(
                    !matches!(
                        before.state,
                        State::Compensating { .. } | State::Failed { forward: false, .. }
                    ),
                    "a forward command while compensating"
                );
                assert!(
                    self.saga.steps[..index]
                        .iter()
                        .all(|s| s.status == StepStatus::Succeeded)
                );
                self.forward_attempts[index] += 1;
                assert_eq!(
                    id.attempt, self.forward_attempts[index],
                    "forward attempts go 1, 2, 3…"
                );
            }
            Direction::Compensate => {
                assert_eq!(
                    Some(to.to_owned()),
                    spec.compensation
                        .as_ref()
                        .map(|c| subject::command(&spec.participant, c))
                );
                assert_ne!(
                    spec.kind,
                    StepKind::Retriable,
                    "a retriable step was compensated"
                );
                assert!(
                    !self.pivot_passed,
                    "a compensation after the pivot succeeded"
                );
                assert!(
                    self.forward_attempts[index] > 0,
                    "compensating {} that never ran",
                    id.step
                );
                assert!(
                    may_be_applied(&before.steps[index].status),
                    "compensating {} whose status was {:?}",
                    id.step,
                    before.steps[index].status
                );
                if let Some(last) = self.last_compensated {
                    assert!(
                        index <= last,
                        "compensated {index} after {last}: not in reverse order"
                    );
                    if index < last {
                        assert_eq!(
                            self.saga.steps[last].status,
                            StepStatus::Compensated,
                            "moved on before {last} was undone"
                        );
                    }
                }
                if let (Input::Retry { .. }, State::Failed { step, .. }) = (input, &before.state) {
                    assert_eq!(index, *step, "an operator retry resumes at the failed step");
                }
                let same_round =
                    self.last_compensated == Some(index) && !matches!(input, Input::Retry { .. });
                self.round = if same_round { self.round + 1 } else { 1 };
                self.last_compensated = Some(index);
                self.compensation_attempts[index] += 1;
                assert_eq!(id.attempt, self.compensation_attempts[index]);
            }
        }
        self.sent.push(id);
    }

    /// What a failure, a timeout, an abort or the deadline leads to, per the
    /// definition's retry policies. `round` is the compensation round before the input.
    fn check_policy(&self, before: &Saga, input: &Input, transition: &Transition, round: u32) {
        let undo_sent = |step: usize| {
            transition.actions.iter().any(|a| match a {
                Action::Send { command, .. } => {
                    command.compensation && command.step == self.def.steps[step].name
                }
                _ => false,
            })
        };
        let cause = transition.entry.cause;
        if matches!(cause, Cause::OperatorAbort | Cause::Deadline) {
            let State::Running { step, .. } = before.state else {
                panic!("{cause:?} outside a running saga");
            };
            assert_ne!(self.def.steps[step].kind, StepKind::Retriable);
            // The current step's command may have landed: it is undone first.
            assert_eq!(undo_sent(step), self.def.steps[step].compensation.is_some());
            return;
        }
        let retryable = match (cause, input) {
            (Cause::StepTimeout, _) => true,
            (
                Cause::ReplyFailed,
                Input::Reply {
                    outcome: Outcome::Failed { error },
                    ..
                },
            ) => error.retryable,
            _ => return,
        };
        let (step, direction, attempt) =
            Self::outstanding(before).expect("a failure of the command waited for");
        let spec = &self.def.steps[step];
        let backing_off = matches!(
            &self.saga.state,
            State::Running { step: s, wait: Wait::Backoff { attempt: a, .. } }
                | State::Compensating { step: s, wait: Wait::Backoff { attempt: a, .. }, .. }
                if *s == step && *a == attempt
        );
        match direction {
            Direction::Forward if spec.kind == StepKind::Retriable && retryable => {
                assert!(
                    backing_off,
                    "a retriable step must retry: {:?}",
                    self.saga.state
                );
            }
            Direction::Forward if spec.kind == StepKind::Retriable => {
                // Refused for good past the pivot: parked for an operator, nothing undone.
                assert!(
                    matches!(&self.saga.state, State::Failed { step: s, forward: true, .. } if *s == step),
                    "a refused retriable step must park: {:?}",
                    self.saga.state
                );
                assert!(!undo_sent(step));
            }
            Direction::Forward => {
                let again = retryable && spec.retry.max_attempts.is_some_and(|max| attempt < max);
                assert_eq!(
                    backing_off, again,
                    "attempt {attempt} of {} (retryable: {retryable})",
                    spec.name
                );
                if !again {
                    // Uncertain steps are undone, definitive failures are not.
                    let status = &self.saga.steps[step].status;
                    if retryable {
                        assert!(
                            matches!(status, StepStatus::Uncertain | StepStatus::Compensating),
                            "{status:?}"
                        );
                        assert_eq!(undo_sent(step), spec.compensation.is_some());
                    } else {
                        assert_eq!(status, &StepStatus::Failed);
                        assert!(!undo_sent(step));
                    }
                }
            }
            Direction::Compensate => {
                let max = self.def.compensation_retry.max_attempts.unwrap_or(u32::MAX);
                assert_eq!(backing_off, round < max, "compensation {round} of {max}");
                assert_eq!(
                    matches!(self.saga.state, State::Failed { .. }),
                    round >= max
                );
            }
        }
    }

    fn check_state(&mut self) {
        let saga = &self.saga;
        let def = &self.def;
        assert_eq!(saga.steps.len(), def.steps.len());
        assert_eq!(
            self.timer,
            saga.next_timer(def),
            "the driver's timer is not the saga's"
        );
        if def
            .pivot()
            .is_some_and(|p| saga.steps[p].status == StepStatus::Succeeded)
        {
            self.pivot_passed = true;
        }
        for (record, spec) in saga.steps.iter().zip(&def.steps) {
            if spec.kind == StepKind::Retriable || spec.compensation.is_none() {
                assert_eq!(
                    record.compensation_attempts, 0,
                    "{} was compensated",
                    record.name
                );
                assert!(!matches!(
                    record.status,
                    StepStatus::Compensating
                        | StepStatus::Compensated
                        | StepStatus::CompensationFailed
                ));
            }
        }
        // Steps after `from` with a compensation are done with: never applied, or undone.
        let undone_after = |from: usize| {
            saga.steps
                .iter()
                .zip(&def.steps)
                .skip(from)
                .filter(|(_, spec)| spec.compensation.is_some() && spec.kind != StepKind::Retriable)
                .all(|(r, _)| {
                    matches!(
                        r.status,
                        StepStatus::Pending | StepStatus::Failed | StepStatus::Compensated
                    )
                })
        };
        let last = self.sent_last();
        match &saga.state {
            State::Running { step, wait } => {
                assert!(
                    saga.steps[..*step]
                        .iter()
                        .all(|s| s.status == StepStatus::Succeeded)
                );
                assert_eq!(saga.steps[*step].status, StepStatus::Running);
                assert!(
                    saga.steps[step + 1..]
                        .iter()
                        .all(|s| s.status == StepStatus::Pending)
                );
                assert_eq!(wait.attempt_of(), saga.steps[*step].attempts);
                // Exactly one thing outstanding: the latest command, awaiting its reply or a retry.
                assert_eq!(last, Some((*step, Direction::Forward, wait.attempt_of())));
                assert!(saga.next_timer(def).is_some());
                assert!(!self.pivot_passed || def.steps[*step].kind == StepKind::Retriable);
            }
            State::Compensating {
                step,
                wait,
                first_attempt,
                ..
            } => {
                assert!(!self.pivot_passed);
                assert_eq!(saga.steps[*step].status, StepStatus::Compensating);
                assert_eq!(wait.attempt_of(), saga.steps[*step].compensation_attempts);
                assert!(*first_attempt <= wait.attempt_of());
                assert_eq!(
                    last,
                    Some((*step, Direction::Compensate, wait.attempt_of()))
                );
                assert!(undone_after(step + 1));
                assert!(saga.next_timer(def).is_some());
            }
            State::Completed => {
                assert!(
                    saga.steps.iter().all(|s| s.status == StepStatus::Succeeded),
                    "completed with {:?}",
                    saga.steps
                );
            }
            State::Compensated { .. } => {
                assert!(!self.pivot_passed);
                assert!(undone_after(0), "compensated with {:?}", saga.steps);
                for (record, spec) in saga.steps.iter().zip(&def.steps) {
                    if spec.kind == StepKind::Retriable {
                        assert_eq!(record.attempts, 0);
                    }
                }
            }
            State::Failed {
                step,
                forward: true,
                ..
            } => {
                // Parked going forward, nothing undone: a retriable step refused
                // past the pivot, or a pivot with no compensation that may have
                // been applied.
                let spec = &def.steps[*step];
                if spec.kind == StepKind::Pivot {
                    assert!(spec.compensation.is_none());
                    assert_eq!(saga.steps[*step].status, StepStatus::Uncertain);
                } else {
                    assert!(self.pivot_passed);
                    assert_eq!(spec.kind, StepKind::Retriable);
                    assert_eq!(saga.steps[*step].status, StepStatus::Failed);
                }
                assert!(saga.steps.iter().all(|s| s.compensation_attempts == 0));
            }
            State::Failed { step, .. } => {
                assert!(!self.pivot_passed);
                assert_eq!(saga.steps[*step].status, StepStatus::CompensationFailed);
                assert!(undone_after(step + 1));
            }
        }
        if matches!(
            saga.state,
            State::Completed | State::Compensated { .. } | State::Failed { .. }
        ) {
            assert_eq!(saga.next_timer(def), None);
        }
    }

    fn sent_last(&self) -> Option<(usize, Direction, u32)> {
        let id = self.sent.last()?;
        Some((
            self.def.step_index(&id.step).unwrap(),
            id.direction,
            id.attempt,
        ))
    }

    /// Answers everything with success, wakes every timer and retries a failed
    /// saga: the saga must finish within a few inputs per step.
    fn finish(&mut self) {
        let bound = 4 * self.n() + 4;
        for _ in 0..=bound {
            let input = match &self.saga.state {
                State::Completed | State::Compensated { .. } => return,
                State::Failed { .. } => Input::Retry {
                    operator: "ana".into(),
                },
                State::Running { .. } | State::Compensating { .. } => {
                    match Self::outstanding(&self.saga) {
                        Some((step, direction, attempt)) => Input::Reply {
                            command_id: self.id(step, direction, attempt),
                            outcome: Answer::Ok.outcome(),
                        },
                        None => {
                            self.now = self.now.max(self.saga.next_timer(&self.def).unwrap());
                            Input::Wake
                        }
                    }
                }
            };
            self.apply(input).unwrap();
        }
        panic!("not finished after {bound} inputs: {:?}", self.saga.state);
    }
}

/// `Wait::attempt` is private to the crate; the same, from outside.
trait AttemptOf {
    fn attempt_of(&self) -> u32;
}

impl AttemptOf for Wait {
    fn attempt_of(&self) -> u32 {
        match self {
            Wait::Reply { attempt, .. } | Wait::Backoff { attempt, .. } => *attempt,
        }
    }
}

pub(crate) fn check(def: Definition, input: Value, ops: &[Op]) {
    let mut checker = Checker::start(def, input);
    for op in ops {
        checker.run(op);
    }
    let phase = checker.saga.phase();
    let pivot_passed = checker.pivot_passed;
    let forward = matches!(checker.saga.state, State::Failed { forward: true, .. });
    checker.finish();
    let end = checker.saga.phase();
    match phase {
        Phase::Completed | Phase::Compensated => assert_eq!(end, phase),
        // Parked going forward (past the pivot, or at a pivot with no
        // compensation), a retry resumes the step: it completes.
        Phase::Failed if pivot_passed || forward => assert_eq!(end, Phase::Completed),
        Phase::Compensating | Phase::Failed => assert_eq!(end, Phase::Compensated),
        Phase::Running if pivot_passed => assert_eq!(end, Phase::Completed),
        Phase::Running => {}
    }
}
