//! Command line of the agent.

use std::path::PathBuf;

pub const USAGE: &str =
    "usage: podbox-agent [--listen ADDR] [--init|--no-init] [--cgroup-root PATH] \
[--cgroup-parent NAME] [--log-level LEVEL]

  --listen ADDR         vsock://PORT (default vsock://1024) or unix:///path/to/socket
  --init                do the PID 1 duties (mounts, reaping, power-off on DestroySandbox);
                        default: only when running as PID 1
  --cgroup-root PATH    cgroup mount to use (default /sys/fs/cgroup; v2 or v1 detected)
  --cgroup-parent NAME  group under which containers' cgroups are made (default podbox)
  --log-level LEVEL     error|warn|info|debug|trace (default info)";

/// How the agent was asked to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// ttrpc address, already in ttrpc's syntax (vsock://-1:PORT or unix://...).
    pub listen: String,
    pub init: bool,
    pub cgroup_root: PathBuf,
    pub cgroup_parent: String,
    pub log_level: log::LevelFilter,
}

pub enum Command {
    Run(AgentConfig),
    Help,
    Version,
}

impl AgentConfig {
    pub fn parse(args: &[String]) -> Result<Command, String> {
        let mut cfg = AgentConfig {
            listen: format!("vsock://-1:{}", podbox_protocol::AGENT_VSOCK_PORT),
            init: nix::unistd::getpid().as_raw() == 1,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_parent: "podbox".into(),
            log_level: log::LevelFilter::Info,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
            match a.as_str() {
                "-h" | "--help" => return Ok(Command::Help),
                "-V" | "--version" => return Ok(Command::Version),
                "--init" => cfg.init = true,
                "--no-init" => cfg.init = false,
                "--listen" => cfg.listen = listen_addr(&value("--listen")?)?,
                "--cgroup-root" => cfg.cgroup_root = value("--cgroup-root")?.into(),
                "--cgroup-parent" => {
                    let v = value("--cgroup-parent")?;
                    if v.is_empty() || v.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
                        return Err(format!("bad --cgroup-parent {v:?}"));
                    }
                    cfg.cgroup_parent = v;
                }
                "--log-level" => {
                    let v = value("--log-level")?;
                    cfg.log_level = v.parse().map_err(|_| format!("bad --log-level {v:?}"))?;
                }
                // As PID 1, argv also carries the kernel command-line words
                // the kernel did not recognise (e.g. `noxsave`, which it
                // parses early yet still passes on): not ours to reject.
                other if cfg.init && !other.starts_with("--") => {
                    eprintln!("podbox-agent: ignoring kernel-passed argument {other:?}")
                }
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(Command::Run(cfg))
    }
}

/// Turns the user-facing address into ttrpc's: `vsock://PORT` listens on
/// any CID, which is what a guest wants.
fn listen_addr(a: &str) -> Result<String, String> {
    if let Some(port) = a.strip_prefix("vsock://") {
        let port = port.rsplit(':').next().unwrap_or(port);
        let port: u32 = port
            .parse()
            .map_err(|_| format!("bad vsock port in {a:?}"))?;
        return Ok(format!("vsock://-1:{port}"));
    }
    if let Some(path) = a.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(format!("unix socket path must be absolute: {a:?}"));
        }
        return Ok(a.to_string());
    }
    Err(format!(
        "--listen takes vsock://PORT or unix:///path, not {a:?}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(listen_addr("vsock://1024").unwrap(), "vsock://-1:1024");
        assert_eq!(
            listen_addr("unix:///run/a.sock").unwrap(),
            "unix:///run/a.sock"
        );
        assert!(listen_addr("unix://rel").is_err());
        assert!(listen_addr("tcp://1").is_err());
    }

    #[test]
    fn rejects_cgroup_parent_escape() {
        let args = vec!["--cgroup-parent".to_string(), "../x".to_string()];
        assert!(AgentConfig::parse(&args).is_err());
    }
}
