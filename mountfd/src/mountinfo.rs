//! `/proc/<pid>/mountinfo`, parsed once for everyone (the shim, the agent
//! and their tests).
//!
//! A line is (proc(5)):
//!
//! ```text
//! 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! (1)(2)(3)   (4)   (5)      (6)      (7)   (8) (9)   (10)         (11)
//! ```
//!
//! with zero or more optional fields (7) ended by a lone `-` (8). The
//! kernel writes paths as bytes, escaping space, tab, newline and backslash
//! as `\ooo`; everything else, including bytes that are not UTF-8, comes
//! through as is (a guest may name a directory with any bytes but `/` and
//! NUL). So the text is read as bytes, and split on spaces and newlines
//! before anything is decoded.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// One mount, one line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// The mount's id (field 1).
    pub id: u32,
    /// The id of the mount it is mounted on (field 2).
    pub parent_id: u32,
    /// The directory of its filesystem the mount shows (field 4), decoded.
    pub root: PathBuf,
    /// Where it is mounted (field 5), decoded.
    pub mount_point: PathBuf,
    /// Per-mount options (field 6): `rw`/`ro`, `nosuid`, `nodev`, ...
    pub options: String,
    /// The filesystem type (field 9), decoded.
    pub fs_type: String,
    /// The filesystem's source (field 10), decoded.
    pub source: PathBuf,
    /// Per-superblock options (field 11), as the kernel wrote them: a
    /// value's own commas stay escaped (`\054`), so splitting on `,` is safe.
    pub super_options: String,
}

impl MountInfo {
    /// Whether `opt` is one of the per-mount options (field 6).
    pub fn has_option(&self, opt: &str) -> bool {
        self.options.split(',').any(|o| o == opt)
    }
}

/// The mounts in mountinfo `text`, in its order. Lines that do not parse
/// (too few fields, no `-` separator, ids that are not numbers) are skipped.
pub fn parse(text: &[u8]) -> Vec<MountInfo> {
    text.split(|b| *b == b'\n').filter_map(parse_line).collect()
}

/// The mounts of the mount namespace of process `pid` (`None`: this
/// process), from `/proc/<pid>/mountinfo`.
pub fn read(pid: Option<u32>) -> std::io::Result<Vec<MountInfo>> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/mountinfo"),
        None => "/proc/self/mountinfo".to_string(),
    };
    Ok(parse(&std::fs::read(path)?))
}

fn parse_line(line: &[u8]) -> Option<MountInfo> {
    let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
    // Fields 1 to 6 are always there; the separator comes after them and
    // after the optional fields.
    let sep = 6 + fields.get(6..)?.iter().position(|f| *f == b"-")?;
    let number = |f: &[u8]| std::str::from_utf8(f).ok()?.parse::<u32>().ok();
    let path = |f: &[u8]| PathBuf::from(OsString::from_vec(unescape(f)));
    let text = |f: &[u8]| String::from_utf8_lossy(f).into_owned();
    Some(MountInfo {
        id: number(fields[0])?,
        parent_id: number(fields[1])?,
        root: path(fields[3]),
        mount_point: path(fields[4]),
        options: text(fields[5]),
        fs_type: text(&unescape(fields.get(sep + 1)?)),
        source: path(fields.get(sep + 2)?),
        super_options: fields.get(sep + 3).map(|f| text(f)).unwrap_or_default(),
    })
}

