//! The pod's network through the Task calls: a netns set up as CNI leaves a
//! pod's (made by the test), the fake agent and launcher (the fake "VMM"
//! holds the tap as podbox-vmm would).

use std::time::{Duration, Instant};

use containerd_shim::protos::ttrpc::Code;

use super::{code, is_root, Pod, CRI_CONTAINER, CRI_SANDBOX};
use crate::network::tap::TAP_NAME;
use crate::network::testnet::{TestNetns, CNI_MAC};

fn in_netns(net: &TestNetns) -> serde_json::Value {
    serde_json::json!([{"type": "network", "path": net.netns.path()}, {"type": "mount"}])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_takes_the_pods_interface_and_delete_leaves_the_netns_as_cni_made_it() {
    if !is_root() {
        return;
    }
    let net = TestNetns::cni_like();
    let pod = Pod::new();
    pod.set_namespaces(in_netns(&net));
    pod.create("pod", &CRI_SANDBOX).await.expect("create");
    assert_eq!(
        pod.agent.calls()[..4],
        [
            "create_sandbox pod",
            "update_interface eth0",
            "update_routes 3",
            "create_container pod"
        ]
    );
    let (interfaces, routes) = pod.agent.network_calls();
    let eth0 = &interfaces[0];
    assert_eq!(
        (eth0.name.as_str(), eth0.hw_addr.as_str(), eth0.mtu),
        ("eth0", CNI_MAC, 1400)
    );
    let ips: Vec<_> = eth0
        .ip_addresses
        .iter()
        .map(|a| format!("{}/{}", a.address, a.mask))
        .collect();
    assert_eq!(ips, ["10.88.0.5/16", "fd00::5/64"]);
    let default = routes[0].routes.iter().find(|r| r.dest == "default");
    assert_eq!(default.expect("a default route").gateway, "10.88.0.1");

    assert!(pod.agent.holds_tap(), "the VMM got the tap");
    let tap = net
        .link(TAP_NAME)
        .expect("the tap exists while the pod lives");
    assert!(net
        .ingress_filters("eth0")
        .iter()
        .any(|f| f.redirect_to == Some(tap.index)));
    assert!(!net.ingress_filters(TAP_NAME).is_empty());

    pod.create("web", &CRI_CONTAINER)
        .await
        .expect("the same netns");
    let other = TestNetns::empty();
    pod.set_namespaces(in_netns(&other));
    let refused = pod.create("other", &CRI_CONTAINER).await;
    assert_eq!(code(refused), Code::INVALID_ARGUMENT, "another netns");
    pod.set_namespaces(serde_json::json!([{"type": "mount"}]));
    assert_eq!(
        code(pod.create("host", &CRI_CONTAINER).await),
        Code::INVALID_ARGUMENT
    );

    pod.delete("web", "").await.expect("delete web");
    assert!(net.link(TAP_NAME).is_some(), "the pod's VM lives on");
    pod.delete("pod", "").await.expect("delete the pod");
    assert!(!pod.agent.holds_tap());
    assert_eq!(net.link(TAP_NAME), None, "the tap is gone");
    assert!(
        net.ingress_qdiscs().is_empty(),
        "{:?}",
        net.ingress_qdiscs()
    );
    assert!(
        net.link("eth0").is_some_and(|l| l.up),
        "eth0 stays as CNI made it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_death_unwires_the_netns() {
    if !is_root() {
        return;
    }
    let net = TestNetns::cni_like();
    let pod = Pod::new();
    pod.set_namespaces(in_netns(&net));
    pod.create("pod", &[]).await.expect("create");
    pod.start("pod", "").await.expect("start");
    assert_eq!(net.ingress_qdiscs().len(), 2, "eth0 and the tap");
    pod.agent.die(9);
    let since = Instant::now();
    while !net.ingress_qdiscs().is_empty() {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "{:?}",
            net.ingress_qdiscs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(net.link(TAP_NAME), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_is_refused_and_leaves_nothing() {
    if !is_root() {
        return;
    }
    let pod = Pod::new();
    pod.set_namespaces(serde_json::json!([{"type": "pid"}]));
    let error = pod.create("pod", &CRI_SANDBOX).await.expect_err("refused");
    assert_eq!(code(Err::<(), _>(error.clone())), Code::INVALID_ARGUMENT);
    assert!(
        format!("{error:?}").contains("host network is not supported for sandboxed pods"),
        "{error:?}"
    );
    assert!(pod.agent.calls().is_empty(), "no VM booted");
    assert!(!pod.state_dir("pod").exists());
    assert!(pod.inner().pod().vm.is_none());

    let missing = Pod::new();
    missing.set_namespaces(serde_json::json!([{"type": "network", "path": "/nonexistent/netns"}]));
    let refused = missing.create("pod", &CRI_SANDBOX).await;
    assert_eq!(code(refused), Code::FAILED_PRECONDITION);
    assert!(missing.agent.calls().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_cannot_take_the_interface_fails_the_pod_and_unwires_it() {
    if !is_root() {
        return;
    }
    let net = TestNetns::cni_like();
    let pod = Pod::new();
    pod.set_namespaces(in_netns(&net));
    pod.agent.fail("update_routes", Code::INVALID_ARGUMENT);
    let error = pod.create("pod", &CRI_SANDBOX).await.expect_err("refused");
    assert!(format!("{error:?}").contains("UpdateRoutes"), "{error:?}");
    assert!(pod.inner().pod().vm.is_none());
    assert!(pod.agent.calls().iter().any(|c| c == "destroy_sandbox "));
    assert_eq!(net.link(TAP_NAME), None);
    assert!(
        net.ingress_qdiscs().is_empty(),
        "{:?}",
        net.ingress_qdiscs()
    );
}
