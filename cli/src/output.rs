//! Small pieces of output shared by the commands: ages, output formats, resource names,
//! io errors in one line.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use bramble_api::manifest::Kind;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// How `get` prints objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// The default table.
    #[default]
    #[value(skip)]
    Table,
    /// The table with more columns.
    Wide,
    /// The full objects as YAML.
    Yaml,
    /// The full objects as JSON.
    Json,
}

/// Writes `value` as pretty JSON or YAML, followed by a newline.
pub fn write_structured<T: Serialize>(
    out: &mut dyn Write,
    format: Format,
    value: &T,
) -> anyhow::Result<()> {
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut *out, value)?;
            writeln!(out)?;
        }
        _ => {
            let text = serde_yaml::to_string(value)?;
            out.write_all(text.as_bytes())?;
        }
    }
    Ok(())
}

/// Time since `t`, as kubectl prints ages: `45s`, `3m20s`, `3h`, `5d`, `2y30d`.
pub fn age(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    human_duration(now.signed_duration_since(t))
}

/// How long ago `t` was: `12s ago`. A time ahead of `now` (clock skew between this
/// machine and the controller: Pis have no real-time clock) reads as kubectl's
/// `<invalid>` beyond one second.
pub fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    match age(t, now) {
        invalid if invalid.starts_with('<') => invalid,
        a => format!("{a} ago"),
    }
}

/// How long until `t`: `in 48s`; `now` when `t` has come (the controller decides
/// slots to the millisecond, so a past `next` is only clock skew or a slow answer).
pub fn until(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let d = t.signed_duration_since(now);
    if d.num_seconds() <= 0 {
        "now".into()
    } else {
        format!("in {}", human_duration(d))
    }
}

/// kubectl's `HumanDuration`: precise when short, coarser as it grows.
pub fn human_duration(d: chrono::TimeDelta) -> String {
    let seconds = d.num_seconds();
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        let days = hours / 24;
        return if h == 0 {
            format!("{days}d")
        } else {
            format!("{days}d{h}h")
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    let years = hours / 24 / 365;
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{years}y")
        } else {
            format!("{years}y{dy}d")
        };
    }
    format!("{years}y")
}

/// What a command line names: `nodes`, `workloads`, `tasks`, or a workload kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// `node`, `nodes`, `no`.
    Nodes,
    /// `workload`, `workloads`, `wl`, or a kind (`services`, `wallet`, `cj`…).
    Workloads(Option<Kind>),
    /// `task`, `tasks`.
    Tasks,
    /// `secret`, `secrets`: names and keys only.
    Secrets,
    /// `controller`, `controllers`: who leads, since when, who is alive.
    Controllers,
    /// `endpoint`, `endpoints`, `ep`: each workload's name, address and instances.
    Endpoints,
    /// `volume`, `volumes`, `vol`: managed volumes, their node and copies.
    Volumes,
}

/// A resource type the command line does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct UnknownResource(pub String);

/// Every spelling of a resource type, for "did you mean".
pub const RESOURCE_NAMES: &[&str] = &[
    "nodes",
    "node",
    "workloads",
    "workload",
    "tasks",
    "task",
    "services",
    "service",
    "svc",
    "wallets",
    "wallet",
    "cronjobs",
    "cronjob",
    "jobs",
    "job",
    "secrets",
    "secret",
    "controllers",
    "controller",
    "endpoints",
    "endpoint",
    "volumes",
    "volume",
    "all",
];

impl fmt::Display for UnknownResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown resource type {:?}", self.0)?;
        if let Some(m) = crate::suggest::did_you_mean(&self.0, RESOURCE_NAMES.iter().copied()) {
            write!(f, " (did you mean {m:?}?)")?;
        }
        f.write_str(": expected nodes, workloads, tasks, services, wallets, cronjobs, jobs, secrets, controllers, endpoints or volumes")
    }
}

/// `-o` of `get`: a table, the objects, their names, or a JSONPath template.
#[derive(Debug, Clone)]
pub enum Output {
    /// `wide`, `yaml`, `json`.
    Format(Format),
    /// `name`: `service/web`, one a line.
    Name,
    /// `jsonpath=TEMPLATE`.
    JsonPath(crate::jsonpath::Template),
}

impl FromStr for Output {
    type Err = String;
    fn from_str(s: &str) -> Result<Output, String> {
        match s {
            "wide" => Ok(Output::Format(Format::Wide)),
            "yaml" => Ok(Output::Format(Format::Yaml)),
            "json" => Ok(Output::Format(Format::Json)),
            "name" => Ok(Output::Name),
            _ => match s.split_once('=') {
                Some(("jsonpath", t)) => t.parse().map(Output::JsonPath).map_err(|e| e.to_string()),
                _ => Err(format!(
                    "unknown output format {s:?}: expected wide, yaml, json, name or jsonpath=TEMPLATE"
                )),
            },
        }
    }
}

