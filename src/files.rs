//! Reading the configuration and certificate files: regular files only, opened without blocking,
//! read up to a size cap, and identified by a stamp so that an unchanged file need not be read
//! again.
//!
//! A path that turns out to be a FIFO would block `open(2)` until a writer appears, and a
//! `read(2)` of a device or a huge file would not end soon; either would stall whatever thread
//! polls the file. So the file is opened with `O_NONBLOCK` (which opens a FIFO at once and does
//! nothing to a regular file), checked with `fstat` on the open descriptor, and refused unless it
//! is a regular file within the cap.

use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// The largest configuration file read: a policy of hundreds of rules is tens of KiB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The largest certificate or key file read: a PEM chain is a few KiB.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// What tells one version of a file from another without reading it: the file a path leads to
/// (device, inode), its size, and its modification and change times (nanoseconds). A rewrite in
/// place changes the times; a rename over the path or a ConfigMap's `..data` swap the inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(metadata: &Metadata) -> Stamp {
        Stamp {
            dev: metadata.dev(),
            ino: metadata.ino(),
            len: metadata.len(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is {kind}, not a regular file; kms-tag-guard reads its configuration and certificates only from regular files (or symlinks to them)")]
    NotRegular { path: String, kind: &'static str },
    #[error(
        "{path} is {len} bytes, more than the {max} bytes kms-tag-guard reads from such a file"
    )]
    TooLarge { path: String, len: u64, max: u64 },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The stamp of the file `path` leads to (symlinks followed), without opening it.
pub fn stamp(path: &Path) -> Result<Stamp, FileError> {
    std::fs::metadata(path)
        .map(|m| Stamp::of(&m))
        .map_err(io_error(path))
}

/// Reads a regular file of at most `max` bytes, and its stamp (taken on the open descriptor, so
/// it belongs to the bytes read even if the path is swapped meanwhile).
pub fn read(path: &Path, max: u64) -> Result<(Vec<u8>, Stamp), FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io_error(path))?;
    let metadata = file.metadata().map_err(io_error(path))?;
    check_regular(path, &metadata)?;
    if metadata.len() > max {
        return Err(FileError::TooLarge {
            path: path.display().to_string(),
            len: metadata.len(),
            max,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    // One byte more than allowed: a file that grew past the cap since fstat is refused too.
    Read::take(&file, max + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(path))?;
    if bytes.len() as u64 > max {
        return Err(FileError::TooLarge {
            path: path.display().to_string(),
            len: bytes.len() as u64,
            max,
        });
    }
    Ok((bytes, Stamp::of(&metadata)))
}

fn check_regular(path: &Path, metadata: &Metadata) -> Result<(), FileError> {
    let file_type = metadata.file_type();
    let kind = if file_type.is_file() {
        return Ok(());
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    Err(FileError::NotRegular {
        path: path.display().to_string(),
        kind,
    })
}

/// How many descriptors this process has open.
#[cfg(test)]
fn open_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_regular_files_within_the_cap_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "a = 1\n").unwrap();
        let (bytes, stamp) = read(&path, 64).unwrap();
        assert_eq!(bytes, b"a = 1\n");
        assert_eq!(super::stamp(&path).unwrap(), stamp);

        std::fs::write(&path, vec![b'#'; 65]).unwrap();
        assert!(matches!(
            read(&path, 64),
            Err(FileError::TooLarge { len: 65, .. })
        ));
        assert_ne!(
            super::stamp(&path).unwrap(),
            stamp,
            "a rewrite changes the stamp"
        );

        // A FIFO with no writer: open(2) without O_NONBLOCK would wait for one forever.
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let before = open_count();
        let error = read(&fifo, 64).unwrap_err();
        assert!(error.to_string().contains("a FIFO"), "{error}");
        assert_eq!(open_count(), before, "the FIFO is closed again");
        // Through a symlink, as a ConfigMap mounts it.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        assert!(matches!(read(&link, 64), Err(FileError::NotRegular { .. })));

        for (device, kind) in [("/dev/zero", "character device"), ("/", "directory")] {
            let error = read(Path::new(device), 64).unwrap_err();
            assert!(error.to_string().contains(kind), "{device}: {error}");
        }
    }
}
