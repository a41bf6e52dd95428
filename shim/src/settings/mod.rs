//! What a pod's VM is made of, decided from what the operator configured
//! ([`config`]: the node's TOML file) and what the pod asks for
//! ([`annotations`]: its OCI annotations, honoured only where the config
//! allows each one). Neither of those two modules imports the other; this
//! one joins them.

pub mod annotations;
pub mod config;
pub mod sizing;

use std::collections::HashMap;
use std::path::PathBuf;

use annotations::{
    is_known_annotation, AnnotationError, INITRD, KERNEL, MEMORY_MIB, PODBOX_PREFIX, VCPUS,
};
use config::{Config, MEMORY_MIB_RANGE, VCPUS_RANGE};
use sizing::PodLimits;

/// Why a pod gets no VM settings: a bad annotation, or a VM larger than
/// the config lets a pod have.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    #[error("the pod asks for {asked} {what} ({how}); the podbox config's {key} is {most}")]
    OverCap {
        what: &'static str,
        asked: u64,
        how: String,
        key: &'static str,
        most: u32,
    },
    /// A spec field the shim refuses ([`crate::spec::check`]); the message
    /// starts with the field.
    #[error("the OCI spec's {0}")]
    Spec(String),
}

/// The VM a pod gets: the config's defaults, overridden by allowed annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSettings {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The sandbox spec's `linux.cgroupsPath`: the host cgroup the VMM
    /// runs in (sandbox::cgroup).
    pub cgroups_path: Option<String>,
}

impl VmSettings {
    /// The config's base VM plus the pod's limits ([`sizing`]), then the
    /// allowed `io.podbox.*` annotations, within the config's max_vcpus
    /// and max_memory_mib.
    ///
    /// The spec itself is checked first ([`crate::spec::check`]): this runs
    /// in the shim's `start` for every container and before a pod's VM
    /// boots, so a bad field fails there, before anything is made.
    pub fn resolve(config: &Config, spec: &oci_spec::runtime::Spec) -> Result<Self, SettingsError> {
        crate::spec::check(spec).map_err(SettingsError::Spec)?;
        let annotations = crate::spec::annotations(spec);
        let limits = PodLimits::of(spec, &annotations)?;
        let sized = Sized {
            vcpus: u64::from(config.default_vcpus).saturating_add(limits.cpus),
            vcpus_how: format!(
                "default_vcpus {} + {} from {}",
                config.default_vcpus, limits.cpus, limits.source
            ),
            memory_mib: u64::from(config.default_memory_mib).saturating_add(limits.memory_mib),
            memory_how: format!(
                "default_memory_mib {} + {} MiB from {}",
                config.default_memory_mib, limits.memory_mib, limits.source
            ),
        };
        let mut settings = Self::with_annotations(config, &annotations, sized)?;
        settings.cgroups_path = spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.display().to_string());
        Ok(settings)
    }

    /// Every `io.podbox.*` annotation must be known, allowed by `config`,
    /// and well-formed; other annotations are none of the shim's business.
    fn with_annotations(
        config: &Config,
        annotations: &HashMap<String, String>,
        mut sized: Sized,
    ) -> Result<VmSettings, SettingsError> {
        let mut kernel = config.kernel.clone();
        let mut initrd = config.initrd.clone();
        // Sorted, so that with several bad annotations the error is always the same one.
        let mut podbox_annotations: Vec<(&String, &String)> = annotations
            .iter()
            .filter(|(key, _)| key.starts_with(PODBOX_PREFIX))
            .collect();
        podbox_annotations.sort();
        for (key, value) in podbox_annotations {
            if !is_known_annotation(key) {
                return Err(AnnotationError::Unknown { key: key.clone() }.into());
            }
            if !config.allows_annotation(key) {
                return Err(AnnotationError::NotAllowed { key: key.clone() }.into());
            }
            match key.as_str() {
                VCPUS => {
                    sized.vcpus = parse_in_range(key, value, VCPUS_RANGE)?.into();
                    sized.vcpus_how = format!("annotation {VCPUS}");
                }
                MEMORY_MIB => {
                    sized.memory_mib = parse_in_range(key, value, MEMORY_MIB_RANGE)?.into();
                    sized.memory_how = format!("annotation {MEMORY_MIB}");
                }
                KERNEL => {
                    kernel = parse_asset(key, value, &config.asset_dirs)?;
                    podbox_vmm_config::check_kernel(&kernel)
                        .map_err(|reason| invalid(key, value, reason))?;
                }
                INITRD => {
                    initrd = parse_asset(key, value, &config.asset_dirs)?;
                    podbox_vmm_config::check_initrd(&initrd)
                        .map_err(|reason| invalid(key, value, reason))?;
                }
                _ => return Err(AnnotationError::Unknown { key: key.clone() }.into()),
            }
        }
        Ok(VmSettings {
            vcpus: capped(
                "vCPUs",
                sized.vcpus,
                sized.vcpus_how,
                "max_vcpus",
                config.max_vcpus,
            )?,
            memory_mib: capped(
                "MiB of memory",
                sized.memory_mib,
                sized.memory_how,
                "max_memory_mib",
                config.max_memory_mib,
            )?,
            kernel,
            initrd,
            cgroups_path: None,
        })
    }
}

/// A VM size and how it was arrived at, before the config's caps.
struct Sized {
    vcpus: u64,
    vcpus_how: String,
    memory_mib: u64,
    memory_how: String,
}

