//! End-to-end tests of the `bramblectl` binary against a stub controller: a
//! `std::net::TcpListener` on 127.0.0.1:0 serving TLS (a certificate from a test CA,
//! which the binary is told to pin) and answering canned JSON in the shapes of
//! `bramble_api::rest`, recording every request it gets.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bramble_api::rest::{ApplyResponse, CronJobView, DrainResponse, Event, NodeView, WorkloadView};
use bramble_api::task::Task;

/// One request as the stub saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// Path and query.
    target: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A canned answer's body.
#[derive(Clone)]
enum Body {
    /// Sent whole, with its length.
    Whole(String),
    /// Sent piece by piece, the connection closed after the last; each piece after the
    /// first waits until the test says go, and the stream ends early if it never does.
    Stream(Vec<String>, Arc<Mutex<mpsc::Receiver<()>>>),
}

/// A canned answer: method, path with query, status, body.
type Route = (&'static str, String, u16, Body);

/// How long a test waits for the binary before failing.
const PATIENCE: Duration = Duration::from_secs(10);

/// The stubs' TLS: a CA, a server certificate for 127.0.0.1 signed by it, and the CA's
/// fingerprint bramblectl is told to pin.
struct StubTls {
    server: Arc<rustls::ServerConfig>,
    ca: String,
    ca_pem: String,
}

fn stub_tls() -> &'static StubTls {
    static TLS: std::sync::OnceLock<StubTls> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        bramble_tls::install_provider();
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        let chain = vec![leaf.der().clone(), ca_cert.der().clone()];
        let key_der =
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .expect("server config");
        StubTls {
            server: Arc::new(server),
            ca: bramble_tls::fingerprint(ca_cert.der()).to_string(),
            ca_pem: ca_cert.pem(),
        }
    })
}

/// A stub controller; stopped and joined on drop.
struct Stub {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Stub {
    fn start(routes: Vec<Route>) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let addr = listener.local_addr().expect("bound address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (seen, routes) = (seen.clone(), routes.clone());
                    // One thread per connection, so `logs --all` can hold several open.
                    std::thread::spawn(move || {
                        let Ok(tls) = rustls::ServerConnection::new(stub_tls().server.clone())
                        else {
                            return;
                        };
                        serve(rustls::StreamOwned::new(tls, conn), &routes, &seen)
                    });
                }
            })
        };
        Stub {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Tls = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

fn serve(mut conn: Tls, routes: &[Route], seen: &Mutex<Vec<Seen>>) {
    let mut reader = BufReader::new(&mut conn);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return; // the drop guard's wake-up connection
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).expect("read body");
    drop(reader);
    let req = Seen {
        method,
        target,
        headers,
        body: String::from_utf8(body).expect("utf-8 body"),
    };
    seen.lock().expect("not poisoned").push(req.clone());
    let (status, body) = routes
        .iter()
        .find(|(m, t, _, _)| *m == req.method && *t == req.target)
        .map(|(_, _, s, b)| (*s, b.clone()))
        .unwrap_or_else(|| {
            (
                404,
                Body::Whole(format!(
                    r#"{{"code":"not_found","message":"nothing at {}"}}"#,
                    req.target
                )),
            )
        });
    let content_type = if req.target.contains("/logs") {
        "text/plain; charset=utf-8"
    } else if req.target.contains("watch=true") {
        "application/x-ndjson"
    } else {
        "application/json"
    };
    match body {
        Body::Whole(body) => {
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.flush();
            conn.conn.send_close_notify();
            let _ = conn.flush();
        }
        Body::Stream(pieces, go) => {
            // No length: the body ends when the connection closes.
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\nconnection: close\r\n\r\n"
            );
            for (i, piece) in pieces.iter().enumerate() {
                if i > 0
                    && go
                        .lock()
                        .expect("not poisoned")
                        .recv_timeout(PATIENCE)
                        .is_err()
                {
                    return;
                }
                let _ = conn.write_all(piece.as_bytes());
                let _ = conn.flush();
            }
            // The body ends with the connection: end TLS cleanly, so it is not a cut.
            conn.conn.send_close_notify();
            let _ = conn.flush();
        }
    }
}

fn route(method: &'static str, target: &str, status: u16, body: &str) -> Route {
    (
        method,
        target.to_string(),
        status,
        Body::Whole(body.to_string()),
    )
}

/// A `GET` answered 200 with `pieces` one by one: send on the sender to let the next go.
fn streamed(target: &str, pieces: &[String]) -> (Route, mpsc::Sender<()>) {
    let (tx, rx) = mpsc::channel();
    let body = Body::Stream(pieces.to_vec(), Arc::new(Mutex::new(rx)));
    (("GET", target.to_string(), 200, body), tx)
}

/// Runs bramblectl with a private config file and none of the caller's BRAMBLE_*.
struct Run {
    dir: tempfile::TempDir,
}

