//! Parsing and validation of manifest files.
//!
//! A file may hold several YAML documents separated by `---`. Every problem is reported
//! as a [`ManifestError`] that names the file, line, column and field, and all problems
//! of all documents are reported at once, so a user fixes a file in one go. Nothing is
//! half-accepted: a caller gets either every document or the list of errors.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use crate::manifest::{Kind, Manifest, RestartPolicy, API_VERSION};
use crate::quantity::Memory;

/// One problem in a manifest, with its place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestError {
    /// File name as given (or `-` for standard input).
    pub file: String,
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
    /// Dotted path of the field, e.g. `spec.resources.cpu`; empty for the whole document.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ManifestError {}

/// One file (or stdin) of manifests, as text, so that errors can point at file, line and
/// column. Also the body of `POST /v1/apply` (see [`crate::rest::ApplyRequest`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// File name as the user gave it.
    pub name: String,
    /// YAML text, one or more documents.
    pub content: String,
}

/// A parsed, validated manifest and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// File name.
    pub file: String,
    /// Line where the document starts, from 1.
    pub line: usize,
    /// The manifest.
    pub manifest: Manifest,
}

/// Parses and validates every document of one file.
pub fn parse_manifests(file: &str, text: &str) -> Result<Vec<Document>, Vec<ManifestError>> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for (offset, doc) in split_documents(text) {
        match parse_document(file, offset, doc) {
            Ok(d) => docs.push(d),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

/// Parses and validates the documents of several files as one apply: on top of each
/// document's own checks, a kind and name may appear only once.
pub fn parse_sources(sources: &[Source]) -> Result<Vec<Document>, Vec<ManifestError>> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for s in sources {
        match parse_manifests(&s.name, &s.content) {
            Ok(mut d) => docs.append(&mut d),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        let mut texts: HashMap<&str, &str> = HashMap::new();
        for s in sources {
            texts.insert(&s.name, &s.content);
        }
        errors = duplicate_errors(&docs, &texts);
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

fn duplicate_errors(docs: &[Document], texts: &HashMap<&str, &str>) -> Vec<ManifestError> {
    let mut seen: BTreeMap<(Kind, &str), &Document> = BTreeMap::new();
    let mut errors = Vec::new();
    for d in docs {
        let key = (d.manifest.kind, d.manifest.metadata.name.as_str());
        if let Some(first) = seen.get(&key) {
            let (line, column) = texts
                .get(d.file.as_str())
                .and_then(|t| {
                    split_documents(t)
                        .into_iter()
                        .take_while(|(off, _)| *off < d.line)
                        .last()
                        .map(|(off, doc)| {
                            let (l, c) = Locator::scan(doc).find("metadata.name");
                            (l + off, c)
                        })
                })
                .unwrap_or((d.line, 1));
            errors.push(ManifestError {
                file: d.file.clone(),
                line,
                column,
                field: "metadata.name".into(),
                message: format!(
                    "duplicate {} {:?}: already defined at {}:{}",
                    d.manifest.kind, key.1, first.file, first.line
                ),
            });
        } else {
            seen.insert(key, d);
        }
    }
    errors
}

/// Splits a YAML stream at `---` lines. Returns each document's first line (from 0) and
/// text; documents with nothing but comments and blank lines are dropped.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 0;
    let mut pos = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let is_marker = line.starts_with("---")
            && line[3..]
                .chars()
                .next()
                .is_none_or(|c| c.is_whitespace() || c == '#');
        if is_marker && pos > start_byte {
            out.push((start_line, &text[start_byte..pos]));
            start_byte = pos;
            start_line = i;
        }
        pos += line.len();
    }
    out.push((start_line, &text[start_byte..]));
    out.into_iter()
        .filter(|(_, d)| !is_empty_document(d))
        .collect()
}

fn is_empty_document(doc: &str) -> bool {
    doc.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t.starts_with("---") || t == "..."
    })
}

