//! Volumes that follow a wallet: what a sync costs and how long a restore and a
//! failover take.
//!
//! - Protocol figures, between two agents' real mesh endpoints (mutual TLS on
//!   localhost, real files): bytes sent by a sync of an unchanged 1 GiB volume; bytes
//!   the standby writes in an hour of an idle wallet syncing every minute; the time to
//!   restore a 100 MiB volume from its copy.
//! - Cluster figures, 3 nodes with their own Docker engines and disks in network
//!   namespaces: a wallet's node powered off -> the wallet running elsewhere, with a
//!   100 MiB volume restored from its copy, and with no copy (it starts empty).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context, Result};
use bramble_agent::mesh::Mesh;
use bramble_agent::sync::{push, Duties, Receiver};
use bramble_agent::volumes::Store;
use bramble_api::wire::StandbyDuty;
use bramble_tests::eventually;
use bramble_tests::netns::{NetCluster, HEALING_FLAGS};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::{mib, percentile, rerun};

/// Bytes this process has caused to be written to storage (`/proc/self/io`).
fn written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn fill(path: &Path, bytes: usize, seed: u64) -> Result<()> {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, data).with_context(|| path.display().to_string())
}

struct Pair {
    owner: Arc<Mesh>,
    store: Arc<Store>,
    duties: Arc<Duties>,
    addr: String,
    _dirs: Vec<tempfile::TempDir>,
    task: tokio::task::JoinHandle<()>,
}

impl Pair {
    /// The owner sends `root` to the standby as `w`'s volume `data`, placement 1.
    async fn push(&self, root: &Path) -> Result<bramble_agent::sync::Pushed> {
        Ok(push(
            &self.owner,
            &self.addr,
            "n2",
            ("w", "data", 1),
            root,
            &[],
            0,
        )
        .await?)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An owner's mesh identity and a standby agent's receiver, certified by one CA.
async fn pair() -> Result<Pair> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "bench CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let identity = |name: &str, dir: &Path| -> Result<Arc<Mesh>> {
        let m = Mesh::load_or_new(name, dir)?;
        let key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("mesh.key"))?)?;
        let mut p = CertificateParams::new(vec![name.to_string()])?;
        p.distinguished_name.push(DnType::CommonName, name);
        m.install(&p.signed_by(&key, &issuer)?.pem(), &ca_cert.pem())?;
        Ok(Arc::new(m))
    };
    let (d1, d2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let owner = identity("n1", d1.path())?;
    let standby = identity("n2", d2.path())?;
    let store = Arc::new(Store::open(d2.path())?);
    let duties = Arc::new(Duties::default());
    let receiver = Arc::new(Receiver::new(Arc::clone(&store), Arc::clone(&duties)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (m, r) = (Arc::clone(&standby), Arc::clone(&receiver));
            tokio::spawn(async move {
                if let Ok((stream, req)) = m.accept(tcp).await {
                    r.serve(stream, req).await;
                }
            });
        }
    });
    Ok(Pair {
        owner,
        store,
        duties,
        addr,
        _dirs: vec![d1, d2],
        task,
    })
}

fn duty() -> Vec<StandbyDuty> {
    vec![StandbyDuty {
        workload: "w".into(),
        owner: "n1".into(),
        epoch: 1,
        volumes: vec!["data".into()],
    }]
}

