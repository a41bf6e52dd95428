//! Guest → tap: each TX chain is one frame, its virtio-net header first.
//!
//! A chain is checked ([`chain::collect`]), copied out, returned to the
//! guest at once, and its frame written to the tap. A malformed chain is
//! returned too (so the guest does not wait for it) and counted. When the
//! tap cannot take a frame (EAGAIN) the frame waits in the device and the
//! queue is left alone until epoll says the tap is writable.

use std::io::ErrorKind;

use virtio_queue::QueueT;

use super::chain;
use super::device::{NetCounters, Worker, TX};
use super::header::{check_tx_header, HDR_LEN, MAX_TX_FRAME};
use super::tap::Backend;

/// Frames taken per round before RX gets its turn.
const TX_BUDGET: usize = 256;

impl<B: Backend> Worker<B> {
    /// Moves the guest's frames to the tap until the queue is empty, the
    /// tap is full or the budget is spent.
    pub(super) fn process_tx(&mut self) {
        if self.tx.pending > 0 && !self.send_tx(self.tx.pending) {
            return;
        }
        let mut budget = TX_BUDGET;
        loop {
            // No kicks while we drain anyway: each costs the guest an exit.
            if let Err(e) = self.queues[TX].disable_notification(&*self.mem) {
                tracing::debug!("{}: TX disable_notification: {e}", self.label);
            }
            while let Some(chain) = self.queues[TX].pop_descriptor_chain(self.mem.clone()) {
                let head = chain.head_index();
                let frame = self.copy_tx_chain(chain);
                self.complete(TX, head, 0);
                if let Some(len) = frame {
                    if !self.send_tx(len) {
                        // Notifications stay off: the tap's EPOLLOUT wakes us.
                        return;
                    }
                }
                budget -= 1;
                if budget == 0 {
                    self.come_back_for_tx();
                    return;
                }
            }
            match self.queues[TX].enable_notification(&*self.mem) {
                Ok(true) => continue, // more arrived while notifications were off
                Ok(false) => return,
                Err(e) => {
                    tracing::debug!("{}: TX enable_notification: {e}", self.label);
                    return;
                }
            }
        }
    }

    /// With notifications still off, the next round must happen without a
    /// kick: raise our own TX eventfd.
    fn come_back_for_tx(&self) {
        if let Some(kick) = &self.tx.kick {
            if let Err(e) = kick.write(1) {
                tracing::warn!("{}: TX self-notify: {e}", self.label);
            }
        }
    }

    /// Checks one chain and copies its frame into `tx.buf`; returns the
    /// length with header, or None for a malformed chain (counted).
    fn copy_tx_chain(&mut self, chain: virtio_queue::DescriptorChain<chain::Mem>) -> Option<usize> {
        let counters = self.counters.clone();
        let malformed = |this: &Self, what: &str, detail: &dyn std::fmt::Display| {
            counters.note(&this.label, &counters.tx_malformed, what, detail);
            None
        };
        let total = match chain::collect(
            &self.mem,
            chain,
            false,
            HDR_LEN + MAX_TX_FRAME,
            &mut self.segs,
        ) {
            Ok(total) => total,
            Err(e) => return malformed(self, "bad TX chain dropped", &e),
        };
        if total < HDR_LEN {
            return malformed(
                self,
                "TX chain dropped",
                &format!("{total} bytes, shorter than the header"),
            );
        }
        let len = match chain::read_all(&self.mem, &self.segs, &mut self.tx.buf) {
            Ok(len) => len,
            Err(e) => return malformed(self, "TX chain unreadable", &e),
        };
        let mut hdr = [0u8; HDR_LEN];
        hdr.copy_from_slice(&self.tx.buf[..HDR_LEN]);
        if let Err(e) = check_tx_header(&hdr, len - HDR_LEN, self.acked) {
            return malformed(self, "TX frame dropped", &e);
        }
        Some(len)
    }

    /// Writes the frame in `tx.buf`; false when the tap is full (the frame
    /// then waits as `tx.pending`).
    pub(super) fn send_tx(&mut self, len: usize) -> bool {
        let counters = &self.counters;
        loop {
            match self.backend.write_frame(&self.tx.buf[..len]) {
                Ok(_) => {
                    NetCounters::add(&counters.tx_frames, 1);
                    NetCounters::add(&counters.tx_bytes, (len - HDR_LEN) as u64);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.tx.pending = len;
                    return false;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // The tap's own header check (virtio_net_hdr_to_skb).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => counters.note(
                    &self.label,
                    &counters.tx_malformed,
                    "tap refused a TX frame",
                    &e,
                ),
                // EIO: the host side of the tap is down.
                Err(e) => counters.note(&self.label, &counters.tx_dropped, "TX frame lost", &e),
            }
            self.tx.pending = 0;
            return true;
        }
    }
}
