//! What goes onto the boot partition, as pure functions of the settings: the first-boot
//! script and its inputs, the agent's systemd units, and the edits of `cmdline.txt` and
//! cloud-init's `user-data`.
//!
//! Everything lives in `bramble/` on the boot partition (it is the one partition every
//! computer can write, and the firmware mounts it at `/boot/firmware` on every supported
//! OS); the script copies it into the root file system on the Pi itself.

use serde_yaml::{Mapping, Value};

use crate::os::{Hook, Os};

/// Where the boot partition is mounted on every supported OS.
pub const BOOT_MOUNT: &str = "/boot/firmware";
/// The directory on the boot partition that holds Bramble's files.
pub const DIR: &str = "bramble";
/// Kernel parameters that turn on the memory cgroup, which Docker's memory limits need
/// and which the Pi kernel leaves off.
pub const CGROUP_PARAMS: [&str; 2] = ["cgroup_memory=1", "cgroup_enable=memory"];
/// The first-boot script (see the file for what it does).
pub const SCRIPT: &str = include_str!("firstboot.sh");

/// Wi-Fi to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wifi {
    /// Network name.
    pub ssid: String,
    /// WPA2 passphrase (8 to 63 characters) or 64 hex digits.
    pub password: String,
    /// ISO 3166 country code, which sets the allowed channels.
    pub country: String,
}

/// What the Pi should be told at first boot (already validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Controller URL; `None` leaves the agent to find it over mDNS.
    pub controller: Option<String>,
    /// The cluster's join token.
    pub join_token: String,
    /// Hostnames become `PREFIX-xxxxxx` (last six hex digits of the serial).
    pub hostname_prefix: String,
    /// Node labels, `key=value`.
    pub labels: Vec<(String, String)>,
    /// `authorized_keys` lines.
    pub ssh_keys: Option<String>,
    /// User the keys are for; `None` for the OS's default user.
    pub ssh_user: Option<String>,
    /// Wi-Fi, if any.
    pub wifi: Option<Wifi>,
}

/// One file to write on the boot partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFile {
    /// Path from the partition's top, `/`-separated.
    pub path: String,
    /// Contents.
    pub data: Vec<u8>,
    /// Holds a secret, which the first-boot script removes.
    pub secret: bool,
}

fn file(path: &str, data: impl Into<Vec<u8>>, secret: bool) -> BootFile {
    BootFile {
        path: path.to_string(),
        data: data.into(),
        secret,
    }
}

/// The files under `bramble/` (and `firstrun.sh` for [`Hook::FirstRun`]), with the agent
/// binary.
pub fn files(s: &Settings, os: &Os, agent: Vec<u8>, gate: Option<Vec<u8>>) -> Vec<BootFile> {
    let mut out = vec![
        file(&format!("{DIR}/bramble-agent"), agent, false),
        file(&format!("{DIR}/firstboot.sh"), SCRIPT, false),
        file(
            &format!("{DIR}/bramble-agent.service"),
            agent_unit(&s.labels),
            false,
        ),
        file(&format!("{DIR}/bramble-docker.service"), DOCKER_UNIT, false),
        file(&format!("{DIR}/settings.env"), settings_env(s, os), false),
        file(&format!("{DIR}/agent.env"), agent_env(s), true),
    ];
    if let Some(gate) = gate {
        out.push(file(&format!("{DIR}/bramble-gate"), gate, false));
    }
    if let Some(keys) = &s.ssh_keys {
        out.push(file(
            &format!("{DIR}/authorized_keys"),
            keys.as_str(),
            false,
        ));
    }
    if let Some(w) = &s.wifi {
        out.push(file(
            &format!("{DIR}/wifi.nmconnection"),
            nm_connection(w),
            true,
        ));
        out.push(file(&format!("{DIR}/wifi.netplan.yaml"), netplan(w), true));
    }
    if os.hook() == Hook::FirstRun {
        out.push(file("firstrun.sh", FIRSTRUN, false));
    }
    out
}

/// `firstrun.sh` at the top of the boot partition, which `systemd.run=` starts.
pub const FIRSTRUN: &str = "#!/bin/sh\n\
# Written by bramble-image. Raspberry Pi OS runs this once, from cmdline.txt's systemd.run=\n\
# hook; the work is done by bramble/firstboot.sh.\n\
exec /bin/sh \"$(dirname \"$0\")/bramble/firstboot.sh\"\n";

