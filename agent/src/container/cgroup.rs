//! One cgroup per container, on cgroup v2 (the guest) or on the v1
//! controllers (hosts such as CI that still mount a hybrid hierarchy, where
//! the memory controller is only usable through v1).
//!
//! Only the knobs podbox uses are handled: memory, cpu, pids, freezing,
//! process listing, OOM-kill counting and stats.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;

use super::Error;

/// v1 controllers a container joins. cpuacct gives CPU usage for stats and
/// freezer implements pause/resume.
const V1_CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];

/// Which hierarchy the agent drives, and where.
#[derive(Debug, Clone)]
pub enum CgroupRoot {
    /// Mount point of the unified hierarchy (e.g. /sys/fs/cgroup).
    V2(PathBuf),
    /// Base directory holding one mount per v1 controller (/sys/fs/cgroup).
    V1(PathBuf),
}

impl CgroupRoot {
    /// Picks v2 when its mount offers the memory controller, otherwise the
    /// v1 memory controller; `base` is normally /sys/fs/cgroup.
    pub fn detect(base: &Path) -> Result<CgroupRoot, Error> {
        let controllers = fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "memory") {
            return Ok(CgroupRoot::V2(base.to_path_buf()));
        }
        if base.join("memory/memory.limit_in_bytes").exists() {
            return Ok(CgroupRoot::V1(base.to_path_buf()));
        }
        Err(Error::Unsupported(format!(
            "no usable memory cgroup controller under {}",
            base.display()
        )))
    }

    /// Creates (or reuses) the group `rel`, e.g. "podbox/<sandbox>/<ctr>".
    pub fn create(&self, rel: &str) -> Result<Cgroup, Error> {
        let cg = self.open(rel);
        match self {
            CgroupRoot::V2(root) => {
                // Controllers must be enabled in every ancestor's
                // subtree_control before a leaf can set limits.
                let mut dir = root.clone();
                for part in Path::new(rel).components() {
                    enable_v2_controllers(&dir);
                    dir.push(part);
                    mkdir(&dir)?;
                }
            }
            CgroupRoot::V1(_) => {
                for (_, dir) in &cg.dirs {
                    mkdir(dir)?;
                }
            }
        }
        Ok(cg)
    }

    /// A handle on `rel` without creating anything.
    pub fn open(&self, rel: &str) -> Cgroup {
        match self {
            CgroupRoot::V2(root) => Cgroup {
                v2: true,
                dirs: vec![("", root.join(rel))],
            },
            CgroupRoot::V1(base) => Cgroup {
                v2: false,
                dirs: V1_CONTROLLERS
                    .iter()
                    .filter(|c| base.join(c).exists())
                    .map(|c| (*c, base.join(c).join(rel)))
                    .collect(),
            },
        }
    }
}

fn enable_v2_controllers(dir: &Path) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    for c in ["memory", "cpu", "pids"] {
        if available.split_whitespace().any(|a| a == c) {
            // Failure only costs that controller's limits; reported when a
            // limit is actually written.
            let _ = fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
        }
    }
}

fn mkdir(dir: &Path) -> Result<(), Error> {
    match fs::create_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) => Err(Error::io(format!("create cgroup {}", dir.display()), e)),
    }
}

/// One cgroup file [`Cgroup::apply`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Knob {
    /// The v1 controller whose directory holds `file` (any on v2).
    pub controller: &'static str,
    pub file: &'static str,
    pub value: String,
    /// A failed write fails the request; otherwise it only costs the knob.
    pub required: bool,
}

