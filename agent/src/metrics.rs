//! Node facts and health for the heartbeat: CPU (overall and per core), memory, load,
//! SoC temperature, the Raspberry Pi firmware's throttling flags, free disk, and each
//! running task container's CPU and memory.
//!
//! Only what is reported is refreshed, and each source costs what it must: sysinfo's
//! CPU and memory refresh, two small sysfs reads and two `statvfs` calls per heartbeat.
//! Docker stats are the expensive part, so a background task takes them at most every
//! [`CONTAINER_STATS_EVERY`] and the heartbeat sends the latest round. A source the
//! node does not have (not a Pi, no thermal zone, memory cgroup disabled) is `None`,
//! shown as "unavailable", never as 0.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::query_parameters::StatsOptionsBuilder;
use bramble_api::health::{parse_throttled, ContainerUsage, DiskUsage};
use bramble_api::wire::NodeMetrics;
use chrono::Utc;
use futures_util::StreamExt;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, System};

use crate::runtime::{ContainerState, Runtime};

/// How often Docker is asked for per-container stats.
pub const CONTAINER_STATS_EVERY: Duration = Duration::from_secs(10);

/// Where the Pi firmware publishes `vcgencmd get_throttled`.
const THROTTLED: &str = "/sys/devices/platform/soc/soc:firmware/get_throttled";

/// Where thermal zones live.
const THERMAL: &str = "/sys/class/thermal";

/// Docker's root directory when the engine does not say.
const DEFAULT_DOCKER_ROOT: &str = "/var/lib/docker";

/// What the background task shares with the heartbeat.
#[derive(Debug, Default)]
struct Shared {
    /// The agent's data directory, once known.
    data_dir: Option<PathBuf>,
    /// Docker's root directory, once known.
    docker_root: Option<PathBuf>,
    /// The latest round of container stats; `None` while Docker cannot be asked.
    containers: Option<Vec<ContainerUsage>>,
}

