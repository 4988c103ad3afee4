//! Managed volumes that follow their workload: which node holds the newest data of a
//! workload, which standby nodes keep copies of a running task's volumes, what the
//! agents' reports mean as events, and the volumes view. Pure: the agents' reports
//! (memory only, resent at every Hello) and the snapshot in, decisions out.
//!
//! Data is ordered by the placement epoch that made it, then a volume in use before a
//! copy of the same placement (a copy is of its past), then the copy's time.

use std::collections::BTreeMap;

use bramble_api::manifest::Kind;
use bramble_api::manifest::{Arch, Placement};
use bramble_api::rest::{VolumeCopyView, VolumeView};
use bramble_api::task::{DesiredState, Task};
use bramble_api::wire::{
    RestoreSource, StandbyDuty, SyncPeer, VolumeOrigin, VolumeReport, VolumeRole,
};
use chrono::{DateTime, Utc};

use super::events::Draft;
use super::snapshot::Snapshot;

/// Every node's last volume report.
pub type Reports = BTreeMap<String, Vec<VolumeReport>>;

/// How new a node's data of a workload is; larger is newer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    /// The placement that made it.
    pub epoch: u64,
    /// In use (newer than any copy of the same placement).
    pub in_use: bool,
    /// When the copy completed (or the volume last synced).
    pub at: Option<DateTime<Utc>>,
}

fn rank(r: &VolumeReport) -> Option<Rank> {
    match r.role {
        VolumeRole::InUse | VolumeRole::Copy => Some(Rank {
            epoch: r.epoch,
            in_use: r.role == VolumeRole::InUse,
            at: r.at,
        }),
        VolumeRole::SetAside => None,
    }
}

/// How new the data a node holds of every one of `volumes` of `workload` is: the
/// oldest of them (a node missing one holds nothing usable). Set-aside data never
/// counts.
pub fn holding(reports: &[VolumeReport], workload: &str, volumes: &[String]) -> Option<Rank> {
    if volumes.is_empty() {
        return None;
    }
    volumes
        .iter()
        .map(|v| {
            reports
                .iter()
                .filter(|r| r.workload == workload && &r.volume == v)
                .filter_map(rank)
                .max()
        })
        .try_fold(None::<Rank>, |acc, r| {
            let r = r?;
            Some(Some(acc.map_or(r, |a| a.min(r))))
        })
        .flatten()
}

/// The nodes, among `nodes` with their reports, holding data of every one of
/// `workload`'s `volumes`, newest first (ties by name).
pub fn holders<'a>(
    nodes: impl IntoIterator<Item = (&'a str, &'a [VolumeReport])>,
    workload: &str,
    volumes: &[String],
) -> Vec<String> {
    let mut held: Vec<(Rank, &str)> = nodes
        .into_iter()
        .filter_map(|(n, rs)| Some((holding(rs, workload, volumes)?, n)))
        .collect();
    held.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    held.into_iter().map(|(_, n)| n.to_string()).collect()
}

/// A node that could keep copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its name.
    pub name: String,
    /// Heard from (a cordoned node still keeps copies).
    pub usable: bool,
    /// Its architecture.
    pub arch: Arch,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Where its agent takes copies (`IP:PORT`); none: it takes none.
    pub mesh: Option<String>,
}

fn fits(c: &Candidate, p: &Placement) -> bool {
    (p.architectures.is_empty() || p.architectures.contains(&c.arch))
        && p.node_selector
            .iter()
            .all(|(k, v)| c.labels.get(k) == Some(v))
}

/// What every agent is told about copies: the standby nodes of each running task whose
/// volumes sync, the duties of each standby node, and the current epoch of each
/// workload with managed volumes whose placements carry one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Duties {
    /// By task id: where its agent sends copies.
    pub sync_to: BTreeMap<String, Vec<SyncPeer>>,
    /// By node: what it keeps, from whom.
    pub standby: BTreeMap<String, Vec<StandbyDuty>>,
    /// By workload: its current placement's epoch.
    pub epochs: BTreeMap<String, u64>,
    /// By task id: a standby holding newer data of its volumes than its own node, which
    /// its agent fetches before the container starts.
    pub restore_from: BTreeMap<String, RestoreSource>,
}

/// Whether a task's placements are ordered by epoch: a Wallet's (fencing) and any whose
/// volumes sync (a copy says which placement made it).
pub fn carries_epoch(t: &Task) -> bool {
    t.kind == Kind::Wallet || t.spec.sync.is_some()
}

