//! UpdateInterface / UpdateRoutes: the guest's NICs, configured with
//! netlink (`podbox-netlink`), IPv4 and IPv6.
//!
//! `proto` turns the protocol messages into typed values (every check that
//! needs no kernel, each error naming the field it is about) and formats the
//! results back; `apply` does the netlink work on those values. The ttrpc
//! handlers only chain the two.
//!
//! Matching: an interface is found by its MAC (`hw_addr`) when the request
//! gives one, as Kata does (the guest's names need not be the host's), else
//! by `device`, else by `name`; a `name` that differs from the interface's
//! name renames it.

mod apply;
mod proto;

pub use apply::{bring_up_loopback, Configured, Nic};
pub use proto::{
    parse_interface, parse_routes, to_interface, to_routes, InterfaceConfig, IpNet, LinkSelector,
    Mac, RouteConfig,
};

#[cfg(test)]
mod tests;
