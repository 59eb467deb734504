//! Hand-made MQTT 3.1.1 bytes, for tests that play a guest byte by byte (garbage, cut packets,
//! impersonation) and read exactly what Dom0 answers on the tty.

use std::time::{Duration, Instant};

use super::channel::GuestTty;

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

pub fn connect(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.push(4);
    body.push(0x02);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    string(client_id.as_bytes(), &mut body);
    packet(0x10, &body)
}

pub fn subscribe(pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    string(filter.as_bytes(), &mut body);
    body.push(qos);
    packet(0x82, &body)
}

pub fn publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic.as_bytes(), &mut body);
    body.extend_from_slice(payload);
    packet(0x30, &body)
}

pub fn publish_qos1(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic.as_bytes(), &mut body);
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// Splits a byte stream into whole packets: (first byte, body). A trailing partial packet is left.
pub fn packets(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    loop {
        let Some(&b1) = rest.first() else { return out };
        let mut len = 0usize;
        let mut i = 1;
        loop {
            let Some(&b) = rest.get(i) else { return out };
            len |= usize::from(b & 0x7F) << (7 * (i - 1));
            i += 1;
            if b & 0x80 == 0 || i > 4 {
                break;
            }
        }
        let Some(body) = rest.get(i..i + len) else {
            return out;
        };
        out.push((b1, body.to_vec()));
        rest = &rest[i + len..];
    }
}

/// The CONNACK return code if `bytes` hold one after `from`.
pub fn connack_after(bytes: &[u8], from: usize) -> Option<u8> {
    let tail = bytes.get(from..)?;
    tail.windows(4)
        .find(|w| w[0] == 0x20 && w[1] == 0x02)
        .map(|w| w[3])
}

/// Connects like a well-behaved guest on a byte stream: send CONNECT; on DISCONNECT or after a
/// silence, send it again; return the CONNACK code. Panics after `timeout`.
pub fn connect_until_connack(
    guest: &mut GuestTty,
    client_id: &str,
    keep_alive: u16,
    timeout: Duration,
) -> u8 {
    let deadline = Instant::now() + timeout;
    loop {
        let from = guest.seen.len();
        guest.write(&connect(client_id, keep_alive));
        let attempt_end = (Instant::now() + Duration::from_secs(2)).min(deadline);
        loop {
            guest.poll();
            if let Some(rc) = connack_after(&guest.seen, from) {
                return rc;
            }
            let disconnected = guest
                .seen
                .get(from..)
                .is_some_and(|t| t.windows(2).any(|w| w == DISCONNECT));
            if disconnected || Instant::now() >= attempt_end {
                break;
            }
            guest.wait_readable(Duration::from_millis(50));
        }
        assert!(
            Instant::now() < deadline,
            "no CONNACK for {client_id:?}; got {:x?}",
            guest.seen
        );
    }
}
