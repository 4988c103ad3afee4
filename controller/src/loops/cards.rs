//! The dashboard's views: compact cards and rows the live feed sends (smaller than the
//! REST types on purpose: a browser tab gets a node card every second, and the
//! controller shares a Pi with real work). Pure functions of the API's views, so the
//! thresholds are tested.

use std::collections::BTreeMap;

use bramble_api::health::{decode_throttled, ContainerUsage, DiskUsage};
use bramble_api::rest::{CronJobView, FiringOutcome, NodeStatus, NodeView, WorkloadView};
use bramble_api::status::Level;
use bramble_api::task::{DesiredState, Task, TaskPhase};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::state::history::{self, Point};

/// At or above this SoC temperature a node is "hot" (a Pi's firmware starts capping
/// at 80 °C; this leaves time to act).
pub const HOT_CELSIUS: f32 = 75.0;

/// Below this share of free space (or [`LOW_DISK_BYTES`]) a disk is "low".
pub const LOW_DISK_PERCENT: f64 = 10.0;

/// Below this many free bytes a disk is "low", whatever its size.
pub const LOW_DISK_BYTES: u64 = 1 << 30;

/// Below this share of available RAM a node is short of memory.
pub const LOW_MEMORY_PERCENT: f64 = 10.0;

/// A throttling condition in words, and whether it is active now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Note {
    /// "under-voltage now", "throttled occurred".
    pub text: String,
    /// Active now (red) rather than over (amber).
    pub now: bool,
}

/// One node card.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCard {
    /// Node name.
    pub name: String,
    /// Health.
    pub status: NodeStatus,
    /// Takes no new tasks.
    pub cordoned: bool,
    /// Architecture.
    pub arch: String,
    /// Cores.
    pub cores: u32,
    /// Last heartbeat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<DateTime<Utc>>,
    /// CPU over all cores, 0–100.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f32>,
    /// CPU per core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_core: Option<Vec<f32>>,
    /// RAM used, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_used: Option<u64>,
    /// RAM in all, bytes.
    pub mem_total: u64,
    /// RAM available, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_available: Option<u64>,
    /// Load averages 1/5/15 (5 and 15 absent from old agents).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub load: Vec<f32>,
    /// SoC temperature, °C.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temp: Option<f32>,
    /// Pi throttling, in words; absent when the node has no Pi firmware.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle: Option<Vec<Note>>,
    /// Agent's data dir disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_disk: Option<DiskUsage>,
    /// Docker's disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_disk: Option<DiskUsage>,
    /// What needs attention, in words.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Per task: [CPU % of one core, memory bytes]; null where unavailable.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub usage: BTreeMap<String, (Option<f32>, Option<u64>)>,
    /// The newest 10-second history point, appended to the sparklines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point: Option<PointRow>,
}

/// A point as `[t, cpu, memory MiB, temperature]`, short on the wire.
pub type PointRow = (i64, f32, u64, Option<f32>);

fn point_row(p: &Point) -> PointRow {
    (p.t, p.cpu, p.mem / (1 << 20), p.temp)
}

/// A node's hour of history, column-wise, with `null` for 10-second slots without a
/// heartbeat, so the page can draw gaps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryView {
    /// Unix seconds of the first slot.
    pub start: i64,
    /// Seconds per slot.
    pub step: i64,
    /// CPU %, per slot.
    pub cpu: Vec<Option<f32>>,
    /// RAM used in MiB, per slot.
    pub mem: Vec<Option<u64>>,
    /// Temperature °C, per slot.
    pub temp: Vec<Option<f32>>,
}

/// Lays points out on the 10-second grid.
pub fn history_view(points: &[Point]) -> HistoryView {
    let step = history::STEP_SECS;
    let start = points.first().map_or(0, |p| p.t);
    let slots = points
        .last()
        .map_or(0, |l| ((l.t - start) / step + 1) as usize)
        .min(history::POINTS);
    let mut v = HistoryView {
        start,
        step,
        cpu: vec![None; slots],
        mem: vec![None; slots],
        temp: vec![None; slots],
    };
    for p in points {
        let i = ((p.t - start) / step) as usize;
        if i < slots {
            v.cpu[i] = Some(p.cpu);
            v.mem[i] = Some(p.mem / (1 << 20));
            v.temp[i] = p.temp;
        }
    }
    v
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30))
}

