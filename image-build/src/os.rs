//! Which operating system an image holds, and so how its first boot can be hooked.
//!
//! Pure functions over what was read from the image: the root file system's
//! `os-release`, the ELF header of one of its programs, and the boot partition's file names.

use std::collections::BTreeMap;
use std::fmt;

/// How a first-boot script gets run on this OS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Raspberry Pi OS up to Bookworm: `systemd.run=` in `cmdline.txt` runs a script once
    /// (what Raspberry Pi Imager's `firstrun.sh` does), then the Pi reboots.
    FirstRun,
    /// cloud-init's NoCloud data source on the boot partition: `runcmd` in `user-data`
    /// (Raspberry Pi OS from Trixie on, Ubuntu Server for Pi).
    CloudInit,
}

/// A supported operating system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Os {
    /// Raspberry Pi OS 12 (Debian Bookworm).
    PiOsBookworm,
    /// Raspberry Pi OS 13 (Debian Trixie) or later.
    PiOsTrixie,
    /// Ubuntu Server (or Desktop) for Raspberry Pi, e.g. `24.04`.
    Ubuntu {
        /// `VERSION_ID`.
        version: String,
    },
}

impl Os {
    /// How to run the first-boot script.
    pub fn hook(&self) -> Hook {
        match self {
            Os::PiOsBookworm => Hook::FirstRun,
            Os::PiOsTrixie | Os::Ubuntu { .. } => Hook::CloudInit,
        }
    }

    /// A short token for the first-boot script's settings (`bookworm`, `trixie`, `ubuntu`).
    pub fn token(&self) -> &'static str {
        match self {
            Os::PiOsBookworm => "bookworm",
            Os::PiOsTrixie => "trixie",
            Os::Ubuntu { .. } => "ubuntu",
        }
    }

    /// The user a `--ssh-key` is installed for unless told otherwise: the distribution's
    /// customary first user.
    pub fn default_user(&self) -> &'static str {
        match self {
            Os::PiOsBookworm | Os::PiOsTrixie => "pi",
            Os::Ubuntu { .. } => "ubuntu",
        }
    }
}

impl fmt::Display for Os {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Os::PiOsBookworm => f.write_str("Raspberry Pi OS Bookworm"),
            Os::PiOsTrixie => f.write_str("Raspberry Pi OS Trixie"),
            Os::Ubuntu { version } => write!(f, "Ubuntu {version}"),
        }
    }
}

/// A userland architecture the agent is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// 64-bit ARM, Rust target `aarch64-unknown-linux-gnu`.
    Arm64,
    /// 32-bit ARM hard-float, Rust target `armv7-unknown-linux-gnueabihf` (Pi 2 and later;
    /// Raspberry Pi OS's armhf userland also runs on ARMv6 boards, where this agent cannot).
    Armhf,
}

impl Arch {
    /// The Rust target triple of the matching agent build.
    pub fn triple(self) -> &'static str {
        match self {
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
            Arch::Armhf => "armv7-unknown-linux-gnueabihf",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::Arm64 => "arm64",
            Arch::Armhf => "armhf",
        })
    }
}

/// What an ELF header says about the machine it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElfMachine {
    /// One the agent is built for.
    Supported(Arch),
    /// Another one, by its `e_machine` number (e.g. 62 for x86-64).
    Other(u16),
}

impl fmt::Display for ElfMachine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElfMachine::Supported(a) => a.fmt(f),
            ElfMachine::Other(62) => f.write_str("x86-64"),
            ElfMachine::Other(3) => f.write_str("x86"),
            ElfMachine::Other(m) => write!(f, "ELF machine {m}"),
        }
    }
}

/// Reads the machine of an ELF file from its first bytes; `None` if it is not ELF.
pub fn elf_machine(head: &[u8]) -> Option<ElfMachine> {
    if head.len() < 20 || head[..4] != *b"\x7fELF" {
        return None;
    }
    // e_ident[EI_DATA] = 1 is little endian, which every ARM Linux userland is.
    let machine = if head[5] == 2 {
        u16::from_be_bytes([head[18], head[19]])
    } else {
        u16::from_le_bytes([head[18], head[19]])
    };
    Some(match (head[4], machine) {
        (2, 183) => ElfMachine::Supported(Arch::Arm64),
        (1, 40) => ElfMachine::Supported(Arch::Armhf),
        (_, m) => ElfMachine::Other(m),
    })
}

/// Parses `os-release(5)`: `KEY=value` lines, values optionally quoted.
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim();
        let v = if v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')))
        {
            v[1..v.len() - 1]
                .replace("\\\"", "\"")
                .replace("\\\\", "\\")
        } else {
            v.to_string()
        };
        out.insert(k.trim().to_string(), v);
    }
    out
}

