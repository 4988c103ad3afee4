//! The example manifests shipped in `manifests/` are valid.

use std::path::Path;

#[test]
fn every_example_manifest_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let mut sources = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("manifests dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let content = std::fs::read_to_string(&path).expect("readable");
            sources.push(bramble_api::rest::Source {
                name: path.display().to_string(),
                content,
            });
        }
    }
    assert!(
        sources.len() >= 4,
        "expected the example manifests, found {}",
        sources.len()
    );
    match bramble_api::parse::parse_sources(&sources) {
        Ok(docs) => {
            let kinds: std::collections::BTreeSet<_> =
                docs.workloads.iter().map(|d| d.manifest.kind).collect();
            assert_eq!(
                kinds.len(),
                3,
                "a Service, a Wallet and a CronJob: {kinds:?}"
            );
            // The wallet's RPC password comes from a Secret, not the manifest.
            assert_eq!(docs.secrets.len(), 1);
        }
        Err(errors) => panic!(
            "{}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

#[test]
fn the_example_wallet_copies_its_consistent_backup_and_not_the_live_wallet() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/ltc-wallet.yaml");
    let text = std::fs::read_to_string(&path).expect("readable");
    let docs = bramble_api::parse::parse_manifests("ltc-wallet.yaml", &text).expect("valid");
    let m = &docs.workloads[0].manifest;
    let rule = m.sync().expect("the wallet's keys follow it");
    assert!(rule.before.iter().any(|w| w == "backupwallet"), "{rule:?}");
    let globs: Vec<_> = rule
        .exclude
        .iter()
        .map(|g| bramble_api::glob::Glob::new(g).expect("valid glob"))
        .collect();
    let out = |p: &str, dir: bool| bramble_api::glob::excluded(&globs, p, dir);
    assert!(out("wallet.dat", false) && out("database", true) && out(".walletlock", false));
    assert!(
        !out("backup", true) && !out("backup/wallet.dat", false),
        "the backup is copied"
    );
    let keys: Vec<_> = m.spec.volumes.iter().filter_map(|v| v.managed()).collect();
    assert_eq!(keys, ["ltc-wallet-keys"]);
}
