//! The shipped NATS configuration (`deploy/nats/nats.conf` with its `users.conf`) really
//! enforces least privilege, and the whole system still works under it.
//!
//! One nats-server runs the shipped file (on a free port and a temporary store); the
//! orchestrator and the three reference participants run as the real binaries, each with its
//! own user, and `jetsaga bench` starts order sagas as the `client` user. Then the inventory
//! user is shown what it may not do: publish a payment reply, consume payment commands, read
//! the payment bucket, delete a stream.
//!
//! The binaries must be built first (`deploy/test.sh` builds every workspace binary).

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use jetsaga_testkit::{ChildGuard, NatsServer, cargo_bin, wait_until};

/// Generous bound for set-up on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(60);
/// How long one refused JetStream API request may take to give up.
const REFUSED: Duration = Duration::from_secs(3);
const SAGAS: u64 = 40;

/// The users of `deploy/nats/users.conf` and the passwords this test gives them.
const USERS: [&str; 6] = [
    "orchestrator",
    "inventory",
    "payment",
    "notification",
    "client",
    "admin",
];

fn password(user: &str) -> String {
    format!("test-secret-of-{user}")
}

fn shipped(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/nats")
        .join(file)
}

fn server() -> NatsServer {
    let env = USERS.iter().map(|u| {
        (
            format!("JETSAGA_{}_PASSWORD", u.to_uppercase()),
            password(u),
        )
    });
    NatsServer::try_start_with_file(shipped("nats.conf"), env)
        .unwrap_or_else(|e| panic!("the shipped nats.conf does not start: {e}"))
}

async fn connect(server: &NatsServer, user: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.to_owned(), password(user))
        .connect(server.url())
        .await
        .unwrap_or_else(|e| panic!("{user} cannot connect: {e}"))
}

/// A service binary connected as `user` (participants without a metrics endpoint).
fn service(
    server: &NatsServer,
    binary: &str,
    user: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> ChildGuard {
    let mut command = Command::new(cargo_bin(binary));
    command
        .args(args)
        .envs(env.iter().copied())
        .env("JETSAGA_NATS__URL", server.url())
        .env("JETSAGA_NATS__USER", user)
        .env("JETSAGA_NATS__PASSWORD", password(user))
        .stdout(Stdio::null());
    if binary != "jetsaga" {
        command
            .env("JETSAGA_METRICS__LISTEN", "")
            .env("JETSAGA_TELEMETRY__LOG_FILTER", "warn");
    }
    ChildGuard::spawn(command).unwrap_or_else(|e| panic!("cannot start {binary}: {e}"))
}

/// A JetStream context that gives up on a refused (unanswered) request after [`REFUSED`].
fn refusing(client: async_nats::Client, timeout: Duration) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(timeout)
        .build(client)
}

