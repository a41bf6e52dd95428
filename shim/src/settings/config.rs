//! The shim's configuration: a TOML file, /etc/podbox/config.toml unless
//! containerd's runtime options name another (`config_path`).
//!
//! ```toml
//! kernel = "/usr/share/podbox/vmlinux"
//! initrd = "/usr/share/podbox/initramfs.cpio"
//! virtiofsd = "/usr/libexec/virtiofsd"   # default: podbox-vmm looks on PATH, in /usr/libexec, ~/.cargo/bin
//! default_vcpus = 2
//! default_memory_mib = 256
//! max_vcpus = 8             # the most a pod's limits (or annotations) may size its VM to
//! max_memory_mib = 8192
//! log_level = "info"
//! fs_cache = "always"
//! allowed_annotations = ["io.podbox.vcpus", "io.podbox.memory_mib"]
//! # where io.podbox.kernel / io.podbox.initrd may point (when allowed)
//! asset_dirs = ["/usr/share/podbox"]
//! log_max_bytes = 1048576   # console.log and vmm.log rotate here
//! free_page_reporting = true   # the guest hands freed memory back (virtio-balloon)
//! # runtime developers: profile each pod's VM (podbox-vmm --guest-profile)
//! # to <dir>/<namespace>-<pod id>.profile when the pod's VM ends
//! guest_profile_dir = "/var/lib/podbox/profiles"
//! ```
//!
//! Unknown keys are errors (a misspelt key would otherwise be silently
//! ignored), and every bad value is reported with its key.

use std::path::{Path, PathBuf};

use podbox_vmm_config::CachePolicy;
use serde::Deserialize;
use thiserror::Error;

use super::annotations::{is_known_annotation, KNOWN_ANNOTATIONS};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/podbox/config.toml";

/// Bounds for a VM's size, from the config or an annotation: podbox-vmm's
/// own (the VM contract's), no wider.
pub const VCPUS_RANGE: std::ops::RangeInclusive<u32> =
    *podbox_vmm_config::VCPUS.start() as u32..=*podbox_vmm_config::VCPUS.end() as u32;
pub const MEMORY_MIB_RANGE: std::ops::RangeInclusive<u32> = podbox_vmm_config::MEMORY_MIB;
/// Where a pod's logs may rotate: what podbox-vmm's `--serial-max-bytes` takes.
pub const LOG_MAX_BYTES_RANGE: std::ops::RangeInclusive<u64> = podbox_vmm_config::SERIAL_MAX_BYTES;
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading podbox config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing podbox config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("podbox config {path}: key `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The guest kernel (vmlinux) podbox-vmm boots.
    pub kernel: PathBuf,
    /// The guest initramfs, with podbox-agent as /init.
    pub initrd: PathBuf,
    /// virtiofsd, which serves container root filesystems and volumes to
    /// the guest; None lets podbox-vmm find one. A path given must exist
    /// when a pod boots (its Create fails naming this key otherwise).
    pub virtiofsd: Option<PathBuf>,
    /// vCPUs of a pod's VM unless an allowed annotation says otherwise (2).
    pub default_vcpus: u32,
    /// The guest's base (its kernel and agent): a pod's VM gets this plus
    /// the sum of its containers' memory limits.
    pub default_memory_mib: u32,
    /// The largest VM a pod may ask for, through its limits or an allowed
    /// annotation: a larger one fails RunPodSandbox naming this key.
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    /// The shim's own log level: error, warn, info, debug or trace.
    pub log_level: String,
    /// How the guest caches the share (virtiofsd `--cache`). "always" (the
    /// default) keeps file pages cached in the guest; "auto" and "never"
    /// drop them on every open, so each start of a binary reads it again
    /// through virtiofsd, which is guest-kernel work (slow on PVM hosts).
    /// Host-side changes to a volume show up in the guest only with "auto"
    /// or "never".
    pub fs_cache: CachePolicy,
    /// The `io.podbox.*` annotations pods may set; none unless the operator says so.
    pub allowed_annotations: Vec<String>,
    /// The directories an `io.podbox.kernel` or `io.podbox.initrd`
    /// annotation may name a file in (after resolving symlinks); none by
    /// default, so those annotations are refused even where allowed
    /// until the operator lists some: a pod must not boot any host file.
    pub asset_dirs: Vec<PathBuf>,
    /// Size at which a pod's console.log and vmm.log rotate (each keeps one
    /// `.1`): a guest printing for ever cannot fill /run (1 MiB).
    pub log_max_bytes: u64,
    /// Where each pod's VM writes its guest profile (podbox-vmm
    /// `--guest-profile`, 100 Hz) when it ends; none by default (a
    /// developer's tool: each sample costs the guest a vCPU exit).
    pub guest_profile_dir: Option<PathBuf>,
    /// Give each pod's VM a virtio-balloon with free page reporting
    /// (podbox-vmm `--balloon`): the guest kernel reports memory it freed,
    /// 2 MiB blocks and up, and the VMM drops the host pages behind them,
    /// so a pod's host memory shrinks after its containers free memory
    /// (true). Off, host memory a guest touched once stays with the pod.
    pub free_page_reporting: bool,
}

