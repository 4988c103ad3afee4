//! `/metrics` in the Prometheus text format (0.0.4), written by hand: a dozen metric
//! families do not justify a metrics library in a controller that must fit on a Pi.
//!
//! What is exported (all from memory; a scrape reads the store only to count tasks and
//! workloads):
//! - per node: status (0/1 per `status` label), cordoned, CPU, RAM, load, temperature,
//!   Pi throttling conditions, free disk;
//! - tasks by phase, workloads' desired and running counts;
//! - counters since the controller started, from the event log ([`EventCounts`], fed by
//!   `Events::record`): restarts, failovers, cron firings by outcome, every event by
//!   reason;
//! - the REST API's latency histogram by method and route ([`track`]);
//! - store write transactions (`bramble_store_writes_total`: at rest it must not move),
//!   webhook deliveries, dashboard clients, resident memory.
//!
//! `/metrics` needs a bearer token of any role (admin, viewer or join).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bramble_api::health::{decode_throttled, ThrottleCondition};
use bramble_api::rest::{Event, NodeStatus, NodeView, Severity, WorkloadView};
use bramble_api::task::TaskPhase;

use crate::cluster::Cluster;
use crate::http::ApiError;

/// Upper bounds of the latency histogram's buckets, seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Event reasons that mean a task left its node for another.
pub const FAILOVER_REASONS: [&str; 2] = ["Rescheduling", "Rescheduled"];

/// Event reasons of cron slot decisions, with the outcome label each is exported as.
pub const CRON_REASONS: [(&str, &str); 3] = [
    ("Fired", "fired"),
    ("Missed", "missed"),
    ("Skipped", "skipped"),
];

const PHASES: [TaskPhase; 8] = [
    TaskPhase::Pending,
    TaskPhase::Scheduled,
    TaskPhase::Starting,
    TaskPhase::Running,
    TaskPhase::Succeeded,
    TaskPhase::Failed,
    TaskPhase::Stopped,
    TaskPhase::Lost,
];

/// Events recorded since start, by reason and severity. Reasons are a fixed vocabulary
/// of `&'static str` in the controller, so the map stays small.
#[derive(Debug, Default)]
pub struct EventCounts(Mutex<BTreeMap<(String, &'static str), u64>>);

fn severity_label(s: Severity) -> &'static str {
    match s {
        Severity::Normal => "Normal",
        Severity::Warning => "Warning",
    }
}

impl EventCounts {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, &'static str), u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts recorded events.
    pub fn add(&self, events: &[Event]) {
        let mut m = self.lock();
        for e in events {
            *m.entry((e.reason.clone(), severity_label(e.severity)))
                .or_default() += 1;
        }
    }

    /// How many events had `reason`.
    pub fn get(&self, reason: &str) -> u64 {
        self.lock()
            .iter()
            .filter(|((r, _), _)| r == reason)
            .map(|(_, n)| n)
            .sum()
    }

    /// All counts: ((reason, severity), count).
    pub fn all(&self) -> Vec<((String, &'static str), u64)> {
        self.lock().iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// A latency histogram.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations at or below each of [`LATENCY_BUCKETS`] (not cumulative).
    buckets: [u64; LATENCY_BUCKETS.len()],
    /// Sum of all observations, seconds.
    sum: f64,
    /// Observations in all, including those above the last bucket.
    count: u64,
}

impl Histogram {
    /// Adds one observation.
    pub fn observe(&mut self, secs: f64) {
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i] += 1;
        }
        self.sum += secs;
        self.count += 1;
    }
}

/// The controller's own counters beyond the event log.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// REST latency by (method, route).
    http: Mutex<BTreeMap<(String, String), Histogram>>,
}

impl Telemetry {
    /// Records one request's time to response headers.
    pub fn observe(&self, method: &str, route: &str, secs: f64) {
        let mut h = self.http.lock().unwrap_or_else(|e| e.into_inner());
        // Routes are the router's templates (`/v1/nodes/{name}`), never raw paths, so
        // the number of series is bounded by the number of routes.
        h.entry((method.to_string(), route.to_string()))
            .or_default()
            .observe(secs);
    }

