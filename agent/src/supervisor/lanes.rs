//! Which of a round's actions may run at the same time.
//!
//! A round's actions run in *lanes*: actions that touch the same thing share a lane and
//! run one after another in plan order; lanes run side by side. So a container that
//! ignores SIGTERM holds up, for its stop grace, only what it shares something with,
//! not every start on the node. What two actions can share:
//! - a task: its container's name, its old and new containers, its reports (a
//!   `Removed` only after its containers are gone);
//! - a host port: a new container that binds it waits until the old one that held it
//!   is gone;
//! - a Wallet workload: its old container is stopped before any new one starts, on
//!   this node as across nodes.

use std::collections::HashMap;

use bramble_api::manifest::Kind;
use bramble_api::wire::Assignment;

use super::planner::Action;
use crate::runtime::Observed;

/// Lanes run at once at most: a Pi's engine slows down, not up, under more.
pub const MAX_PARALLEL: usize = 4;

/// What an action touches that another may touch too.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key<'a> {
    Task(&'a str),
    /// `8080/tcp`.
    Port(String),
    Wallet(&'a str),
}

/// The host ports a task's spec binds, as `PORT/PROTOCOL`.
fn spec_ports(a: &Assignment) -> impl Iterator<Item = String> + '_ {
    a.spec.ports.iter().filter_map(|p| p.host_binding())
}

/// Everything `action` touches.
fn keys<'a>(
    action: &'a Action,
    desired: &HashMap<&str, &'a Assignment>,
    observed: &HashMap<&str, &'a Observed>,
) -> Vec<Key<'a>> {
    let container = |id: &str| observed.get(id).copied();
    let mut keys = Vec::new();
    let of_container = |keys: &mut Vec<Key<'a>>, c: Option<&'a Observed>| {
        if let Some(c) = c {
            keys.extend(c.host_ports.iter().cloned().map(Key::Port));
            if c.kind == Some(Kind::Wallet) {
                keys.push(Key::Wallet(c.workload.as_str()));
            }
        }
    };
    match action {
        Action::Create { assignment } => {
            keys.push(Key::Task(assignment.task.as_str()));
            keys.extend(spec_ports(assignment).map(Key::Port));
            if assignment.kind == Kind::Wallet {
                keys.push(Key::Wallet(assignment.workload.as_str()));
            }
        }
        // Created, not started: no port is bound before the start.
        Action::Prepare { assignment } => keys.push(Key::Task(assignment.task.as_str())),
        Action::Start { id, task, .. } | Action::Restart { id, task, .. } => {
            keys.push(Key::Task(task.as_str()));
            if let Some(a) = desired.get(task.as_str()) {
                keys.extend(spec_ports(a).map(Key::Port));
                if a.kind == Kind::Wallet {
                    keys.push(Key::Wallet(a.workload.as_str()));
                }
            }
            of_container(&mut keys, container(id));
        }
        Action::Stop { id, task, .. }
        | Action::Remove { id, task, .. }
        | Action::LimitCpu { id, task, .. } => {
            keys.push(Key::Task(task.as_str()));
            of_container(&mut keys, container(id));
        }
        Action::ReportRemoved { task }
        | Action::GiveUp { task, .. }
        | Action::Wait { task, .. } => keys.push(Key::Task(task.as_str())),
        Action::Report { status } => keys.push(Key::Task(status.task.as_str())),
    }
    keys
}

