//! One sample of a vCPU: where it was (kernel function, user address,
//! halted) and on behalf of which process, and the bounded tally of them.

use std::collections::HashMap;

use super::symbols::{CurrentTask, KernelSymbols};

/// Kernel addresses start here (the upper half of the 48-bit space).
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
/// `task_struct.comm` is `char[TASK_COMM_LEN]`.
const TASK_COMM_LEN: usize = 16;
/// Distinct (process, place) keys kept per vCPU; later new ones are
/// counted as "other": a guest cannot grow the VMM's memory by running
/// code at ever new user addresses.
pub const MAX_KEYS: usize = 16 * 1024;
/// Caller frames walked per kernel sample (frame pointers).
pub const MAX_FRAMES: usize = 24;
/// How far up from the first frame a caller's frame may lie: a kernel
/// stack is 16 KiB; a chain leaving it is garbage or an IRQ-stack switch.
const MAX_STACK_SPAN: u64 = 16 * 1024;

/// What the profiler reads of a vCPU when it has been kicked out of KVM_RUN.
pub trait SampleSource {
    /// The registers a sample needs, or None where they cannot be read.
    fn state(&self) -> Option<CpuState>;
    /// Whether the vCPU runs, waits for an interrupt, or has not been
    /// started yet.
    fn run_state(&self) -> RunState;
    /// The KERNEL_GS_BASE MSR: in user mode, where the kernel's GS base
    /// waits for the next SWAPGS.
    fn kernel_gs_base(&self) -> Option<u64>;
    /// `len` bytes at guest-virtual `gva`, through the vCPU's page tables.
    fn read_virt(&self, gva: u64, len: usize) -> Option<Vec<u8>>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// HLT: waiting for an interrupt (no host CPU spent).
    Halted,
    /// An application processor the guest has not started (INIT/SIPI) yet.
    NotStarted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuState {
    pub rip: u64,
    /// The frame pointer (in a kernel built with them).
    pub rbp: u64,
    /// The current privilege level: 0 kernel, 3 user.
    pub cpl: u8,
    /// GS base: the kernel's per-CPU base while in the kernel.
    pub gs_base: u64,
}

/// Where a sample landed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Place {
    /// Guest kernel code, by function name (or its address where unknown).
    Kernel(String),
    /// Guest user code at this address (no user symbols are read).
    User(u64),
    /// Halted, waiting for an interrupt: no host CPU spent.
    Halted,
    /// Not started by the guest yet (a secondary vCPU during early boot).
    NotStarted,
    /// The registers could not be read.
    Unknown,
    /// A place beyond [`MAX_KEYS`].
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The running task's name, or "?" where it cannot be read.
    pub process: String,
    pub place: Place,
    /// For a kernel sample in a frame-pointer kernel: the callers'
    /// function starts, innermost first (empty otherwise).
    pub callers: Vec<u64>,
}

impl Key {
    /// The one key every sample beyond [`MAX_KEYS`] goes to, whatever its
    /// process: guest-chosen names must not grow the map either.
    pub fn other() -> Key {
        Key {
            process: "*".into(),
            place: Place::Other,
            callers: Vec::new(),
        }
    }
}

/// One vCPU's samples.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub counts: HashMap<Key, u64>,
}

