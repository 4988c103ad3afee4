//! The REST handlers: each parses its request, reads a snapshot or asks the state
//! layer to run a core operation, and answers. No decision is made here.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bramble_api::manifest::Kind;
use bramble_api::parse::parse_sources;
use bramble_api::rest::{
    ApplyRequest, ControllerView, DrainResponse, Event, SecretDeleteResponse, StatusInfo,
    VersionInfo,
};
use bramble_api::wire::ControllerMessage;
use chrono::Utc;
use futures_util::StreamExt;
use serde::Deserialize;

use super::auth::Role;
use super::{role, ApiError, App, Shared};
use crate::core::events::Draft;
use crate::core::{cron, endpoints, ops, views, volumes, Change, DomainError};
use crate::state::leader;
use crate::state::logs::LogEvent;
use crate::state::Scope;

type Answer = Result<Response, ApiError>;

fn json<T: serde::Serialize>(v: T) -> Answer {
    Ok(Json(v).into_response())
}

fn parse_kind(s: &str) -> Result<Kind, ApiError> {
    s.parse()
        .map_err(|e: bramble_api::manifest::UnknownKind| ApiError::bad_request(e.to_string()))
}

/// `GET /v1/version`.
pub async fn version() -> Json<VersionInfo> {
    Json(VersionInfo {
        version: bramble_api::VERSION.into(),
        api_version: bramble_api::manifest::API_VERSION.into(),
        protocol: bramble_api::wire::PROTOCOL_VERSION,
    })
}

/// `GET /v1/status`.
pub async fn status(axum::extract::State(app): Shared) -> Answer {
    json(StatusInfo {
        version: bramble_api::VERSION.into(),
        revision: app.state.snapshot().revision,
        store_writes: app.state.store().write_count(),
        uptime_secs: app.state.started().elapsed().as_secs(),
    })
}

/// `POST /v1/apply`.
#[tracing::instrument(skip_all)]
pub async fn apply(
    axum::extract::State(app): Shared,
    body: Result<Json<ApplyRequest>, JsonRejection>,
) -> Answer {
    let Json(req) = body
        .map_err(|e| ApiError::bad_request(format!("invalid apply request: {}", e.body_text())))?;
    let docs = parse_sources(&req.sources).map_err(DomainError::InvalidManifest)?;
    let now = Utc::now();
    let answer = app
        .state
        .update("apply", Scope::Any, |snap| {
            ops::apply(snap, &docs, app.vault.as_ref(), req.dry_run, now)
        })
        .await?;
    json(answer)
}

/// Whether a request reads as the viewer does (anything but the admin token): env values
/// redacted, and no logs or job output unless `--viewer-logs`.
fn viewer(app: &App, headers: &HeaderMap) -> bool {
    role(app, headers) != Some(Role::Admin)
}

/// `GET /v1/secrets`: names and keys, never values.
pub async fn list_secrets(axum::extract::State(app): Shared) -> Answer {
    json(views::secrets_list(&app.state.snapshot()))
}

/// `GET /v1/secrets/{name}`: names and keys, never values.
pub async fn get_secret(axum::extract::State(app): Shared, Path(name): Path<String>) -> Answer {
    json(views::secret(&app.state.snapshot(), &name)?)
}

/// `DELETE /v1/secrets/{name}`: refused while a workload references it.
#[tracing::instrument(skip(app))]
pub async fn delete_secret(axum::extract::State(app): Shared, Path(name): Path<String>) -> Answer {
    app.state
        .update("secret delete", Scope::Any, |snap| {
            Ok((ops::delete_secret(snap, &name)?, ()))
        })
        .await?;
    json(SecretDeleteResponse { name })
}

#[derive(Deserialize)]
pub struct KindQuery {
    kind: Option<String>,
}

/// `GET /v1/workloads`: env values redacted for the viewer token.
pub async fn list_workloads(
    axum::extract::State(app): Shared,
    headers: HeaderMap,
    Query(q): Query<KindQuery>,
) -> Answer {
    let kind = q.kind.as_deref().map(parse_kind).transpose()?;
    let mut ws = views::workloads(&app.state.snapshot(), kind);
    if viewer(&app, &headers) {
        ws = ws.into_iter().map(views::redact_workload).collect();
    }
    json(ws)
}

