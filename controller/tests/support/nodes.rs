//! A plain Pi 3 node's Hello: for tests that register nodes straight through the state
//! layer, and the base of the nodes that tests of the agent link say Hello as.

use std::collections::BTreeMap;

use bramble_api::manifest::Arch;
use bramble_api::wire::NodeInfo;

/// An arm64 node with 4 cores and 1 GiB, no labels, as an agent of this version would
/// describe it.
pub fn node(name: &str) -> NodeInfo {
    NodeInfo {
        mesh: None,
        name: name.into(),
        arch: Arch::Arm64,
        cores: 4,
        memory_bytes: 1 << 30,
        docker_version: "20.10.24".into(),
        labels: BTreeMap::new(),
        agent_version: bramble_api::VERSION.into(),
        os: String::new(),
        machine_id: None,
        memory_limits: None,
        warnings: Vec::new(),
    }
}
