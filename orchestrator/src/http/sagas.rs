//! `/v1/sagas`: start, look at, list, retry and abort sagas.

use axum::Extension;
use axum::extract::State;
use axum::http::header::LOCATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use jetsaga_sagas::protocol::Failure;
use jetsaga_sagas::{Entry, Saga, State as SagaState, StepRecord, Wait};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Caller;
use super::error::{ErrorBody, HttpError, Json, Path, Query, check_saga_id, code};
use crate::{ApiError, Handle, Started};

/// The header that may carry a start's key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// A start request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    /// The business key (e.g. the order id), 1 to 1024 bytes; the same key always
    /// yields the same saga. May instead come in the `Idempotency-Key` header.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 1024)]
    pub key: Option<String>,
    /// The saga's input, checked against its type's input schema.
    pub input: serde_json::Value,
    /// When the client made the request (RFC 3339). If the key has no saga and
    /// this is longer ago than the key horizon (`streams.finished-retention`),
    /// the start is refused with 409 `key_horizon_passed`.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub requested_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A started (or already existing) saga.
#[derive(Debug, Serialize, ToSchema)]
pub struct StartResponse {
    /// The saga's id.
    pub saga_id: String,
    /// False when the key had already started this saga.
    pub created: bool,
    /// The saga as it is now (absent if the journal could not be read back yet).
    pub saga: Option<SagaView>,
}

/// A saga as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SagaView {
    /// Its id.
    pub saga_id: String,
    /// Its type (definition name).
    pub saga_type: String,
    /// The definition version it runs.
    pub version: u32,
    /// The business key it was started with.
    pub key: String,
    /// `running`, `compensating`, `completed`, `compensated` or `failed`.
    pub state: String,
    /// The step it is running or compensating (or whose compensation failed).
    pub current_step: Option<String>,
    /// The attempt of the current step (or compensation) that is out.
    pub attempt: Option<u32>,
    /// What the current step waits for: `reply` or `backoff`.
    pub waiting_for: Option<String>,
    /// Until when it waits.
    pub waiting_until: Option<DateTime<Utc>>,
    /// Why it is compensating, was compensated or failed.
    pub cause: Option<FailureView>,
    /// For a failed saga: the compensation's last error.
    pub error: Option<FailureView>,
    /// One record per step of the definition.
    pub steps: Vec<StepView>,
    /// The start input.
    pub input: serde_json::Value,
    /// When it started.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Past this a saga before its pivot is compensated.
    pub deadline_at: DateTime<Utc>,
    /// Transitions applied so far.
    pub transitions: u64,
    /// The OpenTelemetry trace id of the saga.
    pub trace_id: Option<String>,
}

/// An error as a participant (or the orchestrator) reported it.
#[derive(Debug, Serialize, ToSchema)]
pub struct FailureView {
    /// A stable code.
    pub code: String,
    /// A message.
    pub message: String,
    /// Whether retrying could help.
    pub retryable: bool,
}

/// One step of a saga.
#[derive(Debug, Serialize, ToSchema)]
pub struct StepView {
    /// The step name.
    pub name: String,
    /// `pending`, `running`, `succeeded`, `failed`, `uncertain`, `compensating`,
    /// `compensated` or `compensation_failed`.
    pub status: String,
    /// Forward attempts sent.
    pub attempts: u32,
    /// Compensation attempts sent.
    pub compensation_attempts: u32,
    /// The participant's result on success.
    pub result: Option<serde_json::Value>,
    /// The last error seen.
    pub error: Option<FailureView>,
    /// When its first command went out.
    pub started_at: Option<DateTime<Utc>>,
    /// When it succeeded, failed or was compensated.
    pub finished_at: Option<DateTime<Utc>>,
}

