//! The containerd namespaces, runtimes and CRI runtime handlers a guard is
//! set up with.

/// The containerd namespace the `ctr` helpers use.
pub const TEST_NAMESPACE: &str = "podbox-test";
/// The namespace the CRI plugin keeps its images and containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// `ctr --runtime` values and CRI runtime handlers for the two runtimes.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
pub const PODBOX_RUNTIME: &str = "io.containerd.podbox.v2";
pub const RUNC_HANDLER: &str = "runc";
pub const PODBOX_HANDLER: &str = "podbox";