/// Decides the OS from `os-release` and the boot partition's top-level file names
/// (compared case-insensitively, as FAT does). `Err` says why it is not supported.
pub fn detect(os_release: &BTreeMap<String, String>, boot_files: &[String]) -> Result<Os, String> {
    let has = |name: &str| boot_files.iter().any(|f| f.eq_ignore_ascii_case(name));
    let get = |k: &str| os_release.get(k).map(String::as_str).unwrap_or("");
    let id = get("ID");
    let codename = get("VERSION_CODENAME");
    let pretty = match get("PRETTY_NAME") {
        "" => id,
        p => p,
    };
    match id {
        "ubuntu" => {
            let version = get("VERSION_ID");
            // The agent is linked against Debian 12's glibc and needs 2.34, which
            // Ubuntu has from 22.04 on.
            let (major, minor) = version.split_once('.').unwrap_or((version, "0"));
            match (major.parse::<u32>(), minor.parse::<u32>()) {
                (Ok(a), Ok(b)) if (a, b) < (22, 4) => Err(format!(
                    "{pretty}: the agent needs glibc 2.34, i.e. Ubuntu 22.04 or later"
                )),
                _ => Ok(Os::Ubuntu {
                    version: version.to_string(),
                }),
            }
        }
        // Raspberry Pi OS says ID=debian (64-bit) or ID=raspbian (32-bit).
        "debian" | "raspbian" => match codename {
            "bookworm" => Ok(Os::PiOsBookworm),
            "trixie" => Ok(Os::PiOsTrixie),
            // Later releases keep cloud-init; an earlier one with it was set up by hand.
            _ if has("user-data") || has("meta-data") => Ok(Os::PiOsTrixie),
            "" => Err(format!("{pretty} has no VERSION_CODENAME")),
            other => Err(format!(
                "{pretty} ({other}) is neither Bookworm nor Trixie and has no cloud-init user-data"
            )),
        },
        "" => Err("os-release has no ID".to_string()),
        _ => Err(format!("{pretty} (ID={id})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(text: &str) -> BTreeMap<String, String> {
        parse_os_release(text)
    }

    #[test]
    fn parses_quoted_and_bare_values() {
        let r = rel("# comment\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID='12'\n\nbroken line\n");
        assert_eq!(r["PRETTY_NAME"], "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(r["ID"], "debian");
        assert_eq!(r["VERSION_ID"], "12");
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn detects_each_supported_os() {
        let boot = vec!["config.txt".to_string(), "cmdline.txt".to_string()];
        let cloud = vec!["CONFIG.TXT".to_string(), "user-data".to_string()];
        let cases: &[(&str, &[String], Result<Os, ()>)] = &[
            (
                "ID=debian\nVERSION_CODENAME=bookworm",
                &boot,
                Ok(Os::PiOsBookworm),
            ),
            (
                "ID=raspbian\nVERSION_CODENAME=bookworm",
                &boot,
                Ok(Os::PiOsBookworm),
            ),
            (
                "ID=debian\nVERSION_CODENAME=trixie",
                &boot,
                Ok(Os::PiOsTrixie),
            ),
            (
                "ID=debian\nVERSION_CODENAME=forky",
                &cloud,
                Ok(Os::PiOsTrixie),
            ),
            (
                "ID=ubuntu\nVERSION_ID=\"24.04\"\nVERSION_CODENAME=noble",
                &cloud,
                Ok(Os::Ubuntu {
                    version: "24.04".into(),
                }),
            ),
            (
                "ID=ubuntu\nVERSION_ID=\"22.04\"",
                &cloud,
                Ok(Os::Ubuntu {
                    version: "22.04".into(),
                }),
            ),
            ("ID=ubuntu\nVERSION_ID=\"20.04\"", &cloud, Err(())),
            ("ID=debian\nVERSION_CODENAME=bullseye", &boot, Err(())),
            ("ID=fedora\nVERSION_ID=40", &cloud, Err(())),
            ("", &boot, Err(())),
        ];
        for (text, files, want) in cases {
            let got = detect(&rel(text), files).map_err(|_| ());
            assert_eq!(&got, want, "{text:?}");
        }
    }

    #[test]
    fn unknown_os_says_what_it_found() {
        let e = detect(&rel("PRETTY_NAME=\"Fedora Linux 40\"\nID=fedora"), &[])
            .expect_err("fedora is unsupported");
        assert_eq!(e, "Fedora Linux 40 (ID=fedora)");
    }

    #[test]
    fn hooks_and_users() {
        assert_eq!(Os::PiOsBookworm.hook(), Hook::FirstRun);
        assert_eq!(Os::PiOsTrixie.hook(), Hook::CloudInit);
        let u = Os::Ubuntu {
            version: "24.04".into(),
        };
        assert_eq!(u.hook(), Hook::CloudInit);
        assert_eq!(u.default_user(), "ubuntu");
        assert_eq!(u.to_string(), "Ubuntu 24.04");
    }

    #[test]
    fn reads_elf_machines() {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18..20].copy_from_slice(&183u16.to_le_bytes());
        assert_eq!(elf_machine(&h), Some(ElfMachine::Supported(Arch::Arm64)));
        h[4] = 1;
        h[18..20].copy_from_slice(&40u16.to_le_bytes());
        assert_eq!(elf_machine(&h), Some(ElfMachine::Supported(Arch::Armhf)));
        h[4] = 2;
        h[18..20].copy_from_slice(&62u16.to_le_bytes());
        assert_eq!(elf_machine(&h), Some(ElfMachine::Other(62)));
        assert_eq!(ElfMachine::Other(62).to_string(), "x86-64");
        assert_eq!(elf_machine(b"#!/bin/sh\n echo hello there"), None);
        assert_eq!(elf_machine(b"\x7fELF"), None);
    }
}
