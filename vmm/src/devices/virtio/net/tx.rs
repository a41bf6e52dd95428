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
use crate::devices::virtio::pop_chain;

/// Turns (chains taken, passes over the queue) per round before RX gets
/// its turn.
const TX_BUDGET: usize = 256;

impl<B: Backend> Worker<B> {
    /// Moves the guest's frames to the tap until the queue is empty, the
    /// tap is full or the budget is spent. Every pass over the queue costs
    /// budget, so whatever the guest writes into its ring this returns.
    pub(super) fn process_tx(&mut self) {
        self.process_tx_within(TX_BUDGET);
    }

    /// [`process_tx`](Self::process_tx) with `budget` turns.
    pub(super) fn process_tx_within(&mut self, mut budget: usize) {
        if self.tx.pending > 0 && !self.send_tx(self.tx.pending) {
            return;
        }
        loop {
            // No kicks while we drain anyway: each costs the guest an exit.
            if let Err(e) = self.queues[TX].disable_notification(&*self.mem) {
                tracing::debug!("{}: TX disable_notification: {e}", self.label);
            }
            loop {
                if budget == 0 {
                    // Notifications stay off: we come back by ourselves.
                    self.come_back_for(TX);
                    return;
                }
                budget -= 1;
                let chain = match pop_chain(&mut self.queues[TX], self.mem.clone()) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => return self.tx_ring_broken(&e),
                };
                let head = chain.head_index();
                let frame = self.copy_tx_chain(chain);
                self.complete(TX, head, 0);
                if let Some(len) = frame {
                    if !self.send_tx(len) {
                        // Notifications stay off: the tap's EPOLLOUT wakes us.
                        return;
                    }
                }
            }
            match self.queues[TX].enable_notification(&*self.mem) {
                // More arrived while notifications were off (the guest may
                // not kick for it). A ring that only claims more is caught
                // by pop_chain on the next pass, and a guest that moves its
                // index back and forth runs into the budget.
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    tracing::debug!("{}: TX enable_notification: {e}", self.label);
                    return;
                }
            }
        }
    }

    /// The TX ring cannot be read: counted, and the queue is left with its
    /// notifications on, so nothing happens until the guest kicks again.
    fn tx_ring_broken(&mut self, e: &virtio_queue::Error) {
        self.ring_broken(TX, e);
        if let Err(e) = self.queues[TX].enable_notification(&*self.mem) {
            tracing::debug!("{}: TX enable_notification: {e}", self.label);
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
        if let Err(e) = check_tx_header(&hdr, &self.tx.buf[HDR_LEN..len], self.acked) {
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
