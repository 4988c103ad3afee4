//! `describe` pages: pure renderers from API objects to kubectl-style `Key: value`
//! blocks, so they can be tested from fixtures.
//!
//! The words for a state (`node_status`, `ready`, `memory_limits`, `firing_outcome`) live
//! here too, and `get`'s tables take them from here, so a page and a table say the same.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use bramble_api::endpoints::Endpoint;
use bramble_api::manifest::{
    Arch, ConcurrencyPolicy, EnvValue, Kind, Placement, Port, Probe, Probes, Resources, Restart,
    RestartPolicy, Volume,
};
use bramble_api::quantity::Memory;
use bramble_api::rest::{
    format_labels, ControllerView, CronJobView, Event, Firing, FiringOutcome, NodeView, SecretView,
    Severity, WorkloadView,
};
use bramble_api::task::{DesiredState, Task, TaskSpec};
use chrono::{DateTime, SecondsFormat, Utc};

use crate::output::{age, ago, object_ref, or_none, timestamp, until};
use crate::table::{cell, Table};

/// A `Key: value` page with nested sections, aligned like `kubectl describe`.
#[derive(Debug, Default)]
pub struct Page {
    lines: Vec<Line>,
}

#[derive(Debug)]
enum Line {
    Field {
        depth: usize,
        key: String,
        value: String,
    },
    Text {
        depth: usize,
        text: String,
    },
}

impl Page {
    /// `Key:  value` at the top level.
    pub fn field(&mut self, key: &str, value: impl ToString) -> &mut Self {
        self.field_at(0, key, value)
    }

    /// `Key:  value` nested `depth` levels deep.
    pub fn field_at(&mut self, depth: usize, key: &str, value: impl ToString) -> &mut Self {
        self.lines.push(Line::Field {
            depth,
            key: key.to_string(),
            value: value.to_string(),
        });
        self
    }

    /// A section heading (`Key:` with nothing after it).
    pub fn section(&mut self, key: &str) -> &mut Self {
        self.field(key, "")
    }

    /// Free text (a table's lines, a list item) nested `depth` levels deep.
    pub fn text_at(&mut self, depth: usize, text: impl ToString) -> &mut Self {
        for line in text.to_string().lines() {
            self.lines.push(Line::Text {
                depth,
                text: line.to_string(),
            });
        }
        self
    }

    /// The page's text. Values of fields at the same depth start in the same column.
    pub fn render(&self) -> String {
        let mut widths: BTreeMap<usize, usize> = BTreeMap::new();
        for l in &self.lines {
            if let Line::Field { depth, key, value } = l {
                if !value.is_empty() {
                    let w = widths.entry(*depth).or_default();
                    *w = (*w).max(key.chars().count() + 1);
                }
            }
        }
        let mut out = String::new();
        for l in &self.lines {
            match l {
                Line::Field { depth, key, value } => {
                    let indent = "  ".repeat(*depth);
                    if value.is_empty() {
                        let _ = writeln!(out, "{indent}{key}:");
                    } else {
                        let w = widths.get(depth).copied().unwrap_or(0) + 2;
                        let label = format!("{key}:");
                        let _ = writeln!(out, "{indent}{label:<w$}{value}");
                    }
                }
                Line::Text { depth, text } => {
                    let indent = "  ".repeat(*depth);
                    let _ = writeln!(out, "{}", format!("{indent}{text}").trim_end());
                }
            }
        }
        out
    }
}

/// `2026-11-02T10:00:00Z (5d ago)`.
pub fn time(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!(
        "{} ({} ago)",
        t.to_rfc3339_opts(SecondsFormat::Secs, true),
        age(t, now)
    )
}

fn opt_time(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    t.map_or_else(|| "<none>".to_string(), |t| time(t, now))
}

/// A command line as a shell would read it back.
pub fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn restart_policy(p: RestartPolicy) -> &'static str {
    match p {
        RestartPolicy::Always => "Always",
        RestartPolicy::OnFailure => "OnFailure",
        RestartPolicy::Never => "Never",
    }
}

fn concurrency(p: ConcurrencyPolicy) -> &'static str {
    match p {
        ConcurrencyPolicy::Allow => "Allow",
        ConcurrencyPolicy::Forbid => "Forbid",
        ConcurrencyPolicy::Replace => "Replace",
    }
}

fn desired_state(d: DesiredState) -> &'static str {
    match d {
        DesiredState::Running => "Running",
        DesiredState::Stopped => "Stopped",
        DesiredState::Evicting => "Evicting",
    }
}

fn port(p: &Port) -> String {
    let base = format!("{}/{}", p.container, p.protocol.as_str());
    match p.host {
        Some(h) => format!("{base} -> host {h}"),
        None => base,
    }
}

fn volume(v: &Volume) -> String {
    let ro = if v.read_only { " (read-only)" } else { "" };
    match v.managed() {
        Some(name) => format!("volume {name} -> {}{ro}", v.path),
        None => format!("{} -> {}{ro}", v.host_path, v.path),
    }
}

fn resources(r: &Resources) -> String {
    let mut parts = Vec::new();
    if let Some(c) = r.cpu {
        parts.push(format!("cpu {c}"));
    }
    if let Some(m) = r.memory {
        parts.push(format!("memory {m}"));
    }
    if parts.is_empty() {
        "<none> (no reservation, no limit)".into()
    } else {
        parts.join(", ")
    }
}

fn placement(p: &Placement) -> String {
    let mut parts = Vec::new();
    if !p.node_selector.is_empty() {
        parts.push(format!("nodeSelector {}", format_labels(&p.node_selector)));
    }
    if !p.architectures.is_empty() {
        let archs: Vec<&str> = p.architectures.iter().map(|a: &Arch| a.as_str()).collect();
        parts.push(format!("architectures {}", archs.join(",")));
    }
    if parts.is_empty() {
        "any node".into()
    } else {
        parts.join("; ")
    }
}