/// One journal line.
#[derive(Debug, Serialize, ToSchema)]
pub struct JournalEntryView {
    /// Transition number (an ignored input repeats the last one).
    pub seq: u64,
    /// When.
    pub at: DateTime<Utc>,
    /// `orchestrator` or `operator`.
    pub actor: String,
    /// For an operator's action: the name of their token.
    pub operator: Option<String>,
    /// What happened (`start`, `reply_ok`, `operator_retry`, ...).
    pub cause: String,
    /// The step concerned.
    pub step: Option<String>,
    /// The command concerned.
    pub command_id: Option<String>,
    /// The state before.
    pub from: Option<String>,
    /// The state after.
    pub to: String,
    /// The error involved.
    pub error: Option<String>,
}

/// A saga's journal.
#[derive(Debug, Serialize, ToSchema)]
pub struct JournalView {
    /// The saga.
    pub saga_id: String,
    /// Every transition, oldest first.
    pub entries: Vec<JournalEntryView>,
}

/// An abort request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AbortBody {
    /// Why, for the journal (1 to 1024 characters, not only white space).
    #[schema(min_length = 1, max_length = 1024, pattern = r"\S")]
    pub reason: String,
}

/// What an operator action did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActionResponse {
    /// The saga.
    pub saga_id: String,
    /// Its state right after the action.
    pub state: String,
}

fn failure(f: &Failure) -> FailureView {
    FailureView {
        code: f.code.clone(),
        message: f.message.clone(),
        retryable: f.retryable,
    }
}

fn name_of<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

