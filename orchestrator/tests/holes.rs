//! Issue 10's holes 1, 7, 9, 11 and the late success of hole 14, and the re-publish window of a
//! finished saga after a late reply (found by the chaos runner), end to end:
//! each fault is injected for real against a real nats-server and the real
//! orchestrator (the library's `Service`), and each test failed before its fix.
//!
//! A lost publish is injected by moving a stream's subjects aside for a while:
//! the journal append succeeds, the command or event publish after it finds no
//! stream (as when the instance dies between the two, or the stream is
//! unavailable), and the input is nak'd.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use futures::StreamExt;
use jetsaga_orchestrator::provision;
use jetsaga_sagas::protocol::{self, Body, Command, Direction};
use jetsaga_sagas::{Cause, Phase, streams};
use jetsaga_testkit::{NatsServer, wait_until};

/// Points stream `name` at `subjects` (`None`: back at its own): publishes to
/// its real subjects find no stream while they are moved aside.
async fn move_subjects(js: &jetstream::Context, spec: &streams::Spec, moved: bool) {
    jetsaga_testkit::move_subjects(js, spec.name, moved)
        .await
        .unwrap();
}

/// How many `event`s of `saga_id` the events stream stores.
async fn stored_events(js: &jetstream::Context, saga_id: &str, event: &str) -> usize {
    let mut stream = js.get_stream(streams::EVENTS.name).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let subject = protocol::subject::event(event);
    let mut count = 0;
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await
            && m.subject.as_str() == subject
            && protocol::Event::decode(&m.payload).is_ok_and(|e| e.saga_id == saga_id)
        {
            count += 1;
        }
    }
    count
}

/// Waits until the orchestrator consumer `name` of stream `spec` has settled
/// everything it was given.
async fn settled(js: &jetstream::Context, spec: &streams::Spec, name: &str) {
    let stream = js.get_stream(spec.name).await.unwrap();
    wait_until(&format!("{name} has settled everything"), WAIT, || async {
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer(name).await.unwrap();
        let info = consumer.info().await.unwrap();
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
}

/// Waits until the saga's last journal entry has `cause`.
async fn last_cause(handle: &jetsaga_orchestrator::Handle, saga_id: &str, cause: Cause) {
    wait_until(
        &format!("the journal ends with {cause:?}"),
        WAIT,
        || async {
            handle
                .journal(saga_id)
                .await
                .is_ok_and(|j| j.last().is_some_and(|e| e.cause == cause))
        },
    )
    .await;
}

/// The first command the responder saw with this saga, step and direction.
fn seen(responder: &Responder, saga_id: &str, step: &str, direction: Direction) -> Option<Command> {
    responder.commands().into_iter().find(|c| {
        c.saga_id == saga_id
            && protocol::CommandId::parse(&c.command_id)
                .is_ok_and(|id| id.step == step && id.direction == direction)
    })
}

async fn wait_seen(
    responder: &Responder,
    saga_id: &str,
    step: &str,
    direction: Direction,
) -> Command {
    let what = format!("{step} {direction:?} is delivered");
    wait_until(&what, WAIT, || async {
        seen(responder, saga_id, step, direction).is_some()
    })
    .await;
    seen(responder, saga_id, step, direction).unwrap()
}

/// Publishes an ok reply to `command`, as its participant would.
async fn answer_ok(js: &jetstream::Context, command: &Command) {
    publish_reply(
        js,
        command,
        protocol::Outcome::Ok {
            result: serde_json::json!({}),
        },
    )
    .await;
}

/// Answers everything ok but the actions named, which get no answer.
fn silent_on(actions: &'static [&'static str]) -> Behaviour {
    Arc::new(move |c: &Command| {
        if actions.contains(&c.action.as_str()) {
            vec![]
        } else {
            ok()
        }
    })
}

/// Hole 1, the event: the transition that completes the saga is appended but
/// its `order.confirmed` cannot be published (the events stream is away); a
/// duplicate of an earlier reply then arrives first and is journaled as
/// ignored. When the completing reply comes back the event is still sent, and
/// stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_lost_behind_an_ignored_reply_is_still_sent() {
    let server = NatsServer::start();
    let dir = fast_order_dir();
    let running = orchestrator(&server.url(), Some(dir.path())).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let inventory = Responder::start(&js, "inventory", silent_on(&["commit"])).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;
    let saga_id = handle
        .start("fast-order", "lost-event", order("tok_ok"))
        .await
        .unwrap()
        .saga_id;
    let commit = wait_seen(&inventory, &saga_id, "confirm-order", Direction::Forward).await;
    let reserve = seen(&inventory, &saga_id, "reserve-stock", Direction::Forward).unwrap();

    move_subjects(&js, &streams::EVENTS, true).await;
    answer_ok(&js, &commit).await;
    wait_phase(&handle, &saga_id, Phase::Completed).await;
    // A late duplicate of the reserve's reply, first delivered while the
    // completing reply waits for its redelivery.
    answer_ok(&js, &reserve).await;
    last_cause(&handle, &saga_id, Cause::Ignored).await;
    assert_eq!(stored_events(&js, &saga_id, "order.confirmed").await, 0);
    move_subjects(&js, &streams::EVENTS, false).await;

    wait_until("order.confirmed is stored", WAIT, || async {
        stored_events(&js, &saga_id, "order.confirmed").await > 0
    })
    .await;
    settled(&js, &streams::REPLIES, provision::REPLIES_CONSUMER).await;
    assert_eq!(stored_events(&js, &saga_id, "order.confirmed").await, 1);
    running.shutdown().await;
}

