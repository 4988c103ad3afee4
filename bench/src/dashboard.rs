//! `bramble-bench dashboard`: the controller's memory with a dozen nodes heartbeating
//! and the dashboard open, and what the dashboard costs on the wire.
//!
//! Twelve real agent processes (different node names, one Docker) heartbeat every
//! 250 ms (the default), twelve one-replica Services run on them, and one client holds `GET
//! /v1/stream` open for the whole time, reading everything as a browser tab would.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bramble_tests::harness::{self, Agent, Controller, ControllerOpts, ADMIN_TOKEN};

use super::{apply, mib, rerun, running_count, wait_ready};

async fn get_len(http: &reqwest::Client, url: &str) -> Result<usize> {
    let r = http.get(url).send().await?;
    if !r.status().is_success() {
        bail!("GET {url}: {}", r.status());
    }
    Ok(r.bytes().await?.len())
}

/// Opens the dashboard's stream as the admin; the response, the size of its opening
/// snapshot event and the bytes of live updates read with it.
pub(crate) async fn open_stream(
    http: &reqwest::Client,
    base: &str,
) -> Result<(reqwest::Response, usize, u64)> {
    let mut stream = http
        .get(format!("{base}/v1/stream"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?;
    if !stream.status().is_success() {
        bail!("GET /v1/stream: {}", stream.status());
    }
    // The snapshot is the first event; everything after it is live updates.
    let mut pending = Vec::new();
    let snapshot = loop {
        let chunk = stream.chunk().await?.context("the stream ended early")?;
        pending.extend_from_slice(&chunk);
        if let Some(i) = pending.windows(2).position(|w| w == b"\n\n") {
            break i + 2;
        }
    };
    let live = (pending.len() - snapshot) as u64;
    Ok((stream, snapshot, live))
}

pub(crate) async fn store_writes(c: &Controller) -> Result<u64> {
    c.get("/v1/status").await?["storeWrites"]
        .as_u64()
        .context("storeWrites in /v1/status")
}

/// Runs the benchmark for `minutes` with `nodes` agents.
pub async fn dashboard(minutes: u64, nodes: usize) -> Result<()> {
    bramble_tests::ensure_test_image().await?;
    let c = Controller::start(ControllerOpts {
        local_node: None,
        args: vec![],
    })
    .await?;
    let prefix = harness::unique("dash");
    let mut agents = Vec::with_capacity(nodes);
    for i in 0..nodes {
        agents.push(Agent::start(&c, &format!("{prefix}-{i}"))?);
    }
    for a in &agents {
        wait_ready(&c, &a.node).await?;
    }
    for i in 0..nodes {
        apply(&c, &format!("dash-{i}")).await?;
    }
    let t = Instant::now();
    while running_count(&c, None).await? < nodes {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("{nodes} tasks not running after 120s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Settle: a few heartbeats and the first container stats rounds.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let pid = c.pid().context("controller pid")?;
    let rss_before = harness::rss_bytes(pid).context("controller RSS")?;

    let http = bramble_tests::http();
    let base = c.url();
    let html = get_len(&http, &format!("{base}/")).await?;
    let js = get_len(&http, &format!("{base}/dashboard/app.js")).await?;
    let css = get_len(&http, &format!("{base}/dashboard/style.css")).await?;

    let (mut stream, snapshot, mut live_bytes) = open_stream(&http, &base).await?;
    let writes_before = store_writes(&c).await?;
    let rss_open = harness::rss_bytes(pid).context("controller RSS")?;
    let mut rss_max = rss_open;
    let run = Duration::from_secs(minutes * 60);
    let start = Instant::now();
    let mut next_sample = start + Duration::from_secs(10);
    let mut frames = 0u64;
    while start.elapsed() < run {
        let left = run.saturating_sub(start.elapsed());
        match tokio::time::timeout(left.min(Duration::from_secs(1)), stream.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                live_bytes += chunk.len() as u64;
                frames += chunk.windows(2).filter(|w| w == b"\n\n").count() as u64;
            }
            Ok(Ok(None)) => bail!("the controller closed the stream"),
            Ok(Err(e)) => bail!("stream: {e}"),
            Err(_) => {}
        }
        if Instant::now() >= next_sample {
            rss_max = rss_max.max(harness::rss_bytes(pid).unwrap_or(0));
            next_sample += Duration::from_secs(10);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rss_end = harness::rss_bytes(pid).context("controller RSS")?;
    let writes = store_writes(&c).await? - writes_before;
    let per_minute = live_bytes as f64 * 60.0 / elapsed;

    println!(
        "dashboard, {nodes} agents heartbeating every 250 ms, {nodes} tasks, one stream open for {minutes} min, {} binaries:",
        harness::PROFILE
    );
    println!(
        "  controller RSS: {} before the stream, {} with it open, {} at the end, {} max",
        mib(rss_before),
        mib(rss_open),
        mib(rss_end),
        mib(rss_max)
    );
    println!(
        "  first page load: {} bytes (HTML {html} + JS {js} + CSS {css}); snapshot event {} bytes",
        html + js + css,
        snapshot
    );
    println!(
        "  live updates: {:.1} KiB per minute ({frames} events, {:.0} bytes/s)",
        per_minute / 1024.0,
        live_bytes as f64 / elapsed
    );
    println!(
        "  store writes while open: {writes} ({:.1} per minute; budget ~0 at rest)",
        writes as f64 * 60.0 / elapsed
    );
    rerun(&format!("dashboard --minutes {minutes} --nodes {nodes}"));
    drop(agents);
    Ok(())
}
