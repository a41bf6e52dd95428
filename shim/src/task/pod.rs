//! The pod one shim serves: its VM ([`Sandbox`]) and its containers with
//! their processes. It sits behind one short-held lock: nothing waits on an
//! agent, a boot or a drain while holding it.
//!
//! Process state lives in a `watch` cell per process: the exit is set once
//! (by the thread that waited for it in the agent, or by the VM supervisor
//! when the whole VM is gone) and every Wait call sees it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;

use crate::io::{ProcessIo, StdioPaths, Target};
use crate::rootfs::ContainerShare;
use crate::sandbox::Sandbox;

/// The exit status every task of a pod gets when its VM dies under it
/// (VMM, virtiofsd or guest crash): its processes are gone, how is unknown.
pub const VM_LOST_EXIT_STATUS: u32 = 255;

#[derive(Debug, Clone, PartialEq)]
pub struct Exit {
    pub status: u32,
    pub at: Timestamp,
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Created,
    Running,
    Paused,
    Stopped,
}

/// One process: a container's init (empty exec id) or an exec.
pub struct Process {
    pub exec_id: String,
    pub stdio: StdioPaths,
    pub started: bool,
    /// Start is talking to the agent (a second Start is refused).
    pub starting: bool,
    /// For an exec until it starts: the JSON of its OCI process.
    pub process_json: Vec<u8>,
    pub exit: Arc<watch::Sender<Option<Exit>>>,
    pub io: Arc<Mutex<Option<ProcessIo>>>,
    /// CloseIO came before the exec was started (ctr sends it as soon as
    /// its own stdin ends): honoured once the process and its stdin copy exist.
    pub stdin_close_pending: bool,
}

impl Process {
    pub fn new(exec_id: &str, stdio: StdioPaths, process_json: Vec<u8>) -> Self {
        Process {
            exec_id: exec_id.to_string(),
            stdio,
            started: false,
            starting: false,
            process_json,
            exit: Arc::new(watch::channel(None).0),
            io: Arc::new(Mutex::new(None)),
            stdin_close_pending: false,
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// Started (or being started) and not exited: Delete must wait.
    pub fn is_running(&self) -> bool {
        (self.started || self.starting) && self.exit().is_none()
    }

    pub fn phase(&self, paused: bool) -> Phase {
        match (self.exit().is_some(), self.started, paused) {
            (true, _, _) => Phase::Stopped,
            (false, false, _) => Phase::Created,
            (false, true, true) => Phase::Paused,
            (false, true, false) => Phase::Running,
        }
    }
}

/// Where a process's exit lands, once.
pub type ExitCell = watch::Sender<Option<Exit>>;

/// Records `exit` unless an exit is already recorded; true when this call set it.
pub fn set_exit_once(cell: &watch::Sender<Option<Exit>>, exit: Exit) -> bool {
    cell.send_if_modified(|current| {
        if current.is_some() {
            false
        } else {
            *current = Some(exit);
            true
        }
    })
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub share: ContainerShare,
    /// The sandbox (or standalone) container, whose delete ends the VM.
    pub owns_vm: bool,
    pub paused: bool,
    pub init: Process,
    pub execs: HashMap<String, Process>,
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}

#[derive(Default)]
pub struct PodState {
    pub vm: Option<Arc<Sandbox>>,
    pub containers: HashMap<String, Container>,
}

impl PodState {
    pub fn target(&self, namespace: &str, container_id: &str, exec_id: &str) -> Option<Target> {
        self.vm.as_ref().map(|vm| Target {
            agent: vm.agent.clone(),
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            namespace: namespace.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_is_recorded_once_and_stops_the_process() {
        let mut process = Process::new("", StdioPaths::default(), Vec::new());
        assert_eq!(process.phase(false), Phase::Created);
        process.started = true;
        assert_eq!(process.phase(false), Phase::Running);
        assert_eq!(process.phase(true), Phase::Paused);
        let first = Exit {
            status: 3,
            at: Timestamp::default(),
        };
        assert!(set_exit_once(&process.exit, first.clone()));
        assert!(!set_exit_once(
            &process.exit,
            Exit {
                status: VM_LOST_EXIT_STATUS,
                at: Timestamp::default()
            }
        ));
        assert_eq!(process.exit(), Some(first), "the first exit wins");
        assert_eq!(process.phase(false), Phase::Stopped);
    }
}
