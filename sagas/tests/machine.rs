//! Table-style tests of the saga state machine: each test drives `Saga::apply`
//! through one path with a fixed input sequence and asserts on the actions, the
//! journal and the resulting state.
//!
//! Every input goes through [`Harness`], which also checks what must hold for
//! any input: an accepted one yields the next journal number with the right
//! phases and actor; a rejected one leaves the saga exactly as it was.

// Helpers outside `#[test]` functions panic on purpose too.
#![allow(clippy::unwrap_used)]

use chrono::{DateTime, Duration, Utc};
use jetsaga_sagas::protocol::{self, Command, Failure, Outcome};
use jetsaga_sagas::{
    Action, Actor, Cause, Definition, Entry, Input, Phase, Rejected, Saga, State, StepStatus,
    Transition, Wait,
};
use serde_json::{Value, json};

const ORDER: &str = include_str!("../definitions/order-creation.toml");
const ORDER_SCHEMA: &str = include_str!("../definitions/order-creation.input.schema.json");

/// A fixed origin: every time in these tests is "milliseconds after T0".
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_225_600, 0).unwrap()
}

fn at(ms: i64) -> DateTime<Utc> {
    t0() + Duration::milliseconds(ms)
}

fn def_from(text: &str) -> Definition {
    match Definition::parse("test.toml", text) {
        Ok(def) => def,
        Err(errors) => panic!("invalid test definition: {errors:?}\n{text}"),
    }
}

fn order() -> Definition {
    Definition::parse_with(
        "order-creation.toml",
        ORDER,
        |_| Ok(ORDER_SCHEMA.to_owned()),
    )
    .unwrap()
}

fn order_input() -> Value {
    json!({"customer_id": "c-42", "email": "ana@example.com",
        "items": [{"sku": "sku-1", "quantity": 2}], "amount_cents": 4999,
        "currency": "EUR", "card_token": "tok_ok"})
}

/// A retry policy without jitter, so backoffs are exact.
const EXACT: &str = "max-attempts = 3, initial-backoff = \"100ms\", max-backoff = \"150ms\", \
                     multiplier = 2.0, jitter = 0.0";

/// Three steps `a` (compensatable, 1s timeout), `b` (pivot with a compensation,
/// 2s) and `c` (retriable, 3s), with the given forward retry policy for `a` and
/// `b`, compensation retry policy and deadline.
fn custom(retry: &str, compensation_retry: &str, deadline: &str) -> Definition {
    def_from(&format!(
        r#"
name = "custom"
version = 1
deadline = "{deadline}"
compensation-retry = {{ {compensation_retry} }}

[events]
completed = ["custom.done"]
compensated = ["custom.undone", "custom.audit"]

[[steps]]
name = "a"
participant = "p1"
action = "do-a"
compensation = "undo-a"
kind = "compensatable"
timeout = "1s"
retry = {{ {retry} }}

[[steps]]
name = "b"
participant = "p2"
action = "do-b"
compensation = "undo-b"
kind = "pivot"
timeout = "2s"
retry = {{ {retry} }}

[[steps]]
name = "c"
participant = "p3"
action = "do-c"
kind = "retriable"
timeout = "3s"
retry = {{ initial-backoff = "100ms", max-backoff = "400ms", multiplier = 2.0, jitter = 0.0 }}
"#
    ))
}

/// The actions in a compact form that tables can compare: timers are shown in
/// milliseconds after T0.
fn describe(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .map(|action| match action {
            Action::Send { subject, command } => format!("send {subject} {}", command.command_id),
            Action::SetTimer { at } => format!("timer {}ms", (*at - t0()).num_milliseconds()),
            Action::ClearTimer => "clear timer".to_owned(),
            Action::Publish { subject, .. } => format!("publish {subject}"),
            Action::Finish { end } => format!("finish {}", end.as_str()),
            Action::Park { step } => format!("park {step}"),
        })
        .collect()
}

fn ok() -> Outcome {
    Outcome::Ok {
        result: Value::Null,
    }
}

fn failed(code: &str, retryable: bool) -> Outcome {
    Outcome::Failed {
        error: Failure::new(code, format!("{code} happened"), retryable),
    }
}

fn reply(command_id: &str, outcome: Outcome) -> Input {
    Input::Reply {
        command_id: command_id.to_owned(),
        outcome,
    }
}

fn abort(reason: &str) -> Input {
    Input::Abort {
        reason: reason.to_owned(),
        operator: "ana".into(),
    }
}

/// One saga and its definition, the current time and the journal so far.
struct Harness {
    def: Definition,
    saga: Saga,
    now: DateTime<Utc>,
    journal: Vec<Entry>,
}

impl Harness {
    fn start(def: Definition, input: Value) -> (Self, Transition) {
        let (saga, start) =
            Saga::start(&def, "s-1".into(), "key-1".into(), input, None, t0()).unwrap();
        assert_eq!(saga.transitions, 1);
        assert_eq!(start.entry.seq, 1);
        let journal = vec![start.entry.clone()];
        let harness = Self {
            def,
            saga,
            now: t0(),
            journal,
        };
        (harness, start)
    }

    fn order() -> (Self, Transition) {
        Self::start(order(), order_input())
    }

    fn custom(def: Definition) -> (Self, Transition) {
        Self::start(def, json!({"n": 1}))
    }

    /// Moves the clock to `ms` after T0.
    fn at(&mut self, ms: i64) -> &mut Self {
        assert!(at(ms) >= self.now, "time goes forward");
        self.now = at(ms);
        self
    }

    /// Applies an input and checks the journal entry or, if rejected, that nothing changed.
    fn apply(&mut self, input: Input) -> Result<Transition, Rejected> {
        let before = self.saga.clone();
        let actor = match input {
            Input::Retry { .. } | Input::Abort { .. } => Actor::Operator,
            Input::Reply { .. } | Input::Wake => Actor::Orchestrator,
        };
        match self.saga.apply(&self.def, input.clone(), self.now) {
            Ok(transition) => {
                let entry = &transition.entry;
                assert_eq!(entry.seq, before.transitions + 1, "{input:?}");
                assert_eq!(entry.seq, self.saga.transitions);
                assert_eq!(entry.at, self.now);
                assert_eq!(entry.actor, actor, "{input:?}");
                assert_eq!(entry.from, Some(before.phase()));
                assert_eq!(entry.to, self.saga.phase());
                assert_ne!(entry.cause, Cause::Ignored);
                assert_eq!(self.saga.updated_at, self.now);
                let json = serde_json::to_value(&self.saga).unwrap();
                let reloaded: Saga = serde_json::from_value(json).unwrap();
                assert_eq!(
                    reloaded, self.saga,
                    "the saga changed through a JSON round trip"
                );
                self.journal.push(entry.clone());
                Ok(transition)
            }
            Err(rejected) => {
                assert_eq!(self.saga, before, "a rejected {input:?} changed the saga");
                let ignored = self.saga.ignored_entry(&input, &rejected, self.now);
                assert_eq!(ignored.seq, self.saga.transitions);
                assert_eq!(ignored.cause, Cause::Ignored);
                assert_eq!(ignored.actor, actor);
                assert_eq!(ignored.from, Some(self.saga.phase()));
                assert_eq!(ignored.to, self.saga.phase());
                assert_eq!(ignored.error, Some(rejected.to_string()));
                Err(rejected)
            }
        }
    }

    /// Applies an input that must be accepted and describes its actions.
    fn step(&mut self, input: Input) -> Vec<String> {
        match self.apply(input.clone()) {
            Ok(transition) => describe(&transition.actions),
            Err(rejected) => panic!(
                "{input:?} rejected: {rejected:?}; saga: {:#?}",
                self.saga.state
            ),
        }
    }

    fn ok(&mut self, command_id: &str) -> Vec<String> {
        self.step(reply(command_id, ok()))
    }

    fn fail(&mut self, command_id: &str, code: &str, retryable: bool) -> Vec<String> {
        self.step(reply(command_id, failed(code, retryable)))
    }

    fn wake(&mut self) -> Vec<String> {
        self.step(Input::Wake)
    }

    /// Applies an input that must be rejected.
    fn reject(&mut self, input: Input) -> Rejected {
        match self.apply(input.clone()) {
            Ok(transition) => panic!("{input:?} accepted: {:?}", describe(&transition.actions)),
            Err(rejected) => rejected,
        }
    }

