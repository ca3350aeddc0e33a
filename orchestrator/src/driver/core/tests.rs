//! The scheduler driven with plain values: every input and I/O outcome is fed
//! by hand and each test asserts on the I/O requests that come out, in order.

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use chrono::Duration as Ms;
use jetsaga_sagas::Cause;
use jetsaga_sagas::protocol::{Outcome, Reply, Start, VERSION};
use serde_json::{Value, json};

use super::*;
use crate::store;

/// Messages and callers are numbered; the number says who is settled.
#[derive(Debug)]
struct Test;

impl Handles for Test {
    type Message = u32;
    type StartReply = u32;
    type PhaseReply = u32;
}

const TYPE: &str = "order-creation";

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_225_600, 0).unwrap()
}

fn at(ms: i64) -> DateTime<Utc> {
    t0() + Ms::milliseconds(ms)
}

fn order(card: &str) -> Value {
    json!({"customer_id": "c-1", "email": "ana@example.com",
        "items": [{"sku": "sku-1", "quantity": 1}], "amount_cents": 100,
        "currency": "EUR", "card_token": card})
}

fn core() -> Core<Test> {
    Core::new(
        Arc::new(Registry::builtin()),
        Metrics::new().expect("metrics"),
        std::time::Duration::from_secs(3600),
    )
}

fn def() -> Arc<Definition> {
    Registry::builtin().latest(TYPE).unwrap().clone()
}

fn drain(core: &mut Core<Test>) -> Vec<Io<Test>> {
    std::iter::from_fn(|| core.poll_io()).collect()
}

fn api_start(key: &str, caller: u32) -> Work<Test> {
    Work::Start {
        saga_id: protocol::saga_id(TYPE, key),
        def: def(),
        key: key.to_owned(),
        input: order("tok_ok"),
        traceparent: None,
        requested_at: None,
        origin: Origin::Api(caller),
    }
}

fn api_input(saga_id: &str, input: Input, caller: u32) -> Work<Test> {
    Work::Input {
        saga_id: saga_id.to_owned(),
        input,
        origin: Origin::Api(caller),
    }
}

fn reply_ok(saga_id: &str, step: &str) -> Vec<u8> {
    Reply {
        protocol: VERSION,
        command_id: format!("{saga_id}:{step}:do:1"),
        saga_id: saga_id.to_owned(),
        outcome: Outcome::Ok { result: json!({}) },
    }
    .encode()
}

fn message(
    core: &mut Core<Test>,
    now: DateTime<Utc>,
    source: Source,
    subject: &str,
    payload: &[u8],
    delivered: u64,
    id: u32,
) {
    core.handle_message(
        now,
        Incoming {
            source,
            subject,
            payload,
            traceparent: None,
            delivered: Some(delivered),
            stored_at: None,
            message: id,
        },
    );
}

/// A saga as another writer stored it: started, at journal sequence `seq`.
fn stored(key: &str, seq: u64) -> Stored {
    let saga_id = protocol::saga_id(TYPE, key);
    let (_, saga, transition) = crate::record::started_order(&saga_id, "tok_ok", None, t0());
    let plan = plan::plan(&transition.actions, None, None);
    Stored {
        record: Record::next(None, transition.entry, saga, plan.effects, plan.timer_at),
        seq,
    }
}

/// The reply "reserved" to the saga's first command, as message `id`.
fn reserved(core: &mut Core<Test>, now: DateTime<Utc>, saga_id: &str, delivered: u64, id: u32) {
    let subject = protocol::subject::reply("inventory", &format!("{saga_id}:reserve-stock:do:1"));
    let body = reply_ok(saga_id, "reserve-stock");
    message(core, now, Source::Replies, &subject, &body, delivered, id);
}

fn loaded(
    core: &mut Core<Test>,
    now: DateTime<Utc>,
    saga_id: &str,
    result: Result<Option<Stored>, Error>,
) {
    let saga_id = saga_id.to_owned();
    let result = result.map(|found| found.map(Box::new));
    core.handle_io_done(now, Done::Loaded { saga_id, result });
}

fn written(core: &mut Core<Test>, now: DateTime<Utc>, saga_id: &str, result: Result<u64, Error>) {
    let saga_id = saga_id.to_owned();
    core.handle_io_done(now, Done::Written { saga_id, result });
}

fn timed_out() -> Error {
    Error::Store(store::Error::Append(PublishError::new(
        PublishErrorKind::TimedOut,
    )))
}

fn conflict() -> Error {
    Error::Store(store::Error::Conflict)
}

#[track_caller]
fn assert_load(io: &Io<Test>, want_id: &str, want_leader: bool) {
    match io {
        Io::Load { saga_id, leader } => {
            assert_eq!((saga_id.as_str(), *leader), (want_id, want_leader))
        }
        other => panic!("expected a load of {want_id}, got {other:?}"),
    }
}

#[track_caller]
fn assert_write<'a>(io: &'a Io<Test>, want_id: &str, want_expected: u64) -> &'a Write {
    match io {
        Io::Write { saga_id, write } => {
            assert_eq!(
                (saga_id.as_str(), write.append.expected),
                (want_id, want_expected)
            );
            write
        }
        other => panic!("expected a write of {want_id}, got {other:?}"),
    }
}

#[track_caller]
fn assert_settled(io: &Io<Test>, want_message: u32, want: Settle) {
    match io {
        Io::Settle { message, settle } => assert_eq!((*message, *settle), (want_message, want)),
        other => panic!("expected message {want_message} settled {want:?}, got {other:?}"),
    }
}

#[track_caller]
fn assert_dead_letter(io: &Io<Test>, want_message: u32, want_source: Source, reason_has: &str) {
    match io {
        Io::DeadLetter {
            message,
            source,
            reason,
        } => {
            assert_eq!((*message, *source), (want_message, want_source));
            assert!(reason.contains(reason_has), "{reason}");
        }
        other => panic!("expected a dead letter of {want_message}, got {other:?}"),
    }
}

#[track_caller]
fn started(io: Io<Test>) -> (u32, Result<Started, ApiError>) {
    match io {
        Io::Answer(Answer::Started(caller, result)) => (caller, result),
        other => panic!("expected a start answer, got {other:?}"),
    }
}

#[track_caller]
fn phase(io: Io<Test>) -> (u32, Result<Phase, ApiError>) {
    match io {
        Io::Answer(Answer::Phase(caller, result)) => (caller, result),
        other => panic!("expected a phase answer, got {other:?}"),
    }
}

