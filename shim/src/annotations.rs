//! What a bundle's OCI annotations tell the shim: the container's place in a
//! pod (from the CRI plugin's `io.kubernetes.cri.*`), and per-pod VM settings
//! (`io.podbox.*`, honoured only where the config allows each one).

use std::collections::HashMap;
use std::path::PathBuf;

use thiserror::Error;

use crate::config::{Config, MEMORY_MIB_RANGE, VCPUS_RANGE};

pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const VCPUS: &str = "io.podbox.vcpus";
pub const MEMORY_MIB: &str = "io.podbox.memory_mib";
pub const KERNEL: &str = "io.podbox.kernel";
pub const INITRD: &str = "io.podbox.initrd";
pub const KNOWN_ANNOTATIONS: [&str; 4] = [VCPUS, MEMORY_MIB, KERNEL, INITRD];
const PODBOX_PREFIX: &str = "io.podbox.";

pub fn is_known_annotation(key: &str) -> bool {
    KNOWN_ANNOTATIONS.contains(&key)
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AnnotationError {
    #[error("annotation {key}={value:?}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
    #[error("annotation {key} is not a podbox annotation; known: {KNOWN_ANNOTATIONS:?}")]
    Unknown { key: String },
    #[error("annotation {key} is not allowed by this node's podbox config (allowed_annotations)")]
    NotAllowed { key: String },
    #[error("annotation {CONTAINER_TYPE}=container needs {SANDBOX_ID}")]
    MissingSandboxId,
}

/// Where a container goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// A CRI pod sandbox: boots the pod's VM, runs the pause container.
    Sandbox,
    /// A CRI container: joins the VM of the sandbox `sandbox_id`.
    Container { sandbox_id: String },
    /// Not from CRI (e.g. `ctr run`): a pod of its own.
    Standalone,
}

impl PodRole {
    pub fn from_annotations(
        annotations: &HashMap<String, String>,
    ) -> Result<PodRole, AnnotationError> {
        match annotations.get(CONTAINER_TYPE).map(String::as_str) {
            None => Ok(PodRole::Standalone),
            Some("sandbox") => Ok(PodRole::Sandbox),
            Some("container") => match annotations.get(SANDBOX_ID) {
                Some(id) if !id.is_empty() => Ok(PodRole::Container {
                    sandbox_id: id.clone(),
                }),
                _ => Err(AnnotationError::MissingSandboxId),
            },
            Some(other) => Err(AnnotationError::Invalid {
                key: CONTAINER_TYPE.to_string(),
                value: other.to_string(),
                reason: "expected \"sandbox\" or \"container\"".to_string(),
            }),
        }
    }

    /// The id whose shim serves this container: the sandbox's for a pod
    /// container, its own otherwise (one shim and one VM per pod).
    pub fn shim_grouping<'a>(&'a self, container_id: &'a str) -> &'a str {
        match self {
            PodRole::Container { sandbox_id } => sandbox_id,
            PodRole::Sandbox | PodRole::Standalone => container_id,
        }
    }
}

/// The VM a pod gets: the config's defaults, overridden by allowed annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSettings {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl VmSettings {
    /// Every `io.podbox.*` annotation must be known, allowed by `config`,
    /// and well-formed; other annotations are none of the shim's business.
    pub fn resolve(
        config: &Config,
        annotations: &HashMap<String, String>,
    ) -> Result<VmSettings, AnnotationError> {
        let mut settings = VmSettings {
            vcpus: config.default_vcpus,
            memory_mib: config.default_memory_mib,
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
        };
        // Sorted, so that with several bad annotations the error is always the same one.
        let mut podbox_annotations: Vec<(&String, &String)> = annotations
            .iter()
            .filter(|(key, _)| key.starts_with(PODBOX_PREFIX))
            .collect();
        podbox_annotations.sort();
        for (key, value) in podbox_annotations {
            if !is_known_annotation(key) {
                return Err(AnnotationError::Unknown { key: key.clone() });
            }
            if !config.allows_annotation(key) {
                return Err(AnnotationError::NotAllowed { key: key.clone() });
            }
            match key.as_str() {
                VCPUS => settings.vcpus = parse_in_range(key, value, VCPUS_RANGE)?,
                MEMORY_MIB => settings.memory_mib = parse_in_range(key, value, MEMORY_MIB_RANGE)?,
                KERNEL => settings.kernel = parse_asset(key, value, &config.asset_dirs)?,
                INITRD => settings.initrd = parse_asset(key, value, &config.asset_dirs)?,
                _ => return Err(AnnotationError::Unknown { key: key.clone() }),
            }
        }
        Ok(settings)
    }
}