    fn statuses(&self) -> Vec<StepStatus> {
        self.saga.steps.iter().map(|s| s.status.clone()).collect()
    }

    fn causes(&self) -> Vec<Cause> {
        self.journal.iter().map(|e| e.cause).collect()
    }

    fn timer(&self) -> Option<DateTime<Utc>> {
        self.saga.next_timer(&self.def)
    }
}

fn command(transition: &Transition) -> &Command {
    match transition.actions.first() {
        Some(Action::Send { command, .. }) => command,
        other => panic!("expected a command first, got {other:?}"),
    }
}

#[test]
fn happy_path_runs_every_step_in_order_then_completes() {
    let (mut h, start) = Harness::order();
    assert_eq!(
        describe(&start.actions),
        [
            "send saga.cmd.inventory.reserve s-1:reserve-stock:do:1",
            "timer 10000ms"
        ]
    );
    assert_eq!(
        start.entry,
        Entry {
            seq: 1,
            at: t0(),
            actor: Actor::Orchestrator,
            cause: Cause::Start,
            step: Some("reserve-stock".into()),
            command_id: None,
            from: None,
            to: Phase::Running,
            error: None,
            operator: None,
        }
    );
    assert_eq!(
        command(&start),
        &Command {
            protocol: protocol::VERSION,
            command_id: "s-1:reserve-stock:do:1".into(),
            saga_id: "s-1".into(),
            saga_type: "order-creation".into(),
            step: "reserve-stock".into(),
            action: "reserve".into(),
            compensation: false,
            attempt: 1,
            reply_to: "saga.reply.inventory.s-1:reserve-stock:do:1".into(),
            input: order_input(),
        }
    );
    assert_eq!(
        h.saga.state,
        State::Running {
            step: 0,
            wait: Wait::Reply {
                attempt: 1,
                timeout_at: at(10_000)
            }
        }
    );
    assert_eq!(h.saga.deadline_at, at(300_000));
    assert_eq!(h.saga.created_at, t0());
    assert_eq!(
        h.statuses(),
        [
            StepStatus::Running,
            StepStatus::Pending,
            StepStatus::Pending
        ]
    );

    h.at(1_000);
    assert_eq!(
        h.ok("s-1:reserve-stock:do:1"),
        [
            "send saga.cmd.payment.charge s-1:take-payment:do:1",
            "timer 11000ms"
        ]
    );
    h.at(2_000);
    assert_eq!(
        h.ok("s-1:take-payment:do:1"),
        [
            "send saga.cmd.inventory.commit s-1:confirm-order:do:1",
            "timer 12000ms"
        ]
    );
    h.at(3_000);
    let done = h
        .apply(reply(
            "s-1:confirm-order:do:1",
            Outcome::Ok {
                result: json!({"order": "o-1"}),
            },
        ))
        .unwrap();
    assert_eq!(
        describe(&done.actions),
        [
            "clear timer",
            "publish saga.event.order.confirmed",
            "finish completed"
        ]
    );
    let Some(Action::Publish { event, .. }) = done.actions.get(1) else {
        panic!("expected the event second");
    };
    assert_eq!(
        event,
        &protocol::Event {
            protocol: protocol::VERSION,
            event: "order.confirmed".into(),
            saga_id: "s-1".into(),
            saga_type: "order-creation".into(),
            key: "key-1".into(),
            input: order_input(),
            occurred_at: at(3_000),
        }
    );
    assert_eq!(done.entry.cause, Cause::ReplyOk);
    assert_eq!(done.entry.step.as_deref(), Some("confirm-order"));
    assert_eq!(
        done.entry.command_id.as_deref(),
        Some("s-1:confirm-order:do:1")
    );
    assert_eq!(done.entry.error, None);
    assert_eq!(
        (done.entry.from, done.entry.to),
        (Some(Phase::Running), Phase::Completed)
    );

    assert_eq!(h.saga.state, State::Completed);
    assert_eq!(h.statuses(), [const { StepStatus::Succeeded }; 3]);
    assert_eq!(h.timer(), None);
    assert_eq!(h.saga.transitions, 4);
    assert_eq!(
        h.causes(),
        [Cause::Start, Cause::ReplyOk, Cause::ReplyOk, Cause::ReplyOk]
    );
    for (i, record) in h.saga.steps.iter().enumerate() {
        let i = i as i64;
        assert_eq!((record.attempts, record.compensation_attempts), (1, 0));
        assert_eq!(record.started_at, Some(at(i * 1_000)));
        assert_eq!(record.sent_at, record.started_at, "one command each");
        assert_eq!(record.finished_at, Some(at((i + 1) * 1_000)));
        assert_eq!(record.last_error, None);
    }
    assert_eq!(h.saga.steps[2].result, Some(json!({"order": "o-1"})));
    assert_eq!(h.saga.steps[0].result, None, "a null result is no result");
}

#[test]
fn payment_declined_at_the_pivot_releases_the_stock_only() {
    let (mut h, _) = Harness::order();
    h.at(1_000).ok("s-1:reserve-stock:do:1");
    h.at(2_000);
    let declined = h
        .apply(reply(
            "s-1:take-payment:do:1",
            failed("card_declined", false),
        ))
        .unwrap();
    assert_eq!(
        describe(&declined.actions),
        [
            "send saga.cmd.inventory.release s-1:reserve-stock:undo:1",
            "timer 12000ms"
        ]
    );
    let release = command(&declined);
    assert!(release.compensation);
    assert_eq!(release.action, "release");
    assert_eq!(release.attempt, 1);
    assert_eq!(
        release.reply_to,
        "saga.reply.inventory.s-1:reserve-stock:undo:1"
    );
    assert_eq!(declined.entry.cause, Cause::ReplyFailed);
    assert_eq!(declined.entry.step.as_deref(), Some("take-payment"));
    assert_eq!(
        declined.entry.error.as_deref(),
        Some("card_declined: card_declined happened")
    );
    assert_eq!(
        (declined.entry.from, declined.entry.to),
        (Some(Phase::Running), Phase::Compensating)
    );
    let cause = Failure::new("card_declined", "card_declined happened", false);
    assert_eq!(
        h.saga.state,
        State::Compensating {
            step: 0,
            wait: Wait::Reply {
                attempt: 1,
                timeout_at: at(12_000)
            },
            first_attempt: 1,
            cause: cause.clone(),
        }
    );
    assert_eq!(
        h.statuses(),
        [
            StepStatus::Compensating,
            StepStatus::Failed,
            StepStatus::Pending
        ]
    );
    assert_eq!(h.saga.steps[1].last_error, Some(cause.clone()));
    // One attempt only: a definitive failure is not retried.
    assert_eq!(h.saga.steps[1].attempts, 1);
    // The release's span starts when it went out, the step's first command long before.
    assert_eq!(h.saga.steps[0].sent_at, Some(at(2_000)));
    assert_eq!(h.saga.steps[0].started_at, Some(at(0)));

    h.at(3_000);
    assert_eq!(
        h.ok("s-1:reserve-stock:undo:1"),
        [
            "clear timer",
            "publish saga.event.order.cancelled",
            "finish compensated"
        ]
    );
    assert_eq!(h.saga.state, State::Compensated { cause });
    assert_eq!(
        h.statuses(),
        [
            StepStatus::Compensated,
            StepStatus::Failed,
            StepStatus::Pending
        ]
    );
    assert_eq!(h.saga.steps[0].finished_at, Some(at(3_000)));
    // Neither the refund nor the commit ever went out.
    assert_eq!(h.saga.steps[1].compensation_attempts, 0);
    assert_eq!(h.saga.steps[2].attempts, 0);
    assert_eq!(
        h.causes(),
        [
            Cause::Start,
            Cause::ReplyOk,
            Cause::ReplyFailed,
            Cause::ReplyOk
        ]
    );
}