fn parse_document(file: &str, offset: usize, doc: &str) -> Result<Document, Vec<ManifestError>> {
    let manifest: Manifest = match serde_yaml::from_str(doc) {
        Ok(m) => m,
        Err(e) => return Err(vec![yaml_error(file, offset, doc, &e)]),
    };
    let problems = check(&manifest);
    if problems.is_empty() {
        let first = doc
            .lines()
            .position(|l| {
                let t = l.trim();
                !(t.is_empty() || t.starts_with('#') || t.starts_with("---"))
            })
            .unwrap_or(0);
        return Ok(Document {
            file: file.to_string(),
            line: offset + first + 1,
            manifest,
        });
    }
    let locator = Locator::scan(doc);
    Err(problems
        .into_iter()
        .map(|(field, message)| {
            let (line, column) = locator.find(&field);
            ManifestError {
                file: file.to_string(),
                line: line + offset,
                column,
                field,
                message,
            }
        })
        .collect())
}

/// Turns serde_yaml's error (`spec.ports[0]: unknown field ``x``, expected … at line 3
/// column 5`) into file, line, column, field and message.
fn yaml_error(file: &str, offset: usize, doc: &str, e: &serde_yaml::Error) -> ManifestError {
    let text = e.to_string();
    let text = match text.rfind(" at line ") {
        Some(i) if e.location().is_some() => &text[..i],
        _ => text.as_str(),
    };
    let (mut field, message) = match text.split_once(": ") {
        Some((p, m)) if !p.is_empty() && !p.contains(char::is_whitespace) => {
            (p.to_string(), m.to_string())
        }
        _ => (String::new(), text.to_string()),
    };
    for prefix in ["unknown field `", "missing field `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((name, _)) = rest.split_once('`') {
                field = if field.is_empty() {
                    name.to_string()
                } else {
                    format!("{field}.{name}")
                };
            }
        }
    }
    if !message.starts_with("unknown field") && !message.starts_with("missing field") {
        // Errors raised by a value's own type (a bad quantity, name or duration) carry
        // the path of the mapping that holds the value; find the value it quotes.
        let locator = Locator::scan(doc);
        if let Some((path, (line, column))) = locator.child_quoted_in(&field, &message) {
            return ManifestError {
                file: file.to_string(),
                line: line + offset,
                column,
                field: path.to_string(),
                message,
            };
        }
    }
    let (line, column) = match e.location() {
        Some(l) if !message.starts_with("missing field") => (l.line(), l.column()),
        // A missing field has no place of its own: point at its parent mapping.
        _ => {
            let parent = field.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
            if parent.is_empty() {
                e.location()
                    .map(|l| (l.line(), l.column()))
                    .unwrap_or((1, 1))
            } else {
                Locator::scan(doc).find(parent)
            }
        }
    };
    ManifestError {
        file: file.to_string(),
        line: line + offset,
        column,
        field,
        message,
    }
}

