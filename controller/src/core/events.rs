//! Events: a record of every decision and change (scheduled, started, exited,
//! restarted, node lost, rescheduled, drained…). The core drafts them beside the change
//! they describe ([`Draft`], [`task_change`]); the `state` layer stores them in the same
//! transaction. Nothing here is drafted while the cluster is at rest: heartbeats make no
//! events.

use bramble_api::rest::Severity;
use bramble_api::task::{DesiredState, Task, TaskPhase};

/// An event before it gets its time and sequence number (at commit).
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    /// Normal or Warning.
    pub severity: Severity,
    /// `task/…`, `node/…`, `service/…`.
    pub object: String,
    /// One CamelCase word.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

impl Draft {
    /// A routine event.
    pub fn normal(
        object: impl Into<String>,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Draft {
        Draft {
            severity: Severity::Normal,
            object: object.into(),
            reason,
            message: message.into(),
        }
    }
    /// An event about something that failed or was lost.
    pub fn warning(
        object: impl Into<String>,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Draft {
        Draft {
            severity: Severity::Warning,
            object: object.into(),
            reason,
            message: message.into(),
        }
    }
}

/// The events a task write means: what changed between `old` and `new`.
pub fn task_change(old: Option<&Task>, new: Option<&Task>) -> Vec<Draft> {
    let mut out = Vec::new();
    let (obj, t) = match (old, new) {
        (_, Some(n)) => (format!("task/{}", n.id), n),
        (Some(o), None) => {
            out.push(Draft::normal(
                format!("task/{}", o.id),
                "Removed",
                format!("task of {} {} removed", o.kind.path(), o.workload),
            ));
            return out;
        }
        (None, None) => return out,
    };
    let Some(o) = old else {
        out.push(Draft::normal(
            &obj,
            "Created",
            format!("task for {} {}", t.kind.path(), t.workload),
        ));
        if let Some(n) = &t.node {
            out.push(Draft::normal(
                &obj,
                "Scheduled",
                format!("placed on node {n}"),
            ));
        } else if let Some(m) = &t.message {
            out.push(Draft::warning(&obj, "FailedScheduling", m.clone()));
        }
        return out;
    };
    match (&o.node, &t.node) {
        (None, Some(n)) => out.push(Draft::normal(
            &obj,
            "Scheduled",
            format!("placed on node {n}"),
        )),
        (Some(a), None) if t.desired == DesiredState::Running => out.push(Draft::warning(
            &obj,
            "Rescheduling",
            t.message
                .clone()
                .unwrap_or_else(|| format!("taken off node {a}")),
        )),
        (Some(a), Some(b)) if a != b => out.push(Draft::warning(
            &obj,
            "Rescheduled",
            format!("moved from node {a} to {b}"),
        )),
        _ => {}
    }
    if t.node.is_none() && t.desired == DesiredState::Running && t.message != o.message {
        if let Some(m) = &t.message {
            if o.node.is_none() {
                out.push(Draft::warning(&obj, "FailedScheduling", m.clone()));
            }
        }
    }
    if o.desired != t.desired {
        match t.desired {
            DesiredState::Stopped => out.push(Draft::normal(
                &obj,
                "Stopping",
                t.message
                    .clone()
                    .unwrap_or_else(|| "no longer wanted".into()),
            )),
            DesiredState::Evicting => out.push(Draft::normal(
                &obj,
                "Evicting",
                "draining its node".to_string(),
            )),
            DesiredState::Running => {}
        }
    }
    // The agent restarts a hung container itself and says why in the task's message; a
    // new restart with a probe message is a fresh probe failure even if the text repeats.
    if let Some(m) = t.message.as_deref().filter(|m| m.contains("probe failed")) {
        if t.message != o.message || t.restarts > o.restarts {
            out.push(Draft::warning(&obj, "ProbeFailed", m.to_string()));
        }
    }
    if t.restarts > o.restarts {
        out.push(Draft::warning(
            &obj,
            "Restarted",
            format!(
                "restart {}{}",
                t.restarts,
                t.message
                    .as_ref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ),
        ));
    }
    if o.phase != t.phase && t.node == o.node {
        let node = t.node.as_deref().unwrap_or("?");
        match t.phase {
            TaskPhase::Running => out.push(Draft::normal(
                &obj,
                "Started",
                format!("running on node {node}"),
            )),
            TaskPhase::Succeeded => out.push(Draft::normal(
                &obj,
                "Completed",
                "exited with code 0".to_string(),
            )),
            TaskPhase::Failed => out.push(Draft::warning(
                &obj,
                "Failed",
                t.message
                    .clone()
                    .unwrap_or_else(|| format!("exited with code {}", t.exit_code.unwrap_or(-1))),
            )),
            TaskPhase::Lost => out.push(Draft::warning(
                &obj,
                "Lost",
                t.message.clone().unwrap_or_default(),
            )),
            _ => {}
        }
    }
    // Every give-up is news, also a second one by the same node after the back-off.
    if t.give_ups > o.give_ups || t.avoid.len() > o.avoid.len() {
        out.push(Draft::warning(
            &obj,
            "GaveUp",
            t.message
                .clone()
                .unwrap_or_else(|| "too many failures".into()),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn task() -> Task {
        let docs = bramble_api::parse::parse_manifests(
            "t.yaml",
            "apiVersion: bramble/v1\nkind: Service\nmetadata: {name: web}\nspec: {image: a}\n",
        )
        .expect("valid")
        .workloads;
        let w = crate::core::model::StoredWorkload::new(docs[0].manifest.clone(), Utc::now());
        crate::core::reconcile::new_task(&w, "web-abc-0".into(), 0, Utc::now())
    }

    fn reasons(d: &[Draft]) -> Vec<&str> {
        d.iter().map(|d| d.reason).collect()
    }

    #[test]
    fn describes_task_changes() {
        let t = task();
        assert_eq!(reasons(&task_change(None, Some(&t))), ["Created"]);
        let mut placed = t.clone();
        placed.node = Some("n1".into());
        placed.phase = TaskPhase::Scheduled;
        assert_eq!(
            reasons(&task_change(Some(&t), Some(&placed))),
            ["Scheduled"]
        );
        let mut running = placed.clone();
        running.phase = TaskPhase::Running;
        assert_eq!(
            reasons(&task_change(Some(&placed), Some(&running))),
            ["Started"]
        );
        let mut restarted = running.clone();
        restarted.restarts = 1;
        restarted.message = Some("exited with code 1".into());
        assert_eq!(
            reasons(&task_change(Some(&running), Some(&restarted))),
            ["Restarted"]
        );
        let mut hung = running.clone();
        hung.restarts = 1;
        hung.message = Some("liveness probe failed 3 times: GET /healthz: timed out".into());
        assert_eq!(
            reasons(&task_change(Some(&running), Some(&hung))),
            ["ProbeFailed", "Restarted"]
        );
        let mut hung_again = hung.clone();
        hung_again.restarts = 2;
        assert_eq!(
            reasons(&task_change(Some(&hung), Some(&hung_again))),
            ["ProbeFailed", "Restarted"],
            "the same probe message on a new restart is a new failure"
        );
        assert!(task_change(Some(&hung), Some(&hung)).is_empty());
        let mut lost = running.clone();
        lost.node = None;
        lost.phase = TaskPhase::Pending;
        lost.message = Some("node n1 lost".into());
        assert_eq!(
            reasons(&task_change(Some(&running), Some(&lost))),
            ["Rescheduling"]
        );
        assert_eq!(reasons(&task_change(Some(&running), None)), ["Removed"]);
        let mut given_up = lost.clone();
        given_up.give_ups = 1;
        given_up.avoid = vec!["n1".into()];
        assert_eq!(
            reasons(&task_change(Some(&running), Some(&given_up))),
            ["Rescheduling", "GaveUp"]
        );
        let mut placed_back = given_up.clone();
        placed_back.node = Some("n1".into());
        let mut again = given_up.clone();
        again.give_ups = 2;
        assert_eq!(
            reasons(&task_change(Some(&placed_back), Some(&again))),
            ["Rescheduling", "GaveUp"],
            "the same node giving it up again is news too"
        );
        assert!(
            task_change(Some(&running), Some(&running)).is_empty(),
            "no change, no event"
        );
    }
}