#[test]
fn retryable_failures_and_timeouts_are_retried_per_policy() {
    let (mut h, start) = Harness::custom(custom(EXACT, EXACT, "1h"));
    assert_eq!(
        describe(&start.actions),
        ["send saga.cmd.p1.do-a s-1:a:do:1", "timer 1000ms"]
    );

    h.at(500);
    assert_eq!(h.fail("s-1:a:do:1", "busy", true), ["timer 600ms"]);
    assert_eq!(
        h.saga.state,
        State::Running {
            step: 0,
            wait: Wait::Backoff {
                attempt: 1,
                until: at(600)
            }
        }
    );
    assert_eq!(h.saga.steps[0].status, StepStatus::Running);
    assert_eq!(
        h.saga.steps[0].last_error,
        Some(Failure::new("busy", "busy happened", true))
    );
    let entry = h.journal.last().unwrap();
    assert_eq!(entry.cause, Cause::ReplyFailed);
    assert_eq!(entry.error.as_deref(), Some("busy: busy happened"));
    assert_eq!(
        (entry.from, entry.to),
        (Some(Phase::Running), Phase::Running)
    );

    // The same reply again, and a wake before the backoff ends, change nothing.
    assert_eq!(
        h.reject(reply("s-1:a:do:1", failed("busy", true))),
        Rejected::Duplicate
    );
    assert_eq!(h.reject(reply("s-1:a:do:1", ok())), Rejected::Duplicate);
    assert_eq!(h.at(599).reject(Input::Wake), Rejected::NotDue);

    h.at(600);
    let retry = h.apply(Input::Wake).unwrap();
    assert_eq!(
        describe(&retry.actions),
        ["send saga.cmd.p1.do-a s-1:a:do:2", "timer 1600ms"]
    );
    assert_eq!(command(&retry).attempt, 2);
    assert_eq!(retry.entry.cause, Cause::RetryDue);
    assert_eq!(retry.entry.step.as_deref(), Some("a"));
    assert_eq!(h.saga.steps[0].attempts, 2);
    assert_eq!(
        h.saga.steps[0].started_at,
        Some(t0()),
        "the first attempt started the step"
    );
    assert_eq!(h.saga.steps[0].sent_at, Some(at(600)), "attempt 2 went out");
    // A late answer to attempt 1 is for an attempt that is no longer current.
    assert_eq!(h.reject(reply("s-1:a:do:1", ok())), Rejected::Stale);
    assert_eq!(h.at(1_599).reject(Input::Wake), Rejected::NotDue);

    // A timeout counts as a retryable failure; the second backoff is capped at 150ms.
    h.at(1_600);
    assert_eq!(h.wake(), ["timer 1750ms"]);
    let timeout = h.journal.last().unwrap();
    assert_eq!(timeout.cause, Cause::StepTimeout);
    assert_eq!(timeout.command_id.as_deref(), Some("s-1:a:do:2"));
    assert_eq!(
        timeout.error.as_deref(),
        Some("timeout: no reply within 1s")
    );
    h.at(1_750);
    assert_eq!(
        h.wake(),
        ["send saga.cmd.p1.do-a s-1:a:do:3", "timer 2750ms"]
    );
    assert_eq!(
        h.at(1_800).ok("s-1:a:do:3"),
        ["send saga.cmd.p2.do-b s-1:b:do:1", "timer 3800ms"]
    );
    assert_eq!(h.saga.steps[0].attempts, 3);
    assert_eq!(h.saga.steps[0].status, StepStatus::Succeeded);
    assert_eq!(
        h.causes(),
        [
            Cause::Start,
            Cause::ReplyFailed,
            Cause::RetryDue,
            Cause::StepTimeout,
            Cause::RetryDue,
            Cause::ReplyOk
        ]
    );
    let seqs: Vec<u64> = h.journal.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);

    // The shipped definition retries with jitter: the backoff lies within its band.
    let (mut h, _) = Harness::order();
    h.at(1_000);
    assert_eq!(
        h.fail("s-1:reserve-stock:do:1", "unavailable", true).len(),
        1
    );
    let due = h.timer().unwrap();
    assert!(due > at(1_079) && due <= at(1_100), "{due}");
    h.now = due;
    assert_eq!(
        h.wake()[0],
        "send saga.cmd.inventory.reserve s-1:reserve-stock:do:2"
    );
}

#[test]
fn exhausted_retries_compensate_the_step_only_if_it_may_have_been_applied() {
    let two = EXACT.replace("max-attempts = 3", "max-attempts = 2");

    // Retryable failures leave the pivot uncertain: it is refunded, then `a` is undone.
    let (mut h, _) = Harness::custom(custom(&two, EXACT, "1h"));
    h.ok("s-1:a:do:1");
    assert_eq!(h.at(100).fail("s-1:b:do:1", "flaky", true), ["timer 200ms"]);
    assert_eq!(
        h.at(200).wake(),
        ["send saga.cmd.p2.do-b s-1:b:do:2", "timer 2200ms"]
    );
    assert_eq!(
        h.at(300).fail("s-1:b:do:2", "flaky", true),
        ["send saga.cmd.p2.undo-b s-1:b:undo:1", "timer 2300ms"]
    );
    assert_eq!(h.saga.phase(), Phase::Compensating);
    assert_eq!(
        h.statuses(),
        [
            StepStatus::Succeeded,
            StepStatus::Compensating,
            StepStatus::Pending
        ]
    );
    assert_eq!(
        h.at(400).ok("s-1:b:undo:1"),
        ["send saga.cmd.p1.undo-a s-1:a:undo:1", "timer 1400ms"]
    );
    assert_eq!(h.saga.steps[1].status, StepStatus::Compensated);
    assert_eq!(
        h.at(500).ok("s-1:a:undo:1"),
        [
            "clear timer",
            "publish saga.event.custom.undone",
            "publish saga.event.custom.audit",
            "finish compensated"
        ]
    );
    assert_eq!(
        h.saga.state,
        State::Compensated {
            cause: Failure::new("flaky", "flaky happened", true)
        }
    );
    assert_eq!(
        h.statuses(),
        [
            StepStatus::Compensated,
            StepStatus::Compensated,
            StepStatus::Pending
        ]
    );

    // A definitive failure after a retry: `b` was not applied, only `a` is undone.
    let (mut h, _) = Harness::custom(custom(&two, EXACT, "1h"));
    h.ok("s-1:a:do:1");
    h.at(100).fail("s-1:b:do:1", "flaky", true);
    h.at(200).wake();
    assert_eq!(
        h.at(300).fail("s-1:b:do:2", "declined", false),
        ["send saga.cmd.p1.undo-a s-1:a:undo:1", "timer 1300ms"]
    );
    assert_eq!(
        h.statuses(),
        [
            StepStatus::Compensating,
            StepStatus::Failed,
            StepStatus::Pending
        ]
    );
    h.at(400).ok("s-1:a:undo:1");
    assert_eq!(h.saga.phase(), Phase::Compensated);
    assert_eq!(h.saga.steps[1].compensation_attempts, 0);

    // A definitive failure is not retried even with attempts left.
    let (mut h, _) = Harness::custom(custom(EXACT, EXACT, "1h"));
    h.ok("s-1:a:do:1");
    assert_eq!(
        h.fail("s-1:b:do:1", "declined", false),
        ["send saga.cmd.p1.undo-a s-1:a:undo:1", "timer 1000ms"]
    );

    // The first step failing definitively leaves nothing to undo.
    let (mut h, _) = Harness::custom(custom(EXACT, EXACT, "1h"));
    assert_eq!(
        h.at(50).fail("s-1:a:do:1", "out_of_stock", false),
        [
            "clear timer",
            "publish saga.event.custom.undone",
            "publish saga.event.custom.audit",
            "finish compensated"
        ]
    );
    assert_eq!(
        h.statuses(),
        [StepStatus::Failed, StepStatus::Pending, StepStatus::Pending]
    );
    assert_eq!(h.saga.steps[0].compensation_attempts, 0);

    // The first step exhausting retryable failures is undone itself.
    let one = EXACT.replace("max-attempts = 3", "max-attempts = 1");
    let (mut h, _) = Harness::custom(custom(&one, EXACT, "1h"));
    assert_eq!(
        h.at(50).fail("s-1:a:do:1", "flaky", true),
        ["send saga.cmd.p1.undo-a s-1:a:undo:1", "timer 1050ms"]
    );
}