impl FromStr for Resource {
    type Err = UnknownResource;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "node" | "nodes" | "no" => Ok(Resource::Nodes),
            "workload" | "workloads" | "wl" => Ok(Resource::Workloads(None)),
            "task" | "tasks" => Ok(Resource::Tasks),
            "secret" | "secrets" => Ok(Resource::Secrets),
            "controller" | "controllers" => Ok(Resource::Controllers),
            "endpoint" | "endpoints" | "ep" => Ok(Resource::Endpoints),
            "volume" | "volumes" | "vol" => Ok(Resource::Volumes),
            other => other
                .parse::<Kind>()
                .map(|k| Resource::Workloads(Some(k)))
                .map_err(|_| UnknownResource(s.to_string())),
        }
    }
}

impl Resource {
    /// Parses `TYPE` or `TYPE/NAME` (kubectl's `service/hello`).
    pub fn parse_with_name(s: &str) -> Result<(Resource, Option<String>), UnknownResource> {
        match s.split_once('/') {
            Some((t, n)) if !n.is_empty() => Ok((t.parse()?, Some(n.to_string()))),
            _ => Ok((s.parse()?, None)),
        }
    }

    /// The singular noun used in messages (`task "x" not found`).
    pub fn singular(self) -> &'static str {
        match self {
            Resource::Nodes => "node",
            Resource::Workloads(None) => "workload",
            Resource::Workloads(Some(k)) => k.path(),
            Resource::Tasks => "task",
            Resource::Secrets => "secret",
            Resource::Controllers => "controller",
            Resource::Endpoints => "endpoint",
            Resource::Volumes => "volume",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Nodes => "nodes",
            Resource::Workloads(None) => "workloads",
            Resource::Workloads(Some(Kind::Service)) => "services",
            Resource::Workloads(Some(Kind::Wallet)) => "wallets",
            Resource::Workloads(Some(Kind::CronJob)) => "cronjobs",
            Resource::Workloads(Some(Kind::Job)) => "jobs",
            Resource::Tasks => "tasks",
            Resource::Secrets => "secrets",
            Resource::Controllers => "controllers",
            Resource::Endpoints => "endpoints",
            Resource::Volumes => "volumes",
        })
    }
}

/// `service/hello`, as kubectl names objects in its messages.
pub fn object_ref(kind: Kind, name: &str) -> String {
    format!("{}/{}", kind.path(), name)
}

/// An event's object, as the controller names it: `node/pi3`, `task/web-1a2b3c-0`,
/// `service/web`. Parsed from what people type (`svc/web`, `no/pi3`, `tasks/x`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    /// `node`, `task`, `secret` or a kind's path (`service`, `wallet`, `cronjob`, `job`).
    pub kind: &'static str,
    /// The node's name, the task's id or the workload's name.
    pub name: String,
}

/// An object the command line cannot name an event's object with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadObject {
    /// Not `TYPE/NAME`.
    #[error("expected TYPE/NAME, e.g. node/pi-1, task/web-1a2b3c-0 or service/web; got {0:?}")]
    NoName(String),
    /// `workload/x` does not say which kind.
    #[error("name the workload's kind: service/{0}, wallet/{0}, cronjob/{0} or job/{0}")]
    NoKind(String),
    /// Unknown type.
    #[error(transparent)]
    Unknown(#[from] UnknownResource),
}

impl FromStr for ObjectRef {
    type Err = BadObject;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (resource, name) = Resource::parse_with_name(s)?;
        let name = name
            .filter(|n| !n.contains('/'))
            .ok_or_else(|| BadObject::NoName(s.to_string()))?;
        let kind = match resource {
            Resource::Nodes => "node",
            Resource::Tasks => "task",
            Resource::Secrets => "secret",
            Resource::Controllers => "controller",
            Resource::Endpoints => "endpoint",
            Resource::Volumes => "volume",
            Resource::Workloads(Some(k)) => k.path(),
            Resource::Workloads(None) => return Err(BadObject::NoKind(name)),
        };
        Ok(ObjectRef { kind, name })
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

impl ObjectRef {
    /// A node.
    pub fn node(name: &str) -> ObjectRef {
        ObjectRef {
            kind: "node",
            name: name.to_string(),
        }
    }

