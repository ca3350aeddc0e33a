//! The operator commands of the `jetsaga` binary against a running orchestrator
//! (real HTTP, real nats-server): tables, `--json`, exit codes.

#![allow(clippy::unwrap_used)]

#[path = "../../tests/common/mod.rs"]
mod common;

use common::*;
use jetsaga_orchestrator::Service;
use jetsaga_orchestrator::config::{Role, Token};
use jetsaga_sagas::Phase;
use jetsaga_testkit::{NatsServer, cargo_bin, wait_until};
use serde_json::Value;

const TOKEN: &str = "cli-operate-token-0123456789";

async fn jetsaga(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(ToString::to_string).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(cargo_bin("jetsaga"))
            .args(&args)
            .env_remove("JETSAGA_TOKEN")
            .env_remove("JETSAGA_SERVER")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_use_the_api_from_the_command_line() {
    let server = NatsServer::start();
    let mut config = config(&server.url(), None);
    config.http.tokens = vec![Token {
        name: "cli".into(),
        role: Role::Operate,
        token: Some(TOKEN.into()),
        token_file: None,
    }];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = Service::start_with_listener(config, listener)
        .await
        .unwrap();
    let handle = running.handle().clone();
    let js = js(&server).await;
    let _inventory = Responder::start(&js, "inventory", by_card()).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;
    let id = start(&handle, "cli-order-1", order("tok_ok")).await;
    wait_phase(&handle, &id, Phase::Completed).await;
    let url = format!("http://{}", running.http_addr());
    let auth = ["--server", url.as_str(), "--token", TOKEN];
    let with = |args: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(ToString::to_string).collect();
        all.extend(auth.iter().map(ToString::to_string));
        all
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        jetsaga(&refs).await
    };

    let (code, out, err) = run(with(&[
        "sagas",
        "show",
        "--key",
        "order-creation",
        "cli-order-1",
    ]))
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&id) && out.contains("completed"), "{out}");
    assert!(
        out.contains("reserve-stock") && out.contains("start"),
        "the timeline: {out}"
    );

    let (code, out, err) = run(with(&["sagas", "get", &id, "--json"])).await;
    assert_eq!(code, 0, "{out}{err}");
    let json: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(json["saga"]["saga_id"], id.as_str());
    assert!(json["journal"].as_array().unwrap().len() >= 4);

    let (code, out, err) = run(with(&["sagas", "journal", &id])).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("reply_ok"), "{out}");

    // The saga is completed: neither action applies (exit 4), and the state is named.
    let (code, _, err) = run(with(&["sagas", "retry", &id])).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("completed"), "{err}");
    let (code, _, err) = run(with(&["sagas", "abort", &id, "--reason", "test"])).await;
    assert_eq!(code, 4, "{err}");

    let (code, out, err) = run(with(&["definitions"])).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("order-creation") && out.contains("take-payment (pivot)"),
        "{out}"
    );

    let (code, out, err) = run(with(&["dead-letters", "list", "--json"])).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap()["items"],
        Value::Array(vec![])
    );
    let (code, _, err) = run(with(&["dead-letters", "redrive", "12345"])).await;
    assert_eq!(code, 3, "{err}");

    wait_until("the listing shows the saga", WAIT, || async {
        let (code, out, _) = run(with(&["sagas", "list", "--state", "completed"])).await;
        code == 0 && out.contains(&id)
    })
    .await;

    // Wrong or missing token: 77; bad usage: 64; nobody listening: 69.
    let missing = protocol_id();
    let (code, _, err) = jetsaga(&["sagas", "show", &missing, "--server", &url]).await;
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("unauthenticated"), "{err}");
    let (code, _, err) = jetsaga(&[
        "sagas",
        "show",
        &missing,
        "--server",
        &url,
        "--token",
        "wrong-token-0123456789",
    ])
    .await;
    assert_eq!(code, 77, "{err}");
    let (code, _, err) = run(with(&["sagas", "show", &missing])).await;
    assert_eq!(code, 3, "{err}");
    let (code, _, _) = jetsaga(&["sagas", "abort", "x"]).await;
    assert_eq!(code, 64, "--reason is required");
    running.shutdown().await;
    let (code, _, err) = jetsaga(&["sagas", "list", "--server", &url]).await;
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
}

fn protocol_id() -> String {
    jetsaga_sagas::protocol::saga_id("order-creation", "never-started")
}
