//! The REST API under `/v1` (see `bramble_api::rest` for the contract) and its errors.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bramble_api::manifest::Kind;
use bramble_api::parse::ManifestError;
use bramble_api::rest::{ApiErrorBody, ApplyRequest, VersionInfo};
use bramble_api::wire::ControllerMessage;
use serde::Deserialize;

use crate::auth::Role;
use crate::cluster::{Cluster, LogEvent};
use crate::hub;

/// An error answer: HTTP status plus `{code, message, details}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ApiErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ApiErrorBody {
                code: code.into(),
                message: message.into(),
                details: Vec::new(),
            },
        }
    }
    /// 422 with every manifest problem.
    pub fn invalid_manifest(details: Vec<ManifestError>) -> ApiError {
        let message = match details.as_slice() {
            [one] => format!("invalid manifest: {one}"),
            many => format!("invalid manifests: {} problems", many.len()),
        };
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            body: ApiErrorBody {
                code: "invalid_manifest".into(),
                message,
                details,
            },
        }
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// 409.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    /// 401.
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        )
    }
    /// 403: a valid token that may not do this.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// 503.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

impl From<crate::store::Error> for ApiError {
    fn from(e: crate::store::Error) -> ApiError {
        tracing::error!(error = %e, "store failure");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store",
            format!("store failure: {e}"),
        )
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> ApiError {
        tracing::error!(error = %e, "internal failure");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

type Shared = State<Arc<Cluster>>;

/// The HTTP routes. Everything under `/v1` needs a bearer token.
pub fn router(cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/status", get(status))
        .route("/v1/apply", axum::routing::post(apply))
        .route("/v1/workloads", get(list_workloads))
        .route(
            "/v1/workloads/{kind}/{name}",
            get(get_workload).delete(delete_workload),
        )
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", get(get_node))
        .route("/v1/nodes/{name}/cordon", axum::routing::post(cordon))
        .route("/v1/nodes/{name}/uncordon", axum::routing::post(uncordon))
        .route("/v1/nodes/{name}/drain", axum::routing::post(drain))
        .route("/v1/events", get(events))
        .route("/v1/cronjobs", get(list_cronjobs))
        .route("/v1/cronjobs/{name}", get(get_cronjob))
        .route("/v1/cronjobs/{name}/run", axum::routing::post(cron_run))
        .route(
            "/v1/cronjobs/{name}/suspend",
            axum::routing::post(cron_suspend),
        )
        .route(
            "/v1/cronjobs/{name}/resume",
            axum::routing::post(cron_resume),
        )
        .route("/v1/tasks", get(list_tasks))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/tasks/{id}/logs", get(task_logs))
        .route("/v1/agent", get(hub::agent))
        .merge(crate::dashboard::routes())
        .merge(crate::webhooks::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            cluster.clone(),
            authenticate,
        ))
        .layer(middleware::from_fn_with_state(
            cluster.clone(),
            crate::telemetry::track,
        ))
        .with_state(cluster)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Admits the admin token everywhere under `/v1`, the join token only on the agent link,
/// a viewer token on reads (see [`crate::auth::access`]).
async fn authenticate(State(c): Shared, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !path.starts_with("/v1/") && path != "/v1" {
        return next.run(req).await;
    }
    let role: Option<Role> = bearer(req.headers()).and_then(|t| c.tokens.role(t));
    match crate::auth::access(role, req.method(), path) {
        crate::auth::Access::Allowed => next.run(req).await,
        crate::auth::Access::Forbidden => {
            tracing::debug!(path = %path, method = %req.method(), "refused a viewer token");
            ApiError::forbidden(format!(
                "the viewer token is read-only: {} {path} needs the admin token",
                req.method()
            ))
            .into_response()
        }
        crate::auth::Access::Unauthenticated => {
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

async fn version() -> Json<VersionInfo> {
    Json(VersionInfo {
        version: bramble_api::VERSION.into(),
        api_version: bramble_api::manifest::API_VERSION.into(),
        protocol: bramble_api::wire::PROTOCOL_VERSION,
    })
}

#[tracing::instrument(skip_all)]
async fn apply(
    State(c): Shared,
    body: Result<Json<ApplyRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body
        .map_err(|e| ApiError::bad_request(format!("invalid apply request: {}", e.body_text())))?;
    Ok(Json(c.apply(&req)?).into_response())
}

fn parse_kind(s: &str) -> Result<Kind, ApiError> {
    s.parse()
        .map_err(|e: bramble_api::manifest::UnknownKind| ApiError::bad_request(e.to_string()))
}

#[derive(Deserialize)]
struct KindQuery {
    kind: Option<String>,
}

async fn list_workloads(
    State(c): Shared,
    Query(q): Query<KindQuery>,
) -> Result<Response, ApiError> {
    let kind = q.kind.as_deref().map(parse_kind).transpose()?;
    Ok(Json(c.workloads(kind)?).into_response())
}

async fn get_workload(
    State(c): Shared,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(Json(c.workload(parse_kind(&kind)?, &name)?).into_response())
}

#[tracing::instrument(skip(c))]
async fn delete_workload(
    State(c): Shared,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(Json(c.delete_workload(parse_kind(&kind)?, &name)?).into_response())
}

async fn list_nodes(State(c): Shared) -> Result<Response, ApiError> {
    Ok(Json(c.node_views()?).into_response())
}

async fn get_node(State(c): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(c.node_view(&name)?).into_response())
}

#[derive(Deserialize)]
struct TaskQuery {
    workload: Option<String>,
    node: Option<String>,
    kind: Option<String>,
}

async fn list_tasks(State(c): Shared, Query(q): Query<TaskQuery>) -> Result<Response, ApiError> {
    let kind = q.kind.as_deref().map(parse_kind).transpose()?;
    Ok(Json(c.tasks(q.workload.as_deref(), q.node.as_deref(), kind)?).into_response())
}

async fn get_task(State(c): Shared, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(c.task(&id)?).into_response())
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
    tail: Option<u32>,
}

/// Ends a log request at the agent when the HTTP client goes away.
struct LogGuard {
    cluster: Arc<Cluster>,
    node: String,
    request: u64,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.cluster.close_logs(self.request);
        if let Some(conn) = self.cluster.nodes.connection(&self.node) {
            let _ = conn.tx.try_send(ControllerMessage::CancelLogs {
                request: self.request,
            });
        }
    }
}

#[tracing::instrument(skip(c, q))]
async fn task_logs(
    State(c): Shared,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let task = c.task(&id)?;
    // A finished run's output outlives its container and its node's link.
    if let Some(out) = &task.output {
        let text = match q.tail {
            Some(n) => {
                let lines: Vec<&str> = out.lines().collect();
                let from = lines.len().saturating_sub(n as usize);
                lines[from..].iter().map(|l| format!("{l}\n")).collect()
            }
            None => out.clone(),
        };
        let gone = task.container_id.is_none()
            || c.nodes
                .connection(task.node.as_deref().unwrap_or(""))
                .is_none();
        if gone || task.phase.is_terminal() {
            return Ok(
                ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
            );
        }
    }
    let node = task
        .node
        .ok_or_else(|| ApiError::conflict(format!("task {id:?} is not placed on a node yet")))?;
    let conn = c.nodes.connection(&node).ok_or_else(|| {
        ApiError::unavailable(format!(
            "node {node:?} is not connected; its logs cannot be read now"
        ))
    })?;
    let (request, rx) = c.open_logs();
    let guard = LogGuard {
        cluster: c.clone(),
        node: node.clone(),
        request,
    };
    conn.tx
        .send(ControllerMessage::Logs {
            request,
            task: id.clone(),
            follow: q.follow,
            tail: q.tail,
        })
        .await
        .map_err(|_| ApiError::unavailable(format!("node {node:?} disconnected")))?;
    let stream = futures_util::stream::unfold((rx, Some(guard)), |(mut rx, guard)| async move {
        guard.as_ref()?;
        match rx.recv().await {
            Some(LogEvent::Data(d)) => Some((Ok::<_, std::io::Error>(d), (rx, guard))),
            Some(LogEvent::End(Some(err))) => Some((Ok(format!("error: {err}\n")), (rx, None))),
            Some(LogEvent::End(None)) | None => None,
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

#[tracing::instrument(skip(c))]
async fn cordon(State(c): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(c.cordon(&name, true)?).into_response())
}

#[tracing::instrument(skip(c))]
async fn uncordon(State(c): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(c.cordon(&name, false)?).into_response())
}

#[derive(Deserialize)]
struct DrainQuery {
    timeout: Option<String>,
}

/// Cordons the node, evicts its tasks and waits until they have all left (or the
/// timeout passes: then `remaining` says how many are still there).
#[tracing::instrument(skip(c, q))]
async fn drain(
    State(c): Shared,
    Path(name): Path<String>,
    Query(q): Query<DrainQuery>,
) -> Result<Response, ApiError> {
    let timeout = match q.timeout.as_deref() {
        None => std::time::Duration::from_secs(300),
        Some(t) => t
            .parse::<bramble_api::duration::Duration>()
            .map_err(|e| ApiError::bad_request(format!("timeout: {e}")))?
            .std(),
    };
    let moved = c.start_drain(&name)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let remaining = loop {
        let left = c.drain_remaining(&name)?;
        if left == 0 || tokio::time::Instant::now() >= deadline {
            break left;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    if remaining == 0 {
        c.record(vec![crate::events::Draft::normal(
            format!("node/{name}"),
            "Drained",
            format!("{moved} tasks moved away"),
        )]);
    }
    Ok(Json(bramble_api::rest::DrainResponse {
        node: name,
        moved,
        remaining,
    })
    .into_response())
}

#[derive(Deserialize)]
struct EventQuery {
    #[serde(default)]
    since: u64,
    object: Option<String>,
    #[serde(default)]
    watch: bool,
}

/// Stored events; with `watch`, newline-delimited JSON that goes on as events happen.
async fn events(State(c): Shared, Query(q): Query<EventQuery>) -> Result<Response, ApiError> {
    if !q.watch {
        return Ok(Json(
            c.events
                .list(c.store.as_ref(), q.since, q.object.as_deref())?,
        )
        .into_response());
    }
    // Subscribe before reading the backlog, so nothing falls between the two.
    let live = c.events.subscribe();
    let backlog = c
        .events
        .list(c.store.as_ref(), q.since, q.object.as_deref())?;
    let last = backlog.last().map_or(q.since, |e| e.seq);
    let object = q.object.clone();
    let line = |e: &bramble_api::rest::Event| {
        let mut s = serde_json::to_string(e).unwrap_or_default();
        s.push('\n');
        Ok::<_, std::io::Error>(s)
    };
    let head = futures_util::stream::iter(backlog.iter().map(line).collect::<Vec<_>>());
    let tail = futures_util::stream::unfold((live, last), move |(mut live, last)| {
        let object = object.clone();
        async move {
            loop {
                match live.recv().await {
                    Ok(e)
                        if e.seq > last
                            && object.as_deref().is_none_or(|o| {
                                e.object == o || e.object.starts_with(&format!("{o}-"))
                            }) =>
                    {
                        let mut s = serde_json::to_string(&e).unwrap_or_default();
                        s.push('\n');
                        return Some((Ok::<_, std::io::Error>(s), (live, e.seq)));
                    }
                    Ok(_) => continue,
                    // A watcher too slow for the broadcast buffer misses events; say so.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "event watcher lagging");
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    use futures_util::StreamExt;
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(head.chain(tail)))
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

async fn list_cronjobs(State(c): Shared) -> Result<Response, ApiError> {
    Ok(Json(c.cronjobs(chrono::Utc::now())?).into_response())
}

async fn get_cronjob(State(c): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(c.cronjob(&name, chrono::Utc::now())?).into_response())
}

#[tracing::instrument(skip(c))]
async fn cron_run(State(c): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(c.cron_run_now(&name, chrono::Utc::now())?).into_response())
}

#[tracing::instrument(skip(c))]
async fn cron_suspend(State(c): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(c.cron_suspend(&name, true, chrono::Utc::now())?).into_response())
}

#[tracing::instrument(skip(c))]
async fn cron_resume(State(c): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(c.cron_suspend(&name, false, chrono::Utc::now())?).into_response())
}

async fn status(State(c): Shared) -> Result<Response, ApiError> {
    Ok(Json(bramble_api::rest::StatusInfo {
        version: bramble_api::VERSION.into(),
        revision: c.store.revision()?,
        store_writes: c.store.write_count(),
        uptime_secs: c.started.elapsed().as_secs(),
    })
    .into_response())
}