/// Aborts the background task with the sampler.
#[derive(Debug)]
struct Watcher(tokio::task::JoinHandle<()>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Samples the node for heartbeats.
pub struct Metrics {
    sys: Option<System>,
    /// Temperature files chosen at start (the SoC's zone where it can be told apart).
    zones: Vec<PathBuf>,
    /// Whether the Pi firmware file exists (checked once: it does not come and go).
    firmware: bool,
    shared: Arc<Mutex<Shared>>,
    watcher: Mutex<Option<Watcher>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // Plain data: a panic elsewhere leaves nothing half-updated worth refusing.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// Starts sampling. CPU usage needs two samples some 200 ms apart: the first
    /// heartbeat reports the average since boot, every later one the last interval.
    pub fn new() -> Metrics {
        let sys = System::new().ok().map(|mut s| {
            s.refresh_cpu_list(CpuRefreshKind::nothing().with_usage());
            s.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
            s
        });
        if sys.is_none() {
            tracing::warn!("cannot read system information; CPU and memory will be reported as 0");
        }
        let zones = thermal_zones(Path::new(THERMAL));
        let firmware = Path::new(THROTTLED).exists();
        tracing::debug!(zones = ?zones, pi_firmware = firmware, "health sources");
        Metrics {
            sys,
            zones,
            firmware,
            shared: Arc::new(Mutex::new(Shared::default())),
            watcher: Mutex::new(None),
        }
    }

    /// Also reports the free space of `data_dir` and of Docker's root directory, and
    /// per-container CPU and memory, from a background task that asks Docker every
    /// [`CONTAINER_STATS_EVERY`]. The task ends with the sampler. Needs a Tokio runtime.
    pub fn watch(&self, runtime: &Runtime, data_dir: &Path) {
        lock(&self.shared).data_dir = Some(data_dir.to_path_buf());
        let task = tokio::spawn(watch_containers(runtime.clone(), self.shared.clone()));
        *self.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(Watcher(task));
    }

    /// CPU cores.
    pub fn cores(&self) -> u32 {
        let n = self.sys.as_ref().map_or(0, |s| s.cpus().len());
        let n = if n == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            n
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Total RAM in bytes.
    pub fn memory_total(&self) -> u64 {
        self.sys.as_ref().map_or(0, |s| s.total_memory())
    }

    /// The operating system, e.g. `Linux (Debian GNU/Linux 12)`.
    pub fn os() -> String {
        System::long_os_version().unwrap_or_default()
    }

    /// A sample now.
    pub fn sample(&mut self) -> NodeMetrics {
        let (cpu, used, total, available, cores) = match self.sys.as_mut() {
            Some(s) => {
                s.refresh_cpu_usage();
                s.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
                let total = s.total_memory();
                let cores: Vec<f32> = s.cpus().iter().map(|c| round1(c.usage())).collect();
                (
                    s.global_cpu_usage(),
                    total.saturating_sub(s.available_memory()),
                    total,
                    (total > 0).then(|| s.available_memory()),
                    (!cores.is_empty()).then_some(cores),
                )
            }
            None => (0.0, 0, 0, None, None),
        };
        let load = System::load_average().ok();
        let temperature = self
            .zones
            .iter()
            .filter_map(|z| std::fs::read_to_string(z).ok())
            .filter_map(|t| parse_millidegrees(&t))
            .reduce(f32::max);
        let throttled = if self.firmware {
            std::fs::read_to_string(THROTTLED)
                .ok()
                .and_then(|t| parse_throttled(&t))
        } else {
            None
        };
        let (data_dir, docker_root, containers) = {
            let s = lock(&self.shared);
            (
                s.data_dir.clone(),
                s.docker_root.clone(),
                s.containers.clone(),
            )
        };
        NodeMetrics {
            at: Utc::now(),
            cpu_percent: cpu,
            memory_used_bytes: used,
            memory_total_bytes: total,
            load1: load.as_ref().map_or(0.0, |l| l.one as f32),
            cores_percent: cores,
            memory_available_bytes: available,
            load5: load.as_ref().map(|l| l.five as f32),
            load15: load.as_ref().map(|l| l.fifteen as f32),
            data_disk: data_dir.as_deref().and_then(disk_usage),
            docker_disk: docker_root.as_deref().and_then(disk_usage),
            temperature_celsius: temperature,
            throttled,
            containers,
        }
    }
}

/// One decimal is all a dashboard shows, and it keeps heartbeats short.
fn round1(x: f32) -> f32 {
    (x * 10.0).round() / 10.0
}

/// Free and total space of the file system holding `path`; `None` when it cannot be
/// measured (the path does not exist here, e.g. a remote Docker engine's root).
fn disk_usage(path: &Path) -> Option<DiskUsage> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some(DiskUsage {
        path: path.display().to_string(),
        free_bytes: s.f_bavail.saturating_mul(s.f_frsize),
        total_bytes: s.f_blocks.saturating_mul(s.f_frsize),
    })
}

/// The temperature files to read: those of zones typed like the SoC or CPU (a Pi's
/// `cpu-thermal`, a PC's `x86_pkg_temp`) when there are any, else every zone (the
/// hottest counts).
fn thermal_zones(root: &Path) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let zones: Vec<(PathBuf, String)> = dir
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .map(|e| {
            let kind = std::fs::read_to_string(e.path().join("type")).unwrap_or_default();
            (e.path().join("temp"), kind.trim().to_string())
        })
        .collect();
    pick_zones(zones)
}

/// See [`thermal_zones`]; sorted, so the choice is stable.
fn pick_zones(zones: Vec<(PathBuf, String)>) -> Vec<PathBuf> {
    let soc = |t: &str| {
        let t = t.to_ascii_lowercase();
        t.contains("cpu") || t.contains("soc") || t.contains("x86_pkg")
    };
    let any_soc = zones.iter().any(|(_, t)| soc(t));
    let mut out: Vec<PathBuf> = zones
        .into_iter()
        .filter(|(_, t)| !any_soc || soc(t))
        .map(|(p, _)| p)
        .collect();
    out.sort();
    out
}

/// A thermal zone's `temp` (millidegrees Celsius) in °C; readings no SoC can have
/// (a broken sensor says -273 or 255 °C) are dropped.
fn parse_millidegrees(text: &str) -> Option<f32> {
    let milli: i64 = text.trim().parse().ok()?;
    let c = milli as f32 / 1000.0;
    (-40.0..=150.0).contains(&c).then(|| round1(c))
}