/// Hole 1, the command: the reserve's success is appended with the charge to
/// send, but the charge cannot be published (the commands stream is away); a
/// duplicate of the reserve's reply arrives first and is journaled as ignored.
/// The charge is still delivered, once its stream is back, and the saga
/// completes on its first payment attempt: no step timeout, no compensation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_lost_behind_an_ignored_reply_is_still_sent() {
    let server = NatsServer::start();
    let dir = fast_order_dir();
    let running = orchestrator(&server.url(), Some(dir.path())).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let inventory = Responder::start(&js, "inventory", silent_on(&["reserve"])).await;
    let payment = Responder::start(&js, "payment", by_card()).await;
    let saga_id = handle
        .start("fast-order", "lost-command", order("tok_ok"))
        .await
        .unwrap()
        .saga_id;
    let reserve = wait_seen(&inventory, &saga_id, "reserve-stock", Direction::Forward).await;

    move_subjects(&js, &streams::COMMANDS, true).await;
    answer_ok(&js, &reserve).await;
    wait_until("the reserve's success is journaled", WAIT, || async {
        handle
            .saga(&saga_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|s| s.steps[1].attempts == 1)
    })
    .await;
    answer_ok(&js, &reserve).await;
    last_cause(&handle, &saga_id, Cause::Ignored).await;
    assert!(seen(&payment, &saga_id, "take-payment", Direction::Forward).is_none());
    move_subjects(&js, &streams::COMMANDS, false).await;

    wait_all_terminal(&handle, std::slice::from_ref(&saga_id)).await;
    let saga = saga(&handle, &saga_id).await;
    let journal = handle.journal(&saga_id).await.unwrap();
    let causes: Vec<_> = journal.iter().map(|e| e.cause).collect();
    assert_eq!(saga.phase(), Phase::Completed, "{causes:?}");
    assert_eq!(saga.steps[1].attempts, 1, "{:?}", saga.steps[1]);
    assert!(
        !journal.iter().any(|e| e.cause == Cause::StepTimeout),
        "{journal:?}"
    );
    assert_eq!(
        payment.distinct_by_saga()[&saga_id],
        [format!("{saga_id}:take-payment:do:1")]
    );
    running.shutdown().await;
}