async fn protocol() -> Result<()> {
    let p = pair().await?;
    p.duties.set(duty());
    // 1 GiB in 1,024 files of 1 MiB.
    let vol = tempfile::tempdir()?;
    for i in 0..1024 {
        fill(&vol.path().join(format!("f{i:04}")), 1 << 20, i + 1)?;
    }
    let t = Instant::now();
    let first = p.push(vol.path()).await?;
    let first_took = t.elapsed();
    let mut unchanged = Vec::new();
    let mut unchanged_sent = Vec::new();
    let mut unchanged_written = Vec::new();
    for _ in 0..5 {
        let w0 = written();
        let t = Instant::now();
        let again = p.push(vol.path()).await?;
        unchanged.push(t.elapsed());
        unchanged_sent.push(again.sent);
        unchanged_written.push(written().saturating_sub(w0));
    }
    unchanged.sort();
    unchanged_sent.sort();
    unchanged_written.sort();
    println!("volume sync between two agents (mutual TLS on localhost, no rate cap):");
    println!(
        "  first copy of 1 GiB (1,024 files of 1 MiB):       {} sent in {:.1} s",
        mib(first.sent),
        first_took.as_secs_f64()
    );
    println!(
        "  sync of the unchanged 1 GiB volume:               {} bytes sent (median of 5), {} bytes written on the standby, {:.0} ms (listing both sides)",
        unchanged_sent[2],
        unchanged_written[2],
        percentile(&unchanged, 0.5).as_secs_f64() * 1e3
    );
    drop(vol);

    // An idle wallet: a 4 MiB wallet directory whose backup command rewrites the same
    // bytes every round; 60 rounds are an hour at `every: 1m`.
    let p = pair().await?;
    p.duties.set(duty());
    let wallet = tempfile::tempdir()?;
    std::fs::create_dir_all(wallet.path().join("backup"))?;
    fill(&wallet.path().join("wallet.dat"), 4 << 20, 7)?;
    fill(&wallet.path().join("backup/wallet.dat"), 4 << 20, 7)?;
    p.push(wallet.path()).await?;
    let mut idle_written = 0;
    let mut sent = 0;
    for _ in 0..60 {
        // backupwallet: the same bytes, a new file, a new time (the owner's own write,
        // not counted).
        let tmp = wallet.path().join("backup/wallet.dat.new");
        std::fs::copy(wallet.path().join("wallet.dat"), &tmp)?;
        std::fs::rename(&tmp, wallet.path().join("backup/wallet.dat"))?;
        let w0 = written();
        sent += p.push(wallet.path()).await?.sent;
        idle_written += written().saturating_sub(w0);
    }
    println!(
        "  idle wallet, 4 MiB, backup rewritten each round:  {} bytes written on the standby per hour of 1-minute syncs ({} bytes sent); file data (/proc/self/io write_bytes), not inode and journal updates",
        idle_written,
        sent
    );

    // Restore: a 100 MiB copy into place, as a node taking the wallet over does.
    let p = pair().await?;
    p.duties.set(duty());
    let vol = tempfile::tempdir()?;
    for i in 0..100 {
        fill(&vol.path().join(format!("f{i:03}")), 1 << 20, i + 1)?;
    }
    p.push(vol.path()).await?;
    let mut restores = Vec::new();
    for epoch in 2..5 {
        let t = Instant::now();
        let store = Arc::clone(&p.store);
        let (dir, _) =
            tokio::task::spawn_blocking(move || store.prepare("w", "data", epoch)).await??;
        restores.push(t.elapsed());
        // Next round restores again: the volume goes (it is the bench's own).
        std::fs::remove_dir_all(&dir)?;
        let _ = std::fs::remove_file(dir.with_extension("json"));
    }
    restores.sort();
    println!(
        "  restore of a 100 MiB volume from its copy:        median {:.0} ms, max {:.0} ms (3 rounds; copied and synced to disk)",
        percentile(&restores, 0.5).as_secs_f64() * 1e3,
        restores.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    Ok(())
}

/// Power-off of the wallet's node -> its container running on another node, `rounds`
/// times; between rounds the node comes back and (with copies) a sync completes.
async fn failovers(c: &mut NetCluster, copies: u32, rounds: usize) -> Result<Vec<Duration>> {
    let w = bramble_tests::harness::unique("fo-vol");
    let vol = format!("{w}-data");
    c.apply(&bramble_tests::volumes::wallet(
        &w,
        &vol,
        &format!("every: 2s, copies: {copies}"),
    ))
    .await?;
    let wait = Duration::from_secs(120);
    let mut times = Vec::new();
    for round in 0..rounds {
        let (node, id) = eventually(wait, "the wallet running", || async {
            Ok(c.instances(&w)?.into_iter().next())
        })
        .await?;
        if round == 0 || copies == 0 {
            let (ok, out) = c.exec(&node, &id, &["/testimg", "fill", "/data/chain", "100"])?;
            anyhow::ensure!(ok, "fill: {out}");
        }
        if copies > 0 {
            bramble_tests::volumes::synced_after(c, &vol, SystemTime::now(), 1, wait).await?;
        }
        let t = Instant::now();
        c.power_off(&node)?;
        loop {
            if c.instances(&w)?.iter().any(|(n, _)| *n != node) {
                break;
            }
            if t.elapsed() > wait {
                return Err(anyhow!("the wallet did not run elsewhere within {wait:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        times.push(t.elapsed());
        let (new_node, new_id) = c
            .instances(&w)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("gone"))?;
        let (has, _) = c.exec(&new_node, &new_id, &["/testimg", "exists", "/data/chain"])?;
        anyhow::ensure!(
            has == (copies > 0),
            "the new instance's data: chain present = {has}"
        );
        c.power_on(&node)?;
        c.wait_ready(&node).await?;
    }
    times.sort();
    Ok(times)
}

/// Runs the whole measurement.
pub async fn volumes(rounds: usize) -> Result<()> {
    protocol().await?;
    let mut c = NetCluster::start_with_engines(3, HEALING_FLAGS).await?;
    let with = failovers(&mut c, 1, rounds).await;
    let without = failovers(&mut c, 0, rounds).await;
    if with.is_err() || without.is_err() {
        eprintln!("{}", c.controller().logs());
    }
    let (with, without) = (with?, without?);
    let show = |v: &[Duration]| {
        format!(
            "median {:>5.0} ms   max {:>5.0} ms",
            percentile(v, 0.5).as_secs_f64() * 1e3,
            v.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        )
    };
    println!(
        "failover, 3 nodes with their own engines and disks, controller {}:",
        HEALING_FLAGS.join(" ")
    );
    println!(
        "  power-off -> wallet running elsewhere, 100 MiB restored from its copy: {}   ({rounds} rounds)",
        show(&with)
    );
    println!(
        "  power-off -> wallet running elsewhere, no copy (starts empty):         {}   ({rounds} rounds)",
        show(&without)
    );
    rerun(&format!("volumes --rounds {rounds}"));
    Ok(())
}