/// What about a node needs attention, in words: health, heat, throttling now, low disk
/// or memory. Pure, so the thresholds are tested.
pub fn node_warnings(n: &NodeView) -> Vec<String> {
    let mut w = Vec::new();
    match n.status {
        NodeStatus::Ready => {}
        NodeStatus::NotReady => w.push("heartbeats late: no new tasks".to_string()),
        NodeStatus::Dead => w.push("down: no heartbeats; its tasks run elsewhere".to_string()),
    }
    // Setup problems the agent found (the memory-cgroup trap), each with its fix.
    w.extend(n.info.warnings.iter().cloned());
    if n.status == NodeStatus::Dead {
        // Old figures of a dead node would only mislead.
        return w;
    }
    let Some(m) = &n.metrics else {
        return w;
    };
    if let Some(t) = m.temperature_celsius.filter(|t| *t >= HOT_CELSIUS) {
        w.push(format!("hot: {t:.1} °C"));
    }
    if let Some(bits) = m.throttled {
        w.extend(
            decode_throttled(bits)
                .into_iter()
                .filter(|n| n.now)
                .map(|n| n.to_string()),
        );
    }
    for (which, d) in [("data disk", &m.data_disk), ("Docker disk", &m.docker_disk)] {
        if let Some(d) = d {
            let low = d.free_bytes < LOW_DISK_BYTES
                || d.free_percent().is_some_and(|p| p < LOW_DISK_PERCENT);
            if low {
                w.push(format!("{which} almost full: {} free", gib(d.free_bytes)));
            }
        }
    }
    if let Some(avail) = m.memory_available_bytes {
        if m.memory_total_bytes > 0 {
            let pct = avail as f64 * 100.0 / m.memory_total_bytes as f64;
            if pct < LOW_MEMORY_PERCENT {
                w.push(format!("memory low: {pct:.0}% available"));
            }
        }
    }
    w
}

/// Rounded to a tenth: what a card shows, and no longer on the wire.
fn tenth(x: f32) -> f32 {
    (x * 10.0).round() / 10.0
}

/// A node card from its view and newest history point.
pub fn node_card(n: &NodeView, point: Option<Point>) -> NodeCard {
    let m = n.metrics.as_ref().filter(|_| n.status != NodeStatus::Dead);
    let usage = m
        .and_then(|m| m.containers.as_ref())
        .map(|cs| {
            cs.iter()
                .map(|c: &ContainerUsage| {
                    (c.task.clone(), (c.cpu_percent.map(tenth), c.memory_bytes))
                })
                .collect()
        })
        .unwrap_or_default();
    NodeCard {
        name: n.info.name.clone(),
        status: n.status,
        cordoned: n.cordoned,
        arch: n.info.arch.to_string(),
        cores: n.info.cores,
        last_seen: n.last_seen,
        cpu: m.map(|m| tenth(m.cpu_percent)),
        per_core: m
            .and_then(|m| m.cores_percent.as_ref())
            .map(|cs| cs.iter().map(|c| tenth(*c)).collect()),
        mem_used: m.map(|m| m.memory_used_bytes),
        mem_total: m.map_or(n.info.memory_bytes, |m| m.memory_total_bytes.max(1)),
        mem_available: m.and_then(|m| m.memory_available_bytes),
        load: m.map_or_else(Vec::new, |m| {
            std::iter::once(m.load1)
                .chain(m.load5)
                .chain(m.load15)
                .map(|l| (l * 100.0).round() / 100.0)
                .collect()
        }),
        temp: m.and_then(|m| m.temperature_celsius),
        throttle: m.and_then(|m| m.throttled).map(|bits| {
            decode_throttled(bits)
                .into_iter()
                .map(|n| Note {
                    text: n.to_string(),
                    now: n.now,
                })
                .collect()
        }),
        data_disk: m.and_then(|m| m.data_disk.clone()),
        docker_disk: m.and_then(|m| m.docker_disk.clone()),
        warnings: node_warnings(n),
        usage,
        point: point.as_ref().map(point_row),
    }
}

/// One task row.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRow {
    /// Task id.
    pub id: String,
    /// Workload kind.
    pub kind: String,
    /// Workload name.
    pub workload: String,
    /// Node, once placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Phase.
    pub phase: TaskPhase,
    /// Desired state, when not Running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired: Option<DesiredState>,
    /// Restarts.
    #[serde(skip_serializing_if = "is_zero")]
    pub restarts: u32,
    /// Readiness.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// Why it is where it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Its state by name (`CrashLoopBackOff`, …): see [`bramble_api::status`].
    pub status: String,
    /// How bad that is.
    pub level: Level,
    /// When its node or the scheduler tries again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Task rows; finished runs of Jobs and CronJobs beyond the newest few are left out
