//! One trace per saga, as Jaeger would receive it: the real `jetsaga serve` and the real
//! reference participants export OTLP/gRPC to a collector inside the test (built from the
//! `opentelemetry-proto` definitions), which checks the parent links: root → step attempts
//! (and compensations) → the participant's handling span, across a SIGKILL of the
//! orchestrator.

#![allow(clippy::unwrap_used)]

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use common::{WAIT, definitions_dir, js, order, order_schema_file, publish_stored};
use jetsaga_orchestrator::store::Store;
use jetsaga_sagas::protocol::{self, Body, TraceParent};
use jetsaga_sagas::{Phase, Saga};
use jetsaga_testkit::{ChildGuard, NatsServer, cargo_bin, wait_until};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

/// One span as the collector received it; ids in hex, `parent` empty for a root. The
/// orchestrator's spans have `saga.*` attributes, the participants' `saga_id`, `command_id`.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    resource: HashMap<String, String>,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attributes: HashMap<String, String>,
}

impl Received {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// An OTLP/gRPC trace collector on a loopback port.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.receive(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    fn receive(&self, request: ExportTraceServiceRequest) {
        let mut received = Vec::new();
        for resource_spans in request.resource_spans {
            let resource = resource_spans
                .resource
                .as_ref()
                .map(|r| text_attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for span in resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans)
            {
                received.push(Received {
                    service: service.clone(),
                    resource: resource.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    name: span.name,
                    attributes: text_attributes(&span.attributes),
                });
            }
        }
        self.spans.lock().unwrap().extend(received);
    }

    /// Starts serving OTLP/gRPC; returns the endpoint to export to.
    async fn start() -> (Self, String) {
        let collector = Self::default();
        let endpoint = collector.serve_grpc().await;
        (collector, endpoint)
    }

    async fn serve_grpc(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        endpoint
    }

    /// Also serves OTLP/HTTP (protobuf bodies on `POST /v1/traces`); returns its base URL.
    async fn serve_http(&self) -> String {
        use prost::Message as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let collector = self.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| async move {
                match ExportTraceServiceRequest::decode(body) {
                    Ok(request) => {
                        collector.receive(request);
                        let response = ExportTraceServiceResponse {
                            partial_success: None,
                        };
                        (
                            axum::http::StatusCode::OK,
                            [("content-type", "application/x-protobuf")],
                            response.encode_to_vec(),
                        )
                    }
                    Err(_) => (
                        axum::http::StatusCode::BAD_REQUEST,
                        [("content-type", "text/plain")],
                        b"undecodable".to_vec(),
                    ),
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        endpoint
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// The orchestrator's spans of saga `id`.
    fn of_saga(&self, id: &str) -> Vec<Received> {
        self.spans()
            .into_iter()
            .filter(|s| s.attr("saga.id") == Some(id))
            .collect()
    }

    fn has(&self, id: &str, name: &str) -> bool {
        self.of_saga(id).iter().any(|s| s.name == name)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text_attributes(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// order-creation with timeouts far beyond the test's length, so no attempt is added by a
/// slow machine (each saga's spans are then exactly known).
fn patient_order() -> tempfile::TempDir {
    let text = jetsaga_orchestrator::definitions::ORDER_CREATION
        .replace("name = \"order-creation\"", "name = \"patient-order\"")
        .replace("timeout = \"10s\"", "timeout = \"10m\"")
        .replace("deadline = \"5m\"", "deadline = \"1h\"");
    assert!(text.contains("patient-order") && !text.contains("timeout = \"10s\""));
    definitions_dir(&[("patient.toml", &text), order_schema_file()])
}

/// Exports every 50 ms, so what a process emitted has left it before the test kills it.
const EXPORT_DELAY_MS: &str = "50";

fn serve(url: &str, otlp: &str, definitions: &std::path::Path) -> ChildGuard {
    serve_with(url, otlp, definitions, &[])
}

fn serve_with(
    url: &str,
    otlp: &str,
    definitions: &std::path::Path,
    env: &[(&str, &str)],
) -> ChildGuard {
    let mut command = Command::new(cargo_bin("jetsaga"));
    command.envs(env.iter().copied());
    command
        .arg("serve")
        .env("JETSAGA_NATS__URL", url)
        .env("JETSAGA_HTTP__LISTEN", "127.0.0.1:0")
        .env("JETSAGA_ENGINE__ACK_WAIT", "2s")
        .env("JETSAGA_ENGINE__DEFINITIONS", definitions)
        // The patient definition's steps wait up to 10 minutes: their commands are kept longer.
        .env("JETSAGA_STREAMS__COMMAND_TTL", "1h")
        .env("JETSAGA_TELEMETRY__OTLP_ENDPOINT", otlp)
        .env("OTEL_BSP_SCHEDULE_DELAY", EXPORT_DELAY_MS)
        .env("JETSAGA_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ChildGuard::spawn(command).expect("jetsaga serve starts")
}

fn participant(binary: &str, url: &str, otlp: &str) -> ChildGuard {
    let mut command = Command::new(cargo_bin(binary));
    command
        .env("JETSAGA_NATS__URL", url)
        .env("JETSAGA_METRICS__LISTEN", "")
        // Spans are filtered like log lines: the handling span is at info.
        .env("JETSAGA_TELEMETRY__LOG_FILTER", "info")
        .env("JETSAGA_TELEMETRY__OTLP_ENDPOINT", otlp)
        .env("OTEL_BSP_SCHEDULE_DELAY", EXPORT_DELAY_MS)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if binary == "jetsaga-inventory" {
        command.env("JETSAGA_INVENTORY__CATALOGUE", "{ sku-1 = 100000 }");
    }
    ChildGuard::spawn(command).expect("the participant starts")
}

/// Waits until the orchestrator child created its streams (the participants check them).
async fn wait_provisioned(js: &async_nats::jetstream::Context) {
    wait_until("the orchestrator created its streams", WAIT, || async {
        for spec in jetsaga_sagas::streams::ALL {
            if js.get_stream(spec.name).await.is_err() {
                return false;
            }
        }
        true
    })
    .await;
}

async fn start_saga(js: &async_nats::jetstream::Context, key: &str, card: &str) -> String {
    let start = protocol::Start {
        protocol: protocol::VERSION,
        key: key.to_owned(),
        input: order(card),
        requested_at: None,
    };
    publish_stored(js, "saga.start.patient-order", start.encode()).await;
    jetsaga_orchestrator::driver::saga_id("patient-order", key)
}

async fn wait_saga(store: &Store, id: &str, phase: Phase) -> Saga {
    wait_until(
        &format!("saga {id} is {}", phase.as_str()),
        WAIT,
        || async {
            store
                .load(id, false)
                .await
                .ok()
                .flatten()
                .is_some_and(|s| s.record.saga.phase() == phase)
        },
    )
    .await;
    store.load(id, false).await.unwrap().unwrap().record.saga
}

/// Checks that `saga` is one trace in `collector` and that its spans link up; `steps` are
/// the attempt spans expected under the root, as (span name, command id, participant
/// span name). Returns the orchestrator's spans of the saga.
fn check_trace(
    collector: &Collector,
    saga: &Saga,
    outcome: &str,
    steps: &[(&str, String, &str)],
) -> Vec<Received> {
    let trace_id = saga.trace_id().expect("a traced saga has a trace id");
    let root_id = TraceParent::parse(saga.traceparent.as_deref().unwrap())
        .unwrap()
        .span_id;
    let all = collector.spans();
    let ours = collector.of_saga(&saga.id);
    for span in &ours {
        assert_eq!(span.trace_id, trace_id, "{span:?} is in the saga's trace");
    }
    let roots: Vec<_> = ours.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root: {ours:#?}");
    let root = roots[0];
    assert_eq!(root.name, "saga patient-order");
    assert_eq!(
        root.span_id, root_id,
        "the persisted context names the root"
    );
    assert_eq!(root.attr("saga.outcome"), Some(outcome));

    let attempts: Vec<_> = ours
        .iter()
        .filter(|s| {
            s.attr("saga.command_id").is_some()
                && !s.name.starts_with("reply ")
                && !s.name.starts_with("resend ")
        })
        .collect();
    assert_eq!(
        attempts.len(),
        steps.len(),
        "one span per attempt: {attempts:#?}"
    );
    for (name, command_id, handled_as) in steps {
        let step = attempts
            .iter()
            .find(|s| s.attr("saga.command_id") == Some(command_id.as_str()))
            .unwrap_or_else(|| panic!("no span for {command_id}: {ours:#?}"));
        assert_eq!(step.name, *name);
        assert_eq!(step.parent, root.span_id, "{name} is under the root");
        assert_eq!(
            step.span_id,
            format!("{:016x}", protocol::span_id_of(command_id)),
            "{name}'s id derives from its command id"
        );
        assert_eq!(
            step.attr("saga.compensation"),
            Some(if name.starts_with("compensate ") {
                "true"
            } else {
                "false"
            })
        );
        // The participant handled the command as a child of the attempt.
        let handled: Vec<_> = all
            .iter()
            .filter(|s| s.attr("command_id") == Some(command_id))
            .collect();
        assert!(!handled.is_empty(), "no participant span for {command_id}");
        for span in handled {
            assert_eq!(span.name, *handled_as);
            assert_eq!(span.trace_id, trace_id, "{span:?}");
            assert_eq!(span.parent, step.span_id, "{span:?} is under {name}");
        }
        // Applying the reply is a child of the attempt too.
        let reply = ours
            .iter()
            .find(|s| s.name.starts_with("reply ") && s.attr("saga.command_id") == Some(command_id))
            .unwrap_or_else(|| panic!("no reply span for {command_id}"));
        assert_eq!(reply.parent, step.span_id);
    }
    ours
}

fn command_id(saga: &str, step: &str, direction: &str) -> String {
    format!("{saga}:{step}:{direction}:1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_saga_is_one_trace_down_to_the_participants_and_a_compensation_is_marked() {
    let server = NatsServer::start();
    let (collector, otlp) = Collector::start().await;
    let defs = patient_order();
    let _orchestrator = serve(&server.url(), &otlp, defs.path());
    let js = js(&server).await;
    wait_provisioned(&js).await;
    let _inventory = participant("jetsaga-inventory", &server.url(), &otlp);
    let _payment = participant("jetsaga-payment", &server.url(), &otlp);
    let ok = start_saga(&js, "trace-ok", "tok_ok").await;
    let declined = start_saga(&js, "trace-decline", "tok_decline").await;

    let store = Store::new(js.clone()).await.unwrap();
    let ok_saga = wait_saga(&store, &ok, Phase::Completed).await;
    let declined_saga = wait_saga(&store, &declined, Phase::Compensated).await;
    assert_ne!(ok_saga.trace_id(), declined_saga.trace_id());
    wait_until("both root spans are exported", WAIT, || async {
        collector.has(&ok, "saga patient-order") && collector.has(&declined, "saga patient-order")
    })
    .await;
    wait_until("the participants' spans are exported", WAIT, || async {
        collector
            .spans()
            .iter()
            .filter(|s| s.attr("command_id").is_some())
            .count()
            >= 6 // three commands per saga: reserve, charge, commit or release
    })
    .await;

    check_trace(
        &collector,
        &ok_saga,
        "completed",
        &[
            (
                "reserve-stock",
                command_id(&ok, "reserve-stock", "do"),
                "inventory reserve",
            ),
            (
                "take-payment",
                command_id(&ok, "take-payment", "do"),
                "payment charge",
            ),
            (
                "confirm-order",
                command_id(&ok, "confirm-order", "do"),
                "inventory commit",
            ),
        ],
    );
    let spans = check_trace(
        &collector,
        &declined_saga,
        "compensated",
        &[
            (
                "reserve-stock",
                command_id(&declined, "reserve-stock", "do"),
                "inventory reserve",
            ),
            (
                "take-payment",
                command_id(&declined, "take-payment", "do"),
                "payment charge",
            ),
            (
                "compensate reserve-stock",
                command_id(&declined, "reserve-stock", "undo"),
                "inventory release",
            ),
        ],
    );
    let declined_payment = spans.iter().find(|s| s.name == "take-payment").unwrap();
    assert_eq!(declined_payment.attr("saga.outcome"), Some("reply_failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_whose_orchestrator_was_killed_mid_way_is_still_one_trace() {
    let server = NatsServer::start();
    let (collector, otlp) = Collector::start().await;
    let defs = patient_order();
    let mut orchestrator = serve(&server.url(), &otlp, defs.path());
    let js = js(&server).await;
    wait_provisioned(&js).await;
    // No payment participant yet: the saga stops at its second step.
    let _inventory = participant("jetsaga-inventory", &server.url(), &otlp);
    let id = start_saga(&js, "trace-crash", "tok_ok").await;
    wait_until(
        "the first step's span left the first orchestrator",
        WAIT,
        || async { collector.has(&id, "reserve-stock") },
    )
    .await;
    let store = Store::new(js.clone()).await.unwrap();
    let before = wait_saga(&store, &id, Phase::Running).await;
    assert_eq!(
        before.steps[1].status,
        jetsaga_sagas::StepStatus::Running,
        "the charge is out"
    );
    let pid = orchestrator.pid();
    orchestrator.kill().unwrap();
    assert!(
        orchestrator.try_wait().unwrap().is_some(),
        "orchestrator {pid} is gone"
    );

    let _orchestrator = serve(&server.url(), &otlp, defs.path());
    let _payment = participant("jetsaga-payment", &server.url(), &otlp);
    let saga = wait_saga(&store, &id, Phase::Completed).await;
    assert_eq!(
        saga.traceparent, before.traceparent,
        "the context is persisted"
    );
    wait_until("the root span is exported", WAIT, || async {
        collector.has(&id, "saga patient-order")
    })
    .await;
    wait_until("the participants' spans are exported", WAIT, || async {
        collector
            .spans()
            .iter()
            .filter(|s| s.attr("saga_id") == Some(id.as_str()))
            .count()
            >= 3
    })
    .await;
    check_trace(
        &collector,
        &saga,
        "completed",
        &[
            (
                "reserve-stock",
                command_id(&id, "reserve-stock", "do"),
                "inventory reserve",
            ),
            // Sent by the killed orchestrator, its reply applied by the new one.
            (
                "take-payment",
                command_id(&id, "take-payment", "do"),
                "payment charge",
            ),
            (
                "confirm-order",
                command_id(&id, "confirm-order", "do"),
                "inventory commit",
            ),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_export_carries_the_configured_service_name_and_resource() {
    let server = NatsServer::start();
    let (collector, grpc) = Collector::start().await;
    let http = collector.serve_http().await;
    let defs = patient_order();
    let _orchestrator = serve_with(
        &server.url(),
        &http,
        defs.path(),
        &[
            ("JETSAGA_TELEMETRY__OTLP_PROTOCOL", "http/protobuf"),
            ("JETSAGA_TELEMETRY__SERVICE_NAME", "orchestrator-eu"),
            (
                "JETSAGA_TELEMETRY__RESOURCE_ATTRIBUTES",
                "{ \"deployment.environment\" = \"test\" }",
            ),
        ],
    );
    let js = js(&server).await;
    wait_provisioned(&js).await;
    let _inventory = participant("jetsaga-inventory", &server.url(), &grpc);
    let _payment = participant("jetsaga-payment", &server.url(), &grpc);
    let id = start_saga(&js, "trace-http", "tok_ok").await;
    let store = Store::new(js.clone()).await.unwrap();
    let saga = wait_saga(&store, &id, Phase::Completed).await;
    wait_until("the root span is exported over HTTP", WAIT, || async {
        collector.has(&id, "saga patient-order")
    })
    .await;
    wait_until("the participants' spans are exported", WAIT, || async {
        collector
            .spans()
            .iter()
            .filter(|s| s.attr("saga_id") == Some(id.as_str()))
            .count()
            >= 3
    })
    .await;
    let spans = check_trace(
        &collector,
        &saga,
        "completed",
        &[
            (
                "reserve-stock",
                command_id(&id, "reserve-stock", "do"),
                "inventory reserve",
            ),
            (
                "take-payment",
                command_id(&id, "take-payment", "do"),
                "payment charge",
            ),
            (
                "confirm-order",
                command_id(&id, "confirm-order", "do"),
                "inventory commit",
            ),
        ],
    );
    for span in spans {
        assert_eq!(span.service, "orchestrator-eu");
        assert_eq!(
            span.resource
                .get("deployment.environment")
                .map(String::as_str),
            Some("test")
        );
    }
}