/// The managed volume names of a task.
pub fn managed(t: &Task) -> Vec<String> {
    t.spec
        .volumes
        .iter()
        .filter_map(|v| v.managed().map(str::to_string))
        .collect()
}

/// Picks the standby nodes of every placed task whose volumes sync: usable nodes that
/// fit the task's placement and take copies, other than its own; those already holding
/// the newest data first (so a sync stays incremental and a standby does not move
/// needlessly), then those keeping the fewest copies so far, then by name.
pub fn duties(snap: &Snapshot, candidates: &[Candidate], reports: &Reports) -> Duties {
    let mut out = Duties::default();
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    let empty = Vec::new();
    for t in snap.tasks.values().map(|v| &v.value) {
        let Some(owner) = &t.node else { continue };
        if t.desired != DesiredState::Running || t.phase.is_terminal() {
            continue;
        }
        let volumes = managed(t);
        // Every placement ordered by epoch (Wallets, and whatever syncs) with managed
        // volumes: data of an older one on another node is set aside, synced or not.
        if !volumes.is_empty() && carries_epoch(t) {
            out.epochs.insert(t.workload.clone(), t.epoch);
        }
        let Some(rule) = &t.spec.sync else { continue };
        let mut picks: Vec<(Option<Rank>, &Candidate)> = candidates
            .iter()
            .filter(|c| c.usable && &c.name != owner && c.mesh.is_some() && fits(c, &t.placement))
            .map(|c| {
                (
                    holding(
                        reports.get(&c.name).unwrap_or(&empty),
                        &t.workload,
                        &volumes,
                    ),
                    c,
                )
            })
            .collect();
        picks.sort_by(|(ra, a), (rb, b)| {
            rb.cmp(ra)
                .then(load.get(&a.name).cmp(&load.get(&b.name)))
                .then(a.name.cmp(&b.name))
        });
        let peers: Vec<SyncPeer> = picks
            .into_iter()
            .take(rule.copies as usize)
            .filter_map(|(_, c)| {
                Some(SyncPeer {
                    node: c.name.clone(),
                    mesh: c.mesh.clone()?,
                })
            })
            .collect();
        let own = holding(reports.get(owner).unwrap_or(&empty), &t.workload, &volumes);
        let newer = peers.iter().find_map(|p| {
            let r = holding(
                reports.get(&p.node).unwrap_or(&empty),
                &t.workload,
                &volumes,
            )?;
            (Some(r) > own).then(|| RestoreSource {
                node: p.node.clone(),
                mesh: p.mesh.clone(),
                epoch: r.epoch,
                at: r.at,
            })
        });
        if let Some(src) = newer {
            out.restore_from.insert(t.id.clone(), src);
        }
        for p in &peers {
            *load.entry(p.node.clone()).or_default() += 1;
            out.standby
                .entry(p.node.clone())
                .or_default()
                .push(StandbyDuty {
                    workload: t.workload.clone(),
                    owner: owner.clone(),
                    epoch: t.epoch,
                    volumes: volumes.clone(),
                });
        }
        out.sync_to.insert(t.id.clone(), peers);
    }
    out
}