/// (their history is on the cron job row and in `bramblectl`).
pub fn task_rows(tasks: &[Task], now: DateTime<Utc>) -> Vec<TaskRow> {
    let mut rows: Vec<TaskRow> = tasks
        .iter()
        .map(|t| (t, bramble_api::status::of(t, now)))
        .map(|(t, state)| TaskRow {
            id: t.id.clone(),
            kind: t.kind.to_string(),
            workload: t.workload.clone(),
            node: t.node.clone(),
            phase: t.phase,
            desired: (t.desired != DesiredState::Running).then_some(t.desired),
            restarts: t.restarts,
            ready: t.ready,
            message: t.message.clone(),
            status: state.status,
            level: state.level,
            retry_at: state.retry_at,
        })
        .collect();
    rows.sort_by(|a, b| (&a.workload, &a.id).cmp(&(&b.workload, &b.id)));
    rows
}

/// One workload row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadRow {
    /// Kind.
    pub kind: String,
    /// Name.
    pub name: String,
    /// Image.
    pub image: String,
    /// Tasks wanted running.
    pub desired: u32,
    /// Tasks running.
    pub running: u32,
}

/// Workload rows.
pub fn workload_rows(ws: &[WorkloadView]) -> Vec<WorkloadRow> {
    ws.iter()
        .map(|w| WorkloadRow {
            kind: w.manifest.kind.to_string(),
            name: w.manifest.metadata.name.to_string(),
            image: w.manifest.spec.image.to_string(),
            desired: w.desired,
            running: w.running,
        })
        .collect()
}

/// One cron job row: the job without its firing history.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CronRow {
    /// Name.
    pub name: String,
    /// Cron expression.
    pub schedule: String,
    /// Time zone.
    pub timezone: String,
    /// Not firing.
    pub suspended: bool,
    /// Last slot decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<DateTime<Utc>>,
    /// Phase of the newest run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskPhase>,
    /// Next slot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<DateTime<Utc>>,
    /// Runs active now.
    pub active: u32,
    /// Slots missed or skipped among the recent ones.
    pub missed: u32,
    /// The newest firings, newest first, with how their runs went.
    pub runs: Vec<CronRun>,
}

/// One firing of a cron job, as its history on the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CronRun {
    /// The scheduled time.
    pub slot: DateTime<Utc>,
    /// Fired, missed, skipped, …
    pub outcome: FiringOutcome,
    /// The run's task, while it is kept (its logs are a click away).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The run's phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<TaskPhase>,
    /// Its exit code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// How long it ran, in milliseconds, once finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub millis: Option<i64>,
    /// How late its container started after the slot, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub late_millis: Option<i64>,
}

/// How many firings each cron job row carries.
pub const CRON_RUNS: usize = 8;

