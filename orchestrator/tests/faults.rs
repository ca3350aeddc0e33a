//! The orchestrator under injected faults, against a real nats-server: lost
//! timer fires, oversized records, dead letters of consumers nobody watched,
//! and the interleavings of issue 10's holes.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use jetsaga_orchestrator::Started;
use jetsaga_sagas::protocol::{self, Command};
use jetsaga_sagas::{Cause, Phase};
use jetsaga_testkit::{NatsServer, wait_until};

/// Hole 4: a saga whose timer fire was lost (the schedule is gone, as after an
/// outage dropped it) is woken by the sweep over the listing index, and its
/// step times out as it should: it does not wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_whose_timer_fire_was_lost_is_woken() {
    let server = NatsServer::start();
    let dir = fast_order_dir();
    let running = orchestrator_with(&server.url(), Some(dir.path()), |c| {
        c.engine.timer_sweep = Duration::from_secs(1);
    })
    .await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    // The reserve is never answered: only its timeout moves the saga on.
    let inventory = Responder::start(
        &js,
        "inventory",
        Arc::new(|c: &Command| if c.action == "reserve" { vec![] } else { ok() }),
    )
    .await;
    let Started { saga_id, .. } = handle
        .start("fast-order", "lost-timer", order("tok_ok"))
        .await
        .unwrap();
    wait_until("the reserve is sent", WAIT, || async {
        inventory.commands().iter().any(|c| c.saga_id == saga_id)
    })
    .await;
    // The timer is armed before the command goes out: drop it.
    let timers = js
        .get_stream(jetsaga_sagas::streams::TIMERS.name)
        .await
        .unwrap();
    let purged = timers
        .purge()
        .filter(protocol::subject::timer_set(&saga_id))
        .await
        .unwrap();
    assert_eq!(purged.purged, 1, "the saga's timer schedule was dropped");

    let saga = wait_phase(&handle, &saga_id, Phase::Compensated).await;
    let journal = handle.journal(&saga_id).await.unwrap();
    assert!(
        journal.iter().any(|e| e.cause == Cause::StepTimeout),
        "the reserve timed out: {journal:?}"
    );
    assert_eq!(saga.steps[0].attempts, 1);
    running.shutdown().await;
}

/// Hole 14: an event that exhausted the `notification` consumer's deliveries
/// while no orchestrator was running is dead-lettered once one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliveries_of_any_consumer_are_dead_lettered_even_when_nobody_listened() {
    use async_nats::jetstream::{AckKind, consumer};
    let server = NatsServer::start();
    // Provision, then stop: nobody listens to advisories while the event fails.
    orchestrator(&server.url(), None).await.shutdown().await;
    let js = js(&server).await;
    let events = js
        .get_stream(jetsaga_sagas::streams::EVENTS.name)
        .await
        .unwrap();
    let notification: consumer::PullConsumer = events
        .create_consumer(consumer::pull::Config {
            durable_name: Some("notification".to_owned()),
            ack_wait: Duration::from_secs(1),
            max_deliver: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    publish_stored(&js, "saga.event.order.confirmed", b"{}".to_vec()).await;
    let delivered = Arc::new(std::sync::atomic::AtomicU32::new(0));
    wait_until("the event exhausted its deliveries", WAIT, || {
        let notification = notification.clone();
        let delivered = delivered.clone();
        async move {
            use std::sync::atomic::Ordering;
            let mut batch = notification
                .fetch()
                .max_messages(1)
                .expires(Duration::from_millis(300))
                .messages()
                .await
                .unwrap();
            while let Some(Ok(m)) = futures::StreamExt::next(&mut batch).await {
                delivered.fetch_add(1, Ordering::SeqCst);
                m.ack_with(AckKind::Nak(None)).await.unwrap();
            }
            let info = notification.clone().info().await.unwrap().clone();
            delivered.load(Ordering::SeqCst) >= 2
                && info.num_pending == 0
                && info.num_ack_pending == 0
        }
    })
    .await;

    let running = orchestrator(&server.url(), None).await;
    wait_until("the event is dead-lettered", WAIT, || async {
        dead_letters(&js).await.iter().any(|(subject, reason)| {
            subject == "saga.dead.maxdeliver.notification" && reason.contains("max deliveries (2)")
        })
    })
    .await;
    running.shutdown().await;
}

/// Hole 14: a reply whose transition's record would be over the server's
/// `max_payload` (the reply and the start each fit; the record carries both,
/// and records are compressed, so both are near-incompressible) is
/// dead-lettered with the reason instead of being nak'd forever, and the saga
/// moves on from its timeout: it compensates, it is not stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_max_payload_is_dead_lettered_not_retried_forever() {
    let server = NatsServer::start_with(jetsaga_testkit::Options {
        extra_config: "max_payload: 16384\n".to_owned(),
        ..Default::default()
    });
    let dir = fast_order_dir();
    let running = orchestrator(&server.url(), Some(dir.path())).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let result = incompressible(14_000, 2);
    let _inventory = Responder::start(
        &js,
        "inventory",
        Arc::new(move |c: &Command| {
            if c.action == "reserve" {
                vec![protocol::Outcome::Ok {
                    result: serde_json::json!({ "note": result }),
                }]
            } else {
                ok()
            }
        }),
    )
    .await;
    let mut input = order("tok_ok");
    input["customer_id"] = incompressible(14_000, 1).into();
    let start = protocol::Start {
        protocol: protocol::VERSION,
        key: "huge".to_owned(),
        input: input.clone(),
        requested_at: None,
    };
    assert!(
        protocol::Body::encode(&start).len() < 16_000,
        "the start itself fits"
    );
    let Started { saga_id, .. } = handle.start("fast-order", "huge", input).await.unwrap();
    wait_until("the reply is dead-lettered", WAIT, || async {
        dead_letters(&js).await.iter().any(|(subject, reason)| {
            subject == "saga.dead.orchestrator.replies" && reason.contains("max_payload")
        })
    })
    .await;
    wait_until(
        "the saga compensates after its reserve's timeout",
        WAIT,
        || async {
            handle
                .saga(&saga_id)
                .await
                .unwrap()
                .is_some_and(|s| s.phase() == Phase::Compensated)
        },
    )
    .await;
    let saga = handle.saga(&saga_id).await.unwrap().unwrap();
    let journal = handle.journal(&saga_id).await.unwrap();
    assert!(
        journal.iter().any(|e| e.cause == Cause::StepTimeout),
        "the reserve timed out: {journal:?}"
    );
    assert!(saga.steps[0].result.is_none(), "the reply was not applied");
    running.shutdown().await;
}

