//! The pod's share as a hostile guest sees it, on the host, without a VM:
//! the guest writes through virtiofsd, which acts on `share/` as root, so
//! writing through `share/` here is what a guest with root in its own
//! kernel can do. Real mounts, so these need root (and say so when skipped).

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use podbox_mountfd::mountinfo;
use podbox_shim::hostfs;
use podbox_shim::rootfs::ContainerShare;
use podbox_shim::sandbox::state_dir::StateDir;

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED: mounting needs root");
    false
}

/// A state dir under a temporary root, with a bundle whose spec has a
/// read-only and a read-write volume, and host data in both.
struct Pod {
    _tmp: tempfile::TempDir,
    state: StateDir,
    share: ContainerShare,
    ro_volume: PathBuf,
    rw_volume: PathBuf,
}

impl Pod {
    fn new() -> Pod {
        Self::with_root(false)
    }

    /// With `readonly_root`, the spec's `root.readonly` is set, and the spec
    /// also binds a host file (`/etc/hostname`-like) whose mount point must
    /// then be created before the rootfs goes read-only.
    fn with_root(readonly_root: bool) -> Pod {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = StateDir::under(&tmp.path().join("state"), "ns", "pod").expect("ids");
        state.create().expect("creating the state dir and share");
        let (ro_volume, rw_volume) = (tmp.path().join("ro-data"), tmp.path().join("rw-data"));
        for volume in [&ro_volume, &rw_volume] {
            std::fs::create_dir(volume).expect("mkdir volume");
            std::fs::write(volume.join("precious"), b"host data").expect("write");
        }
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs/etc")).expect("mkdir rootfs");
        let host_file = tmp.path().join("hostname");
        std::fs::write(&host_file, b"pod\n").expect("write");
        // An absolute symlink in the image: inside the rootfs it means
        // rootfs/srv, never the host's /srv.
        std::fs::create_dir_all(bundle.join("rootfs/srv")).expect("mkdir");
        std::os::unix::fs::symlink("/srv", bundle.join("rootfs/etc/link")).expect("symlink");
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": readonly_root},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/ro", "type": "bind", "source": ro_volume, "options": ["rbind", "ro"]},
                {"destination": "/rw", "type": "bind", "source": rw_volume, "options": ["rbind", "rw"]},
                {"destination": "/etc/hostname", "type": "bind", "source": host_file, "options": ["rbind", "ro"]},
                {"destination": "/etc/link/podbox-test-x", "type": "tmpfs", "source": "tmpfs"}
            ]
        });
        std::fs::write(bundle.join("config.json"), spec.to_string()).expect("spec");
        let share = ContainerShare::new(&state, "c1");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime
            .block_on(share.prepare(
                &[],
                &bundle,
                podbox_shim::spec::load(&bundle).expect("spec"),
            ))
            .expect("mounting the rootfs and volumes");
        Pod {
            _tmp: tmp,
            state,
            share,
            ro_volume,
            rw_volume,
        }
    }

    fn in_share(&self, relative: &str) -> PathBuf {
        self.share.host_dir.join(relative)
    }

    fn assert_volumes_intact(&self) {
        for volume in [&self.ro_volume, &self.rw_volume] {
            assert_eq!(
                std::fs::read(volume.join("precious")).expect("the volume's host file"),
                b"host data",
                "{}",
                volume.display()
            );
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let problems = self.state.remove();
        assert!(
            problems.is_empty() || std::thread::panicking(),
            "{problems:?}"
        );
    }
}

