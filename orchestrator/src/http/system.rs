//! Health, readiness, metrics and the loaded definitions.

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::Handle;

/// A probe's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    /// `ok`, `ready` or `not ready`.
    pub status: String,
    /// Why it is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, body = Status)))]
pub async fn healthz() -> axum::Json<Status> {
    axum::Json(Status {
        status: "ok".to_owned(),
        reason: None,
    })
}

/// Readiness: NATS connected, streams in place, the saga listing caught up.
#[utoipa::path(get, path = "/readyz", tag = "system", responses(
    (status = 200, body = Status),
    (status = 503, description = "Not ready", body = Status),
))]
pub async fn readyz(State(handle): State<Handle>) -> Response {
    match handle.readiness() {
        Ok(()) => axum::Json(Status {
            status: "ready".to_owned(),
            reason: None,
        })
        .into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(Status {
                status: "not ready".to_owned(),
                reason: Some(reason.to_string()),
            }),
        )
            .into_response(),
    }
}

/// Prometheus metrics (text format).
#[utoipa::path(get, path = "/metrics", tag = "system", responses(
    (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
))]
pub async fn metrics(State(handle): State<Handle>) -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.metrics().render(),
    )
        .into_response()
}

/// A loaded definition.
#[derive(Debug, Serialize, ToSchema)]
pub struct DefinitionView {
    /// The saga type.
    pub name: String,
    /// Its version.
    pub version: u32,
    /// Free text.
    pub description: String,
    /// From start to the deadline, in seconds.
    pub deadline_seconds: f64,
    /// The steps, in order.
    pub steps: Vec<StepDefinitionView>,
    /// The JSON Schema of the start input (absent: any object).
    pub input_schema: Option<serde_json::Value>,
}

/// A step of a definition.
#[derive(Debug, Serialize, ToSchema)]
pub struct StepDefinitionView {
    /// Its name.
    pub name: String,
    /// The participant that runs it.
    pub participant: String,
    /// The forward action.
    pub action: String,
    /// The compensating action.
    pub compensation: Option<String>,
    /// `compensatable`, `pivot` or `retriable`.
    pub kind: String,
    /// How long one attempt may wait for its reply, in seconds.
    pub timeout_seconds: f64,
}

/// The loaded definitions.
#[derive(Debug, Serialize, ToSchema)]
pub struct Definitions {
    /// Every loaded version of every saga type.
    pub definitions: Vec<DefinitionView>,
}

/// Every loaded definition and version.
#[utoipa::path(get, path = "/v1/definitions", tag = "definitions",
    responses((status = 200, body = Definitions)), security(("bearer" = [])))]
pub async fn definitions(State(handle): State<Handle>) -> axum::Json<Definitions> {
    let mut definitions: Vec<DefinitionView> = handle
        .definitions()
        .iter()
        .map(|d| DefinitionView {
            name: d.name.clone(),
            version: d.version,
            description: d.description.clone(),
            deadline_seconds: d.deadline.as_secs_f64(),
            input_schema: d.input_schema.as_ref().map(|s| s.source().clone()),
            steps: d
                .steps
                .iter()
                .map(|s| StepDefinitionView {
                    name: s.name.clone(),
                    participant: s.participant.clone(),
                    action: s.action.clone(),
                    compensation: s.compensation.clone(),
                    kind: match serde_json::to_value(s.kind) {
                        Ok(serde_json::Value::String(k)) => k,
                        other => format!("{other:?}"),
                    },
                    timeout_seconds: s.timeout.as_secs_f64(),
                })
                .collect(),
        })
        .collect();
    definitions.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
    axum::Json(Definitions { definitions })
}
