//! The HTTP side: the operator API under `/v1`, the probes, `/metrics`,
//! `/openapi.json` and the operator web page.
//!
//! - [`error`]: the one error type, its stable codes and the extractors that use it;
//! - [`auth`]: bearer tokens and roles;
//! - [`sagas`]: start, get, find by key, journal, list, retry, abort;
//! - [`dead_letters`]: list, redrive, delete;
//! - [`system`]: probes, metrics, definitions;
//! - [`page`]: the embedded web page.

pub mod auth;
pub mod dead_letters;
pub mod error;
pub mod page;
pub mod sagas;
pub mod system;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::routing::{delete, get, post};
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

pub use auth::Auth;
pub use error::HttpError;

use crate::Handle;

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "jetsaga operator API", description = "Start, inspect, list, retry and abort sagas; list, redrive and delete dead letters."),
    paths(
        sagas::start, sagas::get, sagas::by_key, sagas::journal, sagas::list,
        sagas::retry, sagas::abort,
        dead_letters::list, dead_letters::redrive, dead_letters::delete,
        system::definitions, system::healthz, system::readyz, system::metrics,
    ),
    modifiers(&Bearer),
)]
pub struct ApiDoc;

/// The bearer scheme, and the answers of the token check on the routes that need a token.
struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        // What the token check answers, on every route behind it: 401 everywhere, 403 on the
        // changes (a `read` token on an `operate` route). Added here so no route can miss them.
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                (&mut item.get, false),
                (&mut item.post, true),
                (&mut item.put, true),
                (&mut item.patch, true),
                (&mut item.delete, true),
            ];
            for (operation, changes) in operations {
                let Some(operation) = operation.as_mut() else {
                    continue;
                };
                if operation.security.as_ref().is_none_or(Vec::is_empty) {
                    continue;
                }
                let responses = &mut operation.responses.responses;
                responses.insert(
                    "401".to_owned(),
                    error_response("No token, or an unknown one"),
                );
                if changes {
                    responses.insert(
                        "403".to_owned(),
                        error_response("The token's role (`read`) does not allow this"),
                    );
                }
            }
        }
    }
}

fn error_response(description: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into()
}

/// What the router needs from the `[http]` configuration.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// The tokens guarding the `/v1` routes.
    pub auth: Auth,
    /// What the web page is told.
    pub page: page::Settings,
}

impl Settings {
    /// Reads the `[http]` section (token files included).
    ///
    /// # Errors
    ///
    /// [`crate::config::Error`] naming the token whose file cannot be read.
    pub fn from_config(http: &crate::config::Http) -> Result<Self, crate::config::Error> {
        Ok(Self {
            auth: Auth::from_config(http)?,
            page: page::Settings {
                jaeger_url: http.jaeger_url.clone(),
            },
        })
    }
}

/// The router for a running orchestrator; `settings.auth` guards the `/v1` routes.
pub fn router(handle: Handle, settings: Settings) -> Router {
    let Settings { auth, page } = settings;
    let reads = Router::new()
        .route("/v1/sagas", get(sagas::list))
        .route("/v1/sagas/{id}", get(sagas::get))
        .route("/v1/sagas/{id}/keys/{key}", get(sagas::by_key))
        .route("/v1/sagas/{id}/journal", get(sagas::journal))
        .route("/v1/dead-letters", get(dead_letters::list))
        .route("/v1/definitions", get(system::definitions))
        .route_layer(from_fn_with_state(auth.clone(), auth::read));
    let changes = Router::new()
        .route("/v1/sagas/{id}", post(sagas::start))
        .route("/v1/sagas/{id}/retry", post(sagas::retry))
        .route("/v1/sagas/{id}/abort", post(sagas::abort))
        .route("/v1/dead-letters/{id}/redrive", post(dead_letters::redrive))
        .route("/v1/dead-letters/{id}", delete(dead_letters::delete))
        .route_layer(from_fn_with_state(auth.clone(), auth::operate));
    let probes = Router::new()
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics))
        .route_layer(from_fn_with_state(auth, auth::probe));
    let open = Router::new()
        .route("/openapi.json", get(openapi))
        .merge(page::routes(page));
    Router::new()
        .merge(reads)
        .merge(changes)
        .merge(probes)
        .merge(open)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(error::MAX_BODY))
        .route_layer(axum::middleware::from_fn({
            let metrics = handle.metrics().clone();
            move |request, next| crate::metrics::track_http(metrics.clone(), request, next)
        }))
        .with_state(handle)
}

async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

async fn not_found() -> HttpError {
    HttpError::new(
        StatusCode::NOT_FOUND,
        error::code::NOT_FOUND,
        "no such route",
    )
}

async fn method_not_allowed() -> HttpError {
    HttpError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        error::code::METHOD_NOT_ALLOWED,
        "this route does not take this method",
    )
}