/// Hole 7: the instance stops between the start's append and its command's
/// publish (the commands stream refuses it, then the instance is gone), so
/// nothing but the step's timer, armed before the append, is left to recover
/// the saga. That timer fires at the step timeout while no orchestrator runs;
/// the next instance re-sends the reserve and gives it its full timeout: the
/// saga completes on its first attempt, with no step timeout and no
/// compensation, and the journal says the command was re-sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_recovered_after_a_crash_gets_its_full_timeout() {
    let server = NatsServer::start();
    let dir = fast_order_dir();
    let js = js(&server).await;
    let first = orchestrator(&server.url(), Some(dir.path())).await;
    move_subjects(&js, &streams::COMMANDS, true).await;
    let saga_id = protocol::saga_id("fast-order", "crashed");
    let refused = first
        .handle()
        .start("fast-order", "crashed", order("tok_ok"))
        .await;
    assert!(
        refused.is_err(),
        "the command could not be stored: {refused:?}"
    );
    let saga = first
        .handle()
        .saga(&saga_id)
        .await
        .unwrap()
        .expect("appended");
    assert_eq!(saga.steps[0].attempts, 1);
    first.shutdown().await;

    // The reserve's timeout fires with nobody listening.
    let timers = js.get_stream(streams::TIMERS.name).await.unwrap();
    let fire = protocol::subject::timer_fire(&saga_id);
    wait_until("the step timeout has fired", WAIT, || async {
        timers.get_last_raw_message_by_subject(&fire).await.is_ok()
    })
    .await;
    move_subjects(&js, &streams::COMMANDS, false).await;
    let _inventory = Responder::start(&js, "inventory", by_card()).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;
    let second = orchestrator(&server.url(), Some(dir.path())).await;
    let handle = second.handle().clone();

    wait_all_terminal(&handle, std::slice::from_ref(&saga_id)).await;
    let saga = common::saga(&handle, &saga_id).await;
    let journal = handle.journal(&saga_id).await.unwrap();
    let causes: Vec<_> = journal.iter().map(|e| e.cause).collect();
    assert_eq!(saga.phase(), Phase::Completed, "{causes:?}");
    assert_eq!(saga.steps[0].attempts, 1, "the crash cost no attempt");
    assert!(causes.contains(&Cause::Resent), "{causes:?}");
    assert!(!causes.contains(&Cause::StepTimeout), "{causes:?}");
    second.shutdown().await;
}

/// Hole 9: two instances. `a` parks two sagas as failed (their releases keep
/// failing) and keeps its copies; an operator retries both through `b`, which
/// then stops, so from here on only `a`, with its stale copies, is left.
/// - The retried release of one gets no answer and times out: its timer fires
///   at `a`, whose copy says "failed, no timer". The wake is applied from the
///   journal (the release is sent again and the saga is compensated), not
///   dropped as "nothing due" (which would leave it compensating with no timer
///   at all: `a`'s timer sweep is off here).
/// - An operator retry of the other through `a` is refused: the journal says
///   it is compensating already, whatever `a`'s copy says. (This held before
///   the fix too: accepting writes, and the compare-and-set write conflicts.)
///
/// The other direction, a retry refused because `a`'s copy is behind a park
/// that `b` wrote, needs `b` to take a reply or a timer fire that `a` does
/// not, and the two share their durable consumers: a test cannot steer that,
/// so `driver::core::tests::decisions_that_write_nothing_are_rechecked_against_the_journal`
/// covers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_copy_neither_drops_a_timer_nor_decides_an_operator_input() {
    let server = NatsServer::start();
    let dir = fast_order_dir();
    let js = js(&server).await;
    let a = orchestrator_with(&server.url(), Some(dir.path()), |c| {
        c.engine.timer_sweep = Duration::from_secs(3600);
    })
    .await;
    let inventory = Responder::start(&js, "inventory", releases_fail()).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;
    let mut ids = Vec::new();
    for key in ["stale-wake", "stale-retry"] {
        let started = a
            .handle()
            .start("fast-order", key, order("tok_decline"))
            .await
            .unwrap();
        ids.push(started.saga_id);
    }
    for id in &ids {
        wait_phase(a.handle(), id, Phase::Failed).await;
    }
    let (woken, retried) = (&ids[0], &ids[1]);

    inventory.set(silent_on(&["release"]));
    let b = orchestrator(&server.url(), Some(dir.path())).await;
    for id in &ids {
        assert_eq!(
            b.handle().retry(id, "ana").await.unwrap(),
            Phase::Compensating
        );
    }
    b.shutdown().await;

    let refused = a.handle().retry(retried, "ana").await;
    assert!(
        matches!(refused, Err(jetsaga_orchestrator::ApiError::NotAllowed(_))),
        "a retry of a compensating saga is refused: {refused:?}"
    );

    inventory.set(ok_behaviour());
    let saga = wait_phase(a.handle(), woken, Phase::Compensated).await;
    let journal = a.handle().journal(woken).await.unwrap();
    let causes: Vec<_> = journal.iter().map(|e| e.cause).collect();
    assert!(causes.contains(&Cause::StepTimeout), "{causes:?}");
    assert_eq!(saga.steps[0].compensation_attempts, 5, "{causes:?}");
    a.shutdown().await;
}

fn ok_behaviour() -> Behaviour {
    Arc::new(|_: &Command| ok())
}