/// `GET /v1/workloads/{kind}/{name}`: env values redacted for the viewer token.
pub async fn get_workload(
    axum::extract::State(app): Shared,
    headers: HeaderMap,
    Path((kind, name)): Path<(String, String)>,
) -> Answer {
    let w = views::workload(&app.state.snapshot(), parse_kind(&kind)?, &name)?;
    json(if viewer(&app, &headers) {
        views::redact_workload(w)
    } else {
        w
    })
}

/// `DELETE /v1/workloads/{kind}/{name}`.
#[tracing::instrument(skip(app))]
pub async fn delete_workload(
    axum::extract::State(app): Shared,
    Path((kind, name)): Path<(String, String)>,
) -> Answer {
    let kind = parse_kind(&kind)?;
    let answer = app
        .state
        .update("delete", Scope::Any, |snap| {
            ops::delete_workload(snap, kind, &name)
        })
        .await?;
    json(answer)
}

/// `POST /v1/workloads/{kind}/{name}/restart`.
#[tracing::instrument(skip(app))]
pub async fn restart(
    axum::extract::State(app): Shared,
    Path((kind, name)): Path<(String, String)>,
) -> Answer {
    let kind = parse_kind(&kind)?;
    let answer = app
        .state
        .update("restart", Scope::Any, |snap| {
            ops::restart(snap, kind, &name)
        })
        .await?;
    json(answer)
}

#[derive(Debug, Deserialize)]
pub struct ScaleQuery {
    replicas: Option<String>,
}

/// `POST /v1/workloads/{kind}/{name}/scale?replicas=N`.
#[tracing::instrument(skip(app))]
pub async fn scale(
    axum::extract::State(app): Shared,
    Path((kind, name)): Path<(String, String)>,
    Query(q): Query<ScaleQuery>,
) -> Answer {
    let kind = parse_kind(&kind)?;
    let replicas: u32 = q
        .replicas
        .as_deref()
        .ok_or_else(|| ApiError::bad_request("replicas=N is missing".to_string()))?
        .parse()
        .map_err(|_| {
            ApiError::bad_request(format!(
                "replicas={:?} is not a number of replicas (0 to 1000)",
                q.replicas.as_deref().unwrap_or_default()
            ))
        })?;
    let now = Utc::now();
    let answer = app
        .state
        .update("scale", Scope::Any, |snap| {
            ops::scale(snap, kind, &name, replicas, app.vault.as_ref(), now)
        })
        .await?;
    json(answer)
}

/// `POST /v1/tasks/{id}/restart`.
#[tracing::instrument(skip(app))]
pub async fn restart_task(axum::extract::State(app): Shared, Path(id): Path<String>) -> Answer {
    let requested_at = Utc::now();
    app.state
        .update("task restart", Scope::Any, |snap| {
            ops::restart_task(snap, &id)
        })
        .await?;
    json(bramble_api::rest::TaskRestartResponse {
        task: id,
        requested_at,
    })
}

fn node_view(app: &App, name: &str) -> Answer {
    json(views::node(&app.state.snapshot(), name, |n| {
        app.state.live.view(n)
    })?)
}

/// `GET /v1/controllers`: every live controller sharing the store, and who leads.
/// One controller on its own store is the only one and leads.
pub async fn list_controllers(axum::extract::State(app): Shared) -> Answer {
    let store = app.state.store();
    let members = leader::members(store)
        .await
        .map_err(|e| ApiError::from(crate::state::Error::Store(e)))?;
    let current = leader::current(store)
        .await
        .map_err(|e| ApiError::from(crate::state::Error::Store(e)))?;
    let mut views: Vec<ControllerView> = members
        .into_iter()
        .map(|m| {
            let leads = current.as_ref().filter(|(l, _)| l.id == m.id);
            ControllerView {
                answering: m.id == app.me.id,
                leader: leads.is_some(),
                leader_since: leads.map(|(l, _)| l.since),
                id: m.id,
                name: m.name,
                url: m.url,
                started: m.since,
            }
        })
        .collect();
    if !views.iter().any(|v| v.answering) {
        // Alone on its store (SQLite), or its presence not yet recorded.
        let leads = app.state.is_leading();
        views.push(ControllerView {
            id: app.me.id.clone(),
            name: app.me.name.clone(),
            url: app.me.url.clone(),
            started: app.me.since,
            leader: leads,
            leader_since: current
                .as_ref()
                .filter(|(l, _)| l.id == app.me.id)
                .map(|(l, _)| l.since)
                .or(leads.then_some(app.me.since)),
            answering: true,
        });
    }
    views.sort_by(|a, b| (a.name.as_str(), a.id.as_str()).cmp(&(b.name.as_str(), b.id.as_str())));
    json(views)
}

