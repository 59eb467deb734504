//! Hand-made MQTT 3.1.1 bytes, for tests that play a guest byte by byte (garbage, cut packets,
//! impersonation) and read exactly what Dom0 answers on the tty.

use std::time::{Duration, Instant};

use crate::channel::GuestTty;

pub fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
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

pub fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

pub fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A CONNECT of any protocol `level` and `flags` (MQTT 5 `props` when given).
pub fn connect_raw(
    level: u8,
    flags: u8,
    keep_alive: u16,
    id: &[u8],
    props: Option<&[u8]>,
) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if let Some(p) = props {
        remaining_length(p.len(), &mut body);
        body.extend_from_slice(p);
    }
    string(id, &mut body);
    packet(0x10, &body)
}

/// A well-formed MQTT 3.1.1 CONNECT, clean session.
pub fn connect(client_id: &str, keep_alive: u16) -> Vec<u8> {
    connect_raw(4, 0x02, keep_alive, client_id.as_bytes(), None)
}

/// A PUBLISH with any first byte (type, flags), the packet id when given.
pub fn publish_raw(byte1: u8, topic: &[u8], pkid: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic, &mut body);
    if let Some(id) = pkid {
        body.extend_from_slice(&id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(byte1, &body)
}

pub fn publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    publish_raw(0x30, topic.as_bytes(), None, payload)
}

pub fn publish_qos1(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    publish_raw(0x32, topic.as_bytes(), Some(pkid), payload)
}

/// A SUBSCRIBE of one filter with any first byte.
pub fn subscribe_raw(byte1: u8, pkid: u16, filter: &[u8], qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    string(filter, &mut body);
    body.push(qos);
    packet(byte1, &body)
}

pub fn subscribe(pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    subscribe_raw(0x82, pkid, filter.as_bytes(), qos)
}

/// An acknowledgement (PUBACK, PUBREC, PUBREL, PUBCOMP: the first byte says which).
pub fn ack(byte1: u8, pkid: u16) -> Vec<u8> {
    packet(byte1, &pkid.to_be_bytes())
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
    try_connect_until_connack(guest, client_id, keep_alive, timeout).unwrap_or_else(|| {
        panic!(
            "no CONNACK for {client_id:?} within {timeout:?}; got {:x?}",
            guest.seen
        )
    })
}

/// [`connect_until_connack`], None after `timeout`.
pub fn try_connect_until_connack(
    guest: &mut GuestTty,
    client_id: &str,
    keep_alive: u16,
    timeout: Duration,
) -> Option<u8> {
    let deadline = Instant::now() + timeout;
    loop {
        let from = guest.seen.len();
        guest.write(&connect(client_id, keep_alive));
        let attempt_end = (Instant::now() + Duration::from_secs(2)).min(deadline);
        loop {
            guest.poll();
            if let Some(rc) = connack_after(&guest.seen, from) {
                return Some(rc);
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
        if Instant::now() >= deadline {
            return None;
        }
    }
}

/// A minimal blocking MQTT client over any byte stream (TCP, UNIX socket, tty), for benchmarks:
/// QoS 0 only, no keepalive (run it for less than its keepalive).
#[derive(Debug)]
pub struct RawClient<S> {
    stream: S,
    buf: Vec<u8>,
    start: usize,
    /// Called after every read (a TCP client re-arms TCP_QUICKACK here).
    after_read: fn(&S),
}

impl<S: std::io::Read + std::io::Write> RawClient<S> {
    /// Sends CONNECT and waits for CONNACK, discarding whatever comes before it (e.g. an attach signal).
    pub fn connect(stream: S, client_id: &str) -> RawClient<S> {
        RawClient::connect_with(stream, client_id, |_| {})
    }

    /// Like [`RawClient::connect`], calling `after_read` after every read.
    pub fn connect_with(stream: S, client_id: &str, after_read: fn(&S)) -> RawClient<S> {
        let mut c = RawClient {
            stream,
            buf: Vec::with_capacity(1 << 16),
            start: 0,
            after_read,
        };
        c.stream.write_all(&connect(client_id, 600)).unwrap();
        loop {
            let (t, body) = c.next_packet();
            if t == 0x20 {
                assert_eq!(body, [0, 0], "CONNACK refused");
                return c;
            }
        }
    }

    pub fn subscribe(&mut self, filter: &str) {
        self.stream.write_all(&subscribe(1, filter, 0)).unwrap();
        while self.next_packet().0 != 0x90 {}
    }

    pub fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.stream.write_all(&publish(topic, payload)).unwrap();
    }

    /// Writes several packets at once (throughput runs).
    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next whole packet: (first byte, body). Panics if the stream ends.
    pub fn next_packet(&mut self) -> (u8, Vec<u8>) {
        self.try_next_packet()
            .expect("stream closed, or nothing within the step deadline")
    }

    /// The next whole packet, or None when the stream ends or fails.
    pub fn try_next_packet(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((t, body, used)) = first_packet(&self.buf[self.start..]) {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Some((t, body));
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(n) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
            (self.after_read)(&self.stream);
        }
    }

    /// The next PUBLISH's payload (other packets skipped). Panics if the stream ends.
    pub fn next_publish(&mut self) -> Vec<u8> {
        self.try_next_publish()
            .expect("stream closed, or no PUBLISH within the step deadline")
    }

    /// The next PUBLISH's payload, or None when the stream ends. A QoS 1 PUBLISH is acknowledged.
    pub fn try_next_publish(&mut self) -> Option<Vec<u8>> {
        self.try_next_publish_on().map(|(_, payload)| payload)
    }

    /// The next PUBLISH's topic and payload, or None when the stream ends. A QoS 1 PUBLISH is
    /// acknowledged.
    pub fn try_next_publish_on(&mut self) -> Option<(String, Vec<u8>)> {
        loop {
            let (t, body) = self.try_next_packet()?;
            if t & 0xF0 == 0x30 {
                let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let qos = (t >> 1) & 3;
                if qos == 1 {
                    let ack = [0x40, 2, body[2 + tlen], body[3 + tlen]];
                    self.stream.write_all(&ack).ok()?;
                }
                let topic = String::from_utf8_lossy(&body[2..2 + tlen]).into_owned();
                let skip = 2 + tlen + if qos > 0 { 2 } else { 0 };
                return Some((topic, body[skip..].to_vec()));
            }
        }
    }

    /// Subscribes at QoS 1.
    pub fn subscribe_qos1(&mut self, filter: &str) {
        self.stream.write_all(&subscribe(1, filter, 1)).unwrap();
        while self.next_packet().0 != 0x90 {}
    }

    /// Publishes at QoS 1 with packet id `pkid` (the PUBACK is skipped by the next reads).
    pub fn try_publish_qos1(&mut self, topic: &str, pkid: u16, payload: &[u8]) -> bool {
        self.stream
            .write_all(&publish_qos1(topic, pkid, payload))
            .is_ok()
    }

    /// Says goodbye (DISCONNECT) unless the stream is gone; false when it is.
    pub fn try_disconnect(&mut self) -> bool {
        self.stream.write_all(&DISCONNECT).is_ok()
    }

    /// Publishes unless the stream is gone; false when it is.
    pub fn try_publish(&mut self, topic: &str, payload: &[u8]) -> bool {
        self.stream.write_all(&publish(topic, payload)).is_ok()
    }
}

fn first_packet(bytes: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let &b1 = bytes.first()?;
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let &b = bytes.get(i)?;
        len |= usize::from(b & 0x7F) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let body = bytes.get(i..i + len)?;
    Some((b1, body.to_vec(), i + len))
}
