//! The HTTP edge: one router for the REST API under `/v1` (see `bramble_api::rest`),
//! the agent link, the dashboard and its stream, `/metrics`; one bearer-token check for
//! all of it ([`authenticate`]); one error answer ([`ApiError`]) made from the domain's
//! errors. Nothing outside this module knows about axum.
//!
//! # Layout
//! - [`auth`]: the tokens and who may do what.
//! - [`error`]: the one error answer, `ApiError`.
//! - [`handlers`]: the REST handlers.
//! - [`hub`]: the `/v1/agent` WebSocket, one per node.
//! - [`dashboard`]: the page, its assets and its live stream.
//! - [`metrics`]: `/metrics` and request latency.
//! - [`serve`]: HTTP over TLS, with bounds on handshakes, headers and connections.
//! - [`tls`]: the cluster CA and this controller's certificate.

pub mod auth;
pub mod dashboard;
pub mod error;
pub mod exec;
pub mod handlers;
pub mod hub;
pub mod metrics;
pub mod serve;
pub mod tls;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use error::ApiError;

use crate::loops::feed::Feed;
use crate::loops::webhooks::Webhooks;
use auth::{Access, Role, Tokens};

/// What the handlers share.
pub struct App {
    /// The cluster's state.
    pub state: Arc<crate::state::State>,
    /// Bearer tokens.
    pub tokens: Tokens,
    /// The dashboard's live streams.
    pub feed: Arc<Feed>,
    /// Event notifications.
    pub webhooks: Arc<Webhooks>,
    /// Request latency, for `/metrics`.
    pub latency: metrics::Latency,
    /// Whether the viewer token may read task logs and job output.
    pub viewer_logs: bool,
    /// Opens Secret values for apply and for the nodes whose tasks reference them.
    pub vault: Arc<crate::state::vault::Vault>,
    /// Agent links open at once ([`hub::MAX_AGENT_LINKS`]).
    pub links: Arc<tokio::sync::Semaphore>,
    /// This controller, as `GET /v1/controllers` shows it (`since`: its start).
    pub me: crate::state::leader::LeaderRecord,
    /// Signs the nodes' agent-to-agent certificates at their Hello.
    pub nodes: Arc<crate::pki::NodeSigner>,
}

/// The handlers' state.
pub type Shared = State<Arc<App>>;

/// The HTTP routes. Everything under `/v1` and `/metrics` needs a bearer token.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/version", get(handlers::version))
        .route("/v1/status", get(handlers::status))
        .route("/v1/controllers", get(handlers::list_controllers))
        .route("/v1/apply", post(handlers::apply))
        .route("/v1/workloads", get(handlers::list_workloads))
        .route("/v1/secrets", get(handlers::list_secrets))
        .route(
            "/v1/secrets/{name}",
            get(handlers::get_secret).delete(handlers::delete_secret),
        )
        .route(
            "/v1/workloads/{kind}/{name}",
            get(handlers::get_workload).delete(handlers::delete_workload),
        )
        .route(
            "/v1/workloads/{kind}/{name}/restart",
            post(handlers::restart),
        )
        .route("/v1/workloads/{kind}/{name}/scale", post(handlers::scale))
        .route("/v1/tasks/{id}/restart", post(handlers::restart_task))
        .route("/v1/tasks/{id}/exec", get(exec::exec))
        .route("/v1/volumes", get(handlers::list_volumes))
        .route("/v1/volumes/{name}", get(handlers::get_volume))
        .route("/v1/endpoints", get(handlers::list_endpoints))
        .route("/v1/endpoints/{name}", get(handlers::get_endpoint))
        .route("/v1/nodes", get(handlers::list_nodes))
        .route(
            "/v1/nodes/{name}",
            get(handlers::get_node).delete(handlers::delete_node),
        )
        .route("/v1/nodes/{name}/cordon", post(handlers::cordon))
        .route("/v1/nodes/{name}/uncordon", post(handlers::uncordon))
        .route("/v1/nodes/{name}/drain", post(handlers::drain))
        .route("/v1/events", get(handlers::events))
        .route("/v1/cronjobs", get(handlers::list_cronjobs))
        .route("/v1/cronjobs/{name}", get(handlers::get_cronjob))
        .route("/v1/cronjobs/{name}/run", post(handlers::cron_run))
        .route("/v1/cronjobs/{name}/suspend", post(handlers::cron_suspend))
        .route("/v1/cronjobs/{name}/resume", post(handlers::cron_resume))
        .route("/v1/tasks", get(handlers::list_tasks))
        .route("/v1/tasks/{id}", get(handlers::get_task))
        .route("/v1/tasks/{id}/logs", get(handlers::task_logs))
        .route("/v1/webhooks", get(handlers::list_webhooks))
        .route("/v1/webhooks/{name}/test", post(handlers::test_webhook))
        .route("/v1/stream", get(dashboard::stream))
        .route("/v1/agent", get(hub::agent))
        .route("/metrics", get(metrics::metrics))
        .merge(dashboard::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), authenticate))
        .layer(middleware::from_fn_with_state(app.clone(), metrics::track))
        .with_state(app)
}

/// The bearer token of a request, if it has one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Who a request is, by its token: one of the controller's tokens, or a node's own
/// credential (known by its hash).
pub fn role(app: &App, headers: &HeaderMap) -> Option<Role> {
    let token = bearer(headers)?;
    app.tokens.role(token).or_else(|| {
        let hash = auth::credential_hash(token);
        crate::core::ops::node_of_credential(&app.state.snapshot(), &hash).map(|_| Role::Node)
    })
}

/// The node a request's credential belongs to, if it is a node's credential.
pub fn node_of(app: &App, headers: &HeaderMap) -> Option<String> {
    let hash = auth::credential_hash(bearer(headers)?);
    crate::core::ops::node_of_credential(&app.state.snapshot(), &hash).map(str::to_string)
}

/// The one check of every request: the admin token everywhere, the join token only on
/// the agent link, a viewer token on reads (see [`auth::access`]). The page and its
/// assets hold no data and need no token.
async fn authenticate(State(app): Shared, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !auth::protected(path) {
        return next.run(req).await;
    }
    match auth::access(role(&app, req.headers()), req.method(), path) {
        Access::Allowed => next.run(req).await,
        Access::Forbidden => {
            tracing::debug!(path = %path, method = %req.method(), "refused a viewer token");
            ApiError::forbidden(format!(
                "the viewer token is read-only: {} {path} needs the admin token",
                req.method()
            ))
            .into_response()
        }
        Access::Unauthenticated => {
            tracing::debug!(path = %path, "rejected request without a valid token");
            ApiError::unauthorized().into_response()
        }
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no such endpoint: {} {}",
        req.method(),
        req.uri().path()
    ))
}
