//! The HTTP side: starting sagas, health, readiness and metrics.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::{ApiError, Handle, Started};

/// The router for a running orchestrator.
pub fn router(handle: Handle) -> Router {
    Router::new()
        .route("/v1/sagas/{saga_type}", post(start))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn({
            let metrics = handle.metrics().clone();
            move |request, next| crate::metrics::track_http(metrics.clone(), request, next)
        }))
        .with_state(handle)
}

/// Every error the API returns: a stable code, a message and the status.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl HttpError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad_request",
            message: message.into(),
        }
    }
}

impl From<ApiError> for HttpError {
    fn from(error: ApiError) -> Self {
        let (status, code) = match &error {
            ApiError::UnknownType(_) => (StatusCode::NOT_FOUND, "unknown_saga_type"),
            ApiError::InvalidInput(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "saga_not_found"),
            ApiError::NotAllowed(_) => (StatusCode::CONFLICT, "not_allowed"),
            ApiError::KeyHorizon(_) => (StatusCode::CONFLICT, "key_horizon_passed"),
            ApiError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        };
        if status.is_server_error() {
            let cause = std::error::Error::source(&error).map(ToString::to_string);
            tracing::warn!(%error, ?cause, "request failed");
        }
        Self {
            status,
            code,
            message: error.to_string(),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    key: String,
    input: serde_json::Value,
}

async fn start(
    State(handle): State<Handle>,
    Path(saga_type): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, HttpError> {
    let body: StartBody = serde_json::from_slice(&body)
        .map_err(|e| HttpError::bad_request(format!("invalid start request: {e}")))?;
    let Started { saga_id, created } = handle.start(&saga_type, &body.key, body.input).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        axum::Json(json!({"saga_id": saga_id, "created": created})),
    )
        .into_response())
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(handle): State<Handle>) -> Response {
    match handle.readiness() {
        Ok(()) => axum::Json(json!({"status": "ready"})).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not ready", "reason": reason.to_string()})),
        )
            .into_response(),
    }
}

async fn metrics(State(handle): State<Handle>) -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.metrics().render(),
    )
        .into_response()
}
