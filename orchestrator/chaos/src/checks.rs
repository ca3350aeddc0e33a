//! The checks at the end of a run, from the real state: the journal, the orchestrators' saga
//! listing, the participants' KV buckets and the events stream.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use jetsaga_orchestrator::store::Store;
use jetsaga_reference::{inventory, notification, payment};
use jetsaga_sagas::protocol::{self, Body, CommandId, Direction};
use jetsaga_sagas::{Cause, Phase};

use crate::Error;

/// Violations listed per check in the summary; the rest are counted.
const SHOWN: usize = 10;
/// Saga listing page size (the API's maximum).
const PAGE: u32 = 500;

/// One saga the bench started, and what the checks expect of it.
#[derive(Debug, Clone)]
pub(crate) struct Saga {
    /// Its id.
    pub(crate) id: String,
    /// Whether the payment rule declines it.
    pub(crate) declined: bool,
    /// What it charges.
    pub(crate) amount_cents: u64,
    /// Its order lines.
    pub(crate) lines: Vec<(String, u64)>,
}

impl Saga {
    /// Saga number `i` of a bench run with these settings.
    pub(crate) fn of_bench(
        saga_type: &str,
        key_prefix: &str,
        i: u64,
        items: u32,
        decline_share: f64,
    ) -> Self {
        let declined = jetsaga_bench::declined(i, decline_share);
        let order = jetsaga_bench::order(i, items, declined);
        let lines = order["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|l| {
                        (
                            l["sku"].as_str().unwrap_or_default().to_owned(),
                            l["quantity"].as_u64().unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            id: protocol::saga_id(saga_type, &format!("{key_prefix}{i}")),
            declined,
            amount_cents: order["amount_cents"].as_u64().unwrap_or_default(),
            lines,
        }
    }
}

/// The result of one check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// What was found, in numbers.
    pub detail: String,
    /// Each way the state breaks the check (empty: it holds).
    pub violations: Vec<String>,
}

impl Check {
    pub(crate) fn new(name: &str, detail: String, violations: Vec<String>) -> Self {
        Self {
            name: name.to_owned(),
            detail,
            violations,
        }
    }

    /// Whether it holds.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// One line, then the first violations indented.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{} {}: {}",
            if self.passed() { "PASS" } else { "FAIL" },
            self.name,
            self.detail
        );
        for v in self.violations.iter().take(SHOWN) {
            out.push_str(&format!("\n       {v}"));
        }
        if self.violations.len() > SHOWN {
            out.push_str(&format!(
                "\n       … and {} more",
                self.violations.len() - SHOWN
            ));
        }
        out
    }
}

