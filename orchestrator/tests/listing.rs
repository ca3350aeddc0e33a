//! The saga listing (`GET /v1/sagas`) over a real journal: filters, cursors, stuck,
//! several instances, and a restart.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use http_body_util::BodyExt;
use jetsaga_orchestrator::{Running, http};
use jetsaga_sagas::{Phase, protocol};
use jetsaga_testkit::{NatsServer, wait_until};
use serde_json::Value;
use tower::ServiceExt;

const PARKING_ORDER: &str = r#"
name = "parking-order"
version = 1
input-schema = "order-creation.input.schema.json"
deadline = "1m"
[compensation-retry]
max-attempts = 1
[[steps]]
name = "reserve-stock"
participant = "inventory"
action = "reserve"
compensation = "release"
kind = "compensatable"
timeout = "5s"
retry = { max-attempts = 1 }
[[steps]]
name = "take-payment"
participant = "payment"
action = "charge"
kind = "pivot"
timeout = "5s"
retry = { max-attempts = 1 }
"#;

async fn get(running: &Running, uri: &str) -> (StatusCode, Value) {
    let router = http::router(running.handle().clone(), http::Settings::default());
    let response = router
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn ids(running: &Running, query: &str) -> Vec<String> {
    let (status, body) = get(running, &format!("/v1/sagas?{query}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["saga_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn ready(running: &Running) {
    wait_until("the instance is ready", WAIT, || async {
        get(running, "/readyz").await.0 == StatusCode::OK
    })
    .await;
}

/// Inventory (whose release always fails, so a declined order parks) and payment.
async fn participants(server: &NatsServer) -> [Responder; 2] {
    let js = js(server).await;
    let inventory = Responder::start(
        &js,
        "inventory",
        Arc::new(|c: &protocol::Command| {
            if c.action == "release" {
                failed("db_down", false)
            } else {
                ok()
            }
        }),
    )
    .await;
    [inventory, Responder::start(&js, "payment", by_card()).await]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_follows_the_journal_on_every_instance_and_survives_a_restart() {
    let server = NatsServer::start();
    let defs = definitions_dir(&[("parking.toml", PARKING_ORDER), order_schema_file()]);
    let a = orchestrator(&server.url(), Some(defs.path())).await;
    let handle = a.handle().clone();
    let _participants = participants(&server).await;

    let mut completed = Vec::new();
    for n in 0..5 {
        let id = start(&handle, &format!("list-{n}"), order("tok_ok")).await;
        wait_phase(&handle, &id, Phase::Completed).await;
        completed.push(id);
    }
    let parked = handle
        .start("parking-order", "list-parked", order("tok_decline"))
        .await
        .unwrap()
        .saga_id;
    wait_phase(&handle, &parked, Phase::Failed).await;
    wait_until("the listing has every saga", WAIT, || async {
        ids(&a, "limit=500").await.len() == 6
    })
    .await;

    // Newest first: the parked saga was updated last, then the completed ones in reverse.
    let mut expected = vec![parked.clone()];
    expected.extend(completed.iter().rev().cloned());
    assert_eq!(ids(&a, "").await, expected);
    let only_parked = std::slice::from_ref(&parked);
    assert_eq!(ids(&a, "state=failed").await, only_parked);
    assert_eq!(ids(&a, "stuck=true").await, only_parked);
    assert_eq!(ids(&a, "type=parking-order").await, only_parked);
    assert_eq!(
        ids(&a, "type=order-creation&state=completed").await.len(),
        5
    );
    assert!(ids(&a, "type=nothing").await.is_empty());
    let (_, body) = get(&a, "/v1/sagas?state=failed").await;
    let item = &body["items"][0];
    assert_eq!(item["key"], "list-parked");
    assert_eq!(item["saga_type"], "parking-order");
    assert_eq!(item["current_step"], "reserve-stock");
    assert_eq!(item["stuck"], true);
    let newest = body["items"][0]["updated_at"].as_str().unwrap().to_owned();
    assert_eq!(
        ids(
            &a,
            &format!("updated_before={}", newest.replace('+', "%2B"))
        )
        .await,
        expected[1..]
    );

    // Cursor pages of 2 walk every saga once, in order.
    let mut walked = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("/v1/sagas?limit=2&cursor={c}"),
            None => "/v1/sagas?limit=2".to_owned(),
        };
        let (status, body) = get(&a, &query).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for s in body["items"].as_array().unwrap() {
            walked.push(s["saga_id"].as_str().unwrap().to_owned());
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(walked, expected);

    // A second instance lists the same sagas from its own projection.
    let b = orchestrator(&server.url(), Some(defs.path())).await;
    ready(&b).await;
    assert_eq!(ids(&b, "").await, expected);

    // A restarted instance has them again once it is ready.
    a.shutdown().await;
    let a = orchestrator(&server.url(), Some(defs.path())).await;
    ready(&a).await;
    assert_eq!(ids(&a, "").await, expected);

    // A change made through one instance shows on the other.
    let late = start(b.handle(), "list-late", order("tok_ok")).await;
    wait_until("instance a lists the new saga first", WAIT, || async {
        ids(&a, "limit=1").await == [late.clone()]
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_keeps_the_newest_finished_sagas_up_to_its_bound() {
    let server = NatsServer::start();
    let defs = definitions_dir(&[("parking.toml", PARKING_ORDER), order_schema_file()]);
    let a = orchestrator_with(&server.url(), Some(defs.path()), |c| {
        c.engine.listing_max_finished = 2;
    })
    .await;
    let handle = a.handle().clone();
    let _participants = participants(&server).await;

    let parked = handle
        .start("parking-order", "bound-parked", order("tok_decline"))
        .await
        .unwrap()
        .saga_id;
    wait_phase(&handle, &parked, Phase::Failed).await;
    let mut completed = Vec::new();
    for n in 0..4 {
        let id = start(&handle, &format!("bound-{n}"), order("tok_ok")).await;
        wait_phase(&handle, &id, Phase::Completed).await;
        completed.push(id);
    }
    let newest: Vec<String> = completed.iter().rev().take(2).cloned().collect();
    wait_until(
        "the listing holds the two newest finished sagas",
        WAIT,
        || async { ids(&a, "state=completed").await == newest },
    )
    .await;
    // The parked saga is older than every finished one and is still listed.
    assert_eq!(ids(&a, "state=failed").await, std::slice::from_ref(&parked));
    assert_eq!(ids(&a, "limit=500").await.len(), 3);
    // An unlisted saga is still there by id: its record is in the journal.
    let (status, body) = get(&a, &format!("/v1/sagas/{}", completed[0])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "completed");
    // The census publishes what the listing holds and what it dropped.
    let router = http::router(a.handle().clone(), http::Settings::default());
    wait_until("the census reports the bound", WAIT, || {
        let router = router.clone();
        async move {
            let response = router
                .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
                .await
                .unwrap();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            text.lines()
                .any(|l| l == "jetsaga_listing_unlisted_total 2")
                && text.lines().any(|l| l == "jetsaga_listing_sagas 3")
        }
    })
    .await;
}
