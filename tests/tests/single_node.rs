//! A one-machine cluster: a controller with its local agent (or a separate agent),
//! real Docker, real SQLite, driven through `bramblectl` and the REST API.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Result};
use bramble_tests::harness::{self, Agent, Controller, ControllerOpts, ADMIN_TOKEN, JOIN_TOKEN};
use bramble_tests::{ensure_test_image, eventually};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn service(name: &str, replicas: u32, greeting: &str) -> String {
    format!(
        "apiVersion: bramble/v1
kind: Service
metadata:
  name: {name}
spec:
  image: bramble-testimg:latest
  args: [\"serve\", \"8080\"]
  env: {{GREETING: {greeting}, PORT_NUMBER: 8080}}
  resources: {{cpu: 250m, memory: 32Mi}}
  replicas: {replicas}
"
    )
}

fn write(dir: &tempfile::TempDir, file: &str, text: &str) -> String {
    let p = dir.path().join(file);
    std::fs::write(&p, text).expect("write manifest");
    p.display().to_string()
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "bramblectl failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Running containers of a node, by id, once there are exactly `n` of them running.
async fn running(node: &str, n: usize) -> Result<Vec<Value>> {
    eventually(
        WAIT,
        &format!("{n} running containers on {node}"),
        || async {
            let ids = harness::node_containers(node, false)?;
            let all = harness::node_containers(node, true)?;
            if ids.len() == n && all.len() == n {
                Ok(Some(harness::inspect(&ids)?))
            } else {
                Ok(None)
            }
        },
    )
    .await
}

fn env_of(c: &Value) -> BTreeSet<String> {
    c["Config"]["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn ids(cs: &[Value]) -> BTreeSet<String> {
    cs.iter()
        .filter_map(|c| c["Id"].as_str().map(str::to_string))
        .collect()
}

async fn started(node: &str, n: usize) -> Result<(Controller, tempfile::TempDir)> {
    ensure_test_image().await?;
    let c = Controller::start(ControllerOpts {
        local_node: Some(node.to_string()),
        args: vec![],
    })
    .await?;
    let _ = n;
    Ok((c, tempfile::tempdir()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_runs_labelled_limited_containers_reapply_keeps_them_change_replaces_delete_removes(
) -> Result<()> {
    let node = harness::unique("sn");
    let (c, dir) = started(&node, 2).await?;
    let file = write(&dir, "web.yaml", &service("web", 2, "hi"));

    let out = ok(&c.ctl(&["apply", "-f", &file]));
    assert!(out.contains("service/web created"), "{out}");
    let first = running(&node, 2).await?;
    for ct in &first {
        let labels = &ct["Config"]["Labels"];
        assert_eq!(labels["bramble.workload"], "web");
        assert_eq!(labels["bramble.kind"], "Service");
        assert_eq!(labels["bramble.node"], node.as_str());
        assert!(labels["bramble.task"]
            .as_str()
            .is_some_and(|t| t.starts_with("web-")));
        let env = env_of(ct);
        assert!(
            env.contains("GREETING=hi") && env.contains("PORT_NUMBER=8080"),
            "{env:?}"
        );
        assert_eq!(ct["HostConfig"]["NanoCpus"], 250_000_000i64);
        assert_eq!(ct["HostConfig"]["Memory"], 32i64 * 1024 * 1024);
    }
    // The controller reports them running.
    eventually(WAIT, "tasks Running", || async {
        let tasks = c.get("/v1/tasks?workload=web").await?;
        let n = tasks
            .as_array()
            .map_or(0, |a| a.iter().filter(|t| t["phase"] == "Running").count());
        Ok((n == 2).then_some(()))
    })
    .await?;

    // Unchanged: nothing restarts.
    let out = ok(&c.ctl(&["apply", "-f", &file]));
    assert!(out.contains("service/web unchanged"), "{out}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = running(&node, 2).await?;
    assert_eq!(
        ids(&first),
        ids(&again),
        "re-applying an unchanged manifest must not restart anything"
    );
    let starts = |cs: &[Value]| {
        cs.iter()
            .map(|c| c["State"]["StartedAt"].to_string())
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(starts(&first), starts(&again));

    // Changed env: every container replaced.
    write(&dir, "web.yaml", &service("web", 2, "bonjour"));
    let out = ok(&c.ctl(&["apply", "-f", &file]));
    assert!(out.contains("service/web configured"), "{out}");
    let replaced = eventually(WAIT, "containers replaced with the new env", || async {
        let cs = running(&node, 2).await?;
        let fresh = cs.iter().all(|c| env_of(c).contains("GREETING=bonjour"));
        Ok((fresh && ids(&cs).is_disjoint(&ids(&first))).then_some(cs))
    })
    .await?;
    assert_eq!(replaced.len(), 2);

    // Deleted: containers gone, tasks gone.
    let out = ok(&c.ctl(&["delete", "service", "web"]));
    assert!(out.contains("service/web deleted"), "{out}");
    eventually(WAIT, "containers removed", || async {
        Ok(harness::node_containers(&node, true)?
            .is_empty()
            .then_some(()))
    })
    .await?;
    eventually(WAIT, "tasks removed", || async {
        Ok(c.get("/v1/tasks?workload=web")
            .await?
            .as_array()
            .is_some_and(|a| a.is_empty())
            .then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_and_restarted_keeps_workloads_tasks_and_containers_without_copies(
) -> Result<()> {
    let node = harness::unique("k9");
    let (mut c, dir) = started(&node, 2).await?;
    let file = write(&dir, "web.yaml", &service("web", 2, "hi"));
    ok(&c.ctl(&["apply", "-f", &file]));
    let before = running(&node, 2).await?;
    let tasks_before: BTreeSet<String> = task_ids(&c).await?;

    for _ in 0..2 {
        c.kill9();
        // Containers outlive the controller (and its in-process agent).
        assert_eq!(harness::node_containers(&node, false)?.len(), 2);
        c.restart().await?;
        let workloads = c.get("/v1/workloads").await?;
        assert_eq!(workloads.as_array().map(Vec::len), Some(1), "{workloads}");
        assert_eq!(task_ids(&c).await?, tasks_before);
        // Give the agent time to reconnect and converge: nothing may change.
        eventually(WAIT, "node Ready again", || async {
            Ok((c.get(&format!("/v1/nodes/{node}")).await?["status"] == "Ready").then_some(()))
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = running(&node, 2).await?;
        assert_eq!(
            ids(&before),
            ids(&after),
            "the same containers, adopted, not copies"
        );
    }
    Ok(())
}

async fn task_ids(c: &Controller) -> Result<BTreeSet<String>> {
    let tasks = c.get("/v1/tasks").await?;
    let Some(arr) = tasks.as_array() else {
        bail!("not a list: {tasks}")
    };
    Ok(arr
        .iter()
        .filter_map(|t| t["id"].as_str().map(str::to_string))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_adopts_its_containers_instead_of_starting_copies() -> Result<()> {
    ensure_test_image().await?;
    let c = Controller::start(ControllerOpts {
        local_node: None,
        args: vec![],
    })
    .await?;
    let node = harness::unique("ag");
    let mut agent = Agent::start(&c, &node)?;
    let dir = tempfile::tempdir()?;
    let file = write(&dir, "web.yaml", &service("web", 3, "hi"));
    ok(&c.ctl(&["apply", "-f", &file]));
    let before = running(&node, 3).await?;

    agent.kill9();
    agent.restart()?;
    eventually(WAIT, "agent reconnected", || async {
        Ok((c.get(&format!("/v1/nodes/{node}")).await?["status"] == "Ready").then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = running(&node, 3).await?;
    assert_eq!(ids(&before), ids(&after));
    Ok(())
}

/// A container that ignores SIGTERM takes the whole stop grace (10 s) to go. The agent
/// runs a round's independent actions side by side, so a new workload in the same
/// apply starts, and is reported Running, while the old container is still dying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_ignores_sigterm_does_not_hold_up_other_starts() -> Result<()> {
    let node = harness::unique("lane");
    let (c, dir) = started(&node, 1).await?;
    let careless = |arg: &str| {
        format!(
            "apiVersion: bramble/v1\nkind: Service\nmetadata: {{name: careless}}\nspec:\n  image: bramble-testimg:latest\n  args: [\"sleep\", \"{arg}\"]\n  env: {{TESTIMG_IGNORE_SIGTERM: \"1\"}}\n  resources: {{cpu: 100m, memory: 16Mi}}\n"
        )
    };
    let file = write(&dir, "careless.yaml", &careless("100000"));
    ok(&c.ctl(&["apply", "-f", &file]));
    let old = running(&node, 1).await?;
    let old_id = old[0]["Id"].as_str().unwrap_or_default().to_string();

    // One apply: the careless workload changes (its container is replaced) and a new
    // one comes.
    let both = format!("{}---\n{}", careless("100001"), service("fresh", 1, "hi"));
    let file = write(&dir, "both.yaml", &both);
    ok(&c.ctl(&["apply", "-f", &file]));
    let fresh_running_while_old_lives = eventually(WAIT, "the fresh workload Running", || async {
        // The controller's view: the agent reports it Running as soon as it runs.
        let tasks = c.get("/v1/tasks?workload=fresh").await?;
        let running = tasks
            .as_array()
            .is_some_and(|a| a.iter().any(|t| t["phase"] == "Running"));
        if !running {
            return Ok(None);
        }
        // Gone (inspect fails) counts as not running.
        let old_running =
            bramble_tests::docker_inspect(&old_id).is_ok_and(|old| old["State"]["Running"] == true);
        Ok(Some(old_running))
    })
    .await?;
    assert!(
        fresh_running_while_old_lives,
        "the fresh workload started only after the careless container's grace; logs:\n{}",
        c.logs()
    );
    eventually(WAIT, "the careless workload replaced", || async {
        let tasks = c.get("/v1/tasks?workload=careless").await?;
        let new = tasks.as_array().and_then(|a| {
            a.iter()
                .find(|t| t["phase"] == "Running" && t["containerId"] != old_id.as_str())
                .cloned()
        });
        Ok(new)
    })
    .await?;
    c.ctl(&["delete", "service", "careless"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_manifests_are_rejected_with_file_line_column_and_field_and_nothing_is_stored(
) -> Result<()> {
    let c = Controller::start(ControllerOpts {
        local_node: None,
        args: vec![],
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let good = service("web", 1, "hi");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown-field.yaml",
            good.replace("  replicas: 1\n", "  replicas: 1\n  replcas: 2\n"),
            ":11:3: spec.replcas: unknown field",
        ),
        (
            "wrong-type.yaml",
            good.replace("replicas: 1", "replicas: many"),
            ":10:13: spec.replicas: invalid type",
        ),
        (
            "bad-cpu.yaml",
            good.replace("cpu: 250m", "cpu: fast"),
            ":9:15: spec.resources.cpu: invalid cpu quantity",
        ),
        (
            "bad-memory.yaml",
            good.replace("memory: 32Mi", "memory: 32MB"),
            "spec.resources.memory: invalid memory quantity",
        ),
        (
            "no-image.yaml",
            good.replace("  image: bramble-testimg:latest\n", ""),
            ":5:1: spec.image: missing field `image`",
        ),
        (
            "bad-name.yaml",
            good.replace("name: web", "name: Web_1"),
            ":4:3: metadata.name: invalid name",
        ),
        (
            "bad-kind.yaml",
            good.replace("kind: Service", "kind: Deployment"),
            ":2:7: kind: unknown variant `Deployment`",
        ),
        (
            "duplicate.yaml",
            format!("{good}---\n{good}"),
            ":15:3: metadata.name: duplicate Service \"web\"",
        ),
    ];
    for (file, text, want) in cases {
        let path = write(&dir, file, &text);
        let out = c.ctl(&["apply", "-f", &path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} accepted");
        let expected = if want.starts_with(':') {
            format!("{path}{want}")
        } else {
            want.to_string()
        };
        assert!(
            stderr.contains(&expected),
            "{file}: want {expected:?} in:\n{stderr}"
        );
        assert!(
            stderr.contains(file),
            "{file}: the file is named:\n{stderr}"
        );

        // The API itself (bypassing the CLI's own check) rejects it the same way.
        let body = serde_json::json!({"sources": [{"name": file, "content": text}]});
        let r = bramble_tests::http()
            .post(format!("{}/v1/apply", c.url()))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await?;
        assert_eq!(r.status(), 422, "{file}");
        let err: Value = r.json().await?;
        assert_eq!(err["code"], "invalid_manifest");
        assert!(
            err["details"][0]["line"].as_u64().is_some_and(|l| l > 0),
            "{err}"
        );
    }
    // One bad document spoils the whole apply: the good one is not stored either.
    let mixed = write(
        &dir,
        "mixed.yaml",
        &format!(
            "{good}---\n{}",
            good.replace("name: web", "name: db")
                .replace("cpu: 250m", "cpu: x")
        ),
    );
    assert!(!c.ctl(&["apply", "-f", &mixed]).status.success());
    assert_eq!(c.get("/v1/workloads").await?, serde_json::json!([]));
    assert_eq!(c.get("/v1/tasks").await?, serde_json::json!([]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_needs_a_valid_token_and_a_refused_request_changes_nothing() -> Result<()> {
    let c = Controller::start(ControllerOpts {
        local_node: None,
        args: vec![],
    })
    .await?;
    let dir = tempfile::tempdir()?;
    ok(&c.ctl(&[
        "apply",
        "-f",
        &write(&dir, "web.yaml", &service("web", 1, "hi")),
    ]));
    let before = (c.get("/v1/workloads").await?, c.get("/v1/tasks").await?);

    let apply =
        serde_json::json!({"sources": [{"name": "x.yaml", "content": service("other", 1, "x")}]})
            .to_string();
    let endpoints: Vec<(&str, &str)> = vec![
        ("GET", "/v1/version"),
        ("POST", "/v1/apply"),
        ("GET", "/v1/workloads"),
        ("GET", "/v1/workloads/service/web"),
        ("DELETE", "/v1/workloads/service/web"),
        ("GET", "/v1/nodes"),
        ("GET", "/v1/nodes/x"),
        ("GET", "/v1/tasks"),
        ("GET", "/v1/tasks/x"),
        ("GET", "/v1/tasks/x/logs"),
        ("GET", "/v1/agent"),
        ("GET", "/v1/no-such-endpoint"),
    ];
    let client = bramble_tests::http();
    for (method, path) in &endpoints {
        for token in [None, Some("wrong-token-wrong-token"), Some(JOIN_TOKEN)] {
            if token == Some(JOIN_TOKEN) && *path == "/v1/agent" {
                continue; // the join token is for exactly this endpoint
            }
            let mut req = client.request(method.parse()?, format!("{}{path}", c.url()));
            if *method == "POST" {
                req = req
                    .header("content-type", "application/json")
                    .body(apply.clone());
            }
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let r = req.send().await?;
            assert_eq!(r.status(), 401, "{method} {path} with {token:?}");
            let body: Value = r.json().await?;
            assert_eq!(body["code"], "unauthorized", "{method} {path}");
        }
    }
    assert_eq!(
        (c.get("/v1/workloads").await?, c.get("/v1/tasks").await?),
        before
    );
    // bramblectl says so in one line.
    let out = std::process::Command::new(harness::bin("bramblectl"))
        .args(["get", "workloads"])
        .env("BRAMBLE_SERVER", c.url())
        .env("BRAMBLE_TOKEN", "wrong-token-wrong-token")
        .env("BRAMBLE_CA_FINGERPRINT", c.ca_fingerprint()?)
        .env("BRAMBLE_CONFIG", "/nonexistent/x.yaml")
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unauthorized"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_stream_from_the_container_through_the_controller() -> Result<()> {
    let node = harness::unique("lg");
    let (c, dir) = started(&node, 1).await?;
    let manifest = "apiVersion: bramble/v1\nkind: Service\nmetadata: {name: talker}\nspec:\n  image: bramble-testimg:latest\n  args: [\"print\", \"tick\", \"200\", \"100000\"]\n";
    ok(&c.ctl(&["apply", "-f", &write(&dir, "talker.yaml", manifest)]));
    running(&node, 1).await?;
    let out = eventually(WAIT, "log lines", || async {
        let out = c.ctl(&["logs", "talker", "--tail", "5"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok((out.status.success() && text.contains("tick")).then_some(text))
    })
    .await?;
    assert!(out.lines().count() <= 5, "tail 5: {out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_at_rest_writes_nothing_to_the_store() -> Result<()> {
    let node = harness::unique("rest");
    let (c, dir) = started(&node, 2).await?;
    ok(&c.ctl(&[
        "apply",
        "-f",
        &write(&dir, "web.yaml", &service("web", 2, "hi")),
    ]));
    running(&node, 2).await?;
    eventually(WAIT, "tasks Running", || async {
        let tasks = c.get("/v1/tasks?workload=web").await?;
        let n = tasks
            .as_array()
            .map_or(0, |a| a.iter().filter(|t| t["phase"] == "Running").count());
        Ok((n == 2).then_some(()))
    })
    .await?;
    // Let the last reports settle, then watch: heartbeats, resyncs and pings must not
    // touch the store (an SD card wears out).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = c.get("/v1/status").await?["storeWrites"]
        .as_u64()
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = c.get("/v1/status").await?["storeWrites"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(after - before, 0, "store writes during 10 s at rest");
    Ok(())
}

/// A receiver that answers every request with `status` and hands each request (head and
/// body as text) to the returned channel.
async fn receiver(status: u16) -> Result<(String, tokio::sync::mpsc::Receiver<String>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Head, then as much body as Content-Length says.
                loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            let _ = tx.send(text).await;
                            break;
                        }
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = sock.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok((url, rx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bramblectl_lists_webhooks_and_sends_a_signed_test_event() -> Result<()> {
    let mut c = Controller::start(ControllerOpts {
        local_node: None,
        args: vec![],
    })
    .await?;
    let (ok_url, mut received) = receiver(200).await?;
    let (bad_url, _) = receiver(500).await?;
    std::fs::write(c.data_dir.path().join("ops.secret"), "s3cret\n")?;
    std::fs::write(
        c.data_dir.path().join("webhooks.yaml"),
        format!(
            "- name: ops\n  url: {ok_url}\n  events: [Warning]\n  secretFile: ops.secret\n- name: broken\n  url: {bad_url}\n"
        ),
    )?;
    // Webhooks are read at start.
    c.restart().await?;

    let list = ok(&c.ctl(&["webhooks", "list"]));
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines[0].starts_with("NAME "), "{list}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ops ") && l.contains(&ok_url) && l.contains(" true ")),
        "{list}"
    );
    assert!(lines.iter().any(|l| l.starts_with("broken ")), "{list}");

    let test = {
        let (url, ca) = (c.url(), c.ca_fingerprint()?);
        tokio::task::spawn_blocking(move || harness::ctl(&url, &ca, &["webhooks", "test", "ops"]))
            .await?
    };
    assert!(
        ok(&test).starts_with("webhook/ops answered HTTP 200 in "),
        "{test:?}"
    );
    let delivery = tokio::time::timeout(WAIT, received.recv())
        .await?
        .expect("the receiver got the test event");
    assert!(
        delivery
            .to_ascii_lowercase()
            .contains("x-bramble-signature: sha256="),
        "{delivery}"
    );
    assert!(delivery.contains("\"test\":true"), "{delivery}");

    let failed = {
        let (url, ca) = (c.url(), c.ca_fingerprint()?);
        tokio::task::spawn_blocking(move || {
            harness::ctl(&url, &ca, &["webhooks", "test", "broken"])
        })
        .await?
    };
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.starts_with("error: webhook broken: test event not delivered:") && err.contains("500"),
        "{err}"
    );
    let missing = c.ctl(&["webhooks", "test", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "error: webhook \"nope\" not found\n"
    );
    Ok(())
}