#[test]
fn one_saga_at_a_time_in_arrival_order_while_others_proceed() {
    let mut core = core();
    let a = protocol::saga_id(TYPE, "a");
    let b = protocol::saga_id(TYPE, "b");

    // A start loads the saga; a second start for the key and a start of another
    // saga arrive while the load is out: the first queues, the second proceeds.
    core.handle_input(at(0), api_start("a", 1));
    core.handle_input(at(1), api_start("a", 2));
    core.handle_input(at(2), api_start("b", 3));
    let io = drain(&mut core);
    assert_eq!(io.len(), 2, "{io:?}");
    assert_load(&io[0], &a, false);
    assert_load(&io[1], &b, false);

    // Not there: the start writes the first record (timer, record, command).
    loaded(&mut core, at(3), &a, Ok(None));
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    let write = assert_write(&io[0], &a, 0);
    assert!(
        write.set_timer.is_some(),
        "the step timeout is armed before the append"
    );
    assert_eq!(write.publish.len(), 1);
    assert_eq!(write.publish[0].msg_id, format!("{a}:reserve-stock:do:1"));
    assert!(!write.clear_timer);

    // A slow append: the reply to the first command queues behind it, nothing moves.
    reserved(&mut core, at(4), &a, 1, 10);
    assert!(drain(&mut core).is_empty());

    // The append is stored: the first caller hears "created", the queued start is
    // answered from memory ("already there"), and the reply is applied to the
    // stored record without a load.
    written(&mut core, at(5), &a, Ok(7));
    let mut io = drain(&mut core).into_iter();
    assert_eq!(
        started(io.next().unwrap()),
        (
            1,
            Ok(Started {
                saga_id: a.clone(),
                created: true
            })
        )
    );
    assert_eq!(
        started(io.next().unwrap()),
        (
            2,
            Ok(Started {
                saga_id: a.clone(),
                created: false
            })
        )
    );
    let next = io.next().unwrap();
    let write = assert_write(&next, &a, 7);
    assert_eq!(write.publish[0].msg_id, format!("{a}:take-payment:do:1"));
    assert!(io.next().is_none());

    // Only now is the reply acked.
    written(&mut core, at(6), &a, Ok(8));
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    assert_settled(&io[0], 10, Settle::Ack);
    assert!(core.holds(&a), "a running saga stays cached");
}

#[test]
fn a_conflict_reloads_from_the_leader_and_applies_the_input_again() {
    let mut core = core();
    let saga = stored("c", 5);
    let id = saga.record.saga.id.clone();
    reserved(&mut core, at(0), &id, 1, 20);
    assert_load(&drain(&mut core)[0], &id, false);
    loaded(&mut core, at(1), &id, Ok(Some(saga.clone())));
    let io = drain(&mut core);
    assert_write(&io[0], &id, 5);

    // Another instance appended first.
    written(&mut core, at(2), &id, Err(conflict()));
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    assert_load(&io[0], &id, true);
    assert_eq!(core.metrics.conflicts.get(), 1);

    // What it wrote is the base now: the same reply is applied on top of it.
    let mut theirs = saga;
    theirs.seq = 9;
    loaded(&mut core, at(3), &id, Ok(Some(theirs)));
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    assert_write(&io[0], &id, 9);
    written(&mut core, at(4), &id, Ok(10));
    assert_settled(&drain(&mut core)[0], 20, Settle::Ack);
}

#[test]
fn idle_sagas_are_evicted_and_reloaded() {
    let mut core = core();
    let id = protocol::saga_id(TYPE, "e");
    core.handle_input(at(0), api_start("e", 1));
    drain(&mut core);
    loaded(&mut core, at(1), &id, Ok(None));
    drain(&mut core);
    written(&mut core, at(2), &id, Ok(1));
    drain(&mut core);

    let idle = i64::try_from(IDLE_EVICTION.as_millis()).unwrap();
    core.handle_tick(at(idle - 1));
    assert!(core.holds(&id), "not idle long enough");
    core.handle_tick(at(idle + 1));
    assert!(!core.holds(&id), "evicted");

    // The next input loads it again.
    core.handle_input(
        at(idle + 2),
        api_input(
            &id,
            Input::Retry {
                operator: "ana".into(),
            },
            2,
        ),
    );
    assert_load(&drain(&mut core)[0], &id, false);

    // A saga with work in progress is never evicted.
    core.handle_tick(at(10 * idle));
    assert!(core.holds(&id));
}

#[test]
fn settle_decisions_follow_the_outcome() {
    let done = Verdict::Done {
        phase: Phase::Running,
        created: false,
    };
    assert_eq!(settlement(&done, Some(1)), Settle::Ack);
    let refused = Verdict::Refused(ApiError::NotFound("s".into()));
    assert_eq!(settlement(&refused, Some(1)), Settle::Ack);
    let poison = Verdict::Poison(Poison::UnknownSaga("s".into()));
    assert_eq!(settlement(&poison, Some(1)), Settle::Term);

    // A transient failure backs off with the delivery count, capped.
    let failed = Verdict::Failed(timed_out());
    let delays: Vec<_> = [None, Some(1), Some(2), Some(3), Some(5), Some(6), Some(100)]
        .into_iter()
        .map(|n| settlement(&failed, n))
        .collect();
    let secs = |s| Settle::Nak(std::time::Duration::from_secs(s));
    assert_eq!(
        delays,
        vec![
            secs(1),
            secs(1),
            secs(2),
            secs(4),
            secs(16),
            secs(30),
            secs(30)
        ]
    );
    // A missing definition needs a deploy: the longest wait at once.
    let missing = Verdict::Failed(Error::NotLoaded {
        saga_type: TYPE.into(),
        version: 9,
    });
    assert_eq!(settlement(&missing, Some(1)), Settle::Nak(NAK_MAX));
}

#[test]
fn poison_is_dead_lettered_and_callers_are_refused() {
    let mut core = core();
    // Undecodable, a foreign command id, an unknown saga type, an invalid input.
    message(
        &mut core,
        at(0),
        Source::Replies,
        &protocol::subject::reply("x", "y"),
        b"not json",
        1,
        1,
    );
    let foreign = Reply {
        protocol: VERSION,
        command_id: "other:reserve-stock:do:1".into(),
        saga_id: "mine".into(),
        outcome: Outcome::Ok { result: json!({}) },
    };
    message(
        &mut core,
        at(0),
        Source::Replies,
        &protocol::subject::reply("x", "y"),
        &foreign.encode(),
        1,
        2,
    );
    let start = Start {
        protocol: VERSION,
        key: "k".into(),
        input: order("tok_ok"),
        requested_at: None,
    };
    let start_subject = protocol::subject::start("no-such-saga");
    message(
        &mut core,
        at(0),
        Source::Starts,
        &start_subject,
        &start.encode(),
        1,
        3,
    );
    let bad = Start {
        protocol: VERSION,
        key: "k".into(),
        input: json!({"customer_id": "x"}),
        requested_at: None,
    };
    let start_subject = protocol::subject::start(TYPE);
    message(
        &mut core,
        at(0),
        Source::Starts,
        &start_subject,
        &bad.encode(),
        1,
        4,
    );
    message(
        &mut core,
        at(0),
        Source::Timers,
        &protocol::subject::timer_fire(""),
        b"",
        1,
        5,
    );
    let io = drain(&mut core);
    assert_eq!(io.len(), 5, "{io:?}");
    assert_dead_letter(&io[0], 1, Source::Replies, "invalid Reply");
    assert_dead_letter(&io[1], 2, Source::Replies, "belongs to saga other");
    assert_dead_letter(
        &io[2],
        3,
        Source::Starts,
        "unknown saga type \"no-such-saga\"",
    );
    assert_dead_letter(&io[3], 4, Source::Starts, "email");
    assert_dead_letter(&io[4], 5, Source::Timers, "subject");
    assert_eq!(
        core.metrics
            .dead_letters
            .with_label_values(&[Source::Starts.dead_letter_source()])
            .get(),
        2
    );

    // A reply for a saga that does not exist is poison; a timer for one (its
    // journal expired) is acked; a caller hears "not found".
    let gone = protocol::saga_id(TYPE, "gone");
    reserved(&mut core, at(1), &gone, 1, 6);
    message(
        &mut core,
        at(1),
        Source::Timers,
        &protocol::subject::timer_fire(&gone),
        b"",
        1,
        7,
    );
    core.handle_input(
        at(1),
        api_input(
            &gone,
            Input::Retry {
                operator: "ana".into(),
            },
            8,
        ),
    );
    assert_load(&drain(&mut core)[0], &gone, false);
    loaded(&mut core, at(2), &gone, Ok(None));
    // A replica may lag: only the leader's answer counts.
    assert_load(&drain(&mut core)[0], &gone, true);
    loaded(&mut core, at(2), &gone, Ok(None));
    let mut io = drain(&mut core).into_iter();
    assert_dead_letter(
        &io.next().unwrap(),
        6,
        Source::Replies,
        &format!("unknown saga {gone}"),
    );
    assert_settled(&io.next().unwrap(), 7, Settle::Ack);
    assert_eq!(
        phase(io.next().unwrap()),
        (8, Err(ApiError::NotFound(gone.clone())))
    );
    assert!(io.next().is_none());
    assert!(!core.holds(&gone), "a missing saga is not kept");
}

