//! Why a node cannot get a task running, by name: what its agent reports in a task's
//! status and [`crate::status`] shows.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a node cannot get a task running, as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// The container keeps exiting; it is restarted with back-off.
    CrashLoopBackOff,
    /// The image is not on the node and cannot be pulled; retried with back-off.
    ImagePullBackOff,
    /// A host port the task publishes is taken on the node.
    PortInUse,
    /// The engine refused to create the container.
    CreateContainerError,
    /// The engine created the container but could not start it.
    RunContainerError,
    /// The kernel killed the container for using more memory than its limit.
    #[serde(rename = "OOMKilled")]
    OomKilled,
    /// The liveness probe failed: the container is restarted.
    Unhealthy,
    /// A Wallet stopped by its node's fence: the controller has been silent too long.
    Fenced,
    /// A run went past its timeout (or did not start before its deadline).
    DeadlineExceeded,
    /// The node's host path rules refuse one of the task's volumes.
    HostPathRefused,
    /// A Secret the task reads has no value on the node.
    SecretMissing,
    /// A managed volume could not be readied (made, or restored from its copy).
    VolumeError,
    /// A reason from a newer agent that this version does not know.
    #[serde(other)]
    Unknown,
}

impl Reason {
    /// The name, as shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::CrashLoopBackOff => "CrashLoopBackOff",
            Reason::ImagePullBackOff => "ImagePullBackOff",
            Reason::PortInUse => "PortInUse",
            Reason::CreateContainerError => "CreateContainerError",
            Reason::RunContainerError => "RunContainerError",
            Reason::OomKilled => "OOMKilled",
            Reason::Unhealthy => "Unhealthy",
            Reason::Fenced => "Fenced",
            Reason::DeadlineExceeded => "DeadlineExceeded",
            Reason::HostPathRefused => "HostPathRefused",
            Reason::SecretMissing => "SecretMissing",
            Reason::VolumeError => "VolumeError",
            Reason::Unknown => "Error",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_keep_their_names_on_the_wire_and_unknown_ones_parse() {
        for r in [
            Reason::CrashLoopBackOff,
            Reason::ImagePullBackOff,
            Reason::PortInUse,
            Reason::CreateContainerError,
            Reason::RunContainerError,
            Reason::OomKilled,
            Reason::Unhealthy,
            Reason::Fenced,
            Reason::DeadlineExceeded,
            Reason::HostPathRefused,
            Reason::SecretMissing,
            Reason::VolumeError,
        ] {
            let json = serde_json::to_string(&r).expect("serializes");
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<Reason>(&json).ok(), Some(r));
        }
        assert_eq!(
            serde_json::from_str::<Reason>("\"SomethingNew\"").ok(),
            Some(Reason::Unknown)
        );
    }
}