impl Tally {
    pub fn add(&mut self, key: Key) {
        if self.counts.len() >= MAX_KEYS && !self.counts.contains_key(&key) {
            *self.counts.entry(Key::other()).or_default() += 1;
            return;
        }
        *self.counts.entry(key).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The samples taken since `earlier`, a copy of this tally from before.
    pub fn minus(&self, earlier: &Tally) -> Tally {
        let counts = self
            .counts
            .iter()
            .filter_map(|(key, &n)| {
                let since = n.saturating_sub(earlier.counts.get(key).copied().unwrap_or(0));
                (since > 0).then(|| (key.clone(), since))
            })
            .collect();
        Tally { counts }
    }
}

/// Reads one sample from `source`.
pub fn take(source: &dyn SampleSource, symbols: &KernelSymbols) -> Key {
    let Some(state) = source.state() else {
        return Key {
            process: "?".into(),
            place: Place::Unknown,
            callers: Vec::new(),
        };
    };
    let process = symbols
        .current_task
        .and_then(|task| current_comm(source, task, state))
        .unwrap_or_else(|| "?".into());
    let place = match source.run_state() {
        RunState::Halted => Place::Halted,
        RunState::NotStarted => Place::NotStarted,
        // A user-mode RIP in the kernel half is PVM's half-done SYSCALL
        // at the entry point (see crate::pvm): the kernel's work.
        RunState::Running if state.cpl == 3 && state.rip < KERNEL_HALF => Place::User(state.rip),
        RunState::Running => match symbols.function(state.rip) {
            Some(name) => Place::Kernel(name.to_owned()),
            None => Place::Kernel(format!("{:#x}", state.rip)),
        },
    };
    let callers = match place {
        Place::Kernel(_) if symbols.frame_pointers => callers(source, symbols, state.rbp),
        _ => Vec::new(),
    };
    Key {
        process,
        place,
        callers,
    }
}

/// Walks the frame-pointer chain from `rbp`: each frame holds the caller's
/// RBP, then the return address. The guest controls every word, so a
/// frame must be aligned, in the kernel half, above the last one and
/// within one kernel stack of the first, and its return address in kernel
/// text; the walk stops at the first that is not.
fn callers(source: &dyn SampleSource, symbols: &KernelSymbols, mut rbp: u64) -> Vec<u64> {
    let first = rbp;
    let mut out = Vec::new();
    while out.len() < MAX_FRAMES
        && rbp >= KERNEL_HALF
        && rbp.is_multiple_of(8)
        && rbp.wrapping_sub(first) < MAX_STACK_SPAN
    {
        let Some(frame) = source.read_virt(rbp, 16) else {
            break;
        };
        let word = |i: usize| u64::from_le_bytes(frame[i * 8..i * 8 + 8].try_into().unwrap());
        let (next, ret) = (word(0), word(1));
        let Some(start) = symbols.function_start(ret) else {
            break;
        };
        out.push(start);
        if next <= rbp {
            break;
        }
        rbp = next;
    }
    out
}

/// The running task's `comm`, read from guest memory: every value on the
/// way is the guest's, so each is checked and a bad one gives None.
fn current_comm(source: &dyn SampleSource, task: CurrentTask, state: CpuState) -> Option<String> {
    let base = if state.cpl == 3 {
        source.kernel_gs_base()?
    } else {
        state.gs_base
    };
    if base < KERNEL_HALF {
        // A kernel entry before SWAPGS, or a guest's odd value.
        return None;
    }
    let slot = base.checked_add(task.percpu_offset)?;
    let bytes = source.read_virt(slot, 8)?;
    let current = u64::from_le_bytes(bytes.try_into().ok()?);
    if current < KERNEL_HALF {
        return None;
    }
    let comm = source.read_virt(current.checked_add(task.comm_offset)?, TASK_COMM_LEN)?;
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    let name = &comm[..end];
    if name.is_empty() {
        return None;
    }
    // The guest chose these bytes: keep them printable in the report.
    Some(
        name.iter()
            .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vCPU whose memory is a map of guest-virtual address -> bytes.
    struct Fake {
        regs: Option<(u64, u8)>,
        run: RunState,
        /// The per-CPU base, in GS (kernel mode) or the MSR (user mode).
        gs: u64,
        rbp: u64,
        memory: Vec<(u64, Vec<u8>)>,
    }

    impl SampleSource for Fake {
        fn state(&self) -> Option<CpuState> {
            let (rip, cpl) = self.regs?;
            let gs_base = if cpl == 0 { self.gs } else { 0 };
            Some(CpuState {
                rip,
                rbp: self.rbp,
                cpl,
                gs_base,
            })
        }
        fn run_state(&self) -> RunState {
            self.run
        }
        fn kernel_gs_base(&self) -> Option<u64> {
            Some(self.gs)
        }
        fn read_virt(&self, gva: u64, len: usize) -> Option<Vec<u8>> {
            self.memory.iter().find_map(|(start, bytes)| {
                let off = usize::try_from(gva.checked_sub(*start)?).ok()?;
                bytes.get(off..off + len).map(<[u8]>::to_vec)
            })
        }
    }

    const GS: u64 = 0xffff_8880_0100_0000;
    const TASK: u64 = 0xffff_8880_0200_0000;

    fn symbols() -> KernelSymbols {
        let mut s = KernelSymbols::default();
        s.current_task = Some(CurrentTask {
            percpu_offset: 0x20c40,
            comm_offset: 0x10,
        });
        s
    }

    fn guest(comm: &[u8]) -> Fake {
        let mut task = vec![0u8; 0x10];
        task.extend_from_slice(comm);
        task.resize(0x10 + TASK_COMM_LEN, 0);
        Fake {
            regs: Some((0x40_1000, 3)),
            run: RunState::Running,
            gs: GS,
            rbp: 0,
            memory: vec![(GS + 0x20c40, TASK.to_le_bytes().to_vec()), (TASK, task)],
        }
    }

    #[test]
    fn a_user_sample_names_the_running_process() {
        let key = take(&guest(b"podbox-agent"), &symbols());
        assert_eq!(key.process, "podbox-agent");
        assert_eq!(key.place, Place::User(0x40_1000));
    }

    #[test]
    fn the_run_state_wins_over_the_address_and_unknown_when_registers_fail() {
        let mut g = guest(b"swapper/0");
        g.run = RunState::Halted;
        assert_eq!(take(&g, &symbols()).place, Place::Halted);
        g.run = RunState::NotStarted;
        assert_eq!(take(&g, &symbols()).place, Place::NotStarted);
        g.regs = None;
        assert_eq!(take(&g, &symbols()).place, Place::Unknown);
    }

    #[test]
    fn a_kernel_address_without_a_symbol_is_shown_as_hex() {
        let mut g = guest(b"sh");
        g.regs = Some((0xffff_ffff_8123_4567, 0));
        let key = take(&g, &symbols());
        assert_eq!(key.place, Place::Kernel("0xffffffff81234567".into()));
        assert_eq!(key.process, "sh", "in kernel mode the base is GS's");
        g.regs = Some((0xffff_ffff_8160_0040, 3));
        assert_eq!(
            take(&g, &symbols()).place,
            Place::Kernel("0xffffffff81600040".into()),
            "user mode at a kernel address (PVM's SYSCALL entry) is kernel work"
        );
    }

    /// The guest controls the per-CPU base, the task pointer and the name:
    /// a user-half pointer, an unreadable one, or an unprintable name must
    /// give "?" or a sanitised name, never a panic or a host read.
    #[test]
    fn hostile_guest_values_give_a_placeholder() {
        let mut g = guest(b"a\x1b[2Jb\xff");
        assert_eq!(take(&g, &symbols()).process, "a?[2Jb?");
        g.gs = 0x1000;
        assert_eq!(take(&g, &symbols()).process, "?");
        let mut g = guest(b"x");
        g.memory[0].1 = 0x7fff_0000u64.to_le_bytes().to_vec();
        assert_eq!(take(&g, &symbols()).process, "?");
        let mut g = guest(b"x");
        g.memory[0].1 = u64::MAX.to_le_bytes().to_vec();
        assert_eq!(
            take(&g, &symbols()).process,
            "?",
            "overflowing task pointer"
        );
        let mut g = guest(b"x");
        g.gs = u64::MAX;
        assert_eq!(
            take(&g, &symbols()).process,
            "?",
            "overflowing per-CPU base"
        );
        let g = guest(b"");
        assert_eq!(take(&g, &symbols()).process, "?");
    }

    fn fp_symbols() -> KernelSymbols {
        let mut s = KernelSymbols::from_functions(&[
            (0xffff_ffff_8100_0000, "leaf"),
            (0xffff_ffff_8100_1000, "caller"),
            (0xffff_ffff_8100_2000, "outer"),
        ]);
        s.current_task = symbols().current_task;
        s
    }

    const STACK: u64 = 0xffff_c900_0001_0000;

    fn frame(next: u64, ret: u64) -> Vec<u8> {
        [next.to_le_bytes(), ret.to_le_bytes()].concat()
    }

    #[test]
    fn kernel_samples_carry_their_callers_from_the_frame_pointers() {
        let mut g = guest(b"sh");
        g.regs = Some((0xffff_ffff_8100_0010, 0));
        g.rbp = STACK;
        g.memory
            .push((STACK, frame(STACK + 0x40, 0xffff_ffff_8100_1234)));
        g.memory
            .push((STACK + 0x40, frame(0, 0xffff_ffff_8100_2100)));
        let key = take(&g, &fp_symbols());
        assert_eq!(key.place, Place::Kernel("leaf".into()));
        assert_eq!(key.callers, [0xffff_ffff_8100_1000, 0xffff_ffff_8100_2000]);
        // Without frame pointers (an ORC kernel) RBP is not followed.
        assert!(take(&g, &symbols()).callers.is_empty());
    }

    /// A guest can point RBP anywhere and build any chain: loops, chains
    /// going down, leaving the stack, or returning into user space stop
    /// the walk, which never exceeds MAX_FRAMES.
    #[test]
    fn hostile_frame_chains_stop_the_walk() {
        let ret = 0xffff_ffff_8100_1234;
        let mut g = guest(b"sh");
        g.regs = Some((0xffff_ffff_8100_0010, 0));
        g.rbp = STACK;
        g.memory.push((STACK, frame(STACK, ret)));
        assert_eq!(take(&g, &fp_symbols()).callers.len(), 1, "a self-loop");
        g.memory[2] = (STACK, frame(STACK - 0x40, ret));
        assert_eq!(take(&g, &fp_symbols()).callers.len(), 1, "going down");
        g.memory[2] = (STACK, frame(STACK + MAX_STACK_SPAN, ret));
        g.memory.push((
            STACK + MAX_STACK_SPAN,
            frame(STACK + MAX_STACK_SPAN + 64, ret),
        ));
        assert_eq!(take(&g, &fp_symbols()).callers.len(), 1, "off the stack");
        g.memory[2] = (STACK, frame(STACK + 64, 0x40_1000));
        assert!(take(&g, &fp_symbols()).callers.is_empty(), "a user return");
        g.rbp = STACK + 3;
        assert!(take(&g, &fp_symbols()).callers.is_empty(), "misaligned");
        // A long well-formed chain is cut at MAX_FRAMES.
        let mut g = guest(b"sh");
        g.regs = Some((0xffff_ffff_8100_0010, 0));
        g.rbp = STACK;
        for i in 0..100u64 {
            g.memory
                .push((STACK + i * 16, frame(STACK + (i + 1) * 16, ret)));
        }
        assert_eq!(take(&g, &fp_symbols()).callers.len(), MAX_FRAMES);
    }

    #[test]
    fn the_tally_is_bounded() {
        let mut t = Tally::default();
        for rip in 0..(MAX_KEYS as u64 + 100) {
            t.add(Key {
                process: format!("p{}", rip % 7),
                place: Place::User(rip),
                callers: Vec::new(),
            });
        }
        assert_eq!(t.counts.len(), MAX_KEYS + 1);
        assert_eq!(t.total(), MAX_KEYS as u64 + 100);
        assert_eq!(t.counts[&Key::other()], 100);
    }
}