fn restart(r: &Restart) -> String {
    format!(
        "{}, back-off {}..{}, give up after {} failures in {}",
        restart_policy(r.policy),
        r.backoff.initial,
        r.backoff.max,
        r.max_failures,
        r.window
    )
}

fn probe(p: &Option<Probe>) -> String {
    let Some(p) = p else {
        return "<none>".into();
    };
    let action = if let Some(cmd) = &p.exec {
        format!("exec [{}]", shell_words(cmd))
    } else if let Some(h) = &p.http {
        format!("http-get :{}{}", h.port, h.path)
    } else if let Some(t) = &p.tcp {
        format!("tcp-socket :{}", t.port)
    } else {
        "<no action>".into()
    };
    format!(
        "{action} delay={} timeout={} period={} #failure={}",
        p.initial_delay, p.timeout, p.period, p.failure_threshold
    )
}

/// The container part shared by workloads and tasks.
struct Container<'a> {
    image: &'a str,
    command: Option<&'a [String]>,
    args: Option<&'a [String]>,
    env: &'a BTreeMap<String, EnvValue>,
    ports: &'a [Port],
    volumes: &'a [Volume],
    resources: &'a Resources,
    placement: &'a Placement,
    restart: Restart,
    probes: &'a Probes,
}

impl Container<'_> {
    fn render(&self, page: &mut Page) {
        page.field("Image", self.image);
        page.field(
            "Command",
            self.command
                .map_or_else(|| "<image entrypoint>".into(), shell_words),
        );
        page.field(
            "Args",
            self.args.map_or_else(|| "<image cmd>".into(), shell_words),
        );
        if self.env.is_empty() {
            page.field("Environment", "<none>");
        } else {
            page.section("Environment");
            for (k, v) in self.env {
                let shown = match v {
                    EnvValue::Text(t) if t.is_empty() => "\"\"".to_string(),
                    EnvValue::Text(t) => t.clone(),
                    // As kubectl says it: where the value comes from, never the value.
                    EnvValue::Secret(r) => {
                        format!("<set to the key '{}' in secret '{}'>", r.key, r.secret)
                    }
                };
                page.field_at(1, k, shown);
            }
        }
        page.field(
            "Ports",
            if self.ports.is_empty() {
                "<none>".into()
            } else {
                self.ports.iter().map(port).collect::<Vec<_>>().join(", ")
            },
        );
        if self.volumes.is_empty() {
            page.field("Volumes", "<none>");
        } else {
            page.section("Volumes");
            for v in self.volumes {
                page.text_at(1, volume(v));
            }
        }
        page.field("Resources", resources(self.resources));
        page.field("Placement", placement(self.placement));
        page.field("Restart", restart(&self.restart));
        page.field("Liveness", probe(&self.probes.liveness));
        page.field("Readiness", probe(&self.probes.readiness));
    }
}

/// A task's status as an operator reads it (see [`bramble_api::status`]), with when
/// the next try is: `CrashLoopBackOff (next try in 8s)`.
pub fn status_line(t: &Task, now: DateTime<Utc>) -> String {
    named(&bramble_api::status::of(t, now), now)
}

fn named(s: &bramble_api::status::TaskState, now: DateTime<Utc>) -> String {
    match s.retry_at {
        Some(at) => format!("{} (next try {})", s.status, crate::output::until(at, now)),
        None => s.status.clone(),
    }
}

/// The `STATUS` cell of task tables: the status, then why, kept to one short line
/// (`-o wide` and `describe` have the whole message).
pub fn status_cell(t: &Task, now: DateTime<Utc>) -> String {
    const MAX: usize = 120;
    let s = bramble_api::status::of(t, now);
    let line = named(&s, now);
    match s
        .reason
        .filter(|_| s.level >= bramble_api::status::Level::Warning)
    {
        Some(why) => {
            let why = cell(&why);
            if why.chars().count() > MAX {
                format!("{line}: {}…", why.chars().take(MAX).collect::<String>())
            } else {
                format!("{line}: {why}")
            }
        }
        None => line,
    }
}

/// A task's READY cell.
pub fn ready(t: &Task) -> &'static str {
    match t.ready {
        Some(true) => "true",
        Some(false) => "false",
        None => "-",
    }
}

fn tasks_table(tasks: &[Task], with_node: bool, with_workload: bool, now: DateTime<Utc>) -> Table {
    let mut headers = vec!["NAME"];
    if with_workload {
        headers.push("WORKLOAD");
    }
    if with_node {
        headers.push("NODE");
    }
    headers.extend(["STATUS", "READY", "RESTARTS", "AGE", "MESSAGE"]);
    let mut table = Table::new(headers);
    for t in tasks {
        let mut row = vec![t.id.clone()];
        if with_workload {
            row.push(object_ref(t.kind, &t.workload));
        }
        if with_node {
            row.push(or_none(t.node.as_deref()));
        }
        row.extend([
            status_line(t, now),
            ready(t).to_string(),
            t.restarts.to_string(),
            age(t.created_at, now),
            cell(t.message.as_deref().unwrap_or("")),
        ]);
        table.row(row);
    }
    table
}

fn tasks_section(
    page: &mut Page,
    tasks: &[Task],
    with_node: bool,
    with_workload: bool,
    now: DateTime<Utc>,
) {
    if tasks.is_empty() {
        page.field("Tasks", "<none>");
    } else {
        page.section("Tasks");
        page.text_at(1, tasks_table(tasks, with_node, with_workload, now));
    }
}

/// A firing's OUTCOME cell.
pub fn firing_outcome(o: FiringOutcome) -> &'static str {
    match o {
        FiringOutcome::Fired => "Fired",
        FiringOutcome::Missed => "Missed",
        FiringOutcome::Skipped => "Skipped",
        FiringOutcome::Manual => "Manual",
    }
}