/// Semantic checks that the types cannot express. Returns (field path, message) pairs.
pub fn check(m: &Manifest) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = Vec::new();
    let mut bad = |field: &str, msg: String| p.push((field.to_string(), msg));
    let s = &m.spec;

    if m.api_version != API_VERSION {
        bad(
            "apiVersion",
            format!(
                "unsupported apiVersion {:?}: expected {API_VERSION:?}",
                m.api_version
            ),
        );
    }
    for (k, v) in &m.metadata.labels {
        check_label(&format!("metadata.labels.{k}"), k, v, &mut bad);
    }

    if s.image.trim().is_empty() {
        bad("spec.image", "must not be empty".into());
    } else if s.image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bad(
            "spec.image",
            format!("invalid image reference {:?}: no spaces allowed", s.image),
        );
    }
    if s.command.as_ref().is_some_and(|c| c.is_empty()) {
        bad(
            "spec.command",
            "must not be an empty list (leave it out to use the image ENTRYPOINT)".into(),
        );
    }
    for k in s.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            bad(
                &format!("spec.env.{k}"),
                format!("invalid variable name {k:?}"),
            );
        }
    }

    let mut host_ports = BTreeMap::new();
    for (i, port) in s.ports.iter().enumerate() {
        if port.container == 0 {
            bad(
                &format!("spec.ports[{i}].container"),
                "port must be between 1 and 65535".into(),
            );
        }
        if let Some(h) = port.host {
            if h == 0 {
                bad(
                    &format!("spec.ports[{i}].host"),
                    "port must be between 1 and 65535".into(),
                );
            } else if let Some(j) = host_ports.insert((h, port.protocol), i) {
                bad(
                    &format!("spec.ports[{i}].host"),
                    format!(
                        "host port {h}/{} is already used by ports[{j}]",
                        port.protocol.as_str()
                    ),
                );
            }
        }
    }
    for (i, v) in s.volumes.iter().enumerate() {
        if !is_clean_absolute(&v.host_path) {
            bad(
                &format!("spec.volumes[{i}].hostPath"),
                format!(
                    "must be an absolute path without '..', got {:?}",
                    v.host_path
                ),
            );
        }
        if !is_clean_absolute(&v.path) {
            bad(
                &format!("spec.volumes[{i}].path"),
                format!("must be an absolute path without '..', got {:?}", v.path),
            );
        }
    }
    // Docker refuses memory limits under 6 MiB; say so here rather than at container start.
    if let Some(mem) = s.resources.memory {
        if mem < Memory::mib(6) {
            bad(
                "spec.resources.memory",
                format!("{mem} is below Docker's minimum of 6Mi"),
            );
        }
    }
    for (k, v) in &s.placement.node_selector {
        check_label(&format!("spec.placement.nodeSelector.{k}"), k, v, &mut bad);
    }

    if let Some(r) = &s.restart {
        if r.backoff.initial.as_millis() == 0 {
            bad(
                "spec.restart.backoff.initial",
                "must be greater than 0".into(),
            );
        }
        if r.backoff.max < r.backoff.initial {
            bad(
                "spec.restart.backoff.max",
                format!(
                    "{} is less than backoff.initial {}",
                    r.backoff.max, r.backoff.initial
                ),
            );
        }
        if r.max_failures == 0 {
            bad("spec.restart.maxFailures", "must be at least 1".into());
        }
        if r.window.as_millis() == 0 {
            bad("spec.restart.window", "must be greater than 0".into());
        }
        if m.kind.runs_to_completion() && r.policy == RestartPolicy::Always {
            bad("spec.restart.policy", format!("Always is not valid for a {}: it runs to completion; use OnFailure or Never, and retries", m.kind));
        }
    }
    for (name, probe) in [
        ("liveness", &s.probes.liveness),
        ("readiness", &s.probes.readiness),
    ] {
        let Some(probe) = probe else { continue };
        let base = format!("spec.probes.{name}");
        let count = usize::from(probe.exec.is_some())
            + usize::from(probe.http.is_some())
            + usize::from(probe.tcp.is_some());
        if count != 1 {
            bad(
                &base,
                format!("needs exactly one of exec, http or tcp (found {count})"),
            );
        }
        if probe.exec.as_ref().is_some_and(|e| e.is_empty()) {
            bad(&format!("{base}.exec"), "must name a command".into());
        }
        if let Some(h) = &probe.http {
            if h.port == 0 {
                bad(
                    &format!("{base}.http.port"),
                    "port must be between 1 and 65535".into(),
                );
            }
            if !h.path.starts_with('/') {
                bad(
                    &format!("{base}.http.path"),
                    format!("must start with '/', got {:?}", h.path),
                );
            }
        }
        if probe.tcp.as_ref().is_some_and(|t| t.port == 0) {
            bad(
                &format!("{base}.tcp.port"),
                "port must be between 1 and 65535".into(),
            );
        }
        if probe.period.as_millis() == 0 {
            bad(&format!("{base}.period"), "must be greater than 0".into());
        }
        if probe.timeout.as_millis() == 0 {
            bad(&format!("{base}.timeout"), "must be greater than 0".into());
        }
        if probe.failure_threshold == 0 {
            bad(
                &format!("{base}.failureThreshold"),
                "must be at least 1".into(),
            );
        }
    }

    // Fields that belong to some kinds only.
    let only = |field: &str, present: bool, allowed: &[Kind]| -> Option<(String, String)> {
        if present && !allowed.contains(&m.kind) {
            let names: Vec<&str> = allowed.iter().map(|k| k.as_str()).collect();
            let hint = if m.kind == Kind::Wallet && field == "spec.replicas" {
                " (a Wallet always runs exactly one instance)"
            } else {
                ""
            };
            Some((
                field.to_string(),
                format!(
                    "not valid for kind {}: only for {}{hint}",
                    m.kind,
                    names.join(", ")
                ),
            ))
        } else {
            None
        }
    };
    let cron = [Kind::CronJob];
    let runs = [Kind::Job, Kind::CronJob];
    let misplaced = [
        only("spec.replicas", s.replicas.is_some(), &[Kind::Service]),
        only("spec.schedule", s.schedule.is_some(), &cron),
        only("spec.timezone", s.timezone.is_some(), &cron),
        only(
            "spec.concurrencyPolicy",
            s.concurrency_policy.is_some(),
            &cron,
        ),
        only(
            "spec.startingDeadline",
            s.starting_deadline.is_some(),
            &cron,
        ),
        only("spec.suspend", s.suspend.is_some(), &cron),
        only("spec.history", s.history.is_some(), &cron),
        only("spec.retries", s.retries.is_some(), &runs),
        only("spec.timeout", s.timeout.is_some(), &runs),
    ];
    p.extend(misplaced.into_iter().flatten());

    if let Some(r) = s.replicas {
        if r > 1000 {
            p.push((
                "spec.replicas".into(),
                format!("{r} is more than the limit of 1000"),
            ));
        }
    }
    if m.kind == Kind::CronJob {
        match &s.schedule {
            None => p.push((
                "spec.schedule".into(),
                "a CronJob needs a schedule, e.g. \"*/10 * * * *\"".into(),
            )),
            Some(expr) if expr.trim().is_empty() => {
                p.push(("spec.schedule".into(), "must not be empty".into()))
            }
            Some(expr) => {
                // The expression is checked on its own (its validity does not depend on
                // the zone), so a bad schedule and a bad zone are both reported at once.
                if let Err(e) = crate::schedule::Schedule::parse(expr, None) {
                    p.push(("spec.schedule".into(), e.to_string()));
                }
                if let Some(tz) = &s.timezone {
                    if let Err(e) = crate::schedule::parse_timezone(tz) {
                        p.push(("spec.timezone".into(), e.to_string()));
                    }
                }
            }
        }
    }
    if s.timeout.is_some_and(|t| t.as_millis() == 0) {
        p.push(("spec.timeout".into(), "must be greater than 0".into()));
    }
    p
}

