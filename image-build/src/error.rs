//! The crate's error type: each variant names what failed, in words for the person who
//! ran `bramble-image`.

use std::io;
use std::path::PathBuf;

/// Everything `bramble-image build` can fail on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag's value is unusable (exit code 64).
    #[error("{0}")]
    Usage(String),
    /// The input image cannot be read.
    #[error("cannot read {path}")]
    ReadInput {
        /// The input.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The `.xz` input is not xz or is damaged.
    #[error("cannot decompress {path} (not an xz file, or damaged)")]
    Decompress {
        /// The input.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The output cannot be written.
    #[error("cannot write {path}")]
    WriteOutput {
        /// The file being written.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A temporary directory could not be made.
    #[error("cannot create a temporary directory")]
    Temp {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No `55 AA` at the end of the first sector.
    #[error("{path} is not a disk image: it has no MBR partition table (no boot signature 55 AA at byte 510)")]
    NotAnImage {
        /// The input.
        path: PathBuf,
    },
    /// A GPT disk.
    #[error("{path} has a GPT partition table; Raspberry Pi images use an MBR one")]
    Gpt {
        /// The input.
        path: PathBuf,
    },
    /// No partition of a FAT type.
    #[error("{path} has no FAT boot partition (none of its MBR partitions is of a FAT type)")]
    NoBootPartition {
        /// The input.
        path: PathBuf,
    },
    /// A partition extends past the end of the image (truncated download?).
    #[error("partition {number} of {path} ends at byte {end}, past the end of the image ({len} bytes); is the image truncated?")]
    PartitionBeyondEnd {
        /// The input.
        path: PathBuf,
        /// 1-based partition number.
        number: u8,
        /// Where the partition ends.
        end: u64,
        /// The image's length.
        len: u64,
    },
    /// The boot partition's FAT cannot be read.
    #[error("the boot partition is not a readable FAT file system")]
    BootFs {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No `config.txt`/`cmdline.txt`.
    #[error("not a Raspberry Pi image: the boot partition has no {file}")]
    NotPi {
        /// The missing file.
        file: &'static str,
    },
    /// A file on the boot partition cannot be read.
    #[error("cannot read {file} on the boot partition")]
    BootRead {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file on the boot partition cannot be written.
    #[error("cannot write {file} on the boot partition")]
    BootWrite {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not enough room for the agent and its files.
    #[error("the boot partition is full: Bramble's files need {need} bytes, {free} are free")]
    BootFull {
        /// Bytes needed, in whole clusters.
        need: u64,
        /// Bytes free.
        free: u64,
    },
    /// `user-data` is not something Bramble can add to.
    #[error("cannot add to the boot partition's cloud-init user-data: {reason}")]
    UserData {
        /// Why.
        reason: String,
    },
    /// No Linux partition.
    #[error("unknown operating system: the image has no Linux (ext4) root partition")]
    NoRootPartition,
    /// The root partition is not ext4, or debugfs could not open it.
    #[error("cannot open the root partition as ext2/3/4: {message}")]
    RootFs {
        /// debugfs's word.
        message: String,
    },
    /// e2fsprogs is not installed.
    #[error("debugfs not found: install e2fsprogs (`apt-get install e2fsprogs`, or scripts/deps-image.sh)")]
    DebugfsMissing,
    /// debugfs failed otherwise.
    #[error("debugfs: {message}")]
    Debugfs {
        /// What went wrong.
        message: String,
    },
    /// Not an OS this tool knows how to set up.
    #[error("unknown operating system: {found}; supported are Raspberry Pi OS Bookworm and Trixie, and Ubuntu for Raspberry Pi")]
    UnknownOs {
        /// What the image holds.
        found: String,
    },
    /// The agent binary is not there.
    #[error("agent binary {path} not found: build it with `scripts/cross-build.sh --release`, or pass --agent")]
    AgentMissing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The cron gate named by --gate is not there.
    #[error("cron gate {path} not found: build it with `scripts/cross-build.sh --release`, or leave --gate out")]
    GateMissing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The cron gate cannot run on the image's boards.
    #[error("cron gate {path}: {why}")]
    Gate {
        /// The binary.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The agent binary is for another architecture than the image.
    #[error("agent binary {path} is for {found}, but the image's userland is {want}")]
    AgentArch {
        /// The binary.
        path: PathBuf,
        /// What the binary is for.
        found: String,
        /// What the image needs.
        want: String,
    },
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