/// The writes that apply the memory, cpu and pids parts of `res` on cgroup
/// v2 (`v2`) or v1, in order. The values come from the host's OCI spec;
/// public for the fuzz targets (`fuzz/`).
pub fn knobs(v2: bool, res: &LinuxResources) -> Vec<Knob> {
    let mut out = Vec::new();
    let mut push = |controller, file, value: String, required| {
        out.push(Knob {
            controller,
            file,
            value,
            required,
        })
    };
    if let Some(mem) = res.memory() {
        if let Some(limit) = mem.limit() {
            if v2 {
                let v = if limit < 0 {
                    "max".to_string()
                } else {
                    limit.to_string()
                };
                push("memory", "memory.max", v, true);
                // Without this a limited group would swap instead of
                // hitting the OOM killer the spec asks for.
                push("memory", "memory.swap.max", "0".to_string(), false);
            } else {
                push("memory", "memory.limit_in_bytes", limit.to_string(), true);
            }
        }
    }
    if let Some(cpu) = res.cpu() {
        let period = cpu.period().unwrap_or(100_000);
        if v2 {
            if let Some(quota) = cpu.quota() {
                let q = if quota <= 0 {
                    "max".to_string()
                } else {
                    quota.to_string()
                };
                push("cpu", "cpu.max", format!("{q} {period}"), true);
            }
            if let Some(shares) = cpu.shares() {
                // The conversion runc and crun use from v1 shares
                // [2, 262144] to v2 weight [1, 10000].
                let weight = 1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142;
                push("cpu", "cpu.weight", weight.to_string(), true);
            }
        } else {
            if let Some(quota) = cpu.quota() {
                push("cpu", "cpu.cfs_period_us", period.to_string(), true);
                push("cpu", "cpu.cfs_quota_us", quota.to_string(), true);
            }
            if let Some(shares) = cpu.shares() {
                push("cpu", "cpu.shares", shares.to_string(), true);
            }
        }
    }
    if let Some(pids) = res.pids() {
        let v = if pids.limit() <= 0 {
            "max".to_string()
        } else {
            pids.limit().to_string()
        };
        push("pids", "pids.max", v, true);
    }
    out
}

/// Usage numbers for StatsContainer.
#[derive(Debug, Default, Clone)]
pub struct CgroupStats {
    pub memory_usage: u64,
    pub memory_max_usage: u64,
    pub memory_limit: u64,
    pub oom_kills: u64,
    pub cpu_usage_ns: u64,
    pub pids_current: u64,
    pub pids_limit: u64,
}

