//! What a bundle's OCI annotations tell the shim: the container's place in a
//! pod (from the CRI plugin's `io.kubernetes.cri.*`), and the names of the
//! per-pod VM settings (`io.podbox.*`; read in [`super::VmSettings`]).

use std::collections::HashMap;
use thiserror::Error;

pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const VCPUS: &str = "io.podbox.vcpus";
pub const MEMORY_MIB: &str = "io.podbox.memory_mib";
pub const KERNEL: &str = "io.podbox.kernel";
pub const INITRD: &str = "io.podbox.initrd";
pub const KNOWN_ANNOTATIONS: [&str; 4] = [VCPUS, MEMORY_MIB, KERNEL, INITRD];
pub const PODBOX_PREFIX: &str = "io.podbox.";

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

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashMap;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
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
