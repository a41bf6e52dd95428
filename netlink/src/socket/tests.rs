//! The reply parser on datagrams made here: what ends a reply, and how a
//! dump that failed or was interrupted part-way is told from a whole one.

use netlink_packet_core::{DoneMessage, ErrorMessage};
use netlink_packet_route::link::LinkMessage;

use super::*;

const SEQUENCE: u32 = 7;

fn reply(single: bool) -> Reply<'static> {
    Reply {
        what: "list interfaces",
        sequence: SEQUENCE,
        single,
        messages: Vec::new(),
        interrupted: false,
    }
}

fn bytes(payload: NetlinkPayload<RouteNetlinkMessage>, sequence: u32, flags: u16) -> Vec<u8> {
    let mut message = NetlinkMessage::new(NetlinkHeader::default(), payload);
    message.header.sequence_number = sequence;
    message.header.flags = flags;
    message.finalize();
    let mut out = vec![0; message.buffer_len()];
    message.serialize(&mut out);
    out
}

fn link(sequence: u32, flags: u16) -> Vec<u8> {
    bytes(
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(LinkMessage::default())),
        sequence,
        flags,
    )
}

fn done(code: i32, flags: u16) -> Vec<u8> {
    let mut message = DoneMessage::default();
    message.code = code;
    bytes(NetlinkPayload::Done(message), SEQUENCE, flags)
}

#[test]
fn a_dump_is_its_messages_up_to_done_across_datagrams_skipping_stale_ones() {
    let mut r = reply(false);
    let first = [link(SEQUENCE, 0), link(SEQUENCE - 1, 0), link(SEQUENCE, 0)].concat();
    assert!(!r.datagram(&first).unwrap(), "no DONE yet");
    assert!(r
        .datagram(&[link(SEQUENCE, 0), done(0, 0)].concat())
        .unwrap());
    assert_eq!(r.finish().unwrap().len(), 3, "the stale one is skipped");
}

#[test]
fn a_dump_that_done_ends_with_an_error_code_is_a_kernel_error() {
    let mut r = reply(false);
    assert!(!r.datagram(&link(SEQUENCE, 0)).unwrap());
    let err = r.datagram(&done(-libc::EMSGSIZE, 0)).expect_err("aborted");
    assert_eq!(err.errno(), Some(libc::EMSGSIZE), "{err}");
    assert!(err.to_string().contains("list interfaces"), "{err}");
}

#[test]
fn an_interrupted_dump_is_reported_as_such() {
    let mut r = reply(false);
    let datagram = [link(SEQUENCE, NLM_F_DUMP_INTR), done(0, NLM_F_DUMP_INTR)].concat();
    assert!(r.datagram(&datagram).unwrap(), "read to its end");
    assert!(matches!(
        r.finish(),
        Err(Error::Interrupted { attempts: 1, .. })
    ));
}

#[test]
fn acks_refusals_and_plain_gets() {
    let mut ack = reply(false);
    let mut message = ErrorMessage::default();
    message.code = None;
    assert!(ack
        .datagram(&bytes(NetlinkPayload::Error(message), SEQUENCE, 0))
        .unwrap());
    assert!(ack.finish().unwrap().is_empty());

    let mut refused = reply(false);
    let mut message = ErrorMessage::default();
    message.code = std::num::NonZeroI32::new(-libc::EEXIST);
    let err = refused
        .datagram(&bytes(NetlinkPayload::Error(message), SEQUENCE, 0))
        .expect_err("EEXIST");
    assert_eq!(err.errno(), Some(libc::EEXIST));

    let mut get = reply(true);
    assert!(get.datagram(&link(SEQUENCE, 0)).unwrap(), "its one message");
    assert_eq!(get.finish().unwrap().len(), 1);
}
