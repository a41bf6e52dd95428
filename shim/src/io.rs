//! A process's stdio between containerd and the agent.
//!
//! containerd names each stream by a FIFO path, a `file:///path` or a
//! `binary:///path?args` log URI. Each stream is copied by its own thread
//! with blocking agent calls (ReadStdout/ReadStderr block until data, an
//! empty read is end of stream; the agent drains a process's output to EOF
//! after it exits), so an output thread ends only when everything the
//! process wrote has been delivered: the task's exit is published after
//! these threads are joined, and nothing is lost at exit.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use podbox_agent_client::ctx;
use podbox_protocol::agent::{CloseStdinRequest, ReadStreamRequest, WriteStreamRequest};
use thiserror::Error;

use crate::agent::Agent;

/// A read or write on a stream may block as long as the process lives.
const STREAM_CALL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const CHUNK: u32 = 64 * 1024;
/// How long a `binary://` logger gets to signal that it is ready.
const LOGGER_READY_LIMIT_MS: u16 = 10_000;

#[derive(Debug, Error)]
pub enum IoError {
    #[error("{what} {path}: {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("log URI {uri:?}: {reason}")]
    Uri { uri: String, reason: String },
    #[error("starting logging binary {path}: {source}")]
    Logger {
        path: String,
        source: std::io::Error,
    },
}

/// The three streams containerd gave for one process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Which process of which container the streams belong to.
#[derive(Clone)]
pub struct Target {
    pub agent: Arc<dyn Agent>,
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub namespace: String,
}

/// The running copy threads of one process.
pub struct ProcessIo {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<StdinCopy>,
    logger: Option<std::process::Child>,
}

struct StdinCopy {
    path: String,
    /// Set once the FIFO is open: from then on closing our side is not needed to unblock it.
    opened: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    /// CloseIO arrived: close the process's stdin once the FIFO is drained.
    close_requested: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// How often the stdin copy looks for a CloseIO while the FIFO is idle.
const STDIN_IDLE_POLL_MS: i32 = 50;

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

impl ProcessIo {
    /// Opens the destinations and starts the copy threads.
    pub fn start(target: &Target, paths: &StdioPaths) -> Result<ProcessIo, IoError> {
        let mut logger = None;
        let (stdout_sink, stderr_sink) = if paths.stdout.starts_with("binary://") {
            let (child, out, err) = spawn_logger(&paths.stdout, target)?;
            logger = Some(child);
            (Some(out), Some(err))
        } else {
            (
                open_sink(&paths.stdout)?,
                if paths.terminal {
                    None
                } else {
                    open_sink(&paths.stderr)?
                },
            )
        };
        let mut outputs = vec![copy_output(target.clone(), Stream::Stdout, stdout_sink)];
        // With a terminal, stdout carries the pty and stderr is always empty.
        if !paths.terminal {
            outputs.push(copy_output(target.clone(), Stream::Stderr, stderr_sink));
        }
        let stdin =
            (!paths.stdin.is_empty()).then(|| copy_stdin(target.clone(), paths.stdin.clone()));
        Ok(ProcessIo {
            outputs,
            stdin,
            logger,
        })
    }

    /// CloseIO for stdin. Returns false when no stdin copy runs (the
    /// caller closes the process's stdin in the agent itself).
    ///
    /// The copy closes stdin in the agent once it has forwarded everything
    /// the client wrote: clients (ctr) send CloseIO right after their last
    /// write, with that data still in the FIFO or in a WriteStdin call, so
    /// closing the agent's side here at once would cut the input short.
    pub fn request_stdin_close(&self) -> bool {
        let Some(stdin) = self.stdin.as_ref() else {
            return false;
        };
        stdin.close_requested.store(true, Ordering::SeqCst);
        if !stdin.opened.load(Ordering::SeqCst) {
            // No client ever opened the FIFO: unblock the copy's open(2);
            // it then reads EOF and closes stdin.
            let _ = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&stdin.path);
        }
        true
    }

