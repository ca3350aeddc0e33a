//! Bad input at scale, against the real binaries: `jetsaga serve`, `jetsaga-inventory`,
//! `jetsaga-payment` and `jetsaga-notification` on a real nats-server. Malformed messages go
//! to every subject they consume — starts, replies, timer fires, domain events, commands:
//! bad JSON, wrong types, invalid UTF-8, empty and huge bodies (near `max_payload`),
//! unsupported protocol versions, unknown saga types, sagas and steps, foreign command ids,
//! bad headers. Then:
//!
//! - every process is still running and a good order saga completes;
//! - every consumer is idle (nothing pending, nothing waiting for an ack: nothing retried
//!   forever);
//! - each message that must be dead-lettered is, exactly once, under its consumer's source,
//!   with its reason and original subject (counted per kind, exactly); timer fires of unknown
//!   sagas are acknowledged and dropped, starting nothing; good starts with bad headers
//!   complete.
//!
//! `JETSAGA_BAD_INPUT_COUNT` messages of each kind (default 200); huge bodies are one in 20
//! of that, at most 100 per kind. The 10,000 run:
//! `JETSAGA_BAD_INPUT_COUNT=10000 cargo nextest run -p jetsaga-reference -E 'binary(bad_input)'`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use jetsaga_orchestrator::provision::{REPLIES_CONSUMER, STARTS_CONSUMER, TIMERS_CONSUMER};
use jetsaga_sagas::protocol::{self, header, subject};
use jetsaga_sagas::streams;
use jetsaga_testkit::{ChildGuard, NatsServer, cargo_bin, wait_until};
use serde_json::{Value, json};

/// Upper bound for set-up waits.
const WAIT: Duration = Duration::from_secs(60);
/// Marks every message of this test with its kind and number (dead letters keep headers).
const KIND: &str = "Bad-Input-Kind";
const NUMBER: &str = "Bad-Input-Number";
/// A definition whose participant never answers: its saga waits for an hour, a target for
/// replies naming steps it does not have.
const STALLED: &str = r#"
name = "stalled"
version = 1
deadline = "2h"
[events]
completed = []
compensated = []
[[steps]]
name = "wait"
participant = "nobody"
action = "wait"
compensation = "unwait"
kind = "compensatable"
timeout = "1h"
"#;

fn order(card: &str) -> Value {
    json!({"customer_id": "c-42", "email": "ana@example.com",
        "items": [{"sku": "sku-1", "quantity": 1}], "amount_cents": 4999,
        "currency": "EUR", "card_token": card})
}

fn spawn(
    binary: &str,
    args: &[&str],
    url: &str,
    logs: &Path,
    env: &[(&str, String)],
) -> ChildGuard {
    let log = std::fs::File::create(logs.join(format!("{binary}.log"))).unwrap();
    let mut cmd = Command::new(cargo_bin(binary));
    cmd.args(args)
        .env("JETSAGA_NATS__URL", url)
        .env("JETSAGA_TELEMETRY__LOG_FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(log);
    for (key, value) in env {
        cmd.env(key, value);
    }
    ChildGuard::spawn(cmd).unwrap()
}

/// What a message must lead to.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A dead letter from `source` whose reason contains `reason`.
    Dead {
        source: &'static str,
        reason: &'static str,
    },
    /// Acknowledged and dropped: nothing is dead-lettered, no saga is started.
    Dropped,
    /// A good start despite its headers: its saga completes.
    Completes,
}

/// One malformed message.
struct Bad {
    subject: String,
    headers: Vec<(&'static str, String)>,
    payload: Vec<u8>,
}

impl Bad {
    fn new(subject: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            subject: subject.into(),
            headers: Vec::new(),
            payload: payload.into(),
        }
    }

    fn json(subject: impl Into<String>, body: &Value) -> Self {
        Self::new(subject, body.to_string())
    }

    fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// A kind of bad input: how many, what each one is, what must happen to it.
struct Kind {
    name: &'static str,
    count: usize,
    expect: Expect,
    make: Box<dyn Fn(usize) -> Bad>,
}

fn kind(
    name: &'static str,
    count: usize,
    expect: Expect,
    make: impl Fn(usize) -> Bad + 'static,
) -> Kind {
    Kind {
        name,
        count,
        expect,
        make: Box::new(make),
    }
}

const fn dead(source: &'static str, reason: &'static str) -> Expect {
    Expect::Dead { source, reason }
}

/// Unterminated JSON of exactly `size` bytes.
fn huge(prefix: &str, size: usize) -> Vec<u8> {
    let mut body = prefix.as_bytes().to_vec();
    body.resize(size.max(body.len()), b'A');
    body
}

/// Headers that mean nothing, or something wrong.
fn bad_headers(bad: Bad, i: usize) -> Bad {
    bad.with(header::TRACEPARENT, format!("00-zz-{i}-01"))
        .with(header::SAGA_ID, "not-this-saga")
        .with(header::COMMAND_ID, "::::")
        .with(header::ATTEMPT, "-1")
        .with(header::START_KEY, "ä")
}

/// Every kind of bad input, `n` of each (`huge_n` of the huge ones, whose bodies are
/// `huge_size` bytes). `stalled` is a running saga with a step named `wait`.
fn kinds(n: usize, huge_n: usize, huge_size: usize, stalled: String) -> Vec<Kind> {
    let starts = "orchestrator.starts";
    let replies = "orchestrator.replies";
    let events = "participant.notification";
    let inventory = "participant.inventory";
    let payment = "participant.payment";
    let start = || subject::start("order-creation");
    let reply = |i: usize| subject::reply("inventory", &format!("bad-{i}"));
    let event = || subject::event("order.confirmed");
    let reserve = || subject::command("inventory", "reserve");
    let charge = || subject::command("payment", "charge");
    let stalled_for_reply = stalled;
    vec![
        // Start requests (consumer orchestrator-starts).
        kind(
            "start-bad-json",
            n,
            dead(starts, "invalid Start"),
            move |i| {
                Bad::new(
                    start(),
                    format!(r#"{{"protocol": 1, "key": "bad-json-{i}", "input": {{"#),
                )
            },
        ),
        kind(
            "start-wrong-types",
            n,
            dead(starts, "invalid Start"),
            move |i| {
                Bad::json(
                    start(),
                    &json!({"protocol": 1, "key": i, "input": "an order"}),
                )
            },
        ),
        kind(
            "start-invalid-utf8",
            n,
            dead(starts, "invalid Start"),
            move |i| {
                let mut body = br#"{"protocol": 1, "key": "utf8-"#.to_vec();
                body.extend_from_slice(&[0xff, 0xfe, 0xc3]);
                body.extend_from_slice(format!(r#"{i}", "input": {{}}}}"#).as_bytes());
                Bad::new(start(), body)
            },
        ),
        kind("start-binary", n, dead(starts, "invalid Start"), move |i| {
            let mut body = vec![0u8, 0x9f, 0x92, 0x96];
            body.extend_from_slice(&(i as u64).to_le_bytes());
            Bad::new(start(), body)
        }),
        kind("start-empty", n, dead(starts, "invalid Start"), move |_| {
            Bad::new(start(), Vec::new())
        }),
        kind(
            "start-version",
            n,
            dead(starts, "unsupported protocol version 99"),
            move |i| {
                Bad::json(
                    start(),
                    &json!({"protocol": 99, "key": format!("v-{i}"), "input": order("tok_ok")}),
                )
            },
        ),
        kind("start-empty-key", n, dead(starts, "empty key"), move |_| {
            Bad::json(
                start(),
                &json!({"protocol": 1, "key": "", "input": order("tok_ok")}),
            )
        }),
        kind(
            "start-invalid-input",
            n,
            dead(starts, "invalid input: "),
            move |i| {
                Bad::json(
                    start(),
                    &json!({"protocol": 1, "key": format!("input-{i}"), "input": {"customer_id": i}}),
                )
            },
        ),
        kind(
            "start-unknown-type",
            n,
            dead(starts, "unknown saga type \"no-such-saga\""),
            move |i| {
                Bad::json(
                    subject::start("no-such-saga"),
                    &json!({"protocol": 1, "key": format!("t-{i}"), "input": {}}),
                )
            },
        ),
        kind(
            "start-bad-headers",
            n,
            dead(starts, "invalid Start"),
            move |i| bad_headers(Bad::new(start(), "{"), i),
        ),
        kind(
            "start-huge",
            huge_n,
            dead(starts, "invalid Start"),
            move |i| {
                Bad::new(
                    start(),
                    huge(
                        &format!(r#"{{"protocol": 1, "key": "huge-{i}", "input": {{"pad": ""#),
                        huge_size,
                    ),
                )
            },
        ),
        kind("start-good-bad-headers", n, Expect::Completes, move |i| {
            let body =
                json!({"protocol": 1, "key": format!("bad-headers-{i}"), "input": order("tok_ok")});
            bad_headers(Bad::json(start(), &body), i)
        }),
        // Replies (consumer orchestrator-replies).
        kind(
            "reply-bad-json",
            n,
            dead(replies, "invalid Reply"),
            move |i| Bad::new(reply(i), r#"{"protocol": 1, "command_id": "#),
        ),
        kind(
            "reply-wrong-types",
            n,
            dead(replies, "invalid Reply"),
            move |i| {
                Bad::json(
                    reply(i),
                    &json!({"protocol": 1, "command_id": i, "saga_id": [], "outcome": "ok"}),
                )
            },
        ),
        kind(
            "reply-invalid-utf8",
            n,
            dead(replies, "invalid Reply"),
            move |i| {
                let mut body = br#"{"protocol": 1, "command_id": ""#.to_vec();
                body.extend_from_slice(&[0xc0, 0x80, 0xed, 0xa0, 0x80]);
                body.extend_from_slice(
                    format!(r#"{i}", "saga_id": "s", "outcome": "ok"}}"#).as_bytes(),
                );
                Bad::new(reply(i), body)
            },
        ),
        kind("reply-empty", n, dead(replies, "invalid Reply"), move |i| {
            Bad::new(reply(i), Vec::new())
        }),
        kind(
            "reply-version",
            n,
            dead(replies, "unsupported protocol version 2"),
            move |i| {
                Bad::json(
                    reply(i),
                    &json!({"protocol": 2, "command_id": format!("s-{i}:reserve-stock:do:1"), "saga_id": format!("s-{i}"), "outcome": "ok"}),
                )
            },
        ),
        kind(
            "reply-outcome",
            n,
            dead(replies, "invalid Reply"),
            move |i| {
                Bad::json(
                    reply(i),
                    &json!({"protocol": 1, "command_id": format!("s-{i}:reserve-stock:do:1"), "saga_id": format!("s-{i}"), "outcome": "maybe"}),
                )
            },
        ),
        kind(
            "reply-command-id",
            n,
            dead(replies, "invalid command id"),
            move |i| {
                Bad::json(
                    reply(i),
                    &json!({"protocol": 1, "command_id": format!("not a command id {i}"), "saga_id": "s", "outcome": "ok"}),
                )
            },
        ),
        kind(
            "reply-foreign",
            n,
            dead(replies, "but its command id belongs to saga"),
            move |i| {
                Bad::json(
                    reply(i),
                    &json!({"protocol": 1, "command_id": format!("a-{i}:reserve-stock:do:1"), "saga_id": format!("b-{i}"), "outcome": "ok"}),
                )
            },
        ),
        kind(
            "reply-unknown-saga",
            n,
            dead(replies, "unknown saga ghost-"),
            move |i| {
                Bad::json(
                    reply(i),
                    &json!({"protocol": 1, "command_id": format!("ghost-{i}:reserve-stock:do:1"), "saga_id": format!("ghost-{i}"), "outcome": "ok"}),
                )
            },
        ),
        kind(
            "reply-unknown-step",
            n,
            dead(replies, "no step \"no-such-step-"),
            move |i| {
                let s = &stalled_for_reply;
                Bad::json(
                    reply(i),
                    &json!({"protocol": 1, "command_id": format!("{s}:no-such-step-{i}:do:1"), "saga_id": s, "outcome": "ok"}),
                )
            },
        ),
        kind(
            "reply-bad-headers",
            n,
            dead(replies, "invalid Reply"),
            move |i| bad_headers(Bad::new(reply(i), "[]"), i),
        ),
        kind(
            "reply-huge",
            huge_n,
            dead(replies, "invalid Reply"),
            move |i| {
                Bad::new(
                    reply(i),
                    huge(
                        r#"{"protocol": 1, "command_id": "c", "saga_id": "s", "outcome": "ok", "result": ""#,
                        huge_size,
                    ),
                )
            },
        ),
        // Timer fires (consumer orchestrator-timers): the payload is not read; a fire for a
        // saga that does not exist is dropped.
        kind("timer-unknown-saga", n, Expect::Dropped, move |i| {
            Bad::new(
                subject::timer_fire(&format!("ghost-timer-{i}")),
                "{not json",
            )
        }),
        // Domain events (the notification service's consumer).
        kind(
            "event-bad-json",
            n,
            dead(events, "invalid Event"),
            move |i| {
                Bad::new(
                    event(),
                    format!(r#"{{"protocol": 1, "event": "order.confirmed", "saga_id": "e-{i}""#),
                )
            },
        ),
        kind(
            "event-wrong-types",
            n,
            dead(events, "invalid Event"),
            move |i| {
                Bad::json(
                    event(),
                    &json!({"protocol": 1, "event": "order.confirmed", "saga_id": i, "saga_type": null,
                "key": {}, "input": 1, "occurred_at": "yesterday"}),
                )
            },
        ),
        kind(
            "event-invalid-utf8",
            n,
            dead(events, "invalid Event"),
            move |i| {
                let mut body =
                    br#"{"protocol": 1, "event": "order.confirmed", "saga_id": ""#.to_vec();
                body.extend_from_slice(&[0xf8, 0x88, 0x80, 0x80, 0x80]);
                body.extend_from_slice(format!(r#"{i}"}}"#).as_bytes());
                Bad::new(event(), body)
            },
        ),
        kind(
            "event-version",
            n,
            dead(events, "unsupported protocol version 0"),
            move |i| {
                Bad::json(
                    event(),
                    &json!({"protocol": 0, "event": "order.confirmed", "saga_id": format!("e-{i}"),
                "saga_type": "order-creation", "key": "k", "input": {}, "occurred_at": "2026-01-01T00:00:00Z"}),
                )
            },
        ),
        kind(
            "event-huge",
            huge_n,
            dead(events, "invalid Event"),
            move |_| {
                Bad::new(
                    event(),
                    huge(
                        r#"{"protocol": 1, "event": "order.confirmed", "saga_id": ""#,
                        huge_size,
                    ),
                )
            },
        ),
        // Commands (the inventory's and the payment's consumers).
        kind(
            "command-bad-json",
            n,
            dead(inventory, "invalid Command"),
            move |_| Bad::new(reserve(), "{\"protocol\": 1,"),
        ),
        kind(
            "command-wrong-types",
            n,
            dead(payment, "invalid Command"),
            move |i| {
                Bad::json(
                    charge(),
                    &json!({"protocol": 1, "command_id": i, "attempt": "first"}),
                )
            },
        ),
        kind(
            "command-reply-to",
            n,
            dead(inventory, "is not saga.reply.inventory."),
            move |i| {
                let id = format!("c-{i}:reserve-stock:do:1");
                Bad::json(
                    reserve(),
                    &json!({"protocol": 1, "command_id": id, "saga_id": format!("c-{i}"),
                "saga_type": "order-creation", "step": "reserve-stock", "action": "reserve",
                "compensation": false, "attempt": 1, "reply_to": "saga.reply.payment.elsewhere",
                "input": order("tok_ok")}),
                )
            },
        ),
        kind(
            "command-huge",
            huge_n,
            dead(payment, "invalid Command"),
            move |_| {
                Bad::new(
                    charge(),
                    huge(r#"{"protocol": 1, "command_id": ""#, huge_size),
                )
            },
        ),
    ]
}

/// Publishes `messages` with up to 256 acks in flight.
async fn publish_all(js: &jetstream::Context, messages: impl Iterator<Item = Bad>) {
    let mut acks = std::collections::VecDeque::new();
    for bad in messages {
        let mut headers = HeaderMap::new();
        for (name, value) in &bad.headers {
            headers.insert(*name, value.as_str());
        }
        let ack = js
            .publish_with_headers(bad.subject.clone(), headers, bad.payload.into())
            .await
            .unwrap_or_else(|e| panic!("publish to {}: {e}", bad.subject));
        acks.push_back((bad.subject, ack));
        if acks.len() >= 256 {
            let (subject, ack) = acks.pop_front().unwrap();
            ack.await
                .unwrap_or_else(|e| panic!("publish to {subject}: {e}"));
        }
    }
    for (subject, ack) in acks {
        ack.await
            .unwrap_or_else(|e| panic!("publish to {subject}: {e}"));
    }
}

/// The phase a saga's last journal record names, if it has one.
async fn phase(journal: &jetstream::stream::Stream, saga_id: &str) -> Option<String> {
    let record = journal
        .direct_get_last_for_subject(subject::journal(saga_id))
        .await
        .ok()?;
    record
        .headers
        .get(header::PHASE)
        .map(|v| v.as_str().to_owned())
}

/// (stream, consumer) of every consumer the bad input reaches.
const CONSUMERS: [(&str, &str); 6] = [
    (streams::STARTS.name, STARTS_CONSUMER),
    (streams::REPLIES.name, REPLIES_CONSUMER),
    (streams::TIMERS.name, TIMERS_CONSUMER),
    (streams::EVENTS.name, "notification"),
    (streams::COMMANDS.name, "participant-inventory"),
    (streams::COMMANDS.name, "participant-payment"),
];

/// Consumers with work left, as `name: pending, ack pending` lines (empty when all are idle).
async fn busy_consumers(js: &jetstream::Context) -> String {
    let mut busy = String::new();
    for (stream, name) in CONSUMERS {
        let mut consumer: consumer::PullConsumer = js
            .get_stream(stream)
            .await
            .unwrap()
            .get_consumer(name)
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        if info.num_pending > 0 || info.num_ack_pending > 0 {
            let _ = writeln!(
                busy,
                "{name}: {} pending, {} waiting for an ack (redelivered: {})",
                info.num_pending, info.num_ack_pending, info.num_redelivered
            );
        }
    }
    busy
}

/// Every dead letter, as (kind, number, source subject, reason, original subject, truncated).
/// Read by sequence with direct gets, a few at a time: an ordered consumer over hundreds of
/// thousands of letters, some near `max_payload`, stalled for over a minute in one run.
async fn dead_letters(
    js: &jetstream::Context,
) -> Vec<(String, String, String, String, String, String)> {
    let stream = js.get_stream(streams::DEAD_LETTERS.name).await.unwrap();
    let state = stream.get_info().await.unwrap().state;
    let read = |sequence: u64| {
        let stream = stream.clone();
        async move {
            let m = match stream.direct_get(sequence).await {
                Ok(m) => m,
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                    return None;
                }
                Err(e) => panic!("reading dead letter {sequence}: {e}"),
            };
            let get = |name: &str| {
                m.headers
                    .get(name)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            };
            Some((
                get(KIND),
                get(NUMBER),
                m.subject.to_string(),
                get(header::DEAD_REASON),
                get(header::DEAD_SUBJECT),
                get(header::DEAD_TRUNCATED),
            ))
        }
    };
    let letters: Vec<_> = futures::stream::iter(state.first_sequence..=state.last_sequence)
        .map(read)
        .buffered(32)
        .filter_map(|letter| async move { letter })
        .collect()
        .await;
    assert_eq!(
        letters.len() as u64,
        state.messages,
        "dead letters read by sequence"
    );
    letters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_on_every_subject_are_dead_lettered_once_and_nothing_breaks() {
    let count: usize = std::env::var("JETSAGA_BAD_INPUT_COUNT")
        .ok()
        .map(|v| v.parse().expect("JETSAGA_BAD_INPUT_COUNT is a number"))
        .unwrap_or(200);
    let huge_count = (count / 20).clamp(1, 100);
    let server = NatsServer::start();
    let url = server.url();
    let logs = tempfile::tempdir().unwrap();
    let definitions = tempfile::tempdir().unwrap();
    std::fs::write(definitions.path().join("stalled.toml"), STALLED).unwrap();
    let defs = definitions.path().display().to_string();
    let mut processes = vec![spawn(
        "jetsaga",
        &["serve"],
        &url,
        logs.path(),
        &[
            ("JETSAGA_HTTP__LISTEN", "127.0.0.1:0".to_owned()),
            ("JETSAGA_ENGINE__DEFINITIONS", defs),
            // The stalled definition's step waits an hour: its commands are kept longer.
            ("JETSAGA_STREAMS__COMMAND_TTL", "2h".to_owned()),
        ],
    )];
    for binary in [
        "jetsaga-inventory",
        "jetsaga-payment",
        "jetsaga-notification",
    ] {
        processes.push(spawn(
            binary,
            &[],
            &url,
            logs.path(),
            &[("JETSAGA_METRICS__LISTEN", String::new())],
        ));
    }
    let client = async_nats::connect(&url).await.unwrap();
    let max_payload = client.server_info().max_payload;
    let js = jetstream::new(client);
    // Every consumer exists once its service is up.
    wait_until("every service created its consumer", WAIT, || async {
        for (stream, name) in CONSUMERS {
            let Ok(stream) = js.get_stream(stream).await else {
                return false;
            };
            if stream.consumer_info(name).await.is_err() {
                return false;
            }
        }
        true
    })
    .await;
    let journal = js.get_stream(streams::JOURNAL.name).await.unwrap();

    // A saga that waits for an hour, for replies that name steps it does not have.
    publish_all(
        &js,
        std::iter::once(Bad::json(
            subject::start("stalled"),
            &json!({"protocol": 1, "key": "target", "input": {}}),
        )),
    )
    .await;
    let stalled = protocol::saga_id("stalled", "target");
    wait_until("the stalled saga runs", WAIT, || async {
        phase(&journal, &stalled).await.as_deref() == Some("running")
    })
    .await;

    // As near max_payload as this test's two headers allow (at most ~70 bytes with framing).
    let huge_size = max_payload - 96;
    let kinds = kinds(count, huge_count, huge_size, stalled.clone());
    let total: usize = kinds.iter().map(|k| k.count).sum();
    let started = Instant::now();
    for kind in &kinds {
        let messages = (0..kind.count).map(|i| {
            let bad = (kind.make)(i);
            bad.with(KIND, kind.name).with(NUMBER, i.to_string())
        });
        publish_all(&js, messages).await;
    }
    let published = started.elapsed();

    let expected_dead: usize = kinds
        .iter()
        .filter(|k| matches!(k.expect, Expect::Dead { .. }))
        .map(|k| k.count)
        .sum();
    let dead_stream = js.get_stream(streams::DEAD_LETTERS.name).await.unwrap();
    // Generous: a debug build on a shared 2-core machine.
    let limit = WAIT + Duration::from_millis(20 * total as u64);
    let give_up = Instant::now() + limit;
    loop {
        let stored = dead_stream.get_info().await.unwrap().state.messages;
        let busy = busy_consumers(&js).await;
        if stored as usize >= expected_dead && busy.is_empty() {
            break;
        }
        for process in &mut processes {
            assert!(
                process.try_wait().unwrap().is_none(),
                "a process exited; logs in {}",
                logs.path().display()
            );
        }
        assert!(
            Instant::now() < give_up,
            "after {limit:?}: {stored} of {expected_dead} dead letters stored; consumers not idle:\n{busy}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled = started.elapsed();

    // Exactly one dead letter per message that must have one, with its reason and subject.
    let letters = dead_letters(&js).await;
    let mut tally: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (kind_name, number, dead_subject, reason, original, truncated) in &letters {
        let Some(kind) = kinds.iter().find(|k| k.name == kind_name) else {
            wrong.push(format!(
                "an unexpected dead letter on {dead_subject}: {reason}"
            ));
            continue;
        };
        let i: usize = number.parse().unwrap();
        tally.entry(kind_name.clone()).or_default().push(i);
        match kind.expect {
            Expect::Dead {
                source,
                reason: expected,
            } => {
                if dead_subject != &subject::dead_letter(source) || !reason.contains(expected) {
                    wrong.push(format!("{kind_name} #{i} on {dead_subject}: {reason:?}, expected {source} with {expected:?}"));
                }
                let bad = (kind.make)(i);
                // A body near max_payload does not fit beside the dead letter's headers.
                let length = bad.payload.len();
                let expected = if length == huge_size {
                    length.to_string()
                } else {
                    String::new()
                };
                if truncated != &expected {
                    wrong.push(format!(
                        "{kind_name} #{i}: truncated {truncated:?}, expected {expected:?}"
                    ));
                }
                let subject = bad.subject;
                if original != &subject {
                    wrong.push(format!(
                        "{kind_name} #{i}: original subject {original}, expected {subject}"
                    ));
                }
            }
            Expect::Dropped | Expect::Completes => {
                wrong.push(format!("{kind_name} #{i} was dead-lettered: {reason}"));
            }
        }
    }
    for kind in &kinds {
        let mut seen = tally.remove(kind.name).unwrap_or_default();
        seen.sort_unstable();
        seen.dedup();
        let letters_of_kind = letters.iter().filter(|l| l.0 == kind.name).count();
        let expected = match kind.expect {
            Expect::Dead { .. } => kind.count,
            Expect::Dropped | Expect::Completes => 0,
        };
        if letters_of_kind != expected || seen.len() != expected {
            wrong.push(format!(
                "{}: {letters_of_kind} dead letters ({} distinct), expected {expected}",
                kind.name,
                seen.len()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} problems:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // Dropped timer fires started nothing; good starts with bad headers completed.
    for kind in &kinds {
        for i in 0..kind.count {
            match kind.expect {
                Expect::Dropped => {
                    let saga_id = format!("ghost-timer-{i}");
                    assert_eq!(
                        phase(&journal, &saga_id).await,
                        None,
                        "{saga_id} has a journal"
                    );
                }
                Expect::Completes => {
                    let saga_id = protocol::saga_id("order-creation", &format!("bad-headers-{i}"));
                    let give_up = Instant::now() + WAIT;
                    loop {
                        let now = phase(&journal, &saga_id).await;
                        if now.as_deref() == Some("completed") {
                            break;
                        }
                        assert!(
                            Instant::now() < give_up,
                            "bad-headers-{i} (saga {saga_id}) did not complete within {WAIT:?}: its phase is {now:?}"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Expect::Dead { .. } => {}
            }
        }
    }

    // Nothing crashed: every process still serves a good saga.
    for process in &mut processes {
        assert!(
            process.try_wait().unwrap().is_none(),
            "a process exited; logs in {}",
            logs.path().display()
        );
    }
    publish_all(
        &js,
        std::iter::once(Bad::json(
            subject::start("order-creation"),
            &json!({"protocol": 1, "key": "good-after", "input": order("tok_ok")}),
        )),
    )
    .await;
    let good = protocol::saga_id("order-creation", "good-after");
    wait_until(
        "a good saga completes after the bad input",
        WAIT,
        || async { phase(&journal, &good).await.as_deref() == Some("completed") },
    )
    .await;
    assert_eq!(phase(&journal, &stalled).await.as_deref(), Some("running"));
    eprintln!(
        "bad input: {total} messages of {} kinds ({count} each, {huge_count} of each huge kind of {huge_size} bytes) \
         published in {published:.1?}, all settled after {settled:.1?}: {expected_dead} dead letters, exactly as sent",
        kinds.len()
    );
}
