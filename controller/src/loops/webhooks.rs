//! Notifications: events POSTed as JSON to webhooks, so the operator is told when
//! something could not heal itself.
//!
//! # Configuration
//!
//! `webhooks.yaml` in the controller's data directory (read at start; absent means no
//! webhooks):
//!
//! ```yaml
//! - name: ops                      # DNS-label style, unique
//!   url: https://10.0.0.5:9000/hook # https:// (or http:// on a trusted network)
//!   events: [Warning, Missed]      # reasons or severities; empty = every Warning event;
//!                                  # "*" = every event
//!   secretFile: ops.secret         # optional; relative to the data directory
//!   caFile: receiver-ca.pem        # optional: trust only this CA (PEM) for this
//!                                  # receiver, instead of the system's CAs
//! ```
//!
//! # Delivery
//!
//! Each matching event is POSTed as a [`WebhookPayload`] with `Content-Type:
//! application/json`, `X-Bramble-Event: <reason>`, `X-Bramble-Delivery: <event seq>` and,
//! with a secret, `X-Bramble-Signature: sha256=<hex HMAC-SHA256 of the body>` (verify it
//! over the raw body bytes, in constant time). A receiver that answers 2xx has it; 408,
//! 429, 5xx, a timeout (5 s) or no connection is retried after 1, 2, 4 and 8 s (five
//! tries in all); any other answer is a permanent failure. Redirects are not followed
//! (a 3xx is a permanent failure): an event and its signature go to the configured
//! receiver only.
//!
//! Every webhook has its own worker and a bounded queue ([`QUEUE`]): a slow or dead
//! receiver delays only its own deliveries, never the controller or other webhooks.
//! When its queue is full, new events for it are dropped and counted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bramble_api::backoff::Backoff;
use bramble_api::rest::{Event, Severity, WebhookPayload, WebhookTestResponse, WebhookView};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use tokio::sync::{broadcast, mpsc, watch};

use crate::core::DomainError;
use crate::state::State;

/// The configuration file's name in the data directory.
pub const FILE: &str = "webhooks.yaml";

/// Deliveries waiting per webhook before new ones are dropped.
pub const QUEUE: usize = 64;

/// Tries per delivery, the first included.
pub const MAX_TRIES: u32 = 5;

/// Wait before the first retry; doubled for each further one.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);

/// How long one try may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A bad `webhooks.yaml`: reported at start, before the controller serves.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file (or a secret file) cannot be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not valid YAML for the format.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A webhook entry is unusable.
    #[error("{path}: webhook {name:?}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The webhook.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// One entry of `webhooks.yaml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Entry {
    /// Name.
    pub name: String,
    /// Receiver URL.
    pub url: String,
    /// Reasons or severities; empty means every Warning event.
    #[serde(default)]
    pub events: Vec<String>,
    /// File holding the signing secret.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// PEM file of the CA to trust for an https receiver (default: the system's CAs).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Delivery counters and the last failure.
#[derive(Debug, Default)]
struct Stats {
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    queued: AtomicU64,
    last: Mutex<(Option<String>, Option<DateTime<Utc>>)>,
}

/// A configured webhook.
#[derive(Debug)]
pub struct Hook {
    /// Name.
    pub name: String,
    /// Receiver URL.
    pub url: String,
    /// Event filter.
    pub events: Vec<String>,
    secret: Option<Vec<u8>>,
    /// PEM of the only CA trusted for this receiver.
    ca: Option<Vec<u8>>,
    client: OnceLock<reqwest::Client>,
    stats: Stats,
}

impl Hook {
    /// A webhook without a secret (tests, or receivers that do not check).
    pub fn new(name: &str, url: &str, events: Vec<String>, secret: Option<Vec<u8>>) -> Hook {
        Hook {
            name: name.to_string(),
            url: url.to_string(),
            events,
            secret,
            ca: None,
            client: OnceLock::new(),
            stats: Stats::default(),
        }
    }

    /// Trusts only the CA in `pem` for this receiver.
    pub fn with_ca(mut self, pem: Vec<u8>) -> Hook {
        self.ca = Some(pem);
        self
    }

