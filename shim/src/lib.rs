//! podbox's containerd shim v2 (`containerd-shim-podbox-v2`): one shim and
//! one microVM per pod.
//!
//! Here so far: the configuration ([`config`]), what a bundle's annotations
//! ask for ([`annotations`]), and the `start`/`delete` commands ([`service`]).
//! The task API (`task.rs`), pod state, stdio and the agent client follow
//! with the VM backend.

pub mod annotations;
pub mod config;
pub mod service;