/// A container's group: one directory on v2, one per controller on v1.
#[derive(Debug, Clone)]
pub struct Cgroup {
    v2: bool,
    /// (v1 controller name or "" on v2, directory)
    dirs: Vec<(&'static str, PathBuf)>,
}

impl Cgroup {
    /// Directory of `controller` (any directory on v2).
    fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| self.v2 || *c == controller)
            .map(|(_, d)| d.as_path())
    }

    fn write(&self, controller: &str, file: &str, value: &str) -> Result<(), Error> {
        let dir = self.dir(controller).ok_or_else(|| {
            Error::Unsupported(format!("cgroup controller {controller} is not available"))
        })?;
        let path = dir.join(file);
        fs::write(&path, value)
            .map_err(|e| Error::io(format!("write {value:?} to {}", path.display()), e))
    }

    fn read(&self, controller: &str, file: &str) -> Option<String> {
        fs::read_to_string(self.dir(controller)?.join(file)).ok()
    }

    fn read_u64(&self, controller: &str, file: &str) -> u64 {
        self.read(controller, file)
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Moves `pid` into every directory of the group.
    pub fn add_pid(&self, pid: i32) -> Result<(), Error> {
        for (_, dir) in &self.dirs {
            let path = dir.join("cgroup.procs");
            fs::write(&path, pid.to_string())
                .map_err(|e| Error::io(format!("add pid {pid} to {}", path.display()), e))?;
        }
        Ok(())
    }

    /// Applies the memory, cpu and pids parts of OCI resources.
    pub fn apply(&self, res: &LinuxResources) -> Result<(), Error> {
        for knob in knobs(self.v2, res) {
            let written = self.write(knob.controller, knob.file, &knob.value);
            if knob.required {
                written?;
            }
        }
        Ok(())
    }

    /// cgroup v2's memory.events, which the kernel marks for poll(2)
    /// (POLLPRI) when a counter in it changes; None on v1.
    pub fn oom_events_path(&self) -> Option<PathBuf> {
        self.v2
            .then(|| self.dir("memory").map(|d| d.join("memory.events")))
            .flatten()
    }

    /// How many times the kernel OOM-killed a process of this group.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.read("memory", file)
            .map(|s| oom_kill_count(&s))
            .unwrap_or(0)
    }

    pub fn stats(&self) -> CgroupStats {
        let limit_of = |s: Option<String>| match s.as_deref().map(str::trim) {
            Some("max") | None => u64::MAX,
            Some(v) => v.parse().unwrap_or(u64::MAX),
        };
        if self.v2 {
            let usage_usec = self
                .read("cpu", "cpu.stat")
                .and_then(|s| {
                    s.lines().find_map(|l| {
                        l.strip_prefix("usage_usec ")
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    })
                })
                .unwrap_or(0);
            CgroupStats {
                memory_usage: self.read_u64("memory", "memory.current"),
                memory_max_usage: self.read_u64("memory", "memory.peak"),
                memory_limit: limit_of(self.read("memory", "memory.max")),
                oom_kills: self.oom_kills(),
                cpu_usage_ns: usage_usec * 1000,
                pids_current: self.read_u64("pids", "pids.current"),
                pids_limit: limit_of(self.read("pids", "pids.max")),
            }
        } else {
            CgroupStats {
                memory_usage: self.read_u64("memory", "memory.usage_in_bytes"),
                memory_max_usage: self.read_u64("memory", "memory.max_usage_in_bytes"),
                memory_limit: self.read_u64("memory", "memory.limit_in_bytes"),
                oom_kills: self.oom_kills(),
                cpu_usage_ns: self.read_u64("cpuacct", "cpuacct.usage"),
                pids_current: self.read_u64("pids", "pids.current"),
                pids_limit: limit_of(self.read("pids", "pids.max")),
            }
        }
    }

    /// PIDs in the group (agent's PID namespace).
    pub fn pids(&self) -> Vec<i32> {
        let controller = if self.v2 { "" } else { "memory" };
        self.read(controller, "cgroup.procs")
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    pub fn freeze(&self, frozen: bool) -> Result<(), Error> {
        if self.v2 {
            self.write("", "cgroup.freeze", if frozen { "1" } else { "0" })
        } else {
            self.write(
                "freezer",
                "freezer.state",
                if frozen { "FROZEN" } else { "THAWED" },
            )
        }
    }

    /// SIGKILLs everything in the group and waits (up to `timeout`) until
    /// it is empty. A frozen group is thawed so the kills are delivered.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), Error> {
        let _ = self.freeze(false);
        let deadline = Instant::now() + timeout;
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if Instant::now() > deadline {
                return Err(Error::Cleanup(format!(
                    "processes of cgroup {:?} did not die",
                    self.dirs
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes the group's directories; they must be empty of processes.
    pub fn destroy(&self) -> Result<(), Error> {
        for (_, dir) in &self.dirs {
            // rmdir can fail with EBUSY for a moment after the last
            // process died while the kernel finishes releasing it.
            let mut tries = 0;
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if tries < 50 => {
                        let _ = e;
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(Error::io(format!("remove cgroup {}", dir.display()), e)),
                }
            }
        }
        Ok(())
    }

    /// Removes the group's directories that have no child groups left.
    pub fn destroy_if_empty(&self) -> Result<(), Error> {
        for (_, dir) in &self.dirs {
            let has_children = fs::read_dir(dir)
                .map(|rd| {
                    rd.flatten()
                        .any(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                })
                .unwrap_or(false);
            if !has_children {
                let _ = fs::remove_dir(dir);
            }
        }
        Ok(())
    }

    /// Whether any directory of the group still exists.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|(_, d)| d.exists())
    }
}

/// The `oom_kill N` line of memory.events (v2) or memory.oom_control (v1).
pub fn oom_kill_count(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == "oom_kill")
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}
