//! Writing initramfs images: the "newc" cpio format the kernel unpacks.

use std::io::{self, Write};
use std::path::Path;

/// An initramfs being assembled in memory.
#[derive(Default)]
pub struct Initramfs {
    data: Vec<u8>,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

impl Initramfs {
    pub fn new() -> Self {
        Self {
            data: Vec::new(),
            next_ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        let name_z = name.len() + 1;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{z:08x}{z:08x}{z:08x}{z:08x}{name_z:08x}{z:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            size = body.len(),
            z = 0,
        );
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path, S_IFDIR | 0o755, b"");
        self
    }

    pub fn file(&mut self, path: &str, mode: u32, contents: &[u8]) -> &mut Self {
        self.entry(path, S_IFREG | mode, contents);
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(path, S_IFLNK | 0o777, target.as_bytes());
        self
    }

    /// Adds a host file's contents at `path`.
    pub fn copy(&mut self, path: &str, mode: u32, host: &Path) -> io::Result<&mut Self> {
        let contents = std::fs::read(host)?;
        Ok(self.file(path, mode, &contents))
    }

    /// The finished archive (with its trailer).
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, b"");
        self.data
    }

    pub fn write_to(self, path: &Path) -> io::Result<()> {
        std::fs::File::create(path)?.write_all(&self.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_end_with_a_trailer() {
        let mut fs = Initramfs::new();
        fs.dir("bin")
            .file("init", 0o755, b"#!/bin/sh\n")
            .symlink("bin/sh", "busybox");
        let img = fs.finish();
        assert_eq!(img.len() % 4, 0);
        assert!(img.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&img);
        assert!(text.contains("TRAILER!!!"));
        assert!(text.contains("#!/bin/sh"));
        // mode field of the first entry (offset 14..22): a 0755 directory
        assert_eq!(&img[14..22], b"000041ed");
    }

    #[test]
    fn cpio_can_list_it() {
        let Ok(out) = std::process::Command::new("cpio").arg("--version").output() else {
            eprintln!("cpio not installed; format checked by the other test only");
            return;
        };
        assert!(out.status.success());
        let dir = std::env::temp_dir().join(format!("podbox-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.cpio");
        let mut fs = Initramfs::new();
        fs.dir("etc").file("etc/hostname", 0o644, b"pod\n");
        fs.write_to(&path).unwrap();
        let list = std::process::Command::new("cpio")
            .args(["-t", "-F"])
            .arg(&path)
            .output()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(String::from_utf8_lossy(&list.stdout), "etc\netc/hostname\n");
    }
}
