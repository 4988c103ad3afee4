//! The MBR (DOS) partition table that every Raspberry Pi image starts with: 446 bytes of
//! boot code, four 16-byte partition entries, and the signature `55 AA`.
//!
//! Only primary partitions are read: Raspberry Pi OS and Ubuntu images have exactly two
//! (a FAT boot partition and an ext4 root), and extended partitions do not occur.

/// Size of a sector as MBR entries count them (images are always 512-byte based).
pub const SECTOR: u64 = 512;

/// One primary partition entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// 1-based partition number, as Linux names it (`p1`…`p4`).
    pub number: u8,
    /// The partition type byte (`0x0c` FAT32 LBA, `0x83` Linux, …).
    pub kind: u8,
    /// Byte offset of the first byte in the image.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Partition {
    /// A FAT type as the Pi firmware accepts for the boot partition.
    pub fn is_fat(&self) -> bool {
        // FAT12, FAT16 (<32M), FAT16, FAT32 CHS, FAT32 LBA, FAT16 LBA.
        matches!(self.kind, 0x01 | 0x04 | 0x06 | 0x0b | 0x0c | 0x0e)
    }

    /// A Linux native partition (ext4 root).
    pub fn is_linux(&self) -> bool {
        self.kind == 0x83
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// What is wrong with a sector that should be an MBR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MbrError {
    /// No `55 AA` at byte 510: not a disk image at all.
    NoSignature,
    /// A protective MBR (type `0xee`): the real table is GPT.
    Gpt,
}

/// Reads the primary partitions of a first sector, skipping empty entries.
pub fn parse(sector: &[u8; 512]) -> Result<Vec<Partition>, MbrError> {
    if sector[510..512] != [0x55, 0xaa] {
        return Err(MbrError::NoSignature);
    }
    let mut parts = Vec::new();
    for i in 0..4u8 {
        let e = &sector[446 + 16 * usize::from(i)..][..16];
        let kind = e[4];
        let start = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
        let sectors = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
        if kind == 0xee {
            return Err(MbrError::Gpt);
        }
        if kind == 0 || sectors == 0 {
            continue;
        }
        parts.push(Partition {
            number: i + 1,
            kind,
            offset: u64::from(start) * SECTOR,
            len: u64::from(sectors) * SECTOR,
        });
    }
    Ok(parts)
}

/// Writes a partition entry into a first sector, and the signature (for tests and tools
/// that make images; `bramble-image` itself never changes the table).
pub fn set_entry(sector: &mut [u8; 512], index: usize, kind: u8, start_lba: u32, sectors: u32) {
    let e = &mut sector[446 + 16 * index..][..16];
    e.fill(0);
    // CHS fields are unused by anything that boots a Pi; 0xfe/0xff/0xff means "use LBA".
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[4] = kind;
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&start_lba.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    sector[510] = 0x55;
    sector[511] = 0xaa;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_pi_os_table() {
        let mut s = [0u8; 512];
        set_entry(&mut s, 0, 0x0c, 8192, 1_048_576);
        set_entry(&mut s, 1, 0x83, 1_056_768, 4_000_000);
        let p = parse(&s).expect("valid table");
        assert_eq!(p.len(), 2);
        assert!(p[0].is_fat() && !p[0].is_linux());
        assert_eq!(
            (p[0].number, p[0].offset, p[0].len),
            (1, 8192 * 512, 1_048_576 * 512)
        );
        assert!(p[1].is_linux());
        assert_eq!(p[1].end(), (1_056_768 + 4_000_000) * 512);
    }

    #[test]
    fn rejects_what_is_not_an_mbr() {
        assert_eq!(parse(&[0u8; 512]), Err(MbrError::NoSignature));
        let mut s = [0u8; 512];
        set_entry(&mut s, 0, 0xee, 1, 100);
        assert_eq!(parse(&s), Err(MbrError::Gpt));
    }

    #[test]
    fn skips_empty_entries() {
        let mut s = [0u8; 512];
        set_entry(&mut s, 2, 0x83, 2048, 100);
        let p = parse(&s).expect("valid table");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].number, 3);
    }
}