/// How late the controller decided a slot, in milliseconds; `-` for a manual run,
/// whose slot is only the second it was asked for.
fn lateness(f: &Firing) -> String {
    if f.outcome == FiringOutcome::Manual {
        return "-".into();
    }
    format!("{}ms", (f.decided_at - f.slot).num_milliseconds())
}

/// The `Runs:` section: the CronJob's recent slots, newest first, and what became of
/// each.
fn firings_section(page: &mut Page, firings: &[Firing]) {
    if firings.is_empty() {
        page.field("Runs", "<none>");
        return;
    }
    let mut sorted: Vec<&Firing> = firings.iter().collect();
    sorted.sort_by_key(|f| std::cmp::Reverse((f.slot, f.decided_at)));
    let mut table = Table::new(["SLOT", "OUTCOME", "TASK", "LATENESS"]);
    for f in sorted {
        table.row([
            timestamp(f.slot),
            firing_outcome(f.outcome).to_string(),
            f.task.clone().unwrap_or_else(|| "-".into()),
            lateness(f),
        ]);
    }
    page.section("Runs");
    page.text_at(1, table);
}

/// Newest run first: by slot, then attempt (a retry is newer than the run it retries).
pub fn newest_run_first(tasks: &mut [Task]) {
    tasks.sort_by(|a, b| {
        (b.slot, b.attempt, b.created_at, &b.id).cmp(&(a.slot, a.attempt, a.created_at, &a.id))
    });
}

/// The `Tasks:` section of a CronJob: its runs, newest first, with their slots.
fn runs_section(page: &mut Page, tasks: &[Task], now: DateTime<Utc>) {
    if tasks.is_empty() {
        page.field("Tasks", "<none>");
        return;
    }
    let mut sorted = tasks.to_vec();
    newest_run_first(&mut sorted);
    let mut table = Table::new([
        "TASK", "SLOT", "ATTEMPT", "PHASE", "EXIT", "NODE", "FINISHED", "MESSAGE",
    ]);
    for t in &sorted {
        table.row([
            t.id.clone(),
            t.slot.map_or_else(|| "-".into(), timestamp),
            t.attempt.to_string(),
            t.phase.to_string(),
            t.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
            or_none(t.node.as_deref()),
            t.finished_at.map_or_else(|| "-".into(), |f| ago(f, now)),
            cell(t.message.as_deref().unwrap_or("")),
        ]);
    }
    page.section("Tasks");
    page.text_at(1, table);
}

/// An event's TYPE cell.
pub fn severity(s: Severity) -> &'static str {
    match s {
        Severity::Normal => "Normal",
        Severity::Warning => "Warning",
    }
}

/// The `Events:` section, as kubectl ends its pages: oldest first. `None` (a controller
/// without events) leaves the section out.
fn events_section(page: &mut Page, events: Option<&[Event]>, now: DateTime<Utc>) {
    let Some(events) = events else {
        return;
    };
    if events.is_empty() {
        page.field("Events", "<none>");
        return;
    }
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| (e.at, e.seq));
    let mut table = Table::new(["Type", "Reason", "Age", "Message"]);
    table.row(["----", "------", "----", "-------"]);
    for e in sorted {
        table.row([
            severity(e.severity).to_string(),
            e.reason.clone(),
            age(e.at, now),
            cell(&e.message),
        ]);
    }
    page.section("Events");
    page.text_at(1, table);
}

/// `describe service NAME` (and the other kinds): the manifest's essentials, the
/// workload's tasks (already filtered to this workload) and the events of both. For a
/// CronJob, `cron` (its view, when the controller has one) adds the schedule's state and
/// the `Runs:` history, and the tasks are shown as runs.
pub fn workload(
    w: &WorkloadView,
    cron: Option<&CronJobView>,
    endpoint: Option<&Endpoint>,
    tasks: &[Task],
    events: Option<&[Event]>,
    now: DateTime<Utc>,
) -> String {
    let m = &w.manifest;
    let s = &m.spec;
    let mut page = Page::default();
    page.field("Name", m.metadata.name.as_str())
        .field("Kind", m.kind)
        .field("Labels", format_labels(&m.metadata.labels))
        .field("Generation", w.generation)
        .field("Created", time(w.created_at, now))
        .field("Updated", time(w.updated_at, now));
    match m.kind {
        Kind::Service => {
            page.field(
                "Replicas",
                format!("{} desired | {} running", w.desired, w.running),
            );
        }
        Kind::Wallet => {
            page.field(
                "Instance",
                format!(
                    "{} desired | {} running (one at a time, fenced failover)",
                    w.desired, w.running
                ),
            );
        }
        Kind::CronJob => {
            page.field("Schedule", or_none(s.schedule.as_deref()))
                .field("Time Zone", s.timezone.as_deref().unwrap_or("UTC"))
                .field(
                    "Concurrency Policy",
                    concurrency(s.concurrency_policy.unwrap_or_default()),
                )
                .field("Starting Deadline", or_none(s.starting_deadline));
            let by_manifest = s.suspend.unwrap_or(false);
            page.field(
                "Suspend",
                match cron {
                    Some(c) if c.suspended && !by_manifest => "true (cron suspend)",
                    Some(c) => bool_str(c.suspended),
                    None => bool_str(by_manifest),
                },
            );
            let h = s.history.unwrap_or_default();
            page.field(
                "History Limits",
                format!("{} successful, {} failed", h.successful, h.failed),
            );
            match cron {
                Some(c) => {
                    page.field("Active", format!("{} running", c.active))
                        .field("Last Schedule", opt_time(c.last_slot, now))
                        .field("Last Result", or_none(c.last_result))
                        .field(
                            "Next Schedule",
                            c.next.map_or_else(
                                || "<none>".into(),
                                |t| format!("{} ({})", timestamp(t), until(t, now)),
                            ),
                        );
                }
                None => {
                    page.field("Active", format!("{} running", w.running));
                }
            }
        }
        Kind::Job => {
            page.field("Running", w.running);
        }
    }
    if m.kind.runs_to_completion() {
        page.field("Retries", s.retries.unwrap_or(0))
            .field("Timeout", or_none(s.timeout));
    }
    Container {
        image: &s.image,
        command: s.command.as_deref(),
        args: s.args.as_deref(),
        env: &s.env,
        ports: &s.ports,
        volumes: &s.volumes,
        resources: &s.resources,
        placement: &s.placement,
        restart: m.restart(),
        probes: &s.probes,
    }
    .render(&mut page);
    match endpoint {
        Some(e) => endpoint_fields(&mut page, e),
        None => {
            page.field("Address", "<none yet>");
        }
    }
    if m.kind == Kind::CronJob {
        if let Some(c) = cron {
            firings_section(&mut page, &c.firings);
        }
        runs_section(&mut page, tasks, now);
    } else {
        tasks_section(&mut page, tasks, true, false, now);
    }
    events_section(&mut page, events, now);
    page.render()
}

