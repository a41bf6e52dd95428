//! The network module's tests: `proto` (pure) and `apply` (against the real
//! kernel, in network namespaces of their own).

mod apply;
mod proto;

use podbox_protocol::agent::IPAddress;

/// An IPAddress message as the shim sends one.
fn address(family: &str, address: &str, mask: &str) -> IPAddress {
    IPAddress {
        family: family.into(),
        address: address.into(),
        mask: mask.into(),
        ..Default::default()
    }
}