fn check_label(field: &str, k: &str, v: &str, bad: &mut impl FnMut(&str, String)) {
    let key_ok = !k.is_empty()
        && k.len() <= 63
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if !key_ok {
        bad(
            field,
            format!("invalid label key {k:?}: use up to 63 letters, digits, '-', '_', '.', '/'"),
        );
    }
    if v.len() > 253 || v.chars().any(|c| c.is_control() || c == ',' || c == '=') {
        bad(field, format!("invalid label value {v:?}"));
    }
}

fn is_clean_absolute(p: &str) -> bool {
    p.starts_with('/') && !p.split('/').any(|seg| seg == "..") && !p.contains('\0')
}

/// Where each field of a YAML document is: dotted paths (`spec.ports[0].host`, the same
/// spelling serde_yaml uses in its errors) to the line and column of the key.
struct Locator {
    places: HashMap<String, (usize, usize)>,
    values: HashMap<String, String>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

struct Collector {
    stack: Vec<Frame>,
    places: HashMap<String, (usize, usize)>,
    values: HashMap<String, String>,
}

impl Collector {
    /// Handles a node at the current position; returns its path if it is a value.
    fn node(&mut self, mark: Marker, scalar: Option<&str>) -> Option<String> {
        // yaml-rust2 counts columns from 0, people from 1.
        let at = (mark.line(), mark.col() + 1);
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key }) => match key.take() {
                None => {
                    let name = scalar.unwrap_or("?").to_string();
                    let p = if path.is_empty() {
                        name.clone()
                    } else {
                        format!("{path}.{name}")
                    };
                    self.places.entry(p).or_insert(at);
                    *key = Some(name);
                    None
                }
                Some(k) => Some(if path.is_empty() {
                    k
                } else {
                    format!("{path}.{k}")
                }),
            },
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                self.places.entry(p.clone()).or_insert(at);
                Some(p)
            }
        }
    }
}

