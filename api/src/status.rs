//! What state a task is in, in the words an operator acts on: the `STATUS` of
//! `bramblectl get tasks`, the pill on the dashboard, the first line of `describe`.
//!
//! A task's phase says where it is in its life (Starting, Running, Failed…); its
//! [`Reason`], set by its node, says why it is stuck there; the controller's back-off
//! after a node gave it up (`retry_at`) and its placement message say the rest.
//! [`of`] folds them into one name, kubectl's where kubectl has one
//! (`CrashLoopBackOff`, `ImagePullBackOff`), with how bad it is and when the next try is.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use crate::reason::Reason;
use crate::task::{DesiredState, Task, TaskPhase};

/// How bad a state is: the colour it is shown in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// As wanted (Running, Succeeded).
    Ok,
    /// On its way (Scheduled, Starting, Terminating).
    Progressing,
    /// Not running, for a reason that may pass or that is on purpose (no node fits
    /// yet, fenced).
    Warning,
    /// Failing: it will not run until something changes or the back-off ends.
    Failing,
}

/// A task's state as an operator reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskState {
    /// `Running`, `CrashLoopBackOff`, `Pending`, …
    pub status: String,
    /// How bad it is.
    pub level: Level,
    /// Why, in a sentence (the task's message), when it is not as wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the next try is, while backing off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
}

impl TaskState {
    fn new(status: impl Into<String>, level: Level) -> TaskState {
        TaskState {
            status: status.into(),
            level,
            reason: None,
            retry_at: None,
        }
    }

    fn because(mut self, t: &Task) -> TaskState {
        self.reason = t.message.clone();
        self
    }

