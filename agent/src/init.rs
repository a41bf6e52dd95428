//! PID 1 duties inside the guest: the kernel starts the agent as /init with
//! nothing mounted, so it sets up the pseudo filesystems containers and the
//! agent itself rely on, and ends the VM (reset) when the pod is destroyed.
//! None of this runs when the agent is started on a host for testing.

use std::fs;
use std::path::Path;

use nix::mount::{mount, MsFlags};

/// (source, target, fstype, flags, data)
type MountEntry = (
    &'static str,
    &'static str,
    &'static str,
    MsFlags,
    Option<&'static str>,
);

fn base_mounts() -> Vec<MountEntry> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    vec![
        ("proc", "/proc", "proc", nosuid_nodev_noexec, None),
        ("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid_nodev_noexec,
            None,
        ),
    ]
}

/// Mounts the guest's pseudo filesystems. A target that is already a mount
/// (EBUSY) is fine: the kernel may have mounted devtmpfs itself.
pub fn mount_base() -> Result<(), String> {
    for (src, target, fstype, flags, data) in base_mounts() {
        let _ = fs::create_dir_all(target);
        match mount(Some(src), target, Some(fstype), flags, data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => return Err(format!("mount {fstype} on {target}: {e}")),
        }
    }
    // /dev/ptmx must lead to the devpts instance containers' ptys come from.
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    Ok(())
}

pub fn set_hostname(name: &str) -> Result<(), String> {
    nix::unistd::sethostname(name).map_err(|e| format!("sethostname {name:?}: {e}"))
}

/// Runs all PID 1 setup; failures are logged, not fatal, so that the agent
/// still comes up and can report what is wrong.
pub fn setup() {
    if let Err(e) = mount_base() {
        log::error!("{e}");
    }
    if let Err(e) = set_hostname("podbox") {
        log::warn!("{e}");
    }
    // The containers share the agent's network namespace; its loopback
    // starts down. (UpdateInterface configures the NICs.)
    if let Err(e) = crate::network::bring_up_loopback() {
        log::warn!("{e}");
    }
    log::info!("PID 1 setup done");
}

/// Ends the VM. podbox VMs have no ACPI, so a power-off request would just
/// halt the CPUs; a reboot with `reboot=k` (always on podbox-vmm's command
/// line) resets through the i8042, which podbox-vmm treats as a clean exit
/// (status 0). Only returns on failure.
pub fn power_off() -> String {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
        Ok(never) => match never {},
        Err(e) => format!("reboot: {e}"),
    }
}
