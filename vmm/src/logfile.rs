//! A size-bounded log file for output a hostile guest controls, and a
//! bounded reader for its last lines.
//!
//! [`RotatingLog`] keeps at most two files, `PATH` (newest) and `PATH.1`,
//! each at most `max_bytes`: a guest that prints for ever costs at most
//! `2 * max_bytes` of disk (often a tmpfs under `/run`, i.e. host memory),
//! and the log itself holds no buffer. [`tail`] reads a bounded window from
//! the end, however large the files are.
//!
//! Both assume one writer per path (the size is counted, not re-read).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// How much [`tail`] reads at most, from both files together.
pub const TAIL_WINDOW: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log {}: the size limit must be at least 1 byte", path.display())]
    ZeroLimit { path: PathBuf },
    #[error("log {}: is a symbolic link; refusing to follow it", path.display())]
    Symlink { path: PathBuf },
    #[error("log {}: not a regular file with a single link", path.display())]
    NotPlainFile { path: PathBuf },
    #[error("opening log {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("rotating log {} to {}: {source}", path.display(), to.display())]
    Rotate {
        path: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error("writing log {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

/// An appending, unbuffered [`Write`] whose file is rotated to `PATH.1`
/// before it would grow past `max_bytes`.
///
/// A write that fits in an empty file is never split across the two files
/// (whole lines stay whole when they are written in one call); a longer one
/// is split, so nothing is ever held back in memory.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    rotated: PathBuf,
    file: File,
    len: u64,
    max_bytes: u64,
}

impl RotatingLog {
    /// Opens (creating it, mode 0600) the log at `path` to append to. An
    /// existing file counts towards the limit. A symlink, a hard-linked file
    /// or anything but a regular file at `path` is refused: someone who can
    /// plant one must not get our output written into another file.
    pub fn create(path: impl AsRef<Path>, max_bytes: u64) -> Result<Self, LogError> {
        let path = path.as_ref().to_owned();
        if max_bytes == 0 {
            return Err(LogError::ZeroLimit { path });
        }
        let (file, len) = open_append(&path)?;
        Ok(Self {
            rotated: rotated_path(&path),
            path,
            file,
            len,
            max_bytes,
        })
    }

    /// The newest file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves `PATH` to `PATH.1` (replacing it) and starts an empty `PATH`.
    /// A missing `PATH` is not an error, so a rotation that failed half-way
    /// (renamed, not reopened) is finished by the next write.
    fn rotate(&mut self) -> Result<(), LogError> {
        match std::fs::rename(&self.path, &self.rotated) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LogError::Rotate {
                    path: self.path.clone(),
                    to: self.rotated.clone(),
                    source,
                })
            }
        }
        let (file, len) = open_append(&self.path)?;
        self.file = file;
        self.len = len;
        Ok(())
    }
}

impl Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.len.saturating_add(buf.len() as u64) > self.max_bytes && self.len > 0 {
            self.rotate().map_err(io::Error::other)?;
        }
        let room =
            usize::try_from(self.max_bytes - self.len.min(self.max_bytes)).unwrap_or(usize::MAX);
        let n = self.file.write(&buf[..buf.len().min(room)]).map_err(|e| {
            // Keep the kind: write_all retries Interrupted.
            let kind = e.kind();
            let err = LogError::Write {
                path: self.path.clone(),
                source: e,
            };
            io::Error::new(kind, err)
        })?;
        self.len += n as u64;
        Ok(n)
    }

    /// Nothing to do: every write goes straight to the file.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `PATH.1`, where [`RotatingLog`] moves the full file.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".1");
    name.into()
}

/// Opens `path` without following a symlink in its last component and
/// without blocking (a FIFO planted there would block a plain open; it is
/// then refused as not a regular file).
fn open_nofollow(path: &Path, options: &mut OpenOptions) -> Result<File, LogError> {
    let file = options
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => LogError::Symlink { path: path.into() },
            _ => LogError::Open {
                path: path.into(),
                source,
            },
        })?;
    let meta = file.metadata().map_err(|source| LogError::Open {
        path: path.into(),
        source,
    })?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(LogError::NotPlainFile { path: path.into() });
    }
    Ok(file)
}

