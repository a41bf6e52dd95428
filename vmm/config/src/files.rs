//! What the kernel and initramfs files must look like before podbox-vmm
//! builds a VM from them: checked up front, so a wrong file fails naming
//! its flag (or, in the shim, its config key or annotation) instead of
//! blocking on a FIFO, "loading" a host program as the kernel, or booting
//! a guest that panics on an initramfs it cannot unpack.
//!
//! These read only the files' headers; the loader still does the real
//! work (and its own checks) when the VM is built.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of an initramfs is read to find its first archive: the guest
/// kernel skips NUL padding before (and between) archives.
const INITRD_PROBE_BYTES: usize = 64 << 10;

/// The archive formats a Linux initramfs can be in (uncompressed cpio, or
/// one of the compressors the kernel can unpack it with), by magic.
const INITRD_MAGICS: [(&[u8], &str); 10] = [
    (b"070701", "cpio (newc)"),
    (b"070702", "cpio (crc)"),
    (b"070707", "cpio (odc)"),
    (&[0x1f, 0x8b], "gzip"),
    (&[0x1f, 0x9e], "gzip (old)"),
    (b"BZh", "bzip2"),
    (&[0x5d, 0x00, 0x00], "lzma"),
    (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
    (&[0x89, b'L', b'Z', b'O'], "lzo"),
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
];
/// lz4's legacy frame, the one the kernel unpacks.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];

const ELF_HEADER_LEN: usize = 64;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;
/// The most program headers a vmlinux is read for (it has a handful).
const MAX_PROGRAM_HEADERS: u16 = 64;
/// The most bytes of ELF notes read (the kernel's are a few hundred).
const MAX_NOTES_BYTES: u64 = 64 << 10;

/// Why a file is not a usable kernel or initramfs.
type Reason = String;

/// Refuses what cannot be a file to load: a directory, a FIFO (opening it
/// would block until someone writes), a socket or device.
fn regular_file(path: &Path) -> Result<File, Reason> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else {
            use std::os::unix::fs::FileTypeExt;
            if kind.is_fifo() {
                "a FIFO"
            } else if kind.is_socket() {
                "a socket"
            } else if kind.is_block_device() || kind.is_char_device() {
                "a device"
            } else {
                "not a regular file"
            }
        };
        return Err(format!("{what}, not a regular file"));
    }
    File::open(path).map_err(|e| e.to_string())
}