    /// A task by id, or with [`ObjectRef::matches`] every task of a workload by name.
    pub fn task(id: &str) -> ObjectRef {
        ObjectRef {
            kind: "task",
            name: id.to_string(),
        }
    }

    /// A managed volume.
    pub fn volume(name: &str) -> ObjectRef {
        ObjectRef {
            kind: "volume",
            name: name.to_string(),
        }
    }

    /// A Secret.
    pub fn secret(name: &str) -> ObjectRef {
        ObjectRef {
            kind: "secret",
            name: name.to_string(),
        }
    }

    /// A workload.
    pub fn workload(kind: Kind, name: &str) -> ObjectRef {
        ObjectRef {
            kind: kind.path(),
            name: name.to_string(),
        }
    }

    /// Whether an event about `object` is about this one. `task/NAME` also stands for
    /// every task of workload NAME. The controller matches `object=O` with every object
    /// starting with `O-`, so `node/pi` would get `node/pi-2`'s events too; this is the
    /// exact test to apply to what it answers.
    pub fn matches(&self, object: &str) -> bool {
        let Some((kind, name)) = object.split_once('/') else {
            return false;
        };
        kind == self.kind && (name == self.name || (kind == "task" && is_task_of(name, &self.name)))
    }
}

/// Whether `id` is the id of a task of workload `workload`: `{workload}-{hash}-{replica}`
/// (services, wallets, jobs) or a CronJob run, `{workload}-{yyyymmdd}t{hhmmss}z`, with
/// `-manual` when started by `cron run` and `-r{n}` for retry `n`. The shape matters:
/// `web-api-1a2b3c-0` belongs to `web-api`, not to `web`.
pub fn is_task_of(id: &str, workload: &str) -> bool {
    let Some(rest) = id.strip_prefix(workload).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let hash = |s: &str| (1..=6).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit());
    let slot = |s: &str| {
        let b = s.as_bytes();
        b.len() == 16
            && b[8] == b't'
            && b[15] == b'z'
            && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
    };
    if let Some((_, tail)) = rest.split_at_checked(16).filter(|(s, _)| slot(s)) {
        let tail = tail.strip_prefix("-manual").unwrap_or(tail);
        return tail.is_empty() || tail.strip_prefix("-r").is_some_and(number);
    }
    match rest.split_once('-') {
        Some((h, r)) => hash(h) && number(r),
        None => false,
    }
}

/// A time as a table shows it: `2026-11-10T11:59:00Z`.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// An optional value for a table cell.
pub fn or_none<T: fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "<none>".to_string(), |v| v.to_string())
}