/// Cron job rows.
pub fn cron_rows(cs: &[CronJobView], tasks: &[Task]) -> Vec<CronRow> {
    let by_id: std::collections::HashMap<&str, &Task> =
        tasks.iter().map(|t| (t.id.as_str(), t)).collect();
    cs.iter()
        .map(|c| CronRow {
            runs: c
                .firings
                .iter()
                .take(CRON_RUNS)
                .map(|f| {
                    let t = f.task.as_deref().and_then(|id| by_id.get(id));
                    CronRun {
                        slot: f.slot,
                        outcome: f.outcome,
                        task: f.task.clone(),
                        phase: t.map(|t| t.phase),
                        exit_code: t.and_then(|t| t.exit_code),
                        millis: t.and_then(|t| {
                            Some((t.finished_at? - t.started_at?).num_milliseconds())
                        }),
                        late_millis: t
                            .and_then(|t| t.started_at)
                            .map(|s| (s - f.slot).num_milliseconds()),
                    }
                })
                .collect(),
            name: c.name.clone(),
            schedule: c.schedule.clone(),
            timezone: c.timezone.clone(),
            suspended: c.suspended,
            last: c.last_slot,
            result: c.last_result,
            next: c.next,
            active: c.active,
            missed: u32::try_from(
                c.firings
                    .iter()
                    .filter(|f| {
                        matches!(
                            f.outcome,
                            bramble_api::rest::FiringOutcome::Missed
                                | bramble_api::rest::FiringOutcome::Skipped
                        )
                    })
                    .count(),
            )
            .unwrap_or(u32::MAX),
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bramble_api::manifest::Arch;
    use bramble_api::wire::{NodeInfo, NodeMetrics};

    /// A Ready-or-not Pi node with no tasks, for the controller's view tests.
    pub(crate) fn node(name: &str, status: NodeStatus, metrics: Option<NodeMetrics>) -> NodeView {
        NodeView {
            info: NodeInfo {
                mesh: None,
                name: name.into(),
                arch: Arch::Arm64,
                cores: 4,
                memory_bytes: 1 << 30,
                docker_version: "20.10".into(),
                labels: Default::default(),
                agent_version: "0.1.0".into(),
                os: String::new(),
                machine_id: None,
                memory_limits: None,
                warnings: Vec::new(),
            },
            status,
            cordoned: false,
            last_seen: None,
            metrics,
            tasks: 0,
            allocated_cpu_millis: 0,
            allocated_memory_bytes: 0,
            address: None,
            registered_at: chrono::DateTime::UNIX_EPOCH,
        }
    }

    fn view(status: NodeStatus, m: Option<NodeMetrics>) -> NodeView {
        node("pi1", status, m)
    }

    fn disk(free: u64, total: u64) -> Option<DiskUsage> {
        Some(DiskUsage {
            path: "/".into(),
            free_bytes: free,
            total_bytes: total,
        })
    }

    #[test]
    fn warns_in_words_about_what_needs_attention() {
        let healthy = NodeMetrics {
            memory_total_bytes: 1000,
            memory_available_bytes: Some(500),
            temperature_celsius: Some(55.0),
            throttled: Some(0x50000),
            data_disk: disk(20 << 30, 32 << 30),
            ..NodeMetrics::default()
        };
        let table: Vec<(NodeStatus, NodeMetrics, Vec<&str>)> = vec![
            // Throttling that is over is a note on the card, not a warning.
            (NodeStatus::Ready, healthy.clone(), vec![]),
            (
                NodeStatus::Ready,
                NodeMetrics {
                    temperature_celsius: Some(81.5),
                    throttled: Some(0x50005),
                    ..healthy.clone()
                },
                vec!["hot: 81.5 °C", "under-voltage now", "throttled now"],
            ),
            (
                NodeStatus::Ready,
                NodeMetrics {
                    data_disk: disk(2 << 30, 32 << 30),
                    docker_disk: disk(500 << 20, 200 << 30),
                    memory_available_bytes: Some(50),
                    ..healthy.clone()
                },
                vec![
                    "data disk almost full: 2.0 GiB free",
                    "Docker disk almost full: 0.5 GiB free",
                    "memory low: 5% available",
                ],
            ),
            (
                NodeStatus::NotReady,
                healthy.clone(),
                vec!["heartbeats late: no new tasks"],
            ),
            (
                NodeStatus::Dead,
                NodeMetrics {
                    temperature_celsius: Some(90.0),
                    ..healthy.clone()
                },
                vec!["down: no heartbeats; its tasks run elsewhere"],
            ),
            // Nothing measured is nothing to warn about.
            (NodeStatus::Ready, NodeMetrics::default(), vec![]),
        ];
        for (status, m, want) in table {
            assert_eq!(
                node_warnings(&view(status, Some(m.clone()))),
                want,
                "{status} {m:?}"
            );
        }
    }

    #[test]
    fn setup_warnings_of_the_agent_are_shown_with_their_fix() {
        let mut v = view(NodeStatus::Ready, None);
        v.info.warnings = vec![bramble_agent_warning()];
        assert_eq!(node_warnings(&v), vec![bramble_agent_warning()]);
        v.status = NodeStatus::Dead;
        assert_eq!(
            node_warnings(&v),
            vec![
                "down: no heartbeats; its tasks run elsewhere".to_string(),
                bramble_agent_warning()
            ]
        );
    }

    fn bramble_agent_warning() -> String {
        "memory limits are not enforced: add \"cgroup_memory=1 cgroup_enable=memory\" to /boot/firmware/cmdline.txt (one line) and reboot".to_string()
    }

    #[test]
    fn cards_say_unavailable_by_leaving_figures_out() {
        let pc = NodeMetrics {
            cpu_percent: 12.34,
            memory_used_bytes: 10,
            memory_total_bytes: 100,
            load1: 0.5,
            ..NodeMetrics::default()
        };
        let card = node_card(&view(NodeStatus::Ready, Some(pc)), None);
        let text = serde_json::to_string(&card).expect("serializes");
        assert!(
            text.contains(r#""cpu":12.3,"#),
            "short numbers on the wire: {text}"
        );
        let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert!(json.get("temp").is_none(), "{json}");
        assert!(json.get("throttle").is_none(), "no Pi firmware: {json}");
        assert_eq!(json["load"], serde_json::json!([0.5]));
        // A dead node's last figures are not shown as if current.
        let dead = node_card(&view(NodeStatus::Dead, Some(NodeMetrics::default())), None);
        assert_eq!(dead.cpu, None);
        assert_eq!(dead.mem_total, 1 << 30);
    }

    #[test]
    fn history_is_laid_out_on_the_grid_with_gaps() {
        let p = |t, cpu| Point {
            t,
            cpu,
            mem: 3 << 20,
            temp: None,
        };
        let v = history_view(&[p(100, 1.0), p(110, 2.0), p(140, 5.0)]);
        assert_eq!(v.start, 100);
        assert_eq!(v.cpu, [Some(1.0), Some(2.0), None, None, Some(5.0)]);
        assert_eq!(v.mem[0], Some(3));
        assert_eq!(history_view(&[]).cpu, Vec::<Option<f32>>::new());
    }
}