#[test]
fn a_timed_out_step_is_compensated_in_reverse_order() {
    let one = EXACT.replace("max-attempts = 3", "max-attempts = 1");
    let (mut h, _) = Harness::custom(custom(&one, EXACT, "1h"));
    assert_eq!(
        h.ok("s-1:a:do:1"),
        ["send saga.cmd.p2.do-b s-1:b:do:1", "timer 2000ms"]
    );
    assert_eq!(h.at(1_999).reject(Input::Wake), Rejected::NotDue);
    h.at(2_000);
    let timeout = h.apply(Input::Wake).unwrap();
    assert_eq!(
        describe(&timeout.actions),
        ["send saga.cmd.p2.undo-b s-1:b:undo:1", "timer 4000ms"]
    );
    assert_eq!(timeout.entry.cause, Cause::StepTimeout);
    assert_eq!(timeout.entry.step.as_deref(), Some("b"));
    assert_eq!(timeout.entry.command_id.as_deref(), Some("s-1:b:do:1"));
    assert_eq!(
        timeout.entry.error.as_deref(),
        Some("timeout: no reply within 2s")
    );
    assert_eq!(
        (timeout.entry.from, timeout.entry.to),
        (Some(Phase::Running), Phase::Compensating)
    );
    assert_eq!(
        h.saga.steps[1].last_error.as_ref().map(|e| e.code.as_str()),
        Some("timeout")
    );

    // The late success of the timed-out command changes nothing: the refund stands.
    assert_eq!(
        h.at(2_500).reject(reply("s-1:b:do:1", ok())),
        Rejected::Stale
    );
    assert_eq!(
        h.reject(reply("s-1:b:do:1", failed("x", false))),
        Rejected::Stale
    );

    assert_eq!(
        h.at(3_100).ok("s-1:b:undo:1"),
        ["send saga.cmd.p1.undo-a s-1:a:undo:1", "timer 4100ms"]
    );
    assert_eq!(
        h.at(3_200).ok("s-1:a:undo:1"),
        [
            "clear timer",
            "publish saga.event.custom.undone",
            "publish saga.event.custom.audit",
            "finish compensated"
        ]
    );
    assert_eq!(
        h.saga.state,
        State::Compensated {
            cause: Failure::new("timeout", "no reply within 2s", true)
        }
    );
    assert_eq!(
        h.causes(),
        [
            Cause::Start,
            Cause::ReplyOk,
            Cause::StepTimeout,
            Cause::ReplyOk,
            Cause::ReplyOk
        ]
    );

    // The shipped definition: three charge attempts time out, then refund, then release.
    let (mut h, _) = Harness::order();
    h.ok("s-1:reserve-stock:do:1");
    let mut sent = Vec::new();
    for attempt in 1..=3 {
        assert_eq!(h.timer(), Some(h.now + Duration::seconds(10)));
        h.now = h.timer().unwrap();
        let actions = h.wake();
        if attempt < 3 {
            assert_eq!(actions.len(), 1, "only the backoff timer: {actions:?}");
            h.now = h.timer().unwrap();
            let resend = h.wake();
            sent.push(resend[0].clone());
        } else {
            sent.push(actions[0].clone());
        }
    }
    assert_eq!(
        sent,
        [
            "send saga.cmd.payment.charge s-1:take-payment:do:2",
            "send saga.cmd.payment.charge s-1:take-payment:do:3",
            "send saga.cmd.payment.refund s-1:take-payment:undo:1",
        ]
    );
    assert_eq!(
        h.ok("s-1:take-payment:undo:1")[0],
        "send saga.cmd.inventory.release s-1:reserve-stock:undo:1"
    );
    assert_eq!(
        h.ok("s-1:reserve-stock:undo:1")[1],
        "publish saga.event.order.cancelled"
    );
}

#[test]
fn duplicate_stale_and_unknown_replies_change_nothing() {
    let (mut h, _) = Harness::order();
    h.at(1_000).ok("s-1:reserve-stock:do:1");
    // The answered step's reply again: its step is no longer current.
    assert_eq!(
        h.reject(reply("s-1:reserve-stock:do:1", ok())),
        Rejected::Stale
    );
    assert_eq!(
        h.reject(reply("s-1:reserve-stock:do:1", failed("late", false))),
        Rejected::Stale
    );

    h.at(2_000)
        .fail("s-1:take-payment:do:1", "gateway_busy", true);
    let waiting = h.saga.clone();
    let rejected = [
        // Answered already (it is in backoff).
        (
            reply("s-1:take-payment:do:1", failed("gateway_busy", true)),
            Rejected::Duplicate,
        ),
        (reply("s-1:take-payment:do:1", ok()), Rejected::Duplicate),
        // Not sent yet, or another direction or step.
        (reply("s-1:take-payment:do:2", ok()), Rejected::Stale),
        (reply("s-1:take-payment:do:0", ok()), Rejected::Stale),
        (reply("s-1:take-payment:undo:1", ok()), Rejected::Stale),
        (reply("s-1:reserve-stock:undo:1", ok()), Rejected::Stale),
        (reply("s-1:confirm-order:do:1", ok()), Rejected::Stale),
        // Not this saga's, or not a command id at all.
        (
            reply("s-2:take-payment:do:1", ok()),
            Rejected::UnknownCommand("command s-2:take-payment:do:1 is not of saga s-1".into()),
        ),
        (
            reply("s-1:ship-it:do:1", ok()),
            Rejected::UnknownCommand("no step \"ship-it\" in order-creation".into()),
        ),
        (
            reply("garbage", ok()),
            Rejected::UnknownCommand("invalid command id \"garbage\"".into()),
        ),
        (
            reply("s-1:take-payment:redo:1", ok()),
            Rejected::UnknownCommand("invalid command id \"s-1:take-payment:redo:1\"".into()),
        ),
        // A wake before the backoff ends.
        (Input::Wake, Rejected::NotDue),
    ];
    for (input, expected) in rejected {
        assert_eq!(h.reject(input.clone()), expected, "{input:?}");
        assert_eq!(h.saga, waiting);
    }

    let dup = reply("s-1:take-payment:do:1", ok());
    let entry = h.saga.ignored_entry(&dup, &Rejected::Duplicate, at(2_001));
    assert_eq!(
        entry,
        Entry {
            seq: 3,
            at: at(2_001),
            actor: Actor::Orchestrator,
            cause: Cause::Ignored,
            step: Some("take-payment".into()),
            command_id: Some("s-1:take-payment:do:1".into()),
            from: Some(Phase::Running),
            to: Phase::Running,
            error: Some("duplicate reply".into()),
            operator: None,
        }
    );
    let garbage = h
        .saga
        .ignored_entry(&reply("garbage", ok()), &Rejected::Stale, at(2_001));
    assert_eq!(
        (garbage.step, garbage.command_id.as_deref()),
        (None, Some("garbage"))
    );

    // The wrong definition is refused before anything else.
    let other = custom(EXACT, EXACT, "1h");
    let before = h.saga.clone();
    assert_eq!(
        h.saga.apply(&other, Input::Wake, at(10_000)),
        Err(Rejected::WrongDefinition("order-creation v1".into()))
    );
    assert_eq!(h.saga, before);

    // After the retry goes out, duplicates of its own reply are stale once the step moved on.
    h.now = h.timer().unwrap();
    h.wake();
    h.ok("s-1:take-payment:do:2");
    for id in ["s-1:take-payment:do:2", "s-1:take-payment:do:1"] {
        assert_eq!(h.reject(reply(id, ok())), Rejected::Stale);
    }
    assert_eq!(h.saga.phase(), Phase::Running);
    assert_eq!(h.saga.transitions, 5);
}

