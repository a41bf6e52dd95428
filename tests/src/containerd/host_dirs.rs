//! Host directories containerd makes whatever its config says, and the
//! count of live guards that decides when the teardown may remove them.

use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// Host directories containerd 1.6, its CRI plugin and libcni create
/// whatever the config says, with the subdirectories they make there. Where
/// a directory did not exist before this process started a containerd, the
/// last guard to go removes the empty ones (anything in them is someone's).
const HOST_DIRS_MADE_REGARDLESS: [(&str, &[&str]); 3] = [
    (
        "/run/containerd",
        &["runc/podbox-test", "runc/k8s.io", "runc", "fifo", "s"],
    ),
    ("/var/lib/cni", &["results"]),
    ("/run/netns", &[]),
];

/// Guards that are alive in this process; /run/containerd is tidied only
/// when the last one goes, since the others may be using it.
static LIVE_GUARDS: Mutex<usize> = Mutex::new(0);
/// Which of [`HOST_DIRS_MADE_REGARDLESS`] existed before this process
/// started any containerd; those belong to someone else and are left alone.
static HOST_DIRS_PREEXISTED: OnceLock<[bool; 3]> = OnceLock::new();

/// Notes, the first time only, which host directories existed before any
/// containerd of this process ran.
pub(super) fn note_preexisting_host_dirs() {
    HOST_DIRS_PREEXISTED
        .get_or_init(|| HOST_DIRS_MADE_REGARDLESS.map(|(dir, _)| Path::new(dir).exists()));
}

/// Counts one more live guard (its daemon has been spawned).
pub(super) fn guard_started() {
    *LIVE_GUARDS.lock().unwrap_or_else(|e| e.into_inner()) += 1;
}

/// Counts one guard fewer; true when it was the last one.
pub(super) fn guard_gone_was_last() -> bool {
    let mut live = LIVE_GUARDS.lock().unwrap_or_else(|e| e.into_inner());
    *live = live.saturating_sub(1);
    *live == 0
}

/// When the last guard goes, the empty [`HOST_DIRS_MADE_REGARDLESS`] that
/// did not exist before this process started a containerd.
pub(super) fn remove_host_dirs_made_regardless(last_guard: bool) {
    let preexisted = HOST_DIRS_PREEXISTED.get().copied().unwrap_or([true; 3]);
    for ((dir, subdirs), preexisted) in HOST_DIRS_MADE_REGARDLESS.iter().zip(preexisted) {
        if last_guard && !preexisted {
            // remove_dir fails on a non-empty directory, which is what we want.
            for sub in subdirs.iter().chain([&""]) {
                let _ = std::fs::remove_dir(Path::new(dir).join(sub));
            }
        }
    }
}
