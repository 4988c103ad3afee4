//! A Wallet's data follows it, on nodes with their own Docker engines and their own
//! disks (each agent's data dir) in their own network namespaces: its agent copies the
//! volume to standby nodes, a failover starts it from the newest complete copy, and the
//! old node's data is set aside when it comes back.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, ensure, Result};
use bramble_tests::eventually;
use bramble_tests::netns::{NetCluster, HEALING_FLAGS};
use bramble_tests::volumes::{copy_in_force, files, synced_after, wallet};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(40);

/// A wallet whose `before` copies `/data/live` to `/data/backup`, syncing every second
/// to `copies` standbys, `*.tmp` excluded.
fn copying_wallet(w: &str, vol: &str, copies: u32) -> String {
    wallet(
        w,
        vol,
        &format!("every: 1s, copies: {copies}, before: [\"/testimg\", \"copy\", \"/data/live\", \"/data/backup\"], exclude: [\"*.tmp\"]"),
    )
}

/// A copying wallet (see [`copying_wallet`]) with `copies` standbys, started, with
/// `/data/live` = "v1" synced to all of them: its name, volume, node, container and the
/// volume's view.
async fn synced_v1(c: &NetCluster, copies: u32) -> Result<(String, String, String, String, Value)> {
    let w = bramble_tests::harness::unique("coin");
    let vol = format!("{w}-data");
    c.apply(&copying_wallet(&w, &vol, copies)).await?;
    let (owner, first) = eventually(WAIT, "the wallet running", || async {
        Ok(c.instances(&w)?.into_iter().next())
    })
    .await?;
    exec_ok(c, &owner, &first, &["write", "/data/live", "v1"]).await?;
    let view = synced_after(c, &vol, SystemTime::now(), copies as usize, WAIT).await?;
    Ok((w, vol, owner, first, view))
}

fn names(m: &BTreeMap<String, Vec<u8>>) -> Vec<&str> {
    m.keys().map(String::as_str).collect()
}

async fn exec_ok(c: &NetCluster, node: &str, id: &str, cmd: &[&str]) -> Result<String> {
    let mut full = vec!["/testimg"];
    full.extend_from_slice(cmd);
    let (ok, out) = c.exec(node, id, &full)?;
    ensure!(ok, "{cmd:?} on {node}: {out}");
    Ok(out)
}

