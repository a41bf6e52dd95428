//! podbox-protocol: the ttrpc API between the podbox shim and podbox-agent.
//!
//! Generated at build time from `protos/` (see build.rs). `agent` and
//! `health` hold the messages; `agent_ttrpc` and `health_ttrpc` hold the
//! client stubs (`AgentServiceClient`, `HealthClient`) and the server traits
//! (`AgentService`, `Health`) with their `create_*` registration helpers.

include!(concat!(env!("OUT_DIR"), "/mod.rs"));

/// vsock port the agent listens on inside the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Host vsock port the agent calls once its ttrpc server listens (its
/// "ready call"); podbox-vmm forwards it to `<vsock socket>_1025`, which the
/// host binds before the VMM starts and dials the agent only after.
pub const AGENT_READY_PORT: u32 = 1025;

impl agent::IPAddress {
    /// An interface address as UpdateInterface carries it, and as the
    /// agent's reply gives it back: family "inet" or "inet6", the address,
    /// and the prefix length in `mask`.
    pub fn from_ip(ip: std::net::IpAddr, prefix: u8) -> agent::IPAddress {
        agent::IPAddress {
            family: if ip.is_ipv4() { "inet" } else { "inet6" }.into(),
            address: ip.to_string(),
            mask: prefix.to_string(),
            ..Default::default()
        }
    }
}
