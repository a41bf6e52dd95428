//! podbox's containerd shim v2 (`containerd-shim-podbox-v2`): one shim and
//! one microVM per pod.
//!
//! - [`service`]: the `start`/`delete` commands containerd runs;
//! - [`serve`]: the long-lived server (ttrpc, events, logging);
//! - [`task`]: the Task API over the pod's agent;
//! - [`pod`]: pod, container and process state;
//! - [`vm`]: the pod's state directory, share and podbox-vmm;
//! - [`hostfs`]: path operations that the guest cannot redirect (mounts, unmounts, removal);
//! - [`rootfs`]: container root filesystems and volumes into the share, the spec for the guest;
//! - [`io`]: stdio between containerd's FIFOs / log URIs and the agent;
//! - [`config`], [`annotations`]: what the operator and the pod ask for.

pub mod annotations;
pub mod config;
pub mod hostfs;
pub mod io;
pub mod pod;
pub mod rootfs;
pub mod serve;
pub mod service;
pub mod task;
pub mod vm;
