//! What storage keeps: a finished saga is one rolled-up record that expires
//! after `streams.finished-retention`; a live or parked saga is kept however
//! long it lives.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::*;
use jetsaga_orchestrator::config::Config;
use jetsaga_orchestrator::{Running, Service, Started};
use jetsaga_sagas::protocol::{header, subject};
use jetsaga_sagas::{Cause, Phase};
use jetsaga_testkit::{NatsServer, wait_until};

async fn orchestrator_with(config: Config) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Service::start_with_listener(config, listener)
        .await
        .expect("orchestrator starts")
}

/// The journal messages a saga has now, with their headers.
async fn journal_messages(
    js: &jetstream::Context,
    saga_id: &str,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let stream = js
        .get_stream(jetsaga_sagas::streams::JOURNAL.name)
        .await
        .unwrap();
    let mut messages = Vec::new();
    let mut next = 0;
    while let Ok(m) = stream
        .direct_get_next_for_subject(subject::journal(saga_id), Some(next))
        .await
    {
        next = m.sequence + 1;
        messages.push(m);
    }
    messages
}

fn header_of<'a>(
    m: &'a async_nats::jetstream::message::StreamMessage,
    name: &str,
) -> Option<&'a str> {
    m.headers.get(name).map(|v| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_saga_is_one_record_with_its_whole_journal_then_expires() {
    let server = NatsServer::start();
    let mut config = config(&server.url(), None);
    config.streams.finished_retention = Duration::from_secs(2);
    let running = orchestrator_with(config).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let _inventory = Responder::start(&js, "inventory", by_card()).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;

    let done = start(&handle, "kept-1", order("tok_ok")).await;
    wait_phase(&handle, &done, Phase::Completed).await;

    // One message is left on the subject (each record replaced the one before):
    // the finished record, with a TTL and the listing headers.
    let messages = journal_messages(&js, &done).await;
    assert_eq!(messages.len(), 1, "the finished record replaced the others");
    let last = &messages[0];
    assert_eq!(header_of(last, header::ROLLUP), None, "no rollup purge");
    assert_eq!(header_of(last, header::TTL), Some("2s"));
    assert_eq!(header_of(last, header::PHASE), Some("completed"));
    assert_eq!(header_of(last, header::SAGA_TYPE), Some("order-creation"));
    assert_eq!(header_of(last, header::KEY), Some("kept-1"));
    assert_eq!(header_of(last, header::STEP), None);
    // ... and it still tells the whole story.
    let journal = handle.journal(&done).await.unwrap();
    assert_eq!(journal.first().map(|e| e.cause), Some(Cause::Start));
    assert_eq!(journal.last().map(|e| e.to), Some(Phase::Completed));
    assert_eq!(journal.len(), 4, "{journal:?}");

    // After the retention the saga is gone, subject and all.
    wait_until("the finished saga expires", WAIT, || async {
        handle.saga(&done).await.unwrap().is_none()
    })
    .await;
    assert!(journal_messages(&js, &done).await.is_empty());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_saga_outlives_retention_and_can_still_be_retried() {
    let server = NatsServer::start();
    let defs = definitions_dir(&[("fast.toml", FAST_ORDER), order_schema_file()]);
    let mut config = config(&server.url(), Some(defs.path()));
    config.streams.finished_retention = Duration::from_secs(1);
    let running = orchestrator_with(config).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let inventory = Responder::start(&js, "inventory", releases_fail()).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;

    let Started { saga_id: id, .. } = handle
        .start("fast-order", "parked-1", order("tok_decline"))
        .await
        .unwrap();
    wait_phase(&handle, &id, Phase::Failed).await;
    // A live saga is one record too, carrying every transition so far, and none expires.
    let messages = journal_messages(&js, &id).await;
    assert_eq!(messages.len(), 1, "each record replaced the one before");
    assert_eq!(
        header_of(&messages[0], header::TTL),
        None,
        "nothing of a parked saga expires"
    );
    assert_eq!(header_of(&messages[0], header::PHASE), Some("failed"));
    let journal = handle.journal(&id).await.unwrap();
    assert!(journal.len() > 3, "{journal:?}");

    // Several retention periods later it is all still there.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = journal_messages(&js, &id).await;
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].sequence, messages[0].sequence);
    assert_eq!(handle.journal(&id).await.unwrap().len(), journal.len());

    inventory.set(by_card());
    handle.retry(&id, "ana").await.unwrap();
    wait_phase(&handle, &id, Phase::Compensated).await;
    wait_until("the compensated saga expires", WAIT, || async {
        handle.saga(&id).await.unwrap().is_none()
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_key_runs_once_within_the_horizon_and_an_older_request_is_refused() {
    let server = NatsServer::start();
    let mut config = config(&server.url(), None);
    config.streams.finished_retention = Duration::from_secs(2);
    let running = orchestrator_with(config.clone()).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let inventory = Responder::start(&js, "inventory", by_card()).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;

    let first = handle
        .start("order-creation", "once-1", order("tok_ok"))
        .await
        .unwrap();
    assert!(first.created);
    wait_phase(&handle, &first.saga_id, Phase::Completed).await;
    // Within the horizon the key is the saga: nothing runs again.
    let again = handle
        .start("order-creation", "once-1", order("tok_ok"))
        .await
        .unwrap();
    assert_eq!(
        (again.saga_id.as_str(), again.created),
        (first.saga_id.as_str(), false)
    );
    let reserves = || {
        inventory
            .commands()
            .iter()
            .filter(|c| c.action == "reserve")
            .count()
    };
    assert_eq!(reserves(), 1);

    wait_until("the finished saga expires", WAIT, || async {
        handle.saga(&first.saga_id).await.unwrap().is_none()
    })
    .await;
    // A new instance, so no cached copy of the finished saga answers for the journal.
    running.shutdown().await;
    let running = orchestrator_with(config.clone()).await;
    let handle = running.handle().clone();
    // A request made before the horizon, once the record is gone, could be the
    // same order again: refused, by the API and on the start subject.
    let long_ago = chrono::Utc::now() - chrono::Duration::seconds(60);
    let refused = handle
        .start_requested(
            "order-creation",
            "once-1",
            order("tok_ok"),
            None,
            Some(long_ago),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, jetsaga_orchestrator::ApiError::KeyHorizon(reason) if reason.contains("key horizon")),
        "{refused:?}"
    );
    let start = jetsaga_sagas::protocol::Start {
        protocol: jetsaga_sagas::protocol::VERSION,
        key: "once-1".to_owned(),
        input: order("tok_ok"),
        requested_at: Some(long_ago),
    };
    publish_stored(
        &js,
        &subject::start("order-creation"),
        serde_json::to_vec(&start).unwrap(),
    )
    .await;
    wait_until("the old start is dead-lettered", WAIT, || async {
        dead_letters(&js)
            .await
            .iter()
            .any(|(_, reason)| reason.contains("key horizon"))
    })
    .await;
    assert_eq!(reserves(), 1, "the order never ran twice");
    // A fresh request with the same key is a new order: it runs.
    let fresh = handle
        .start_requested(
            "order-creation",
            "once-1",
            order("tok_ok"),
            None,
            Some(chrono::Utc::now()),
        )
        .await
        .unwrap();
    assert!(fresh.created);
    running.shutdown().await;
}