#[test]
fn failures_nak_messages_with_backoff_and_tell_callers_the_kind() {
    let mut core = core();
    let id = protocol::saga_id(TYPE, "f");
    reserved(&mut core, at(0), &id, 3, 1);
    core.handle_input(
        at(0),
        api_input(
            &id,
            Input::Retry {
                operator: "ana".into(),
            },
            2,
        ),
    );
    drain(&mut core);
    loaded(&mut core, at(1), &id, Err(timed_out()));
    // The reply (third delivery) is nak'd for 4 s; the caller queued behind it
    // loads again, so it is not failed by someone else's error.
    let io = drain(&mut core);
    assert_eq!(io.len(), 2, "{io:?}");
    assert_settled(&io[0], 1, Settle::Nak(std::time::Duration::from_secs(4)));
    assert_load(&io[1], &id, false);
    loaded(&mut core, at(2), &id, Err(timed_out()));
    let (caller, result) = phase(drain(&mut core).pop().unwrap());
    assert_eq!(caller, 2);
    let error = result.unwrap_err();
    assert_eq!(error.kind(), crate::driver::ErrorKind::Timeout);
    assert!(!core.holds(&id));
}

#[test]
fn a_redelivered_input_republishes_the_recorded_effects_first() {
    let mut core = core();
    let saga = stored("r", 4);
    let id = saga.record.saga.id.clone();
    reserved(&mut core, at(0), &id, 2, 1);
    drain(&mut core);
    loaded(&mut core, at(1), &id, Ok(Some(saga)));
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    match &io[0] {
        Io::Publish { saga_id, messages } => {
            assert_eq!(saga_id, &id);
            assert_eq!(messages.len(), 1);
            assert_eq!(messages[0].msg_id, format!("{id}:reserve-stock:do:1"));
        }
        other => panic!("expected a re-publish, got {other:?}"),
    }
    core.handle_io_done(
        at(2),
        Done::Published {
            saga_id: id.clone(),
            result: Ok(Vec::new()),
        },
    );
    assert_write(&drain(&mut core)[0], &id, 4);
}

#[test]
fn an_early_wake_rearms_and_a_late_reply_is_journaled_only() {
    let mut core = core();
    let saga = stored("w", 2);
    let id = saga.record.saga.id.clone();
    let armed = saga.record.timer_at.unwrap();
    // The timer fires before the step timeout: nothing is due, the timer is re-armed.
    message(
        &mut core,
        at(0),
        Source::Timers,
        &protocol::subject::timer_fire(&id),
        b"",
        1,
        1,
    );
    drain(&mut core);
    loaded(&mut core, at(1), &id, Ok(Some(saga)));
    // A wake may follow an interrupted transition: its effects go out again first.
    let io = drain(&mut core);
    assert!(matches!(&io[..], [Io::Publish { .. }]), "{io:?}");
    core.handle_io_done(
        at(1),
        Done::Published {
            saga_id: id.clone(),
            result: Ok(Vec::new()),
        },
    );
    // The command it re-sent waits its full timeout from now on (journaled).
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    let write = assert_write(&io[0], &id, 2);
    let renewed = write.set_timer.unwrap();
    assert!(renewed > armed);
    written(&mut core, at(1), &id, Ok(3));
    // That armed the timer the wake needs: nothing else is written.
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    assert_settled(&io[0], 1, Settle::Ack);

    // The same reply twice: first applied, then the duplicate is journaled with
    // no effects and acked.
    reserved(&mut core, at(3), &id, 1, 2);
    reserved(&mut core, at(3), &id, 1, 3);
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "the duplicate queues: {io:?}");
    written(&mut core, at(4), &id, Ok(4));
    let io = drain(&mut core);
    assert_settled(&io[0], 2, Settle::Ack);
    let write = assert_write(&io[1], &id, 4);
    assert!(write.publish.is_empty() && write.set_timer.is_none() && !write.clear_timer);
    written(&mut core, at(5), &id, Ok(5));
    assert_settled(&drain(&mut core)[0], 3, Settle::Ack);
    assert_eq!(core.metrics.duplicates.get(), 1);

    // An operator action the state does not allow is refused (once the journal
    // confirms the cached copy), nothing written.
    core.handle_input(
        at(6),
        api_input(
            &id,
            Input::Retry {
                operator: "ana".into(),
            },
            4,
        ),
    );
    assert_load(&drain(&mut core)[0], &id, true);
    let mut now_stored = stored("w", 5);
    now_stored.record.effects.clear();
    loaded(&mut core, at(7), &id, Ok(Some(now_stored)));
    let (caller, result) = phase(drain(&mut core).pop().unwrap());
    assert_eq!(caller, 4);
    assert!(matches!(result, Err(ApiError::NotAllowed(_))), "{result:?}");
}

#[test]
fn shutdown_refuses_queued_and_new_callers_and_leaves_messages_unsettled() {
    let mut core = core();
    let id = protocol::saga_id(TYPE, "s");
    core.handle_input(at(0), api_start("s", 1));
    core.handle_input(at(0), api_start("s", 2));
    let subject = protocol::subject::timer_fire(&id);
    message(&mut core, at(0), Source::Timers, &subject, b"", 1, 3);
    drain(&mut core);
    core.handle_shutdown();
    core.handle_input(
        at(1),
        api_input(
            &id,
            Input::Retry {
                operator: "ana".into(),
            },
            4,
        ),
    );
    let io = drain(&mut core);
    assert_eq!(io.len(), 2, "{io:?}");
    let mut io = io.into_iter();
    assert_eq!(
        started(io.next().unwrap()),
        (2, Err(ApiError::ShuttingDown))
    );
    assert_eq!(phase(io.next().unwrap()), (4, Err(ApiError::ShuttingDown)));

    // Work in progress finishes.
    loaded(&mut core, at(2), &id, Ok(None));
    assert_write(&drain(&mut core)[0], &id, 0);
}

/// A saga driven to the end by ok replies, as the last record of its journal (at
/// `seq`): its effects are the last transition's (the completion event).
fn completed(key: &str, seq: u64) -> Stored {
    let saga_id = protocol::saga_id(TYPE, key);
    let def = def();
    let (_, mut saga, mut transition) =
        crate::record::started_order(&saga_id, "tok_ok", None, t0());
    let mut armed = plan::plan(&transition.actions, None, None).timer_at;
    for i in 1.. {
        let command_id = transition.actions.iter().find_map(|a| match a {
            Action::Send { command, .. } => Some(command.command_id.clone()),
            _ => None,
        });
        let Some(command_id) = command_id else {
            break;
        };
        let reply = Input::Reply {
            command_id,
            outcome: Outcome::Ok { result: json!({}) },
        };
        transition = saga.apply(&def, reply, at(i)).unwrap();
        armed = plan::plan(&transition.actions, armed, None).timer_at;
    }
    assert_eq!(saga.phase(), Phase::Completed);
    let plan = plan::plan(&transition.actions, armed, None);
    Stored {
        record: Record::next(None, transition.entry, saga, plan.effects, plan.timer_at),
        seq,
    }
}