impl Default for Config {
    /// Where `make install` puts things, a small VM, no annotations allowed.
    fn default() -> Self {
        Config {
            kernel: PathBuf::from("/usr/share/podbox/vmlinux"),
            initrd: PathBuf::from("/usr/share/podbox/initramfs.cpio"),
            virtiofsd: None,
            default_vcpus: 2,
            default_memory_mib: 256,
            max_vcpus: 8,
            max_memory_mib: 8192,
            log_level: "info".to_string(),
            fs_cache: CachePolicy::Always,
            allowed_annotations: Vec::new(),
            asset_dirs: Vec::new(),
            log_max_bytes: podbox_vmm_config::DEFAULT_SERIAL_MAX_BYTES,
            guest_profile_dir: None,
            free_page_reporting: true,
        }
    }
}

impl Config {
    /// Loads the config containerd asked for, or else the default file; only
    /// the default file may be absent (then the built-in defaults apply).
    pub fn load(config_path: Option<&Path>) -> Result<Config, ConfigError> {
        match config_path {
            Some(path) => Self::load_file(path),
            None => {
                let default_path = Path::new(DEFAULT_CONFIG_PATH);
                if default_path.exists() {
                    Self::load_file(default_path)
                } else {
                    Ok(Config::default())
                }
            }
        }
    }

    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::parse(&text, path)?;
        config.check_files(path)?;
        Ok(config)
    }

    /// The kernel and initramfs a loaded config names are there and are
    /// what they should be (an x86-64 ELF vmlinux, a cpio archive or a
    /// compressed one; podbox-vmm's own checks): a wrong file fails every
    /// pod's `start` naming its key, before any VM is made, instead of each
    /// pod's VM failing in turn. Only for a file read from disk: a config
    /// parsed from text ([`Self::parse`]) may name files that exist
    /// elsewhere.
    fn check_files(&self, path: &Path) -> Result<(), ConfigError> {
        for (key, file, check) in [
            (
                "kernel",
                &self.kernel,
                podbox_vmm_config::check_kernel as fn(&Path) -> Result<(), String>,
            ),
            ("initrd", &self.initrd, podbox_vmm_config::check_initrd),
        ] {
            check(file).map_err(|reason| ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                reason: format!("{}: {reason}", file.display()),
            })?;
        }
        Ok(())
    }

    /// Parses and validates config text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        };
        for (key, value) in [("kernel", &self.kernel), ("initrd", &self.initrd)]
            .into_iter()
            .chain(self.virtiofsd.as_ref().map(|v| ("virtiofsd", v)))
            .chain(
                self.guest_profile_dir
                    .as_ref()
                    .map(|v| ("guest_profile_dir", v)),
            )
        {
            if !value.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} is not an absolute path", value.display()),
                ));
            }
        }
        if !VCPUS_RANGE.contains(&self.default_vcpus) {
            return Err(invalid(
                "default_vcpus",
                format!("{} is not in {VCPUS_RANGE:?}", self.default_vcpus),
            ));
        }
        if !MEMORY_MIB_RANGE.contains(&self.default_memory_mib) {
            return Err(invalid(
                "default_memory_mib",
                format!("{} is not in {MEMORY_MIB_RANGE:?}", self.default_memory_mib),
            ));
        }
        if !VCPUS_RANGE.contains(&self.max_vcpus) || self.max_vcpus < self.default_vcpus {
            return Err(invalid(
                "max_vcpus",
                format!(
                    "{} is not in {}..={} (default_vcpus..={})",
                    self.max_vcpus,
                    self.default_vcpus,
                    VCPUS_RANGE.end(),
                    VCPUS_RANGE.end()
                ),
            ));
        }
        if !MEMORY_MIB_RANGE.contains(&self.max_memory_mib)
            || self.max_memory_mib < self.default_memory_mib
        {
            return Err(invalid(
                "max_memory_mib",
                format!(
                    "{} is not in {}..={} (default_memory_mib..={})",
                    self.max_memory_mib,
                    self.default_memory_mib,
                    MEMORY_MIB_RANGE.end(),
                    MEMORY_MIB_RANGE.end()
                ),
            ));
        }
        if !LOG_LEVELS.contains(&self.log_level.as_str()) {
            return Err(invalid(
                "log_level",
                format!("{:?} is not one of {LOG_LEVELS:?}", self.log_level),
            ));
        }
        if !LOG_MAX_BYTES_RANGE.contains(&self.log_max_bytes) {
            return Err(invalid(
                "log_max_bytes",
                format!("{} is not in {LOG_MAX_BYTES_RANGE:?}", self.log_max_bytes),
            ));
        }
        if let Some(relative) = self.asset_dirs.iter().find(|d| !d.is_absolute()) {
            return Err(invalid(
                "asset_dirs",
                format!("{} is not an absolute path", relative.display()),
            ));
        }
        if let Some(unknown) = self
            .allowed_annotations
            .iter()
            .find(|a| !is_known_annotation(a))
        {
            return Err(invalid(
                "allowed_annotations",
                format!("{unknown:?} is not a podbox annotation; known: {KNOWN_ANNOTATIONS:?}"),
            ));
        }
        Ok(())
    }

    pub fn allows_annotation(&self, key: &str) -> bool {
        self.allowed_annotations
            .iter()
            .any(|allowed| allowed == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/test/config.toml"))
    }

    fn invalid_key(text: &str) -> &'static str {
        match parse(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid-value error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn a_full_config_parses() {
        let config = parse(
            r#"
            kernel = "/k/vmlinux"
            initrd = "/k/initrd"
            virtiofsd = "/bin/virtiofsd"
            default_vcpus = 3
            default_memory_mib = 512
            log_level = "debug"
            allowed_annotations = ["io.podbox.vcpus"]
            "#,
        )
        .expect("valid config");
        assert_eq!(config.kernel, Path::new("/k/vmlinux"));
        assert_eq!(config.initrd, Path::new("/k/initrd"));
        assert_eq!(
            config.virtiofsd.as_deref(),
            Some(Path::new("/bin/virtiofsd"))
        );
        assert_eq!((config.default_vcpus, config.default_memory_mib), (3, 512));
        assert_eq!(config.log_level, "debug");
        assert!(config.allows_annotation("io.podbox.vcpus"));
        assert!(!config.allows_annotation("io.podbox.memory_mib"));
    }

    #[test]
    fn missing_keys_take_the_defaults() {
        let config = parse("default_vcpus = 4").expect("valid config");
        assert_eq!(
            config,
            Config {
                default_vcpus: 4,
                ..Config::default()
            }
        );
        assert!(
            config.allowed_annotations.is_empty(),
            "no annotation is allowed unless the operator says so"
        );
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named() {
        let message = parse("default_cpus = 2")
            .expect_err("unknown key")
            .to_string();
        assert!(message.contains("default_cpus"), "{message}");
        // A value outside an enum is refused by the parser, naming the key.
        let message = parse("fs_cache = \"sometimes\"")
            .expect_err("unknown cache mode")
            .to_string();
        assert!(
            message.contains("fs_cache") && message.contains("always"),
            "{message}"
        );
        let message = parse("default_vcpus = \"two\"")
            .expect_err("mistyped value")
            .to_string();
        assert!(message.contains("default_vcpus"), "{message}");
        assert!(
            message.contains("/test/config.toml"),
            "the file is named: {message}"
        );
    }

    #[test]
    fn bad_values_are_named_by_key() {
        assert_eq!(invalid_key("default_vcpus = 0"), "default_vcpus");
        assert_eq!(invalid_key("default_vcpus = 33"), "default_vcpus");
        assert_eq!(invalid_key("log_max_bytes = 0"), "log_max_bytes");
        assert_eq!(invalid_key("log_max_bytes = 2147483648"), "log_max_bytes");
        assert_eq!(invalid_key("asset_dirs = [\"assets\"]"), "asset_dirs");
        assert_eq!(invalid_key("default_memory_mib = 32"), "default_memory_mib");
        assert_eq!(invalid_key("default_vcpus = 4\nmax_vcpus = 3"), "max_vcpus");
        assert_eq!(invalid_key("max_vcpus = 33"), "max_vcpus");
        assert_eq!(
            invalid_key("default_memory_mib = 512\nmax_memory_mib = 511"),
            "max_memory_mib"
        );
        assert_eq!(invalid_key("log_level = \"loud\""), "log_level");
        assert_eq!(invalid_key("kernel = \"vmlinux\""), "kernel");
        assert_eq!(invalid_key("initrd = \"\""), "initrd");
        assert_eq!(invalid_key("virtiofsd = \"bin/virtiofsd\""), "virtiofsd");
        assert_eq!(
            invalid_key("guest_profile_dir = \"profiles\""),
            "guest_profile_dir"
        );
        assert_eq!(
            invalid_key("allowed_annotations = [\"io.podbox.cpus\"]"),
            "allowed_annotations"
        );
        let message = parse("default_vcpus = 0").expect_err("invalid").to_string();
        assert_eq!(
            message,
            "podbox config /test/config.toml: key `default_vcpus`: 0 is not in 1..=32"
        );
    }

    #[test]
    fn a_negative_number_is_an_error_not_a_wraparound() {
        let message = parse("default_memory_mib = -1")
            .expect_err("negative")
            .to_string();
        assert!(message.contains("default_memory_mib"), "{message}");
    }

    #[test]
    fn an_explicit_config_path_must_exist_but_the_default_need_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("absent.toml");
        assert!(matches!(
            Config::load(Some(&missing)),
            Err(ConfigError::Read { .. })
        ));
        let present = dir.path().join("config.toml");
        let (kernel, initrd) = (dir.path().join("vmlinux"), dir.path().join("initrd"));
        std::fs::write(&kernel, podbox_vmm_config::minimal_vmlinux()).expect("writing kernel");
        std::fs::write(&initrd, b"070701").expect("writing initrd");
        std::fs::write(
            &present,
            format!(
                "default_memory_mib = 1024\nkernel = {:?}\ninitrd = {:?}\n",
                kernel.display().to_string(),
                initrd.display().to_string()
            ),
        )
        .expect("writing config");
        assert_eq!(
            Config::load(Some(&present))
                .expect("loads")
                .default_memory_mib,
            1024
        );
        // A loaded config's kernel and initramfs must be there and be what
        // they say, each named by its key.
        for (text, key) in [
            (
                format!("initrd = {:?}", initrd.display().to_string()),
                "kernel",
            ),
            (
                format!(
                    "kernel = {:?}\ninitrd = {:?}",
                    initrd.display().to_string(),
                    initrd.display().to_string()
                ),
                "kernel",
            ),
            (
                format!(
                    "kernel = {:?}\ninitrd = {:?}",
                    kernel.display().to_string(),
                    dir.path().display().to_string()
                ),
                "initrd",
            ),
        ] {
            std::fs::write(&present, &text).expect("writing config");
            match Config::load(Some(&present)) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
