//! End to end on a real nats-server: the orchestrator (in-process) with participants.
//!
//! - `an_inventory_written_from_the_protocol_alone_completes_order_sagas`: an inventory written
//!   with plain async-nats from `docs/PROTOCOL.md` only (JSON values and header strings, no SDK
//!   and no jetsaga types) takes part in order sagas next to the reference payment.
//! - `the_reference_system_runs_200_orders_and_keeps_its_invariants`: the orchestrator and the
//!   three reference participants run 200 orders; stock, payments and emails are audited.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, stream};
use async_nats::{HeaderMap, StatusCode};
use common::audit_inventory;
use futures::StreamExt;
use jetsaga_orchestrator::config::{Config as OrchestratorConfig, Storage};
use jetsaga_orchestrator::{Handle, Running, Service, Started, driver};
use jetsaga_reference::{inventory, notification, payment};
use jetsaga_sagas::Phase;
use jetsaga_testkit::{NatsServer, wait_until};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Upper bound for set-up waits.
const WAIT: Duration = Duration::from_secs(60);
/// Upper bound for a whole batch of sagas to finish on a loaded 2-core machine (debug build).
const WAIT_ALL: Duration = Duration::from_secs(300);
const SAGA_TYPE: &str = "order-creation";

async fn orchestrator(url: &str) -> Running {
    let mut config = OrchestratorConfig::default();
    config.nats.url = url.to_owned();
    config.streams.storage = Storage::File;
    config.engine.ack_wait = Duration::from_secs(5);
    config.engine.shutdown_grace = Duration::from_secs(5);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Service::start_with_listener(config, listener)
        .await
        .expect("the orchestrator starts")
}

async fn start(handle: &Handle, key: &str, input: Value) -> String {
    match handle.start(SAGA_TYPE, key, input).await.unwrap() {
        Started {
            saga_id,
            created: true,
        } => saga_id,
        other => panic!("unexpected answer to the start of {key}: {other:?}"),
    }
}

/// Waits until every saga is completed or compensated; returns each one's phase.
async fn wait_terminal(handle: &Handle, ids: &[String]) -> HashMap<String, Phase> {
    let phases = Arc::new(Mutex::new(HashMap::new()));
    wait_until("every saga is completed or compensated", WAIT_ALL, || {
        let phases = phases.clone();
        async move {
            let pending: Vec<&String> = {
                let known = phases.lock().unwrap();
                ids.iter().filter(|id| !known.contains_key(*id)).collect()
            };
            for id in pending {
                let phase = handle.saga(id).await.ok().flatten().map(|s| s.phase());
                if let Some(phase) = phase.filter(|p| p.is_finished()) {
                    phases.lock().unwrap().insert(id.clone(), phase);
                }
            }
            phases.lock().unwrap().len() == ids.len()
        }
    })
    .await;
    phases.lock().unwrap().clone()
}

