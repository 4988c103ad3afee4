//! The I/O shell around [`crate::cron`]: fires CronJob slots exactly once, records
//! missed and skipped ones, applies the concurrency policy, retries failed runs of Jobs
//! and CronJobs with back-off, and prunes run history.
//!
//! Exactly once: a slot's firing record (`/cronfirings/{job}/{slot}`) is created with
//! compare-and-swap on "absent", in the same store transaction as the run's task. A
//! second controller (or this one after a restart) trying the same slot fails on the
//! key and does nothing; a controller that crashed before the transaction left nothing,
//! and the slot fires on the next pass if it is still within its starting deadline.

use std::collections::HashMap;
use std::time::Duration;

use bramble_api::manifest::Kind;
use bramble_api::rest::{CronJobView, Firing, FiringOutcome};
use bramble_api::schedule::Schedule;
use bramble_api::task::{DesiredState, Task, TaskPhase};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::cron::{self, Concurrency};
use crate::events::Draft;
use crate::http::ApiError;
use crate::model::{self, StoredWorkload, Versioned};
use crate::store::{Compare, Op, StoreExt};

/// Prefix of per-CronJob operator state (`cron suspend|resume`).
pub const CRON_STATE: &str = "/cronstate/";

/// Firing records kept per job (the newest is what makes a slot fire once).
const KEEP_FIRINGS: usize = 100;

/// Delay before the first retry of a failed run; doubles per attempt up to the max.
const RETRY_INITIAL: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Operator overrides for one CronJob.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CronState {
    /// Suspended by `bramblectl cron suspend`.
    pub suspended: bool,
    /// When it was last resumed: slots before it are neither fired nor missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<DateTime<Utc>>,
}

fn state_key(job: &str) -> String {
    format!("{CRON_STATE}{job}")
}

fn firings_prefix(job: &str) -> String {
    format!("{}{job}/", cron::FIRINGS)
}

/// A new run of a workload: a pending task like a replica's, with its slot and attempt.
fn run_task(
    w: &StoredWorkload,
    id: String,
    slot: Option<DateTime<Utc>>,
    attempt: u32,
    now: DateTime<Utc>,
) -> Task {
    Task {
        slot,
        attempt,
        ..crate::reconcile::new_task(w, id, 0, now)
    }
}

/// Whether a run is still going (counts for the concurrency policy).
fn active(t: &Task) -> bool {
    t.desired == DesiredState::Running && !t.phase.is_terminal()
}

/// The id of retry `attempt` of the run whose first attempt is `base`.
fn retry_id(base: &str, attempt: u32) -> String {
    format!("{base}-r{attempt}")
}

fn base_id(t: &Task) -> &str {
    match t.id.rsplit_once("-r") {
        Some((b, n)) if t.attempt > 0 && n.parse::<u32>().is_ok() => b,
        _ => &t.id,
    }
}

