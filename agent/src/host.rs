//! What the agent learns about the machine it runs on: a stable identity and the node
//! name derived from it, and whether Docker can enforce memory limits here.
//!
//! # Identity
//! The operator flashes one SD-card image onto every board, so every board boots with
//! the same host name (`raspberrypi`). The node name therefore comes from the host name
//! only when that was changed from a stock image default; otherwise it is
//! `pi-<last 6 hex digits of the machine id>`. The machine id is the Pi's serial
//! number (`/proc/device-tree/serial-number`, or the `Serial` line of `/proc/cpuinfo`),
//! else `/etc/machine-id`. The name is kept in the data dir's `node-name` file, with
//! the machine id that chose it, so it survives reboots and host-name changes; a card
//! cloned onto another board (another machine id) derives a name of its own.
//!
//! # The memory-cgroup trap
//! Raspberry Pi OS boots with the kernel's memory cgroup disabled. Docker then ignores
//! `--memory` without an error, so `resources.memory` protects nothing and one leaking
//! task can take the whole node down. [`memory_limits`] detects it from Docker's own
//! answer and the kernel's cgroup files; the node reports it with the fix
//! ([`MEMORY_LIMITS_WARNING`]).

use std::path::Path;

use bramble_api::manifest::Name;

use crate::runtime::Runtime;

/// The warning a node without memory-limit support reports, with the fix.
pub const MEMORY_LIMITS_WARNING: &str = "memory limits are not enforced: add \"cgroup_memory=1 cgroup_enable=memory\" to /boot/firmware/cmdline.txt (one line) and reboot";

/// The file in the agent's data dir that keeps the node name.
pub const NODE_NAME_FILE: &str = "node-name";

/// Host names that stock images ship with: shared by every board flashed from the
/// image, so they name no node.
const STOCK_HOSTNAMES: &[&str] = &["raspberrypi", "ubuntu", "localhost", "dietpi", ""];

/// This machine's stable identity, if it has one: the Pi's serial number, else
/// `/etc/machine-id`. Lowercase hex.
pub fn machine_id() -> Option<String> {
    std::fs::read("/proc/device-tree/serial-number")
        .ok()
        .and_then(|b| parse_device_tree_serial(&b))
        .or_else(|| {
            std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|t| parse_cpuinfo_serial(&t))
        })
        .or_else(|| {
            std::fs::read_to_string("/etc/machine-id")
                .ok()
                .and_then(|t| parse_machine_id(&t))
        })
}

/// An identifier if `s` looks like one: hex digits only (at least 6, as the node name
/// takes the last 6), not all zeros (what boards without a programmed serial and some
/// VMs report).
fn identifier(s: &str) -> Option<String> {
    let s = s.trim().to_ascii_lowercase();
    let ok =
        s.len() >= 6 && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0');
    ok.then_some(s)
}

/// `/proc/device-tree/serial-number`: the serial as text, NUL-terminated.
pub fn parse_device_tree_serial(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    identifier(text.trim_end_matches('\0'))
}

/// The `Serial : 00000000abcdef12` line of `/proc/cpuinfo` (Raspberry Pi kernels).
pub fn parse_cpuinfo_serial(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "Serial")
            .then(|| identifier(value))
            .flatten()
    })
}

/// `/etc/machine-id`: 32 hex digits and a newline.
pub fn parse_machine_id(text: &str) -> Option<String> {
    identifier(text)
}

/// The host name as a node name candidate: lowercase, without a domain.
pub fn short_hostname(raw: &str) -> String {
    let h = raw.trim().to_ascii_lowercase();
    h.split('.').next().unwrap_or_default().to_string()
}

/// Whether `hostname` is a stock image's default (every board has it).
pub fn is_stock_hostname(hostname: &str) -> bool {
    STOCK_HOSTNAMES.contains(&hostname)
}