/// Hole 13: a start of a known, finished saga (its key posted again after the
/// dedup window) changes nothing: its completion event is not published again.
#[test]
fn a_start_of_a_finished_saga_publishes_nothing() {
    let mut core = core();
    let done = completed("k13", 9);
    let id = done.record.saga.id.clone();
    assert!(
        done.record
            .effects
            .iter()
            .any(|e| matches!(e, crate::record::Effect::Event { .. })),
        "the last record holds the completion event"
    );
    let start = Start {
        protocol: VERSION,
        key: "k13".into(),
        input: order("tok_ok"),
        requested_at: None,
    };
    let subject = protocol::subject::start(TYPE);
    message(
        &mut core,
        at(0),
        Source::Starts,
        &subject,
        &start.encode(),
        1,
        1,
    );
    core.handle_input(at(0), api_start("k13", 2));
    assert_load(&drain(&mut core)[0], &id, false);
    loaded(&mut core, at(1), &id, Ok(Some(done)));
    let mut io = drain(&mut core).into_iter();
    assert_settled(&io.next().unwrap(), 1, Settle::Ack);
    assert_eq!(
        started(io.next().unwrap()),
        (
            2,
            Ok(Started {
                saga_id: id.clone(),
                created: false
            })
        )
    );
    assert!(io.next().is_none());
}

/// Hole 1: a transition is stored but its command is lost (the instance died);
/// a stale reply then appends an ignored record. When the transition's input is
/// redelivered, the lost command still goes out: the ignored record carries the
/// effects not known to be sent.
#[test]
fn an_ignored_record_keeps_the_effects_of_the_transition_before_it() {
    let mut core = core();
    // The start record (reserve-stock do:1) was stored; its command may be lost.
    let saga = stored("k1", 4);
    let id = saga.record.saga.id.clone();
    // A reply to a command this saga never sent in this form (attempt 2): stale.
    let stale = Reply {
        protocol: VERSION,
        command_id: format!("{id}:reserve-stock:do:2"),
        saga_id: id.clone(),
        outcome: Outcome::Ok { result: json!({}) },
    };
    let subject = protocol::subject::reply("inventory", &stale.command_id);
    message(
        &mut core,
        at(0),
        Source::Replies,
        &subject,
        &stale.encode(),
        1,
        1,
    );
    assert_load(&drain(&mut core)[0], &id, false);
    loaded(&mut core, at(1), &id, Ok(Some(saga)));
    let io = drain(&mut core);
    let write = assert_write(&io[0], &id, 4);
    assert!(
        write.publish.is_empty(),
        "an ignored input publishes nothing"
    );
    let record = Record::decode(&write.append.body).unwrap();
    assert_eq!(record.entry.cause, Cause::Ignored);
    written(&mut core, at(2), &id, Ok(5));
    drain(&mut core);
    // Its effects are still pending: no copy is kept that would hide them
    // from the next input (which would apply to it without a re-publish).
    assert!(
        !core.holds(&id),
        "a record with pending effects is not cached"
    );

    // The start is redelivered: the command of the start record goes out again.
    let start = Start {
        protocol: VERSION,
        key: "k1".into(),
        input: order("tok_ok"),
        requested_at: None,
    };
    let subject = protocol::subject::start(TYPE);
    message(
        &mut core,
        at(100_001),
        Source::Starts,
        &subject,
        &start.encode(),
        2,
        2,
    );
    assert_load(&drain(&mut core)[0], &id, false);
    loaded(
        &mut core,
        at(100_002),
        &id,
        Ok(Some(Stored { record, seq: 5 })),
    );
    let io = drain(&mut core);
    match &io[..] {
        [Io::Publish { messages, .. }] => {
            assert_eq!(messages.len(), 1, "{messages:?}");
            assert_eq!(messages[0].msg_id, format!("{id}:reserve-stock:do:1"));
        }
        other => panic!("expected the lost command re-published, got {other:?}"),
    }
}

/// Hole 7: the instance died between the start's append and its publish; the
/// step's timer (armed before the append) fires at the step timeout. The
/// recovery re-sends the command and the wait restarts from the re-send
/// (journaled), so the crash costs no attempt.
#[test]
fn a_recovered_command_gets_its_full_timeout() {
    let mut core = core();
    let saga = stored("k7", 4);
    let id = saga.record.saga.id.clone();
    let timeout = saga.record.timer_at.unwrap();
    let now = timeout + Ms::milliseconds(1);
    let subject = protocol::subject::timer_fire(&id);
    core.handle_message(
        now,
        Incoming {
            source: Source::Timers,
            subject: &subject,
            payload: b"",
            traceparent: None,
            delivered: Some(1),
            stored_at: None,
            message: 1,
        },
    );
    assert_load(&drain(&mut core)[0], &id, false);
    loaded(&mut core, now, &id, Ok(Some(saga)));
    assert!(matches!(&drain(&mut core)[..], [Io::Publish { .. }]));
    core.handle_io_done(
        now,
        Done::Published {
            saga_id: id.clone(),
            result: Ok(Vec::new()),
        },
    );
    let io = drain(&mut core);
    let write = assert_write(&io[0], &id, 4);
    let record = Record::decode(&write.append.body).unwrap();
    assert_eq!(record.entry.cause, Cause::Resent, "{:?}", record.entry);
    assert!(write.publish.is_empty() && record.effects.is_empty());
    let step_timeout = chrono::Duration::from_std(def().steps[0].timeout).unwrap();
    let renewed = round_up(now + step_timeout);
    assert_eq!(write.set_timer, Some(renewed), "the timer is armed again");
    assert_eq!(record.timer_at, Some(renewed));
    assert_eq!(record.saga.steps[0].attempts, 1, "no attempt spent");
    written(&mut core, now, &id, Ok(5));
    // The wake itself is not due any more, and its timer is armed.
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    assert_settled(&io[0], 1, Settle::Ack);

    // When the renewed wait ends, the timer's wake finds nothing left to re-send
    // and the attempt times out.
    core.handle_tick(now + Ms::days(1));
    let later = renewed + Ms::milliseconds(1);
    core.handle_message(
        later,
        Incoming {
            source: Source::Timers,
            subject: &subject,
            payload: b"",
            traceparent: None,
            delivered: Some(1),
            stored_at: None,
            message: 2,
        },
    );
    assert_load(&drain(&mut core)[0], &id, false);
    loaded(&mut core, later, &id, Ok(Some(Stored { record, seq: 5 })));
    let io = drain(&mut core);
    match &io[..] {
        [Io::Publish { messages, .. }] => assert!(messages.is_empty()),
        other => panic!("expected an empty re-publish, got {other:?}"),
    }
    core.handle_io_done(
        later,
        Done::Published {
            saga_id: id.clone(),
            result: Ok(Vec::new()),
        },
    );
    // No reply is stored for the attempt: it times out.
    let subject = assert_find_reply(&drain(&mut core)[0], &id);
    assert_eq!(
        subject,
        protocol::subject::reply("inventory", &format!("{id}:reserve-stock:do:1"))
    );
    found(&mut core, later, &id, Ok(None));
    let io = drain(&mut core);
    let write = assert_write(&io[0], &id, 5);
    let timed_out = Record::decode(&write.append.body).unwrap();
    assert_eq!(timed_out.entry.cause, Cause::StepTimeout);
}