/// Runs one order whose reserve is never answered (it times out, the stock is
/// released) on an orchestrator whose clock is `offset` off the server's, and
/// returns the saga and how many timers the orchestrator armed for it.
async fn timed_out_under_skew(offset: chrono::TimeDelta) -> (jetsaga_sagas::Saga, u64) {
    let server = NatsServer::start();
    let dir = fast_order_dir();
    let running = orchestrator_with(&server.url(), Some(dir.path()), |c| {
        c.engine.clock_offset = offset;
    })
    .await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let _inventory = Responder::start(&js, "inventory", silent_on(&["reserve"])).await;
    let saga_id = handle
        .start("fast-order", "skewed", order("tok_ok"))
        .await
        .unwrap()
        .saga_id;
    wait_until("the saga finishes", Duration::from_secs(120), || async {
        handle
            .saga(&saga_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|s| s.phase().is_finished())
    })
    .await;
    let saga = common::saga(&handle, &saga_id).await;
    let sets = handle
        .metrics()
        .timer_writes
        .with_label_values(&["set"])
        .get();
    running.shutdown().await;
    (saga, sets)
}

/// Hole 11, the orchestrator 30 s behind the server: every timer it arms for
/// "5 s from now" is in the server's past and fires at once, early by the
/// orchestrator's clock. It re-arms once, shifted by the skew the fire's own
/// server timestamp shows, never into a hot loop; the reserve still times out
/// on its first attempt and the saga is compensated. Timer writes: the
/// start's, one re-arm, the release's. (Re-arming from how early the timer
/// fired, the previous rule, made 21: a timer shorter than the skew fires at
/// once whatever it was armed for, and the re-check reload forgot the last
/// re-arm, so it looped at the scheduler's pace until the step was due.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_behind_the_server_rearms_a_bounded_number_of_times() {
    let (saga, sets) = timed_out_under_skew(chrono::TimeDelta::seconds(-30)).await;
    assert_eq!(saga.phase(), Phase::Compensated);
    assert_eq!(saga.steps[0].attempts, 1);
    assert!(
        sets <= 6,
        "{sets} timer writes for one step timeout and its release"
    );
}

/// Hole 11, the orchestrator 30 s ahead of the server: its timers fire 30 s
/// late by its clock, when they are due (the timer sweep, which finds them
/// overdue by its clock, wakes the saga first; that wake recovers like any
/// other and renews the reserve's wait once). Nothing is re-armed: the
/// start's timer, the renewed wait's and the release's; the saga is
/// compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_ahead_of_the_server_finishes_without_rearms() {
    let (saga, sets) = timed_out_under_skew(chrono::TimeDelta::seconds(30)).await;
    assert_eq!(saga.phase(), Phase::Compensated);
    assert_eq!(saga.steps[0].attempts, 1);
    assert!(
        sets <= 3,
        "{sets} timer writes for one step timeout and its release"
    );
}

/// Hole 14: the release's last attempt times out and the saga parks as
/// failed; then the release's success arrives (the participant was slow, not
/// down). The release did happen, so the saga is compensated: journaled as
/// the reply that moved it from failed, with `order.cancelled` published once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_success_of_the_last_compensation_compensates_a_failed_saga() {
    let server = NatsServer::start();
    let slow_release = FAST_ORDER
        .replace("name = \"fast-order\"", "name = \"slow-release\"")
        .replace("max-attempts = 3", "max-attempts = 2")
        .replacen("timeout = \"5s\"", "timeout = \"1s\"", 1);
    let dir = definitions_dir(&[("slow-release.toml", &slow_release), order_schema_file()]);
    let running = orchestrator(&server.url(), Some(dir.path())).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let inventory = Responder::start(&js, "inventory", silent_on(&["release"])).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;
    let saga_id = handle
        .start("slow-release", "late-release", order("tok_decline"))
        .await
        .unwrap()
        .saga_id;
    let parked = wait_phase(&handle, &saga_id, Phase::Failed).await;
    assert_eq!(parked.steps[0].compensation_attempts, 2);
    let last = inventory
        .commands()
        .into_iter()
        .find(|c| c.saga_id == saga_id && c.command_id.ends_with(":reserve-stock:undo:2"))
        .expect("the last release was sent");

    answer_ok(&js, &last).await;
    wait_phase(&handle, &saga_id, Phase::Compensated).await;
    let journal = handle.journal(&saga_id).await.unwrap();
    let entry = journal.last().unwrap();
    assert_eq!(entry.cause, Cause::ReplyOk);
    assert_eq!(
        (entry.from, entry.to),
        (Some(Phase::Failed), Phase::Compensated)
    );
    assert_eq!(entry.command_id.as_deref(), Some(last.command_id.as_str()));
    wait_until("order.cancelled is stored", WAIT, || async {
        stored_events(&js, &saga_id, "order.cancelled").await > 0
    })
    .await;
    settled(&js, &streams::REPLIES, provision::REPLIES_CONSUMER).await;
    assert_eq!(stored_events(&js, &saga_id, "order.cancelled").await, 1);
    running.shutdown().await;
}