    fn view(&self, redact: bool) -> WebhookView {
        let last = self.stats.last.lock().unwrap_or_else(|e| e.into_inner());
        WebhookView {
            name: self.name.clone(),
            url: if redact {
                redact_url(&self.url)
            } else {
                self.url.clone()
            },
            events: self.events.clone(),
            signed: self.secret.is_some(),
            sent: self.stats.sent.load(Ordering::Relaxed),
            failed: self.stats.failed.load(Ordering::Relaxed),
            dropped: self.stats.dropped.load(Ordering::Relaxed),
            queued: self.stats.queued.load(Ordering::Relaxed),
            last_error: last.0.clone(),
            last_sent_at: last.1,
        }
    }

    fn failed(&self, why: String) {
        tracing::warn!(webhook = %self.name, error = %why, "webhook delivery failed");
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        self.stats.last.lock().unwrap_or_else(|e| e.into_inner()).0 = Some(why);
    }

    fn sent(&self) {
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        self.stats.last.lock().unwrap_or_else(|e| e.into_inner()).1 = Some(Utc::now());
    }
}

/// Only scheme, host and port: webhook URLs often carry a token in their path.
fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            // Credentials in the authority go too.
            let host = host.rsplit('@').next().unwrap_or(host);
            format!("{scheme}://{host}/…")
        }
        None => "…".to_string(),
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-')
}

/// Parses and checks `webhooks.yaml` (`path` for messages; secret files relative to
/// `base`).
pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Vec<Hook>, ConfigError> {
    let entries: Vec<Entry> = if text.trim().is_empty() {
        Vec::new()
    } else {
        serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: match e.location() {
                Some(l) => format!("line {}, column {}: {e}", l.line(), l.column()),
                None => e.to_string(),
            },
        })?
    };
    let invalid = |name: &str, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        name: name.to_string(),
        message,
    };
    let mut hooks: Vec<Hook> = Vec::with_capacity(entries.len());
    for e in entries {
        if !valid_name(&e.name) {
            return Err(invalid(
                &e.name,
                "name must be 1-63 lowercase letters, digits and '-'".into(),
            ));
        }
        if hooks.iter().any(|h| h.name == e.name) {
            return Err(invalid(&e.name, "name used twice".into()));
        }
        let host = e
            .url
            .strip_prefix("https://")
            .or_else(|| e.url.strip_prefix("http://"))
            .unwrap_or("");
        if host.is_empty() || host.starts_with('/') || host.contains(char::is_whitespace) {
            return Err(invalid(
                &e.name,
                format!("url {:?}: expected https://HOST[:PORT]/PATH", e.url),
            ));
        }
        if e.url.starts_with("http://") {
            tracing::warn!(webhook = %e.name, "webhook url is plain http://: events and signatures cross the network in clear");
        }
        let ca = match &e.ca_file {
            None => None,
            Some(f) => {
                let p = base.join(f);
                let pem = std::fs::read(&p).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?;
                bramble_tls::certificates(&pem)
                    .map_err(|err| invalid(&e.name, format!("caFile {}: {err}", p.display())))?;
                Some(pem)
            }
        };
        let secret = match &e.secret_file {
            None => None,
            Some(f) => {
                let p = base.join(f);
                let s = std::fs::read_to_string(&p).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?;
                let s = s.trim_end_matches(['\n', '\r']).to_string();
                if s.is_empty() {
                    return Err(invalid(
                        &e.name,
                        format!("secret file {} is empty", p.display()),
                    ));
                }
                Some(s.into_bytes())
            }
        };
        if secret.is_none() {
            tracing::warn!(webhook = %e.name, "webhook has no secretFile: deliveries are not signed");
        }
        let mut hook = Hook::new(&e.name, &e.url, e.events, secret);
        if let Some(pem) = ca {
            hook = hook.with_ca(pem);
        }
        hooks.push(hook);
    }
    Ok(hooks)
}

/// Reads `webhooks.yaml` from the data directory; none when it does not exist.
pub fn load(data_dir: &Path) -> Result<Vec<Hook>, ConfigError> {
    let path = data_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text, &path, data_dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(ConfigError::Read { path, source }),
    }
}

/// Whether a webhook with `filter` receives `e`: a filter item names a reason or a
/// severity (any case), `*` every event; an empty filter means every Warning event.
pub fn matches(filter: &[String], e: &Event) -> bool {
    let severity = match e.severity {
        Severity::Normal => "Normal",
        Severity::Warning => "Warning",
    };
    if filter.is_empty() {
        return e.severity == Severity::Warning;
    }
    filter
        .iter()
        .any(|f| f == "*" || f.eq_ignore_ascii_case(&e.reason) || f.eq_ignore_ascii_case(severity))
}