#[track_caller]
fn assert_find_reply(io: &Io<Test>, want_id: &str) -> String {
    match io {
        Io::FindReply { saga_id, subject } => {
            assert_eq!(saga_id, want_id);
            subject.clone()
        }
        other => panic!("expected a look-up of a stored reply for {want_id}, got {other:?}"),
    }
}

fn found(
    core: &mut Core<Test>,
    now: DateTime<Utc>,
    saga_id: &str,
    result: Result<Option<Vec<u8>>, Error>,
) {
    let saga_id = saga_id.to_owned();
    let result = result.map(|found| found.map(Bytes::from));
    core.handle_io_done(now, Done::ReplyFound { saga_id, result });
}

/// The step timeout of `stored`'s saga fires (message `id`) and the wake gets
/// as far as the look-up of the attempt's stored reply.
fn timeout_looks_for_the_reply(core: &mut Core<Test>, stored: Stored, id: u32) -> DateTime<Utc> {
    let saga_id = stored.record.saga.id.clone();
    let now = stored.record.timer_at.unwrap() + Ms::milliseconds(1);
    let subject = protocol::subject::timer_fire(&saga_id);
    message(core, now, Source::Timers, &subject, b"", 1, id);
    assert_load(&drain(core)[0], &saga_id, false);
    loaded(core, now, &saga_id, Ok(Some(stored)));
    // A wake may follow an interrupted transition: its (here no) effects go out again.
    assert!(matches!(&drain(core)[..], [Io::Publish { messages, .. }] if messages.is_empty()));
    core.handle_io_done(
        now,
        Done::Published {
            saga_id: saga_id.clone(),
            result: Ok(Vec::new()),
        },
    );
    assert_find_reply(&drain(core)[0], &saga_id);
    now
}

/// A reply that is stored but not yet taken from the consumer (the instance it
/// was delivered to is slow or stopped) wins over the step timeout that fires
/// meanwhile: the saga moves on as if it had arrived, no attempt is spent. A
/// look-up that finds nothing, another command's reply, or fails, times out.
#[test]
fn a_step_timeout_applies_the_reply_already_stored_instead() {
    let mut core = core();
    let mut saga = stored("late-but-stored", 4);
    saga.record.effects.clear();
    let id = saga.record.saga.id.clone();
    let now = timeout_looks_for_the_reply(&mut core, saga.clone(), 1);
    found(
        &mut core,
        now,
        &id,
        Ok(Some(reply_ok(&id, "reserve-stock"))),
    );
    let io = drain(&mut core);
    let write = assert_write(&io[0], &id, 4);
    let record = Record::decode(&write.append.body).unwrap();
    assert_eq!(record.entry.cause, Cause::ReplyOk, "{:?}", record.entry);
    assert_eq!(record.saga.steps[0].attempts, 1);
    assert_eq!(record.saga.current_step(), Some("take-payment"));
    assert_eq!(write.publish.len(), 1, "the payment command goes out");
    assert!(
        write.set_timer.is_some(),
        "the timer that fired is gone: the next wait arms one"
    );
    written(&mut core, now, &id, Ok(5));
    assert_settled(&drain(&mut core)[0], 1, Settle::Ack);

    for (n, lookup) in [
        Ok(None),
        Ok(Some(reply_ok(
            &protocol::saga_id(TYPE, "other"),
            "reserve-stock",
        ))),
        Err(timed_out()),
    ]
    .into_iter()
    .enumerate()
    {
        let mut core = self::core();
        let message = u32::try_from(n).unwrap() + 2;
        let now = timeout_looks_for_the_reply(&mut core, saga.clone(), message);
        found(&mut core, now, &id, lookup);
        let io = drain(&mut core);
        let write = assert_write(&io[0], &id, 4);
        let record = Record::decode(&write.append.body).unwrap();
        assert_eq!(record.entry.cause, Cause::StepTimeout, "case {n}");
    }
}

/// Hole 11: the server's clock runs ahead, so a timer fires before it is due by
/// this instance's clock. The re-arm makes up for the skew instead of firing at
/// once again, and a timer never re-arms into the past or the present.
#[test]
fn an_early_wake_never_rearms_into_a_hot_loop() {
    let wake = |core: &mut Core<Test>, now, saga: Stored, id: u32, stored_at| {
        let saga_id = saga.record.saga.id.clone();
        let subject = protocol::subject::timer_fire(&saga_id);
        core.handle_message(
            now,
            Incoming {
                source: Source::Timers,
                subject: &subject,
                payload: b"",
                traceparent: None,
                delivered: Some(1),
                stored_at,
                message: id,
            },
        );
        drain(core);
        loaded(core, now, &saga_id, Ok(Some(saga.clone())));
        match &drain(core)[..] {
            [Io::Publish { .. }] => {}
            other => panic!("expected a re-publish, got {other:?}"),
        }
        core.handle_io_done(
            now,
            Done::Published {
                saga_id: saga_id.clone(),
                result: Ok(Vec::new()),
            },
        );
        // Not due on a replica's copy: the leader's decides.
        match &drain(core)[..] {
            [Io::Load { leader: true, .. }] => {}
            other => panic!("expected a load from the leader, got {other:?}"),
        }
        loaded(core, now, &saga_id, Ok(Some(saga)));
        match &drain(core)[..] {
            [Io::SetTimer { at, .. }] => *at,
            other => panic!("expected a re-arm, got {other:?}"),
        }
    };
    // Effects already acknowledged: nothing to re-send.
    let mut saga = stored("k11", 3);
    saga.record.effects.clear();
    let due = saga.record.saga.next_timer(&def()).unwrap();
    let armed = saga.record.timer_at.unwrap();

    // Fired 5 s before it was armed for (the server is 5 s ahead).
    let now = armed - Ms::seconds(5);
    let at = wake(&mut core(), now, saga.clone(), 1, None);
    assert!(at >= due + Ms::seconds(5), "{at} vs due {due}");

    // Due in a millisecond: not re-armed sooner than the floor.
    let now = due - Ms::milliseconds(1);
    let mut no_skew = saga;
    no_skew.record.timer_at = Some(now);
    let at = wake(&mut core(), now, no_skew.clone(), 2, None);
    assert!(at >= now + Ms::milliseconds(250), "{at} vs now {now}");

    // A timer armed shorter than the skew was in the server's past and fired
    // at once (just after it was armed): how early it was says little, the
    // fire's own timestamp (the server's clock, 30 s ahead) says it all, so
    // one re-arm lands when the step is due.
    let armed = no_skew.record.timer_at.unwrap();
    let now = armed - Ms::seconds(5);
    let at = wake(
        &mut core(),
        now,
        no_skew.clone(),
        3,
        Some(now + Ms::seconds(30)),
    );
    assert!(at >= due + Ms::seconds(30), "{at} vs due {due}");
    assert!(at <= due + Ms::seconds(31), "{at} vs due {due}");
    // The server behind (a stale timer fired late): the re-arm is in its time.
    let at = wake(&mut core(), now, no_skew, 4, Some(now - Ms::seconds(30)));
    assert!(at <= due - Ms::seconds(29), "{at} vs due {due}");
    assert!(
        at >= now - Ms::seconds(30) + Ms::milliseconds(250),
        "{at} vs now {now}"
    );
}

