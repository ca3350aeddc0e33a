//! The inventory and payment binaries killed with SIGKILL mid-load, then restarted: stock is
//! conserved, no reservation is lost, no order is charged twice.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use common::{Replies, WAIT, audit_inventory, code, command, order, send_all};
use jetsaga_reference::{inventory, payment};
use jetsaga_testkit::{ChildGuard, NatsServer, cargo_bin, wait_until};

const SAGAS: u32 = 300;

fn spawn(binary: &str, url: &str) -> ChildGuard {
    let mut cmd = Command::new(cargo_bin(binary));
    cmd.env("JETSAGA_NATS__URL", url)
        .env("JETSAGA_METRICS__LISTEN", "")
        .env("JETSAGA_TELEMETRY__LOG_FILTER", "warn")
        // Slow enough that the kill lands while commands are in flight.
        .env("JETSAGA_FAULTS__LATENCY", "5ms")
        .env("JETSAGA_CONSUMER__ACK_WAIT", "2s");
    // Unknown sections are refused, so only the inventory gets its catalogue.
    if binary == "jetsaga-inventory" {
        cmd.env("JETSAGA_INVENTORY__CATALOGUE", "{ c-1 = 200, c-2 = 150 }");
    }
    ChildGuard::spawn(cmd).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_load_and_restarted_keeps_every_invariant() {
    let server = NatsServer::start();
    let url = server.url();
    let client = async_nats::connect(url.clone()).await.unwrap();
    let js = jetstream::new(client.clone());
    let mut inventory_proc = spawn("jetsaga-inventory", &url);
    let mut payment_proc = spawn("jetsaga-payment", &url);
    wait_until("both consumers exist", WAIT, || async {
        let Ok(stream) = js.get_stream("JETSAGA_COMMANDS").await else {
            return false;
        };
        stream.consumer_info("participant-inventory").await.is_ok()
            && stream.consumer_info("participant-payment").await.is_ok()
    })
    .await;
    let replies = Replies::collect(&client).await;

    let inputs: Vec<(String, serde_json::Value)> = (0..SAGAS)
        .map(|i| {
            let lines = [("c-1", i % 2 + 1), ("c-2", 1)];
            (
                format!("k-{i}"),
                order(
                    &lines[..(i % 2 + 1) as usize],
                    1000 + u64::from(i),
                    "tok_ok",
                ),
            )
        })
        .collect();
    let reserves: Vec<_> = inputs
        .iter()
        .map(|(s, i)| command("inventory", "reserve", s, 1, i))
        .collect();
    let charges: Vec<_> = inputs
        .iter()
        .map(|(s, i)| command("payment", "charge", s, 1, i))
        .collect();
    send_all(&js, "inventory", &reserves).await;
    send_all(&js, "payment", &charges).await;

    wait_until("some commands are answered", WAIT, || async {
        replies.count() >= 60
    })
    .await;
    inventory_proc.kill().unwrap();
    payment_proc.kill().unwrap();
    let answered_before_kill = replies.count();
    // The orchestrator's retries: a second attempt of every charge, sent while both are down.
    let retries: Vec<_> = inputs
        .iter()
        .map(|(s, i)| command("payment", "charge", s, 2, i))
        .collect();
    send_all(&js, "payment", &retries).await;
    let mut inventory_proc = spawn("jetsaga-inventory", &url);
    let mut payment_proc = spawn("jetsaga-payment", &url);

    let all: Vec<_> = reserves
        .iter()
        .chain(&charges)
        .chain(&retries)
        .cloned()
        .collect();
    wait_until(
        "every command is answered after the restart",
        WAIT,
        || async { replies.all(&all) },
    )
    .await;
    assert!(answered_before_kill < all.len(), "the kill landed mid-load");

    // Payment: every saga charged exactly once, for its amount.
    let store = js.get_key_value("jetsaga_payment").await.unwrap();
    let records = payment::records(&store).await.unwrap();
    for ((saga, input), (first, second)) in inputs.iter().zip(charges.iter().zip(&retries)) {
        assert_eq!(code(&replies.of(first)), None, "{saga}");
        assert_eq!(
            replies.of(first),
            replies.of(second),
            "{saga}: the retry gets the same answer"
        );
        let record = &records[saga];
        assert_eq!(record.status, payment::Status::Charged);
        assert_eq!(record.amount_cents, input["amount_cents"].as_u64().unwrap());
        for outcome in replies.all_of(first) {
            assert_eq!(
                outcome,
                replies.of(first),
                "{saga}: every reply to one command is identical"
            );
        }
    }
    let ledger = payment::ledger(&store).await.unwrap();
    assert_eq!(ledger.charges, u64::from(SAGAS));

    // Inventory: conserved, every hold belongs to a reserved reservation and every reserved
    // one holds its lines, and every ok reply is backed by such a reservation.
    let store = js.get_key_value("jetsaga_inventory").await.unwrap();
    let initial = [("c-1", 200), ("c-2", 150)]
        .map(|(s, n)| (s.to_owned(), n))
        .into();
    let (products, reservations) = audit_inventory(&store, &initial).await;
    let mut reserved = BTreeSet::new();
    for (cmd, (saga, _)) in reserves.iter().zip(&inputs) {
        match code(&replies.of(cmd)).as_deref() {
            None => {
                assert_eq!(
                    reservations[saga].status,
                    inventory::Status::Reserved,
                    "{saga}"
                );
                reserved.insert(saga.clone());
            }
            Some("insufficient_stock") => {
                assert_eq!(
                    reservations[saga].status,
                    inventory::Status::Rejected,
                    "{saga}"
                );
            }
            other => panic!("{saga}: unexpected {other:?}"),
        }
    }
    let holders: BTreeSet<String> = products
        .values()
        .flat_map(|p| p.holds.keys().cloned())
        .collect();
    assert_eq!(
        holders, reserved,
        "holds belong exactly to the reserved sagas"
    );
    assert!(!reserved.is_empty());

    // Graceful stop on SIGTERM.
    for proc in [&mut inventory_proc, &mut payment_proc] {
        proc.terminate().unwrap();
        let status = proc
            .wait_exit(WAIT)
            .await
            .unwrap()
            .expect("exits on SIGTERM");
        assert!(status.success(), "{status}");
    }
}

/// Issue 10, hole 12: a participant killed (SIGKILL) while every command is in its handler
/// and restarted at once answers them all about `ack_wait` later, not after the old 30 s, and
/// charges each saga exactly once. Prints the recovery time; run with
/// `JETSAGA_CONSUMER__ACK_WAIT=30s` in the environment to measure the old default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_command_recovers_within_ack_wait_and_charges_once() {
    const N: u32 = 40;
    let server = NatsServer::start();
    let url = server.url();
    let client = async_nats::connect(url.clone()).await.unwrap();
    let js = jetstream::new(client.clone());
    let slow = |url: &str| {
        let mut cmd = Command::new(cargo_bin("jetsaga-payment"));
        cmd.env("JETSAGA_NATS__URL", url)
            .env("JETSAGA_METRICS__LISTEN", "")
            .env("JETSAGA_TELEMETRY__LOG_FILTER", "warn")
            // Every command is still in its handler when the kill lands.
            .env("JETSAGA_FAULTS__LATENCY", "1s");
        ChildGuard::spawn(cmd).unwrap()
    };
    let mut payment_proc = slow(&url);
    let stream = wait_for_consumer(&js, "participant-payment").await;
    let replies = Replies::collect(&client).await;
    let charges: Vec<_> = (0..N)
        .map(|i| {
            let input = order(&[("c-1", 1)], 100 + u64::from(i), "tok_ok");
            command("payment", "charge", &format!("r-{i}"), 1, &input)
        })
        .collect();
    send_all(&js, "payment", &charges).await;
    wait_until("every charge is in a handler", WAIT, || async {
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer("participant-payment").await.unwrap();
        consumer.info().await.unwrap().num_ack_pending == N as usize
    })
    .await;
    payment_proc.kill().unwrap();
    let answered_before_kill = replies.count();
    let restarted = std::time::Instant::now();
    let _payment_proc = slow(&url);
    wait_until(
        "every charge is answered after the restart",
        WAIT,
        || async { replies.all(&charges) },
    )
    .await;
    let recovery = restarted.elapsed();
    println!(
        "recovery after a kill -9 and restart: {:.2}s for {N} commands in flight \
         ({answered_before_kill} answered before the kill)",
        recovery.as_secs_f64()
    );
    assert!(
        answered_before_kill < charges.len(),
        "the kill landed mid-command"
    );
    let store = js.get_key_value("jetsaga_payment").await.unwrap();
    let ledger = payment::ledger(&store).await.unwrap();
    assert_eq!(
        ledger.charges,
        u64::from(N),
        "each saga charged exactly once"
    );
    for cmd in &charges {
        for outcome in replies.all_of(cmd) {
            assert_eq!(code(&outcome), None, "{}", cmd.saga_id);
            assert_eq!(outcome, replies.of(cmd), "{}: one answer", cmd.saga_id);
        }
    }
}

