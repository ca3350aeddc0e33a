//! The metrics tell what happened: a known workload runs through the real orchestrator
//! (in-process, HTTP on a real socket) and the reference inventory and payment, then
//! `/metrics` of each is scraped over a socket and its values are checked against the
//! workload; `promtool check metrics` must accept every scrape.
//!
//! The workload: 50 sagas started over HTTP — 44 completed, 5 compensated (declined card),
//! 1 parked failed (a saga type whose compensation is an action inventory does not have, so
//! the compensation fails for good) — and 2 undecodable replies (2 dead letters).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream::{self};
use jetsaga_orchestrator::config::{Config as OrchestratorConfig, Storage};
use jetsaga_orchestrator::{Handle, Running, Service};
use jetsaga_reference::{inventory, payment};
use jetsaga_sagas::Phase;
use jetsaga_testkit::{NatsServer, wait_until};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(120);

/// order-creation, except that stock is "released" by an action inventory does not have.
const PARKED: &str = r#"
name = "order-parked"
version = 1
input-schema = "order-creation.input.schema.json"
deadline = "5m"
[events]
completed = ["order.confirmed"]
compensated = ["order.cancelled"]
[compensation-retry]
max-attempts = 2
initial-backoff = "50ms"
max-backoff = "100ms"
[[steps]]
name = "reserve-stock"
participant = "inventory"
action = "reserve"
compensation = "release-unsupported"
kind = "compensatable"
timeout = "10s"
[[steps]]
name = "take-payment"
participant = "payment"
action = "charge"
compensation = "refund"
kind = "pivot"
timeout = "10s"
[[steps]]
name = "confirm-order"
participant = "inventory"
action = "commit"
kind = "retriable"
timeout = "10s"
"#;

fn order(i: usize, card: &str) -> Value {
    json!({
        "customer_id": format!("c-{i}"), "email": "ana@example.com",
        "items": [{"sku": "sku-1", "quantity": 1}],
        "amount_cents": 1000 + i, "currency": "EUR", "card_token": card,
    })
}

/// A minimal HTTP/1.1 request over a real socket: (status, body).
async fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// Samples of one scrape: `name{labels}` (labels sorted, as rendered) → value.
#[derive(Debug)]
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap();
                (series.to_owned(), value.parse().unwrap())
            })
            .collect();
        Self(samples)
    }

    /// The value of `name` with exactly these labels (in any order).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.iter().find_map(|(series, value)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            if n != name {
                return None;
            }
            let mut have: Vec<String> = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            let mut want: Vec<String> =
                labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            have.sort();
            want.sort();
            (have == want).then_some(*value)
        })
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in the scrape"))
    }
}

/// Scrapes `http://addr/metrics` and has promtool lint it.
async fn scrape(addr: &str, promtool: Option<&str>) -> Scrape {
    let (status, body) = http(addr, "GET", "/metrics", "").await;
    assert_eq!(status, 200, "GET /metrics on {addr}");
    if let Some(promtool) = promtool {
        let mut child = tokio::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(body.as_bytes()).await.unwrap();
        drop(stdin);
        let out = child.wait_with_output().await.unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics rejects the scrape of {addr}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Scrape::parse(&body)
}

fn promtool() -> Option<String> {
    let found = std::env::var("PROMTOOL").ok().or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("promtool"))
                .find(|p| p.is_file())
                .map(|p| p.display().to_string())
        })
    });
    if found.is_none() {
        eprintln!(
            "\n!!!!!!!! promtool is not installed: `promtool check metrics` is SKIPPED \
             (deploy/install-prometheus.sh installs it; deploy/test.sh runs it) !!!!!!!!\n"
        );
    }
    found
}

fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

