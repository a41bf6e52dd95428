//! The request loop: send one message, collect the kernel's replies until its
//! acknowledgement (or the end of a dump), map an error reply to `Error::Kernel`.

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Replies are read into this much memory at a time; a dump part the kernel
/// sends is at most one page-sized skb unless the socket asked for more, so
/// 64 KiB is ample. A truncated datagram is an error, never a partial parse.
const RECV_BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink {what}: {source}")]
    Kernel {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("netlink {what}: cannot parse the kernel's reply: {detail}")]
    Decode { what: String, detail: String },
    #[error("netlink {what}: {detail}")]
    Unexpected { what: String, detail: String },
}

impl Error {
    /// The errno of a request the kernel refused (EEXIST, ENOENT, ...).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// A NETLINK_ROUTE socket in the network namespace of the thread that opened
/// it (it stays there if the thread later moves).
pub struct Netlink {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Netlink {
    pub fn open() -> Result<Netlink, Error> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(Error::Socket)?;
        socket.bind_auto().map_err(Error::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(Error::Socket)?;
        // Ask for extended error messages where the kernel has them; not
        // fatal where it does not.
        let _ = socket.set_ext_ack(true);
        Ok(Netlink {
            socket,
            sequence: 0,
            buffer: vec![0; RECV_BUFFER],
        })
    }

    /// A dump (`RTM_GET*` with NLM_F_DUMP): every message up to NLMSG_DONE.
    pub fn dump(
        &mut self,
        what: &str,
        message: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, Error> {
        self.request(what, message, NLM_F_DUMP)
    }

    /// A change (`RTM_NEW*`, `RTM_DEL*`, `RTM_SETLINK`) with `flags` such as
    /// NLM_F_CREATE | NLM_F_EXCL, acknowledged by the kernel.
    pub fn change(
        &mut self,
        what: &str,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), Error> {
        self.request(what, message, flags | NLM_F_ACK).map(|_| ())
    }

    /// Sends one request and returns the messages of its reply, once the
    /// kernel has acknowledged it or ended the dump.
    pub fn request(
        &mut self,
        what: &str,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, Error> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut packet =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = self.sequence;
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket
            .send(&bytes, 0)
            .map_err(|source| Error::Kernel {
                what: what.to_string(),
                source,
            })?;
        self.replies(
            what,
            flags & NLM_F_DUMP == NLM_F_DUMP,
            flags & NLM_F_ACK != 0,
        )
    }

    fn replies(
        &mut self,
        what: &str,
        dump: bool,
        ack: bool,
    ) -> Result<Vec<RouteNetlinkMessage>, Error> {
        let mut out = Vec::new();
        loop {
            let size = self
                .socket
                .recv(&mut &mut self.buffer[..], libc::MSG_TRUNC)
                .map_err(|source| Error::Kernel {
                    what: what.to_string(),
                    source,
                })?;
            if size > self.buffer.len() {
                return Err(Error::Unexpected {
                    what: what.to_string(),
                    detail: format!("a {size}-byte reply exceeds {RECV_BUFFER} bytes"),
                });
            }
            let mut offset = 0;
            while offset < size {
                let reply: NetlinkMessage<RouteNetlinkMessage> =
                    NetlinkMessage::deserialize(&self.buffer[offset..size]).map_err(|e| {
                        Error::Decode {
                            what: what.to_string(),
                            detail: e.to_string(),
                        }
                    })?;
                let length = reply.header.length as usize;
                if reply.header.sequence_number != self.sequence {
                    // A stale reply to an earlier request: skip it.
                } else {
                    match reply.payload {
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::Error(e) => match e.code {
                            None => return Ok(out),
                            Some(_) => {
                                return Err(Error::Kernel {
                                    what: what.to_string(),
                                    source: e.to_io(),
                                })
                            }
                        },
                        NetlinkPayload::InnerMessage(m) => {
                            out.push(m);
                            if !dump && !ack {
                                return Ok(out);
                            }
                        }
                        _ => {}
                    }
                }
                if length == 0 {
                    break;
                }
                // Messages in one datagram start on 4-byte boundaries.
                offset += (length + 3) & !3;
            }
        }
    }
}
