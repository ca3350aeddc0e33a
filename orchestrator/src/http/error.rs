//! The one error type of the API and the extractors that turn bad requests into it.
//!
//! Every client error keeps its status and a stable code in
//! `{"error": {"code": "...", "message": "..."}}`; internal errors are logged and
//! answered with a generic 500.

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

use crate::ApiError;

/// The largest request body accepted (start inputs included).
pub const MAX_BODY: usize = 256 * 1024;

/// Stable error codes; clients branch on these, never on messages.
pub mod code {
    /// The body is not valid JSON, or has the wrong fields or types.
    pub const INVALID_BODY: &str = "invalid_body";
    /// The body is larger than [`super::MAX_BODY`].
    pub const BODY_TOO_LARGE: &str = "body_too_large";
    /// A body was sent without `Content-Type: application/json`.
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    /// A query parameter is malformed or out of range.
    pub const INVALID_QUERY: &str = "invalid_query";
    /// A path segment is malformed (a saga id, a dead-letter id).
    pub const INVALID_ID: &str = "invalid_id";
    /// A listing cursor was not one the server handed out.
    pub const INVALID_CURSOR: &str = "invalid_cursor";
    /// Neither the body nor `Idempotency-Key` gave a start key, or they disagree.
    pub const INVALID_KEY: &str = "invalid_key";
    /// The start input breaks the saga type's input schema.
    pub const INVALID_INPUT: &str = "invalid_input";
    /// No such saga type.
    pub const UNKNOWN_SAGA_TYPE: &str = "unknown_saga_type";
    /// No such saga.
    pub const SAGA_NOT_FOUND: &str = "saga_not_found";
    /// No such dead letter.
    pub const DEAD_LETTER_NOT_FOUND: &str = "dead_letter_not_found";
    /// No such route.
    pub const NOT_FOUND: &str = "not_found";
    /// The route exists, not with this method.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// The saga's state does not allow the action (the body says the state).
    pub const NOT_ALLOWED: &str = "not_allowed";
    /// A start requested longer ago than the key horizon, whose key has no saga.
    pub const KEY_HORIZON_PASSED: &str = "key_horizon_passed";
    /// No token, or an unknown one.
    pub const UNAUTHENTICATED: &str = "unauthenticated";
    /// The token's role does not allow the action.
    pub const FORBIDDEN: &str = "forbidden";
    /// The orchestrator is stopping.
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// Admission control holds new starts; retry later.
    pub const OVERLOADED: &str = "overloaded";
    /// NATS or the journal failed; retry later.
    pub const UNAVAILABLE: &str = "unavailable";
    /// A bug or an unexpected failure; details are in the server's log.
    pub const INTERNAL: &str = "internal";
}

/// Every error the API returns: a status, a stable code and a message.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// For a 409: the saga's current state.
    state: Option<String>,
}

/// The JSON body of an error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable code, e.g. `saga_not_found`.
    pub code: String,
    /// A human-readable message.
    pub message: String,
    /// On `not_allowed` (409): the saga's current state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

impl HttpError {
    /// An error with this status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            state: None,
        }
    }

    /// A 400.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A 404 for a missing saga.
    pub fn saga_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            code::SAGA_NOT_FOUND,
            format!("saga {id} not found"),
        )
    }

    /// A 500; `error` is logged, not sent.
    pub fn internal(error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, "request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            code::INTERNAL,
            "internal error",
        )
    }

    /// Adds the saga's current state (for a 409).
    pub fn with_state(mut self, state: impl Into<String>) -> Self {
        self.state = Some(state.into());
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl From<ApiError> for HttpError {
    fn from(error: ApiError) -> Self {
        let (status, code) = match &error {
            ApiError::UnknownType(_) => (StatusCode::NOT_FOUND, code::UNKNOWN_SAGA_TYPE),
            ApiError::InvalidInput(_) => (StatusCode::UNPROCESSABLE_ENTITY, code::INVALID_INPUT),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, code::SAGA_NOT_FOUND),
            ApiError::NotAllowed(_) => (StatusCode::CONFLICT, code::NOT_ALLOWED),
            ApiError::KeyHorizon(_) => (StatusCode::CONFLICT, code::KEY_HORIZON_PASSED),
            ApiError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, code::SHUTTING_DOWN),
            ApiError::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, code::OVERLOADED),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, code::UNAVAILABLE),
        };
        if status.is_server_error() {
            let cause = std::error::Error::source(&error).map(ToString::to_string);
            tracing::warn!(%error, ?cause, "request failed");
        }
        Self::new(status, code, error.to_string())
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                state: self.state,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// A JSON body: `Content-Type: application/json`, at most [`MAX_BODY`] bytes, no
/// unknown fields (the target types deny them); anything else is a 4xx with a code.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = HttpError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<mime_type::Essence>().ok())
            .is_some_and(|m| m.is_json());
        if !json {
            return Err(HttpError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON (Content-Type: application/json)",
            ));
        }
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(body_rejection)?;
        let value = serde_json::from_slice(&bytes).map_err(|e| {
            HttpError::bad_request(code::INVALID_BODY, format!("invalid JSON body: {e}"))
        })?;
        Ok(Self(value))
    }
}

fn body_rejection(rejection: BytesRejection) -> HttpError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::BODY_TOO_LARGE,
            format!("the body is larger than {MAX_BODY} bytes"),
        )
    } else {
        HttpError::bad_request(code::INVALID_BODY, rejection.body_text())
    }
}

/// Path parameters, with malformed ones answered as `invalid_id`.
#[derive(Debug)]
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|e: PathRejection| HttpError::bad_request(code::INVALID_ID, e.body_text()))
    }
}

/// Query parameters, with malformed ones answered as `invalid_query`.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|e: QueryRejection| HttpError::bad_request(code::INVALID_QUERY, e.body_text()))
    }
}

/// `application/json` and `application/<something>+json`, parameters ignored.
mod mime_type {
    pub(super) struct Essence(String);

    impl std::str::FromStr for Essence {
        type Err = ();

        fn from_str(s: &str) -> Result<Self, ()> {
            let essence = s
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            Ok(Self(essence))
        }
    }

    impl Essence {
        pub(super) fn is_json(&self) -> bool {
            self.0 == "application/json"
                || (self.0.starts_with("application/") && self.0.ends_with("+json"))
        }
    }
}

/// Saga ids are subject tokens of the journal: printable ASCII without `.`, `*`,
/// `>` or spaces, at most 256 bytes.
pub fn check_saga_id(id: &str) -> Result<(), HttpError> {
    let valid = !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>'));
    if valid {
        Ok(())
    } else {
        Err(HttpError::bad_request(
            code::INVALID_ID,
            "a saga id is 1 to 256 printable ASCII characters without '.', '*' or '>'",
        ))
    }
}