impl Run {
    fn new() -> Run {
        Run {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir
            .path()
            .join("home")
            .join(".bramble")
            .join("config.yaml")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bramblectl"));
        c.args(args)
            .env("HOME", self.dir.path().join("home"))
            .env_remove("BRAMBLE_CONFIG")
            .env_remove("BRAMBLE_SERVER")
            .env_remove("BRAMBLE_TOKEN")
            .env_remove("BRAMBLE_CONTEXT")
            .env_remove("RUST_BACKTRACE")
            // The stubs' CA, pinned as `bramblectl login` would.
            .env("BRAMBLE_CA_FINGERPRINT", &stub_tls().ca)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Result {
        Result::from(self.cmd(args).output().expect("bramblectl runs"))
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(p.parent().expect("has parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
        p
    }
}

#[derive(Debug)]
struct Result {
    code: i32,
    stdout: String,
    stderr: String,
}

impl From<Output> for Result {
    fn from(o: Output) -> Self {
        Result {
            code: o.status.code().expect("exited, not killed"),
            stdout: String::from_utf8(o.stdout).expect("utf-8 stdout"),
            stderr: String::from_utf8(o.stderr).expect("utf-8 stderr"),
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

const SERVICE: &str = "apiVersion: bramble/v1
kind: Service
metadata:
  name: hello
spec:
  image: nginx:1
  replicas: 2
";

const WALLET: &str = "apiVersion: bramble/v1
kind: Wallet
metadata:
  name: ltc-wallet
spec:
  image: pool/litecoind:0.21
  resources: {cpu: 500m, memory: 256Mi}
";

const BAD_WALLET: &str = "apiVersion: bramble/v1
kind: Wallet
metadata:
  name: ltc-wallet
spec:
  image: pool/litecoind:0.21
  resources: {cpu: lots}
";

const APPLIED: &str = r#"{"results":[
  {"kind":"Service","name":"hello","outcome":"created"},
  {"kind":"Wallet","name":"ltc-wallet","outcome":"unchanged"}]}"#;

const NODES: &str = r#"[
 {"info":{"name":"pi-2","arch":"arm","cores":4,"memoryBytes":1073741824,"dockerVersion":"20.10.24","labels":{},"agentVersion":"0.1.0","os":"Raspbian GNU/Linux 11"},
  "status":"NotReady","cordoned":false,"tasks":0,"allocatedCpuMillis":0,"allocatedMemoryBytes":0,"registeredAt":"2020-01-01T00:00:00Z"},
 {"info":{"name":"pi-1","arch":"arm64","cores":4,"memoryBytes":1073741824,"dockerVersion":"24.0.5","labels":{"disk":"ssd"},"agentVersion":"0.1.0","os":"Debian GNU/Linux 12 (bookworm)"},
  "status":"Ready","cordoned":true,"lastSeen":"2020-01-01T00:00:00Z",
  "metrics":{"at":"2020-01-01T00:00:00Z","cpuPercent":12.5,"memoryUsedBytes":268435456,"memoryTotalBytes":1073741824,"load1":0.5},
  "tasks":1,"allocatedCpuMillis":500,"allocatedMemoryBytes":268435456,"address":"10.0.0.11:50000","registeredAt":"2020-01-01T00:00:00Z"}
]"#;

const WALLET_VIEW: &str = r#"{"manifest":{"apiVersion":"bramble/v1","kind":"Wallet","metadata":{"name":"ltc-wallet"},"spec":{"image":"pool/litecoind:0.21"}},
  "generation":1,"desired":1,"running":1,"createdAt":"2020-01-01T00:00:00Z","updatedAt":"2020-01-01T00:00:00Z"}"#;

const SERVICE_VIEW: &str = r#"{"manifest":{"apiVersion":"bramble/v1","kind":"Service","metadata":{"name":"hello","labels":{"app":"web"}},"spec":{"image":"nginx:1","replicas":2}},
  "generation":3,"desired":2,"running":1,"createdAt":"2020-01-01T00:00:00Z","updatedAt":"2020-01-01T00:00:00Z"}"#;

/// Canned JSON with its times moved to five days ago, so AGE columns read `5d`.
fn aged_5d(json: &str) -> String {
    let t = (chrono::Utc::now() - chrono::TimeDelta::days(5)).to_rfc3339();
    json.replace("2020-01-01T00:00:00Z", &t)
}

const RESTART: &str =
    r#"{"policy":"Always","backoff":{"initial":"1s","max":"5m"},"maxFailures":5,"window":"10m"}"#;

fn task_json(
    id: &str,
    replica: u32,
    phase: &str,
    node: Option<&str>,
    message: Option<&str>,
) -> String {
    let node = node.map_or(String::new(), |n| format!(r#""node":"{n}","#));
    let message = message.map_or(String::new(), |m| format!(r#""message":"{m}","#));
    format!(
        r#"{{"id":"{id}","kind":"Service","workload":"hello","replica":{replica},"specHash":"abcdef0123456789",
  "spec":{{"image":"nginx:1","restart":{RESTART}}},{node}"desired":"Running","phase":"{phase}",{message}
  "restarts":0,"createdAt":"2020-01-01T00:00:00Z"}}"#
    )
}

fn tasks_json() -> String {
    format!(
        "[{},{}]",
        task_json("hello-abcdef-0", 0, "Running", Some("pi-1"), None),
        task_json(
            "hello-abcdef-1",
            1,
            "Pending",
            None,
            Some("no node fits: pi-2: not ready")
        )
    )
}

/// pi-1 of [`NODES`], alone.
fn node_pi1() -> String {
    NODES
        .split_once("},\n {")
        .map(|(_, b)| format!("{{{}", b.trim_end().trim_end_matches(']')))
        .expect("two nodes")
}

/// An event that happened `ago` before now.
fn event_json(
    seq: u64,
    ago: chrono::TimeDelta,
    severity: &str,
    object: &str,
    reason: &str,
    message: &str,
) -> String {
    let at = (chrono::Utc::now() - ago).to_rfc3339();
    format!(
        r#"{{"seq":{seq},"at":"{at}","severity":"{severity}","object":"{object}","reason":"{reason}","message":"{message}"}}"#
    )
}

fn hours(h: i64) -> chrono::TimeDelta {
    chrono::TimeDelta::hours(h)
}

#[test]
fn canned_answers_follow_the_api_types() {
    serde_json::from_str::<ApplyResponse>(APPLIED).expect("apply response");
    serde_json::from_str::<Vec<NodeView>>(NODES).expect("nodes");
    serde_json::from_str::<Vec<WorkloadView>>(&format!("[{WALLET_VIEW},{SERVICE_VIEW}]"))
        .expect("workloads");
    serde_json::from_str::<Vec<Task>>(&tasks_json()).expect("tasks");
    serde_json::from_str::<Event>(&event_json(
        1,
        hours(1),
        "Warning",
        "node/pi-1",
        "NodeDead",
        "x",
    ))
    .expect("event");
    serde_json::from_str::<DrainResponse>(r#"{"node":"pi-1","moved":2,"remaining":0}"#)
        .expect("drain response");
    serde_json::from_str::<Vec<CronJobView>>(&cronjobs_json()).expect("cronjob views");
    serde_json::from_str::<WorkloadView>(CRONJOB_VIEW).expect("cronjob workload");
    serde_json::from_str::<Vec<Task>>(&cron_runs_json()).expect("cronjob runs");
}

#[test]
fn apply_sends_the_files_and_prints_one_line_per_result() {
    let stub = Stub::start(vec![route("POST", "/v1/apply", 200, APPLIED)]);
    let run = Run::new();
    run.write("m/b-wallet.yaml", WALLET);
    run.write("m/a/service.yml", SERVICE);
    run.write("m/notes.txt", "not a manifest");
    let dir = run.dir.path().join("m");
    let r = run.run(&[
        "apply",
        "-f",
        s(&dir),
        "--server",
        &stub.url(),
        "--token",
        "t0k",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "service/hello created\nwallet/ltc-wallet unchanged\n"
    );
    let seen = stub.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("authorization"), Some("Bearer t0k"));
    let body: serde_json::Value = serde_json::from_str(&seen[0].body).expect("json body");
    assert_eq!(body["dryRun"], false);
    let names: Vec<&str> = body["sources"]
        .as_array()
        .expect("sources")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            s(&dir.join("a").join("service.yml")),
            s(&dir.join("b-wallet.yaml"))
        ]
    );
    assert_eq!(body["sources"][1]["content"], WALLET);
}

#[test]
fn apply_dry_run_says_so() {
    let stub = Stub::start(vec![route("POST", "/v1/apply", 200, APPLIED)]);
    let run = Run::new();
    let f = run.write("all.yaml", &format!("{SERVICE}---\n{WALLET}"));
    let r = run.run(&["apply", "-f", s(&f), "--dry-run", "--server", &stub.url()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "service/hello created (dry run)\nwallet/ltc-wallet unchanged (dry run)\n"
    );
    let body: serde_json::Value = serde_json::from_str(&stub.seen()[0].body).expect("json");
    assert_eq!(body["dryRun"], true);
    assert_eq!(stub.seen()[0].header("authorization"), None);
}

#[test]
fn apply_reads_stdin() {
    let stub = Stub::start(vec![route("POST", "/v1/apply", 200, APPLIED)]);
    let run = Run::new();
    let mut child = run
        .cmd(&["apply", "-f", "-", "--server", &stub.url()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(SERVICE.as_bytes())
        .expect("writes");
    let r = Result::from(child.wait_with_output().expect("waits"));
    assert_eq!(r.code, 0, "{r:?}");
    let body: serde_json::Value = serde_json::from_str(&stub.seen()[0].body).expect("json");
    assert_eq!(body["sources"][0]["name"], "-");
}

#[test]
fn an_invalid_manifest_exits_3_with_its_place_and_sends_nothing() {
    let stub = Stub::start(vec![route("POST", "/v1/apply", 200, APPLIED)]);
    let run = Run::new();
    let good = run.write("good.yaml", SERVICE);
    let bad = run.write("bad.yaml", BAD_WALLET);
    let r = run.run(&[
        "apply",
        "-f",
        s(&good),
        "-f",
        s(&bad),
        "--server",
        &stub.url(),
    ]);
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(r.stdout, "");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stderr);
    let place = format!("{}:7:", s(&bad));
    assert!(lines[0].starts_with(&place), "{}", r.stderr);
    assert!(lines[0].contains(": spec.resources.cpu: "), "{}", r.stderr);
    assert!(lines[0].contains("lots"), "{}", r.stderr);
    assert_eq!(
        lines[1],
        "error: 1 problem in the manifests; nothing was applied"
    );
    assert!(stub.seen().is_empty(), "no request may be made");
}

#[test]
fn a_server_side_rejection_prints_its_details_and_exits_3() {
    let body = r#"{"code":"invalid_manifest","message":"invalid manifest: w.yaml:6:10: spec.image: image not allowed",
      "details":[{"file":"w.yaml","line":6,"column":10,"field":"spec.image","message":"image not allowed"}]}"#;
    let stub = Stub::start(vec![route("POST", "/v1/apply", 422, body)]);
    let run = Run::new();
    let f = run.write("w.yaml", WALLET);
    let r = run.run(&["apply", "-f", s(&f), "--server", &stub.url()]);
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(
        r.stderr,
        "w.yaml:6:10: spec.image: image not allowed\n\
         error: invalid manifest: w.yaml:6:10: spec.image: image not allowed\n"
    );
}

#[test]
fn a_rejected_token_is_one_clear_line() {
    let body = r#"{"code":"unauthorized","message":"missing or invalid bearer token"}"#;
    let stub = Stub::start(vec![route("GET", "/v1/nodes", 401, body)]);
    let run = Run::new();
    let r = run
        .cmd(&["get", "nodes"])
        .env("BRAMBLE_SERVER", stub.url())
        .env("BRAMBLE_TOKEN", "wrong")
        .output();
    let r = Result::from(r.expect("runs"));
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stderr,
        "error: unauthorized: the server rejected the token (set --token, BRAMBLE_TOKEN or a context)\n"
    );
    assert_eq!(stub.seen()[0].header("authorization"), Some("Bearer wrong"));
}

#[test]
fn an_unreachable_server_is_explained() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    }; // closed again: nothing listens there now
    let run = Run::new();
    let server = format!("https://127.0.0.1:{port}");
    let r = run.run(&["get", "workloads", "--server", &server]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(
        r.stderr,
        format!("error: cannot reach the controller at {server}: connection refused (is bramble-controller running? set --server or BRAMBLE_SERVER)\n")
    );
}

#[test]
fn plain_http_is_refused_before_anything_is_sent() {
    let stub = Stub::start(vec![]);
    let run = Run::new();
    let plain = stub.url().replace("https://", "http://");
    let r = run.run(&[
        "get",
        "nodes",
        "--server",
        &plain,
        "--token",
        "secret-admin-token",
    ]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr
            .contains("plain HTTP is refused: the controller serves TLS only; use https://"),
        "{r:?}"
    );
    assert!(stub.seen().is_empty(), "nothing was sent");
}

#[test]
fn a_controller_of_another_ca_gets_no_token() {
    let stub = Stub::start(vec![route("GET", "/v1/nodes", 200, "[]")]);
    let run = Run::new();
    let other = "ab".repeat(32);
    let r = run.run(&[
        "get",
        "nodes",
        "--server",
        &stub.url(),
        "--token",
        "secret-admin-token",
        "--ca-fingerprint",
        &other,
    ]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr
            .contains("is not the one pinned (nothing was sent)"),
        "{r:?}"
    );
    assert!(!r.stderr.contains("secret-admin-token"));
    assert!(
        stub.seen().is_empty(),
        "no request, so no token, reached it"
    );
}

#[test]
fn an_unpinned_controller_is_not_contacted() {
    let stub = Stub::start(vec![route("GET", "/v1/nodes", 200, "[]")]);
    let run = Run::new();
    let r = Result::from(
        run.cmd(&[
            "get",
            "nodes",
            "--server",
            &stub.url(),
            "--token",
            "secret-admin-token",
        ])
        .env_remove("BRAMBLE_CA_FINGERPRINT")
        .output()
        .expect("runs"),
    );
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("is not pinned: run `bramblectl login"),
        "{r:?}"
    );
    assert!(stub.seen().is_empty());
}

#[test]
fn a_ca_file_is_trusted_for_one_call() {
    let stub = Stub::start(vec![route("GET", "/v1/nodes", 200, "[]")]);
    let run = Run::new();
    let ca = run.write("ca.crt", &stub_tls().ca_pem);
    let r = Result::from(
        run.cmd(&[
            "get",
            "nodes",
            "--server",
            &stub.url(),
            "--certificate-authority",
            s(&ca),
        ])
        .env_remove("BRAMBLE_CA_FINGERPRINT")
        .output()
        .expect("runs"),
    );
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn login_pins_the_controllers_ca_in_a_context() {
    let stub = Stub::start(vec![route("GET", "/v1/nodes", 200, "[]")]);
    let run = Run::new();
    let login = |extra: &[&str]| {
        let mut args = vec!["login", stub.url().leak() as &str, "--as", "lab"];
        args.extend_from_slice(extra);
        Result::from(
            run.cmd(&args)
                .env_remove("BRAMBLE_CA_FINGERPRINT")
                .output()
                .expect("runs"),
        )
    };
    // No terminal to ask on: it shows the fingerprint and saves nothing.
    let r = login(&[]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains(&stub_tls().ca),
        "the fingerprint is shown: {r:?}"
    );
    assert!(r.stderr.contains("not saved"), "{r:?}");
    assert!(!run.config_path().exists());
    // The wrong fingerprint: refused.
    let r = login(&["--ca-fingerprint", &"cd".repeat(32)]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("is not the one you gave"), "{r:?}");
    // The right one: saved, with the token.
    let r = login(&[
        "--ca-fingerprint",
        &stub_tls().ca,
        "--token",
        "lab-token-0123456789",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let saved = std::fs::read_to_string(run.config_path()).expect("config written");
    assert!(
        saved.contains(&format!(
            "certificate-authority-fingerprint: {}",
            stub_tls().ca
        )),
        "{saved}"
    );
    // From then on the context alone reaches it.
    let r = Result::from(
        run.cmd(&["get", "nodes", "--context", "lab"])
            .env_remove("BRAMBLE_CA_FINGERPRINT")
            .output()
            .expect("runs"),
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        stub.seen()
            .last()
            .and_then(|q| q.header("authorization").map(str::to_string)),
        Some("Bearer lab-token-0123456789".to_string())
    );
}

#[test]
fn get_nodes_prints_an_aligned_table() {
    let stub = Stub::start(vec![route("GET", "/v1/nodes", 200, &aged_5d(NODES))]);
    let run = Run::new();
    let r = run.run(&["get", "no", "--server", &stub.url()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "NAME   STATUS                     ARCH    CPU(cores)   MEMORY   TASKS   AGE   VERSION\n\
         pi-1   Ready,SchedulingDisabled   arm64   4            1.0Gi    1       5d    0.1.0\n\
         pi-2   NotReady                   arm     4            1.0Gi    0       5d    0.1.0\n"
    );

    let r = run.run(&["get", "nodes", "-o", "wide", "--server", &stub.url()]);
    assert!(r.stdout.lines().next().expect("header").ends_with("VERSION   OS                               DOCKER     CPU%        MEM-USED    MEM-LIMITS   LABELS     ADDRESS           WARNINGS"), "{}", r.stdout);
}

#[test]
fn describe_node_shows_allocation_and_its_tasks() {
    let node = node_pi1();
    let stub = Stub::start(vec![
        route("GET", "/v1/nodes/pi-1", 200, &node),
        route(
            "GET",
            "/v1/tasks?node=pi-1",
            200,
            &format!(
                "[{}]",
                task_json("hello-abcdef-0", 0, "Running", Some("pi-1"), None)
            ),
        ),
    ]);
    let run = Run::new();
    let r = run.run(&["describe", "node", "pi-1", "--server", &stub.url()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        !r.stdout.contains("Events"),
        "a controller without events (404) gets no section:\n{}",
        r.stdout
    );
    for want in [
        "Name:           pi-1\n",
        "Status:         Ready,SchedulingDisabled\n",
        "Allocated:\n  CPU:           500m (13%)\n  Memory:        256Mi (25%)\n",
        "Tasks:\n  NAME             WORKLOAD        STATUS    READY   RESTARTS   AGE",
        "\n  hello-abcdef-0   service/hello   Running   -       0          ",
    ] {
        assert!(r.stdout.contains(want), "missing {want:?} in\n{}", r.stdout);
    }
    let r = run.run(&["describe", "node", "pi-9", "--server", &stub.url()]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "error: node \"pi-9\" not found\n")
    );
}

#[test]
fn describe_a_workload_ends_with_its_own_and_its_tasks_events() {
    let stub = Stub::start(vec![
        route("GET", "/v1/workloads/service/hello", 200, SERVICE_VIEW),
        route("GET", "/v1/tasks?workload=hello", 200, &tasks_json()),
        route(
            "GET",
            "/v1/events?object=service%2Fhello",
            200,
            &format!(
                "[{}]",
                event_json(
                    4,
                    hours(20),
                    "Normal",
                    "service/hello",
                    "Scaled",
                    "2 replicas"
                )
            ),
        ),
        // The controller's prefix match also answers another workload's task.
        route(
            "GET",
            "/v1/events?object=task%2Fhello",
            200,
            &format!(
                "[{},{},{}]",
                event_json(
                    9,
                    hours(4),
                    "Warning",
                    "task/hello-abcdef-0",
                    "ProbeFailed",
                    "liveness: exit 1"
                ),
                event_json(
                    5,
                    hours(5),
                    "Normal",
                    "task/hello-abcdef-0",
                    "Started",
                    "on pi-1"
                ),
                event_json(
                    7,
                    hours(3),
                    "Normal",
                    "task/hello-world-abcdef-0",
                    "Started",
                    "on pi-2"
                ),
            ),
        ),
    ]);
    let run = Run::new();
    let r = run.run(&["describe", "svc/hello", "--server", &stub.url()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.ends_with(
            "Events:\n\
             \x20 Type      Reason        Age    Message\n\
             \x20 ----      ------        ----   -------\n\
             \x20 Normal    Scaled        20h    2 replicas\n\
             \x20 Normal    Started       5h     on pi-1\n\
             \x20 Warning   ProbeFailed   4h     liveness: exit 1\n"
        ),
        "{}",
        r.stdout
    );
}

#[test]
fn describing_every_node_asks_for_events_once() {
    let stub = Stub::start(vec![
        route("GET", "/v1/nodes", 200, NODES),
        route("GET", "/v1/tasks?node=pi-1", 200, "[]"),
        route("GET", "/v1/tasks?node=pi-2", 200, "[]"),
        route(
            "GET",
            "/v1/events",
            200,
            &format!(
                "[{},{}]",
                event_json(1, hours(20), "Normal", "node/pi-1", "NodeBack", "back"),
                event_json(2, hours(5), "Warning", "node/pi-2", "NodeNotReady", "late"),
            ),
        ),
    ]);
    let run = Run::new();
    let r = run.run(&["describe", "nodes", "--server", &stub.url()]);
    assert_eq!(r.code, 0, "{r:?}");
    let (pi1, pi2) = r.stdout.split_once("\nName:").expect("two pages");
    assert!(
        pi1.ends_with("  Normal   NodeBack   20h    back\n"),
        "{pi1}"
    );
    assert!(
        pi2.ends_with("  Warning   NodeNotReady   5h     late\n"),
        "{pi2}"
    );
    let events = stub
        .seen()
        .iter()
        .filter(|s| s.target.starts_with("/v1/events"))
        .count();
    assert_eq!(events, 1);
}

#[test]
fn cordon_and_uncordon_name_the_node() {
    let node = node_pi1();
    let stub = Stub::start(vec![
        route("POST", "/v1/nodes/pi-1/cordon", 200, &node),
        route("POST", "/v1/nodes/pi-1/uncordon", 200, &node),
    ]);
    let run = Run::new();
    let r = run.run(&["cordon", "pi-1", "--server", &stub.url()]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "node/pi-1 cordoned\n", "")
    );
    let r = run.run(&["uncordon", "pi-1", "--server", &stub.url()]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "node/pi-1 uncordoned\n", "")
    );
    let r = run.run(&["cordon", "pi-9", "--server", &stub.url()]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "error: node \"pi-9\" not found\n")
    );
    let targets: Vec<(String, String)> = stub
        .seen()
        .into_iter()
        .map(|s| (s.method, s.target))
        .collect();
    assert_eq!(targets[0], ("POST".into(), "/v1/nodes/pi-1/cordon".into()));
}

#[test]
fn drain_says_how_many_tasks_moved() {
    let stub = Stub::start(vec![route(
        "POST",
        "/v1/nodes/pi-1/drain?timeout=5m",
        200,
        r#"{"node":"pi-1","moved":2,"remaining":0}"#,
    )]);
    let run = Run::new();
    let r = run.run(&["drain", "pi-1", "--server", &stub.url()]);
    // No progress line: stderr is not a terminal here.
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "node/pi-1 drained (2 tasks moved)\n", "")
    );
}

#[test]
fn drain_fails_when_tasks_are_left_after_the_timeout() {
    let stub = Stub::start(vec![route(
        "POST",
        "/v1/nodes/pi-1/drain?timeout=1m30s",
        200,
        r#"{"node":"pi-1","moved":1,"remaining":3}"#,
    )]);
    let run = Run::new();
    let r = run.run(&["drain", "pi-1", "--timeout", "90s", "--server", &stub.url()]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (
            1,
            "",
            "error: node/pi-1: 3 tasks still on the node after 1m30s\n"
        )
    );
}

#[test]
fn events_are_a_table_oldest_first() {
    let stub = Stub::start(vec![
        route(
            "GET",
            "/v1/events",
            200,
            &format!(
                "[{},{}]",
                event_json(
                    8,
                    hours(4),
                    "Warning",
                    "node/pi-2",
                    "NodeNotReady",
                    "no heartbeat for 30s"
                ),
                event_json(
                    3,
                    hours(20),
                    "Normal",
                    "task/hello-abcdef-0",
                    "Scheduled",
                    "on pi-1"
                ),
            ),
        ),
        // The controller's prefix match: node/pi-1 gets node/pi-10's events too.
        route(
            "GET",
            "/v1/events?object=node%2Fpi-1",
            200,
            &format!(
                "[{},{}]",
                event_json(
                    2,
                    hours(5),
                    "Normal",
                    "node/pi-1",
                    "NodeBack",
                    "heartbeats again"
                ),
                event_json(
                    6,
                    hours(3),
                    "Normal",
                    "node/pi-10",
                    "NodeBack",
                    "heartbeats again"
                ),
            ),
        ),
    ]);
    let run = Run::new();
    let r = run.run(&["events", "--server", &stub.url()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "LAST SEEN   TYPE      REASON         OBJECT                MESSAGE\n\
         20h         Normal    Scheduled      task/hello-abcdef-0   on pi-1\n\
         4h          Warning   NodeNotReady   node/pi-2             no heartbeat for 30s\n"
    );

    let r = run.run(&[
        "events",
        "--for",
        "no/pi-1",
        "-o",
        "json",
        "--server",
        &stub.url(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let events: Vec<Event> = serde_json::from_str(&r.stdout).expect("a JSON list of events");
    let objects: Vec<&str> = events.iter().map(|e| e.object.as_str()).collect();
    assert_eq!(objects, ["node/pi-1"]);

    let r = run.run(&["events", "--for", "pods/x", "--server", &stub.url()]);
    assert_eq!(r.code, 2, "{r:?}");
}

#[test]
fn events_watch_prints_each_event_as_it_arrives() {
    let lines = [
        event_json(
            1,
            hours(5),
            "Normal",
            "node/pi-1",
            "NodeBack",
            "heartbeats again",
        ) + "\n",
        event_json(
            2,
            hours(7),
            "Warning",
            "task/hello-abcdef-0",
            "Exited",
            "exit code 137",
        ) + "\n",
    ];
    let (watch, go) = streamed("/v1/events?watch=true", &lines);
    let stub = Stub::start(vec![watch]);
    let run = Run::new();
    let mut child = run
        .cmd(&["events", "--watch", "--server", &stub.url()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.expect("utf-8 line")).is_err() {
                break;
            }
        }
    });
    let next = || rx.recv_timeout(PATIENCE).expect("a line in time");
    assert_eq!(
        next(),
        "LAST SEEN   TYPE      REASON           OBJECT                         MESSAGE"
    );
    assert_eq!(
        next(),
        "5h          Normal    NodeBack         node/pi-1                      heartbeats again"
    );
    // The first row is out while the stream is still open; now let the second come.
    go.send(()).expect("stub waits");
    assert_eq!(
        next(),
        "7h          Warning   Exited           task/hello-abcdef-0            exit code 137"
    );
    let r = Result::from(
        child
            .wait_with_output()
            .expect("exits when the stream ends"),
    );
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
}

#[test]
fn get_tasks_wide_says_why_a_task_is_pending() {
    let stub = Stub::start(vec![route(
        "GET",
        "/v1/tasks?workload=hello",
        200,
        &tasks_json(),
    )]);
    let run = Run::new();
    let r = run.run(&[
        "get",
        "tasks",
        "--workload",
        "hello",
        "-o",
        "wide",
        "--server",
        &stub.url(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    assert!(
        lines[0]
            .starts_with("NAME             WORKLOAD   NODE     PHASE     READY   RESTARTS   AGE"),
        "{}",
        r.stdout
    );
    assert!(
        lines[2].starts_with("hello-abcdef-1   hello      <none>   Pending   -       0          "),
        "{}",
        r.stdout
    );
    assert!(
        lines[2].ends_with("   Service   -      -           no node fits: pi-2: not ready"),
        "{}",
        r.stdout
    );
}

#[test]
fn get_a_missing_task_says_not_found() {
    let stub = Stub::start(vec![]);
    let run = Run::new();
    let r = run.run(&["get", "task", "x", "--server", &stub.url()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.stderr, "error: task \"x\" not found\n");
    assert_eq!(stub.seen()[0].target, "/v1/tasks/x");
}

#[test]
fn get_json_prints_the_full_objects() {
    let stub = Stub::start(vec![
        route(
            "GET",
            "/v1/workloads",
            200,
            &format!("[{WALLET_VIEW},{SERVICE_VIEW}]"),
        ),
        route(
            "GET",
            "/v1/workloads?kind=service",
            200,
            &aged_5d(&format!("[{SERVICE_VIEW}]")),
        ),
        route("GET", "/v1/workloads/wallet/ltc-wallet", 200, WALLET_VIEW),
    ]);
    let run = Run::new();
    let r = run.run(&["get", "workloads", "-o", "json", "--server", &stub.url()]);
    assert_eq!(r.code, 0, "{r:?}");
    let v: Vec<WorkloadView> = serde_json::from_str(&r.stdout).expect("a JSON list of workloads");
    assert_eq!(v.len(), 2);
    assert_eq!(
        v[0].manifest.metadata.name.as_str(),
        "hello",
        "sorted by kind, then name"
    );

    let r = run.run(&[
        "get",
        "wallet/ltc-wallet",
        "-o",
        "json",
        "--server",
        &stub.url(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let one: WorkloadView = serde_json::from_str(&r.stdout).expect("one JSON object");
    assert_eq!(one.generation, 1);

    let r = run.run(&["get", "services", "nope", "--server", &stub.url()]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "error: service \"nope\" not found\n")
    );

    let r = run.run(&["get", "svc", "--server", &stub.url()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "KIND      NAME    DESIRED   RUNNING   IMAGE     AGE\n\
         Service   hello   2         1         nginx:1   5d\n"
    );
}

#[test]
fn unknown_resource_types_are_usage_errors() {
    let run = Run::new();
    let r = run.run(&["get", "pods"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("unknown resource type \"pods\""),
        "{}",
        r.stderr
    );
}

#[test]
fn delete_reports_missing_workloads_unless_told_to_ignore_them() {
    let stub = Stub::start(vec![route(
        "DELETE",
        "/v1/workloads/wallet/ltc-wallet",
        200,
        r#"{"kind":"Wallet","name":"ltc-wallet","tasksStopped":1}"#,
    )]);
    let run = Run::new();
    let f = run.write("all.yaml", &format!("{SERVICE}---\n{WALLET}"));
    let r = run.run(&["delete", "-f", s(&f), "--server", &stub.url()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.stdout, "wallet/ltc-wallet deleted\n");
    assert_eq!(r.stderr, "error: service/hello not found\n");

    let r = run.run(&[
        "delete",
        "service/hello",
        "--ignore-not-found",
        "--server",
        &stub.url(),
    ]);
    assert_eq!((r.code, r.stdout.as_str(), r.stderr.as_str()), (0, "", ""));
}

#[test]
fn logs_of_a_workload_follow_its_running_task() {
    let stub = Stub::start(vec![
        route("GET", "/v1/tasks?workload=hello", 200, &tasks_json()),
        route(
            "GET",
            "/v1/tasks/hello-abcdef-0/logs?follow=true&tail=5",
            200,
            "line 1\nline 2\n",
        ),
    ]);
    let run = Run::new();
    let r = run.run(&[
        "logs",
        "hello",
        "-f",
        "--tail",
        "5",
        "--server",
        &stub.url(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "line 1\nline 2\n");
    assert!(
        r.stderr
            .starts_with("note: \"hello\" has 2 tasks; showing hello-abcdef-0"),
        "{}",
        r.stderr
    );
}

#[test]
fn logs_all_prefixes_each_line_with_its_task() {
    let stub = Stub::start(vec![
        route("GET", "/v1/tasks?workload=hello", 200, &tasks_json()),
        route(
            "GET",
            "/v1/tasks/hello-abcdef-0/logs?follow=false",
            200,
            "a1\na2\n",
        ),
        route(
            "GET",
            "/v1/tasks/hello-abcdef-1/logs?follow=false",
            200,
            "b1\nb2 no newline",
        ),
    ]);
    let run = Run::new();
    let r = run.run(&["logs", "hello", "--all", "--server", &stub.url()]);
    assert_eq!(r.code, 0, "{r:?}");
    let mut lines: Vec<&str> = r.stdout.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "[hello-abcdef-0] a1",
            "[hello-abcdef-0] a2",
            "[hello-abcdef-1] b1",
            "[hello-abcdef-1] b2 no newline"
        ]
    );
    assert_eq!(r.stderr, "");
}

#[test]
fn logs_of_a_task_id_need_no_lookup() {
    let stub = Stub::start(vec![
        route(
            "GET",
            "/v1/tasks/hello-abcdef-1",
            200,
            &task_json("hello-abcdef-1", 1, "Running", Some("pi-1"), None),
        ),
        route(
            "GET",
            "/v1/tasks/hello-abcdef-1/logs?follow=false",
            200,
            "x\n",
        ),
    ]);
    let run = Run::new();
    let r = run.run(&["logs", "hello-abcdef-1", "--server", &stub.url()]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "x\n", "")
    );
    assert_eq!(stub.seen().len(), 2);
}

#[test]
fn version_shows_client_and_server() {
    let stub = Stub::start(vec![route(
        "GET",
        "/v1/version",
        200,
        r#"{"version":"0.1.0","apiVersion":"bramble/v1","protocol":1}"#,
    )]);
    let run = Run::new();
    let r = run.run(&["version", "--server", &stub.url()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        format!(
            "Client Version: {}\nServer Version: 0.1.0 (api bramble/v1, agent protocol 1)\n",
            env!("CARGO_PKG_VERSION")
        )
    );
}

#[test]
fn contexts_are_kept_in_the_config_file_and_flags_and_env_override_them() {
    let a = Stub::start(vec![route("GET", "/v1/nodes", 200, "[]")]);
    let b = Stub::start(vec![route("GET", "/v1/nodes", 200, "[]")]);
    let run = Run::new();

    let r = run.run(&[
        "config",
        "set-context",
        "pool",
        "--server",
        &a.url(),
        "--token",
        "secret-a",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "Context \"pool\" created.\nSwitched to context \"pool\".\n"
    );
    let r = run.run(&["config", "set-context", "lab", "--server", &b.url()]);
    assert_eq!(r.stdout, "Context \"lab\" created.\n");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(run.config_path())
            .expect("written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let r = run.run(&["config", "get-contexts"]);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "CURRENT   NAME   SERVER{}TOKEN    CA",
            " ".repeat(a.url().len() - 3)
        )
    );
    assert!(
        lines[1].starts_with("*         pool   https://"),
        "{}",
        r.stdout
    );
    assert!(
        lines[2].ends_with("   <none>   <not pinned>"),
        "{}",
        r.stdout
    );
    assert_eq!(run.run(&["config", "current-context"]).stdout, "pool\n");

    let view = run.run(&["config", "view"]).stdout;
    assert!(
        view.contains("token: REDACTED") && !view.contains("secret-a"),
        "{view}"
    );
    assert!(run
        .run(&["config", "view", "--raw"])
        .stdout
        .contains("token: secret-a"));

    // The current context's server and token.
    assert_eq!(run.run(&["get", "nodes"]).code, 0);
    assert_eq!(
        a.seen()
            .last()
            .and_then(|s| s.header("authorization").map(str::to_string))
            .as_deref(),
        Some("Bearer secret-a")
    );
    // --context picks another.
    assert_eq!(run.run(&["get", "nodes", "--context", "lab"]).code, 0);
    assert_eq!(b.seen().len(), 1);
    assert_eq!(b.seen()[0].header("authorization"), None);
    // BRAMBLE_SERVER beats the context; the context's token still applies.
    let r = Result::from(
        run.cmd(&["get", "nodes"])
            .env("BRAMBLE_SERVER", b.url())
            .output()
            .expect("runs"),
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(b.seen()[1].header("authorization"), Some("Bearer secret-a"));
    // --server beats BRAMBLE_SERVER.
    let r = Result::from(
        run.cmd(&["get", "nodes", "--server", &a.url()])
            .env("BRAMBLE_SERVER", b.url())
            .output()
            .expect("runs"),
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!((a.seen().len(), b.seen().len()), (2, 2));

    let r = run.run(&["config", "use-context", "lab"]);
    assert_eq!(r.stdout, "Switched to context \"lab\".\n");
    assert_eq!(run.run(&["config", "current-context"]).stdout, "lab\n");
    let r = run.run(&["config", "use-context", "nope"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .starts_with("error: context \"nope\" not found in "),
        "{}",
        r.stderr
    );
    let r = run.run(&["get", "nodes", "--context", "nope"]);
    assert_eq!(r.code, 1, "{r:?}");
}

#[test]
fn completion_scripts_are_generated() {
    let run = Run::new();
    for shell in ["bash", "zsh", "fish"] {
        let r = run.run(&["completion", shell]);
        assert_eq!(r.code, 0, "{r:?}");
        assert!(r.stdout.contains("bramblectl"), "{shell}");
    }
}

const CRONJOB_VIEW: &str = r#"{"manifest":{"apiVersion":"bramble/v1","kind":"CronJob","metadata":{"name":"payout"},"spec":{"image":"pool/payout:1","schedule":"*/5 * * * *","retries":1}},
  "generation":1,"desired":0,"running":0,"createdAt":"2020-01-01T00:00:00Z","updatedAt":"2020-01-01T00:00:00Z"}"#;

/// A time `ago` before now (negative: ahead), as the controller writes times.
fn at(ago: chrono::TimeDelta) -> String {
    (chrono::Utc::now() - ago).to_rfc3339()
}

/// `payout`, next run in 3½ hours. Its last slot is 5 days ago for the LAST RUN column;
/// the recorded firings keep fixed times, for the exact `Runs:` table.
fn payout_json() -> String {
    format!(
        r#"{{"name":"payout","schedule":"*/5 * * * *","timezone":"UTC","suspended":false,"lastSlot":"{last}",
  "lastResult":"Failed","next":"{next}","active":0,"firings":[
  {{"slot":"2026-11-10T11:55:00Z","outcome":"Fired","task":"payout-20261110t115500z","decidedAt":"2026-11-10T11:55:00.250Z"}},
  {{"slot":"2026-11-10T11:50:00Z","outcome":"Skipped","decidedAt":"2026-11-10T11:50:00.003Z"}}]}}"#,
        last = at(chrono::TimeDelta::days(5)),
        next = at(-chrono::TimeDelta::minutes(210))
    )
}

fn cronjobs_json() -> String {
    format!(
        r#"[{},{{"name":"backup","schedule":"0 3 * * *","timezone":"Europe/Berlin","suspended":true,"active":0}}]"#,
        payout_json()
    )
}

fn cron_run_json(id: &str, slot: &str, attempt: u32, phase: &str, created: &str) -> String {
    format!(
        r#"{{"id":"{id}","kind":"CronJob","workload":"payout","replica":0,"specHash":"abcdef0123456789",
  "spec":{{"image":"pool/payout:1","restart":{RESTART}}},"node":"pi-2","desired":"Running","phase":"{phase}",
  "exitCode":{exit},"restarts":0,"slot":"{slot}","attempt":{attempt},"createdAt":"{created}","finishedAt":"{created}"}}"#,
        exit = if phase == "Succeeded" { 0 } else { 1 }
    )
}

/// Three runs of `payout` and a Service of the same name: the 11:55 slot failed and its
/// retry failed too; the 11:50 slot's retry succeeded late, after 11:55 was created.
fn cron_runs_json() -> String {
    format!(
        "[{},{},{},{}]",
        task_json("payout-abcdef-0", 0, "Running", Some("pi-1"), None)
            .replace(r#""workload":"hello""#, r#""workload":"payout""#),
        cron_run_json(
            "payout-20261110t115000z-r1",
            "2026-11-10T11:50:00Z",
            1,
            "Succeeded",
            "2026-11-10T11:57:00Z"
        ),
        cron_run_json(
            "payout-20261110t115500z",
            "2026-11-10T11:55:00Z",
            0,
            "Failed",
            "2026-11-10T11:55:00Z"
        ),
        cron_run_json(
            "payout-20261110t115500z-r1",
            "2026-11-10T11:55:00Z",
            1,
            "Failed",
            "2026-11-10T11:56:00Z"
        ),
    )
}

#[test]
fn get_cronjobs_says_when_each_last_ran_and_runs_next() {
    let stub = Stub::start(vec![
        route("GET", "/v1/cronjobs", 200, &cronjobs_json()),
        route("GET", "/v1/cronjobs/payout", 200, &payout_json()),
        route(
            "GET",
            "/v1/workloads?kind=cronjob",
            200,
            &format!("[{CRONJOB_VIEW}]"),
        ),
    ]);
    let run = Run::new();
    let r = run.run(&["get", "cronjobs", "--server", &stub.url()]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
    assert_eq!(
        r.stdout,
        "NAME     SCHEDULE      TIMEZONE        SUSPEND   ACTIVE   LAST RUN   LAST RESULT   NEXT RUN\n\
         backup   0 3 * * *     Europe/Berlin   true      0        <none>     <none>        <none>\n\
         payout   */5 * * * *   UTC             false     0        5d ago     Failed        in 3h29m\n"
    );

    let r = run.run(&["get", "cj/payout", "-o", "json", "--server", &stub.url()]);
    assert_eq!(r.code, 0, "{r:?}");
    let one: CronJobView = serde_json::from_str(&r.stdout).expect("one cronjob as JSON");
    assert_eq!((one.name.as_str(), one.firings.len()), ("payout", 2));

    let r = run.run(&["get", "cronjob", "nope", "--server", &stub.url()]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "error: cronjob \"nope\" not found\n")
    );

    // The workload listing of cronjobs is still there.
    let r = run.run(&[
        "get",
        "workloads",
        "--kind",
        "cronjob",
        "--server",
        &stub.url(),
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.starts_with("KIND      NAME     DESIRED"),
        "{}",
        r.stdout
    );

    let r = run.run(&["get", "cj", "--kind", "service", "--server", &stub.url()]);
    assert_eq!(r.code, 2, "{r:?}");

    let targets: Vec<String> = stub.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(
        targets,
        [
            "/v1/cronjobs",
            "/v1/cronjobs/payout",
            "/v1/cronjobs/nope",
            "/v1/workloads?kind=cronjob"
        ]
    );
}

#[test]
fn describe_cronjob_shows_its_slots_and_its_runs_newest_first() {
    let stub = Stub::start(vec![
        route("GET", "/v1/workloads/cronjob/payout", 200, CRONJOB_VIEW),
        route("GET", "/v1/tasks?workload=payout", 200, &cron_runs_json()),
        route("GET", "/v1/cronjobs/payout", 200, &payout_json()),
        route("GET", "/v1/events?object=cronjob%2Fpayout", 200, "[]"),
        route(
            "GET",
            "/v1/events?object=task%2Fpayout",
            200,
            &format!(
                "[{}]",
                event_json(
                    3,
                    hours(1),
                    "Warning",
                    "task/payout-20261110t115500z-r1",
                    "Failed",
                    "exit 1"
                )
            ),
        ),
    ]);
    let run = Run::new();
    let r = run.run(&["describe", "cj", "payout", "--server", &stub.url()]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
    let text = &r.stdout;
    for want in [
        "Kind:                CronJob\n",
        "Suspend:             false\n",
        "Last Schedule:       ",
        "Last Result:         Failed\n",
        "Next Schedule:       ",
        "Runs:\n\
         \x20 SLOT                   OUTCOME   TASK                      LATENESS\n\
         \x20 2026-11-10T11:55:00Z   Fired     payout-20261110t115500z   250ms\n\
         \x20 2026-11-10T11:50:00Z   Skipped   -                         3ms\n\
         Tasks:\n\
         \x20 TASK                         SLOT                   ATTEMPT   PHASE       EXIT   NODE   FINISHED   MESSAGE\n\
         \x20 payout-20261110t115500z-r1   2026-11-10T11:55:00Z   1         Failed      1      pi-2   ",
        "\n  payout-20261110t115500z      2026-11-10T11:55:00Z   0         Failed      1      pi-2   ",
        "\n  payout-20261110t115000z-r1   2026-11-10T11:50:00Z   1         Succeeded   0      pi-2   ",
        // A retry's events belong to the CronJob too.
        "Warning   Failed   60m    exit 1\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    assert!(
        !text.contains("payout-abcdef-0"),
        "a Service's task:\n{text}"
    );
}

#[test]
fn cron_run_suspend_and_resume_say_what_they_did() {
    let run_answer = cron_run_json(
        "payout-20261110t120000z-manual",
        "2026-11-10T12:00:00Z",
        0,
        "Pending",
        "2026-11-10T12:00:00Z",
    );
    let suspended = payout_json().replace(r#""suspended":false"#, r#""suspended":true"#);
    let stub = Stub::start(vec![
        route("POST", "/v1/cronjobs/payout/run", 200, &run_answer),
        route("POST", "/v1/cronjobs/payout/suspend", 200, &suspended),
        route("POST", "/v1/cronjobs/payout/resume", 200, &payout_json()),
        // Still suspended after resume: the manifest says so.
        route(
            "POST",
            "/v1/cronjobs/backup/resume",
            200,
            &suspended.replace("payout", "backup"),
        ),
    ]);
    let run = Run::new();
    let url = stub.url();
    let r = run.run(&["cron", "run", "payout", "--server", &url]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (
            0,
            "cronjob/payout triggered (task payout-20261110t120000z-manual)\n",
            ""
        )
    );
    let r = run.run(&["cron", "suspend", "payout", "--server", &url]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "cronjob/payout suspended\n", "")
    );
    let r = run.run(&["cron", "resume", "payout", "--server", &url]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "cronjob/payout resumed\n", "")
    );
    let r = run.run(&["cron", "resume", "backup", "--server", &url]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "cronjob/backup resumed\n"));
    assert!(r.stderr.contains("still suspended"), "{r:?}");
    let r = run.run(&["cron", "run", "nope", "--server", &url]);
    assert_eq!(
        (r.code, r.stderr.as_str()),
        (1, "error: cronjob \"nope\" not found\n")
    );
    let seen: Vec<(String, String)> = stub
        .seen()
        .into_iter()
        .map(|s| (s.method, s.target))
        .collect();
    assert!(seen.iter().all(|(m, _)| m == "POST"), "{seen:?}");
    assert_eq!(seen[2].1, "/v1/cronjobs/payout/resume");
}

#[test]
fn logs_of_a_cronjob_show_its_newest_run_by_slot_then_attempt() {
    // Only the runs: a name shared with a Service would pick the running replica.
    let runs = cron_runs_json().replacen(
        &format!(
            "{},",
            task_json("payout-abcdef-0", 0, "Running", Some("pi-1"), None)
                .replace(r#""workload":"hello""#, r#""workload":"payout""#)
        ),
        "",
        1,
    );
    assert_eq!(
        serde_json::from_str::<Vec<Task>>(&runs)
            .expect("runs")
            .len(),
        3
    );
    let stub = Stub::start(vec![
        route("GET", "/v1/tasks?workload=payout", 200, &runs),
        route(
            "GET",
            "/v1/tasks/payout-20261110t115500z-r1/logs?follow=false",
            200,
            "paid 0 of 3\nerror: pool unreachable\n",
        ),
    ]);
    let run = Run::new();
    let r = run.run(&["logs", "payout", "--server", &stub.url()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "paid 0 of 3\nerror: pool unreachable\n");
    assert!(
        r.stderr.contains("showing payout-20261110t115500z-r1 (others: payout-20261110t115500z, payout-20261110t115000z-r1;"),
        "{}",
        r.stderr
    );
}

/// `https://127.0.0.1:PORT` where nothing listens.
fn dead_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("https://{addr}")
}

#[test]
fn several_servers_are_tried_in_turn_and_writes_go_to_a_live_one() {
    let node = node_pi1();
    let stub = Stub::start(vec![
        route("GET", "/v1/nodes", 200, "[]"),
        route("POST", "/v1/nodes/pi-1/cordon", 200, &node),
    ]);
    let run = Run::new();
    let list = format!("{},{}", dead_server(), stub.url());
    let r = run.run(&["get", "nodes", "--server", &list]);
    assert_eq!(r.code, 0, "{r:?}");
    // A write: the dead controller never saw it, so it goes to the next.
    let r = run.run(&["cordon", "pi-1", "--server", &list]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "node/pi-1 cordoned\n", "")
    );
    let targets: Vec<String> = stub.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/v1/nodes", "/v1/nodes/pi-1/cordon"]);

    // Every one dead: the error names a controller that could not be reached.
    let r = run.run(&[
        "get",
        "nodes",
        "--server",
        &format!("{},{}", dead_server(), dead_server()),
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("cannot reach the controller at"),
        "{}",
        r.stderr
    );

    // A bad entry in the list is an error naming it, and nothing is sent.
    let r = run.run(&[
        "get",
        "nodes",
        "--server",
        &format!("{},http://plain:1", stub.url()),
    ]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("http://plain:1"), "{}", r.stderr);
    assert_eq!(stub.seen().len(), 2);
}

#[test]
fn a_context_may_list_several_servers() {
    let stub = Stub::start(vec![route("GET", "/v1/nodes", 200, "[]")]);
    let run = Run::new();
    let config = format!(
        "current-context: pool\ncontexts:\n  - name: pool\n    server: [{}, {}]\n    certificate-authority-fingerprint: {}\n",
        dead_server(),
        stub.url(),
        stub_tls().ca
    );
    let path = run.config_path();
    std::fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
    std::fs::write(&path, config).expect("write");
    let r = run.run(&["get", "nodes"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(stub.seen().len(), 1);
}

#[test]
fn logs_refused_by_a_follower_are_read_through_the_next_controller() {
    let task = task_json("hello-abcdef-1", 1, "Running", Some("pi-1"), None);
    let follower = Stub::start(vec![
        route("GET", "/v1/tasks/hello-abcdef-1", 200, &task),
        route(
            "GET",
            "/v1/tasks/hello-abcdef-1/logs?follow=false",
            503,
            r#"{"code":"not_leader","message":"this controller is not the leader"}"#,
        ),
    ]);
    let leader = Stub::start(vec![
        route("GET", "/v1/tasks/hello-abcdef-1", 200, &task),
        route(
            "GET",
            "/v1/tasks/hello-abcdef-1/logs?follow=false",
            200,
            "from the leader\n",
        ),
    ]);
    let run = Run::new();
    let list = format!("{},{}", follower.url(), leader.url());
    let r = run.run(&["logs", "hello-abcdef-1", "--server", &list]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "from the leader\n", "")
    );
    // With the follower alone, its refusal is shown as it is.
    let r = run.run(&["logs", "hello-abcdef-1", "--server", &follower.url()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("not the leader"), "{}", r.stderr);
}
