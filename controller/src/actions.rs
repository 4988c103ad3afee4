//! Operator actions beyond apply and delete, for the dashboard's quick actions and the
//! CLI: restarting a workload.
//!
//! A restart reuses eviction, as a drain does (see `Cluster::start_drain`): each of
//! the workload's running tasks is marked `desired: Evicting`; its agent stops the
//! container and reports it Removed; only then is the task placed again and started
//! afresh. So a Wallet is never running twice during its restart. All tasks restart at
//! once (not rolling): a Service is briefly down, as with `docker restart`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bramble_api::manifest::Kind;
use bramble_api::rest::RestartResponse;
use bramble_api::task::{DesiredState, Task};

use crate::cluster::Cluster;
use crate::events::Draft;
use crate::http::ApiError;
use crate::model::{self, StoredWorkload, Versioned};
use crate::store::{Compare, Op};

/// Whether a restart moves this task: placed, meant to run, not finished.
fn restartable(t: &Task, kind: Kind, name: &str) -> bool {
    t.kind == kind
        && t.workload == name
        && t.desired == DesiredState::Running
        && t.node.is_some()
        && !t.phase.is_terminal()
}

impl Cluster {
    /// Stops and starts again every running task of a Service or Wallet, through
    /// eviction. Returns how many tasks were told to restart (0 when none runs).
    pub fn restart_workload(&self, kind: Kind, name: &str) -> Result<RestartResponse, ApiError> {
        if kind.runs_to_completion() {
            return Err(ApiError::bad_request(format!(
                "{} runs to completion and cannot be restarted; for a CronJob use `bramblectl cron run`",
                kind.path()
            )));
        }
        let _: Versioned<StoredWorkload> =
            model::get(self.store.as_ref(), &model::workload_key(kind, name))?.ok_or_else(
                || ApiError::not_found(format!("{} {name:?} not found", kind.path())),
            )?;
        for _ in 0..5 {
            let tasks: Vec<Versioned<Task>> = model::list(self.store.as_ref(), model::TASKS)?;
            let moving: Vec<&Versioned<Task>> = tasks
                .iter()
                .filter(|t| restartable(&t.value, kind, name))
                .collect();
            let object = format!("{}/{name}", kind.path());
            if moving.is_empty() {
                return Ok(RestartResponse {
                    kind,
                    name: name.to_string(),
                    tasks_restarted: 0,
                });
            }
            let compares: Vec<Compare> = moving
                .iter()
                .map(|t| Compare::ModRevision {
                    key: model::task_key(&t.value.id),
                    rev: t.rev,
                })
                .collect();
            let mut drafts = vec![Draft::normal(
                &object,
                "Restarting",
                match moving.len() {
                    1 => "1 task stops, then starts again".to_string(),
                    n => format!("{n} tasks stop, then start again"),
                },
            )];
            let ops: Vec<Op> = moving
                .iter()
                .map(|t| {
                    let mut next = t.value.clone();
                    next.desired = DesiredState::Evicting;
                    drafts.push(Draft::normal(
                        format!("task/{}", t.value.id),
                        "Evicting",
                        format!("restart of {object} requested"),
                    ));
                    Op::Put {
                        key: model::task_key(&t.value.id),
                        value: model::encode(&next),
                    }
                })
                .collect();
            if self.store.txn(&compares, &ops)?.succeeded {
                self.record(drafts);
                self.wake();
                return Ok(RestartResponse {
                    kind,
                    name: name.to_string(),
                    tasks_restarted: u32::try_from(moving.len()).unwrap_or(u32::MAX),
                });
            }
            tracing::debug!(workload = %object, "restart raced another writer; retrying");
        }
        Err(ApiError::conflict(
            "the workload's tasks changed meanwhile; try again",
        ))
    }
}

/// `POST /v1/workloads/{kind}/{name}/restart`.
#[tracing::instrument(skip(c))]
pub async fn restart(
    State(c): State<Arc<Cluster>>,
    Path((kind, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let kind: Kind = kind
        .parse()
        .map_err(|e: bramble_api::manifest::UnknownKind| ApiError::bad_request(e.to_string()))?;
    Ok(Json(c.restart_workload(kind, &name)?).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bramble_api::task::TaskPhase;

    fn task(kind: Kind, workload: &str, node: Option<&str>, phase: TaskPhase) -> Task {
        let yaml =
            format!("apiVersion: bramble/v1\nkind: {kind}\nmetadata: {{name: {workload}}}\nspec: {{image: a}}\n");
        let docs = bramble_api::parse::parse_manifests("t.yaml", &yaml).expect("valid");
        let w = StoredWorkload::new(docs[0].manifest.clone(), chrono::Utc::now());
        Task {
            node: node.map(str::to_string),
            phase,
            ..crate::reconcile::new_task(&w, format!("{workload}-abc-0"), 0, chrono::Utc::now())
        }
    }

    #[test]
    fn restarts_only_placed_running_tasks_of_the_workload() {
        let web = |node, phase| task(Kind::Service, "web", node, phase);
        assert!(restartable(
            &web(Some("pi1"), TaskPhase::Running),
            Kind::Service,
            "web"
        ));
        assert!(restartable(
            &web(Some("pi1"), TaskPhase::Starting),
            Kind::Service,
            "web"
        ));
        assert!(!restartable(
            &web(None, TaskPhase::Pending),
            Kind::Service,
            "web"
        ));
        assert!(!restartable(
            &web(Some("pi1"), TaskPhase::Failed),
            Kind::Service,
            "web"
        ));
        assert!(!restartable(
            &web(Some("pi1"), TaskPhase::Running),
            Kind::Service,
            "api"
        ));
        assert!(!restartable(
            &web(Some("pi1"), TaskPhase::Running),
            Kind::Wallet,
            "web"
        ));
        let mut stopping = web(Some("pi1"), TaskPhase::Running);
        stopping.desired = DesiredState::Stopped;
        assert!(!restartable(&stopping, Kind::Service, "web"));
    }
}