/// An io error for a one-line message: lower case, without the `(os error 2)` suffix.
pub fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such file or directory".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => {
            let s = e.to_string();
            let s = match s.rfind(" (os error ") {
                Some(i) => &s[..i],
                None => s.as_str(),
            };
            let mut chars = s.chars();
            match chars.next() {
                Some(c) => c.to_lowercase().chain(chars).collect(),
                None => String::new(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    #[test]
    fn ages_read_like_kubectl() {
        let cases = [
            (TimeDelta::seconds(-5), "<invalid>"),
            (TimeDelta::milliseconds(-500), "0s"),
            (TimeDelta::seconds(0), "0s"),
            (TimeDelta::seconds(45), "45s"),
            (TimeDelta::seconds(119), "119s"),
            (TimeDelta::seconds(180), "3m"),
            (TimeDelta::seconds(200), "3m20s"),
            (TimeDelta::minutes(42), "42m"),
            (TimeDelta::minutes(179), "179m"),
            (TimeDelta::hours(3), "3h"),
            (TimeDelta::minutes(3 * 60 + 5), "3h5m"),
            (TimeDelta::hours(20), "20h"),
            (TimeDelta::days(5), "5d"),
            (TimeDelta::hours(5 * 24 + 3), "5d3h"),
            (TimeDelta::days(30), "30d"),
            (TimeDelta::days(365 * 2 + 10), "2y10d"),
            (TimeDelta::days(365 * 9), "9y"),
        ];
        for (d, want) in cases {
            assert_eq!(human_duration(d), want, "{d:?}");
        }
    }

    #[test]
    fn age_counts_from_a_time_to_now() {
        let now = Utc::now();
        assert_eq!(age(now - TimeDelta::minutes(2), now), "2m");
    }

    #[test]
    fn relative_times_say_ago_and_in() {
        let now = Utc::now();
        assert_eq!(ago(now - TimeDelta::seconds(12), now), "12s ago");
        assert_eq!(ago(now + TimeDelta::milliseconds(300), now), "0s ago");
        assert_eq!(ago(now + TimeDelta::seconds(30), now), "<invalid>");
        assert_eq!(until(now + TimeDelta::seconds(48), now), "in 48s");
        assert_eq!(until(now + TimeDelta::minutes(200), now), "in 3h20m");
        assert_eq!(until(now + TimeDelta::milliseconds(400), now), "now");
        assert_eq!(until(now - TimeDelta::seconds(5), now), "now");
    }

    #[test]
    fn resource_names_accept_singular_plural_and_short_forms() {
        for (s, want) in [
            ("node", Resource::Nodes),
            ("NODES", Resource::Nodes),
            ("no", Resource::Nodes),
            ("wl", Resource::Workloads(None)),
            ("workload", Resource::Workloads(None)),
            ("task", Resource::Tasks),
            ("tasks", Resource::Tasks),
            ("services", Resource::Workloads(Some(Kind::Service))),
            ("svc", Resource::Workloads(Some(Kind::Service))),
            ("wallet", Resource::Workloads(Some(Kind::Wallet))),
            ("cj", Resource::Workloads(Some(Kind::CronJob))),
            ("jobs", Resource::Workloads(Some(Kind::Job))),
        ] {
            assert_eq!(s.parse::<Resource>(), Ok(want), "{s}");
        }
        assert!("pods".parse::<Resource>().is_err());
    }

    #[test]
    fn event_objects_are_normalised_from_short_kinds() {
        for (s, want) in [
            ("svc/web", "service/web"),
            ("Service/web", "service/web"),
            ("no/pi3", "node/pi3"),
            ("nodes/pi3", "node/pi3"),
            ("tasks/web-1a2b3c-0", "task/web-1a2b3c-0"),
            ("cj/payout", "cronjob/payout"),
            ("wallet/ltc", "wallet/ltc"),
        ] {
            assert_eq!(
                s.parse::<ObjectRef>().map(|o| o.to_string()),
                Ok(want.to_string()),
                "{s}"
            );
        }
        assert!(matches!(
            "node".parse::<ObjectRef>(),
            Err(BadObject::NoName(_))
        ));
        assert!(matches!(
            "node/a/b".parse::<ObjectRef>(),
            Err(BadObject::NoName(_))
        ));
        assert!(matches!(
            "wl/web".parse::<ObjectRef>(),
            Err(BadObject::NoKind(_))
        ));
        assert!(matches!(
            "pod/x".parse::<ObjectRef>(),
            Err(BadObject::Unknown(_))
        ));
    }

    #[test]
    fn an_object_matches_itself_and_a_workload_name_its_tasks_only() {
        let node = ObjectRef::node("pi");
        assert!(node.matches("node/pi"));
        assert!(!node.matches("node/pi-2"), "the controller's prefix match");
        assert!(!node.matches("task/pi"));
        let web = ObjectRef::task("web");
        for (object, want) in [
            ("task/web", true),
            ("task/web-1a2b3c-0", true),
            ("task/web-1a2b3c-12", true),
            ("task/web-20261121t101000z", true),
            ("task/web-api-1a2b3c-0", false),
            ("task/web-1a2b3c", false),
            ("task/web-xyz-0", false),
            ("task/webby-1a2b3c-0", false),
            ("service/web-1a2b3c-0", false),
            ("task/web-2026112t101000z", false),
            ("task/web-20261121t101000z-manual", true),
            ("task/web-20261121t101000z-r2", true),
            ("task/web-20261121t101000z-manual-r1", true),
            ("task/web-20261121t101000z-r", false),
            ("task/web-20261121t101000z-x", false),
            ("task/web-20261121t101000z-manual-", false),
        ] {
            assert_eq!(web.matches(object), want, "{object}");
        }
        let one = ObjectRef::task("web-1a2b3c-0");
        assert!(one.matches("task/web-1a2b3c-0"));
        assert!(!one.matches("task/web-1a2b3c-1"));
        assert!(ObjectRef::workload(Kind::Service, "web").matches("service/web"));
    }

    #[test]
    fn type_slash_name_is_split() {
        assert_eq!(
            Resource::parse_with_name("service/hello"),
            Ok((
                Resource::Workloads(Some(Kind::Service)),
                Some("hello".into())
            ))
        );
        assert_eq!(
            Resource::parse_with_name("tasks"),
            Ok((Resource::Tasks, None))
        );
    }

    #[test]
    fn io_errors_read_as_one_lower_case_line() {
        let e = io::Error::from_raw_os_error(21);
        assert_eq!(describe_io(&e), "is a directory");
    }
}
