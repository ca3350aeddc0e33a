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

async fn orchestrator_with(
    url: &str,
    definitions: Option<&std::path::Path>,
    tune: impl FnOnce(&mut jetsaga_orchestrator::config::Config),
) -> jetsaga_orchestrator::Running {
    let mut config = config(url, definitions);
    tune(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    jetsaga_orchestrator::Service::start_with_listener(config, listener)
        .await
        .expect("orchestrator starts")
}

fn fast_order_dir() -> tempfile::TempDir {
    definitions_dir(&[("fast-order.toml", FAST_ORDER), order_schema_file()])
}

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

/// Hole 14: a start whose first record would be over the server's
/// `max_payload` (the start message itself fits) is dead-lettered with the
/// reason instead of being nak'd forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_max_payload_is_dead_lettered_not_retried_forever() {
    let server = NatsServer::start_with(jetsaga_testkit::Options {
        extra_config: "max_payload: 16384\n".to_owned(),
        ..Default::default()
    });
    let running = orchestrator(&server.url(), None).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let mut input = order("tok_ok");
    input["customer_id"] = "c".repeat(15_000).into();
    let start = protocol::Start {
        protocol: protocol::VERSION,
        key: "huge".to_owned(),
        input,
        requested_at: None,
    };
    let body = protocol::Body::encode(&start);
    assert!(body.len() < 16_000, "the start itself fits: {}", body.len());
    publish_stored(&js, &protocol::subject::start("order-creation"), body).await;
    wait_until("the start is dead-lettered", WAIT, || async {
        dead_letters(&js).await.iter().any(|(subject, reason)| {
            subject == "saga.dead.orchestrator.starts" && reason.contains("max_payload")
        })
    })
    .await;
    let saga_id = protocol::saga_id("order-creation", "huge");
    assert!(handle.saga(&saga_id).await.unwrap().is_none());
    running.shutdown().await;
}