impl MarkedEventReceiver for Collector {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(ref v, ..) => {
                if let Some(path) = self.node(mark, Some(v)) {
                    self.values.insert(path, v.clone());
                }
            }
            Event::MappingStart(..) => {
                if let Some(path) = self.node(mark, None) {
                    self.stack.push(Frame::Map { path, key: None });
                } else {
                    // A complex key; track it so the stack stays balanced.
                    self.stack.push(Frame::Map {
                        path: "?".into(),
                        key: None,
                    });
                }
            }
            Event::SequenceStart(..) => {
                let path = self.node(mark, None).unwrap_or_else(|| "?".into());
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl Locator {
    fn scan(doc: &str) -> Locator {
        let mut c = Collector {
            stack: Vec::new(),
            places: HashMap::new(),
            values: HashMap::new(),
        };
        // A document that does not parse has no places; lookups then fall back to 1:1.
        let _ = Parser::new_from_str(doc).load(&mut c, false);
        Locator {
            places: c.places,
            values: c.values,
        }
    }

    /// The direct child of mapping `parent` whose scalar value the message quotes
    /// (`invalid cpu quantity "lots"`), in document order.
    fn child_quoted_in(&self, parent: &str, message: &str) -> Option<(&str, (usize, usize))> {
        let prefix = if parent.is_empty() {
            String::new()
        } else {
            format!("{parent}.")
        };
        let mut hits: Vec<(&str, (usize, usize))> = self
            .values
            .iter()
            .filter(|(path, value)| {
                path.strip_prefix(&prefix)
                    .is_some_and(|rest| !rest.contains(['.', '[']))
                    && message.contains(&format!("{value:?}"))
            })
            .filter_map(|(path, _)| self.places.get(path).map(|at| (path.as_str(), *at)))
            .collect();
        hits.sort_by_key(|(_, at)| *at);
        hits.into_iter().next()
    }

    /// The place of `path`, or of its nearest ancestor that exists.
    fn find(&self, path: &str) -> (usize, usize) {
        let mut p = path;
        loop {
            if let Some(at) = self.places.get(p) {
                return *at;
            }
            let cut = p.rfind(['.', '[']);
            match cut {
                Some(i) => p = &p[..i],
                None => return (1, 1),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
apiVersion: bramble/v1
kind: Service
metadata:
  name: web
  labels: {app: pool}
spec:
  image: pool/web:1
  replicas: 2
  env: {PORT: 8080, DEBUG: true}
  ports: [{container: 8080, host: 18080}]
  resources: {cpu: 250m, memory: 64Mi}
";

    fn err(text: &str) -> Vec<ManifestError> {
        parse_manifests("m.yaml", text).expect_err("should be rejected")
    }

    fn one(text: &str) -> ManifestError {
        let mut e = err(text);
        assert_eq!(e.len(), 1, "{e:?}");
        e.remove(0)
    }

    #[test]
    fn parses_a_good_manifest_with_scalar_env() {
        let docs = parse_manifests("m.yaml", GOOD).expect("valid");
        assert_eq!(docs.len(), 1);
        let m = &docs[0].manifest;
        assert_eq!(m.kind, Kind::Service);
        assert_eq!(m.replicas(), 2);
        assert_eq!(m.spec.env["PORT"], "8080");
        assert_eq!(m.spec.env["DEBUG"], "true");
        assert_eq!(m.spec.resources.cpu.map(|c| c.millis()), Some(250));
        assert_eq!(docs[0].line, 1);
    }

    #[test]
    fn parses_multiple_documents_and_skips_empty_ones() {
        let text = format!(
            "# header\n---\n{GOOD}---\n# nothing\n---\n{}",
            GOOD.replace("name: web", "name: web2")
        );
        let docs = parse_manifests("m.yaml", &text).expect("valid");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].line, 3);
        assert_eq!(docs[1].line, 3 + GOOD.lines().count() + 3);
    }

    #[test]
    fn unknown_field_names_line_column_and_field() {
        let e = one(&GOOD.replace("  replicas: 2\n", "  replicas: 2\n  replcas: 3\n"));
        assert_eq!(
            (e.line, e.column, e.field.as_str()),
            (9, 3, "spec.replcas"),
            "{e}"
        );
        assert!(e.message.contains("unknown field `replcas`"), "{e}");
    }

    #[test]
    fn wrong_type_is_located() {
        let e = one(&GOOD.replace("replicas: 2", "replicas: two"));
        assert_eq!((e.line, e.field.as_str()), (8, "spec.replicas"), "{e}");
        assert!(e.message.contains("invalid type"), "{e}");
    }

    #[test]
    fn bad_quantities_are_located() {
        let e = one(&GOOD.replace("cpu: 250m", "cpu: lots"));
        assert_eq!(
            (e.line, e.field.as_str()),
            (11, "spec.resources.cpu"),
            "{e}"
        );
        assert!(e.message.contains("invalid cpu quantity"), "{e}");
        let e = one(&GOOD.replace("memory: 64Mi", "memory: 64MB"));
        assert_eq!(
            (e.line, e.field.as_str()),
            (11, "spec.resources.memory"),
            "{e}"
        );
    }

    #[test]
    fn missing_image_points_at_spec() {
        let e = one(&GOOD.replace("  image: pool/web:1\n", ""));
        assert_eq!(e.field, "spec.image", "{e}");
        assert!(e.message.contains("missing field `image`"), "{e}");
        assert_eq!(e.line, 6, "{e}");
        let e = one(&GOOD.replace("image: pool/web:1", "image: ''"));
        assert_eq!(
            (e.line, e.column, e.field.as_str()),
            (7, 3, "spec.image"),
            "{e}"
        );
    }

    #[test]
    fn bad_names_are_rejected() {
        for name in [
            "Web",
            "-web",
            "web-",
            "we_b",
            "",
            "a234567890123456789012345678901234567890123456789012345678901234",
        ] {
            let e = one(&GOOD.replace("name: web", &format!("name: '{name}'")));
            assert_eq!(
                (e.line, e.field.as_str()),
                (4, "metadata.name"),
                "{name}: {e}"
            );
            assert!(e.message.contains("invalid name"), "{e}");
        }
    }

    #[test]
    fn semantic_errors_are_located_in_the_right_document() {
        let text = format!(
            "{GOOD}---\n{}",
            GOOD.replace("kind: Service", "kind: Wallet")
                .replace("name: web", "name: w")
        );
        let e = one(&text);
        assert_eq!(e.field, "spec.replicas");
        assert_eq!(e.line, GOOD.lines().count() + 1 + 8, "{e}");
        assert!(e.message.contains("Wallet always runs exactly one"), "{e}");
    }

    #[test]
    fn flow_style_fields_are_located_on_their_column() {
        let e = one(&GOOD.replace("host: 18080", "host: 0"));
        assert_eq!(e.field, "spec.ports[0].host");
        assert_eq!((e.line, e.column), (10, 29), "{e}");
    }

    #[test]
    fn reports_every_error_at_once() {
        let text = GOOD
            .replace("apiVersion: bramble/v1", "apiVersion: v2")
            .replace("image: pool/web:1", "image: ' '")
            .replace(
                "  replicas: 2\n",
                "  replicas: 2\n  schedule: '* * * * *'\n",
            );
        let e = err(&text);
        let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["apiVersion", "spec.image", "spec.schedule"],
            "{e:?}"
        );
    }

    #[test]
    fn unknown_kind_is_an_error() {
        let e = one(&GOOD.replace("kind: Service", "kind: Deployment"));
        assert_eq!((e.line, e.field.as_str()), (2, "kind"), "{e}");
        assert!(e.message.contains("unknown variant `Deployment`"), "{e}");
    }

    #[test]
    fn not_yaml_is_an_error() {
        let e = one("apiVersion: bramble/v1\nkind: Service: x\n");
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("mapping values are not allowed"), "{e}");
        let e = one("just a string\n");
        assert!(e.message.contains("invalid type"), "{e}");
    }

    #[test]
    fn duplicate_names_in_one_apply_are_errors() {
        let a = Source {
            name: "a.yaml".into(),
            content: GOOD.into(),
        };
        let b = Source {
            name: "b.yaml".into(),
            content: format!("# x\n{GOOD}"),
        };
        let e = parse_sources(&[a.clone(), b]).expect_err("duplicate");
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].file.as_str(), e[0].line, e[0].field.as_str()),
            ("b.yaml", 5, "metadata.name"),
            "{}",
            e[0]
        );
        assert!(
            e[0].message.contains("already defined at a.yaml:1"),
            "{}",
            e[0]
        );
        // Same name, other kind: fine.
        let c = Source {
            name: "c.yaml".into(),
            content: GOOD
                .replace("kind: Service", "kind: Wallet")
                .replace("  replicas: 2\n", ""),
        };
        assert!(parse_sources(&[a, c]).is_ok());
    }

    #[test]
    fn kind_specific_rules() {
        let cron = "apiVersion: bramble/v1\nkind: CronJob\nmetadata: {name: payout}\nspec:\n  image: p:1\n";
        let e = one(cron);
        assert_eq!(e.field, "spec.schedule");
        let ok = format!("{cron}  schedule: '*/10 * * * *'\n  retries: 2\n  timeout: 10m\n  restart: {{policy: OnFailure}}\n");
        assert!(parse_manifests("c.yaml", &ok).is_ok());
        let e = one(&format!(
            "{cron}  schedule: '* * * * *'\n  restart: {{policy: Always}}\n"
        ));
        assert_eq!(e.field, "spec.restart.policy");
        let e = one(&GOOD.replace("  replicas: 2\n", "  replicas: 2\n  retries: 1\n"));
        assert_eq!(e.field, "spec.retries");
    }

    #[test]
    fn probes_need_exactly_one_action() {
        let e = one(&format!("{GOOD}  probes:\n    liveness: {{period: 5s}}\n"));
        assert_eq!(
            (e.field.as_str(), e.line),
            ("spec.probes.liveness", 13),
            "{e}"
        );
        let ok =
            format!("{GOOD}  probes:\n    liveness: {{http: {{port: 8080}}, initialDelay: 2m}}\n");
        assert!(parse_manifests("m.yaml", &ok).is_ok());
    }

    #[test]
    fn volumes_must_be_absolute() {
        let e = one(&format!(
            "{GOOD}  volumes: [{{hostPath: data, path: /data}}]\n"
        ));
        assert_eq!(e.field, "spec.volumes[0].hostPath");
        let e = one(&format!(
            "{GOOD}  volumes: [{{hostPath: /a/../etc, path: /data}}]\n"
        ));
        assert_eq!(e.field, "spec.volumes[0].hostPath");
    }

    #[test]
    fn never_panics_on_garbage() {
        for text in [
            "",
            "---",
            "- a\n- b",
            "{",
            "kind: [",
            "apiVersion: 1\nkind: 2\nmetadata: 3\nspec: 4",
            "\t\t:",
            "? a\n: b",
        ] {
            let _ = parse_manifests("g.yaml", text);
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,200}") {
            let _ = parse_manifests("p.yaml", &s);
        }
    }
}
