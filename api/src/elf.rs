//! The little of ELF that Bramble reads: whether an executable is static, and which
//! machine it is for (the cron gate must run in any image on the node's own CPU).

/// Whether an ELF file names an interpreter (a `PT_INTERP` program header): a
/// dynamically linked executable needs its loader in the container, a static one does
/// not. Errors say what is malformed.
pub fn has_interpreter(elf: &[u8]) -> Result<bool, &'static str> {
    const PT_INTERP: u32 = 3;
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("no ELF magic");
    }
    let wide = match elf.get(4) {
        Some(1) => false,
        Some(2) => true,
        _ => return Err("unknown ELF class"),
    };
    let little = match elf.get(5) {
        Some(1) => true,
        Some(2) => false,
        _ => return Err("unknown byte order"),
    };
    let int = |at: usize, len: usize| -> Result<u64, &'static str> {
        let b = elf
            .get(at..at.checked_add(len).ok_or("truncated")?)
            .ok_or("truncated")?;
        let mut v: u64 = 0;
        for i in 0..len {
            let byte = if little { b[len - 1 - i] } else { b[i] };
            v = (v << 8) | u64::from(byte);
        }
        Ok(v)
    };
    let (phoff, phentsize, phnum) = if wide {
        (int(0x20, 8)?, int(0x36, 2)?, int(0x38, 2)?)
    } else {
        (int(0x1c, 4)?, int(0x2a, 2)?, int(0x2c, 2)?)
    };
    if phnum == 0 {
        return Ok(false);
    }
    if phentsize < 4 {
        return Err("program headers too small");
    }
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * phentsize)
            .and_then(|a| usize::try_from(a).ok())
            .ok_or("program header out of range")?;
        if int(at, 4)? == u64::from(PT_INTERP) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// An ELF file's machine (`e_machine`).
pub fn machine(elf: &[u8]) -> Result<u16, &'static str> {
    let b = elf.get(0x12..0x14).ok_or("truncated")?;
    match elf.get(5) {
        Some(1) => Ok(u16::from_le_bytes([b[0], b[1]])),
        Some(2) => Ok(u16::from_be_bytes([b[0], b[1]])),
        _ => Err("unknown byte order"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_static_executable_has_no_interpreter_and_a_dynamic_one_has() {
        // This test binary is dynamically linked (a glibc target) or static (musl).
        let exe = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        assert_eq!(has_interpreter(&exe), Ok(cfg!(target_env = "gnu")));
        if let Ok(ls) = std::fs::read("/bin/ls") {
            assert_eq!(has_interpreter(&ls), Ok(true));
        }
        let want = match std::env::consts::ARCH {
            "x86_64" => Some(62),
            "aarch64" => Some(183),
            _ => None,
        };
        if let Some(want) = want {
            assert_eq!(machine(&exe), Ok(want));
        }
    }

    #[test]
    fn malformed_elf_files_are_errors_not_panics() {
        assert_eq!(has_interpreter(b""), Err("no ELF magic"));
        assert_eq!(has_interpreter(b"#!/bin/sh\n"), Err("no ELF magic"));
        assert_eq!(has_interpreter(b"\x7fELF\x03"), Err("unknown ELF class"));
        assert_eq!(has_interpreter(b"\x7fELF\x02\x01"), Err("truncated"));
        assert_eq!(machine(b"\x7fELF\x02\x01"), Err("truncated"));
        // A header whose program headers lie beyond the file.
        let mut h = vec![0u8; 64];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        h[0x20] = 0xff;
        h[0x36] = 56;
        h[0x38] = 1;
        assert_eq!(has_interpreter(&h), Err("truncated"));
        // Huge offsets do not overflow.
        h[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(has_interpreter(&h).is_err());
        h[0x36] = 1;
        assert_eq!(has_interpreter(&h), Err("program headers too small"));
        // No program headers at all: nothing names an interpreter.
        h[0x38] = 0;
        assert_eq!(has_interpreter(&h), Ok(false));
        // A 32-bit big-endian header is read too.
        let mut b = vec![0u8; 52];
        b[..6].copy_from_slice(b"\x7fELF\x01\x02");
        b[0x12..0x14].copy_from_slice(&40u16.to_be_bytes());
        b[0x2b] = 32;
        assert_eq!(has_interpreter(&b), Ok(false));
        assert_eq!(machine(&b), Ok(40));
        // Every prefix of a real executable is handled.
        let exe = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        for len in 0..256.min(exe.len()) {
            let _ = has_interpreter(&exe[..len]);
            let _ = machine(&exe[..len]);
        }
    }
}
