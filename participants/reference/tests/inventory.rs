//! The inventory against a real nats-server: two instances, many concurrent reserves.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use async_nats::jetstream;
use common::{Replies, WAIT, code, command, order, send_all};
use jetsaga_participants::inventory::{self, Config, Status};
use jetsaga_testkit::{NatsServer, wait_until};
use tokio_util::sync::CancellationToken;

fn config(url: &str, catalogue: &[(&str, u64)]) -> Config {
    let mut config = Config::default();
    config.nats.url = url.to_owned();
    config.metrics.listen = String::new();
    config.inventory.catalogue = catalogue
        .iter()
        .map(|(s, n)| ((*s).to_owned(), *n))
        .collect();
    config.inventory.low_stock_threshold = 20;
    config
}

/// Checks the invariants over the whole bucket and returns the products.
async fn audit(
    store: &jetstream::kv::Store,
    initial: &BTreeMap<String, u64>,
) -> BTreeMap<String, inventory::Product> {
    let (products, reservations) = inventory::snapshot(store).await.unwrap();
    for (sku, units) in initial {
        let p = &products[sku];
        assert_eq!(
            p.total(),
            *units,
            "{sku}: available + reserved + sold is constant: {p:?}"
        );
        for saga in p.holds.keys() {
            let status = reservations.get(saga).map(|r| r.status);
            assert!(
                matches!(status, Some(Status::Pending | Status::Reserved)),
                "{sku}: hold of {saga} whose reservation is {status:?}"
            );
        }
    }
    for (saga, r) in &reservations {
        if r.status == Status::Reserved {
            for line in &r.items {
                assert_eq!(
                    products[&line.sku].holds.get(saga),
                    Some(&line.quantity),
                    "{saga} holds {line:?}"
                );
            }
        }
    }
    products
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_never_oversell_and_stock_is_conserved() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let catalogue = [("p-1", 120), ("p-2", 90), ("p-3", 60)];
    let initial: BTreeMap<String, u64> = catalogue
        .iter()
        .map(|(s, n)| ((*s).to_owned(), *n))
        .collect();

    let token = CancellationToken::new();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let run = inventory::run(
            config(&server.url(), &catalogue),
            token.clone().cancelled_owned(),
        );
        instances.push(tokio::spawn(run));
    }
    wait_until("the inventory consumer and bucket exist", WAIT, || async {
        let Ok(stream) = js.get_stream("JETSAGA_COMMANDS").await else {
            return false;
        };
        stream.consumer_info("participant-inventory").await.is_ok()
            && js.get_key_value("jetsaga_inventory").await.is_ok()
    })
    .await;
    let replies = Replies::collect(&client).await;

    // 500 orders of one or two lines, 1-3 units each: far more demand than stock.
    let skus = ["p-1", "p-2", "p-3"];
    let sagas: Vec<(String, serde_json::Value)> = (0..500u32)
        .map(|i| {
            let first = (skus[(i % 3) as usize], i % 3 + 1);
            let lines = if i % 2 == 0 {
                vec![first]
            } else {
                vec![first, (skus[((i + 1) % 3) as usize], 1)]
            };
            (format!("s-{i}"), order(&lines, 1000, "tok_ok"))
        })
        .collect();
    let reserves: Vec<_> = sagas
        .iter()
        .map(|(s, input)| command("inventory", "reserve", s, 1, input))
        .collect();
    send_all(&js, "inventory", &reserves).await;
    wait_until("every reserve is answered", WAIT, || async {
        replies.all(&reserves)
    })
    .await;

    let store = js.get_key_value("jetsaga_inventory").await.unwrap();
    let products = audit(&store, &initial).await;
    let mut reserved = Vec::new();
    for (cmd, (saga, input)) in reserves.iter().zip(&sagas) {
        match code(&replies.of(cmd)).as_deref() {
            None => reserved.push((saga.clone(), input.clone())),
            Some("insufficient_stock") => {}
            other => panic!("unexpected reply {other:?} to {}", cmd.command_id),
        }
    }
    assert!(
        !reserved.is_empty() && reserved.len() < 500,
        "{} reserved",
        reserved.len()
    );
    let held: u64 = products.values().map(inventory::Product::reserved).sum();
    assert!(
        products.values().any(|p| p.available < 3),
        "demand exceeds stock: {products:?}"
    );
    assert!(held > 0);

    // Release half, commit the rest, each twice (a redelivery with a new attempt).
    let (to_release, to_commit) = reserved.split_at(reserved.len() / 2);
    let mut second = Vec::new();
    for attempt in 1..=2 {
        let releases: Vec<_> = to_release
            .iter()
            .map(|(s, i)| command("inventory", "release", s, attempt, i))
            .collect();
        let commits: Vec<_> = to_commit
            .iter()
            .map(|(s, i)| command("inventory", "commit", s, attempt, i))
            .collect();
        let all: Vec<_> = releases.into_iter().chain(commits).collect();
        send_all(&js, "inventory", &all).await;
        wait_until("every release and commit is answered", WAIT, || async {
            replies.all(&all)
        })
        .await;
        for cmd in &all {
            assert_eq!(code(&replies.of(cmd)), None, "{}", cmd.command_id);
        }
        second = all;
    }
    assert!(!second.is_empty());
    // A late reserve after a release is refused and holds nothing.
    let (late_saga, late_input) = &to_release[0];
    let late = command("inventory", "reserve", late_saga, 9, late_input);
    send_all(&js, "inventory", std::slice::from_ref(&late)).await;
    wait_until("the late reserve is answered", WAIT, || async {
        replies.all(std::slice::from_ref(&late))
    })
    .await;
    assert_eq!(
        code(&replies.of(&late)).as_deref(),
        Some("reservation_released")
    );

    let products = audit(&store, &initial).await;
    let committed_units: u64 = to_commit
        .iter()
        .flat_map(|(_, input)| {
            input["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["quantity"].as_u64().unwrap())
        })
        .sum();
    let sold: u64 = products.values().map(|p| p.sold).sum();
    assert_eq!(sold, committed_units, "commits sold exactly what they held");
    assert!(
        products.values().all(|p| p.holds.is_empty()),
        "every hold was released or sold"
    );

    // Stock events were published for products that ran low.
    let events = js.get_stream("JETSAGA_EVENTS").await.unwrap();
    for subject in [
        "saga.event.inventory.stock.low",
        "saga.event.inventory.stock.depleted",
    ] {
        assert!(
            events
                .get_last_raw_message_by_subject(subject)
                .await
                .is_ok(),
            "{subject}"
        );
    }

    token.cancel();
    for instance in instances {
        tokio::time::timeout(WAIT, instance)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
