//! The guest profiler (`--guest-profile FILE[,hz=N]`): where a guest's
//! vCPU time goes, for runtime developers trimming boot and container start.
//!
//! A sampler thread kicks every vCPU thread [`hz`](ProfileConfig::hz) times
//! a second ([`kick`]); the kicked vCPU leaves `KVM_RUN`, reads its RIP,
//! privilege level and run state, and (through the kernel's per-CPU area)
//! the name of the guest task it runs ([`sample`]); kernel addresses are
//! named from the vmlinux's ELF symbol table ([`symbols`]). When the VM
//! ends, [`Profiler::write`] writes the flat profile and KVM's statistics
//! to FILE and folded stacks to FILE.folded ([`report`]).
//!
//! Without the flag nothing of this exists: no thread, no signal handler,
//! one `Option` test per vCPU exit.

pub mod kick;
pub mod report;
pub mod sample;
pub mod symbols;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::ProfileConfig;
use crate::exit::ExitLatch;
use kick::KickTarget;
use report::{Header, StatsColumn};
use sample::{SampleSource, Tally};
use symbols::{KernelSymbols, SymbolError};

#[derive(Debug, thiserror::Error)]
pub enum ProfilerError {
    #[error("--guest-profile: kernel symbols: {0}")]
    Symbols(#[from] SymbolError),
    #[error("--guest-profile: installing the vCPU kick signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("--guest-profile: starting the sampler thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("--guest-profile: writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One vCPU's part: the thread to kick and what its samples found.
#[derive(Default)]
pub struct VcpuSlot {
    pub kick: KickTarget,
    tally: Mutex<Tally>,
}

pub struct Profiler {
    config: ProfileConfig,
    kernel: PathBuf,
    symbols: KernelSymbols,
    vcpus: Vec<VcpuSlot>,
    kicks: AtomicU64,
    started: Mutex<Option<(Instant, Option<Instant>)>>,
}

impl Profiler {
    /// Loads the kernel's symbols and installs the kick handler; sampling
    /// starts with [`Profiler::start`].
    pub fn new(config: &ProfileConfig, kernel: &Path, vcpus: u8) -> Result<Self, ProfilerError> {
        let symbols = KernelSymbols::load(kernel)?;
        kick::install_handler().map_err(ProfilerError::Signal)?;
        tracing::info!(
            "guest profile: {} kernel functions from {}, {} Hz per vCPU, to {}{}",
            symbols.len(),
            kernel.display(),
            config.hz,
            config.path.display(),
            if symbols.current_task.is_some() {
                ""
            } else {
                " (no init_task/pcpu_hot: processes unnamed)"
            }
        );
        Ok(Self {
            config: config.clone(),
            kernel: kernel.to_owned(),
            symbols,
            vcpus: (0..vcpus).map(|_| VcpuSlot::default()).collect(),
            kicks: AtomicU64::new(0),
            started: Mutex::new(None),
        })
    }

    pub fn slot(&self, vcpu: u8) -> &VcpuSlot {
        &self.vcpus[usize::from(vcpu)]
    }

    /// Takes one sample of `vcpu` (on its own thread, out of KVM_RUN).
    pub fn record(&self, vcpu: u8, source: &dyn SampleSource) {
        let key = sample::take(source, &self.symbols);
        self.slot(vcpu)
            .tally
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(key);
    }

    /// Starts the sampler thread; it stops when the VM exits.
    pub fn start(self: &Arc<Self>, exit: Arc<ExitLatch>) -> Result<(), ProfilerError> {
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), None));
        let profiler = self.clone();
        let period = Duration::from_secs(1) / profiler.config.hz;
        std::thread::Builder::new()
            .name("profiler".into())
            .spawn(move || {
                let mut next = Instant::now() + period;
                while !exit.is_set() {
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    // After a stall (a stopped process), go on from now
                    // rather than kicking a burst to catch up.
                    next = (next + period).max(Instant::now());
                    for slot in &profiler.vcpus {
                        if slot.kick.kick() {
                            profiler.kicks.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
            .map(|_| ())
            .map_err(ProfilerError::Thread)
    }

    /// Ends the sampling period (the VM has exited).
    pub fn stop(&self) {
        if let Some((_, end)) = self
            .started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            end.get_or_insert_with(Instant::now);
        }
    }

    /// Writes the report to the configured file and the folded stacks
    /// beside it; returns the report's path.
    pub fn write(&self, stats: &[StatsColumn]) -> Result<&Path, ProfilerError> {
        self.stop();
        let seconds = match *self.started.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((start, Some(end))) => (end - start).as_secs_f64(),
            _ => 0.0,
        };
        let tallies: Vec<Tally> = self
            .vcpus
            .iter()
            .map(|s| s.tally.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect();
        let kernel = self.kernel.display().to_string();
        let header = Header {
            kernel: &kernel,
            functions: self.symbols.len(),
            task_names: self.symbols.current_task.is_some(),
            hz: self.config.hz,
            seconds,
            kicks: self.kicks.load(Ordering::Relaxed),
        };
        let path = &self.config.path;
        let write = |path: &Path, text: String| {
            std::fs::write(path, text).map_err(|source| ProfilerError::Write {
                path: path.to_owned(),
                source,
            })
        };
        write(path, report::render(&header, &tallies, stats))?;
        let name = |addr| self.symbols.function(addr).unwrap_or("?").to_owned();
        write(&folded_path(path), report::folded(&tallies, &name))?;
        Ok(path)
    }
}

/// FILE.folded beside FILE.
pub fn folded_path(report: &Path) -> PathBuf {
    let mut p = report.as_os_str().to_owned();
    p.push(".folded");
    PathBuf::from(p)
}