fn errno(result: std::io::Result<impl Sized>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

/// The mount options (field 6 of mountinfo) of the mount at `point`.
fn mount_options(point: &Path) -> String {
    mountinfo::read(None)
        .expect("mountinfo")
        .into_iter()
        .filter(|m| m.mount_point == point)
        .map(|m| m.options)
        .next_back()
        .unwrap_or_else(|| panic!("{} is not a mount point", point.display()))
}

#[test]
fn the_guest_cannot_change_the_tree_around_its_mounts() {
    if !is_root() {
        return;
    }
    let pod = Pod::new();
    let erofs = Some(libc::EROFS);
    // Plant a symlink where a mount point is, or next to it.
    assert_eq!(
        errno(std::os::unix::fs::symlink("/", pod.in_share("evil"))),
        erofs
    );
    assert_eq!(
        errno(std::fs::create_dir(pod.state.share().join("c2"))),
        erofs
    );
    assert_eq!(errno(std::fs::remove_dir(pod.in_share("mounts"))), erofs);
    assert_eq!(
        errno(std::fs::rename(
            pod.in_share("mounts"),
            pod.in_share("moved")
        )),
        erofs
    );
    // Inside its own rootfs and its rw volume it writes as it likes...
    std::fs::write(pod.in_share("rootfs/etc/x"), b"guest").expect("rootfs is writable");
    std::fs::write(pod.in_share("mounts/2/new"), b"guest").expect("rw volume is writable");
    // ...but a ro volume is read-only on the host as well.
    assert_eq!(
        errno(std::fs::write(pod.in_share("mounts/1/new"), b"x")),
        erofs
    );
    assert_eq!(
        errno(std::fs::remove_file(pod.in_share("mounts/1/precious"))),
        erofs
    );
    pod.assert_volumes_intact();
}

#[test]
fn every_share_mount_is_nosuid_nodev_and_ro_where_asked() {
    if !is_root() {
        return;
    }
    let pod = Pod::new();
    let share = mount_options(&pod.state.share());
    for (point, read_only) in [
        (pod.state.share(), true),
        (pod.share.host_rootfs(), false),
        (pod.in_share("mounts/1"), true),
        (pod.in_share("mounts/2"), false),
    ] {
        let options = mount_options(&point);
        let flags: Vec<&str> = options.split(',').collect();
        assert!(
            flags.contains(&"nosuid") && flags.contains(&"nodev"),
            "{}: {options}",
            point.display()
        );
        assert_eq!(
            flags.contains(&"ro"),
            read_only,
            "{}: {options} (share: {share})",
            point.display()
        );
    }
    // A device node that an image layer (or anyone) put in the rootfs cannot
    // be opened through the share: nodev.
    nix::sys::stat::mknod(
        &pod.in_share("rootfs/null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .expect("host root makes a device node in the rootfs");
    assert_eq!(
        errno(std::fs::File::open(pod.in_share("rootfs/null"))),
        Some(libc::EACCES)
    );
}

#[test]
fn a_readonly_root_is_read_only_on_the_host_with_its_mount_points_made() {
    if !is_root() {
        return;
    }
    let pod = Pod::with_root(true);
    let options = mount_options(&pod.share.host_rootfs());
    assert!(options.split(',').any(|o| o == "ro"), "rootfs: {options}");
    assert_eq!(
        errno(std::fs::write(pod.in_share("rootfs/new"), b"x")),
        Some(libc::EROFS)
    );
    for dir in ["rootfs/proc", "rootfs/ro", "rootfs/rw"] {
        assert!(pod.in_share(dir).is_dir(), "{dir} created for the agent");
    }
    assert!(pod.in_share("rootfs/etc/hostname").is_file());
    // The image's symlink was followed inside the rootfs, never out of it.
    assert!(pod.in_share("rootfs/srv/podbox-test-x").is_dir());
    assert!(!Path::new("/srv/podbox-test-x").exists());
}

#[test]
fn removal_keeps_volume_data_and_survives_hostile_names() {
    if !is_root() {
        return;
    }
    let pod = Pod::new();
    // A mount point with a name that is not UTF-8, nested past PATH_MAX:
    // as if the guest had been able to rename it (it cannot, see above).
    let long = OsString::from_vec([vec![0xff, 0xfe], vec![b'x'; 250]].concat());
    let mut staged = std::fs::File::open(&pod.share.staging_dir).expect("open staging");
    let mut shared = std::fs::File::open(&pod.share.host_dir).expect("open share");
    let mut depth = pod.share.host_dir.as_os_str().len();
    while depth < 4200 {
        let at = |dir: &std::fs::File| {
            PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(&long)
        };
        std::fs::create_dir(at(&staged)).expect("mkdir a long name");
        staged = std::fs::File::open(at(&staged)).expect("open it");
        shared = std::fs::File::open(at(&shared)).expect("open it in the share");
        depth += long.len() + 1;
    }
    let deep_point = PathBuf::from(format!("/proc/self/fd/{}", shared.as_raw_fd()));
    hostfs::attach_restricted(&pod.rw_volume, &deep_point, false, false)
        .expect("mounting at the deep point");
    drop((staged, shared));
    assert!(
        hostfs::mounts_under(&pod.state.dir)
            .iter()
            .any(|m| m.as_os_str().len() > 4096),
        "mountinfo shows the deep mount point"
    );
    let problems = pod.state.remove();
    assert_eq!(problems, Vec::<String>::new());
    assert!(!pod.state.dir.exists(), "the state dir is gone");
    assert!(hostfs::mounts_under(&pod.state.dir).is_empty());
    pod.assert_volumes_intact();
}

#[test]
fn a_guest_swapping_the_tree_for_symlinks_never_redirects_a_mount() {
    if !is_root() {
        return;
    }
    let pod = Pod::new();
    let outside = pod.state.dir.parent().expect("ns dir").join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir outside");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let (stop, target, outside) = (stop.clone(), pod.in_share("mounts"), outside.clone());
        std::thread::spawn(move || {
            let mut planted = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let aside = target.with_file_name("aside");
                if std::fs::rename(&target, &aside).is_ok() {
                    planted += 1;
                }
                if std::os::unix::fs::symlink(&outside, &target).is_ok() {
                    planted += 1;
                }
            }
            planted
        })
    };
    let staging = pod.share.staging_dir.join("mounts");
    for n in 0..2000 {
        let (point, in_share) = (
            staging.join(format!("r{n}")),
            pod.in_share(&format!("mounts/r{n}")),
        );
        std::fs::create_dir(&point).expect("mount point");
        hostfs::attach_restricted(&pod.ro_volume, &in_share, false, true).expect("mounts");
        hostfs::unmount_beneath(&pod.share.host_dir, &in_share).expect("unmounts");
        std::fs::remove_dir(&point).expect("rmdir");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        attacker.join().expect("attacker"),
        0,
        "the guest changed the tree"
    );
    assert!(hostfs::mounts_under(&outside).is_empty());
    assert_eq!(std::fs::read_dir(&outside).expect("outside").count(), 0);
    std::fs::remove_dir(&outside).expect("rmdir outside");
}

#[test]
fn remove_tree_stops_at_a_mount_and_keeps_its_contents() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let volume = tmp.path().join("volume");
    std::fs::create_dir(&volume).expect("mkdir");
    std::fs::write(volume.join("precious"), b"host data").expect("write");
    let tree = tmp.path().join("tree");
    let point = tree.join("a/still-mounted");
    std::fs::create_dir_all(&point).expect("mkdir");
    std::fs::write(tree.join("a/other"), b"x").expect("write");
    hostfs::attach_restricted(&volume, &point, false, false).expect("bind");
    let refused = hostfs::remove_tree(&tree);
    let unmounted = hostfs::unmount_beneath(&tree, &point);
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("mounted")),
        "{refused:?}"
    );
    unmounted.expect("unmounting");
    assert_eq!(
        std::fs::read(volume.join("precious")).expect("read"),
        b"host data"
    );
    hostfs::remove_tree(&tree).expect("removes once nothing is mounted");
    assert!(!tree.exists());
}

