//! What a pod's VM is made of, decided from what the operator configured
//! ([`config`]: the node's TOML file) and what the pod asks for
//! ([`annotations`]: its OCI annotations, honoured only where the config
//! allows each one). Neither of those two modules imports the other; this
//! one joins them.

pub mod annotations;
pub mod config;

use std::collections::HashMap;
use std::path::PathBuf;

use annotations::{
    is_known_annotation, AnnotationError, INITRD, KERNEL, MEMORY_MIB, PODBOX_PREFIX, VCPUS,
};
use config::{Config, MEMORY_MIB_RANGE, VCPUS_RANGE};

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

/// The pod asks for more than this host can give.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the pod asks for {asked} {what}; this host can give at most {most}")]
pub struct TooBig {
    pub what: &'static str,
    pub asked: u64,
    pub most: u64,
}

impl VmSettings {
    /// Refuses a VM the host cannot give: more vCPUs than KVM supports per
    /// VM (KVM_CAP_MAX_VCPUS), or more memory than the host has (MemTotal).
    pub fn check_fits_host(&self) -> Result<(), TooBig> {
        if let Ok(kvm) = kvm_ioctls::Kvm::new() {
            let most = kvm.get_max_vcpus() as u64;
            if u64::from(self.vcpus) > most {
                return Err(TooBig {
                    what: "vCPUs",
                    asked: self.vcpus.into(),
                    most,
                });
            }
        }
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let total_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib / 1024);
        if let Some(most) = total_mib.filter(|most| u64::from(self.memory_mib) > *most) {
            return Err(TooBig {
                what: "MiB of memory",
                asked: self.memory_mib.into(),
                most,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_larger_than_the_host_is_refused_with_the_numbers() {
        let settings = |vcpus, memory_mib| VmSettings {
            vcpus,
            memory_mib,
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        settings(1, 64).check_fits_host().expect("a small VM fits");
        let error = settings(1, 1_048_576)
            .check_fits_host()
            .expect_err("1 TiB does not");
        assert!(
            error
                .to_string()
                .starts_with("the pod asks for 1048576 MiB of memory"),
            "{error}"
        );
    }

    use crate::settings::annotations::KNOWN_ANNOTATIONS;

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
}
