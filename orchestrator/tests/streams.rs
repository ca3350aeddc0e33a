//! "Either service may start first" with any settings: the orchestrator refuses streams a
//! participant created with other settings than its own.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use jetsaga_orchestrator::{Error, Service, provision};
use jetsaga_runtime::streams::{Streams, ensure_all};
use jetsaga_sagas::streams::{COMMANDS, DEAD_LETTERS, EVENTS, REPLIES};
use jetsaga_testkit::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_a_participant_created_with_other_settings_are_refused() {
    let server = NatsServer::start();
    let js = common::js(&server).await;
    // A participant with the default `[streams]` (a week of retention) started first.
    let participant_streams = [&COMMANDS, &REPLIES, &EVENTS, &DEAD_LETTERS];
    ensure_all(&js, &participant_streams, &Streams::default())
        .await
        .unwrap();

    // An orchestrator configured to keep a day finds week-long command streams.
    let mut config = common::config(&server.url(), None);
    config.streams.retention = Duration::from_secs(24 * 3600);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = Service::start_with_listener(config, listener)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Provision(provision::Error::Mismatch { stream, setting, .. })
            if stream == "JETSAGA_COMMANDS" && *setting == "max_age"),
        "{err}"
    );

    // With the same settings both start.
    common::orchestrator(&server.url(), None)
        .await
        .shutdown()
        .await;
}
