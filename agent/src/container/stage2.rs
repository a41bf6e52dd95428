//! Stage 2: this binary re-executed inside the new container's namespaces
//! (see spawn.rs). Single-threaded, so it may change its mount namespace
//! and credentials freely. It reads its InitConfig from the sync socket
//! (fd 3), sets everything up, reports "ok", waits for the start byte and
//! execs the program. Errors go back over the socket as "err <message>".

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sched::{setns, unshare, CloneFlags};
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{PosixRlimitType, Process as OciProcess};

use super::{mounts, seccomp, InitConfig, InitMode};

/// argv[1] that selects stage 2.
pub const ARG: &str = "__podbox_stage2";
/// The sync socket's descriptor number in stage 2.
pub const SYNC_FD: i32 = 3;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

type R<T> = Result<T, String>;

/// Runs stage 2; only returns (an exit code) if it could not exec.
pub fn run() -> i32 {
    // SAFETY: spawn.rs put the sync socket on this descriptor and nothing
    // else in this process owns it.
    let mut sock = unsafe { UnixStream::from_raw_fd(SYNC_FD) };
    let exec = match prepare(&mut sock) {
        Ok(e) => e,
        Err(msg) => {
            let _ = writeln!(sock, "err {msg}");
            return 1;
        }
    };
    if writeln!(sock, "ok").is_err() {
        return 1;
    }
    let mut b = [0u8; 2];
    if sock.read_exact(&mut b).is_err() {
        // The agent gave up on this container (e.g. removed before start).
        return 1;
    }
    // The agent reads EOF on the socket as "exec succeeded".
    // SAFETY: plain fcntl on our own descriptor.
    unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    // Rust's start-up ignores SIGPIPE in this process; the container's
    // program gets the default disposition, as under runc.
    // SAFETY: plain signal(2) of a default disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // Last step before execve (as runc): from here on only execve, and the
    // error report if it fails, must pass the container's filter.
    if let Some(prog) = &exec.seccomp {
        if let Err(e) = seccomp::install(prog) {
            let _ = writeln!(sock, "err install seccomp filter: {e}");
            return 1;
        }
    }
    let err = nix::unistd::execve(&exec.path, &exec.argv, &exec.env).unwrap_err();
    let _ = writeln!(sock, "err exec {:?}: {err}", exec.path);
    127
}

struct Exec {
    path: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    seccomp: Option<seccomp::Program>,
}

fn prepare(sock: &mut UnixStream) -> R<Exec> {
    // Whatever the agent had open without O_CLOEXEC when it spawned us
    // (a pty another container's setup had not marked yet, say) closes at
    // our execve: a container gets stdio and nothing of its neighbours'.
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets flags.
    let marked = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (SYNC_FD + 1) as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if marked != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("mark inherited descriptors close-on-exec: {e}"));
    }
    let mut line = String::new();
    BufReader::new(&*sock)
        .read_line(&mut line)
        .map_err(|e| format!("read config: {e}"))?;
    let cfg: InitConfig = serde_json::from_str(&line).map_err(|e| format!("decode config: {e}"))?;
    match &cfg.mode {
        InitMode::Create { rootfs, spec } => {
            unshare(CloneFlags::CLONE_NEWNS)
                .map_err(|e| format!("unshare mount namespace: {e}"))?;
            // We are already in the container's cgroup: a cgroup namespace
            // makes that group the root of what the container sees.
            let _ = unshare(CloneFlags::CLONE_NEWCGROUP);
            mounts::setup_rootfs(rootfs, spec)?;
        }
        InitMode::Exec { target_pid } => {
            for (ns, flag) in [
                ("cgroup", CloneFlags::CLONE_NEWCGROUP),
                ("mnt", CloneFlags::CLONE_NEWNS),
            ] {
                let path = format!("/proc/{target_pid}/ns/{ns}");
                let f = File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
                setns(&f, flag).map_err(|e| format!("setns {path}: {e}"))?;
            }
        }
    }
    let mut exec = setup_process(&cfg.process)?;
    if let Some(prog) = cfg.seccomp.filter(|p| !p.filters.is_empty()) {
        // The kernel only takes a filter from a process with no_new_privs
        // or CAP_SYS_ADMIN; set no_new_privs (as runc) only when needed,
        // since it also disables setuid binaries in the container.
        let admin = caps::has_cap(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_SYS_ADMIN,
        )
        .map_err(|e| format!("read capabilities: {e}"))?;
        if !admin {
            set_no_new_privs()?;
        }
        exec.seccomp = Some(prog);
    }
    Ok(exec)
}

fn set_no_new_privs() -> R<()> {
    // SAFETY: plain prctl.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn cstring(s: &str) -> R<CString> {
    CString::new(s).map_err(|_| format!("{s:?} contains NUL"))
}

/// Finds `prog` the way execvp would, with the container's PATH.
fn resolve(prog: &str, env: &[String]) -> R<PathBuf> {
    let executable =
        |p: &Path| nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok() && p.is_file();
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return if executable(&p) {
            Ok(p)
        } else {
            Err(format!("{prog:?} is not an executable file"))
        };
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let cand = Path::new(dir).join(prog);
        if executable(&cand) {
            return Ok(cand);
        }
    }
    Err(format!("executable {prog:?} not found in PATH {path:?}"))
}

