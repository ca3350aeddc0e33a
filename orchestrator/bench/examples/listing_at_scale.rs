//! The saga listing at scale, through the real HTTP API: fills a journal with N sagas
//! (default 1,000,000), starts `jetsaga serve` on it and times `GET /v1/sagas` pages.
//!
//! ```text
//! cargo build --release -p jetsaga-cli
//! NATS_SERVER_BIN=.tools/nats-server/bin/nats-server \
//!   cargo run --release -p jetsaga-bench --example listing_at_scale -- --sagas 1000000
//! ```
//!
//! The records are the orchestrator's own: every saga is started and driven by the pure
//! saga core (`Saga::start`, `Saga::apply` with scripted replies) of two saga types, each
//! transition becomes a [`Record`] carrying the journal so far, and only the last record
//! of a saga is published, with the headers the driver's append gives it
//! ([`store::headers`], [`store::append_headers`]). The mix: 84 % completed, 10 %
//! compensated (payment declined), 4 % running (waiting on the payment), 1 %
//! compensating, 1 % parked failed (the step after the pivot refused). Start times spread
//! over the last 24 hours; the listing's "updated" is the record's publish time, so it
//! spans the fill.
//!
//! Then it starts the real `jetsaga serve` (with a read token) on that store, measures
//! the time until `/readyz` answers 200 (the listing's replay of the journal), and times
//! each listing shape over HTTP (client-side wall time per request: p50, p99, max), a
//! walk through the whole listing by cursor (which must return every saga once), and
//! the orchestrator's resident memory, and the server's own view of the same requests
//! (the route's duration histogram from `/metrics`). Exits 1 if a shape's p99 or any
//! request in the server took longer than `--budget-ms` (50), or the walk did not return
//! every saga.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use jetsaga_orchestrator::config::Config;
use jetsaga_orchestrator::definitions::Registry;
use jetsaga_orchestrator::store::{self, Record, outbound};
use jetsaga_orchestrator::{driver, provision};
use jetsaga_sagas::protocol::{Failure, Outcome};
use jetsaga_sagas::{Action, Definition, Input, Saga};
use jetsaga_testkit::{ChildGuard, NatsServer};

const TOKEN: &str = "listing-at-scale-read-token";
/// The second saga type: the order definition under another name.
const RENEWAL: &str = "subscription-renewal";
/// Acknowledgements outstanding at once while filling.
const WINDOW: usize = 2048;

#[derive(Debug)]
struct Args {
    sagas: u64,
    jetsaga: PathBuf,
    requests: usize,
    budget_ms: f64,
}

fn args() -> Args {
    let mut parsed = Args {
        sagas: 1_000_000,
        jetsaga: default_jetsaga(),
        requests: 200,
        budget_ms: 50.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--sagas" => parsed.sagas = value.parse().unwrap_or_else(|_| usage("--sagas N")),
            "--jetsaga" => parsed.jetsaga = PathBuf::from(value),
            "--requests" => {
                parsed.requests = value.parse().unwrap_or_else(|_| usage("--requests N"));
            }
            "--budget-ms" => {
                parsed.budget_ms = value.parse().unwrap_or_else(|_| usage("--budget-ms MS"));
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    parsed
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "listing_at_scale: {problem}\nusage: listing_at_scale [--sagas N] [--jetsaga PATH] \
         [--requests N] [--budget-ms MS]"
    );
    std::process::exit(64)
}

/// `target/<profile>/jetsaga`, beside the `examples/` folder of this executable.
fn default_jetsaga() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("examples") {
        dir.pop();
    }
    dir.join("jetsaga")
}

/// The order definition and a copy of it named [`RENEWAL`], as files `jetsaga serve` loads.
fn definitions(dir: &Path) -> Registry {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sagas/definitions");
    let order = std::fs::read_to_string(source.join("order-creation.toml")).unwrap();
    let schema = std::fs::read_to_string(source.join("order-creation.input.schema.json")).unwrap();
    std::fs::write(dir.join("order-creation.toml"), &order).unwrap();
    std::fs::write(dir.join("order-creation.input.schema.json"), &schema).unwrap();
    std::fs::write(
        dir.join(format!("{RENEWAL}.toml")),
        order.replace(
            "name = \"order-creation\"",
            &format!("name = \"{RENEWAL}\""),
        ),
    )
    .unwrap();
    Registry::with_dir(dir).unwrap_or_else(|e| panic!("definitions: {e:?}"))
}

/// How saga `i` ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Completed,
    Compensated,
    Running,
    Compensating,
    Failed,
}

fn fate(i: u64) -> Fate {
    match i % 100 {
        0 => Fate::Failed,
        1..=4 => Fate::Running,
        5 => Fate::Compensating,
        6..=15 => Fate::Compensated,
        _ => Fate::Completed,
    }
}

