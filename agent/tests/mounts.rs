//! The filesystem view the agent builds: each kind of mount a spec uses
//! lands where the spec says with the flags it asks for, masked and
//! read-only paths are in place, and destinations whose path runs through
//! symlinks in the rootfs are resolved inside the rootfs (as runc does),
//! never on the host. Needs root; says so loudly when skipped.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use podbox_mountfd::mountinfo::{self, MountInfo};
use serde_json::json;

/// What the container reports: files through its mounts, then its
/// mountinfo after a "---" line.
const SCRIPT: &str = "cat /data/marker /etc/podbox-file /podbox-inside/vol/marker \
     /podbox-up/vol/marker; \
     touch /data/x 2>/dev/null && echo data-writable || echo data-read-only; \
     echo keys=$(wc -c < /proc/keys); \
     echo firmware=$(ls -A /sys/firmware | wc -l); \
     test -c /dev/null && echo null-is-a-device; \
     echo fd=$(readlink /dev/fd); \
     echo ---; cat /proc/self/mountinfo";

/// Mount point -> its mount (the last one where mounts are stacked), from
/// mountinfo.
fn mount_table(info: &str) -> HashMap<PathBuf, MountInfo> {
    mountinfo::parse(info.as_bytes())
        .into_iter()
        .map(|m| (m.mount_point.clone(), m))
        .collect()
}

fn has_opts(t: &HashMap<PathBuf, MountInfo>, at: &str, want: &[&str]) {
    let m = t
        .get(Path::new(at))
        .unwrap_or_else(|| panic!("nothing mounted on {at}: {t:?}"));
    for w in want {
        assert!(
            m.has_option(w),
            "{at} has options {}, wanted {w}",
            m.options
        );
    }
}

#[test]
fn mounts_masks_and_readonly_paths_land_inside_with_their_flags() {
    let test = "mounts_masks_and_readonly_paths_land_inside_with_their_flags";
    let Some(a) = pod_for(test, false) else {
        return;
    };
    for p in ["/podbox-inside", "/podbox-up"] {
        assert!(
            !Path::new(p).exists(),
            "{p} exists on this host: test cannot tell"
        );
    }
    let vol = a.dir.path().join("vol");
    std::fs::create_dir(&vol).unwrap();
    std::fs::write(vol.join("marker"), "volume\n").unwrap();
    let file = a.dir.path().join("hostfile");
    std::fs::write(&file, "file\n").unwrap();
    // Symlinks that point out of the rootfs when followed on the host;
    // inside the rootfs they lead to /podbox-inside and /podbox-up.
    for d in ["podbox-inside", "podbox-up"] {
        std::fs::create_dir(a.rootfs.join(d)).unwrap();
    }
    std::os::unix::fs::symlink("/podbox-inside", a.rootfs.join("abs")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../podbox-up", a.rootfs.join("up")).unwrap();

    let mut s = spec(&["sh", "-c", SCRIPT]);
    let (vol, file) = (vol.display().to_string(), file.display().to_string());
    for m in [
        json!({"destination": "/data", "type": "bind", "source": vol,
               "options": ["rbind", "ro", "nosuid", "rprivate"]}),
        json!({"destination": "/etc/podbox-file", "type": "bind", "source": file,
               "options": ["bind", "ro"]}),
        json!({"destination": "/abs/vol", "type": "bind", "source": vol, "options": ["rbind"]}),
        json!({"destination": "/up/vol", "type": "bind", "source": vol, "options": ["rbind"]}),
        json!({"destination": "/run", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "nodev", "noexec", "mode=755", "size=1m", "rslave"]}),
    ] {
        s["mounts"].as_array_mut().unwrap().push(m);
    }
    a.run("m", &s);
    let code = a.wait("m", "");
    let (out, err) = (a.stdout("m", ""), a.stderr("m", ""));
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let (report, info) = out.split_once("---\n").expect("report, then mountinfo");
    let expected = "volume\nfile\nvolume\nvolume\ndata-read-only\nkeys=0\nfirmware=0\n\
                    null-is-a-device\nfd=/proc/self/fd\n";
    assert_eq!(report, expected, "stderr: {err}");

    let t = mount_table(info);
    has_opts(&t, "/data", &["ro", "nosuid"]);
    has_opts(&t, "/etc/podbox-file", &["ro"]);
    has_opts(&t, "/podbox-inside/vol", &["rw"]);
    has_opts(&t, "/podbox-up/vol", &["rw"]);
    has_opts(&t, "/run", &["nosuid", "nodev", "noexec"]);
    has_opts(&t, "/dev", &["nosuid"]);
    has_opts(&t, "/tmp", &["nosuid", "nodev"]);
    has_opts(&t, "/sys", &["ro", "nosuid", "nodev", "noexec"]);
    has_opts(&t, "/proc/sys", &["ro"]);
    has_opts(&t, "/sys/firmware", &["ro"]);
    has_opts(&t, "/proc/keys", &[]);
    has_opts(&t, "/dev/null", &[]);
    assert_eq!(t[Path::new("/sys/firmware")].fs_type, "tmpfs");
    assert_eq!(t[Path::new("/run")].fs_type, "tmpfs");

    // The symlinked destinations were created inside the rootfs; nothing
    // appeared on the host.
    assert!(a.rootfs.join("podbox-inside/vol").is_dir());
    assert!(a.rootfs.join("podbox-up/vol").is_dir());
    for p in ["/podbox-inside", "/podbox-up"] {
        assert!(!Path::new(p).exists(), "{p} was created on the host");
    }
    assert_eq!(a.host_mounts_under_dir(), Vec::<String>::new());
}