/// Opens the log for appending; returns it with its current size.
fn open_append(path: &Path) -> Result<(File, u64), LogError> {
    let file = open_nofollow(
        path,
        OpenOptions::new().append(true).create(true).mode(0o600),
    )?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((file, len))
}

/// The last at most `max` bytes of the file at `path`, and whether they
/// start at its beginning.
fn read_end(path: &Path, max: u64) -> Result<(Vec<u8>, bool), LogError> {
    let mut file = open_nofollow(path, OpenOptions::new().read(true))?;
    let read_err = |source| LogError::Open {
        path: path.into(),
        source,
    };
    let len = file.metadata().map_err(read_err)?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start)).map_err(read_err)?;
    let mut bytes = Vec::new();
    // take(): the file may grow while we read.
    file.take(max).read_to_end(&mut bytes).map_err(read_err)?;
    Ok((bytes, start == 0))
}

/// The last `lines` lines of the log at `path`, for error messages and
/// display: lossy UTF-8, joined with `\n`, without a trailing newline (a
/// final line without one counts as a line; `\r` before `\n` is dropped).
///
/// Reads at most [`TAIL_WINDOW`] bytes from the end. When `path` is shorter
/// than that and has fewer lines, the rest come from the end of a rotated
/// `PATH.1` ([`RotatingLog`]), so a tail just after a rotation is not cut
/// short. A missing or unreadable log, a symlink, or a non-regular file
/// gives an empty string: this is for display, never for control.
pub fn tail(path: &Path, lines: usize) -> String {
    if lines == 0 {
        return String::new();
    }
    let Ok((mut bytes, mut whole)) = read_end(path, TAIL_WINDOW) else {
        return String::new();
    };
    if whole && count_lines(&bytes) < lines {
        let budget = TAIL_WINDOW - bytes.len() as u64;
        if let Ok((mut older, older_whole)) = read_end(&rotated_path(path), budget) {
            older.append(&mut bytes);
            bytes = older;
            whole = older_whole;
        }
    }
    last_lines(&bytes, whole, lines)
}

fn count_lines(bytes: &[u8]) -> usize {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if body.is_empty() {
        0
    } else {
        body.iter().filter(|&&b| b == b'\n').count() + 1
    }
}