/// `len` printable ASCII characters (no quote, no backslash) that zstd barely
/// compresses: a xorshift stream from `seed`, ~6.5 bits of entropy per byte.
fn incompressible(len: usize, seed: u64) -> String {
    let alphabet: Vec<u8> = (b' '..=b'~')
        .filter(|b| *b != b'"' && *b != b'\\')
        .collect();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            alphabet[(state % alphabet.len() as u64) as usize] as char
        })
        .collect()
}

/// Waits until the start consumer has settled every start it was given.
async fn starts_settled(js: &async_nats::jetstream::Context) {
    let stream = js
        .get_stream(jetsaga_sagas::streams::STARTS.name)
        .await
        .unwrap();
    wait_until("every start is settled", WAIT, || async {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .get_consumer(jetsaga_orchestrator::provision::STARTS_CONSUMER)
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
}

fn probe_event() -> protocol::Event {
    protocol::Event {
        protocol: protocol::VERSION,
        event: "probe".to_owned(),
        saga_id: "probe".to_owned(),
        saga_type: "probe".to_owned(),
        key: "probe".to_owned(),
        input: serde_json::json!({}),
        occurred_at: chrono::Utc::now(),
    }
}

/// Hole 13: the same start of a finished saga again, past JetStream's
/// de-duplication (another message id, as after the 2-minute window), changes
/// nothing: no second `order.confirmed` is published, no journal record added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_start_of_a_finished_saga_changes_nothing() {
    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let _inventory = Responder::start(&js, "inventory", by_card()).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;
    // Every publish, also one the events stream would drop as a duplicate
    // inside its window: past the window it would be stored.
    let seen = events(&server).await;
    let start = protocol::Start {
        protocol: protocol::VERSION,
        key: "again".to_owned(),
        input: order("tok_ok"),
        requested_at: None,
    };
    let body = protocol::Body::encode(&start);
    let publish = |msg_id: &'static str| {
        let (js, body) = (js.clone(), body.clone());
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(protocol::header::MSG_ID, msg_id);
            js.publish_with_headers(
                protocol::subject::start("order-creation"),
                headers,
                body.into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    };
    publish("first").await;
    let saga_id = protocol::saga_id("order-creation", "again");
    wait_until("the saga completes", WAIT, || async {
        handle
            .saga(&saga_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|s| s.phase() == Phase::Completed)
    })
    .await;
    let confirmed = || {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|e| e.saga_id == saga_id && e.event == "order.confirmed")
            .count()
    };
    wait_until("order.confirmed is published", WAIT, || async {
        confirmed() == 1
    })
    .await;
    let journal = handle.journal(&saga_id).await.unwrap().len();

    publish("second").await;
    publish("third").await;
    starts_settled(&js).await;
    // A later event seen means the subscription saw everything before it.
    let probe = protocol::Body::encode(&probe_event());
    publish_stored(&js, "saga.event.probe", probe).await;
    wait_until("the probe event is seen", WAIT, || async {
        seen.lock().unwrap().iter().any(|e| e.event == "probe")
    })
    .await;
    assert_eq!(confirmed(), 1, "no second order.confirmed");
    assert_eq!(handle.journal(&saga_id).await.unwrap().len(), journal);
    running.shutdown().await;
}
