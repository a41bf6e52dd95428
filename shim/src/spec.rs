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
    serde_json::from_str(&text).map_err(|e| error(e.to_string()))
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
}
