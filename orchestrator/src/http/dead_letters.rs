//! `/v1/dead-letters`: list, redrive and delete what nobody could handle.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ErrorBody, HttpError, Path, Query, code};
use crate::Handle;
use crate::dead::{self, Letter};

/// Default and largest page sizes.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

/// Filters and paging of the dead letters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only letters from this source (`participant.inventory`, `orchestrator.replies`).
    #[param(pattern = r"^[!-)+-\-/-=?-~]+(\.[!-)+-\-/-=?-~]+)*$")]
    pub source: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// Where the previous page ended (`next_cursor`).
    #[param(pattern = "^[1-9][0-9]{0,19}$")]
    pub cursor: Option<String>,
}

/// One dead letter.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterView {
    /// Its id (the sequence in `JETSAGA_DEAD_LETTERS`).
    pub id: u64,
    /// Where it failed.
    pub source: String,
    /// Why.
    pub reason: Option<String>,
    /// The subject it was consumed from (where a redrive sends it).
    pub subject: Option<String>,
    /// Its headers, the dead-letter ones included.
    pub headers: Vec<HeaderView>,
    /// Its body as text (invalid UTF-8 replaced).
    pub payload: String,
    /// When it was dead-lettered.
    pub at: chrono::DateTime<chrono::Utc>,
}

/// One header.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeaderView {
    /// The name.
    pub name: String,
    /// The value.
    pub value: String,
}

/// A page of dead letters.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterPage {
    /// Oldest first.
    pub items: Vec<DeadLetterView>,
    /// Pass as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// What a redrive did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Redriven {
    /// The letter.
    pub id: u64,
    /// Where it was published again.
    pub subject: String,
}

fn view(letter: Letter) -> DeadLetterView {
    DeadLetterView {
        id: letter.id,
        source: letter.source,
        reason: letter.reason,
        subject: letter.subject,
        headers: letter
            .headers
            .into_iter()
            .map(|(name, value)| HeaderView { name, value })
            .collect(),
        payload: String::from_utf8_lossy(&letter.payload).into_owned(),
        at: letter.at,
    }
}

impl From<dead::Error> for HttpError {
    fn from(error: dead::Error) -> Self {
        match &error {
            dead::Error::NotFound(_) => HttpError::new(
                StatusCode::NOT_FOUND,
                code::DEAD_LETTER_NOT_FOUND,
                error.to_string(),
            ),
            dead::Error::InvalidSource(_) => {
                HttpError::bad_request(code::INVALID_QUERY, error.to_string())
            }
            dead::Error::NotRedrivable { .. } => {
                HttpError::new(StatusCode::CONFLICT, code::NOT_ALLOWED, error.to_string())
            }
            dead::Error::Stream(_) => {
                tracing::warn!(%error, "dead-letter request failed");
                HttpError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    code::UNAVAILABLE,
                    "the dead-letter stream is unavailable",
                )
            }
        }
    }
}

/// The page size of `limit` (default 50, 1 to 500).
pub fn page_size(limit: Option<u32>) -> Result<usize, HttpError> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n as usize),
        n => Err(HttpError::bad_request(
            code::INVALID_QUERY,
            format!("limit must be between 1 and {MAX_LIMIT}, not {n}"),
        )),
    }
}

/// Dead letters, oldest first.
#[utoipa::path(
    get, path = "/v1/dead-letters", tag = "dead-letters",
    params(ListQuery),
    responses(
        (status = 200, body = DeadLetterPage),
        (status = 400, description = "Bad source, limit or cursor", body = ErrorBody),
        (status = 503, description = "The dead-letter stream is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(handle): State<Handle>,
    Query(query): Query<ListQuery>,
) -> Result<axum::Json<DeadLetterPage>, HttpError> {
    let limit = page_size(query.limit)?;
    let from = match query.cursor.as_deref() {
        None => 1,
        Some(c) => c
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| HttpError::bad_request(code::INVALID_CURSOR, "invalid cursor"))?,
    };
    let letters = handle
        .dead_letters(query.source.as_deref(), from, limit + 1)
        .await?;
    let more = letters.len() > limit;
    let items: Vec<_> = letters.into_iter().take(limit).map(view).collect();
    let next_cursor = more
        .then(|| items.last().map(|l| (l.id + 1).to_string()))
        .flatten();
    Ok(axum::Json(DeadLetterPage { items, next_cursor }))
}

fn letter_id(id: &str) -> Result<u64, HttpError> {
    id.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
        HttpError::bad_request(code::INVALID_ID, "a dead-letter id is a positive integer")
    })
}

/// Publish a dead letter again to its original subject, with its original headers.
#[utoipa::path(
    post, path = "/v1/dead-letters/{id}/redrive", tag = "dead-letters",
    params(("id" = u64, Path, description = "The dead letter's id", minimum = 1)),
    responses(
        (status = 200, body = Redriven),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such dead letter", body = ErrorBody),
        (status = 409, description = "It cannot be redriven (no stream stores its subject)", body = ErrorBody),
        (status = 503, description = "The dead-letter stream is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn redrive(
    State(handle): State<Handle>,
    Path(id): Path<String>,
) -> Result<axum::Json<Redriven>, HttpError> {
    let id = letter_id(&id)?;
    let subject = handle.redrive(id).await?;
    Ok(axum::Json(Redriven { id, subject }))
}

/// Delete (discard) a dead letter.
#[utoipa::path(
    delete, path = "/v1/dead-letters/{id}", tag = "dead-letters",
    params(("id" = u64, Path, description = "The dead letter's id", minimum = 1)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Malformed id", body = ErrorBody),
        (status = 404, description = "No such dead letter", body = ErrorBody),
        (status = 503, description = "The dead-letter stream is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(handle): State<Handle>,
    Path(id): Path<String>,
) -> Result<StatusCode, HttpError> {
    let id = letter_id(&id)?;
    handle.delete_dead_letter(id).await?;
    Ok(StatusCode::NO_CONTENT)
}