#[test]
fn same_id_pods_in_two_namespaces_stay_independent() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("state");
    let a = StateDir::under(&root, "tenant-a", "pod").expect("ids");
    let b = StateDir::under(&root, "tenant-b", "pod").expect("ids");
    a.create().expect("create a");
    b.create().expect("create b");
    std::fs::write(b.staging().join("mine"), b"b").expect("write");
    assert_ne!(a.share(), b.share());
    assert_eq!(a.remove(), Vec::<String>::new());
    assert!(!a.dir.exists());
    assert!(b.staging().join("mine").exists(), "removing a left b alone");
    assert!(
        hostfs::mount_points().contains(&b.share()),
        "b's share still mounted"
    );
    for dir in [
        root.clone(),
        b.dir.clone(),
        b.dir.parent().expect("ns").to_path_buf(),
    ] {
        let mode = std::fs::metadata(&dir).expect("stat").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700,
            "{}",
            dir.display()
        );
    }
    assert_eq!(b.remove(), Vec::<String>::new());
}

#[test]
fn stacked_mounts_are_all_taken_down() {
    if !is_root() {
        return;
    }
    let pod = Pod::new();
    let point = pod.share.staging_dir.join("mounts/stacked");
    std::fs::create_dir(&point).expect("mkdir");
    for _ in 0..3 {
        hostfs::attach_restricted(&pod.rw_volume, &pod.in_share("mounts/stacked"), false, true)
            .expect("stacking a mount");
    }
    assert_eq!(pod.share.remove(), Vec::<String>::new());
    assert!(hostfs::mounts_under(&pod.share.host_dir).is_empty());
    assert!(!pod.share.staging_dir.exists());
    pod.assert_volumes_intact();
}

