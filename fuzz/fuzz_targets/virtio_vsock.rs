//! virtio-vsock: guest TX and RX chains through the device worker
//! (`devices::virtio::vsock::device::Worker`): packet headers parsed from
//! guest memory, the muxer's connection state machine and credit, RX
//! packets written back. The host side is real unix sockets: a listener
//! at `<socket>_1024` (so guest REQUESTs to port 1024 connect), and host
//! clients that send `CONNECT` lines and data.

#![no_main]

use std::cell::RefCell;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use podbox_fuzz::{decode, eventfd, guest_memory, Blob, QueueSpec};
use podbox_vmm::devices::virtio::vsock::device::Worker;
use podbox_vmm::devices::virtio::vsock::Muxer;
use podbox_vmm::devices::virtio::Interrupt;
use vmm_sys_util::epoll::EpollEvent;

const GUEST_CID: u64 = 3;
const QUEUE_MAX: u16 = 256;

#[derive(Debug, Arbitrary)]
enum Step {
    /// One turn of the device's event loop (sockets, then TX, then RX).
    Round,
    Tx,
    Rx,
    /// The guest writes its memory (payloads, ring updates).
    Guest(Blob),
    /// A host client connects and sends `line` (normally `CONNECT <port>\n`).
    HostConnect(Vec<u8>),
    /// The host end of a stream the guest opened to port 1024 is accepted.
    HostAccept,
    /// Bytes from a host socket (clients first, then accepted streams).
    HostSend(u8, Vec<u8>),
    HostClose(u8),
}

#[derive(Debug, Arbitrary)]
struct Input {
    rx: QueueSpec,
    tx: QueueSpec,
    blobs: Vec<Blob>,
    steps: Vec<Step>,
}

struct Host {
    dir: PathBuf,
    listener: UnixListener,
}

thread_local! {
    static HOST: RefCell<Option<Host>> = const { RefCell::new(None) };
}

fn host_dir() -> PathBuf {
    HOST.with(|h| {
        let mut h = h.borrow_mut();
        let host = h.get_or_insert_with(|| {
            let dir =
                std::env::temp_dir().join(format!("podbox-fuzz-vsock-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("fuzz socket dir");
            let listener = UnixListener::bind(dir.join("v.sock_1024")).expect("bind _1024");
            listener.set_nonblocking(true).expect("nonblocking");
            Host { dir, listener }
        });
        host.dir.clone()
    })
}

fn accept() -> Option<UnixStream> {
    HOST.with(|h| {
        let h = h.borrow();
        let (s, _) = h.as_ref()?.listener.accept().ok()?;
        s.set_nonblocking(true).ok()?;
        Some(s)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = decode::<Input>(data) else {
        return;
    };
    let mem = guest_memory();
    let ev = QueueSpec {
        size_log2: 0,
        descs: vec![],
        avail: vec![],
        avail_idx: None,
        avail_flags: 0,
    };
    let (Some(rx), Some(tx), Some(ev)) = (
        input.rx.build(&mem, 0, QUEUE_MAX),
        input.tx.build(&mem, 1, QUEUE_MAX),
        ev.build(&mem, 2, QUEUE_MAX),
    ) else {
        return;
    };
    for b in &input.blobs {
        b.write(&mem);
    }
    let dir = host_dir();
    let socket = dir.join("v.sock");
    let muxer = Muxer::new(GUEST_CID, &socket).expect("muxer");
    let interrupt = Arc::new(Interrupt::new(eventfd()));
    let mut worker = Worker::new(muxer, mem.clone(), vec![rx, tx, ev], interrupt);
    let mut events = vec![EpollEvent::default(); 64];
    let mut streams: Vec<UnixStream> = Vec::new();
    for step in input.steps.iter().take(64) {
        match step {
            Step::Round => worker.round(0, &mut events).expect("epoll"),
            Step::Tx => {
                worker.process_tx();
            }
            Step::Rx => {
                worker.process_rx();
            }
            Step::Guest(b) => b.write(&mem),
            Step::HostConnect(line) => {
                if streams.len() < 16 {
                    if let Ok(mut s) = UnixStream::connect(&socket) {
                        let _ = s.set_nonblocking(true);
                        let _ = s.write(line);
                        streams.push(s);
                    }
                }
            }
            Step::HostAccept => {
                if streams.len() < 16 {
                    streams.extend(accept());
                }
            }
            Step::HostSend(i, bytes) => {
                let n = streams.len().max(1);
                if let Some(s) = streams.get_mut(usize::from(*i) % n) {
                    let _ = s.write(bytes);
                }
            }
            Step::HostClose(i) => {
                if !streams.is_empty() {
                    streams.remove(usize::from(*i) % streams.len());
                }
            }
        }
    }
    // A last turn, then nothing may be left behind for the next run.
    worker.round(0, &mut events).expect("epoll");
    drop(worker);
    drop(streams);
    while accept().is_some() {}
});