/// The last `lines` lines of `bytes`. When `bytes` does not start at the
/// start of the log, its first line is a fragment and is dropped (unless it
/// is all there is: the tail of one huge line).
fn last_lines(bytes: &[u8], whole: bool, lines: usize) -> String {
    let mut body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if !whole {
        if let Some(at) = body.iter().position(|&b| b == b'\n') {
            body = &body[at + 1..];
        }
    }
    if body.is_empty() {
        return String::new();
    }
    let all: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| String::from_utf8_lossy(l.strip_suffix(b"\r").unwrap_or(l)))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const MIB: u64 = 1 << 20;

    fn size(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn twenty_mib_through_a_one_mib_log_stays_within_two_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.log");
        let mut log = RotatingLog::create(&path, MIB).unwrap();
        // 4000-byte writes: not a divisor of 1 MiB, so rotations land
        // mid-stream; each write carries its sequence number.
        let mut last = Vec::new();
        for i in 0..(20 * MIB / 4000) {
            last = format!("{i:>12}\n").into_bytes();
            last.resize(4000, b'.');
            *last.last_mut().unwrap() = b'\n';
            log.write_all(&last).unwrap();
        }
        let rotated = rotated_path(&path);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "exactly PATH and PATH.1");
        assert!(size(&path) <= MIB && size(&rotated) <= MIB);
        assert!(size(&path) + size(&rotated) <= 2 * MIB + 4000);
        assert!(size(&rotated) > MIB - 4000, "PATH.1 was full when rotated");
        let newest = std::fs::read(&path).unwrap();
        assert!(newest.ends_with(&last), "the newest bytes are in PATH");
        assert_eq!(newest.len() % 4000, 0, "whole writes were not split");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn an_existing_file_counts_and_is_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, b"old\n").unwrap();
        let mut log = RotatingLog::create(&path, 6).unwrap();
        log.write_all(b"ab").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nab");
        log.write_all(b"c").unwrap();
        assert_eq!(std::fs::read(rotated_path(&path)).unwrap(), b"old\nab");
        assert_eq!(std::fs::read(&path).unwrap(), b"c");
    }

    #[test]
    fn a_line_longer_than_the_limit_is_split() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut log = RotatingLog::create(&path, 10).unwrap();
        assert_eq!(
            log.write(&[b'x'; 25]).unwrap(),
            10,
            "one write, cut at the limit"
        );
        log.write_all(&[b'y'; 25]).unwrap();
        assert_eq!(std::fs::read(rotated_path(&path)).unwrap(), b"yyyyyyyyyy");
        assert_eq!(std::fs::read(&path).unwrap(), b"yyyyy");
    }

    #[test]
    fn a_symlink_or_other_non_plain_file_at_the_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"precious").unwrap();
        let link = dir.path().join("log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = RotatingLog::create(&link, MIB).unwrap_err();
        assert!(matches!(err, LogError::Symlink { .. }), "{err}");
        assert!(err.to_string().contains(&*link.to_string_lossy()), "{err}");
        let hard = dir.path().join("hard");
        std::fs::hard_link(&target, &hard).unwrap();
        let err = RotatingLog::create(&hard, MIB).unwrap_err();
        assert!(matches!(err, LogError::NotPlainFile { .. }), "{err}");
        assert!(matches!(
            RotatingLog::create(dir.path(), MIB),
            Err(LogError::Open { .. } | LogError::NotPlainFile { .. })
        ));
        assert!(matches!(
            RotatingLog::create(dir.path().join("x"), 0),
            Err(LogError::ZeroLimit { .. })
        ));
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        assert_eq!(tail(&link, 5), "", "tail does not follow it either");
    }

    #[test]
    fn tail_of_a_large_file_reads_only_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let mut text = String::new();
        for i in 0..200_000 {
            text.push_str(&format!("line {i}\r\n"));
        }
        std::fs::write(&path, &text).unwrap();
        assert!(size(&path) > 10 * TAIL_WINDOW);
        assert_eq!(tail(&path, 3), "line 199997\nline 199998\nline 199999");
        // More lines than the window holds: what the window has, no fragment.
        let got = tail(&path, 1_000_000);
        assert!(got.len() as u64 <= TAIL_WINDOW);
        assert!(got.starts_with("line ") && got.ends_with("line 199999"));
        assert_eq!(tail(&path, 0), "");
        assert_eq!(tail(&dir.path().join("missing"), 3), "");
    }

    #[test]
    fn tail_without_a_trailing_newline_and_of_one_huge_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"a\nb\nc").unwrap();
        assert_eq!(tail(&path, 2), "b\nc");
        assert_eq!(tail(&path, 10), "a\nb\nc");
        std::fs::write(&path, vec![b'z'; 3 * TAIL_WINDOW as usize]).unwrap();
        assert_eq!(tail(&path, 1).len() as u64, TAIL_WINDOW);
        std::fs::write(&path, b"").unwrap();
        assert_eq!(tail(&path, 1), "");
    }

    #[test]
    fn tail_continues_into_the_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut log = RotatingLog::create(&path, 16).unwrap();
        log.write_all(b"one\ntwo\nthree\n").unwrap();
        log.write_all(b"four\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"four\n");
        assert_eq!(tail(&path, 3), "two\nthree\nfour");
    }
}