/// Hole 9: a cached copy may be up to 15 s stale (another instance moved the
/// saga on). Decisions that write nothing are not taken from it: an operator
/// action it refuses, and a wake it finds not due, are re-checked against the
/// journal's leader first.
#[test]
fn decisions_that_write_nothing_are_rechecked_against_the_journal() {
    let mut core = core();
    let id = protocol::saga_id(TYPE, "k9");
    core.handle_input(at(0), api_start("k9", 1));
    drain(&mut core);
    loaded(&mut core, at(1), &id, Ok(None));
    drain(&mut core);
    written(&mut core, at(2), &id, Ok(1));
    drain(&mut core);
    assert!(core.holds(&id), "cached");

    // A retry the cached copy refuses: reloaded from the leader first.
    core.handle_input(
        at(3),
        api_input(
            &id,
            Input::Retry {
                operator: "ana".into(),
            },
            2,
        ),
    );
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    assert_load(&io[0], &id, true);
    let mut theirs = stored("k9", 5);
    theirs.record.effects.clear();
    loaded(&mut core, at(4), &id, Ok(Some(theirs.clone())));
    let (caller, result) = phase(drain(&mut core).pop().unwrap());
    assert_eq!(caller, 2);
    assert!(matches!(result, Err(ApiError::NotAllowed(_))), "{result:?}");

    // A wake the cached copy finds not due: reloaded (no re-publish) first.
    let subject = protocol::subject::timer_fire(&id);
    message(&mut core, at(5), Source::Timers, &subject, b"", 1, 3);
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    assert_load(&io[0], &id, true);
    loaded(&mut core, at(6), &id, Ok(Some(theirs)));
    let io = drain(&mut core);
    assert!(matches!(&io[..], [Io::SetTimer { .. }]), "{io:?}");
}

/// Hole 14: an input for a saga its loaded definition does not fit (a bad
/// deploy) is not acked and dropped: it is dead-lettered with the reason, to be
/// redriven once the definition is fixed.
#[test]
fn an_input_for_a_saga_its_definition_does_not_fit_is_dead_lettered() {
    let mut core = core();
    let mut saga = stored("k14", 3);
    saga.record.saga.steps.pop();
    let id = saga.record.saga.id.clone();
    reserved(&mut core, at(0), &id, 1, 1);
    assert_load(&drain(&mut core)[0], &id, false);
    loaded(&mut core, at(1), &id, Ok(Some(saga)));
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    assert_dead_letter(&io[0], 1, Source::Replies, "definition");
}

/// The record and the command's `traceparent` of a start carrying `caller`.
fn start_traced(mut core: Core<Test>, caller: &str) -> (Record, String) {
    let mut work = api_start("traced", 1);
    if let Work::Start { traceparent, .. } = &mut work {
        *traceparent = Some(caller.to_owned());
    }
    core.handle_input(at(0), work);
    let saga_id = protocol::saga_id(TYPE, "traced");
    assert_load(&drain(&mut core)[0], &saga_id, false);
    loaded(&mut core, at(1), &saga_id, Ok(None));
    let io = drain(&mut core);
    let write = assert_write(&io[0], &saga_id, 0);
    let record = Record::decode(&write.append.body).unwrap();
    let header = write.publish[0]
        .headers
        .iter()
        .find(|(name, _)| *name == protocol::header::TRACEPARENT)
        .map(|(_, value)| value.clone())
        .unwrap();
    (record, header)
}

