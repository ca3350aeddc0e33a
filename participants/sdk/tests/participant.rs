//! The SDK against a real nats-server: outcomes, acks, idempotency, dead letters, shutdown.

#![allow(clippy::unwrap_used)] // test helpers panic on purpose

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt;
use jetsaga_participant::{Context, Handled, Participant, metrics, streams};
use jetsaga_sagas::protocol::{self, Body, Command, Outcome, Reply, header, subject};
use jetsaga_sagas::streams::{DEAD_LETTERS, REPLIES};
use jetsaga_testkit::{NatsServer, wait_until};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const NAME: &str = "test";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn command(action: &str, saga: &str, attempt: u32) -> Command {
    let command_id = format!("{saga}:step:do:{attempt}");
    Command {
        protocol: protocol::VERSION,
        reply_to: subject::reply(NAME, &command_id),
        command_id,
        saga_id: saga.to_owned(),
        saga_type: "demo".to_owned(),
        step: "step".to_owned(),
        action: action.to_owned(),
        compensation: false,
        attempt,
        input: json!({"n": 1}),
    }
}

/// Publishes `cmd` as the orchestrator does; `msg_id` lets a test bypass the dedup window.
async fn send(js: &jetstream::Context, cmd: &Command, msg_id: &str) {
    send_with(js, cmd, msg_id, HeaderMap::new()).await;
}

