//! The orchestrator against a real nats-server, with in-test participants.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use async_nats::HeaderMap;
use common::*;
use jetsaga_orchestrator::{ApiError, Started};
use jetsaga_sagas::protocol::{self, Body, Outcome};
use jetsaga_sagas::{Cause, Phase, State, StepStatus};
use jetsaga_testkit::{NatsServer, wait_until};
use serde_json::json;

async fn start_fast(handle: &jetsaga_orchestrator::Handle, key: &str, card: &str) -> String {
    let Started { saga_id, .. } = handle.start("fast-order", key, order(card)).await.unwrap();
    saga_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_and_declines() {
    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let inventory = Responder::start(&js, "inventory", by_card()).await;
    let payment = Responder::start(&js, "payment", by_card()).await;
    let events = events(&server).await;

    let mut ids = Vec::new();
    for i in 0..200 {
        let card = if i % 10 == 0 { "tok_decline" } else { "tok_ok" };
        ids.push(start(&handle, &format!("order-{i}"), order(card)).await);
    }
    wait_all_terminal(&handle, &ids).await;

    let inv = inventory.distinct_by_saga();
    let pay = payment.distinct_by_saga();
    for (i, id) in ids.iter().enumerate() {
        let saga = saga(&handle, id).await;
        if i % 10 == 0 {
            assert_eq!(saga.phase(), Phase::Compensated, "saga {i}");
            let reserve = format!("{id}:reserve-stock:do:1");
            let release = format!("{id}:reserve-stock:undo:1");
            assert_eq!(
                inv[id],
                vec![reserve, release],
                "reserve then exactly one release"
            );
            assert_eq!(
                pay[id],
                vec![format!("{id}:take-payment:do:1")],
                "a declined charge is not refunded"
            );
            assert_eq!(saga.steps[1].status, StepStatus::Failed);
        } else {
            assert_eq!(saga.phase(), Phase::Completed, "saga {i}");
            assert_eq!(
                inv[id],
                vec![
                    format!("{id}:reserve-stock:do:1"),
                    format!("{id}:confirm-order:do:1")
                ],
                "reserve, then commit"
            );
            assert_eq!(pay[id], vec![format!("{id}:take-payment:do:1")]);
            assert!(saga.steps.iter().all(|s| s.status == StepStatus::Succeeded));
        }
        let journal = handle.journal(id).await.unwrap();
        assert_eq!(journal.first().unwrap().cause, Cause::Start);
        assert!(
            journal.windows(2).all(|w| w[1].seq == w[0].seq + 1),
            "journal is gapless"
        );
    }
    wait_until("every event is published", WAIT, || async {
        events.lock().unwrap().len() >= 200
    })
    .await;
    let events = events.lock().unwrap().clone();
    for (i, id) in ids.iter().enumerate() {
        let mine: Vec<_> = events
            .iter()
            .filter(|e| &e.saga_id == id)
            .map(|e| e.event.as_str())
            .collect();
        let expected = if i % 10 == 0 {
            "order.cancelled"
        } else {
            "order.confirmed"
        };
        assert_eq!(mine, vec![expected], "saga {i}");
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_starts_one_saga_over_api_and_subject() {
    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let _inventory = Responder::start(&js, "inventory", by_card()).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;

    let mut created = 0;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let Started {
            saga_id,
            created: c,
        } = handle
            .start("order-creation", "the-key", order("tok_ok"))
            .await
            .unwrap();
        created += usize::from(c);
        ids.push(saga_id);
    }
    assert_eq!(created, 1);
    ids.dedup();
    assert_eq!(ids.len(), 1);

    // The start subject, ten times, with no dedup header help: the saga id derives from the key.
    for _ in 0..10 {
        let start = protocol::Start {
            protocol: protocol::VERSION,
            key: "subject-key".into(),
            input: order("tok_ok"),
            requested_at: None,
        };
        js.publish("saga.start.order-creation", start.encode().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let id = jetsaga_orchestrator::driver::saga_id("order-creation", "subject-key");
    wait_phase(&handle, &id, Phase::Completed).await;
    let journal = handle.journal(&id).await.unwrap();
    assert_eq!(
        journal.iter().filter(|e| e.cause == Cause::Start).count(),
        1,
        "{journal:?}"
    );

    // Bad starts are refused before any step runs.
    let err = handle
        .start("order-creation", "k", json!({"customer_id": "c"}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ApiError::InvalidInput(ref m) if m.contains("email")),
        "{err}"
    );
    let err = handle
        .start("no-such-saga", "k", order("tok_ok"))
        .await
        .unwrap_err();
    assert_eq!(err, ApiError::UnknownType("no-such-saga".into()));

    // Taken starts leave the start stream: it holds only starts still waiting, whatever the
    // start rate (with limits retention it kept every start for its max age).
    wait_until("the start stream holds no taken start", WAIT, || {
        let js = js.clone();
        async move {
            let mut starts = js
                .get_stream(jetsaga_sagas::streams::STARTS.name)
                .await
                .unwrap();
            starts.info().await.unwrap().state.messages == 0
        }
    })
    .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_timeout_compensates_the_silent_step_and_ignores_late_replies() {
    let server = NatsServer::start();
    let defs = definitions_dir(&[("fast.toml", FAST_ORDER), order_schema_file()]);
    let running = orchestrator(&server.url(), Some(defs.path())).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let _inventory = Responder::start(&js, "inventory", by_card()).await;
    // Payment never answers a charge, but refunds.
    let payment = Responder::start(
        &js,
        "payment",
        Arc::new(|c: &protocol::Command| if c.action == "charge" { vec![] } else { ok() }),
    )
    .await;

    let id = start_fast(&handle, "silent-1", "tok_ok").await;
    let saga = wait_phase(&handle, &id, Phase::Compensated).await;
    assert_eq!(
        saga.steps[1].status,
        StepStatus::Compensated,
        "the timed-out charge is refunded"
    );
    assert_eq!(saga.steps[0].status, StepStatus::Compensated);
    let journal = handle.journal(&id).await.unwrap();
    assert!(
        journal
            .iter()
            .any(|e| e.cause == Cause::StepTimeout && e.step.as_deref() == Some("take-payment"))
    );
    let actions: Vec<_> = payment
        .commands()
        .iter()
        .map(|c| c.action.clone())
        .collect();
    assert_eq!(actions, vec!["charge", "refund"]);

    // The charge's success arrives late: journaled as ignored, nothing changes.
    let charge = payment.commands()[0].clone();
    publish_reply(&js, &charge, Outcome::Ok { result: json!({}) }).await;
    wait_until("the late reply is journaled", WAIT, || async {
        handle
            .journal(&id)
            .await
            .unwrap()
            .iter()
            .any(|e| e.cause == Cause::Ignored)
    })
    .await;
    let after = saga_now(&handle, &id).await;
    assert_eq!(after.phase(), Phase::Compensated);
    assert_eq!(after.transitions, saga.transitions);
    running.shutdown().await;
}

async fn saga_now(handle: &jetsaga_orchestrator::Handle, id: &str) -> jetsaga_sagas::Saga {
    handle.saga(id).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_old_replies_change_nothing() {
    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    // Every reply is sent three times.
    let thrice: Behaviour = Arc::new(|_c: &protocol::Command| {
        let mut v = ok();
        v.extend(ok());
        v.extend(ok());
        v
    });
    let inventory = Responder::start(&js, "inventory", thrice.clone()).await;
    let payment = Responder::start(&js, "payment", thrice).await;

    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(start(&handle, &format!("dup-{i}"), order("tok_ok")).await);
    }
    wait_all_terminal(&handle, &ids).await;
    for id in &ids {
        let journal = handle.journal(id).await.unwrap();
        let applied: Vec<_> = journal
            .iter()
            .filter(|e| !matches!(e.cause, Cause::Ignored | Cause::Resent))
            .collect();
        assert_eq!(applied.len(), 4, "start + three replies: {journal:?}");
        assert_eq!(inventory.distinct_by_saga()[id].len(), 2);
        assert_eq!(payment.distinct_by_saga()[id].len(), 1);
    }
    // A reply for an attempt that never existed, for a finished saga: ignored.
    let old = payment.commands()[0].clone();
    let mut forged = old.clone();
    forged.command_id = old.command_id.replace(":do:1", ":do:7");
    publish_reply(&js, &forged, Outcome::Ok { result: json!({}) }).await;
    wait_until("the stale reply is journaled", WAIT, || async {
        handle
            .journal(&old.saga_id)
            .await
            .unwrap()
            .iter()
            .any(|e| e.command_id.as_deref() == Some(forged.command_id.as_str()))
    })
    .await;
    let saga = saga_now(&handle, &old.saga_id).await;
    assert_eq!(saga.phase(), Phase::Completed);
    assert_eq!(saga.transitions, 4);
    let commands = inventory.commands().len() + payment.commands().len();
    assert_eq!(commands, 60, "no extra commands were sent");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_compensation_parks_the_saga_until_an_operator_retries() {
    let server = NatsServer::start();
    let defs = definitions_dir(&[("fast.toml", FAST_ORDER), order_schema_file()]);
    let running = orchestrator(&server.url(), Some(defs.path())).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    // Releases fail until the inventory "recovers".
    let inventory = Responder::start(&js, "inventory", releases_fail()).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;

    let id = start_fast(&handle, "stuck-1", "tok_decline").await;
    let saga = wait_phase(&handle, &id, Phase::Failed).await;
    let State::Failed { error, step, .. } = &saga.state else {
        unreachable!()
    };
    assert_eq!(*step, 0);
    assert_eq!(error.code, "db_down");
    let releases = inventory
        .commands()
        .iter()
        .filter(|c| c.action == "release")
        .count();
    assert_eq!(releases, 3, "compensation-retry.max-attempts");

    // Nothing else is allowed on a failed saga, and nothing happens by itself.
    assert!(matches!(
        handle.abort(&id, "no", "ana").await,
        Err(ApiError::NotAllowed(_))
    ));

    inventory.set(by_card());
    let phase = handle.retry(&id, "ana").await.unwrap();
    assert_eq!(phase, Phase::Compensating);
    let saga = wait_phase(&handle, &id, Phase::Compensated).await;
    assert_eq!(saga.steps[0].status, StepStatus::Compensated);
    let journal = handle.journal(&id).await.unwrap();
    let retry = journal
        .iter()
        .find(|e| e.cause == Cause::OperatorRetry)
        .unwrap();
    assert_eq!(retry.actor, jetsaga_sagas::Actor::Operator);
    assert_eq!(retry.operator.as_deref(), Some("ana"));
    assert!(matches!(
        handle.retry(&id, "ana").await,
        Err(ApiError::NotAllowed(_))
    ));
    assert!(matches!(
        handle.retry("no-such-saga", "ana").await,
        Err(ApiError::NotFound(_))
    ));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_abort_compensates_a_running_saga() {
    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let _inventory = Responder::start(&js, "inventory", by_card()).await;
    let _payment = Responder::start(
        &js,
        "payment",
        Arc::new(|c: &protocol::Command| if c.action == "charge" { vec![] } else { ok() }),
    )
    .await;
    let id = start(&handle, "abort-1", order("tok_ok")).await;
    wait_until("the charge is out", WAIT, || async {
        matches!(
            saga_now(&handle, &id).await.state,
            State::Running { step: 1, .. }
        )
    })
    .await;
    handle
        .abort(&id, "customer cancelled", "ana")
        .await
        .unwrap();
    let saga = wait_phase(&handle, &id, Phase::Compensated).await;
    let State::Compensated { cause } = &saga.state else {
        unreachable!()
    };
    assert_eq!(cause.code, "aborted");
    assert_eq!(
        saga.steps[1].status,
        StepStatus::Compensated,
        "the in-flight charge is refunded"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_their_reason() {
    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let handle = running.handle().clone();
    let js = js(&server).await;

    let publish = |subject: &'static str, body: Vec<u8>| {
        let js = js.clone();
        async move {
            let mut headers = HeaderMap::new();
            headers.insert("X-Origin", "test");
            js.publish_with_headers(subject, headers, body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    publish("saga.reply.inventory.garbage", b"not json".to_vec()).await;
    let unknown = protocol::Reply {
        protocol: protocol::VERSION,
        command_id: "nope:reserve-stock:do:1".into(),
        saga_id: "nope".into(),
        outcome: Outcome::Ok { result: json!({}) },
    };
    publish("saga.reply.inventory.nope", unknown.encode()).await;
    publish("saga.start.order-creation", b"{\"protocol\":1}".to_vec()).await;
    publish(
        "saga.start.no-such-saga",
        protocol::Start {
            protocol: 1,
            key: "k".into(),
            input: order("tok_ok"),
            requested_at: None,
        }
        .encode(),
    )
    .await;
    let bad_input = protocol::Start {
        protocol: 1,
        key: "k2".into(),
        input: json!({"customer_id": "x"}),
        requested_at: None,
    };
    publish("saga.start.order-creation", bad_input.encode()).await;
    publish(
        "saga.start.order-creation",
        b"{\"protocol\":9,\"key\":\"k\",\"input\":{}}".to_vec(),
    )
    .await;

    wait_until("six dead letters", WAIT, || async {
        dead_letters(&js).await.len() >= 6
    })
    .await;
    let dead = dead_letters(&js).await;
    let reasons: Vec<&str> = dead.iter().map(|(_, r)| r.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("invalid Reply")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("unknown saga nope")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("invalid Start")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unknown saga type \"no-such-saga\"")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("email")), "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unsupported protocol version 9")),
        "{reasons:?}"
    );
    assert_eq!(dead.len(), 6, "{dead:?}");
    assert!(
        dead.iter()
            .all(|(s, _)| s.starts_with("saga.dead.orchestrator."))
    );
    // The orchestrator is still running.
    let _payment = Responder::start(&js, "payment", by_card()).await;
    let _inventory = Responder::start(&js, "inventory", by_card()).await;
    let id = start(&handle, "after-poison", order("tok_ok")).await;
    wait_phase(&handle, &id, Phase::Completed).await;
    assert!(
        handle
            .metrics()
            .render()
            .contains("jetsaga_dead_letters_total")
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_load_without_applying_a_transition_twice() {
    let server = NatsServer::start();
    let a = orchestrator(&server.url(), None).await;
    let b = orchestrator(&server.url(), None).await;
    let js = js(&server).await;
    let _inventory = Responder::start(&js, "inventory", by_card()).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;

    let mut ids = Vec::new();
    for i in 0..500 {
        let start = protocol::Start {
            protocol: protocol::VERSION,
            key: format!("aa-{i}"),
            input: order(if i % 10 == 0 { "tok_decline" } else { "tok_ok" }),
            requested_at: None,
        };
        let ack = js
            .publish("saga.start.order-creation", start.encode().into())
            .await
            .unwrap();
        ack.await.unwrap();
        ids.push(jetsaga_orchestrator::driver::saga_id(
            "order-creation",
            &format!("aa-{i}"),
        ));
    }
    wait_all_terminal(a.handle(), &ids).await;
    for id in &ids {
        let journal = a.handle().journal(id).await.unwrap();
        let mut seen = std::collections::HashSet::new();
        for entry in journal
            .iter()
            .filter(|e| !matches!(e.cause, Cause::Ignored | Cause::Resent))
        {
            assert!(
                seen.insert((
                    entry.step.clone(),
                    entry.cause,
                    entry.command_id.clone(),
                    entry.to
                )),
                "transition applied twice in {journal:?}"
            );
        }
    }
    let started = |r: &jetsaga_orchestrator::Running| {
        r.handle()
            .metrics()
            .started
            .with_label_values(&["order-creation"])
            .get()
    };
    assert_eq!(started(&a) + started(&b), 500);
    assert!(
        started(&a) > 0 && started(&b) > 0,
        "both instances took work: {} / {}",
        started(&a),
        started(&b)
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reflects_nats() {
    let mut server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let base = format!("http://{}", running.http_addr());
    let get = |path: &str| {
        let url = format!("{base}{path}");
        async move { http_get(&url).await }
    };
    assert_eq!(get("/healthz").await.0, 200);
    assert_eq!(get("/readyz").await.0, 200);
    server.kill();
    wait_until("readyz reports NATS down", WAIT, || async {
        get("/readyz").await.0 == 503
    })
    .await;
    assert!(get("/readyz").await.1.contains("NATS"));
    assert_eq!(get("/healthz").await.0, 200);
    server.start_again().unwrap();
    wait_until("readyz recovers", WAIT, || async {
        get("/readyz").await.0 == 200
    })
    .await;
    running.shutdown().await;
}

/// A GET over a real socket: the status and the body.
async fn http_get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_is_idempotent_and_refuses_mismatched_streams_or_no_jetstream() {
    use jetsaga_orchestrator::{Error, Service, provision};

    let server = NatsServer::start();
    // Twice on the same server: the second start finds everything in place.
    let first = orchestrator(&server.url(), None).await;
    first.shutdown().await;
    let second = orchestrator(&server.url(), None).await;
    second.shutdown().await;

    // Someone changed a stream jetsaga relies on.
    let js = js(&server).await;
    js.delete_stream(jetsaga_sagas::streams::JOURNAL.name)
        .await
        .unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: jetsaga_sagas::streams::JOURNAL.name.into(),
        subjects: vec!["saga.journal.>".into()],
        allow_direct: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = Service::start_with_listener(config(&server.url(), None), listener)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Provision(provision::Error::Mismatch { stream, setting, .. })
            if stream == "JETSAGA_JOURNAL" && *setting == "allow_direct"),
        "{err}"
    );

    // A server without JetStream.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut plain = std::process::Command::new(jetsaga_testkit::nats_server_bin().unwrap());
    plain.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    let _plain = jetsaga_testkit::ChildGuard::spawn(plain).unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    wait_until("the plain server accepts connections", WAIT, || async {
        async_nats::connect(url.as_str()).await.is_ok()
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = Service::start_with_listener(config(&url, None), listener)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Provision(provision::Error::NoJetStream(_))),
        "{err}"
    );
    assert!(
        err.to_string().contains("JetStream is not available"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_exhaust_their_deliveries_are_dead_lettered() {
    use async_nats::jetstream::consumer;

    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let js = js(&server).await;
    // A participant consumer that never acks: JetStream gives up after two deliveries.
    let stream = js
        .get_stream(jetsaga_sagas::streams::COMMANDS.name)
        .await
        .unwrap();
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("participant-flaky".into()),
            filter_subject: "saga.cmd.flaky.>".into(),
            ack_wait: std::time::Duration::from_millis(500),
            max_deliver: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    js.publish("saga.cmd.flaky.do", "a command nobody finishes".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    use futures::StreamExt;
    for _ in 0..2 {
        let _unacked = messages.next().await.unwrap().unwrap();
    }
    wait_until("the exhausted command is dead-lettered", WAIT, || async {
        dead_letters(&js).await.iter().any(|(subject, reason)| {
            subject == "saga.dead.maxdeliver.participant-flaky"
                && reason.contains("max deliveries (2) reached on consumer participant-flaky")
        })
    })
    .await;
    running.shutdown().await;
}

/// Issue 10 hole 8: start requests published as clients do (`Nats-Msg-Id` from
/// `protocol::start_msg_id`) within the dedup window: one key for two saga
/// types starts two sagas, and a start refused for its input then corrected
/// starts the saga.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_ids_never_collide_across_types_or_corrected_inputs() {
    let server = NatsServer::start();
    let defs = definitions_dir(&[("fast.toml", FAST_ORDER), order_schema_file()]);
    let running = orchestrator(&server.url(), Some(defs.path())).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let _inventory = Responder::start(&js, "inventory", by_card()).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;

    let publish = |saga_type: &'static str, key: &'static str, input: serde_json::Value| {
        let js = js.clone();
        async move {
            let mut headers = HeaderMap::new();
            let id = protocol::start_msg_id(saga_type, key, &input);
            headers.insert(protocol::header::MSG_ID, id.as_str());
            let start = protocol::Start {
                protocol: protocol::VERSION,
                key: key.to_owned(),
                input,
                requested_at: None,
            };
            let ack = js
                .publish_with_headers(
                    protocol::subject::start(saga_type),
                    headers,
                    start.encode().into(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            ack.duplicate
        }
    };
    // The same key for two saga types.
    assert!(!publish("order-creation", "shared", order("tok_ok")).await);
    assert!(!publish("fast-order", "shared", order("tok_ok")).await);
    // The same start again is a duplicate.
    assert!(publish("fast-order", "shared", order("tok_ok")).await);
    // A start refused for its input, then corrected.
    assert!(!publish("order-creation", "fixed", json!({"customer_id": "c"})).await);
    assert!(!publish("order-creation", "fixed", order("tok_ok")).await);

    for (saga_type, key) in [
        ("order-creation", "shared"),
        ("fast-order", "shared"),
        ("order-creation", "fixed"),
    ] {
        let id = jetsaga_orchestrator::driver::saga_id(saga_type, key);
        wait_phase(&handle, &id, Phase::Completed).await;
    }
    running.shutdown().await;
}
