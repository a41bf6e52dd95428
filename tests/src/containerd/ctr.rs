//! Running `ctr` against a guard's containerd.

use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::error::ContainerdError;
use super::guard::Containerd;
use super::names::{PODBOX_RUNTIME, RUNC_RUNTIME, TEST_NAMESPACE};
use crate::oci_image::BUSYBOX_IMAGE;

/// What one `ctr run` gave.
#[derive(Debug)]
pub struct CtrRunOutput {
    pub container_id: String,
    /// ctr exits with the task's exit status.
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From spawning ctr to its exit: create, start, run, exit, delete.
    pub elapsed: Duration,
}

fn ctr_spawn_error(source: std::io::Error) -> ContainerdError {
    ContainerdError::Spawn {
        program: "ctr".into(),
        source,
    }
}

impl Containerd {
    /// Runs `ctr` against this containerd in `namespace`; any exit status.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Result<Output, ContainerdError> {
        self.ctr_command(namespace, args)
            .stdin(Stdio::null())
            .output()
            .map_err(ctr_spawn_error)
    }

    /// Runs `ctr` and returns its stdout, failing on a non-zero exit.
    pub fn ctr_ok(&self, namespace: &str, args: &[&str]) -> Result<String, ContainerdError> {
        let output = self.ctr(namespace, args)?;
        if !output.status.success() {
            return Err(ContainerdError::Ctr {
                args: args.join(" "),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A `ctr` command line for this containerd, for callers that need the child
    /// (e.g. to kill a task while `ctr run` waits on it).
    pub fn ctr_command(&self, namespace: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.grpc_socket)
            .args(["--namespace", namespace])
            .args(args);
        command
    }

    /// The `ctr run` arguments up to and including the command: the container
    /// is removed at exit, keeps its FIFOs, runc state and cgroup under this
    /// guard, and gets a fresh unique id (returned first).
    pub fn ctr_run_args(
        &self,
        runtime: &str,
        image: &str,
        command: &[&str],
    ) -> (String, Vec<String>) {
        self.ctr_run_args_annotated(runtime, image, command, &[])
    }

    /// The same with OCI annotations (`--annotation KEY=VALUE`) on the
    /// container's spec.
    pub fn ctr_run_args_annotated(
        &self,
        runtime: &str,
        image: &str,
        command: &[&str],
        annotations: &[(&str, &str)],
    ) -> (String, Vec<String>) {
        let container_id = self.unique_name("ctr");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--rm".into(),
            "--runtime".into(),
            runtime.into(),
        ];
        args.extend(["--fifo-dir".into(), self.fifo_dir().display().to_string()]);
        args.extend([
            "--cgroup".into(),
            format!("{}/{container_id}", self.cgroup_parent),
        ]);
        if runtime == RUNC_RUNTIME {
            args.extend(["--runc-root".into(), self.runc_root().display().to_string()]);
        }
        if let (PODBOX_RUNTIME, Some(config)) = (runtime, &self.podbox_config) {
            args.extend(["--runtime-config-path".into(), config.display().to_string()]);
        }
        for (key, value) in annotations {
            args.extend(["--annotation".into(), format!("{key}={value}")]);
        }
        args.extend([image.to_string(), container_id.clone()]);
        args.extend(command.iter().map(|arg| arg.to_string()));
        (container_id, args)
    }

    /// `ctr run --rm` of `command` in `image` under `runtime`, feeding `stdin`
    /// (or nothing: stdin at EOF), and waits for it.
    pub fn ctr_run(
        &self,
        runtime: &str,
        image: &str,
        command: &[&str],
        stdin: &[u8],
    ) -> Result<CtrRunOutput, ContainerdError> {
        self.ctr_run_annotated(runtime, image, command, stdin, &[])
    }

    /// The same with OCI annotations on the container's spec.
    pub fn ctr_run_annotated(
        &self,
        runtime: &str,
        image: &str,
        command: &[&str],
        stdin: &[u8],
        annotations: &[(&str, &str)],
    ) -> Result<CtrRunOutput, ContainerdError> {
        use std::io::Write;
        let (container_id, args) =
            self.ctr_run_args_annotated(runtime, image, command, annotations);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let mut child = self
            .ctr_command(TEST_NAMESPACE, &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(ctr_spawn_error)?;
        if let Some(mut pipe) = child.stdin.take() {
            // A task that exits without reading closes the pipe: not an error here.
            let _ = pipe.write_all(stdin);
        }
        let output = child.wait_with_output().map_err(ctr_spawn_error)?;
        Ok(CtrRunOutput {
            container_id,
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed: started.elapsed(),
        })
    }

    /// `ctr run` of the busybox test image under runc.
    pub fn run_busybox_with_runc(
        &self,
        command: &[&str],
        stdin: &[u8],
    ) -> Result<CtrRunOutput, ContainerdError> {
        self.ctr_run(RUNC_RUNTIME, BUSYBOX_IMAGE, command, stdin)
    }
}
