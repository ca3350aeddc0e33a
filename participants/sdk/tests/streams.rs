//! "Either service may start first" with any settings: a participant refuses streams the
//! orchestrator (or anyone) created with other settings than its `[streams]`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream;
use jetsaga_participant::{Context, Error, Handled, Participant, streams};
use jetsaga_sagas::streams as specs;
use jetsaga_testkit::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_refuses_streams_with_other_settings() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    // An orchestrator keeping everything for a day created the streams.
    let day = streams::Streams {
        retention: Duration::from_secs(24 * 3600),
        ..streams::Streams::default()
    };
    streams::ensure(&js, &specs::ALL, &day).await.unwrap();

    let participant = |settings: streams::Streams| {
        Participant::builder("inventory")
            .handler("reserve", |_ctx: Context| async {
                Handled::ok(serde_json::Value::Null)
            })
            .streams(settings)
            .drain_on_shutdown(false)
            .build()
            .unwrap()
    };
    // With the default week it refuses to start, naming the stream and the setting.
    let err = participant(streams::Streams::default())
        .run(client.clone(), async {})
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Stream(jetsaga_runtime::streams::Error::Mismatch { stream, setting, .. })
            if stream == "JETSAGA_COMMANDS" && *setting == "max_age"),
        "{err}"
    );
    // With the orchestrator's settings it runs (and stops at once here).
    participant(day).run(client, async {}).await.unwrap();
}