/// A reply held by an instance that is stopped (it was delivered there and is
/// redelivered only after the ack wait) does not lose to the step timeout that
/// fires meanwhile at another instance: the timeout finds the reply stored and
/// applies it, and the saga completes on its first reserve attempt. Without the
/// look-up the reserve (one attempt allowed) timed out and the saga compensated
/// although inventory had answered in time. The reserve the second instance
/// re-publishes on its wake is a duplicate for JetStream, so it writes no
/// `resent` record (that pushed the timeout back on every hand-over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_timeout_applies_a_reply_held_by_a_stopped_instance() {
    let server = NatsServer::start();
    let dir = fast_order_dir();
    let js = js(&server).await;
    let first = orchestrator(&server.url(), Some(dir.path())).await;
    let inventory = Responder::start(&js, "inventory", silent_on(&["reserve"])).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;
    let saga_id = first
        .handle()
        .start("fast-order", "held-reply", order("tok_ok"))
        .await
        .unwrap()
        .saga_id;
    let reserve = wait_seen(&inventory, &saga_id, "reserve-stock", Direction::Forward).await;
    first.shutdown().await;

    // Inventory answers in time; the reply goes to an instance that stops
    // right after taking it (here: the test holds it, marking it in progress).
    answer_ok(&js, &reserve).await;
    let replies: jetstream::consumer::PullConsumer = js
        .get_stream(streams::REPLIES.name)
        .await
        .unwrap()
        .get_consumer(provision::REPLIES_CONSUMER)
        .await
        .unwrap();
    let held = replies
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .unwrap()
        .next()
        .await
        .expect("the reply is delivered")
        .unwrap();
    let keep = tokio_util::sync::CancellationToken::new();
    let holder = {
        let keep = keep.clone();
        tokio::spawn(async move {
            while !keep.is_cancelled() {
                held.ack_with(jetstream::AckKind::Progress).await.unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            held
        })
    };
    let timers = js.get_stream(streams::TIMERS.name).await.unwrap();
    let fire = protocol::subject::timer_fire(&saga_id);
    wait_until("the reserve's timeout has fired", WAIT, || async {
        timers.get_last_raw_message_by_subject(&fire).await.is_ok()
    })
    .await;

    let second = orchestrator(&server.url(), Some(dir.path())).await;
    let handle = second.handle().clone();
    wait_all_terminal(&handle, std::slice::from_ref(&saga_id)).await;
    let saga = common::saga(&handle, &saga_id).await;
    let causes: Vec<_> = handle
        .journal(&saga_id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.cause)
        .collect();
    assert_eq!(saga.phase(), Phase::Completed, "{causes:?}");
    assert!(!causes.contains(&Cause::StepTimeout), "{causes:?}");
    // The second instance's wake re-published the reserve: JetStream had it,
    // so its wait was not restarted.
    assert!(!causes.contains(&Cause::Resent), "{causes:?}");
    assert_eq!(saga.steps[0].attempts, 1);

    // The held copy comes back as a duplicate and changes nothing.
    keep.cancel();
    holder
        .await
        .unwrap()
        .ack_with(jetstream::AckKind::Nak(None))
        .await
        .unwrap();
    last_cause(&handle, &saga_id, Cause::Ignored).await;
    assert_eq!(
        common::saga(&handle, &saga_id).await.phase(),
        Phase::Completed
    );
    second.shutdown().await;
}

