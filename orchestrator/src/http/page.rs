//! The operator web page: static HTML and JavaScript embedded in the binary,
//! calling the same API as everyone else.

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::Handle;

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");

/// `/` and its script.
pub fn routes() -> Router<Handle> {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(script))
}

async fn index() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/html; charset=utf-8")], INDEX)
}

async fn script() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT)
}
