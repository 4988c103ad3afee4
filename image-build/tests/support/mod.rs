//! Synthetic Raspberry Pi images with the real layout, made in code: an MBR, a FAT boot
//! partition formatted by `fatfs` with the OS's boot files, and an ext4 root made by
//! `mkfs.ext4 -d` holding `os-release` and a `dpkg` whose ELF header names the
//! architecture. Also helpers to read results back (FAT via fatfs, ext4 via debugfs).

#![allow(dead_code)] // Each test binary uses a different part.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bramble_image::mbr;
use fscommon::StreamSlice;

/// Where the boot partition starts (4 MiB, as in Raspberry Pi OS images).
pub const BOOT_START: u64 = 4 << 20;
/// Size of the synthetic ext4 root.
pub const ROOT_MIB: u64 = 8;

/// The OS a synthetic image pretends to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Bookworm,
    Trixie,
    Ubuntu,
    /// An OS the tool does not support.
    Fedora,
}

/// What to make.
#[derive(Debug, Clone)]
pub struct Spec {
    pub flavor: Flavor,
    /// Userland: true for arm64, false for armhf.
    pub arm64: bool,
    /// Boot partition size.
    pub boot_mib: u64,
    /// MBR type of the boot partition.
    pub boot_type: u8,
    /// FAT32 (else FAT16).
    pub fat32: bool,
    /// Extra files on the boot partition.
    pub extra_boot: Vec<(String, Vec<u8>)>,
    /// Leave the boot partition out of the table (only the root is listed).
    pub no_fat: bool,
}

impl Spec {
    pub fn new(flavor: Flavor) -> Spec {
        Spec {
            flavor,
            arm64: true,
            boot_mib: 40,
            boot_type: 0x0c,
            fat32: true,
            extra_boot: Vec::new(),
            no_fat: false,
        }
    }
}

/// The `cmdline.txt` every synthetic image starts with.
pub const CMDLINE: &str = "console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 fsck.repair=yes rootwait quiet\n";
/// Its `config.txt`.
pub const CONFIG: &str = "# For more options and information see\n# http://rptl.io/configtxt\ndtparam=audio=on\narm_64bit=1\n";
/// Ubuntu's stock `user-data` (abridged), which sets the ubuntu user's first password.
pub const UBUNTU_USER_DATA: &str = "#cloud-config\n\n# On first boot, set the (default) ubuntu user's password to \"ubuntu\" and\n# expire user passwords\nchpasswd:\n  expire: true\n  users:\n  - name: ubuntu\n    password: ubuntu\n    type: text\n\n# Enable password authentication with the SSH daemon\nssh_pwauth: true\n";

/// Fails with a clear message when a tool the tests need is missing.
pub fn require_tools() {
    for (tool, arg) in [("mkfs.ext4", "-V"), ("debugfs", "-V")] {
        if Command::new(bramble_image::rootfs::tool(tool))
            .arg(arg)
            .output()
            .is_err()
        {
            panic!("{tool} not found: these tests need e2fsprogs; run scripts/deps-image.sh (apt-get install -y e2fsprogs)");
        }
    }
}

/// The `os-release` text of a flavor.
pub fn os_release(f: Flavor) -> &'static str {
    match f {
        Flavor::Bookworm => "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n",
        Flavor::Trixie => "PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"13\"\nVERSION=\"13 (trixie)\"\nVERSION_CODENAME=trixie\nID=debian\n",
        Flavor::Ubuntu => "PRETTY_NAME=\"Ubuntu 24.04.1 LTS\"\nNAME=\"Ubuntu\"\nVERSION_ID=\"24.04\"\nVERSION=\"24.04.1 LTS (Noble Numbat)\"\nVERSION_CODENAME=noble\nID=ubuntu\nID_LIKE=debian\n",
        Flavor::Fedora => "NAME=\"Fedora Linux\"\nVERSION=\"40 (Server Edition)\"\nID=fedora\nVERSION_ID=40\nPRETTY_NAME=\"Fedora Linux 40 (Server Edition)\"\n",
    }
}

/// The first 64 bytes of an ELF executable for arm64 or armhf, then `extra` bytes of
/// non-zero filler: enough to be told apart by every check the tool makes.
pub fn fake_elf(arm64: bool, extra: usize) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = if arm64 { 2 } else { 1 };
    h[5] = 1; // little endian
    h[6] = 1;
    h[16] = 3; // ET_DYN
    let machine: u16 = if arm64 { 183 } else { 40 };
    h[18..20].copy_from_slice(&machine.to_le_bytes());
    h.extend((0..extra).map(|i| (i % 251) as u8 | 1));
    h
}

