//! The dashboard in a real headless Chromium against a live one-node cluster: sign-in,
//! node card and tasks, live updates without reloads, quick actions, a viewer token's
//! limits, `/metrics`. Needs `scripts/deps-browser.sh`; fails (does not skip) without.
//! Leaves a screenshot in `target/test-artifacts/dashboard.png`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bramble_tests::browser::Browser;
use bramble_tests::harness::{self, Controller, ControllerOpts, ADMIN_TOKEN};
use bramble_tests::{ensure_test_image, eventually};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const VIEWER_TOKEN: &str = "test-viewer-token-0123456789";

fn artifact(name: &str) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| harness::workspace_root().join("target"))
        .join("test-artifacts")
        .join(name)
}

async fn running_task(c: &Controller, workload: &str) -> Result<String> {
    eventually(WAIT, &format!("{workload} running"), || async {
        let tasks = c.get(&format!("/v1/tasks?workload={workload}")).await?;
        Ok(tasks.as_array().and_then(|a| {
            a.iter()
                .find(|t| t["phase"] == "Running" && t["desired"] == "Running")
                .and_then(|t| t["id"].as_str().map(str::to_string))
        }))
    })
    .await
}

/// Polls a script in the page until it returns true.
async fn until(b: &Browser, what: &str, script: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if b.exec(script).await? == Value::Bool(true) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let body = b.text("body").await.unwrap_or_default();
            bail!("{what}: not within {WAIT:?}; the page says:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn sign_in(b: &Browser, token: &str) -> Result<()> {
    b.wait_for("#signin:not([hidden]) #token", WAIT).await?;
    b.type_into("#token", token).await?;
    b.click("#signin-button").await?;
    b.wait_for("#app:not([hidden])", WAIT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_cluster_live_and_limits_viewers() -> Result<()> {
    ensure_test_image().await?;
    let node = harness::unique("dash");
    let c = Controller::start(ControllerOpts {
        local_node: Some(node.clone()),
        args: vec!["--viewer-token".into(), VIEWER_TOKEN.into()],
    })
    .await?;
    c.apply("web.yaml", &harness::web_service("web")).await?;
    let web = running_task(&c, "web").await?;

    let b = Browser::start(1400, 1150, &c).await?;
    b.goto(&format!("{}/", c.url())).await?;
    sign_in(&b, ADMIN_TOKEN).await?;

    // The node card, with its running task.
    let card = format!("article[data-node=\"{node}\"]");
    b.wait_for(&card, WAIT).await?;
    b.wait_for(
        &format!("{card} li.task[data-task=\"{web}\"][data-phase=\"Running\"]"),
        WAIT,
    )
    .await?;
    assert_eq!(b.text("#live").await?, "live");
    assert_eq!(b.text("#role").await?, "admin");
    let head = b.text(&format!("{card} .head")).await?;
    assert!(head.contains("Ready"), "{head}");

    // Changes arrive without a reload: a marker set in the page survives them.
    b.exec("window.__noReload = 42; return true").await?;
    c.apply("api.yaml", &harness::web_service("api")).await?;
    b.wait_for("tr[data-workload=\"Service/api\"]", WAIT)
        .await?;
    let api = running_task(&c, "api").await?;
    b.wait_for(
        &format!("li.task[data-task=\"{api}\"][data-phase=\"Running\"]"),
        WAIT,
    )
    .await?;
    let r = bramble_tests::http()
        .delete(format!("{}/v1/workloads/service/api", c.url()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    assert!(r.status().is_success(), "delete: {}", r.status());
    b.wait_gone("tr[data-workload=\"Service/api\"]", WAIT)
        .await?;
    b.wait_gone(&format!("li.task[data-task=\"{api}\"]"), WAIT)
        .await?;
    until(
        &b,
        "the Deleted event in the feed",
        "return [...document.querySelectorAll('#events li')].some(li => li.textContent.includes('Deleted') && li.textContent.includes('service/api'))",
    )
    .await?;
    assert_eq!(
        b.exec("return window.__noReload").await?,
        42,
        "the page reloaded"
    );

    // Quick actions: cordon and uncordon from the card.
    b.click(&format!("{card} button[data-act=\"cordon\"]"))
        .await?;
    b.wait_for(&format!("{card} .pill.cordoned"), WAIT).await?;
    assert_eq!(c.get(&format!("/v1/nodes/{node}")).await?["cordoned"], true);
    b.click(&format!("{card} button[data-act=\"uncordon\"]"))
        .await?;
    b.wait_gone(&format!("{card} .pill.cordoned"), WAIT).await?;

    // Restart (two clicks): the task is evicted and runs again.
    let restart = "tr[data-workload=\"Service/web\"] button[data-act=\"restart\"]";
    b.click(restart).await?;
    b.click(restart).await?;
    until(
        &b,
        "the Restarting event in the feed",
        "return [...document.querySelectorAll('#events li b')].some(b => b.textContent === 'Restarting')",
    )
    .await?;
    eventually(WAIT, "web running again after the restart", || async {
        let t = &c.get(&format!("/v1/tasks/{web}")).await?;
        Ok(
            (t["phase"] == "Running" && t["desired"] == "Running" && t["restarts"] == 0)
                .then_some(()),
        )
    })
    .await?;
    b.wait_for(
        &format!("{card} li.task[data-task=\"{web}\"][data-phase=\"Running\"]"),
        WAIT,
    )
    .await?;

    // A task's logs in the modal.
    b.click(&format!(
        "li.task[data-task=\"{web}\"] button[data-act=\"logs\"]"
    ))
    .await?;
    b.wait_for("#logs:not([hidden])", WAIT).await?;
    until(
        &b,
        "logs loaded",
        "return !document.querySelector('#logs-text').textContent.startsWith('loading')",
    )
    .await?;
    let logs = b.text("#logs-text").await?;
    assert!(!logs.starts_with("error"), "{logs}");
    b.click("#logs-close").await?;

    // Who leads: one controller here, which leads.
    until(
        &b,
        "the controller chip",
        "return [...document.querySelectorAll('#summary .chip')].some(c => c.textContent.startsWith('Controller') && c.textContent.endsWith('leads'))",
    )
    .await?;

    // A wallet's managed volume, in its row: on this machine's shared engine the agents
    // serve no agent-to-agent port, so it has no copy to fail over to, and says so.
    c.apply(
        "coin.yaml",
        "apiVersion: bramble/v1\nkind: Wallet\nmetadata: {name: coin}\nspec:\n  image: bramble-testimg:latest\n  args: [\"serve\", \"8080\"]\n  volumes: [{name: coin-data, path: /data}]\n  resources: {cpu: 50m, memory: 16Mi}\n",
    )
    .await?;
    until(
        &b,
        "the wallet's volume in its row, marked without a copy",
        "return [...document.querySelectorAll('tr[data-workload=\"Wallet/coin\"] td')].some(td => td.textContent.includes('coin-data') && td.querySelector('.pill.Failed') && td.textContent.includes('no copy'))",
    )
    .await?;

    // Let the sparklines gather a few 10-second points before the picture.
    until(
        &b,
        "two history points",
        &format!("return document.querySelectorAll('{card} .spark.cpu path').length > 0 && (document.querySelector('{card} .spark.cpu path').getAttribute('d').match(/L/g) || []).length >= 1"),
    )
    .await?;
    let png = artifact("dashboard.png");
    b.screenshot(&png).await?;
    let size = std::fs::metadata(&png).context("screenshot written")?.len();
    assert!(
        size > 10_000,
        "screenshot of {size} bytes is suspiciously small"
    );

    // A viewer sees the cluster but no actions, and the API refuses them anyway.
    b.click("#signout").await?;
    sign_in(&b, VIEWER_TOKEN).await?;
    b.wait_for(&format!("{card} li.task[data-task=\"{web}\"]"), WAIT)
        .await?;
    assert_eq!(b.text("#role").await?, "viewer · read-only");
    assert!(b.find("button[data-act=\"cordon\"]").await?.is_none());
    assert!(b.find("button[data-act=\"restart\"]").await?.is_none());
    let status = b
        .exec(&format!(
            "return fetch('/v1/nodes/{node}/cordon', {{method: 'POST', headers: {{Authorization: 'Bearer ' + sessionStorage.getItem('bramble.token')}}}}).then(r => r.status)"
        ))
        .await?;
    assert_eq!(status, 403);
    b.screenshot(&artifact("dashboard-viewer.png")).await?;

    // /metrics takes any token and speaks Prometheus.
    let text = bramble_tests::http()
        .get(format!("{}/metrics", c.url()))
        .bearer_auth(VIEWER_TOKEN)
        .send()
        .await?
        .text()
        .await?;
    for want in [
        format!("bramble_node_status{{node=\"{node}\",status=\"Ready\"}} 1"),
        format!("bramble_node_cpu_percent{{node=\"{node}\"}}"),
        "bramble_tasks{phase=\"Running\"} 2".to_string(),
        "bramble_store_writes_total ".to_string(),
        "bramble_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/workloads/{kind}/{name}/restart\",le=\"+Inf\"} 1".to_string(),
        // The viewer's stream (the admin's may not be noticed as closed yet).
        "bramble_dashboard_clients ".to_string(),
    ] {
        assert!(text.contains(&want), "missing {want} in\n{text}");
    }
    let anonymous = bramble_tests::http()
        .get(format!("{}/metrics", c.url()))
        .send()
        .await?;
    assert_eq!(anonymous.status(), 401);
    Ok(())
}

/// A free TCP port on the host, held by the returned listener.
fn hold_a_port() -> Result<(std::net::TcpListener, u16)> {
    let l = std::net::TcpListener::bind("0.0.0.0:0").context("binding a port")?;
    let port = l.local_addr()?.port();
    Ok((l, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_tasks_are_named_in_red_with_their_reason_and_the_warnings_open_a_list(
) -> Result<()> {
    ensure_test_image().await?;
    let node = harness::unique("fail");
    let c = Controller::start(ControllerOpts {
        local_node: Some(node.clone()),
        args: Vec::new(),
    })
    .await?;
    // Failing without giving up, so each stays on its node's card for the test.
    const KEEP_TRYING: &str =
        "  restart: {policy: Always, maxFailures: 100, backoff: {initial: 1s, max: 4s}}\n";
    // A port a process of the host holds: the container cannot publish it.
    let (_held, port) = hold_a_port()?;
    let manifests = format!(
        "apiVersion: bramble/v1\nkind: Service\nmetadata: {{name: crasher}}\nspec:\n  image: bramble-testimg:latest\n  args: [\"exit\", \"3\"]\n  resources: {{cpu: 50m, memory: 16Mi}}\n{KEEP_TRYING}---\n\
         apiVersion: bramble/v1\nkind: Service\nmetadata: {{name: nopull}}\nspec:\n  image: bramble-no-such-image.invalid/none:1\n  resources: {{cpu: 50m, memory: 16Mi}}\n{KEEP_TRYING}---\n\
         apiVersion: bramble/v1\nkind: Service\nmetadata: {{name: porty}}\nspec:\n  image: bramble-testimg:latest\n  args: [\"serve\", \"8080\"]\n  ports: [{{container: 8080, host: {port}}}]\n  resources: {{cpu: 50m, memory: 16Mi}}\n{KEEP_TRYING}---\n\
         apiVersion: bramble/v1\nkind: CronJob\nmetadata: {{name: tick}}\nspec:\n  schedule: \"0 3 * * *\"\n  image: bramble-testimg:latest\n  args: [\"print\", \"tock\", \"10\", \"1\"]\n  resources: {{cpu: 50m, memory: 16Mi}}\n"
    );
    c.apply("failing.yaml", &manifests).await?;
    // Each is named by the API as the dashboard will name it.
    for (workload, status) in [
        ("crasher", "CrashLoopBackOff"),
        ("nopull", "ImagePullBackOff"),
        ("porty", "PortInUse"),
    ] {
        eventually(WAIT, &format!("{workload} {status}"), || async {
            let tasks = c.get(&format!("/v1/tasks?workload={workload}")).await?;
            Ok(tasks
                .as_array()
                .is_some_and(|a| a.iter().any(|t| t["reason"] == status))
                .then_some(()))
        })
        .await?;
    }
    c.post("/v1/cronjobs/tick/run").await?;

    let b = Browser::start(1400, 1100, &c).await?;
    b.goto(&format!("{}/", c.url())).await?;
    sign_in(&b, ADMIN_TOKEN).await?;
    let card = format!("article[data-node=\"{node}\"]");
    for status in ["CrashLoopBackOff", "ImagePullBackOff", "PortInUse"] {
        b.wait_for(
            &format!("{card} li.task[data-status=\"{status}\"] .pill.lv-failing"),
            WAIT,
        )
        .await?;
        let want = match status {
            "CrashLoopBackOff" => "exited with code 3",
            "ImagePullBackOff" => "pull failed",
            _ => "address already in use",
        };
        // Read in one script: the task's row is redrawn as its status changes, so an
        // element found by one WebDriver call may be gone by the next.
        until(
            &b,
            &format!("{status}'s reason under its task"),
            &format!("const e = document.querySelector('{card} li.task[data-status=\"{status}\"] .why'); return !!e && e.textContent.includes('{want}')"),
        )
        .await?;
    }
    b.wait_for(&format!("{card}.failing"), WAIT).await?;
    until(
        &b,
        "a next try counting down",
        "return [...document.querySelectorAll('.why [data-until]')].some(e => e.textContent.startsWith('in '))",
    )
    .await?;

    // The Warnings chip opens the list of what needs attention, with each failing task.
    b.click("#summary .chip[data-open=\"warnlist\"]").await?;
    b.wait_for("#warnlist:not([hidden])", WAIT).await?;
    let list = b.text("#warnlist-items").await?;
    for want in [
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "PortInUse",
        "service/crasher",
    ] {
        assert!(
            list.contains(want),
            "{want:?} in the warnings list:\n{list}"
        );
    }
    b.screenshot(&artifact("dashboard-warnings.png")).await?;
    b.click("#warnlist-close").await?;

    // A crash loop's repeated events fold into one row with a count.
    until(
        &b,
        "a folded event",
        "return [...document.querySelectorAll('#events .count')].some(c => /^×[2-9]/.test(c.textContent))",
    )
    .await?;
    // The feed filters.
    b.type_into("#event-filter", "nopull").await?;
    until(
        &b,
        "only nopull's events shown",
        "return [...document.querySelectorAll('#events li')].filter(li => !li.hidden).every(li => li.textContent.includes('nopull')) && [...document.querySelectorAll('#events li')].some(li => li.hidden)",
    )
    .await?;
    b.exec("const f = document.querySelector('#event-filter'); f.value = ''; f.dispatchEvent(new Event('input')); return true").await?;

    // The cron job's history: its manual run, with its result, exit code and logs.
    b.click("tr[data-cronjob=\"tick\"] button[data-act=\"history\"]")
        .await?;
    until(
        &b,
        "the run in the history",
        "const h = document.querySelector('tr[data-history=\"tick\"]'); return !!h && h.textContent.includes('Succeeded') && !!h.querySelector('button[data-act=\"logs\"]')",
    )
    .await?;
    let png = artifact("dashboard-failing.png");
    b.screenshot(&png).await?;
    let size = std::fs::metadata(&png).context("screenshot written")?.len();
    assert!(
        size > 10_000,
        "screenshot of {size} bytes is suspiciously small"
    );
    Ok(())
}

/// Twelve nodes (twelve real agents, sharing this machine's engine) on one page: every
/// card there, none squeezed below a readable width or cut off, and a screenshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_nodes_stay_readable() -> Result<()> {
    ensure_test_image().await?;
    let c = Controller::start(ControllerOpts {
        local_node: None,
        args: Vec::new(),
    })
    .await?;
    let prefix = harness::unique("g");
    let names: Vec<String> = (1..=12).map(|i| format!("{prefix}-{i:02}")).collect();
    let mut agents = Vec::new();
    for n in &names {
        agents.push(bramble_tests::harness::Agent::start(&c, n)?);
    }
    eventually(WAIT, "12 nodes Ready", || async {
        let nodes = c.get("/v1/nodes").await?;
        Ok((nodes
            .as_array()
            .map_or(0, |a| a.iter().filter(|n| n["status"] == "Ready").count())
            == 12)
            .then_some(()))
    })
    .await?;
    c.apply(
        "spread.yaml",
        "apiVersion: bramble/v1\nkind: Service\nmetadata: {name: spread}\nspec:\n  image: bramble-testimg:latest\n  args: [\"serve\", \"8080\"]\n  resources: {cpu: 10m, memory: 8Mi}\n  replicas: 12\n",
    )
    .await?;
    eventually(WAIT, "12 replicas running", || async {
        let tasks = c.get("/v1/tasks?workload=spread").await?;
        Ok((tasks
            .as_array()
            .map_or(0, |a| a.iter().filter(|t| t["phase"] == "Running").count())
            == 12)
            .then_some(()))
    })
    .await?;

    let b = Browser::start(1400, 2200, &c).await?;
    b.goto(&format!("{}/", c.url())).await?;
    sign_in(&b, ADMIN_TOKEN).await?;
    until(
        &b,
        "twelve cards, each with its running task",
        "return document.querySelectorAll('#nodes article.card').length === 12 && [...document.querySelectorAll('#nodes article.card')].every(c => c.querySelector('li.task[data-status=\"Running\"]'))",
    )
    .await?;
    let layout = b
        .exec(
            "const cs = [...document.querySelectorAll('#nodes article.card')]; \
             return {minWidth: Math.min(...cs.map(c => c.getBoundingClientRect().width)), \
                     cut: cs.filter(c => c.scrollWidth > c.clientWidth + 1).map(c => c.dataset.node), \
                     columns: new Set(cs.map(c => Math.round(c.getBoundingClientRect().left))).size, \
                     pageOverflow: document.documentElement.scrollWidth > document.documentElement.clientWidth}",
        )
        .await?;
    assert!(
        layout["minWidth"].as_f64().unwrap_or(0.0) >= 300.0,
        "cards too narrow: {layout}"
    );
    assert_eq!(layout["cut"], serde_json::json!([]), "{layout}");
    assert_eq!(layout["pageOverflow"], false, "{layout}");
    assert!(layout["columns"].as_u64().unwrap_or(0) >= 3, "{layout}");
    let png = artifact("dashboard-12-nodes.png");
    b.screenshot(&png).await?;
    let size = std::fs::metadata(&png).context("screenshot written")?.len();
    assert!(
        size > 10_000,
        "screenshot of {size} bytes is suspiciously small"
    );
    drop(agents);
    Ok(())
}
