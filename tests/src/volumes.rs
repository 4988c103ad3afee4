//! Volumes that follow a wallet, as tests and benches look at them: a Wallet manifest
//! with a managed volume, the files of a tree, the copy in force in a node's data dir,
//! and waiting for a sync to complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

use crate::eventually;
use crate::netns::NetCluster;

/// A Wallet running `testimg serve 8080` with the managed volume `volume` at `/data`
/// and `sync` as the body of its `sync:` flow map (`every: 1s, copies: 1`).
pub fn wallet(name: &str, volume: &str, sync: &str) -> String {
    format!(
        "apiVersion: bramble/v1
kind: Wallet
metadata: {{name: {name}}}
spec:
  image: bramble-testimg:latest
  args: [\"serve\", \"8080\"]
  volumes: [{{name: {volume}, path: /data}}]
  sync: {{{sync}}}
  resources: {{cpu: 50m, memory: 16Mi}}
"
    )
}

/// Every file under `root` (relative path → bytes).
pub fn files(root: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let m = std::fs::symlink_metadata(e.path())?;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                let rel = e.path().strip_prefix(root)?.display().to_string();
                out.insert(rel, std::fs::read(e.path())?);
            }
        }
    }
    Ok(out)
}

/// The copy in force in a node's data dir: its `CURRENT` record and its directory.
pub fn copy_in_force(data_dir: &Path, workload: &str, volume: &str) -> Result<(Value, PathBuf)> {
    let dir = data_dir.join("copies").join(workload).join(volume);
    let current: Value = serde_json::from_slice(
        &std::fs::read(dir.join("CURRENT"))
            .with_context(|| format!("no copy in {}", dir.display()))?,
    )?;
    let generation = current["generation"]
        .as_u64()
        .ok_or_else(|| anyhow!("CURRENT without a generation: {current}"))?;
    Ok((current, dir.join(format!("gen-{generation}"))))
}

/// Waits up to `wait` for a sync of `volume` that ended after `after`, without error,
/// with a copy complete on at least `on` nodes; the volume's view (`GET /v1/volumes`)
/// then.
pub async fn synced_after(
    c: &NetCluster,
    volume: &str,
    after: SystemTime,
    on: usize,
    wait: Duration,
) -> Result<Value> {
    let after: chrono::DateTime<chrono::Utc> = after.into();
    eventually(wait, "a sync completed after the write", || async {
        let v = c.get(&format!("/v1/volumes/{volume}")).await?;
        let s = &v["lastSync"];
        let at = s["at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        let done = s["done"].as_array().map_or(0, Vec::len);
        let fresh = at.is_some_and(|at| at > after) && s["error"].is_null() && done >= on;
        Ok(fresh.then_some(v))
    })
    .await
}
