//! Tap → guest: one frame at a time is read from the tap into the device's
//! buffer and copied into the guest's RX buffers.
//!
//! With VIRTIO_NET_F_MRG_RXBUF a frame may span several chains (the first
//! header's `num_buffers` says how many); without it, one chain must hold
//! it. When the guest has too few buffers, the chains taken are put back,
//! the frame stays in the device, and the tap is not read again until the
//! guest notifies the RX queue: nothing is dropped for lack of buffers.

use std::io::ErrorKind;

use virtio_queue::{QueueOwnedT, QueueT};

use super::chain::{self, Segment};
use super::device::{NetCounters, Worker, RX};
use super::header::{fix_rx_header, F_MRG_RXBUF, HDR_LEN, NUM_BUFFERS_OFFSET};
use super::tap::Backend;
use crate::devices::virtio::pop_chain;

/// Turns (tap reads, delivery attempts) per round before TX gets its
/// turn: the tap stays readable, or the worker raises the RX eventfd for a
/// frame still waiting, so the event loop comes back.
const RX_BUDGET: usize = 256;
/// An Ethernet header: anything shorter from the tap is not a frame.
const ETH_HLEN: usize = 14;

/// What became of the frame waiting in `rx.buf`.
enum Delivery {
    Done,
    /// Malformed buffers or no way to fit it: gone (counted).
    Dropped,
    /// Not enough guest buffers now: it waits.
    NoBuffers,
    /// A malformed chain came first and was returned: try again with the
    /// next one (each retry costs budget: the guest can refill its ring as
    /// fast as bad chains are returned).
    Retry,
}

/// What one read of the tap gave.
enum TapRead {
    Frame(usize),
    Skipped,
    Empty,
}

impl<B: Backend> Worker<B> {
    /// Delivers frames until the tap is empty, the guest is out of
    /// buffers, or the budget is spent. Each tap read and each delivery
    /// attempt (a bad chain returned included) costs budget.
    pub(super) fn process_rx(&mut self) {
        self.process_rx_within(RX_BUDGET);
    }

    /// [`process_rx`](Self::process_rx) with `budget` turns.
    pub(super) fn process_rx_within(&mut self, budget: usize) {
        if self.rx.blocked {
            return;
        }
        for _ in 0..budget {
            if self.rx.pending == 0 {
                match self.read_tap() {
                    TapRead::Frame(n) => self.rx.pending = n,
                    TapRead::Skipped => continue,
                    TapRead::Empty => return,
                }
            }
            match self.try_deliver_rx() {
                Delivery::Done | Delivery::Dropped => self.rx.pending = 0,
                // The frame stays for the next chain.
                Delivery::Retry => {}
                Delivery::NoBuffers => {
                    self.rx.blocked = true;
                    return;
                }
            }
        }
        if self.rx.pending > 0 {
            // The tap may have nothing more to wake us for this frame.
            self.come_back_for(RX);
        }
    }

    fn read_tap(&mut self) -> TapRead {
        let counters = &self.counters;
        loop {
            return match self.backend.read_frame(&mut self.rx.buf) {
                Ok(n) if n < HDR_LEN + ETH_HLEN => {
                    let detail = format!("{n} bytes");
                    counters.note(
                        &self.label,
                        &counters.rx_dropped,
                        "short frame from the tap",
                        &detail,
                    );
                    TapRead::Skipped
                }
                Ok(n) if n >= self.rx.buf.len() => {
                    let detail = format!("{n} bytes or more");
                    counters.note(
                        &self.label,
                        &counters.rx_dropped,
                        "oversize frame from the tap",
                        &detail,
                    );
                    TapRead::Skipped
                }
                Ok(n) => match fix_rx_header(&mut self.rx.buf[..HDR_LEN], self.acked) {
                    Ok(()) => TapRead::Frame(n),
                    Err(e) => {
                        let what = "frame from the tap the guest did not negotiate";
                        counters.note(&self.label, &counters.rx_dropped, what, &e);
                        TapRead::Skipped
                    }
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => TapRead::Empty,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    counters.note(&self.label, &counters.rx_dropped, "reading the tap", &e);
                    TapRead::Empty
                }
            };
        }
    }

    /// Puts back the `n` chains last taken from the RX queue, untouched
    /// as far as the guest can tell (nothing was marked used).
    fn put_back_rx(&mut self, n: usize) {
        for _ in 0..n {
            self.queues[RX].go_to_previous_position();
        }
    }

