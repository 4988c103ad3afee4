//! Parsing and validation of manifest files.
//!
//! A file may hold several YAML documents separated by `---`. Every problem is reported
//! as a [`ManifestError`] that names the file, line, column and field, and all problems
//! of all documents are reported at once, so a user fixes a file in one go. Nothing is
//! half-accepted: a caller gets either every document or the list of errors.
//!
//! # Where an error points
//! - A field that is not known, or a key given twice: its key.
//! - A value of the wrong type (`replicas: two`) or not one of the allowed words
//!   (`kind: Deployment`): the value.
//! - A value that fails its own check (`cpu: fast`, `period: 5x`, a bad name) or a check
//!   made after parsing: the key of its field, `spec.resources.cpu`.
//! - A missing field: the key of the mapping that lacks it, or that mapping when it has
//!   no key (a list item, the document).
//! - A syntax error: where the YAML parser stopped, or the character at fault.
//!
//! Lines count from 1 in the file, columns from 1 in characters (not bytes).
//!
//! # Limits
//! Nesting deeper than [`MAX_DEPTH`] and documents of more than [`MAX_NODES`] values
//! (aliases counted as copies) are refused with an error at their place, so no text can
//! exhaust the stack or the memory of the controller that parses it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::manifest::{Kind, Manifest, Metadata, RestartPolicy, SecretManifest, API_VERSION};
use crate::quantity::Memory;
use crate::yaml;

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
    /// Line and column (from 1) where `metadata.name` is written, for errors about
    /// the name that only the cluster's state can find.
    pub name_at: (usize, usize),
    /// Where each env entry that references a Secret is written, by variable, for
    /// references only the cluster can check.
    pub env_at: BTreeMap<String, (usize, usize)>,
    /// The manifest.
    pub manifest: Manifest,
}

/// A parsed, validated Secret and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretDocument {
    /// File name.
    pub file: String,
    /// Line where the document starts, from 1.
    pub line: usize,
    /// Where `metadata.name` is written.
    pub name_at: (usize, usize),
    /// The Secret.
    pub secret: SecretManifest,
}

/// Every document of an apply, by what it is, each list in the order given.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    /// Services, Wallets, CronJobs and Jobs.
    pub workloads: Vec<Document>,
    /// Secrets.
    pub secrets: Vec<SecretDocument>,
}

impl Parsed {
    /// How many documents there are.
    pub fn len(&self) -> usize {
        self.workloads.len() + self.secrets.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, other: &mut Parsed) {
        self.workloads.append(&mut other.workloads);
        self.secrets.append(&mut other.secrets);
    }
}

/// The most bytes of one Secret value: certificates and keys fit, disk images do not.
pub const MAX_SECRET_VALUE_BYTES: usize = 64 * 1024;
/// The most bytes of all values of one Secret.
pub const MAX_SECRET_BYTES: usize = 256 * 1024;

pub use crate::yaml::{MAX_DEPTH, MAX_NODES};

/// Parses and validates every document of one file.
pub fn parse_manifests(file: &str, text: &str) -> Result<Parsed, Vec<ManifestError>> {
    parse_file(file, text)
}

