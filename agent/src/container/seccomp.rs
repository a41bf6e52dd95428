//! `linux.seccomp` of an OCI spec → seccomp BPF, built with rust-vmm's
//! seccompiler.
//!
//! The agent compiles the profile at CreateContainer (so a bad profile is an
//! INVALID_ARGUMENT with nothing started) and ships the finished programs to
//! stage 2 inside its InitConfig; stage 2 only installs them, right before
//! execve, so as few of its own syscalls as possible have to pass the filter.
//!
//! seccompiler builds one filter per (mismatch action, match action) pair,
//! while an OCI profile gives every syscall rule its own action. The kernel
//! runs every installed filter and keeps the most severe result
//! (KILL_PROCESS > KILL_THREAD > TRAP > ERRNO > TRACE > LOG > ALLOW), so the
//! profile becomes a stack:
//! - a "default" filter: every syscall that has a rule with another action
//!   → ALLOW, anything else → defaultAction (left out when that is ALLOW);
//! - one filter per other action: its syscalls → that action, else ALLOW.
//!
//! A syscall is thus refused by the default filter only if no rule names
//! it, and gets its rule's action from that action's filter.

use std::collections::BTreeMap;
use std::str::FromStr;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};

const EPERM: u32 = libc::EPERM as u32;

/// Why a profile cannot be turned into a filter; all of these are the
/// client's fault (INVALID_ARGUMENT).
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: architecture {arch} is not supported by this agent (native {native}; the filter covers only the native syscall table)")]
    UnsupportedArch { arch: String, native: &'static str },
    #[error("seccomp: {what} action {action} is not supported{why}")]
    UnsupportedAction {
        what: String,
        action: String,
        why: &'static str,
    },
    #[error("seccomp: {syscall}: argument index {index} is out of range (0-5)")]
    ArgIndex { syscall: String, index: usize },
    #[error("seccomp: building the filter for {what}: {source}")]
    Build {
        what: String,
        #[source]
        source: BackendError,
    },
}

impl From<SeccompError> for super::Error {
    fn from(e: SeccompError) -> Self {
        super::Error::InvalidArgument(e.to_string())
    }
}

/// One BPF instruction (struct sock_filter: code, jt, jf, k), in a form
/// that travels through stage 2's JSON config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Insn(pub u16, pub u8, pub u8, pub u32);

/// A compiled profile: the programs to install, in order, and the
/// seccomp(2) flags (SECCOMP_FILTER_FLAG_*) for each.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    pub flags: u32,
    pub filters: Vec<Vec<Insn>>,
}

/// The architecture the agent runs on and the other ABIs the same kernel
/// offers its processes (their syscalls cannot be described by a filter
/// for the native table: seccompiler's arch check kills them).
fn native() -> Option<(TargetArch, Arch, &'static [Arch])> {
    #[cfg(target_arch = "x86_64")]
    return Some((
        TargetArch::x86_64,
        Arch::ScmpArchX86_64,
        &[Arch::ScmpArchX86, Arch::ScmpArchX32],
    ));
    #[cfg(target_arch = "aarch64")]
    return Some((
        TargetArch::aarch64,
        Arch::ScmpArchAarch64,
        &[Arch::ScmpArchArm],
    ));
    #[cfg(target_arch = "riscv64")]
    return Some((TargetArch::riscv64, Arch::ScmpArchRiscv64, &[]));
    #[allow(unreachable_code)]
    None
}

/// OCI action → seccompiler action. `errno` is the rule's errnoRet.
fn action(
    what: &str,
    a: LinuxSeccompAction,
    errno: Option<u32>,
) -> Result<SeccompAction, SeccompError> {
    use LinuxSeccompAction::*;
    Ok(match a {
        ScmpActAllow => SeccompAction::Allow,
        // runc's default when errnoRet is absent.
        ScmpActErrno => SeccompAction::Errno(errno.unwrap_or(EPERM)),
        // libseccomp's SCMP_ACT_KILL is SECCOMP_RET_KILL_THREAD.
        ScmpActKill | ScmpActKillThread => SeccompAction::KillThread,
        ScmpActKillProcess => SeccompAction::KillProcess,
        ScmpActTrap => SeccompAction::Trap,
        ScmpActLog => SeccompAction::Log,
        // Nothing in the guest ptraces containers: without a tracer the
        // kernel fails the syscall with ENOSYS. The data is errnoRet (or
        // EPERM), as runc passes it.
        ScmpActTrace => SeccompAction::Trace(errno.unwrap_or(EPERM)),
        ScmpActNotify => {
            return Err(SeccompError::UnsupportedAction {
                what: what.to_string(),
                action: a.to_string(),
                why: " (there is no seccomp notify listener in the guest)",
            })
        }
    })
}

