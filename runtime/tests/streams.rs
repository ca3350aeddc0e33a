//! Streams and buckets: created when missing, checked when present, a mismatch refused.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream;
use jetsaga_runtime::streams::{self, ErrorKind, Streams};
use jetsaga_sagas::streams as specs;
use jetsaga_testkit::NatsServer;

#[tokio::test]
async fn ensure_creates_then_accepts_then_refuses_a_mismatch() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let settings = Streams::default();

    streams::check_jetstream(&js).await.unwrap();
    streams::ensure_all(&js, &specs::ALL, &settings)
        .await
        .unwrap();
    // A second service with the same settings finds everything in place.
    streams::ensure_all(&js, &specs::ALL, &settings)
        .await
        .unwrap();

    // One that keeps commands for an hour refuses the week-long ones it finds.
    let shorter = Streams {
        retention: Duration::from_secs(3600),
        ..Streams::default()
    };
    let err = streams::ensure(&js, &specs::COMMANDS, &shorter)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Mismatch);
    assert!(
        matches!(&err, streams::Error::Mismatch { stream, setting, .. }
            if stream == "JETSAGA_COMMANDS" && *setting == "max_age"),
        "{err}"
    );
    // Live journals never age out, whatever the retention: the journal is the
    // same for both, and only a finished saga's record expires (by its TTL).
    let journal = streams::ensure(&js, &specs::JOURNAL, &shorter)
        .await
        .unwrap();
    let journal = journal.cached_info().config.clone();
    assert_eq!(journal.max_age, Duration::ZERO);
    assert!(journal.allow_message_ttl && !journal.allow_rollup);
    assert_eq!(journal.max_messages_per_subject, 1);
    assert_eq!(journal.discard, jetstream::stream::DiscardPolicy::New);
    // Another byte bound is refused by name too.
    let smaller = Streams {
        max_bytes: bytesize::ByteSize::mib(64),
        ..Streams::default()
    };
    let err = streams::ensure(&js, &specs::JOURNAL, &smaller)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, streams::Error::Mismatch { setting, .. } if *setting == "max_bytes"),
        "{err}"
    );

    // A stream someone created with another duplicate window.
    let mut other = streams::config(&specs::EVENTS, &settings);
    js.delete_stream(specs::EVENTS.name).await.unwrap();
    other.duplicate_window = Duration::from_secs(10);
    js.create_stream(other).await.unwrap();
    let err = streams::ensure(&js, &specs::EVENTS, &settings)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, streams::Error::Mismatch { stream, setting, .. }
            if stream == "JETSAGA_EVENTS" && *setting == "duplicate_window"),
        "{err}"
    );
    assert!(err.to_string().contains("duplicate_window"), "{err}");

    // Buckets: created, then found; another storage is refused.
    let store = streams::ensure_bucket(&js, "things", "test", &settings)
        .await
        .unwrap();
    store.put("a", "1".into()).await.unwrap();
    streams::ensure_bucket(&js, "things", "test", &settings)
        .await
        .unwrap();
    let memory = Streams {
        storage: streams::Storage::Memory,
        ..Streams::default()
    };
    let err = streams::ensure_bucket(&js, "things", "test", &memory)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, streams::Error::Mismatch { setting, .. } if *setting == "storage"),
        "{err}"
    );
}

#[tokio::test]
async fn a_server_without_room_for_the_byte_bounds_is_named_with_the_setting_to_change() {
    // 3 GB of JetStream storage holds one stream of the default 2 GiB bound, not two.
    let server = NatsServer::start_with(jetsaga_testkit::Options {
        max_store: Some("3GB".to_owned()),
        ..Default::default()
    });
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let err = streams::ensure_all(&js, &specs::ALL, &Streams::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoStorage, "{err}");
    let message = err.to_string();
    assert!(
        message.contains("streams.max-bytes") && message.contains("max_file_store"),
        "{message}"
    );
    // With a bound that fits, the same server takes every stream.
    for spec in specs::ALL {
        let _ = js.delete_stream(spec.name).await;
    }
    let small = Streams {
        max_bytes: bytesize::ByteSize::mib(256),
        ..Streams::default()
    };
    streams::ensure_all(&js, &specs::ALL, &small).await.unwrap();
}
