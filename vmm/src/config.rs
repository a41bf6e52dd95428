//! What a VM is made of, as the command line gives it, validated before
//! anything is created.

use std::path::PathBuf;

use crate::arch::x86_64::mptable::MAX_VCPUS;
use crate::devices::virtio::fs::TAG_LEN;
use crate::virtiofsd::VirtiofsdConfig;

/// Smallest guest the kernel and an initramfs fit in.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Largest guest: 1 TiB.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;

/// Default size limit of a serial console file: 1 MiB.
pub const DEFAULT_SERIAL_MAX_BYTES: u64 = 1 << 20;
/// Bounds of `--serial-max-bytes`: 4 KiB to 1 GiB. Disk use is up to twice
/// the limit (the file and its rotated predecessor).
pub const MIN_SERIAL_MAX_BYTES: u64 = 4 << 10;
pub const MAX_SERIAL_MAX_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    Stdout,
    /// A [`RotatingLog`](crate::logfile::RotatingLog): the guest can print
    /// for ever, so the file is bounded.
    File {
        path: PathBuf,
        max_bytes: u64,
    },
}

/// Whether to apply the nested-PVM guest profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PvmMode {
    /// Apply it when the host is PVM (`/sys/module/kvm_pvm`).
    Auto,
    On,
    Off,
}

/// The virtio-vsock device and its host side (hybrid vsock over unix sockets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// Guest CID (3 and up; 0-2 are reserved).
    pub cid: u64,
    /// The unix socket host processes connect to (`CONNECT <port>\n`); guest
    /// connections to host port P go to `<socket>_<P>`.
    pub socket: PathBuf,
}

/// A virtio-fs device and the vhost-user backend that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The tag the guest mounts (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    pub backend: FsBackend,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsBackend {
    /// Connect to a virtiofsd someone else started and stops.
    Socket(PathBuf),
    /// Start virtiofsd before the VM, stop it with the VM, and end the VM
    /// if it dies.
    Spawn(VirtiofsdConfig),
}

impl FsBackend {
    pub fn socket(&self) -> &std::path::Path {
        match self {
            FsBackend::Socket(s) => s,
            FsBackend::Spawn(c) => &c.socket,
        }
    }
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub serial: SerialOutput,
    pub pvm: PvmMode,
    pub vsock: Option<VsockConfig>,
    pub fs: Option<FsConfig>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--vcpus {0}: must be between 1 and {max}", max = MAX_VCPUS)]
    Vcpus(u8),
    #[error("--memory-mib {0}: must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}")]
    Memory(u32),
    #[error("--cmdline: must be printable ASCII without NUL, got {0:?}")]
    Cmdline(String),
    #[error("--vsock-cid {0}: must be at least 3 and below 2^32 - 1 (0-2 are reserved)")]
    VsockCid(u64),
    #[error("--fs-tag {0:?}: must be 1 to {TAG_LEN} bytes without NUL")]
    FsTag(String),
    #[error(
        "--serial-max-bytes {0}: must be between {MIN_SERIAL_MAX_BYTES} (4 KiB) and \
         {MAX_SERIAL_MAX_BYTES} (1 GiB)"
    )]
    SerialMaxBytes(u64),
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if !self.cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(ConfigError::Cmdline(self.cmdline.clone()));
        }
        if let Some(v) = &self.vsock {
            // Linux takes 32-bit CIDs; u32::MAX is VMADDR_CID_ANY.
            if v.cid < 3 || v.cid >= u64::from(u32::MAX) {
                return Err(ConfigError::VsockCid(v.cid));
            }
        }
        if let SerialOutput::File { max_bytes, .. } = self.serial {
            if !(MIN_SERIAL_MAX_BYTES..=MAX_SERIAL_MAX_BYTES).contains(&max_bytes) {
                return Err(ConfigError::SerialMaxBytes(max_bytes));
            }
        }
        if let Some(fs) = &self.fs {
            if fs.tag.is_empty() || fs.tag.len() > TAG_LEN || fs.tag.contains('\0') {
                return Err(ConfigError::FsTag(fs.tag.clone()));
            }
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
            memory_mib: 256,
            serial: SerialOutput::Stdout,
            pvm: PvmMode::Auto,
            vsock: None,
            fs: None,
        }
    }

    #[test]
    fn accepts_a_sane_config() {
        assert_eq!(config().validate(), Ok(()));
        assert_eq!(config().memory_bytes(), 256 << 20);
    }

    #[test]
    fn rejects_out_of_range_values_naming_the_flag() {
        let err = VmConfig {
            vcpus: 0,
            ..config()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().starts_with("--vcpus 0"));
        assert!(VmConfig {
            vcpus: MAX_VCPUS + 1,
            ..config()
        }
        .validate()
        .is_err());
        let err = VmConfig {
            memory_mib: 8,
            ..config()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().starts_with("--memory-mib 8"));
        assert!(VmConfig {
            cmdline: "a\nb".into(),
            ..config()
        }
        .validate()
        .is_err());
        let vsock = |cid| {
            Some(VsockConfig {
                cid,
                socket: "/s".into(),
            })
        };
        let err = VmConfig {
            vsock: vsock(2),
            ..config()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().starts_with("--vsock-cid 2"));
        assert!(VmConfig {
            vsock: vsock(u64::from(u32::MAX)),
            ..config()
        }
        .validate()
        .is_err());
        assert_eq!(
            VmConfig {
                vsock: vsock(3),
                ..config()
            }
            .validate(),
            Ok(())
        );
        let fs = |tag: &str| {
            Some(FsConfig {
                tag: tag.into(),
                backend: FsBackend::Socket("/s".into()),
            })
        };
        assert!(VmConfig {
            fs: fs(""),
            ..config()
        }
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("--fs-tag"));
        assert!(VmConfig {
            fs: fs(&"t".repeat(37)),
            ..config()
        }
        .validate()
        .is_err());
        assert_eq!(
            VmConfig {
                fs: fs("podbox"),
                ..config()
            }
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn serial_file_size_limit_is_bounded() {
        let serial = |max_bytes| VmConfig {
            serial: SerialOutput::File {
                path: "/s".into(),
                max_bytes,
            },
            ..config()
        };
        assert_eq!(serial(DEFAULT_SERIAL_MAX_BYTES).validate(), Ok(()));
        assert_eq!(serial(4096).validate(), Ok(()));
        assert_eq!(serial(1 << 30).validate(), Ok(()));
        for bad in [0, 4095, (1 << 30) + 1, u64::MAX] {
            let err = serial(bad).validate().unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("--serial-max-bytes {bad}:")),
                "{err}"
            );
        }
    }
}
