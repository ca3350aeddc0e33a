//! Crash safety: the real `jetsaga serve` binary killed with SIGKILL and restarted.

#![allow(clippy::unwrap_used)]

// The orchestrator's own test helpers, shared rather than copied.
#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use jetsaga_orchestrator::store::Store;
use jetsaga_sagas::protocol::{self, Body};
use jetsaga_sagas::{Cause, Phase, StepStatus};
use jetsaga_testkit::{ChildGuard, NatsServer, cargo_bin, wait_until};

fn serve(url: &str, definitions: Option<&std::path::Path>) -> ChildGuard {
    let mut command = Command::new(cargo_bin("jetsaga"));
    command
        .arg("serve")
        .env("JETSAGA_NATS__URL", url)
        .env("JETSAGA_HTTP__LISTEN", "127.0.0.1:0")
        .env("JETSAGA_ENGINE__ACK_WAIT", "2s")
        .env("JETSAGA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(dir) = definitions {
        // Its steps wait up to 10 minutes: their commands must be kept longer.
        command
            .env("JETSAGA_ENGINE__DEFINITIONS", dir)
            .env("JETSAGA_STREAMS__COMMAND_TTL", "1h");
    }
    ChildGuard::spawn(command).expect("jetsaga serve starts")
}

/// order-creation with timeouts far beyond the test's length: any extra attempt a
/// participant sees can then only come from a crash, never from a slow machine.
fn patient_order() -> tempfile::TempDir {
    let text = jetsaga_orchestrator::definitions::ORDER_CREATION
        .replace("name = \"order-creation\"", "name = \"patient-order\"")
        .replace("timeout = \"10s\"", "timeout = \"10m\"")
        .replace("deadline = \"5m\"", "deadline = \"1h\"");
    assert!(text.contains("patient-order") && !text.contains("timeout = \"10s\""));
    definitions_dir(&[("patient.toml", &text), order_schema_file()])
}

async fn phase_of(store: &Store, id: &str) -> Option<Phase> {
    store
        .load(id, false)
        .await
        .expect("the journal can be read")
        .map(|s| s.record.saga.phase())
}