#[test]
fn a_refusal_past_the_pivot_parks_the_saga_until_an_operator_retries_the_step() {
    let (mut h, _) = Harness::order();
    h.ok("s-1:reserve-stock:do:1");
    h.ok("s-1:take-payment:do:1");
    // Retrying what the participant refused for good would repeat the refusal
    // forever: the saga parks, with no timer.
    let parked = h.fail("s-1:confirm-order:do:1", "invalid_state", false);
    assert_eq!(parked, ["clear timer", "park confirm-order"]);
    let refusal = Failure::new("invalid_state", "invalid_state happened", false);
    assert_eq!(
        h.saga.state,
        State::Failed {
            step: 2,
            error: refusal.clone(),
            cause: refusal,
            forward: true,
        }
    );
    assert_eq!(h.timer(), None);
    assert_eq!(h.saga.steps[2].status, StepStatus::Failed);
    // Nothing is compensated past the pivot, and an abort is refused.
    assert_eq!(h.saga.steps[1].compensation_attempts, 0);
    assert!(matches!(h.reject(abort("no")), Rejected::NotAllowed(_)));
    // The operator fixed the cause: a retry sends the step again, and it completes.
    let retried = h.step(Input::Retry {
        operator: "ana".into(),
    });
    assert_eq!(
        retried[0],
        "send saga.cmd.inventory.commit s-1:confirm-order:do:2"
    );
    assert_eq!(h.saga.phase(), Phase::Running);
    assert_eq!(
        h.ok("s-1:confirm-order:do:2"),
        [
            "clear timer",
            "publish saga.event.order.confirmed",
            "finish completed"
        ]
    );
}

#[test]
fn retriable_steps_retry_until_they_succeed_and_ignore_the_deadline() {
    let (mut h, _) = Harness::order();
    h.ok("s-1:reserve-stock:do:1");
    h.at(1_000).ok("s-1:take-payment:do:1");
    assert_eq!(
        h.saga.state,
        State::Running {
            step: 2,
            wait: Wait::Reply {
                attempt: 1,
                timeout_at: at(11_000)
            }
        }
    );

    // Twelve failures of every kind, running far past the five-minute deadline.
    for attempt in 1..=12u32 {
        let id = format!("s-1:confirm-order:do:{attempt}");
        let actions = match attempt % 3 {
            0 => {
                h.now = h.timer().unwrap();
                h.wake()
            }
            1 => h.fail(&id, "locked", true),
            _ => h.fail(&id, "unavailable", true),
        };
        assert_eq!(actions.len(), 1, "a backoff timer only: {actions:?}");
        assert_eq!(h.saga.phase(), Phase::Running);
        assert!(matches!(
            h.saga.state,
            State::Running {
                step: 2,
                wait: Wait::Backoff { .. }
            }
        ));
        // Past the pivot an abort is refused, and the deadline does not bound the timer.
        assert!(matches!(
            h.reject(abort("too slow")),
            Rejected::NotAllowed(_)
        ));
        if attempt == 6 {
            h.now = at(600_000);
        }
        let due = h.timer().unwrap();
        h.now = h.now.max(due);
        let next = format!(
            "send saga.cmd.inventory.commit s-1:confirm-order:do:{}",
            attempt + 1
        );
        assert_eq!(h.wake()[0], next);
        assert_eq!(
            h.timer(),
            Some(h.now + Duration::seconds(10)),
            "the step's own timeout, not the deadline"
        );
    }
    assert!(h.now > h.saga.deadline_at);
    assert_eq!(h.saga.steps[2].attempts, 13);
    assert_eq!(h.saga.steps[1].compensation_attempts, 0);
    assert_eq!(h.saga.steps[0].compensation_attempts, 0);
    assert!(!h.causes().contains(&Cause::Deadline));
    assert_eq!(
        h.ok("s-1:confirm-order:do:13"),
        [
            "clear timer",
            "publish saga.event.order.confirmed",
            "finish completed"
        ]
    );
    assert_eq!(h.statuses(), [const { StepStatus::Succeeded }; 3]);
}

#[test]
fn the_deadline_compensates_a_saga_before_its_pivot() {
    // The timer is the deadline when it comes before the step's timeout.
    let (mut h, start) = Harness::custom(custom(EXACT, EXACT, "1500ms"));
    assert_eq!(describe(&start.actions)[1], "timer 1000ms");
    assert_eq!(
        h.at(200).ok("s-1:a:do:1"),
        ["send saga.cmd.p2.do-b s-1:b:do:1", "timer 1500ms"]
    );
    assert_eq!(h.at(1_499).reject(Input::Wake), Rejected::NotDue);
    h.at(1_500);
    let deadline = h.apply(Input::Wake).unwrap();
    // The pivot's command is out, so it may have landed: refund it, then undo `a`.
    assert_eq!(
        describe(&deadline.actions),
        ["send saga.cmd.p2.undo-b s-1:b:undo:1", "timer 3500ms"]
    );
    assert_eq!(deadline.entry.cause, Cause::Deadline);
    assert_eq!(deadline.entry.step.as_deref(), Some("b"));
    assert_eq!(deadline.entry.command_id, None);
    assert_eq!(
        deadline.entry.error.as_deref(),
        Some("deadline_exceeded: the saga deadline passed before the pivot")
    );
    // Compensations are not bound by the deadline.
    assert_eq!(h.at(3_500).wake(), ["timer 3600ms"]);
    assert_eq!(
        h.at(3_600).wake(),
        ["send saga.cmd.p2.undo-b s-1:b:undo:2", "timer 5600ms"]
    );
    assert_eq!(h.reject(reply("s-1:b:do:1", ok())), Rejected::Stale);
    assert_eq!(
        h.ok("s-1:b:undo:2"),
        ["send saga.cmd.p1.undo-a s-1:a:undo:1", "timer 4600ms"]
    );
    h.ok("s-1:a:undo:1");
    assert_eq!(
        h.saga.state,
        State::Compensated {
            cause: Failure::new(
                "deadline_exceeded",
                "the saga deadline passed before the pivot",
                false
            )
        }
    );
    assert_eq!(
        h.causes(),
        [
            Cause::Start,
            Cause::ReplyOk,
            Cause::Deadline,
            Cause::StepTimeout,
            Cause::RetryDue,
            Cause::ReplyOk,
            Cause::ReplyOk
        ]
    );

    // The deadline also cuts a backoff short, and a wake long after it still compensates.
    let (mut h, _) = Harness::custom(custom(EXACT, EXACT, "500ms"));
    assert_eq!(h.at(100).fail("s-1:a:do:1", "busy", true), ["timer 200ms"]);
    assert_eq!(
        h.at(200).wake(),
        ["send saga.cmd.p1.do-a s-1:a:do:2", "timer 500ms"]
    );
    assert_eq!(
        h.at(900).wake(),
        ["send saga.cmd.p1.undo-a s-1:a:undo:1", "timer 1900ms"]
    );
    assert_eq!(h.journal.last().unwrap().cause, Cause::Deadline);
    assert_eq!(h.saga.steps[0].attempts, 2);
}

