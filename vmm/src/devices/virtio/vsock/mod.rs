//! virtio-vsock with the host side in the VMM ("hybrid vsock" over unix
//! sockets): `packet` parses guest-supplied headers, `connection` holds one
//! stream's state and credit, `muxer` is the unix-socket side, `device` the
//! virtio device and its event loop.

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;

pub use device::Vsock;
pub use muxer::{Muxer, MuxerError, HOST_CID};

/// The CID a guest gets when none is given (0-2 are reserved).
pub const DEFAULT_GUEST_CID: u64 = 3;