/// Reads up to `buf.len()` bytes at `offset`; how many it got.
fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> Result<usize, Reason> {
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| e.to_string())?;
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(got)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The first bytes of a file, for error messages.
fn head(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `path` is a regular file holding an x86-64 ELF Linux kernel (vmlinux)
/// whose program headers and segments are all in the file: it carries the
/// kernel's own ELF notes (owner `Linux` or `Xen`), which a host program
/// does not, and it is not truncated.
pub fn check_kernel(path: &Path) -> Result<(), Reason> {
    let mut file = regular_file(path)?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut header = [0u8; ELF_HEADER_LEN];
    let got = read_at(&mut file, 0, &mut header)?;
    if got < 4 || &header[..4] != b"\x7fELF" {
        let what = if size >= 0x206 && {
            let mut magic = [0u8; 4];
            read_at(&mut file, 0x202, &mut magic)? == 4 && &magic == b"HdrS"
        } {
            "a bzImage"
        } else {
            "not an ELF file"
        };
        return Err(format!(
            "{what} (it starts with {}); podbox boots the uncompressed ELF vmlinux",
            head(&header[..got])
        ));
    }
    if got < ELF_HEADER_LEN {
        return Err(format!(
            "a truncated ELF vmlinux: {size} bytes, shorter than its header"
        ));
    }
    if header[4] != 2 || header[5] != 1 || u16_at(&header, 18) != EM_X86_64 {
        return Err(format!(
            "an ELF file, but not a 64-bit little-endian x86-64 one (class {}, data {}, machine {}): not an x86-64 ELF vmlinux",
            header[4],
            header[5],
            u16_at(&header, 18)
        ));
    }
    let phoff = u64_at(&header, 32);
    let phentsize = u16_at(&header, 54);
    let phnum = u16_at(&header, 56);
    if phnum == 0 || phnum > MAX_PROGRAM_HEADERS || phentsize < 56 {
        return Err(format!(
            "an ELF file with {phnum} program headers of {phentsize} bytes: not an ELF vmlinux"
        ));
    }
    let table_len = u64::from(phnum) * u64::from(phentsize);
    if phoff.checked_add(table_len).is_none_or(|end| end > size) {
        return Err(format!(
            "a truncated ELF vmlinux: its program headers end past its {size} bytes"
        ));
    }
    let mut table = vec![0u8; table_len as usize];
    read_at(&mut file, phoff, &mut table)?;
    let mut kernel_notes = false;
    for entry in table.chunks_exact(usize::from(phentsize)) {
        let kind = u32_at(entry, 0);
        let offset = u64_at(entry, 8);
        let file_size = u64_at(entry, 32);
        if kind != PT_LOAD && kind != PT_NOTE {
            continue;
        }
        if offset.checked_add(file_size).is_none_or(|end| end > size) {
            return Err(format!(
                "a truncated ELF vmlinux: a segment at offset {offset:#x} of {file_size:#x} bytes ends past its {size} bytes"
            ));
        }
        if kind == PT_NOTE && file_size <= MAX_NOTES_BYTES {
            let mut notes = vec![0u8; file_size as usize];
            read_at(&mut file, offset, &mut notes)?;
            kernel_notes |= has_kernel_note(&notes);
        }
    }
    if !kernel_notes {
        return Err(
            "an x86-64 ELF file without the Linux kernel's ELF notes (owner Linux or Xen): a program, not an ELF vmlinux"
                .to_string(),
        );
    }
    Ok(())
}

/// Whether ELF note data holds a note owned by `Linux` or `Xen` (every
/// x86 vmlinux has the former; PVH-capable ones the latter).
fn has_kernel_note(mut notes: &[u8]) -> bool {
    while notes.len() >= 12 {
        let name_len = u32_at(notes, 0) as usize;
        let desc_len = u32_at(notes, 4) as usize;
        let name_end = 12 + name_len;
        let Some(name) = notes.get(12..name_end) else {
            return false;
        };
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        if name == b"Linux" || name == b"Xen" {
            return true;
        }
        let next = name_end.next_multiple_of(4) + desc_len.next_multiple_of(4);
        let Some(rest) = notes.get(next..) else {
            return false;
        };
        notes = rest;
    }
    false
}

/// `path` is a regular, non-empty file that starts (after any NUL
/// padding, which the guest kernel skips) with a cpio archive or a
/// compressed stream the kernel can unpack. What is inside is the
/// guest's to unpack; this catches files that are no initramfs at all.
pub fn check_initrd(path: &Path) -> Result<(), Reason> {
    let mut file = regular_file(path)?;
    let mut probe = vec![0u8; INITRD_PROBE_BYTES];
    let got = read_at(&mut file, 0, &mut probe)?;
    if got == 0 {
        return Err("empty".to_string());
    }
    let Some(start) = probe[..got].iter().position(|b| *b != 0) else {
        return Err(format!("only zeros in its first {got} bytes: no archive"));
    };
    let data = &probe[start..got];
    let known = INITRD_MAGICS
        .iter()
        .any(|(magic, _)| data.starts_with(magic))
        || data.starts_with(&LZ4_LEGACY_MAGIC);
    if !known {
        let formats: Vec<&str> = INITRD_MAGICS.iter().map(|(_, name)| *name).collect();
        return Err(format!(
            "not an initramfs: it starts with {} (at byte {start}), which is none of {}, lz4",
            head(data),
            formats.join(", ")
        ));
    }
    Ok(())
}

/// The smallest file [`check_kernel`] takes: an x86-64 ELF with one tiny
/// segment and a `Linux` note. Not bootable; for tests of code that checks
/// kernel files (the shim's config, its annotations).
pub fn minimal_vmlinux() -> Vec<u8> {
    elf(b"Linux", &[0x90; 64])
}

/// A minimal x86-64 ELF: one PT_LOAD of `code`, and a PT_NOTE with
/// one note owned by `owner`.
fn elf(owner: &[u8], code: &[u8]) -> Vec<u8> {
    let phoff = 64u64;
    let phnum = 2u16;
    let notes_at = phoff + 56 * u64::from(phnum);
    let mut note = Vec::new();
    note.extend((owner.len() as u32 + 1).to_le_bytes());
    note.extend(4u32.to_le_bytes());
    note.extend(1u32.to_le_bytes());
    note.extend(owner);
    note.push(0);
    while note.len() % 4 != 0 {
        note.push(0);
    }
    note.extend([0u8; 4]);
    let code_at = notes_at + note.len() as u64;
    let mut img = vec![0u8; 64];
    img[..4].copy_from_slice(b"\x7fELF");
    img[4] = 2;
    img[5] = 1;
    img[6] = 1;
    img[16..18].copy_from_slice(&2u16.to_le_bytes());
    img[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    img[32..40].copy_from_slice(&phoff.to_le_bytes());
    img[54..56].copy_from_slice(&56u16.to_le_bytes());
    img[56..58].copy_from_slice(&phnum.to_le_bytes());
    for (kind, offset, len) in [
        (PT_LOAD, code_at, code.len() as u64),
        (PT_NOTE, notes_at, note.len() as u64),
    ] {
        let mut ph = [0u8; 56];
        ph[..4].copy_from_slice(&kind.to_le_bytes());
        ph[8..16].copy_from_slice(&offset.to_le_bytes());
        ph[32..40].copy_from_slice(&len.to_le_bytes());
        ph[40..48].copy_from_slice(&len.to_le_bytes());
        img.extend(ph);
    }
    img.extend(note);
    img.extend(code);
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("writing a test file");
        path
    }

    #[test]
    fn a_kernel_must_be_a_whole_x86_64_vmlinux() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        assert_eq!(
            check_kernel(&file(d, "ok", &elf(b"Linux", &[0x90; 64]))),
            Ok(())
        );
        assert_eq!(
            check_kernel(&file(d, "xen", &elf(b"Xen", &[0x90; 64]))),
            Ok(())
        );
        let mut bz = vec![0u8; 4096];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let cases: Vec<(std::path::PathBuf, &str)> = vec![
            (d.to_path_buf(), "a directory"),
            (file(d, "text", b"hello\n"), "not an ELF file"),
            (file(d, "bz", &bz), "a bzImage"),
            (file(d, "program", &elf(b"GNU", &[0x90; 64])), "a program"),
            (
                file(d, "short", &elf(b"Linux", &[0x90; 64])[..100]),
                "truncated",
            ),
            (
                file(d, "cut", &elf(b"Linux", &[0x90; 64])[..200]),
                "truncated",
            ),
            (file(d, "header", b"\x7fELF\x02\x01"), "truncated"),
        ];
        let mut i386 = elf(b"Linux", &[0x90; 64]);
        i386[18] = 3;
        let i386 = file(d, "i386", &i386);
        for (path, expected) in cases
            .into_iter()
            .chain([(i386, "not a 64-bit little-endian x86-64")])
        {
            let error = check_kernel(&path).expect_err("refused");
            assert!(error.contains(expected), "{}: {error}", path.display());
        }
        assert!(check_kernel(&d.join("absent")).is_err());
    }

    #[test]
    fn check_files_names_the_flag_and_leaves_absent_files_to_the_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let absent = crate::VmConfig {
            initrd: Some(d.join("absent-initrd")),
            ..crate::VmConfig::new(d.join("absent-vmlinux"))
        };
        assert_eq!(absent.check_files(), Ok(()));
        let text = file(d, "text", b"hello\n");
        let error = crate::VmConfig::new(&text)
            .check_files()
            .expect_err("not ELF");
        assert!(error.to_string().starts_with("--kernel "), "{error}");
        let initrd = file(d, "initrd", b"070701");
        let big = std::fs::OpenOptions::new()
            .write(true)
            .open(&initrd)
            .expect("open");
        big.set_len(300 << 20).expect("sparse");
        let vm = crate::VmConfig {
            initrd: Some(initrd),
            memory_mib: 128,
            ..crate::VmConfig::new(file(d, "vmlinux", &minimal_vmlinux()))
        };
        let error = vm.check_files().expect_err("larger than RAM").to_string();
        assert!(
            error.starts_with("--initrd ") && error.contains("--memory-mib 128"),
            "{error}"
        );
        let roomy = crate::VmConfig {
            memory_mib: 512,
            ..vm
        };
        assert_eq!(roomy.check_files(), Ok(()));
    }

    #[test]
    fn an_initrd_must_start_with_an_archive() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        for ok in [
            b"070701000000".to_vec(),
            [vec![0u8; 512], b"070701".to_vec()].concat(),
            vec![0x1f, 0x8b, 8, 0],
            vec![0x28, 0xb5, 0x2f, 0xfd, 0],
            LZ4_LEGACY_MAGIC.to_vec(),
        ] {
            assert_eq!(check_initrd(&file(d, "ok", &ok)), Ok(()), "{ok:?}");
        }
        for (bytes, expected) in [
            (b"".to_vec(), "empty"),
            (vec![0u8; 4096], "only zeros"),
            (b"#!/bin/sh\necho hi\n".to_vec(), "not an initramfs"),
            (vec![0xa5; 8192], "not an initramfs"),
        ] {
            let error = check_initrd(&file(d, "bad", &bytes)).expect_err("refused");
            assert!(error.contains(expected), "{bytes:?}: {error}");
        }
        let error = check_initrd(d).expect_err("a directory");
        assert!(error.contains("a directory"), "{error}");
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("no NUL");
        // SAFETY: mkfifo(3) with a NUL-terminated path.
        if unsafe { mkfifo(c.as_ptr(), 0o600) } == 0 {
            let error = check_initrd(&fifo).expect_err("a FIFO, refused without blocking");
            assert!(error.contains("a FIFO"), "{error}");
        }
    }

    extern "C" {
        // libc's, without a dependency on the libc crate for one test.
        fn mkfifo(path: *const std::ffi::c_char, mode: u32) -> i32;
    }
}