/// The node name when none is given or kept: the host name, unless it is a stock
/// default or not a valid name; then `pi-<last 6 hex digits of the machine id>`.
/// Without a machine id, the host name as a last resort (or `node`).
pub fn default_node_name(hostname: &str, machine_id: Option<&str>) -> String {
    let valid = |n: &str| n.parse::<Name>().is_ok();
    if !is_stock_hostname(hostname) && valid(hostname) {
        return hostname.to_string();
    }
    if let Some(id) = machine_id {
        // Identifiers are ASCII hex (see `identifier`), so this slice is on a boundary.
        let tail = id.get(id.len().saturating_sub(6)..).unwrap_or(id);
        return format!("pi-{tail}");
    }
    if valid(hostname) {
        hostname.to_string()
    } else {
        "node".to_string()
    }
}

/// The `node-name` file's content: the name, and the machine that chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptName {
    /// The node name.
    pub name: String,
    /// The machine id when the name was chosen, if there was one.
    pub machine_id: Option<String>,
}

/// Parses a `node-name` file: the name on the first line, then `machine-id=ID`
/// (optional). An invalid name counts as no name.
pub fn parse_node_name_file(text: &str) -> Option<KeptName> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let name = lines.next()?.to_string();
    name.parse::<Name>().ok()?;
    let machine_id = lines
        .find_map(|l| l.strip_prefix("machine-id="))
        .map(str::to_string);
    Some(KeptName { name, machine_id })
}

/// The text of a `node-name` file.
pub fn format_node_name_file(name: &str, machine_id: Option<&str>) -> String {
    match machine_id {
        Some(id) => format!("{name}\nmachine-id={id}\n"),
        None => format!("{name}\n"),
    }
}

/// Chooses the node name: `flag` (`--node-name`) if given; else the kept name, unless
/// another machine kept it (a cloned SD card); else [`default_node_name`]. Returns
/// the name and whether it must be written to the `node-name` file.
pub fn choose_node_name(
    flag: Option<&str>,
    kept: Option<&KeptName>,
    hostname: &str,
    machine_id: Option<&str>,
) -> (String, bool) {
    let same_machine = |k: &KeptName| match (&k.machine_id, machine_id) {
        (Some(theirs), Some(ours)) => theirs == ours,
        // Kept before an id was known, or the id is unreadable now: trust the file.
        _ => true,
    };
    let name = match (flag, kept) {
        (Some(f), _) => f.to_string(),
        (None, Some(k)) if same_machine(k) => k.name.clone(),
        _ => default_node_name(hostname, machine_id),
    };
    let rewrite = kept.is_none_or(|k| {
        k.name != name || (machine_id.is_some() && k.machine_id.as_deref() != machine_id)
    });
    (name, rewrite)
}

/// Chooses the node name (see [`choose_node_name`]) with the data dir's `node-name`
/// file, and keeps it there. A file that cannot be written costs only the stability
/// across host-name changes, so that is logged, not fatal.
pub fn resolve_node_name(
    flag: Option<&str>,
    data_dir: &Path,
    hostname: &str,
    machine_id: Option<&str>,
) -> String {
    let path = data_dir.join(NODE_NAME_FILE);
    let kept = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| parse_node_name_file(&t));
    let (name, rewrite) = choose_node_name(flag, kept.as_ref(), hostname, machine_id);
    if let Some(k) = kept.as_ref().filter(|k| k.name != name && flag.is_none()) {
        tracing::warn!(kept = %k.name, name = %name, "the kept node name belongs to another machine (a cloned SD card?); choosing a new one");
    }
    if rewrite {
        let written = std::fs::create_dir_all(data_dir)
            .and_then(|()| std::fs::write(&path, format_node_name_file(&name, machine_id)));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep the node name; it may change with the host name");
        }
    }
    if flag.is_none() && machine_id.is_none() && is_stock_hostname(hostname) {
        tracing::warn!(name = %name, "the host name is a stock default and there is no machine id: boards flashed from one image will clash; give each --node-name");
    }
    name
}

