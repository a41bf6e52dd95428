//! A bundle's OCI runtime spec (`config.json`), read once and typed
//! (oci-spec, as the agent reads it too).

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

#[derive(Debug, thiserror::Error)]
#[error("the bundle's OCI spec {path}: {reason}")]
pub struct SpecError {
    pub path: PathBuf,
    pub reason: String,
}

/// `<bundle>/config.json`.
pub fn load(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    let error = |reason: String| SpecError {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| error(e.to_string()))?;
    parse(&text).map_err(error)
}

/// A `config.json`'s text, typed; the error says why not (public for the
/// fuzz targets in `fuzz/`).
pub fn parse(text: &str) -> Result<Spec, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// The longest hostname Linux takes (HOST_NAME_MAX): a longer one would
/// fail the guest's sethostname only after its VM booted.
pub const HOSTNAME_MAX: usize = 64;

/// What the shim refuses in a spec before any VM boots or anything is
/// mounted, each message starting with the field it names: a hostname the
/// guest cannot set, a root other than the bundle's `rootfs` (the only one
/// the shim serves: the snapshot mounts containerd sends go there), a
/// process the agent could never start, and mounts that are malformed or
/// would bind something the guest must never see
/// ([`crate::rootfs::check_mounts`]).
pub fn check(spec: &Spec) -> Result<(), String> {
    if let Some(hostname) = spec.hostname().as_deref() {
        if hostname.len() > HOSTNAME_MAX {
            return Err(format!(
                "hostname: {} bytes; Linux takes at most {HOSTNAME_MAX}",
                hostname.len()
            ));
        }
    }
    if let Some(root) = spec.root() {
        let path = root.path();
        let rootfs: PathBuf = path
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        if rootfs != Path::new("rootfs") {
            let why = if path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                "a `..` leads out of the bundle; "
            } else {
                ""
            };
            return Err(format!(
                "root.path {}: {why}podbox serves the bundle's own rootfs only (root.path \"rootfs\")",
                path.display()
            ));
        }
    }
    if let Some(process) = spec.process() {
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err("process.args: empty, so there is nothing to run".to_string());
        }
        if !process.cwd().is_absolute() {
            return Err(format!(
                "process.cwd {}: not an absolute path",
                process.cwd().display()
            ));
        }
    }
    crate::rootfs::check_mounts(spec)
}

/// The spec's annotations (none if it has none).
pub fn annotations(spec: &Spec) -> std::collections::HashMap<String, String> {
    spec.annotations().clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_is_read_typed_and_errors_name_the_file() {
        let bundle = tempfile::tempdir().expect("temp dir");
        let path = bundle.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"ociVersion":"1.0.2","hostname":"web","annotations":{"io.podbox.vcpus":"2"}}"#,
        )
        .expect("writing config.json");
        let spec = load(bundle.path()).expect("reads");
        assert_eq!(spec.hostname().as_deref(), Some("web"));
        assert_eq!(
            annotations(&spec)
                .get("io.podbox.vcpus")
                .map(String::as_str),
            Some("2")
        );
        std::fs::write(&path, r#"{"ociVersion":"1.0.2"}"#).expect("writing config.json");
        assert!(annotations(&load(bundle.path()).expect("reads")).is_empty());
        std::fs::write(&path, r#"{"ociVersion":"1.0.2","mounts":"nope"}"#).expect("writing");
        let error = load(bundle.path()).expect_err("mounts is not a list");
        assert!(error.to_string().contains("config.json"), "{error}");
        std::fs::remove_file(&path).expect("removing");
        assert!(load(bundle.path()).is_err(), "a missing spec is an error");
    }

    /// `check`'s refusals, each naming the field.
    #[test]
    fn bad_fields_are_refused_naming_them() {
        let check_json = |json: serde_json::Value| {
            let spec: Spec = serde_json::from_value(json).expect("a typed spec");
            check(&spec)
        };
        let base = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "hostname": "web",
        });
        assert_eq!(check_json(base.clone()), Ok(()));
        let with = |key: &str, value: serde_json::Value| {
            let mut spec = base.clone();
            spec[key] = value;
            spec
        };
        assert_eq!(
            check_json(with("root", serde_json::json!({"path": "./rootfs"}))),
            Ok(())
        );
        for (spec, field) in [
            (with("hostname", "h".repeat(65).into()), "hostname:"),
            (
                with("root", serde_json::json!({"path": "rootfs/../.."})),
                "root.path rootfs/../..: a `..`",
            ),
            (
                with("root", serde_json::json!({"path": "/"})),
                "root.path /:",
            ),
            (
                with(
                    "process",
                    serde_json::json!({"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
                ),
                "process.args",
            ),
            (
                with(
                    "process",
                    serde_json::json!({"args": ["sh"], "cwd": "tmp", "user": {"uid": 0, "gid": 0}}),
                ),
                "process.cwd tmp",
            ),
            (
                with(
                    "mounts",
                    serde_json::json!([{"destination": "data", "type": "tmpfs", "source": "tmpfs"}]),
                ),
                "mounts[0].destination data",
            ),
        ] {
            let error = check_json(spec).expect_err(field);
            assert!(error.starts_with(field), "{field}: {error}");
        }
    }
}