/// The reply a participant gives `step` (`undo`: its compensation) in a saga of `fate`;
/// `None` leaves the command unanswered (the saga waits).
fn reply(fate: Fate, step: &str, undo: bool) -> Option<Outcome> {
    let ok = || {
        Some(Outcome::Ok {
            result: serde_json::Value::Null,
        })
    };
    let refuse = |code: &str| {
        Some(Outcome::Failed {
            error: Failure::new(code, "refused", false),
        })
    };
    match (fate, step, undo) {
        (Fate::Running, "take-payment", false) => None,
        (Fate::Compensated | Fate::Compensating, "take-payment", false) => refuse("card_declined"),
        (Fate::Compensating, _, true) => None,
        (Fate::Failed, "confirm-order", false) => refuse("order_rejected"),
        _ => ok(),
    }
}

/// The last journal record of saga `i`, built transition by transition as the driver does.
fn last_record(def: &Definition, i: u64, base: DateTime<Utc>) -> Record {
    let fate = fate(i);
    let key = format!("order-{i:08}");
    let input = serde_json::json!({"customer_id": format!("c-{}", i % 5000), "email": "ana@example.com",
        "items": [{"sku": format!("sku-{}", i % 300), "quantity": 1 + i % 3}],
        "amount_cents": 500 + i % 20_000, "currency": "EUR", "card_token": "tok_ok"});
    // Spread over the last 24 hours, a few hundred milliseconds per transition.
    let mut now =
        base - TimeDelta::milliseconds(i64::try_from((i * 86_400_000) / 1_000_003).unwrap());
    let saga_id = driver::saga_id(&def.name, &key);
    let (mut saga, transition) = Saga::start(def, saga_id, key, input, None, now).unwrap();
    let mut record = record_of(def, None, &saga, transition.entry, &transition.actions);
    let mut pending = commands(&transition.actions);
    while let Some((command_id, step, undo)) = pending.pop() {
        let Some(outcome) = reply(fate, &step, undo) else {
            break;
        };
        now += TimeDelta::milliseconds(180);
        let transition = saga
            .apply(
                def,
                Input::Reply {
                    command_id,
                    outcome,
                },
                now,
            )
            .unwrap();
        record = record_of(
            def,
            Some(&record),
            &saga,
            transition.entry,
            &transition.actions,
        );
        pending.extend(commands(&transition.actions));
    }
    record
}

fn commands(actions: &[Action]) -> Vec<(String, String, bool)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Send { command, .. } => Some((
                command.command_id.clone(),
                command.step.clone(),
                command.compensation,
            )),
            _ => None,
        })
        .collect()
}

fn record_of(
    def: &Definition,
    previous: Option<&Record>,
    saga: &Saga,
    entry: jetsaga_sagas::Entry,
    actions: &[Action],
) -> Record {
    let effects = actions
        .iter()
        .filter_map(|a| outbound(a, saga.traceparent.as_deref()).map(|(effect, _)| effect))
        .collect();
    Record::next(previous, entry, saga.clone(), effects, saga.next_timer(def))
}

