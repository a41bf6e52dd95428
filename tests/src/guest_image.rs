//! The podbox guest image (the agent as /init, from `guest-image/build.sh`)
//! and the vsock test image built on it.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use podbox_vmm_config::{VmConfig, VsockConfig};

use crate::guest::{compile_static_c, prepared_output};
use crate::initramfs::Initramfs;
use crate::repo_root;

/// Guest vsock ports of the test helper (tests/guest/vsock_helper.c).
pub const ECHO_PORT: u32 = 5000;
pub const SINK_PORT: u32 = 5001;
pub const SOURCE_PORT: u32 = 5002;
/// Host port the helper connects to once at start, writing [`GUEST_HELLO`].
pub const HOST_HELLO_PORT: u32 = 6000;
pub const GUEST_HELLO: &str = "guest-hello\n";
/// The kernel command line that boots the test image: the helper starts its
/// services and execs the agent, which stays PID 1.
pub const TEST_IMAGE_CMDLINE: &str = "quiet rdinit=/podbox-test-init";

/// Path of the production guest image that `guest-image/build.sh` built
/// into its cache for the agent binary now in its target dir, looked up with
/// `--print-path` (no cargo, nothing installed); `PODBOX_INITRAMFS`
/// overrides it. Panics, naming the make target, where it is not built.
pub fn agent_initramfs() -> PathBuf {
    static FOUND: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    if let Some(path) = std::env::var_os("PODBOX_INITRAMFS") {
        return path.into();
    }
    let mut found = FOUND
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(path) = found.as_ref() {
        return path.clone();
    }
    let path = prepared_output("guest-image/build.sh", &[], "the guest image", IMAGE_REMEDY);
    *found = Some(path.clone());
    path
}

/// The guest image with the agent as before issue 11 (its source at
/// guest-image/build.sh's BASELINE_REV, built as then: `--baseline`), for
/// `podbox-bench agent-boot` and `pods`.
pub fn baseline_initramfs() -> PathBuf {
    prepared_output(
        "guest-image/build.sh",
        &["--baseline"],
        "the baseline guest image",
        "run `make bench-agent-boot` or `guest-image/build.sh --baseline`",
    )
}

/// The commit whose agent source `--baseline` builds (BASELINE_REV in
/// guest-image/build.sh, the one place it is set), for tables.
pub fn baseline_rev() -> &'static str {
    include_str!("../../guest-image/build.sh")
        .lines()
        .find_map(|l| l.strip_prefix("BASELINE_REV="))
        .expect("guest-image/build.sh sets BASELINE_REV")
}

/// What builds the guest image and its static agent.
const IMAGE_REMEDY: &str =
    "run `make test-assets` (`make test` runs it first) or `guest-image/build.sh`";

/// The VM the vsock tests and benchmark boot: the test image
/// ([`vsock_test_initramfs`]) on 2 vCPUs with its vsock behind `socket`.
pub fn vsock_test_vm(kernel: &Path, initrd: PathBuf, socket: &Path) -> VmConfig {
    VmConfig {
        initrd: Some(initrd),
        cmdline: TEST_IMAGE_CMDLINE.into(),
        vcpus: 2,
        vsock: Some(VsockConfig {
            cid: 3,
            socket: socket.to_path_buf(),
        }),
        ..VmConfig::new(kernel)
    }
}

/// The production image with the vsock test helper appended as a second
/// cpio archive (the kernel unpacks both); boot it with
/// [`TEST_IMAGE_CMDLINE`]. Written into `dir`.
pub fn vsock_test_initramfs(dir: &Path) -> PathBuf {
    let helper = compile_static_c(dir, "vsock_helper", include_str!("../guest/vsock_helper.c"));
    let mut overlay = Initramfs::new();
    overlay
        .copy("podbox-test-init", 0o755, &helper)
        .expect("adding the helper");
    let mut image = std::fs::read(agent_initramfs()).expect("reading the guest image");
    image.extend_from_slice(&overlay.finish());
    let path = dir.join("vsock-test-initramfs.cpio");
    std::fs::write(&path, image).expect("writing the test image");
    path
}

/// The static agent that `guest-image/build.sh` built and put into the
/// image (in `$PODBOX_GUEST_TARGET_DIR`, default `<repo>/target/guest`).
pub fn agent_binary() -> PathBuf {
    agent_initramfs();
    let target = std::env::var_os("PODBOX_GUEST_TARGET_DIR")
        .map(|dir| repo_root().join(dir))
        .unwrap_or_else(|| repo_root().join("target/guest"));
    // The `guest` cargo profile guest-image/build.sh builds it with.
    let agent = target.join("x86_64-unknown-linux-gnu/guest/podbox-agent");
    assert!(
        agent.is_file(),
        "no agent binary at {}: {IMAGE_REMEDY}",
        agent.display()
    );
    agent
}

/// The production image with tests/guest/share_attacker.c as /init (it
/// forks the attack on the share as guest root, then execs the agent, kept
/// as /podbox-agent, which stays PID 1). Written into `dir`.
pub fn share_attacker_initramfs(dir: &Path) -> PathBuf {
    let attacker = compile_static_c(
        dir,
        "share_attacker",
        include_str!("../guest/share_attacker.c"),
    );
    let mut overlay = Initramfs::new();
    overlay
        .copy("init", 0o755, &attacker)
        .expect("adding the attacker")
        .copy("podbox-agent", 0o755, &agent_binary())
        .expect("adding the agent");
    let mut image = std::fs::read(agent_initramfs()).expect("reading the guest image");
    image.extend_from_slice(&overlay.finish());
    let path = dir.join("share-attacker-initramfs.cpio");
    std::fs::write(&path, image).expect("writing the test image");
    path
}

/// FNV-1a 64, as the helper's sink computes it.
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The byte the helper's source sends at offset `i`.
pub fn source_byte(i: u64) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3) & 0xff) as u8
}