/// Decodes the kernel's `\ooo` escapes (three octal digits); a backslash
/// not followed by three of them stays as it is.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |n, b| n * 8 + u32::from(b - b'0')))
            .and_then(|n| u8::try_from(n).ok());
        match (field[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const PLAIN: &[u8] =
        b"36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue";

    #[test]
    fn a_line_gives_every_field() {
        let mounts = parse(PLAIN);
        assert_eq!(
            mounts,
            vec![MountInfo {
                id: 36,
                parent_id: 35,
                root: PathBuf::from("/mnt1"),
                mount_point: PathBuf::from("/mnt2"),
                options: "rw,noatime".to_string(),
                fs_type: "ext3".to_string(),
                source: PathBuf::from("/dev/root"),
                super_options: "rw,errors=continue".to_string(),
            }]
        );
        assert!(mounts[0].has_option("rw"));
        assert!(mounts[0].has_option("noatime"));
        assert!(!mounts[0].has_option("ro"));
        assert!(!mounts[0].has_option("noat"), "whole options only");
        assert!(
            !mounts[0].has_option("errors=continue"),
            "not a super option"
        );
    }

    #[test]
    fn any_number_of_optional_fields_is_skipped() {
        let none = b"22 1 0:21 / /proc rw,nosuid - proc proc rw";
        let two = b"23 22 0:5 / /dev rw shared:5 master:2 - devtmpfs udev rw,size=10k";
        let three = b"24 23 0:6 / /x ro shared:7 master:3 propagate_from:1 - tmpfs none rw";
        let mounts = parse(&[&none[..], two, three].join(&b'\n'));
        let got: Vec<(&str, &str, &str)> = mounts
            .iter()
            .map(|m| {
                let point = m.mount_point.to_str().unwrap();
                (point, m.options.as_str(), m.fs_type.as_str())
            })
            .collect();
        assert_eq!(
            got,
            [
                ("/proc", "rw,nosuid", "proc"),
                ("/dev", "rw", "devtmpfs"),
                ("/x", "ro", "tmpfs")
            ]
        );
        assert_eq!(mounts[1].source, Path::new("udev"));
        assert_eq!(mounts[1].super_options, "rw,size=10k");
    }

    #[test]
    fn escaped_space_tab_newline_and_backslash_are_decoded() {
        let line = b"40 1 0:30 /r\\040oot /a\\040b\\011c\\012d\\134e rw - tmpfs my\\040src rw";
        let mounts = parse(line);
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].root, Path::new("/r oot"));
        assert_eq!(mounts[0].mount_point, Path::new("/a b\tc\nd\\e"));
        assert_eq!(mounts[0].source, Path::new("my src"));
        // Not an escape: kept as written.
        let odd = parse(b"41 1 0:31 / /odd\\9 rw - tmpfs none rw");
        assert_eq!(odd[0].mount_point, Path::new("/odd\\9"));
        assert_eq!(unescape(b"/x\\400"), b"/x\\400", "over 255");
    }

    #[test]
    fn bytes_that_are_not_utf8_come_through() {
        let mounts = parse(b"42 1 0:32 / /\xff\xfe\\040x rw - tmpfs none rw");
        let expected = PathBuf::from(OsString::from_vec(b"/\xff\xfe x".to_vec()));
        assert_eq!(mounts[0].mount_point, expected);
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let text = [
            &b""[..],
            b"garbage",
            b"1 2 0:1 / /no-separator rw shared:1 tmpfs none rw",
            b"x 2 0:1 / /bad-id rw - tmpfs none rw",
            b"1 2 0:1 / /no-source rw - tmpfs",
            // The separator cannot be one of the fixed fields.
            b"1 2 0:1 / - rw tmpfs none rw",
            PLAIN,
            b"",
        ]
        .join(&b'\n');
        let points: Vec<PathBuf> = parse(&text).into_iter().map(|m| m.mount_point).collect();
        assert_eq!(points, [PathBuf::from("/mnt2")]);
    }

    #[test]
    fn this_process_has_a_root_mount() {
        let mounts = read(None).expect("reads /proc/self/mountinfo");
        assert!(mounts.iter().any(|m| m.mount_point == Path::new("/")));
        let own = read(Some(std::process::id())).expect("reads /proc/<pid>/mountinfo");
        assert!(own.iter().any(|m| m.mount_point == Path::new("/")));
    }
}
