//! bramblectl's kubectl habits against a real one-node cluster: selectors, `-o name`
//! and `-o jsonpath`, `get all`, `get -w` streaming a real change, `scale`, `rollout
//! restart` keeping the other replicas Ready throughout, `top`, `logs -l`, `delete
//! --all`, "did you mean", and the message when no token was sent.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bramble_tests::harness::{self, bin, Controller, ControllerOpts, ADMIN_TOKEN};
use bramble_tests::{ensure_test_image, eventually};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bramblectl failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn service(name: &str, replicas: u32, app: &str) -> String {
    format!(
        "apiVersion: bramble/v1\nkind: Service\nmetadata:\n  name: {name}\n  labels: {{app: {app}}}\nspec:\n  image: bramble-testimg:latest\n  args: [\"serve\", \"8080\"]\n  resources: {{cpu: 50m, memory: 16Mi}}\n  replicas: {replicas}\n  probes:\n    readiness: {{tcp: {{port: 8080}}, period: 1s}}\n"
    )
}

/// Tasks of `workload` that serve (running and Ready).
async fn serving(c: &Controller, workload: &str) -> Result<Vec<Value>> {
    let tasks = c.get(&format!("/v1/tasks?workload={workload}")).await?;
    Ok(tasks
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|t| {
                    t["phase"] == "Running" && t["desired"] == "Running" && t["ready"] == true
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default())
}

async fn all_serving(c: &Controller, workload: &str, n: usize) -> Result<()> {
    eventually(WAIT, &format!("{n} {workload} serving"), || async {
        Ok((serving(c, workload).await?.len() == n).then_some(()))
    })
    .await
}

/// A `bramblectl` that keeps running (`get -w`), its output lines arriving on a channel.
struct Streaming {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Streaming {
    fn start(c: &Controller, args: &[&str]) -> Result<Streaming> {
        let mut child = Command::new(bin("bramblectl"))
            .args(args)
            .env("BRAMBLE_SERVER", c.url())
            .env("BRAMBLE_TOKEN", ADMIN_TOKEN)
            .env(
                "BRAMBLE_CA_FINGERPRINT",
                c.ca_fingerprint().unwrap_or_default(),
            )
            .env("BRAMBLE_CONFIG", "/nonexistent/bramble-test-config.yaml")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bramblectl")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Streaming { child, lines })
    }

    /// Lines until one matches, failing after `within`.
    fn until(&self, within: Duration, what: &str, f: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = std::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if f(&l) => return Ok(l),
                Ok(l) => seen.push(l),
                Err(_) => bail!(
                    "{what}: not printed within {within:?}; printed:\n{}",
                    seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_habits_work_against_a_real_cluster() -> Result<()> {
    ensure_test_image().await?;
    let node = harness::unique("verbs");
    let c = Controller::start(ControllerOpts {
        local_node: Some(node.clone()),
        args: vec![],
    })
    .await?;
    c.apply(
        "tour.yaml",
        &format!(
            "{}---\n{}",
            service("web", 2, "tour"),
            service("other", 1, "misc")
        ),
    )
    .await?;
    all_serving(&c, "web", 2).await?;
    all_serving(&c, "other", 1).await?;

    // Selectors and the output formats.
    let names = ok(&c.ctl(&["get", "tasks", "-l", "app=tour", "-o", "name"]));
    let lines: Vec<&str> = names.lines().collect();
    assert_eq!(lines.len(), 2, "{names}");
    assert!(lines.iter().all(|l| l.starts_with("task/web-")), "{names}");
    let names = ok(&c.ctl(&["get", "svc", "-l", "app!=tour", "-o", "name"]));
    assert_eq!(names, "service/other\n");
    let path = ok(&c.ctl(&[
        "get",
        "services",
        "-o",
        "jsonpath={range .items[*]}{.manifest.metadata.name}={.desired}{\"\\n\"}{end}",
    ]));
    assert_eq!(path, "other=1\nweb=2\n");
    let bad = c.ctl(&["get", "tasks", "-o", "jsonpath={.items[0"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid jsonpath template"));
    let all = ok(&c.ctl(&["get", "all"]));
    for want in ["KIND ", "web-", "STATUS", "other"] {
        assert!(all.contains(want), "{want:?} in get all:\n{all}");
    }

    // diff and apply --dry-run say what would change and which tasks go.
    let dir = tempfile::tempdir()?;
    let same = dir.path().join("same.yaml");
    std::fs::write(&same, service("web", 2, "tour"))?;
    let unchanged = c.ctl(&["diff", "-f", &same.to_string_lossy()]);
    assert_eq!(
        (unchanged.status.code(), unchanged.stdout.is_empty()),
        (Some(0), true)
    );
    let changed = dir.path().join("changed.yaml");
    std::fs::write(
        &changed,
        service("web", 2, "tour").replace("\"8080\"]", "\"8081\"]"),
    )?;
    let d = c.ctl(&["diff", "-f", &changed.to_string_lossy()]);
    let text = String::from_utf8_lossy(&d.stdout).into_owned();
    assert_eq!(d.status.code(), Some(1), "{text}");
    assert!(
        text.starts_with("service/web would be configured: replaces 2 tasks (web-"),
        "{text}"
    );
    assert!(
        text.contains("\n  ~ spec.args[1]: 8080 -> 8081\n"),
        "{text}"
    );
    let dry = ok(&c.ctl(&["apply", "--dry-run", "-f", &changed.to_string_lossy()]));
    assert!(
        dry.starts_with("service/web configured (dry run): replaces 2 tasks"),
        "{dry}"
    );
    let more = dir.path().join("more.yaml");
    std::fs::write(&more, service("web", 3, "tour"))?;
    let dry = ok(&c.ctl(&["apply", "--dry-run", "-f", &more.to_string_lossy()]));
    assert!(
        dry.starts_with("service/web configured (dry run): adds 1 task\n  ~ spec.replicas: 2 -> 3"),
        "{dry}"
    );
    let wl = c.get("/v1/workloads/service/web").await?;
    assert_eq!(
        wl["manifest"]["spec"]["replicas"], 2,
        "a dry run stores nothing"
    );

    // A typo, and a request without a token.
    let typo = c.ctl(&["gte", "nodes"]);
    assert_eq!(typo.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("did you mean \"get\"?"),
        "{}",
        String::from_utf8_lossy(&typo.stderr)
    );
    let anonymous = Command::new(bin("bramblectl"))
        .args(["get", "nodes"])
        .env("BRAMBLE_SERVER", c.url())
        .env(
            "BRAMBLE_CA_FINGERPRINT",
            c.ca_fingerprint().unwrap_or_default(),
        )
        .env("BRAMBLE_CONFIG", "/nonexistent/bramble-test-config.yaml")
        .env_remove("BRAMBLE_TOKEN")
        .output()?;
    assert_eq!(anonymous.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&anonymous.stderr).contains("no token was sent"),
        "{}",
        String::from_utf8_lossy(&anonymous.stderr)
    );

    // A watch streams the change a scale makes.
    let watch = Streaming::start(&c, &["get", "tasks", "-w", "-l", "app=tour"])?;
    watch.until(WAIT, "the watch's header", |l| l.starts_with("NAME "))?;
    let scaled = ok(&c.ctl(&["scale", "service/web", "--replicas", "3"]));
    assert_eq!(scaled, "service/web scaled from 2 to 3 replicas\n");
    let fresh = watch.until(WAIT, "the third replica", |l| {
        l.starts_with("web-") && l.contains("-2 ")
    })?;
    assert!(fresh.contains(&node) || fresh.contains("<none>"), "{fresh}");
    watch.until(WAIT, "the third replica running", |l| {
        l.starts_with("web-") && l.contains("-2 ") && l.contains("Running")
    })?;
    drop(watch);
    all_serving(&c, "web", 3).await?;
    let wl = c.get("/v1/workloads/service/web").await?;
    assert_eq!(wl["manifest"]["spec"]["replicas"], 3);
    let refused = c.ctl(&["scale", "wallet/nope", "--replicas", "2"]);
    assert!(!refused.status.success());

    // A rolling restart: every replica gets a new container, and at every moment at
    // least two of the three serve.
    let before: Vec<String> = serving(&c, "web")
        .await?
        .iter()
        .filter_map(|t| t["containerId"].as_str().map(str::to_string))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let worst = Arc::new(AtomicUsize::new(usize::MAX));
    let samples = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (url, stop, worst, samples) = (c.url(), stop.clone(), worst.clone(), samples.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = bramble_tests::http()
                    .get(format!("{url}/v1/tasks?workload=web"))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await;
                if let Ok(r) = r {
                    if let Ok(v) = r.json::<Value>().await {
                        let up = v.as_array().map_or(0, |a| {
                            a.iter()
                                .filter(|t| {
                                    t["phase"] == "Running"
                                        && t["ready"] == true
                                        && t["desired"] == "Running"
                                })
                                .count()
                        });
                        worst.fetch_min(up, Ordering::Relaxed);
                        samples.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let (url, ca) = (c.url(), c.ca_fingerprint().unwrap_or_default());
    let rollout = tokio::task::spawn_blocking(move || {
        harness::ctl(
            &url,
            &ca,
            &["rollout", "restart", "service/web", "--timeout", "90s"],
        )
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    sampler.await?;
    let text = ok(&rollout);
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(
        text.contains("service/web: 1/3 ")
            && text.ends_with("service/web restarted (one replica at a time)\n"),
        "{text}"
    );
    assert!(samples.load(Ordering::Relaxed) > 10, "the sampler ran");
    assert!(
        worst.load(Ordering::Relaxed) >= 2,
        "at some moment only {} of 3 replicas served",
        worst.load(Ordering::Relaxed)
    );
    all_serving(&c, "web", 3).await?;
    let after: Vec<String> = serving(&c, "web")
        .await?
        .iter()
        .filter_map(|t| t["containerId"].as_str().map(str::to_string))
        .collect();
    assert!(
        before.iter().all(|id| !after.contains(id)),
        "every container is new: {before:?} {after:?}"
    );

    // top: the node's figures, then each task's container.
    let top = ok(&c.ctl(&["top", "nodes"]));
    assert!(top.starts_with("NAME ") && top.contains(&node), "{top}");
    eventually(WAIT, "top tasks lists web's containers", || async {
        let t = ok(&c.ctl(&["top", "tasks"]));
        Ok((t.lines().filter(|l| l.starts_with("web-")).count() == 3).then_some(t))
    })
    .await?;

    // Logs of every task a selector picks, each line marked with its task.
    let logs = ok(&c.ctl(&["logs", "-l", "app=misc", "--tail", "5"]));
    assert!(logs.lines().all(|l| l.starts_with("[other-")), "{logs}");

    // Deleting by selector, then every Service.
    let gone = ok(&c.ctl(&["delete", "service", "-l", "app=misc"]));
    assert_eq!(gone, "service/other deleted\n");
    let gone = ok(&c.ctl(&["delete", "services", "--all"]));
    assert_eq!(gone, "service/web deleted\n");
    let none = c.ctl(&["delete", "services", "--all"]);
    assert!(none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("No workloads found"));
    let refused = c.ctl(&["delete", "nodes", "--all"]);
    assert_eq!(refused.status.code(), Some(2));
    Ok(())
}

#[test]
fn the_install_script_puts_the_three_binaries_on_a_prefix() -> Result<()> {
    let prefix = tempfile::tempdir()?;
    let target = bin("bramblectl")
        .parent()
        .and_then(|p| p.parent())
        .map(std::path::Path::to_path_buf)
        .context("target dir")?;
    let out = Command::new(harness::workspace_root().join("scripts/install.sh"))
        .args(["--profile", "dev", "--no-build", "--prefix"])
        .arg(prefix.path())
        .env("CARGO_TARGET_DIR", &target)
        .output()?;
    let stdout = ok(&out);
    for b in ["bramblectl", "bramble-controller", "bramble-agent"] {
        assert!(prefix.path().join("bin").join(b).is_file(), "{b}: {stdout}");
    }
    assert!(stdout.contains("is not on PATH"), "{stdout}");
    let v = Command::new(prefix.path().join("bin/bramblectl"))
        .args(["version", "--client"])
        .output()?;
    assert!(ok(&v).starts_with("Client Version: "));
    let bad = Command::new(harness::workspace_root().join("scripts/install.sh"))
        .args(["--profile", "fast"])
        .output()?;
    assert_eq!(bad.status.code(), Some(64));
    Ok(())
}

/// bramblectl with another token, or none.
fn ctl_as(c: &Controller, token: Option<&str>, args: &[&str], stdin: &[u8]) -> Result<Output> {
    use std::io::Write;
    let mut cmd = Command::new(bin("bramblectl"));
    cmd.args(args)
        .env("BRAMBLE_SERVER", c.url())
        .env(
            "BRAMBLE_CA_FINGERPRINT",
            c.ca_fingerprint().unwrap_or_default(),
        )
        .env("BRAMBLE_CONFIG", "/nonexistent/bramble-test-config.yaml")
        .env_remove("BRAMBLE_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(t) = token {
        cmd.env("BRAMBLE_TOKEN", t);
    }
    let mut child = cmd.spawn()?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin)?;
    }
    Ok(child.wait_with_output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_commands_in_a_real_container_for_the_admin_only() -> Result<()> {
    ensure_test_image().await?;
    let node = harness::unique("exec");
    let c = Controller::start(ControllerOpts {
        local_node: Some(node.clone()),
        args: vec![
            "--viewer-token".into(),
            "exec-viewer-token-0123456789".into(),
        ],
    })
    .await?;
    c.apply("shell.yaml", &service("shell", 1, "shell")).await?;
    all_serving(&c, "shell", 1).await?;
    let admin = Some(ADMIN_TOKEN);

    let out = ctl_as(
        &c,
        admin,
        &[
            "exec",
            "shell",
            "--",
            "/testimg",
            "print",
            "hello from inside",
            "10",
            "1",
        ],
        b"",
    )?;
    let said = ok(&out);
    assert!(
        said.starts_with("hello from inside") && said.lines().count() == 1,
        "{said:?}"
    );
    let code = ctl_as(
        &c,
        admin,
        &["exec", "shell", "--", "/testimg", "exit", "3"],
        b"",
    )?;
    assert_eq!(
        code.status.code(),
        Some(3),
        "the command's exit code is bramblectl's"
    );
    let echoed = ctl_as(
        &c,
        admin,
        &["exec", "-i", "shell", "--", "/testimg", "echo-stdin"],
        b"line one\nline two\n",
    )?;
    assert_eq!(ok(&echoed), "line one\nline two\n");
    let tty = ctl_as(
        &c,
        admin,
        &["exec", "-t", "shell", "--", "/testimg", "isatty"],
        b"",
    )?;
    let text = ok(&tty);
    assert!(text.contains("stdout tty"), "{text:?}");
    let plain = ctl_as(
        &c,
        admin,
        &["exec", "shell", "--", "/testimg", "isatty"],
        b"",
    )?;
    assert!(ok(&plain).contains("stdout pipe"));

    // A viewer may read logs but not run commands; nothing runs without a token.
    let viewer = ctl_as(
        &c,
        Some("exec-viewer-token-0123456789"),
        &[
            "exec",
            "shell",
            "--",
            "/testimg",
            "touch",
            "/viewer-was-here",
        ],
        b"",
    )?;
    assert_eq!(viewer.status.code(), Some(1), "{viewer:?}");
    let anonymous = ctl_as(
        &c,
        None,
        &[
            "exec",
            "shell",
            "--",
            "/testimg",
            "touch",
            "/anonymous-was-here",
        ],
        b"",
    )?;
    assert!(
        String::from_utf8_lossy(&anonymous.stderr).contains("no token was sent"),
        "{anonymous:?}"
    );
    for f in ["/viewer-was-here", "/anonymous-was-here"] {
        let seen = ctl_as(
            &c,
            admin,
            &["exec", "shell", "--", "/testimg", "exists", f],
            b"",
        )?;
        assert_eq!(seen.status.code(), Some(1), "{f} exists: {seen:?}");
    }

    // Errors that name what is wrong.
    let missing = ctl_as(&c, admin, &["exec", "nope", "--", "/testimg", "env"], b"")?;
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no task or workload named \"nope\""),
        "{missing:?}"
    );
    let bad = ctl_as(&c, admin, &["exec", "shell", "--", "/no/such/binary"], b"")?;
    // As with docker exec: the engine's message, and 126 or 127.
    assert!(matches!(bad.status.code(), Some(126 | 127)), "{bad:?}");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&bad.stdout),
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(said.contains("no such file or directory"), "{said}");
    let none = ctl_as(&c, admin, &["exec", "shell"], b"")?;
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("name the command"),
        "{none:?}"
    );
    Ok(())
}
