//! Storage that lasts: replies and final records carry a TTL and their subjects go after it;
//! live records stay; a command repeated after its reply expired is answered by the records
//! (no effect applied twice); a command older than the records' horizon applies nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use common::{Replies, WAIT, code, command, order};
use jetsaga_reference::{inventory, payment};
use jetsaga_sagas::protocol::{Body, Command, header, subject};
use jetsaga_testkit::{NatsServer, wait_until};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const REPLY_TTL: Duration = Duration::from_secs(2);
const RECORD_TTL: Duration = Duration::from_secs(4);

/// Publishes `cmd` as the orchestrator re-sends it: a new message, marked re-sent.
async fn send(js: &jetstream::Context, participant: &str, cmd: &Command, resend: Option<u32>) {
    let mut headers = HeaderMap::new();
    let id = match resend {
        Some(n) => format!("{}:resent:{n}", cmd.command_id),
        None => cmd.command_id.clone(),
    };
    headers.insert(header::MSG_ID, id.as_str());
    headers.insert(header::SAGA_ID, cmd.saga_id.as_str());
    headers.insert(header::COMMAND_ID, cmd.command_id.as_str());
    if resend.is_some() {
        headers.insert(header::RESENT, "true");
    }
    js.publish_with_headers(
        subject::command(participant, &cmd.action),
        headers,
        cmd.encode().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// The `Nats-TTL` of the last message on `subject` in `stream`; `Err` if there is none.
async fn ttl_of(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
) -> Result<Option<String>, DirectGetErrorKind> {
    let stream = js.get_stream(stream).await.unwrap();
    match stream.direct_get_last_for_subject(subject).await {
        Ok(message) => Ok(message
            .headers
            .get(header::TTL)
            .map(|v| v.as_str().to_owned())),
        Err(e) => Err(e.kind()),
    }
}

async fn subjects(js: &jetstream::Context, stream: &str) -> u64 {
    let mut stream = js.get_stream(stream).await.unwrap();
    stream.info().await.unwrap().state.subjects_count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_final_records_expire_and_nothing_applies_twice() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let token = CancellationToken::new();

    // The late reserve below is held before its holds until the saga's record expired.
    let late_reached = Arc::new(Semaphore::new(0));
    let late_open = Arc::new(Semaphore::new(0));
    let pause: inventory::Pause = {
        let (reached, open) = (late_reached.clone(), late_open.clone());
        Arc::new(move |point, cmd| {
            let hold = point == inventory::Point::BeforeHolds && cmd.command_id.ends_with(":9");
            let (reached, open) = (reached.clone(), open.clone());
            Box::pin(async move {
                if hold {
                    reached.add_permits(1);
                    open.acquire().await.unwrap().forget();
                }
            })
        })
    };
    let mut stock = inventory::Config::default();
    stock.nats.url = server.url();
    stock.metrics.listen = String::new();
    stock.consumer.reply_ttl = REPLY_TTL;
    stock.inventory.record_ttl = RECORD_TTL;
    stock.inventory.catalogue = [("e-1".to_owned(), 10)].into();
    let inventory_run = tokio::spawn(inventory::run_with(
        stock,
        Some(pause),
        token.clone().cancelled_owned(),
    ));
    let mut pay = payment::Config::default();
    pay.nats.url = server.url();
    pay.metrics.listen = String::new();
    pay.consumer.reply_ttl = REPLY_TTL;
    pay.payment.record_ttl = RECORD_TTL;
    let payment_run = tokio::spawn(payment::run(pay, token.clone().cancelled_owned()));
    wait_until("both consumers and buckets exist", WAIT, || async {
        let Ok(stream) = js.get_stream("JETSAGA_COMMANDS").await else {
            return false;
        };
        stream.consumer_info("participant-inventory").await.is_ok()
            && stream.consumer_info("participant-payment").await.is_ok()
            && js.get_key_value("jetsaga_inventory").await.is_ok()
            && js.get_key_value("jetsaga_payment").await.is_ok()
    })
    .await;
    let replies = Replies::collect(&client).await;
    let answer = |cmd: &Command| {
        let (replies, cmd) = (replies.clone(), cmd.clone());
        async move {
            wait_until("the command is answered", WAIT, || async {
                !replies.all_of(&cmd).is_empty()
            })
            .await;
            replies.all_of(&cmd).last().map(code).unwrap()
        }
    };

    let input = order(&[("e-1", 3)], 2500, "tok_ok");
    let reserve = command("inventory", "reserve", "s-1", 1, &input);
    let charge = command("payment", "charge", "s-1", 1, &input);
    send(&js, "inventory", &reserve, None).await;
    send(&js, "payment", &charge, None).await;
    assert_eq!(answer(&reserve).await, None);
    assert_eq!(answer(&charge).await, None);

    // Replies carry the reply TTL; the live reservation none; the payment record its TTL.
    assert_eq!(
        ttl_of(&js, "JETSAGA_REPLIES", &reserve.reply_to).await,
        Ok(Some("2".to_owned()))
    );
    assert_eq!(
        ttl_of(&js, "JETSAGA_REPLIES", &charge.reply_to).await,
        Ok(Some("2".to_owned()))
    );
    assert_eq!(
        ttl_of(
            &js,
            "KV_jetsaga_inventory",
            "$KV.jetsaga_inventory.reservation.s-1"
        )
        .await,
        Ok(None),
        "a reserved reservation is live: no TTL"
    );
    assert_eq!(
        ttl_of(&js, "KV_jetsaga_payment", "$KV.jetsaga_payment.payment.s-1").await,
        Ok(Some("4".to_owned()))
    );

    // The replies go; the same command ids again (an orchestrator re-send after the reply
    // expired) run the handlers again, and the records answer: one hold, one charge.
    wait_until("the replies expired", WAIT, || async {
        ttl_of(&js, "JETSAGA_REPLIES", &reserve.reply_to).await == Err(DirectGetErrorKind::NotFound)
            && ttl_of(&js, "JETSAGA_REPLIES", &charge.reply_to).await
                == Err(DirectGetErrorKind::NotFound)
    })
    .await;
    let before = (
        replies.all_of(&reserve).len(),
        replies.all_of(&charge).len(),
    );
    send(&js, "inventory", &reserve, Some(1)).await;
    send(&js, "payment", &charge, Some(1)).await;
    wait_until("the repeated commands are answered", WAIT, || async {
        replies.all_of(&reserve).len() > before.0 && replies.all_of(&charge).len() > before.1
    })
    .await;
    assert_eq!(replies.all_of(&reserve).last().map(code), Some(None));
    assert_eq!(replies.all_of(&charge).last().map(code), Some(None));
    let stock = js.get_key_value("jetsaga_inventory").await.unwrap();
    let (products, _) = inventory::snapshot(&stock).await.unwrap();
    assert_eq!(
        (products["e-1"].available, products["e-1"].reserved()),
        (7, 3),
        "held once"
    );
    let payments = js.get_key_value("jetsaga_payment").await.unwrap();
    assert_eq!(payment::ledger(&payments).await.unwrap().charges, 1);

    // A late attempt of the reserve, stored now and slow; the saga commits meanwhile.
    let late = command("inventory", "reserve", "s-1", 9, &input);
    send(&js, "inventory", &late, None).await;
    tokio::time::timeout(WAIT, late_reached.acquire())
        .await
        .unwrap()
        .unwrap()
        .forget();
    let commit = command("inventory", "commit", "s-1", 1, &input);
    send(&js, "inventory", &commit, None).await;
    assert_eq!(answer(&commit).await, None);
    assert_eq!(
        ttl_of(
            &js,
            "KV_jetsaga_inventory",
            "$KV.jetsaga_inventory.reservation.s-1"
        )
        .await,
        Ok(Some("4".to_owned())),
        "a committed reservation is final: it expires"
    );

    // Every per-saga subject goes: the replies, the final reservation, the payment record.
    wait_until("the per-saga subjects are gone", WAIT, || async {
        subjects(&js, "JETSAGA_REPLIES").await == 0
            && subjects(&js, "KV_jetsaga_inventory").await == 1
            && subjects(&js, "KV_jetsaga_payment").await == 0
    })
    .await;
    // The late attempt now finds no record; past the horizon it holds nothing.
    late_open.add_permits(1);
    assert_eq!(answer(&late).await.as_deref(), Some("command_expired"));
    let (products, reservations) = inventory::snapshot(&stock).await.unwrap();
    assert_eq!(
        (
            products["e-1"].available,
            products["e-1"].reserved(),
            products["e-1"].sold
        ),
        (7, 0, 3)
    );
    assert!(reservations.is_empty(), "{reservations:?}");

    token.cancel();
    inventory_run.await.unwrap().unwrap();
    payment_run.await.unwrap().unwrap();
}
