//! A private containerd for tests: Debian's containerd 1.6 started from its
//! own generated config (root, state, sockets, opt, CNI config and IPAM state
//! all under one temp dir), with the CRI plugin on, runtimes `runc` and
//! `podbox` (io.containerd.podbox.v2), and the test images imported.
//!
//! [`Containerd`] is a guard: dropping it deletes every pod, task and
//! container it ran, stops the daemon and everything it started, and removes
//! what it made on the host (mounts, network namespaces, the CNI bridge,
//! cgroups, /run/containerd directories, the temp dir). Several guards can
//! live at once (tests run on parallel threads): each has its own sockets,
//! bridge name, subnet and cgroup parent.
//!
//! Here: only the modules and what they export. `guard` is the guard, its
//! start, restart and accessors; `names` the namespaces, runtimes and
//! handlers; `error` what can fail; `config` writes containerd's config and
//! the CNI conflist, `ctr` runs `ctr`, `cleanup` is the teardown,
//! `host_dirs` the host directories containerd makes regardless and the
//! count of live guards that decides when they go, `footprint` what a guard
//! leaves to check after drop, `host` the probes of the host (cgroups,
//! processes, netns) the last two share; `faults` finds a pod's processes
//! and shim socket for the tests that break them, `leaks` counts what the
//! guard and its pods hold, for the tests that create and delete many.

mod cleanup;
mod config;
mod ctr;
mod error;
mod faults;
mod footprint;
mod guard;
mod host;
mod host_dirs;
mod leaks;
mod names;

pub use ctr::CtrRunOutput;
pub use error::ContainerdError;
pub use faults::{comm, is_alive, pod_processes, process_state, shim_socket, signal, PodProcesses};
pub use footprint::Footprint;
pub use guard::{Containerd, ContainerdOptions};
pub use host::processes_in_cgroup;
pub use leaks::{HostCounts, PodTrace};
pub use names::{
    CRI_NAMESPACE, PODBOX_HANDLER, PODBOX_RUNTIME, RUNC_HANDLER, RUNC_RUNTIME, TEST_NAMESPACE,
};