/// The events a node's new volume report means, against its previous one.
/// `known_elsewhere(workload)`: whether another node reports data of that workload
/// (then a volume of it starting empty has lost data, and says so loudly).
pub fn report_events(
    node: &str,
    old: &[VolumeReport],
    new: &[VolumeReport],
    known_elsewhere: impl Fn(&str) -> bool,
) -> Vec<Draft> {
    let mut out = Vec::new();
    let was = |r: &VolumeReport| {
        old.iter()
            .find(|o| o.volume == r.volume && o.role == r.role && o.workload == r.workload)
    };
    for r in new {
        let obj = format!("volume/{}", r.volume);
        let before = was(r);
        match r.role {
            VolumeRole::InUse => {
                let fresh = before.is_none_or(|b| b.epoch != r.epoch);
                match &r.origin {
                    Some(VolumeOrigin::Copy { epoch, at, owner }) if fresh => out.push(Draft::normal(
                        obj.clone(),
                        "VolumeRestored",
                        format!(
                            "{} of {} restored on {node} from the copy {owner} sent at {} (placement {epoch})",
                            r.volume,
                            r.workload,
                            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ),
                    )),
                    Some(VolumeOrigin::Empty) if fresh && known_elsewhere(&r.workload) => {
                        out.push(Draft::warning(
                            obj.clone(),
                            "VolumeStartedEmpty",
                            format!(
                                "{} of {} started EMPTY on {node}: no copy of it was on the node; its last data is on a node that is down or set aside (bramblectl get volumes)",
                                r.volume, r.workload
                            ),
                        ))
                    }
                    _ => {}
                }
                let err = r.last_sync.as_ref().and_then(|s| s.error.as_deref());
                let old_err = before
                    .and_then(|b| b.last_sync.as_ref())
                    .and_then(|s| s.error.as_deref());
                match (old_err, err) {
                    (o, Some(e)) if o != Some(e) => out.push(Draft::warning(
                        obj.clone(),
                        "SyncFailed",
                        format!("{} on {node}: {e}", r.volume),
                    )),
                    (Some(_), None) => out.push(Draft::normal(
                        obj.clone(),
                        "Synced",
                        format!(
                            "{} on {node}: copies complete on {}",
                            r.volume,
                            r.last_sync
                                .as_ref()
                                .map(|s| s.done.join(", "))
                                .unwrap_or_default()
                        ),
                    )),
                    _ => {}
                }
            }
            VolumeRole::SetAside => {
                if !old
                    .iter()
                    .any(|o| o.role == VolumeRole::SetAside && o.path == r.path)
                {
                    out.push(Draft::warning(
                        obj,
                        "VolumeSetAside",
                        format!(
                            "{}'s data of placement {} on {node} was set aside (the workload runs from newer data elsewhere); kept at {} for the operator, never used again",
                            r.volume,
                            r.epoch,
                            r.path.as_deref().unwrap_or("?")
                        ),
                    ));
                }
            }
            VolumeRole::Copy => {}
        }
    }
    out
}

/// Every managed volume of every workload, with the node using it, its copies and
/// what is set aside; and volumes reported by nodes that no workload declares.
pub fn views(snap: &Snapshot, reports: &Reports) -> Vec<VolumeView> {
    let mut out: BTreeMap<String, VolumeView> = BTreeMap::new();
    for w in snap.workloads.values().map(|w| &w.value) {
        for v in w.manifest.spec.volumes.iter().filter_map(|v| v.managed()) {
            out.insert(
                v.to_string(),
                VolumeView {
                    name: v.to_string(),
                    workload: w.name().to_string(),
                    kind: Some(w.kind()),
                    sync: w.manifest.sync(),
                    ..VolumeView::default()
                },
            );
        }
    }
    let current: BTreeMap<&str, u64> = snap
        .tasks
        .values()
        .map(|t| &t.value)
        .filter(|t| t.spec.sync.is_some() && t.node.is_some() && t.desired == DesiredState::Running)
        .map(|t| (t.workload.as_str(), t.epoch))
        .collect();
    for (node, rs) in reports {
        for r in rs {
            let v = out.entry(r.volume.clone()).or_insert_with(|| VolumeView {
                name: r.volume.clone(),
                workload: r.workload.clone(),
                ..VolumeView::default()
            });
            let copy = VolumeCopyView {
                node: node.clone(),
                epoch: r.epoch,
                at: r.at,
                bytes: r.bytes,
                files: r.files,
                stale: current
                    .get(r.workload.as_str())
                    .is_some_and(|c| *c > r.epoch),
                path: r.path.clone(),
            };
            match r.role {
                VolumeRole::InUse => {
                    v.node = Some(node.clone());
                    v.bytes = r.bytes;
                    v.files = r.files;
                    v.epoch = Some(r.epoch);
                    v.origin = r.origin.clone();
                    v.last_sync = r.last_sync.clone();
                }
                VolumeRole::Copy => v.copies.push(copy),
                VolumeRole::SetAside => v.set_aside.push(copy),
            }
        }
    }
    let mut views: Vec<VolumeView> = out.into_values().collect();
    for v in &mut views {
        v.copies.sort_by(|a, b| {
            (b.epoch, b.at)
                .cmp(&(a.epoch, a.at))
                .then(a.node.cmp(&b.node))
        });
    }
    views
}

#[cfg(test)]
mod tests {
    use super::*;
    use bramble_api::wire::SyncOutcome;
    use chrono::TimeZone;

    fn at(s: i64) -> Option<DateTime<Utc>> {
        Utc.timestamp_opt(s, 0).single()
    }

