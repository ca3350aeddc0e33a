//! The first connection: a service started before its server waits for it (up to
//! `nats.startup-wait`); with no wait it fails at once, naming the server.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use jetsaga_runtime::nats::{self, ErrorKind, Nats};
use jetsaga_testkit::NatsServer;

fn settings(url: String, startup_wait: Duration) -> Nats {
    Nats {
        url,
        startup_wait,
        connect_timeout: Duration::from_millis(500),
        ..Nats::default()
    }
}

#[tokio::test]
async fn the_first_connection_waits_for_a_server_that_starts_later() {
    let mut server = NatsServer::start();
    server.stop();
    let url = server.url();
    let connecting = tokio::spawn(async move {
        nats::connect(&settings(url, Duration::from_secs(60)), "late").await
    });
    // No server answers: still trying, not failed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !connecting.is_finished(),
        "gave up while the server was down"
    );

    // Blocking start (it waits until the server accepts clients) off the runtime's threads.
    let server = tokio::task::spawn_blocking(move || {
        server.start_again().unwrap();
        server
    })
    .await
    .unwrap();
    let connection = tokio::time::timeout(Duration::from_secs(30), connecting)
        .await
        .expect("connected once the server was up")
        .unwrap()
        .unwrap();
    connection.client.flush().await.unwrap();
    drop(server);
}

#[tokio::test]
async fn without_a_startup_wait_a_missing_server_fails_at_once() {
    let mut server = NatsServer::start();
    server.stop();
    let err = nats::connect(&settings(server.url(), Duration::ZERO), "eager")
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Connect);
    assert!(err.to_string().contains(&server.url()), "{err}");
}