/// `sha256=` and the hex HMAC-SHA256 of `body` keyed with `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + tag.len() * 2);
    out.push_str("sha256=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The wait after failed try number `tries` (1-based) before the next, doubling from
/// `first`; `None` once [`MAX_TRIES`] have been made.
pub fn retry_delay(tries: u32, first: Duration) -> Option<Duration> {
    (1..MAX_TRIES)
        .contains(&tries)
        .then(|| Backoff::new(first, Duration::MAX).delay(tries))
}

/// Whether an answer is worth another try: the receiver is overloaded or broken, not
/// refusing this delivery.
pub fn retryable(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

/// The webhooks and their HTTP client.
#[derive(Default)]
pub struct Webhooks {
    hooks: OnceLock<Vec<Arc<Hook>>>,
    first_retry: OnceLock<Duration>,
}

impl Webhooks {
    /// Sets the webhooks (once, at start; later calls are ignored).
    pub fn configure(&self, hooks: Vec<Hook>) {
        let _ = self.hooks.set(hooks.into_iter().map(Arc::new).collect());
    }

    /// Shortens the retry schedule (tests).
    pub fn set_first_retry(&self, first: Duration) {
        let _ = self.first_retry.set(first);
    }

    fn first_retry(&self) -> Duration {
        self.first_retry.get().copied().unwrap_or(FIRST_RETRY)
    }

    fn hooks(&self) -> &[Arc<Hook>] {
        self.hooks.get().map_or(&[], Vec::as_slice)
    }

    /// The hook's HTTP client: no redirects, its own CA if it has one.
    fn client<'a>(&self, hook: &'a Hook) -> &'a reqwest::Client {
        hook.client.get_or_init(|| {
            crate::install_tls_provider();
            let mut b = reqwest::Client::builder()
                .timeout(TIMEOUT)
                .connect_timeout(Duration::from_secs(3))
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("bramble-controller/", env!("CARGO_PKG_VERSION")));
            if let Some(pem) = &hook.ca {
                match reqwest::Certificate::from_pem_bundle(pem) {
                    Ok(certs) => b = b.tls_certs_only(certs),
                    Err(e) => {
                        tracing::error!(webhook = %hook.name, error = %e, "unusable caFile; deliveries will fail")
                    }
                }
            }
            b.build().unwrap_or_else(|e| {
                tracing::error!(webhook = %hook.name, error = %e, "cannot build the webhook client");
                // Still never a client that follows redirects.
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .unwrap_or_default()
            })
        })
    }

    /// Views of every webhook; `redact` hides URL paths (for viewer tokens).
    pub fn views(&self, redact: bool) -> Vec<WebhookView> {
        self.hooks().iter().map(|h| h.view(redact)).collect()
    }

    /// (webhook, result, count) for `/metrics`.
    pub fn counters(&self) -> Vec<(String, &'static str, u64)> {
        self.hooks()
            .iter()
            .flat_map(|h| {
                [
                    ("sent", h.stats.sent.load(Ordering::Relaxed)),
                    ("failed", h.stats.failed.load(Ordering::Relaxed)),
                    ("dropped", h.stats.dropped.load(Ordering::Relaxed)),
                ]
                .map(|(r, n)| (h.name.clone(), r, n))
            })
            .collect()
    }

    /// One try: the receiver's status, or why there was none.
    async fn post(&self, hook: &Hook, event: &Event, body: Vec<u8>) -> Result<u16, String> {
        let mut req = self
            .client(hook)
            .post(&hook.url)
            .header("content-type", "application/json")
            .header("x-bramble-event", &event.reason)
            .header("x-bramble-delivery", event.seq.to_string());
        if let Some(secret) = &hook.secret {
            req = req.header("x-bramble-signature", sign(secret, &body));
        }
        match req.body(body).send().await {
            Ok(r) => Ok(r.status().as_u16()),
            Err(e) => Err(crate::core::error::chain(&e)),
        }
    }

    /// Delivers one event with retries; counts the outcome.
    async fn deliver(&self, hook: &Hook, event: &Event) {
        let body = payload(hook, event, false);
        let mut tries = 0;
        loop {
            tries += 1;
            let why = match self.post(hook, event, body.clone()).await {
                Ok(s) if (200..300).contains(&s) => {
                    hook.sent();
                    return;
                }
                Ok(s) if !retryable(s) => {
                    return hook.failed(format!("event {}: the receiver answered {s}", event.seq));
                }
                Ok(s) => format!("the receiver answered {s}"),
                Err(e) => e,
            };
            match retry_delay(tries, self.first_retry()) {
                Some(d) => {
                    tracing::debug!(webhook = %hook.name, tries, retry_in = ?d, error = %why, "webhook delivery failed; retrying");
                    tokio::time::sleep(d).await;
                }
                None => {
                    return hook.failed(format!(
                        "event {}: {why} (gave up after {tries} tries)",
                        event.seq
                    ));
                }
            }
        }
    }

    /// Sends a test event to one webhook now, once, and reports the answer.
    pub async fn test(&self, name: &str) -> Result<WebhookTestResponse, DomainError> {
        let hook = self
            .hooks()
            .iter()
            .find(|h| h.name == name)
            .cloned()
            .ok_or_else(|| DomainError::not_found("webhook", name))?;
        let event = Event {
            seq: 0,
            at: Utc::now(),
            severity: Severity::Warning,
            object: format!("webhook/{name}"),
            reason: "Test".into(),
            message: "a test event from bramble-controller".into(),
        };
        let start = Instant::now();
        let answer = self.post(&hook, &event, payload(&hook, &event, true)).await;
        let elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(match answer {
            Ok(s) => WebhookTestResponse {
                name: name.to_string(),
                ok: (200..300).contains(&s),
                status: Some(s),
                error: (!(200..300).contains(&s)).then(|| format!("the receiver answered {s}")),
                elapsed_ms,
            },
            Err(e) => WebhookTestResponse {
                name: name.to_string(),
                ok: false,
                status: None,
                error: Some(e),
                elapsed_ms,
            },
        })
    }
}

