//! `bramble-image build` on synthetic images of every supported OS, `.img` and `.img.xz`:
//! what it writes is read back (FAT with fatfs, ext4 with debugfs), the first-boot script
//! it writes is run against a scratch root, and bad inputs fail clearly without leaving
//! an output behind.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_yaml::Value;
use support::{Flavor, Spec};

const TOKEN: &str =
    "BRAMBLE1-9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08-join.secret_XYZ0123";
const CONTROLLER: &str = "https://10.0.0.2:7878";
const SSH_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBramble operator@laptop";
const WIFI_SSID: &str = "Pool Net";
const WIFI_PASSWORD: &str = "correct horse battery";
/// What the fake board reports as its serial number (device tree form, NUL-terminated).
const SERIAL: &[u8] = b"00000000c0ffee42\0";
const HOSTNAME: &str = "pool-ffee42";

/// A scratch directory with the inputs every build needs.
struct Work {
    dir: tempfile::TempDir,
    agent64: Vec<u8>,
    agent32: Vec<u8>,
    gate64: Vec<u8>,
    gate32: Vec<u8>,
}

impl Work {
    fn new() -> Work {
        support::require_tools();
        let dir = tempfile::tempdir().expect("tempdir");
        let agent64 = support::fake_elf(true, 300 << 10);
        let agent32 = support::fake_elf(false, 200 << 10);
        std::fs::write(dir.path().join("agent-arm64"), &agent64).expect("write agent");
        std::fs::write(dir.path().join("agent-armhf"), &agent32).expect("write agent");
        let gate64 = support::fake_elf(true, 40 << 10);
        let gate32 = support::fake_elf(false, 30 << 10);
        std::fs::write(dir.path().join("gate-arm64"), &gate64).expect("write gate");
        std::fs::write(dir.path().join("gate-armhf"), &gate32).expect("write gate");
        std::fs::write(dir.path().join("id.pub"), format!("{SSH_KEY}\n")).expect("write key");
        std::fs::write(dir.path().join("wifi.txt"), format!("{WIFI_PASSWORD}\n"))
            .expect("write pw");
        std::fs::write(dir.path().join("join-token"), format!("{TOKEN}\n")).expect("write token");
        Work {
            dir,
            agent64,
            agent32,
            gate64,
            gate32,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The flags of a full build, with the agent for `arm64` or armhf.
    fn args(&self, arm64: bool) -> Vec<String> {
        let agent = self.path(if arm64 { "agent-arm64" } else { "agent-armhf" });
        let gate = self.path(if arm64 { "gate-arm64" } else { "gate-armhf" });
        [
            "--controller",
            CONTROLLER,
            "--join-token-file",
            "join-token",
            "--hostname-prefix",
            "pool",
            "--wifi-ssid",
            WIFI_SSID,
            "--wifi-country",
            "se",
            "--label",
            "disk=ssd",
            "--label",
            "zone=rack 1",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--agent".to_string(),
            agent.display().to_string(),
            "--gate".to_string(),
            gate.display().to_string(),
            "--ssh-key".to_string(),
            self.path("id.pub").display().to_string(),
            "--wifi-password-file".to_string(),
            self.path("wifi.txt").display().to_string(),
        ])
        .collect()
    }

    fn build(&self, base: &Path, out: &Path, args: &[String]) -> Output {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        support::run_build(base, out, &args, self.dir.path())
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "bramble-image failed ({}):\n{}",
        o.status,
        text(&o.stderr)
    );
}

/// The build failed with `needle` in its message, and left no output file.
fn assert_fails(o: &Output, needle: &str, out: &Path) {
    assert!(
        !o.status.success(),
        "expected a failure mentioning {needle:?}"
    );
    let err = text(&o.stderr);
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    assert!(!out.exists(), "{} was left behind", out.display());
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    assert!(
        !Path::new(&partial).exists(),
        "the partial output was left behind"
    );
}

/// Builds from a synthetic image of `flavor` and checks everything written.
fn builds(flavor: Flavor, arm64: bool, xz: bool) {
    let w = Work::new();
    let spec = Spec {
        arm64,
        ..Spec::new(flavor)
    };
    let base = support::make_image(w.dir.path(), "base", &spec, xz);
    let before = support::hash_file(&base);
    let out = w.path("out.img");
    let o = w.build(&base, &out, &w.args(arm64));
    assert_ok(&o);
    assert_eq!(support::hash_file(&base), before, "the base image changed");
    assert!(!w.path("out.img.partial").exists());
    assert_eq!(mode_of(&out), 0o600, "it holds the join token");
    let summary = text(&o.stdout);
    assert!(
        summary.contains(if arm64 { "(arm64)" } else { "(armhf)" }),
        "{summary}"
    );

    let boot = support::read_boot(&out);
    let agent = if arm64 { &w.agent64 } else { &w.agent32 };
    let gate = if arm64 { &w.gate64 } else { &w.gate32 };
    check_boot(flavor, &boot, agent);
    assert_eq!(boot["bramble/bramble-gate"], *gate, "cron gate");

    // The root partition is read, never written: byte for byte the base's (for an .xz
    // base, as decompressed here independently).
    let reference = if xz {
        let r = w.path("reference.img");
        let mut dec = xz2::read::XzDecoder::new(std::fs::File::open(&base).expect("open base"));
        std::io::copy(&mut dec, &mut std::fs::File::create(&r).expect("create"))
            .expect("decompress");
        r
    } else {
        base.clone()
    };
    let root_of = |img: &Path| {
        let p = support::partitions(img)
            .into_iter()
            .find(|p| p.is_linux())
            .expect("root");
        support::partition_bytes(img, &p)
    };
    assert!(
        root_of(&out) == root_of(&reference),
        "the root partition changed"
    );
    assert_eq!(
        support::read_root(&out, "/usr/lib/os-release").is_empty(),
        flavor == Flavor::Trixie
    );
    let release = support::read_root(
        &out,
        if flavor == Flavor::Trixie {
            "/etc/os-release"
        } else {
            "/usr/lib/os-release"
        },
    );
    assert_eq!(release, support::os_release(flavor));

    first_boot(flavor, &boot, agent);
}

/// Everything on the boot partition is as it should be.
fn check_boot(flavor: Flavor, boot: &BTreeMap<String, Vec<u8>>, agent: &[u8]) {
    let get = |p: &str| {
        text(
            boot.get(p)
                .unwrap_or_else(|| panic!("{p} missing from the boot partition")),
        )
    };
    assert_eq!(boot["bramble/bramble-agent"], agent, "agent binary");
    assert_eq!(
        get("config.txt"),
        support::CONFIG,
        "config.txt is untouched"
    );

    let cmdline = get("cmdline.txt");
    assert_eq!(
        cmdline.lines().count(),
        1,
        "cmdline.txt must stay one line: {cmdline:?}"
    );
    assert!(cmdline.ends_with('\n'));
    assert!(
        cmdline.starts_with(support::CMDLINE.trim_end()),
        "original parameters kept: {cmdline}"
    );
    assert_eq!(cmdline.matches("cgroup_memory=1").count(), 1);
    assert_eq!(cmdline.matches("cgroup_enable=memory").count(), 1);
    let hooked = cmdline.contains("systemd.run=/boot/firmware/firstrun.sh systemd.run_success_action=reboot systemd.unit=kernel-command-line.target");
    assert_eq!(hooked, flavor == Flavor::Bookworm, "{cmdline}");
    assert_eq!(boot.contains_key("firstrun.sh"), flavor == Flavor::Bookworm);

    let script = get("bramble/firstboot.sh");
    assert!(script.starts_with("#!/bin/sh\n"));
    let env = get("bramble/agent.env");
    assert!(
        env.contains(&format!("BRAMBLE_CONTROLLER=\"{CONTROLLER}\"\n")),
        "{env}"
    );
    assert!(
        env.contains(&format!("BRAMBLE_JOIN_TOKEN=\"{TOKEN}\"\n")),
        "{env}"
    );
    let unit = get("bramble/bramble-agent.service");
    assert!(
        unit.contains(
            "ExecStart=/usr/local/bin/bramble-agent \"--label=disk=ssd\" \"--label=zone=rack 1\"\n"
        ),
        "{unit}"
    );
    assert!(unit.contains("EnvironmentFile=/etc/bramble/agent.env"));
    assert!(get("bramble/bramble-docker.service").contains("apt-get install -y docker.io"));
    let settings = get("bramble/settings.env");
    let os = match flavor {
        Flavor::Bookworm => "bookworm",
        Flavor::Trixie => "trixie",
        _ => "ubuntu",
    };
    assert!(
        settings.contains(&format!("BRAMBLE_OS='{os}'\n")),
        "{settings}"
    );
    assert!(settings.contains("BRAMBLE_HOSTNAME_PREFIX='pool'\n"));
    assert!(settings.contains("BRAMBLE_WIFI_COUNTRY='SE'\n"));
    assert_eq!(get("bramble/authorized_keys"), format!("{SSH_KEY}\n"));
    assert!(get("bramble/wifi.nmconnection").contains(&format!("psk={WIFI_PASSWORD}\n")));
    let netplan: Value =
        serde_yaml::from_str(&get("bramble/wifi.netplan.yaml")).expect("netplan yaml");
    assert_eq!(
        netplan["network"]["wifis"]["wlan0"]["access-points"][WIFI_SSID]["password"],
        Value::from(WIFI_PASSWORD)
    );
    // Secrets are only in the files the script removes.
    for (p, data) in boot {
        if ![
            "bramble/agent.env",
            "bramble/wifi.nmconnection",
            "bramble/wifi.netplan.yaml",
        ]
        .contains(&p.as_str())
        {
            let t = text(data);
            assert!(
                !t.contains(TOKEN) && !t.contains(WIFI_PASSWORD),
                "a secret in {p}"
            );
        }
    }

    if flavor != Flavor::Bookworm {
        let ud = get("user-data");
        assert!(ud.starts_with("#cloud-config\n"), "{ud}");
        let v: Value = serde_yaml::from_str(&ud).expect("user-data yaml");
        let runcmd = v["runcmd"].as_sequence().expect("runcmd list");
        assert_eq!(
            runcmd,
            &vec![Value::Sequence(vec![
                "sh".into(),
                "/boot/firmware/bramble/firstboot.sh".into()
            ])]
        );
        assert_eq!(v["preserve_hostname"], Value::Bool(true));
        assert!(boot.contains_key("meta-data"));
        if flavor == Flavor::Ubuntu {
            // Ubuntu's own first-boot settings survive.
            assert_eq!(v["chpasswd"]["users"][0]["name"], Value::from("ubuntu"));
            assert_eq!(v["ssh_pwauth"], Value::Bool(true));
        }
    }
}

/// Runs the written first-boot script as the Pi would, against a scratch root
/// (`BRAMBLE_ROOT`), and checks what it installed and what it left on the boot partition.
fn first_boot(flavor: Flavor, files: &BTreeMap<String, Vec<u8>>, agent: &[u8]) {
    let scratch = tempfile::tempdir().expect("tempdir");
    let boot = scratch.path().join("boot");
    let root = scratch.path().join("root");
    support::extract(files, &boot);
    let user = if flavor == Flavor::Ubuntu {
        "ubuntu"
    } else {
        "pi"
    };
    let mkdirs = |d: &str| std::fs::create_dir_all(root.join(d)).expect("mkdir");
    let put = |p: &str, t: &str| std::fs::write(root.join(p), t).expect("write");
    mkdirs("etc");
    put("etc/hostname", "raspberrypi\n");
    put(
        "etc/hosts",
        "127.0.0.1\tlocalhost\n127.0.1.1\traspberrypi\n",
    );
    put(
        "etc/passwd",
        &format!(
            "root:x:0:0:root:/root:/bin/bash\n{user}:x:1000:1000:,,,:/home/{user}:/bin/bash\n"
        ),
    );
    if flavor == Flavor::Ubuntu {
        mkdirs("etc/netplan");
    } else {
        mkdirs("etc/NetworkManager/system-connections");
        mkdirs("var/lib/systemd/rfkill");
        put("var/lib/systemd/rfkill/platform-3f300000.mmcnr:wlan", "1\n");
    }
    if flavor != Flavor::Bookworm {
        mkdirs("etc/cloud");
    }
    let serial = scratch.path().join("serial-number");
    std::fs::write(&serial, SERIAL).expect("write serial");

    // Bookworm's firmware runs firstrun.sh; cloud-init runs the script itself.
    let entry = if flavor == Flavor::Bookworm {
        boot.join("firstrun.sh")
    } else {
        boot.join("bramble/firstboot.sh")
    };
    assert!(!root.as_os_str().is_empty());
    let o = Command::new("sh")
        .arg(&entry)
        .env("BRAMBLE_ROOT", &root)
        .env("BRAMBLE_SERIAL_FILE", &serial)
        .env("BRAMBLE_CPUINFO", scratch.path().join("no-cpuinfo"))
        .output()
        .expect("run the first-boot script");
    let log = std::fs::read_to_string(boot.join("bramble-firstboot.log")).unwrap_or_default();
    assert!(
        o.status.success(),
        "first boot failed: {}\nlog:\n{log}",
        text(&o.stderr)
    );
    assert!(log.contains("bramble first boot: done"), "log:\n{log}");

    let read =
        |p: &str| std::fs::read(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}\nlog:\n{log}"));
    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(read("usr/local/bin/bramble-agent"), agent);
    assert_eq!(mode("usr/local/bin/bramble-agent"), 0o755);
    // The cron gate beside the agent, where the agent looks for it.
    if let Some(gate) = files.get("bramble/bramble-gate") {
        assert_eq!(&read("usr/local/bin/bramble-gate"), gate);
        assert_eq!(mode("usr/local/bin/bramble-gate"), 0o755);
    }
    assert_eq!(
        read("etc/systemd/system/bramble-agent.service"),
        files["bramble/bramble-agent.service"]
    );
    for unit in ["bramble-agent.service", "bramble-docker.service"] {
        let link = std::fs::read_link(
            root.join("etc/systemd/system/multi-user.target.wants")
                .join(unit),
        )
        .expect("unit enabled");
        assert_eq!(link, Path::new("/etc/systemd/system").join(unit));
    }
    assert!(text(&read("etc/bramble/agent.env")).contains(TOKEN));
    assert_eq!(mode("etc/bramble/agent.env"), 0o600);
    assert_eq!(text(&read("etc/hostname")), format!("{HOSTNAME}\n"));
    assert!(text(&read("etc/hosts")).contains(&format!("127.0.1.1\t{HOSTNAME}\n")));
    assert_eq!(
        text(&read(&format!("home/{user}/.ssh/authorized_keys"))),
        format!("{SSH_KEY}\n")
    );
    assert!(text(&read(&format!("etc/sudoers.d/010-bramble-{user}"))).contains("NOPASSWD"));
    if flavor == Flavor::Ubuntu {
        let np = "etc/netplan/60-bramble-wifi.yaml";
        assert!(text(&read(np)).contains(WIFI_PASSWORD));
        assert_eq!(mode(np), 0o600);
    } else {
        let nm = "etc/NetworkManager/system-connections/bramble-wifi.nmconnection";
        assert!(text(&read(nm)).contains(WIFI_PASSWORD));
        assert_eq!(mode(nm), 0o600);
        assert_eq!(
            text(&read("var/lib/systemd/rfkill/platform-3f300000.mmcnr:wlan")),
            "0\n"
        );
    }
    if flavor != Flavor::Bookworm {
        assert_eq!(
            text(&read("etc/cloud/cloud.cfg.d/99-bramble.cfg")),
            "preserve_hostname: true\n"
        );
    }

    // The boot partition afterwards: Bramble's directory gone (secrets with it), the log
    // kept, and on Bookworm the hook taken out of cmdline.txt.
    assert!(
        !boot.join("bramble").exists(),
        "bramble/ left on the boot partition"
    );
    for e in walk(&boot) {
        let t = std::fs::read_to_string(&e).unwrap_or_default();
        assert!(
            !t.contains(TOKEN) && !t.contains(WIFI_PASSWORD),
            "a secret left in {}",
            e.display()
        );
    }
    let cmdline = std::fs::read_to_string(boot.join("cmdline.txt")).expect("cmdline");
    assert_eq!(cmdline.lines().count(), 1);
    assert!(!cmdline.contains("systemd."), "{cmdline}");
    assert!(
        cmdline.contains(" cgroup_memory=1 cgroup_enable=memory"),
        "{cmdline}"
    );
    assert!(!boot.join("firstrun.sh").exists());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn builds_from_raspberry_pi_os_bookworm_img() {
    builds(Flavor::Bookworm, true, false);
}

#[test]
fn builds_from_raspberry_pi_os_bookworm_img_xz() {
    builds(Flavor::Bookworm, true, true);
}

#[test]
fn builds_from_32_bit_raspberry_pi_os_with_the_armv7_agent() {
    builds(Flavor::Bookworm, false, false);
}

#[test]
fn builds_from_raspberry_pi_os_trixie_img() {
    builds(Flavor::Trixie, true, false);
}

#[test]
fn builds_from_raspberry_pi_os_trixie_img_xz() {
    builds(Flavor::Trixie, true, true);
}

#[test]
fn builds_from_ubuntu_img() {
    builds(Flavor::Ubuntu, true, false);
}

#[test]
fn builds_from_ubuntu_img_xz() {
    builds(Flavor::Ubuntu, true, true);
}

#[test]
fn building_from_its_own_output_changes_nothing_twice() {
    let w = Work::new();
    for flavor in [Flavor::Bookworm, Flavor::Ubuntu] {
        let base = support::make_image(w.dir.path(), "base", &Spec::new(flavor), false);
        let once = w.path("once.img");
        let twice = w.path("twice.img");
        assert_ok(&w.build(&base, &once, &w.args(true)));
        assert_ok(&w.build(&once, &twice, &w.args(true)));
        let (a, b) = (support::read_boot(&once), support::read_boot(&twice));
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{flavor:?}"
        );
        for p in [
            "cmdline.txt",
            "user-data",
            "firstrun.sh",
            "bramble/settings.env",
        ] {
            assert_eq!(a.get(p), b.get(p), "{flavor:?} {p}");
        }
        assert!(!b.contains_key("bramble/firstrun-previous.sh"));
    }
}

#[test]
fn keeps_raspberry_pi_imagers_firstrun_and_runs_it_after() {
    let w = Work::new();
    let imager = "#!/bin/bash\nset +e\necho imager >/dev/null\nrm -f /boot/firstrun.sh\nsed -i 's| systemd.run.*||g' /boot/cmdline.txt\nexit 0\n";
    let spec = Spec {
        extra_boot: vec![("firstrun.sh".into(), imager.as_bytes().to_vec())],
        ..Spec::new(Flavor::Bookworm)
    };
    let base = support::make_image(w.dir.path(), "base", &spec, false);
    let out = w.path("out.img");
    assert_ok(&w.build(&base, &out, &w.args(true)));
    let boot = support::read_boot(&out);
    assert_eq!(text(&boot["bramble/firstrun-previous.sh"]), imager);
    assert_eq!(
        boot["firstrun.sh"],
        bramble_image::firstboot::FIRSTRUN.as_bytes()
    );
    assert_eq!(
        text(&boot["cmdline.txt"]).matches("systemd.run=").count(),
        1
    );
}

#[test]
fn finds_the_agent_in_the_target_directory_by_default() {
    let w = Work::new();
    let dir = w.path("target/armv7-unknown-linux-gnueabihf/release");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("bramble-agent"), &w.agent32).expect("write");
    std::fs::write(dir.join("bramble-gate"), &w.gate32).expect("write");
    let spec = Spec {
        arm64: false,
        ..Spec::new(Flavor::Trixie)
    };
    let base = support::make_image(w.dir.path(), "base", &spec, false);
    let out = w.path("out.img");
    let o = w.build(
        &base,
        &out,
        &["--join-token-file".into(), "join-token".into()],
    );
    assert_ok(&o);
    assert_eq!(support::read_boot(&out)["bramble/bramble-agent"], w.agent32);
    // The gate beside the agent goes in with it.
    assert_eq!(support::read_boot(&out)["bramble/bramble-gate"], w.gate32);
    // Without --controller the agent finds the controller over mDNS.
    assert!(!text(&support::read_boot(&out)["bramble/agent.env"]).contains("BRAMBLE_CONTROLLER"));
}