async fn send_with(js: &jetstream::Context, cmd: &Command, msg_id: &str, mut headers: HeaderMap) {
    headers.insert(header::MSG_ID, msg_id);
    headers.insert(header::SAGA_ID, cmd.saga_id.as_str());
    headers.insert(header::COMMAND_ID, cmd.command_id.as_str());
    headers.insert(header::TRACEPARENT, TRACEPARENT);
    js.publish_with_headers(
        subject::command(NAME, &cmd.action),
        headers,
        cmd.encode().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

async fn recorded(js: &jetstream::Context, cmd: &Command) -> Option<(Reply, HeaderMap)> {
    let stream = js.get_stream(REPLIES.name).await.ok()?;
    let msg = stream
        .direct_get_last_for_subject(cmd.reply_to.clone())
        .await
        .ok()?;
    Some((Reply::decode(&msg.payload).unwrap(), msg.headers))
}

async fn wait_reply(js: &jetstream::Context, cmd: &Command) -> (Reply, HeaderMap) {
    wait_until(&format!("a reply to {}", cmd.command_id), WAIT, || async {
        recorded(js, cmd).await.is_some()
    })
    .await;
    recorded(js, cmd).await.unwrap()
}

async fn settled(stream: &jetstream::stream::Stream) -> bool {
    let info = stream.consumer_info("participant-test").await.unwrap();
    info.num_ack_pending == 0 && info.num_pending == 0
}

struct Running {
    token: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), jetsaga_participant::Error>>,
}

impl Running {
    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn start(url: &str, participant: Participant) -> Running {
    let client = async_nats::connect(url).await.unwrap();
    let token = CancellationToken::new();
    let js = jetstream::new(client.clone());
    let task = tokio::spawn(participant.run(client, token.clone().cancelled_owned()));
    wait_until("the consumer exists", WAIT, || async {
        let Ok(stream) = js.get_stream("JETSAGA_COMMANDS").await else {
            return false;
        };
        stream.consumer_info("participant-test").await.is_ok()
    })
    .await;
    Running { token, task }
}

#[tokio::test]
async fn outcomes_acks_dead_letters_and_metrics() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);

    let retries = Arc::new(AtomicU32::new(0));
    let panics = Arc::new(AtomicU32::new(0));
    let registry = prometheus::Registry::new();
    let participant = {
        let retries = retries.clone();
        let panics = panics.clone();
        Participant::builder(NAME)
            .handler("ok", |ctx: Context| async move {
                Handled::ok(json!({"saga": ctx.saga_id(), "delivered": ctx.delivered()}))
            })
            .handler("fail", |_ctx: Context| async {
                Handled::failed("out_of_luck", "no")
            })
            .handler("retry", move |_ctx: Context| {
                let retries = retries.clone();
                async move {
                    retries.fetch_add(1, Ordering::SeqCst);
                    Handled::retry("busy", Some(Duration::from_millis(20)))
                }
            })
            .handler("panic", move |_ctx: Context| {
                let panics = panics.clone();
                async move {
                    if panics.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("boom");
                    }
                    Handled::ok(json!("recovered"))
                }
            })
            .handler("typed", |ctx: Context| async move {
                #[derive(serde::Deserialize)]
                struct Wants {
                    #[allow(dead_code)]
                    missing: String,
                }
                match ctx.input::<Wants>() {
                    Ok(_) => Handled::ok(json!(null)),
                    Err(failed) => failed,
                }
            })
            .max_deliver(3)
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .registry(registry.clone())
            .build()
            .unwrap()
    };
    let running = start(&server.url(), participant).await;

    let ok = command("ok", "s-ok", 1);
    let fail = command("fail", "s-fail", 1);
    let retry = command("retry", "s-retry", 1);
    let panic = command("panic", "s-panic", 1);
    let unknown = command("nope", "s-nope", 1);
    let typed = command("typed", "s-typed", 1);
    for cmd in [&ok, &fail, &retry, &panic, &unknown, &typed] {
        send(&js, cmd, &cmd.command_id).await;
    }

    let (reply, headers) = wait_reply(&js, &ok).await;
    assert_eq!(reply.command_id, ok.command_id);
    assert_eq!(reply.saga_id, "s-ok");
    assert_eq!(
        reply.outcome,
        Outcome::Ok {
            result: json!({"saga": "s-ok", "delivered": 1})
        }
    );
    // Recorded only if its subject holds no reply yet: no duplicate-window id.
    assert_eq!(
        headers
            .get(header::EXPECTED_LAST_SUBJECT_SEQUENCE)
            .unwrap()
            .as_str(),
        "0"
    );
    assert!(headers.get(header::MSG_ID).is_none());
    assert_eq!(headers.get(header::SAGA_ID).unwrap().as_str(), "s-ok");
    assert_eq!(
        headers.get(header::COMMAND_ID).unwrap().as_str(),
        ok.command_id
    );
    assert_eq!(
        headers.get(header::TRACEPARENT).unwrap().as_str(),
        TRACEPARENT
    );

    let failure = |reply: Reply| match reply.outcome {
        Outcome::Failed { error } => error,
        Outcome::Ok { .. } => panic!("expected a failure, got {reply:?}"),
    };
    let error = failure(wait_reply(&js, &fail).await.0);
    assert_eq!(
        (error.code.as_str(), error.retryable),
        ("out_of_luck", false)
    );

    let error = failure(wait_reply(&js, &retry).await.0);
    assert_eq!(
        (error.code.as_str(), error.retryable),
        ("retries_exhausted", true)
    );
    assert_eq!(error.message, "busy");
    assert_eq!(
        retries.load(Ordering::SeqCst),
        3,
        "one run per allowed delivery"
    );

    let (reply, _) = wait_reply(&js, &panic).await;
    assert_eq!(
        reply.outcome,
        Outcome::Ok {
            result: json!("recovered")
        }
    );
    assert_eq!(panics.load(Ordering::SeqCst), 2, "the panic was retried");

    let error = failure(wait_reply(&js, &unknown).await.0);
    assert_eq!(
        (error.code.as_str(), error.retryable),
        ("unknown_action", false)
    );
    let error = failure(wait_reply(&js, &typed).await.0);
    assert_eq!(
        (error.code.as_str(), error.retryable),
        ("invalid_input", false)
    );

    // Undecodable: not JSON, a wrong protocol version, a reply_to elsewhere.
    let mut wrong_reply = command("ok", "s-evil", 1);
    wrong_reply.reply_to = "saga.reply.other.x".to_owned();
    let mut wrong_version = serde_json::to_value(command("ok", "s-v9", 1)).unwrap();
    wrong_version["protocol"] = json!(9);
    let poison: [(&str, Vec<u8>); 3] = [
        ("json", b"{not json".to_vec()),
        (
            "unsupported_version",
            wrong_version.to_string().into_bytes(),
        ),
        ("invalid_field", wrong_reply.encode()),
    ];
    for (i, (_, body)) in poison.iter().enumerate() {
        let mut headers = HeaderMap::new();
        headers.insert("X-Original", format!("poison-{i}"));
        headers.insert(header::MSG_ID, format!("poison-{i}"));
        js.publish_with_headers(subject::command(NAME, "ok"), headers, body.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let dead = js.get_stream(DEAD_LETTERS.name).await.unwrap();
    let dead_consumer = dead
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: "saga.dead.participant.test".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    let dead_letter_schema = jsonschema::validator_for(
        &serde_json::from_str(include_str!(
            "../../../docs/schemas/dead-letter.schema.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut letters = dead_consumer.messages().await.unwrap().take(3);
    let mut reasons = Vec::new();
    while let Some(letter) = tokio::time::timeout(WAIT, letters.next()).await.unwrap() {
        let letter = letter.unwrap();
        let headers = letter.headers.clone().unwrap();
        assert_eq!(
            headers.get(header::DEAD_SUBJECT).unwrap().as_str(),
            "saga.cmd.test.ok"
        );
        assert!(
            headers.get("X-Original").is_some(),
            "original headers are kept"
        );
        assert!(
            headers
                .get(header::MSG_ID)
                .is_some_and(|v| v.as_str().starts_with("dead:JETSAGA_COMMANDS:")),
            "the copy's Nats-Msg-Id is dead:<stream>:<sequence> of the original"
        );
        let as_json: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .map(|(name, values)| {
                let value = values.last().map(|v| v.as_str()).unwrap_or_default();
                (name.to_string(), json!(value))
            })
            .collect();
        let as_json = serde_json::Value::Object(as_json);
        let errors: Vec<String> = dead_letter_schema
            .iter_errors(&as_json)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{as_json}: {errors:?}");
        reasons.push(
            headers
                .get(header::DEAD_REASON)
                .unwrap()
                .as_str()
                .to_owned(),
        );
        letter.ack().await.unwrap();
    }
    assert!(
        reasons.iter().any(|r| r.contains("invalid Command")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unsupported protocol version 9")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("reply_to")),
        "{reasons:?}"
    );

    // It keeps running after poison, and everything was acked or terminated.
    let after = command("ok", "s-after", 1);
    send(&js, &after, &after.command_id).await;
    wait_reply(&js, &after).await;
    let commands = js.get_stream("JETSAGA_COMMANDS").await.unwrap();
    wait_until("every command is acked or terminated", WAIT, || {
        settled(&commands)
    })
    .await;

    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    for expected in [
        format!(
            r#"{}{{action="ok",participant="test",result="ok"}} 2"#,
            metrics::COMMANDS_TOTAL
        ),
        format!(
            r#"{}{{action="retry",participant="test",result="exhausted"}} 1"#,
            metrics::COMMANDS_TOTAL
        ),
        format!(
            r#"{}{{action="retry",participant="test",result="retry"}} 2"#,
            metrics::COMMANDS_TOTAL
        ),
        format!(
            r#"{}{{action="panic",participant="test",result="panicked"}} 1"#,
            metrics::COMMANDS_TOTAL
        ),
        format!(
            r#"{}{{action="unknown",participant="test",result="failed"}} 1"#,
            metrics::COMMANDS_TOTAL
        ),
        format!(
            r#"{}{{kind="json",participant="test"}} 1"#,
            metrics::DEAD_LETTERS_TOTAL
        ),
    ] {
        assert!(text.contains(&expected), "missing {expected} in\n{text}");
    }
    assert!(text.contains(metrics::HANDLER_DURATION_SECONDS));
    running.stop().await;
}

/// A participant whose `charge` answers with its run count, and that count.
fn counting_charge() -> (Participant, Arc<AtomicU32>) {
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let participant = Participant::builder(NAME)
        .handler("charge", move |ctx: Context| {
            let runs = counted.clone();
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                Handled::ok(json!({"run": n, "saga": ctx.saga_id()}))
            }
        })
        .build()
        .unwrap();
    (participant, runs)
}

#[tokio::test]
async fn the_same_command_five_times_runs_once_and_gets_five_identical_replies() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let (participant, runs) = counting_charge();
    // Streams first, so the subscription below sees every reply.
    streams::ensure(&js, &streams::NEEDED, &streams::Streams::default())
        .await
        .unwrap();
    let cmd = command("charge", "s-dup", 1);
    let mut replies = client.subscribe(cmd.reply_to.clone()).await.unwrap();
    let running = start(&server.url(), participant).await;
    // Five deliveries of one command id: the orchestrator re-sending it while
    // recovering (marked, past the dedup window: a new message id each time).
    for i in 0..5 {
        let mut headers = HeaderMap::new();
        if i > 0 {
            headers.insert(header::RESENT, "true");
        }
        send_with(&js, &cmd, &format!("{}#{i}", cmd.command_id), headers).await;
    }
    let mut bodies = Vec::new();
    for _ in 0..5 {
        let msg = tokio::time::timeout(WAIT, replies.next())
            .await
            .unwrap()
            .unwrap();
        let headers = msg.headers.clone().unwrap();
        assert_eq!(
            headers
                .get(header::EXPECTED_LAST_SUBJECT_SEQUENCE)
                .unwrap()
                .as_str(),
            "0"
        );
        bodies.push(msg.payload);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "identical replies");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one effect");
    let reply = Reply::decode(&bodies[0]).unwrap();
    assert_eq!(
        reply.outcome,
        Outcome::Ok {
            result: json!({"run": 1, "saga": "s-dup"})
        }
    );
    running.stop().await;
}

/// A reply recorded long ago (past the 2-minute duplicate window, where a `Nats-Msg-Id` no
/// longer protects it) stays the command's only reply when the handler runs again.
#[tokio::test]
async fn a_command_answered_past_the_duplicate_window_keeps_its_first_reply() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let (participant, runs) = counting_charge();
    let running = start(&server.url(), participant).await;
    // The first answer, recorded as if more than 2 minutes ago: its message id is forgotten.
    let cmd = command("charge", "s-old", 1);
    let first = Reply {
        protocol: protocol::VERSION,
        command_id: cmd.command_id.clone(),
        saga_id: cmd.saga_id.clone(),
        outcome: Outcome::Ok {
            result: json!({"first": true}),
        },
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::MSG_ID, "forgotten");
    js.publish_with_headers(cmd.reply_to.clone(), headers, first.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
    // A delivery that skips the look-up (a first delivery, not re-sent) runs the handler.
    send(&js, &cmd, &cmd.command_id).await;
    let commands = js.get_stream("JETSAGA_COMMANDS").await.unwrap();
    wait_until("the command is settled", WAIT, || async {
        settled(&commands).await && runs.load(Ordering::SeqCst) == 1
    })
    .await;
    let replies = js.get_stream(REPLIES.name).await.unwrap();
    let info = replies.info_with_subjects(&cmd.reply_to).await.unwrap();
    let kept: Vec<(String, usize)> = info
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(kept, vec![(cmd.reply_to.clone(), 1)], "one reply recorded");
    let (reply, _) = recorded(&js, &cmd).await.unwrap();
    assert_eq!(reply, first);
    running.stop().await;
}

#[tokio::test]
async fn shutdown_finishes_commands_in_flight() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let started = Arc::new(AtomicU32::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let participant = {
        let started = started.clone();
        let release = release.clone();
        Participant::builder(NAME)
            .handler("slow", move |_ctx: Context| {
                let started = started.clone();
                let release = release.clone();
                async move {
                    let notified = release.notified();
                    started.fetch_add(1, Ordering::SeqCst);
                    notified.await;
                    Handled::ok(json!("done"))
                }
            })
            .concurrency(8)
            .build()
            .unwrap()
    };
    let running = start(&server.url(), participant).await;
    let cmds: Vec<Command> = (0..8)
        .map(|i| command("slow", &format!("s-slow-{i}"), 1))
        .collect();
    for cmd in &cmds {
        send(&js, cmd, &cmd.command_id).await;
    }
    wait_until("all eight handlers run at once", WAIT, || async {
        started.load(Ordering::SeqCst) == 8
    })
    .await;
    running.token.cancel();
    // Shutdown waits for them: let them finish now.
    release.notify_waiters();
    tokio::time::timeout(WAIT, running.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    for cmd in &cmds {
        let (reply, _) = recorded(&js, cmd).await.expect("replied before stopping");
        assert_eq!(
            reply.outcome,
            Outcome::Ok {
                result: json!("done")
            }
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_longer_than_ack_wait_is_kept_in_progress_and_runs_once() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let runs = Arc::new(AtomicU32::new(0));
    // Two instances share the consumer: a redelivery would go to the other one and run
    // the handler a second time while the first is still busy.
    let build = |runs: Arc<AtomicU32>| {
        Participant::builder(NAME)
            .ack_wait(Duration::from_secs(1))
            .handler("slow", move |_ctx: Context| {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    // The work itself takes longer than ack_wait.
                    tokio::time::sleep(Duration::from_millis(3500)).await;
                    Handled::ok(json!({}))
                }
            })
            .build()
            .unwrap()
    };
    let first = start(&server.url(), build(runs.clone())).await;
    let second = start(&server.url(), build(runs.clone())).await;
    let cmd = command("slow", "s-slow", 1);
    let mut replies = client.subscribe(cmd.reply_to.clone()).await.unwrap();
    send(&js, &cmd, &cmd.command_id).await;
    let reply = tokio::time::timeout(WAIT, replies.next())
        .await
        .unwrap()
        .unwrap();
    assert!(Reply::decode(&reply.payload).is_ok());
    let stream = js.get_stream("JETSAGA_COMMANDS").await.unwrap();
    wait_until("the command is acknowledged", WAIT, || async {
        let stream = stream.clone();
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer("participant-test").await.unwrap();
        let info = consumer.info().await.unwrap();
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "kept in progress, never redelivered"
    );
    let info = {
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer("participant-test").await.unwrap();
        consumer.info().await.unwrap().clone()
    };
    assert_eq!(info.num_redelivered, 0);
    first.stop().await;
    second.stop().await;
}

/// Issue 9: every reply carries the reply TTL as `Nats-TTL`, and a TTL out of range is refused.
#[tokio::test]
async fn replies_carry_the_reply_ttl() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let participant = Participant::builder(NAME)
        .reply_ttl(Duration::from_secs(90))
        .handler("ok", |_ctx: Context| async { Handled::ok(json!({})) })
        .build()
        .unwrap();
    let running = start(&server.url(), participant).await;
    let cmd = command("ok", "s-ttl", 1);
    send(&js, &cmd, &cmd.command_id).await;
    let (_, headers) = wait_reply(&js, &cmd).await;
    assert_eq!(headers.get(header::TTL).map(|v| v.as_str()), Some("90"));
    running.stop().await;

    for ttl in [Duration::ZERO, Duration::from_secs(30 * 24 * 3600)] {
        let err = Participant::builder(NAME)
            .reply_ttl(ttl)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("reply_ttl"), "{err}");
    }
}

/// Issue 10, hole 14: a command whose reply cannot be recorded even on the consumer's last
/// delivery is dead-lettered, not dropped by JetStream with only an advisory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_unanswered_on_its_last_delivery_is_dead_lettered() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let participant = Participant::builder(NAME)
        .max_deliver(1)
        .ack_wait(Duration::from_secs(1))
        .handler("ok", |_ctx: Context| async { Handled::ok(json!({})) })
        .build()
        .unwrap();
    let running = start(&server.url(), participant).await;
    // No reply can be recorded any more.
    js.delete_stream(REPLIES.name).await.unwrap();
    let cmd = command("ok", "s-lost", 1);
    send(&js, &cmd, &cmd.command_id).await;
    let dead = js.get_stream(DEAD_LETTERS.name).await.unwrap();
    let subject = jetsaga_sagas::streams::dead_letter_subject("participant.test");
    wait_until("the command is dead-lettered", WAIT, || async {
        dead.get_last_raw_message_by_subject(&subject).await.is_ok()
    })
    .await;
    let letter = dead
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    let reason = letter.headers.get(header::DEAD_REASON).unwrap().as_str();
    assert!(
        reason.contains("no reply could be recorded after 2 deliveries"),
        "{reason}"
    );
    assert_eq!(
        Command::decode(&letter.payload).unwrap().command_id,
        cmd.command_id
    );
    let commands = js.get_stream("JETSAGA_COMMANDS").await.unwrap();
    wait_until("the command is settled", WAIT, || settled(&commands)).await;
    running.stop().await;
}