/// Waits until every saga is completed or compensated in the journal, or `within` has
/// passed; returns each saga's phase (`None`: no record).
///
/// # Errors
///
/// The journal cannot be read.
pub(crate) async fn settle(
    store: &Store,
    sagas: &[Saga],
    within: Duration,
) -> Result<HashMap<String, Option<Phase>>, Error> {
    let give_up = Instant::now() + within;
    let mut phases = HashMap::new();
    let mut open: Vec<&Saga> = sagas.iter().collect();
    loop {
        let mut still = Vec::new();
        for saga in open {
            let phase = store
                .load(&saga.id, false)
                .await
                .map_err(|e| Error::Io(format!("reading the journal: {e}")))?
                .map(|s| s.record.saga.phase());
            if !matches!(phase, Some(Phase::Completed | Phase::Compensated)) {
                still.push(saga);
            }
            phases.insert(saga.id.clone(), phase);
        }
        open = still;
        if open.is_empty() || Instant::now() >= give_up {
            return Ok(phases);
        }
        eprintln!("chaos: waiting for {} sagas to finish", open.len());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every check, in the order the summary prints them.
///
/// # Errors
///
/// A bucket, stream or listing that cannot be read at all (a broken invariant is a failed
/// check, not an error).
pub(crate) async fn run(
    js: &jetstream::Context,
    http: &[String],
    sagas: &[Saga],
    phases: &HashMap<String, Option<Phase>>,
    catalogue: &BTreeMap<String, u64>,
    saga_type: &str,
) -> Result<Vec<Check>, Error> {
    let mut checks = vec![terminal(sagas, phases), declined(sagas, phases)];
    for addr in http {
        checks.push(converged_listing(addr, saga_type, sagas, phases).await?);
    }
    checks.push(payments(js, sagas, phases).await?);
    checks.extend(stock(js, sagas, phases, catalogue).await?);
    checks.push(emails(js, sagas, phases).await?);
    checks.push(events(js, sagas, phases).await?);
    Ok(checks)
}

fn phase_name(phase: Option<Phase>) -> &'static str {
    phase.map_or("missing", Phase::as_str)
}

fn terminal(sagas: &[Saga], phases: &HashMap<String, Option<Phase>>) -> Check {
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut violations = Vec::new();
    for saga in sagas {
        let phase = phases.get(&saga.id).copied().flatten();
        *counts.entry(phase_name(phase)).or_default() += 1;
        if !matches!(phase, Some(Phase::Completed | Phase::Compensated)) {
            violations.push(format!("{}: {}", saga.id, phase_name(phase)));
        }
    }
    let detail = counts
        .iter()
        .map(|(phase, n)| format!("{n} {phase}"))
        .collect::<Vec<_>>()
        .join(", ");
    Check::new(
        "every saga is completed or compensated (journal)",
        format!("{} sagas: {detail}", sagas.len()),
        violations,
    )
}

fn declined(sagas: &[Saga], phases: &HashMap<String, Option<Phase>>) -> Check {
    let declined: Vec<&Saga> = sagas.iter().filter(|s| s.declined).collect();
    let violations = declined
        .iter()
        .filter_map(|s| {
            let phase = phases.get(&s.id).copied().flatten();
            (phase == Some(Phase::Completed)).then(|| format!("{}: declined but completed", s.id))
        })
        .collect();
    Check::new(
        "a declined payment never completes",
        format!("{} declined", declined.len()),
        violations,
    )
}

#[derive(serde::Deserialize)]
struct Page {
    items: Vec<Summary>,
    next_cursor: Option<String>,
}

#[derive(serde::Deserialize)]
struct Summary {
    saga_id: String,
    state: String,
}

/// How long an orchestrator's listing may take to show the journal's state: it is a
/// projection that follows the journal, and after a nats-server restart its consumer is
/// recreated and replays the stream.
const LISTING_CONVERGES: Duration = Duration::from_secs(60);

/// [`listing`] until it holds or [`LISTING_CONVERGES`] has passed; says how long it took.
async fn converged_listing(
    addr: &str,
    saga_type: &str,
    sagas: &[Saga],
    phases: &HashMap<String, Option<Phase>>,
) -> Result<Check, Error> {
    let began = Instant::now();
    loop {
        let mut check = listing(addr, saga_type, sagas, phases).await?;
        if check.passed() || began.elapsed() >= LISTING_CONVERGES {
            if began.elapsed() >= Duration::from_secs(1) {
                check.detail.push_str(&format!(
                    " (after {:.0} s of waiting for the listing to follow the journal)",
                    began.elapsed().as_secs_f64()
                ));
            }
            return Ok(check);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// `GET /v1/sagas?type=…` page by page: every saga listed, in the state of its journal.
async fn listing(
    addr: &str,
    saga_type: &str,
    sagas: &[Saga],
    phases: &HashMap<String, Option<Phase>>,
) -> Result<Check, Error> {
    let client = reqwest::Client::new();
    let mut listed: HashMap<String, String> = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("http://{addr}/v1/sagas?type={saga_type}&limit={PAGE}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Page = client
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| Error::Io(format!("GET {url}: {e}")))?
            .json()
            .await
            .map_err(|e| Error::Io(format!("GET {url}: {e}")))?;
        for s in page.items {
            listed.insert(s.saga_id, s.state);
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let mut violations = Vec::new();
    for saga in sagas {
        let journal = phase_name(phases.get(&saga.id).copied().flatten());
        match listed.get(&saga.id) {
            Some(state) if state == journal => {}
            Some(state) => {
                violations.push(format!("{}: listed {state}, journal {journal}", saga.id))
            }
            None => violations.push(format!("{}: not listed (journal {journal})", saga.id)),
        }
    }
    Ok(Check::new(
        &format!("GET /v1/sagas on {addr} lists each saga in its journal state"),
        format!("{} listed", listed.len()),
        violations,
    ))
}

async fn bucket(js: &jetstream::Context, name: &str) -> Result<jetstream::kv::Store, Error> {
    js.get_key_value(name)
        .await
        .map_err(|e| Error::Io(format!("KV bucket {name}: {e}")))
}

/// The payment ledger: a completed saga is charged once, its amount; a compensated one keeps
/// no charge; money taken minus money refunded is what the completed sagas cost.
async fn payments(
    js: &jetstream::Context,
    sagas: &[Saga],
    phases: &HashMap<String, Option<Phase>>,
) -> Result<Check, Error> {
    let store = bucket(js, &payment::Settings::default().bucket).await?;
    let records = payment::records(&store)
        .await
        .map_err(|e| Error::Io(e.to_string()))?;
    let ledger = payment::ledger(&store)
        .await
        .map_err(|e| Error::Io(e.to_string()))?;
    let mut violations = Vec::new();
    let mut owed: i128 = 0;
    for saga in sagas {
        let record = records.get(&saga.id);
        match phases.get(&saga.id).copied().flatten() {
            Some(Phase::Completed) => {
                owed += i128::from(saga.amount_cents);
                match record {
                    Some(p)
                        if p.status == payment::Status::Charged
                            && p.amount_cents == saga.amount_cents => {}
                    other => violations.push(format!(
                        "{}: completed, charge of {} expected, payment record {other:?}",
                        saga.id, saga.amount_cents
                    )),
                }
            }
            Some(Phase::Compensated) => {
                if let Some(p) = record.filter(|p| p.status == payment::Status::Charged) {
                    violations.push(format!("{}: compensated but still charged {p:?}", saga.id));
                }
            }
            _ => {}
        }
    }
    if ledger.balance_cents() != owed {
        violations.push(format!(
            "ledger balance {} cents, the completed sagas cost {owed}",
            ledger.balance_cents()
        ));
    }
    Ok(Check::new(
        "payment: one charge per completed saga, none kept for a compensated one",
        format!(
            "{} charges, {} refunds, {} voids, balance {} cents",
            ledger.charges,
            ledger.refunds,
            ledger.voids,
            ledger.balance_cents()
        ),
        violations,
    ))
}

/// A step's success that came after its timeout, and the refunds, from each saga's journal and
/// the replies the runner saw (`answered_ok`: the forward commands answered with a success):
/// in a compensated saga each step whose timed-out attempt succeeded late was compensated
/// exactly once (one successful compensation in its journal); every compensated saga whose
/// charge was taken (its payment record is `refunded`) was refunded exactly once; no step of
/// any saga was compensated successfully more than once.
pub(crate) async fn late_successes(
    js: &jetstream::Context,
    store: &Store,
    sagas: &[Saga],
    phases: &HashMap<String, Option<Phase>>,
    answered_ok: &HashSet<String>,
) -> Result<Check, Error> {
    let payments = bucket(js, &payment::Settings::default().bucket).await?;
    let records = payment::records(&payments)
        .await
        .map_err(|e| Error::Io(e.to_string()))?;
    let mut violations = Vec::new();
    let (mut late, mut late_compensated, mut late_completed) = (0, 0, 0);
    let (mut refunded, mut truncated) = (0_u64, 0);
    for saga in sagas {
        let phase = phases.get(&saga.id).copied().flatten();
        if !matches!(phase, Some(Phase::Completed | Phase::Compensated)) {
            continue;
        }
        let Some(stored) = store
            .load(&saga.id, false)
            .await
            .map_err(|e| Error::Io(format!("reading the journal: {e}")))?
        else {
            continue;
        };
        if stored.record.omitted > 0 {
            // The oldest entries are gone: the counts below would be short.
            truncated += 1;
            continue;
        }
        let charged = records
            .get(&saga.id)
            .is_some_and(|p| p.status == payment::Status::Refunded);
        let compensated = phase == Some(Phase::Compensated);
        let found = late_in(&stored.record.journal(), compensated, charged, answered_ok);
        violations.extend(found.violations.iter().map(|v| format!("{}: {v}", saga.id)));
        late += found.late;
        if compensated {
            late_compensated += found.late;
            refunded += u64::from(charged);
        } else {
            late_completed += found.late;
        }
    }
    Ok(Check::new(
        "late successes after a timeout are compensated once; one refund per charged compensated saga",
        format!(
            "{late} successes after a step timeout ({late_compensated} in compensated sagas, \
             {late_completed} in completed ones); {refunded} compensated sagas refunded; \
             {truncated} journals too long to count"
        ),
        violations,
    ))
}

/// What [`late_successes`] finds in one saga's journal.
#[derive(Debug, Default, PartialEq)]
struct Late {
    /// Step timeouts whose attempt was answered with a success.
    late: usize,
    /// What breaks the check (without the saga id).
    violations: Vec<String>,
}

/// One finished saga's journal: its late successes, and whether each was compensated exactly
/// once (`compensated`: the saga is), and the refund once if `charged` (its payment record is
/// refunded); no step compensated successfully twice.
fn late_in(
    journal: &[jetsaga_sagas::Entry],
    compensated: bool,
    charged: bool,
    answered_ok: &HashSet<String>,
) -> Late {
    let mut undone: BTreeMap<String, u64> = BTreeMap::new();
    let mut late_steps: Vec<String> = Vec::new();
    for entry in journal {
        let Some(id) = entry.command_id.as_deref() else {
            continue;
        };
        let Ok(command) = CommandId::parse(id) else {
            continue;
        };
        match (entry.cause, command.direction) {
            (Cause::ReplyOk, Direction::Compensate) => {
                *undone.entry(command.step).or_default() += 1;
            }
            (Cause::StepTimeout, Direction::Forward) if answered_ok.contains(id) => {
                late_steps.push(command.step);
            }
            _ => {}
        }
    }
    let mut violations = Vec::new();
    for (step, n) in &undone {
        if *n > 1 {
            violations.push(format!("{step} compensated {n} times"));
        }
    }
    let times = |step: &str| undone.get(step).copied().unwrap_or_default();
    if compensated {
        for step in &late_steps {
            if times(step) != 1 {
                violations.push(format!(
                    "{step} succeeded after its timeout, compensated {} times",
                    times(step)
                ));
            }
        }
        if charged && times("take-payment") != 1 {
            violations.push(format!(
                "charged and compensated, {} refunds in its journal",
                times("take-payment")
            ));
        }
    }
    Late {
        late: late_steps.len(),
        violations,
    }
}

/// The orchestrators' memory: the peak resident set of every run of each stays under `limit_mib`.
pub(crate) fn memory(peaks_kib: &[(String, u64)], limit_mib: u64) -> Check {
    let mut violations = Vec::new();
    let mut shown = Vec::new();
    for (name, kib) in peaks_kib {
        let mib = *kib as f64 / 1024.0;
        shown.push(format!("{name} {mib:.0} MiB"));
        if *kib > limit_mib * 1024 {
            violations.push(format!("{name}: peak RSS {mib:.0} MiB"));
        }
    }
    Check::new(
        &format!("orchestrator memory: peak RSS of each run under {limit_mib} MiB"),
        if shown.is_empty() {
            "not measured (no /proc)".to_owned()
        } else {
            format!("peak {}", shown.join(", "))
        },
        violations,
    )
}

/// The inventory's invariants (every hold belongs to a `Reserved` reservation, sold is the sum
/// of the committed lines, stock is conserved) and each saga's reservation against its outcome.
async fn stock(
    js: &jetstream::Context,
    sagas: &[Saga],
    phases: &HashMap<String, Option<Phase>>,
    catalogue: &BTreeMap<String, u64>,
) -> Result<[Check; 2], Error> {
    let store = bucket(js, &inventory::Settings::default().bucket).await?;
    let (products, reservations) = inventory::snapshot(&store)
        .await
        .map_err(|e| Error::Io(e.to_string()))?;
    let mut violations: Vec<String> = inventory::audit(&products, &reservations)
        .iter()
        .map(ToString::to_string)
        .collect();
    for (sku, units) in catalogue {
        match products.get(sku) {
            Some(p) if p.total() != *units => violations.push(format!(
                "{sku}: available + reserved + sold = {} instead of {units}",
                p.total()
            )),
            Some(_) => {}
            None => violations.push(format!("{sku}: no product record")),
        }
    }
    let holds: usize = products.values().map(|p| p.holds.len()).sum();
    let sold: u64 = products.values().map(|p| p.sold).sum();
    let invariants = Check::new(
        "inventory: every hold has a Reserved reservation, sold = committed lines, stock conserved",
        format!(
            "{} products, {holds} holds, {sold} units sold",
            products.len()
        ),
        violations,
    );

    let mut violations = Vec::new();
    let (mut committed, mut rejected, mut released, mut other) = (0, 0, 0, 0);
    for saga in sagas {
        let reservation = reservations.get(&saga.id);
        let status = reservation.map(|r| r.status);
        match phases.get(&saga.id).copied().flatten() {
            Some(Phase::Completed) => {
                let lines: Vec<(String, u64)> = reservation
                    .map(|r| {
                        r.items
                            .iter()
                            .map(|l| (l.sku.clone(), l.quantity))
                            .collect()
                    })
                    .unwrap_or_default();
                if status == Some(inventory::Status::Committed) && same_lines(&lines, &saga.lines) {
                    committed += 1;
                } else {
                    violations.push(format!(
                        "{}: completed, reservation {reservation:?}",
                        saga.id
                    ));
                }
            }
            Some(Phase::Compensated) => match status {
                Some(inventory::Status::Rejected) => rejected += 1,
                Some(inventory::Status::Released) | None => {
                    released += 1;
                    // Neither declined nor out of stock: a step timed out (not a violation).
                    other += u64::from(!saga.declined);
                }
                Some(other) => {
                    violations.push(format!("{}: compensated, reservation {other:?}", saga.id))
                }
            },
            _ => {}
        }
    }
    let outcomes = Check::new(
        "inventory: a completed saga's reservation is committed, a compensated one's released or rejected",
        format!(
            "{committed} committed, {rejected} rejected (out of stock), {released} released or never \
             reserved ({other} of them compensated after a timeout, not a decline)"
        ),
        violations,
    );
    Ok([invariants, outcomes])
}

fn same_lines(a: &[(String, u64)], b: &[(String, u64)]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

/// One email per finished saga: `order.confirmed` for a completed one, `order.cancelled` for a
/// compensated one (the record is created once, so more than one cannot be stored).
async fn emails(
    js: &jetstream::Context,
    sagas: &[Saga],
    phases: &HashMap<String, Option<Phase>>,
) -> Result<Check, Error> {
    let store = bucket(js, &notification::Settings::default().bucket).await?;
    let mut violations = Vec::new();
    let mut sent = 0;
    for saga in sagas {
        let want = match phases.get(&saga.id).copied().flatten() {
            Some(Phase::Completed) => "order.confirmed",
            Some(Phase::Compensated) => "order.cancelled",
            _ => continue,
        };
        let email = notification::email(&store, &saga.id)
            .await
            .map_err(|e| Error::Io(e.to_string()))?;
        match email {
            Some(e) if e.event == want => sent += 1,
            Some(e) => violations.push(format!(
                "{}: {want} expected, email for {}",
                saga.id, e.event
            )),
            None => violations.push(format!("{}: no email ({want})", saga.id)),
        }
    }
    Ok(Check::new(
        "notification: exactly one email per finished saga, for its outcome",
        format!("{sent} emails"),
        violations,
    ))
}

/// The events stream holds exactly one terminal event per saga, for its outcome.
async fn events(
    js: &jetstream::Context,
    sagas: &[Saga],
    phases: &HashMap<String, Option<Phase>>,
) -> Result<Check, Error> {
    let stream = js
        .get_stream(jetsaga_sagas::streams::EVENTS.name)
        .await
        .map_err(|e| Error::Io(format!("events stream: {e}")))?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: "saga.event.order.>".to_owned(),
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Io(format!("reading the events stream: {e}")))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Error::Io(format!("reading the events stream: {e}")))?;
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    let mut stored = 0;
    // An empty stream sends nothing: the timeout ends the read.
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_secs(3), messages.next()).await
    {
        let message = message.map_err(|e| Error::Io(format!("reading the events stream: {e}")))?;
        stored += 1;
        if let Ok(event) = protocol::Event::decode(&message.payload) {
            seen.entry(event.saga_id).or_default().push(event.event);
        }
        if message.info().is_ok_and(|i| i.pending == 0) {
            break;
        }
    }
    let mut violations = Vec::new();
    for saga in sagas {
        let want = match phases.get(&saga.id).copied().flatten() {
            Some(Phase::Completed) => "order.confirmed",
            Some(Phase::Compensated) => "order.cancelled",
            _ => continue,
        };
        let got = seen.get(&saga.id).map(Vec::as_slice).unwrap_or_default();
        if got != [want] {
            violations.push(format!("{}: {want} expected once, stored {got:?}", saga.id));
        }
    }
    Ok(Check::new(
        "events: exactly one order.confirmed / order.cancelled per saga, for its outcome",
        format!("{stored} order events stored"),
        violations,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use jetsaga_testkit::NatsServer;
    use serde_json::json;

    async fn put(kv: &jetstream::kv::Store, key: &str, value: serde_json::Value) {
        kv.put(key, serde_json::to_vec(&value).unwrap().into())
            .await
            .unwrap();
    }

    async fn event(js: &jetstream::Context, name: &str, saga_id: &str) {
        let event = protocol::Event {
            protocol: protocol::VERSION,
            event: name.to_owned(),
            saga_id: saga_id.to_owned(),
            saga_type: "order-creation".to_owned(),
            key: saga_id.to_owned(),
            input: serde_json::Value::Null,
            occurred_at: chrono::Utc::now(),
        };
        js.publish(format!("saga.event.{name}"), event.encode().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// The state of one completed and one compensated (declined) saga, written by hand: first
    /// as the participants leave it, then broken in one way per check.
    #[tokio::test]
    async fn each_check_passes_on_a_consistent_state_and_names_what_breaks_it() {
        let server = NatsServer::start();
        let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
        let bucket = |name: String| {
            let js = js.clone();
            async move {
                js.create_key_value(jetstream::kv::Config {
                    bucket: name,
                    ..Default::default()
                })
                .await
                .unwrap()
            }
        };
        let stock_kv = bucket(inventory::Settings::default().bucket).await;
        let payments_kv = bucket(payment::Settings::default().bucket).await;
        let emails_kv = bucket(notification::Settings::default().bucket).await;
        js.create_stream(jetstream::stream::Config {
            name: jetsaga_sagas::streams::EVENTS.name.to_owned(),
            subjects: vec!["saga.event.>".to_owned()],
            ..Default::default()
        })
        .await
        .unwrap();

        let saga = |id: &str, declined| Saga {
            id: id.to_owned(),
            declined,
            amount_cents: 1500,
            lines: vec![("sku-1".to_owned(), 1)],
        };
        let sagas = [saga("done", false), saga("undone", true)];
        let phases: HashMap<String, Option<Phase>> = [
            ("done".to_owned(), Some(Phase::Completed)),
            ("undone".to_owned(), Some(Phase::Compensated)),
        ]
        .into();
        let catalogue: BTreeMap<String, u64> = [("sku-1".to_owned(), 10)].into();
        let line = json!([{"sku": "sku-1", "quantity": 1}]);
        put(
            &stock_kv,
            "product.sku-1",
            json!({"available": 9, "sold": 1, "holds": {}}),
        )
        .await;
        put(
            &stock_kv,
            "reservation.done",
            json!({"status": "committed", "items": line}),
        )
        .await;
        put(
            &stock_kv,
            "reservation.undone",
            json!({"status": "released", "items": line}),
        )
        .await;
        let charge = |amount: u64| json!({"status": "charged", "amount_cents": amount, "currency": "EUR", "customer_id": "c"});
        put(&payments_kv, "payment.done", charge(1500)).await;
        let email = |id: &str, event: &str| {
            json!({"to": "a@example.com", "subject": "s", "event": event, "saga_id": id,
                   "sent_at": "2026-12-02T00:00:00Z"})
        };
        put(&emails_kv, "email.done", email("done", "order.confirmed")).await;
        put(
            &emails_kv,
            "email.undone",
            email("undone", "order.cancelled"),
        )
        .await;
        event(&js, "order.confirmed", "done").await;
        event(&js, "order.cancelled", "undone").await;

        let all = |js: jetstream::Context| {
            let (sagas, phases, catalogue) = (sagas.clone(), phases.clone(), catalogue.clone());
            async move {
                let mut checks = vec![terminal(&sagas, &phases), declined(&sagas, &phases)];
                checks.push(payments(&js, &sagas, &phases).await.unwrap());
                checks.extend(stock(&js, &sagas, &phases, &catalogue).await.unwrap());
                checks.push(emails(&js, &sagas, &phases).await.unwrap());
                checks.push(events(&js, &sagas, &phases).await.unwrap());
                checks
            }
        };
        for check in all(js.clone()).await {
            assert!(check.passed(), "{}", check.render());
        }

        // A charge kept for the compensated saga, a hold it left behind, a lost email, a
        // completion event stored twice, and the declined saga completed after all.
        put(&payments_kv, "payment.undone", charge(700)).await;
        put(
            &stock_kv,
            "product.sku-1",
            json!({"available": 8, "sold": 1, "holds": {"undone": {"quantity": 1, "attempts": [1]}}}),
        )
        .await;
        emails_kv.delete("email.done").await.unwrap();
        event(&js, "order.confirmed", "done").await;
        let checks = all(js.clone()).await;
        let violations: Vec<(&str, usize)> = checks
            .iter()
            .map(|c| (c.name.as_str(), c.violations.len()))
            .collect();
        assert_eq!(
            violations.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            // terminal, declined, payment (charge kept, balance), inventory invariants (stray
            // hold), inventory outcomes, emails, events
            vec![0, 0, 2, 1, 0, 1, 1],
            "{violations:#?}"
        );
        let text: Vec<String> = checks.iter().map(Check::render).collect();
        let text = text.join("\n");
        for expected in [
            "undone: compensated but still charged",
            "ledger balance 2200 cents, the completed sagas cost 1500",
            "sku-1: undone holds",
            "done: no email (order.confirmed)",
            "done: order.confirmed expected once, stored [\"order.confirmed\", \"order.confirmed\"]",
        ] {
            assert!(text.contains(expected), "{expected} in:\n{text}");
        }

        let completed: HashMap<String, Option<Phase>> = [
            ("done".to_owned(), Some(Phase::Completed)),
            ("undone".to_owned(), Some(Phase::Completed)),
        ]
        .into();
        let check = declined(&sagas, &completed);
        assert_eq!(check.violations, vec!["undone: declined but completed"]);
        let running: HashMap<String, Option<Phase>> =
            [("done".to_owned(), Some(Phase::Running))].into();
        let check = terminal(&sagas, &running);
        assert_eq!(check.violations, vec!["done: running", "undone: missing"]);
    }
}

#[cfg(test)]
mod pure_tests {
    use super::*;
    use jetsaga_sagas::{Actor, Entry};

    fn entry(cause: Cause, command_id: &str) -> Entry {
        Entry {
            seq: 1,
            at: chrono::Utc::now(),
            actor: Actor::Orchestrator,
            cause,
            step: None,
            command_id: Some(command_id.to_owned()),
            from: None,
            to: Phase::Running,
            error: None,
            operator: None,
        }
    }

    #[test]
    fn a_late_success_is_compensated_exactly_once_and_a_charge_refunded_once() {
        let ok: HashSet<String> = ["s:take-payment:do:1".to_owned()].into();
        let timeout = entry(Cause::StepTimeout, "s:take-payment:do:1");
        let refund = entry(Cause::ReplyOk, "s:take-payment:undo:1");
        let release = entry(Cause::ReplyOk, "s:reserve-stock:undo:1");
        let journal = [timeout.clone(), refund.clone(), release.clone()];
        assert_eq!(
            late_in(&journal, true, true, &ok),
            Late {
                late: 1,
                violations: Vec::new()
            }
        );
        // Completed after a later attempt: counted, nothing to compensate.
        assert_eq!(
            late_in(std::slice::from_ref(&timeout), false, false, &ok).late,
            1
        );
        // A timeout whose attempt never succeeded is no late success.
        assert_eq!(
            late_in(std::slice::from_ref(&timeout), true, false, &HashSet::new()).late,
            0
        );

        let never = late_in(&[timeout.clone(), release.clone()], true, true, &ok);
        assert_eq!(
            never.violations,
            vec![
                "take-payment succeeded after its timeout, compensated 0 times",
                "charged and compensated, 0 refunds in its journal",
            ]
        );
        let twice = late_in(&[timeout, refund.clone(), refund, release], true, true, &ok);
        assert_eq!(
            twice.violations,
            vec![
                "take-payment compensated 2 times",
                "take-payment succeeded after its timeout, compensated 2 times",
                "charged and compensated, 2 refunds in its journal",
            ]
        );
    }

    #[test]
    fn the_memory_check_names_the_orchestrator_over_its_bound() {
        let peaks = [
            ("orchestrator-a".to_owned(), 300 * 1024),
            ("orchestrator-b".to_owned(), 1100 * 1024),
        ];
        let check = memory(&peaks, 1024);
        assert_eq!(check.violations, vec!["orchestrator-b: peak RSS 1100 MiB"]);
        assert_eq!(
            check.detail,
            "peak orchestrator-a 300 MiB, orchestrator-b 1100 MiB"
        );
        assert!(memory(&peaks[..1], 1024).passed());
        assert!(memory(&[], 1024).passed());
    }
}
