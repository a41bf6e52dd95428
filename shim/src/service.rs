//! The shim's lifecycle commands as containerd 1.6 runs them:
//!
//! - `start` (cwd = the bundle; stdin = runtime options as a protobuf Any, or
//!   nothing): prints the ttrpc address of the shim that will serve this
//!   container. A pod container answers with its sandbox's shim address, so
//!   the whole pod shares one shim and one VM.
//! - `delete` (`-bundle`): cleans up after a shim that is gone and prints a
//!   protobuf DeleteResponse.
//!
//! Flags are parsed with containerd-shim's parser (Go flag syntax); socket
//! addresses come from its `socket_address` so they match containerd's own.
//! The server `start` spawns is [`crate::serve`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{CodedInputStream, Message};
use containerd_shim::DeleteResponse;
use thiserror::Error;

use crate::settings::annotations::{AnnotationError, PodRole};
use crate::settings::config::{Config, ConfigError};
use crate::settings::SettingsError;
use crate::settings::VmSettings;

/// The Any type of CRI's options for runtimes other than runc (`config_path`).
const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";
/// What containerd reports for a task whose shim is gone: killed (128 + SIGKILL).
const EXIT_STATUS_KILLED: u32 = 128 + 9;
/// How long `start` waits for the server it spawned to serve. Before it
/// serves, the server only loads the config, connects to containerd's
/// ttrpc address and binds its socket (the VM boots later, on Create):
/// milliseconds, or seconds on a host under heavy load. 30 s is well past
/// that, yet well within what a CRI client waits (kubelet:
/// --runtime-request-timeout, 2 minutes by default), so a server that
/// hangs fails `start` with this error, not the client's call with a bare
/// deadline, and is not left behind.
const START_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum ShimError {
    #[error("parsing the command line: {0}")]
    Flags(containerd_shim::Error),
    #[error("flag -{0} is required for {1}")]
    MissingFlag(&'static str, &'static str),
    #[error("unknown action {0:?}: expected start or delete")]
    UnknownAction(String),
    #[error("reading runtime options from stdin: {0}")]
    Stdin(std::io::Error),
    #[error("decoding runtime options ({what}): {source}")]
    RuntimeOptions {
        what: &'static str,
        source: containerd_shim::protos::protobuf::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    #[error("bundle {bundle}: {source}")]
    Settings {
        bundle: PathBuf,
        source: SettingsError,
    },
    #[error("container {id} belongs to pod {sandbox_id}, whose shim is not running (no socket at {address})")]
    NoSandboxShim {
        id: String,
        sandbox_id: String,
        address: String,
    },
    #[error("writing the shim's address to {path}: {source}")]
    WriteAddress {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: the current directory: {1}")]
    Cwd(&'static str, std::io::Error),
    #[error("unmounting {path}: {source}")]
    Unmount {
        path: PathBuf,
        source: containerd_shim::Error,
    },
    #[error("encoding the DeleteResponse: {0}")]
    Encode(containerd_shim::protos::protobuf::Error),
    #[error("starting the shim server for {id}: {source}")]
    SpawnServer { id: String, source: std::io::Error },
    #[error(
        "the shim server for {id} exited before serving {address} (its log is in containerd's log)"
    )]
    ServerDidNotStart { id: String, address: String },
    #[error(
        "the shim server for {id} did not serve {address} within {timeout:?}, and was killed (its log is in containerd's log)"
    )]
    StartTimeout {
        id: String,
        address: String,
        timeout: Duration,
    },
}

/// What the command asks the caller to write to stdout.
pub enum Reply {
    /// `start`: the ttrpc address, with no newline (containerd reads it verbatim).
    Address(String),
    /// `delete`: an encoded DeleteResponse.
    Deleted(Vec<u8>),
}