/// The address, the names behind it and the instances answering there.
fn endpoint_fields(page: &mut Page, e: &Endpoint) {
    page.field(
        "Address",
        format!(
            "{} ({}, {}.bramble in every container)",
            e.address, e.name, e.name
        ),
    );
    if e.ports.is_empty() {
        page.field("Endpoints", "<no TCP ports declared: nothing is served>");
        return;
    }
    let ports: Vec<String> = e.ports.iter().map(u16::to_string).collect();
    page.field("Ports", ports.join(", "));
    if e.backends.is_empty() {
        page.field("Endpoints", "<none running: connections are refused>");
        return;
    }
    page.section("Endpoints");
    let mut t = crate::table::Table::new(vec!["TASK", "NODE", "READY"]);
    for b in &e.backends {
        t.row(vec![
            b.task.clone(),
            b.node.clone(),
            if b.ready {
                "yes"
            } else {
                "no (gets no new connections)"
            }
            .to_string(),
        ]);
    }
    page.text_at(1, t);
}

/// `describe endpoints NAME`.
pub fn endpoint_page(e: &Endpoint) -> String {
    let mut page = Page::default();
    page.field("Name", &e.name).field("Kind", e.kind);
    endpoint_fields(&mut page, e);
    page.render()
}

fn bool_str(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

/// `describe volume NAME`: where it is used, where it came from, its last sync, its
/// copies and what is set aside.
pub fn volume_page(
    v: &bramble_api::rest::VolumeView,
    events: Option<&[Event]>,
    now: DateTime<Utc>,
) -> String {
    use bramble_api::wire::VolumeOrigin;
    let mut page = Page::default();
    page.field("Name", &v.name).field(
        "Workload",
        match v.kind {
            Some(k) => object_ref(k, &v.workload),
            None => format!("{} <gone>", v.workload),
        },
    );
    match &v.sync {
        Some(s) => {
            let before = if s.before.is_empty() {
                String::new()
            } else {
                format!(", before: {}", s.before.join(" "))
            };
            page.field(
                "Sync",
                format!(
                    "every {}, {} {}{before}",
                    s.every,
                    s.copies,
                    if s.copies == 1 { "copy" } else { "copies" }
                ),
            )
        }
        None => page.field("Sync", "<none: the volume stays on its node>"),
    };
    page.field("Node", or_none(v.node.as_deref()));
    if v.node.is_some() {
        page.field("Size", format!("{} in {} files", Memory(v.bytes), v.files))
            .field("Placement", or_none(v.epoch));
        let origin = match &v.origin {
            Some(VolumeOrigin::Empty) => "started empty".to_string(),
            Some(VolumeOrigin::Kept) => "the node's own data".to_string(),
            Some(VolumeOrigin::Copy { epoch, at, owner }) => format!(
                "restored from the copy {owner} sent {} (placement {epoch})",
                ago(*at, now)
            ),
            None => "<unknown>".to_string(),
        };
        page.field("Origin", origin);
    }
    match &v.last_sync {
        Some(s) => {
            page.field(
                "Last Sync",
                format!(
                    "{}: {} ({} sent)",
                    ago(s.at, now),
                    if s.done.is_empty() {
                        "no copy completed".to_string()
                    } else {
                        format!("complete on {}", s.done.join(", "))
                    },
                    Memory(s.sent_bytes)
                ),
            );
            if let Some(e) = &s.error {
                page.field("Sync Error", cell(e));
            }
        }
        None => {
            page.field("Last Sync", "<none yet>");
        }
    }
    if v.copies.is_empty() {
        page.field("Copies", "<none: a failover would start it empty>");
    } else {
        page.section("Copies");
        for c in &v.copies {
            let at = c.at.map(|at| ago(at, now)).unwrap_or_default();
            let stale = if c.stale {
                ", of an older placement"
            } else {
                ""
            };
            page.text_at(
                1,
                format!(
                    "{}: placement {}, completed {at}, {} in {} files{stale}",
                    c.node,
                    c.epoch,
                    Memory(c.bytes),
                    c.files
                ),
            );
        }
    }
    if !v.set_aside.is_empty() {
        page.section("Set Aside");
        for a in &v.set_aside {
            page.text_at(
                1,
                format!(
                    "{}:{} (placement {}, {}): never used again; remove it by hand once it is not needed",
                    a.node,
                    a.path.as_deref().unwrap_or("?"),
                    a.epoch,
                    Memory(a.bytes)
                ),
            );
        }
    }
    events_section(&mut page, events, now);
    page.render()
}

/// `describe task ID`.
pub fn task(t: &Task, events: Option<&[Event]>, now: DateTime<Utc>) -> String {
    let mut page = Page::default();
    page.field("Name", &t.id)
        .field("Workload", object_ref(t.kind, &t.workload))
        .field("Replica", t.replica)
        .field("Node", or_none(t.node.as_deref()))
        .field("Phase", t.phase)
        .field("Status", status_line(t, now))
        .field("Message", or_none(t.message.as_deref().map(cell)))
        .field("Desired", desired_state(t.desired))
        .field(
            "Ready",
            match t.ready {
                Some(r) => r.to_string(),
                None => "<no readiness probe>".into(),
            },
        )
        .field("Restarts", t.restarts)
        .field("Exit Code", or_none(t.exit_code))
        .field("Container", or_none(t.container_id.as_deref()))
        .field("Spec Hash", &t.spec_hash)
        .field("Created", time(t.created_at, now))
        .field("Started", opt_time(t.started_at, now))
        .field("Finished", opt_time(t.finished_at, now));
    let s: &TaskSpec = &t.spec;
    Container {
        image: &s.image,
        command: s.command.as_deref(),
        args: s.args.as_deref(),
        env: &s.env,
        ports: &s.ports,
        volumes: &s.volumes,
        resources: &s.resources,
        placement: &t.placement,
        restart: s.restart,
        probes: &s.probes,
    }
    .render(&mut page);
    if let Some(timeout) = s.timeout {
        page.field("Timeout", timeout);
    }
    events_section(&mut page, events, now);
    page.render()
}

/// `describe controller NAME`.
pub fn controller(c: &ControllerView, now: DateTime<Utc>) -> String {
    let mut page = Page::default();
    page.field("Name", &c.name)
        .field("ID", &c.id)
        .field("URL", or_none(c.url.clone()))
        .field("Role", if c.leader { "leader" } else { "follower" })
        .field(
            "Leading Since",
            c.leader_since
                .map_or_else(|| "-".to_string(), |s| time(s, now)),
        )
        .field("Started", time(c.started, now))
        .field("Answered This", if c.answering { "yes" } else { "no" });
    page.render()
}

/// `describe secret NAME`: keys and users, never values.
pub fn secret(s: &SecretView, events: Option<&[Event]>, now: DateTime<Utc>) -> String {
    let mut page = Page::default();
    page.field("Name", &s.name)
        .field(
            "Labels",
            or_none((!s.labels.is_empty()).then(|| format_labels(&s.labels))),
        )
        .field("Generation", s.generation)
        .field("Created", time(s.created_at, now))
        .field("Updated", time(s.updated_at, now));
    if s.keys.is_empty() {
        page.field("Data", "<none>");
    } else {
        page.section("Data");
        for k in &s.keys {
            page.field_at(1, k, "<hidden>");
        }
    }
    page.field(
        "Used By",
        or_none((!s.used_by.is_empty()).then(|| s.used_by.join(", "))),
    );
    events_section(&mut page, events, now);
    page.render()
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{}%", (part as f64 * 100.0 / whole as f64).round() as u64)
}

/// A node's STATUS cell: `Ready`, or `Ready,SchedulingDisabled` when cordoned.
pub fn node_status(n: &NodeView) -> String {
    if n.cordoned {
        format!("{},SchedulingDisabled", n.status)
    } else {
        n.status.to_string()
    }
}

/// Whether Docker enforces `resources.memory` on a node, in a word.
pub fn memory_limits(enforced: Option<bool>) -> &'static str {
    match enforced {
        Some(true) => "enforced",
        Some(false) => "NOT-ENFORCED",
        None => "<unknown>",
    }
}