async fn wait_consumer(js: &jetstream::Context, stream: &str, consumer: &str) {
    wait_until(&format!("consumer {consumer} exists"), WAIT, || async {
        match js.get_stream(stream).await {
            Ok(stream) => stream.consumer_info(consumer).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
}

/// Cancels `token` and waits for the participants to return cleanly.
async fn stop(
    token: CancellationToken,
    tasks: Vec<JoinHandle<Result<(), jetsaga_reference::Error>>>,
) {
    token.cancel();
    for task in tasks {
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the participant stops within the bound")
            .unwrap()
            .unwrap();
    }
}

fn payment_config(url: &str) -> payment::Config {
    let mut config = payment::Config::default();
    config.nats.url = url.to_owned();
    config.metrics.listen = String::new();
    config
}

// ---------------------------------------------------------------------------------------------
// An inventory from docs/PROTOCOL.md alone.
// ---------------------------------------------------------------------------------------------

/// What a participant written in "any language" does, following `docs/PROTOCOL.md` step by
/// step ("A participant without the SDK"): plain async-nats, `serde_json::Value`s and header
/// strings. Its business state lives in memory (keyed by saga id), which is enough here.
mod raw {
    use super::*;

    const NAME: &str = "inventory";

    /// The streams a participant needs, with the settings the protocol lists.
    fn streams() -> Vec<stream::Config> {
        const DAY: u64 = 24 * 3600;
        [
            ("JETSAGA_COMMANDS", "saga.cmd.>", 7 * DAY, false, true, true),
            ("JETSAGA_REPLIES", "saga.reply.>", 7 * DAY, true, true, true),
            (
                "JETSAGA_EVENTS",
                "saga.event.>",
                7 * DAY,
                false,
                false,
                false,
            ),
            (
                "JETSAGA_DEAD_LETTERS",
                "saga.dead.>",
                30 * DAY,
                true,
                true,
                false,
            ),
        ]
        .into_iter()
        .map(
            |(name, subject, max_age, allow_direct, discard_new, allow_ttl)| stream::Config {
                name: name.to_owned(),
                subjects: vec![subject.to_owned()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(max_age),
                duplicate_window: Duration::from_secs(120),
                allow_direct,
                max_bytes: 2 << 30,
                discard: if discard_new {
                    stream::DiscardPolicy::New
                } else {
                    stream::DiscardPolicy::Old
                },
                allow_message_ttl: allow_ttl,
                ..Default::default()
            },
        )
        .collect()
    }

    /// A decoded command: only what this participant uses.
    #[derive(Debug, Clone)]
    struct Command {
        command_id: String,
        saga_id: String,
        action: String,
        reply_to: String,
        input: Value,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Status {
        Reserved,
        Committed,
        Released,
    }

    /// Stock per sku and a reservation per saga.
    #[derive(Debug, Default)]
    pub(super) struct Books {
        pub(super) available: BTreeMap<String, u64>,
        pub(super) sold: BTreeMap<String, u64>,
        pub(super) holds: BTreeMap<String, Vec<(String, u64)>>,
        status: HashMap<String, Status>,
    }

    /// What the test inspects afterwards.
    #[derive(Debug, Default)]
    pub(super) struct Seen {
        /// `(saga id, action)` for every time an action ran.
        pub(super) actions: Vec<(String, String)>,
        /// Replies as first published, by command id.
        pub(super) replies: HashMap<String, Vec<u8>>,
        /// Commands answered from the recorded reply.
        pub(super) replayed: Vec<String>,
        /// Commands whose first delivery was deliberately left unacknowledged.
        pub(super) unacked: Vec<String>,
        /// Dead-lettered messages, as reasons.
        pub(super) dead: Vec<String>,
        /// Anything that contradicts the protocol document.
        pub(super) problems: Vec<String>,
    }

    pub(super) struct Inventory {
        client: async_nats::Client,
        js: jetstream::Context,
        pub(super) books: Mutex<Books>,
        pub(super) seen: Mutex<Seen>,
        first_deliveries: AtomicUsize,
    }

    pub(super) struct Running {
        pub(super) inventory: Arc<Inventory>,
        token: CancellationToken,
        tracker: TaskTracker,
    }

    impl Running {
        pub(super) async fn stop(self) {
            self.token.cancel();
            self.tracker.close();
            tokio::time::timeout(WAIT, self.tracker.wait())
                .await
                .expect("the raw inventory stops");
        }
    }

    /// Steps 1 and 2: streams (created if missing, never updated), then the durable consumer.
    pub(super) async fn start(url: &str, stock: &[(&str, u64)]) -> Running {
        let client = async_nats::connect(url).await.unwrap();
        let js = jetstream::new(client.clone());
        for config in streams() {
            js.get_or_create_stream(config).await.unwrap();
        }
        let commands = js.get_stream("JETSAGA_COMMANDS").await.unwrap();
        let consumer: consumer::PullConsumer = commands
            .create_consumer(consumer::pull::Config {
                durable_name: Some(format!("participant-{NAME}")),
                filter_subject: format!("saga.cmd.{NAME}.>"),
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: consumer::DeliverPolicy::All,
                // Short, so the deliberately lost acks are redelivered soon; the handler
                // itself takes milliseconds.
                ack_wait: Duration::from_secs(2),
                max_deliver: 6,
                max_ack_pending: 1024,
                ..Default::default()
            })
            .await
            .unwrap();
        let books = Books {
            available: stock.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect(),
            ..Books::default()
        };
        let inventory = Arc::new(Inventory {
            client,
            js,
            books: Mutex::new(books),
            seen: Mutex::new(Seen::default()),
            first_deliveries: AtomicUsize::new(0),
        });
        let token = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (inv, tok, handlers) = (inventory.clone(), token.clone(), tracker.clone());
        // Step 3: fetch continuously and handle every message concurrently.
        tracker.spawn(async move {
            let mut messages = consumer.messages().await.unwrap();
            loop {
                let next = tokio::select! {
                    next = messages.next() => next,
                    () = tok.cancelled() => break,
                };
                match next {
                    Some(Ok(msg)) => {
                        let inv = inv.clone();
                        handlers.spawn(async move { inv.handle(msg).await });
                    }
                    Some(Err(_)) => continue,
                    None => break,
                }
            }
        });
        Running {
            inventory,
            token,
            tracker,
        }
    }

    fn is_token(text: &str) -> bool {
        !text.is_empty()
            && !text
                .chars()
                .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace())
    }

    /// The delivery count from the ack subject `$JS.ACK.<stream>.<consumer>.<delivered>.…`
    /// (or, with domain and account hash, `$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.…`).
    fn delivered(ack_subject: &str) -> Result<u64, String> {
        let tokens: Vec<&str> = ack_subject
            .strip_prefix("$JS.ACK.")
            .ok_or_else(|| format!("{ack_subject} is not an ack subject"))?
            .split('.')
            .collect();
        let at = match tokens.len() {
            7 => 2,
            n if n >= 9 => 4,
            _ => return Err(format!("unexpected ack subject {ack_subject}")),
        };
        if tokens[at - 2] != "JETSAGA_COMMANDS" || tokens[at - 1] != "participant-inventory" {
            return Err(format!("unexpected ack subject {ack_subject}"));
        }
        tokens[at]
            .parse()
            .map_err(|_| format!("no delivery count in {ack_subject}"))
    }

    /// Step 3.1: the body is JSON of the documented shape, for this participant.
    fn decode(subject: &str, payload: &[u8]) -> Result<Command, String> {
        let body: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
        if body.get("protocol") != Some(&json!(1)) {
            return Err(format!(
                "unsupported protocol version {}",
                body.get("protocol").unwrap_or(&Value::Null)
            ));
        }
        let text = |field: &str| {
            body.get(field)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("missing string field {field}"))
        };
        let command = Command {
            command_id: text("command_id")?,
            saga_id: text("saga_id")?,
            action: text("action")?,
            reply_to: text("reply_to")?,
            input: body.get("input").cloned().unwrap_or(Value::Null),
        };
        for field in ["saga_type", "step"] {
            text(field)?;
        }
        if body.get("compensation").and_then(Value::as_bool).is_none()
            || body.get("attempt").and_then(Value::as_u64).is_none()
        {
            return Err("missing compensation or attempt".to_owned());
        }
        if !is_token(&command.command_id) {
            return Err(format!(
                "command_id {} is not one token",
                command.command_id
            ));
        }
        if subject.rsplit('.').next() != Some(command.action.as_str()) {
            return Err(format!(
                "action {} does not match {subject}",
                command.action
            ));
        }
        if command.reply_to != format!("saga.reply.{NAME}.{}", command.command_id) {
            return Err(format!("unexpected reply_to {}", command.reply_to));
        }
        Ok(command)
    }

    /// The order's lines, one per sku.
    fn lines(input: &Value) -> Option<Vec<(String, u64)>> {
        let mut lines: BTreeMap<String, u64> = BTreeMap::new();
        for item in input.get("items")?.as_array()? {
            let sku = item.get("sku")?.as_str()?;
            *lines.entry(sku.to_owned()).or_default() += item.get("quantity")?.as_u64()?;
        }
        Some(lines.into_iter().collect())
    }

    type Outcome = Result<Value, (&'static str, String)>;

    impl Books {
        /// Step 3.3: the action, idempotent per saga id.
        fn apply(&mut self, command: &Command) -> Outcome {
            let saga = command.saga_id.as_str();
            let Some(lines) = lines(&command.input) else {
                return Err(("invalid_input", "no items".to_owned()));
            };
            let status = self.status.get(saga).copied();
            match command.action.as_str() {
                "reserve" => match status {
                    Some(Status::Reserved | Status::Committed) => Ok(json!({ "reserved": lines })),
                    Some(Status::Released) => Err((
                        "reservation_released",
                        "the reservation was released".to_owned(),
                    )),
                    None => {
                        for (sku, quantity) in &lines {
                            let available = self.available.get(sku).copied().unwrap_or(0);
                            if available < *quantity {
                                return Err((
                                    "insufficient_stock",
                                    format!("insufficient stock for {sku}"),
                                ));
                            }
                        }
                        for (sku, quantity) in &lines {
                            *self.available.get_mut(sku).unwrap() -= quantity;
                        }
                        self.holds.insert(saga.to_owned(), lines.clone());
                        self.status.insert(saga.to_owned(), Status::Reserved);
                        Ok(json!({ "reserved": lines }))
                    }
                },
                "release" => match status {
                    Some(Status::Committed) => Err((
                        "already_committed",
                        "the reservation is committed".to_owned(),
                    )),
                    _ => {
                        for (sku, quantity) in self.holds.remove(saga).unwrap_or_default() {
                            *self.available.get_mut(&sku).unwrap() += quantity;
                        }
                        // Also a marker: a reserve arriving later is refused.
                        self.status.insert(saga.to_owned(), Status::Released);
                        Ok(json!({ "released": true }))
                    }
                },
                "commit" => match status {
                    Some(Status::Committed) => Ok(json!({ "committed": true })),
                    Some(Status::Reserved) => {
                        for (sku, quantity) in self.holds.remove(saga).unwrap_or_default() {
                            *self.sold.entry(sku).or_default() += quantity;
                        }
                        self.status.insert(saga.to_owned(), Status::Committed);
                        Ok(json!({ "committed": true }))
                    }
                    _ => Err(("unknown_reservation", format!("no reservation for {saga}"))),
                },
                other => Err(("unknown_action", format!("no action {other}"))),
            }
        }
    }

    impl Inventory {
        fn problem(&self, what: String) {
            self.seen.lock().unwrap().problems.push(what);
        }

        async fn handle(&self, msg: jetstream::Message) {
            let delivered = match msg.reply.as_deref().map(delivered) {
                Some(Ok(n)) => n,
                Some(Err(e)) => {
                    self.problem(e);
                    1
                }
                None => {
                    self.problem(format!("no ack subject on {}", msg.subject));
                    1
                }
            };
            let command = match decode(msg.subject.as_str(), &msg.payload) {
                Ok(command) => command,
                Err(reason) => return self.dead_letter(msg, reason).await,
            };

            // Step 3.2: the recorded reply answers a duplicate; the action does not run.
            match self.recorded(&command.reply_to).await {
                Ok(Some((headers, body))) => {
                    if self.seen.lock().unwrap().replies.get(&command.command_id)
                        != Some(&body.to_vec())
                    {
                        self.problem(format!("recorded reply of {} differs", command.command_id));
                    }
                    match self.publish(&command.reply_to, headers, body).await {
                        Ok(()) => {
                            {
                                let mut seen = self.seen.lock().unwrap();
                                seen.replayed.push(command.command_id.clone());
                            }
                            ack(&msg, AckKind::Ack).await;
                        }
                        Err(_) => ack(&msg, AckKind::Nak(Some(Duration::from_millis(200)))).await,
                    }
                    return;
                }
                Ok(None) => {}
                // No answer now (contradictions are noted as problems): the redelivery tries again.
                Err(_) => return ack(&msg, AckKind::Nak(Some(Duration::from_millis(200)))).await,
            }

            // Step 3.3, then 3.4: reply, await the PubAck, ack.
            let outcome = {
                let mut books = self.books.lock().unwrap();
                books.apply(&command)
            };
            let mut body = json!({
                "protocol": 1, "command_id": command.command_id, "saga_id": command.saga_id,
            });
            match outcome {
                Ok(result) => {
                    body["outcome"] = json!("ok");
                    body["result"] = result;
                }
                Err((code, message)) => {
                    body["outcome"] = json!("failed");
                    body["error"] = json!({"code": code, "message": message, "retryable": false});
                }
            }
            let body = serde_json::to_vec(&body).unwrap();
            let mut headers = HeaderMap::new();
            headers.insert("Jetsaga-Saga-Id", command.saga_id.as_str());
            headers.insert("Jetsaga-Command-Id", command.command_id.as_str());
            headers.insert("Nats-TTL", "3600");
            if let Some(traceparent) = msg.headers.as_ref().and_then(|h| h.get("traceparent")) {
                headers.insert("traceparent", traceparent.as_str());
            }
            {
                let mut seen = self.seen.lock().unwrap();
                seen.actions
                    .push((command.saga_id.clone(), command.action.clone()));
                seen.replies
                    .entry(command.command_id.clone())
                    .or_insert_with(|| body.clone());
            }
            if self
                .publish(&command.reply_to, headers, body.into())
                .await
                .is_err()
            {
                return ack(&msg, AckKind::Nak(Some(Duration::from_millis(200)))).await;
            }
            // Every third first delivery "crashes" between the reply and the ack: JetStream
            // redelivers it after ack_wait, and the recorded reply must answer it.
            if delivered == 1
                && self
                    .first_deliveries
                    .fetch_add(1, Ordering::SeqCst)
                    .is_multiple_of(3)
            {
                self.seen.lock().unwrap().unacked.push(command.command_id);
                return;
            }
            ack(&msg, AckKind::Ack).await;
        }

        /// A direct get of the last message on `subject` in `JETSAGA_REPLIES`, through the
        /// JetStream API subject the protocol names; `None` on a 404.
        async fn recorded(
            &self,
            subject: &str,
        ) -> Result<Option<(HeaderMap, bytes::Bytes)>, String> {
            let request = json!({ "last_by_subj": subject }).to_string();
            let response = self
                .client
                .request("$JS.API.DIRECT.GET.JETSAGA_REPLIES", request.into())
                .await
                .map_err(|e| e.to_string())?;
            match response.status {
                Some(StatusCode::NOT_FOUND) => Ok(None),
                None | Some(StatusCode::OK) => {
                    // The response adds the stream's own headers (`Nats-Stream`,
                    // `Nats-Subject`, `Nats-Sequence`, `Nats-Time-Stamp`): not the reply's.
                    let mut headers = HeaderMap::new();
                    for (name, values) in response.headers.iter().flat_map(|h| h.iter()) {
                        let name: &str = name.as_ref();
                        if matches!(
                            name,
                            "Nats-Stream" | "Nats-Subject" | "Nats-Sequence" | "Nats-Time-Stamp"
                        ) {
                            continue;
                        }
                        for value in values {
                            headers.append(name, value.as_str());
                        }
                    }
                    for needed in [
                        "Nats-Expected-Last-Subject-Sequence",
                        "Jetsaga-Saga-Id",
                        "Jetsaga-Command-Id",
                    ] {
                        if headers.get(needed).is_none() {
                            self.problem(format!("the recorded reply lacks {needed}"));
                            return Err(format!("the recorded reply lacks {needed}"));
                        }
                    }
                    Ok(Some((headers, response.payload)))
                }
                Some(other) => {
                    self.problem(format!("direct get answered {other}"));
                    Err(format!("direct get answered {other}"))
                }
            }
        }

        /// Publishes a reply only if none is recorded for its command; "wrong last
        /// sequence" means one is, which counts as published.
        async fn publish(
            &self,
            subject: &str,
            mut headers: HeaderMap,
            body: bytes::Bytes,
        ) -> Result<(), String> {
            headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
            let stored = async {
                self.js
                    .publish_with_headers(subject.to_owned(), headers, body)
                    .await?
                    .await
            };
            match stored.await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        }

        /// Dead letters: a copy with the reason, then term.
        async fn dead_letter(&self, msg: jetstream::Message, reason: String) {
            let mut headers = msg.headers.clone().unwrap_or_default();
            headers.insert("Jetsaga-Dead-Reason", reason.as_str());
            headers.insert("Jetsaga-Dead-Subject", msg.subject.as_str());
            let copied = self
                .publish(
                    &format!("saga.dead.participant.{NAME}"),
                    headers,
                    msg.payload.clone(),
                )
                .await;
            match copied {
                Ok(()) => {
                    self.seen.lock().unwrap().dead.push(reason);
                    ack(&msg, AckKind::Term).await;
                }
                Err(_) => ack(&msg, AckKind::Nak(Some(Duration::from_millis(200)))).await,
            }
        }
    }

    async fn ack(msg: &jetstream::Message, kind: AckKind) {
        // A lost ack means a redelivery, which the recorded reply answers.
        let _ = msg.ack_with(kind).await;
    }
}

fn small_order(i: usize, card: &str) -> Value {
    json!({
        "customer_id": format!("c-{i}"), "email": format!("customer-{i}@example.com"),
        "items": [{"sku": "sku-1", "quantity": 1 + i % 2}, {"sku": "sku-2", "quantity": 1}],
        "amount_cents": 1000 + i, "currency": "EUR", "card_token": card,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_written_from_the_protocol_alone_completes_order_sagas() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    // The participant first: it creates the streams it needs, as the protocol allows, and the
    // orchestrator must accept them.
    let stock = [("sku-1", 1_000), ("sku-2", 1_000)];
    let raw = raw::start(&server.url(), &stock).await;
    let running = orchestrator(&server.url()).await;
    let handle = running.handle().clone();
    let token = CancellationToken::new();
    let payment = tokio::spawn(payment::run(
        payment_config(&server.url()),
        token.clone().cancelled_owned(),
    ));
    wait_consumer(&js, "JETSAGA_COMMANDS", "participant-payment").await;

    // Garbage on the inventory's subject: dead-lettered, and the inventory keeps going.
    js.publish("saga.cmd.inventory.reserve", "garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();

    // 20 orders through the orchestrator's API, every fourth declined by the payment.
    let mut expected = HashMap::new();
    let mut ids = Vec::new();
    for i in 0..20 {
        let declined = i % 4 == 1;
        let card = if declined { "tok_decline" } else { "tok_ok" };
        let id = start(&handle, &format!("raw-{i}"), small_order(i, card)).await;
        expected.insert(id.clone(), declined);
        ids.push(id);
    }
    // And one through the start subject, as a client with an outbox would.
    let key = "raw-from-the-start-subject";
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", key);
    let body = json!({"protocol": 1, "key": key, "input": small_order(99, "tok_ok")});
    js.publish_with_headers(
        "saga.start.order-creation",
        headers,
        body.to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let from_subject = driver::saga_id(SAGA_TYPE, key);
    expected.insert(from_subject.clone(), false);
    ids.push(from_subject.clone());

    let phases = wait_terminal(&handle, &ids).await;
    for (id, declined) in &expected {
        let want = if *declined {
            Phase::Compensated
        } else {
            Phase::Completed
        };
        assert_eq!(phases[id], want, "saga {id}");
    }
    // The same key again, now through the API: the saga the start subject created.
    let Started { saga_id, created } = handle
        .start(SAGA_TYPE, key, small_order(99, "tok_ok"))
        .await
        .unwrap();
    assert_eq!((saga_id.as_str(), created), (from_subject.as_str(), false));

    // The lost acks are answered from the recorded replies before we look.
    let inventory = raw.inventory.clone();
    wait_until(
        "every lost ack is answered from its record",
        WAIT,
        || async {
            let seen = inventory.seen.lock().unwrap();
            seen.unacked.iter().all(|c| seen.replayed.contains(c))
        },
    )
    .await;
    {
        let seen = inventory.seen.lock().unwrap();
        assert!(seen.problems.is_empty(), "{:?}", seen.problems);
        assert!(!seen.unacked.is_empty(), "some acks were lost on purpose");
        assert_eq!(
            seen.dead.len(),
            1,
            "the garbage is dead-lettered: {:?}",
            seen.dead
        );
        // Which actions ran per saga (a redelivery overtaking a slow first delivery may run
        // one again: harmless, the effects are keyed by the saga).
        let mut actions: HashMap<&str, BTreeSet<&str>> = HashMap::new();
        for (saga, action) in &seen.actions {
            actions.entry(saga).or_default().insert(action);
        }
        for (id, declined) in &expected {
            let ran: Vec<&str> = actions
                .remove(id.as_str())
                .unwrap_or_default()
                .into_iter()
                .collect();
            let want = if *declined {
                ["release", "reserve"]
            } else {
                ["commit", "reserve"]
            };
            assert_eq!(
                ran, want,
                "actions run for saga {id} (declined: {declined})"
            );
        }
        assert!(
            actions.is_empty(),
            "commands for unknown sagas: {actions:?}"
        );
    }
    {
        let books = inventory.books.lock().unwrap();
        assert!(books.holds.is_empty(), "holds left: {:?}", books.holds);
        for (sku, initial) in stock {
            let total = books.available[sku] + books.sold.get(sku).copied().unwrap_or(0);
            assert_eq!(total, initial, "{sku}: stock is conserved");
        }
    }
    let dead = js.get_stream("JETSAGA_DEAD_LETTERS").await.unwrap();
    let letter = dead
        .get_last_raw_message_by_subject("saga.dead.participant.inventory")
        .await
        .unwrap();
    let dead_headers = letter.headers;
    assert_eq!(
        dead_headers.get("Jetsaga-Dead-Subject").unwrap().as_str(),
        "saga.cmd.inventory.reserve"
    );
    assert!(
        dead_headers
            .get("Jetsaga-Dead-Reason")
            .unwrap()
            .as_str()
            .starts_with("not JSON")
    );

    // The payment charged each order it confirmed, once, and nothing for the declined ones.
    let store = js.get_key_value("jetsaga_payment").await.unwrap();
    let records = payment::records(&store).await.unwrap();
    for (id, declined) in &expected {
        match records.get(id) {
            None => assert!(declined, "saga {id} completed without a charge"),
            Some(p) => {
                assert!(!declined, "declined saga {id} has a payment record");
                assert_eq!(p.status, payment::Status::Charged, "saga {id}");
            }
        }
    }
    assert_eq!(records.len(), 16);

    raw.stop().await;
    stop(token, vec![payment]).await;
    running.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The full reference system.
// ---------------------------------------------------------------------------------------------

/// Order `i`: one or two lines on three products; every tenth is declined.
fn order(i: usize) -> (Value, bool) {
    let declined = i % 10 == 3;
    let mut items = vec![json!({"sku": format!("sku-{}", i % 3 + 1), "quantity": i % 3 + 1})];
    if i % 2 == 1 {
        items.push(json!({"sku": format!("sku-{}", (i + 1) % 3 + 1), "quantity": 1}));
    }
    let input = json!({
        "customer_id": format!("c-{i}"), "email": format!("customer-{i}@example.com"),
        "items": items, "amount_cents": 1000 + i, "currency": "EUR",
        "card_token": if declined { "tok_decline" } else { "tok_ok" },
    });
    (input, declined)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_system_runs_200_orders_and_keeps_its_invariants() {
    const ORDERS: usize = 200;
    let server = NatsServer::start();
    let url = server.url();
    let client = async_nats::connect(url.clone()).await.unwrap();
    let js = jetstream::new(client.clone());
    let running = orchestrator(&url).await;
    let handle = running.handle().clone();

    // Every participant also fails 5% of its commands (events) transiently: the SDK and the
    // notification retry them, and the outcomes must not change.
    const FAIL_RATE: f64 = 0.05;
    let catalogue: BTreeMap<String, u64> = (1..=3).map(|i| (format!("sku-{i}"), 10_000)).collect();
    let mut inventory_config = inventory::Config::default();
    inventory_config.nats.url = url.clone();
    inventory_config.metrics.listen = String::new();
    inventory_config.faults.fail_rate = FAIL_RATE;
    inventory_config.inventory.catalogue = catalogue.clone();
    let mut payment_config = payment_config(&url);
    payment_config.faults.fail_rate = FAIL_RATE;
    let mut notification_config = notification::Config::default();
    notification_config.nats.url = url.clone();
    notification_config.metrics.listen = String::new();
    notification_config.faults.fail_rate = FAIL_RATE;

    let token = CancellationToken::new();
    let participants = vec![
        tokio::spawn(inventory::run(
            inventory_config,
            token.clone().cancelled_owned(),
        )),
        tokio::spawn(payment::run(
            payment_config,
            token.clone().cancelled_owned(),
        )),
        tokio::spawn(notification::run(
            notification_config,
            token.clone().cancelled_owned(),
        )),
    ];
    wait_consumer(&js, "JETSAGA_COMMANDS", "participant-inventory").await;
    wait_consumer(&js, "JETSAGA_COMMANDS", "participant-payment").await;
    wait_consumer(&js, "JETSAGA_EVENTS", "notification").await;

    let orders: Vec<(Value, bool)> = (0..ORDERS).map(order).collect();
    let starts = orders.iter().enumerate().map(|(i, (input, _))| {
        let (handle, input) = (handle.clone(), input.clone());
        async move { start(&handle, &format!("order-{i}"), input).await }
    });
    let ids: Vec<String> = futures::stream::iter(starts).buffered(32).collect().await;
    let phases = wait_terminal(&handle, &ids).await;
    for (id, (_, declined)) in ids.iter().zip(&orders) {
        let want = if *declined {
            Phase::Compensated
        } else {
            Phase::Completed
        };
        assert_eq!(phases[id], want, "saga {id}");
    }

    // Inventory: stock conserved per product, sold = what the completed orders bought, no
    // holds left, each reservation committed or released as its saga ended.
    let store = js.get_key_value("jetsaga_inventory").await.unwrap();
    let (products, reservations) = audit_inventory(&store, &catalogue).await;
    let mut bought: BTreeMap<String, u64> = BTreeMap::new();
    for (id, (input, declined)) in ids.iter().zip(&orders) {
        let reservation = &reservations[id];
        if *declined {
            assert_eq!(reservation.status, inventory::Status::Released, "saga {id}");
        } else {
            assert_eq!(
                reservation.status,
                inventory::Status::Committed,
                "saga {id}"
            );
            for item in input["items"].as_array().unwrap() {
                *bought
                    .entry(item["sku"].as_str().unwrap().to_owned())
                    .or_default() += item["quantity"].as_u64().unwrap();
            }
        }
    }
    assert_eq!(reservations.len(), ORDERS);
    for sku in catalogue.keys() {
        let p = &products[sku];
        assert!(p.holds.is_empty(), "{sku}: holds left {:?}", p.holds);
        assert_eq!(p.sold, bought[sku], "{sku}: sold");
    }

    // Payment: one charge per completed order, none for the declined ones, no refunds.
    let store = js.get_key_value("jetsaga_payment").await.unwrap();
    let records = payment::records(&store).await.unwrap();
    let mut charged = 0;
    for (id, (input, declined)) in ids.iter().zip(&orders) {
        if *declined {
            assert_eq!(
                records.get(id),
                None,
                "declined saga {id} has a payment record"
            );
        } else {
            let p = &records[id];
            assert_eq!(p.status, payment::Status::Charged, "saga {id}");
            assert_eq!(p.amount_cents, input["amount_cents"].as_u64().unwrap());
            charged += p.amount_cents;
        }
    }
    let ledger = payment::ledger(&store).await.unwrap();
    let completed = orders.iter().filter(|(_, d)| !d).count() as u64;
    assert_eq!(ledger.charges, completed, "{ledger:?}");
    assert_eq!((ledger.refunds, ledger.voids), (0, 0), "{ledger:?}");
    assert_eq!(ledger.charged_cents, charged);
    assert_eq!(
        ledger.balance_cents(),
        i128::from(ledger.charged_cents) - i128::from(ledger.refunded_cents)
    );
    assert_eq!(ledger.balance_cents(), i128::from(charged));

    // Notification: exactly one email per saga, for the right event and address.
    let store = js.get_key_value("jetsaga_notification").await.unwrap();
    wait_until("every saga's email is recorded", WAIT, || async {
        let keys = store.keys().await.unwrap();
        keys.count().await == ORDERS
    })
    .await;
    for (i, (id, (_, declined))) in ids.iter().zip(&orders).enumerate() {
        let email = notification::email(&store, id).await.unwrap().unwrap();
        let event = if *declined {
            "order.cancelled"
        } else {
            "order.confirmed"
        };
        assert_eq!(email.event, event, "saga {id}");
        assert_eq!(email.to, format!("customer-{i}@example.com"));
    }
    let events = js.get_stream("JETSAGA_EVENTS").await.unwrap();
    wait_until(
        "the notification consumer has nothing pending",
        WAIT,
        || async {
            let info = events.consumer_info("notification").await.unwrap();
            info.num_pending == 0 && info.num_ack_pending == 0
        },
    )
    .await;
    let keys = store.keys().await.unwrap();
    assert_eq!(keys.count().await, ORDERS, "one email per saga, no more");

    stop(token, participants).await;
    running.shutdown().await;
}
