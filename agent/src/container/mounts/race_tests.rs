//! The container as attacker (the runc CVE-2021-30465 class): while the
//! agent's own `mount_one` bind-mounts onto `/a/b`, a racing thread keeps
//! swapping the directory `a` in the rootfs with a symlink to a directory
//! outside it. Every attempt must either fail and leave nothing mounted,
//! or mount inside the rootfs.
//!
//! Needs root. The attack runs in a re-executed copy of this test binary
//! in a mount namespace of its own with private propagation, so nothing it
//! mounts is ever visible on the host, even if it dies half-way; a guard
//! unmounts what it made in any case.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{renameat2, RenameFlags};
use nix::mount::{umount2, MntFlags};
use oci_spec::runtime::{Mount, MountBuilder};
use podbox_mountfd::mountinfo;

use super::{mount_one, Tree};

const ATTEMPTS: usize = 2000;
/// Set in the re-executed child, which then runs the attack itself.
const CHILD_ENV: &str = "PODBOX_MOUNT_RACE_CHILD";

#[test]
fn bind_mount_onto_a_path_swapped_for_a_symlink_stays_in_the_rootfs() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "\n!!!!! SKIPPING the mount race test: needs root (mount namespaces, mounts) !!!!!\n"
        );
        return;
    }
    if std::env::var_os(CHILD_ENV).is_some() {
        return attack();
    }
    let name = concat!(
        module_path!(),
        "::bind_mount_onto_a_path_swapped_for_a_symlink_stays_in_the_rootfs"
    );
    let name = name.split_once("::").map_or(name, |(_crate, rest)| rest);
    let mut cmd = Command::new(std::env::current_exe().expect("test binary path"));
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1");
    // SAFETY: the hook makes only async-signal-safe syscalls.
    unsafe { cmd.pre_exec(private_mount_namespace) };
    let out = cmd.output().expect("re-run the test binary");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success(), "the attack failed (output above)");
    assert!(
        text.contains("1 passed"),
        "the child did not run the attack"
    );
}

/// Between fork and exec: a new mount namespace whose mounts propagate
/// nowhere, so the host never sees them.
fn private_mount_namespace() -> std::io::Result<()> {
    // SAFETY: plain syscalls on static strings.
    let ok = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[derive(Default, Debug)]
struct Tally {
    inside: usize,
    failed_clean: usize,
    /// Failed, yet left a mount behind (inside the rootfs).
    failed_dirty: usize,
    /// Landed outside the rootfs, whatever mount_one returned.
    outside: usize,
    first_error: Option<String>,
}

const MARKER: &str = "from the bind source";

/// Both kinds of bind target: a directory (`/a/b`) and a file (`/a/f`),
/// created on the way like the agent does.
fn attack() {
    let tallies = [attack_one(false), attack_one(true)];
    for tally in tallies {
        assert_eq!(tally.outside, 0, "mounts escaped the rootfs: {tally:?}");
        assert_eq!(
            tally.failed_dirty, 0,
            "failed attempts left mounts: {tally:?}"
        );
        assert!(
            tally.inside > 0,
            "no attempt succeeded, nothing was tested: {tally:?}"
        );
    }
}

fn attack_one(file: bool) -> Tally {
    let tmp = tempfile::tempdir().expect("temp dir");
    let base = tmp.path().canonicalize().unwrap();
    let (rootfs, outside) = (base.join("rootfs"), base.join("outside"));
    for d in [rootfs.join("a"), outside.clone()] {
        std::fs::create_dir_all(d).unwrap();
    }
    let (src, leaf) = if file {
        std::fs::write(base.join("src"), MARKER).unwrap();
        (base.join("src"), "f")
    } else {
        std::fs::create_dir(base.join("src")).unwrap();
        std::fs::write(base.join("src/marker"), MARKER).unwrap();
        (base.join("src"), "b")
    };
    // The targets already exist on both sides, as an attacker would
    // prepare them.
    for d in [&rootfs.join("a"), &outside] {
        if file {
            std::fs::write(d.join(leaf), "").unwrap();
        } else {
            std::fs::create_dir(d.join(leaf)).unwrap();
        }
    }
    // What the attacker plants: an absolute symlink to where it wants the
    // mount, swapped with the real directory `a` over and over.
    std::os::unix::fs::symlink(&outside, rootfs.join("evil")).unwrap();

    let _unmount = Unmount(base.clone());
    let racer = Racer::start(rootfs.join("a"), rootfs.join("evil"));
    let tree = Tree::open(&rootfs).unwrap();
    let mnt = bind_spec(&src, &format!("/a/{leaf}"));
    let mut tally = Tally::default();
    for i in 0..ATTEMPTS {
        racer.go();
        let result = mount_one(&tree, &mnt);
        racer.pause();
        let landed = Landed {
            base: &base,
            rootfs: &rootfs,
            outside_target: &outside.join(leaf),
        };
        landed.check(i, result, &mut tally);
    }
    let swaps = racer.swaps.load(Ordering::Relaxed);
    drop(racer);
    eprintln!(
        "mount race ({} target): {ATTEMPTS} attempts, {swaps} swaps: {} inside the rootfs, \
         {} failed cleanly, {} failed leaving a mount, {} landed OUTSIDE; first error: {:?}",
        if file { "file" } else { "directory" },
        tally.inside,
        tally.failed_clean,
        tally.failed_dirty,
        tally.outside,
        tally.first_error
    );
    tally
}

fn bind_spec(src: &Path, dest: &str) -> Mount {
    MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(src)
        .options(vec![
            "rbind".to_string(),
            "ro".to_string(),
            "nosuid".to_string(),
        ])
        .build()
        .unwrap()
}

/// Whether `p` shows the bind source: its marker file, or its content.
fn shows_marker(p: &Path) -> bool {
    if p.is_dir() {
        p.join("marker").exists()
    } else {
        std::fs::read_to_string(p).is_ok_and(|s| s == MARKER)
    }
}

struct Landed<'a> {
    base: &'a Path,
    rootfs: &'a Path,
    /// Where the mount lands when the attack works.
    outside_target: &'a Path,
}