fn op(a: &LinuxSeccompArg) -> SeccompCmpOp {
    use LinuxSeccompOperator::*;
    match a.op() {
        ScmpCmpNe => SeccompCmpOp::Ne,
        ScmpCmpLt => SeccompCmpOp::Lt,
        ScmpCmpLe => SeccompCmpOp::Le,
        ScmpCmpEq => SeccompCmpOp::Eq,
        ScmpCmpGe => SeccompCmpOp::Ge,
        ScmpCmpGt => SeccompCmpOp::Gt,
        // OCI: (arg & value) == valueTwo; seccompiler: (arg & mask) == value.
        ScmpCmpMaskedEq => SeccompCmpOp::MaskedEq(a.value()),
    }
}

/// A syscall's rules for one action: `None` matches on the number alone.
type Rules = BTreeMap<i64, Option<Vec<SeccompRule>>>;

/// The args of one OCI syscall entry → seccompiler rules (`None`: no args).
fn rules_for(
    name: &str,
    args: &[LinuxSeccompArg],
) -> Result<Option<Vec<SeccompRule>>, SeccompError> {
    if args.is_empty() {
        return Ok(None);
    }
    let mut conds = Vec::with_capacity(args.len());
    for a in args {
        if a.index() > 5 {
            return Err(SeccompError::ArgIndex {
                syscall: name.to_string(),
                index: a.index(),
            });
        }
        let value = match a.op() {
            LinuxSeccompOperator::ScmpCmpMaskedEq => a.value_two().unwrap_or(0),
            _ => a.value(),
        };
        // Qword: OCI values are 64-bit, as libseccomp compares them.
        let c = SeccompCondition::new(a.index() as u8, SeccompCmpArgLen::Qword, op(a), value)
            .map_err(|source| SeccompError::Build {
                what: name.to_string(),
                source,
            })?;
        conds.push(c);
    }
    // runc's semantics (from libseccomp's limits): conditions on distinct
    // arguments are ANDed; if an argument repeats they are ORed, one rule
    // each. Profiles (Docker's personality, clone) are written for that.
    let mut idx: Vec<usize> = args.iter().map(|a| a.index()).collect();
    idx.sort_unstable();
    idx.dedup();
    let rules = if idx.len() == args.len() {
        vec![SeccompRule::new(conds)]
    } else {
        conds
            .into_iter()
            .map(|c| SeccompRule::new(vec![c]))
            .collect()
    };
    rules
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(|source| SeccompError::Build {
            what: name.to_string(),
            source,
        })
}

/// Adds `rules` for syscall `nr`; an unconditional match absorbs the rest.
fn merge(into: &mut Rules, nr: i64, rules: &Option<Vec<SeccompRule>>) {
    match (into.get_mut(&nr), rules) {
        (None, r) => {
            into.insert(nr, r.clone());
        }
        (Some(slot), None) => *slot = None,
        (Some(None), Some(_)) => {}
        (Some(Some(v)), Some(r)) => v.extend(r.iter().cloned()),
    }
}

fn build(
    what: &str,
    rules: &Rules,
    mismatch: SeccompAction,
    on_match: SeccompAction,
    arch: TargetArch,
) -> Result<Vec<Insn>, SeccompError> {
    let rules = rules
        .iter()
        .map(|(nr, r)| (*nr, r.clone().unwrap_or_default()))
        .collect();
    let err = |source| SeccompError::Build {
        what: what.to_string(),
        source,
    };
    let prog: BpfProgram = SeccompFilter::new(rules, mismatch, on_match, arch)
        .map_err(err)?
        .try_into()
        .map_err(err)?;
    Ok(prog
        .into_iter()
        .map(|i| Insn(i.code, i.jt, i.jf, i.k))
        .collect())
}

