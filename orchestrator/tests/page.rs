//! The operator web page in a real headless Chromium (Debian's `chromium`, see
//! deploy/install-chromium.sh) against a real orchestrator on a real nats-server:
//! the list shows started sagas, filtering to failed works, opening a saga shows
//! its timeline, and retry on a failed saga moves it on to compensated.
//! Screenshots are kept under `target/tmp/page-screenshots/`.

#![allow(clippy::unwrap_used)]

mod common;

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};
use jetsaga_sagas::Phase;
use jetsaga_testkit::NatsServer;

const FAST_ORDER: &str = r#"
name = "fast-order"
version = 1
input-schema = "order-creation.input.schema.json"
deadline = "1m"
[compensation-retry]
max-attempts = 2
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
timeout = "5s"
retry = { max-attempts = 1 }
[[steps]]
name = "confirm-order"
participant = "inventory"
action = "commit"
kind = "retriable"
timeout = "5s"
retry = { initial-backoff = "50ms", max-backoff = "200ms" }
"#;

fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROME") {
        return PathBuf::from(path);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("no chromium found: run deploy/install-chromium.sh (or set CHROME)");
}

/// Evaluates `script` until it returns true.
fn wait_js(tab: &Tab, what: &str, script: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = tab.evaluate(script, false).ok().and_then(|r| r.value);
        if value == Some(serde_json::Value::Bool(true)) {
            return;
        }
        if Instant::now() > deadline {
            screenshot(tab, "timed-out");
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn js(tab: &Tab, script: &str) -> serde_json::Value {
    tab.evaluate(script, false)
        .unwrap()
        .value
        .unwrap_or_default()
}

fn screenshot(tab: &Tab, name: &str) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("page-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_lists_opens_and_retries_sagas_in_a_real_browser() {
    let server = NatsServer::start();
    let defs = definitions_dir(&[("fast.toml", FAST_ORDER), order_schema_file()]);
    let running = orchestrator(&server.url(), Some(defs.path())).await;
    let handle = running.handle().clone();
    let js_ctx = common::js(&server).await;
    let inventory = Responder::start(&js_ctx, "inventory", releases_fail()).await;
    let _payment = Responder::start(&js_ctx, "payment", by_card()).await;
    let completed = handle
        .start("fast-order", "page-ok", order("tok_ok"))
        .await
        .unwrap()
        .saga_id;
    let parked = handle
        .start("fast-order", "page-declined", order("tok_decline"))
        .await
        .unwrap()
        .saga_id;
    wait_phase(&handle, &completed, Phase::Completed).await;
    wait_phase(&handle, &parked, Phase::Failed).await;
    let url = format!("http://{}/", running.http_addr());

    let parked_id = parked.clone();
    let (recovered_tx, recovered_rx) = std::sync::mpsc::channel::<()>();
    let recover = tokio::spawn(async move {
        // The browser thread says when the participant may recover.
        tokio::task::spawn_blocking(move || recovered_rx.recv().unwrap())
            .await
            .unwrap();
        inventory.set(by_card());
    });
    let browser = tokio::task::spawn_blocking(move || {
        let options = LaunchOptions::default_builder()
            .path(Some(chromium()))
            .headless(true)
            .sandbox(false)
            .args(vec![
                OsStr::new("--disable-gpu"),
                OsStr::new("--no-first-run"),
            ])
            .build()
            .unwrap();
        let browser = Browser::new(options).unwrap();
        let tab = browser.new_tab().unwrap();
        tab.navigate_to(&url).unwrap();
        tab.wait_until_navigated().unwrap();

        // The list shows both sagas.
        let both = format!(
            "!!document.querySelector(\"#sagas tr[data-id='{completed}']\") && !!document.querySelector(\"#sagas tr[data-id='{parked}']\")"
        );
        wait_js(&tab, "the list shows the started sagas", &both);
        screenshot(&tab, "1-list");

        // Filtered to failed: only the parked one.
        js(
            &tab,
            "document.getElementById('state').value = 'failed'; document.getElementById('apply').click(); true",
        );
        wait_js(
            &tab,
            "the failed filter",
            &format!(
                "[...document.querySelectorAll('#sagas tr')].map(r => r.dataset.id).join() === '{parked}'"
            ),
        );
        screenshot(&tab, "2-failed");

        // Open it: its state, steps and timeline.
        js(
            &tab,
            &format!("document.querySelector(\"#sagas tr[data-id='{parked}'] a\").click(); true"),
        );
        wait_js(
            &tab,
            "the saga page",
            "!document.getElementById('saga-view').hidden && document.getElementById('saga-state').textContent === 'failed' && document.querySelectorAll('#timeline li').length >= 3",
        );
        let causes = js(
            &tab,
            "[...document.querySelectorAll('#timeline li')].map(l => l.dataset.cause).join()",
        );
        assert!(causes.as_str().unwrap().starts_with("start,"), "{causes}");
        assert_eq!(js(&tab, "document.getElementById('retry').disabled"), false);
        assert_eq!(js(&tab, "document.querySelectorAll('#steps tr').length"), 3);
        screenshot(&tab, "3-saga-failed");

        // The inventory recovers; retry: it moves on to compensated.
        recovered_tx.send(()).unwrap();
        js(&tab, "document.getElementById('retry').click(); true");
        wait_js(
            &tab,
            "the retry is journaled",
            "[...document.querySelectorAll('#timeline li')].some(l => l.dataset.cause === 'operator_retry')",
        );
        let reload = "location.reload(); true";
        let deadline = Instant::now() + WAIT;
        loop {
            if js(
                &tab,
                "document.getElementById('saga-state') && document.getElementById('saga-state').textContent",
            ) == "compensated"
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the saga never showed compensated"
            );
            std::thread::sleep(Duration::from_millis(300));
            js(&tab, reload);
            std::thread::sleep(Duration::from_millis(300));
        }
        assert_eq!(js(&tab, "document.getElementById('retry').disabled"), true);
        screenshot(&tab, "4-saga-compensated");
    });
    browser.await.unwrap();
    recover.await.unwrap();
    let saga = handle.saga(&parked_id).await.unwrap().unwrap();
    assert_eq!(saga.phase(), Phase::Compensated);
    running.shutdown().await;
}
