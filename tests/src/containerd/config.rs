//! What a guard writes before containerd starts: the layout of its temp dir,
//! containerd's config and the CNI conflist.

use std::path::{Path, PathBuf};

use super::names::{PODBOX_HANDLER, PODBOX_RUNTIME, RUNC_HANDLER, RUNC_RUNTIME};
use crate::oci_image::PAUSE_IMAGE;

/// Where Debian's containernetworking-plugins puts the CNI plugins.
const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The layout of one guard's temp dir.
pub(super) struct Paths {
    pub(super) config: PathBuf,
    pub(super) log: PathBuf,
    pub(super) images: PathBuf,
    pub(super) root: PathBuf,
    pub(super) state: PathBuf,
    pub(super) opt: PathBuf,
    pub(super) grpc: PathBuf,
    pub(super) ttrpc: PathBuf,
    pub(super) cni_conf: PathBuf,
    pub(super) cni_ipam: PathBuf,
    pub(super) fifo: PathBuf,
    pub(super) runc_root: PathBuf,
    pub(super) pod_logs: PathBuf,
}

impl Paths {
    pub(super) fn new(dir: &Path) -> Self {
        Paths {
            config: dir.join("config.toml"),
            log: dir.join("containerd.log"),
            images: dir.join("images.tar"),
            root: dir.join("root"),
            state: dir.join("state"),
            opt: dir.join("opt"),
            grpc: dir.join("containerd.sock"),
            ttrpc: dir.join("containerd.sock.ttrpc"),
            cni_conf: dir.join("cni/net.d"),
            cni_ipam: dir.join("cni/ipam"),
            fifo: dir.join("fifo"),
            runc_root: dir.join("runc"),
            pod_logs: dir.join("pod-logs"),
        }
    }

    /// The directories to create before containerd starts.
    pub(super) fn dirs(&self) -> [&PathBuf; 8] {
        [
            &self.root,
            &self.state,
            &self.opt,
            &self.cni_conf,
            &self.cni_ipam,
            &self.fifo,
            &self.runc_root,
            &self.pod_logs,
        ]
    }
}

pub(super) fn containerd_config(paths: &Paths, podbox_config: Option<&Path>) -> String {
    let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
    let podbox_options = match podbox_config {
        Some(path) => format!(
            "      [{cri}.containerd.runtimes.{PODBOX_HANDLER}.options]\n        ConfigPath = \"{}\"\n",
            path.display()
        ),
        None => String::new(),
    };
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
# Snapshotters that cannot work here would only log errors at startup.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{grpc}"
[ttrpc]
  address = "{ttrpc}"
[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[{cri}]
  sandbox_image = "{pause}"
  # Root here cannot lower oom_score_adj; CRI's -998 for sandboxes would make runc fail.
  restrict_oom_score_adj = true
  # Port 0: several guards at once must not fight over CRI's default 10010.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "{runc_handler}"
    [{cri}.containerd.runtimes.{runc_handler}]
      runtime_type = "{runc_runtime}"
      [{cri}.containerd.runtimes.{runc_handler}.options]
        Root = "{runc_root}"
    [{cri}.containerd.runtimes.{podbox_handler}]
      runtime_type = "{podbox_runtime}"
      # CRI passes these pod annotations to the shim (the podbox config
      # still decides which it takes).
      pod_annotations = ["io.podbox.*"]
{podbox_options}  [{cri}.cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"#,
        root = paths.root.display(),
        state = paths.state.display(),
        grpc = paths.grpc.display(),
        ttrpc = paths.ttrpc.display(),
        opt = paths.opt.display(),
        pause = PAUSE_IMAGE,
        runc_handler = RUNC_HANDLER,
        runc_runtime = RUNC_RUNTIME,
        runc_root = paths.runc_root.display(),
        podbox_handler = PODBOX_HANDLER,
        podbox_runtime = PODBOX_RUNTIME,
        cni_bin = CNI_BIN_DIR,
        cni_conf = paths.cni_conf.display(),
    )
}

/// A bridge + host-local network private to one guard, with `portmap` for
/// hostPort mappings. The bridge holds the subnet's first address (isGateway),
/// so the host reaches pods and pods route through it; no masquerading, so no
/// traffic leaves the bridge. IPAM state lives in the guard's dir (not
/// /var/lib/cni), so nothing of it outlives the guard.
pub(super) fn cni_conflist(tag: &str, bridge: &str, subnet: &str, ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("podbox-test-{tag}"),
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": subnet }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": ipam_dir,
                },
            },
            { "type": "portmap", "capabilities": { "portMappings": true } },
        ],
    })
    .to_string()
}
