//! The operator web page: static HTML and JavaScript embedded in the binary,
//! calling the same API as everyone else.

use axum::Router;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;

use crate::Handle;

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");

/// What the page needs to know from the server's configuration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Settings {
    /// Where trace ids link to (a Jaeger UI base URL).
    pub jaeger_url: Option<String>,
}

/// `/`, its script and `/page/settings.json`.
pub fn routes(settings: Settings) -> Router<Handle> {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(script))
        .route(
            "/page/settings.json",
            get(move || {
                let settings = settings.clone();
                async move { axum::Json(settings) }
            }),
        )
}

async fn index() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
}
