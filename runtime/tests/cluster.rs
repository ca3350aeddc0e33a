//! Compare-and-set on R3 streams of a 3-node cluster: a write that lost the race is a
//! conflict, whichever of the two codes the server gives it.
//!
//! A clustered stream's leader checks `Nats-Expected-Last-Subject-Sequence` against the
//! writes still being proposed to its peers; a write that finds one in flight on its subject
//! is refused with `JSStreamWrongLastSequenceConstantErr` (10164), not the 10071 a single
//! server gives, and async-nats 0.51 maps only the latter to `WrongLastSequence`. Read as a
//! plain failure, each such conflict was retried as a transient error (the orchestrator's
//! journal appends, seen as "wrong last sequence" failures in `jetsaga chaos --cluster`), and
//! a participant's KV update failed instead of re-reading.

#![allow(clippy::unwrap_used)]

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use jetsaga_runtime::kv::{self as records, is_conflict};
use jetsaga_runtime::streams::{self, Streams};
use jetsaga_testkit::Cluster;

/// Concurrent writers of one subject: enough that most find another's write in flight.
const WRITERS: usize = 32;

#[tokio::test]
async fn a_lost_compare_and_set_on_an_r3_stream_is_a_conflict() {
    let cluster = Cluster::start(3);
    let client = async_nats::connect(cluster.urls()).await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "CAS".to_owned(),
        subjects: vec!["cas.>".to_owned()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let first = js
        .publish("cas.a", "0".into())
        .await
        .unwrap()
        .await
        .unwrap();

    // Every writer expects the same last sequence: one wins, every other one conflicts.
    let mut acks = Vec::new();
    for i in 0..WRITERS {
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            first.sequence.to_string(),
        );
        acks.push(
            js.publish_with_headers("cas.a", headers, i.to_string().into())
                .await
                .unwrap(),
        );
    }
    let (mut won, mut lost) = (0, Vec::new());
    for ack in acks {
        match ack.await {
            Ok(_) => won += 1,
            Err(e) => lost.push(e),
        }
    }
    assert_eq!(won, 1, "exactly one write wins");
    let codes: Vec<String> = lost.iter().map(|e| format!("{e:?}")).collect();
    for e in &lost {
        assert!(
            is_conflict(e),
            "a lost write is a conflict: {e:?} (all: {codes:?})"
        );
    }

    // The same race through a participant's KV write: each loser is told to re-read
    // (`Ok(None)`), none fails.
    let store = streams::ensure_bucket(
        &js,
        "cas",
        "test",
        &Streams {
            replicas: 3,
            ..Streams::default()
        },
    )
    .await
    .unwrap();
    let revision = records::write(&store, "k", "0".into(), None)
        .await
        .unwrap()
        .unwrap();
    let writes = (0..WRITERS).map(|i| {
        let store = store.clone();
        async move { records::write(&store, "k", i.to_string().into(), Some(revision)).await }
    });
    let results = futures::future::join_all(writes).await;
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| format!("{e:?}")))
        .collect();
    assert!(
        failed.is_empty(),
        "conflicts reported as failures: {failed:?}"
    );
    let winners = results.iter().filter(|r| matches!(r, Ok(Some(_)))).count();
    assert_eq!(winners, 1, "exactly one KV write wins");
}