/// `GET /v1/nodes`.
pub async fn list_nodes(axum::extract::State(app): Shared) -> Answer {
    json(views::nodes(&app.state.snapshot(), |n| {
        app.state.live.view(n)
    }))
}

/// `GET /v1/volumes`: every managed volume, the node using it, its copies and what is
/// set aside of it, as the nodes last reported.
pub async fn list_volumes(axum::extract::State(app): Shared) -> Answer {
    json(volumes::views(
        &app.state.snapshot(),
        &app.state.live.volumes(),
    ))
}

/// `GET /v1/volumes/{name}`.
pub async fn get_volume(axum::extract::State(app): Shared, Path(name): Path<String>) -> Answer {
    volumes::views(&app.state.snapshot(), &app.state.live.volumes())
        .into_iter()
        .find(|v| v.name == name)
        .map_or_else(|| Err(DomainError::not_found("volume", name).into()), json)
}

/// `GET /v1/endpoints`: every workload's name, stable address, ports and instances.
pub async fn list_endpoints(axum::extract::State(app): Shared) -> Answer {
    let table = endpoints::table(&app.state.snapshot(), bramble_api::endpoints::DEFAULT_RANGE);
    json(table.endpoints)
}

/// `GET /v1/endpoints/{name}`: what `name` resolves to in containers (a Service before
/// a Wallet of the same name, as the resolver does).
pub async fn get_endpoint(axum::extract::State(app): Shared, Path(name): Path<String>) -> Answer {
    let table = endpoints::table(&app.state.snapshot(), bramble_api::endpoints::DEFAULT_RANGE);
    match table.lookup(&name) {
        Some(e) => json(e),
        None => Err(DomainError::not_found("endpoint", name).into()),
    }
}

/// `GET /v1/nodes/{name}`.
pub async fn get_node(axum::extract::State(app): Shared, Path(name): Path<String>) -> Answer {
    node_view(&app, &name)
}

/// `DELETE /v1/nodes/{name}`: the node and its credential go (its name can be joined
/// again); refused while its agent is connected or its Wallets may still run.
#[tracing::instrument(skip(app))]
pub async fn delete_node(axum::extract::State(app): Shared, Path(name): Path<String>) -> Answer {
    let connected = app.state.live.connection(&name).is_some();
    let suspected = app.state.snapshot().suspects.contains_key(&name);
    let fenced = app.state.live.wallets_fenced(&name, suspected);
    app.state
        .update("node deletion", Scope::Any, |snap| {
            ops::delete_node(snap, &name, connected, fenced).map(|c| (c, ()))
        })
        .await?;
    app.state.live.forget(&name);
    json(serde_json::json!({"node": name, "deleted": true}))
}

async fn set_cordon(app: &App, name: &str, cordoned: bool) -> Answer {
    app.state
        .update("cordon", Scope::Any, |snap| {
            ops::cordon(snap, name, cordoned).map(|c| (c, ()))
        })
        .await?;
    node_view(app, name)
}

/// `POST /v1/nodes/{name}/cordon`.
#[tracing::instrument(skip(app))]
pub async fn cordon(axum::extract::State(app): Shared, Path(name): Path<String>) -> Answer {
    set_cordon(&app, &name, true).await
}

/// `POST /v1/nodes/{name}/uncordon`.
#[tracing::instrument(skip(app))]
pub async fn uncordon(axum::extract::State(app): Shared, Path(name): Path<String>) -> Answer {
    set_cordon(&app, &name, false).await
}

#[derive(Deserialize)]
pub struct DrainQuery {
    timeout: Option<String>,
}