fn step_view(step: &StepRecord) -> StepView {
    StepView {
        name: step.name.clone(),
        status: name_of(&step.status),
        attempts: step.attempts,
        compensation_attempts: step.compensation_attempts,
        result: step.result.clone(),
        error: step.last_error.as_ref().map(failure),
        started_at: step.started_at,
        finished_at: step.finished_at,
    }
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id(traceparent: &str) -> Option<String> {
    let id = traceparent.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

impl SagaView {
    /// The view of a saga.
    pub fn of(saga: &Saga) -> Self {
        let name = |i: usize| saga.steps.get(i).map(|s| s.name.clone());
        let wait = |w: &Wait| match w {
            Wait::Reply {
                attempt,
                timeout_at,
            } => (*attempt, "reply", *timeout_at),
            Wait::Backoff { attempt, until } => (*attempt, "backoff", *until),
        };
        let (current_step, waiting, cause, error) = match &saga.state {
            SagaState::Running { step, wait: w } => (name(*step), Some(wait(w)), None, None),
            SagaState::Compensating {
                step,
                wait: w,
                cause,
                ..
            } => (name(*step), Some(wait(w)), Some(failure(cause)), None),
            SagaState::Completed => (None, None, None, None),
            SagaState::Compensated { cause } => (None, None, Some(failure(cause)), None),
            SagaState::Failed {
                step, error, cause, ..
            } => (
                name(*step),
                None,
                Some(failure(cause)),
                Some(failure(error)),
            ),
        };
        Self {
            saga_id: saga.id.clone(),
            saga_type: saga.saga_type.clone(),
            version: saga.version,
            key: saga.key.clone(),
            state: saga.phase().as_str().to_owned(),
            current_step,
            attempt: waiting.map(|w| w.0),
            waiting_for: waiting.map(|w| w.1.to_owned()),
            waiting_until: waiting.map(|w| w.2),
            cause,
            error,
            steps: saga.steps.iter().map(step_view).collect(),
            input: saga.input.clone(),
            created_at: saga.created_at,
            updated_at: saga.updated_at,
            deadline_at: saga.deadline_at,
            transitions: saga.transitions,
            trace_id: saga.traceparent.as_deref().and_then(trace_id),
        }
    }
}

impl JournalEntryView {
    fn of(entry: &Entry) -> Self {
        Self {
            seq: entry.seq,
            at: entry.at,
            actor: name_of(&entry.actor),
            operator: entry.operator.clone(),
            cause: name_of(&entry.cause),
            step: entry.step.clone(),
            command_id: entry.command_id.clone(),
            from: entry.from.map(|p| p.as_str().to_owned()),
            to: entry.to.as_str().to_owned(),
            error: entry.error.clone(),
        }
    }
}

/// Start a saga (or find the one its key already started).
#[utoipa::path(
    post, path = "/v1/sagas/{id}", tag = "sagas",
    params(
        ("id" = String, Path, description = "The saga type to start (the one path shape `/v1/sagas/{id}` serves both: POST takes a type, GET an id)"),
        ("Idempotency-Key" = Option<String>, Header, description = "The start key, instead of `key` in the body"),
    ),
    request_body = StartBody,
    responses(
        (status = 201, description = "Started; `Location` names the saga", body = StartResponse),
        (status = 200, description = "The key had already started this saga", body = StartResponse),
        (status = 400, description = "Malformed body or key", body = ErrorBody),
        (status = 404, description = "Unknown saga type", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 409, description = "`key_horizon_passed`: requested longer ago than the key horizon and the key has no saga", body = ErrorBody),
        (status = 422, description = "The input breaks the schema", body = ErrorBody),
        (status = 503, description = "`overloaded`: admission control holds new starts (more sagas under way than finish in `engine.admission-window`), retry later; or NATS unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn start(
    State(handle): State<Handle>,
    Path(saga_type): Path<String>,
    headers: HeaderMap,
    Json(body): Json<StartBody>,
) -> Result<Response, HttpError> {
    let header_key = match headers.get(IDEMPOTENCY_KEY) {
        Some(value) => Some(value.to_str().map_err(|_| {
            HttpError::bad_request(code::INVALID_KEY, "Idempotency-Key must be visible ASCII")
        })?),
        None => None,
    };
    let key = match (body.key.as_deref(), header_key) {
        (Some(a), Some(b)) if a != b => {
            return Err(HttpError::bad_request(
                code::INVALID_KEY,
                "the body's key and the Idempotency-Key header differ",
            ));
        }
        (Some(key), _) | (None, Some(key)) => key.to_owned(),
        (None, None) => {
            return Err(HttpError::bad_request(
                code::INVALID_KEY,
                "give the start key as `key` in the body or as the Idempotency-Key header",
            ));
        }
    };
    if key.is_empty() || key.len() > 1024 {
        return Err(HttpError::bad_request(
            code::INVALID_KEY,
            "the start key must be 1 to 1024 bytes",
        ));
    }
    let Started { saga_id, created } = handle
        .start_requested(&saga_type, &key, body.input, None, body.requested_at)
        .await?;
    let saga = handle.saga(&saga_id).await.ok().flatten();
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let location = format!("/v1/sagas/{saga_id}");
    let body = StartResponse {
        saga_id,
        created,
        saga: saga.as_ref().map(SagaView::of),
    };
    Ok((status, [(LOCATION, location)], axum::Json(body)).into_response())
}

async fn load(handle: &Handle, id: &str) -> Result<Saga, HttpError> {
    check_saga_id(id)?;
    handle
        .saga(id)
        .await?
        .ok_or_else(|| HttpError::saga_not_found(id))
}

/// A saga by id.
#[utoipa::path(
    get, path = "/v1/sagas/{id}", tag = "sagas",
    params(("id" = String, Path, description = "The saga id", pattern = r"^[!-)+-\-/-=?-~]{1,256}$")),
    responses(
        (status = 200, body = SagaView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such saga", body = ErrorBody),
        (status = 503, description = "NATS or the journal is unavailable, or the orchestrator is stopping", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(handle): State<Handle>,
    Path(id): Path<String>,
) -> Result<axum::Json<SagaView>, HttpError> {
    Ok(axum::Json(SagaView::of(&load(&handle, &id).await?)))
}

/// A saga by its type and business key: "what happened to order X".
#[utoipa::path(
    get, path = "/v1/sagas/{id}/keys/{key}", tag = "sagas",
    params(
        ("id" = String, Path, description = "The saga type"),
        ("key" = String, Path, description = "The business key it was started with"),
    ),
    responses(
        (status = 200, body = SagaView),
        (status = 404, description = "Unknown saga type, or no saga for this key", body = ErrorBody),
        (status = 503, description = "NATS or the journal is unavailable, or the orchestrator is stopping", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn by_key(
    State(handle): State<Handle>,
    Path((saga_type, key)): Path<(String, String)>,
) -> Result<axum::Json<SagaView>, HttpError> {
    if !handle.definitions().iter().any(|d| d.name == saga_type) {
        return Err(ApiError::UnknownType(saga_type).into());
    }
    let id = jetsaga_sagas::protocol::saga_id(&saga_type, &key);
    let saga = handle.saga(&id).await?.ok_or_else(|| {
        HttpError::new(
            StatusCode::NOT_FOUND,
            code::SAGA_NOT_FOUND,
            format!("no {saga_type} saga has key {key}"),
        )
    })?;
    Ok(axum::Json(SagaView::of(&saga)))
}

/// A saga's journal: every transition, oldest first.
#[utoipa::path(
    get, path = "/v1/sagas/{id}/journal", tag = "sagas",
    params(("id" = String, Path, description = "The saga id", pattern = r"^[!-)+-\-/-=?-~]{1,256}$")),
    responses(
        (status = 200, body = JournalView),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such saga", body = ErrorBody),
        (status = 503, description = "NATS or the journal is unavailable, or the orchestrator is stopping", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn journal(
    State(handle): State<Handle>,
    Path(id): Path<String>,
) -> Result<axum::Json<JournalView>, HttpError> {
    check_saga_id(&id)?;
    let entries = handle.journal(&id).await?;
    if entries.is_empty() {
        return Err(HttpError::saga_not_found(&id));
    }
    Ok(axum::Json(JournalView {
        saga_id: id,
        entries: entries.iter().map(JournalEntryView::of).collect(),
    }))
}

/// What an operator's action met: a 409 carries the saga's current state.
async fn refused(handle: &Handle, id: &str, error: ApiError) -> HttpError {
    let state = match &error {
        ApiError::NotAllowed(_) => handle.saga(id).await.ok().flatten(),
        _ => None,
    };
    let http = HttpError::from(error);
    match state {
        Some(saga) => http.with_state(saga.phase().as_str()),
        None => http,
    }
}

/// Retry a failed saga: a new round of compensation attempts.
#[utoipa::path(
    post, path = "/v1/sagas/{id}/retry", tag = "sagas",
    params(("id" = String, Path, description = "The saga id", pattern = r"^[!-)+-\-/-=?-~]{1,256}$")),
    responses(
        (status = 200, description = "Resumed", body = ActionResponse),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such saga", body = ErrorBody),
        (status = 409, description = "The saga is not failed; `state` says what it is", body = ErrorBody),
        (status = 503, description = "NATS or the journal is unavailable, or the orchestrator is stopping", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn retry(
    State(handle): State<Handle>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<axum::Json<ActionResponse>, HttpError> {
    check_saga_id(&id)?;
    match handle.retry(&id, &caller.0).await {
        Ok(phase) => Ok(axum::Json(ActionResponse {
            saga_id: id,
            state: phase.as_str().to_owned(),
        })),
        Err(e) => Err(refused(&handle, &id, e).await),
    }
}

/// Abort a running saga before its pivot: it compensates.
#[utoipa::path(
    post, path = "/v1/sagas/{id}/abort", tag = "sagas",
    params(("id" = String, Path, description = "The saga id", pattern = r"^[!-)+-\-/-=?-~]{1,256}$")),
    request_body = AbortBody,
    responses(
        (status = 200, description = "Compensating", body = ActionResponse),
        (status = 400, description = "Malformed id or body", body = ErrorBody),
        (status = 404, description = "No such saga", body = ErrorBody),
        (status = 409, description = "Not running before its pivot; `state` says what it is", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 503, description = "NATS or the journal is unavailable, or the orchestrator is stopping", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn abort(
    State(handle): State<Handle>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Json(body): Json<AbortBody>,
) -> Result<axum::Json<ActionResponse>, HttpError> {
    check_saga_id(&id)?;
    if body.reason.trim().is_empty() || body.reason.chars().count() > 1024 {
        return Err(HttpError::bad_request(
            code::INVALID_BODY,
            "reason must be 1 to 1024 characters",
        ));
    }
    match handle.abort(&id, &body.reason, &caller.0).await {
        Ok(phase) => Ok(axum::Json(ActionResponse {
            saga_id: id,
            state: phase.as_str().to_owned(),
        })),
        Err(e) => Err(refused(&handle, &id, e).await),
    }
}

/// Filters and paging of the saga listing.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this saga type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub saga_type: Option<String>,
    /// Only this state.
    pub state: Option<String>,
    /// Only stuck sagas (parked failed, or waiting on a step longer than twice its timeout).
    pub stuck: Option<bool>,
    /// Only sagas last updated before this time (RFC 3339).
    pub updated_before: Option<DateTime<Utc>>,
    /// Only sagas last updated after this time (RFC 3339).
    pub updated_after: Option<DateTime<Utc>>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// Where the previous page ended (`next_cursor`).
    pub cursor: Option<String>,
}

/// One saga in a listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct SagaSummary {
    /// Its id.
    pub saga_id: String,
    /// Its type.
    pub saga_type: String,
    /// Its state.
    pub state: String,
    /// Its current step.
    pub current_step: Option<String>,
    /// Its business key (absent unless printable ASCII of at most 256 bytes).
    pub key: Option<String>,
    /// When it started.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Its armed timer.
    pub timer_at: Option<DateTime<Utc>>,
    /// Parked failed, or waiting on its step longer than twice the step's timeout.
    pub stuck: bool,
}

/// A page of sagas.
#[derive(Debug, Serialize, ToSchema)]
pub struct SagaPage {
    /// Newest (most recently updated) first.
    pub items: Vec<SagaSummary>,
    /// Pass as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// Cursors are `s<updated ms>.<journal sequence>`.
const CURSOR_PREFIX: &str = "s";

fn parse_cursor(cursor: &str) -> Option<crate::index::Position> {
    let (at, seq) = cursor.strip_prefix(CURSOR_PREFIX)?.split_once('.')?;
    Some((at.parse().ok()?, seq.parse().ok()?))
}

/// Sagas, newest first, filtered, in pages. Every live and parked failed saga is
/// listed, and the newest `engine.listing-max-finished` finished ones; an older
/// finished saga is still read by id until its record expires.
#[utoipa::path(
    get, path = "/v1/sagas", tag = "sagas",
    params(ListQuery),
    responses(
        (status = 200, body = SagaPage),
        (status = 400, description = "Bad filter, limit or cursor", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(handle): State<Handle>,
    Query(query): Query<ListQuery>,
) -> Result<axum::Json<SagaPage>, HttpError> {
    let limit = super::dead_letters::page_size(query.limit)?;
    let phase = match query.state.as_deref() {
        Some(s) => Some(
            s.parse::<jetsaga_sagas::Phase>()
                .map_err(|e| HttpError::bad_request(code::INVALID_QUERY, e))?,
        ),
        None => None,
    };
    let before = match query.cursor.as_deref() {
        Some(c) => Some(
            parse_cursor(c)
                .ok_or_else(|| HttpError::bad_request(code::INVALID_CURSOR, "invalid cursor"))?,
        ),
        None => None,
    };
    let filter = crate::index::Filter {
        saga_type: query.saga_type,
        phase,
        stuck: query.stuck,
        updated_before: query.updated_before,
        updated_after: query.updated_after,
    };
    let page = handle.index().page(&filter, before, limit, Utc::now());
    Ok(axum::Json(SagaPage {
        items: page
            .items
            .into_iter()
            .map(|s| SagaSummary {
                saga_id: s.saga_id,
                saga_type: s.saga_type,
                state: s.phase.as_str().to_owned(),
                current_step: s.step,
                key: s.key,
                created_at: s.created,
                updated_at: s.updated,
                timer_at: s.timer_at,
                stuck: s.stuck,
            })
            .collect(),
        next_cursor: page
            .next
            .map(|(at, seq)| format!("{CURSOR_PREFIX}{at}.{seq}")),
    }))
}