const SHARED_ROOT_CHILD: &str = "PODBOX_SHARED_ROOT_CHILD";

/// On hosts whose "/" has shared propagation (systemd's default), a
/// snapshot mounted in staging/ must not reach the share by propagation:
/// the share may only ever hold the restricted copy. Runs in a child in a
/// mount namespace of its own whose "/" is made rshared, so the host's
/// mounts are untouched.
#[test]
fn on_a_shared_root_only_the_restricted_snapshot_reaches_the_share() {
    if !is_root() {
        return;
    }
    if std::env::var_os(SHARED_ROOT_CHILD).is_some() {
        return snapshot_in_a_shared_root();
    }
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"));
    child
        .args([
            "on_a_shared_root_only_the_restricted_snapshot_reaches_the_share",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SHARED_ROOT_CHILD, "1");
    // SAFETY: between fork and exec only async-signal-safe syscalls.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut child, || {
            let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SHARED,
                    std::ptr::null(),
                ) == 0;
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    };
    let out = child.output().expect("re-running the test binary");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

fn snapshot_in_a_shared_root() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let image = tmp.path().join("image");
    std::fs::create_dir_all(image.join("etc")).expect("mkdir");
    let bundle = tmp.path().join("bundle");
    std::fs::create_dir_all(&bundle).expect("mkdir");
    let spec =
        serde_json::json!({"ociVersion": "1.0.2", "root": {"path": "rootfs", "readonly": true}});
    std::fs::write(bundle.join("config.json"), spec.to_string()).expect("spec");
    let state = StateDir::under(&tmp.path().join("state"), "ns", "pod").expect("ids");
    state.create().expect("create");
    let share = ContainerShare::new(&state, "c1");
    // What containerd sends for a snapshot: here a plain rbind of a dir.
    let snapshot = containerd_shim::protos::api::Mount {
        type_: "bind".to_string(),
        source: image.display().to_string(),
        options: vec!["rbind".to_string(), "rw".to_string()],
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime
        .block_on(share.prepare(
            &[snapshot],
            &bundle,
            podbox_shim::spec::load(&bundle).expect("spec"),
        ))
        .expect("prepare");
    let rootfs = share.host_rootfs();
    let at_rootfs: Vec<mountinfo::MountInfo> = mountinfo::read(None)
        .expect("mountinfo")
        .into_iter()
        .filter(|m| m.mount_point == rootfs)
        .collect();
    assert_eq!(
        at_rootfs.len(),
        1,
        "one mount, the restricted one: {at_rootfs:#?}"
    );
    let options = mount_options(&rootfs);
    for flag in ["ro", "nosuid", "nodev"] {
        assert!(
            options.split(',').any(|o| o == flag),
            "{flag} missing: {options}"
        );
    }
    assert_eq!(
        errno(std::fs::write(rootfs.join("etc/x"), b"x")),
        Some(libc::EROFS)
    );
    assert!(
        hostfs::mounts_under(&share.staging_dir).is_empty(),
        "the staged snapshot is gone"
    );
    assert_eq!(state.remove(), Vec::<String>::new());
}
