//! The virtio-fs device (type 26) as a vhost-user frontend.
//!
//! The VMM only owns the control plane: feature negotiation with both the
//! guest (through the MMIO transport) and the backend (virtiofsd, over its
//! vhost-user socket), the config space (tag + number of request queues),
//! and handing the backend everything it needs to run the queues itself:
//! the guest memory table (memfd regions it maps), each queue's addresses,
//! the queue's KVM ioeventfd as its kick fd and the device's KVM irqfd as
//! its call fd. Requests then go guest -> KVM -> virtiofsd -> KVM -> guest
//! without passing through any VMM thread.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1,
};

/// The tag field of the config space (virtio 1.2, 5.11.4): UTF-8, not
/// NUL-terminated when it fills all 36 bytes.
pub const TAG_LEN: usize = podbox_vmm_config::FS_TAG_LEN;
/// One high-priority queue plus this many request queues.
const NUM_REQUEST_QUEUES: usize = 1;
const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES;
/// Large queues keep big reads in flight (QEMU's vhost-user-fs uses 1024 too).
const QUEUE_SIZE: u16 = 1024;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];
/// How long connecting may retry while the backend is binding its socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Guest-visible feature bits we pass through from the backend. Anything
/// else the backend offers (its own extensions) is not offered on.
const PASSTHROUGH_FEATURES: u64 = VIRTIO_F_VERSION_1
    | (1 << 28) // VIRTIO_RING_F_INDIRECT_DESC
    | (1 << 29); // VIRTIO_RING_F_EVENT_IDX
/// Protocol features we use when the backend has them: MQ (it tells us its
/// queue count) and REPLY_ACK (every message is acknowledged, so a setup
/// failure shows up at the message that caused it).
const WANTED_PROTOCOL: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::MQ.union(VhostUserProtocolFeatures::REPLY_ACK);

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {0:?}: must be 1 to {TAG_LEN} bytes")]
    Tag(String),
    #[error("connecting to the vhost-user backend at {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        source: vhost::Error,
    },
    #[error("vhost-user {step}: {source}")]
    Protocol {
        step: &'static str,
        source: vhost::Error,
    },
    #[error("the vhost-user backend offers features {0:#x} without VIRTIO_F_VERSION_1")]
    NotModern(u64),
    #[error("the vhost-user backend serves {got} queues, virtio-fs needs {NUM_QUEUES}")]
    QueueCount { got: u64 },
}

/// A virtio-fs device whose requests are served by a vhost-user backend.
pub struct VhostUserFs {
    config: [u8; TAG_LEN + 4],
    frontend: Frontend,
    /// The backend's virtio features (minus the vhost-user-only bit).
    backend_features: u64,
    activated: bool,
}