/// `describe node NAME`, with the tasks placed on it and its events.
pub fn node(n: &NodeView, tasks: &[Task], events: Option<&[Event]>, now: DateTime<Utc>) -> String {
    let i = &n.info;
    let mut page = Page::default();
    page.field("Name", &i.name)
        .field("Status", node_status(n))
        .field("Unschedulable", n.cordoned)
        .field("Labels", format_labels(&i.labels))
        .field("Address", or_none(n.address.as_deref()))
        .field("Registered", time(n.registered_at, now))
        .field("Last Seen", opt_time(n.last_seen, now))
        .field("Memory Limits", memory_limits(i.memory_limits));
    page.section("System Info")
        .field_at(1, "Architecture", i.arch)
        .field_at(1, "OS", if i.os.is_empty() { "<unknown>" } else { &i.os })
        .field_at(1, "Docker", &i.docker_version)
        .field_at(1, "Agent", &i.agent_version);
    if !i.warnings.is_empty() {
        page.section("Warnings");
        for w in &i.warnings {
            page.text_at(1, format!("- {w}"));
        }
    }
    page.section("Capacity")
        .field_at(1, "CPU", format!("{} cores", i.cores))
        .field_at(1, "Memory", Memory(i.memory_bytes).human());
    let cpu_capacity = u64::from(i.cores) * 1000;
    page.section("Allocated")
        .field_at(
            1,
            "CPU",
            format!(
                "{} ({})",
                bramble_api::quantity::Cpu(n.allocated_cpu_millis),
                percent(n.allocated_cpu_millis, cpu_capacity)
            ),
        )
        .field_at(
            1,
            "Memory",
            format!(
                "{} ({})",
                Memory(n.allocated_memory_bytes).human(),
                percent(n.allocated_memory_bytes, i.memory_bytes)
            ),
        )
        .field_at(1, "Tasks", n.tasks);
    match &n.metrics {
        Some(m) => {
            page.section("Metrics")
                .field_at(1, "Measured", time(m.at, now))
                .field_at(1, "CPU", format!("{:.0}%", m.cpu_percent))
                .field_at(
                    1,
                    "Memory",
                    format!(
                        "{} / {} ({})",
                        Memory(m.memory_used_bytes).human(),
                        Memory(m.memory_total_bytes).human(),
                        percent(m.memory_used_bytes, m.memory_total_bytes)
                    ),
                )
                .field_at(1, "Load (1m)", format!("{:.2}", m.load1));
        }
        None => {
            page.field("Metrics", "<none yet>");
        }
    }
    tasks_section(&mut page, tasks, false, true, now);
    events_section(&mut page, events, now);
    page.render()
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! API objects for tests, built from JSON as the controller sends them.

    use super::*;

    pub fn now() -> DateTime<Utc> {
        "2026-11-10T12:00:00Z".parse().expect("valid time")
    }

    pub fn wallet() -> WorkloadView {
        serde_json::from_value(serde_json::json!({
            "manifest": {
                "apiVersion": "bramble/v1",
                "kind": "Wallet",
                "metadata": {"name": "ltc-wallet", "labels": {"app": "pool"}},
                "spec": {
                    "image": "pool/litecoind:0.21",
                    "command": ["/usr/bin/litecoind"],
                    "args": ["-printtoconsole", "-rpcallowip=10.0.0.0/8"],
                    "env": {"RPC_USER": "pool"},
                    "ports": [{"container": 9332, "host": 9332}],
                    "volumes": [{"hostPath": "/var/lib/bramble/volumes/ltc", "path": "/data"}],
                    "resources": {"cpu": "500m", "memory": "256Mi"},
                    "placement": {"nodeSelector": {"disk": "ssd"}, "architectures": ["arm64"]},
                    "probes": {"liveness": {"exec": ["litecoin-cli", "getblockcount"], "period": "30s", "timeout": "10s", "failureThreshold": 3, "initialDelay": "2m"}}
                }
            },
            "generation": 2,
            "desired": 1,
            "running": 0,
            "createdAt": "2026-11-05T12:00:00Z",
            "updatedAt": "2026-11-10T11:57:00Z"
        }))
        .expect("valid workload")
    }

    pub fn pending_task() -> Task {
        serde_json::from_value(serde_json::json!({
            "id": "ltc-wallet-0a1b2c-0",
            "kind": "Wallet",
            "workload": "ltc-wallet",
            "replica": 0,
            "specHash": "0a1b2c3d4e5f6789",
            "spec": {
                "image": "pool/litecoind:0.21",
                "restart": {"policy": "Always", "backoff": {"initial": "1s", "max": "5m"}, "maxFailures": 5, "window": "10m"}
            },
            "desired": "Running",
            "phase": "Pending",
            "message": "no node fits: pi-1: label disk=ssd missing; pi-2: needs 256Mi memory, 100Mi free",
            "restarts": 0,
            "createdAt": "2026-11-10T11:59:15Z"
        }))
        .expect("valid task")
    }

    pub fn running_task() -> Task {
        serde_json::from_value(serde_json::json!({
            "id": "web-0a1b2c-1",
            "kind": "Service",
            "workload": "web",
            "replica": 1,
            "specHash": "0a1b2c3d4e5f6789",
            "spec": {
                "image": "nginx:1",
                "restart": {"policy": "Always", "backoff": {"initial": "1s", "max": "5m"}, "maxFailures": 5, "window": "10m"}
            },
            "node": "pi-1",
            "desired": "Running",
            "phase": "Running",
            "ready": true,
            "containerId": "4f9a2b7c1d3e5f6a7b8c9d0e",
            "restarts": 2,
            "createdAt": "2026-11-10T09:00:00Z",
            "startedAt": "2026-11-10T11:00:00Z"
        }))
        .expect("valid task")
    }

    pub fn cronjob() -> WorkloadView {
        serde_json::from_value(serde_json::json!({
            "manifest": {
                "apiVersion": "bramble/v1",
                "kind": "CronJob",
                "metadata": {"name": "payout"},
                "spec": {
                    "image": "pool/payout:1",
                    "schedule": "*/5 * * * *",
                    "timezone": "Europe/Berlin",
                    "concurrencyPolicy": "Forbid",
                    "retries": 1
                }
            },
            "generation": 1,
            "desired": 0,
            "running": 0,
            "createdAt": "2026-11-05T12:00:00Z",
            "updatedAt": "2026-11-05T12:00:00Z"
        }))
        .expect("valid workload")
    }

    /// `payout` as `GET /v1/cronjobs/payout` shows it: suspended by `cron suspend`, the
    /// 11:55 slot failed once and was retried, 11:50 was skipped, one manual run.
    pub fn cron_view() -> CronJobView {
        serde_json::from_value(serde_json::json!({
            "name": "payout",
            "schedule": "*/5 * * * *",
            "timezone": "Europe/Berlin",
            "suspended": true,
            "lastSlot": "2026-11-10T11:55:00Z",
            "lastResult": "Succeeded",
            "active": 0,
            "firings": [
                {"slot": "2026-11-10T11:55:00Z", "outcome": "Fired", "task": "payout-20261110t115500z", "decidedAt": "2026-11-10T11:55:00.012Z"},
                {"slot": "2026-11-10T11:50:00Z", "outcome": "Skipped", "decidedAt": "2026-11-10T11:50:00.004Z"},
                {"slot": "2026-11-10T11:42:17Z", "outcome": "Manual", "task": "payout-20261110t114217z-manual", "decidedAt": "2026-11-10T11:42:17.530Z"}
            ]
        }))
        .expect("valid cronjob view")
    }

    pub fn cron_run(id: &str, slot: &str, attempt: u32, phase: &str, exit: i64) -> Task {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "kind": "CronJob",
            "workload": "payout",
            "replica": 0,
            "specHash": "0a1b2c3d4e5f6789",
            "spec": {
                "image": "pool/payout:1",
                "restart": {"policy": "Never", "backoff": {"initial": "1s", "max": "5m"}, "maxFailures": 5, "window": "10m"}
            },
            "node": "pi-2",
            "desired": "Running",
            "phase": phase,
            "exitCode": exit,
            "restarts": 0,
            "slot": slot,
            "attempt": attempt,
            "createdAt": slot,
            "finishedAt": "2026-11-10T11:58:00Z"
        }))
        .expect("valid task")
    }

    pub fn cron_runs() -> Vec<Task> {
        vec![
            cron_run(
                "payout-20261110t115500z",
                "2026-11-10T11:55:00Z",
                0,
                "Failed",
                1,
            ),
            cron_run(
                "payout-20261110t114217z-manual",
                "2026-11-10T11:42:17Z",
                0,
                "Succeeded",
                0,
            ),
            cron_run(
                "payout-20261110t115500z-r1",
                "2026-11-10T11:55:00Z",
                1,
                "Succeeded",
                0,
            ),
        ]
    }

    pub fn event(
        seq: u64,
        at: &str,
        warning: bool,
        object: &str,
        reason: &str,
        message: &str,
    ) -> Event {
        serde_json::from_value(serde_json::json!({
            "seq": seq,
            "at": at,
            "severity": if warning { "Warning" } else { "Normal" },
            "object": object,
            "reason": reason,
            "message": message
        }))
        .expect("valid event")
    }

    /// What an agent on a stock Raspberry Pi OS reports.
    pub const MEMORY_CGROUP_WARNING: &str = "memory limits are not enforced: add \"cgroup_memory=1 cgroup_enable=memory\" to /boot/firmware/cmdline.txt (one line) and reboot";

    pub fn node_view(cordoned: bool) -> NodeView {
        serde_json::from_value(serde_json::json!({
            "info": {
                "name": "pi-1",
                "arch": "arm64",
                "cores": 4,
                "memoryBytes": 1073741824u64,
                "dockerVersion": "24.0.5",
                "labels": {"disk": "ssd"},
                "agentVersion": "0.1.0",
                "os": "Debian GNU/Linux 12 (bookworm)"
            },
            "status": "Ready",
            "cordoned": cordoned,
            "lastSeen": "2026-11-10T11:59:58Z",
            "metrics": {"at": "2026-11-10T11:59:58Z", "cpuPercent": 12.4, "memoryUsedBytes": 429496730u64, "memoryTotalBytes": 1073741824u64, "load1": 0.52},
            "tasks": 1,
            "allocatedCpuMillis": 1500,
            "allocatedMemoryBytes": 536870912u64,
            "address": "10.0.0.11:51234",
            "registeredAt": "2026-11-05T12:00:00Z"
        }))
        .expect("valid node")
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn page_aligns_values_per_depth() {
        let mut p = Page::default();
        p.field("Name", "x")
            .field("Generation", 2)
            .section("Capacity")
            .field_at(1, "CPU", "4")
            .field_at(1, "Memory", "1Gi");
        assert_eq!(
            p.render(),
            "Name:        x\n\
             Generation:  2\n\
             Capacity:\n  \
               CPU:     4\n  \
               Memory:  1Gi\n"
        );
    }

    #[test]
    fn workload_page_shows_the_manifest_essentials_and_why_tasks_are_pending() {
        let text = workload(&wallet(), None, None, &[pending_task()], None, now());
        for want in [
            "Name:        ltc-wallet\n",
            "Kind:        Wallet\n",
            "Labels:      app=pool\n",
            "Updated:     2026-11-10T11:57:00Z (3m ago)\n",
            "Instance:    1 desired | 0 running (one at a time, fenced failover)\n",
            "Image:       pool/litecoind:0.21\n",
            "Command:     /usr/bin/litecoind\n",
            "Args:        -printtoconsole -rpcallowip=10.0.0.0/8\n",
            "Environment:\n  RPC_USER:  pool\n",
            "Ports:       9332/tcp -> host 9332\n",
            "Volumes:\n  /var/lib/bramble/volumes/ltc -> /data\n",
            "Resources:   cpu 500m, memory 256Mi\n",
            "Placement:   nodeSelector disk=ssd; architectures arm64\n",
            "Restart:     Always, back-off 1s..5m, give up after 5 failures in 10m\n",
            "Liveness:    exec [litecoin-cli getblockcount] delay=2m timeout=10s period=30s #failure=3\n",
            "Readiness:   <none>\n",
            "Tasks:\n  NAME                  NODE     STATUS    READY   RESTARTS   AGE   MESSAGE\n",
            "  ltc-wallet-0a1b2c-0   <none>   Pending   -       0          45s   no node fits: pi-1: label disk=ssd missing; pi-2: needs 256Mi memory, 100Mi free\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(
            !text.contains("Retries"),
            "a wallet has no retries:\n{text}"
        );
    }

    #[test]
    fn cronjob_page_shows_the_schedule_state_the_slots_and_the_runs() {
        let text = workload(
            &cronjob(),
            Some(&cron_view()),
            None,
            &cron_runs(),
            Some(&[]),
            now(),
        );
        for want in [
            "Schedule:            */5 * * * *\n",
            "Time Zone:           Europe/Berlin\n",
            "Concurrency Policy:  Forbid\n",
            "Suspend:             true (cron suspend)\n",
            "Active:              0 running\n",
            "Last Schedule:       2026-11-10T11:55:00Z (5m ago)\n",
            "Last Result:         Succeeded\n",
            "Next Schedule:       <none>\n",
            "Retries:             1\n",
            "Runs:\n\
             \x20 SLOT                   OUTCOME   TASK                             LATENESS\n\
             \x20 2026-11-10T11:55:00Z   Fired     payout-20261110t115500z          12ms\n\
             \x20 2026-11-10T11:50:00Z   Skipped   -                                4ms\n\
             \x20 2026-11-10T11:42:17Z   Manual    payout-20261110t114217z-manual   -\n",
            "Tasks:\n\
             \x20 TASK                             SLOT                   ATTEMPT   PHASE       EXIT   NODE   FINISHED   MESSAGE\n\
             \x20 payout-20261110t115500z-r1       2026-11-10T11:55:00Z   1         Succeeded   0      pi-2   2m ago\n\
             \x20 payout-20261110t115500z          2026-11-10T11:55:00Z   0         Failed      1      pi-2   2m ago\n\
             \x20 payout-20261110t114217z-manual   2026-11-10T11:42:17Z   0         Succeeded   0      pi-2   2m ago\n\
             Events:              <none>\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn cronjob_page_without_a_view_still_lists_the_runs() {
        let mut view = cron_view();
        view.suspended = false;
        view.firings.clear();
        view.next = Some("2026-11-10T12:00:48Z".parse().expect("valid time"));
        let text = workload(&cronjob(), Some(&view), None, &[], None, now());
        assert!(text.contains("\nSuspend:             false\n"), "{text}");
        assert!(
            text.contains("\nNext Schedule:       2026-11-10T12:00:48Z (in 48s)\n"),
            "{text}"
        );
        assert!(
            text.ends_with("Runs:                <none>\nTasks:               <none>\n"),
            "{text}"
        );
        let text = workload(&cronjob(), None, None, &cron_runs(), None, now());
        assert!(text.contains("\nSuspend:             false\n"), "{text}");
        assert!(!text.contains("Runs:"), "{text}");
        assert!(text.contains("\nTasks:\n  TASK "), "{text}");
    }

    #[test]
    fn workload_without_tasks_says_none() {
        let text = workload(&wallet(), None, None, &[], None, now());
        assert!(text.ends_with("Tasks:       <none>\n"), "{text}");
    }

    #[test]
    fn task_page_says_why_it_is_pending() {
        let text = task(&pending_task(), None, now());
        assert!(
            text.starts_with(
                "Name:         ltc-wallet-0a1b2c-0\nWorkload:     wallet/ltc-wallet\n"
            ),
            "{text}"
        );
        assert!(text.contains("\nNode:         <none>\nPhase:        Pending\nStatus:       Pending\nMessage:      no node fits: pi-1: label disk=ssd missing;"), "{text}");
        assert!(
            text.contains("\nReady:        <no readiness probe>\n"),
            "{text}"
        );
        assert!(text.contains("\nStarted:      <none>\n"), "{text}");
    }

    #[test]
    fn node_page_shows_capacity_allocation_metrics_and_tasks() {
        let text = node(&node_view(true), &[running_task()], None, now());
        for want in [
            "Status:         Ready,SchedulingDisabled\n",
            "Unschedulable:  true\n",
            "System Info:\n  Architecture:  arm64\n  OS:            Debian GNU/Linux 12 (bookworm)\n",
            "Capacity:\n  CPU:           4 cores\n  Memory:        1.0Gi\n",
            "Allocated:\n  CPU:           1500m (38%)\n  Memory:        512Mi (50%)\n  Tasks:         1\n",
            "  CPU:           12%\n  Memory:        410Mi / 1.0Gi (40%)\n  Load (1m):     0.52\n",
            "Tasks:\n  NAME           WORKLOAD      STATUS    READY   RESTARTS   AGE   MESSAGE\n  web-0a1b2c-1   service/web   Running   true    2          3h\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn node_page_shows_the_memory_cgroup_fix() {
        let mut n = node_view(false);
        n.info.memory_limits = Some(false);
        n.info.warnings = vec![MEMORY_CGROUP_WARNING.into()];
        let text = node(&n, &[], None, now());
        assert!(text.contains("\nMemory Limits:  NOT-ENFORCED\n"), "{text}");
        assert!(
            text.contains("\nWarnings:\n  - memory limits are not enforced: add \"cgroup_memory=1 cgroup_enable=memory\" to /boot/firmware/cmdline.txt (one line) and reboot\n"),
            "{text}"
        );
        let plain = node(&node_view(false), &[], None, now());
        assert!(plain.contains("\nMemory Limits:  <unknown>\n"), "{plain}");
        assert!(!plain.contains("Warnings:"), "{plain}");
    }

    #[test]
    fn events_end_the_page_oldest_first_like_kubectl() {
        let events = [
            event(
                9,
                "2026-11-10T11:59:00Z",
                true,
                "node/pi-1",
                "NodeNotReady",
                "no heartbeat\nfor 30s",
            ),
            event(
                3,
                "2026-11-10T11:00:00Z",
                false,
                "node/pi-1",
                "Drained",
                "2 tasks moved away",
            ),
        ];
        let text = node(&node_view(false), &[], Some(&events), now());
        assert!(
            text.ends_with(
                "Tasks:          <none>\n\
                 Events:\n  \
                   Type      Reason         Age    Message\n  \
                   ----      ------         ----   -------\n  \
                   Normal    Drained        60m    2 tasks moved away\n  \
                   Warning   NodeNotReady   60s    no heartbeat for 30s\n"
            ),
            "{text}"
        );
        let text = task(&running_task(), Some(&[]), now());
        assert!(text.ends_with("\nEvents:       <none>\n"), "{text}");
        let text = workload(&wallet(), None, None, &[], None, now());
        assert!(!text.contains("Events"), "no events endpoint: {text}");
    }

    #[test]
    fn shell_words_quote_only_what_needs_it() {
        let w = |v: &[&str]| shell_words(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(w(&["sh", "-c", "echo hi"]), "sh -c 'echo hi'");
        assert_eq!(w(&["it's", ""]), r"'it'\''s' ''");
        assert_eq!(w(&["--port=8080", "/data"]), "--port=8080 /data");
    }
}