    /// Copies the pending frame into as many RX chains as it needs (one
    /// without MRG_RXBUF) and marks them used.
    fn try_deliver_rx(&mut self) -> Delivery {
        let frame_len = self.rx.pending;
        let mergeable = self.acked & F_MRG_RXBUF != 0;
        let max_chains = if mergeable {
            usize::from(self.queues[RX].size())
        } else {
            1
        };
        self.rx.held.clear();
        let mut placed = 0;
        while placed < frame_len {
            if self.rx.held.len() == max_chains {
                return self.frame_does_not_fit(frame_len, placed);
            }
            let chain = match pop_chain(&mut self.queues[RX], self.mem.clone()) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    self.put_back_rx(self.rx.held.len());
                    return Delivery::NoBuffers;
                }
                // Until the guest rewrites its avail idx: like no buffers,
                // the frame waits for the next RX notify.
                Err(e) => {
                    self.put_back_rx(self.rx.held.len());
                    self.ring_broken(RX, &e);
                    return Delivery::NoBuffers;
                }
            };
            let head = chain.head_index();
            let first = self.rx.held.is_empty();
            let segs = if first {
                &mut self.rx.first
            } else {
                &mut self.segs
            };
            let capacity = match chain::collect(&self.mem, chain, true, u32::MAX as usize, segs) {
                Ok(c) if c >= HDR_LEN => c,
                Ok(c) => {
                    let e = format!("{c} bytes, shorter than the header");
                    return self.bad_rx_chain(head, &e);
                }
                Err(e) => return self.bad_rx_chain(head, &e),
            };
            if !mergeable && capacity < frame_len {
                self.put_back_rx(1);
                return self.frame_does_not_fit(frame_len, capacity);
            }
            let n = capacity.min(frame_len - placed);
            let segs: &[Segment] = if first { &self.rx.first } else { &self.segs };
            if let Err(e) = chain::write_at(&self.mem, segs, 0, &self.rx.buf[placed..placed + n]) {
                return self.bad_rx_chain(head, &e);
            }
            self.rx.held.push((head, n as u32));
            placed += n;
        }
        self.finish_rx(frame_len)
    }

    /// Writes num_buffers and hands the chains to the guest.
    fn finish_rx(&mut self, frame_len: usize) -> Delivery {
        let count = self.rx.held.len() as u16;
        if let Err(e) = chain::write_at(
            &self.mem,
            &self.rx.first,
            NUM_BUFFERS_OFFSET,
            &count.to_le_bytes(),
        ) {
            // Checked memory that cannot be written: give everything back empty.
            let held = std::mem::take(&mut self.rx.held);
            for &(head, _) in &held {
                self.complete(RX, head, 0);
            }
            self.rx.held = held;
            let c = &self.counters;
            c.note(&self.label, &c.rx_dropped, "RX header not written", &e);
            return Delivery::Dropped;
        }
        let held = std::mem::take(&mut self.rx.held);
        for &(head, len) in &held {
            self.complete(RX, head, len);
        }
        self.rx.held = held;
        NetCounters::add(&self.counters.rx_frames, 1);
        NetCounters::add(&self.counters.rx_bytes, (frame_len - HDR_LEN) as u64);
        Delivery::Done
    }

    /// A frame larger than one buffer (no MRG_RXBUF), or than the whole
    /// ring: it could never be delivered, so it is dropped rather than
    /// stalling RX for ever. Chains taken for it go back untouched.
    fn frame_does_not_fit(&mut self, frame_len: usize, room: usize) -> Delivery {
        self.put_back_rx(self.rx.held.len());
        let detail = format!("{frame_len} bytes with header, room for {room}");
        let c = &self.counters;
        c.note(
            &self.label,
            &c.rx_dropped,
            "RX frame larger than the guest's buffers",
            &detail,
        );
        Delivery::Dropped
    }

    /// A malformed RX chain: it and every chain already holding part of
    /// this frame are returned empty, in order (Linux drops used buffers
    /// shorter than a header), and the frame is lost. A bad chain taken
    /// first costs no frame: the next chain is tried.
    fn bad_rx_chain(&mut self, head: u16, detail: &dyn std::fmt::Display) -> Delivery {
        let c = self.counters.clone();
        c.note(
            &self.label,
            &c.rx_malformed,
            "bad RX chain returned empty",
            detail,
        );
        let held = std::mem::take(&mut self.rx.held);
        for &(h, _) in &held {
            self.complete(RX, h, 0);
        }
        self.complete(RX, head, 0);
        if held.is_empty() {
            self.rx.held = held;
            return Delivery::Retry;
        }
        self.rx.held = held;
        c.note(
            &self.label,
            &c.rx_dropped,
            "RX frame lost to a bad chain",
            &"",
        );
        Delivery::Dropped
    }
}
