//! Helpers shared by the reference participants' tests: commands as the orchestrator sends
//! them, and a collector of replies.

#![allow(
    dead_code,
    unreachable_pub,
    missing_debug_implementations,
    clippy::unwrap_used
)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt;
use jetsaga_reference::inventory;
use jetsaga_sagas::protocol::{self, Body, Command, Outcome, Reply, header, subject};
use serde_json::{Value, json};

/// Generous upper bound for any wait in these tests.
pub const WAIT: Duration = Duration::from_secs(60);

/// An order with these `(sku, quantity)` lines.
pub fn order(lines: &[(&str, u32)], amount_cents: u64, card: &str) -> Value {
    json!({
        "customer_id": "c-1", "email": "ana@example.com",
        "items": lines.iter().map(|(sku, q)| json!({"sku": sku, "quantity": q})).collect::<Vec<_>>(),
        "amount_cents": amount_cents, "currency": "EUR", "card_token": card,
    })
}

/// The command for `participant.action` of `saga`, attempt `attempt`.
pub fn command(
    participant: &str,
    action: &str,
    saga: &str,
    attempt: u32,
    input: &Value,
) -> Command {
    let direction = if matches!(action, "release" | "refund") {
        "undo"
    } else {
        "do"
    };
    let command_id = format!("{saga}:{action}:{direction}:{attempt}");
    Command {
        protocol: protocol::VERSION,
        reply_to: subject::reply(participant, &command_id),
        command_id,
        saga_id: saga.to_owned(),
        saga_type: "order-creation".to_owned(),
        step: action.to_owned(),
        action: action.to_owned(),
        compensation: direction == "undo",
        attempt,
        input: input.clone(),
    }
}

/// Publishes `commands` pipelined and waits for every PubAck.
pub async fn send_all(js: &jetstream::Context, participant: &str, commands: &[Command]) {
    let mut acks = Vec::with_capacity(commands.len());
    for cmd in commands {
        let mut headers = HeaderMap::new();
        headers.insert(header::MSG_ID, cmd.command_id.as_str());
        headers.insert(header::SAGA_ID, cmd.saga_id.as_str());
        headers.insert(header::COMMAND_ID, cmd.command_id.as_str());
        acks.push(
            js.publish_with_headers(
                subject::command(participant, &cmd.action),
                headers,
                cmd.encode().into(),
            )
            .await
            .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// Every reply seen on `saga.reply.>`, by command id.
#[derive(Clone, Default)]
pub struct Replies(Arc<Mutex<HashMap<String, Vec<Outcome>>>>);

impl Replies {
    /// Subscribes (core NATS: sees re-published duplicates too) and collects in the background.
    pub async fn collect(client: &async_nats::Client) -> Self {
        let replies = Self::default();
        let mut sub = client.subscribe("saga.reply.>").await.unwrap();
        client.flush().await.unwrap();
        let inner = replies.0.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let reply = Reply::decode(&msg.payload).unwrap();
                inner
                    .lock()
                    .unwrap()
                    .entry(reply.command_id)
                    .or_default()
                    .push(reply.outcome);
            }
        });
        replies
    }

    /// How many distinct commands got a reply.
    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Whether every command in `commands` got a reply.
    pub fn all(&self, commands: &[Command]) -> bool {
        let seen = self.0.lock().unwrap();
        commands.iter().all(|c| seen.contains_key(&c.command_id))
    }

    /// The first reply to `cmd`.
    pub fn of(&self, cmd: &Command) -> Outcome {
        self.0.lock().unwrap()[&cmd.command_id][0].clone()
    }

    /// Every reply to `cmd`.
    pub fn all_of(&self, cmd: &Command) -> Vec<Outcome> {
        self.0
            .lock()
            .unwrap()
            .get(&cmd.command_id)
            .cloned()
            .unwrap_or_default()
    }
}

/// The failure code, or `None` for ok.
pub fn code(outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::Ok { .. } => None,
        Outcome::Failed { error } => Some(error.code.clone()),
    }
}

/// Checks the inventory's invariants over the whole bucket and returns what it read: per
/// product, `available + reserved + sold` equals its initial stock, and [`inventory::audit`]
/// finds nothing (every hold belongs to a reservation in state `reserved`, every `reserved`
/// reservation holds its lines, `sold` is the sum of the committed lines).
///
/// Panics listing every violation.
///
/// [`inventory::audit`]: jetsaga_reference::inventory::audit
pub async fn audit_inventory(
    store: &jetstream::kv::Store,
    initial: &BTreeMap<String, u64>,
) -> (
    BTreeMap<String, inventory::Product>,
    BTreeMap<String, inventory::Reservation>,
) {
    let (products, reservations) = inventory::snapshot(store).await.unwrap();
    let mut violations: Vec<String> = inventory::audit(&products, &reservations)
        .iter()
        .map(ToString::to_string)
        .collect();
    for (sku, units) in initial {
        match products.get(sku) {
            Some(p) if p.total() != *units => violations.push(format!(
                "{sku}: available + reserved + sold = {} instead of {units}: {p:?}",
                p.total()
            )),
            Some(_) => {}
            None => violations.push(format!("{sku}: no product record")),
        }
    }
    assert!(
        violations.is_empty(),
        "inventory invariants violated:\n{}",
        violations.join("\n")
    );
    (products, reservations)
}
