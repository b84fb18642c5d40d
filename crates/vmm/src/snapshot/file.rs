//! The state file: a fixed header, then the VM's state as JSON.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "BRISKSNP"
//!      8     4  format version (u32 LE), FORMAT_VERSION
//!     12     4  reserved, 0
//!     16     8  body length in bytes (u64 LE)
//!     24     4  CRC-32 (IEEE) of the body (u32 LE)
//!     28     4  reserved, 0
//!     32     -  body: the SavedVm as JSON
//! ```
//!
//! Reading checks each in that order, so a file from another program, from
//! another format version, cut short or altered is refused with the one
//! sentence that says which, before anything is built.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The first bytes of every state file.
pub const MAGIC: &[u8; 8] = b"BRISKSNP";
/// The newest state file format this brisk writes. Bump it whenever the
/// body's meaning changes: a brisk refuses files newer than it reads.
/// Version 2 added diff layers (`SavedVm::layers`), which a version-1
/// reader would ignore and restore wrongly; a state without layers is
/// still written (and read) as version 1, so older brisks and migration
/// destinations take it.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this brisk reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
const HEADER: usize = 32;
/// A state file is ~20 KiB a vCPU; refuse to read a file claiming more
/// than this (it bounds what parsing may allocate).
const MAX_BODY: u64 = 8 << 20;

/// Write `state` to `path` (through a new temporary file renamed into
/// place, so a reader sees the old file or the new one, never half of one;
/// the temporary file is removed if anything fails).
pub fn write<T: Serialize>(path: &Path, state: &T) -> std::io::Result<()> {
    write_versioned(path, state, FORMAT_VERSION)
}

/// As [`write`], in format `version` (the oldest that holds `state`).
pub fn write_versioned<T: Serialize>(path: &Path, state: &T, version: u32) -> std::io::Result<()> {
    let out = encode_versioned(state, version)?;
    super::memory::replace(path, |f| f.write_all(&out))
}

/// The bytes of a state file holding `state` (also a migration's STATE).
pub fn encode<T: Serialize>(state: &T) -> std::io::Result<Vec<u8>> {
    encode_versioned(state, FORMAT_VERSION)
}

/// As [`encode`], in format `version`. A body larger than a reader takes
/// ([`MAX_BODY`]) is refused here, so no state is written that brisk
/// would then refuse to read.
pub fn encode_versioned<T: Serialize>(state: &T, version: u32) -> std::io::Result<Vec<u8>> {
    let body = serde_json::to_vec(state)?;
    if body.len() as u64 > MAX_BODY {
        return Err(std::io::Error::other(format!(
            "the state is {} bytes, more than the {MAX_BODY} a state file may hold",
            body.len()
        )));
    }
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Why a file of a snapshot cannot be used: one sentence naming it.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is {kind}; a snapshot is made of regular files", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{} is {len} bytes, too big to be a brisk state file", path.display())]
    TooBig { path: PathBuf, len: u64 },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
}

/// Why a state file's bytes are not a state this brisk reads.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a brisk snapshot state file (no BRISKSNP header)")]
    NoMagic,
    #[error("truncated: {0} bytes, shorter than the {HEADER}-byte header")]
    ShortHeader(usize),
    #[error("snapshot format version {0}; this brisk reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}")]
    Version(u32),
    #[error("corrupt: the header's reserved fields are not zero")]
    Reserved,
    #[error("truncated: the header promises {promised} bytes of state, the file has {have}")]
    Truncated { promised: u64, have: u64 },
    #[error("{junk} bytes of junk after the {len} bytes of state")]
    Junk { junk: u64, len: u64 },
    #[error("corrupt: the state does not match its checksum")]
    Checksum,
    #[error("the state does not parse: {0}")]
    Parse(#[source] serde_json::Error),
}

/// Read a state file, or the one sentence saying why it cannot be used.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let f = open_regular(path)?;
    let read = |source| FileError::Read {
        path: path.into(),
        source,
    };
    let len = f.metadata().map_err(read)?.len();
    if len > HEADER as u64 + MAX_BODY {
        return Err(FileError::TooBig {
            path: path.into(),
            len,
        });
    }
    let mut bytes = Vec::new();
    f.take(HEADER as u64 + MAX_BODY)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    parse(&bytes).map_err(|source| FileError::Format {
        path: path.into(),
        source,
    })
}