#[test]
fn rejects_random_bytes() {
    let w = Work::new();
    let out = w.path("out.img");
    let img = w.path("noise.img");
    std::fs::write(&img, support::noise(1 << 20, 7)).expect("write");
    assert_fails(
        &w.build(&img, &out, &w.args(true)),
        "is not a disk image",
        &out,
    );
    let xz = w.path("noise.img.xz");
    std::fs::write(&xz, support::noise(1 << 20, 8)).expect("write");
    assert_fails(
        &w.build(&xz, &out, &w.args(true)),
        "cannot decompress",
        &out,
    );
    let empty = w.path("empty.img");
    std::fs::write(&empty, b"").expect("write");
    assert_fails(
        &w.build(&empty, &out, &w.args(true)),
        "is not a disk image",
        &out,
    );
}

#[test]
fn rejects_an_mbr_without_a_fat_partition() {
    let w = Work::new();
    let spec = Spec {
        no_fat: true,
        ..Spec::new(Flavor::Bookworm)
    };
    let base = support::make_image(w.dir.path(), "base", &spec, false);
    let out = w.path("out.img");
    assert_fails(
        &w.build(&base, &out, &w.args(true)),
        "has no FAT boot partition",
        &out,
    );
}

#[test]
fn rejects_an_unknown_os() {
    let w = Work::new();
    let base = support::make_image(w.dir.path(), "base", &Spec::new(Flavor::Fedora), true);
    let out = w.path("out.img");
    assert_fails(
        &w.build(&base, &out, &w.args(true)),
        "unknown operating system: Fedora Linux 40 (Server Edition) (ID=fedora)",
        &out,
    );
}