#[test]
fn a_compensation_that_keeps_failing_parks_the_saga_until_an_operator_retries() {
    let comp = EXACT.replace("max-attempts = 3", "max-attempts = 2");
    let one = EXACT.replace("max-attempts = 3", "max-attempts = 1");
    let (mut h, _) = Harness::custom(custom(&one, &comp, "1h"));
    h.ok("s-1:a:do:1");
    assert_eq!(
        h.at(100).fail("s-1:b:do:1", "declined", false),
        ["send saga.cmd.p1.undo-a s-1:a:undo:1", "timer 1100ms"]
    );
    let cause = Failure::new("declined", "declined happened", false);

    // A compensation is retried even when its failure says it is not retryable.
    assert_eq!(
        h.at(200).fail("s-1:a:undo:1", "locked", false),
        ["timer 300ms"]
    );
    assert_eq!(
        h.saga.state,
        State::Compensating {
            step: 0,
            wait: Wait::Backoff {
                attempt: 1,
                until: at(300)
            },
            first_attempt: 1,
            cause: cause.clone()
        }
    );
    assert_eq!(
        h.at(300).wake(),
        ["send saga.cmd.p1.undo-a s-1:a:undo:2", "timer 1300ms"]
    );
    h.at(400);
    let parked = h
        .apply(reply("s-1:a:undo:2", failed("locked", true)))
        .unwrap();
    assert_eq!(describe(&parked.actions), ["clear timer", "park a"]);
    assert_eq!(
        (parked.entry.from, parked.entry.to),
        (Some(Phase::Compensating), Phase::Failed)
    );
    assert_eq!(
        parked.entry.error.as_deref(),
        Some("locked: locked happened")
    );
    let last_error = Failure::new("locked", "locked happened", true);
    assert_eq!(
        h.saga.state,
        State::Failed {
            step: 0,
            error: last_error.clone(),
            cause: cause.clone(),
            forward: false,
        }
    );
    assert_eq!(
        h.statuses(),
        [
            StepStatus::CompensationFailed,
            StepStatus::Failed,
            StepStatus::Pending
        ]
    );
    assert_eq!(h.saga.steps[0].last_error, Some(last_error));
    assert_eq!(h.timer(), None);

    // Parked: replies (but a late success of the last attempt, see
    // `a_late_success_of_the_last_compensation_attempt_compensates_a_failed_saga`),
    // timers and aborts do nothing; only an operator retry moves it.
    assert_eq!(
        h.at(5_000)
            .reject(reply("s-1:a:undo:2", failed("locked", true))),
        Rejected::Stale
    );
    assert_eq!(h.reject(reply("s-1:a:undo:1", ok())), Rejected::Stale);
    assert_eq!(h.reject(reply("s-1:a:undo:3", ok())), Rejected::Stale);
    assert_eq!(h.reject(Input::Wake), Rejected::NotDue);
    assert!(matches!(
        h.reject(abort("give up")),
        Rejected::NotAllowed(_)
    ));

    let retry = h
        .apply(Input::Retry {
            operator: "ana".into(),
        })
        .unwrap();
    assert_eq!(
        describe(&retry.actions),
        ["send saga.cmd.p1.undo-a s-1:a:undo:3", "timer 6000ms"]
    );
    assert_eq!(command(&retry).attempt, 3);
    assert_eq!(retry.entry.actor, Actor::Operator);
    assert_eq!(retry.entry.operator.as_deref(), Some("ana"));
    assert_eq!(retry.entry.cause, Cause::OperatorRetry);
    assert_eq!(retry.entry.step.as_deref(), Some("a"));
    assert_eq!(
        (retry.entry.from, retry.entry.to),
        (Some(Phase::Failed), Phase::Compensating)
    );
    assert_eq!(
        h.saga.state,
        State::Compensating {
            step: 0,
            wait: Wait::Reply {
                attempt: 3,
                timeout_at: at(6_000)
            },
            first_attempt: 3,
            cause: cause.clone()
        }
    );
    assert!(matches!(
        h.reject(Input::Retry {
            operator: "ana".into(),
        }),
        Rejected::NotAllowed(_)
    ));
    assert!(matches!(h.reject(abort("again")), Rejected::NotAllowed(_)));

    // A fresh budget: one more failure is retried again.
    assert_eq!(
        h.at(5_100).fail("s-1:a:undo:3", "locked", true),
        ["timer 5200ms"]
    );
    assert_eq!(
        h.at(5_200).wake(),
        ["send saga.cmd.p1.undo-a s-1:a:undo:4", "timer 6200ms"]
    );
    assert_eq!(
        h.at(5_300).ok("s-1:a:undo:4"),
        [
            "clear timer",
            "publish saga.event.custom.undone",
            "publish saga.event.custom.audit",
            "finish compensated"
        ]
    );
    assert_eq!(h.saga.state, State::Compensated { cause });
    assert_eq!(h.saga.steps[0].compensation_attempts, 4);
    assert_eq!(h.saga.steps[0].status, StepStatus::Compensated);

    let journal: Vec<_> = h
        .journal
        .iter()
        .map(|e| (e.seq, e.cause, e.actor, e.from, e.to, e.error.is_some()))
        .collect();
    use Actor::{Operator as Op, Orchestrator as Orch};
    use Phase::{Compensated as Cd, Compensating as Cg, Failed as F, Running as R};
    assert_eq!(
        journal,
        [
            (1, Cause::Start, Orch, None, R, false),
            (2, Cause::ReplyOk, Orch, Some(R), R, false),
            (3, Cause::ReplyFailed, Orch, Some(R), Cg, true),
            (4, Cause::ReplyFailed, Orch, Some(Cg), Cg, true),
            (5, Cause::RetryDue, Orch, Some(Cg), Cg, false),
            (6, Cause::ReplyFailed, Orch, Some(Cg), F, true),
            (7, Cause::OperatorRetry, Op, Some(F), Cg, false),
            (8, Cause::ReplyFailed, Orch, Some(Cg), Cg, true),
            (9, Cause::RetryDue, Orch, Some(Cg), Cg, false),
            (10, Cause::ReplyOk, Orch, Some(Cg), Cd, false),
        ]
    );

    // The shipped definition gives a compensation eight attempts, timeouts included.
    let (mut h, _) = Harness::order();
    h.ok("s-1:reserve-stock:do:1");
    h.fail("s-1:take-payment:do:1", "card_declined", false);
    for attempt in 1..=8 {
        let id = format!("s-1:reserve-stock:undo:{attempt}");
        let actions = if attempt % 2 == 0 {
            h.fail(&id, "db_down", true)
        } else {
            h.now = h.timer().unwrap();
            h.wake()
        };
        if attempt < 8 {
            assert_eq!(actions.len(), 1, "{actions:?}");
            h.now = h.timer().unwrap();
            assert_eq!(
                h.wake()[0],
                format!(
                    "send saga.cmd.inventory.release s-1:reserve-stock:undo:{}",
                    attempt + 1
                )
            );
        } else {
            assert_eq!(actions, ["clear timer", "park reserve-stock"]);
        }
    }
    assert!(
        matches!(&h.saga.state, State::Failed { step: 0, error, .. } if error.code == "db_down")
    );
    assert_eq!(
        h.step(Input::Retry {
            operator: "ana".into(),
        })[0],
        "send saga.cmd.inventory.release s-1:reserve-stock:undo:9"
    );
    assert_eq!(
        h.ok("s-1:reserve-stock:undo:9")[1],
        "publish saga.event.order.cancelled"
    );
}

/// Issue 10 hole 14: the last compensation attempt timed out (or failed) and
/// parked the saga; its success arrives afterwards. The compensation did
/// happen, so the saga goes on as if the reply had come in time: the next step
/// down is compensated, or the saga is compensated, journaled as a `ReplyOk`
/// from `failed`. Earlier attempts, other steps, later failures and forward
/// replies stay stale.
#[test]
fn a_late_success_of_the_last_compensation_attempt_compensates_a_failed_saga() {
    let comp = EXACT.replace("max-attempts = 3", "max-attempts = 2");
    let one = EXACT.replace("max-attempts = 3", "max-attempts = 1");
    let (mut h, _) = Harness::custom(custom(&one, &comp, "1h"));
    h.ok("s-1:a:do:1");
    h.at(100).fail("s-1:b:do:1", "declined", false);
    let cause = Failure::new("declined", "declined happened", false);
    h.at(200).fail("s-1:a:undo:1", "locked", true);
    h.at(300).wake();
    // The second (last) attempt times out: parked.
    h.now = h.timer().unwrap();
    assert_eq!(h.wake(), ["clear timer", "park a"]);
    assert!(matches!(
        h.saga.state,
        State::Failed {
            step: 0,
            forward: false,
            ..
        }
    ));

    let cases: [(&str, Outcome); 5] = [
        ("s-1:a:undo:1", ok()),
        ("s-1:a:undo:2", failed("locked", true)),
        ("s-1:a:undo:3", ok()),
        ("s-1:a:do:1", ok()),
        ("s-1:b:undo:2", ok()),
    ];
    for (id, outcome) in cases {
        assert_eq!(h.reject(reply(id, outcome)), Rejected::Stale, "{id}");
    }

    let late = h.at(5_000).apply(reply("s-1:a:undo:2", ok())).unwrap();
    assert_eq!(
        describe(&late.actions),
        [
            "publish saga.event.custom.undone",
            "publish saga.event.custom.audit",
            "finish compensated"
        ]
    );
    assert_eq!(late.entry.cause, Cause::ReplyOk);
    assert_eq!(
        (late.entry.from, late.entry.to),
        (Some(Phase::Failed), Phase::Compensated)
    );
    assert_eq!(h.saga.state, State::Compensated { cause });
    assert_eq!(h.saga.steps[0].status, StepStatus::Compensated);
    assert_eq!(h.saga.steps[0].finished_at, Some(at(5_000)));
    assert_eq!(h.timer(), None);
    // Once: the same reply again is a reply to a finished saga.
    assert_eq!(h.reject(reply("s-1:a:undo:2", ok())), Rejected::Finished);
}