/// Whether the file at `path` begins as a brisk state file does (of any
/// format version): brisk's to replace.
pub(crate) fn has_magic(path: &Path) -> bool {
    let mut head = [0u8; 8];
    open_regular(path).is_ok_and(|mut f| f.read_exact(&mut head).is_ok() && &head == MAGIC)
}

/// Open a file a snapshot is made of, for reading: only a regular file,
/// never through a symlink (a state names files inside its directory),
/// and never waiting in `open` (a FIFO put there is refused, not waited
/// on: `O_NONBLOCK`, then the type checked on the open file).
pub(crate) fn open_regular(path: &Path) -> Result<std::fs::File, FileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let not_regular = |m: &std::fs::Metadata| {
        let t = m.file_type();
        let kind = if t.is_symlink() {
            "a symbolic link"
        } else if t.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        FileError::NotRegular {
            path: path.into(),
            kind,
        }
    };
    let open = |source| FileError::Open {
        path: path.into(),
        source,
    };
    let m = std::fs::symlink_metadata(path).map_err(open)?;
    if !m.is_file() {
        return Err(not_regular(&m));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .map_err(open)?;
    let m = f.metadata().map_err(open)?;
    if !m.is_file() {
        return Err(not_regular(&m));
    }
    Ok(f)
}

/// Check and decode a state file's bytes (pure: the fuzz target's entry).
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(FormatError::NoMagic);
    }
    if bytes.len() < HEADER {
        return Err(FormatError::ShortHeader(bytes.len()));
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let version = word(8);
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(FormatError::Version(version));
    }
    if word(12) != 0 || word(28) != 0 {
        return Err(FormatError::Reserved);
    }
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let have = (bytes.len() - HEADER) as u64;
    if len != have {
        return Err(if len > have {
            FormatError::Truncated {
                promised: len,
                have,
            }
        } else {
            FormatError::Junk {
                junk: have - len,
                len,
            }
        });
    }
    let body = &bytes[HEADER..];
    if crc32fast::hash(body) != word(24) {
        return Err(FormatError::Checksum);
    }
    serde_json::from_slice(body).map_err(FormatError::Parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct S {
        a: u32,
        b: String,
    }

    fn bytes() -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!("brisk-file-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state");
        write(
            &p,
            &S {
                a: 7,
                b: "x".into(),
            },
        )
        .unwrap();
        let b = std::fs::read(&p).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        b
    }

    #[test]
    fn round_trip_and_every_refusal_names_its_reason() {
        let good = bytes();
        assert_eq!(
            parse::<S>(&good).unwrap(),
            S {
                a: 7,
                b: "x".into()
            }
        );
        let refuse = |b: &[u8]| parse::<S>(b).unwrap_err().to_string();
        assert!(refuse(b"hello world").contains("not a brisk snapshot"));
        assert!(refuse(&good[..20]).contains("truncated"));
        assert!(refuse(&good[..good.len() - 1]).contains("truncated"));
        let mut newer = good.clone();
        newer[8] = 3;
        assert!(refuse(&newer).contains("format version 3"));
        // Version 1 (no diff layers) is still read.
        let mut older = good.clone();
        older[8] = 1;
        assert!(parse::<S>(&older).is_ok());
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(refuse(&flipped).contains("checksum"));
        let mut longer = good.clone();
        longer.push(b' ');
        assert!(refuse(&longer).contains("junk"));
        for reserved in [12, 28] {
            let mut r = good.clone();
            r[reserved] = 1;
            assert!(refuse(&r).contains("reserved"), "{reserved}");
        }
        // A body that checks out but is not the state.
        let body = b"[1,2]";
        let mut other = good[..32].to_vec();
        other[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
        other[24..28].copy_from_slice(&crc32fast::hash(body).to_le_bytes());
        other.extend_from_slice(body);
        assert!(refuse(&other).contains("does not parse"));
    }
}