async fn wait_phase(handle: &Handle, id: &str, want: Phase) {
    wait_until(&format!("saga {id} is {want:?}"), WAIT, || async {
        handle.saga(id).await.ok().flatten().map(|s| s.phase()) == Some(want)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_a_known_run_and_pass_promtool() {
    let promtool = promtool();
    let promtool = promtool.as_deref();
    let server = NatsServer::start();
    let url = server.url();
    let defs = tempfile::tempdir().unwrap();
    std::fs::write(defs.path().join("parked.toml"), PARKED).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../sagas/definitions/order-creation.input.schema.json"
        ),
        defs.path().join("order-creation.input.schema.json"),
    )
    .unwrap();

    let mut config = OrchestratorConfig::default();
    config.nats.url = url.clone();
    config.streams.storage = Storage::File;
    config.engine.definitions = Some(defs.path().to_owned());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running: Running = Service::start_with_listener(config, listener)
        .await
        .unwrap();
    let handle = running.handle().clone();
    let api = running.http_addr().to_string();

    let token = CancellationToken::new();
    let inventory_addr = free_addr();
    let payment_addr = free_addr();
    let mut inventory_config = inventory::Config::default();
    inventory_config.nats.url = url.clone();
    inventory_config.metrics.listen = inventory_addr.clone();
    let mut payment_config = payment::Config::default();
    payment_config.nats.url = url.clone();
    payment_config.metrics.listen = payment_addr.clone();
    let participants = [
        tokio::spawn(inventory::run(
            inventory_config,
            token.clone().cancelled_owned(),
        )),
        tokio::spawn(payment::run(
            payment_config,
            token.clone().cancelled_owned(),
        )),
    ];

    // Before any work: every scrape passes promtool, and the series alerts rely on exist at 0.
    wait_until("the participants serve /metrics", WAIT, || async {
        tokio::net::TcpStream::connect(&inventory_addr)
            .await
            .is_ok()
            && tokio::net::TcpStream::connect(&payment_addr).await.is_ok()
    })
    .await;
    let before = scrape(&api, promtool).await;
    assert_eq!(
        before.value(
            "jetsaga_sagas_failed_waiting",
            &[("saga_type", "order-parked")]
        ),
        0.0
    );
    assert_eq!(
        before.value(
            "jetsaga_dead_letters_total",
            &[("source", "orchestrator.replies")]
        ),
        0.0
    );
    let inv = scrape(&inventory_addr, promtool).await;
    assert_eq!(
        inv.value(
            "jetsaga_participant_duplicates_total",
            &[("participant", "inventory"), ("action", "reserve")]
        ),
        0.0,
        "the duplicates series exists from the start"
    );

    // 49 order-creation sagas (5 declined) and 1 order-parked saga (declined), over HTTP.
    let mut ids = Vec::new();
    for i in 0..50 {
        let (saga_type, card) = match i {
            49 => ("order-parked", "tok_decline"),
            i if i % 10 == 3 => ("order-creation", "tok_decline"),
            _ => ("order-creation", "tok_ok"),
        };
        let body = json!({"key": format!("order-{i}"), "input": order(i, card)}).to_string();
        let (status, answer) = http(&api, "POST", &format!("/v1/sagas/{saga_type}"), &body).await;
        assert_eq!(status, 201, "start {i}: {answer}");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        ids.push((
            answer["saga_id"].as_str().unwrap().to_owned(),
            card,
            saga_type,
        ));
    }
    // A repeated start is answered 200 with the same saga.
    let body = json!({"key": "order-0", "input": order(0, "tok_ok")}).to_string();
    let (status, _) = http(&api, "POST", "/v1/sagas/order-creation", &body).await;
    assert_eq!(status, 200);
    // An unknown saga type is a 404 on the same route.
    let (status, _) = http(&api, "POST", "/v1/sagas/no-such-type", &body).await;
    assert_eq!(status, 404);

    for (id, card, saga_type) in &ids {
        let want = match (*saga_type, *card) {
            ("order-parked", _) => Phase::Failed,
            (_, "tok_decline") => Phase::Compensated,
            _ => Phase::Completed,
        };
        wait_phase(&handle, id, want).await;
    }

    // Two undecodable replies: dead-lettered by the orchestrator.
    let client = async_nats::connect(url.clone()).await.unwrap();
    let js = jetstream::new(client);
    for i in 0..2 {
        js.publish(
            format!("saga.reply.inventory.garbage-{i}"),
            "not json".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    // The census catches up with the journal (it runs every few seconds).
    let last = std::sync::Arc::new(std::sync::Mutex::new(None));
    wait_until(
        "the census and the dead letters are in the metrics",
        WAIT,
        || {
            let (api, last) = (api.clone(), last.clone());
            async move {
                let s = scrape(&api, promtool).await;
                let ok = s.get(
                    "jetsaga_sagas_failed_waiting",
                    &[("saga_type", "order-parked")],
                ) == Some(1.0)
                    && s.get(
                        "jetsaga_dead_letters_total",
                        &[("source", "orchestrator.replies")],
                    ) == Some(2.0);
                *last.lock().unwrap() = Some(s);
                ok
            }
        },
    )
    .await;
    let orchestrator = last.lock().unwrap().take().unwrap();
    let s = &orchestrator;
    let oc = ("saga_type", "order-creation");
    let op = ("saga_type", "order-parked");
    assert_eq!(s.value("jetsaga_sagas_started_total", &[oc]), 49.0);
    assert_eq!(s.value("jetsaga_sagas_started_total", &[op]), 1.0);
    for (labels, want) in [
        ([oc, ("outcome", "completed")], 44.0),
        ([oc, ("outcome", "compensated")], 5.0),
        ([oc, ("outcome", "failed")], 0.0),
        ([op, ("outcome", "failed")], 1.0),
    ] {
        assert_eq!(
            s.value("jetsaga_sagas_finished_total", &labels),
            want,
            "{labels:?}"
        );
    }
    assert_eq!(
        s.value(
            "jetsaga_saga_duration_seconds_count",
            &[oc, ("outcome", "completed")]
        ),
        44.0
    );
    // True counts from the journal: nothing left running, one failed saga waiting.
    for state in ["running", "compensating"] {
        assert_eq!(
            s.value("jetsaga_sagas_in_flight", &[oc, ("state", state)]),
            0.0
        );
        assert_eq!(
            s.value("jetsaga_sagas_in_flight", &[op, ("state", state)]),
            0.0
        );
    }
    assert_eq!(
        s.value("jetsaga_sagas_in_flight", &[op, ("state", "failed")]),
        1.0
    );
    assert_eq!(
        s.value("jetsaga_sagas_in_flight", &[oc, ("state", "failed")]),
        0.0
    );
    assert_eq!(s.value("jetsaga_sagas_failed_waiting", &[oc]), 0.0);
    assert_eq!(s.value("jetsaga_sagas_stuck", &[oc]), 0.0);
    assert_eq!(s.value("jetsaga_sagas_stuck", &[op]), 0.0);
    assert!(s.value("jetsaga_census_last_success_timestamp_seconds", &[]) > 0.0);
    // Compensations: one release per declined order-creation saga; the parked saga's
    // compensation was sent at least once.
    assert_eq!(
        s.value(
            "jetsaga_compensations_total",
            &[oc, ("step", "reserve-stock")]
        ),
        5.0
    );
    assert!(
        s.value(
            "jetsaga_compensations_total",
            &[op, ("step", "reserve-stock")]
        ) >= 1.0
    );
    // Forward step durations by outcome.
    let step = |saga: (&'static str, &'static str), name: &'static str, outcome: &'static str| {
        s.get(
            "jetsaga_step_duration_seconds_count",
            &[
                saga,
                ("step", name),
                ("direction", "forward"),
                ("outcome", outcome),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(step(oc, "reserve-stock", "ok"), 49.0);
    assert_eq!(step(oc, "take-payment", "ok"), 44.0);
    assert_eq!(step(oc, "take-payment", "failed"), 5.0);
    assert_eq!(step(oc, "confirm-order", "ok"), 44.0);
    assert_eq!(step(op, "take-payment", "failed"), 1.0);
    assert_eq!(
        s.value(
            "jetsaga_dead_letters_total",
            &[("source", "orchestrator.replies")]
        ),
        2.0
    );
    assert_eq!(
        s.value(
            "jetsaga_dead_letters_total",
            &[("source", "orchestrator.starts")]
        ),
        0.0
    );
    assert!(s.value("jetsaga_timer_writes_total", &[("op", "set")]) >= 50.0);
    assert_eq!(s.value("jetsaga_nats_connected", &[]), 1.0);
    assert_eq!(s.value("jetsaga_nats_reconnects_total", &[]), 0.0);
    // HTTP: by matched route template and status, never a saga type or id in the route.
    // One path shape serves start (POST, a type) and get (GET, an id): matchit needs one name.
    let route = ("route", "/v1/sagas/{id}");
    let post = ("method", "POST");
    assert_eq!(
        s.value(
            "jetsaga_http_requests_total",
            &[post, route, ("status", "201")]
        ),
        50.0
    );
    assert_eq!(
        s.value(
            "jetsaga_http_requests_total",
            &[post, route, ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        s.value(
            "jetsaga_http_requests_total",
            &[post, route, ("status", "404")]
        ),
        1.0
    );
    assert!(
        s.value(
            "jetsaga_http_requests_total",
            &[("method", "GET"), ("route", "/metrics"), ("status", "200")]
        ) >= 2.0
    );
    assert!(
        !s.0.keys()
            .any(|k| ids.iter().any(|(id, _, _)| k.contains(id.as_str()))),
        "no saga id in any label"
    );

    // Participants: commands by action and result, handler durations, nothing in flight.
    let inv = scrape(&inventory_addr, promtool).await;
    let pay = scrape(&payment_addr, promtool).await;
    let commands = |s: &Scrape, p: &str, action: &str, result: &str| {
        s.get(
            "jetsaga_participant_commands_total",
            &[("participant", p), ("action", action), ("result", result)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(commands(&inv, "inventory", "reserve", "ok"), 50.0);
    assert_eq!(commands(&inv, "inventory", "release", "ok"), 5.0);
    assert_eq!(commands(&inv, "inventory", "commit", "ok"), 44.0);
    assert!(commands(&inv, "inventory", "unknown", "failed") >= 1.0);
    assert_eq!(commands(&pay, "payment", "charge", "ok"), 44.0);
    assert_eq!(commands(&pay, "payment", "charge", "failed"), 6.0);
    assert_eq!(
        inv.value(
            "jetsaga_participant_handler_duration_seconds_count",
            &[("participant", "inventory"), ("action", "reserve")]
        ),
        50.0
    );
    for (s, p) in [(&inv, "inventory"), (&pay, "payment")] {
        assert_eq!(
            s.value(
                "jetsaga_participant_commands_in_flight",
                &[("participant", p)]
            ),
            0.0
        );
        assert_eq!(
            s.value("jetsaga_participant_nats_connected", &[("participant", p)]),
            1.0
        );
        assert_eq!(
            s.value(
                "jetsaga_participant_nats_reconnects_total",
                &[("participant", p)]
            ),
            0.0
        );
    }
    assert_eq!(
        inv.value(
            "jetsaga_participant_duplicates_total",
            &[("participant", "inventory"), ("action", "reserve")]
        ),
        0.0
    );

    token.cancel();
    for task in participants {
        tokio::time::timeout(WAIT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    running.shutdown().await;
}