fn rlimit_resource(t: PosixRlimitType) -> libc::__rlimit_resource_t {
    use PosixRlimitType::*;
    match t {
        RlimitCpu => libc::RLIMIT_CPU,
        RlimitFsize => libc::RLIMIT_FSIZE,
        RlimitData => libc::RLIMIT_DATA,
        RlimitStack => libc::RLIMIT_STACK,
        RlimitCore => libc::RLIMIT_CORE,
        RlimitRss => libc::RLIMIT_RSS,
        RlimitNproc => libc::RLIMIT_NPROC,
        RlimitNofile => libc::RLIMIT_NOFILE,
        RlimitMemlock => libc::RLIMIT_MEMLOCK,
        RlimitAs => libc::RLIMIT_AS,
        RlimitLocks => libc::RLIMIT_LOCKS,
        RlimitSigpending => libc::RLIMIT_SIGPENDING,
        RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        RlimitNice => libc::RLIMIT_NICE,
        RlimitRtprio => libc::RLIMIT_RTPRIO,
        RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

fn to_caps(set: &Option<oci_spec::runtime::Capabilities>) -> R<HashSet<caps::Capability>> {
    let mut out = HashSet::new();
    for c in set.iter().flatten() {
        // oci-spec serialises capabilities as "CAP_*", the form caps parses.
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let cap = name
            .parse()
            .map_err(|_| format!("unknown capability {name:?}"))?;
        out.insert(cap);
    }
    Ok(out)
}

fn setup_process(p: &OciProcess) -> R<Exec> {
    let env: Vec<String> = p.env().clone().unwrap_or_default();
    let args = p.args().clone().unwrap_or_default();
    let prog = args.first().ok_or("process.args is empty")?;

    nix::unistd::chdir(p.cwd()).map_err(|e| format!("chdir {}: {e}", p.cwd().display()))?;
    let path = resolve(prog, &env)?;
    let exec = Exec {
        path: CString::new(path.as_os_str().as_bytes())
            .map_err(|_| "path contains NUL".to_string())?,
        argv: args.iter().map(|a| cstring(a)).collect::<R<_>>()?,
        env: env.iter().map(|a| cstring(a)).collect::<R<_>>()?,
        seccomp: None,
    };

    for rl in p.rlimits().iter().flatten() {
        let lim = libc::rlimit {
            rlim_cur: rl.soft(),
            rlim_max: rl.hard(),
        };
        // SAFETY: setrlimit reads one rlimit struct.
        if unsafe { libc::setrlimit(rlimit_resource(rl.typ()), &lim) } != 0 {
            return Err(format!(
                "setrlimit {}: {}",
                rl.typ(),
                std::io::Error::last_os_error()
            ));
        }
    }
    if let Some(adj) = p.oom_score_adj() {
        // Best effort: lowering the score needs privileges the agent may
        // not have (e.g. on a test host).
        let _ = std::fs::write("/proc/self/oom_score_adj", adj.to_string());
    }
    if p.terminal().unwrap_or(false) {
        nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
        // SAFETY: TIOCSCTTY on our stdin, which spawn.rs made the pty slave.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
            return Err(format!(
                "set controlling terminal: {}",
                std::io::Error::last_os_error()
            ));
        }
        if let Some(sz) = p.console_size() {
            let ws = libc::winsize {
                ws_row: sz.height() as u16,
                ws_col: sz.width() as u16,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads one winsize.
            unsafe { libc::ioctl(0, libc::TIOCSWINSZ, &ws) };
        }
    }
    set_credentials(p)?;
    if p.no_new_privileges().unwrap_or(false) {
        set_no_new_privs()?;
    }
    Ok(exec)
}

/// Groups, gid, uid, then capabilities. Capabilities are kept across the
/// uid change (PR_SET_KEEPCAPS) and then set to exactly the spec's sets.
fn set_credentials(p: &OciProcess) -> R<()> {
    let caps_spec = p.capabilities().as_ref();
    if let Some(c) = caps_spec {
        let bounding = to_caps(c.bounding())?;
        for cap in caps::all() {
            if !bounding.contains(&cap) {
                caps::drop(None, caps::CapSet::Bounding, cap)
                    .map_err(|e| format!("drop bounding {cap}: {e}"))?;
            }
        }
    }
    // SAFETY: plain prctl.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let user = p.user();
    let groups: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups {groups:?}: {e}"))?;
    let gid = Gid::from_raw(user.gid());
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setgid {gid}: {e}"))?;
    let uid = Uid::from_raw(user.uid());
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setuid {uid}: {e}"))?;
    // SAFETY: plain prctl.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    if let Some(c) = caps_spec {
        let set = |which, caps: &Option<oci_spec::runtime::Capabilities>| -> R<()> {
            caps::set(None, which, &to_caps(caps)?)
                .map_err(|e| format!("set {which:?} capabilities: {e}"))
        };
        // Order matters to capset(2): inheritable may only grow while
        // permitted is still full, effective must stay within permitted
        // when permitted shrinks, and ambient needs both.
        set(caps::CapSet::Inheritable, c.inheritable())?;
        set(caps::CapSet::Effective, c.effective())?;
        set(caps::CapSet::Permitted, c.permitted())?;
        // Ambient: one clear, then the spec's raised. caps::set would probe
        // and lower every capability, one prctl each (80 syscalls, guest
        // kernel work that PVM hosts emulate).
        caps::clear(None, caps::CapSet::Ambient)
            .map_err(|e| format!("clear ambient capabilities: {e}"))?;
        for cap in to_caps(c.ambient())? {
            caps::raise(None, caps::CapSet::Ambient, cap)
                .map_err(|e| format!("raise ambient {cap}: {e}"))?;
        }
    }
    Ok(())
}
