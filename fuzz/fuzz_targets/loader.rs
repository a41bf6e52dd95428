//! The kernel and initramfs loader (`arch::x86_64::loader`) as the VM
//! builder runs it: arbitrary bytes as the vmlinux file (linux-loader's ELF
//! parser, then where the kernel ends), as the initramfs file (its
//! placement at the top of low RAM), then the zero page
//! (`arch::x86_64::boot_params::build`) for what was loaded.
//!
//! Input: a little-endian u32 kernel length, the kernel, the initramfs.

#![no_main]

use std::fs::File;
use std::io::{Seek, Write};
use std::os::fd::FromRawFd;

use libfuzzer_sys::fuzz_target;
use podbox_vmm::arch::x86_64::{boot_params, layout, loader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// 32 MiB of guest RAM (mapped lazily: only what a load touches costs).
const RAM: u64 = 32 << 20;

fn memfd(bytes: &[u8]) -> File {
    // SAFETY: memfd_create with a static NUL-terminated name; the result
    // is checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(c"podbox-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor nothing else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(bytes).expect("writing the memfd");
    f.rewind().expect("rewinding the memfd");
    f
}

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let split = (u32::from_le_bytes(*len) as usize).min(rest.len());
    let (kernel, initrd) = rest.split_at(split);
    let ram = layout::ram_ranges(RAM);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)])
        .expect("guest memory");
    let Ok(loaded) = loader::load_kernel(&mem, &mut memfd(kernel)) else {
        return;
    };
    let low_ram_end = ram[0].0 + ram[0].1;
    let initrd = if initrd.is_empty() {
        None
    } else {
        match loader::load_initrd(&mem, &mut memfd(initrd), loaded.end, low_ram_end) {
            Ok(p) => Some(p),
            Err(_) => return,
        }
    };
    let _ = boot_params::build(&ram, 64, initrd);
});