#[test]
fn operator_abort_and_retry_only_where_they_make_sense() {
    // Retry needs a failed saga; abort before the pivot undoes the step whose command is out.
    let (mut h, _) = Harness::order();
    let refused = h.reject(Input::Retry {
        operator: "ana".into(),
    });
    assert_eq!(
        refused,
        Rejected::NotAllowed("only a failed saga can be retried; this one is running".into())
    );
    h.at(500);
    let aborted = h.apply(abort("customer changed their mind")).unwrap();
    assert_eq!(
        describe(&aborted.actions),
        [
            "send saga.cmd.inventory.release s-1:reserve-stock:undo:1",
            "timer 10500ms"
        ]
    );
    assert_eq!(aborted.entry.actor, Actor::Operator);
    assert_eq!(aborted.entry.operator.as_deref(), Some("ana"));
    assert_eq!(aborted.entry.cause, Cause::OperatorAbort);
    assert_eq!(
        aborted.entry.error.as_deref(),
        Some("aborted: customer changed their mind")
    );
    assert_eq!(
        (aborted.entry.from, aborted.entry.to),
        (Some(Phase::Running), Phase::Compensating)
    );
    assert!(matches!(h.reject(abort("twice")), Rejected::NotAllowed(_)));
    assert!(matches!(
        h.reject(Input::Retry {
            operator: "ana".into(),
        }),
        Rejected::NotAllowed(_)
    ));
    assert_eq!(
        h.reject(reply("s-1:reserve-stock:do:1", ok())),
        Rejected::Stale
    );
    h.ok("s-1:reserve-stock:undo:1");
    assert_eq!(
        h.saga.state,
        State::Compensated {
            cause: Failure::new("aborted", "customer changed their mind", false)
        }
    );

    // Abort at the pivot: refund, then release.
    let (mut h, _) = Harness::order();
    h.ok("s-1:reserve-stock:do:1");
    assert_eq!(
        h.step(abort("fraud"))[0],
        "send saga.cmd.payment.refund s-1:take-payment:undo:1"
    );
    assert_eq!(
        h.ok("s-1:take-payment:undo:1")[0],
        "send saga.cmd.inventory.release s-1:reserve-stock:undo:1"
    );

    // Abort during a backoff: the failed attempt may have landed too.
    let (mut h, _) = Harness::order();
    h.fail("s-1:reserve-stock:do:1", "busy", true);
    assert_eq!(
        h.step(abort("stop"))[0],
        "send saga.cmd.inventory.release s-1:reserve-stock:undo:1"
    );

    // Past the pivot, abort is refused and the saga goes on.
    let (mut h, _) = Harness::order();
    h.ok("s-1:reserve-stock:do:1");
    h.ok("s-1:take-payment:do:1");
    assert_eq!(
        h.reject(abort("too late")),
        Rejected::NotAllowed("the saga is past its pivot and can no longer be compensated".into())
    );
    assert!(matches!(h.saga.state, State::Running { step: 2, .. }));
}

#[test]
fn nothing_happens_after_a_terminal_state() {
    let (mut completed, _) = Harness::order();
    completed.ok("s-1:reserve-stock:do:1");
    completed.ok("s-1:take-payment:do:1");
    completed.ok("s-1:confirm-order:do:1");

    let (mut compensated, _) = Harness::order();
    compensated.fail("s-1:reserve-stock:do:1", "out_of_stock", false);
    assert_eq!(compensated.saga.phase(), Phase::Compensated);

    for h in [&mut completed, &mut compensated] {
        assert!(h.saga.phase().is_finished());
        h.at(1_000_000);
        let inputs = [
            reply("s-1:reserve-stock:do:1", ok()),
            reply("s-1:confirm-order:do:1", ok()),
            reply("s-1:confirm-order:do:2", failed("x", true)),
            reply("s-1:reserve-stock:undo:1", ok()),
            reply("garbage", ok()),
            Input::Wake,
            Input::Retry {
                operator: "ana".into(),
            },
            abort("late"),
        ];
        for input in inputs {
            assert_eq!(h.reject(input), Rejected::Finished);
        }
    }
}