/// Installs Docker on first boot if the image has none (the agent needs it); waits for
/// the network, and retries while there is none.
pub const DOCKER_UNIT: &str = "[Unit]\n\
Description=Install Docker for the Bramble agent\n\
Wants=network-online.target\n\
After=network-online.target\n\
ConditionPathExists=!/usr/bin/docker\n\
\n\
[Service]\n\
Type=oneshot\n\
ExecStart=/bin/sh -c 'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io'\n\
Restart=on-failure\n\
RestartSec=30\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n";

/// The agent's unit. Controller and join token come from `/etc/bramble/agent.env`
/// (readable by root only); labels are flags.
pub fn agent_unit(labels: &[(String, String)]) -> String {
    let mut exec = String::from("/usr/local/bin/bramble-agent");
    for (k, v) in labels {
        exec.push(' ');
        exec.push_str(&systemd_quote(&format!("--label={k}={v}")));
    }
    format!(
        "[Unit]\n\
Description=Bramble agent: runs this node's tasks in Docker\n\
Wants=network-online.target\n\
After=network-online.target docker.service bramble-docker.service\n\
\n\
[Service]\n\
EnvironmentFile=/etc/bramble/agent.env\n\
# A system service has no HOME, from which the agent would otherwise derive this.\n\
Environment=BRAMBLE_DATA_DIR=/var/lib/bramble-agent\n\
StateDirectory=bramble-agent\n\
ExecStart={exec}\n\
Restart=always\n\
RestartSec=5\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n"
    )
}