/// Parses and validates the documents of several files as one apply: on top of each
/// document's own checks, a name may appear only once, whatever the kind (workload names
/// are unique across kinds: they are also the names containers reach workloads by), and
/// a Secret name once among Secrets.
pub fn parse_sources(sources: &[Source]) -> Result<Parsed, Vec<ManifestError>> {
    let mut docs = Parsed::default();
    let mut errors = Vec::new();
    for s in sources {
        match parse_file(&s.name, &s.content) {
            Ok(mut d) => docs.append(&mut d),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        errors = duplicate_errors(&docs.workloads);
        errors.extend(duplicate_secret_errors(&docs.secrets));
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

fn parse_file(file: &str, text: &str) -> Result<Parsed, Vec<ManifestError>> {
    let mut docs = Parsed::default();
    let mut errors = Vec::new();
    for (offset, piece) in split_documents(text) {
        match parse_piece(file, offset, piece) {
            Ok(mut d) => docs.append(&mut d),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

fn duplicate_secret_errors(docs: &[SecretDocument]) -> Vec<ManifestError> {
    let mut seen: BTreeMap<&str, &SecretDocument> = BTreeMap::new();
    let mut errors = Vec::new();
    for d in docs {
        let name = d.secret.metadata.name.as_str();
        if let Some(first) = seen.insert(name, d) {
            errors.push(ManifestError {
                file: d.file.clone(),
                line: d.name_at.0,
                column: d.name_at.1,
                field: "metadata.name".into(),
                message: format!(
                    "duplicate Secret {name:?}: already defined at {}:{}",
                    first.file, first.line
                ),
            });
            seen.insert(name, first);
        }
    }
    errors
}

fn duplicate_errors(docs: &[Document]) -> Vec<ManifestError> {
    let mut seen: BTreeMap<&str, &Document> = BTreeMap::new();
    let mut errors = Vec::new();
    for d in docs {
        let name = d.manifest.metadata.name.as_str();
        if let Some(first) = seen.get(name) {
            let message = if first.manifest.kind == d.manifest.kind {
                format!(
                    "duplicate {} {name:?}: already defined at {}:{}",
                    d.manifest.kind, first.file, first.line
                )
            } else {
                format!(
                    "the name {name:?} is already used by the {} at {}:{}; workload names are unique across kinds",
                    first.manifest.kind, first.file, first.line
                )
            };
            errors.push(ManifestError {
                file: d.file.clone(),
                line: d.name_at.0,
                column: d.name_at.1,
                field: "metadata.name".into(),
                message,
            });
        } else {
            seen.insert(name, d);
        }
    }
    errors
}

/// Splits a YAML stream at `---` lines. Returns each document's first line (from 0) and
/// text; documents with nothing but comments and blank lines are dropped. Each piece is
/// parsed on its own, so a syntax error in one document does not hide the problems of
/// the others.
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
        // `--- {kind: Job, ...}` has its content on the marker line.
        let t = t.strip_prefix("---").map_or(t, str::trim_start);
        t.is_empty() || t.starts_with('#') || t == "..."
    })
}

/// Every kind a document may have, to tell a Secret from a workload before decoding
/// the rest (and to list them all when the kind is unknown).
#[derive(Deserialize)]
enum DocKind {
    Service,
    Wallet,
    CronJob,
    Job,
    Secret,
}

#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    kind: Option<DocKind>,
}

/// Parses and validates the documents of one piece of a file that starts on line
/// `offset + 1`.
fn parse_piece(file: &str, offset: usize, text: &str) -> Result<Parsed, Vec<ManifestError>> {
    let error = |place: yaml::Place, field: String, message: String| ManifestError {
        file: file.to_string(),
        line: offset + place.line,
        column: place.column,
        field,
        message,
    };
    let from_yaml = |e: yaml::Error| error(e.place, e.field, e.message);
    let docs = yaml::load(text).map_err(|e| vec![from_yaml(e)])?;
    let mut parsed = Parsed::default();
    let mut errors = Vec::new();
    for doc in docs {
        match doc.decode::<Head>() {
            Ok(Head {
                kind: Some(DocKind::Secret),
            }) => {
                let secret: SecretManifest = match doc.decode() {
                    Ok(s) => s,
                    Err(e) => {
                        errors.push(from_yaml(e));
                        continue;
                    }
                };
                let problems = check_secret(&secret);
                if problems.is_empty() {
                    let name = doc.place_of("metadata.name");
                    parsed.secrets.push(SecretDocument {
                        file: file.to_string(),
                        line: offset + doc.start().line,
                        name_at: (offset + name.line, name.column),
                        secret,
                    });
                } else {
                    errors.extend(
                        problems
                            .into_iter()
                            .map(|(field, message)| error(doc.place_of(&field), field, message)),
                    );
                }
                continue;
            }
            // An unknown kind: say so with every kind there is.
            Err(e) if e.field == "kind" => {
                errors.push(from_yaml(e));
                continue;
            }
            _ => {}
        }
        let manifest: Manifest = match doc.decode() {
            Ok(m) => m,
            Err(e) => {
                errors.push(from_yaml(e));
                continue;
            }
        };
        let problems = check(&manifest);
        if problems.is_empty() {
            let name = doc.place_of("metadata.name");
            let env_at = manifest
                .spec
                .env
                .iter()
                .filter(|(_, v)| v.secret_ref().is_some())
                .map(|(k, _)| {
                    let at = doc.place_of(&format!("spec.env.{k}"));
                    (k.clone(), (offset + at.line, at.column))
                })
                .collect();
            parsed.workloads.push(Document {
                file: file.to_string(),
                line: offset + doc.start().line,
                name_at: (offset + name.line, name.column),
                env_at,
                manifest,
            });
        } else {
            errors.extend(
                problems
                    .into_iter()
                    .map(|(field, message)| error(doc.place_of(&field), field, message)),
            );
        }
    }
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(errors)
    }
}

/// What every document must get right: the apiVersion and the labels.
fn check_head(api_version: &str, metadata: &Metadata, bad: &mut impl FnMut(&str, String)) {
    if api_version != API_VERSION {
        bad(
            "apiVersion",
            format!("unsupported apiVersion {api_version:?}: expected {API_VERSION:?}"),
        );
    }
    for (k, v) in &metadata.labels {
        check_label(&format!("metadata.labels.{k}"), k, v, bad);
    }
}

/// A Secret's checks: its name and labels as for any object, data keys that can be
/// referenced, and values of bounded size.
pub fn check_secret(m: &SecretManifest) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = Vec::new();
    let mut bad = |field: &str, msg: String| p.push((field.to_string(), msg));
    check_head(&m.api_version, &m.metadata, &mut bad);
    let mut total = 0;
    for (k, v) in &m.data {
        if !valid_data_key(k) {
            bad(
                &format!("data.{k}"),
                format!("invalid key {k:?}: use 1 to 253 letters, digits, '-', '_' and '.'"),
            );
        }
        // The value's size only: the value never appears in an error.
        if v.0.len() > MAX_SECRET_VALUE_BYTES {
            bad(
                &format!("data.{k}"),
                format!(
                    "the value is {} bytes; at most {MAX_SECRET_VALUE_BYTES}",
                    v.0.len()
                ),
            );
        }
        if v.0.contains('\0') {
            bad(
                &format!("data.{k}"),
                "the value holds a NUL byte, which no environment variable can carry".into(),
            );
        }
        total += v.0.len();
    }
    if total > MAX_SECRET_BYTES {
        bad(
            "data",
            format!("the values add up to {total} bytes; at most {MAX_SECRET_BYTES}"),
        );
    }
    p
}

