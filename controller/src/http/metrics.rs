//! `/metrics` in the Prometheus text format (0.0.4), through `prometheus-client`.
//!
//! What is exported (all from memory: the snapshot and the live node table; a scrape
//! reads nothing from the store):
//! - per node: status (0/1 per `status` label), cordoned, CPU, RAM, load, temperature,
//!   Pi throttling conditions, free disk; a figure a node cannot measure is left out,
//!   never exported as 0;
//! - tasks by phase, workloads' desired and running counts;
//! - counters since the controller started, from the events it has seen: restarts,
//!   failovers, cron firings by outcome, every event by reason;
//! - the REST API's latency histogram by method and route ([`track`]);
//! - store write transactions (`bramble_store_writes_total`: at rest it must not move),
//!   webhook deliveries, dashboard clients, resident memory.
//!
//! `/metrics` needs the admin or the viewer token (see [`super::auth`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bramble_api::health::{decode_throttled, ThrottleCondition};
use bramble_api::rest::{NodeStatus, NodeView, WorkloadView};
use bramble_api::task::TaskPhase;
use prometheus_client::encoding::prometheus_text::{encode, CONTENT_TYPE};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::App;
use crate::core::views;

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

type Labels = Vec<(&'static str, String)>;
type GaugeFamily = Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>;
type CounterFamily = Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>;
type LatencyFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// REST latency by (method, route): one histogram per route template.
#[derive(Clone)]
pub struct Latency(LatencyFamily);

impl Default for Latency {
    fn default() -> Self {
        Latency(Family::new_with_constructor(latency_histogram))
    }
}

impl Latency {
    /// Records one request's time to response headers.
    pub fn observe(&self, method: &str, route: &str, secs: f64) {
        // Routes are the router's templates (`/v1/nodes/{name}`), never raw paths, so
        // the number of series is bounded by the number of routes.
        self.0
            .get_or_create(&vec![
                ("method", method.to_string()),
                ("route", route.to_string()),
            ])
            .observe(secs);
    }
}

/// Axum middleware: times every request to its response headers (a stream's body is
/// not waited for) under its route template; unmatched paths count as `other`.
pub async fn track(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "other".to_string(), |m| m.as_str().to_string());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    app.latency
        .observe(&method, &route, start.elapsed().as_secs_f64());
    resp
}