    /// Waits for the output threads (the process has exited: the agent
    /// answers end of stream once its output is drained), at most `limit`
    /// (they cannot end when the VM is gone and the calls hang).
    pub fn finish(&mut self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        for thread in self.outputs.drain(..) {
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!("an output copy did not finish within {limit:?}; leaving it");
            }
        }
        if let Some(stdin) = self.stdin.take() {
            stdin.done.store(true, Ordering::SeqCst);
            if !stdin.opened.load(Ordering::SeqCst) {
                // The copy thread still waits in open(2) for a writer that
                // will never come: become that writer for a moment.
                let _ = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&stdin.path);
            }
            if stdin.thread.is_finished() {
                let _ = stdin.thread.join();
            }
        }
        if let Some(mut logger) = self.logger.take() {
            // The logging binary sees EOF on both pipes now and exits by itself.
            let _ = logger.wait();
        }
    }
}

/// Where an output stream goes; None discards it (it is still drained, or
/// the process would block once the agent's buffer is full).
fn open_sink(uri: &str) -> Result<Option<File>, IoError> {
    if uri.is_empty() {
        return Ok(None);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        if let Some(parent) = std::path::Path::new(path).parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| IoError::Open {
                what: "opening log file",
                path: path.to_string(),
                source,
            })?;
        return Ok(Some(file));
    }
    if uri.contains("://") && !uri.starts_with("fifo://") {
        return Err(IoError::Uri {
            uri: uri.to_string(),
            reason: "only FIFO paths, file:// and binary:// are supported".into(),
        });
    }
    let path = uri.strip_prefix("fifo://").unwrap_or(uri);
    // Read-write, as containerd's own shims do: the open never blocks and a
    // reader that goes away does not make our writes fail.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| IoError::Open {
            what: "opening output FIFO",
            path: path.to_string(),
            source,
        })?;
    Ok(Some(file))
}

fn copy_output(target: Target, stream: Stream, mut sink: Option<File>) -> JoinHandle<()> {
    std::thread::spawn(move || loop {
        let request = ReadStreamRequest {
            container_id: target.container_id.clone(),
            exec_id: target.exec_id.clone(),
            len: CHUNK,
            ..Default::default()
        };
        let result = match stream {
            Stream::Stdout => target.agent.read_stdout(ctx(STREAM_CALL_TIMEOUT), &request),
            Stream::Stderr => target.agent.read_stderr(ctx(STREAM_CALL_TIMEOUT), &request),
        };
        match result {
            Ok(response) if response.data.is_empty() => return,
            Ok(response) => {
                if let Some(file) = sink.as_mut() {
                    if let Err(e) = file.write_all(&response.data) {
                        tracing::warn!(container = %target.container_id, exec = %target.exec_id, "writing output: {e}; discarding the rest");
                        sink = None;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(container = %target.container_id, exec = %target.exec_id, "output stream ended: {e}");
                return;
            }
        }
    })
}

/// Copies the stdin FIFO to the process until the writer closes it, then
/// closes the process's stdin.
fn copy_stdin(target: Target, path: String) -> StdinCopy {
    let opened = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let close_requested = Arc::new(AtomicBool::new(false));
    let (opened_flag, done_flag, close_flag, fifo) = (
        opened.clone(),
        done.clone(),
        close_requested.clone(),
        path.clone(),
    );
    let thread = std::thread::spawn(move || {
        // A blocking open waits for containerd's client to open its end.
        let file = File::open(&fifo);
        opened_flag.store(true, Ordering::SeqCst);
        let mut file = match file {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(container = %target.container_id, "opening stdin FIFO {fifo}: {e}");
                return;
            }
        };
        let mut buffer = vec![0u8; CHUNK as usize];
        loop {
            if done_flag.load(Ordering::SeqCst) {
                return;
            }
            // Wait for data without blocking in read(2): a client may keep
            // its end open after CloseIO, and then only an empty FIFO
            // tells us that everything before CloseIO went through.
            let mut pollfd = libc::pollfd {
                fd: file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll(2) on one valid pollfd that outlives the call.
            let ready = unsafe { libc::poll(&mut pollfd, 1, STDIN_IDLE_POLL_MS) };
            if ready < 0 {
                continue; // EINTR: the only error poll(2) can give here
            }
            if ready == 0 {
                if close_flag.load(Ordering::SeqCst) {
                    break;
                }
                continue;
            }
            let n = match file.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(container = %target.container_id, "reading stdin FIFO: {e}");
                    break;
                }
            };
            let mut written = 0;
            while written < n {
                let request = WriteStreamRequest {
                    container_id: target.container_id.clone(),
                    exec_id: target.exec_id.clone(),
                    data: buffer[written..n].to_vec(),
                    ..Default::default()
                };
                match target.agent.write_stdin(ctx(STREAM_CALL_TIMEOUT), &request) {
                    Ok(response) if response.len > 0 => written += response.len as usize,
                    Ok(_) => return,
                    Err(e) => {
                        tracing::debug!(container = %target.container_id, "stdin ended: {e}");
                        return;
                    }
                }
            }
        }
        close_stdin(&target);
    });
    StdinCopy {
        path,
        opened,
        done,
        close_requested,
        thread,
    }
}