/// Runs the command in `args` (without the program name).
pub fn run(args: &[String], stdin: &mut dyn Read) -> Result<Reply, ShimError> {
    let flags = containerd_shim::parse(args).map_err(ShimError::Flags)?;
    match flags.action.as_str() {
        "start" => start(&flags, stdin).map(Reply::Address),
        "delete" => delete(&flags).map(Reply::Deleted),
        other => Err(ShimError::UnknownAction(other.to_string())),
    }
}

fn require<'a>(
    value: &'a str,
    flag: &'static str,
    action: &'static str,
) -> Result<&'a str, ShimError> {
    if value.is_empty() {
        Err(ShimError::MissingFlag(flag, action))
    } else {
        Ok(value)
    }
}

fn start(flags: &containerd_shim::Flags, stdin: &mut dyn Read) -> Result<String, ShimError> {
    let id = require(&flags.id, "id", "start")?;
    let namespace = require(&flags.namespace, "namespace", "start")?;
    let containerd_address = require(&flags.address, "address", "start")?;
    let bundle =
        std::env::current_dir().map_err(|e| ShimError::Cwd("start runs in the bundle", e))?;

    let mut options = Vec::new();
    stdin.read_to_end(&mut options).map_err(ShimError::Stdin)?;
    let config = Config::load(config_path_from_runtime_options(&options)?.as_deref())?;
    let spec = crate::spec::load(&bundle)?;
    let annotations = crate::spec::annotations(&spec);
    let settings_error = |source| ShimError::Settings {
        bundle: bundle.clone(),
        source,
    };
    let role = PodRole::from_annotations(&annotations)
        .map_err(|e: AnnotationError| settings_error(e.into()))?;
    // Checked here so that a bad annotation or an oversized pod fails
    // `start` with a clear message in the client's error, before any VM
    // is booted.
    VmSettings::resolve(&config, &spec).map_err(settings_error)?;

    let address =
        containerd_shim::socket_address(containerd_address, namespace, role.shim_grouping(id));
    if let PodRole::Container { sandbox_id } = &role {
        // The sandbox's shim serves every container of the pod.
        if !socket_path(&address).exists() {
            return Err(ShimError::NoSandboxShim {
                id: id.to_string(),
                sandbox_id: sandbox_id.clone(),
                address,
            });
        }
    } else if !(socket_path(&address).exists()
        && std::os::unix::net::UnixStream::connect(socket_path(&address)).is_ok())
    {
        // Not served yet (a served one is containerd retrying start: one
        // shim per pod).
        spawn_server(
            flags,
            id,
            &address,
            config_path_from_runtime_options(&options)?.as_deref(),
        )?;
    }
    write_address(&bundle, &address)?;
    Ok(address)
}

/// The shim's address in the bundle's `address` file, as containerd's own
/// shims write it: a restarted containerd 1.6 reconnects to each task's
/// shim through that file, and without it takes the shim for dead (it
/// runs `delete`, which ends the pod's VM, and reports every task exited).
/// Written whole or not at all (a temp file renamed over it).
fn write_address(bundle: &Path, address: &str) -> Result<(), ShimError> {
    let path = bundle.join("address");
    let temp = bundle.join(".address.tmp");
    std::fs::write(&temp, address)
        .and_then(|()| std::fs::rename(&temp, &path))
        .map_err(|source| ShimError::WriteAddress { path, source })
}