impl Cluster {
    /// One pass over every CronJob and Job: fire due slots, record missed ones, retry
    /// failed runs, prune history. Returns the earliest time something is due next.
    pub fn cron_pass(&self, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, crate::Error> {
        let workloads: Vec<StoredWorkload> = model::list(self.store.as_ref(), model::WORKLOADS)?
            .into_iter()
            .map(|v| v.value)
            .collect();
        let tasks: Vec<Versioned<Task>> = model::list(self.store.as_ref(), model::TASKS)?;
        let mut next: Option<DateTime<Utc>> = None;
        let mut soonest = |t: Option<DateTime<Utc>>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: DateTime<Utc>| n.min(t)));
            }
        };
        for w in &workloads {
            let runs: Vec<&Versioned<Task>> = tasks
                .iter()
                .filter(|t| t.value.kind == w.kind() && t.value.workload == w.name())
                .collect();
            match w.kind() {
                Kind::CronJob => {
                    soonest(self.fire_cronjob(w, &runs, now)?);
                    soonest(self.retry_runs(w, &runs, now)?);
                    self.prune_runs(w, &runs)?;
                }
                Kind::Job => soonest(self.retry_runs(w, &runs, now)?),
                _ => {}
            }
        }
        Ok(next)
    }

    fn cron_state(&self, job: &str) -> Result<Option<Versioned<CronState>>, crate::Error> {
        model::get(self.store.as_ref(), &state_key(job))
    }

    fn fire_cronjob(
        &self,
        w: &StoredWorkload,
        runs: &[&Versioned<Task>],
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, crate::Error> {
        let job = w.name();
        let spec = &w.manifest.spec;
        let Some(expr) = spec.schedule.as_deref() else {
            return Ok(None);
        };
        let schedule = match Schedule::parse(expr, spec.timezone.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                // Validated at apply; a stored one that no longer parses is reported, not fired.
                tracing::error!(job = %job, error = %e, "stored CronJob schedule does not parse");
                return Ok(None);
            }
        };
        let state = self.cron_state(job)?.map(|v| v.value).unwrap_or_default();
        if spec.suspend == Some(true) || state.suspended {
            return Ok(None);
        }
        let firings: Vec<Versioned<Firing>> =
            model::list(self.store.as_ref(), &firings_prefix(job))?;
        let last = firings
            .iter()
            .filter(|f| f.value.outcome != FiringOutcome::Manual)
            .map(|f| f.value.slot)
            .max();
        let created = state
            .resumed_at
            .map_or(w.created_at, |r| r.max(w.created_at));
        let due = cron::due(
            &schedule,
            last,
            created,
            now,
            spec.starting_deadline.map(|d| d.std()),
        );

        let mut compares = Vec::new();
        let mut ops = Vec::new();
        let mut drafts = Vec::new();
        let obj = format!("cronjob/{job}");
        for slot in &due.missed {
            let key = cron::firing_key(job, *slot);
            compares.push(Compare::ModRevision {
                key: key.clone(),
                rev: 0,
            });
            let f = Firing {
                slot: *slot,
                outcome: FiringOutcome::Missed,
                task: None,
                decided_at: now,
            };
            ops.push(Op::Put {
                key,
                value: model::encode(&f),
            });
        }
        if !due.missed.is_empty() {
            let more = if due.more_missed {
                " (and older ones)"
            } else {
                ""
            };
            drafts.push(Draft::warning(
                &obj,
                "Missed",
                format!(
                    "{} slots missed beyond the starting deadline{more}; latest {}",
                    due.missed.len(),
                    due.missed[due.missed.len() - 1]
                ),
            ));
        }
        if let Some(slot) = due.fire {
            let key = cron::firing_key(job, slot);
            compares.push(Compare::ModRevision {
                key: key.clone(),
                rev: 0,
            });
            let running: Vec<&&Versioned<Task>> =
                runs.iter().filter(|t| active(&t.value)).collect();
            let policy = spec.concurrency_policy.unwrap_or_default();
            match cron::concurrency(policy, running.len()) {
                Concurrency::Skip => {
                    let f = Firing {
                        slot,
                        outcome: FiringOutcome::Skipped,
                        task: None,
                        decided_at: now,
                    };
                    ops.push(Op::Put {
                        key,
                        value: model::encode(&f),
                    });
                    drafts.push(Draft::warning(
                        &obj,
                        "Skipped",
                        format!("slot {slot}: the previous run is still active (Forbid)"),
                    ));
                }
                c @ (Concurrency::Fire | Concurrency::ReplaceThenFire) => {
                    if c == Concurrency::ReplaceThenFire {
                        for t in &running {
                            let mut stopped = t.value.clone();
                            stopped.desired = DesiredState::Stopped;
                            stopped.message = Some(format!("replaced by the run for {slot}"));
                            compares.push(Compare::ModRevision {
                                key: model::key_of(&t.value),
                                rev: t.rev,
                            });
                            ops.push(Op::Put {
                                key: model::key_of(&t.value),
                                value: model::encode(&stopped),
                            });
                        }
                    }
                    let id = cron::task_id_for(job, slot);
                    let task = run_task(w, id.clone(), Some(slot), 0, now);
                    compares.push(Compare::ModRevision {
                        key: model::task_key(&id),
                        rev: 0,
                    });
                    ops.push(Op::Put {
                        key: model::task_key(&id),
                        value: model::encode(&task),
                    });
                    let f = Firing {
                        slot,
                        outcome: FiringOutcome::Fired,
                        task: Some(id.clone()),
                        decided_at: now,
                    };
                    ops.push(Op::Put {
                        key,
                        value: model::encode(&f),
                    });
                    let late = (now - slot).num_milliseconds();
                    drafts.push(Draft::normal(
                        &obj,
                        "Fired",
                        format!("slot {slot} → task {id} ({late} ms after the slot)"),
                    ));
                }
            }
        }
        // Old records go, never the newest (it is what keeps a slot from firing twice).
        if firings.len() > KEEP_FIRINGS + 20 {
            for f in firings.iter().take(firings.len() - KEEP_FIRINGS) {
                ops.push(Op::Delete {
                    key: cron::firing_key(job, f.value.slot),
                });
            }
        }
        if ops.is_empty() {
            return Ok(due.next);
        }
        if self.store.txn(&compares, &ops)?.succeeded {
            self.record(drafts);
            self.wake();
        } else {
            // Another controller (or a concurrent pass) decided first; re-read next pass.
            tracing::debug!(job = %job, "cron firing raced another writer");
            return Ok(Some(now));
        }
        Ok(due.next)
    }

    /// Failed runs with retries left get a new attempt after a back-off.
    fn retry_runs(
        &self,
        w: &StoredWorkload,
        runs: &[&Versioned<Task>],
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, crate::Error> {
        let retries = w.manifest.spec.retries;
        let mut next = None;
        // The newest attempt of each run decides.
        let mut newest: HashMap<&str, &Task> = HashMap::new();
        for t in runs.iter().map(|v| &v.value) {
            let e = newest.entry(base_id(t)).or_insert(t);
            if t.attempt > e.attempt {
                *e = t;
            }
        }
        for (base, t) in newest {
            if t.phase != TaskPhase::Failed
                || t.desired != DesiredState::Running
                || t.spec_hash != w.spec_hash
            {
                continue;
            }
            if !cron::should_retry(t.attempt + 1, retries) {
                continue;
            }
            let attempt = t.attempt + 1;
            let delay = cron::retry_delay(attempt, RETRY_INITIAL, RETRY_MAX);
            let at = t.finished_at.unwrap_or(t.created_at)
                + chrono::Duration::from_std(delay).unwrap_or_default();
            if at > now {
                next = Some(next.map_or(at, |n: DateTime<Utc>| n.min(at)));
                continue;
            }
            let id = retry_id(base, attempt);
            let task = run_task(w, id.clone(), t.slot, attempt, now);
            let ok = self.store.cas_json(&model::task_key(&id), 0, &task)?;
            if ok {
                self.record(vec![Draft::warning(
                    format!("task/{}", t.id),
                    "Retrying",
                    format!(
                        "attempt {} of {} as task {id}",
                        attempt + 1,
                        retries.unwrap_or(0) + 1
                    ),
                )]);
                self.wake();
            }
        }
        Ok(next)
    }

    /// Finished runs beyond the history limits are stopped (their containers go, then
    /// their records).
    fn prune_runs(
        &self,
        w: &StoredWorkload,
        runs: &[&Versioned<Task>],
    ) -> Result<(), crate::Error> {
        let history = w.manifest.spec.history.unwrap_or_default();
        let finished: Vec<(String, DateTime<Utc>, bool)> = runs
            .iter()
            .filter(|t| t.value.desired == DesiredState::Running && t.value.phase.is_terminal())
            .map(|t| {
                (
                    t.value.id.clone(),
                    t.value.slot.unwrap_or(t.value.created_at),
                    t.value.phase == TaskPhase::Succeeded,
                )
            })
            .collect();
        let doomed = cron::prune_history(&finished, history.successful, history.failed);
        if doomed.is_empty() {
            return Ok(());
        }
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        for id in &doomed {
            let Some(t) = runs.iter().find(|t| &t.value.id == id) else {
                continue;
            };
            let mut next = t.value.clone();
            next.desired = DesiredState::Stopped;
            next.message = Some("pruned by the history limit".into());
            compares.push(Compare::ModRevision {
                key: model::key_of(&t.value),
                rev: t.rev,
            });
            ops.push(Op::Put {
                key: model::key_of(&t.value),
                value: model::encode(&next),
            });
        }
        if self.store.txn(&compares, &ops)?.succeeded {
            self.wake();
        }
        Ok(())
    }

    // ---- API ----

    /// Every CronJob with its recent slots.
    pub fn cronjobs(&self, now: DateTime<Utc>) -> Result<Vec<CronJobView>, ApiError> {
        let ws: Vec<Versioned<StoredWorkload>> = model::list(
            self.store.as_ref(),
            &format!("{}{}/", model::WORKLOADS, Kind::CronJob.path()),
        )?;
        let tasks: Vec<Versioned<Task>> = model::list(self.store.as_ref(), model::TASKS)?;
        ws.iter()
            .map(|w| self.cronjob_view(&w.value, &tasks, now))
            .collect()
    }

    /// One CronJob.
    pub fn cronjob(&self, name: &str, now: DateTime<Utc>) -> Result<CronJobView, ApiError> {
        let w: Versioned<StoredWorkload> = model::get(
            self.store.as_ref(),
            &model::workload_key(Kind::CronJob, name),
        )?
        .ok_or_else(|| ApiError::not_found(format!("cronjob {name:?} not found")))?;
        let tasks: Vec<Versioned<Task>> = model::list(self.store.as_ref(), model::TASKS)?;
        self.cronjob_view(&w.value, &tasks, now)
    }

    fn cronjob_view(
        &self,
        w: &StoredWorkload,
        tasks: &[Versioned<Task>],
        now: DateTime<Utc>,
    ) -> Result<CronJobView, ApiError> {
        let name = w.name();
        let spec = &w.manifest.spec;
        let state = self.cron_state(name)?.map(|v| v.value).unwrap_or_default();
        let suspended = spec.suspend == Some(true) || state.suspended;
        let mut firings: Vec<Firing> =
            model::list::<Firing>(self.store.as_ref(), &firings_prefix(name))?
                .into_iter()
                .map(|v| v.value)
                .collect();
        firings.sort_by_key(|f| std::cmp::Reverse(f.slot));
        let runs: Vec<&Task> = tasks
            .iter()
            .map(|t| &t.value)
            .filter(|t| t.kind == Kind::CronJob && t.workload == name)
            .collect();
        let newest = runs.iter().max_by_key(|t| (t.slot, t.attempt));
        let schedule = spec
            .schedule
            .as_deref()
            .and_then(|e| Schedule::parse(e, spec.timezone.as_deref()).ok());
        Ok(CronJobView {
            name: name.to_string(),
            schedule: spec.schedule.clone().unwrap_or_default(),
            timezone: spec.timezone.clone().unwrap_or_else(|| "UTC".into()),
            suspended,
            last_slot: firings
                .iter()
                .find(|f| f.outcome != FiringOutcome::Manual)
                .map(|f| f.slot),
            last_result: newest.map(|t| t.phase),
            next: if suspended {
                None
            } else {
                schedule.and_then(|s| s.next_after(now))
            },
            active: u32::try_from(runs.iter().filter(|t| active(t)).count()).unwrap_or(u32::MAX),
            firings: firings.into_iter().take(20).collect(),
        })
    }

    /// Starts a run now, whatever the schedule (`bramblectl cron run`).
    pub fn cron_run_now(&self, name: &str, now: DateTime<Utc>) -> Result<Task, ApiError> {
        let w: Versioned<StoredWorkload> = model::get(
            self.store.as_ref(),
            &model::workload_key(Kind::CronJob, name),
        )?
        .ok_or_else(|| ApiError::not_found(format!("cronjob {name:?} not found")))?;
        // Manual runs are keyed by the current second, so a double click runs once.
        let slot = DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now);
        let id = format!("{}-manual", cron::task_id_for(name, slot));
        let key = format!(
            "{}manual-{}",
            firings_prefix(name),
            slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        let task = run_task(&w.value, id.clone(), Some(slot), 0, now);
        let f = Firing {
            slot,
            outcome: FiringOutcome::Manual,
            task: Some(id.clone()),
            decided_at: now,
        };
        let ok = self
            .store
            .txn(
                &[
                    Compare::ModRevision {
                        key: key.clone(),
                        rev: 0,
                    },
                    Compare::ModRevision {
                        key: model::task_key(&id),
                        rev: 0,
                    },
                ],
                &[
                    Op::Put {
                        key,
                        value: model::encode(&f),
                    },
                    Op::Put {
                        key: model::task_key(&id),
                        value: model::encode(&task),
                    },
                ],
            )?
            .succeeded;
        if !ok {
            return Err(ApiError::conflict(format!(
                "cronjob {name:?} was already started by hand this second"
            )));
        }
        self.record(vec![Draft::normal(
            format!("cronjob/{name}"),
            "Fired",
            format!("started by hand as task {id}"),
        )]);
        self.wake();
        Ok(task)
    }

    /// Suspends or resumes a CronJob without touching its manifest.
    pub fn cron_suspend(
        &self,
        name: &str,
        suspended: bool,
        now: DateTime<Utc>,
    ) -> Result<CronJobView, ApiError> {
        let _ = self.cronjob(name, now)?;
        let cur = self.cron_state(name)?;
        let (mut state, rev) = cur.map_or((CronState::default(), 0), |v| (v.value, v.rev));
        if state.suspended != suspended {
            state.suspended = suspended;
            if !suspended {
                state.resumed_at = Some(now);
            }
            let key = state_key(name);
            let ok = self
                .store
                .txn(
                    &[Compare::ModRevision {
                        key: key.clone(),
                        rev,
                    }],
                    &[Op::Put {
                        key,
                        value: model::encode(&state),
                    }],
                )?
                .succeeded;
            if !ok {
                return Err(ApiError::conflict(
                    "the cronjob changed meanwhile; try again",
                ));
            }
            let reason = if suspended { "Suspended" } else { "Resumed" };
            self.record(vec![Draft::normal(
                format!("cronjob/{name}"),
                reason,
                "by the operator",
            )]);
            self.wake();
        }
        self.cronjob(name, now)
    }
}

/// Runs cron passes: at every slot (to the millisecond), on every wake-up, and at least
/// every second (a clock may jump).
pub async fn run(c: std::sync::Arc<Cluster>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let now = Utc::now();
        let next = match c.cron_pass(now) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cron pass failed");
                None
            }
        };
        let wait = next
            .and_then(|n| (n - Utc::now()).to_std().ok())
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(1));
        let wait = if next.is_some_and(|n| n <= Utc::now()) {
            Duration::from_millis(50)
        } else {
            wait.max(Duration::from_millis(1))
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_ids_round_trip_to_their_base() {
        let mut t = run_task(
            &StoredWorkload::new(
                bramble_api::parse::parse_manifests("j.yaml", "apiVersion: bramble/v1\nkind: Job\nmetadata: {name: j}\nspec: {image: a, retries: 2}\n")
                    .expect("valid")[0]
                    .manifest
                    .clone(),
                Utc::now(),
            ),
            "j-abc-0".into(),
            None,
            0,
            Utc::now(),
        );
        assert_eq!(base_id(&t), "j-abc-0");
        t.id = retry_id("j-abc-0", 2);
        t.attempt = 2;
        assert_eq!(base_id(&t), "j-abc-0");
    }
}