/// Closes the process's stdin in the agent (EOF, or ^D on a terminal).
pub fn close_stdin(target: &Target) {
    let request = CloseStdinRequest {
        container_id: target.container_id.clone(),
        exec_id: target.exec_id.clone(),
        ..Default::default()
    };
    if let Err(e) = target.agent.close_stdin(ctx(CALL_TIMEOUT), &request) {
        tracing::debug!(container = %target.container_id, exec = %target.exec_id, "closing stdin: {e}");
    }
}

/// `binary:///path/to/logger?key=value`: containerd's logging-binary
/// protocol. The binary gets the process's stdout as fd 3 and stderr as
/// fd 4, and closes fd 5 once it is ready; CONTAINER_ID and
/// CONTAINER_NAMESPACE are in its environment.
fn spawn_logger(uri: &str, target: &Target) -> Result<(std::process::Child, File, File), IoError> {
    let rest = uri.strip_prefix("binary://").unwrap_or(uri);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !path.starts_with('/') {
        return Err(IoError::Uri {
            uri: uri.to_string(),
            reason: "the binary path must be absolute".into(),
        });
    }
    let mut args = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        args.push(key.to_string());
        if !value.is_empty() {
            args.push(value.to_string());
        }
    }
    let logger_error = |source| IoError::Logger {
        path: path.to_string(),
        source,
    };
    // Close-on-exec: no other child (a VMM, another logger) may inherit
    // these; the logger gets its copies from dup2 below.
    let pipe =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| logger_error(e.into()));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let child_fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut command = std::process::Command::new(path);
    command
        .args(&args)
        .env("CONTAINER_ID", &target.container_id)
        .env("CONTAINER_NAMESPACE", &target.namespace)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            for (target_fd, fd) in (3..).zip(child_fds) {
                // dup2 onto itself keeps FD_CLOEXEC; clear it then.
                let rc = if fd == target_fd {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, target_fd)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(logger_error)?;
    drop((out_r, err_r, ready_w));
    // Wait for the ready signal (EOF on fd 5's other end), but not for
    // ever: a logger that never signals must not hold up the pod.
    let deadline = std::time::Instant::now() + Duration::from_millis(LOGGER_READY_LIMIT_MS.into());
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let left_ms = u16::try_from(left.as_millis()).unwrap_or(LOGGER_READY_LIMIT_MS);
        let mut fds = [nix::poll::PollFd::new(
            ready_r.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(left_ms)) {
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(0) => tracing::warn!(
                "logger {path} did not signal ready in {LOGGER_READY_LIMIT_MS} ms; going on"
            ),
            Ok(_) => {
                let mut byte = [0u8; 1];
                let _ = File::from(ready_r).read(&mut byte);
            }
            Err(e) => tracing::warn!("waiting for logger {path}: {e}"),
        }
        break;
    }
    Ok((child, File::from(out_w), File::from(err_w)))
}

/// For tests: a FIFO path as containerd would give it.
pub fn fifo_path(dir: &std::path::Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_log_uris_are_named() {
        let error = open_sink("syslog://host").expect_err("refused");
        assert!(error.to_string().contains("syslog://host"), "{error}");
        assert!(open_sink("").expect("empty is fine").is_none());
    }

    #[test]
    fn file_uris_append_to_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("logs/out.log");
        let uri = format!("file://{}", path.display());
        open_sink(&uri)
            .expect("opens")
            .expect("a file")
            .write_all(b"one\n")
            .expect("writes");
        open_sink(&uri)
            .expect("opens")
            .expect("a file")
            .write_all(b"two\n")
            .expect("writes");
        assert_eq!(std::fs::read_to_string(&path).expect("reads"), "one\ntwo\n");
    }

    #[test]
    fn a_fifo_sink_opens_without_a_reader() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = fifo_path(dir.path(), "stdout");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let mut sink = open_sink(&path.display().to_string())
            .expect("opens")
            .expect("a FIFO");
        sink.write_all(b"buffered")
            .expect("writes into the pipe buffer");
    }
}