/// `/sys/fs/cgroup/cgroup.controllers` (cgroup v2): whether `memory` is among the
/// controllers.
pub fn parse_cgroup_controllers(text: &str) -> bool {
    text.split_whitespace().any(|c| c == "memory")
}

/// `/proc/cgroups` (`subsys_name hierarchy num_cgroups enabled`): whether the memory
/// controller is enabled; `None` without a `memory` line.
pub fn parse_proc_cgroups(text: &str) -> Option<bool> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        match cols.as_slice() {
            ["memory", _, _, enabled, ..] => Some(*enabled != "0"),
            _ => None,
        }
    })
}

/// Whether memory limits are enforced, from Docker's answer (`docker info`:
/// `MemoryLimit`) and the kernel's cgroup files (v2 controllers, v1 `/proc/cgroups`).
/// Any `false` wins: one source saying limits are off is enough to warn.
pub fn combine_memory_evidence(
    docker: Option<bool>,
    cgroup_v2: Option<bool>,
    proc_cgroups: Option<bool>,
) -> Option<bool> {
    let known = [docker, cgroup_v2, proc_cgroups];
    if known.contains(&Some(false)) {
        Some(false)
    } else if known.contains(&Some(true)) {
        Some(true)
    } else {
        None
    }
}

/// Whether Docker enforces memory limits on this node (see the module docs); `None`
/// when neither Docker nor the kernel says.
pub async fn memory_limits(runtime: &Runtime) -> Option<bool> {
    let docker = match runtime.engine_info().await {
        Ok(info) => info.memory_limit,
        Err(e) => {
            tracing::debug!(error = %crate::runtime::error_chain(&e), "cannot ask Docker about memory limits");
            None
        }
    };
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .ok()
        .map(|t| parse_cgroup_controllers(&t));
    // On a v2 host /proc/cgroups lists the controllers as enabled even when the v2
    // hierarchy lacks them, so it only speaks on v1 hosts.
    let v1 = if v2.is_none() {
        std::fs::read_to_string("/proc/cgroups")
            .ok()
            .and_then(|t| parse_proc_cgroups(&t))
    } else {
        None
    };
    combine_memory_evidence(docker, v2, v1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_and_machine_ids() {
        assert_eq!(
            parse_device_tree_serial(b"10000000abcdef12\0").as_deref(),
            Some("10000000abcdef12")
        );
        assert_eq!(parse_device_tree_serial(b"0000000000000000\0"), None);
        assert_eq!(parse_device_tree_serial(b"\xff\xfe"), None);
        let cpuinfo = "processor\t: 0\nmodel name\t: ARMv7 Processor rev 4 (v7l)\n\nHardware\t: BCM2835\nRevision\t: a02082\nSerial\t\t: 00000000ABCDEF12\nModel\t\t: Raspberry Pi 3 Model B Rev 1.2\n";
        assert_eq!(
            parse_cpuinfo_serial(cpuinfo).as_deref(),
            Some("00000000abcdef12")
        );
        assert_eq!(parse_cpuinfo_serial("processor\t: 0\n"), None);
        assert_eq!(parse_cpuinfo_serial("Serial\t\t: 0000000000000000\n"), None);
        assert_eq!(
            parse_machine_id("4c4c4544004e3510804bb4c04f333832\n").as_deref(),
            Some("4c4c4544004e3510804bb4c04f333832")
        );
        for bad in ["", "\n", "not-hex-at-all", "abc", "uninitialized\n"] {
            assert_eq!(parse_machine_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn default_names_avoid_stock_host_names() {
        let id = Some("10000000abcdef12");
        let cases = [
            ("pi-wallet-1", id, "pi-wallet-1"),
            ("raspberrypi", id, "pi-cdef12"),
            ("ubuntu", id, "pi-cdef12"),
            ("localhost", id, "pi-cdef12"),
            ("dietpi", id, "pi-cdef12"),
            ("", id, "pi-cdef12"),
            ("pi_1", id, "pi-cdef12"),
            ("raspberrypi", None, "raspberrypi"),
            ("", None, "node"),
            ("pi3", None, "pi3"),
        ];
        for (host, id, want) in cases {
            assert_eq!(default_node_name(host, id), want, "{host:?} {id:?}");
        }
        assert_eq!(short_hostname("Pi3.example.org\n"), "pi3");
        assert_eq!(short_hostname("localhost.localdomain"), "localhost");
    }

    #[test]
    fn the_kept_name_wins_on_its_own_machine_only() {
        let id = Some("10000000abcdef12");
        let kept = |name: &str, id: Option<&str>| KeptName {
            name: name.into(),
            machine_id: id.map(str::to_string),
        };
        let mine = kept("pi-cdef12", id);
        // First start: derived and kept.
        assert_eq!(
            choose_node_name(None, None, "raspberrypi", id),
            ("pi-cdef12".into(), true)
        );
        // Later starts: the kept name, even after the host name changed.
        assert_eq!(
            choose_node_name(None, Some(&mine), "renamed", id),
            ("pi-cdef12".into(), false)
        );
        // A cloned card on another board: a name of its own.
        assert_eq!(
            choose_node_name(None, Some(&mine), "raspberrypi", Some("10000000aaaaaa99")),
            ("pi-aaaa99".into(), true)
        );
        // The flag overrides, and is kept.
        assert_eq!(
            choose_node_name(Some("wallet-a"), Some(&mine), "raspberrypi", id),
            ("wallet-a".into(), true)
        );
        assert_eq!(
            choose_node_name(None, Some(&kept("wallet-a", id)), "raspberrypi", id),
            ("wallet-a".into(), false)
        );
        // Kept without a machine id: trusted, and the id is added.
        assert_eq!(
            choose_node_name(None, Some(&kept("old", None)), "raspberrypi", id),
            ("old".into(), true)
        );
    }

    #[test]
    fn node_name_files_round_trip() {
        let text = format_node_name_file("pi-cdef12", Some("10000000abcdef12"));
        assert_eq!(
            parse_node_name_file(&text),
            Some(KeptName {
                name: "pi-cdef12".into(),
                machine_id: Some("10000000abcdef12".into())
            })
        );
        assert_eq!(
            parse_node_name_file("pi3\n"),
            Some(KeptName {
                name: "pi3".into(),
                machine_id: None
            })
        );
        assert_eq!(parse_node_name_file(""), None);
        assert_eq!(parse_node_name_file("Not A Name\n"), None);
    }

    #[test]
    fn memory_cgroup_detection() {
        assert!(parse_cgroup_controllers(
            "cpuset cpu io memory hugetlb pids rdma misc\n"
        ));
        assert!(!parse_cgroup_controllers("cpuset cpu io pids\n"));
        assert!(!parse_cgroup_controllers(""));

        let v1_off = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpuset\t2\t1\t1\ncpu\t3\t60\t1\nmemory\t0\t70\t0\npids\t5\t62\t1\n";
        let v1_on = v1_off.replace("memory\t0\t70\t0", "memory\t9\t70\t1");
        assert_eq!(parse_proc_cgroups(v1_off), Some(false));
        assert_eq!(parse_proc_cgroups(&v1_on), Some(true));
        assert_eq!(
            parse_proc_cgroups("#subsys_name\thierarchy\ncpu\t3\t60\t1\n"),
            None
        );

        assert_eq!(
            combine_memory_evidence(Some(false), Some(true), None),
            Some(false)
        );
        assert_eq!(
            combine_memory_evidence(Some(true), None, Some(false)),
            Some(false)
        );
        assert_eq!(
            combine_memory_evidence(Some(true), Some(true), None),
            Some(true)
        );
        assert_eq!(combine_memory_evidence(None, None, Some(true)), Some(true));
        assert_eq!(combine_memory_evidence(None, None, None), None);
    }
}