impl Landed<'_> {
    /// Where the attempt's mount landed (the racer is parked, so the tree
    /// holds still); then removes it.
    fn check(&self, i: usize, result: Result<(), String>, tally: &mut Tally) {
        let mounts = mounts_under(self.base);
        let escaped =
            shows_marker(self.outside_target) || mounts.iter().any(|m| !m.starts_with(self.rootfs));
        match (&result, mounts.len()) {
            _ if escaped => tally.outside += 1,
            (Ok(()), 1) if shows_marker(&mounts[0]) => tally.inside += 1,
            (Ok(()), _) => panic!("attempt {i} succeeded, yet mounts are {mounts:?}"),
            (Err(_), 0) => tally.failed_clean += 1,
            (Err(_), _) => tally.failed_dirty += 1,
        }
        if let (Err(e), None) = (&result, &tally.first_error) {
            tally.first_error = Some(e.clone());
        }
        unmount_all(&mounts);
        let left = mounts_under(self.base);
        assert!(left.is_empty(), "attempt {i}: could not unmount {left:?}");
    }
}

/// Mount points at or below `dir`, in mount order.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mountinfo::read(None)
        .unwrap()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(dir))
        .collect()
}

fn unmount_all(mounts: &[PathBuf]) {
    for m in mounts.iter().rev() {
        let _ = umount2(m.as_path(), MntFlags::MNT_DETACH);
    }
}

/// Unmounts whatever is left below its directory, also when the test
/// fails; it is dropped after the racer is stopped and before the temp
/// dir is removed (which must not recurse into a mount).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        for _ in 0..10 {
            let left = mounts_under(&self.0);
            if left.is_empty() {
                return;
            }
            unmount_all(&left);
        }
    }
}

/// How long the racer keeps each state: about the gap between a check
/// and a mount, so that the two often see different states.
const HOLD: Duration = Duration::from_micros(2);

fn hold(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const PAUSED: u8 = 2;
const STOP: u8 = 3;

/// A thread that swaps two paths (RENAME_EXCHANGE) while told to run, and
/// parks on request so that checks between attempts see a still tree.
struct Racer {
    state: Arc<AtomicU8>,
    swaps: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Racer {
    fn start(a: PathBuf, b: PathBuf) -> Racer {
        let state = Arc::new(AtomicU8::new(PAUSED));
        let swaps = Arc::new(AtomicU64::new(0));
        let (st, sw) = (state.clone(), swaps.clone());
        let thread = std::thread::spawn(move || loop {
            match st.load(Ordering::Acquire) {
                RUN => {
                    renameat2(None, &a, None, &b, RenameFlags::RENAME_EXCHANGE)
                        .expect("swap with RENAME_EXCHANGE");
                    sw.fetch_add(1, Ordering::Relaxed);
                    hold(HOLD);
                }
                PAUSE => {
                    let _ = st.compare_exchange(PAUSE, PAUSED, Ordering::AcqRel, Ordering::Acquire);
                }
                STOP => return,
                _ => std::thread::yield_now(),
            }
        });
        Racer {
            state,
            swaps,
            thread: Some(thread),
        }
    }

    /// Returns once the racer is swapping, so that every attempt races.
    fn go(&self) {
        let before = self.swaps.load(Ordering::Relaxed);
        self.state.store(RUN, Ordering::Release);
        while self.swaps.load(Ordering::Relaxed) == before {
            self.check_alive();
            std::hint::spin_loop();
        }
    }

    fn pause(&self) {
        self.state.store(PAUSE, Ordering::Release);
        while self.state.load(Ordering::Acquire) != PAUSED {
            self.check_alive();
            std::thread::yield_now();
        }
    }

    fn check_alive(&self) {
        let died = self.thread.as_ref().is_none_or(|t| t.is_finished());
        assert!(!died, "the racer thread died (output above)");
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        self.state.store(STOP, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
