//! The volume sync protocol between two agents' real mesh endpoints (mutual TLS on
//! localhost, real files in temporary data dirs): incremental copies, files rewritten
//! while read, refusals, and a sender lost mid-copy.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bramble_agent::mesh::Mesh;
use bramble_agent::sync::{push, Duties, Receiver, SyncError};
use bramble_agent::volumes::Store;
use bramble_api::glob::Glob;
use bramble_api::wire::StandbyDuty;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::os::unix::fs::PermissionsExt;

struct Ca {
    cert_pem: String,
    params: CertificateParams,
    key: KeyPair,
}

fn ca() -> Ca {
    let key = KeyPair::generate().expect("ca key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "test cluster CA");
    let cert = params.self_signed(&key).expect("ca cert");
    Ca {
        cert_pem: cert.pem(),
        params,
        key,
    }
}

/// A node's mesh identity in `dir`, with a certificate of `ca` for `name`.
fn mesh(ca: &Ca, name: &str, dir: &Path) -> Arc<Mesh> {
    let m = Mesh::load_or_new(name, dir).expect("mesh");
    let key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("mesh.key")).expect("key"))
        .expect("key pem");
    let mut p = CertificateParams::new(vec![name.to_string()]).expect("params");
    p.distinguished_name.push(DnType::CommonName, name);
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = p.signed_by(&key, &issuer).expect("sign");
    m.install(&cert.pem(), &ca.cert_pem).expect("install");
    Arc::new(m)
}

struct Standby {
    store: Arc<Store>,
    duties: Arc<Duties>,
    addr: String,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn standby(ca: &Ca, name: &str) -> Standby {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = mesh(ca, name, dir.path());
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let duties = Arc::new(Duties::default());
    let receiver = Arc::new(Receiver::new(Arc::clone(&store), Arc::clone(&duties)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (m, r) = (Arc::clone(&m), Arc::clone(&receiver));
            tokio::spawn(async move {
                if let Ok((stream, req)) = m.accept(tcp).await {
                    r.serve(stream, req).await;
                }
            });
        }
    });
    Standby {
        store,
        duties,
        addr,
        _dir: dir,
        task,
    }
}

fn duty(owner: &str, epoch: u64) -> Vec<StandbyDuty> {
    vec![StandbyDuty {
        workload: "w".into(),
        owner: owner.into(),
        epoch,
        volumes: vec!["data".into()],
    }]
}

fn copy_root(s: &Standby) -> PathBuf {
    s.store.copy("w", "data").expect("a copy in force").1
}

