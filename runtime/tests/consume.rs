//! The consume loop against a real server: bounded in-flight work, settling by the handler's
//! decision, and the drain under one grace period.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message, consumer};
use jetsaga_runtime::consume::{Consumer, Drained, Handler, Pull, Settings};
use jetsaga_testkit::{NatsServer, wait_until};
use tokio::sync::{Notify, oneshot};

const WAIT: Duration = Duration::from_secs(30);

/// Blocks every message until released; counts what runs and the most at once.
#[derive(Default)]
struct Gate {
    running: AtomicUsize,
    most: AtomicUsize,
    finished: AtomicUsize,
    release: Notify,
    released: std::sync::atomic::AtomicBool,
}

impl Handler for Gate {
    async fn handle(&self, _message: &Message) -> AckKind {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        while !self.released.load(Ordering::SeqCst) {
            let notified = self.release.notified();
            if self.released.load(Ordering::SeqCst) {
                break;
            }
            notified.await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.finished.fetch_add(1, Ordering::SeqCst);
        AckKind::Ack
    }
}

impl Gate {
    fn open(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.release.notify_waiters();
    }
}

async fn setup(
    server: &NatsServer,
    name: &str,
    messages: usize,
) -> (
    async_nats::Client,
    jetstream::Context,
    consumer::PullConsumer,
) {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.to_owned(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..messages {
        js.publish(format!("{name}.{i}"), "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("worker".to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .unwrap();
    (client, js, consumer)
}

fn settings(concurrency: usize, grace: Duration) -> Settings {
    Settings {
        concurrency,
        pull: Pull {
            batch: 4,
            ..Pull::default()
        },
        ack_wait: Duration::from_secs(30),
        grace,
    }
}

async fn pending(js: &jetstream::Context, stream: &str) -> (u64, usize) {
    let mut consumer: consumer::PullConsumer = js
        .get_stream(stream)
        .await
        .unwrap()
        .get_consumer("worker")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_pending, info.num_ack_pending)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_work_is_bounded_and_finishes_within_the_grace() {
    let server = NatsServer::start();
    let (client, js, consumer) = setup(&server, "BOUNDED", 6).await;
    let gate = Arc::new(Gate::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(Consumer::new(consumer, client, settings(2, WAIT)).run(
        gate.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    wait_until("two handlers run", WAIT, || async {
        gate.running.load(Ordering::SeqCst) == 2
    })
    .await;
    // Shut down while two are in flight: no new ones start, the two finish and are acked.
    stop.send(()).unwrap();
    gate.open();
    let drained: Drained = run.await.unwrap();
    assert_eq!(drained, Drained { left: 0 });
    assert_eq!(
        gate.most.load(Ordering::SeqCst),
        2,
        "never more than concurrency"
    );
    assert_eq!(gate.finished.load(Ordering::SeqCst), 2);
    wait_until("the two are acked", WAIT, || async {
        let (_, ack_pending) = pending(&js, "BOUNDED").await;
        // The pull may have buffered more than it handed out; those wait for ack_wait.
        ack_pending <= 4
    })
    .await;
    let (unpulled, ack_pending) = pending(&js, "BOUNDED").await;
    assert!(
        unpulled + ack_pending as u64 == 4,
        "two acked, four left: {unpulled} + {ack_pending}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_period_bounds_the_drain() {
    let server = NatsServer::start();
    let (client, _js, consumer) = setup(&server, "STUCK", 3).await;
    let gate = Arc::new(Gate::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(
        Consumer::new(consumer, client, settings(8, Duration::from_millis(200))).run(
            gate.clone(),
            async {
                let _ = stopped.await;
            },
        ),
    );
    wait_until("three handlers run", WAIT, || async {
        gate.running.load(Ordering::SeqCst) == 3
    })
    .await;
    stop.send(()).unwrap();
    // The handlers never finish: the run returns after the grace, naming what is left.
    let drained = run.await.unwrap();
    assert_eq!(drained, Drained { left: 3 });
    assert_eq!(gate.finished.load(Ordering::SeqCst), 0);
    gate.open();
}
