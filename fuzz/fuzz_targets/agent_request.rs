//! The agent's request decoding: the first byte picks an AgentService
//! request type, the rest is its protobuf payload as ttrpc hands it to the
//! generated service code (podbox-protocol), and the decoded request goes
//! through the agent's checks that need no kernel: ids, hostname and
//! storages (CreateSandbox), the OCI spec and its seccomp profile
//! (CreateContainer), the process (ExecProcess), the resources and the
//! cgroup writes they make (UpdateContainer), interfaces and routes
//! (UpdateInterface, UpdateRoutes).

#![no_main]

use libfuzzer_sys::fuzz_target;
use podbox_agent::container::cgroup::knobs;
use podbox_agent::container::validate_id;
use podbox_agent::network::{parse_interface, parse_routes, to_routes};
use podbox_agent::sandbox::{
    check_container_spec, check_exec_process, check_sandbox_request, parse_resources,
};
use podbox_protocol::agent::*;
use protobuf::Message;

fn decode<M: Message>(payload: &[u8]) -> Option<M> {
    M::parse_from_bytes(payload).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, payload)) = data.split_first() else {
        return;
    };
    match kind % 8 {
        0 => {
            if let Some(r) = decode::<CreateSandboxRequest>(payload) {
                let _ = check_sandbox_request(&r.sandbox_id, &r.hostname, &r.storages);
            }
        }
        1 => {
            if let Some(r) = decode::<CreateContainerRequest>(payload) {
                let _ = validate_id("container id", &r.container_id);
                let _ = check_container_spec(&r.oci_spec_json);
            }
        }
        2 => {
            if let Some(r) = decode::<ExecProcessRequest>(payload) {
                let _ = validate_id("exec id", &r.exec_id);
                let _ = check_exec_process(&r.process_json);
            }
        }
        3 => {
            if let Some(r) = decode::<UpdateContainerRequest>(payload) {
                if let Ok(res) = parse_resources(&r.resources_json) {
                    let _ = knobs(true, &res);
                    let _ = knobs(false, &res);
                }
            }
        }
        4 => {
            if let Some(r) = decode::<UpdateInterfaceRequest>(payload) {
                let _ = parse_interface(&r);
            }
        }
        5 => {
            if let Some(r) = decode::<UpdateRoutesRequest>(payload) {
                if let Ok(routes) = parse_routes(&r) {
                    let _ = to_routes(&routes);
                }
            }
        }
        // The JSON documents alone, without the protobuf around them.
        6 => {
            let _ = check_container_spec(payload);
        }
        _ => {
            if let Ok(res) = parse_resources(payload) {
                let _ = knobs(true, &res);
                let _ = knobs(false, &res);
            }
            let _ = check_exec_process(payload);
        }
    }
});