fn invalid(key: &str, value: &str, reason: String) -> AnnotationError {
    AnnotationError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        reason,
    }
}

fn parse_in_range(
    key: &str,
    value: &str,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, AnnotationError> {
    let number: u32 = value
        .trim()
        .parse()
        .map_err(|e| invalid(key, value, format!("not a whole number: {e}")))?;
    if !range.contains(&number) {
        return Err(invalid(key, value, format!("not in {range:?}")));
    }
    Ok(number)
}

/// An absolute path to a regular file inside one of `asset_dirs`, after
/// resolving symlinks; the resolved path is what the VMM gets.
fn parse_asset(key: &str, value: &str, asset_dirs: &[PathBuf]) -> Result<PathBuf, AnnotationError> {
    let path = PathBuf::from(value);
    if !path.is_absolute() {
        return Err(invalid(key, value, "not an absolute path".to_string()));
    }
    if asset_dirs.is_empty() {
        return Err(invalid(
            key,
            value,
            "the podbox config lists no asset_dirs".to_string(),
        ));
    }
    let resolved = path
        .canonicalize()
        .map_err(|e| invalid(key, value, format!("cannot be resolved: {e}")))?;
    let inside = asset_dirs
        .iter()
        .filter_map(|dir| dir.canonicalize().ok())
        .any(|dir| resolved.starts_with(dir));
    if !inside {
        return Err(invalid(
            key,
            value,
            format!(
                "{} is not in the config's asset_dirs {asset_dirs:?}",
                resolved.display()
            ),
        ));
    }
    if !resolved.is_file() {
        return Err(invalid(key, value, "not a regular file".to_string()));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn config_allowing(keys: &[&str]) -> Config {
        Config {
            allowed_annotations: keys.iter().map(|k| k.to_string()).collect(),
            ..Config::default()
        }
    }

    #[test]
    fn no_annotations_give_the_config_defaults() {
        let config = Config {
            default_vcpus: 3,
            default_memory_mib: 768,
            ..Config::default()
        };
        let settings =
            VmSettings::resolve(&config, &annotations(&[("unrelated", "x")])).expect("valid");
        assert_eq!((settings.vcpus, settings.memory_mib), (3, 768));
        assert_eq!(settings.kernel, config.kernel);
    }

    #[test]
    fn allowed_annotations_override_the_defaults() {
        let assets = tempfile::tempdir().expect("tempdir");
        let kernel = assets.path().join("vmlinux-test");
        std::fs::write(&kernel, b"elf").expect("write");
        let config = Config {
            asset_dirs: vec![assets.path().to_path_buf()],
            ..config_allowing(&[VCPUS, MEMORY_MIB, KERNEL])
        };
        let settings = VmSettings::resolve(
            &config,
            &annotations(&[
                (VCPUS, "4"),
                (MEMORY_MIB, "2048"),
                (KERNEL, kernel.to_str().expect("utf-8")),
            ]),
        )
        .expect("valid");
        assert_eq!((settings.vcpus, settings.memory_mib), (4, 2048));
        assert_eq!(settings.kernel, kernel.canonicalize().expect("resolves"));
        assert_eq!(settings.initrd, config.initrd, "initrd not annotated");
    }

    #[test]
    fn kernel_and_initrd_annotations_stay_inside_the_asset_dirs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let assets = tmp.path().join("assets");
        std::fs::create_dir(&assets).expect("mkdir");
        std::os::unix::fs::symlink("/etc/passwd", assets.join("escape")).expect("symlink");
        std::fs::create_dir(assets.join("dir")).expect("mkdir");
        let config = Config {
            asset_dirs: vec![assets.clone()],
            ..config_allowing(&[KERNEL, INITRD])
        };
        let escape = assets.join("escape").display().to_string();
        let up = "/..".repeat(assets.components().count() - 1);
        let dotdot = format!("{}{up}/etc/passwd", assets.display());
        let dir = assets.join("dir").display().to_string();
        for (key, value, reason) in [
            (KERNEL, "/etc/passwd", "asset_dirs"),
            (INITRD, escape.as_str(), "asset_dirs"),
            (KERNEL, dotdot.as_str(), "asset_dirs"),
            (INITRD, dir.as_str(), "regular file"),
        ] {
            let error = VmSettings::resolve(&config, &annotations(&[(key, value)]))
                .expect_err("refused")
                .to_string();
            assert!(
                error.contains(key) && error.contains(reason),
                "{value}: {error}"
            );
        }
        let unlisted = config_allowing(&[KERNEL]);
        let error = VmSettings::resolve(&unlisted, &annotations(&[(KERNEL, "/etc/passwd")]))
            .expect_err("refused without asset_dirs")
            .to_string();
        assert!(error.contains("no asset_dirs"), "{error}");
    }

    #[test]
    fn an_annotation_the_config_does_not_allow_is_refused() {
        let error = VmSettings::resolve(
            &config_allowing(&[VCPUS]),
            &annotations(&[(MEMORY_MIB, "512")]),
        )
        .expect_err("refused");
        assert_eq!(
            error,
            AnnotationError::NotAllowed {
                key: MEMORY_MIB.to_string()
            }
        );
        assert!(error.to_string().contains(MEMORY_MIB));
    }

    #[test]
    fn a_misspelt_podbox_annotation_is_named() {
        let error = VmSettings::resolve(
            &config_allowing(&[VCPUS]),
            &annotations(&[("io.podbox.cpus", "2")]),
        )
        .expect_err("unknown");
        assert_eq!(
            error,
            AnnotationError::Unknown {
                key: "io.podbox.cpus".to_string()
            }
        );
    }

    #[test]
    fn bad_values_are_named_by_key() {
        let config = config_allowing(&KNOWN_ANNOTATIONS);
        for (key, value) in [
            (VCPUS, "0"),
            (VCPUS, "33"),
            (VCPUS, "two"),
            (VCPUS, "-1"),
            (VCPUS, ""),
            (MEMORY_MIB, "63"),
            (MEMORY_MIB, "99999999999"),
            (MEMORY_MIB, "1.5"),
            (KERNEL, "vmlinux"),
            (INITRD, ""),
        ] {
            match VmSettings::resolve(&config, &annotations(&[(key, value)])) {
                Err(AnnotationError::Invalid {
                    key: named,
                    value: shown,
                    ..
                }) => {
                    assert_eq!((named.as_str(), shown.as_str()), (key, value));
                }
                other => panic!("{key}={value:?}: expected an invalid-value error, got {other:?}"),
            }
        }
        let message = VmSettings::resolve(&config, &annotations(&[(VCPUS, "0")]))
            .expect_err("invalid")
            .to_string();
        assert_eq!(message, "annotation io.podbox.vcpus=\"0\": not in 1..=32");
    }

    #[test]
    fn pod_roles_come_from_the_cri_annotations() {
        assert_eq!(
            PodRole::from_annotations(&annotations(&[])),
            Ok(PodRole::Standalone)
        );
        assert_eq!(
            PodRole::from_annotations(&annotations(&[(CONTAINER_TYPE, "sandbox")])),
            Ok(PodRole::Sandbox)
        );
        let member = PodRole::from_annotations(&annotations(&[
            (CONTAINER_TYPE, "container"),
            (SANDBOX_ID, "pod1"),
        ]))
        .expect("a pod container");
        assert_eq!(
            member,
            PodRole::Container {
                sandbox_id: "pod1".to_string()
            }
        );
        assert_eq!(
            member.shim_grouping("ctr9"),
            "pod1",
            "a pod container goes to its sandbox's shim"
        );
        assert_eq!(PodRole::Sandbox.shim_grouping("pod1"), "pod1");
        assert_eq!(
            PodRole::from_annotations(&annotations(&[(CONTAINER_TYPE, "container")])),
            Err(AnnotationError::MissingSandboxId)
        );
        assert!(matches!(
            PodRole::from_annotations(&annotations(&[(CONTAINER_TYPE, "vm")])),
            Err(AnnotationError::Invalid { key, .. }) if key == CONTAINER_TYPE
        ));
    }
}
