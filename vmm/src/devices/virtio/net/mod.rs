//! virtio-net (device type 1) on a host tap device.
//!
//! - `tap`: opening a tap by name or checking an inherited one, and the
//!   `Backend` trait the device moves frames through (tests use a fake).
//! - `header`: the virtio-net header, feature bits and what they mean for
//!   the tap's offloads.
//! - `chain`: checks every guest-supplied descriptor chain before a byte
//!   is copied (direction, addresses, length bounds, loops).
//! - `tx` / `rx`: the guest → tap and tap → guest paths.
//! - `device`: the virtio device and its epoll event loop.
//!
//! Frames are copied between guest memory and one device-owned buffer per
//! direction. The extra copy is cheap next to what the guest kernel spends
//! per frame on a PVM host, and it lets a frame wait (tap not writable, no
//! guest RX buffer) without holding guest buffers.

mod chain;
pub mod device;
pub mod header;
mod rx;
pub mod tap;
mod tx;

#[cfg(test)]
mod tests;

pub use device::{Net, NetCounters};
pub use tap::{Backend, Tap, TapError};
