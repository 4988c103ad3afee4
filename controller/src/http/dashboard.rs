//! The web dashboard at `/`: static assets compiled into the binary (`include_str!`: no
//! CDN, no framework, no build step, works offline) and `GET /v1/stream`, the live feed
//! ([`crate::loops::feed`]) as Server-Sent Events. The page signs in with a token kept
//! in the tab's sessionStorage and reads the stream with `fetch()` (`EventSource`
//! cannot send a header), so the token travels in the Authorization header and never in
//! a URL.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;

use super::auth::Role;
use super::{role, ApiError, App};
use crate::loops::feed;

const INDEX: &str = include_str!("../../assets/dashboard/index.html");
const SCRIPT: &str = include_str!("../../assets/dashboard/app.js");
const STYLE: &str = include_str!("../../assets/dashboard/style.css");

/// Bytes of the first page load (HTML, script and style), for benchmarks.
pub const ASSET_BYTES: usize = INDEX.len() + SCRIPT.len() + STYLE.len();

// The first load must stay small (a Pi serves it, maybe over Wi-Fi): the build fails
// when the assets outgrow 40 KB.
const _: () = assert!(ASSET_BYTES < 40 * 1024, "dashboard assets exceed 40 KB");

/// The page and its assets (no token: they hold no data).
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(index))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/style.css", get(style))
        .route("/favicon.ico", get(favicon))
}

/// `GET /v1/stream`: an opening snapshot, then changes as they happen.
pub async fn stream(State(app): State<Arc<App>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let role = match role(&app, &headers) {
        Some(Role::Admin) => "admin",
        _ => "viewer",
    };
    let rx = app
        .feed
        .join(|recent| feed::opening(&app.state, role, recent))
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let body = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        // Tells nginx-like proxies not to buffer the stream.
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(body))
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Assets change only with the binary: the version is their validator.
fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::ETAG, concat!("\"", env!("CARGO_PKG_VERSION"), "\"")),
            // The page talks only to its own origin and runs only its own script.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

async fn favicon() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_its_own_assets() {
        assert!(INDEX.contains("/dashboard/app.js"));
    }
}