#[test]
fn rejects_a_boot_partition_too_small_for_the_agent() {
    let w = Work::new();
    let spec = Spec {
        boot_mib: 16,
        boot_type: 0x0e,
        fat32: false,
        ..Spec::new(Flavor::Bookworm)
    };
    let base = support::make_image(w.dir.path(), "base", &spec, false);
    let big = w.path("big-agent");
    std::fs::write(&big, support::fake_elf(true, 20 << 20)).expect("write");
    let mut args = w.args(true);
    let i = args
        .iter()
        .position(|a| a == "--agent")
        .expect("has --agent");
    args[i + 1] = big.display().to_string();
    let out = w.path("out.img");
    assert_fails(
        &w.build(&base, &out, &args),
        "the boot partition is full",
        &out,
    );
}

#[test]
fn rejects_a_missing_agent_or_one_for_another_architecture() {
    let w = Work::new();
    let base = support::make_image(w.dir.path(), "base", &Spec::new(Flavor::Ubuntu), false);
    let out = w.path("out.img");
    let mut args = w.args(true);
    let i = args
        .iter()
        .position(|a| a == "--agent")
        .expect("has --agent");
    args[i + 1] = w.path("no-such-agent").display().to_string();
    assert_fails(
        &w.build(&base, &out, &args),
        "no-such-agent not found",
        &out,
    );
    args[i + 1] = w.path("agent-armhf").display().to_string();
    assert_fails(
        &w.build(&base, &out, &args),
        "is for armhf, but the image's userland is arm64",
        &out,
    );
}

