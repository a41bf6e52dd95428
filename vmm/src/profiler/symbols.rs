//! The guest kernel's symbols, from the ELF symbol table of the vmlinux the
//! VMM boots: kernel functions for the samples, and the few data symbols
//! that lead from a vCPU to the process it runs.

use std::path::Path;

use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};

/// Where x86_64 Linux maps its image (`__START_KERNEL_map`); symbols below
/// it are per-CPU offsets or absolute values, never code.
const KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// The name the kernel's first task carries (`INIT_TASK_COMM`); finding it
/// in `init_task`'s initial bytes gives `task_struct.comm`'s offset.
const INIT_TASK_COMM: &[u8] = b"swapper\0";

#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not an ELF file the profiler can read: {source}")]
    Parse {
        path: String,
        source: object::read::Error,
    },
    #[error("{path}: no function symbols (a stripped vmlinux?)")]
    Stripped { path: String },
}

/// Kernel functions by address, and how to find the running task.
#[derive(Debug, Default)]
pub struct KernelSymbols {
    /// (start address, name), sorted by address.
    functions: Vec<(u64, String)>,
    /// The end of the executable sections: no function lies beyond it
    /// (modules, BPF JIT, fixmap addresses are not kernel text).
    text_end: u64,
    pub current_task: Option<CurrentTask>,
    /// The kernel keeps frame pointers (it has no ORC unwind table, whose
    /// kernels use RBP as a plain register): stacks can be walked.
    pub frame_pointers: bool,
}

/// Where the running task's pointer sits in each CPU's per-CPU area, and
/// where its name sits in a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CurrentTask {
    /// `pcpu_hot.current_task` (6.2+, its first field) or `current_task`:
    /// an offset from the CPU's per-CPU base (GS in the kernel).
    pub percpu_offset: u64,
    /// `task_struct.comm` (16 bytes).
    pub comm_offset: u64,
}

impl KernelSymbols {
    pub fn load(path: &Path) -> Result<Self, SymbolError> {
        let name = path.display().to_string();
        let data = std::fs::read(path).map_err(|source| SymbolError::Read {
            path: name.clone(),
            source,
        })?;
        let symbols = Self::parse(&data).map_err(|source| SymbolError::Parse {
            path: name.clone(),
            source,
        })?;
        if symbols.functions.is_empty() {
            return Err(SymbolError::Stripped { path: name });
        }
        Ok(symbols)
    }

    /// Every symbol in an executable section at or above the kernel map
    /// (typed functions and the untyped assembly entry points alike).
    pub fn parse(data: &[u8]) -> Result<Self, object::read::Error> {
        let file = object::File::parse(data)?;
        let mut functions = Vec::new();
        let mut percpu_current = None;
        let mut plain_current = None;
        let mut init_task = None;
        let mut orc = false;
        for sym in file.symbols() {
            let Ok(name) = sym.name() else { continue };
            match name {
                "__start_orc_unwind_ip" => orc = true,
                "pcpu_hot" => percpu_current = Some(sym.address()),
                "current_task" => plain_current = Some(sym.address()),
                "init_task" => init_task = Some((sym.address(), sym.size(), sym.section_index())),
                _ => {}
            }
            let in_text = sym
                .section_index()
                .and_then(|i| file.section_by_index(i).ok())
                .is_some_and(|s| s.kind() == SectionKind::Text);
            let is_code = matches!(sym.kind(), SymbolKind::Text | SymbolKind::Unknown);
            if in_text && is_code && sym.address() >= KERNEL_MAP && !name.is_empty() {
                functions.push((sym.address(), name.to_owned()));
            }
        }
        functions.sort_unstable();
        functions.dedup_by_key(|(addr, _)| *addr);
        let text_end = file
            .sections()
            .filter(|s| s.kind() == SectionKind::Text)
            .map(|s| s.address().saturating_add(s.size()))
            .max()
            .unwrap_or(0);
        let comm_offset = init_task.and_then(|(addr, size, section)| {
            let section = file.section_by_index(section?).ok()?;
            let bytes = section.data_range(addr, size.min(64 * 1024)).ok()??;
            find(bytes, INIT_TASK_COMM)
        });
        let current_task = match (percpu_current.or(plain_current), comm_offset) {
            (Some(percpu_offset), Some(comm_offset)) => Some(CurrentTask {
                percpu_offset,
                comm_offset: comm_offset as u64,
            }),
            _ => None,
        };
        Ok(Self {
            frame_pointers: !orc && !functions.is_empty(),
            functions,
            text_end,
            current_task,
        })
    }

    /// The function `addr` lies in: the nearest symbol at or below it.
    pub fn function(&self, addr: u64) -> Option<&str> {
        self.index(addr).map(|i| self.functions[i].1.as_str())
    }

    /// The start of the function `addr` lies in.
    pub fn function_start(&self, addr: u64) -> Option<u64> {
        self.index(addr).map(|i| self.functions[i].0)
    }

    fn index(&self, addr: u64) -> Option<usize> {
        if addr < KERNEL_MAP || addr >= self.text_end {
            return None;
        }
        let i = self.functions.partition_point(|(start, _)| *start <= addr);
        i.checked_sub(1)
    }

    pub fn len(&self) -> usize {
        self.functions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.functions.is_empty()
    }
}

#[cfg(test)]
impl KernelSymbols {
    /// A frame-pointer kernel with these (sorted) functions, for tests.
    pub fn from_functions(functions: &[(u64, &str)]) -> Self {
        KernelSymbols {
            functions: functions.iter().map(|&(a, n)| (a, n.to_owned())).collect(),
            // As if text ended 64 KiB after the last function.
            text_end: functions.last().map_or(0, |&(a, _)| a + 0x1_0000),
            current_task: None,
            frame_pointers: true,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_belongs_to_the_symbol_at_or_below_it() {
        let s = KernelSymbols::from_functions(&[
            (0xffff_ffff_8100_0000, "_text"),
            (0xffff_ffff_8100_0100, "start_kernel"),
            (0xffff_ffff_8100_0200, "memset"),
        ]);
        assert_eq!(s.function(0xffff_ffff_8100_0100), Some("start_kernel"));
        assert_eq!(s.function(0xffff_ffff_8100_01ff), Some("start_kernel"));
        assert_eq!(s.function(0xffff_ffff_8100_0fff), Some("memset"));
        assert_eq!(s.function(0xffff_ffff_80ff_ffff), None, "below the first");
        assert_eq!(s.function(0x40_1000), None, "a user address");
        assert_eq!(s.function(0xffff_ffff_a000_0000), None, "past kernel text");
        assert_eq!(
            s.function_start(0xffff_ffff_8100_01ff),
            Some(0xffff_ffff_8100_0100)
        );
    }

    #[test]
    fn garbage_is_a_parse_error_not_a_panic() {
        assert!(KernelSymbols::parse(b"\x7fELF\x02\x01\x01garbage").is_err());
        assert!(KernelSymbols::parse(&[]).is_err());
    }

    /// The test binary itself is an ELF file with a symbol table: parsing
    /// it must not fail (its functions are below the kernel map, so none
    /// are taken, and it has no init_task).
    #[test]
    fn a_user_elf_has_no_kernel_functions() {
        let me = std::fs::read("/proc/self/exe").unwrap();
        let s = KernelSymbols::parse(&me).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.current_task, None);
    }
}
