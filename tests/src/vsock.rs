//! Host-side helpers for talking to the vsock test helper in a guest
//! (tests/guest/vsock_helper.c) through podbox-vmm's hybrid vsock socket.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use podbox_agent_client::dial;

use crate::guest_image::{ECHO_PORT, SINK_PORT, SOURCE_PORT};

/// How long one stream may stay silent before an operation fails.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

fn open(socket: &Path, port: u32) -> io::Result<UnixStream> {
    let s = dial(socket, port, IO_TIMEOUT).map_err(|e| io::Error::other(e.to_string()))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Sends `data` to the guest's echo service and returns what came back.
/// Writing and reading run side by side: the echo service stops reading
/// when nobody takes its output (credit flow control), so a writer that
/// waited for the end before reading would deadlock.
pub fn echo(socket: &Path, data: &[u8]) -> io::Result<Vec<u8>> {
    let stream = open(socket, ECHO_PORT)?;
    let mut writer = stream.try_clone()?;
    let out = data.to_vec();
    let sender = std::thread::spawn(move || -> io::Result<()> {
        writer.write_all(&out)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut back = Vec::with_capacity(data.len());
    let mut reader = stream;
    let read = reader.read_to_end(&mut back);
    sender
        .join()
        .map_err(|_| io::Error::other("writer thread panicked"))??;
    read?;
    Ok(back)
}

/// Sends `data` to the guest's sink; returns the byte count and FNV-1a 64
/// hash the guest computed over what it received.
pub fn sink(socket: &Path, data: &[u8]) -> io::Result<(u64, u64)> {
    let mut stream = open(socket, SINK_PORT)?;
    stream.write_all(data)?;
    stream.shutdown(Shutdown::Write)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let count = parts.next().and_then(|c| c.parse().ok());
    let hash = parts.next().and_then(|h| u64::from_str_radix(h, 16).ok());
    match (count, hash) {
        (Some(c), Some(h)) => Ok((c, h)),
        _ => Err(io::Error::other(format!("sink replied {line:?}"))),
    }
}

/// Asks the guest's source for `len` bytes and returns them.
pub fn source(socket: &Path, len: u64) -> io::Result<Vec<u8>> {
    let mut stream = open(socket, SOURCE_PORT)?;
    stream.write_all(format!("{len}\n").as_bytes())?;
    let mut data = Vec::with_capacity(len as usize);
    stream.read_to_end(&mut data)?;
    Ok(data)
}

/// Deterministic pseudo-random bytes (xorshift), distinct per `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