/// The files on the boot partition of a fresh image of the flavor.
fn boot_files(spec: &Spec) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        ("cmdline.txt".to_string(), CMDLINE.as_bytes().to_vec()),
        ("config.txt".to_string(), CONFIG.as_bytes().to_vec()),
        ("overlays/README".to_string(), b"overlays\n".to_vec()),
    ];
    match spec.flavor {
        Flavor::Bookworm => files.push((
            "issue.txt".into(),
            b"Raspberry Pi reference 2024-11-19\n".to_vec(),
        )),
        Flavor::Trixie => {
            files.push((
                "issue.txt".into(),
                b"Raspberry Pi reference 2025-10-01\n".to_vec(),
            ));
            files.push(("meta-data".into(), b"instance-id: rpios-image\n".to_vec()));
            files.push((
                "user-data".into(),
                b"#cloud-config\n# Raspberry Pi OS: edit to customise first boot\n".to_vec(),
            ));
            files.push((
                "network-config".into(),
                b"network:\n  version: 2\n".to_vec(),
            ));
        }
        Flavor::Ubuntu => {
            files.push(("meta-data".into(), b"instance-id: cloud-image\n".to_vec()));
            files.push(("user-data".into(), UBUNTU_USER_DATA.as_bytes().to_vec()));
            files.push((
                "network-config".into(),
                b"network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true\n      optional: true\n".to_vec(),
            ));
            files.push(("README".into(), b"Ubuntu for Raspberry Pi\n".to_vec()));
        }
        Flavor::Fedora => {}
    }
    files.extend(spec.extra_boot.iter().cloned());
    files
}

/// Makes `dir/name.img` (and compresses it to `name.img.xz` if `xz`); returns its path.
pub fn make_image(dir: &Path, name: &str, spec: &Spec, xz: bool) -> PathBuf {
    require_tools();
    let root_tree = dir.join(format!("{name}.rootdir"));
    let etc = root_tree.join("etc");
    std::fs::create_dir_all(&etc).expect("mkdir etc");
    std::fs::create_dir_all(root_tree.join("usr/lib")).expect("mkdir usr/lib");
    std::fs::create_dir_all(root_tree.join("usr/bin")).expect("mkdir usr/bin");
    let release = os_release(spec.flavor);
    if spec.flavor == Flavor::Trixie {
        // A plain file here; the others have Debian's symlink into /usr/lib.
        std::fs::write(etc.join("os-release"), release).expect("write os-release");
    } else {
        std::fs::write(root_tree.join("usr/lib/os-release"), release).expect("write os-release");
        std::os::unix::fs::symlink("../usr/lib/os-release", etc.join("os-release"))
            .expect("symlink os-release");
    }
    std::fs::write(root_tree.join("usr/bin/dpkg"), fake_elf(spec.arm64, 4096)).expect("write dpkg");
    std::fs::write(etc.join("hostname"), "raspberrypi\n").expect("write hostname");

    let root_img = dir.join(format!("{name}.root.ext4"));
    let out = Command::new(bramble_image::rootfs::tool("mkfs.ext4"))
        .args(["-q", "-F", "-L", "rootfs", "-d"])
        .arg(&root_tree)
        .arg(&root_img)
        .arg(format!("{ROOT_MIB}M"))
        .output()
        .expect("run mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root_bytes = std::fs::read(&root_img).expect("read root");

    let boot_len = spec.boot_mib << 20;
    let root_start = BOOT_START + boot_len;
    let total = root_start + (ROOT_MIB << 20);
    let path = dir.join(format!("{name}.img"));
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create image");
    f.set_len(total).expect("size image");

    let mut sector = [0u8; 512];
    let lba = |b: u64| u32::try_from(b / 512).expect("small image");
    if spec.no_fat {
        mbr::set_entry(&mut sector, 0, 0x83, lba(root_start), lba(ROOT_MIB << 20));
    } else {
        mbr::set_entry(
            &mut sector,
            0,
            spec.boot_type,
            lba(BOOT_START),
            lba(boot_len),
        );
        mbr::set_entry(&mut sector, 1, 0x83, lba(root_start), lba(ROOT_MIB << 20));
    }
    f.write_all(&sector).expect("write mbr");

    {
        let mut slice = StreamSlice::new(
            f.try_clone().expect("dup"),
            BOOT_START,
            BOOT_START + boot_len,
        )
        .expect("slice");
        let fat = if spec.fat32 {
            fatfs::FatType::Fat32
        } else {
            fatfs::FatType::Fat16
        };
        fatfs::format_volume(
            &mut slice,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fat)
                .volume_label(*b"bootfs     "),
        )
        .expect("format FAT");
        let slice = StreamSlice::new(
            f.try_clone().expect("dup"),
            BOOT_START,
            BOOT_START + boot_len,
        )
        .expect("slice");
        let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).expect("mount FAT");
        for (p, data) in boot_files(spec) {
            if let Some((d, _)) = p.rsplit_once('/') {
                fs.root_dir().create_dir(d).expect("mkdir on FAT");
            }
            let mut file = fs.root_dir().create_file(&p).expect("create on FAT");
            file.write_all(&data).expect("write on FAT");
            file.flush().expect("flush on FAT");
        }
        fs.unmount().expect("unmount FAT");
    }
    f.seek(SeekFrom::Start(root_start)).expect("seek root");
    f.write_all(&root_bytes).expect("write root");
    f.sync_all().expect("sync");
    drop(f);
    std::fs::remove_dir_all(&root_tree).expect("clean root tree");
    std::fs::remove_file(&root_img).expect("clean root image");

    if !xz {
        return path;
    }
    let xz_path = dir.join(format!("{name}.img.xz"));
    let mut enc = xz2::write::XzEncoder::new(File::create(&xz_path).expect("create xz"), 1);
    std::io::copy(&mut File::open(&path).expect("open image"), &mut enc).expect("compress");
    enc.finish().expect("finish xz");
    std::fs::remove_file(&path).expect("clean uncompressed");
    xz_path
}