/// Everything a scrape shows, gathered first so rendering is a pure function.
#[derive(Clone, Default)]
pub struct Scrape {
    /// Nodes with their last metrics.
    pub nodes: Vec<NodeView>,
    /// Tasks by phase.
    pub phases: BTreeMap<TaskPhase, u64>,
    /// Workloads with desired and running counts.
    pub workloads: Vec<WorkloadView>,
    /// Events since start by (reason, severity).
    pub events: Vec<((String, &'static str), u64)>,
    /// REST latency.
    pub latency: Latency,
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

/// Gathers a scrape.
pub fn gather(app: &App) -> Scrape {
    let snap = app.state.snapshot();
    let mut phases: BTreeMap<TaskPhase, u64> = PHASES.iter().map(|p| (*p, 0)).collect();
    for t in snap.tasks.values() {
        *phases.entry(t.value.phase).or_default() += 1;
    }
    Scrape {
        nodes: views::nodes(&snap, |n| app.state.live.view(n)),
        phases,
        workloads: views::workloads(&snap, None),
        events: app.state.event_counts(),
        latency: app.latency.clone(),
        store_writes: app.state.store().write_count(),
        webhooks: app.webhooks.counters(),
        dashboard_clients: app.feed.clients() as u64,
        resident_bytes: resident_bytes(),
        uptime_secs: app.state.started().elapsed().as_secs(),
    }
}

/// VmRSS of this process.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn condition_label(c: ThrottleCondition) -> &'static str {
    match c {
        ThrottleCondition::UnderVoltage => "under_voltage",
        ThrottleCondition::FrequencyCapped => "frequency_capped",
        ThrottleCondition::Throttled => "throttled",
        ThrottleCondition::SoftTemperatureLimit => "soft_temperature_limit",
    }
}

/// Help text without its final period: the encoder adds one.
fn sentence(help: &str) -> &str {
    help.strip_suffix('.').unwrap_or(help)
}

/// A registry to fill: families are registered once, then set.
struct Out {
    registry: Registry,
}

impl Out {
    fn gauges(&mut self, name: &str, help: &str) -> GaugeFamily {
        let f = GaugeFamily::default();
        self.registry.register(name, sentence(help), f.clone());
        f
    }

    /// A counter family; the exposition adds `_total` to `name`.
    fn counters(&mut self, name: &str, help: &str) -> CounterFamily {
        let f = CounterFamily::default();
        self.registry.register(name, sentence(help), f.clone());
        f
    }
}

fn set(f: &GaugeFamily, labels: Labels, v: f64) {
    f.get_or_create(&labels).set(v);
}

fn count(f: &CounterFamily, labels: Labels, v: f64) {
    f.get_or_create(&labels).inc_by(v);
}

fn node(n: &NodeView) -> Labels {
    vec![("node", n.info.name.clone())]
}

/// Renders a scrape in the Prometheus text format.
pub fn render(s: &Scrape) -> String {
    let mut o = Out {
        registry: Registry::default(),
    };
    let status = o.gauges(
        "bramble_node_status",
        "1 for the node's current health, 0 for the others.",
    );
    let cordoned = o.gauges(
        "bramble_node_cordoned",
        "1 when the node takes no new tasks.",
    );
    for n in &s.nodes {
        for st in [NodeStatus::Ready, NodeStatus::NotReady, NodeStatus::Dead] {
            let mut l = node(n);
            l.push(("status", st.to_string()));
            set(&status, l, if n.status == st { 1.0 } else { 0.0 });
        }
        set(&cordoned, node(n), if n.cordoned { 1.0 } else { 0.0 });
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
        let f = o.gauges(name, help);
        for n in &s.nodes {
            if let Some(v) = n.metrics.as_ref().and_then(pick) {
                set(&f, node(n), v);
            }
        }
    }
    let throttled = o.gauges(
        "bramble_node_throttled",
        "Raspberry Pi firmware conditions: 1 when active now (only nodes with the firmware).",
    );
    let since_boot = o.gauges(
        "bramble_node_throttled_since_boot",
        "Raspberry Pi firmware conditions: 1 when they happened since boot.",
    );
    for n in &s.nodes {
        let Some(bits) = n.metrics.as_ref().and_then(|m| m.throttled) else {
            continue;
        };
        let notes = decode_throttled(bits);
        for (c, _) in ThrottleCondition::ALL {
            let note = notes.iter().find(|x| x.condition == c);
            let mut l = node(n);
            l.push(("condition", condition_label(c).to_string()));
            set(
                &throttled,
                l.clone(),
                if note.is_some_and(|x| x.now) {
                    1.0
                } else {
                    0.0
                },
            );
            set(&since_boot, l, if note.is_some() { 1.0 } else { 0.0 });
        }
    }
    let disk = o.gauges(
        "bramble_node_disk_free_bytes",
        "Free space: disk=data is the agent's data dir, disk=docker Docker's root dir.",
    );
    for n in &s.nodes {
        let Some(m) = &n.metrics else { continue };
        for (which, d) in [("data", &m.data_disk), ("docker", &m.docker_disk)] {
            if let Some(d) = d {
                let mut l = node(n);
                l.push(("disk", which.to_string()));
                set(&disk, l, d.free_bytes as f64);
            }
        }
    }

    let tasks = o.gauges("bramble_tasks", "Tasks by phase.");
    for (p, n) in &s.phases {
        set(&tasks, vec![("phase", p.to_string())], *n as f64);
    }
    let desired = o.gauges(
        "bramble_workload_desired_tasks",
        "Tasks a workload wants running.",
    );
    let running = o.gauges(
        "bramble_workload_running_tasks",
        "A workload's tasks running now.",
    );
    for w in &s.workloads {
        let l: Labels = vec![
            ("kind", w.manifest.kind.as_str().to_string()),
            ("name", w.manifest.metadata.name.to_string()),
        ];
        set(&desired, l.clone(), f64::from(w.desired));
        set(&running, l, f64::from(w.running));
    }

    let events = |reasons: &[&str]| -> f64 {
        s.events
            .iter()
            .filter(|((r, _), _)| reasons.contains(&r.as_str()))
            .map(|(_, n)| *n as f64)
            .sum()
    };
    let restarts = o.counters(
        "bramble_task_restarts",
        "Container restarts by agents (Restarted events) since the controller started.",
    );
    count(&restarts, Vec::new(), events(&["Restarted"]));
    let failovers = o.counters(
        "bramble_failovers",
        "Tasks taken off their node to run elsewhere (Rescheduling and Rescheduled events).",
    );
    count(&failovers, Vec::new(), events(&FAILOVER_REASONS));
    let firings = o.counters(
        "bramble_cron_firings",
        "CronJob slots decided, by outcome (fired, missed, skipped).",
    );
    for (reason, outcome) in CRON_REASONS {
        count(
            &firings,
            vec![("outcome", outcome.to_string())],
            events(&[reason]),
        );
    }
    let by_reason = o.counters(
        "bramble_events",
        "Events recorded since the controller started, by reason and severity.",
    );
    for ((reason, severity), n) in &s.events {
        count(
            &by_reason,
            vec![
                ("reason", reason.clone()),
                ("severity", severity.to_string()),
            ],
            *n as f64,
        );
    }

    o.registry.register(
        "bramble_http_request_duration_seconds",
        "REST API time to response headers, by method and route",
        s.latency.0.clone(),
    );

    let writes = o.counters(
        "bramble_store_writes",
        "Store write transactions since the controller started (about 0 per minute at rest).",
    );
    count(&writes, Vec::new(), s.store_writes as f64);
    let deliveries = o.counters(
        "bramble_webhook_deliveries",
        "Webhook deliveries by result: sent, failed (after retries), dropped (queue full).",
    );
    for (name, result, n) in &s.webhooks {
        count(
            &deliveries,
            vec![("webhook", name.clone()), ("result", result.to_string())],
            *n as f64,
        );
    }
    let clients = o.gauges(
        "bramble_dashboard_clients",
        "Dashboard live streams open now.",
    );
    set(&clients, Vec::new(), s.dashboard_clients as f64);
    if let Some(rss) = s.resident_bytes {
        let f = o.gauges(
            "process_resident_memory_bytes",
            "Resident memory of the controller.",
        );
        set(&f, Vec::new(), rss as f64);
    }
    let uptime = o.gauges(
        "bramble_controller_uptime_seconds",
        "Seconds since the controller started.",
    );
    set(&uptime, Vec::new(), s.uptime_secs as f64);

    let mut text = String::with_capacity(4096 + s.nodes.len() * 1500);
    if let Err(e) = encode(&mut text, &o.registry) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    text
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        render(&gather(&app)),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loops::cards::tests::node as view;
    use bramble_api::wire::NodeMetrics;

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
                view("pi1", NodeStatus::Ready, Some(pi)),
                view("pc", NodeStatus::Dead, Some(pc)),
            ],
            ..Scrape::default()
        };
        let text = render(&s);
        let l = lines(&text);
        for want in [
            r#"bramble_node_status{node="pi1",status="Ready"} 1.0"#,
            r#"bramble_node_status{node="pi1",status="NotReady"} 0.0"#,
            r#"bramble_node_status{node="pc",status="Dead"} 1.0"#,
            r#"bramble_node_cpu_percent{node="pi1"} 12.5"#,
            r#"bramble_node_memory_used_bytes{node="pi1"} 1000.0"#,
            r#"bramble_node_temperature_celsius{node="pi1"} 61.20000076293945"#,
            r#"bramble_node_throttled{node="pi1",condition="under_voltage"} 1.0"#,
            r#"bramble_node_throttled{node="pi1",condition="frequency_capped"} 0.0"#,
            r#"bramble_node_throttled_since_boot{node="pi1",condition="throttled"} 1.0"#,
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
        let latency = Latency::default();
        for secs in [0.0005, 0.003, 0.2, 60.0] {
            latency.observe("GET", "/v1/nodes/{name}", secs);
        }
        let s = Scrape {
            events: vec![
                (("Restarted".into(), "Warning"), 3),
                (("Rescheduling".into(), "Warning"), 2),
                (("Rescheduled".into(), "Warning"), 1),
                (("Fired".into(), "Normal"), 7),
                (("Missed".into(), "Warning"), 1),
            ],
            phases: [(TaskPhase::Running, 4), (TaskPhase::Pending, 0)].into(),
            latency,
            store_writes: 42,
            webhooks: vec![("ops".into(), "sent", 5), ("ops".into(), "dropped", 1)],
            ..Scrape::default()
        };
        let text = render(&s);
        let l = lines(&text);
        for want in [
            "bramble_task_restarts_total 3.0",
            "bramble_failovers_total 3.0",
            r#"bramble_cron_firings_total{outcome="fired"} 7.0"#,
            r#"bramble_cron_firings_total{outcome="missed"} 1.0"#,
            r#"bramble_cron_firings_total{outcome="skipped"} 0.0"#,
            r#"bramble_events_total{reason="Fired",severity="Normal"} 7.0"#,
            r#"bramble_tasks{phase="Running"} 4.0"#,
            r#"bramble_tasks{phase="Pending"} 0.0"#,
            r#"bramble_http_request_duration_seconds_bucket{method="GET",route="/v1/nodes/{name}",le="0.001"} 1"#,
            r#"bramble_http_request_duration_seconds_bucket{method="GET",route="/v1/nodes/{name}",le="0.005"} 2"#,
            r#"bramble_http_request_duration_seconds_bucket{method="GET",route="/v1/nodes/{name}",le="0.25"} 3"#,
            r#"bramble_http_request_duration_seconds_bucket{method="GET",route="/v1/nodes/{name}",le="10"} 3"#,
            r#"bramble_http_request_duration_seconds_bucket{method="GET",route="/v1/nodes/{name}",le="+Inf"} 4"#,
            r#"bramble_http_request_duration_seconds_count{method="GET",route="/v1/nodes/{name}"} 4"#,
            "bramble_store_writes_total 42.0",
            r#"bramble_webhook_deliveries_total{webhook="ops",result="sent"} 5.0"#,
        ] {
            assert!(l.contains(&want), "missing {want} in\n{text}");
        }
        assert!(text.contains("# TYPE bramble_http_request_duration_seconds histogram\n"));
        assert!(text.contains("# TYPE bramble_store_writes_total counter\n"));
        assert!(
            text.contains("# HELP bramble_tasks Tasks by phase.\n"),
            "one period, not two:\n{text}"
        );
    }

    #[test]
    fn escapes_label_values() {
        let s = Scrape {
            webhooks: vec![("x\"y\\z\nw".into(), "sent", 1)],
            ..Scrape::default()
        };
        let text = render(&s);
        assert!(
            text.contains(
                r#"bramble_webhook_deliveries_total{webhook="x\"y\\z\nw",result="sent"} 1.0"#
            ),
            "{text}"
        );
    }
}