/// x86_64 only: x32 syscalls carry AUDIT_ARCH_X86_64 too (with bit 30 set
/// in the number), so the arch check lets them through and no rule matches
/// their numbers: a default-allow profile would let `mkdir` through as x32.
/// Kill them, as the filters do for the i386 ABI.
#[cfg(target_arch = "x86_64")]
fn x32_guard() -> Vec<Insn> {
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jge = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    vec![
        Insn(ld, 0, 0, 0), // seccomp_data.nr
        Insn(jge, 0, 1, X32_SYSCALL_BIT),
        Insn(ret, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        Insn(ret, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Compiles `profile` for the native architecture. Unknown syscall names
/// are skipped (profiles list syscalls of many kernels and arches).
pub fn compile(profile: &LinuxSeccomp) -> Result<Program, SeccompError> {
    let (arch, native_arch, compat) = native().ok_or(SeccompError::UnsupportedArch {
        arch: std::env::consts::ARCH.to_string(),
        native: std::env::consts::ARCH,
    })?;
    for a in profile.architectures().iter().flatten() {
        if *a == Arch::ScmpArchNative || *a == native_arch {
            continue;
        }
        if compat.contains(a) {
            log::debug!("seccomp: {a} listed: syscalls through that ABI are killed (the filter covers the native table only)");
            continue;
        }
        return Err(SeccompError::UnsupportedArch {
            arch: a.to_string(),
            native: std::env::consts::ARCH,
        });
    }

    let default = action(
        "defaultAction",
        profile.default_action(),
        profile.default_errno_ret(),
    )?;
    // Every syscall with a rule whose action differs from the default
    // (the default filter lets these pass) and the rules by action.
    let mut listed = Rules::new();
    let mut by_action: Vec<(SeccompAction, Rules)> = Vec::new();
    for (i, sc) in profile.syscalls().iter().flatten().enumerate() {
        let what = format!("syscalls[{i}] ({})", sc.names().join(","));
        let act = action(&what, sc.action(), sc.errno_ret())?;
        let rules = rules_for(&what, sc.args().as_deref().unwrap_or_default())?;
        if act == default {
            // Same as not listing it (libseccomp refuses such rules).
            continue;
        }
        let slot = match by_action.iter().position(|(a, _)| *a == act) {
            Some(p) => p,
            None => {
                by_action.push((act, Rules::new()));
                by_action.len() - 1
            }
        };
        for name in sc.names() {
            let Ok(nr) = syscalls::Sysno::from_str(name) else {
                log::debug!(
                    "seccomp: syscall {name:?} does not exist on {}, skipped",
                    std::env::consts::ARCH
                );
                continue;
            };
            let nr = i64::from(nr.id());
            merge(&mut listed, nr, &rules);
            merge(&mut by_action[slot].1, nr, &rules);
        }
    }

    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        filters.push(build(
            "defaultAction",
            &listed,
            default.clone(),
            SeccompAction::Allow,
            arch,
        )?);
    }
    for (act, rules) in &by_action {
        if *act != SeccompAction::Allow && !rules.is_empty() {
            filters.push(build(
                &format!("action {act:?}"),
                rules,
                SeccompAction::Allow,
                act.clone(),
                arch,
            )?);
        }
    }
    #[cfg(target_arch = "x86_64")]
    if !filters.is_empty() {
        filters.push(x32_guard());
    }

    let mut flags = 0;
    for f in profile.flags().iter().flatten() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
        } as u32;
    }
    Ok(Program { flags, filters })
}

/// Installs `prog` in the calling process (stage 2, just before execve).
/// The caller has set no_new_privs or holds CAP_SYS_ADMIN, as the kernel
/// requires. Not seccompiler::apply_filter: that always sets
/// no_new_privs, which the spec may not ask for.
pub fn install(prog: &Program) -> std::io::Result<()> {
    for f in &prog.filters {
        let insns: Vec<libc::sock_filter> = f
            .iter()
            .map(|i| libc::sock_filter {
                code: i.0,
                jt: i.1,
                jf: i.2,
                k: i.3,
            })
            .collect();
        let fprog = libc::sock_fprog {
            len: insns.len() as u16,
            filter: insns.as_ptr() as *mut _,
        };
        // SAFETY: fprog points at `insns`, alive for the call; the kernel
        // copies the program.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                prog.flags as libc::c_ulong,
                &fprog as *const _,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn errno_defaults_to_eperm_and_default_allow_needs_no_default_filter() {
        let p = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
        })))
        .unwrap();
        // errno filter + x32 guard on x86_64.
        let expect_errno = SECCOMP_RET_ERRNO_EPERM;
        assert!(
            p.filters[0].iter().any(|i| i.3 == expect_errno),
            "{:?}",
            p.filters[0]
        );
        assert!(p.filters.len() <= 2);
    }
    const SECCOMP_RET_ERRNO_EPERM: u32 = libc::SECCOMP_RET_ERRNO | 1;

    #[test]
    fn errno_ret_and_default_errno_ret_are_used() {
        let p = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                         {"names": ["read"], "action": "SCMP_ACT_ALLOW"}]
        })))
        .unwrap();
        assert!(p.filters[0]
            .iter()
            .any(|i| i.3 == libc::SECCOMP_RET_ERRNO | 38));
        assert!(p.filters[1]
            .iter()
            .any(|i| i.3 == libc::SECCOMP_RET_ERRNO | 13));
    }

    #[test]
    fn unknown_names_are_skipped() {
        let p = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["no_such_syscall_42"], "action": "SCMP_ACT_KILL"}]
        })))
        .unwrap();
        assert!(p.filters.is_empty(), "{p:?}");
        assert_eq!(
            action("x", LinuxSeccompAction::ScmpActKill, None).unwrap(),
            SeccompAction::KillThread
        );
        assert_eq!(
            action("x", LinuxSeccompAction::ScmpActTrace, Some(5)).unwrap(),
            SeccompAction::Trace(5)
        );
    }

    #[test]
    fn arg_ops_are_translated() {
        let arg = |op: &str, v: u64, v2: Option<u64>| -> LinuxSeccompArg {
            serde_json::from_value(
                serde_json::json!({"index": 1, "value": v, "valueTwo": v2, "op": op}),
            )
            .unwrap()
        };
        for (name, want) in [
            ("SCMP_CMP_NE", SeccompCmpOp::Ne),
            ("SCMP_CMP_LT", SeccompCmpOp::Lt),
            ("SCMP_CMP_LE", SeccompCmpOp::Le),
            ("SCMP_CMP_EQ", SeccompCmpOp::Eq),
            ("SCMP_CMP_GE", SeccompCmpOp::Ge),
            ("SCMP_CMP_GT", SeccompCmpOp::Gt),
            ("SCMP_CMP_MASKED_EQ", SeccompCmpOp::MaskedEq(0xff)),
        ] {
            assert_eq!(op(&arg(name, 0xff, Some(2))), want, "{name}");
        }
        // MaskedEq compares against valueTwo; others against value.
        let masked = rules_for("x", &[arg("SCMP_CMP_MASKED_EQ", 0xff, Some(2))])
            .unwrap()
            .unwrap();
        let want =
            SeccompCondition::new(1, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(0xff), 2)
                .unwrap();
        assert_eq!(masked, vec![SeccompRule::new(vec![want]).unwrap()]);
        // The same argument twice: ORed, one rule each.
        let two = rules_for(
            "x",
            &[arg("SCMP_CMP_EQ", 1, None), arg("SCMP_CMP_EQ", 2, None)],
        )
        .unwrap()
        .unwrap();
        assert_eq!(two.len(), 2);
        let bad: LinuxSeccompArg = serde_json::from_value(
            serde_json::json!({"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}),
        )
        .unwrap();
        assert!(matches!(
            rules_for("x", &[bad]),
            Err(SeccompError::ArgIndex { index: 6, .. })
        ));
    }

    #[test]
    fn unsupported_arch_and_notify_are_rejected() {
        let e = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_S390X"]
        })))
        .unwrap_err();
        assert!(e.to_string().contains("SCMP_ARCH_S390X"), "{e}");
        let e = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]
        })))
        .unwrap_err();
        assert!(e.to_string().contains("SCMP_ACT_NOTIFY"), "{e}");
    }
}
