//! NETLINK_ROUTE for podbox, synchronously: the shim configures a pod's
//! network namespace with it (tap, tc redirect, reading what CNI set up) and
//! the agent configures the guest's NIC with it. One request at a time on one
//! socket: both callers make a handful of requests per pod, so there is
//! nothing to gain from an async connection, and a sync socket can be opened
//! on a thread that has entered another network namespace.
//!
//! Messages are the `netlink-packet-route` types; this crate adds the
//! request/acknowledge loop, typed errors that name the request, and small
//! typed helpers (`link`, `addr`, `route`, `tc`).

pub mod addr;
pub mod link;
pub mod route;
mod socket;
pub mod tc;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use netlink_packet_route as packet;
pub use socket::{Error, Netlink};

#[cfg(test)]
mod tests;
