//! The shim's inputs from containerd and the pod: the node's TOML config
//! (`settings::config::Config::parse`), the bundle's OCI spec
//! (`spec::parse`), the pod role from its CRI annotations
//! (`settings::annotations::PodRole`), and the VM it gets from the config,
//! its limits and its `io.podbox.*` annotations (`settings::VmSettings`).
//!
//! Input: the config text, a NUL byte, the spec's JSON. Without a NUL, or
//! with a config that does not parse, a config allowing every annotation
//! is used.

#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use podbox_shim::settings::annotations::{PodRole, KNOWN_ANNOTATIONS};
use podbox_shim::settings::config::Config;
use podbox_shim::settings::VmSettings;
use podbox_shim::spec;

fn permissive() -> Config {
    Config {
        allowed_annotations: KNOWN_ANNOTATIONS.iter().map(|s| s.to_string()).collect(),
        asset_dirs: vec![PathBuf::from("/nonexistent/podbox-fuzz")],
        ..Config::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let (config, spec_text) = match data.iter().position(|&b| b == 0) {
        Some(at) => (
            std::str::from_utf8(&data[..at])
                .ok()
                .and_then(|t| Config::parse(t, Path::new("fuzz.toml")).ok()),
            &data[at + 1..],
        ),
        None => (None, data),
    };
    let config = config.unwrap_or_else(permissive);
    let Ok(text) = std::str::from_utf8(spec_text) else {
        return;
    };
    let Ok(spec) = spec::parse(text) else {
        return;
    };
    let annotations = spec::annotations(&spec);
    if let Ok(role) = PodRole::from_annotations(&annotations) {
        let _ = role.shim_grouping("fuzz");
    }
    let _ = VmSettings::resolve(&config, &spec);
});