fn reasons(events: &[Value], object: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["object"] == object)
        .filter_map(|e| e["reason"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wallet_comes_back_with_exactly_its_last_complete_copy_and_its_old_data_is_set_aside() {
    let mut c = NetCluster::start_with_engines(3, HEALING_FLAGS)
        .await
        .expect("the cluster starts");
    if let Err(e) = comes_back(&mut c).await {
        panic!("{e:#}\n{}", c.controller().logs());
    }
}

async fn comes_back(c: &mut NetCluster) -> Result<()> {
    let w = bramble_tests::harness::unique("coin");
    let vol = format!("{w}-data");
    c.apply(&copying_wallet(&w, &vol, 1)).await?;
    let (owner, first) = eventually(WAIT, "the wallet running", || async {
        Ok(c.instances(&w)?.into_iter().next())
    })
    .await?;
    exec_ok(c, &owner, &first, &["write", "/data/live", "v1"]).await?;
    exec_ok(
        c,
        &owner,
        &first,
        &["write", "/data/scratch.tmp", "never copied"],
    )
    .await?;
    let wrote = SystemTime::now();
    let view = synced_after(c, &vol, wrote, 1, WAIT).await?;
    let standby = view["copies"][0]["node"]
        .as_str()
        .ok_or_else(|| anyhow!("no copy: {view}"))?
        .to_string();
    ensure!(standby != owner, "{view}");
    let (_, gen) = copy_in_force(&c.data_dir(&standby)?, &w, &vol)?;
    let copied = files(&gen)?;
    ensure!(
        copied.get("live").map(Vec::as_slice) == Some(b"v1")
            && copied.get("backup").map(Vec::as_slice) == Some(b"v1"),
        "the copy holds the volume and what `before` made: {:?}",
        names(&copied)
    );
    ensure!(
        !copied.contains_key("scratch.tmp"),
        "an excluded file was copied"
    );

    // A large change starts a sync that takes seconds (the agent's default cap is
    // 4 MiB/s); the wallet's node loses power in the middle of it.
    exec_ok(c, &owner, &first, &["fill", "/data/big", "24"]).await?;
    exec_ok(c, &owner, &first, &["write", "/data/live", "v2"]).await?;
    let copies_dir = c.data_dir(&standby)?.join("copies").join(&w).join(&vol);
    eventually(
        WAIT,
        "a sync of the change in flight on the standby",
        || async {
            let incoming = std::fs::read_dir(&copies_dir)?
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("incoming-"));
            Ok(incoming.then_some(()))
        },
    )
    .await?;
    let (in_force, gen) = copy_in_force(&c.data_dir(&standby)?, &w, &vol)?;
    let last_complete = files(&gen)?;
    c.power_off(&owner)?;
    // A round may have completed while the big file was still being made (it is then
    // in the copy as it was, whole at that moment); the round carrying it complete, and
    // v2 after it, was cut short.
    ensure!(
        last_complete.get("live").map(Vec::as_slice) == Some(b"v1")
            && last_complete.get("big").is_none_or(|b| b.len() < 24 << 20),
        "the copy in force at the power cut is the last complete one: {:?} ({in_force})",
        names(&last_complete)
    );

    // It runs on the standby (the node holding the newest copy), from that copy.
    let (node, second) = eventually(WAIT, "the wallet running on another node", || async {
        Ok(c.instances(&w)?.into_iter().find(|(n, _)| *n != owner))
    })
    .await?;
    ensure!(
        node == standby,
        "the wallet went to {node}, not to {standby}, which held its copy"
    );
    let restored = files(&c.data_dir(&node)?.join("volumes").join(&vol))?;
    ensure!(
        restored == last_complete,
        "the restored volume is exactly the last complete copy: {:?} vs {:?}",
        names(&restored),
        names(&last_complete)
    );
    ensure!(exec_ok(c, &node, &second, &["cat", "/data/live"]).await? == "v1");
    ensure!(exec_ok(c, &node, &second, &["cat", "/data/backup"]).await? == "v1");
    let view = c.get(&format!("/v1/volumes/{vol}")).await?;
    ensure!(
        view["node"] == node.as_str() && view["origin"]["from"] == "copy",
        "{view}"
    );
    let object = format!("volume/{vol}");
    eventually(WAIT, "a VolumeRestored event", || async {
        let r = reasons(&c.events().await?, &object);
        Ok(r.iter().any(|r| r == "VolumeRestored").then_some(()))
    })
    .await?;

    // The old node comes back: its data (v2 and the big file, newer writes of an older
    // placement) is set aside, not deleted, and not used: the wallet stays where it is.
    c.power_on(&owner)?;
    c.wait_ready(&owner).await?;
    let aside_root = c.data_dir(&owner)?.join("set-aside");
    let aside = eventually(WAIT, "the old node's data set aside", || async {
        let found = std::fs::read_dir(&aside_root)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.is_dir()
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&vol))
            });
        Ok(found)
    })
    .await?;
    let kept = files(&aside)?;
    ensure!(
        kept.get("live").map(Vec::as_slice) == Some(b"v2") && kept.contains_key("big"),
        "the set-aside data is the old node's, whole: {:?}",
        names(&kept)
    );
    ensure!(
        !c.data_dir(&owner)?.join("volumes").join(&vol).exists(),
        "the old node keeps no volume in use"
    );
    eventually(WAIT, "a VolumeSetAside event and the view", || async {
        let r = reasons(&c.events().await?, &object);
        let v = c.get(&format!("/v1/volumes/{vol}")).await?;
        let shown = v["setAside"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["node"] == owner.as_str()));
        Ok((r.iter().any(|r| r == "VolumeSetAside") && shown).then_some(()))
    })
    .await?;
    let running = c.instances(&w)?;
    ensure!(
        running == vec![(node.clone(), second.clone())],
        "the wallet runs once, where it was: {running:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_outlive_a_dead_standby_and_a_newer_placement_replaces_an_older_copy() {
    let mut c = NetCluster::start_with_engines(3, HEALING_FLAGS)
        .await
        .expect("the cluster starts");
    if let Err(e) = two_copies(&mut c).await {
        panic!("{e:#}\n{}", c.controller().logs());
    }
}

