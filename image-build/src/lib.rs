//! `bramble-image`: makes a flashable SD-card image with the Bramble agent inside, so a
//! pool operator flashes one image onto every card and each Pi joins the cluster by
//! itself.
//!
//! ```text
//! bramble-image build --base 2025-05-13-raspios-bookworm-arm64-lite.img.xz --out bramble.img \
//!     --controller https://10.0.0.2:7878 --join-token-file ./join-token \
//!     --hostname-prefix pool --ssh-key ~/.ssh/id_ed25519.pub \
//!     --wifi-ssid PoolNet --wifi-password-file wifi.txt --wifi-country SE --label disk=ssd
//! ```
//!
//! The base is a Raspberry Pi OS (Bookworm or Trixie) or Ubuntu for Raspberry Pi image,
//! `.img` or `.img.xz`, arm64 or armhf; which one is detected from the root partition's
//! `os-release` and the ELF header of its `dpkg`. The output is an uncompressed `.img`
//! that on first boot:
//!
//! - installs the agent of the image's architecture (`--agent PATH`, or by default
//!   `target/<triple>/release/bramble-agent` from `scripts/cross-build.sh --release`) as
//!   the systemd unit `bramble-agent`, configured with the controller URL (or mDNS
//!   discovery without `--controller`), the join token and the `--label`s; and Docker
//!   (`docker.io`) once the network is up, if the image has none;
//! - names the host `PREFIX-xxxxxx` after the last six hex digits of the board's serial
//!   number, so one image serves every board and every node gets a stable, unique name;
//! - installs `--ssh-key` for the OS's first user (`pi` or `ubuntu`, or `--ssh-user`)
//!   with password-less sudo, and joins `--wifi-ssid`;
//! - already has `cgroup_memory=1 cgroup_enable=memory` in `cmdline.txt` (still one
//!   line), which Docker's memory limits need.
//!
//! # How, and why so
//!
//! Nothing is mounted: no root and no loop device are needed. The MBR is read in code,
//! the FAT boot partition is edited inside the image file with the `fatfs` crate, and the
//! ext4 root is only read, with e2fsprogs' `debugfs` (so e2fsprogs must be installed).
//! Everything Bramble adds goes into `bramble/` on the boot partition with a first-boot
//! script (`src/firstboot.sh`) that copies it into place on the Pi: the boot partition is
//! the one every OS lets a first boot read, and leaving the root alone keeps this
//! independent of each distribution's file layout. The script is started by
//! `systemd.run=` in `cmdline.txt` on Bookworm (the hook Raspberry Pi Imager uses) and by
//! cloud-init's `runcmd` in `user-data` on Trixie and Ubuntu. The join token and the
//! Wi-Fi password are the only secrets put on the card; the script removes them from the
//! boot partition whatever happens, and removes the rest of `bramble/` once it has
//! succeeded (its log stays as `bramble-firstboot.log`).
//!
//! The input is never modified: it is copied (or decompressed, sparsely) to `OUT.partial`,
//! which is edited and renamed to `OUT` only when everything worked; on any error the
//! partial file is removed. Both are mode 0600 (owner only) from their creation on,
//! whatever the umask: the image holds the join token.
//!
//! # Layout
//!
//! - [`mbr`]: the partition table.
//! - [`input`]: copying or decompressing the base image.
//! - [`boot`]: the FAT boot partition.
//! - [`rootfs`]: reading the ext4 root with debugfs.
//! - [`os`]: which OS and architecture an image holds.
//! - [`firstboot`]: the files put on the boot partition, and the `cmdline.txt` and
//!   `user-data` edits.

pub mod boot;
mod error;
pub mod firstboot;
pub mod input;
pub mod mbr;
pub mod os;
pub mod rootfs;

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

pub use error::{Error, Result};
pub use firstboot::{Settings, Wifi};
pub use os::{Arch, Os};

use boot::Boot;
use os::{ElfMachine, Hook};
use rootfs::RootFs;

