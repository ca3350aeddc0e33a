//! A saga type defined only in files — a TOML definition and JSON Schemas beside it —
//! runs end to end with no Rust change in the engine, and a start that breaks its
//! input schema is refused with every violation named, over every entry point.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use jetsaga_orchestrator::{ApiError, Started};
use jetsaga_sagas::protocol::{self, Body, Outcome};
use jetsaga_sagas::{Phase, StepStatus};
use jetsaga_testkit::{NatsServer, wait_until};
use serde_json::{Value, json};

const SHIP_PARCEL: &str = r#"
name = "ship-parcel"
version = 1
description = "Book a courier, print the label (the pivot), tell the customer."
input-schema = "ship-parcel.input.schema.json"
deadline = "1m"
[events]
completed = ["parcel.shipped"]
compensated = ["parcel.cancelled"]
[[steps]]
name = "book-courier"
participant = "courier"
action = "book"
compensation = "cancel"
kind = "compensatable"
timeout = "5s"
result-schema = { type = "object", required = ["booking"], properties.booking = { type = "string", pattern = "^b-" } }
[[steps]]
name = "print-label"
participant = "labels"
action = "print"
kind = "pivot"
timeout = "5s"
[[steps]]
name = "notify"
participant = "courier"
action = "notify"
kind = "retriable"
timeout = "5s"
"#;

const SHIP_PARCEL_INPUT: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["parcel_id", "weight_grams", "destination"],
  "additionalProperties": false,
  "properties": {
    "parcel_id": {"type": "string", "pattern": "^p-[0-9]+$"},
    "weight_grams": {"type": "integer", "minimum": 1, "maximum": 30000},
    "destination": {
      "type": "object",
      "required": ["country", "postcode"],
      "properties": {
        "country": {"type": "string", "pattern": "^[A-Z]{2}$"},
        "postcode": {"type": "string", "minLength": 1}
      }
    }
  }
}"#;

fn parcel(id: &str) -> Value {
    json!({"parcel_id": id, "weight_grams": 1200,
        "destination": {"country": "PT", "postcode": "1000-001"}})
}

/// Breaks three rules at once: a bad weight, a bad country and a missing id.
fn bad_parcel() -> Value {
    json!({"weight_grams": 0, "destination": {"country": "Portugal", "postcode": "1000-001"}})
}

const BAD_PATHS: [&str; 3] = ["/weight_grams", "/destination/country", "/: \"parcel_id\""];

/// The courier books with a booking reference, except for parcel `p-666` whose
/// booking answer breaks the result schema; labels always print.
fn courier() -> Behaviour {
    Arc::new(|c: &protocol::Command| {
        let result = match (c.action.as_str(), c.input["parcel_id"].as_str()) {
            ("book", Some("p-666")) => json!({"booking": 42}),
            ("book", _) => json!({"booking": format!("b-{}", c.saga_id)}),
            _ => json!({}),
        };
        vec![Outcome::Ok { result }]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_type_from_files_runs_end_to_end_and_bad_starts_name_every_violation() {
    let server = NatsServer::start();
    let defs = definitions_dir(&[
        ("ship-parcel.toml", SHIP_PARCEL),
        ("ship-parcel.input.schema.json", SHIP_PARCEL_INPUT),
    ]);
    let running = orchestrator(&server.url(), Some(defs.path())).await;
    let handle = running.handle().clone();
    let js = js(&server).await;
    let events = events(&server).await;
    let courier = Responder::start(&js, "courier", courier()).await;
    let labels = Responder::start(&js, "labels", Arc::new(|_: &protocol::Command| ok())).await;

    // Through the handle.
    let Started { saga_id: first, .. } = handle
        .start("ship-parcel", "parcel-1", parcel("p-1"))
        .await
        .unwrap();
    let saga = wait_phase(&handle, &first, Phase::Completed).await;
    assert_eq!(
        saga.steps[0].result,
        Some(json!({"booking": format!("b-{first}")}))
    );
    assert!(saga.steps.iter().all(|s| s.status == StepStatus::Succeeded));
    let actions: Vec<String> = courier
        .commands()
        .iter()
        .chain(labels.commands().iter())
        .filter(|c| c.saga_id == first)
        .map(|c| format!("{}.{}", c.step, c.action))
        .collect();
    assert_eq!(
        actions,
        ["book-courier.book", "notify.notify", "print-label.print"]
    );
    wait_until("parcel.shipped is published", WAIT, || async {
        events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.event == "parcel.shipped" && e.saga_id == first)
    })
    .await;

    // Over HTTP.
    let base = format!("http://{}", running.http_addr());
    let (status, body) = http_post(
        &format!("{base}/v1/sagas/ship-parcel"),
        &json!({"key": "parcel-2", "input": parcel("p-2")}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let second = body["saga_id"].as_str().unwrap().to_owned();
    wait_phase(&handle, &second, Phase::Completed).await;

    // A result that breaks the step's result schema undoes the step.
    let Started {
        saga_id: broken, ..
    } = handle
        .start("ship-parcel", "parcel-666", parcel("p-666"))
        .await
        .unwrap();
    let saga = wait_phase(&handle, &broken, Phase::Compensated).await;
    assert_eq!(saga.steps[0].status, StepStatus::Compensated);
    assert_eq!(
        saga.steps[0].last_error.as_ref().map(|e| e.code.as_str()),
        Some("invalid_result")
    );
    assert!(labels.commands().iter().all(|c| c.saga_id != broken));

    // Bad starts, refused before any step runs, with every violation named.
    let sent_before = courier.commands().len();
    let err = handle
        .start("ship-parcel", "bad-1", bad_parcel())
        .await
        .unwrap_err();
    let ApiError::InvalidInput(message) = &err else {
        panic!("{err:?}")
    };
    for path in BAD_PATHS {
        assert!(message.contains(path), "{path} in {message}");
    }
    assert!(
        handle
            .saga(&jetsaga_orchestrator::driver::saga_id(
                "ship-parcel",
                "bad-1"
            ))
            .await
            .unwrap()
            .is_none()
    );

    let (status, body) = http_post(
        &format!("{base}/v1/sagas/ship-parcel"),
        &json!({"key": "bad-2", "input": bad_parcel()}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_input");
    let message = body["error"]["message"].as_str().unwrap();
    for path in BAD_PATHS {
        assert!(message.contains(path), "{path} in {message}");
    }

    // On the start subject: dead-lettered with the violations as the reason.
    let start = protocol::Start {
        protocol: protocol::VERSION,
        key: "bad-3".into(),
        input: bad_parcel(),
        requested_at: None,
    };
    publish_stored(&js, "saga.start.ship-parcel", start.encode()).await;
    wait_until("the bad start is dead-lettered", WAIT, || async {
        dead_letters(&js)
            .await
            .iter()
            .any(|(_, reason)| BAD_PATHS.iter().all(|p| reason.contains(p)))
    })
    .await;
    assert_eq!(
        courier.commands().len(),
        sent_before,
        "no bad start ran a step"
    );
    running.shutdown().await;
}

/// A minimal HTTP/1.1 POST of a JSON body over a real socket; the status and the
/// JSON answer.
async fn http_post(url: &str, body: &Value) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap();
    let body = body.to_string();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
    let json = response
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}