fn capped(
    what: &'static str,
    asked: u64,
    how: String,
    key: &'static str,
    most: u32,
) -> Result<u32, SettingsError> {
    if asked > u64::from(most) {
        return Err(SettingsError::OverCap {
            what,
            asked,
            how,
            key,
            most,
        });
    }
    Ok(asked as u32)
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
    /// Fits the VM to this host: no more vCPUs than KVM recommends per VM
    /// (KVM_CAP_NR_VCPUS, the host's online CPUs; more would only
    /// time-share them), as Kata caps them; gives back the vCPUs asked for
    /// where it lowered them. Refuses more memory than the host has
    /// (MemTotal).
    pub fn fit_host(&mut self) -> Result<Option<u32>, TooBig> {
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
        match recommended_vcpus() {
            Some(most) if self.vcpus > most => {
                let asked = self.vcpus;
                self.vcpus = most;
                Ok(Some(asked))
            }
            _ => Ok(None),
        }
    }
}

/// The most vCPUs KVM recommends for one VM here (`KVM_CAP_NR_VCPUS`: the
/// host's online CPUs), or None where /dev/kvm cannot tell.
pub fn recommended_vcpus() -> Option<u32> {
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    u32::try_from(kvm.get_nr_vcpus()).ok().filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_larger_than_the_host_is_refused_or_lowered() {
        let settings = |vcpus, memory_mib| VmSettings {
            vcpus,
            memory_mib,
            kernel: "/k".into(),
            initrd: "/i".into(),
            cgroups_path: None,
        };
        assert_eq!(settings(1, 64).fit_host(), Ok(None), "a small VM fits");
        let error = settings(1, 1_048_576)
            .fit_host()
            .expect_err("1 TiB does not");
        assert!(
            error
                .to_string()
                .starts_with("the pod asks for 1048576 MiB of memory"),
            "{error}"
        );
        if let Ok(kvm) = kvm_ioctls::Kvm::new() {
            let cpus = kvm.get_nr_vcpus() as u32;
            let mut wide = settings(cpus + 1, 64);
            assert_eq!(wide.fit_host(), Ok(Some(cpus + 1)));
            assert_eq!(wide.vcpus, cpus, "lowered to KVM_CAP_NR_VCPUS");
        }
    }

    use crate::settings::annotations::KNOWN_ANNOTATIONS;

    /// A spec carrying these annotations (and nothing else).
    fn annotations(pairs: &[(&str, &str)]) -> oci_spec::runtime::Spec {
        let annotations: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        oci_spec::runtime::SpecBuilder::default()
            .annotations(annotations)
            .build()
            .expect("spec")
    }

    #[test]
    fn the_pods_limits_are_added_to_the_base_vm() {
        use sizing::{SANDBOX_CPU_PERIOD, SANDBOX_CPU_QUOTA, SANDBOX_MEMORY};
        let pod = annotations(&[
            (SANDBOX_CPU_QUOTA, "150000"),
            (SANDBOX_CPU_PERIOD, "100000"),
            (SANDBOX_MEMORY, "268435456"),
        ]);
        let settings = VmSettings::resolve(&Config::default(), &pod).expect("fits");
        assert_eq!((settings.vcpus, settings.memory_mib), (2 + 2, 256 + 256));
    }

    #[test]
    fn a_vm_over_the_configs_caps_is_refused_naming_the_key() {
        use sizing::SANDBOX_MEMORY;
        let greedy = annotations(&[(SANDBOX_MEMORY, &(9000u64 << 20).to_string())]);
        let error = VmSettings::resolve(&Config::default(), &greedy).expect_err("too big");
        assert!(
            matches!(
                &error,
                SettingsError::OverCap {
                    key: "max_memory_mib",
                    asked: 9256,
                    ..
                }
            ),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "the pod asks for 9256 MiB of memory (default_memory_mib 256 + 9000 MiB from the \
             io.kubernetes.cri.sandbox-* annotations); the podbox config's max_memory_mib is 8192"
        );
        // An allowed annotation is held to the same cap.
        let config = Config {
            max_vcpus: 4,
            ..config_allowing(&[VCPUS])
        };
        let error =
            VmSettings::resolve(&config, &annotations(&[(VCPUS, "6")])).expect_err("too big");
        assert!(
            error.to_string().contains("(annotation io.podbox.vcpus)"),
            "{error}"
        );
        assert!(error.to_string().ends_with("max_vcpus is 4"), "{error}");
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
        std::fs::write(&kernel, podbox_vmm_config::minimal_vmlinux()).expect("write");
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
        std::fs::write(assets.join("notes.txt"), "not a kernel\n").expect("write");
        let config = Config {
            asset_dirs: vec![assets.clone()],
            ..config_allowing(&[KERNEL, INITRD])
        };
        let text = assets.join("notes.txt").display().to_string();
        let escape = assets.join("escape").display().to_string();
        let up = "/..".repeat(assets.components().count() - 1);
        let dotdot = format!("{}{up}/etc/passwd", assets.display());
        let dir = assets.join("dir").display().to_string();
        for (key, value, reason) in [
            (KERNEL, "/etc/passwd", "asset_dirs"),
            (INITRD, escape.as_str(), "asset_dirs"),
            (KERNEL, dotdot.as_str(), "asset_dirs"),
            (INITRD, dir.as_str(), "regular file"),
            // Inside the asset dirs, but no kernel or initramfs at all.
            (KERNEL, text.as_str(), "not an ELF file"),
            (INITRD, text.as_str(), "not an initramfs"),
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
            SettingsError::Annotation(AnnotationError::NotAllowed {
                key: MEMORY_MIB.to_string()
            })
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
            SettingsError::Annotation(AnnotationError::Unknown {
                key: "io.podbox.cpus".to_string()
            })
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
                Err(SettingsError::Annotation(AnnotationError::Invalid {
                    key: named,
                    value: shown,
                    ..
                })) => {
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