    fn rep(workload: &str, volume: &str, role: VolumeRole, epoch: u64, t: i64) -> VolumeReport {
        VolumeReport {
            workload: workload.into(),
            volume: volume.into(),
            role,
            epoch,
            at: at(t),
            bytes: 1,
            files: 1,
            origin: None,
            last_sync: None,
            path: None,
        }
    }

    fn of(reports: &Reports) -> impl Iterator<Item = (&str, &[VolumeReport])> {
        reports.iter().map(|(n, r)| (n.as_str(), r.as_slice()))
    }

    #[test]
    fn newer_placements_win_then_use_then_time_and_every_volume_counts() {
        use VolumeRole::*;
        let vols = vec!["a".to_string(), "b".to_string()];
        let mut reports = Reports::new();
        reports.insert(
            "n1".into(),
            vec![rep("w", "a", Copy, 5, 10), rep("w", "b", Copy, 5, 10)],
        );
        reports.insert(
            "n2".into(),
            vec![rep("w", "a", Copy, 5, 20), rep("w", "b", Copy, 5, 20)],
        );
        reports.insert(
            "n3".into(),
            vec![rep("w", "a", InUse, 4, 30), rep("w", "b", InUse, 4, 30)],
        );
        // Only one of the two volumes: nothing usable.
        reports.insert("n4".into(), vec![rep("w", "a", Copy, 9, 40)]);
        // Set aside never counts.
        reports.insert(
            "n5".into(),
            vec![
                rep("w", "a", SetAside, 9, 50),
                rep("w", "b", SetAside, 9, 50),
            ],
        );
        assert_eq!(holders(of(&reports), "w", &vols), vec!["n2", "n1", "n3"]);
        reports.insert(
            "n3".into(),
            vec![rep("w", "a", InUse, 5, 1), rep("w", "b", InUse, 5, 1)],
        );
        assert_eq!(
            holders(of(&reports), "w", &vols)[0],
            "n3",
            "in use beats a copy of its own placement"
        );
        assert!(holders(of(&reports), "other", &vols).is_empty());
    }

    fn cand(name: &str) -> Candidate {
        Candidate {
            name: name.into(),
            usable: true,
            arch: Arch::Arm64,
            labels: BTreeMap::new(),
            mesh: Some(format!("{name}:7947")),
        }
    }

    fn snap_with(tasks: Vec<Task>) -> Snapshot {
        let mut s = Snapshot::default();
        for (i, t) in tasks.into_iter().enumerate() {
            s.tasks.insert(
                t.id.clone(),
                std::sync::Arc::new(crate::core::model::Versioned {
                    rev: i as u64 + 1,
                    created: i as u64 + 1,
                    value: t,
                }),
            );
        }
        s
    }

    fn wallet_task(id: &str, workload: &str, node: &str, epoch: u64, copies: u32) -> Task {
        let yaml = format!(
            "apiVersion: bramble/v1\nkind: Wallet\nmetadata: {{name: {workload}}}\nspec:\n  image: x\n  volumes: [{{name: {workload}-data, path: /data}}]\n  sync: {{copies: {copies}}}\n"
        );
        let m = bramble_api::parse::parse_manifests("t.yaml", &yaml)
            .expect("parses")
            .workloads
            .remove(0)
            .manifest;
        let mut t = crate::core::reconcile::new_task(
            &crate::core::model::StoredWorkload::new(m, Utc::now()),
            id.into(),
            0,
            Utc::now(),
        );
        t.node = Some(node.into());
        t.epoch = epoch;
        t
    }