#[test]
fn rejects_a_cron_gate_that_cannot_run_on_the_boards() {
    let w = Work::new();
    let base = support::make_image(w.dir.path(), "base", &Spec::new(Flavor::Ubuntu), false);
    let out = w.path("out.img");
    let mut args = w.args(true);
    let i = args.iter().position(|a| a == "--gate").expect("has --gate");
    args[i + 1] = w.path("no-such-gate").display().to_string();
    assert_fails(&w.build(&base, &out, &args), "cron gate", &out);
    args[i + 1] = w.path("gate-armhf").display().to_string();
    assert_fails(
        &w.build(&base, &out, &args),
        "it is for armhf, but the image's userland is arm64",
        &out,
    );
    // An arm64 program that names a loader (PT_INTERP): dynamically linked.
    let mut dynamic = support::fake_elf(true, 4 << 10);
    dynamic[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    dynamic[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    dynamic[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    dynamic[64..68].copy_from_slice(&3u32.to_le_bytes());
    std::fs::write(w.path("gate-dynamic"), &dynamic).expect("write");
    args[i + 1] = w.path("gate-dynamic").display().to_string();
    assert_fails(&w.build(&base, &out, &args), "dynamically linked", &out);
}

/// A file's permission bits.
fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
}

#[test]
fn the_image_is_readable_by_its_owner_only_whatever_the_umask_and_leftovers() {
    let w = Work::new();
    let base = support::make_image(w.dir.path(), "base", &Spec::new(Flavor::Bookworm), false);
    let out = w.path("out.img");
    // An earlier image, world-readable, and an interrupted build's partial file, also
    // world-readable: neither mode may carry over to the new image.
    std::fs::write(&out, b"the previous image").expect("write");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let partial = w.path("out.img.partial");
    std::fs::write(&partial, b"half an image").expect("write");
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o666)).expect("chmod");

    // A umask that would let everyone read (and write) what is created.
    let o = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_bramble-image"))
        .arg("build")
        .arg("--base")
        .arg(&base)
        .arg("--out")
        .arg(&out)
        .arg("--quiet")
        .args(w.args(true))
        .current_dir(w.dir.path())
        .env_remove("BRAMBLE_CONTROLLER")
        .env_remove("BRAMBLE_JOIN_TOKEN")
        .env_remove("BRAMBLE_JOIN_TOKEN_FILE")
        .output()
        .expect("run bramble-image");
    assert_ok(&o);
    assert_eq!(mode_of(&out), 0o600, "{:o}", mode_of(&out));
    assert!(!partial.exists());
    let boot = support::read_boot(&out);
    let env = text(boot.get("bramble/agent.env").expect("agent.env"));
    assert!(env.contains(TOKEN), "the token is in there: hence the mode");
}