/// A content hash of a file, to prove it unchanged.
pub fn hash_file(path: &Path) -> (u64, u64) {
    let data = std::fs::read(path).expect("read for hash");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    (data.len() as u64, h.finish())
}

/// Runs the real `bramble-image build` with `args` after `--base IN --out OUT`.
pub fn run_build(base: &Path, out: &Path, args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bramble-image"))
        .arg("build")
        .arg("--base")
        .arg(base)
        .arg("--out")
        .arg(out)
        .arg("--quiet")
        .args(args)
        .current_dir(cwd)
        .env_remove("BRAMBLE_CONTROLLER")
        .env_remove("BRAMBLE_JOIN_TOKEN")
        .env_remove("BRAMBLE_JOIN_TOKEN_FILE")
        .output()
        .expect("run bramble-image")
}

/// The partitions of an image file.
pub fn partitions(path: &Path) -> Vec<mbr::Partition> {
    let mut s = [0u8; 512];
    File::open(path)
        .expect("open")
        .read_exact(&mut s)
        .expect("read mbr");
    mbr::parse(&s).expect("valid mbr")
}

/// Every file on the boot partition of `image`, by path.
pub fn read_boot(image: &Path) -> BTreeMap<String, Vec<u8>> {
    let p = partitions(image)
        .into_iter()
        .find(|p| p.is_fat())
        .expect("a FAT partition");
    let f = File::open(image).expect("open image");
    let fs = fatfs::FileSystem::new(
        StreamSlice::new(ReadOnly(f), p.offset, p.end()).expect("slice"),
        fatfs::FsOptions::new(),
    )
    .expect("mount FAT");
    let mut out = BTreeMap::new();
    walk(&fs.root_dir(), "", &mut out);
    out
}

fn walk<T: fatfs::ReadWriteSeek>(
    dir: &fatfs::Dir<T>,
    prefix: &str,
    out: &mut BTreeMap<String, Vec<u8>>,
) {
    for e in dir.iter() {
        let e = e.expect("dir entry");
        let name = e.file_name();
        if name == "." || name == ".." {
            continue;
        }
        let path = format!("{prefix}{name}");
        if e.is_dir() {
            walk(&e.to_dir(), &format!("{path}/"), out);
        } else {
            let mut data = Vec::new();
            e.to_file().read_to_end(&mut data).expect("read FAT file");
            out.insert(path, data);
        }
    }
}

/// Writes the boot files into a directory, as the Pi would see them mounted.
pub fn extract(files: &BTreeMap<String, Vec<u8>>, dir: &Path) {
    for (p, data) in files {
        let dest = dir.join(p);
        std::fs::create_dir_all(dest.parent().expect("has parent")).expect("mkdir");
        std::fs::write(dest, data).expect("write");
    }
}

/// A file in the ext4 root of `image`, read with debugfs.
pub fn read_root(image: &Path, path: &str) -> String {
    let root = partitions(image)
        .into_iter()
        .find(|p| p.is_linux())
        .expect("a Linux partition");
    let out = Command::new(bramble_image::rootfs::tool("debugfs"))
        .arg("-c")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(format!("{}?offset={}", image.display(), root.offset))
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The bytes of partition `number` of an image.
pub fn partition_bytes(image: &Path, p: &mbr::Partition) -> Vec<u8> {
    let mut f = File::open(image).expect("open");
    f.seek(SeekFrom::Start(p.offset)).expect("seek");
    let mut buf = vec![0u8; usize::try_from(p.len).expect("small")];
    f.read_exact(&mut buf).expect("read partition");
    buf
}

/// Makes a reader look writable to fatfs, which wants Read + Write + Seek even to read;
/// any write fails, so a test cannot change what it inspects.
pub struct ReadOnly<T>(pub T);

impl<T: Read> Read for ReadOnly<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}
impl<T> Write for ReadOnly<T> {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("read-only"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl<T: Seek> Seek for ReadOnly<T> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.0.seek(pos)
    }
}

/// Pseudo-random bytes (xorshift), for "not an image" inputs.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