/// What `build` is asked to do, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The base image, `.img` or `.img.xz`.
    pub base: PathBuf,
    /// Where the new image goes (`.img`).
    pub out: PathBuf,
    /// The agent binary; by default the release build for the image's architecture.
    pub agent: Option<PathBuf>,
    /// The static cron gate installed beside the agent; by default `bramble-gate` beside
    /// the agent binary, if there.
    pub gate: Option<PathBuf>,
    /// Controller URL; none means mDNS discovery.
    pub controller: Option<String>,
    /// Join token.
    pub join_token: String,
    /// Hostname prefix.
    pub hostname_prefix: String,
    /// `key=value` node labels.
    pub labels: Vec<String>,
    /// An OpenSSH public key file (`authorized_keys` format).
    pub ssh_key: Option<PathBuf>,
    /// User for the key; by default the OS's first user.
    pub ssh_user: Option<String>,
    /// Wi-Fi network name.
    pub wifi_ssid: Option<String>,
    /// File holding the Wi-Fi passphrase (one line).
    pub wifi_password_file: Option<PathBuf>,
    /// Wi-Fi country code.
    pub wifi_country: String,
    /// Show a progress bar while copying.
    pub progress: bool,
}

/// What `build` did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The OS found.
    pub os: Os,
    /// Its architecture.
    pub arch: Arch,
    /// The agent binary put in.
    pub agent: PathBuf,
    /// The cron gate put in, if any.
    pub gate: Option<PathBuf>,
    /// Files written on the boot partition.
    pub files: Vec<String>,
}

impl Options {
    /// Checks the options and reads the files they name, before anything is written.
    pub fn settings(&self) -> Result<Settings> {
        let usage = |m: String| Error::Usage(m);
        let token = &self.join_token;
        // The agent checks the controller against the CA in the token before it sends
        // anything; an image with a token it would refuse must not be written.
        if let Err(e) = token.parse::<bramble_api::token::JoinToken>() {
            return Err(usage(format!("join token: {e}")));
        }
        if !token.chars().all(is_plain) {
            return Err(usage(
                "the join token must be printable ASCII without spaces, quotes, '\\', '$' or '`'"
                    .into(),
            ));
        }
        if let Some(c) = &self.controller {
            if c.starts_with("http://") || c.starts_with("ws://") {
                return Err(usage(format!(
                    "--controller {c:?}: plain HTTP is refused, the controller serves TLS only; use https://"
                )));
            }
            let scheme_ok = ["https://", "wss://"]
                .iter()
                .any(|s| c.starts_with(s) && c.len() > s.len());
            if !scheme_ok || !c.chars().all(is_plain) {
                return Err(usage(format!(
                    "--controller {c:?} is not a URL like https://10.0.0.2:7878"
                )));
            }
        }
        let probe = format!("{}-abc123", self.hostname_prefix);
        if probe.parse::<bramble_api::manifest::Name>().is_err() {
            return Err(usage(format!(
                "--hostname-prefix {:?}: use lowercase letters, digits and '-', starting with a letter, at most 56 characters",
                self.hostname_prefix
            )));
        }
        let labels = self
            .labels
            .iter()
            .map(|l| parse_label(l).map_err(usage))
            .collect::<Result<Vec<_>>>()?;
        let ssh_keys = self.ssh_key.as_deref().map(read_ssh_keys).transpose()?;
        if let Some(u) = &self.ssh_user {
            let ok = u.len() <= 32
                && u.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && u.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            if !ok {
                return Err(usage(format!("--ssh-user {u:?} is not a valid user name")));
            }
        }
        let wifi = match (&self.wifi_ssid, &self.wifi_password_file) {
            (None, None) => None,
            (Some(ssid), Some(file)) => Some(wifi(ssid, file, &self.wifi_country)?),
            _ => {
                return Err(usage(
                    "--wifi-ssid and --wifi-password-file go together".into(),
                ))
            }
        };
        Ok(Settings {
            controller: self.controller.clone(),
            join_token: token.clone(),
            hostname_prefix: self.hostname_prefix.clone(),
            labels,
            ssh_keys,
            ssh_user: self.ssh_user.clone(),
            wifi,
        })
    }
}

/// Printable ASCII that needs no quoting in a systemd environment file or a shell word.
fn is_plain(c: char) -> bool {
    c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '\\' | '$' | '`')
}