fn payload(hook: &Hook, event: &Event, test: bool) -> Vec<u8> {
    serde_json::to_vec(&WebhookPayload {
        webhook: hook.name.clone(),
        test,
        event: event.clone(),
    })
    .unwrap_or_default()
}

/// Hands each new event to the workers of the webhooks it matches, while this
/// controller leads (so an event is delivered once, not once per controller); a full
/// queue drops it for that webhook (counted). Ends on `stop`.
pub async fn run(state: Arc<State>, webhooks: Arc<Webhooks>, mut stop: watch::Receiver<bool>) {
    let hooks: Vec<Arc<Hook>> = webhooks.hooks().to_vec();
    if hooks.is_empty() {
        return;
    }
    let mut events = state.subscribe_events();
    let mut queues = Vec::with_capacity(hooks.len());
    let mut workers = Vec::with_capacity(hooks.len());
    for h in &hooks {
        let (tx, mut rx) = mpsc::channel::<Event>(QUEUE);
        let (w, h2) = (Arc::clone(&webhooks), Arc::clone(h));
        workers.push(tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                h2.stats.queued.fetch_sub(1, Ordering::Relaxed);
                w.deliver(&h2, &e).await;
            }
        }));
        queues.push((Arc::clone(h), tx));
    }
    tracing::info!(webhooks = hooks.len(), "webhooks ready");
    loop {
        let e = tokio::select! {
            _ = stop.changed() => break,
            e = events.recv() => e,
        };
        match e {
            Ok(e) => {
                if !state.is_leading() {
                    continue;
                }
                for (h, tx) in &queues {
                    if !matches(&h.events, &e) {
                        continue;
                    }
                    h.stats.queued.fetch_add(1, Ordering::Relaxed);
                    if tx.try_send(e.clone()).is_err() {
                        h.stats.queued.fetch_sub(1, Ordering::Relaxed);
                        h.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(webhook = %h.name, seq = e.seq, "webhook queue full; event dropped");
                    }
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                // Which of the missed events matched is unknown: count them for all.
                for (h, _) in &queues {
                    h.stats.dropped.fetch_add(n, Ordering::Relaxed);
                }
                tracing::warn!(missed = n, "webhooks fell behind the event log");
            }
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    // Queued deliveries are abandoned at shutdown: the controller must stop promptly.
    for w in workers {
        w.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(reason: &str, severity: Severity) -> Event {
        Event {
            seq: 7,
            at: DateTime::UNIX_EPOCH,
            severity,
            object: "node/pi1".into(),
            reason: reason.into(),
            message: String::new(),
        }
    }

    #[test]
    fn signs_like_github_webhooks() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(
            sign(b"other", b"what do ya want for nothing?"),
            sign(b"Jefe", b"what do ya want for nothing?")
        );
    }

    #[test]
    fn retries_after_one_two_four_eight_seconds_then_gives_up() {
        let s = Duration::from_secs(1);
        let schedule: Vec<Option<Duration>> = (1..=6).map(|t| retry_delay(t, s)).collect();
        assert_eq!(
            schedule,
            [
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(2)),
                Some(Duration::from_secs(4)),
                Some(Duration::from_secs(8)),
                None,
                None
            ]
        );
        assert_eq!(retry_delay(0, s), None);
        for (status, again) in [
            (500, true),
            (503, true),
            (429, true),
            (408, true),
            (404, false),
            (400, false),
            (301, false),
        ] {
            assert_eq!(retryable(status), again, "{status}");
        }
    }

    #[test]
    fn filters_by_reason_or_severity() {
        let none: Vec<String> = vec![];
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let table = [
            (none.clone(), event("NodeDead", Severity::Warning), true),
            (none.clone(), event("Started", Severity::Normal), false),
            (w(&["Missed"]), event("Missed", Severity::Warning), true),
            (w(&["missed"]), event("Missed", Severity::Warning), true),
            (w(&["Missed"]), event("NodeDead", Severity::Warning), false),
            (w(&["normal"]), event("Started", Severity::Normal), true),
            (
                w(&["Warning", "Fired"]),
                event("Fired", Severity::Normal),
                true,
            ),
            (w(&["*"]), event("Started", Severity::Normal), true),
        ];
        for (filter, e, want) in table {
            assert_eq!(matches(&filter, &e), want, "{filter:?} {}", e.reason);
        }
    }

    #[test]
    fn reads_and_checks_the_config_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ops.secret"), "s3cret\n").expect("secret");
        let path = dir.path().join(FILE);
        let ok = "- name: ops\n  url: http://127.0.0.1:9/hook\n  events: [Warning, Missed]\n  secretFile: ops.secret\n- name: all\n  url: http://h/x\n";
        let hooks = parse(ok, &path, dir.path()).expect("valid");
        assert_eq!(hooks.len(), 2);
        assert_eq!(hooks[0].secret.as_deref(), Some(&b"s3cret"[..]));
        assert!(hooks[1].secret.is_none() && hooks[1].events.is_empty());
        assert!(parse("", &path, dir.path()).expect("empty").is_empty());

        let bad = [
            ("- name: Ops\n  url: http://h/\n", "lowercase"),
            (
                "- name: a\n  url: http://h/\n- name: a\n  url: http://h/\n",
                "twice",
            ),
            ("- name: a\n  url: ftp://h/\n", "expected https://"),
            (
                "- name: a\n  url: https://h/\n  caFile: missing.pem\n",
                "reading",
            ),
            (
                "- name: a\n  url: http://h/\n  secretFile: missing\n",
                "reading",
            ),
            (
                "- name: a\n  url: http://h/\n  colour: red\n",
                "unknown field",
            ),
            ("- name: a\n  url: [\n", "line"),
        ];
        for (text, want) in bad {
            let err = match parse(text, &path, dir.path()) {
                Ok(_) => panic!("{text:?} must be refused"),
                Err(e) => format!("{e}: {}", e.source_text()),
            };
            assert!(err.contains(want), "{text:?}: {err}");
        }
        assert!(load(dir.path()).expect("no file is fine").is_empty());
    }

    impl ConfigError {
        fn source_text(&self) -> String {
            std::error::Error::source(self)
                .map(ToString::to_string)
                .unwrap_or_default()
        }
    }

    #[test]
    fn viewers_see_no_url_paths() {
        assert_eq!(
            redact_url("http://10.0.0.5:9000/hooks/T0K3N?x=1"),
            "http://10.0.0.5:9000/…"
        );
        assert_eq!(redact_url("http://user:pw@h/x"), "http://h/…");
        assert_eq!(redact_url("nonsense"), "…");
    }
}
