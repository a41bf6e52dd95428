//! How big a pod's VM is, from the limits the pod asks for.
//!
//! A CRI pod's limits reach the shim once, when its sandbox is created and
//! the VM boots: containerd (1.6.7 and later) sums the containers' limits
//! that the kubelet passes in `PodSandboxConfig.linux.resources` into the
//! sandbox spec's `io.kubernetes.cri.sandbox-*` annotations. Without them
//! (`ctr run`, a kubelet that sends no resources) the spec's own
//! `linux.resources` is what the pod asks for. CPU shares are a weight
//! between containers, not a size: they do not make the VM bigger.

use std::collections::HashMap;

use oci_spec::runtime::Spec;

use super::annotations::AnnotationError;

pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

const MIB: u64 = 1 << 20;

/// The limits of a whole pod, added to the config's base VM.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PodLimits {
    /// CPUs the pod's CFS quota allows, rounded up; 0 without a CPU limit.
    pub cpus: u64,
    /// The pod's memory limit in MiB, rounded up; 0 without one.
    pub memory_mib: u64,
    /// Where they were read, for error messages.
    pub source: &'static str,
}

impl PodLimits {
    /// The CRI's sandbox annotations where any is present, else the spec's
    /// `linux.resources`. A malformed annotation is an error naming it.
    pub fn of(spec: &Spec, annotations: &HashMap<String, String>) -> Result<Self, AnnotationError> {
        let cri = [SANDBOX_CPU_QUOTA, SANDBOX_CPU_PERIOD, SANDBOX_MEMORY];
        if cri.iter().any(|key| annotations.contains_key(*key)) {
            let quota = number(annotations, SANDBOX_CPU_QUOTA)?;
            let period = number(annotations, SANDBOX_CPU_PERIOD)?;
            let memory = number(annotations, SANDBOX_MEMORY)?;
            return Ok(PodLimits {
                cpus: cpus(quota, period),
                memory_mib: mib(memory),
                source: "the io.kubernetes.cri.sandbox-* annotations",
            });
        }
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        let cpu = resources.and_then(|r| r.cpu().as_ref());
        let quota = cpu.and_then(|c| c.quota()).unwrap_or(0);
        let period = cpu.and_then(|c| c.period()).map_or(0, |p| p as i64);
        let memory = resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .unwrap_or(0);
        Ok(PodLimits {
            cpus: cpus(quota, period),
            memory_mib: mib(memory),
            source: "the spec's linux.resources",
        })
    }
}

/// An annotation's whole number; absent is 0 (no limit).
fn number(annotations: &HashMap<String, String>, key: &str) -> Result<i64, AnnotationError> {
    let Some(value) = annotations.get(key) else {
        return Ok(0);
    };
    value.trim().parse().map_err(|e| AnnotationError::Invalid {
        key: key.to_string(),
        value: value.clone(),
        reason: format!("not a whole number: {e}"),
    })
}

/// ceil(quota / period); no limit (quota -1 or 0, or no period) is 0.
fn cpus(quota: i64, period: i64) -> u64 {
    if quota <= 0 || period <= 0 {
        return 0;
    }
    (quota as u64).div_ceil(period as u64)
}

/// Bytes to MiB, rounded up; no limit (0 or negative) is 0.
fn mib(bytes: i64) -> u64 {
    if bytes <= 0 {
        return 0;
    }
    (bytes as u64).div_ceil(MIB)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, SpecBuilder,
    };

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn spec_with(quota: i64, period: u64, memory: i64) -> Spec {
        let resources = LinuxResourcesBuilder::default()
            .cpu(
                LinuxCpuBuilder::default()
                    .quota(quota)
                    .period(period)
                    .build()
                    .unwrap(),
            )
            .memory(LinuxMemoryBuilder::default().limit(memory).build().unwrap())
            .build()
            .unwrap();
        let linux = LinuxBuilder::default()
            .resources(resources)
            .build()
            .unwrap();
        SpecBuilder::default().linux(linux).build().unwrap()
    }

    #[test]
    fn cri_annotations_give_the_pods_limits_rounded_up() {
        let limits = PodLimits::of(
            &Spec::default(),
            &annotations(&[
                (SANDBOX_CPU_QUOTA, "150000"),
                (SANDBOX_CPU_PERIOD, "100000"),
                (SANDBOX_MEMORY, "268435457"),
                ("io.kubernetes.cri.sandbox-cpu-shares", "1536"),
            ]),
        )
        .unwrap();
        assert_eq!((limits.cpus, limits.memory_mib), (2, 257));
    }

    #[test]
    fn no_limit_adds_nothing() {
        let unlimited = annotations(&[
            (SANDBOX_CPU_QUOTA, "-1"),
            (SANDBOX_CPU_PERIOD, "100000"),
            (SANDBOX_MEMORY, "0"),
        ]);
        let limits = PodLimits::of(&Spec::default(), &unlimited).unwrap();
        assert_eq!((limits.cpus, limits.memory_mib), (0, 0));
        let limits = PodLimits::of(&Spec::default(), &HashMap::new()).unwrap();
        assert_eq!((limits.cpus, limits.memory_mib), (0, 0));
        // A quota without a period is no limit, not a division by zero.
        let no_period = annotations(&[(SANDBOX_CPU_QUOTA, "50000")]);
        assert_eq!(PodLimits::of(&Spec::default(), &no_period).unwrap().cpus, 0);
    }

    #[test]
    fn without_cri_annotations_the_spec_resources_count() {
        let limits = PodLimits::of(&spec_with(200000, 100000, 512 << 20), &HashMap::new()).unwrap();
        assert_eq!((limits.cpus, limits.memory_mib), (2, 512));
        assert_eq!(limits.source, "the spec's linux.resources");
        // Where the CRI annotations are present they win over the spec.
        let cri = annotations(&[(SANDBOX_MEMORY, "134217728")]);
        let limits = PodLimits::of(&spec_with(200000, 100000, 512 << 20), &cri).unwrap();
        assert_eq!((limits.cpus, limits.memory_mib), (0, 128));
    }

    #[test]
    fn a_malformed_cri_annotation_is_named() {
        for (key, value) in [
            (SANDBOX_CPU_QUOTA, "lots"),
            (SANDBOX_CPU_PERIOD, "1e5"),
            (SANDBOX_MEMORY, "99999999999999999999999"),
        ] {
            let error = PodLimits::of(&Spec::default(), &annotations(&[(key, value)]))
                .expect_err("malformed");
            assert!(
                matches!(&error, AnnotationError::Invalid { key: k, .. } if k == key),
                "{error}"
            );
        }
    }

    #[test]
    fn absurd_limits_do_not_overflow() {
        let huge = annotations(&[
            (SANDBOX_CPU_QUOTA, &i64::MAX.to_string()),
            (SANDBOX_CPU_PERIOD, "1"),
            (SANDBOX_MEMORY, &i64::MAX.to_string()),
        ]);
        let limits = PodLimits::of(&Spec::default(), &huge).unwrap();
        assert_eq!(limits.cpus, i64::MAX as u64);
        assert_eq!(limits.memory_mib, (i64::MAX as u64).div_ceil(MIB));
    }
}