    #[test]
    fn standbys_are_other_usable_fitting_nodes_holders_first_then_spread() {
        let snap = snap_with(vec![
            wallet_task("a-1", "a", "n1", 7, 1),
            wallet_task("b-1", "b", "n1", 8, 2),
        ]);
        let mut down = cand("n4");
        down.usable = false;
        let mut nomesh = cand("n5");
        nomesh.mesh = None;
        let cands = vec![cand("n1"), cand("n2"), cand("n3"), down, nomesh];
        let mut reports = Reports::new();
        reports.insert(
            "n3".into(),
            vec![rep("a", "a-data", VolumeRole::Copy, 7, 1)],
        );
        let d = duties(&snap, &cands, &reports);
        let nodes = |t: &str| {
            d.sync_to[t]
                .iter()
                .map(|p| p.node.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            nodes("a-1"),
            vec!["n3"],
            "the holder of a copy stays the standby"
        );
        let src = &d.restore_from["a-1"];
        assert_eq!(
            (src.node.as_str(), src.epoch),
            ("n3", 7),
            "n1 holds nothing: it fetches n3's copy"
        );
        assert!(
            !d.restore_from.contains_key("b-1"),
            "no one holds newer data of b"
        );
        let mut held = reports.clone();
        held.insert(
            "n1".into(),
            vec![rep("a", "a-data", VolumeRole::InUse, 7, 0)],
        );
        assert!(
            duties(&snap, &cands, &held).restore_from.is_empty(),
            "once the owner holds the data in use, nothing is fetched"
        );
        assert_eq!(
            nodes("b-1"),
            vec!["n2", "n3"],
            "the least loaded first, never the owner, a down node or one without a mesh port"
        );
        assert_eq!(
            d.epochs,
            BTreeMap::from([("a".to_string(), 7), ("b".to_string(), 8)])
        );
        let n3: Vec<_> = d.standby["n3"]
            .iter()
            .map(|s| (s.workload.as_str(), s.owner.as_str(), s.epoch))
            .collect();
        assert_eq!(n3, vec![("a", "n1", 7), ("b", "n1", 8)]);
        // Deterministic.
        assert_eq!(d, duties(&snap, &cands, &reports));
    }

    #[test]
    fn a_wallet_that_does_not_sync_still_names_its_epoch_so_old_data_is_set_aside() {
        let snap = snap_with(vec![wallet_task("a-1", "a", "n1", 7, 0)]);
        let d = duties(&snap, &[cand("n1"), cand("n2")], &Reports::new());
        assert_eq!(d.epochs, BTreeMap::from([("a".to_string(), 7)]));
        assert!(d.standby.is_empty() && d.restore_from.is_empty());
    }

    #[test]
    fn reports_become_events_once() {
        let mut restored = rep("w", "data", VolumeRole::InUse, 9, 0);
        restored.origin = Some(VolumeOrigin::Copy {
            epoch: 7,
            at: Utc::now(),
            owner: "n1".into(),
        });
        let e = report_events("n2", &[], std::slice::from_ref(&restored), |_| true);
        assert_eq!(
            e.iter().map(|d| d.reason).collect::<Vec<_>>(),
            vec!["VolumeRestored"]
        );
        assert!(report_events(
            "n2",
            std::slice::from_ref(&restored),
            std::slice::from_ref(&restored),
            |_| true
        )
        .is_empty());

        let mut empty = rep("w", "data", VolumeRole::InUse, 9, 0);
        empty.origin = Some(VolumeOrigin::Empty);
        assert!(
            report_events("n2", &[], std::slice::from_ref(&empty), |_| false).is_empty(),
            "a first start is quietly empty"
        );
        let e = report_events("n2", &[], std::slice::from_ref(&empty), |_| true);
        assert_eq!(e[0].reason, "VolumeStartedEmpty");

        let mut failing = empty.clone();
        failing.last_sync = Some(SyncOutcome {
            at: Utc::now(),
            done: vec![],
            sent_bytes: 0,
            error: Some("n3: refused".into()),
        });
        let e = report_events(
            "n2",
            std::slice::from_ref(&empty),
            std::slice::from_ref(&failing),
            |_| true,
        );
        assert_eq!(
            e.iter().map(|d| d.reason).collect::<Vec<_>>(),
            vec!["SyncFailed"]
        );
        let mut ok = failing.clone();
        ok.last_sync = Some(SyncOutcome {
            at: Utc::now(),
            done: vec!["n3".into()],
            sent_bytes: 0,
            error: None,
        });
        let e = report_events(
            "n2",
            std::slice::from_ref(&failing),
            std::slice::from_ref(&ok),
            |_| true,
        );
        assert_eq!(
            e.iter().map(|d| d.reason).collect::<Vec<_>>(),
            vec!["Synced"]
        );

        let mut aside = rep("w", "data", VolumeRole::SetAside, 3, 0);
        aside.path = Some("/x".into());
        let e = report_events("n1", &[], std::slice::from_ref(&aside), |_| true);
        assert_eq!(e[0].reason, "VolumeSetAside");
        assert_eq!(e[0].severity, bramble_api::rest::Severity::Warning);
    }
}