/// Quotes one `ExecStart=` word: double quotes with `\`-escapes, and systemd's `%` and
/// `$` specifiers doubled so they stay literal.
fn systemd_quote(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                q.push('\\');
                q.push(c);
            }
            '%' => q.push_str("%%"),
            '$' => q.push_str("$$"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// `/etc/bramble/agent.env`, a systemd `EnvironmentFile`. The values were checked to
/// hold no quote, backslash or control character, so double quotes suffice.
pub fn agent_env(s: &Settings) -> String {
    let mut out = String::from("# Written by bramble-image.\n");
    if let Some(c) = &s.controller {
        out.push_str(&format!("BRAMBLE_CONTROLLER=\"{c}\"\n"));
    }
    out.push_str(&format!("BRAMBLE_JOIN_TOKEN=\"{}\"\n", s.join_token));
    out
}

/// `bramble/settings.env`, sourced by the script: no secrets.
pub fn settings_env(s: &Settings, os: &Os) -> String {
    let user = s.ssh_user.as_deref().unwrap_or(os.default_user());
    let country = s.wifi.as_ref().map_or("", |w| w.country.as_str());
    format!(
        "# Written by bramble-image; read by firstboot.sh.\n\
BRAMBLE_OS={}\n\
BRAMBLE_HOSTNAME_PREFIX={}\n\
BRAMBLE_SSH_USER={}\n\
BRAMBLE_WIFI_COUNTRY={}\n",
        shell_quote(os.token()),
        shell_quote(&s.hostname_prefix),
        shell_quote(user),
        shell_quote(country),
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A NetworkManager keyfile for the Wi-Fi (Raspberry Pi OS). NetworkManager derives the
/// connection's UUID from the file when there is none.
pub fn nm_connection(w: &Wifi) -> String {
    format!(
        "[connection]\nid=bramble-wifi\ntype=wifi\nautoconnect=true\n\n\
[wifi]\nmode=infrastructure\nssid={}\n\n\
[wifi-security]\nkey-mgmt=wpa-psk\npsk={}\n\n\
[ipv4]\nmethod=auto\n\n[ipv6]\nmethod=auto\n",
        nm_ssid(&w.ssid),
        keyfile_escape(&w.password)
    )
}

/// An SSID for a keyfile: plain text when that is unambiguous, otherwise NetworkManager's
/// other spelling, the bytes as a `;`-terminated list of numbers (a `;` in a plain SSID
/// would make it read as such a list).
fn nm_ssid(ssid: &str) -> String {
    let plain = ssid
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.'))
        && !ssid.starts_with(' ')
        && !ssid.ends_with(' ');
    if plain {
        ssid.to_string()
    } else {
        ssid.bytes().map(|b| format!("{b};")).collect()
    }
}

/// GLib key-file string escaping: backslash, control characters, and leading/trailing
/// spaces (which would otherwise be trimmed).
fn keyfile_escape(s: &str) -> String {
    let mut out = String::new();
    let n = s.chars().count();
    for (i, c) in s.chars().enumerate() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' ' if i == 0 || i == n - 1 => out.push_str("\\s"),
            c => out.push(c),
        }
    }
    out
}

/// A netplan file for the Wi-Fi (Ubuntu); rendered by serde_yaml so any SSID is quoted
/// right.
pub fn netplan(w: &Wifi) -> String {
    let mut ap = Mapping::new();
    ap.insert("password".into(), w.password.clone().into());
    let mut aps = Mapping::new();
    aps.insert(w.ssid.clone().into(), ap.into());
    let mut wlan = Mapping::new();
    wlan.insert("dhcp4".into(), true.into());
    wlan.insert("optional".into(), true.into());
    wlan.insert("regulatory-domain".into(), w.country.clone().into());
    wlan.insert("access-points".into(), aps.into());
    let mut wifis = Mapping::new();
    wifis.insert("wlan0".into(), wlan.into());
    let mut net = Mapping::new();
    net.insert("version".into(), 2.into());
    net.insert("wifis".into(), wifis.into());
    let mut top = Mapping::new();
    top.insert("network".into(), net.into());
    format!(
        "# Written by bramble-image.\n{}",
        serde_yaml::to_string(&top).expect("a mapping of strings always serialises")
    )
}

/// Tokens of the `systemd.run` first-boot hook, ours or Raspberry Pi Imager's.
fn is_hook_token(t: &str) -> bool {
    t.starts_with("systemd.run=")
        || t.starts_with("systemd.run_success_action=")
        || t == "systemd.unit=kernel-command-line.target"
}

/// The new `cmdline.txt`: one line (the firmware reads only the first), the memory
/// cgroup on, and for [`Hook::FirstRun`] the `systemd.run` hook at the end, after the
/// cgroup parameters, because Raspberry Pi Imager's clean-up deletes from ` systemd.run`
/// to the end of the line. Applying it twice changes nothing.
pub fn edit_cmdline(old: &str, hook: Hook) -> String {
    let mut tokens: Vec<&str> = old
        .split_whitespace()
        .filter(|t| !is_hook_token(t))
        .collect();
    for p in CGROUP_PARAMS {
        if !tokens.contains(&p) {
            tokens.push(p);
        }
    }
    let run = format!("systemd.run={BOOT_MOUNT}/firstrun.sh");
    if hook == Hook::FirstRun {
        tokens.extend([
            run.as_str(),
            "systemd.run_success_action=reboot",
            "systemd.unit=kernel-command-line.target",
        ]);
    }
    let mut line = tokens.join(" ");
    line.push('\n');
    line
}

/// The `runcmd` entry that starts the script.
fn runcmd_entry() -> Value {
    Value::Sequence(vec![
        "sh".into(),
        format!("{BOOT_MOUNT}/{DIR}/firstboot.sh").into(),
    ])
}

/// The new cloud-init `user-data`: the existing `#cloud-config` with a `runcmd` entry
/// for the script (added once), and `preserve_hostname` so cloud-init does not put its
/// own hostname back over the one derived from the serial. Everything else the image
/// had (users, passwords, packages) is kept; comments are not. `Err` says why the
/// existing file cannot be merged.
pub fn edit_user_data(old: Option<&str>) -> Result<String, String> {
    let old = old.unwrap_or("").trim_start_matches('\u{feff}');
    let first = old
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if first.starts_with("#!") {
        return Err("it is a shell script, not #cloud-config".into());
    }
    if first.to_ascii_lowercase().starts_with("content-type:") {
        return Err("it is a MIME multi-part archive, not #cloud-config".into());
    }
    if first.starts_with('#')
        && !first.starts_with("#cloud-config")
        && !old
            .lines()
            .skip(1)
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err(format!("it starts with {first:?}, not #cloud-config"));
    }
    let mut top = match serde_yaml::from_str::<Value>(old) {
        Ok(Value::Mapping(m)) => m,
        Ok(Value::Null) => Mapping::new(),
        Ok(_) => return Err("it is not a YAML mapping".into()),
        Err(e) => return Err(format!("it is not valid YAML: {e}")),
    };
    let entry = runcmd_entry();
    let runcmd = top
        .entry("runcmd".into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    match runcmd {
        Value::Sequence(items) => {
            if !items.contains(&entry) {
                items.push(entry);
            }
        }
        Value::Null => *runcmd = Value::Sequence(vec![entry]),
        _ => return Err("its runcmd is not a list".into()),
    }
    top.remove("hostname");
    top.remove("fqdn");
    top.insert("preserve_hostname".into(), true.into());
    let body = serde_yaml::to_string(&Value::Mapping(top)).map_err(|e| e.to_string())?;
    Ok(format!(
        "#cloud-config\n\
# Edited by bramble-image: runcmd runs {BOOT_MOUNT}/{DIR}/firstboot.sh, which installs the\n\
# Bramble agent and names the host after the board's serial number.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            controller: Some("https://10.0.0.2:7878".into()),
            join_token: "tok-123".into(),
            hostname_prefix: "bramble".into(),
            labels: vec![
                ("disk".into(), "ssd".into()),
                ("odd".into(), "a b\"$%".into()),
            ],
            ssh_keys: Some("ssh-ed25519 AAAA me@host\n".into()),
            ssh_user: None,
            wifi: Some(Wifi {
                ssid: "Pool; Wi-Fi".into(),
                password: "correct horse".into(),
                country: "SE".into(),
            }),
        }
    }

    #[test]
    fn cmdline_gets_cgroups_and_hook_on_one_line_once() {
        let old = "console=serial0,115200 console=tty1 root=PARTUUID=1234-02 rootfstype=ext4 fsck.repair=yes rootwait quiet\n";
        let once = edit_cmdline(old, Hook::FirstRun);
        assert_eq!(
            once,
            "console=serial0,115200 console=tty1 root=PARTUUID=1234-02 rootfstype=ext4 fsck.repair=yes rootwait quiet \
cgroup_memory=1 cgroup_enable=memory systemd.run=/boot/firmware/firstrun.sh \
systemd.run_success_action=reboot systemd.unit=kernel-command-line.target\n"
        );
        assert_eq!(edit_cmdline(&once, Hook::FirstRun), once);
        let cloud = edit_cmdline(&once, Hook::CloudInit);
        assert!(!cloud.contains("systemd.run"));
        assert_eq!(cloud.matches("cgroup_enable=memory").count(), 1);
        // Broken over lines (an editor's doing): joined again.
        let joined = edit_cmdline("a b\r\nc\n\n", Hook::CloudInit);
        assert_eq!(joined, "a b c cgroup_memory=1 cgroup_enable=memory\n");
    }

    #[test]
    fn cmdline_replaces_imagers_hook() {
        let old = "root=x systemd.run=/boot/firstrun.sh systemd.run_success_action=reboot systemd.unit=kernel-command-line.target";
        let new = edit_cmdline(old, Hook::FirstRun);
        assert_eq!(new.matches("systemd.run=").count(), 1);
        assert!(new.contains("systemd.run=/boot/firmware/firstrun.sh"));
    }

    #[test]
    fn user_data_keeps_what_was_there_and_adds_runcmd_once() {
        let ubuntu = "#cloud-config\n# comment\nchpasswd:\n  expire: true\n  users:\n  - name: ubuntu\n    password: ubuntu\n    type: text\nssh_pwauth: true\nhostname: ubuntu\nruncmd:\n- [echo, hi]\n";
        let once = edit_user_data(Some(ubuntu)).expect("merges");
        assert!(once.starts_with("#cloud-config\n"));
        let v: Value = serde_yaml::from_str(&once).expect("valid yaml");
        assert_eq!(v["ssh_pwauth"], Value::Bool(true));
        assert_eq!(v["chpasswd"]["users"][0]["name"], Value::from("ubuntu"));
        assert_eq!(v["preserve_hostname"], Value::Bool(true));
        assert!(v.get("hostname").is_none());
        let runcmd = v["runcmd"].as_sequence().expect("list");
        assert_eq!(runcmd.len(), 2);
        assert_eq!(runcmd[1], runcmd_entry());
        assert_eq!(edit_user_data(Some(&once)).expect("merges"), once);
    }

    #[test]
    fn user_data_from_nothing() {
        for old in [
            None,
            Some(""),
            Some("#cloud-config\n"),
            Some("# just a comment\n"),
        ] {
            let new = edit_user_data(old).expect("merges");
            let v: Value = serde_yaml::from_str(&new).expect("valid yaml");
            assert_eq!(
                v["runcmd"],
                Value::Sequence(vec![runcmd_entry()]),
                "{old:?}"
            );
        }
    }

    #[test]
    fn user_data_that_cannot_be_merged() {
        for old in [
            "#!/bin/sh\necho hi\n",
            "Content-Type: multipart/mixed; boundary=x\n",
            "#cloud-config\n- a\n- b\n",
            "#cloud-config\nruncmd: echo\n",
            "#cloud-config\nkey: [unclosed\n",
        ] {
            assert!(edit_user_data(Some(old)).is_err(), "{old:?}");
        }
    }

    #[test]
    fn unit_quotes_labels_for_systemd() {
        let u = agent_unit(&settings().labels);
        assert!(u.contains(
            "ExecStart=/usr/local/bin/bramble-agent \"--label=disk=ssd\" \"--label=odd=a b\\\"$$%%\"\n"
        ));
        assert!(u.contains("EnvironmentFile=/etc/bramble/agent.env"));
    }

    #[test]
    fn secrets_are_marked_and_settings_hold_none() {
        let s = settings();
        let files = files(
            &s,
            &Os::PiOsBookworm,
            b"ELF".to_vec(),
            Some(b"GATE".to_vec()),
        );
        assert!(files
            .iter()
            .any(|f| f.path == "bramble/bramble-gate" && f.data == b"GATE" && !f.secret));
        let secret: Vec<&str> = files
            .iter()
            .filter(|f| f.secret)
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(
            secret,
            [
                "bramble/agent.env",
                "bramble/wifi.nmconnection",
                "bramble/wifi.netplan.yaml"
            ]
        );
        for f in files.iter().filter(|f| !f.secret) {
            let text = String::from_utf8_lossy(&f.data);
            assert!(
                !text.contains("tok-123") && !text.contains("correct horse"),
                "{}",
                f.path
            );
        }
        assert!(files.iter().any(|f| f.path == "firstrun.sh"));
        let cloud = super::files(&s, &Os::PiOsTrixie, Vec::new(), None);
        assert!(!cloud.iter().any(|f| f.path == "bramble/bramble-gate"));
        assert!(!cloud.iter().any(|f| f.path == "firstrun.sh"));
        let env = settings_env(
            &s,
            &Os::Ubuntu {
                version: "24.04".into(),
            },
        );
        assert!(
            env.contains("BRAMBLE_OS='ubuntu'\n") && env.contains("BRAMBLE_SSH_USER='ubuntu'\n")
        );
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn wifi_files_escape_the_ssid() {
        let w = settings().wifi.expect("set");
        assert!(nm_connection(&w).contains("ssid=80;111;111;108;59;32;87;105;45;70;105;\n"));
        assert_eq!(nm_ssid("Pool Wi-Fi_2.4"), "Pool Wi-Fi_2.4");
        assert!(nm_connection(&w).contains("psk=correct horse\n"));
        let v: Value = serde_yaml::from_str(&netplan(&w)).expect("valid yaml");
        let ap = &v["network"]["wifis"]["wlan0"]["access-points"]["Pool; Wi-Fi"];
        assert_eq!(ap["password"], Value::from("correct horse"));
        assert_eq!(
            v["network"]["wifis"]["wlan0"]["regulatory-domain"],
            Value::from("SE")
        );
        assert_eq!(keyfile_escape(" a\\b "), "\\sa\\\\b\\s");
    }

    #[test]
    fn agent_env_without_controller_relies_on_mdns() {
        let mut s = settings();
        s.controller = None;
        assert_eq!(
            agent_env(&s),
            "# Written by bramble-image.\nBRAMBLE_JOIN_TOKEN=\"tok-123\"\n"
        );
    }
}