/// Starts the long-lived shim (this binary without an action, with
/// `-socket`) in the bundle and waits until it serves: it closes its
/// stdout once it listens.
fn spawn_server(
    flags: &containerd_shim::Flags,
    id: &str,
    address: &str,
    config_path: Option<&Path>,
) -> Result<(), ShimError> {
    use std::os::unix::process::CommandExt;
    let spawn_error = |source| ShimError::SpawnServer {
        id: id.to_string(),
        source,
    };
    let exe = std::env::current_exe().map_err(spawn_error)?;
    let mut command = std::process::Command::new(exe);
    command
        .args([
            "-namespace",
            &flags.namespace,
            "-id",
            id,
            "-address",
            &flags.address,
            "-socket",
            address,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        // Its own process group: signals meant for containerd's group are not for the pod.
        .process_group(0);
    if !flags.publish_binary.is_empty() {
        command.args(["-publish-binary", &flags.publish_binary]);
    }
    if flags.debug {
        command.arg("-debug");
    }
    match config_path {
        Some(path) => command.env(crate::serve::CONFIG_PATH_ENV, path),
        None => command.env_remove(crate::serve::CONFIG_PATH_ENV),
    };
    let mut child = command.spawn().map_err(spawn_error)?;
    await_handshake(&mut child, id, address, START_HANDSHAKE_TIMEOUT)
}

/// Waits until the spawned server closes its stdout (it serves), for at
/// most `timeout`. A server still silent then is killed, with its process
/// group (it has one of its own), and reaped.
fn await_handshake(
    child: &mut std::process::Child,
    id: &str,
    address: &str,
    timeout: Duration,
) -> Result<(), ShimError> {
    if let Some(mut stdout) = child.stdout.take() {
        // An error reading the pipe tells nothing either way: as on EOF,
        // whether the server is still alive decides.
        if let Ok(Handshake::TimedOut) = wait_for_close(&mut stdout, timeout) {
            let group = nix::unistd::Pid::from_raw(child.id() as i32);
            // The child is not reaped yet, so its pid (its group's id) is
            // still its own.
            if nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).is_err() {
                let _ = child.kill();
            }
            let _ = child.wait();
            return Err(ShimError::StartTimeout {
                id: id.to_string(),
                address: address.to_string(),
                timeout,
            });
        }
    }
    // The server lives on; if it already exited, it failed.
    if let Ok(Some(_)) = child.try_wait() {
        return Err(ShimError::ServerDidNotStart {
            id: id.to_string(),
            address: address.to_string(),
        });
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Handshake {
    /// The writer closed the pipe.
    Closed,
    TimedOut,
}

/// Reads (and drops) what comes through `pipe` until its writer closes it
/// or `timeout` has passed.
fn wait_for_close(
    pipe: &mut std::process::ChildStdout,
    timeout: Duration,
) -> std::io::Result<Handshake> {
    use nix::poll::{poll, PollFd, PollFlags};
    use std::os::fd::AsFd;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Handshake::TimedOut);
        }
        // Rounded up, so that a last fraction of a millisecond is slept,
        // not spun; poll's timeout is at most u16::MAX ms here, the loop
        // goes on where a longer one is left.
        let ms = u16::try_from(left.as_millis() + 1).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        // Readable or hung up: this read does not block.
        match pipe.read(&mut buf) {
            Ok(0) => return Ok(Handshake::Closed),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// `unix:///run/containerd/s/<hash>` → `/run/containerd/s/<hash>`.
fn socket_path(address: &str) -> &Path {
    Path::new(address.strip_prefix("unix://").unwrap_or(address))
}

/// containerd 1.6 writes the runtime's options to the shim's stdin as a
/// protobuf Any; for non-runc runtimes CRI sends `runtimeoptions.v1.Options`
/// { type_url = 1, config_path = 2 }. Other option types carry no config path.
fn config_path_from_runtime_options(bytes: &[u8]) -> Result<Option<PathBuf>, ShimError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let any = Any::parse_from_bytes(bytes).map_err(|source| ShimError::RuntimeOptions {
        what: "Any",
        source,
    })?;
    if !any.type_url.ends_with(RUNTIME_OPTIONS_TYPE) {
        return Ok(None);
    }
    let decode_error = |source| ShimError::RuntimeOptions {
        what: RUNTIME_OPTIONS_TYPE,
        source,
    };
    let mut input = CodedInputStream::from_bytes(&any.value);
    let mut config_path = String::new();
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(decode_error)? {
        const CONFIG_PATH_FIELD: u32 = 2;
        const LENGTH_DELIMITED: u32 = 2;
        if tag == (CONFIG_PATH_FIELD << 3) | LENGTH_DELIMITED {
            config_path = input.read_string().map_err(decode_error)?;
        } else {
            input.skip_field(tag_wire_type(tag)).map_err(decode_error)?;
        }
    }
    Ok((!config_path.is_empty()).then(|| PathBuf::from(config_path)))
}

fn tag_wire_type(tag: u32) -> containerd_shim::protos::protobuf::rt::WireType {
    use containerd_shim::protos::protobuf::rt::WireType;
    // An unknown wire type makes skip_field fail with a decode error, as it should.
    WireType::new(tag & 7).unwrap_or(WireType::StartGroup)
}

/// Cleans up after a shim that is gone: the bundle's rootfs mounts (the
/// shim's, were it still alive) come down; the task is reported killed.
fn delete(flags: &containerd_shim::Flags) -> Result<Vec<u8>, ShimError> {
    require(&flags.id, "id", "delete")?;
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().map_err(|e| ShimError::Cwd("delete without -bundle", e))?
    } else {
        PathBuf::from(&flags.bundle)
    };
    // A pod whose shim died (killed, crashed) may have left its VM, share
    // and host cgroup, and its socket.
    remove_pod_leftovers(&flags.namespace, &flags.id, &bundle);
    remove_dead_socket(flags, &bundle);
    let rootfs = bundle.join("rootfs");
    if rootfs.exists() {
        let target = rootfs.to_string_lossy().into_owned();
        containerd_shim::mount::umount_recursive(Some(&target), 0).map_err(|source| {
            ShimError::Unmount {
                path: rootfs.clone(),
                source,
            }
        })?;
    }
    let response = DeleteResponse {
        pid: 0,
        exit_status: EXIT_STATUS_KILLED,
        exited_at: Some(containerd_shim::util::timestamp().unwrap_or_default()).into(),
        ..Default::default()
    };
    response.write_to_bytes().map_err(ShimError::Encode)
}

/// Removes the socket of the shim that served this task, if nothing serves
/// it any more: a killed shim cannot remove its own, and containerd never
/// does. The task's bundle says which pod's shim that was (a pod's
/// containers share the sandbox's); a socket something still accepts on
/// belongs to a live shim and stays.
fn remove_dead_socket(flags: &containerd_shim::Flags, bundle: &Path) {
    if flags.address.is_empty() || flags.namespace.is_empty() {
        return;
    }
    let role = crate::spec::load(bundle)
        .ok()
        .and_then(|spec| PodRole::from_annotations(&crate::spec::annotations(&spec)).ok());
    let grouping = role
        .as_ref()
        .map_or(flags.id.as_str(), |r| r.shim_grouping(&flags.id));
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, grouping);
    let path = socket_path(&address);
    let refused = matches!(
        std::os::unix::net::UnixStream::connect(path),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    );
    if refused {
        if let Err(e) = std::fs::remove_file(path) {
            eprintln!(
                "containerd-shim-podbox-v2 delete: removing {}: {e}",
                path.display()
            );
        }
    }
}