async fn fill(js: &async_nats::jetstream::Context, registry: &Registry, config: &Config, n: u64) {
    let order = registry.latest("order-creation").unwrap().clone();
    let renewal = registry.latest(RENEWAL).unwrap().clone();
    let retention = config.streams.finished_retention;
    let base = Utc::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel(WINDOW);
    // Records are built on a thread of their own while the task below publishes them.
    let builder = std::thread::spawn(move || {
        for i in 0..n {
            // One saga in five is a subscription renewal.
            let def: &Arc<Definition> = if i % 5 == 4 { &renewal } else { &order };
            let record = last_record(def, i, base);
            let headers = store::append_headers(&store::headers(&record, retention), 0);
            let message = (
                store::journal_subject(&record.saga.id),
                headers,
                record.encode().unwrap(),
            );
            if tx.blocking_send(message).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut acks = FuturesUnordered::new();
    let mut bytes = 0u64;
    let mut published = 0u64;
    while let Some((subject, headers, body)) = rx.recv().await {
        bytes += body.len() as u64;
        acks.push(
            js.publish_with_headers(subject, headers, body)
                .await
                .unwrap()
                .into_future(),
        );
        while acks.len() >= WINDOW {
            acks.next().await.unwrap().unwrap();
        }
        published += 1;
        if published.is_multiple_of(100_000) {
            println!("  {published} published ({:.0?})", started.elapsed());
        }
    }
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }
    builder.join().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "filled {n} sagas in {elapsed:.1} s ({:.0} records/s), {:.0} bytes per record body",
        n as f64 / elapsed,
        bytes as f64 / n.max(1) as f64
    );
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Api {
    http: reqwest::Client,
    base: String,
}

#[derive(Debug, serde::Deserialize)]
struct Page {
    items: Vec<serde_json::Value>,
    next_cursor: Option<String>,
}

impl Api {
    /// One page and how long it took, client side.
    async fn page(&self, query: &str) -> (Page, Duration) {
        let started = Instant::now();
        let response = self
            .http
            .get(format!("{}/v1/sagas?{query}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.bytes().await.unwrap();
        let took = started.elapsed();
        assert!(
            status.is_success(),
            "GET /v1/sagas?{query}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        (serde_json::from_slice(&body).unwrap(), took)
    }
}

#[derive(Debug, Default)]
struct Times(Vec<f64>);

impl Times {
    fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64() * 1000.0);
    }

    fn line(&mut self, name: &str, items: usize) -> f64 {
        let mut samples = std::mem::take(&mut self.0);
        let latency = jetsaga_bench::percentiles(&mut samples);
        println!(
            "| {name} | {items} | {} | {:.2} | {:.2} | {:.2} |",
            samples.len(),
            latency.p50,
            latency.p99,
            latency.max
        );
        latency.p99
    }
}

#[tokio::main]
async fn main() {
    let args = args();
    assert!(
        args.jetsaga.is_file(),
        "no jetsaga binary at {} (build it with `cargo build --release -p jetsaga-cli`, or \
         pass --jetsaga)",
        args.jetsaga.display()
    );
    let work = tempfile::tempdir().unwrap();
    // Room for the journal of a million sagas (the test servers' default store is 16 GB).
    let nats_config = work.path().join("nats.conf");
    std::fs::write(&nats_config, "jetstream {\n  max_file_store: 64GB\n}\n").unwrap();
    let server = NatsServer::try_start_with_file(&nats_config, []).unwrap();
    let defs = work.path().join("definitions");
    std::fs::create_dir(&defs).unwrap();
    let registry = definitions(&defs);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config_file = work.path().join("jetsaga.toml");
    std::fs::write(
        &config_file,
        format!(
            "[nats]\nurl = \"{}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             tokens = [{{ name = \"bench\", role = \"read\", token = \"{TOKEN}\" }}]\n\
             [streams]\nmax-bytes = \"8 GiB\"\n[engine]\ndefinitions = {:?}\n\
             [telemetry]\nlog-filter = \"warn\"\n",
            server.url(),
            defs.display()
        ),
    )
    .unwrap();
    let config = Config::load(Some(&config_file), std::iter::empty()).unwrap();
    // The streams exactly as `jetsaga serve` provisions them (it checks them at start).
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::ContextBuilder::new()
        .max_ack_inflight(WINDOW * 2)
        // A busy machine can take longer than the default 5 s to acknowledge a window.
        .timeout(Duration::from_secs(120))
        .build(client);
    provision::streams(&js, &config.streams).await.unwrap();
    fill(&js, &registry, &config, args.sagas).await;

    let spawned = Instant::now();
    let mut serve = Command::new(&args.jetsaga);
    serve.args(["serve", "--config"]).arg(&config_file);
    let orchestrator = ChildGuard::spawn(serve).unwrap();
    let api = Api {
        http: reqwest::Client::new(),
        base: format!("http://127.0.0.1:{port}"),
    };
    loop {
        let ready = api
            .http
            .get(format!("{}/readyz", api.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            break;
        }
        assert!(
            spawned.elapsed() < Duration::from_secs(900),
            "jetsaga serve not ready after 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let catch_up = spawned.elapsed();
    let rss_ready = rss_mib(orchestrator.pid());
    println!(
        "jetsaga serve ready (listing caught up) {:.2} s after spawn; orchestrator RSS {rss_ready:.0} MiB",
        catch_up.as_secs_f64()
    );

    // The newest update; the walk below finds the oldest, and the middle is between them.
    let (newest, _) = api.page("limit=1").await;
    let newest = base_of(&newest);
    // The worst p99 of a shape (single maxima on a shared machine are scheduling, see below).
    let mut worst: f64 = 0.0;
    println!("| shape | items | requests | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|");
    let mut all = HashSet::new();
    let mut times = Times::default();
    let mut cursor: Option<String> = None;
    let mut last_updated = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("limit=500&cursor={c}"),
            None => "limit=500".to_owned(),
        };
        let (page, took) = api.page(&query).await;
        times.push(took);
        for item in &page.items {
            all.insert(item["saga_id"].as_str().unwrap().to_owned());
            last_updated = item["updated_at"].as_str().map(str::to_owned);
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let pages = times.0.len();
    worst = worst.max(times.line(
        &format!("whole listing by cursor, limit=500 ({pages} pages)"),
        500,
    ));
    let oldest_update = last_updated
        .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(newest);
    let middle = oldest_update + (newest - oldest_update) / 2;
    let mut shapes: Vec<(String, String)> = vec![
        ("no filter (limit 50)".into(), String::new()),
        ("no filter, limit=500".into(), "limit=500".into()),
        (format!("type={RENEWAL}"), format!("type={RENEWAL}")),
        ("state=failed".into(), "state=failed".into()),
        (
            "state=running&type=order-creation".into(),
            "state=running&type=order-creation".into(),
        ),
        ("state=completed".into(), "state=completed".into()),
        ("stuck=true".into(), "stuck=true".into()),
        (
            "stuck=true, limit=500".into(),
            "stuck=true&limit=500".into(),
        ),
        ("stuck=false".into(), "stuck=false".into()),
        (
            "updated_before=middle".into(),
            format!("updated_before={}", encode(middle)),
        ),
        (
            "updated_after=middle".into(),
            format!("updated_after={}", encode(middle)),
        ),
        (
            "updated_after=middle-1s&updated_before=middle".into(),
            format!(
                "updated_after={}&updated_before={}",
                encode(middle - TimeDelta::seconds(1)),
                encode(middle)
            ),
        ),
        (
            "state=failed&updated_before=middle".into(),
            format!("state=failed&updated_before={}", encode(middle)),
        ),
        (
            "no match (updated_after=now)".into(),
            format!("updated_after={}", encode(Utc::now())),
        ),
    ];
    // Deep pages: the cursor 100,000 sagas down, and the one 900,000 down (or near the end).
    for depth in [100_000u64, args.sagas.saturating_mul(9) / 10] {
        let mut c: Option<String> = None;
        let mut skipped = 0;
        while skipped < depth {
            let query = match &c {
                Some(c) => format!("limit=500&cursor={c}"),
                None => "limit=500".to_owned(),
            };
            let (page, _) = api.page(&query).await;
            skipped += page.items.len() as u64;
            match page.next_cursor {
                Some(next) => c = Some(next),
                None => break,
            }
        }
        if let Some(c) = c {
            shapes.push((
                format!("cursor {skipped} deep (limit 50)"),
                format!("cursor={c}"),
            ));
            shapes.push((
                format!("cursor {skipped} deep, state=failed"),
                format!("state=failed&cursor={c}"),
            ));
        }
    }
    for (name, query) in &shapes {
        let mut items = 0;
        for _ in 0..args.requests {
            let (page, took) = api.page(query).await;
            items = page.items.len();
            times.push(took);
        }
        worst = worst.max(times.line(name, items));
    }
    let rss_after = rss_mib(orchestrator.pid());
    // The server's own view (handler, index and JSON, without the client's scheduling): the
    // route's duration histogram from /metrics.
    let metrics = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = |suffix: &str, label: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with(&format!("jetsaga_http_request_duration_seconds{suffix}"))
                    && l.contains("route=\"/v1/sagas\"")
                    && l.contains(label)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let total = series("_count", "");
    let within = |le: &str| series("_bucket", &format!("le=\"{le}\""));
    let server_over_budget = total - within("0.05");
    println!(
        "server side, GET /v1/sagas: {total} requests, mean {:.3} ms; within 1 ms {}, 10 ms {}, \
         50 ms {}",
        series("_sum", "") / total.max(1.0) * 1000.0,
        within("0.001"),
        within("0.01"),
        within("0.05")
    );
    println!(
        "\nsagas {} | listed by the walk {} | catch-up {:.2} s | orchestrator RSS {rss_ready:.0} MiB \
         when ready, {rss_after:.0} MiB after the queries | worst p99 of a shape {worst:.2} ms",
        args.sagas,
        all.len(),
        catch_up.as_secs_f64()
    );
    let mut failed = false;
    if all.len() as u64 != args.sagas {
        println!(
            "PROBLEM: the walk listed {} sagas, not {}",
            all.len(),
            args.sagas
        );
        failed = true;
    }
    if worst > args.budget_ms || server_over_budget > 0.0 {
        println!(
            "PROBLEM: worst p99 {worst:.2} ms, {server_over_budget} requests over 50 ms in the \
             server (budget {} ms)",
            args.budget_ms
        );
        failed = true;
    }
    drop(orchestrator);
    drop(server);
    std::process::exit(i32::from(failed));
}

fn base_of(page: &Page) -> DateTime<Utc> {
    page.items
        .first()
        .and_then(|i| i["updated_at"].as_str())
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map_or_else(Utc::now, |t| t.with_timezone(&Utc))
}

/// An RFC 3339 time for a query string (`+` would read as a space).
fn encode(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