/// CPU use between two Docker stats samples of one container, as `docker stats`
/// computes it: the container's share of all CPU time, times the online CPUs, in
/// percent (100 = one full core). `None` without a usable interval.
fn cpu_percent(prev: (u64, u64), now: (u64, u64), online_cpus: u32) -> Option<f32> {
    let used = now.0.checked_sub(prev.0)?;
    let system = now.1.checked_sub(prev.1)?;
    if system == 0 {
        return None;
    }
    let cpus = f64::from(online_cpus.max(1));
    Some(round1((used as f64 / system as f64 * cpus * 100.0) as f32))
}

/// Memory in use as `docker stats` shows it: usage minus the inactive page cache the
/// kernel can reclaim (`inactive_file` under cgroup v2, `total_inactive_file` under
/// v1). `None` when there is no usage figure (memory cgroup disabled).
fn memory_in_use(usage: Option<u64>, stats: Option<&HashMap<String, u64>>) -> Option<u64> {
    let usage = usage?;
    let cache = stats
        .and_then(|s| {
            s.get("inactive_file")
                .or_else(|| s.get("total_inactive_file"))
        })
        .copied()
        .unwrap_or(0);
    Some(if cache < usage { usage - cache } else { usage })
}

/// Learns Docker's root directory, then takes a round of one-shot stats of the node's
/// running task containers every [`CONTAINER_STATS_EVERY`]. CPU is computed from this
/// task's own previous round rather than Docker's `precpu` pair, which would make
/// every request wait a second inside the engine.
async fn watch_containers(runtime: Runtime, shared: Arc<Mutex<Shared>>) {
    let docker = runtime.docker();
    let mut prev: HashMap<String, (u64, u64)> = HashMap::new();
    let mut ticker = tokio::time::interval(CONTAINER_STATS_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if lock(&shared).docker_root.is_none() {
            let root = match docker.info().await {
                Ok(info) => info.docker_root_dir.map(PathBuf::from),
                Err(e) => {
                    tracing::debug!(error = %e, "docker info failed; assuming the default root");
                    None
                }
            };
            lock(&shared).docker_root =
                Some(root.unwrap_or_else(|| PathBuf::from(DEFAULT_DOCKER_ROOT)));
        }
        let running = match runtime.list().await {
            Ok(all) => all
                .into_iter()
                .filter(|o| o.state == ContainerState::Running)
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list containers for stats");
                lock(&shared).containers = None;
                continue;
            }
        };
        let mut round = Vec::with_capacity(running.len());
        let mut seen = HashMap::with_capacity(running.len());
        for o in running {
            let opts = StatsOptionsBuilder::new()
                .stream(false)
                .one_shot(true)
                .build();
            let stats = docker.stats(&o.id, Some(opts)).next().await;
            let Some(Ok(s)) = stats else {
                // Gone between the list and the stats, or the engine hiccuped.
                continue;
            };
            let cpu = s.cpu_stats.as_ref().and_then(|c| {
                let total = c.cpu_usage.as_ref()?.total_usage?;
                let system = c.system_cpu_usage?;
                let online = c.online_cpus.unwrap_or(1);
                let last = prev.get(&o.id).copied();
                seen.insert(o.id.clone(), (total, system));
                last.and_then(|p| cpu_percent(p, (total, system), online))
            });
            let memory = s
                .memory_stats
                .as_ref()
                .and_then(|m| memory_in_use(m.usage, m.stats.as_ref()));
            round.push(ContainerUsage {
                task: o.task,
                cpu_percent: cpu,
                memory_bytes: memory,
            });
        }
        round.sort_by(|a, b| a.task.cmp(&b.task));
        // Only containers still running are remembered, so the map cannot grow.
        prev = seen;
        lock(&shared).containers = Some(round);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_percent_like_docker_stats() {
        // (prev, now, online cpus) -> percent
        type Case = ((u64, u64), (u64, u64), u32, Option<f32>);
        let table: &[Case] = &[
            // A quarter of all CPU time on 4 cores: one full core.
            ((0, 0), (250, 1000), 4, Some(100.0)),
            ((100, 1000), (150, 2000), 4, Some(20.0)),
            ((100, 1000), (100, 2000), 4, Some(0.0)),
            // No time passed, or counters went backwards (container restarted).
            ((100, 1000), (200, 1000), 4, None),
            ((500, 1000), (100, 2000), 4, None),
            ((0, 1000), (100, 900), 4, None),
            // online_cpus missing (0) counts as one.
            ((0, 0), (500, 1000), 0, Some(50.0)),
        ];
        for (prev, now, cpus, want) in table {
            assert_eq!(
                cpu_percent(*prev, *now, *cpus),
                *want,
                "{prev:?} {now:?} {cpus}"
            );
        }
    }

    #[test]
    fn memory_in_use_subtracts_the_reclaimable_cache() {
        let v2: HashMap<String, u64> = [("inactive_file".to_string(), 30)].into();
        let v1: HashMap<String, u64> = [("total_inactive_file".to_string(), 40)].into();
        let odd: HashMap<String, u64> = [("inactive_file".to_string(), 500)].into();
        assert_eq!(memory_in_use(Some(100), Some(&v2)), Some(70));
        assert_eq!(memory_in_use(Some(100), Some(&v1)), Some(60));
        assert_eq!(memory_in_use(Some(100), None), Some(100));
        assert_eq!(memory_in_use(Some(100), Some(&odd)), Some(100));
        // Memory cgroup disabled: Docker sends no usage at all.
        assert_eq!(memory_in_use(None, Some(&v2)), None);
    }

    #[test]
    fn temperatures_in_millidegrees() {
        assert_eq!(parse_millidegrees("48312\n"), Some(48.3));
        assert_eq!(parse_millidegrees("-5000"), Some(-5.0));
        assert_eq!(parse_millidegrees("255000"), None);
        assert_eq!(parse_millidegrees("-273000"), None);
        assert_eq!(parse_millidegrees("hot"), None);
        assert_eq!(parse_millidegrees(""), None);
    }

    #[test]
    fn prefers_the_soc_thermal_zone() {
        let z = |p: &str, t: &str| (PathBuf::from(p), t.to_string());
        // A Pi: one zone, cpu-thermal.
        assert_eq!(
            pick_zones(vec![z("/t/zone0/temp", "cpu-thermal")]),
            [PathBuf::from("/t/zone0/temp")]
        );
        // A PC: the package sensor, not the ACPI or Wi-Fi ones.
        assert_eq!(
            pick_zones(vec![
                z("/t/zone2/temp", "iwlwifi_1"),
                z("/t/zone0/temp", "acpitz"),
                z("/t/zone1/temp", "x86_pkg_temp"),
            ]),
            [PathBuf::from("/t/zone1/temp")]
        );
        // Nothing recognisable: all of them (the hottest is reported).
        assert_eq!(
            pick_zones(vec![z("/t/zone1/temp", "b"), z("/t/zone0/temp", "a")]),
            [
                PathBuf::from("/t/zone0/temp"),
                PathBuf::from("/t/zone1/temp")
            ]
        );
        assert!(pick_zones(Vec::new()).is_empty());
    }

    #[test]
    fn reads_zones_from_a_sysfs_like_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let zone = dir.path().join("thermal_zone0");
        std::fs::create_dir(&zone).expect("mkdir");
        std::fs::write(zone.join("type"), "cpu-thermal\n").expect("type");
        std::fs::write(zone.join("temp"), "51234\n").expect("temp");
        std::fs::create_dir(dir.path().join("cooling_device0")).expect("mkdir");
        assert_eq!(thermal_zones(dir.path()), [zone.join("temp")]);
        assert!(thermal_zones(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn samples_without_a_runtime_leave_docker_figures_out() {
        let mut m = Metrics::new();
        let s = m.sample();
        assert!(s.memory_total_bytes > 0);
        assert!(s.load5.is_some(), "Linux has /proc/loadavg");
        assert_eq!(s.data_disk, None, "no data dir given");
        assert_eq!(s.containers, None, "no Docker stats without watch()");
        let dir = tempfile::tempdir().expect("tempdir");
        lock(&m.shared).data_dir = Some(dir.path().to_path_buf());
        let d = m.sample().data_disk.expect("a temp dir has a file system");
        assert!(d.total_bytes >= d.free_bytes && d.total_bytes > 0, "{d:?}");
    }
}