#[test]
fn a_traced_start_gets_a_root_span_of_its_own_and_commands_name_their_attempt() {
    const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let command = format!("{}:reserve-stock:do:1", protocol::saga_id(TYPE, "traced"));

    // Off: the caller's context is the saga's, as it came.
    let (record, header) = start_traced(core(), CALLER);
    assert_eq!(record.saga.traceparent.as_deref(), Some(CALLER));
    assert_eq!(record.saga.caller_traceparent, None);
    assert_eq!(header, protocol::command_traceparent(CALLER, &command));

    // On: a root span in the caller's trace, the caller kept as its parent.
    let (record, header) = start_traced(core().with_tracer(Some(Tracer::global(1.0))), CALLER);
    let root = record.saga.traceparent.clone().unwrap();
    assert_ne!(root, CALLER);
    assert_eq!(
        record.saga.trace_id(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    assert_eq!(record.saga.caller_traceparent.as_deref(), Some(CALLER));
    assert_eq!(header, protocol::command_traceparent(&root, &command));
    assert_eq!(
        record.saga.steps[0].sent_at,
        Some(at(1)),
        "the attempt's start"
    );
}

/// Hole 4: a saga whose timer fire was lost (an outage) is woken by the sweep:
/// its effects go out again, the overdue timeout applies, nothing is settled;
/// busy sagas and ones swept for the same recorded timer lately are left alone.
#[test]
fn the_sweep_wakes_a_saga_whose_timer_is_overdue() {
    let mut core = core();
    let mut saga = stored("sw", 4);
    saga.record.effects.clear();
    let id = saga.record.saga.id.clone();
    let timeout = saga.record.timer_at.unwrap();
    let now = timeout + Ms::seconds(30);
    core.handle_overdue(now, vec![(id.clone(), Some(timeout))]);
    assert_load(&drain(&mut core)[0], &id, false);
    // Swept again while it is busy, or later for the same recorded timer: no new work.
    core.handle_overdue(now, vec![(id.clone(), Some(timeout))]);
    assert!(drain(&mut core).is_empty());
    loaded(&mut core, now, &id, Ok(Some(saga)));
    assert!(matches!(&drain(&mut core)[..], [Io::Publish { .. }]));
    core.handle_io_done(
        now,
        Done::Published {
            saga_id: id.clone(),
            result: Ok(Vec::new()),
        },
    );
    assert_find_reply(&drain(&mut core)[0], &id);
    found(&mut core, now, &id, Ok(None));
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    let write = assert_write(&io[0], &id, 4);
    let record = Record::decode(&write.append.body).unwrap();
    assert_eq!(record.entry.cause, Cause::StepTimeout, "{:?}", record.entry);
    assert!(write.set_timer.is_some(), "the next wait has a timer");
    written(&mut core, now, &id, Ok(5));
    assert!(drain(&mut core).is_empty(), "a sweep settles nothing");
    core.handle_overdue(now + Ms::seconds(1), vec![(id.clone(), Some(timeout))]);
    assert!(
        drain(&mut core).is_empty(),
        "swept lately for the same timer"
    );

    // A failed wake is swept again once SWEEP_AGAIN has passed.
    let later = now + chrono::Duration::from_std(SWEEP_AGAIN).unwrap();
    core.handle_tick(later + Ms::days(1));
    core.handle_overdue(later, vec![(id.clone(), Some(timeout))]);
    assert_load(&drain(&mut core)[0], &id, false);
    loaded(&mut core, later, &id, Err(timed_out()));
    assert!(drain(&mut core).is_empty(), "nothing to nak or answer");
    assert!(!core.holds(&id));
}

/// Hole 14: a transition whose record is over the server's `max_payload` is
/// never stored however often it is retried: its input is dead-lettered with
/// the reason (a caller is refused), not nak'd forever.
#[test]
fn a_record_over_max_payload_dead_letters_its_input() {
    let too_large = || {
        Error::Store(store::Error::Append(PublishError::new(
            PublishErrorKind::MaxPayloadExceeded,
        )))
    };
    let mut core = core();
    let saga = stored("big", 2);
    let id = saga.record.saga.id.clone();
    reserved(&mut core, at(0), &id, 1, 1);
    assert_load(&drain(&mut core)[0], &id, false);
    loaded(&mut core, at(0), &id, Ok(Some(saga)));
    assert_write(&drain(&mut core)[0], &id, 2);
    written(&mut core, at(0), &id, Err(too_large()));
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    assert_dead_letter(&io[0], 1, Source::Replies, "max_payload");

    core.handle_input(at(1), api_start("big-start", 7));
    let start_id = protocol::saga_id(TYPE, "big-start");
    assert_load(&drain(&mut core)[0], &start_id, false);
    loaded(&mut core, at(1), &start_id, Ok(None));
    assert_write(&drain(&mut core)[0], &start_id, 0);
    written(&mut core, at(1), &start_id, Err(too_large()));
    let (caller, result) = started(drain(&mut core).pop().unwrap());
    assert_eq!(caller, 7);
    let error = result.unwrap_err();
    assert_eq!(error.kind(), super::super::ErrorKind::BadRequest, "{error}");
    assert!(error.to_string().contains("max_payload"), "{error}");
}

/// Hole 14: messages held by the core (waiting for their saga's I/O, or queued
/// behind it) are marked in progress every third of `ack_wait`, so overload
/// does not make JetStream redeliver them while they wait; callers are not.
#[test]
fn held_messages_are_kept_in_progress() {
    let mut core = core().with_ack_wait(std::time::Duration::from_secs(30));
    let saga = stored("busy", 2);
    let id = saga.record.saga.id.clone();
    reserved(&mut core, at(0), &id, 1, 1);
    reserved(&mut core, at(1_000), &id, 1, 2);
    core.handle_input(at(1_000), api_input(&id, Input::Wake, 9));
    assert_load(&drain(&mut core)[0], &id, false);
    let progress = |io: Vec<Io<Test>>| -> Vec<u32> {
        io.into_iter()
            .map(|io| match io {
                Io::Progress { message } => message,
                other => panic!("expected only progress, got {other:?}"),
            })
            .collect()
    };
    core.handle_tick(at(9_000));
    assert!(drain(&mut core).is_empty(), "not held long enough yet");
    core.handle_tick(at(10_500));
    assert_eq!(progress(drain(&mut core)), vec![1], "the one in progress");
    core.handle_tick(at(11_000));
    assert_eq!(progress(drain(&mut core)), vec![2], "the queued one");
    core.handle_tick(at(15_000));
    assert!(drain(&mut core).is_empty(), "marked lately");
    core.handle_tick(at(21_000));
    assert_eq!(progress(drain(&mut core)), vec![1, 2]);
    // Once settled, a message is not marked any more.
    loaded(&mut core, at(21_000), &id, Ok(Some(saga)));
    drain(&mut core);
    written(&mut core, at(21_000), &id, Ok(3));
    let io = drain(&mut core);
    assert_settled(&io[0], 1, Settle::Ack);
    core.handle_tick(at(60_000));
    assert_eq!(
        progress(drain(&mut core)),
        vec![2],
        "only the one still held"
    );
}

/// Found by the chaos runner's long profile: a wake or a redelivered reply of a finished
/// saga re-published its completion event, and past JetStream's 2-minute de-duplication
/// window the events stream stored `order.confirmed` a second time. Inside the window a
/// re-publish is what completes a transition interrupted before its event went out (and the
/// server drops a copy); past it the event is taken as sent.
#[test]
fn a_finished_saga_republishes_its_event_only_inside_the_dedup_window() {
    let dedup = i64::try_from(jetsaga_sagas::streams::DEDUP.as_millis()).unwrap();
    for (late_by, republished) in [(1_000, true), (dedup + 1_000, false)] {
        for timer_fire in [false, true] {
            let mut core = core();
            let done = completed("kz", 9);
            let id = done.record.saga.id.clone();
            let now = done.record.entry.at + Ms::milliseconds(late_by);
            if timer_fire {
                let subject = protocol::subject::timer_fire(&id);
                message(&mut core, now, Source::Timers, &subject, b"", 1, 1);
            } else {
                reserved(&mut core, now, &id, 2, 1);
            }
            assert_load(&drain(&mut core)[0], &id, false);
            loaded(&mut core, now, &id, Ok(Some(done)));
            let io = drain(&mut core);
            assert_eq!(
                io.iter().any(|io| matches!(io, Io::Publish { .. })),
                republished,
                "{late_by} ms after the record, timer fire {timer_fire}: {io:?}"
            );
        }
    }
}

/// Found in the cluster chaos runs: a completed saga with no `order.confirmed`.
/// The transition that completed it was stored but its event publish failed;
/// the completing reply's redeliveries failed too (node kills, leader
/// elections) until the dedup window had passed, and then the event was taken
/// as sent. Past the window, a redelivery of the reply that finished the saga
/// still re-publishes its events — also behind an ignored input's record; a
/// first delivery of it (a duplicate the participant sent) does not.
#[test]
fn the_redelivered_reply_that_finished_a_saga_republishes_its_event_past_the_window() {
    let dedup = chrono::Duration::from_std(jetsaga_sagas::streams::DEDUP).unwrap();
    let done = completed("late-event", 9);
    let id = done.record.saga.id.clone();
    let finishing = done.record.entry.command_id.clone().unwrap();
    let late_ignored = {
        let saga = done.record.saga.clone();
        let input = Input::Reply {
            command_id: format!("{id}:reserve-stock:do:1"),
            outcome: Outcome::Ok { result: json!({}) },
        };
        let entry = saga.ignored_entry(&input, &Rejected::Finished, done.record.entry.at);
        let record = Record::next(
            Some(&done.record),
            entry,
            saga,
            done.record.effects.clone(),
            None,
        );
        Stored { record, seq: 10 }
    };
    for (stored, delivered, republished) in [
        (&done, 2, true),
        (&done, 1, false),
        (&late_ignored, 3, true),
    ] {
        let now = stored.record.entry.at + dedup + Ms::seconds(5);
        let event = finishing_reply_republishes(now, stored, &finishing, delivered, None);
        assert_eq!(event, republished, "delivery {delivered}");
    }
}

/// Whether the reply `finishing` of `stored`'s saga, delivered `delivered` times (stored by the
/// server at `stored_at`) and applied at `now`, re-publishes `order.confirmed`.
fn finishing_reply_republishes(
    now: DateTime<Utc>,
    stored: &Stored,
    finishing: &str,
    delivered: u64,
    stored_at: Option<DateTime<Utc>>,
) -> bool {
    let mut core = core();
    let id = stored.record.saga.id.clone();
    let reply = Reply {
        protocol: VERSION,
        command_id: finishing.to_owned(),
        saga_id: id.clone(),
        outcome: Outcome::Ok { result: json!({}) },
    }
    .encode();
    let subject = protocol::subject::reply("inventory", finishing);
    core.handle_message(
        now,
        Incoming {
            source: Source::Replies,
            subject: &subject,
            payload: &reply,
            traceparent: None,
            delivered: Some(delivered),
            stored_at,
            message: 1,
        },
    );
    assert_load(&drain(&mut core)[0], &id, false);
    loaded(&mut core, now, &id, Ok(Some(stored.clone())));
    drain(&mut core).iter().any(|io| match io {
        Io::Publish { messages, .. } => messages
            .iter()
            .any(|m| m.subject == protocol::subject::event("order.confirmed")),
        _ => false,
    })
}

/// The long chaos profile stored 107 terminal events twice: participants' copies of a
/// finishing reply (an answer to a redelivered command), stored 2.5 minutes after the saga
/// finished and then redelivered themselves, were taken for the finishing reply's own
/// redelivery and re-published the event past the dedup window. A reply stored after the
/// finish is not the one that finished it; the one stored before still re-publishes.
#[test]
fn a_copy_of_the_finishing_reply_stored_after_the_finish_republishes_nothing() {
    let dedup = chrono::Duration::from_std(jetsaga_sagas::streams::DEDUP).unwrap();
    let done = completed("late-copy", 9);
    let finishing = done.record.entry.command_id.clone().unwrap();
    let finished_at = done.record.entry.at;
    let now = finished_at + dedup + Ms::seconds(40);
    for (stored_at, republished) in [
        (finished_at - Ms::milliseconds(20), true),
        (finished_at + Ms::seconds(150), false),
    ] {
        let event = finishing_reply_republishes(now, &done, &finishing, 2, Some(stored_at));
        assert_eq!(event, republished, "stored at {stored_at}");
    }
}

/// Issue 10 hole 6: under R3 a load is a direct get that a lagging replica may serve. A
/// reply for a saga the replica does not know yet (it was started a moment ago, or the
/// replica's node has just restarted) must not be dead-lettered from that answer, nor an
/// operator's retry refused from a replica's old copy: decisions that write nothing are
/// taken from the leader. (Writes need no second read: compare-and-set catches a stale copy.)
#[test]
fn decisions_that_write_nothing_are_not_taken_from_a_replica() {
    let mut core = core();
    let saga = stored("r", 5);
    let id = saga.record.saga.id.clone();

    // A replica has no record yet: the reply is read again from the leader, which has it.
    reserved(&mut core, at(0), &id, 1, 30);
    assert_load(&drain(&mut core)[0], &id, false);
    loaded(&mut core, at(1), &id, Ok(None));
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    assert_load(&io[0], &id, true);
    loaded(&mut core, at(2), &id, Ok(Some(saga)));
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    assert_write(&io[0], &id, 5);
    written(&mut core, at(3), &id, Ok(6));
    assert_settled(&drain(&mut core)[0], 30, Settle::Ack);

    // A running saga's copy from a replica refuses an operator's retry: the leader decides
    // (here it agrees, and the caller hears it once).
    let mut other = stored("s", 3);
    // Its effects were acknowledged: re-publishing them restarts no wait.
    other.record.effects.clear();
    let other_id = other.record.saga.id.clone();
    core.handle_input(
        at(4),
        api_input(
            &other_id,
            Input::Retry {
                operator: "ana".into(),
            },
            31,
        ),
    );
    assert_load(&drain(&mut core)[0], &other_id, false);
    loaded(&mut core, at(5), &other_id, Ok(Some(other.clone())));
    // An operator's input first completes the record's effects (they may never have been
    // sent), then decides.
    assert!(
        matches!(&drain(&mut core)[..], [Io::Publish { .. }]),
        "a re-publish"
    );
    core.handle_io_done(
        at(5),
        Done::Published {
            saga_id: other_id.clone(),
            result: Ok(Vec::new()),
        },
    );
    let io = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    assert_load(&io[0], &other_id, true);
    loaded(&mut core, at(6), &other_id, Ok(Some(other)));
    let io: Vec<_> = drain(&mut core);
    assert_eq!(io.len(), 1, "{io:?}");
    assert!(
        matches!(
            &io[0],
            Io::Answer(Answer::Phase(31, Err(ApiError::NotAllowed(_))))
        ),
        "{io:?}"
    );
}

/// A wake that re-publishes a loaded record's command (it may never have gone
/// out) restarts the command's wait only if JetStream stored it as new: a
/// duplicate went out when it was recorded, so its timeout stands, and no
/// `resent` record is written (every hand-over between instances wrote one,
/// each pushing the timeout back).
#[test]
fn a_republished_command_that_went_out_before_keeps_its_timeout() {
    let mut core = core();
    let saga = stored("went-out", 4);
    let id = saga.record.saga.id.clone();
    let command = format!("{id}:reserve-stock:do:1");
    let now = saga.record.timer_at.unwrap() + Ms::milliseconds(1);
    let subject = protocol::subject::timer_fire(&id);
    message(&mut core, now, Source::Timers, &subject, b"", 1, 1);
    assert_load(&drain(&mut core)[0], &id, false);
    loaded(&mut core, now, &id, Ok(Some(saga)));
    match &drain(&mut core)[..] {
        [Io::Publish { messages, .. }] => assert_eq!(messages[0].msg_id, command),
        other => panic!("expected a re-publish, got {other:?}"),
    }
    core.handle_io_done(
        now,
        Done::Published {
            saga_id: id.clone(),
            result: Ok(vec![command]),
        },
    );
    // No renewed wait: the timeout is due, and looks for the reply first.
    assert_find_reply(&drain(&mut core)[0], &id);
    found(&mut core, now, &id, Ok(None));
    let io = drain(&mut core);
    let write = assert_write(&io[0], &id, 4);
    let record = Record::decode(&write.append.body).unwrap();
    assert_eq!(record.entry.cause, Cause::StepTimeout, "{:?}", record.entry);
}

/// Found by the chaos runner's long profile with reply copies: a late reply of a finished
/// saga is journaled as an `ignored` record that carries the finishing record's effects (its
/// event among them), with that input's time. The window for re-publishing the event was
/// measured from the last record, so each late copy extended it, and a redelivered input more
/// than 2 minutes after the saga finished re-published `order.confirmed`, which the events
/// stream stored a second time. The window runs from when the saga finished.
#[test]
fn an_ignored_record_after_the_finish_does_not_extend_the_republish_window() {
    let dedup = i64::try_from(jetsaga_sagas::streams::DEDUP.as_millis()).unwrap();
    let mut done = completed("kl", 9);
    let id = done.record.saga.id.clone();
    let finished = done.record.entry.at;
    let late = Input::Reply {
        command_id: format!("{id}:take-payment:do:1"),
        outcome: Outcome::Ok { result: json!({}) },
    };
    let entry = done.record.saga.ignored_entry(
        &late,
        &jetsaga_sagas::Rejected::Finished,
        finished + Ms::milliseconds(100_000),
    );
    let saga = done.record.saga.clone();
    let effects = done.record.effects.clone();
    assert!(!effects.is_empty(), "the ignored record carries the event");
    done.record = Record::next(Some(&done.record), entry, saga, effects, None);
    for (late_by, republished) in [(1_000, true), (dedup + 1_000, false)] {
        let mut core = core();
        let now = finished + Ms::milliseconds(late_by);
        reserved(&mut core, now, &id, 2, 1);
        assert_load(&drain(&mut core)[0], &id, false);
        loaded(&mut core, now, &id, Ok(Some(done.clone())));
        let io = drain(&mut core);
        assert_eq!(
            io.iter().any(|io| matches!(io, Io::Publish { .. })),
            republished,
            "{late_by} ms after the saga finished: {io:?}"
        );
    }
}