fn root(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

/// Splits `actions` (a round's plan) into lanes of indexes into it: each lane in plan
/// order, the lanes in the order of their first action. Two actions that touch the
/// same task, host port or Wallet workload, directly or through others, share a lane.
pub fn lanes(actions: &[Action], desired: &[Assignment], observed: &[Observed]) -> Vec<Vec<usize>> {
    let desired: HashMap<&str, &Assignment> =
        desired.iter().map(|a| (a.task.as_str(), a)).collect();
    let observed: HashMap<&str, &Observed> = observed.iter().map(|o| (o.id.as_str(), o)).collect();
    let mut parent: Vec<usize> = (0..actions.len()).collect();
    let mut first: HashMap<Key<'_>, usize> = HashMap::new();
    for (i, action) in actions.iter().enumerate() {
        for key in keys(action, &desired, &observed) {
            let j = *first.entry(key).or_insert(i);
            let (a, b) = (root(&mut parent, i), root(&mut parent, j));
            // The smaller index is the root, so a lane's root is its first action.
            parent[a.max(b)] = a.min(b);
        }
    }
    let mut lanes: Vec<Vec<usize>> = Vec::new();
    let mut lane_of: HashMap<usize, usize> = HashMap::new();
    for i in 0..actions.len() {
        let r = root(&mut parent, i);
        match lane_of.get(&r) {
            Some(&l) => lanes[l].push(i),
            None => {
                lane_of.insert(r, lanes.len());
                lanes.push(vec![i]);
            }
        }
    }
    lanes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::assignment;
    use crate::runtime::ContainerState;
    use bramble_api::manifest::{Port, Protocol};
    use bramble_api::task::TaskPhase;
    use bramble_api::wire::TaskStatus;

    fn with_port(mut a: Assignment, host: u16, protocol: Protocol) -> Assignment {
        a.spec.ports.push(Port {
            container: 80,
            host: Some(host),
            protocol,
        });
        a
    }

    fn container(id: &str, task: &str, kind: Kind, ports: &[&str]) -> Observed {
        Observed {
            id: id.into(),
            name: format!("bramble-n-{task}"),
            task: task.into(),
            workload: task.rsplit_once('-').map_or(task, |(w, _)| w).into(),
            kind: Some(kind),
            spec_hash: "old".into(),
            node: "n".into(),
            state: ContainerState::Running,
            host_ports: ports.iter().map(|p| p.to_string()).collect(),
            exit_code: None,
            oom_killed: false,
            error: None,
            created_at: None,
            started_at: None,
            finished_at: None,
            nano_cpus: None,
        }
    }

    fn create(a: &Assignment) -> Action {
        Action::Create {
            assignment: Box::new(a.clone()),
        }
    }

    fn remove(id: &str, task: &str) -> Action {
        Action::Remove {
            id: id.into(),
            task: task.into(),
            reason: super::super::RemoveReason::Unassigned,
        }
    }

    fn report(task: &str) -> Action {
        Action::Report {
            status: TaskStatus::new(task, TaskPhase::Running),
        }
    }

    #[test]
    fn unrelated_tasks_get_a_lane_each() {
        let (a, b) = (
            assignment("web-a", Kind::Service),
            assignment("api-b", Kind::Service),
        );
        let old = container("c1", "gone-x", Kind::Service, &[]);
        let actions = vec![
            remove("c1", "gone-x"),
            Action::ReportRemoved {
                task: "gone-x".into(),
            },
            create(&a),
            create(&b),
        ];
        assert_eq!(
            lanes(&actions, &[a, b], &[old]),
            vec![vec![0, 1], vec![2], vec![3]],
            "a slow removal holds up only its own Removed report"
        );
    }

    #[test]
    fn a_task_s_actions_keep_their_order() {
        let a = assignment("web-a", Kind::Service);
        let old = container("c1", "web-a", Kind::Service, &[]);
        let actions = vec![
            Action::Remove {
                id: "c1".into(),
                task: "web-a".into(),
                reason: super::super::RemoveReason::Outdated,
            },
            create(&a),
            report("web-a"),
        ];
        assert_eq!(lanes(&actions, &[a], &[old]), vec![vec![0, 1, 2]]);
    }

    #[test]
    fn a_host_port_is_freed_before_it_is_bound_again() {
        let new = with_port(assignment("web-b", Kind::Service), 8080, Protocol::Tcp);
        let other = with_port(assignment("dns-c", Kind::Service), 8080, Protocol::Udp);
        let old = container("c1", "web-a", Kind::Service, &["8080/tcp"]);
        let actions = vec![remove("c1", "web-a"), create(&new), create(&other)];
        assert_eq!(
            lanes(&actions, &[new, other], &[old]),
            vec![vec![0, 1], vec![2]],
            "the same number over UDP is another port"
        );
    }

    #[test]
    fn a_wallet_s_old_container_goes_before_its_new_one_starts() {
        let new = assignment("coin-2", Kind::Wallet);
        let other = assignment("other-1", Kind::Wallet);
        let old = container("c1", "coin-1", Kind::Wallet, &[]);
        assert_eq!(old.workload, new.workload);
        let actions = vec![remove("c1", "coin-1"), create(&new), create(&other)];
        assert_eq!(
            lanes(&actions, &[new, other], &[old]),
            vec![vec![0, 1], vec![2]],
            "another Wallet is independent"
        );
    }

    #[test]
    fn starts_and_restarts_share_a_lane_with_what_their_container_or_spec_binds() {
        let a = with_port(assignment("web-a", Kind::Service), 9000, Protocol::Tcp);
        let mut exited = container("c2", "web-a", Kind::Service, &["9000/tcp"]);
        exited.state = ContainerState::Exited;
        let holder = container("c1", "old-x", Kind::Service, &["9000/tcp"]);
        let actions = vec![
            remove("c1", "old-x"),
            Action::Restart {
                id: "c2".into(),
                task: "web-a".into(),
                failed_at: chrono::Utc::now(),
                healthy_run: false,
                nano_cpus: None,
            },
        ];
        assert_eq!(lanes(&actions, &[a], &[holder, exited]), vec![vec![0, 1]]);
    }

    #[test]
    fn sharing_is_transitive() {
        // a shares a port with b, b a task with c: all three in one lane.
        let b = with_port(assignment("web-b", Kind::Service), 80, Protocol::Tcp);
        let old_a = container("c1", "old-a", Kind::Service, &["80/tcp"]);
        let actions = vec![
            remove("c1", "old-a"),
            create(&b),
            report("web-b"),
            report("x-1"),
        ];
        assert_eq!(
            lanes(&actions, &[b], &[old_a]),
            vec![vec![0, 1, 2], vec![3]]
        );
    }

    #[test]
    fn no_actions_no_lanes_and_every_action_in_exactly_one_lane() {
        assert!(lanes(&[], &[], &[]).is_empty());
        let tasks: Vec<Assignment> = (0..20)
            .map(|i| {
                let a = assignment(&format!("w{}-{i}", i % 3), Kind::Service);
                if i % 4 == 0 {
                    with_port(a, 7000 + (i % 8) as u16, Protocol::Tcp)
                } else {
                    a
                }
            })
            .collect();
        let mut actions: Vec<Action> = tasks.iter().map(create).collect();
        actions.extend(tasks.iter().map(|a| report(&a.task)));
        let l = lanes(&actions, &tasks, &[]);
        let mut all: Vec<usize> = l.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..actions.len()).collect::<Vec<_>>());
        for lane in &l {
            assert!(lane.windows(2).all(|w| w[0] < w[1]), "plan order kept");
        }
        // 0 and 8 share 7000/tcp and 16 shares 7000 too (16 % 8 == 0).
        assert!(l
            .iter()
            .any(|lane| lane.contains(&0) && lane.contains(&8) && lane.contains(&16)));
        assert!(l.iter().any(|lane| lane == &vec![1, 21]));
    }
}
