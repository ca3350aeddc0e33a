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

/// Lives far longer than the test waits: a consumer that waited for its pull request's expiry
/// would not get the message in time. (The server answers a request whose consumer changed
/// leader with "409 Leadership Change", and async-nats pulls again at once.)
const LONG_EXPIRY: std::time::Duration = std::time::Duration::from_secs(120);

/// How long the consumer may take to get the message after the leader's node is killed: an
/// election, then a pull request to the new leader.
const RESUME_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_consumer_resumes_before_its_request_expires_when_its_leader_s_node_is_killed() {
    use async_nats::jetstream::consumer;
    use jetsaga_runtime::consume::{Pull, pull};
    use std::time::Duration;

    let mut cluster = Cluster::start(3);
    let admin = jetstream::new(async_nats::connect(cluster.urls()).await.unwrap());
    let stream = admin
        .create_stream(stream::Config {
            name: "PULL".to_owned(),
            subjects: vec!["pull.>".to_owned()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut durable = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("worker".to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let leader = durable
        .info()
        .await
        .unwrap()
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .unwrap();
    let leader: usize = leader.trim_start_matches('n').parse().unwrap();
    // The consumer's client sits on another node, so it never sees a disconnect: only the
    // cluster can tell it that its pull request went with the leader.
    let other = (leader + 1) % 3;
    let client = async_nats::connect(cluster.node(other).url())
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let consumer: consumer::PullConsumer = js
        .get_stream("PULL")
        .await
        .unwrap()
        .get_consumer("worker")
        .await
        .unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let token = tokio_util::sync::CancellationToken::new();
    let settings = Pull {
        batch: 16,
        heartbeat: Duration::from_secs(1),
        expires: LONG_EXPIRY,
    };
    let pulling = tokio::spawn({
        let token = token.clone();
        async move {
            pull(
                &consumer,
                settings,
                &token,
                || async { Some(()) },
                |message, ()| {
                    let _ = tx.send(message);
                },
            )
            .await;
        }
    });
    js.publish("pull.before", "x".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(received(&mut rx).await, "pull.before");
    // The next pull request waits at the leader before it goes.
    jetsaga_testkit::wait_until("a pull request waits at the leader", RESUME_WAIT, || {
        let mut durable = durable.clone();
        async move { durable.info().await.is_ok_and(|i| i.num_waiting > 0) }
    })
    .await;

    cluster.node_mut(leader).kill();
    // The stream's leader may have been on that node too: publish until a leader takes it.
    let deadline = tokio::time::Instant::now() + RESUME_WAIT;
    loop {
        let ack = match js.publish("pull.after", "x".into()).await {
            Ok(ack) => ack.await,
            Err(e) => panic!("publish: {e}"),
        };
        match ack {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("publish after the kill: {e}; again");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("no stream leader after the kill: {e}"),
        }
    }
    assert_eq!(received(&mut rx).await, "pull.after");

    token.cancel();
    pulling.await.unwrap();
}

/// The subject of the next message the consumer got, acknowledged.
async fn received(rx: &mut tokio::sync::mpsc::UnboundedReceiver<jetstream::Message>) -> String {
    let message = tokio::time::timeout(RESUME_WAIT, rx.recv())
        .await
        .expect("the consumer got nothing")
        .unwrap();
    message.ack().await.unwrap();
    message.subject.to_string()
}