/// A Secret's data key: what `{secret: NAME, key: KEY}` may name.
pub fn valid_data_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 253
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Semantic checks that the types cannot express. Returns (field path, message) pairs.
pub fn check(m: &Manifest) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = Vec::new();
    let mut bad = |field: &str, msg: String| p.push((field.to_string(), msg));
    let s = &m.spec;

    check_head(&m.api_version, &m.metadata, &mut bad);

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
    for (k, v) in &s.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            bad(
                &format!("spec.env.{k}"),
                format!("invalid variable name {k:?}"),
            );
        }
        match v {
            crate::manifest::EnvValue::Text(t) if t.contains('\0') => bad(
                &format!("spec.env.{k}"),
                "the value holds a NUL byte, which no environment variable can carry".into(),
            ),
            crate::manifest::EnvValue::Secret(r) if !valid_data_key(&r.key) => bad(
                &format!("spec.env.{k}.key"),
                format!(
                    "invalid key {:?}: use 1 to 253 letters, digits, '-', '_' and '.'",
                    r.key
                ),
            ),
            _ => {}
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
    let mut managed: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, v) in s.volumes.iter().enumerate() {
        if !is_clean_absolute(&v.path) {
            bad(
                &format!("spec.volumes[{i}].path"),
                format!("must be an absolute path without '..', got {:?}", v.path),
            );
        }
        match (&v.name, v.host_path.is_empty()) {
            (Some(_), false) => {
                bad(
                    &format!("spec.volumes[{i}]"),
                    "give either name (a managed volume) or hostPath, not both".into(),
                );
                continue;
            }
            (None, true) => {
                bad(
                    &format!("spec.volumes[{i}]"),
                    "needs name (a managed volume, kept by Bramble) or hostPath (a directory of the node)".into(),
                );
                continue;
            }
            (Some(n), true) => {
                if let Some(j) = managed.insert(n.as_str(), i) {
                    bad(
                        &format!("spec.volumes[{i}].name"),
                        format!("volume {n:?} is already mounted by volumes[{j}]"),
                    );
                }
                continue;
            }
            (None, false) => {}
        }
        match crate::host_path::check(&v.host_path) {
            Ok(()) => {}
            Err(r) if r.is_malformed() => bad(
                &format!("spec.volumes[{i}].hostPath"),
                format!(
                    "must be an absolute path without '..', got {:?}",
                    v.host_path
                ),
            ),
            // The rules every node applies anyway: refused here, at apply, rather than
            // as a task that fails on every node. Each node's own allow list is checked
            // only by its agent.
            Err(r) => {
                let hint = match r {
                    crate::host_path::Refusal::System { .. } => {
                        "; no node lets a container mount it (agents allow /var/lib/bramble/volumes by default)"
                    }
                    _ => "",
                };
                bad(
                    &format!("spec.volumes[{i}].hostPath"),
                    format!("{:?} is refused: {r}{hint}", v.host_path),
                )
            }
        }
    }
    if let Some(sync) = &s.sync {
        check_sync(m, sync, !managed.is_empty(), &mut bad);
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

fn check_sync(
    m: &Manifest,
    sync: &crate::manifest::VolumeSync,
    has_managed: bool,
    bad: &mut impl FnMut(&str, String),
) {
    use crate::manifest::VolumeSync;
    if !has_managed && sync.copies > 0 {
        bad(
            "spec.sync",
            "copies managed volumes, and this workload has none: give a volume a name (volumes: [{name: data, path: /data}])".into(),
        );
    }
    if m.kind == Kind::Service && m.replicas() > 1 && sync.copies > 0 {
        bad(
            "spec.sync",
            format!(
                "a Service with {} replicas has a volume per replica, and none can follow \
                 the others: sync needs replicas: 1 (or a Wallet)",
                m.replicas()
            ),
        );
    }
    if sync.every < VolumeSync::MIN_EVERY {
        bad(
            "spec.sync.every",
            format!(
                "{} is shorter than the minimum of {}",
                sync.every,
                VolumeSync::MIN_EVERY
            ),
        );
    }
    if sync.copies > VolumeSync::MAX_COPIES {
        bad(
            "spec.sync.copies",
            format!(
                "{} is more than the limit of {}",
                sync.copies,
                VolumeSync::MAX_COPIES
            ),
        );
    }
    if sync.before.first().is_some_and(|c| c.trim().is_empty()) {
        bad(
            "spec.sync.before",
            "the command's first word must not be empty (leave before out to run none)".into(),
        );
    }
    if sync.before.iter().any(|a| a.contains('\0')) {
        bad("spec.sync.before", "holds a NUL byte".into());
    }
    for (i, g) in sync.exclude.iter().enumerate() {
        if let Err(why) = crate::glob::Glob::new(g) {
            bad(&format!("spec.sync.exclude[{i}]"), format!("{g:?}: {why}"));
        }
    }
}

fn check_label(field: &str, k: &str, v: &str, bad: &mut impl FnMut(&str, String)) {
    if let Err(e) = crate::manifest::check_label_key(k) {
        bad(field, e);
    }
    if let Err(e) = crate::manifest::check_label_value(v) {
        bad(field, e);
    }
}

fn is_clean_absolute(p: &str) -> bool {
    p.starts_with('/') && !p.split('/').any(|seg| seg == "..") && !p.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::EnvValue;

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
        let docs = parse_manifests("m.yaml", GOOD).expect("valid").workloads;
        assert_eq!(docs.len(), 1);
        let m = &docs[0].manifest;
        assert_eq!(m.kind, Kind::Service);
        assert_eq!(m.replicas(), 2);
        assert_eq!(m.spec.env["PORT"], EnvValue::from("8080"));
        assert_eq!(m.spec.env["DEBUG"], EnvValue::from("true"));
        assert_eq!(m.spec.resources.cpu.map(|c| c.millis()), Some(250));
        assert_eq!(docs[0].line, 1);
    }

    #[test]
    fn parses_multiple_documents_and_skips_empty_ones() {
        let text = format!(
            "# header\n---\n{GOOD}---\n# nothing\n---\n{}",
            GOOD.replace("name: web", "name: web2")
        );
        let docs = parse_manifests("m.yaml", &text).expect("valid").workloads;
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].line, 3);
        assert_eq!(docs[1].line, 3 + GOOD.lines().count() + 3);
    }

    #[test]
    fn a_document_may_start_on_its_marker_line() {
        let flow = "{apiVersion: bramble/v1, kind: Job, metadata: {name: j}, spec: {image: a}}";
        let docs = parse_manifests("m.yaml", &format!("{GOOD}--- {flow}\n"))
            .expect("valid")
            .workloads;
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].line, GOOD.lines().count() + 1);
        let e = one(&format!("--- {}\n", flow.replace("image: a", "image: ''")));
        assert_eq!(
            (e.line, e.column, e.field.as_str()),
            (1, 69, "spec.image"),
            "{e}"
        );
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

    const WALLET: &str = "\
apiVersion: bramble/v1
kind: Wallet
metadata: {name: ltc}
spec:
  image: pool/ltc:1
