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
