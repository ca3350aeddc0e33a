//! KV records with a TTL: written under compare-and-set with `Nats-TTL`, gone (key and
//! subject) after it; a bucket without TTL support is refused.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use jetsaga_runtime::kv::{self as records, Read};
use jetsaga_runtime::streams::{self, Streams};
use jetsaga_testkit::{NatsServer, wait_until};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn records_written_with_a_ttl_expire_and_others_stay() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let store = streams::ensure_bucket(&js, "ttl", "test", &Streams::default())
        .await
        .unwrap();

    // Created with a TTL, then updated under compare-and-set with one; a stale revision is a
    // conflict, not an error.
    let first = records::write_with_ttl(&js, &store, "a", "1".into(), None, Duration::from_secs(2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        records::write_with_ttl(&js, &store, "a", "x".into(), None, Duration::from_secs(2))
            .await
            .unwrap(),
        None,
        "a create of an existing key is a conflict"
    );
    let second = records::write_with_ttl(
        &js,
        &store,
        "a",
        "2".into(),
        Some(first),
        Duration::from_secs(2),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        records::write_with_ttl(
            &js,
            &store,
            "a",
            "3".into(),
            Some(first),
            Duration::from_secs(2)
        )
        .await
        .unwrap(),
        None
    );
    records::write(&store, "live", "forever".into(), None)
        .await
        .unwrap()
        .unwrap();
    let stream = js.get_stream("KV_ttl").await.unwrap();
    let message = stream.direct_get(second).await.unwrap();
    assert_eq!(
        message.headers.get("Nats-TTL").map(|v| v.as_str()),
        Some("2")
    );
    assert_eq!(
        records::entry(&store, "a", Read::Leader)
            .await
            .unwrap()
            .map(|(v, _)| v),
        Some("2".into())
    );

    wait_until("the TTL'd key is gone", WAIT, || async {
        matches!(records::entry(&store, "a", Read::Leader).await, Ok(None))
            && matches!(records::entry(&store, "a", Read::Any).await, Ok(None))
    })
    .await;
    wait_until("its subject is gone from the stream", WAIT, || async {
        let mut stream = js.get_stream("KV_ttl").await.unwrap();
        stream.info().await.unwrap().state.subjects_count == 1
    })
    .await;
    assert!(
        records::entry(&store, "live", Read::Any)
            .await
            .unwrap()
            .is_some()
    );
    // The key can be created again once it expired.
    assert!(
        records::write(&store, "a", "4".into(), None)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn a_bucket_without_ttls_is_refused_by_name() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    // As earlier versions created it.
    js.create_key_value(kv::Config {
        bucket: "old".to_owned(),
        history: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let err = streams::ensure_bucket(&js, "old", "test", &Streams::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, streams::Error::Mismatch { stream, setting, .. }
            if stream == "KV_old" && *setting == "allow_msg_ttl"),
        "{err}"
    );
}
