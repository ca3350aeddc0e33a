//! Admission control against a real nats-server: past the bound on sagas under way, starts
//! wait in their stream (none lost) and API starts are refused with `Overloaded`; they run
//! once sagas finish.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use jetsaga_orchestrator::ApiError;
use jetsaga_sagas::Phase;
use jetsaga_sagas::protocol::{self, Command};
use jetsaga_testkit::{NatsServer, wait_until};

/// FAST_ORDER with a reserve that may take a minute: a silent inventory keeps sagas under way.
fn slow_reserve_dir() -> tempfile::TempDir {
    let slow = FAST_ORDER.replacen("timeout = \"5s\"", "timeout = \"60s\"", 1);
    assert_ne!(slow, FAST_ORDER, "the reserve's timeout is the first one");
    definitions_dir(&[("fast-order.toml", &slow), order_schema_file()])
}

async fn publish_start(js: &async_nats::jetstream::Context, key: &str) {
    let start = protocol::Start {
        protocol: protocol::VERSION,
        key: key.to_owned(),
        input: order("tok_ok"),
        requested_at: None,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(protocol::header::MSG_ID, key);
    js.publish_with_headers(
        protocol::subject::start("fast-order"),
        headers,
        protocol::Body::encode(&start).into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_wait_while_more_sagas_are_under_way_than_the_bound() {
    let server = NatsServer::start();
    let dir = slow_reserve_dir();
    let running = orchestrator_with(&server.url(), Some(dir.path()), |c| {
        c.engine.admission_window = Duration::from_secs(5);
        c.engine.admission_floor = 3;
    })
    .await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    // Reserves go unanswered until the test lets them through.
    let inventory = Responder::start(
        &js,
        "inventory",
        Arc::new(|c: &Command| if c.action == "reserve" { vec![] } else { ok() }),
    )
    .await;
    let _payment = Responder::start(&js, "payment", by_card()).await;
    wait_until("the listing caught up", WAIT, || async {
        handle.index().caught_up()
    })
    .await;

    // Three under way: the bound.
    let mut ids = Vec::new();
    for key in ["a1", "a2", "a3"] {
        let started = handle.start("fast-order", key, order("tok_ok")).await;
        ids.push(started.unwrap().saga_id);
    }
    wait_until("the gate closes", WAIT, || async {
        handle.metrics().admission_open.get() == 0
    })
    .await;
    assert_eq!(handle.metrics().admission_limit.get(), 3);
    // The API refuses a new start; a bad one is still named as bad.
    let refused = handle.start("fast-order", "b1", order("tok_ok")).await;
    assert!(
        matches!(refused, Err(ApiError::Overloaded(_))),
        "{refused:?}"
    );
    let mut bad = order("tok_ok");
    bad["items"] = serde_json::json!("none");
    assert!(matches!(
        handle.start("fast-order", "b2", bad).await,
        Err(ApiError::InvalidInput(_))
    ));

    // Starts on the subject are stored and wait: no saga is created for them.
    for i in 0..5 {
        publish_start(&js, &format!("queued-{i}")).await;
    }
    let queued: Vec<String> = (0..5)
        .map(|i| protocol::saga_id("fast-order", &format!("queued-{i}")))
        .collect();
    // Time for the orchestrator to have taken them, had the gate let it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in &queued {
        assert!(
            handle.saga(id).await.unwrap().is_none(),
            "saga {id} was started while the gate was closed"
        );
    }
    assert_eq!(handle.index().activity().0, 3);
    let reserves = inventory
        .commands()
        .iter()
        .filter(|c| c.action == "reserve")
        .count();
    assert_eq!(reserves, 3, "only the admitted sagas sent commands");
    // Commands expire after streams.command-ttl (10 minutes by default).
    let command = js
        .get_stream(jetsaga_sagas::streams::COMMANDS.name)
        .await
        .unwrap()
        .get_last_raw_message_by_subject("saga.cmd.inventory.reserve")
        .await
        .unwrap();
    assert_eq!(
        command
            .headers
            .get(protocol::header::TTL)
            .map(|v| v.as_str()),
        Some("600s")
    );

    // Sagas finish, the gate opens, the queued starts run to the end.
    inventory.set(by_card());
    for id in &ids {
        // Their reserves were taken and never answered: abort them (they compensate).
        handle
            .abort(id, "test: let the queue through", "test")
            .await
            .unwrap();
    }
    for id in ids.iter().chain(&queued) {
        wait_until(&format!("saga {id} finishes"), WAIT, || async {
            handle
                .saga(id)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| matches!(s.phase(), Phase::Completed | Phase::Compensated))
        })
        .await;
    }
    for id in &queued {
        assert_eq!(
            handle.saga(id).await.unwrap().unwrap().phase(),
            Phase::Completed
        );
    }
    assert_eq!(handle.metrics().admission_open.get(), 1);
    running.shutdown().await;
}

/// Streams are bounded by bytes and refuse new messages at the bound: from 90 % of it on,
/// new starts wait so that the sagas under way keep room for their commands and records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_wait_while_a_stream_is_near_its_byte_bound() {
    let server = NatsServer::start();
    let running = orchestrator_with(&server.url(), None, |c| {
        c.streams.max_bytes = bytesize::ByteSize::mib(1);
    })
    .await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    // 960 KiB of commands nobody takes: 94 % of the commands stream's bound.
    for _ in 0..15 {
        js.publish("saga.cmd.nobody.noop", vec![b'x'; 64 * 1024].into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_until("the gate closes", WAIT, || async {
        handle.metrics().admission_open.get() == 0
    })
    .await;
    match handle
        .start("order-creation", "full-1", order("tok_ok"))
        .await
    {
        Err(ApiError::Overloaded(why)) => assert!(
            why.contains("JETSAGA_COMMANDS") && why.contains("streams.max-bytes"),
            "{why}"
        ),
        other => panic!("a start near the bound was not refused: {other:?}"),
    }
    // Room again: starts are taken.
    js.get_stream(jetsaga_sagas::streams::COMMANDS.name)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    wait_until("the gate opens", WAIT, || async {
        handle.metrics().admission_open.get() == 1
    })
    .await;
    handle
        .start("order-creation", "full-2", order("tok_ok"))
        .await
        .unwrap();
    running.shutdown().await;
}
