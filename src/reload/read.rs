//! Reading a hot-reloaded file: bounded in size, and fingerprinted (SHA-256) to tell whether its
//! text changed since it was last read.
//!
//! The fingerprint is change detection, not security (only the operator writes these files); SHA-256
//! because it is already a dependency and no two texts an operator writes will share one.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

/// The largest hot-reloaded file read, in bytes: a 100,000-tenant routing table is ~11 MB as JSON and
/// ~10 MB as YAML. A larger file is refused before it is read whole, so a runaway generator or a wrong
/// path cannot make a reload allocate without bound.
pub(crate) const MAX_FILE_BYTES: u64 = 32 << 20;

/// A file's SHA-256.
pub(crate) type Fingerprint = [u8; 32];

/// How much of a file is hashed at a time when only its fingerprint is wanted.
const BLOCK: usize = 64 << 10;

/// The fingerprint of `path`'s text, read in blocks (most checks find a file unchanged, and then its
/// text is never held whole).
pub(crate) fn fingerprint_file(path: &Path) -> io::Result<Fingerprint> {
    let mut file = File::open(path)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0; BLOCK];
    let mut total: u64 = 0;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        if total > MAX_FILE_BYTES {
            return Err(too_large());
        }
        hash.update(&buf[..n]);
    }
    Ok(hash.finalize().into())
}

/// `path`'s whole text and its fingerprint, from one read (so the two always agree).
pub(crate) fn read_file(path: &Path) -> io::Result<(String, Fingerprint)> {
    let file = File::open(path)?;
    let hint = file.metadata().map_or(0, |m| m.len().min(MAX_FILE_BYTES));
    let mut bytes = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    let print = fingerprint(&bytes);
    let text = String::from_utf8(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "the file is not UTF-8 text"))?;
    Ok((text, print))
}

/// The fingerprint of text in memory.
pub fn fingerprint(bytes: &[u8]) -> Fingerprint {
    Sha256::digest(bytes).into()
}

fn too_large() -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!(
            "the file is larger than {} MiB, the limit for a hot-reloaded file",
            MAX_FILE_BYTES >> 20
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_over_the_size_limit_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.yaml");
        let file = File::create(&path).unwrap();
        file.set_len(MAX_FILE_BYTES + 1).unwrap();
        for e in [
            read_file(&path).unwrap_err(),
            fingerprint_file(&path).unwrap_err(),
        ] {
            assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
            assert!(e.to_string().contains("larger than 32 MiB"), "{e}");
        }
        file.set_len(MAX_FILE_BYTES).unwrap();
        assert!(
            fingerprint_file(&path).is_ok(),
            "the limit itself is allowed"
        );
    }

    #[test]
    fn the_text_and_its_fingerprint_come_from_one_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let text = "tenants:\n".repeat(20_000);
        std::fs::write(&path, &text).unwrap();
        let (read, print) = read_file(&path).unwrap();
        assert_eq!(read, text);
        assert_eq!(print, fingerprint(text.as_bytes()));
        assert_eq!(fingerprint_file(&path).unwrap(), print, "read in blocks");
        assert_ne!(fingerprint(b"abc"), fingerprint(b"abc\0"));
        std::fs::write(&path, b"ok\n\xff\n").unwrap();
        assert_eq!(
            read_file(&path).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