#[test]
fn a_link_planted_as_the_partial_file_is_not_followed() {
    let w = Work::new();
    let base = support::make_image(w.dir.path(), "base", &Spec::new(Flavor::Bookworm), false);
    let out = w.path("out.img");
    // Someone who can write the output's directory points the partial file at a file
    // of the operator's, hoping the build writes the image (and token) through it.
    let victim = w.path("victim.txt");
    std::fs::write(&victim, b"keep me").expect("write");
    std::os::unix::fs::symlink(&victim, w.path("out.img.partial")).expect("symlink");

    assert_ok(&w.build(&base, &out, &w.args(true)));
    // (Not assert_eq: a failure would print a whole image.)
    assert!(
        std::fs::read(&victim).expect("read") == b"keep me",
        "the image was written through the link"
    );
    assert_eq!(mode_of(&victim), mode_of(&w.path("id.pub")), "untouched");
    assert_eq!(mode_of(&out), 0o600);
    assert!(std::fs::symlink_metadata(&out).expect("out").is_file());
}

#[test]
fn a_failed_build_leaves_an_existing_output_alone() {
    let w = Work::new();
    let out = w.path("out.img");
    std::fs::write(&out, b"the previous image").expect("write");
    let img = w.path("noise.img");
    std::fs::write(&img, support::noise(4096, 9)).expect("write");
    let o = w.build(&img, &out, &w.args(true));
    assert!(!o.status.success());
    assert_eq!(std::fs::read(&out).expect("read"), b"the previous image");
    assert!(!w.path("out.img.partial").exists());
}

