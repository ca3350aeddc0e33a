//! The operator HTTP API through the real router of an orchestrator on a real
//! nats-server: every route, every error path, the auth matrix and the OpenAPI
//! document.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use common::*;
use http_body_util::BodyExt;
use jetsaga_orchestrator::config::{Role, Token};
use jetsaga_orchestrator::http;
use jetsaga_orchestrator::{Running, Service};
use jetsaga_sagas::protocol;
use jetsaga_sagas::{Phase, State};
use jetsaga_testkit::{NatsServer, wait_until};
use serde_json::{Value, json};
use tower::ServiceExt;

const ANA: &str = "ana-operate-token-0123456789";
const READER: &str = "reader-read-token-0123456789";

fn tokens() -> Vec<Token> {
    vec![
        Token {
            name: "ana".into(),
            role: Role::Operate,
            token: Some(ANA.into()),
            token_file: None,
        },
        Token {
            name: "reader".into(),
            role: Role::Read,
            token: Some(READER.into()),
            token_file: None,
        },
    ]
}

struct Api {
    router: Router,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("not an error body ({}): {}", self.status, self.body))
    }

    /// A 4xx with this code and a message.
    fn is_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.code(), code, "{}", self.body);
        assert!(
            !self.body["error"]["message"].as_str().unwrap().is_empty(),
            "{}",
            self.body
        );
    }
}

impl Api {
    fn new(running: &Running, http: &jetsaga_orchestrator::config::Http) -> Self {
        let settings = http::Settings::from_config(http).unwrap();
        Self {
            router: http::router(running.handle().clone(), settings),
        }
    }