    fn http(&self) -> Vec<((String, String), Histogram)> {
        let h = self.http.lock().unwrap_or_else(|e| e.into_inner());
        h.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Axum middleware: times every request to its response headers (a stream's body is
/// not waited for) under its route template; unmatched paths count as `other`.
pub async fn track(State(c): State<Arc<Cluster>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |m| m.as_str().to_string());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    c.telemetry
        .observe(&method, &route, start.elapsed().as_secs_f64());
    resp
}

/// Everything a scrape shows, gathered first so rendering is a pure function.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Nodes with their last metrics.
    pub nodes: Vec<NodeView>,
    /// Tasks by phase.
    pub phases: BTreeMap<TaskPhase, u64>,
    /// Workloads with desired and running counts.
    pub workloads: Vec<WorkloadView>,
    /// Events since start by (reason, severity).
    pub events: Vec<((String, &'static str), u64)>,
    /// REST latency by (method, route).
    pub http: Vec<((String, String), Histogram)>,
    /// Store write transactions since start.
    pub store_writes: u64,
    /// Webhook deliveries: (webhook, result, count).
    pub webhooks: Vec<(String, &'static str, u64)>,
    /// Dashboard streams open now.
    pub dashboard_clients: u64,
    /// Resident memory of the controller, when known.
    pub resident_bytes: Option<u64>,
    /// Seconds since the controller started.
    pub uptime_secs: u64,
}

/// Gathers a scrape from the cluster.
pub fn gather(c: &Cluster) -> Result<Scrape, ApiError> {
    let mut phases: BTreeMap<TaskPhase, u64> = PHASES.iter().map(|p| (*p, 0)).collect();
    for t in c.tasks(None, None, None)? {
        *phases.entry(t.phase).or_default() += 1;
    }
    Ok(Scrape {
        nodes: c.node_views()?,
        phases,
        workloads: c.workloads(None)?,
        events: c.events.counts.all(),
        http: c.telemetry.http(),
        store_writes: c.store.write_count(),
        webhooks: c.webhooks.counters(),
        dashboard_clients: c.feed.clients() as u64,
        resident_bytes: resident_bytes(),
        uptime_secs: c.started.elapsed().as_secs(),
    })
}

/// VmRSS of this process.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The text exposition format, one family at a time.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", number(value));
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn condition_label(c: ThrottleCondition) -> &'static str {
    match c {
        ThrottleCondition::UnderVoltage => "under_voltage",
        ThrottleCondition::FrequencyCapped => "frequency_capped",
        ThrottleCondition::Throttled => "throttled",
        ThrottleCondition::SoftTemperatureLimit => "soft_temperature_limit",
    }
}

/// Renders a scrape in the Prometheus text format.
pub fn render(s: &Scrape) -> String {
    let mut o = Out(String::with_capacity(4096 + s.nodes.len() * 1500));
    let statuses = [NodeStatus::Ready, NodeStatus::NotReady, NodeStatus::Dead];

    o.family(
        "bramble_node_status",
        "gauge",
        "1 for the node's current health, 0 for the others.",
    );
    for n in &s.nodes {
        for st in statuses {
            let v = if n.status == st { 1.0 } else { 0.0 };
            o.sample(
                "bramble_node_status",
                &[("node", &n.info.name), ("status", &st.to_string())],
                v,
            );
        }
    }
    o.family(
        "bramble_node_cordoned",
        "gauge",
        "1 when the node takes no new tasks.",
    );
    for n in &s.nodes {
        let v = if n.cordoned { 1.0 } else { 0.0 };
        o.sample("bramble_node_cordoned", &[("node", &n.info.name)], v);
    }

    // Per-node gauges from the last heartbeat; a figure the node cannot measure is left
    // out rather than exported as 0.
    type Pick = fn(&bramble_api::wire::NodeMetrics) -> Option<f64>;
    let gauges: [(&str, &str, Pick); 7] = [
        (
            "bramble_node_cpu_percent",
            "CPU use over all cores, 0-100.",
            |m| Some(f64::from(m.cpu_percent)),
        ),
        ("bramble_node_memory_used_bytes", "RAM in use.", |m| {
            Some(m.memory_used_bytes as f64)
        }),
        ("bramble_node_memory_total_bytes", "RAM in all.", |m| {
            Some(m.memory_total_bytes as f64)
        }),
        (
            "bramble_node_memory_available_bytes",
            "RAM available without swapping.",
            |m| m.memory_available_bytes.map(|b| b as f64),
        ),
        ("bramble_node_load1", "1-minute load average.", |m| {
            Some(f64::from(m.load1))
        }),
        ("bramble_node_load5", "5-minute load average.", |m| {
            m.load5.map(f64::from)
        }),
        (
            "bramble_node_temperature_celsius",
            "SoC temperature.",
            |m| m.temperature_celsius.map(f64::from),
        ),
    ];
    for (name, help, pick) in gauges {
        o.family(name, "gauge", help);
        for n in &s.nodes {
            if let Some(v) = n.metrics.as_ref().and_then(pick) {
                o.sample(name, &[("node", &n.info.name)], v);
            }
        }
    }
    o.family(
        "bramble_node_throttled",
        "gauge",
        "Raspberry Pi firmware conditions: 1 when active now (only nodes with the firmware).",
    );
    o.family(
        "bramble_node_throttled_since_boot",
        "gauge",
        "Raspberry Pi firmware conditions: 1 when they happened since boot.",
    );
    for n in &s.nodes {
        let Some(bits) = n.metrics.as_ref().and_then(|m| m.throttled) else {
            continue;
        };
        let notes = decode_throttled(bits);
        for (c, _) in ThrottleCondition::ALL {
            let note = notes.iter().find(|x| x.condition == c);
            let labels = [
                ("node", n.info.name.as_str()),
                ("condition", condition_label(c)),
            ];
            let now = note.is_some_and(|x| x.now);
            o.sample(
                "bramble_node_throttled",
                &labels,
                if now { 1.0 } else { 0.0 },
            );
            let ever = if note.is_some() { 1.0 } else { 0.0 };
            o.sample("bramble_node_throttled_since_boot", &labels, ever);
        }
    }
    o.family(
        "bramble_node_disk_free_bytes",
        "gauge",
        "Free space: disk=data is the agent's data dir, disk=docker Docker's root dir.",
    );
    for n in &s.nodes {
        let Some(m) = &n.metrics else { continue };
        for (which, d) in [("data", &m.data_disk), ("docker", &m.docker_disk)] {
            if let Some(d) = d {
                let labels = [("node", n.info.name.as_str()), ("disk", which)];
                o.sample("bramble_node_disk_free_bytes", &labels, d.free_bytes as f64);
            }
        }
    }

    o.family("bramble_tasks", "gauge", "Tasks by phase.");
    for (p, n) in &s.phases {
        o.sample("bramble_tasks", &[("phase", &p.to_string())], *n as f64);
    }
    o.family(
        "bramble_workload_desired_tasks",
        "gauge",
        "Tasks a workload wants running.",
    );
    for w in &s.workloads {
        let labels = [
            ("kind", w.manifest.kind.as_str()),
            ("name", w.manifest.metadata.name.as_str()),
        ];
        o.sample(
            "bramble_workload_desired_tasks",
            &labels,
            f64::from(w.desired),
        );
    }
    o.family(
        "bramble_workload_running_tasks",
        "gauge",
        "A workload's tasks running now.",
    );
    for w in &s.workloads {
        let labels = [
            ("kind", w.manifest.kind.as_str()),
            ("name", w.manifest.metadata.name.as_str()),
        ];
        o.sample(
            "bramble_workload_running_tasks",
            &labels,
            f64::from(w.running),
        );
    }

    let count = |reasons: &[&str]| -> f64 {
        s.events
            .iter()
            .filter(|((r, _), _)| reasons.contains(&r.as_str()))
            .map(|(_, n)| *n as f64)
            .sum()
    };
    o.family(
        "bramble_task_restarts_total",
        "counter",
        "Container restarts by agents (Restarted events) since the controller started.",
    );
    o.sample("bramble_task_restarts_total", &[], count(&["Restarted"]));
    o.family(
        "bramble_failovers_total",
        "counter",
        "Tasks taken off their node to run elsewhere (Rescheduling and Rescheduled events).",
    );
    o.sample("bramble_failovers_total", &[], count(&FAILOVER_REASONS));
    o.family(
        "bramble_cron_firings_total",
        "counter",
        "CronJob slots decided, by outcome (fired, missed, skipped).",
    );
    for (reason, outcome) in CRON_REASONS {
        o.sample(
            "bramble_cron_firings_total",
            &[("outcome", outcome)],
            count(&[reason]),
        );
    }
    o.family(
        "bramble_events_total",
        "counter",
        "Events recorded since the controller started, by reason and severity.",
    );
    for ((reason, severity), n) in &s.events {
        o.sample(
            "bramble_events_total",
            &[("reason", reason), ("severity", severity)],
            *n as f64,
        );
    }

    o.family(
        "bramble_http_request_duration_seconds",
        "histogram",
        "REST API time to response headers, by method and route.",
    );
    for ((method, route), h) in &s.http {
        let mut cumulative = 0;
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += h.buckets[i];
            o.sample(
                "bramble_http_request_duration_seconds_bucket",
                &[("method", method), ("route", route), ("le", &number(*le))],
                cumulative as f64,
            );
        }
        o.sample(
            "bramble_http_request_duration_seconds_bucket",
            &[("method", method), ("route", route), ("le", "+Inf")],
            h.count as f64,
        );
        let labels = [("method", method.as_str()), ("route", route.as_str())];
        o.sample("bramble_http_request_duration_seconds_sum", &labels, h.sum);
        o.sample(
            "bramble_http_request_duration_seconds_count",
            &labels,
            h.count as f64,
        );
    }

    o.family(
        "bramble_store_writes_total",
        "counter",
        "Store write transactions since the controller started (about 0 per minute at rest).",
    );
    o.sample("bramble_store_writes_total", &[], s.store_writes as f64);
    o.family(
        "bramble_webhook_deliveries_total",
        "counter",
        "Webhook deliveries by result: sent, failed (after retries), dropped (queue full).",
    );
    for (name, result, n) in &s.webhooks {
        o.sample(
            "bramble_webhook_deliveries_total",
            &[("webhook", name), ("result", result)],
            *n as f64,
        );
    }
    o.family(
        "bramble_dashboard_clients",
        "gauge",
        "Dashboard live streams open now.",
    );
    o.sample("bramble_dashboard_clients", &[], s.dashboard_clients as f64);
    if let Some(rss) = s.resident_bytes {
        o.family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the controller.",
        );
        o.sample("process_resident_memory_bytes", &[], rss as f64);
    }
    o.family(
        "bramble_controller_uptime_seconds",
        "gauge",
        "Seconds since the controller started.",
    );
    o.sample(
        "bramble_controller_uptime_seconds",
        &[],
        s.uptime_secs as f64,
    );
    o.0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// `GET /metrics`.
pub async fn metrics(State(c): State<Arc<Cluster>>, headers: HeaderMap) -> Response {
    // Outside /v1, so the API's middleware does not check it: any role may scrape.
    if bearer(&headers).and_then(|t| c.tokens.role(t)).is_none() {
        return ApiError::unauthorized().into_response();
    }
    match gather(&c) {
        Ok(s) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            render(&s),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
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

    fn lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn renders_nodes_with_unknown_figures_left_out() {
        let pi = NodeMetrics {
            cpu_percent: 12.5,
            memory_used_bytes: 1000,
            memory_total_bytes: 4000,
            temperature_celsius: Some(61.2),
            throttled: Some(0x50005),
            ..NodeMetrics::default()
        };
        let pc = NodeMetrics {
            cpu_percent: 3.0,
            ..NodeMetrics::default()
        };
        let s = Scrape {
            nodes: vec![
                node("pi1", NodeStatus::Ready, Some(pi)),
                node("pc", NodeStatus::Dead, Some(pc)),
            ],
            ..Scrape::default()
        };
        let text = render(&s);
        let l = lines(&text);
        for want in [
            r#"bramble_node_status{node="pi1",status="Ready"} 1"#,
            r#"bramble_node_status{node="pi1",status="NotReady"} 0"#,
            r#"bramble_node_status{node="pc",status="Dead"} 1"#,
            r#"bramble_node_cpu_percent{node="pi1"} 12.5"#,
            r#"bramble_node_memory_used_bytes{node="pi1"} 1000"#,
            r#"bramble_node_temperature_celsius{node="pi1"} 61.20000076293945"#,
            r#"bramble_node_throttled{node="pi1",condition="under_voltage"} 1"#,
            r#"bramble_node_throttled{node="pi1",condition="frequency_capped"} 0"#,
            r#"bramble_node_throttled_since_boot{node="pi1",condition="throttled"} 1"#,
        ] {
            assert!(l.contains(&want), "missing {want} in\n{text}");
        }
        assert!(
            !text.contains(r#"bramble_node_temperature_celsius{node="pc"}"#),
            "a PC without a sensor has no temperature, not 0:\n{text}"
        );
        assert!(!text.contains(r#"bramble_node_throttled{node="pc""#));
        // Every family has HELP and TYPE before its samples.
        assert!(text.contains("# TYPE bramble_node_status gauge\n"));
    }

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let mut h = Histogram::default();
        h.observe(0.0005);
        h.observe(0.003);
        h.observe(0.2);
        h.observe(60.0);
        let s = Scrape {
            events: vec![
                (("Restarted".into(), "Warning"), 3),
                (("Rescheduling".into(), "Warning"), 2),
                (("Rescheduled".into(), "Warning"), 1),
                (("Fired".into(), "Normal"), 7),
                (("Missed".into(), "Warning"), 1),
            ],
            phases: [(TaskPhase::Running, 4), (TaskPhase::Pending, 0)].into(),
            http: vec![(("GET".into(), "/v1/nodes/{name}".into()), h)],
            store_writes: 42,
            webhooks: vec![("ops".into(), "sent", 5), ("ops".into(), "dropped", 1)],
            ..Scrape::default()
        };
        let text = render(&s);
        let l = lines(&text);
        for want in [
            "bramble_task_restarts_total 3",
            "bramble_failovers_total 3",
            r#"bramble_cron_firings_total{outcome="fired"} 7"#,
            r#"bramble_cron_firings_total{outcome="missed"} 1"#,
            r#"bramble_cron_firings_total{outcome="skipped"} 0"#,
            r#"bramble_events_total{reason="Fired",severity="Normal"} 7"#,
            r#"bramble_tasks{phase="Running"} 4"#,
            r#"bramble_tasks{phase="Pending"} 0"#,
            r#"bramble_http_request_duration_seconds_bucket{method="GET",route="/v1/nodes/{name}",le="0.001"} 1"#,
            r#"bramble_http_request_duration_seconds_bucket{method="GET",route="/v1/nodes/{name}",le="0.005"} 2"#,
            r#"bramble_http_request_duration_seconds_bucket{method="GET",route="/v1/nodes/{name}",le="0.25"} 3"#,
            r#"bramble_http_request_duration_seconds_bucket{method="GET",route="/v1/nodes/{name}",le="10"} 3"#,
            r#"bramble_http_request_duration_seconds_bucket{method="GET",route="/v1/nodes/{name}",le="+Inf"} 4"#,
            r#"bramble_http_request_duration_seconds_count{method="GET",route="/v1/nodes/{name}"} 4"#,
            "bramble_store_writes_total 42",
            r#"bramble_webhook_deliveries_total{webhook="ops",result="sent"} 5"#,
        ] {
            assert!(l.contains(&want), "missing {want} in\n{text}");
        }
        assert!(text.contains("# TYPE bramble_http_request_duration_seconds histogram\n"));
        assert!(text.contains("# TYPE bramble_store_writes_total counter\n"));
    }

    #[test]
    fn escapes_label_values() {
        let mut o = Out(String::new());
        o.sample("m", &[("a", "x\"y\\z\nw")], 1.5);
        assert_eq!(o.0, "m{a=\"x\\\"y\\\\z\\nw\"} 1.5\n");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(2.0), "2");
    }

    #[test]
    fn counts_events_by_reason() {
        let c = EventCounts::default();
        let ev = |reason: &str, severity| Event {
            seq: 1,
            at: chrono::DateTime::UNIX_EPOCH,
            severity,
            object: "task/x".into(),
            reason: reason.into(),
            message: String::new(),
        };
        c.add(&[
            ev("Restarted", Severity::Warning),
            ev("Restarted", Severity::Warning),
            ev("Fired", Severity::Normal),
        ]);
        assert_eq!(c.get("Restarted"), 2);
        assert_eq!(c.get("Fired"), 1);
        assert_eq!(c.get("Missed"), 0);
        assert_eq!(c.all().len(), 2);
    }
}