#[test]
fn rejects_bad_flags_with_exit_code_64() {
    let w = Work::new();
    let base = support::make_image(w.dir.path(), "base", &Spec::new(Flavor::Bookworm), false);
    let out = w.path("out.img");
    std::fs::write(w.path("old-token"), "K10f00d.join-token_XYZ\n").expect("write");
    for (flag, value, needle) in [
        ("--label", "no-equals", "expected key=value"),
        ("--hostname-prefix", "Pi", "--hostname-prefix"),
        ("--controller", "10.0.0.2", "is not a URL"),
        (
            "--controller",
            "http://10.0.0.2:7878",
            "plain HTTP is refused",
        ),
        (
            "--join-token-file",
            "old-token",
            "does not start with BRAMBLE1-",
        ),
        ("--join-token-file", "missing-token", "--join-token-file"),
    ] {
        let agent = w.path("agent-arm64").display().to_string();
        let mut args = vec!["--agent".to_string(), agent, flag.into(), value.into()];
        if flag != "--join-token-file" {
            args.extend(["--join-token-file".to_string(), "join-token".to_string()]);
        }
        let o = w.build(&base, &out, &args);
        assert_eq!(o.status.code(), Some(64), "{flag}: {}", text(&o.stderr));
        assert_fails(&o, needle, &out);
    }
    let o = w.build(&base, &w.path("out.img.xz"), &w.args(true));
    assert_eq!(o.status.code(), Some(64));
    let o = w.build(&base, &base, &w.args(true));
    assert_eq!(o.status.code(), Some(64), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("same file"));
}