";

    #[test]
    fn managed_volumes_and_sync_rules_are_checked_with_their_place() {
        let ok = parse_manifests(
            "w.yaml",
            &format!("{WALLET}  volumes: [{{name: ltc-data, path: /data}}, {{hostPath: /var/lib/bramble/volumes/x, path: /x}}]\n"),
        )
        .expect("parses");
        let m = &ok.workloads[0].manifest;
        assert_eq!(m.spec.volumes[0].managed(), Some("ltc-data"));
        assert_eq!(
            m.sync(),
            Some(crate::manifest::VolumeSync::default()),
            "a Wallet syncs by default"
        );
        let spec = crate::task::TaskSpec::from_manifest(m);
        assert!(spec.sync.is_some());
        // Off by copies: 0; a Service opts in; without a managed volume nothing syncs.
        let off = parse_manifests(
            "w.yaml",
            &format!("{WALLET}  volumes: [{{name: d, path: /d}}]\n  sync: {{copies: 0}}\n"),
        )
        .expect("parses");
        assert_eq!(off.workloads[0].manifest.sync(), None);
        let svc = parse_manifests("s.yaml", &GOOD.replace("replicas: 2", "replicas: 1\n  volumes: [{name: d, path: /d}]\n  sync: {every: 30s, copies: 2, before: [sh, -c, x], exclude: [\"blocks/\", \"*.log\"]}")).expect("parses");
        let rule = svc.workloads[0].manifest.sync().expect("opted in");
        assert_eq!(
            (rule.every.as_millis(), rule.copies, rule.exclude.len()),
            (30_000, 2, 2)
        );
        let plain = parse_manifests("w.yaml", WALLET).expect("parses");
        assert_eq!(plain.workloads[0].manifest.sync(), None);
        assert_eq!(
            crate::task::TaskSpec::from_manifest(&plain.workloads[0].manifest).hash(),
            crate::task::TaskSpec::from_manifest(&plain.workloads[0].manifest).hash()
        );

        for (extra, field, says) in [
            (
                "  volumes: [{path: /data}]\n",
                "spec.volumes[0]",
                "needs name",
            ),
            (
                "  volumes: [{name: d, hostPath: /var/lib/bramble/volumes/d, path: /data}]\n",
                "spec.volumes[0]",
                "not both",
            ),
            (
                "  volumes: [{name: Data, path: /data}]\n",
                "spec.volumes[0].name",
                "invalid name",
            ),
            (
                "  volumes: [{name: d, path: data}]\n",
                "spec.volumes[0].path",
                "absolute",
            ),
            (
                "  volumes: [{name: d, path: /a}, {name: d, path: /b}]\n",
                "spec.volumes[1].name",
                "already mounted",
            ),
            ("  sync: {copies: 1}\n", "spec.sync", "has none"),
            (
                "  volumes: [{name: d, path: /d}]\n  sync: {every: 10ms}\n",
                "spec.sync.every",
                "minimum",
            ),
            (
                "  volumes: [{name: d, path: /d}]\n  sync: {copies: 9}\n",
                "spec.sync.copies",
                "limit of 5",
            ),
            (
                "  volumes: [{name: d, path: /d}]\n  sync: {before: [\"\"]}\n",
                "spec.sync.before",
                "first word",
            ),
            (
                "  volumes: [{name: d, path: /d}]\n  sync: {exclude: [\"../x\"]}\n",
                "spec.sync.exclude[0]",
                "'..'",
            ),
            (
                "  volumes: [{name: d, path: /d}]\n  sync: {exclude: [\"//x\"]}\n",
                "spec.sync.exclude[0]",
                "empty",
            ),
            (
                "  volumes: [{name: d, path: /d}]\n  sync: {every: 1m, often: true}\n",
                "spec.sync",
                "unknown field",
            ),
        ] {
            let e = one(&format!("{WALLET}{extra}"));
            assert!(e.field.starts_with(field), "{extra}: {e}");
            assert!(e.message.contains(says), "{extra}: {e}");
        }
        let e = one(&GOOD.replace(
            "replicas: 2",
            "replicas: 3\n  volumes: [{name: d, path: /d}]\n  sync: {copies: 1}",
        ));
        assert_eq!(e.field, "spec.sync", "{e}");
        assert!(e.message.contains("replicas: 1"), "{e}");
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
        // Same name, other kind: an error too, since names are unique across kinds (they
        // are the names containers reach workloads by, and make task ids).
        let c = Source {
            name: "c.yaml".into(),
            content: GOOD
                .replace("kind: Service", "kind: Wallet")
                .replace("  replicas: 2\n", ""),
        };
        let e = parse_sources(&[a, c]).expect_err("a name used by another kind");
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].file.as_str(), e[0].line), ("c.yaml", 4), "{}", e[0]);
        assert!(
            e[0].message
                .contains("is already used by the Service at a.yaml:1; workload names are unique across kinds"),
            "{}",
            e[0]
        );
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
        assert_eq!(
            e.message,
            "must be an absolute path without '..', got \"/a/../etc\""
        );
    }

    #[test]
    fn host_paths_no_node_may_mount_are_refused_at_apply_with_their_place() {
        // (hostPath as written in YAML, the message's end)
        let cases = [
            ("/", r#""/" is refused: a system path; no node lets"#),
            ("/etc", r#""/etc" is refused: a system path;"#),
            (
                "/etc/bramble/stratum",
                r#""/etc/bramble/stratum" is refused: under the system path /etc;"#,
            ),
            ("/proc/1/root", "under the system path /proc"),
            ("/sys/kernel", "under the system path /sys"),
            ("/dev/sda", "under the system path /dev"),
            ("/run/docker.sock", "under the system path /run"),
            ("/var/run", r#""/var/run" is refused: a system path"#),
            ("/var/run/docker.sock", "under the system path /var/run"),
            ("/boot", "a system path"),
            ("/root/.ssh", "under the system path /root"),
            ("/usr/bin", "under the system path /usr"),
            ("/bin", "a system path"),
            ("/sbin", "a system path"),
            ("/lib/modules", "under the system path /lib"),
            ("/var/lib/docker", "a system path"),
            (
                "'/var/lib/bramble/volumes/x:/etc'",
                "contains ':', which Docker's bind syntax would read as a separator",
            ),
            ("'/srv/data:rw'", "contains ':'"),
            ("/srv/./data", "not a clean path (no '.' segments, no '//')"),
            ("//etc", "not a clean path"),
            ("/srv//data", "not a clean path"),
            ("\"/srv/data\\0\"", "contains a control character"),
        ];
        for (path, want) in cases {
            let text = format!("{GOOD}  volumes:\n    - {{hostPath: {path}, path: /data}}\n");
            let e = one(&text);
            assert_eq!(e.field, "spec.volumes[0].hostPath", "{path}");
            assert_eq!((e.line, e.column), (13, 8), "{path}: the key's place");
            assert!(e.message.contains(want), "{path}: {}", e.message);
        }
        // Paths a node may allow pass the manifest check (the node's own list decides).
        for path in [
            "/var/lib/bramble/volumes/ltc",
            "/var/lib/bramble/volumes/ltc/",
            "/srv/pool",
            "/etcetera",
            "/var/runner",
            "/home/pi/wallet",
        ] {
            let text = format!("{GOOD}  volumes:\n    - {{hostPath: {path}, path: /data}}\n");
            assert!(parse_manifests("m.yaml", &text).is_ok(), "{path}");
        }
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

    /// One bad manifest: what it is, its text, and the error it must give: line, column,
    /// field and a part of the message.
    type Case = (
        &'static str,
        String,
        (usize, usize),
        &'static str,
        &'static str,
    );

    #[test]
    fn every_kind_of_error_names_the_place_to_look_at() {
        let r = |from: &str, to: &str| GOOD.replace(from, to);
        let cases: Vec<Case> = vec![
            // The key of a field that is not known.
            (
                "unknown field",
                r("  replicas: 2\n", "  replicas: 2\n  replcas: 3\n"),
                (9, 3),
                "spec.replcas",
                "unknown field `replcas`, expected one of `image`",
            ),
            (
                "unknown field in a flow list item",
                r("host: 18080", "hots: 1"),
                (10, 29),
                "spec.ports[0].hots",
                "unknown field `hots`, expected one of `container`, `host`, `protocol`",
            ),
            // The value, when it has the wrong type or is not one of the variants.
            (
                "wrong type",
                r("replicas: 2", "replicas: two"),
                (8, 13),
                "spec.replicas",
                "invalid type: string \"two\", expected u32",
            ),
            (
                "a quoted number is text",
                r("container: 8080", "container: '8080'"),
                (10, 23),
                "spec.ports[0].container",
                "invalid type: string \"8080\", expected u16",
            ),
            (
                "a number out of range",
                r("host: 18080", "host: 70000"),
                (10, 35),
                "spec.ports[0].host",
                "invalid value: integer `70000`, expected u16",
            ),
            (
                "unknown variant",
                r("kind: Service", "kind: Deployment"),
                (2, 7),
                "kind",
                "unknown variant `Deployment`, expected one of `Service`",
            ),
            (
                "unknown variant in a list",
                format!("{GOOD}  placement: {{architectures: [arm64, mips]}}\n"),
                (12, 38),
                "spec.placement.architectures[1]",
                "unknown variant `mips`",
            ),
            // The key of a field whose value fails its own check, as for the checks
            // after parsing.
            (
                "bad quantity, flow style",
                r("cpu: 250m", "cpu: lots"),
                (11, 15),
                "spec.resources.cpu",
                "invalid cpu quantity \"lots\": expected cores",
            ),
            (
                "bad quantity, block style",
                r(
                    "  resources: {cpu: 250m, memory: 64Mi}\n",
                    "  resources:\n    memory: 64MB\n",
                ),
                (12, 5),
                "spec.resources.memory",
                "invalid memory quantity \"64MB\"",
            ),
            (
                "bad duration",
                format!("{GOOD}  probes:\n    liveness: {{exec: [a], period: 5x}}\n"),
                (13, 27),
                "spec.probes.liveness.period",
                "invalid duration \"5x\"",
            ),
            (
                "bad name",
                r("name: web", "name: Web_1"),
                (4, 3),
                "metadata.name",
                "invalid name \"Web_1\"",
            ),
            (
                "a list where a map of text is wanted",
                r("env: {PORT: 8080, DEBUG: true}", "env: [a]"),
                (9, 8),
                "spec.env",
                "invalid type: sequence, expected a mapping of names to text, numbers, booleans or {secret, key} references",
            ),
            // The key of the mapping that lacks a field, or the mapping itself.
            (
                "missing field",
                r("  image: pool/web:1\n", ""),
                (6, 1),
                "spec.image",
                "missing field `image`",
            ),
            (
                "missing field of the document",
                r("metadata:\n  name: web\n  labels: {app: pool}\n", ""),
                (1, 1),
                "metadata",
                "missing field `metadata`",
            ),
            (
                "missing field in a list item",
                r("{container: 8080, host: 18080}", "{host: 1}"),
                (10, 11),
                "spec.ports[0].container",
                "missing field `container`",
            ),
            // The second of two equal keys.
            (
                "duplicate field",
                r("  replicas: 2\n", "  replicas: 2\n  image: x\n"),
                (9, 3),
                "spec.image",
                "duplicate key \"image\": already given at line 7",
            ),
            (
                "duplicate key in a map",
                r("DEBUG: true", "PORT: 1"),
                (9, 21),
                "spec.env.PORT",
                "duplicate key \"PORT\": already given at line 9",
            ),
            // Syntax: where the parser stops, or the character at fault.
            (
                "mapping value in a plain scalar",
                r("kind: Service", "kind: Service: x"),
                (2, 14),
                "",
                "mapping values are not allowed in this context",
            ),
            (
                "unclosed flow mapping",
                r("memory: 64Mi}", "memory: 64Mi"),
                (12, 1),
                "",
                "did not find expected ',' or '}'",
            ),
            (
                "tab in indentation",
                r("  image: pool/web:1\n", "\timage: pool/web:1\n"),
                (7, 1),
                "",
                "tabs disallowed",
            ),
            (
                "unknown escape",
                r("image: pool/web:1", "image: \"pool\\qweb\""),
                (7, 15),
                "",
                "unknown escape character",
            ),
            (
                "unclosed quote, at its opening",
                r("image: pool/web:1", "image: \"pool/web:1"),
                (7, 10),
                "",
                "quoted scalar",
            ),
            (
                "control character",
                r("image: pool/web:1", "image: pool\u{0}web"),
                (7, 14),
                "",
                "unprintable character",
            ),
            (
                "unsupported tag",
                r("image: pool/web:1", "image: !Secret web"),
                (7, 10),
                "",
                "unsupported tag `!Secret`",
            ),
            // Checks after parsing: the field's key, found through flow style, dotted
            // keys and multi-byte characters (columns count characters).
            (
                "check in a flow list item",
                r("host: 18080", "host: 0"),
                (10, 29),
                "spec.ports[0].host",
                "port must be between 1 and 65535",
            ),
            (
                "check of a key with dots",
                r(
                    "labels: {app: pool}",
                    "labels: {app.kubernetes.io/name: 'a,b'}",
                ),
                (5, 12),
                "metadata.labels.app.kubernetes.io/name",
                "invalid label value \"a,b\"",
            ),
            (
                "columns count characters",
                r("labels: {app: pool}", "labels: {app: pööl, 'b c': x}"),
                (5, 23),
                "metadata.labels.b c",
                "invalid label key \"b c\"",
            ),
            (
                "error in the second document",
                format!("{GOOD}---\n{}", r("cpu: 250m", "cpu: lots")),
                (23, 15),
                "spec.resources.cpu",
                "invalid cpu quantity",
            ),
        ];
        for (what, text, (line, column), field, message) in cases {
            let e = one(&text);
            assert_eq!(
                (e.line, e.column, e.field.as_str()),
                (line, column, field),
                "{what}: {e}"
            );
            assert!(e.message.contains(message), "{what}: {e}");
        }
    }

    /// Runs `f` on a thread with a 2 MiB stack: Rust's default for spawned threads and
    /// tokio's for its workers, where the controller parses manifests.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(f)
            .expect("spawns a thread")
            .join()
            .expect("does not panic or overflow")
    }

    #[test]
    fn refuses_deep_nesting_of_every_form_on_a_2_mib_stack() {
        let closed = |open: &str, close: &str, n: usize| open.repeat(n) + &close.repeat(n);
        let block_maps: String = (0..100)
            .map(|i| format!("{}a:\n", "  ".repeat(i)))
            .collect();
        let cases: Vec<(&str, String, (usize, usize))> = vec![
            // Where the 65th level opens...
            ("block sequences", "- ".repeat(4096), (1, 129)),
            ("block mappings", block_maps, (65, 129)),
            ("closed flow sequences", closed("[", "]", 100), (1, 65)),
            ("closed flow mappings", closed("{a: ", "}", 100), (1, 257)),
            // The document and `spec` are two levels already.
            (
                "in a manifest",
                format!("{GOOD}  args: {}", closed("[", "]", 70)),
                (12, 71),
            ),
            (
                "through an alias",
                format!(
                    "{GOOD}  args: &x {}\n  command: [*x]\n",
                    closed("[", "]", 62)
                ),
                (13, 13),
            ),
            // ...or, for flow collections deeper than the YAML scanner reads ahead
            // (255 levels), where it stops.
            ("flow sequences", "[".repeat(8192), (1, 256)),
            ("flow mappings", "{a: ".repeat(2048), (1, 1021)),
            ("a MiB of flow sequences", "[".repeat(1 << 20), (1, 256)),
            ("a MiB of flow mappings", "{a: ".repeat(1 << 18), (1, 1021)),
            ("a MiB of block sequences", "- ".repeat(1 << 19), (1, 129)),
        ];
        for (what, text, (line, column)) in cases {
            let errors =
                on_small_stack(move || parse_manifests("deep.yaml", &text)).expect_err("refused");
            assert_eq!(errors.len(), 1, "{what}: {errors:?}");
            let e = &errors[0];
            assert_eq!(
                e.to_string(),
                format!(
                    "deep.yaml:{line}:{column}: nested too deeply: more than {MAX_DEPTH} levels"
                ),
                "{what}"
            );
        }
    }

    #[test]
    fn huge_inputs_are_refused_or_read_in_linear_time_on_a_2_mib_stack() {
        const MIB: usize = 1 << 20;
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "many list items",
                "- a\n".repeat(MIB / 4),
                "too many values",
            ),
            (
                "many keys",
                (0..MIB / 12).map(|i| format!("k{i:07}: v\n")).collect(),
                "too many values",
            ),
            ("one long line", "a".repeat(MIB), "invalid type: string"),
            (
                "one long quoted string",
                format!("\"{}\"", "a".repeat(MIB)),
                "invalid type: string",
            ),
            (
                "one long flow list",
                format!("[{}]", "a, ".repeat(MIB / 3)),
                "too many values",
            ),
            ("a long comment", format!("#{}\n", "a".repeat(MIB)), ""),
            (
                "many documents",
                format!("---\n{}\n", "a".repeat(60)).repeat(MIB / 64),
                "invalid type: string",
            ),
            (
                "many anchors",
                format!("[{}]", "&a a, ".repeat(MIB / 6)),
                "too many values",
            ),
            (
                "a long image name",
                GOOD.replace("pool/web:1", &"w".repeat(MIB)),
                "",
            ),
            (
                "long quantities and durations",
                GOOD.replace("250m", &"5".repeat(MIB))
                    .replace("64Mi", &"6".repeat(MIB))
                    + &format!(
                        "  restart: {{policy: Always, window: {}s}}\n",
                        "9".repeat(MIB)
                    ),
                "",
            ),
            (
                "a long schedule and zone",
                format!(
                    "apiVersion: bramble/v1\nkind: CronJob\nmetadata: {{name: c}}\nspec:\n  image: a\n  schedule: '{}0 * * * *'\n  timezone: {}\n",
                    "1,".repeat(MIB / 2),
                    "Europe/".repeat(MIB / 7)
                ),
                "unknown time zone",
            ),
        ];
        for (what, text, message) in cases {
            let result = on_small_stack(move || parse_manifests("huge.yaml", &text));
            match result {
                Ok(docs) => assert!(message.is_empty(), "{what}: {} documents", docs.len()),
                Err(errors) => assert!(
                    errors.iter().any(|e| e.message.contains(message)),
                    "{what}: {:?}",
                    errors.first()
                ),
            }
        }
    }

    const SECRET: &str = "\
apiVersion: bramble/v1
kind: Secret
metadata: {name: ltc-rpc}
data:
  password: hunter2-but-long
  pin: 1234
";

    const REF: &str = "\
apiVersion: bramble/v1
kind: Wallet
metadata: {name: ltc}
spec:
  image: w:1
  env:
    RPC_USER: pool
    RPC_PASSWORD: {secret: ltc-rpc, key: password}
";

    #[test]
    fn secrets_parse_apart_from_workloads_with_their_values_as_text() {
        let p = parse_manifests("s.yaml", &format!("{SECRET}---\n{REF}")).expect("valid");
        assert_eq!((p.workloads.len(), p.secrets.len()), (1, 1));
        let s = &p.secrets[0];
        assert_eq!(s.secret.metadata.name.as_str(), "ltc-rpc");
        assert_eq!(s.secret.data["password"].0, "hunter2-but-long");
        assert_eq!(s.secret.data["pin"].0, "1234");
        assert_eq!(s.name_at, (3, 12));
        // Never in debug output.
        assert!(!format!("{s:?}").contains("hunter2"));
        let w = &p.workloads[0];
        let r = w.manifest.spec.env["RPC_PASSWORD"]
            .secret_ref()
            .expect("a reference");
        assert_eq!((r.secret.as_str(), r.key.as_str()), ("ltc-rpc", "password"));
        assert_eq!(w.manifest.spec.env["RPC_USER"], EnvValue::from("pool"));
        assert_eq!(w.env_at["RPC_PASSWORD"], (15, 5));
    }

    #[test]
    fn an_unknown_kind_names_every_kind_including_secret() {
        let e = one(&GOOD.replace("kind: Service", "kind: Deployment"));
        assert_eq!(e.field, "kind");
        assert!(e.message.contains("`Secret`"), "{e}");
    }

    #[test]
    fn bad_secrets_are_refused_without_repeating_their_values() {
        let cases = [
            (
                SECRET.replace("pin: 1234", "bad key!: x"),
                "data.bad key!",
                "invalid key",
            ),
            (
                SECRET.replace(
                    "pin: 1234",
                    &format!("big: {}", "v".repeat(MAX_SECRET_VALUE_BYTES + 1)),
                ),
                "data.big",
                "at most 65536",
            ),
            (
                SECRET.replace("\ndata:", "\nspec: {}\ndata:"),
                "spec",
                "unknown field `spec`",
            ),
            (
                SECRET.replace("ltc-rpc", "LTC_rpc"),
                "metadata.name",
                "invalid name",
            ),
            (
                SECRET.replace("bramble/v1", "bramble/v0"),
                "apiVersion",
                "unsupported apiVersion",
            ),
            (
                SECRET.replace("pin: 1234", "pin: [1, 2]"),
                "data",
                "expected a mapping",
            ),
        ];
        for (text, field, message) in cases {
            let e = one(&text);
            assert_eq!(e.field, field, "{e}");
            assert!(e.message.contains(message), "{e}");
            assert!(
                !e.message.contains("hunter2") && !e.message.contains("vvvv"),
                "{e}"
            );
        }
        let big = (0..5)
            .map(|i| format!("  k{i}: {}\n", "v".repeat(MAX_SECRET_VALUE_BYTES - 10)))
            .collect::<String>();
        let e = one(&format!("{SECRET}{big}"));
        assert_eq!(e.field, "data");
        assert!(e.message.contains("at most 262144"), "{e}");
    }

    #[test]
    fn bad_references_point_at_the_reference() {
        let cases = [
            ("{secret: ltc-rpc}", "missing field `key`"),
            ("{key: password}", "missing field `secret`"),
            (
                "{secret: ltc-rpc, key: password, x: 1}",
                "unknown field `x`",
            ),
            ("{secret: LTC, key: password}", "invalid name"),
            ("{secret: ltc-rpc, key: 'a b'}", "invalid key"),
            ("[a]", "a {secret, key} reference"),
        ];
        for (value, message) in cases {
            let e = one(&REF.replace("{secret: ltc-rpc, key: password}", value));
            assert!(e.field.starts_with("spec.env.RPC_PASSWORD"), "{value}: {e}");
            assert!(e.message.contains(message), "{value}: {e}");
            assert_eq!(e.line, 8, "{value}: {e}");
        }
    }

    #[test]
    fn a_secret_name_is_given_once_per_apply() {
        let errors = parse_sources(&[
            Source {
                name: "a.yaml".into(),
                content: SECRET.into(),
            },
            Source {
                name: "b.yaml".into(),
                content: SECRET.into(),
            },
        ])
        .expect_err("duplicate");
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .message
                .contains("duplicate Secret \"ltc-rpc\": already defined at a.yaml:1"),
            "{}",
            errors[0]
        );
        // A Secret and a workload may share a name: they are reached differently.
        let same = REF.replace("name: ltc}", "name: ltc-rpc}");
        assert!(parse_manifests("x.yaml", &format!("{SECRET}---\n{same}")).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,200}") {
            let _ = parse_manifests("p.yaml", &s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000)) {
            let _ = parse_manifests("p.yaml", &String::from_utf8_lossy(&bytes));
        }

        /// Text made of YAML's own punctuation reaches far more of the parser than
        /// random characters do.
        #[test]
        fn yaml_punctuation_never_panics_and_errors_point_into_the_text(
            s in "([-\\[\\]{}:,?&*!|>'\"#%@` \\t\\n\\r\\\\.~]|a|1|&a|\\*a|!!str|---|\\.\\.\\.){0,300}"
        ) {
            if let Err(errors) = parse_manifests("p.yaml", &s) {
                // YAML breaks lines at \n, \r\n and a lone \r.
                let lines = s.replace("\r\n", "\n").split(['\n', '\r']).count();
                for e in errors {
                    proptest::prop_assert!(
                        (1..=lines).contains(&e.line) && e.column >= 1,
                        "{e} is outside the {lines} lines of {s:?}"
                    );
                }
            }
        }

        #[test]
        fn a_manifest_with_random_edits_never_panics(
            edits in proptest::collection::vec((0..GOOD.len(), "[-\\[\\]{}:,&*!|>'\"# \\t\\na]{0,3}"), 1..6)
        ) {
            let mut text = GOOD.to_string();
            for (at, insert) in edits {
                let at = at.min(text.len());
                if text.is_char_boundary(at) {
                    text.insert_str(at, &insert);
                }
            }
            let _ = parse_manifests("p.yaml", &text);
        }
    }
}