async fn two_copies(c: &mut NetCluster) -> Result<()> {
    let (w, vol, owner, first, view) = synced_v1(c, 2).await?;
    let standbys: Vec<String> = view["lastSync"]["done"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    ensure!(standbys.len() == 2 && !standbys.contains(&owner), "{view}");
    let (dead, alive) = (standbys[0].clone(), standbys[1].clone());
    let (old_copy, _) = copy_in_force(&c.data_dir(&dead)?, &w, &vol)?;

    // One standby dies; the owner goes on copying to the other.
    c.power_off(&dead)?;
    c.wait_status(&dead, "NotReady", WAIT).await.ok();
    exec_ok(c, &owner, &first, &["write", "/data/live", "v2"]).await?;
    synced_after(c, &vol, SystemTime::now(), 1, WAIT).await?;
    let (_, gen) = copy_in_force(&c.data_dir(&alive)?, &w, &vol)?;
    ensure!(files(&gen)?.get("live").map(Vec::as_slice) == Some(&b"v2"[..]));

    // The owner dies too: the wallet runs on the standby still alive, with v2.
    c.power_off(&owner)?;
    let (node, second) = eventually(WAIT, "the wallet running on the live standby", || async {
        Ok(c.instances(&w)?.into_iter().find(|(n, _)| *n != owner))
    })
    .await?;
    ensure!(node == alive, "the wallet went to {node}, not to {alive}");
    ensure!(exec_ok(c, &node, &second, &["cat", "/data/live"]).await? == "v2");

    // The dead standby comes back holding a copy of the old placement; it becomes a
    // standby of the new one, whose copy (newer epoch) replaces its old one.
    c.power_on(&dead)?;
    c.wait_ready(&dead).await?;
    let old_epoch = old_copy["epoch"].as_u64().unwrap_or(0);
    let (new_copy, gen) = eventually(
        WAIT,
        "the returning standby holding the new placement's copy",
        || async {
            let (m, gen) = copy_in_force(&c.data_dir(&dead)?, &w, &vol)?;
            Ok((m["epoch"].as_u64().unwrap_or(0) > old_epoch).then_some((m, gen)))
        },
    )
    .await?;
    ensure!(new_copy["owner"] == alive.as_str(), "{new_copy}");
    ensure!(files(&gen)?.get("live").map(Vec::as_slice) == Some(&b"v2"[..]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_while_it_syncs_is_never_restored_torn() {
    let mut c = NetCluster::start_with_engines(2, HEALING_FLAGS)
        .await
        .expect("the cluster starts");
    if let Err(e) = never_torn(&mut c).await {
        panic!("{e:#}\n{}", c.controller().logs());
    }
}

async fn never_torn(c: &mut NetCluster) -> Result<()> {
    let w = bramble_tests::harness::unique("coin");
    let vol = format!("{w}-data");
    // The wallet rewrites its ledger in place all the time (256 KiB per version, a short
    // pause between versions); no `before`: the live file itself is copied.
    let manifest = format!(
        "apiVersion: bramble/v1
kind: Wallet
metadata: {{name: {w}}}
spec:
  image: bramble-testimg:latest
  args: [\"churn\", \"/data/ledger\", \"256\", \"300\"]
  volumes: [{{name: {vol}, path: /data}}]
  sync: {{every: 1s, copies: 1}}
  resources: {{cpu: 200m, memory: 16Mi}}
"
    );
    c.apply(&manifest).await?;
    let (owner, _) = eventually(WAIT, "the wallet running", || async {
        Ok(c.instances(&w)?.into_iter().next())
    })
    .await?;
    let standby = c
        .nodes()
        .into_iter()
        .find(|n| *n != owner)
        .ok_or_else(|| anyhow!("no second node"))?;
    // Several copies in force, each checked: whole versions only.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < 3 && std::time::Instant::now() < deadline {
        if let Ok((m, gen)) = copy_in_force(&c.data_dir(&standby)?, &w, &vol) {
            if let Ok(bytes) = std::fs::read(gen.join("ledger")) {
                ensure!(
                    bytes.len() == 256 << 10,
                    "a copy of the wrong size: {}",
                    bytes.len()
                );
                ensure!(
                    bytes.iter().all(|b| *b == bytes[0]),
                    "a torn ledger in copy {m}"
                );
                seen.insert(m["generation"].as_u64().unwrap_or(0));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(
        seen.len() >= 3,
        "fewer than 3 copies of the ledger completed in 60 s: {seen:?}"
    );
    // The restored ledger is a whole version too.
    c.power_off(&owner)?;
    let (node, id) = eventually(WAIT, "the wallet running on the standby", || async {
        Ok(c.instances(&w)?.into_iter().find(|(n, _)| *n != owner))
    })
    .await?;
    ensure!(node == standby, "the wallet went to {node}");
    let view = c.get(&format!("/v1/volumes/{vol}")).await?;
    ensure!(view["origin"]["from"] == "copy", "{view}");
    // The new instance churns the file again at once: what it started from is the copy
    // in force on its node, which is checked whole.
    let _ = id;
    let (_, gen) = copy_in_force(&c.data_dir(&node)?, &w, &vol)?;
    let bytes = std::fs::read(gen.join("ledger"))?;
    ensure!(
        bytes.iter().all(|b| *b == bytes[0]),
        "the copy restored from is torn"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wallet_that_cannot_go_to_its_standby_fetches_the_copy_from_it() {
    let mut c = NetCluster::start_with_engines(3, HEALING_FLAGS)
        .await
        .expect("the cluster starts");
    if let Err(e) = fetched(&mut c).await {
        panic!("{e:#}\n{}", c.controller().logs());
    }
}

async fn fetched(c: &mut NetCluster) -> Result<()> {
    let (w, vol, owner, _first, view) = synced_v1(c, 1).await?;
    let standby = view["copies"][0]["node"]
        .as_str()
        .ok_or_else(|| anyhow!("no copy: {view}"))?
        .to_string();
    // The standby is cordoned for maintenance: it takes no task, and keeps its copy.
    c.cordon(&standby).await?;
    let third = c
        .nodes()
        .into_iter()
        .find(|n| *n != owner && *n != standby)
        .ok_or_else(|| anyhow!("no third node"))?;
    c.power_off(&owner)?;
    let (node, second) = eventually(WAIT, "the wallet running on the third node", || async {
        Ok(c.instances(&w)?.into_iter().find(|(n, _)| *n != owner))
    })
    .await?;
    ensure!(
        node == third,
        "the wallet went to {node}, not to {third} (the standby {standby} is cordoned)"
    );
    ensure!(
        exec_ok(c, &node, &second, &["cat", "/data/live"]).await? == "v1",
        "the wallet started without its data"
    );
    let v = c.get(&format!("/v1/volumes/{vol}")).await?;
    ensure!(
        v["node"] == node.as_str() && v["origin"]["from"] == "copy",
        "{v}"
    );
    ensure!(
        c.agent(&third)?.logs().contains("fetching the newest copy"),
        "the third node fetched the copy"
    );
    Ok(())
}