/// Every file under `root`, with its bytes.
fn files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let m = std::fs::symlink_metadata(e.path()).expect("meta");
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .expect("under")
                    .display()
                    .to_string();
                out.push((rel, std::fs::read(e.path()).expect("read")));
            }
        }
    }
    out.sort();
    out
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn copies_are_exact_incremental_and_carry_attributes() {
    let ca = ca();
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let owner = mesh(&ca, "n1", owner_dir.path());
    let sb = standby(&ca, "n2").await;
    sb.duties.set(duty("n1", 7));

    let vol = tempfile::tempdir().expect("tempdir");
    let root = vol.path();
    std::fs::create_dir_all(root.join("wallets/sub")).expect("mkdir");
    std::fs::write(root.join("wallets/wallet.dat"), pseudo_random(1 << 20, 1)).expect("write");
    std::fs::write(root.join("wallets/sub/backup.dat"), b"backup").expect("write");
    std::fs::set_permissions(
        root.join("wallets/sub/backup.dat"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    std::fs::create_dir_all(root.join("blocks")).expect("mkdir");
    std::fs::write(root.join("blocks/blk0.dat"), pseudo_random(4096, 2)).expect("write");
    std::os::unix::fs::symlink("wallets/wallet.dat", root.join("current")).expect("link");
    let exclude = [Glob::new("blocks/").expect("glob")];

    let first = push(&owner, &sb.addr, "n2", ("w", "data", 7), root, &exclude, 0)
        .await
        .expect("first push");
    assert!(
        first.sent > 1 << 20,
        "the first copy carries everything: {first:?}"
    );
    let copy = copy_root(&sb);
    let mut want = files(root);
    want.retain(|(p, _)| !p.starts_with("blocks"));
    assert_eq!(
        files(&copy),
        want,
        "the copy holds exactly the volume's files, excluded ones left out"
    );
    assert_eq!(
        std::fs::read_link(copy.join("current")).expect("link"),
        Path::new("wallets/wallet.dat")
    );
    let meta = |p: &Path| std::fs::metadata(p).expect("meta");
    assert_eq!(
        meta(&copy.join("wallets/sub/backup.dat"))
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        meta(&copy.join("wallets/wallet.dat"))
            .modified()
            .expect("mtime"),
        meta(&root.join("wallets/wallet.dat"))
            .modified()
            .expect("mtime"),
    );
    let (m1, _) = sb.store.copy("w", "data").expect("copy");
    assert_eq!((m1.epoch, m1.owner.as_str(), m1.files), (7, "n1", 2));

    // Unchanged: only the list crosses the wire.
    let again = push(&owner, &sb.addr, "n2", ("w", "data", 7), root, &exclude, 0)
        .await
        .expect("second push");
    assert!(
        again.sent < 256,
        "an unchanged volume costs the digest of its list only: {again:?}"
    );
    assert_eq!(again.files, 0);
    let (m2, _) = sb.store.copy("w", "data").expect("copy");
    assert_eq!(
        m2.generation, m1.generation,
        "and nothing is written on the standby"
    );

    // A file written again with the same bytes (a backup command run anew): its time
    // changes, its bytes do not cross the wire.
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(root.join("wallets/wallet.dat"), pseudo_random(1 << 20, 1)).expect("write");
    let rewritten = push(&owner, &sb.addr, "n2", ("w", "data", 7), root, &exclude, 0)
        .await
        .expect("push");
    assert!(rewritten.sent < 4096, "same bytes, new time: {rewritten:?}");
    assert_eq!(
        meta(&copy_root(&sb).join("wallets/wallet.dat"))
            .modified()
            .expect("mtime"),
        meta(&root.join("wallets/wallet.dat"))
            .modified()
            .expect("mtime"),
        "the copy carries the new time"
    );
    assert_eq!(files(&copy_root(&sb)), want);

    // One file changes: it alone is sent.
    std::fs::write(root.join("wallets/sub/backup.dat"), b"backup 2").expect("write");
    let third = push(&owner, &sb.addr, "n2", ("w", "data", 7), root, &exclude, 0)
        .await
        .expect("third push");
    assert_eq!(third.files, 1, "{third:?}");
    assert!(third.sent < 8192, "{third:?}");
    assert_eq!(
        std::fs::read(copy_root(&sb).join("wallets/sub/backup.dat")).expect("read"),
        b"backup 2"
    );
    // A deleted file leaves the copy too.
    std::fs::remove_file(root.join("current")).expect("rm");
    push(&owner, &sb.addr, "n2", ("w", "data", 7), root, &exclude, 0)
        .await
        .expect("push");
    assert!(std::fs::symlink_metadata(copy_root(&sb).join("current")).is_err());
    // Old generations do not pile up.
    let gens = std::fs::read_dir(sb.store.copy_dir("w", "data"))
        .expect("dir")
        .count();
    assert_eq!(gens, 2, "CURRENT and one generation");
}

#[tokio::test]
async fn a_file_rewritten_while_read_is_never_stored_torn() {
    let ca = ca();
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let owner = mesh(&ca, "n1", owner_dir.path());
    let sb = standby(&ca, "n2").await;
    sb.duties.set(duty("n1", 3));
    let vol = tempfile::tempdir().expect("tempdir");
    let root = vol.path().to_path_buf();
    const SIZE: usize = 2 << 20;
    std::fs::write(root.join("ledger"), vec![0u8; SIZE]).expect("write");
    // A writer rewrites the file in place, each version all one byte value: a torn copy
    // mixes values.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, path) = (Arc::clone(&stop), root.join("ledger"));
        std::thread::spawn(move || {
            use std::io::{Seek, Write};
            let mut v = 1u8;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("open");
                for _ in 0..(SIZE / 65536) {
                    f.write_all(&[v; 65536]).expect("write");
                }
                f.rewind().expect("rewind");
                drop(f);
                v = v.wrapping_add(1).max(1);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut kept = 0;
    for _ in 0..5 {
        // 8 MiB/s: a read takes ~250 ms, during which the writer runs many times.
        let p = push(
            &owner,
            &sb.addr,
            "n2",
            ("w", "data", 3),
            &root,
            &[],
            8 << 20,
        )
        .await
        .expect("push");
        kept += p.kept_old.len();
        if let Ok(bytes) = std::fs::read(copy_root(&sb).join("ledger")) {
            assert_eq!(bytes.len(), SIZE);
            assert!(
                bytes.iter().all(|b| *b == bytes[0]),
                "a torn copy was stored"
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("writer");
    assert!(
        kept > 0,
        "the writer never overlapped a read: the test proved nothing"
    );
    // Once the file holds still, it is copied.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let p = push(&owner, &sb.addr, "n2", ("w", "data", 3), &root, &[], 0)
        .await
        .expect("push");
    assert!(p.kept_old.is_empty(), "{p:?}");
    assert_eq!(
        std::fs::read(copy_root(&sb).join("ledger")).expect("read"),
        std::fs::read(root.join("ledger")).expect("read")
    );
}

#[tokio::test]
async fn offers_from_another_node_an_old_placement_or_an_unknown_workload_are_refused() {
    let ca = ca();
    let d1 = tempfile::tempdir().expect("tempdir");
    let d3 = tempfile::tempdir().expect("tempdir");
    let n1 = mesh(&ca, "n1", d1.path());
    let n3 = mesh(&ca, "n3", d3.path());
    let sb = standby(&ca, "n2").await;
    let vol = tempfile::tempdir().expect("tempdir");
    std::fs::write(vol.path().join("f"), b"x").expect("write");
    let refused = |r: Result<_, SyncError>| match r {
        Err(SyncError::Mesh(e)) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    // No duty yet.
    let why = refused(push(&n1, &sb.addr, "n2", ("w", "data", 5), vol.path(), &[], 0).await);
    assert!(why.contains("keeps no copy"), "{why}");
    sb.duties.set(duty("n1", 5));
    // Another node of the cluster, with a valid certificate, is not the owner.
    let why = refused(push(&n3, &sb.addr, "n2", ("w", "data", 5), vol.path(), &[], 0).await);
    assert!(why.contains("only n1"), "{why}");
    // The owner, for an old placement.
    let why = refused(push(&n1, &sb.addr, "n2", ("w", "data", 4), vol.path(), &[], 0).await);
    assert!(why.contains("epoch 4"), "{why}");
    push(&n1, &sb.addr, "n2", ("w", "data", 5), vol.path(), &[], 0)
        .await
        .expect("the owner's copy is taken");
    // The workload moved to n3 at epoch 9, n3 sent its copy; a late duty naming n1 at 5
    // again (an old leader) cannot bring an older copy back.
    sb.duties.set(duty("n3", 9));
    push(&n3, &sb.addr, "n2", ("w", "data", 9), vol.path(), &[], 0)
        .await
        .expect("n3's copy");
    sb.duties.set(duty("n1", 5));
    let why = refused(push(&n1, &sb.addr, "n2", ("w", "data", 5), vol.path(), &[], 0).await);
    assert!(why.contains("newer placement"), "{why}");
    assert_eq!(sb.store.copy("w", "data").expect("copy").0.epoch, 9);
}

#[tokio::test]
async fn a_sender_lost_mid_copy_leaves_the_previous_copy_in_force() {
    let ca = ca();
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let owner = mesh(&ca, "n1", owner_dir.path());
    let sb = standby(&ca, "n2").await;
    sb.duties.set(duty("n1", 2));
    let vol = tempfile::tempdir().expect("tempdir");
    std::fs::write(vol.path().join("a"), b"first").expect("write");
    push(&owner, &sb.addr, "n2", ("w", "data", 2), vol.path(), &[], 0)
        .await
        .expect("push");
    // A large change, sent slowly, and the sender gone half way.
    std::fs::write(vol.path().join("a"), b"second").expect("write");
    std::fs::write(vol.path().join("big"), pseudo_random(4 << 20, 3)).expect("write");
    let (o, a, p) = (
        Arc::clone(&owner),
        sb.addr.clone(),
        vol.path().to_path_buf(),
    );
    let sending =
        tokio::spawn(async move { push(&o, &a, "n2", ("w", "data", 2), &p, &[], 1 << 20).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sending.abort();
    let _ = sending.await;
    // The receiver notices the closed stream and drops what it got.
    let dir = sb.store.copy_dir("w", "data");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("incoming-"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the half copy was never removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        files(&copy_root(&sb)),
        vec![("a".to_string(), b"first".to_vec())]
    );
    // A restore now gives the last complete copy.
    let (path, _) = sb.store.prepare("w", "data", 3).expect("restore");
    assert_eq!(files(&path), vec![("a".to_string(), b"first".to_vec())]);
}

#[tokio::test]
async fn the_node_now_running_a_workload_fetches_the_newest_copy_from_its_holder() {
    let ca = ca();
    let d1 = tempfile::tempdir().expect("tempdir");
    let n1 = mesh(&ca, "n1", d1.path());
    let sb = standby(&ca, "n2").await;
    sb.duties.set(duty("n1", 5));
    let vol = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(vol.path().join("backup")).expect("mkdir");
    std::fs::write(
        vol.path().join("backup/wallet.dat"),
        pseudo_random(300_000, 9),
    )
    .expect("write");
    std::fs::write(vol.path().join("live"), b"v1").expect("write");
    push(&n1, &sb.addr, "n2", ("w", "data", 5), vol.path(), &[], 0)
        .await
        .expect("push");
    let (held, _) = sb.store.copy("w", "data").expect("copy");

    // n1 is gone; the wallet now runs on n3 (epoch 9), which holds nothing, and n2 is
    // its standby.
    let d3 = tempfile::tempdir().expect("tempdir");
    let n3 = mesh(&ca, "n3", d3.path());
    let store3 = Arc::new(Store::open(d3.path()).expect("store"));
    let r3 = Receiver::new(Arc::clone(&store3), Arc::new(Duties::default()));
    let source = bramble_api::wire::RestoreSource {
        node: "n2".into(),
        mesh: sb.addr.clone(),
        epoch: held.epoch,
        at: Some(held.at),
    };
    // Before the leader names n3 as the owner, n2 sends nothing.
    let early = r3.fetch(&n3, &source, "w", "data", 9).await;
    assert!(early.is_err(), "{early:?}");
    sb.duties.set(duty("n3", 9));
    // Another node of the cluster cannot take it either.
    let d4 = tempfile::tempdir().expect("tempdir");
    let n4 = mesh(&ca, "n4", d4.path());
    let r4 = Receiver::new(
        Arc::new(Store::open(d4.path()).expect("store")),
        Arc::new(Duties::default()),
    );
    assert!(r4.fetch(&n4, &source, "w", "data", 9).await.is_err());

    let got = r3
        .fetch(&n3, &source, "w", "data", 9)
        .await
        .expect("fetched");
    assert_eq!(
        (got.epoch, got.owner.as_str(), got.at),
        (5, "n1", held.at),
        "the copy keeps its placement and time"
    );
    let (path, origin) = store3.prepare("w", "data", 9).expect("restore");
    assert!(
        matches!(
            origin,
            bramble_api::wire::VolumeOrigin::Copy { epoch: 5, .. }
        ),
        "{origin:?}"
    );
    assert_eq!(
        files(&path),
        files(vol.path()),
        "the volume as the last sync left it"
    );
    // n3 now pushes to n2 as the new owner: nothing but the list crosses the wire.
    let again = push(&n3, &sb.addr, "n2", ("w", "data", 9), &path, &[], 0)
        .await
        .expect("push");
    assert!(again.sent < 4096 && again.files == 0, "{again:?}");
    assert_eq!(sb.store.copy("w", "data").expect("copy").0.epoch, 9);
}

#[tokio::test]
async fn links_in_a_volume_are_copied_as_links_and_never_followed() {
    let ca = ca();
    let d1 = tempfile::tempdir().expect("tempdir");
    let n1 = mesh(&ca, "n1", d1.path());
    let sb = standby(&ca, "n2").await;
    sb.duties.set(duty("n1", 1));
    // What the container planted: links to a directory and a file of the host.
    let host = tempfile::tempdir().expect("tempdir");
    std::fs::write(host.path().join("shadow"), b"root:secret").expect("write");
    let vol = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(host.path(), vol.path().join("etc")).expect("link");
    std::os::unix::fs::symlink(host.path().join("shadow"), vol.path().join("shadow"))
        .expect("link");
    std::fs::write(vol.path().join("own"), b"mine").expect("write");
    push(&n1, &sb.addr, "n2", ("w", "data", 1), vol.path(), &[], 0)
        .await
        .expect("push");
    let copy = copy_root(&sb);
    assert_eq!(
        files(&copy),
        vec![("own".to_string(), b"mine".to_vec())],
        "no host file came along"
    );
    assert_eq!(
        std::fs::read_link(copy.join("etc")).expect("a link"),
        host.path()
    );
    assert!(std::fs::symlink_metadata(copy.join("etc"))
        .expect("meta")
        .file_type()
        .is_symlink());
    // The size the node reports counts the volume's own files only.
    assert_eq!(bramble_agent::volumes::tree_size(vol.path()), (4, 1));
}
