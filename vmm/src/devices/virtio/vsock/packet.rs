//! virtio-vsock packets: the 44-byte header (virtio 1.2, 5.10.6) parsed from
//! guest memory with every length checked, and written back for the RX queue.
//!
//! A TX descriptor chain is guest-controlled: it may be shorter than a
//! header, claim more payload than it carries, point outside guest memory,
//! loop, or be write-only. Each of those is an error here; the device drops
//! the packet (and answers RST where a connection is named) and goes on.

use std::io::Read;

use virtio_queue::{DescriptorChain, Reader};
use vm_memory::GuestMemoryMmap;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// The largest payload a packet may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("descriptor chain unusable: {0}")]
    Chain(String),
    #[error("chain holds {0} readable bytes, less than a header")]
    ShortHeader(usize),
    #[error("payload length {0} exceeds the {MAX_PKT_PAYLOAD}-byte maximum")]
    PayloadTooLarge(u32),
    #[error("header claims {claimed} payload bytes, chain carries {available}")]
    TruncatedPayload { claimed: u32, available: usize },
}

fn u16_at(b: &[u8; HDR_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8; HDR_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8; HDR_SIZE], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

impl Header {
    /// Decodes a header from its little-endian wire form.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        Self {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A packet the guest sent (TX queue), payload copied out of guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    pub hdr: Header,
    pub data: Vec<u8>,
}

impl TxPacket {
    /// Parses a packet from the readable bytes of a chain, all of which are
    /// guest-controlled.
    pub fn parse(bytes: &mut impl Read, available: usize) -> Result<Self, PacketError> {
        if available < HDR_SIZE {
            return Err(PacketError::ShortHeader(available));
        }
        let mut raw = [0u8; HDR_SIZE];
        bytes
            .read_exact(&mut raw)
            .map_err(|e| PacketError::Chain(e.to_string()))?;
        let hdr = Header::from_bytes(&raw);
        if hdr.len as usize > MAX_PKT_PAYLOAD {
            return Err(PacketError::PayloadTooLarge(hdr.len));
        }
        let rest = available - HDR_SIZE;
        if hdr.len as usize > rest {
            return Err(PacketError::TruncatedPayload {
                claimed: hdr.len,
                available: rest,
            });
        }
        let mut data = vec![0u8; hdr.len as usize];
        bytes
            .read_exact(&mut data)
            .map_err(|e| PacketError::Chain(e.to_string()))?;
        Ok(Self { hdr, data })
    }

    /// Parses the packet a TX descriptor chain carries.
    pub fn from_chain(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, PacketError> {
        let mut reader = Reader::new(mem, chain).map_err(|e| PacketError::Chain(e.to_string()))?;
        let available = reader.available_bytes();
        Self::parse(&mut reader, available)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 1024,
            len,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_little_endian() {
        let h = hdr(5);
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[24..28], &5u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn vsock_packet_parses_header_and_payload() {
        let mut wire = hdr(5).to_bytes().to_vec();
        wire.extend_from_slice(b"hello");
        let p = TxPacket::parse(&mut wire.as_slice(), wire.len()).unwrap();
        assert_eq!(p.data, b"hello");
        assert_eq!(p.hdr.dst_port, 1024);
    }

    #[test]
    fn vsock_malformed_packets_are_errors_not_panics() {
        // Shorter than a header.
        let short = [0u8; 10];
        assert_eq!(
            TxPacket::parse(&mut &short[..], short.len()),
            Err(PacketError::ShortHeader(10))
        );
        assert_eq!(
            TxPacket::parse(&mut &[][..], 0),
            Err(PacketError::ShortHeader(0))
        );
        // Claims more payload than it carries.
        let mut wire = hdr(100).to_bytes().to_vec();
        wire.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            TxPacket::parse(&mut wire.as_slice(), wire.len()),
            Err(PacketError::TruncatedPayload {
                claimed: 100,
                available: 3
            })
        );
        // Absurd lengths.
        for len in [u32::MAX, (MAX_PKT_PAYLOAD + 1) as u32] {
            let wire = hdr(len).to_bytes();
            assert_eq!(
                TxPacket::parse(&mut &wire[..], wire.len()),
                Err(PacketError::PayloadTooLarge(len))
            );
        }
        // A reader that lies about its size.
        let wire = hdr(0).to_bytes();
        assert!(matches!(
            TxPacket::parse(&mut &wire[..20], 44),
            Err(PacketError::Chain(_))
        ));
        // Garbage of every length never panics.
        let mut seed = 0x1234_5678u32;
        for n in 0..200usize {
            let bytes: Vec<u8> = (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            let _ = TxPacket::parse(&mut bytes.as_slice(), bytes.len());
            let _ = TxPacket::parse(&mut bytes.as_slice(), usize::MAX);
        }
    }
}