    async fn raw(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Answer {
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(body.into()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![];
        if let Some(b) = &bearer {
            headers.push(("authorization", b.as_str()));
        }
        match body {
            Some(body) => {
                headers.push(("content-type", "application/json"));
                self.raw(method, uri, &headers, body.to_string()).await
            }
            None => self.raw(method, uri, &headers, Body::empty()).await,
        }
    }

    async fn get(&self, uri: &str) -> Answer {
        self.call(Method::GET, uri, Some(ANA), None).await
    }
}

async fn with_tokens(
    url: &str,
    defs: Option<&std::path::Path>,
) -> (Running, jetsaga_orchestrator::config::Http) {
    let mut config = config(url, defs);
    config.http.tokens = tokens();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = config.http.clone();
    (
        Service::start_with_listener(config, listener)
            .await
            .unwrap(),
        http,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_with_stable_codes() {
    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let api = Api::new(&running, &Default::default());
    let json = [("content-type", "application/json")];
    let start = "/v1/sagas/order-creation";

    api.raw(Method::POST, start, &json, "{not json")
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_body");
    api.raw(Method::POST, start, &json, r#"{"key": 7, "input": {}}"#)
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_body");
    api.raw(
        Method::POST,
        start,
        &json,
        r#"{"key": "k", "input": {}, "colour": "red"}"#,
    )
    .await
    .is_error(StatusCode::BAD_REQUEST, "invalid_body");
    api.raw(Method::POST, start, &[], r#"{"key": "k", "input": {}}"#)
        .await
        .is_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    api.raw(
        Method::POST,
        start,
        &[("content-type", "text/plain")],
        r#"{"key": "k", "input": {}}"#,
    )
    .await
    .is_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    let huge = format!(
        r#"{{"key": "k", "input": {{"x": "{}"}}}}"#,
        "x".repeat(300 * 1024)
    );
    api.raw(Method::POST, start, &json, huge)
        .await
        .is_error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    api.raw(
        Method::POST,
        "/v1/sagas/no-such-type",
        &json,
        r#"{"key": "k", "input": {}}"#,
    )
    .await
    .is_error(StatusCode::NOT_FOUND, "unknown_saga_type");
    api.raw(Method::POST, start, &json, r#"{"input": {}}"#)
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_key");
    api.raw(
        Method::POST,
        start,
        &[
            ("content-type", "application/json"),
            ("idempotency-key", "a"),
        ],
        r#"{"key": "b", "input": {}}"#,
    )
    .await
    .is_error(StatusCode::BAD_REQUEST, "invalid_key");
    api.raw(
        Method::POST,
        start,
        &json,
        r#"{"key": "k", "input": {"nope": 1}}"#,
    )
    .await
    .is_error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");

    api.get("/v1/sagas/bad.id")
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_id");
    api.get("/v1/sagas/bad*id/journal")
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_id");
    let missing = protocol::saga_id("order-creation", "never-started");
    api.get(&format!("/v1/sagas/{missing}"))
        .await
        .is_error(StatusCode::NOT_FOUND, "saga_not_found");
    api.get(&format!("/v1/sagas/{missing}/journal"))
        .await
        .is_error(StatusCode::NOT_FOUND, "saga_not_found");
    api.get("/v1/sagas/order-creation/keys/never-started")
        .await
        .is_error(StatusCode::NOT_FOUND, "saga_not_found");
    api.get("/v1/sagas/no-such-type/keys/k")
        .await
        .is_error(StatusCode::NOT_FOUND, "unknown_saga_type");
    api.call(
        Method::POST,
        &format!("/v1/sagas/{missing}/retry"),
        None,
        None,
    )
    .await
    .is_error(StatusCode::NOT_FOUND, "saga_not_found");
    api.call(
        Method::POST,
        &format!("/v1/sagas/{missing}/abort"),
        None,
        Some(json!({"reason": "x"})),
    )
    .await
    .is_error(StatusCode::NOT_FOUND, "saga_not_found");
    api.call(
        Method::POST,
        &format!("/v1/sagas/{missing}/abort"),
        None,
        Some(json!({"reason": ""})),
    )
    .await
    .is_error(StatusCode::BAD_REQUEST, "invalid_body");
    api.call(
        Method::POST,
        &format!("/v1/sagas/{missing}/abort"),
        None,
        Some(json!({})),
    )
    .await
    .is_error(StatusCode::BAD_REQUEST, "invalid_body");

    for query in [
        "limit=0",
        "limit=501",
        "limit=-1",
        "limit=ten",
        "state=bogus",
        "stuck=maybe",
        "updated_before=yesterday",
        "colour=red",
    ] {
        api.get(&format!("/v1/sagas?{query}"))
            .await
            .is_error(StatusCode::BAD_REQUEST, "invalid_query");
    }
    api.get("/v1/sagas?cursor=zzz")
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_cursor");
    api.get("/v1/dead-letters?cursor=zzz")
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_cursor");
    api.get("/v1/dead-letters?limit=0")
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_query");
    api.get("/v1/dead-letters?source=a..b")
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_query");
    api.call(Method::POST, "/v1/dead-letters/abc/redrive", None, None)
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_id");
    api.call(Method::POST, "/v1/dead-letters/0/redrive", None, None)
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_id");
    api.call(Method::POST, "/v1/dead-letters/999/redrive", None, None)
        .await
        .is_error(StatusCode::NOT_FOUND, "dead_letter_not_found");
    api.call(Method::DELETE, "/v1/dead-letters/999", None, None)
        .await
        .is_error(StatusCode::NOT_FOUND, "dead_letter_not_found");

    api.get("/v1/nothing-here")
        .await
        .is_error(StatusCode::NOT_FOUND, "not_found");
    api.call(Method::DELETE, "/v1/sagas", None, None)
        .await
        .is_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_find_by_key_journal_and_definitions() {
    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let api = Api::new(&running, &Default::default());
    let js = js(&server).await;
    let _inventory = Responder::start(&js, "inventory", by_card()).await;
    let _payment = Responder::start(&js, "payment", by_card()).await;

    let body = json!({"input": order("tok_ok")}).to_string();
    let headers = [
        ("content-type", "application/json"),
        ("idempotency-key", "order-77"),
    ];
    let first = api
        .raw(
            Method::POST,
            "/v1/sagas/order-creation",
            &headers,
            body.clone(),
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let id = first.body["saga_id"].as_str().unwrap().to_owned();
    assert_eq!(id, protocol::saga_id("order-creation", "order-77"));
    let location = first.headers["location"].to_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/sagas/{id}"));
    assert_eq!(first.body["created"], true);
    let again = api
        .raw(Method::POST, "/v1/sagas/order-creation", &headers, body)
        .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.body["saga_id"], id.as_str());
    assert_eq!(again.body["created"], false);

    wait_until("the saga completes", WAIT, || async {
        api.get(&location).await.body["state"] == "completed"
    })
    .await;
    let saga = api.get(&location).await;
    assert_eq!(saga.status, StatusCode::OK);
    assert_eq!(saga.body["saga_type"], "order-creation");
    assert_eq!(saga.body["key"], "order-77");
    assert_eq!(saga.body["version"], 1);
    assert_eq!(saga.body["steps"].as_array().unwrap().len(), 3);
    assert_eq!(saga.body["steps"][0]["status"], "succeeded");
    assert_eq!(saga.body["steps"][0]["attempts"], 1);
    assert!(saga.body["steps"][0]["started_at"].is_string());
    assert!(saga.body["created_at"].is_string() && saga.body["deadline_at"].is_string());

    let by_key = api.get("/v1/sagas/order-creation/keys/order-77").await;
    assert_eq!(by_key.status, StatusCode::OK);
    assert_eq!(by_key.body["saga_id"], id.as_str());

    let journal = api.get(&format!("/v1/sagas/{id}/journal")).await;
    assert_eq!(journal.status, StatusCode::OK);
    let entries = journal.body["entries"].as_array().unwrap();
    assert_eq!(entries[0]["cause"], "start");
    assert_eq!(entries[0]["actor"], "orchestrator");
    assert_eq!(entries[0]["to"], "running");
    assert_eq!(entries.last().unwrap()["to"], "completed");
    assert!(entries.iter().any(|e| e["command_id"].is_string()));

    let defs = api.get("/v1/definitions").await;
    assert_eq!(defs.status, StatusCode::OK);
    let def = &defs.body["definitions"][0];
    assert_eq!(def["name"], "order-creation");
    assert_eq!(def["steps"][1]["kind"], "pivot");
    assert!(def["input_schema"].is_object());

    assert_eq!(api.get("/healthz").await.status, StatusCode::OK);
    wait_until("ready", WAIT, || async {
        api.get("/readyz").await.status == StatusCode::OK
    })
    .await;
    let metrics = api.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.body.as_str().unwrap().contains("jetsaga_"));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_are_guarded_journaled_and_refused_with_the_state() {
    let server = NatsServer::start();
    let defs = definitions_dir(&[("fast.toml", FAST_ORDER), order_schema_file()]);
    let (running, http) = with_tokens(&server.url(), Some(defs.path())).await;
    let api = Api::new(&running, &http);
    let handle = running.handle().clone();
    let js = js(&server).await;
    // Releases fail until the inventory "recovers"; charges of tok_hang get no reply.
    let inventory = Responder::start(&js, "inventory", releases_fail()).await;
    let _payment = Responder::start(
        &js,
        "payment",
        Arc::new(|c: &protocol::Command| {
            if c.action == "charge" && c.input["card_token"] == "tok_hang" {
                vec![]
            } else {
                by_card()(c)
            }
        }),
    )
    .await;

    // Abort a saga waiting on its charge.
    let hanging = handle
        .start("fast-order", "hang-1", order("tok_hang"))
        .await
        .unwrap()
        .saga_id;
    wait_until("the charge is out", WAIT, || async {
        matches!(
            handle.saga(&hanging).await.unwrap().unwrap().state,
            State::Running { step: 1, .. }
        )
    })
    .await;
    let abort = format!("/v1/sagas/{hanging}/abort");
    let reason = Some(json!({"reason": "customer cancelled"}));
    api.call(Method::POST, &abort, None, reason.clone())
        .await
        .is_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    api.call(
        Method::POST,
        &abort,
        Some("wrong-token-0123456789"),
        reason.clone(),
    )
    .await
    .is_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    api.call(Method::POST, &abort, Some(READER), reason.clone())
        .await
        .is_error(StatusCode::FORBIDDEN, "forbidden");
    let aborted = api
        .call(Method::POST, &abort, Some(ANA), reason.clone())
        .await;
    assert_eq!(aborted.status, StatusCode::OK, "{}", aborted.body);
    assert_eq!(aborted.body["state"], "compensating");
    // Its release fails: it ends up failed, and then abort no longer applies.
    wait_phase(&handle, &hanging, Phase::Failed).await;
    let refused = api.call(Method::POST, &abort, Some(ANA), reason).await;
    refused.is_error(StatusCode::CONFLICT, "not_allowed");
    assert_eq!(refused.body["error"]["state"], "failed");

    // Retry after the inventory recovers.
    inventory.set(by_card());
    let retry = format!("/v1/sagas/{hanging}/retry");
    api.call(Method::POST, &retry, Some(READER), None)
        .await
        .is_error(StatusCode::FORBIDDEN, "forbidden");
    let retried = api.call(Method::POST, &retry, Some(ANA), None).await;
    assert_eq!(retried.status, StatusCode::OK, "{}", retried.body);
    assert_eq!(retried.body["state"], "compensating");
    wait_phase(&handle, &hanging, Phase::Compensated).await;
    let refused = api.call(Method::POST, &retry, Some(ANA), None).await;
    refused.is_error(StatusCode::CONFLICT, "not_allowed");
    assert_eq!(refused.body["error"]["state"], "compensated");

    let journal = api
        .call(
            Method::GET,
            &format!("/v1/sagas/{hanging}/journal"),
            Some(READER),
            None,
        )
        .await;
    assert_eq!(journal.status, StatusCode::OK);
    let entries = journal.body["entries"].as_array().unwrap();
    for cause in ["operator_abort", "operator_retry"] {
        let entry = entries.iter().find(|e| e["cause"] == cause).unwrap();
        assert_eq!(entry["actor"], "operator", "{entry}");
        assert_eq!(entry["operator"], "ana", "{entry}");
    }

    // The read matrix: reads need a token, either role will do; probes stay open.
    let saga = format!("/v1/sagas/{hanging}");
    api.call(Method::GET, &saga, None, None)
        .await
        .is_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert_eq!(
        api.call(Method::GET, &saga, Some(READER), None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.call(Method::GET, "/v1/definitions", Some(READER), None)
            .await
            .status,
        StatusCode::OK
    );
    api.call(Method::GET, "/v1/dead-letters", None, None)
        .await
        .is_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    api.call(
        Method::POST,
        "/v1/sagas/fast-order",
        Some(READER),
        Some(json!({"key": "x", "input": order("tok_ok")})),
    )
    .await
    .is_error(StatusCode::FORBIDDEN, "forbidden");
    for open in ["/healthz", "/metrics", "/openapi.json", "/"] {
        assert_eq!(
            api.call(Method::GET, open, None, None).await.status,
            StatusCode::OK,
            "{open}"
        );
    }
    let mut closed = http.clone();
    closed.open_probes = false;
    let guarded = Api::new(&running, &closed);
    guarded
        .call(Method::GET, "/metrics", None, None)
        .await
        .is_error(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert_eq!(
        guarded
            .call(Method::GET, "/metrics", Some(READER), None)
            .await
            .status,
        StatusCode::OK
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_redriven_and_deleted() {
    use jetsaga_runtime::dead_letter;
    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let api = Api::new(&running, &Default::default());
    let js = js(&server).await;

    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Jetsaga-Saga-Id", "s-1");
    headers.insert("X-Custom", "kept");
    let subject = protocol::subject::command("inventory", "reserve");
    for (source, subject, seq) in [
        ("participant.inventory", subject.as_str(), 1),
        ("participant.inventory", "nowhere.stored", 2),
        ("orchestrator.replies", "saga.reply.x", 3),
    ] {
        dead_letter::publish(
            &js,
            dead_letter::DeadLetter {
                source,
                subject,
                headers: Some(&headers),
                payload: bytes::Bytes::from_static(b"{\"broken\": true"),
                reason: "cannot decode: EOF",
                msg_id: dead_letter::msg_id("TEST", seq),
            },
        )
        .await
        .unwrap();
    }

    let all = api.get("/v1/dead-letters").await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.body);
    assert_eq!(all.body["items"].as_array().unwrap().len(), 3);
    let first = &all.body["items"][0];
    assert_eq!(first["source"], "participant.inventory");
    assert_eq!(first["reason"], "cannot decode: EOF");
    assert_eq!(first["subject"], subject.as_str());
    assert_eq!(first["payload"], "{\"broken\": true");
    assert!(first["at"].is_string());
    let names: Vec<&str> = first["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"X-Custom") && names.contains(&"Jetsaga-Dead-Reason"),
        "{names:?}"
    );

    let page = api.get("/v1/dead-letters?limit=2").await;
    assert_eq!(page.body["items"].as_array().unwrap().len(), 2);
    let cursor = page.body["next_cursor"].as_str().unwrap().to_owned();
    let rest = api
        .get(&format!("/v1/dead-letters?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(rest.body["items"].as_array().unwrap().len(), 1);
    assert!(rest.body["next_cursor"].is_null());
    let replies = api
        .get("/v1/dead-letters?source=orchestrator.replies")
        .await;
    assert_eq!(replies.body["items"].as_array().unwrap().len(), 1);

    // Redrive: the original subject gets the body and the original headers, not the dead ones.
    let id = first["id"].as_u64().unwrap();
    let redriven = api
        .call(
            Method::POST,
            &format!("/v1/dead-letters/{id}/redrive"),
            None,
            None,
        )
        .await;
    assert_eq!(redriven.status, StatusCode::OK, "{}", redriven.body);
    assert_eq!(redriven.body["subject"], subject.as_str());
    let commands = js
        .get_stream(jetsaga_sagas::streams::COMMANDS.name)
        .await
        .unwrap();
    let copy = commands
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    assert_eq!(&copy.payload[..], b"{\"broken\": true");
    assert_eq!(copy.headers.get("X-Custom").unwrap().as_str(), "kept");
    assert!(copy.headers.get("Jetsaga-Dead-Reason").is_none());
    assert!(copy.headers.get("Jetsaga-Dead-Subject").is_none());

    // Nothing stores the second one's subject: 409, and the letter stays.
    let stranded = all.body["items"][1]["id"].as_u64().unwrap();
    api.call(
        Method::POST,
        &format!("/v1/dead-letters/{stranded}/redrive"),
        None,
        None,
    )
    .await
    .is_error(StatusCode::CONFLICT, "not_allowed");

    let deleted = api
        .call(
            Method::DELETE,
            &format!("/v1/dead-letters/{id}"),
            None,
            None,
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    api.call(
        Method::DELETE,
        &format!("/v1/dead-letters/{id}"),
        None,
        None,
    )
    .await
    .is_error(StatusCode::NOT_FOUND, "dead_letter_not_found");
    assert_eq!(
        api.get("/v1/dead-letters").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_router() {
    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let api = Api::new(&running, &Default::default());
    let doc = api.get("/openapi.json").await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc.body["paths"].as_object().unwrap();
    // Every documented operation is routed (a request is not answered "no such route").
    let mut operations = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let uri = path
                .replace("{id}", &protocol::saga_id("order-creation", "x"))
                .replace("{key}", "x");
            let uri = if path.starts_with("/v1/dead-letters/") {
                path.replace("{id}", "1")
            } else {
                uri
            };
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let answer = api.raw(method.clone(), &uri, &[], Body::empty()).await;
            assert!(
                !matches!(
                    answer.body["error"]["code"].as_str(),
                    Some("not_found" | "method_not_allowed")
                ),
                "{method} {path} is documented but not routed: {}",
                answer.body
            );
            // What it answered is documented, and a route behind the token check documents
            // its refusals (401; 403 for the changes).
            let responses = &operation["responses"];
            assert!(
                responses.get(answer.status.as_str()).is_some(),
                "{method} {path} answered {} (undocumented): {}",
                answer.status,
                answer.body
            );
            if operation.get("security").is_some() {
                assert!(responses.get("401").is_some(), "{method} {path}: no 401");
                assert_eq!(
                    responses.get("403").is_some(),
                    method != Method::GET,
                    "{method} {path}: 403 documented only for the changes"
                );
            }
            operations += 1;
        }
    }
    // And every route is documented.
    let routed = [
        ("post", "/v1/sagas/{id}"),
        ("get", "/v1/sagas/{id}"),
        ("get", "/v1/sagas/{id}/keys/{key}"),
        ("get", "/v1/sagas/{id}/journal"),
        ("get", "/v1/sagas"),
        ("post", "/v1/sagas/{id}/retry"),
        ("post", "/v1/sagas/{id}/abort"),
        ("get", "/v1/dead-letters"),
        ("post", "/v1/dead-letters/{id}/redrive"),
        ("delete", "/v1/dead-letters/{id}"),
        ("get", "/v1/definitions"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    ];
    for (method, path) in routed {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not documented"
        );
    }
    assert_eq!(operations, routed.len());
    // Every referenced schema exists.
    let text = doc.body.to_string();
    let schemas = doc.body["components"]["schemas"].as_object().unwrap();
    for reference in text.split("\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "missing schema {name}");
    }
    running.shutdown().await;
}

/// The bounds the OpenAPI document states for a listing's page size and an abort's reason are
/// the ones the API enforces: a value just inside is accepted, one just outside refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_bounds_are_the_enforced_ones() {
    let server = NatsServer::start();
    let running = orchestrator(&server.url(), None).await;
    let api = Api::new(&running, &Default::default());
    let doc = api.get("/openapi.json").await.body;
    let param = |path: &str, name: &str| -> Value {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{path} documents no {name}"))["schema"]
            .clone()
    };
    for path in ["/v1/sagas", "/v1/dead-letters"] {
        let limit = param(path, "limit");
        let (min, max) = (
            limit["minimum"].as_u64().unwrap(),
            limit["maximum"].as_u64().unwrap(),
        );
        assert_eq!(
            api.get(&format!("{path}?limit={max}")).await.status,
            StatusCode::OK
        );
        assert_eq!(
            api.get(&format!("{path}?limit={min}")).await.status,
            StatusCode::OK
        );
        for outside in [min - 1, max + 1] {
            api.get(&format!("{path}?limit={outside}"))
                .await
                .is_error(StatusCode::BAD_REQUEST, "invalid_query");
        }
    }
    let cursor = param("/v1/dead-letters", "cursor");
    assert_eq!(cursor["pattern"], "^[1-9][0-9]{0,19}$");
    assert_eq!(
        api.get("/v1/dead-letters?cursor=1").await.status,
        StatusCode::OK
    );
    api.get("/v1/dead-letters?cursor=0")
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_cursor");
    let source = param("/v1/dead-letters", "source");
    assert!(source["pattern"].is_string(), "{source}");
    assert_eq!(
        api.get("/v1/dead-letters?source=participant.inventory")
            .await
            .status,
        StatusCode::OK
    );

    let reason = &doc["components"]["schemas"]["AbortBody"]["properties"]["reason"];
    let max = reason["maxLength"].as_u64().unwrap() as usize;
    assert_eq!(reason["minLength"], 1);
    let id = protocol::saga_id("order-creation", "no-such-order");
    let abort = |reason: String| {
        let uri = format!("/v1/sagas/{id}/abort");
        let api = &api;
        async move {
            api.call(
                Method::POST,
                &uri,
                Some(ANA),
                Some(json!({ "reason": reason })),
            )
            .await
        }
    };
    // Inside the bounds the request gets as far as the saga (there is none).
    abort("x".repeat(max))
        .await
        .is_error(StatusCode::NOT_FOUND, "saga_not_found");
    abort("x".repeat(max + 1))
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_body");
    abort("   ".to_owned())
        .await
        .is_error(StatusCode::BAD_REQUEST, "invalid_body");
}