#[test]
fn start_validates_the_input() {
    let def = order();
    let mut bad = order_input();
    bad["email"] = json!("not-an-email");
    let err = Saga::start(&def, "s-1".into(), "k".into(), bad, None, t0()).unwrap_err();
    assert_eq!(err.violations.len(), 1, "{err}");
    assert_eq!(err.violations[0].path, "/email", "{err}");
    let err = Saga::start(
        &def,
        "s-1".into(),
        "k".into(),
        json!({"customer_id": "c"}),
        None,
        t0(),
    )
    .unwrap_err();
    // Every missing field is named at once.
    for field in ["email", "items", "amount_cents", "currency", "card_token"] {
        assert!(
            err.violations
                .iter()
                .any(|v| v.reason == format!("\"{field}\" is a required property")),
            "{field}: {err}"
        );
    }

    let object = custom(EXACT, EXACT, "1h");
    assert!(Saga::start(&object, "s-1".into(), "k".into(), json!([1, 2]), None, t0()).is_err());
    let (saga, start) = Saga::start(
        &object,
        "s-9".into(),
        "k".into(),
        json!({}),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        t0(),
    )
    .unwrap();
    assert_eq!(
        saga.traceparent.as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(
        (saga.saga_type.as_str(), saga.version, saga.key.as_str()),
        ("custom", 1, "k")
    );
    assert_eq!(command(&start).command_id, "s-9:a:do:1");
    assert_eq!(saga.deadline_at, at(3_600_000));
}

#[test]
fn a_reply_after_the_deadline_compensates_instead_of_going_on() {
    use jetsaga_sagas::{Action, Input, Phase, Saga};
    let def = order();
    let t0 = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let input = serde_json::json!({"customer_id": "c", "email": "a@b.co", "items": [{"sku": "s", "quantity": 1}],
        "amount_cents": 1, "currency": "EUR", "card_token": "t"});
    let (mut saga, _) = Saga::start(&def, "s".into(), "k".into(), input, None, t0).unwrap();
    let late = t0 + chrono::Duration::minutes(6);
    let reply = Input::Reply {
        command_id: "s:reserve-stock:do:1".into(),
        outcome: jetsaga_sagas::protocol::Outcome::Ok {
            result: serde_json::json!({}),
        },
    };
    let t = saga.apply(&def, reply, late).unwrap();
    let sent: Vec<_> = t
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { command, .. } => Some(command.command_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        sent,
        vec!["s:reserve-stock:undo:1"],
        "no charge after the deadline"
    );
    assert_eq!(saga.phase(), Phase::Compensating);
}

/// `custom` with a result schema on steps `a` and `c`.
fn with_result_schemas() -> Definition {
    def_from(
        r#"
name = "checked"
version = 1
deadline = "1h"
compensation-retry = { max-attempts = 2, initial-backoff = "100ms", max-backoff = "100ms", jitter = 0.0 }

[input-schema]
type = "object"
required = ["n"]

[[steps]]
name = "a"
participant = "p1"
action = "do-a"
compensation = "undo-a"
kind = "compensatable"
timeout = "1s"
retry = { max-attempts = 3, initial-backoff = "100ms", max-backoff = "100ms", jitter = 0.0 }
result-schema = { type = "object", required = ["reservation"], properties.reservation = { type = "string" } }

[[steps]]
name = "b"
participant = "p2"
action = "do-b"
kind = "pivot"
timeout = "1s"

[[steps]]
name = "c"
participant = "p3"
action = "do-c"
kind = "retriable"
timeout = "1s"
retry = { initial-backoff = "100ms", max-backoff = "100ms", jitter = 0.0 }
result-schema = { type = "object", required = ["done"] }
"#,
    )
}

#[test]
fn a_result_that_breaks_its_schema_is_a_failure_of_a_step_that_may_be_applied() {
    let def = with_result_schemas();
    let bad_input = Saga::start(&def, "s-1".into(), "k".into(), json!({}), None, t0()).unwrap_err();
    assert_eq!(bad_input.violations.len(), 1);

    // Step a answers ok with a result missing `reservation`: not retried (a
    // participant answers the same again), and undone since it may be applied.
    let (mut h, _) = Harness::custom(def.clone());
    h.at(100);
    let actions = h.step(reply(
        "s-1:a:do:1",
        Outcome::Ok {
            result: json!({"reservation": 7}),
        },
    ));
    assert_eq!(
        actions,
        ["send saga.cmd.p1.undo-a s-1:a:undo:1", "timer 1100ms"]
    );
    assert_eq!(h.statuses()[0], StepStatus::Compensating);
    assert_eq!(
        h.saga.steps[0].result, None,
        "an invalid result is not kept"
    );
    let entry = h.journal.last().unwrap();
    assert_eq!(entry.cause, Cause::ReplyFailed);
    let error = entry.error.as_deref().unwrap();
    assert!(
        error.starts_with(
            "invalid_result: the result breaks the step's result schema: /reservation: 7 is not of type \"string\""
        ),
        "{error}"
    );
    let State::Compensating { cause, .. } = &h.saga.state else {
        panic!("{:?}", h.saga.state)
    };
    assert_eq!(cause.code, "invalid_result");
    assert!(!cause.retryable);
    // A compensation's result is not checked against the forward result schema.
    assert_eq!(h.ok("s-1:a:undo:1"), ["clear timer", "finish compensated"]);

    // A valid result is kept; a retriable step with a bad result is retried.
    let (mut h, _) = Harness::custom(def);
    h.step(reply(
        "s-1:a:do:1",
        Outcome::Ok {
            result: json!({"reservation": "r-1"}),
        },
    ));
    assert_eq!(h.saga.steps[0].result, Some(json!({"reservation": "r-1"})));
    h.ok("s-1:b:do:1");
    h.at(10);
    assert_eq!(h.ok("s-1:c:do:1"), ["timer 110ms"]);
    assert!(matches!(
        h.saga.state,
        State::Running {
            step: 2,
            wait: Wait::Backoff { attempt: 1, .. }
        }
    ));
    h.at(110);
    assert_eq!(
        h.wake(),
        ["send saga.cmd.p3.do-c s-1:c:do:2", "timer 1110ms"]
    );
    let done = h.step(reply(
        "s-1:c:do:2",
        Outcome::Ok {
            result: json!({"done": true}),
        },
    ));
    assert_eq!(done, ["clear timer", "finish completed"]);
}

#[test]
fn a_failed_saga_is_parked_not_finished() {
    assert_eq!(
        Phase::ALL.map(Phase::is_finished),
        [false, false, true, true, false]
    );
    assert_eq!(Phase::Completed.end(), Some(jetsaga_sagas::End::Completed));
    assert_eq!(Phase::Failed.end(), None);

    let (mut h, _) = Harness::custom(custom(EXACT, "max-attempts = 1", "1h"));
    h.fail("s-1:a:do:1", "no", false);
    assert!(h.saga.phase().is_finished(), "nothing to undo: compensated");

    let (mut h, _) = Harness::custom(custom(EXACT, "max-attempts = 1", "1h"));
    h.ok("s-1:a:do:1");
    assert_eq!(
        h.fail("s-1:b:do:1", "declined", false),
        ["send saga.cmd.p1.undo-a s-1:a:undo:1", "timer 1000ms"]
    );
    assert_eq!(
        h.fail("s-1:a:undo:1", "locked", false),
        ["clear timer", "park a"]
    );
    assert_eq!(h.saga.phase(), Phase::Failed);
    assert!(!h.saga.phase().is_finished());
    // Parked: no timer, nothing happens by itself, but it is not finished either.
    assert_eq!(h.timer(), None);
    assert_eq!(h.reject(Input::Wake), Rejected::NotDue);
    assert_eq!(h.reject(reply("s-1:a:undo:1", ok())), Rejected::Stale);
    assert_eq!(
        h.step(Input::Retry {
            operator: "ana".into(),
        }),
        ["send saga.cmd.p1.undo-a s-1:a:undo:2", "timer 1000ms"]
    );
    assert_eq!(
        h.ok("s-1:a:undo:2"),
        [
            "clear timer",
            "publish saga.event.custom.undone",
            "publish saga.event.custom.audit",
            "finish compensated"
        ]
    );
    assert_eq!(
        h.reject(Input::Retry {
            operator: "ana".into(),
        }),
        Rejected::Finished
    );
}

/// Found by the `record` fuzz target: a stored saga whose state names a step the definition
/// does not have (a corrupt journal record) made `next_timer` and `apply` index out of
/// bounds and panic the driver. Now the timer is read without the step's kind and every
/// input is refused as a definition mismatch, leaving the saga unchanged.
#[test]
fn a_stored_state_naming_a_missing_step_is_refused_not_a_panic() {
    let (mut h, _) = Harness::order();
    let State::Running { wait, .. } = h.saga.state.clone() else {
        panic!("a started saga runs");
    };
    for state in [
        State::Running {
            step: 3,
            wait: wait.clone(),
        },
        State::Running {
            step: usize::MAX,
            wait,
        },
    ] {
        h.saga.state = state;
        let before = h.saga.clone();
        assert!(h.saga.next_timer(&h.def).is_some());
        assert_eq!(h.saga.current_step(), None);
        for input in [
            Input::Wake,
            reply("s-1:reserve-stock:do:1", ok()),
            abort("corrupt"),
        ] {
            let refused = h.saga.apply(&h.def, input, at(1)).unwrap_err();
            assert!(
                matches!(refused, Rejected::WrongDefinition(_)),
                "{refused:?}"
            );
            assert_eq!(h.saga, before);
        }
    }
}

#[test]
fn a_pivot_without_compensation_that_times_out_parks_instead_of_compensating() {
    let one = EXACT.replace("max-attempts = 3", "max-attempts = 1");
    let text = custom(&one, EXACT, "1h");
    let mut def = text.clone();
    def.steps[1].compensation = None;
    let (mut h, _) = Harness::custom(def);
    h.ok("s-1:a:do:1");
    // The pivot's only attempt gets no reply: it may have been applied, and
    // nothing could undo it, so the steps before it are not compensated.
    let parked = h.at(2_000).wake();
    assert_eq!(parked, ["clear timer", "park b"]);
    assert!(matches!(
        &h.saga.state,
        State::Failed { step: 1, forward: true, error, .. } if error.code == "timeout"
    ));
    assert_eq!(h.saga.steps[1].status, StepStatus::Uncertain);
    assert_eq!(h.saga.steps[0].compensation_attempts, 0);
    assert_eq!(h.timer(), None);
    // A late ok of that attempt is stale; an operator's retry sends the pivot again.
    assert_eq!(h.reject(reply("s-1:b:do:1", ok())), Rejected::Stale);
    let retried = h.step(Input::Retry {
        operator: "ana".into(),
    });
    assert_eq!(retried[0], "send saga.cmd.p2.do-b s-1:b:do:2");
    h.ok("s-1:b:do:2");
    assert_eq!(h.saga.phase(), Phase::Running);

    // A pivot that refuses for good was not applied: the steps before it are
    // compensated as before.
    let mut def = text;
    def.steps[1].compensation = None;
    let (mut h, _) = Harness::custom(def);
    h.ok("s-1:a:do:1");
    let refused = h.fail("s-1:b:do:1", "declined", false);
    assert_eq!(refused[0], "send saga.cmd.p1.undo-a s-1:a:undo:1");
}

/// Found by the `record` fuzz target: a stored compensating saga whose round began at a
/// later attempt than the one it waits on (a corrupt record) made a failed compensation
/// attempt subtract with overflow. Now it is counted as the round's first attempt.
#[test]
fn a_corrupt_compensation_round_is_retried_not_a_panic() {
    let comp = EXACT.replace("max-attempts = 3", "max-attempts = 2");
    let one = EXACT.replace("max-attempts = 3", "max-attempts = 1");
    let (mut h, _) = Harness::custom(custom(&one, &comp, "1h"));
    h.ok("s-1:a:do:1");
    h.at(100).fail("s-1:b:do:1", "declined", false);
    let State::Compensating { first_attempt, .. } = &mut h.saga.state else {
        panic!("{:?}", h.saga.state)
    };
    *first_attempt = 7;
    assert_eq!(
        h.at(200).fail("s-1:a:undo:1", "locked", false),
        ["timer 300ms"]
    );
    assert_eq!(h.saga.phase(), Phase::Compensating);
}