/// Waits until the orchestrator child has created every stream and consumer.
async fn wait_provisioned(js: &async_nats::jetstream::Context) {
    wait_until(
        "the orchestrator provisioned its streams and consumers",
        WAIT,
        || async {
            for spec in jetsaga_sagas::streams::ALL {
                if js.get_stream(spec.name).await.is_err() {
                    return false;
                }
            }
            let Ok(timers) = js.get_stream(jetsaga_sagas::streams::TIMERS.name).await else {
                return false;
            };
            timers
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                    jetsaga_orchestrator::provision::TIMERS_CONSUMER,
                )
                .await
                .is_ok()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_three_times_during_a_thousand_sagas_loses_nothing() {
    let server = NatsServer::start();
    let defs = patient_order();
    let mut orchestrator = serve(&server.url(), Some(defs.path()));
    let js = js(&server).await;
    wait_provisioned(&js).await;
    let by_card = by_card();
    let inventory = Responder::start(&js, "inventory", by_card.clone()).await;
    let payment = Responder::start(&js, "payment", by_card).await;

    const SAGAS: usize = 1000;
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            for i in 0..SAGAS {
                let start = protocol::Start {
                    protocol: protocol::VERSION,
                    key: format!("crash-{i}"),
                    input: order(if i % 10 == 0 { "tok_decline" } else { "tok_ok" }),
                    requested_at: None,
                };
                publish_stored(&js, "saga.start.patient-order", start.encode()).await;
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    for threshold in [150, 400, 650] {
        wait_until(&format!("{threshold} sagas have charged"), WAIT, || async {
            payment.commands().len() >= threshold
        })
        .await;
        orchestrator.kill().unwrap();
        orchestrator = serve(&server.url(), Some(defs.path()));
    }
    publisher.await.unwrap();

    let store = Store::new(js.clone()).await.unwrap();
    let ids: Vec<String> = (0..SAGAS)
        .map(|i| jetsaga_orchestrator::driver::saga_id("patient-order", &format!("crash-{i}")))
        .collect();
    let mut remaining = ids.clone();
    let give_up = std::time::Instant::now() + Duration::from_secs(240);
    while !remaining.is_empty() {
        let mut still = Vec::new();
        for id in remaining {
            if !phase_of(&store, &id).await.is_some_and(Phase::is_finished) {
                still.push(id);
            }
        }
        remaining = still;
        if !remaining.is_empty() && std::time::Instant::now() > give_up {
            for id in remaining.iter().take(5) {
                let record = store.load(id, false).await.unwrap().map(|s| s.record);
                eprintln!("unfinished {id}: {record:#?}");
            }
            panic!("{} sagas did not finish", remaining.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let inventory = inventory.distinct_by_saga();
    let payment = payment.distinct_by_saga();
    for (i, id) in ids.iter().enumerate() {
        let record = store.load(id, false).await.unwrap().unwrap().record;
        let declined = i % 10 == 0;
        let expected = if declined {
            Phase::Compensated
        } else {
            Phase::Completed
        };
        assert_eq!(record.saga.phase(), expected, "saga {i}");
        // Participants saw exactly the commands of one run (duplicates share the id).
        let inv = &inventory[id];
        if declined {
            assert_eq!(
                inv,
                &vec![
                    format!("{id}:reserve-stock:do:1"),
                    format!("{id}:reserve-stock:undo:1")
                ],
                "saga {i}"
            );
            assert_eq!(record.saga.steps[1].status, StepStatus::Failed);
        } else {
            assert_eq!(
                inv,
                &vec![
                    format!("{id}:reserve-stock:do:1"),
                    format!("{id}:confirm-order:do:1")
                ],
                "saga {i}"
            );
        }
        assert_eq!(
            payment[id],
            vec![format!("{id}:take-payment:do:1")],
            "saga {i}"
        );
        // No transition was applied twice.
        let history = store.history(id).await.unwrap();
        let mut seen = HashSet::new();
        for entry in history
            .iter()
            .filter(|e| !matches!(e.cause, Cause::Ignored | Cause::Resent))
        {
            assert!(
                seen.insert((entry.cause, entry.step.clone(), entry.command_id.clone())),
                "saga {i}: {history:?}"
            );
        }
        assert_eq!(
            history.iter().filter(|e| e.cause == Cause::Start).count(),
            1
        );
    }
    drop(orchestrator);
}

const SLOW_TIMEOUT: &str = r#"
name = "timeout-order"
version = 1
input-schema = "order-creation.input.schema.json"
deadline = "1m"
[[steps]]
name = "reserve-stock"
participant = "inventory"
action = "reserve"
compensation = "release"
kind = "compensatable"
timeout = "5s"
[[steps]]
name = "take-payment"
participant = "payment"
action = "charge"
compensation = "refund"
kind = "pivot"
timeout = "2s"
retry = { max-attempts = 1 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_that_expires_while_the_orchestrator_is_down_fires_after_restart() {
    let server = NatsServer::start();
    let defs = definitions_dir(&[("timeout.toml", SLOW_TIMEOUT), order_schema_file()]);
    let mut orchestrator = serve(&server.url(), Some(defs.path()));
    let js = js(&server).await;
    wait_provisioned(&js).await;
    let inventory =
        Responder::start(&js, "inventory", Arc::new(|_c: &protocol::Command| ok())).await;
    let payment = Responder::start(
        &js,
        "payment",
        Arc::new(|c: &protocol::Command| if c.action == "charge" { vec![] } else { ok() }),
    )
    .await;
    let start = protocol::Start {
        protocol: protocol::VERSION,
        key: "t-1".into(),
        input: order("tok_ok"),
        requested_at: None,
    };
    publish_stored(&js, "saga.start.timeout-order", start.encode()).await;
    wait_until("the charge is out", WAIT, || async {
        !payment.commands().is_empty()
    })
    .await;
    orchestrator.kill().unwrap();
    let charged_at = std::time::Instant::now();
    // Let the 2 s step timeout pass while no orchestrator runs.
    wait_until("the step timeout has passed", WAIT, || async {
        charged_at.elapsed() > Duration::from_secs(3)
    })
    .await;
    let store = Store::new(js.clone()).await.unwrap();
    let id = jetsaga_orchestrator::driver::saga_id("timeout-order", "t-1");
    assert_eq!(
        phase_of(&store, &id).await,
        Some(Phase::Running),
        "nothing moves while it is down"
    );

    let _orchestrator = serve(&server.url(), Some(defs.path()));
    wait_until("the saga is compensated", WAIT, || async {
        phase_of(&store, &id).await == Some(Phase::Compensated)
    })
    .await;
    let history = store.history(&id).await.unwrap();
    assert!(history.iter().any(|e| e.cause == Cause::StepTimeout));
    let refunds = payment
        .commands()
        .iter()
        .filter(|c| c.action == "refund")
        .count();
    let releases = inventory
        .commands()
        .iter()
        .filter(|c| c.action == "release")
        .count();
    assert_eq!((refunds, releases), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_and_a_restart_finishes_the_rest() {
    let server = NatsServer::start();
    let mut orchestrator = serve(&server.url(), None);
    let js = js(&server).await;
    wait_provisioned(&js).await;
    let _inventory =
        Responder::start(&js, "inventory", Arc::new(|_c: &protocol::Command| ok())).await;
    let payment = Responder::start(&js, "payment", Arc::new(|_c: &protocol::Command| ok())).await;
    let ids: Vec<String> = (0..300)
        .map(|i| jetsaga_orchestrator::driver::saga_id("order-creation", &format!("term-{i}")))
        .collect();
    for i in 0..300 {
        let start = protocol::Start {
            protocol: protocol::VERSION,
            key: format!("term-{i}"),
            input: order("tok_ok"),
            requested_at: None,
        };
        publish_stored(&js, "saga.start.order-creation", start.encode()).await;
    }
    wait_until("sagas are under way", WAIT, || async {
        payment.commands().len() >= 50
    })
    .await;
    orchestrator.terminate().unwrap();
    let status = orchestrator
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the orchestrator exits within its grace period");
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");

    let _orchestrator = serve(&server.url(), None);
    let store = Store::new(js.clone()).await.unwrap();
    for id in &ids {
        wait_until(&format!("saga {id} completes"), WAIT, || async {
            phase_of(&store, id).await == Some(Phase::Completed)
        })
        .await;
        let history = store.history(id).await.unwrap();
        assert_eq!(
            history
                .iter()
                .filter(|e| !matches!(e.cause, Cause::Ignored | Cause::Resent))
                .count(),
            4,
            "{history:?}"
        );
    }
}
