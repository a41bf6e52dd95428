//! podbox's containerd shim v2 (`containerd-shim-podbox-v2`): one shim and
//! one microVM per pod.
//!
//! - [`service`]: the `start`/`delete` commands containerd runs;
//! - [`serve`]: the long-lived server (ttrpc, events, logging);
//! - [`task`]: the Task API over the pod's VM and agent, and the pod's state;
//! - [`sandbox`]: the pod's VM from boot to end (podbox-vmm, the state directory and share);
//! - [`network`]: the pod's network namespace wired to the VM's NIC (tap + tc redirect);
//! - [`agent`]: the agent's calls as a trait (ttrpc over vsock, or a fake in tests);
//! - [`settings`]: what the operator configures and the pod asks for;
//! - [`spec`]: the bundle's OCI spec, typed;
//! - [`hostfs`]: path operations that the guest cannot redirect (mounts, unmounts, removal);
//! - [`rootfs`]: container root filesystems and volumes into the share, the spec for the guest;
//! - [`io`]: stdio between containerd's FIFOs / log URIs and the agent.

pub mod agent;
pub mod hostfs;
pub mod io;
pub mod network;
pub mod rootfs;
pub mod sandbox;
pub mod serve;
pub mod service;
pub mod settings;
pub mod spec;
pub mod task;