/// The completion event must not be lost when the completing reply's
/// redeliveries take longer than JetStream's dedup window (2 min) — as under
/// repeated node loss. The completing transition is stored but its
/// `order.confirmed` cannot be published (the events stream is away); the
/// reply is nak'd and its instance stops. The next instance gets the
/// redelivery with its clock 3 min on (so the window has passed, without a
/// test that waits for it): the event is published once. Before, past the
/// window the event was taken as sent, and the saga stayed completed without
/// it. Two faults were in the way, both needed fixing: past the window only
/// the redelivered completing reply may re-publish (a timer fire or a late
/// duplicate may not), and here the confirm step's timer fires first (the
/// transition never cleared it), loads the record for the wake, and the reply
/// queued behind it was applied to that copy without the re-publish check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_event_lost_past_the_dedup_window_is_still_sent() {
    let server = NatsServer::start();
    let dir = fast_order_dir();
    let js = js(&server).await;
    let first = orchestrator(&server.url(), Some(dir.path())).await;
    let handle = first.handle().clone();
    let inventory = Responder::start(&js, "inventory", silent_on(&["commit"])).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;
    let saga_id = handle
        .start("fast-order", "event-past-window", order("tok_ok"))
        .await
        .unwrap()
        .saga_id;
    let commit = wait_seen(&inventory, &saga_id, "confirm-order", Direction::Forward).await;
    move_subjects(&js, &streams::EVENTS, true).await;
    answer_ok(&js, &commit).await;
    wait_phase(&handle, &saga_id, Phase::Completed).await;
    first.shutdown().await;
    move_subjects(&js, &streams::EVENTS, false).await;
    assert_eq!(stored_events(&js, &saga_id, "order.confirmed").await, 0);

    let second = orchestrator_with(&server.url(), Some(dir.path()), |c| {
        c.engine.clock_offset = chrono::TimeDelta::minutes(3);
    })
    .await;
    wait_until("order.confirmed is stored", WAIT, || async {
        stored_events(&js, &saga_id, "order.confirmed").await > 0
    })
    .await;
    settled(&js, &streams::REPLIES, provision::REPLIES_CONSUMER).await;
    assert_eq!(stored_events(&js, &saga_id, "order.confirmed").await, 1);
    second.shutdown().await;
}

/// Found by the chaos runner's long profile with reply copies: a late reply of a finished saga
/// is journaled as an `ignored` record that carries the finishing record's effects, and the
/// window for re-publishing a finished saga's event (JetStream's 2-minute duplicate window)
/// was measured from that record, so a timer fire or redelivery more than 2 minutes after the
/// finish re-published `order.confirmed` and the events stream stored it twice. Two minutes
/// pass here on the second orchestrator's clock (150 s ahead of the server's): the saga
/// finishes on the first, a late copy of a reply is ignored by the second, then a timer fire
/// reaches the second. The event must be published once; the server would drop a copy inside
/// its real window, so the test counts what the orchestrators publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_after_the_finish_does_not_reopen_the_republish_window() {
    let server = NatsServer::start();
    let dir = fast_order_dir();
    let js = js(&server).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut events = client
        .subscribe(protocol::subject::event("order.confirmed"))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let published = Arc::new(std::sync::Mutex::new(Vec::new()));
    let counter = {
        let published = published.clone();
        tokio::spawn(async move {
            while let Some(m) = events.next().await {
                if let Ok(event) = protocol::Event::decode(&m.payload) {
                    published.lock().unwrap().push(event.saga_id);
                }
            }
        })
    };
    let count = |id: &str| {
        published
            .lock()
            .unwrap()
            .iter()
            .filter(|s| *s == id)
            .count()
    };

    let first = orchestrator(&server.url(), Some(dir.path())).await;
    let inventory = Responder::start(&js, "inventory", ok_behaviour()).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;
    let saga_id = first
        .handle()
        .start("fast-order", "late-after-finish", order("tok_ok"))
        .await
        .unwrap()
        .saga_id;
    wait_phase(first.handle(), &saga_id, Phase::Completed).await;
    wait_until("order.confirmed is published", WAIT, || async {
        count(&saga_id) == 1
    })
    .await;
    settled(&js, &streams::REPLIES, provision::REPLIES_CONSUMER).await;
    first.shutdown().await;

    let ahead = orchestrator_with(&server.url(), Some(dir.path()), |c| {
        c.engine.clock_offset = chrono::TimeDelta::seconds(150);
    })
    .await;
    let reserve = seen(&inventory, &saga_id, "reserve-stock", Direction::Forward).unwrap();
    answer_ok(&js, &reserve).await;
    last_cause(ahead.handle(), &saga_id, Cause::Ignored).await;
    js.publish(protocol::subject::timer_fire(&saga_id), "".into())
        .await
        .unwrap()
        .await
        .unwrap();
    settled(&js, &streams::TIMERS, provision::TIMERS_CONSUMER).await;
    assert_eq!(count(&saga_id), 1, "order.confirmed published again");
    ahead.shutdown().await;
    counter.abort();
}
