//! The `jetsaga` binary's command line: validate, config errors, bench reporting.

#![allow(clippy::unwrap_used)]

// The orchestrator's own test helpers, shared rather than copied.
#[path = "../../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use jetsaga_sagas::protocol;
use jetsaga_testkit::{NatsServer, cargo_bin};

fn jetsaga(args: &[&str]) -> (i32, String) {
    let out = Command::new(cargo_bin("jetsaga"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Runs `jetsaga ARGS` off the async threads (the system under test runs on them).
async fn jetsaga_blocking(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(cargo_bin("jetsaga"))
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[test]
fn validate_reports_ok_or_every_problem() {
    let shipped = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../sagas/definitions/order-creation.toml"
    );
    let (code, out) = jetsaga(&["validate", shipped]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\nversion = 1\ndeadline = \"1m\"\n[[steps]]\nname = \"a b\"\nparticipant = \"p\"\naction = \"do\"\nkind = \"compensatable\"\ntimeout = \"0s\"\n",
    )
    .unwrap();
    let (code, out) = jetsaga(&["validate", shipped, bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("bad.toml: step \"a b\": name \"a b\" is not a valid NATS subject token"),
        "{out}"
    );
    assert!(
        out.contains("bad.toml: step \"a b\": a compensatable step needs a compensation"),
        "{out}"
    );
    assert!(out.contains("timeout must be greater than zero"), "{out}");
    // A definition whose schema file is broken: the file and the problem are named.
    let with_schema = dir.path().join("with-schema.toml");
    std::fs::write(
        &with_schema,
        "name = \"x\"\nversion = 1\ndeadline = \"1m\"\ninput-schema = \"x.schema.json\"\n[[steps]]\nname = \"a\"\nparticipant = \"p\"\naction = \"do\"\ncompensation = \"undo\"\nkind = \"compensatable\"\ntimeout = \"1s\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("x.schema.json"),
        r#"{"type": "object", "properties": {"n": {"type": "number", "minimum": "one"}}}"#,
    )
    .unwrap();
    let (code, out) = jetsaga(&["validate", with_schema.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "with-schema.toml: input-schema \"x.schema.json\": not a valid JSON Schema at /properties/n/minimum"
        ),
        "{out}"
    );
    std::fs::write(dir.path().join("x.schema.json"), r#"{"type": "object"}"#).unwrap();
    let (code, out) = jetsaga(&["validate", with_schema.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    std::fs::remove_file(dir.path().join("x.schema.json")).unwrap();
    let (code, out) = jetsaga(&["validate", with_schema.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("with-schema.toml: input-schema \"x.schema.json\": cannot read"),
        "{out}"
    );

    let (code, out) = jetsaga(&["validate", "/no/such/file.toml"]);
    assert_eq!(code, 1);
    assert!(out.contains("cannot read"), "{out}");
    assert_eq!(jetsaga(&["validate"]).0, 64);
    assert_eq!(jetsaga(&["frobnicate"]).0, 64);
}

#[test]
fn every_subcommand_prints_help() {
    for (args, expected) in [
        (vec!["--help"], "Usage: jetsaga <COMMAND>"),
        (vec!["help"], "Usage: jetsaga <COMMAND>"),
        (vec!["serve", "--help"], "Usage: jetsaga serve [OPTIONS]"),
        (
            vec!["validate", "--help"],
            "Usage: jetsaga validate <FILE>...",
        ),
        (vec!["bench", "--help"], "Usage: jetsaga bench [OPTIONS]"),
        (vec!["help", "bench"], "Usage: jetsaga bench [OPTIONS]"),
    ] {
        let (code, out) = jetsaga(&args);
        assert_eq!(code, 0, "{args:?}: {out}");
        assert!(out.contains(expected), "{args:?}: {out}");
    }
    let (_, out) = jetsaga(&["serve", "--help"]);
    assert!(out.contains("JETSAGA_CONFIG"), "{out}");
    let (_, out) = jetsaga(&["bench", "--help"]);
    for flag in [
        "--nats",
        "--via",
        "--sagas",
        "--rate",
        "--timeout",
        "--json",
    ] {
        assert!(out.contains(flag), "{flag}: {out}");
    }
    let (code, out) = jetsaga(&[]);
    assert_eq!(code, 64, "no command is a usage error: {out}");
    assert!(out.contains("Usage: jetsaga <COMMAND>"), "{out}");
}

#[test]
fn invalid_config_exits_64_naming_the_field() {
    let out = Command::new(cargo_bin("jetsaga"))
        .arg("serve")
        .env("JETSAGA_STREAMS__REPLICAS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("streams.replicas"));
    let out = Command::new(cargo_bin("jetsaga"))
        .args(["serve", "--config", "/no/such.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    // The file may also come from JETSAGA_CONFIG.
    let out = Command::new(cargo_bin("jetsaga"))
        .arg("serve")
        .env("JETSAGA_CONFIG", "/no/such-from-env.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such-from-env.toml"));
    // A bad worker-thread count, for the service and for the tools.
    for args in [&["serve"][..], &["bench", "--sagas", "1"]] {
        let out = Command::new(cargo_bin("jetsaga"))
            .args(args)
            .env("TOKIO_WORKER_THREADS", "0")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("TOKIO_WORKER_THREADS=\"0\" is not a number of worker threads"),
            "{args:?}: {stderr}"
        );
    }
    for bad in [
        &["bench", "--rate", "5"][..],
        &["bench", "--timeout", "soon"],
        &["bench", "--frobnicate"],
        &["serve", "--frobnicate"],
    ] {
        assert_eq!(jetsaga(bad).0, 64, "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_json_and_fails_on_unfinished_sagas() {
    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let js = js(&server).await;
    let by_card = by_card();
    let _inventory = Responder::start(&js, "inventory", by_card.clone()).await;
    let payment = Responder::start(&js, "payment", by_card).await;

    let url = server.url();
    let http = running.http_addr().to_string();
    let closed = ["--sagas", "200", "--concurrency", "20"];
    let open = ["--rate", "100", "--duration", "2s"];
    for (via, load) in [("subject", closed), ("http", closed), ("subject", open)] {
        let mut args = vec![
            "bench", "--nats", &url, "--http", &http, "--via", via, "--json",
        ];
        args.extend(load);
        let out = jetsaga_blocking(&args).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(report["sagas"], 200, "{via} {load:?}: {report}");
        assert_eq!(report["completed"], 180);
        assert_eq!(report["compensated"], 20);
        assert_eq!(report["unfinished"], 0);
        assert_eq!(
            report["observed"], 200,
            "every end is observed through its event: {report}"
        );
        assert!(report["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
        assert!(report["throughput_per_s"].as_f64().unwrap() > 0.0);
    }

    // Payment goes silent: the sagas cannot finish within the bench's timeout.
    payment.set(Arc::new(|_c: &protocol::Command| vec![]));
    let out = jetsaga_blocking(&[
        "bench",
        "--nats",
        &url,
        "--sagas",
        "5",
        "--concurrency",
        "5",
        "--timeout",
        "1",
        "--json",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("PROBLEM: 5 sagas did not finish"),
        "{stdout}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["unfinished"], 5);
    running.shutdown().await;
}

/// `--participants builtin`: with no participant running, the load generator's own trivial
/// inventory and payment answer every command, and the outcomes still follow the decline
/// rule (the built-in payment declines exactly the orders marked for decline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_with_builtin_participants_needs_no_participant() {
    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let url = server.url();
    let out = jetsaga_blocking(&[
        "bench",
        "--nats",
        &url,
        "--participants",
        "builtin",
        "--sagas",
        "300",
        "--concurrency",
        "50",
        "--json",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["sagas"], 300, "{report}");
    assert_eq!(report["completed"], 270, "{report}");
    assert_eq!(report["compensated"], 30, "{report}");
    assert_eq!(report["unfinished"], 0, "{report}");

    // Without them (and without any participant) nothing finishes: the built-in ones did the work.
    let url = server.url();
    let out = jetsaga_blocking(&[
        "bench",
        "--nats",
        &url,
        "--sagas",
        "3",
        "--timeout",
        "2",
        "--json",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    running.shutdown().await;
}