/// A `key=value` label, by the rules the controller applies to node selectors.
fn parse_label(s: &str) -> Result<(String, String), String> {
    let Some((k, v)) = s.split_once('=') else {
        return Err(format!("--label {s:?}: expected key=value"));
    };
    let key_ok = !k.is_empty()
        && k.len() <= 63
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if !key_ok {
        return Err(format!(
            "--label {s:?}: the key must be up to 63 letters, digits, '-', '_', '.', '/'"
        ));
    }
    if v.len() > 253 || v.chars().any(|c| c.is_control() || c == ',' || c == '=') {
        return Err(format!(
            "--label {s:?}: the value must be at most 253 characters, without ',' '=' or control characters"
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

fn read_ssh_keys(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Usage(format!("--ssh-key {}: {e}", path.display())))?;
    if text.contains("PRIVATE KEY") {
        return Err(Error::Usage(format!(
            "--ssh-key {} is a private key; pass the public one (.pub)",
            path.display()
        )));
    }
    let keys: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let known = ["ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-"];
    if keys.is_empty() || !keys.iter().all(|k| known.iter().any(|p| k.starts_with(p))) {
        return Err(Error::Usage(format!(
            "--ssh-key {} does not hold OpenSSH public keys (lines like \"ssh-ed25519 AAAA… user@host\")",
            path.display()
        )));
    }
    Ok(keys.iter().map(|k| format!("{k}\n")).collect())
}

fn wifi(ssid: &str, password_file: &Path, country: &str) -> Result<Wifi> {
    let usage = |m: String| Error::Usage(m);
    if ssid.is_empty() || ssid.len() > 32 || ssid.chars().any(char::is_control) {
        return Err(usage(format!(
            "--wifi-ssid {ssid:?}: 1 to 32 bytes without control characters"
        )));
    }
    let raw = std::fs::read_to_string(password_file).map_err(|e| {
        usage(format!(
            "--wifi-password-file {}: {e}",
            password_file.display()
        ))
    })?;
    // One line; the file's final line break is not part of the passphrase.
    let password = raw.strip_suffix('\n').unwrap_or(&raw);
    let password = password.strip_suffix('\r').unwrap_or(password).to_string();
    let passphrase = (8..=63).contains(&password.len())
        && password
            .chars()
            .all(|c| c.is_ascii() && !c.is_ascii_control());
    let psk = password.len() == 64 && password.chars().all(|c| c.is_ascii_hexdigit());
    if !passphrase && !psk {
        return Err(usage(format!(
            "--wifi-password-file {}: a WPA2 passphrase is 8 to 63 printable ASCII characters (or 64 hex digits) on one line",
            password_file.display()
        )));
    }
    let country = country.to_ascii_uppercase();
    if country.len() != 2 || !country.chars().all(|c| c.is_ascii_uppercase()) {
        return Err(usage(format!(
            "--wifi-country {country:?}: a two-letter ISO 3166 code such as GB, SE or US"
        )));
    }
    Ok(Wifi {
        ssid: ssid.to_string(),
        password,
        country,
    })
}

/// The mode of the image written (and of its partial file while it is written): it
/// holds the join token and the Wi-Fi password, so only its owner may read it.
pub const OUTPUT_MODE: u32 = 0o600;

/// Removes the partial output unless the build got to the end.
struct Partial {
    path: PathBuf,
    done: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Builds the image: see the crate docs.
pub fn build(opts: &Options) -> Result<Report> {
    let settings = opts.settings()?;
    rootfs::check_debugfs()?;
    check_paths(opts)?;
    // A given agent that is missing is found out before gigabytes are copied.
    if let Some(a) = &opts.agent {
        if !a.is_file() {
            return Err(Error::AgentMissing { path: a.clone() });
        }
    }
    if let Some(g) = &opts.gate {
        if !g.is_file() {
            return Err(Error::GateMissing { path: g.clone() });
        }
    }

    let mut name = opts.out.clone().into_os_string();
    name.push(".partial");
    let partial_path = PathBuf::from(name);
    let mut partial = Partial {
        path: partial_path.clone(),
        done: false,
    };
    let write_err = |source| Error::WriteOutput {
        path: partial_path.clone(),
        source,
    };
    // The image holds the join token: owner-only from the first byte, whatever the
    // umask. A leftover partial file (an interrupted build) is removed rather than
    // reused, so its mode cannot carry over, and the file is made anew (`create_new`
    // refuses to follow a link planted in its place).
    match std::fs::remove_file(&partial_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(write_err(e)),
    }
    let mut out = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(OUTPUT_MODE)
        .open(&partial_path)
        .map_err(write_err)?;

    let bar = progress_bar(opts.progress);
    let len = input::unpack(&opts.base, &mut out, &partial_path, &bar)?;
    bar.finish_and_clear();

    let (boot_part, root_part) = partitions(&mut out, &opts.base, len)?;
    let boot = Boot::mount(&out, &boot_part)?;
    let top = boot.top_names()?;
    for f in ["config.txt", "cmdline.txt"] {
        if !top.iter().any(|n| n.eq_ignore_ascii_case(f)) {
            return Err(Error::NotPi { file: f });
        }
    }

    let root = RootFs::open(&partial_path, root_part.offset)?;
    let os_release = match root.read("/etc/os-release")? {
        Some(t) => t,
        None => root
            .read("/usr/lib/os-release")?
            .ok_or_else(|| Error::UnknownOs {
                found: "the root partition has no /etc/os-release".into(),
            })?,
    };
    let os = os::detect(
        &os::parse_os_release(&String::from_utf8_lossy(&os_release)),
        &top,
    )
    .map_err(|found| Error::UnknownOs { found })?;
    let arch = userland_arch(&root)?;

    let agent_path = match &opts.agent {
        Some(p) => p.clone(),
        None => default_agent(arch),
    };
    let agent = read_input(&agent_path, |path| Error::AgentMissing { path })?;
    match os::elf_machine(&agent) {
        Some(ElfMachine::Supported(a)) if a == arch => {}
        found => {
            return Err(Error::AgentArch {
                path: agent_path,
                found: found.map_or("not an ELF program".into(), |m| m.to_string()),
                want: arch.to_string(),
            })
        }
    }

    // The gate starts cron runs on time; without it they start a Docker start late.
    let gate_path = opts.gate.clone().or_else(|| {
        agent_path
            .parent()
            .map(|dir| dir.join("bramble-gate"))
            .filter(|p| p.is_file())
    });
    let gate = match &gate_path {
        Some(p) => Some(read_gate(p, arch)?),
        None => None,
    };

    let mut files = firstboot::files(&settings, &os, agent, gate);
    let cmdline = boot.read("cmdline.txt")?.unwrap_or_default();
    files.push(boot_file(
        "cmdline.txt",
        firstboot::edit_cmdline(&String::from_utf8_lossy(&cmdline), os.hook()),
    ));
    match os.hook() {
        Hook::FirstRun => {
            // Someone's firstrun.sh (Raspberry Pi Imager's) is kept and run after ours.
            if let Some(prev) = boot.read("firstrun.sh")? {
                if prev != firstboot::FIRSTRUN.as_bytes() {
                    files.push(boot_file(
                        &format!("{}/firstrun-previous.sh", firstboot::DIR),
                        prev,
                    ));
                }
            }
        }
        Hook::CloudInit => {
            let old = boot.read("user-data")?;
            let new =
                firstboot::edit_user_data(old.as_deref().map(String::from_utf8_lossy).as_deref())
                    .map_err(|reason| Error::UserData { reason })?;
            files.push(boot_file("user-data", new));
            // NoCloud needs meta-data to exist; one instance id for every card is what
            // the distributions' own images ship with.
            if boot.read("meta-data")?.is_none() {
                files.push(boot_file("meta-data", "instance-id: bramble-image\n"));
            }
        }
    }

    // Room: what each file adds over what it replaces, in whole clusters, plus a cluster
    // for the directory.
    let mut need = boot.allocated(1);
    for f in &files {
        let old = boot
            .read(&f.path)?
            .map_or(0, |d| boot.allocated(d.len() as u64));
        need += boot.allocated(f.data.len() as u64).saturating_sub(old);
    }
    let free = boot.free()?;
    if need > free {
        return Err(Error::BootFull { need, free });
    }
    for f in &files {
        boot.write(&f.path, &f.data)?;
    }
    boot.unmount()?;
    out.sync_all().map_err(write_err)?;
    drop(out);
    std::fs::rename(&partial_path, &opts.out).map_err(|source| Error::WriteOutput {
        path: opts.out.clone(),
        source,
    })?;
    partial.done = true;
    Ok(Report {
        os,
        arch,
        agent: agent_path,
        gate: gate_path,
        files: files.into_iter().map(|f| f.path).collect(),
    })
}

/// Reads an input file; a missing one is `missing(path)`.
fn read_input(path: &Path, missing: impl FnOnce(PathBuf) -> Error) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => missing(path.to_path_buf()),
        _ => Error::ReadInput {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Reads the cron gate at `path` and checks that it runs on `arch` in any container:
/// built for it, and static.
fn read_gate(path: &Path, arch: Arch) -> Result<Vec<u8>> {
    let gate = read_input(path, |path| Error::GateMissing { path })?;
    let bad = |why: String| Error::Gate {
        path: path.to_path_buf(),
        why,
    };
    match os::elf_machine(&gate) {
        Some(ElfMachine::Supported(a)) if a == arch => {}
        found => {
            return Err(bad(format!(
                "it is for {}, but the image's userland is {arch}",
                found.map_or("not an ELF program".into(), |m| m.to_string())
            )))
        }
    }
    match bramble_api::elf::has_interpreter(&gate) {
        Ok(false) => Ok(gate),
        Ok(true) => Err(bad(
            "it is dynamically linked, and must run in images without a loader: build it with `scripts/cross-build.sh --release` (static)".into(),
        )),
        Err(why) => Err(bad(format!("not a usable ELF program ({why})"))),
    }
}

fn boot_file(path: &str, data: impl Into<Vec<u8>>) -> firstboot::BootFile {
    firstboot::BootFile {
        path: path.to_string(),
        data: data.into(),
        secret: false,
    }
}

fn check_paths(opts: &Options) -> Result<()> {
    std::fs::metadata(&opts.base).map_err(|source| Error::ReadInput {
        path: opts.base.clone(),
        source,
    })?;
    if opts
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("xz"))
    {
        return Err(Error::Usage(format!(
            "--out {}: the output is an uncompressed image; name it .img (and compress it afterwards if you like)",
            opts.out.display()
        )));
    }
    let same = match (opts.base.canonicalize(), opts.out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(Error::Usage(
            "--out is the same file as --base; the base image is never modified".into(),
        ));
    }
    Ok(())
}

fn progress_bar(show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(
        "{msg:>13} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .expect("the template is valid")
    .progress_chars("=> ");
    ProgressBar::new(0).with_style(style)
}

/// Reads the partition table: the first FAT partition boots, the first Linux one is the
/// root.
fn partitions(image: &mut File, path: &Path, len: u64) -> Result<(mbr::Partition, mbr::Partition)> {
    let mut sector = [0u8; 512];
    image
        .seek(SeekFrom::Start(0))
        .and_then(|_| image.read_exact(&mut sector))
        .map_err(|_| Error::NotAnImage {
            path: path.to_path_buf(),
        })?;
    let parts = mbr::parse(&sector).map_err(|e| match e {
        mbr::MbrError::NoSignature => Error::NotAnImage {
            path: path.to_path_buf(),
        },
        mbr::MbrError::Gpt => Error::Gpt {
            path: path.to_path_buf(),
        },
    })?;
    let boot = *parts
        .iter()
        .find(|p| p.is_fat())
        .ok_or_else(|| Error::NoBootPartition {
            path: path.to_path_buf(),
        })?;
    let root = *parts
        .iter()
        .find(|p| p.is_linux())
        .ok_or(Error::NoRootPartition)?;
    for p in [&boot, &root] {
        if p.end() > len {
            return Err(Error::PartitionBeyondEnd {
                path: path.to_path_buf(),
                number: p.number,
                end: p.end(),
                len,
            });
        }
    }
    Ok((boot, root))
}

/// The root file system's architecture, from the ELF header of a program every Debian
/// and Ubuntu system has.
fn userland_arch(root: &RootFs) -> Result<Arch> {
    for p in ["/usr/bin/dpkg", "/bin/dpkg"] {
        if let Some(head) = root.read(p)? {
            return match os::elf_machine(&head) {
                Some(ElfMachine::Supported(a)) => Ok(a),
                Some(other) => Err(Error::UnknownOs {
                    found: format!("a userland for {other}, not ARM"),
                }),
                None => Err(Error::UnknownOs {
                    found: format!("{p} is not an ELF program, so the architecture is unknown"),
                }),
            };
        }
    }
    Err(Error::UnknownOs {
        found: "no /usr/bin/dpkg, so neither Debian nor Ubuntu".into(),
    })
}

/// Where `scripts/cross-build.sh --release` puts the agent for `arch`: under the current
/// directory's `target/`, or beside this program's own `target/` directory.
pub fn default_agent(arch: Arch) -> PathBuf {
    let rel = Path::new("target")
        .join(arch.triple())
        .join("release")
        .join("bramble-agent");
    if rel.is_file() {
        return rel;
    }
    // target/release/bramble-image → target/<triple>/release/bramble-agent
    let beside = std::env::current_exe().ok().and_then(|exe| {
        let target = exe.parent()?.parent()?;
        Some(
            target
                .join(arch.triple())
                .join("release")
                .join("bramble-agent"),
        )
    });
    match beside {
        Some(p) if p.is_file() => p,
        _ => rel,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_controllers_rules() {
        assert_eq!(parse_label("disk=ssd"), Ok(("disk".into(), "ssd".into())));
        assert_eq!(
            parse_label("zone/x.y=a b"),
            Ok(("zone/x.y".into(), "a b".into()))
        );
        assert_eq!(parse_label("empty="), Ok(("empty".into(), String::new())));
        for bad in ["nokey", "=v", "sp ace=v", "k=a,b", "k=a=b", "k=\n"] {
            assert!(parse_label(bad).is_err(), "{bad:?}");
        }
    }

    const TOKEN: &str =
        "BRAMBLE1-9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08-join.secret_XYZ0123";

    fn opts() -> Options {
        Options {
            join_token: TOKEN.into(),
            hostname_prefix: "bramble".into(),
            wifi_country: "GB".into(),
            ..Options::default()
        }
    }

    #[test]
    fn rejects_bad_flags_before_touching_anything() {
        let cases: Vec<(&str, Options)> = vec![
            (
                "empty token",
                Options {
                    join_token: String::new(),
                    ..opts()
                },
            ),
            (
                "quote in token",
                Options {
                    join_token: format!("{TOKEN}\""),
                    ..opts()
                },
            ),
            (
                "token without the CA fingerprint",
                Options {
                    join_token: "K10f00d.join-token_XYZ".into(),
                    ..opts()
                },
            ),
            (
                "plain http",
                Options {
                    controller: Some("http://10.0.0.2:7878".into()),
                    ..opts()
                },
            ),
            (
                "url",
                Options {
                    controller: Some("10.0.0.2:7878".into()),
                    ..opts()
                },
            ),
            (
                "prefix",
                Options {
                    hostname_prefix: "Pi".into(),
                    ..opts()
                },
            ),
            (
                "label",
                Options {
                    labels: vec!["x".into()],
                    ..opts()
                },
            ),
            (
                "user",
                Options {
                    ssh_user: Some("Root!".into()),
                    ..opts()
                },
            ),
            (
                "wifi half",
                Options {
                    wifi_ssid: Some("net".into()),
                    ..opts()
                },
            ),
            (
                "ssh key file",
                Options {
                    ssh_key: Some("/nonexistent/key.pub".into()),
                    ..opts()
                },
            ),
        ];
        for (what, o) in cases {
            assert!(matches!(o.settings(), Err(Error::Usage(_))), "{what}");
        }
        let ok = Options {
            controller: Some("https://10.0.0.2:7878".into()),
            labels: vec!["disk=ssd".into()],
            ..opts()
        };
        let s = ok.settings().expect("valid");
        assert_eq!(s.labels, vec![("disk".to_string(), "ssd".to_string())]);
    }

    #[test]
    fn reads_keys_and_passwords_from_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("id.pub");
        std::fs::write(&key, "# mine\nssh-ed25519 AAAAC3 me@host\n\n").expect("write");
        assert_eq!(
            read_ssh_keys(&key).expect("valid"),
            "ssh-ed25519 AAAAC3 me@host\n"
        );
        std::fs::write(&key, "-----BEGIN OPENSSH PRIVATE KEY-----\n").expect("write");
        assert!(read_ssh_keys(&key).is_err());
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "correct horse\r\n").expect("write");
        let w = wifi("net", &pw, "se").expect("valid");
        assert_eq!(
            (w.password.as_str(), w.country.as_str()),
            ("correct horse", "SE")
        );
        std::fs::write(&pw, "short\n").expect("write");
        assert!(wifi("net", &pw, "SE").is_err());
        std::fs::write(&pw, "long enough\n").expect("write");
        assert!(wifi("net", &pw, "Sweden").is_err());
    }
}
