//! Payment rules and idempotency; notification de-duplication; against a real nats-server.

#![allow(clippy::unwrap_used)]

mod common;

use async_nats::HeaderMap;
use async_nats::jetstream;
use common::{Replies, WAIT, code, command, order, send_all};
use jetsaga_reference::{notification, payment};
use jetsaga_sagas::protocol::{self, Body, Event, header};
use jetsaga_testkit::{NatsServer, wait_until};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn payment_charges_once_refunds_at_most_the_charge_and_declines_by_rule() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let mut config = payment::Config::default();
    config.nats.url = server.url();
    config.metrics.listen = "127.0.0.1:0".to_owned();
    config.payment.limit_cents = 10_000;
    let token = CancellationToken::new();
    let running = tokio::spawn(payment::run(config, token.clone().cancelled_owned()));
    wait_until("the payment bucket and consumer exist", WAIT, || async {
        let consumer = async {
            js.get_stream("JETSAGA_COMMANDS")
                .await
                .ok()?
                .consumer_info("participant-payment")
                .await
                .ok()
        };
        js.get_key_value("jetsaga_payment").await.is_ok() && consumer.await.is_some()
    })
    .await;
    let replies = Replies::collect(&client).await;

    let ok = order(&[("sku-1", 1)], 4999, "tok_ok");
    let cmds = vec![
        command("payment", "charge", "p-ok", 1, &ok),
        command("payment", "charge", "p-ok", 2, &ok), // a new attempt: no second charge
        command(
            "payment",
            "charge",
            "p-decline",
            1,
            &order(&[("sku-1", 1)], 100, "tok_decline"),
        ),
        command(
            "payment",
            "charge",
            "p-big",
            1,
            &order(&[("sku-1", 1)], 10_001, "tok_ok"),
        ),
        command("payment", "charge", "p-refund", 1, &ok),
        command("payment", "refund", "p-never", 1, &ok), // refund before any charge
    ];
    send_all(&js, "payment", &cmds).await;
    wait_until("charges are answered", WAIT, || async {
        replies.all(&cmds)
    })
    .await;
    let codes: Vec<_> = cmds.iter().map(|c| code(&replies.of(c))).collect();
    assert_eq!(
        codes,
        [
            None,
            None,
            Some("card_declined".into()),
            Some("card_declined".into()),
            None,
            None
        ]
    );
    assert_eq!(
        replies.of(&cmds[0]),
        replies.of(&cmds[1]),
        "the same answer for the same saga"
    );

    let later = vec![
        command("payment", "refund", "p-refund", 1, &ok),
        command("payment", "refund", "p-refund", 2, &ok), // refunded twice: one refund
        command("payment", "charge", "p-never", 1, &ok),  // late charge after the refund
    ];
    send_all(&js, "payment", &later).await;
    wait_until("refunds are answered", WAIT, || async {
        replies.all(&later)
    })
    .await;
    let codes: Vec<_> = later.iter().map(|c| code(&replies.of(c))).collect();
    assert_eq!(codes, [None, None, Some("payment_voided".into())]);

    let store = js.get_key_value("jetsaga_payment").await.unwrap();
    let ledger = payment::ledger(&store).await.unwrap();
    assert_eq!((ledger.charges, ledger.refunds, ledger.voids), (2, 1, 1));
    assert_eq!(ledger.charged_cents, 2 * 4999);
    assert_eq!(ledger.refunded_cents, 4999);
    assert_eq!(ledger.balance_cents(), 4999);
    token.cancel();
    tokio::time::timeout(WAIT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn notification_sends_one_email_per_order_and_dead_letters_garbage() {
    let server = NatsServer::start();
    let (js, notifier) = Notifier::start(&server, |_| {}).await;

    let event = order_event("order.confirmed", "n-1", "order-1");
    // Twice (as after a redelivery past the dedup window), then garbage.
    for i in 0..2 {
        let mut headers = HeaderMap::new();
        headers.insert(header::MSG_ID, format!("evt-{i}"));
        js.publish_with_headers("saga.event.order.confirmed", headers, event.encode().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    js.publish("saga.event.order.cancelled", "garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let events = js.get_stream("JETSAGA_EVENTS").await.unwrap();
    wait_until("every event is handled", WAIT, || async {
        let info = events.consumer_info("notification").await.unwrap();
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    let store = js.get_key_value("jetsaga_notification").await.unwrap();
    let email = notification::email(&store, "n-1").await.unwrap().unwrap();
    assert_eq!(email.to, "ana@example.com");
    assert_eq!(email.event, "order.confirmed");
    let mut keys = store.keys().await.unwrap();
    let mut n = 0;
    while let Some(key) = futures::StreamExt::next(&mut keys).await {
        key.unwrap();
        n += 1;
    }
    assert_eq!(n, 1, "one email for the order");
    let dead = js.get_stream("JETSAGA_DEAD_LETTERS").await.unwrap();
    let letter = dead
        .get_last_raw_message_by_subject("saga.dead.participant.notification")
        .await
        .unwrap();
    let headers = letter.headers;
    assert_eq!(
        headers.get(header::DEAD_SUBJECT).unwrap().as_str(),
        "saga.event.order.cancelled"
    );
    assert!(
        headers
            .get(header::DEAD_REASON)
            .unwrap()
            .as_str()
            .contains("invalid Event")
    );
    notifier.stop().await;
}

/// Issue 10, hole 14: an event that still fails on its last delivery is dead-lettered by the
/// notification itself, not dropped by JetStream with only an advisory (the orchestrator's
/// watcher listens to `participant-*` consumers only, and only while it runs). Its email
/// record carries the record TTL.
#[tokio::test]
async fn notification_dead_letters_an_event_failing_on_its_last_delivery() {
    let server = NatsServer::start();
    let (js, notifier) = Notifier::start(&server, |config| {
        config.notification.max_deliver = 2;
        config.faults.fail_actions = vec!["order.cancelled".to_owned()];
    })
    .await;
    for (name, saga) in [("order.cancelled", "n-fail"), ("order.confirmed", "n-ok")] {
        let event = order_event(name, saga, saga);
        js.publish(format!("saga.event.{name}"), event.encode().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let dead = js.get_stream("JETSAGA_DEAD_LETTERS").await.unwrap();
    wait_until("the failing event is dead-lettered", WAIT, || async {
        dead.get_last_raw_message_by_subject("saga.dead.participant.notification")
            .await
            .is_ok()
    })
    .await;
    let letter = dead
        .get_last_raw_message_by_subject("saga.dead.participant.notification")
        .await
        .unwrap();
    assert_eq!(
        letter.headers.get(header::DEAD_SUBJECT).unwrap().as_str(),
        "saga.event.order.cancelled"
    );
    let reason = letter.headers.get(header::DEAD_REASON).unwrap().as_str();
    assert!(reason.contains("after 2 deliveries"), "{reason}");
    let store = js.get_key_value("jetsaga_notification").await.unwrap();
    wait_until("the other email is recorded", WAIT, || async {
        notification::email(&store, "n-ok").await.unwrap().is_some()
    })
    .await;
    assert!(
        notification::email(&store, "n-fail")
            .await
            .unwrap()
            .is_none()
    );
    let record = js
        .get_stream("KV_jetsaga_notification")
        .await
        .unwrap()
        .direct_get_last_for_subject("$KV.jetsaga_notification.email.n-ok")
        .await
        .unwrap();
    assert_eq!(
        record.headers.get(header::TTL).map(|v| v.as_str()),
        Some("86400"),
        "the sent record expires after the record TTL"
    );
    notifier.stop().await;
}

/// Found by the cluster chaos runs: during node loss the email bucket answered "no stream
/// found" for a few seconds, and 16 order events were dead-lettered after 20 deliveries
/// 200 ms apart — 16 orders without an email. An outage of the bucket (here its subjects
/// moved aside for 8 s) now only delays the email: the event is redelivered with a growing
/// backoff and nothing is dead-lettered.
#[tokio::test]
async fn notification_keeps_an_event_through_an_outage_of_its_bucket() {
    let server = NatsServer::start();
    let (js, notifier) = Notifier::start(&server, |_| {}).await;

    let bucket = "KV_jetsaga_notification";
    jetsaga_testkit::move_subjects(&js, bucket, true)
        .await
        .unwrap();
    let event = order_event("order.confirmed", "n-outage", "n-outage");
    js.publish("saga.event.order.confirmed", event.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    // The outage itself: longer than the 20 deliveries 200 ms apart after which the old
    // rule dead-lettered the event (not a wait for anything to happen).
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    jetsaga_testkit::move_subjects(&js, bucket, false)
        .await
        .unwrap();

    let store = js.get_key_value("jetsaga_notification").await.unwrap();
    wait_until("the email is recorded", WAIT, || async {
        notification::email(&store, "n-outage")
            .await
            .is_ok_and(|e| e.is_some())
    })
    .await;
    let dead = js.get_stream("JETSAGA_DEAD_LETTERS").await.unwrap();
    assert!(
        dead.get_last_raw_message_by_subject("saga.dead.participant.notification")
            .await
            .is_err(),
        "nothing is dead-lettered"
    );
    notifier.stop().await;
}

/// A notification participant running in the test, with its defaults changed by `tune`; its
/// event consumer exists when `start` returns.
struct Notifier {
    token: CancellationToken,
    running: tokio::task::JoinHandle<Result<(), jetsaga_reference::Error>>,
}

impl Notifier {
    async fn start(
        server: &NatsServer,
        tune: impl FnOnce(&mut notification::Config),
    ) -> (jetstream::Context, Self) {
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client);
        let mut config = notification::Config::default();
        config.nats.url = server.url();
        config.metrics.listen = String::new();
        tune(&mut config);
        let token = CancellationToken::new();
        let running = tokio::spawn(notification::run(config, token.clone().cancelled_owned()));
        wait_until("the notification consumer exists", WAIT, || async {
            let Ok(stream) = js.get_stream("JETSAGA_EVENTS").await else {
                return false;
            };
            stream.consumer_info("notification").await.is_ok()
        })
        .await;
        (js, Self { token, running })
    }

    /// Stops it and checks it ended cleanly.
    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.running)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// An order event `name` of saga `saga_id` started with `key`.
fn order_event(name: &str, saga_id: &str, key: &str) -> Event {
    Event {
        protocol: protocol::VERSION,
        event: name.to_owned(),
        saga_id: saga_id.to_owned(),
        saga_type: "order-creation".to_owned(),
        key: key.to_owned(),
        input: order(&[("sku-1", 1)], 100, "tok_ok"),
        occurred_at: chrono::Utc::now(),
    }
}
