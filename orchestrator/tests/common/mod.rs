//! Shared pieces of the orchestrator's integration tests: an orchestrator on a
//! real nats-server, and small in-test participants that speak the protocol.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use jetsaga_orchestrator::config::{Config, Storage};
use jetsaga_orchestrator::{Handle, Running, Service, Started};
use jetsaga_sagas::protocol::{self, Body, Command, Failure, Outcome, header};
use jetsaga_sagas::{Phase, Saga};
use jetsaga_testkit::{NatsServer, wait_until};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(60);

/// order-creation with tight timeouts and small retry budgets, for failure tests.
pub const FAST_ORDER: &str = r#"
name = "fast-order"
version = 1
input-schema = "order-creation.input.schema.json"
deadline = "1m"
[events]
completed = ["order.confirmed"]
compensated = ["order.cancelled"]
[compensation-retry]
max-attempts = 3
initial-backoff = "50ms"
max-backoff = "100ms"
[[steps]]
name = "reserve-stock"
participant = "inventory"
action = "reserve"
compensation = "release"
kind = "compensatable"
timeout = "5s"
retry = { max-attempts = 1 }
[[steps]]
name = "take-payment"
participant = "payment"
action = "charge"
compensation = "refund"
kind = "pivot"
timeout = "1s"
retry = { max-attempts = 1 }
[[steps]]
name = "confirm-order"
participant = "inventory"
action = "commit"
kind = "retriable"
timeout = "5s"
retry = { initial-backoff = "50ms", max-backoff = "200ms" }
"#;

pub fn order(card: &str) -> Value {
    json!({"customer_id": "c-42", "email": "ana@example.com",
        "items": [{"sku": "sku-1", "quantity": 2}], "amount_cents": 4999,
        "currency": "EUR", "card_token": card})
}

pub fn config(url: &str, definitions: Option<&Path>) -> Config {
    let mut config = Config::default();
    config.nats.url = url.to_owned();
    config.streams.storage = Storage::File;
    config.engine.definitions = definitions.map(Path::to_path_buf);
    config.engine.ack_wait = Duration::from_secs(5);
    config.engine.shutdown_grace = Duration::from_secs(5);
    config
}

pub async fn orchestrator(url: &str, definitions: Option<&Path>) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Service::start_with_listener(config(url, definitions), listener)
        .await
        .expect("orchestrator starts")
}

/// An orchestrator with the test config changed by `tune`.
pub async fn orchestrator_with(
    url: &str,
    definitions: Option<&Path>,
    tune: impl FnOnce(&mut Config),
) -> Running {
    let mut config = config(url, definitions);
    tune(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Service::start_with_listener(config, listener)
        .await
        .expect("orchestrator starts")
}

/// A definitions directory with [`FAST_ORDER`] and its input schema.
pub fn fast_order_dir() -> tempfile::TempDir {
    definitions_dir(&[("fast-order.toml", FAST_ORDER), order_schema_file()])
}

pub async fn js(server: &NatsServer) -> jetstream::Context {
    let client = async_nats::connect(server.url()).await.unwrap();
    jetstream::new(client)
}

/// What a test participant does with a command: the replies to send (none: stay
/// silent; several: duplicates).
pub type Behaviour = Arc<dyn Fn(&Command) -> Vec<Outcome> + Send + Sync>;

pub fn ok() -> Vec<Outcome> {
    vec![Outcome::Ok { result: json!({}) }]
}

pub fn failed(code: &str, retryable: bool) -> Vec<Outcome> {
    vec![Outcome::Failed {
        error: Failure::new(code, format!("{code} (test)"), retryable),
    }]
}

/// Answers everything ok, except that payment declines `tok_decline` cards.
pub fn by_card() -> Behaviour {
    Arc::new(|c: &protocol::Command| {
        if c.action == "charge" && c.input["card_token"] == "tok_decline" {
            failed("card_declined", false)
        } else {
            ok()
        }
    })
}

/// Answers everything ok except releases, which fail retryably (`db_down`).
pub fn releases_fail() -> Behaviour {
    Arc::new(|c: &protocol::Command| {
        if c.action == "release" {
            failed("db_down", true)
        } else {
            ok()
        }
    })
}

/// An in-test participant: consumes its commands durably, records them, and
/// replies as its behaviour says. Effects are counted once per command id, as a
/// real idempotent participant would apply them.
#[derive(Clone)]
pub struct Responder {
    pub seen: Arc<Mutex<Vec<Command>>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
    token: CancellationToken,
}

impl Responder {
    pub async fn start(js: &jetstream::Context, participant: &str, behaviour: Behaviour) -> Self {
        let stream = js
            .get_stream(jetsaga_sagas::streams::COMMANDS.name)
            .await
            .unwrap();
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(format!("test-{participant}")),
                filter_subject: protocol::subject::commands_of(participant),
                ack_wait: Duration::from_secs(5),
                max_ack_pending: 10_000,
                ..Default::default()
            })
            .await
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Mutex::new(behaviour));
        let token = CancellationToken::new();
        let responder = Self {
            seen: seen.clone(),
            behaviour: behaviour.clone(),
            token: token.clone(),
        };
        let js = js.clone();
        tokio::spawn(async move {
            let mut messages = consumer.messages().await.unwrap();
            loop {
                let message = tokio::select! {
                    m = messages.next() => match m { Some(Ok(m)) => m, Some(Err(_)) => continue, None => break },
                    () = token.cancelled() => break,
                };
                let command =
                    Command::decode(&message.payload).expect("orchestrator sends valid commands");
                seen.lock().unwrap().push(command.clone());
                let outcomes = (behaviour.lock().unwrap())(&command);
                for outcome in outcomes {
                    publish_reply(&js, &command, outcome).await;
                }
                let _ = message.ack().await;
            }
        });
        responder
    }

    pub fn stop(&self) {
        self.token.cancel();
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    pub fn commands(&self) -> Vec<Command> {
        self.seen.lock().unwrap().clone()
    }

    /// Distinct command ids per saga, in first-seen order.
    pub fn distinct_by_saga(&self) -> HashMap<String, Vec<String>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for c in self.commands() {
            let ids = out.entry(c.saga_id.clone()).or_default();
            if !ids.contains(&c.command_id) {
                ids.push(c.command_id.clone());
            }
        }
        out
    }
}

