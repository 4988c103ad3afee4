//! A plain Pi 3 node's Hello, for tests that register nodes straight through the state
//! layer.

use std::collections::BTreeMap;

use bramble_api::manifest::Arch;
use bramble_api::wire::NodeInfo;

/// An arm64 node with 4 cores and 1 GiB, no labels, as an agent would describe it.
pub fn node(name: &str) -> NodeInfo {
    NodeInfo {
        mesh: None,
        name: name.into(),
        arch: Arch::Arm64,
        cores: 4,
        memory_bytes: 1 << 30,
        docker_version: "20.10".into(),
        labels: BTreeMap::new(),
        agent_version: "0".into(),
        os: String::new(),
        machine_id: None,
        memory_limits: None,
        warnings: Vec::new(),
    }
}
