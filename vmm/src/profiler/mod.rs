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
//! Phases: each SIGUSR1 to podbox-vmm writes FILE.phaseN (and its
//! .folded), the samples and KVM counter differences since the previous
//! SIGUSR1 (or since the start), so a benchmark that signals at the start
//! and end of, say, one container start gets that start's profile alone
//! ([`Profiler::write_phase`]). The VM runs on; FILE at exit still covers
//! the whole run.
//!
//! Without the flag nothing of this exists: no thread, no signal handler,
//! one `Option` test per vCPU exit.

pub mod kick;
pub mod report;
pub mod sample;
pub mod symbols;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
    /// When sampling began and ended (the VM's exit).
    started: OnceLock<Instant>,
    ended: OnceLock<Instant>,
    /// Where the last phase ended; `None` before the first SIGUSR1.
    phase: Mutex<Option<PhaseMark>>,
}

/// What the profile held when a phase ended: the next phase is the
/// difference.
struct PhaseMark {
    number: u32,
    at: Instant,
    tallies: Vec<Tally>,
    kicks: u64,
    stats: Vec<StatsColumn>,
}

/// One profile to write: a whole run or a phase.
struct Period<'a> {
    phase: Option<u32>,
    seconds: f64,
    kicks: u64,
    tallies: &'a [Tally],
    stats: &'a [StatsColumn],
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
            started: OnceLock::new(),
            ended: OnceLock::new(),
            phase: Mutex::new(None),
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
        let _ = self.started.set(Instant::now());
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
        let _ = self.ended.set(Instant::now());
    }

    fn tallies(&self) -> Vec<Tally> {
        self.vcpus
            .iter()
            .map(|s| s.tally.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Writes the whole run's report to the configured file and the
    /// folded stacks beside it; returns the report's path.
    pub fn write(&self, stats: &[StatsColumn]) -> Result<&Path, ProfilerError> {
        self.stop();
        let seconds = match (self.started.get(), self.ended.get()) {
            (Some(start), Some(end)) => (*end - *start).as_secs_f64(),
            _ => 0.0,
        };
        let tallies = self.tallies();
        let period = Period {
            phase: None,
            seconds,
            kicks: self.kicks.load(Ordering::Relaxed),
            tallies: &tallies,
            stats,
        };
        self.write_files(&self.config.path, &period)?;
        Ok(&self.config.path)
    }

    /// Writes FILE.phaseN: what the vCPUs did since the previous phase
    /// ended (or sampling began), with the KVM counters' differences
    /// (`stats` are their values now); returns its path.
    pub fn write_phase(&self, stats: &[StatsColumn]) -> Result<PathBuf, ProfilerError> {
        let mut mark = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tallies, kicks) = (self.tallies(), self.kicks.load(Ordering::Relaxed));
        // Before the first SIGUSR1 the phase runs from the start of sampling.
        let first;
        let base = match mark.as_ref() {
            Some(m) => m,
            None => {
                first = PhaseMark {
                    number: 0,
                    at: self.started.get().copied().unwrap_or(now),
                    tallies: vec![Tally::default(); tallies.len()],
                    kicks: 0,
                    stats: Vec::new(),
                };
                &first
            }
        };
        let number = base.number + 1;
        let tally_delta: Vec<Tally> = tallies
            .iter()
            .zip(&base.tallies)
            .map(|(t, e)| t.minus(e))
            .collect();
        let stats_delta = report::stats_minus(stats, &base.stats);
        let period = Period {
            phase: Some(number),
            seconds: (now - base.at).as_secs_f64(),
            kicks: kicks - base.kicks,
            tallies: &tally_delta,
            stats: &stats_delta,
        };
        let path = phase_path(&self.config.path, number);
        self.write_files(&path, &period)?;
        *mark = Some(PhaseMark {
            number,
            at: now,
            tallies,
            kicks,
            stats: stats.to_vec(),
        });
        Ok(path)
    }

    fn write_files(&self, path: &Path, period: &Period) -> Result<(), ProfilerError> {
        let kernel = self.kernel.display().to_string();
        let header = Header {
            kernel: &kernel,
            functions: self.symbols.len(),
            task_names: self.symbols.current_task.is_some(),
            hz: self.config.hz,
            seconds: period.seconds,
            kicks: period.kicks,
            phase: period.phase,
        };
        let write = |path: &Path, text: String| {
            std::fs::write(path, text).map_err(|source| ProfilerError::Write {
                path: path.to_owned(),
                source,
            })
        };
        write(path, report::render(&header, period.tallies, period.stats))?;
        let name = |addr| self.symbols.function(addr).unwrap_or("?").to_owned();
        write(&folded_path(path), report::folded(period.tallies, &name))
    }
}

/// FILE.phaseN beside FILE.
pub fn phase_path(report: &Path, number: u32) -> PathBuf {
    let mut p = report.as_os_str().to_owned();
    p.push(format!(".phase{number}"));
    PathBuf::from(p)
}

/// FILE.folded beside FILE.
pub fn folded_path(report: &Path) -> PathBuf {
    let mut p = report.as_os_str().to_owned();
    p.push(".folded");
    PathBuf::from(p)
}
