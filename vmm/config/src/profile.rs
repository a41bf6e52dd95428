//! `--guest-profile FILE[,hz=N]`: sample the guest's vCPUs and write where
//! their time went to FILE when the VM ends.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Samples per second per vCPU when `hz=` is not given: a 30-60 s PVM boot
/// gets a few thousand samples per vCPU, and each sample costs one exit.
pub const DEFAULT_PROFILE_HZ: u32 = 100;
/// The bounds of `hz=`: each sample kicks every vCPU out of KVM_RUN, so a
/// rate above the host's scheduler tick measures the profiler itself.
pub const PROFILE_HZ: std::ops::RangeInclusive<u32> = 1..=1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileConfig {
    /// The report (a top-N table and KVM's statistics); the folded stacks
    /// go beside it with `.folded` appended.
    pub path: PathBuf,
    pub hz: u32,
}

impl FromStr for ProfileConfig {
    type Err = String;

    /// `FILE` or `FILE,hz=N`. Only a last `,hz=` part is an option, so a
    /// path may contain commas.
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, hz) = match s.rsplit_once(',') {
            Some((path, option)) if option.starts_with("hz=") => {
                let value = &option["hz=".len()..];
                let hz = value.parse::<u32>().ok().filter(|n| PROFILE_HZ.contains(n));
                let hz = hz.ok_or_else(|| {
                    format!(
                        "hz={value:?}: must be a whole number from {} to {}",
                        PROFILE_HZ.start(),
                        PROFILE_HZ.end()
                    )
                })?;
                (path, hz)
            }
            Some((_, option)) if option.contains('=') => {
                return Err(format!("{option:?}: the only option is hz=N"));
            }
            _ => (s, DEFAULT_PROFILE_HZ),
        };
        if path.is_empty() {
            return Err("a file to write the profile to is needed: FILE[,hz=N]".into());
        }
        Ok(ProfileConfig {
            path: PathBuf::from(path),
            hz,
        })
    }
}

impl fmt::Display for ProfileConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},hz={}", self.path.display(), self.hz)
    }
}
