//! Turning the input (`.img` or `.img.xz`) into the working copy that gets edited.
//!
//! The copy is sparse: runs of zeros (most of a fresh image's root partition) are skipped
//! with a seek instead of written, so a 5 GB Raspberry Pi OS image costs about 2.5 GB of
//! disk and is written twice as fast.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use indicatif::ProgressBar;

use crate::{Error, Result};

/// The magic bytes that start every xz stream.
const XZ_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0x00];
/// Copy granularity, and the size of a hole worth skipping.
const CHUNK: usize = 1 << 20;

/// True if `path` should be decompressed: it is named `*.xz` or starts like xz.
pub fn is_xz(path: &Path) -> Result<bool> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("xz"))
    {
        return Ok(true);
    }
    let mut head = [0u8; 6];
    let mut f = File::open(path).map_err(|source| Error::ReadInput {
        path: path.to_path_buf(),
        source,
    })?;
    let n = read_full(&mut f, &mut head).map_err(|source| Error::ReadInput {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(n == head.len() && head == XZ_MAGIC)
}

/// Copies (or decompresses) `input` into `out`, which must be empty; returns the image's
/// length. `progress` counts bytes of the input read.
pub fn unpack(
    input: &Path,
    out: &mut File,
    out_path: &Path,
    progress: &ProgressBar,
) -> Result<u64> {
    let read_err = |source| Error::ReadInput {
        path: input.to_path_buf(),
        source,
    };
    let src = File::open(input).map_err(read_err)?;
    progress.set_length(src.metadata().map_err(read_err)?.len());
    let src = progress.wrap_read(src);
    if is_xz(input)? {
        progress.set_message("decompressing");
        // Multi-stream: parallel compressors (pixz, xz -T on some versions) write several.
        let mut dec = xz2::read::XzDecoder::new_multi_decoder(src);
        sparse_copy(&mut dec, out, out_path, |source| Error::Decompress {
            path: input.to_path_buf(),
            source,
        })
    } else {
        progress.set_message("copying");
        let mut src = src;
        sparse_copy(&mut src, out, out_path, read_err)
    }
}

fn sparse_copy(
    src: &mut impl Read,
    out: &mut File,
    out_path: &Path,
    read_err: impl Fn(io::Error) -> Error,
) -> Result<u64> {
    let write_err = |source| Error::WriteOutput {
        path: out_path.to_path_buf(),
        source,
    };
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    loop {
        let n = read_full(src, &mut buf).map_err(&read_err)?;
        if n == 0 {
            break;
        }
        if !is_zero(&buf[..n]) {
            out.seek(SeekFrom::Start(pos)).map_err(write_err)?;
            out.write_all(&buf[..n]).map_err(write_err)?;
        }
        pos += n as u64;
    }
    // Gives the file its full length when it ends in a hole.
    out.set_len(pos).map_err(write_err)?;
    Ok(pos)
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_full(src: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn is_zero(buf: &[u8]) -> bool {
    // Word-wise: a byte loop over every megabyte of a multi-GB image is measurable.
    let mut words = buf.chunks_exact(16);
    words
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().expect("chunks_exact gives 16 bytes")) == 0)
        && words.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 100]));
        assert!(is_zero(&[]));
        for i in [0, 15, 16, 99] {
            let mut b = [0u8; 100];
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
        }
    }

    #[test]
    fn sparse_copy_keeps_content_and_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut data = vec![0u8; 3 * CHUNK + 100];
        data[CHUNK + 5] = 7;
        data[3 * CHUNK + 99] = 9;
        let path = dir.path().join("out");
        let mut out = File::create(&path).expect("create");
        let n = sparse_copy(&mut &data[..], &mut out, &path, |source| Error::ReadInput {
            path: path.clone(),
            source,
        })
        .expect("copies");
        assert_eq!(n, data.len() as u64);
        assert_eq!(std::fs::read(&path).expect("read back"), data);
    }
}