/// `POST /v1/nodes/{name}/drain`: cordons the node, evicts its tasks and waits until
/// they have all left (or the timeout passes: then `remaining` says how many are still
/// there), then says where they went: placed on other nodes, or waiting for one.
#[tracing::instrument(skip(app, q))]
pub async fn drain(
    axum::extract::State(app): Shared,
    Path(name): Path<String>,
    Query(q): Query<DrainQuery>,
) -> Answer {
    let timeout = match q.timeout.as_deref() {
        None => Duration::from_secs(300),
        Some(t) => t
            .parse::<bramble_api::duration::Duration>()
            .map_err(|e| ApiError::bad_request(format!("timeout: {e}")))?
            .std(),
    };
    let moved = app
        .state
        .update("drain", Scope::Any, |snap| ops::drain(snap, &name))
        .await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut world = app.state.subscribe();
    let remaining = loop {
        let left = ops::drain_remaining(&world.borrow_and_update(), &name);
        if left == 0 {
            break 0;
        }
        tokio::select! {
            _ = world.changed() => {}
            () = tokio::time::sleep_until(deadline) => {
                break ops::drain_remaining(&app.state.snapshot(), &name);
            }
        }
    };
    // Give the reconcile loop a moment to place what left, so the answer is news.
    let settle = tokio::time::Instant::now() + Duration::from_secs(2);
    let (placed, pending) = loop {
        let (placed, pending) = ops::drain_outcome(&app.state.snapshot(), &name, &moved);
        let unsure = pending.iter().any(|p| p.reason.starts_with("evicted from"));
        if !unsure || tokio::time::Instant::now() >= settle {
            break (placed, pending);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let moved_n = u32::try_from(moved.len()).unwrap_or(u32::MAX);
    if remaining == 0 {
        let message = match (moved_n, pending.len()) {
            (0, _) => "no tasks to move".to_string(),
            (n, 0) => format!("{n} tasks moved to other nodes"),
            (n, p) => {
                format!("{n} tasks left it: {placed} placed elsewhere, {p} waiting for a node")
            }
        };
        let draft = if pending.is_empty() {
            Draft::normal(format!("node/{name}"), "Drained", message)
        } else {
            Draft::warning(format!("node/{name}"), "Drained", message)
        };
        app.state
            .commit(Change::events(vec![draft]), Scope::Any)
            .await?;
    }
    json(DrainResponse {
        node: name,
        moved: moved_n,
        remaining,
        placed,
        pending,
    })
}

#[derive(Deserialize)]
pub struct EventQuery {
    #[serde(default)]
    since: u64,
    object: Option<String>,
    #[serde(default)]
    watch: bool,
}

fn event_line(e: &Event) -> Result<String, std::io::Error> {
    let mut s = serde_json::to_string(e).map_err(std::io::Error::other)?;
    s.push('\n');
    Ok(s)
}

/// `GET /v1/events`: stored events; with `watch`, newline-delimited JSON that goes on
/// as events happen.
pub async fn events(axum::extract::State(app): Shared, Query(q): Query<EventQuery>) -> Answer {
    if !q.watch {
        return json(views::events(
            &app.state.snapshot(),
            q.since,
            q.object.as_deref(),
        ));
    }
    // Subscribe before reading the backlog, so nothing falls between the two.
    let live = app.state.subscribe_events();
    let backlog = views::events(&app.state.snapshot(), q.since, q.object.as_deref());
    let last = backlog.last().map_or(q.since, |e| e.seq);
    let object = q.object.clone();
    let head = futures_util::stream::iter(backlog.iter().map(event_line).collect::<Vec<_>>());
    let tail = futures_util::stream::unfold((live, last), move |(mut live, last)| {
        let object = object.clone();
        async move {
            loop {
                match live.recv().await {
                    Ok(e) if e.seq > last && views::event_matches(&e, object.as_deref()) => {
                        let seq = e.seq;
                        return Some((event_line(&e), (live, seq)));
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
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(head.chain(tail)))
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

/// `GET /v1/cronjobs`.
pub async fn list_cronjobs(axum::extract::State(app): Shared) -> Answer {
    json(cron::views(&app.state.snapshot(), Utc::now()))
}

/// `GET /v1/cronjobs/{name}`.
pub async fn get_cronjob(axum::extract::State(app): Shared, Path(name): Path<String>) -> Answer {
    json(cron::job(&app.state.snapshot(), &name, Utc::now())?)
}

/// `POST /v1/cronjobs/{name}/run`.
#[tracing::instrument(skip(app))]
pub async fn cron_run(axum::extract::State(app): Shared, Path(name): Path<String>) -> Answer {
    let now = Utc::now();
    // A second click in the same second is a conflict for the operator to see, not a
    // race to decide again.
    let snap = app.state.snapshot();
    let (change, task) = cron::run_now(&snap, &name, now)?;
    match app.state.commit(change, Scope::Any).await? {
        crate::state::Outcome::Committed(_) => json(task),
        crate::state::Outcome::Conflict(_) => Err(DomainError::Conflict(format!(
            "cronjob {name:?} was already started by hand this second"
        ))
        .into()),
    }
}

async fn set_suspended(app: &App, name: &str, suspended: bool) -> Answer {
    let now = Utc::now();
    app.state
        .update("suspend", Scope::Any, |snap| {
            cron::suspend(snap, name, suspended, now).map(|c| (c, ()))
        })
        .await?;
    json(cron::job(&app.state.snapshot(), name, now)?)
}

/// `POST /v1/cronjobs/{name}/suspend`.
#[tracing::instrument(skip(app))]
pub async fn cron_suspend(axum::extract::State(app): Shared, Path(name): Path<String>) -> Answer {
    set_suspended(&app, &name, true).await
}

/// `POST /v1/cronjobs/{name}/resume`.
#[tracing::instrument(skip(app))]
pub async fn cron_resume(axum::extract::State(app): Shared, Path(name): Path<String>) -> Answer {
    set_suspended(&app, &name, false).await
}

#[derive(Deserialize)]
pub struct TaskQuery {
    workload: Option<String>,
    node: Option<String>,
    kind: Option<String>,
}

/// `GET /v1/tasks`.
pub async fn list_tasks(
    axum::extract::State(app): Shared,
    headers: HeaderMap,
    Query(q): Query<TaskQuery>,
) -> Answer {
    let kind = q.kind.as_deref().map(parse_kind).transpose()?;
    let mut ts = views::tasks(
        &app.state.snapshot(),
        q.workload.as_deref(),
        q.node.as_deref(),
        kind,
    );
    if viewer(&app, &headers) {
        ts = ts
            .into_iter()
            .map(|t| views::redact_task(t, app.viewer_logs))
            .collect();
    }
    json(ts)
}

/// `GET /v1/tasks/{id}`.
pub async fn get_task(
    axum::extract::State(app): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Answer {
    let t = views::task(&app.state.snapshot(), &id)?;
    json(if viewer(&app, &headers) {
        views::redact_task(t, app.viewer_logs)
    } else {
        t
    })
}

#[derive(Deserialize)]
pub struct LogQuery {
    #[serde(default)]
    follow: bool,
    tail: Option<u32>,
}

/// Ends a log request at the agent when the HTTP client goes away.
struct LogGuard {
    app: Arc<App>,
    node: String,
    request: u64,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.app.state.logs.close(self.request);
        if let Some(conn) = self.app.state.live.connection(&self.node) {
            let _ = conn.tx.try_send(ControllerMessage::CancelLogs {
                request: self.request,
            });
        }
    }
}

/// `GET /v1/tasks/{id}/logs`: a finished run's kept output, or the container's log
/// streamed from its node.
#[tracing::instrument(skip(app, q, headers))]
pub async fn task_logs(
    axum::extract::State(app): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Answer {
    if viewer(&app, &headers) && !app.viewer_logs {
        return Err(ApiError::forbidden(
            "task logs may hold secrets: the viewer token reads them only when the controller runs with --viewer-logs",
        ));
    }
    let task = views::task(&app.state.snapshot(), &id)?;
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
            || app
                .state
                .live
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
    let conn = app.state.live.connection(&node).ok_or_else(|| {
        if app.state.is_leading() {
            ApiError::unavailable(format!(
                "node {node:?} is not connected; its logs cannot be read now"
            ))
        } else {
            // Only the leader keeps the links that carry logs.
            ApiError::not_leader(
                "this controller is not the leader: a task's logs come over the leader's link to its node; ask the leader (bramblectl get controllers shows it)",
            )
        }
    })?;
    let request = app.state.next_id();
    let rx = app.state.logs.open(request, &node);
    let guard = LogGuard {
        app: Arc::clone(&app),
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

/// `GET /v1/webhooks`: a viewer sees no URL paths (they may hold tokens).
pub async fn list_webhooks(axum::extract::State(app): Shared, headers: HeaderMap) -> Answer {
    let admin = role(&app, &headers) == Some(Role::Admin);
    json(app.webhooks.views(!admin))
}

/// `POST /v1/webhooks/{name}/test`.
#[tracing::instrument(skip(app))]
pub async fn test_webhook(axum::extract::State(app): Shared, Path(name): Path<String>) -> Answer {
    let answer = app.webhooks.test(&name).await.map_err(|e| match e {
        DomainError::NotFound { .. } => ApiError::not_found(format!(
            "webhook {name:?} not found (see {} in the data directory)",
            crate::loops::webhooks::FILE
        )),
        other => other.into(),
    })?;
    json(answer)
}