impl VhostUserFs {
    /// Connects to the backend at `socket` and negotiates what can be
    /// negotiated before the guest driver shows up (owner, protocol
    /// features), so that the features offered to the guest are the
    /// backend's.
    pub fn connect(socket: &Path, tag: &str) -> Result<Self, FsError> {
        let config = config_space(tag)?;
        let frontend = connect_with_retry(socket)?;
        let proto = |step| move |source| FsError::Protocol { step, source };
        frontend.set_owner().map_err(proto("SET_OWNER"))?;
        let features = frontend.get_features().map_err(proto("GET_FEATURES"))?;
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::NotModern(features));
        }
        let mut frontend = frontend;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & protocol_bit != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(proto("GET_PROTOCOL_FEATURES"))?;
            let used = offered & WANTED_PROTOCOL;
            frontend
                .set_protocol_features(used)
                .map_err(proto("SET_PROTOCOL_FEATURES"))?;
            if used.contains(VhostUserProtocolFeatures::MQ) {
                let got = frontend.get_queue_num().map_err(proto("GET_QUEUE_NUM"))?;
                if got < NUM_QUEUES as u64 {
                    return Err(FsError::QueueCount { got });
                }
            }
            tracing::debug!("virtio-fs: backend protocol features {offered:?}, using {used:?}");
        }
        tracing::info!(
            "virtio-fs: backend at {} offers features {features:#x}",
            socket.display()
        );
        Ok(Self {
            config,
            frontend,
            backend_features: features,
            activated: false,
        })
    }

    /// Everything from SET_FEATURES to enabling the rings; the guest's
    /// queues are valid (the transport checked) and its memory is shared.
    fn setup_backend(&mut self, ctx: &ActivateContext) -> Result<(), String> {
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features =
            (ctx.acked_features & self.features()) | (self.backend_features & protocol_bit);
        let step = |name: &'static str| move |e: vhost::Error| format!("{name}: {e}");
        self.frontend
            .set_features(features)
            .map_err(step("SET_FEATURES"))?;
        let regions = memory_table(&ctx.memory)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(step("SET_MEM_TABLE"))?;
        for (i, q) in ctx.queues.iter().enumerate() {
            let queue = &q.queue;
            let hva = |gpa: u64| {
                ctx.memory
                    .get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|e| format!("queue {i}: address {gpa:#x}: {e}"))
            };
            // vhost-user carries ring addresses as frontend virtual
            // addresses; the backend translates them through the mem table.
            let vring = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: hva(queue.desc_table())?,
                used_ring_addr: hva(queue.used_ring())?,
                avail_ring_addr: hva(queue.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, queue.size())
                .map_err(step("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &vring)
                .map_err(step("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, queue.next_avail())
                .map_err(step("SET_VRING_BASE"))?;
            // The backend raises the device's KVM irqfd itself and is kicked
            // by the queue's KVM ioeventfd: no VMM thread on the data path.
            self.frontend
                .set_vring_call(i, ctx.interrupt.irqfd())
                .map_err(step("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &q.notify)
                .map_err(step("SET_VRING_KICK"))?;
        }
        if features & protocol_bit != 0 {
            // With protocol features, rings start disabled (vhost-user spec).
            for i in 0..ctx.queues.len() {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}

/// The config space: `struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }`.
fn config_space(tag: &str) -> Result<[u8; TAG_LEN + 4], FsError> {
    if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
        return Err(FsError::Tag(tag.to_owned()));
    }
    let mut config = [0u8; TAG_LEN + 4];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config[TAG_LEN..].copy_from_slice(&(NUM_REQUEST_QUEUES as u32).to_le_bytes());
    Ok(config)
}

/// The backend binds its socket before it listens: retry refused and
/// missing sockets for a short while.
fn connect_with_retry(socket: &Path) -> Result<Frontend, FsError> {
    let start = Instant::now();
    loop {
        match Frontend::connect(socket, NUM_QUEUES as u64) {
            Ok(f) => return Ok(f),
            Err(e) if start.elapsed() < CONNECT_TIMEOUT => {
                tracing::debug!(
                    "virtio-fs: connecting to {}: {e}; retrying",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(FsError::Connect {
                    socket: socket.to_owned(),
                    source,
                })
            }
        }
    }
}

/// One entry per guest RAM region: its file descriptor and offset, so the
/// backend can map the same pages.
fn memory_table(memory: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, String> {
    memory
        .iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r)
                .map_err(|e| format!("guest region at {:#x} has no shareable file ({e}); memory must be memfd-backed", r.start_addr().0))
        })
        .collect()
}

impl VirtioDevice for VhostUserFs {
    fn name(&self) -> &'static str {
        "virtio-fs"
    }

    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.backend_features & PASSTHROUGH_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let fail = |detail: String| ActivateError::Failed {
            device: "virtio-fs",
            detail,
        };
        if ctx.queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                device: "virtio-fs",
                expected: NUM_QUEUES,
                got: ctx.queues.len(),
            });
        }
        if self.activated {
            return Err(fail("activated twice".into()));
        }
        self.setup_backend(&ctx).map_err(fail)?;
        // The backend raises the irqfd without touching InterruptStatus; a
        // Linux virtio-mmio driver only looks at the used rings when that
        // register says so. Keep the used-ring bit set: a spurious check of
        // the rings costs the guest a few reads.
        ctx.interrupt.report_used_ring_always();
        self.activated = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_fs_config_space_is_tag_then_queue_count() {
        let c = config_space("podbox").unwrap();
        assert_eq!(&c[..6], b"podbox");
        assert!(c[6..TAG_LEN].iter().all(|&b| b == 0));
        assert_eq!(u32::from_le_bytes(c[TAG_LEN..].try_into().unwrap()), 1);
        assert!(config_space(&"x".repeat(TAG_LEN)).is_ok());
        assert!(matches!(
            config_space(&"x".repeat(TAG_LEN + 1)),
            Err(FsError::Tag(_))
        ));
        assert!(matches!(config_space(""), Err(FsError::Tag(_))));
    }

    #[test]
    fn virtio_fs_connect_to_a_missing_socket_fails_within_the_timeout() {
        let start = Instant::now();
        let err = VhostUserFs::connect(Path::new("/nonexistent/fs.sock"), "t")
            .err()
            .unwrap();
        assert!(matches!(err, FsError::Connect { .. }), "{err}");
        assert!(start.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(2));
    }

    #[test]
    fn virtio_fs_memory_table_needs_file_backed_memory() {
        let anon = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(memory_table(&anon).err().unwrap().contains("memfd"));
    }
}