/// Kills a VMM the dead shim left (its pid file) and removes the pod's
/// state directory with every mount under it.
fn remove_pod_leftovers(namespace: &str, id: &str, bundle: &Path) {
    let Ok(state) = crate::sandbox::state_dir::StateDir::for_pod(namespace, id) else {
        return;
    };
    if !state.dir.exists() {
        return;
    }
    if let Some(pid) = std::fs::read_to_string(state.vmm_pid_file())
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        let is_vmm = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            c.split(|b| *b == 0)
                .next()
                .is_some_and(|arg0| arg0.ends_with(crate::sandbox::vmm::VMM_BINARY.as_bytes()))
        });
        if is_vmm {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    let cgroups_path = crate::spec::load(bundle).ok().and_then(|spec| {
        let linux = spec.linux().as_ref()?;
        Some(linux.cgroups_path().as_ref()?.display().to_string())
    });
    let problems = state
        .remove()
        .into_iter()
        .chain(crate::sandbox::cgroup::remove_leftover(
            cgroups_path.as_deref(),
        ));
    for problem in problems {
        eprintln!("containerd-shim-podbox-v2 delete: {problem}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Encodes `runtimeoptions.v1.Options { type_url, config_path }` wrapped in an Any.
    fn runtime_options_any(type_url: &str, config_path: &str) -> Vec<u8> {
        let mut value = Vec::new();
        for (field, text) in [(1u8, "io.podbox.config"), (2u8, config_path)] {
            value.push((field << 3) | 2);
            value.push(text.len() as u8);
            value.extend_from_slice(text.as_bytes());
        }
        let any = Any {
            type_url: type_url.to_string(),
            value,
            ..Default::default()
        };
        any.write_to_bytes().expect("encoding an Any")
    }

    #[test]
    fn the_config_path_comes_from_cri_runtime_options() {
        let bytes = runtime_options_any(
            "type.googleapis.com/runtimeoptions.v1.Options",
            "/etc/podbox/other.toml",
        );
        assert_eq!(
            config_path_from_runtime_options(&bytes).expect("decodes"),
            Some(PathBuf::from("/etc/podbox/other.toml"))
        );
    }

    #[test]
    fn no_or_foreign_runtime_options_mean_the_default_config() {
        assert_eq!(
            config_path_from_runtime_options(&[]).expect("empty stdin"),
            None
        );
        let runc = runtime_options_any("containerd.runc.v1.Options", "/ignored");
        assert_eq!(
            config_path_from_runtime_options(&runc).expect("decodes"),
            None
        );
    }

    #[test]
    fn garbage_runtime_options_are_an_error() {
        let error = config_path_from_runtime_options(&[0xff, 0xff, 0xff]).expect_err("not an Any");
        assert!(matches!(error, ShimError::RuntimeOptions { .. }), "{error}");
    }

    #[test]
    fn unknown_actions_and_missing_flags_are_refused() {
        let args = |list: &[&str]| list.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let error = run(&args(&["-id", "x", "frobnicate"]), &mut std::io::empty())
            .err()
            .expect("refused");
        assert!(matches!(error, ShimError::UnknownAction(action) if action == "frobnicate"));
        let error = run(
            &args(&["-namespace", "ns", "-address", "/a.sock", "start"]),
            &mut std::io::empty(),
        )
        .err()
        .expect("refused");
        assert!(
            matches!(error, ShimError::MissingFlag("id", "start")),
            "{error}"
        );
    }

    #[test]
    fn delete_reports_the_task_killed() {
        let bundle = tempfile::tempdir().expect("temp dir");
        let args: Vec<String> = ["-namespace", "ns", "-id", "c1", "-bundle"]
            .iter()
            .map(|a| a.to_string())
            .chain([bundle.path().display().to_string(), "delete".into()])
            .collect();
        let Ok(Reply::Deleted(bytes)) = run(&args, &mut std::io::empty()) else {
            panic!("delete failed")
        };
        let response = DeleteResponse::parse_from_bytes(&bytes).expect("a DeleteResponse");
        assert_eq!(response.exit_status, 137);
        assert!(response.exited_at.is_some(), "exited_at is set");
    }

    #[test]
    fn the_address_file_holds_the_address_only() {
        let bundle = tempfile::tempdir().expect("temp dir");
        write_address(bundle.path(), "unix:///run/containerd/s/abc").expect("writes");
        write_address(bundle.path(), "unix:///run/containerd/s/def").expect("overwrites");
        assert_eq!(
            std::fs::read_to_string(bundle.path().join("address")).expect("reads"),
            "unix:///run/containerd/s/def"
        );
        let names: Vec<_> = std::fs::read_dir(bundle.path())
            .expect("lists")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["address"], "no temp file is left");
    }

    #[test]
    fn delete_removes_a_dead_shims_socket_and_keeps_a_live_ones() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let bundle = tempfile::tempdir().expect("temp dir");
        let id = format!("socket-test-{}", std::process::id());
        let args: Vec<String> = ["-namespace", "podbox-unit", "-id", &id, "-address"]
            .iter()
            .map(|a| a.to_string())
            .chain([
                bundle.path().join("containerd.sock").display().to_string(),
                "delete".into(),
            ])
            .collect();
        let flags = containerd_shim::parse(&args).expect("flags");
        let address = containerd_shim::socket_address(&flags.address, "podbox-unit", &id);
        let path = socket_path(&address).to_path_buf();
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("socket dir");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("binds");
        remove_dead_socket(&flags, bundle.path());
        assert!(path.exists(), "a served socket stays");
        drop(listener);
        remove_dead_socket(&flags, bundle.path());
        assert!(!path.exists(), "a dead shim's socket goes");
    }

    /// `sh -c script` with its stdout piped, in its own process group (as
    /// the server is spawned).
    fn spawn_sh(script: &str) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("sh")
            .args(["-c", script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawns sh")
    }

    #[test]
    fn a_server_that_never_closes_stdout_is_killed_after_the_timeout() {
        let mut child = spawn_sh("sleep 60");
        let started = Instant::now();
        let error = await_handshake(&mut child, "pod", "unix:///x", Duration::from_millis(200))
            .expect_err("times out");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "did not wait for sleep"
        );
        assert!(
            matches!(&error, ShimError::StartTimeout { id, address, timeout }
                if id == "pod" && address == "unix:///x" && *timeout == Duration::from_millis(200)),
            "{error}"
        );
        let message = error.to_string();
        assert!(
            message.contains("pod") && message.contains("unix:///x") && message.contains("200ms"),
            "{message}"
        );
        // Killed and reaped.
        let status = child.try_wait().expect("try_wait").expect("exited");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }

    #[test]
    fn a_server_that_closes_stdout_and_lives_has_started() {
        // What the server does: stdout closed, then it serves on.
        let mut child = spawn_sh("exec >&-; sleep 60");
        let result = await_handshake(&mut child, "pod", "unix:///x", Duration::from_secs(20));
        let _ = child.kill();
        let _ = child.wait();
        result.expect("started");
    }

    #[test]
    fn a_server_that_exits_before_serving_did_not_start() {
        // The pipe closes only after sh has exited (a background sleep
        // holds it a moment longer), so the check after EOF finds it gone.
        let mut child = spawn_sh("echo some output; sleep 0.3 & exit 1");
        let error = await_handshake(&mut child, "pod", "unix:///x", Duration::from_secs(20))
            .expect_err("exited");
        let _ = child.wait();
        assert!(
            matches!(error, ShimError::ServerDidNotStart { .. }),
            "{error}"
        );
    }

    #[test]
    fn annotations_are_read_from_the_bundle_spec() {
        let read_annotations = |bundle: &Path| -> Result<HashMap<String, String>, ShimError> {
            Ok(crate::spec::annotations(&crate::spec::load(bundle)?))
        };
        let bundle = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            bundle.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","annotations":{"io.podbox.vcpus":"2"}}"#,
        )
        .expect("writing config.json");
        let annotations = read_annotations(bundle.path()).expect("reads");
        assert_eq!(
            annotations.get("io.podbox.vcpus").map(String::as_str),
            Some("2")
        );
        std::fs::write(
            bundle.path().join("config.json"),
            r#"{"ociVersion":"1.0.2"}"#,
        )
        .expect("writing config.json");
        assert!(read_annotations(bundle.path()).expect("reads").is_empty());
        std::fs::write(bundle.path().join("config.json"), "{").expect("writing config.json");
        assert!(matches!(
            read_annotations(bundle.path()),
            Err(ShimError::Spec(_))
        ));
    }
}