async fn wait_for_consumer(js: &jetstream::Context, name: &str) -> jetstream::stream::Stream {
    wait_until("the consumer exists", WAIT, || async {
        let Ok(stream) = js.get_stream("JETSAGA_COMMANDS").await else {
            return false;
        };
        stream.consumer_info(name).await.is_ok()
    })
    .await;
    js.get_stream("JETSAGA_COMMANDS").await.unwrap()
}

/// Issue 10, hole 12, end to end: the payment binary killed with SIGKILL while charges are in
/// its handlers and restarted at once; every order saga still completes, each charged exactly
/// once, about `ack_wait` after the restart (printed) rather than after a step timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_sagas_complete_once_when_the_payment_is_killed_mid_charge() {
    use jetsaga_orchestrator::config::{Config as OrchestratorConfig, Storage};
    use jetsaga_orchestrator::{Service, Started};
    use jetsaga_sagas::Phase;
    use tokio_util::sync::CancellationToken;

    const ORDERS: usize = 40;
    let server = NatsServer::start();
    let url = server.url();
    let client = async_nats::connect(url.clone()).await.unwrap();
    let js = jetstream::new(client.clone());
    let mut config = OrchestratorConfig::default();
    config.nats.url = url.clone();
    config.streams.storage = Storage::File;
    config.engine.shutdown_grace = Duration::from_secs(5);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = Service::start_with_listener(config, listener)
        .await
        .unwrap();
    let handle = running.handle().clone();
    let token = CancellationToken::new();
    let mut stock = inventory::Config::default();
    stock.nats.url = url.clone();
    stock.metrics.listen = String::new();
    let inventory_run = tokio::spawn(inventory::run(stock, token.clone().cancelled_owned()));
    let slow_payment = |url: &str| {
        let mut cmd = Command::new(cargo_bin("jetsaga-payment"));
        cmd.env("JETSAGA_NATS__URL", url)
            .env("JETSAGA_METRICS__LISTEN", "")
            .env("JETSAGA_TELEMETRY__LOG_FILTER", "warn")
            .env("JETSAGA_FAULTS__LATENCY", "500ms");
        ChildGuard::spawn(cmd).unwrap()
    };
    let mut payment_proc = slow_payment(&url);
    let commands = wait_for_consumer(&js, "participant-payment").await;
    wait_for_consumer(&js, "participant-inventory").await;

    let mut ids = Vec::new();
    for i in 0..ORDERS {
        let input = order(&[("sku-1", 1)], 1000 + i as u64, "tok_ok");
        match handle
            .start("order-creation", &format!("kill-{i}"), input)
            .await
            .unwrap()
        {
            Started {
                saga_id,
                created: true,
            } => ids.push(saga_id),
            other => panic!("{other:?}"),
        }
    }
    wait_until("charges are in the payment's handlers", WAIT, || async {
        let mut consumer: jetstream::consumer::PullConsumer =
            commands.get_consumer("participant-payment").await.unwrap();
        consumer.info().await.unwrap().num_ack_pending >= 10
    })
    .await;
    payment_proc.kill().unwrap();
    let restarted = std::time::Instant::now();
    let _payment_proc = slow_payment(&url);
    wait_until("every saga completed", WAIT, || async {
        for id in &ids {
            let phase = handle.saga(id).await.ok().flatten().map(|s| s.phase());
            if phase != Some(Phase::Completed) {
                return false;
            }
        }
        true
    })
    .await;
    println!(
        "all {ORDERS} sagas completed {:.2}s after the payment's restart",
        restarted.elapsed().as_secs_f64()
    );
    let store = js.get_key_value("jetsaga_payment").await.unwrap();
    let records = payment::records(&store).await.unwrap();
    for id in &ids {
        assert_eq!(records[id].status, payment::Status::Charged, "{id}");
    }
    let ledger = payment::ledger(&store).await.unwrap();
    assert_eq!(
        ledger.charges, ORDERS as u64,
        "each saga charged exactly once"
    );
    assert_eq!((ledger.refunds, ledger.voids), (0, 0), "{ledger:?}");
    running.shutdown().await;
    token.cancel();
    inventory_run.await.unwrap().unwrap();
}