    fn retry(mut self, at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> TaskState {
        self.retry_at = at.filter(|at| *at > now);
        self
    }
}

/// The state of `t` at `now`.
pub fn of(t: &Task, now: DateTime<Utc>) -> TaskState {
    let leaving = match t.desired {
        DesiredState::Running => false,
        DesiredState::Stopped => !t.phase.is_terminal(),
        // Evicted tasks stop on their node, then wait for a new one as Pending.
        DesiredState::Evicting => t.node.is_some() && !t.phase.is_terminal(),
    };
    if leaving {
        return TaskState::new("Terminating", Level::Progressing);
    }
    let backing_off = t.retry_at.is_some_and(|at| at > now);
    match t.phase {
        TaskPhase::Pending if backing_off => TaskState::new("BackOff", Level::Failing)
            .because(t)
            .retry(t.retry_at, now),
        TaskPhase::Pending if t.message.is_some() => {
            TaskState::new("Pending", Level::Warning).because(t)
        }
        TaskPhase::Pending => TaskState::new("Pending", Level::Progressing),
        TaskPhase::Succeeded => TaskState::new("Succeeded", Level::Ok),
        TaskPhase::Stopped if t.reason == Some(Reason::Fenced) => {
            TaskState::new(Reason::Fenced.as_str(), Level::Warning).because(t)
        }
        TaskPhase::Stopped => TaskState::new("Stopped", Level::Ok),
        TaskPhase::Lost => TaskState::new("Lost", Level::Failing).because(t),
        TaskPhase::Failed => {
            let name = t.reason.map_or("Failed", Reason::as_str);
            TaskState::new(name, Level::Failing).because(t)
        }
        TaskPhase::Scheduled | TaskPhase::Starting | TaskPhase::Running => match t.reason {
            Some(Reason::Fenced) => {
                TaskState::new(Reason::Fenced.as_str(), Level::Warning).because(t)
            }
            Some(r) => TaskState::new(r.as_str(), Level::Failing)
                .because(t)
                .retry(t.restart_at, now),
            None if t.phase == TaskPhase::Running => TaskState::new("Running", Level::Ok),
            None => TaskState::new(t.phase.to_string(), Level::Progressing),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Kind;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).expect("valid time")
    }

    fn task(phase: TaskPhase) -> Task {
        let text =
            "apiVersion: bramble/v1\nkind: Service\nmetadata: {name: web}\nspec: {image: 'a:1'}\n";
        let parsed = crate::parse::parse_manifests("t.yaml", text).expect("valid manifest");
        let m = &parsed.workloads[0].manifest;
        let hash = crate::task::TaskSpec::from_manifest(m).hash();
        Task {
            node: Some("pi-1".into()),
            phase,
            ..Task::pending("web-abc123-0".into(), m, hash, 0, at(0))
        }
    }

    fn with(
        phase: TaskPhase,
        reason: Option<Reason>,
        message: Option<&str>,
        f: impl FnOnce(&mut Task),
    ) -> Task {
        let mut t = task(phase);
        t.reason = reason;
        t.message = message.map(str::to_string);
        f(&mut t);
        t
    }

    #[test]
    fn every_state_an_operator_acts_on_is_named_with_its_reason_and_next_try() {
        use Level::*;
        use TaskPhase::*;
        let now = at(100);
        let crash = "exited with code 3; restarting with back-off";
        let pull =
            "image x not found locally and pull failed: no such image; retrying with back-off";
        let port = "cannot start container c: port is already allocated; retrying with back-off";
        let nofit = "no node fits: pi-1: needs 256Mi memory, 100Mi free";
        let fenced = "fenced: no word from the controller";
        // (what, task, status, level, reason, retry)
        type Case<'a> = (
            &'a str,
            Task,
            &'a str,
            Level,
            Option<&'a str>,
            Option<DateTime<Utc>>,
        );
        let cases: Vec<Case> = vec![
            ("running", task(Running), "Running", Ok, None, None),
            (
                "starting",
                task(Starting),
                "Starting",
                Progressing,
                None,
                None,
            ),
            (
                "scheduled",
                task(Scheduled),
                "Scheduled",
                Progressing,
                None,
                None,
            ),
            (
                "pending, about to be placed",
                with(Pending, None, None, |t| t.node = None),
                "Pending",
                Progressing,
                None,
                None,
            ),
            (
                "pending, no node fits",
                with(Pending, None, Some(nofit), |t| t.node = None),
                "Pending",
                Warning,
                Some(nofit),
                None,
            ),
            (
                "crash loop, waiting",
                with(Starting, Some(Reason::CrashLoopBackOff), Some(crash), |t| {
                    t.restart_at = Some(at(108))
                }),
                "CrashLoopBackOff",
                Failing,
                Some(crash),
                Some(at(108)),
            ),
            (
                "crash loop, the wait is over",
                with(Starting, Some(Reason::CrashLoopBackOff), Some(crash), |t| {
                    t.restart_at = Some(at(90))
                }),
                "CrashLoopBackOff",
                Failing,
                Some(crash),
                None,
            ),
            (
                "image pull",
                with(Starting, Some(Reason::ImagePullBackOff), Some(pull), |t| {
                    t.restart_at = Some(at(116))
                }),
                "ImagePullBackOff",
                Failing,
                Some(pull),
                Some(at(116)),
            ),
            (
                "port taken",
                with(Starting, Some(Reason::PortInUse), Some(port), |_| ()),
                "PortInUse",
                Failing,
                Some(port),
                None,
            ),
            (
                "fenced wallet",
                with(Stopped, Some(Reason::Fenced), Some(fenced), |t| {
                    t.kind = Kind::Wallet
                }),
                "Fenced",
                Warning,
                Some(fenced),
                None,
            ),
            ("stopped", task(Stopped), "Stopped", Ok, None, None),
            (
                "a job's run that failed",
                with(Failed, None, Some("exited with code 1"), |t| {
                    t.kind = Kind::Job
                }),
                "Failed",
                Failing,
                Some("exited with code 1"),
                None,
            ),
            (
                "timed out",
                with(
                    Failed,
                    Some(Reason::DeadlineExceeded),
                    Some("timed out after 5m"),
                    |t| t.kind = Kind::Job,
                ),
                "DeadlineExceeded",
                Failing,
                Some("timed out after 5m"),
                None,
            ),
            (
                "killed for memory",
                with(
                    Failed,
                    Some(Reason::OomKilled),
                    Some("killed: out of memory"),
                    |_| (),
                ),
                "OOMKilled",
                Failing,
                Some("killed: out of memory"),
                None,
            ),
            (
                "succeeded",
                with(Succeeded, None, None, |t| t.kind = Kind::Job),
                "Succeeded",
                Ok,
                None,
                None,
            ),
            (
                "lost",
                with(Lost, None, Some("node pi-1 is dead"), |_| ()),
                "Lost",
                Failing,
                Some("node pi-1 is dead"),
                None,
            ),
            (
                "given up everywhere, placed again later",
                with(
                    Pending,
                    Some(Reason::CrashLoopBackOff),
                    Some("gave up on pi-1"),
                    |t| {
                        t.node = None;
                        t.retry_at = Some(at(160));
                    },
                ),
                "BackOff",
                Failing,
                Some("gave up on pi-1"),
                Some(at(160)),
            ),
            (
                "the controller's back-off is over: placed again",
                with(Pending, None, None, |t| {
                    t.node = None;
                    t.retry_at = Some(at(60));
                }),
                "Pending",
                Progressing,
                None,
                None,
            ),
            (
                "being deleted",
                with(Running, None, None, |t| t.desired = DesiredState::Stopped),
                "Terminating",
                Progressing,
                None,
                None,
            ),
            (
                "being moved",
                with(Running, None, None, |t| t.desired = DesiredState::Evicting),
                "Terminating",
                Progressing,
                None,
                None,
            ),
            (
                "moved, waiting for a node",
                with(Pending, None, None, |t| {
                    t.desired = DesiredState::Evicting;
                    t.node = None;
                }),
                "Pending",
                Progressing,
                None,
                None,
            ),
            (
                "unhealthy",
                with(
                    Running,
                    Some(Reason::Unhealthy),
                    Some("liveness probe failed"),
                    |_| (),
                ),
                "Unhealthy",
                Failing,
                Some("liveness probe failed"),
                None,
            ),
            (
                "a reason from a newer agent",
                with(Starting, Some(Reason::Unknown), Some("new"), |_| ()),
                "Error",
                Failing,
                Some("new"),
                None,
            ),
        ];
        for (what, t, status, level, reason, retry) in cases {
            let s = of(&t, now);
            assert_eq!(
                (s.status.as_str(), s.level, s.reason.as_deref(), s.retry_at),
                (status, level, reason, retry),
                "{what}"
            );
        }
    }
}
