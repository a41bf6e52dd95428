//! Pod-wide storages from CreateSandbox: file systems the VMM provides
//! (today: the virtio-fs share, by tag) mounted in the agent's own mount
//! namespace, so that container rootfs paths on them exist before
//! CreateContainer, and unmounted at DestroySandbox.

use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use podbox_protocol::agent::Storage;

use crate::container::Error;

/// The one driver so far: a virtio-fs device's tag.
pub const DRIVER_VIRTIOFS: &str = "virtiofs";

/// A storage checked against what the guest can honour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub source: String,
    pub mount_point: PathBuf,
    pub flags: MsFlags,
}

/// Everything in a Storage comes from the host: check it before mounting.
pub fn check(s: &Storage) -> Result<Checked, Error> {
    if s.driver != DRIVER_VIRTIOFS {
        return Err(Error::Unsupported(format!(
            "storage driver {:?} (only {DRIVER_VIRTIOFS:?})",
            s.driver
        )));
    }
    // The virtio-fs tag is at most 36 bytes (virtio 1.2, 5.11.4).
    if s.source.is_empty() || s.source.len() > 36 || s.source.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "virtiofs tag {:?}: 1 to 36 bytes without NUL",
            s.source
        )));
    }
    let mp = Path::new(&s.mount_point);
    let plain = mp
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !mp.is_absolute() || !plain || mp == Path::new("/") || s.mount_point.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "storage mount point {:?}: an absolute path without .. other than /",
            s.mount_point
        )));
    }
    let mut flags = MsFlags::empty();
    for o in &s.options {
        flags |= match o.as_str() {
            "ro" => MsFlags::MS_RDONLY,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "rw" => MsFlags::empty(),
            other => return Err(Error::InvalidArgument(format!("storage option {other:?}"))),
        };
    }
    Ok(Checked {
        source: s.source.clone(),
        mount_point: mp.to_owned(),
        flags,
    })
}

/// Mounts all of `storages` or none: on a failure the ones already
/// mounted are unmounted again.
pub fn mount_all(storages: &[Storage]) -> Result<Vec<PathBuf>, Error> {
    let checked = storages.iter().map(check).collect::<Result<Vec<_>, _>>()?;
    let mut done = Vec::new();
    for c in checked {
        let result = std::fs::create_dir_all(&c.mount_point)
            .map_err(|e| Error::io(format!("creating {}", c.mount_point.display()), e))
            .and_then(|()| {
                mount(
                    Some(c.source.as_str()),
                    &c.mount_point,
                    Some(DRIVER_VIRTIOFS),
                    c.flags,
                    None::<&str>,
                )
                .map_err(|source| Error::Sys {
                    context: format!(
                        "mounting virtiofs {:?} on {}",
                        c.source,
                        c.mount_point.display()
                    ),
                    source,
                })
            });
        if let Err(e) = result {
            unmount_all(&done);
            return Err(e);
        }
        log::info!(
            "mounted virtiofs {:?} on {}",
            c.source,
            c.mount_point.display()
        );
        done.push(c.mount_point);
    }
    Ok(done)
}

/// Unmounts in reverse order; detached, so a file still open in a dying
/// process does not keep the pod from going away.
pub fn unmount_all(mount_points: &[PathBuf]) -> Vec<String> {
    let mut errors = Vec::new();
    for mp in mount_points.iter().rev() {
        if let Err(e) = umount2(mp, MntFlags::MNT_DETACH) {
            errors.push(format!("unmounting {}: {e}", mp.display()));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(driver: &str, source: &str, mp: &str, options: &[&str]) -> Storage {
        Storage {
            driver: driver.into(),
            source: source.into(),
            mount_point: mp.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn virtiofs_storage_is_checked_before_mounting() {
        let ok = check(&storage(
            "virtiofs",
            "podbox",
            "/run/podbox/shared",
            &["nodev", "nosuid"],
        ))
        .unwrap();
        assert_eq!(ok.flags, MsFlags::MS_NODEV | MsFlags::MS_NOSUID);
        assert!(matches!(
            check(&storage("9p", "t", "/m", &[])),
            Err(Error::Unsupported(_))
        ));
        for (tag, mp, opt) in [
            ("", "/m", ""),
            (&"t".repeat(37) as &str, "/m", ""),
            ("t", "rel", ""),
            ("t", "/a/../etc", ""),
            ("t", "/", ""),
            ("t", "/m", "bind"),
        ] {
            let opts: Vec<&str> = if opt.is_empty() { vec![] } else { vec![opt] };
            assert!(
                matches!(
                    check(&storage("virtiofs", tag, mp, &opts)),
                    Err(Error::InvalidArgument(_))
                ),
                "{tag} {mp} {opt}"
            );
        }
    }
}