fn free_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// Whether `GET path` on `address` answers 200.
fn http_ok(address: &str, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(address) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

async fn wait_consumer(js: &jetstream::Context, stream: &str, name: &str) {
    wait_until(&format!("consumer {name} exists"), PATIENCE, || async {
        match js.get_stream(stream).await {
            Ok(s) => s.consumer_info(name).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
}

async fn wait_violation(server: &NatsServer, subject: &str) {
    wait_until(
        &format!("the server logs a permissions violation on {subject}"),
        PATIENCE,
        || async {
            server
                .log()
                .lines()
                .any(|l| l.contains(" Violation - ") && l.contains(subject))
        },
    )
    .await;
}

fn violations(server: &NatsServer) -> Vec<String> {
    server
        .log()
        .lines()
        .filter(|l| l.contains(" Violation - "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_users_run_order_sagas_and_nothing_more() {
    let server = server();
    let admin = jetstream::new(connect(&server, "admin").await);

    // The whole system, each service as its own user.
    let http = free_address();
    let mut orchestrator = service(
        &server,
        "jetsaga",
        "orchestrator",
        &["serve"],
        &[("JETSAGA_HTTP__LISTEN", &http)],
    );
    wait_until("the orchestrator is ready", PATIENCE, || async {
        http_ok(&http, "/readyz")
    })
    .await;
    let _participants = [
        service(&server, "jetsaga-inventory", "inventory", &[], &[]),
        service(&server, "jetsaga-payment", "payment", &[], &[]),
        service(&server, "jetsaga-notification", "notification", &[], &[]),
    ];
    wait_consumer(&admin, "JETSAGA_COMMANDS", "participant-inventory").await;
    wait_consumer(&admin, "JETSAGA_COMMANDS", "participant-payment").await;
    wait_consumer(&admin, "JETSAGA_EVENTS", "notification").await;

    // Order sagas end to end, started by an application user on the start subject (as
    // `jetsaga bench` does; bench itself cannot log in yet: it takes no credentials).
    let client = connect(&server, "client").await;
    let mut events = client.subscribe("saga.event.order.>").await.unwrap();
    client.flush().await.unwrap();
    let starter = jetstream::new(client.clone());
    let run = std::process::id();
    for i in 0..SAGAS {
        let key = format!("perm-{run}-{i}");
        let decline = i % 5 == 0;
        let body = serde_json::json!({
            "protocol": 1,
            "key": key,
            "input": {
                "customer_id": format!("c-{i}"),
                "email": format!("customer{i}@example.com"),
                "items": [{"sku": format!("sku-{}", i % 5 + 1), "quantity": 1}],
                "amount_cents": 1000 + i,
                "currency": "EUR",
                "card_token": if decline { "tok_decline" } else { "tok_ok" },
            },
        });
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", key.as_str());
        starter
            .publish_with_headers(
                "saga.start.order-creation",
                headers,
                body.to_string().into(),
            )
            .await
            .unwrap()
            .await
            .expect("the client user may start sagas");
    }
    let mut outcomes = std::collections::BTreeMap::new();
    let collected = tokio::time::timeout(Duration::from_secs(300), async {
        while outcomes.len() < SAGAS as usize {
            let Some(message) = events.next().await else {
                break;
            };
            let event: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            let key = event["key"].as_str().unwrap_or_default().to_owned();
            if key.starts_with(&format!("perm-{run}-")) {
                outcomes.insert(key, message.subject.to_string());
            }
        }
    })
    .await;
    assert!(
        collected.is_ok(),
        "only {} of {SAGAS} sagas finished; server log:\n{}",
        outcomes.len(),
        violations(&server).join("\n")
    );
    let cancelled = outcomes
        .values()
        .filter(|s| s.as_str() == "saga.event.order.cancelled")
        .count();
    let confirmed = outcomes
        .values()
        .filter(|s| s.as_str() == "saga.event.order.confirmed")
        .count();
    assert_eq!(
        (confirmed, cancelled),
        (32, 8),
        "declined orders are cancelled, the rest confirmed"
    );
    // Each notification is recorded in the notification user's own bucket.
    wait_until("the notification bucket holds emails", PATIENCE, || async {
        match admin.get_stream("KV_jetsaga_notification").await {
            Ok(mut s) => s.info().await.is_ok_and(|i| i.state.messages >= SAGAS),
            Err(_) => false,
        }
    })
    .await;
    assert_eq!(
        violations(&server),
        Vec::<String>::new(),
        "a service needed a subject the shipped config does not grant"
    );
    assert!(orchestrator.try_wait().unwrap().is_none(), "it still runs");

    // What the inventory user may not do.
    let inventory = connect(&server, "inventory").await;
    let js = refusing(inventory.clone(), REFUSED);

    // Control: its own dead letters are accepted, so refusals below are the permissions.
    js.publish("saga.dead.participant.inventory", "control".into())
        .await
        .unwrap()
        .await
        .expect("inventory may publish its own dead letters");

    // 1. A payment reply (it would forge the payment's answer).
    let forged = "saga.reply.payment.forged-by-inventory";
    let published = js.publish(forged, "{}".into()).await;
    if let Ok(ack) = published {
        assert!(ack.await.is_err(), "a forged payment reply was stored");
    }
    wait_violation(&server, forged).await;
    let replies = admin.get_stream("JETSAGA_REPLIES").await.unwrap();
    assert!(
        replies.direct_get_last_for_subject(forged).await.is_err(),
        "no forged reply is in the stream"
    );

    // 2. Payment commands (through a consumer filtered on them).
    let commands = admin.get_stream("JETSAGA_COMMANDS").await.unwrap();
    let stream = refusing(inventory.clone(), REFUSED)
        .get_stream("JETSAGA_COMMANDS")
        .await
        .expect("inventory may look up the commands stream");
    let stolen = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("participant-inventory".to_owned()),
            filter_subject: "saga.cmd.payment.>".to_owned(),
            ..Default::default()
        })
        .await;
    assert!(stolen.is_err(), "inventory consumed payment commands");
    wait_violation(
        &server,
        "JETSAGA_COMMANDS.participant-inventory.saga.cmd.payment",
    )
    .await;
    let own = commands
        .consumer_info("participant-inventory")
        .await
        .unwrap();
    assert_eq!(own.config.filter_subject, "saga.cmd.inventory.>");

    // 3. The payment bucket.
    assert!(
        js.get_key_value("jetsaga_payment").await.is_err(),
        "inventory opened the payment bucket"
    );
    wait_violation(&server, "KV_jetsaga_payment").await;
    let raw = inventory
        .request(
            "$JS.API.DIRECT.GET.KV_jetsaga_payment.$KV.jetsaga_payment.anything",
            "".into(),
        )
        .await;
    assert!(raw.is_err(), "inventory read a payment record: {raw:?}");

    // 4. Deleting a stream.
    assert!(
        js.delete_stream("JETSAGA_JOURNAL").await.is_err(),
        "inventory deleted a stream"
    );
    wait_violation(&server, "$JS.API.STREAM.DELETE.JETSAGA_JOURNAL").await;
    assert!(admin.get_stream("JETSAGA_JOURNAL").await.is_ok());

    // No service user may delete a stream either, the orchestrator included.
    for user in ["orchestrator", "payment", "notification", "client"] {
        let js = refusing(connect(&server, user).await, REFUSED);
        assert!(
            js.delete_stream("JETSAGA_COMMANDS").await.is_err(),
            "{user} deleted a stream"
        );
    }
    assert!(admin.get_stream("JETSAGA_COMMANDS").await.is_ok());

    // Without a password, or with another user's, nobody gets in.
    assert!(async_nats::connect(server.url()).await.is_err());
    let wrong = async_nats::ConnectOptions::with_user_and_password(
        "inventory".to_owned(),
        password("payment"),
    )
    .connect(server.url())
    .await;
    assert!(
        wrong.is_err(),
        "inventory logged in with payment's password"
    );
}