pub async fn publish_reply(js: &jetstream::Context, command: &Command, outcome: Outcome) {
    let reply = protocol::Reply {
        protocol: protocol::VERSION,
        command_id: command.command_id.clone(),
        saga_id: command.saga_id.clone(),
        outcome,
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::SAGA_ID, command.saga_id.as_str());
    js.publish_with_headers(command.reply_to.clone(), headers, reply.encode().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

pub async fn start(handle: &Handle, key: &str, input: Value) -> String {
    let Started { saga_id, .. } = handle
        .start("order-creation", key, input)
        .await
        .expect("start accepted");
    saga_id
}

pub async fn saga(handle: &Handle, id: &str) -> Saga {
    handle.saga(id).await.unwrap().expect("saga exists")
}

pub async fn wait_phase(handle: &Handle, id: &str, phase: Phase) -> Saga {
    let what = format!("saga {id} is {}", phase.as_str());
    wait_until(&what, WAIT, || async {
        handle
            .saga(id)
            .await
            .ok()
            .flatten()
            .is_some_and(|s| s.phase() == phase)
    })
    .await;
    saga(handle, id).await
}

pub async fn wait_all_terminal(handle: &Handle, ids: &[String]) {
    let remaining = Arc::new(Mutex::new(ids.to_vec()));
    wait_until("every saga is terminal", Duration::from_secs(180), || {
        let remaining = remaining.clone();
        async move {
            let pending: Vec<String> = remaining.lock().unwrap().clone();
            let mut still = Vec::new();
            for id in pending {
                let done = handle
                    .saga(&id)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|s| s.phase().is_finished());
                if !done {
                    still.push(id);
                }
            }
            let empty = still.is_empty();
            *remaining.lock().unwrap() = still;
            empty
        }
    })
    .await;
}

/// Collects domain events (a plain subscription sees what JetStream stores).
pub async fn events(server: &NatsServer) -> Arc<Mutex<Vec<protocol::Event>>> {
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut sub = client.subscribe("saga.event.>").await.unwrap();
    client.flush().await.unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = out.clone();
    tokio::spawn(async move {
        let _client = client;
        while let Some(m) = sub.next().await {
            if let Ok(e) = protocol::Event::decode(&m.payload) {
                sink.lock().unwrap().push(e);
            }
        }
    });
    out
}

/// Dead letters in the stream, as (subject, reason).
pub async fn dead_letters(js: &jetstream::Context) -> Vec<(String, String)> {
    let stream = js
        .get_stream(jetsaga_sagas::streams::DEAD_LETTERS.name)
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut seq = 0;
    while let Ok(m) = stream
        .direct_get_next_for_subject("saga.dead.>", Some(seq))
        .await
    {
        let reason = m
            .headers
            .get(header::DEAD_REASON)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        out.push((m.subject.to_string(), reason));
        seq = m.sequence + 1;
    }
    out
}

/// The order-creation input schema as a definitions-directory file, for test
/// definitions that name it (`input-schema = "order-creation.input.schema.json"`).
pub fn order_schema_file() -> (&'static str, &'static str) {
    (
        jetsaga_orchestrator::definitions::ORDER_CREATION_INPUT_SCHEMA_FILE,
        jetsaga_orchestrator::definitions::ORDER_CREATION_INPUT_SCHEMA,
    )
}

/// Writes a definition file for tests that need tight timeouts or policies.
pub fn definitions_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// Publishes to a stream and waits for the ack, retrying while the server answers
/// "no responders" (seen for a moment after a stream is created on a busy machine).
pub async fn publish_stored(js: &jetstream::Context, subject: &str, payload: Vec<u8>) {
    let give_up = std::time::Instant::now() + WAIT;
    loop {
        let ack = js
            .publish(subject.to_owned(), payload.clone().into())
            .await
            .expect("publish");
        match ack.await {
            Ok(_) => return,
            Err(e)
                if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound
                    && std::time::Instant::now() < give_up =>
            {
                eprintln!("publish to {subject}: no responders yet; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("publish to {subject}: {e}"),
        }
    }
}
