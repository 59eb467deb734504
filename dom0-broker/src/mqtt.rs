//! MQTT 3.1.1 codec for the link: framing with the size limit checked before anything is allocated,
//! strict parsing of what the link must understand, and encoding of what the link answers itself.
//!
//! Pure: bytes in, typed values out. Packets are forwarded as the raw bytes they arrived in; only
//! CONNECT is re-encoded (identity forced). Parsing is strict on purpose: when scanning a byte stream
//! for a CONNECT, a lenient parser would take garbage for a session start.

use bytes::{BufMut, Bytes, BytesMut};

pub const CONNECT: u8 = 1;
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const UNSUBSCRIBE: u8 = 10;
pub const UNSUBACK: u8 = 11;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

/// CONNACK return codes (3.1.1 §3.2.2.3).
pub mod connack {
    pub const ACCEPTED: u8 = 0;
    pub const UNACCEPTABLE_PROTOCOL: u8 = 1;
    pub const IDENTIFIER_REJECTED: u8 = 2;
    pub const SERVER_UNAVAILABLE: u8 = 3;
    pub const NOT_AUTHORIZED: u8 = 5;
}

/// SUBACK failure return code.
pub const SUBACK_FAILURE: u8 = 0x80;

/// The attach signal and the end of a session, sent to a guest: a DISCONNECT.
pub const DISCONNECT_PACKET: [u8; 2] = [0xE0, 0x00];
pub const PINGREQ_PACKET: [u8; 2] = [0xC0, 0x00];

/// Why bytes are not a valid packet. Any of these sends a link back to scanning for CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("remaining length is malformed")]
    BadLength,
    #[error("declared length {0} exceeds the limit {1}")]
    TooLarge(usize, usize),
    #[error("packet type {0} is not valid here")]
    BadType(u8),
    #[error("reserved flags are wrong for packet type {0}")]
    BadFlags(u8),
    #[error("packet is truncated or has trailing bytes")]
    BadBody,
    #[error("string is not valid MQTT UTF-8")]
    BadString,
    #[error("protocol name is not MQTT")]
    BadProtocolName,
    #[error("protocol level {0} is not supported (3.1.1 is level 4)")]
    UnsupportedLevel(u8),
    #[error("invalid QoS")]
    BadQos,
    #[error("packet id 0")]
    ZeroPacketId,
    #[error("empty topic list")]
    NoTopics,
}

/// A packet's fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// First byte: type in the high nibble, flags in the low one.
    pub byte1: u8,
    /// Bytes taken by the fixed header (2 to 5).
    pub header_len: usize,
    /// Remaining length: variable header plus payload.
    pub remaining: usize,
}

impl FixedHeader {
    pub fn kind(&self) -> u8 {
        self.byte1 >> 4
    }
    pub fn flags(&self) -> u8 {
        self.byte1 & 0x0F
    }
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// Reads a fixed header from the start of `buf`.
///
/// `Ok(None)`: not enough bytes to know the length yet. The limit is checked here, on the declared
/// length, before the caller buffers the body.
pub fn fixed_header(buf: &[u8], max_remaining: usize) -> Result<Option<FixedHeader>, PacketError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            // A non-minimal encoding (e.g. 0x80 0x00) is malformed in 3.1.1.
            if i > 0 && b == 0 {
                return Err(PacketError::BadLength);
            }
            if remaining > max_remaining {
                return Err(PacketError::TooLarge(remaining, max_remaining));
            }
            return Ok(Some(FixedHeader {
                byte1,
                header_len: 2 + i,
                remaining,
            }));
        }
    }
    Err(PacketError::BadLength)
}

/// Checks the reserved flag bits of a packet's first byte (3.1.1 §2.2.2).
pub fn check_flags(h: &FixedHeader) -> Result<(), PacketError> {
    let ok = match h.kind() {
        PUBLISH => (h.flags() >> 1) & 0x03 != 3,
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => h.flags() == 0x02,
        CONNECT..=DISCONNECT => h.flags() == 0,
        k => return Err(PacketError::BadType(k)),
    };
    if ok {
        Ok(())
    } else {
        Err(PacketError::BadFlags(h.kind()))
    }
}

/// A cursor over a packet body that never reads past its end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, PacketError> {
        let (&b, rest) = self.buf.split_first().ok_or(PacketError::BadBody)?;
        self.buf = rest;
        Ok(b)
    }
    fn u16(&mut self) -> Result<u16, PacketError> {
        Ok(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], PacketError> {
        if n > self.buf.len() {
            return Err(PacketError::BadBody);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn binary(&mut self) -> Result<&'a [u8], PacketError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
    fn string(&mut self) -> Result<&'a str, PacketError> {
        let s = std::str::from_utf8(self.binary()?).map_err(|_| PacketError::BadString)?;
        if s.contains('\0') {
            return Err(PacketError::BadString);
        }
        Ok(s)
    }
    fn pkid(&mut self) -> Result<u16, PacketError> {
        match self.u16()? {
            0 => Err(PacketError::ZeroPacketId),
            id => Ok(id),
        }
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn end(&self) -> Result<(), PacketError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(PacketError::BadBody)
        }
    }
}

/// A will message carried by a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

/// A parsed CONNECT (3.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub clean_session: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
}

/// Parses a CONNECT body strictly: protocol name, level 4, flag consistency, exact length.
pub fn parse_connect(body: &[u8]) -> Result<Connect, PacketError> {
    let mut r = Reader { buf: body };
    if r.binary()? != b"MQTT" {
        return Err(PacketError::BadProtocolName);
    }
    let level = r.u8()?;
    if level != 4 {
        return Err(PacketError::UnsupportedLevel(level));
    }
    let flags = r.u8()?;
    let (user, pass, will_retain, will_qos, will_flag, clean) = (
        flags & 0x80 != 0,
        flags & 0x40 != 0,
        flags & 0x20 != 0,
        (flags >> 3) & 0x03,
        flags & 0x04 != 0,
        flags & 0x02 != 0,
    );
    // Reserved bit, will QoS 3, will fields without a will, password without user name: malformed.
    if flags & 0x01 != 0
        || will_qos == 3
        || (!will_flag && (will_qos != 0 || will_retain))
        || (pass && !user)
    {
        return Err(PacketError::BadFlags(CONNECT));
    }
    let keep_alive = r.u16()?;
    let client_id = r.string()?.to_owned();
    let will = if will_flag {
        let topic = r.string()?.to_owned();
        let payload = Bytes::copy_from_slice(r.binary()?);
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if user {
        Some(r.string()?.to_owned())
    } else {
        None
    };
    let password = if pass {
        Some(Bytes::copy_from_slice(r.binary()?))
    } else {
        None
    };
    r.end()?;
    Ok(Connect {
        clean_session: clean,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

fn put_remaining_length(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if len == 0 {
            break;
        }
    }
}

fn put_binary(out: &mut BytesMut, b: &[u8]) {
    // Every string we encode came from a parsed packet or from our own short names: < 64 KiB.
    let len = u16::try_from(b.len()).unwrap_or(u16::MAX);
    out.put_u16(len);
    out.put_slice(b.get(..usize::from(len)).unwrap_or(b));
}

/// Encodes a CONNECT.
pub fn encode_connect(c: &Connect, out: &mut BytesMut) {
    let mut body = BytesMut::with_capacity(64);
    put_binary(&mut body, b"MQTT");
    body.put_u8(4);
    let mut flags = 0u8;
    if c.clean_session {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos & 0x03) << 3;
        if w.retain {
            flags |= 0x20;
        }
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    body.put_u8(flags);
    body.put_u16(c.keep_alive);
    put_binary(&mut body, c.client_id.as_bytes());
    if let Some(w) = &c.will {
        put_binary(&mut body, w.topic.as_bytes());
        put_binary(&mut body, &w.payload);
    }
    if let Some(u) = &c.username {
        put_binary(&mut body, u.as_bytes());
    }
    if let Some(p) = &c.password {
        put_binary(&mut body, p);
    }
    out.put_u8(CONNECT << 4);
    put_remaining_length(out, body.len());
    out.put_slice(&body);
}

/// A PUBLISH, borrowed from its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    pub topic: &'a str,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    /// Present for QoS 1 and 2.
    pub pkid: Option<u16>,
    pub payload: &'a [u8],
}

pub fn parse_publish<'a>(h: &FixedHeader, body: &'a [u8]) -> Result<Publish<'a>, PacketError> {
    let qos = (h.flags() >> 1) & 0x03;
    if qos == 3 {
        return Err(PacketError::BadQos);
    }
    let mut r = Reader { buf: body };
    let topic = r.string()?;
    let pkid = if qos > 0 { Some(r.pkid()?) } else { None };
    Ok(Publish {
        topic,
        qos,
        retain: h.flags() & 0x01 != 0,
        dup: h.flags() & 0x08 != 0,
        pkid,
        payload: r.rest(),
    })
}

/// Encodes a PUBLISH.
pub fn encode_publish(p: &Publish<'_>, out: &mut BytesMut) {
    let len = 2 + p.topic.len() + if p.qos > 0 { 2 } else { 0 } + p.payload.len();
    out.put_u8(PUBLISH << 4 | u8::from(p.dup) << 3 | (p.qos & 3) << 1 | u8::from(p.retain));
    put_remaining_length(out, len);
    put_binary(out, p.topic.as_bytes());
    if let Some(id) = p.pkid.filter(|_| p.qos > 0) {
        out.put_u16(id);
    }
    out.put_slice(p.payload);
}

/// (filter, requested QoS) pairs of a SUBSCRIBE.
pub type Filters<'a> = Vec<(&'a str, u8)>;

/// SUBSCRIBE: packet id and (filter, requested QoS) pairs.
pub fn parse_subscribe(body: &[u8]) -> Result<(u16, Filters<'_>), PacketError> {
    let mut r = Reader { buf: body };
    let pkid = r.pkid()?;
    let mut filters = Vec::new();
    while !r.buf.is_empty() {
        let f = r.string()?;
        let q = r.u8()?;
        if q > 2 {
            return Err(PacketError::BadQos);
        }
        filters.push((f, q));
    }
    if filters.is_empty() {
        return Err(PacketError::NoTopics);
    }
    Ok((pkid, filters))
}

/// Encodes a SUBSCRIBE.
pub fn encode_subscribe(pkid: u16, filters: &[(&str, u8)], out: &mut BytesMut) {
    let len = 2 + filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
    out.put_u8(SUBSCRIBE << 4 | 0x02);
    put_remaining_length(out, len);
    out.put_u16(pkid);
    for (f, q) in filters {
        put_binary(out, f.as_bytes());
        out.put_u8(*q);
    }
}

pub fn encode_unsubscribe(pkid: u16, filters: &[&str], out: &mut BytesMut) {
    let len = 2 + filters.iter().map(|f| 2 + f.len()).sum::<usize>();
    out.put_u8(UNSUBSCRIBE << 4 | 0x02);
    put_remaining_length(out, len);
    out.put_u16(pkid);
    for f in filters {
        put_binary(out, f.as_bytes());
    }
}

/// UNSUBSCRIBE: packet id and filters.
pub fn parse_unsubscribe(body: &[u8]) -> Result<(u16, Vec<&str>), PacketError> {
    let mut r = Reader { buf: body };
    let pkid = r.pkid()?;
    let mut filters = Vec::new();
    while !r.buf.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(PacketError::NoTopics);
    }
    Ok((pkid, filters))
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK: exactly a packet id.
pub fn parse_pkid(body: &[u8]) -> Result<u16, PacketError> {
    let mut r = Reader { buf: body };
    let id = r.pkid()?;
    r.end()?;
    Ok(id)
}

/// SUBACK: packet id and return codes.
pub fn parse_suback(body: &[u8]) -> Result<(u16, &[u8]), PacketError> {
    let mut r = Reader { buf: body };
    let id = r.pkid()?;
    Ok((id, r.rest()))
}

/// CONNACK: session present, return code.
pub fn parse_connack(body: &[u8]) -> Result<(bool, u8), PacketError> {
    let mut r = Reader { buf: body };
    let flags = r.u8()?;
    let rc = r.u8()?;
    r.end()?;
    Ok((flags & 0x01 != 0, rc))
}

pub fn encode_connack(session_present: bool, rc: u8, out: &mut BytesMut) {
    out.put_slice(&[CONNACK << 4, 2, u8::from(session_present && rc == 0), rc]);
}

/// PUBACK, PUBREC, PUBREL (flags 0b0010), PUBCOMP, UNSUBACK.
pub fn encode_ack(kind: u8, pkid: u16, out: &mut BytesMut) {
    let flags = if kind == PUBREL { 0x02 } else { 0 };
    out.put_u8(kind << 4 | flags);
    out.put_u8(2);
    out.put_u16(pkid);
}

pub fn encode_suback(pkid: u16, codes: &[u8], out: &mut BytesMut) {
    out.put_u8(SUBACK << 4);
    put_remaining_length(out, 2 + codes.len());
    out.put_u16(pkid);
    out.put_slice(codes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: &[u8]) -> (FixedHeader, &[u8]) {
        let h = fixed_header(bytes, 1 << 20).unwrap().unwrap();
        (h, &bytes[h.header_len..h.frame_len()])
    }

    #[test]
    fn fixed_header_table() {
        let rows: &[(&[u8], Result<Option<(usize, usize)>, PacketError>)] = &[
            (b"", Ok(None)),
            (b"\x30", Ok(None)),
            (b"\x30\x00", Ok(Some((2, 0)))),
            (b"\x30\x7f", Ok(Some((2, 127)))),
            (b"\x30\x80", Ok(None)),
            (b"\x30\x80\x01", Ok(Some((3, 128)))),
            (b"\x30\xff\xff\x7f", Ok(Some((4, 2_097_151)))),
            (b"\x30\x80\x00", Err(PacketError::BadLength)),
            (b"\x30\xff\xff\xff\xff", Err(PacketError::BadLength)),
            // 200 MB declared: refused from the header alone.
            (
                b"\x30\x80\x80\xe8\x5f",
                Err(PacketError::TooLarge(200_933_376, 1 << 22)),
            ),
        ];
        for (bytes, expected) in rows {
            let got = fixed_header(bytes, 1 << 22).map(|o| o.map(|h| (h.header_len, h.remaining)));
            assert_eq!(&got, expected, "{bytes:x?}");
        }
    }

    #[test]
    fn connect_round_trip() {
        let c = Connect {
            clean_session: true,
            keep_alive: 5,
            client_id: "vm-gui".into(),
            will: Some(Will {
                topic: "a/b".into(),
                payload: Bytes::from_static(b"bye"),
                qos: 1,
                retain: true,
            }),
            username: Some("u".into()),
            password: Some(Bytes::from_static(b"\x00\xff")),
        };
        let mut out = BytesMut::new();
        encode_connect(&c, &mut out);
        let (h, body) = frame(&out);
        assert_eq!(h.kind(), CONNECT);
        check_flags(&h).unwrap();
        assert_eq!(parse_connect(body).unwrap(), c);
    }

    #[test]
    fn mosquitto_connect_bytes() {
        // What `mosquitto_pub -i vm-gui -k 5` sends (clean session, keepalive 5).
        let bytes = b"\x10\x12\x00\x04MQTT\x04\x02\x00\x05\x00\x06vm-gui";
        let (h, body) = frame(bytes);
        assert_eq!(h.frame_len(), bytes.len());
        let c = parse_connect(body).unwrap();
        assert_eq!(
            (c.client_id.as_str(), c.keep_alive, c.clean_session),
            ("vm-gui", 5, true)
        );
    }

    #[test]
    fn connect_refusals() {
        let ok = b"\x00\x04MQTT\x04\x02\x00\x05\x00\x01a";
        assert!(parse_connect(ok).is_ok());
        let rows: &[(&[u8], PacketError)] = &[
            (
                b"\x00\x04MQTX\x04\x02\x00\x05\x00\x01a",
                PacketError::BadProtocolName,
            ),
            (
                b"\x00\x06MQIsdp\x03\x02\x00\x05\x00\x01a",
                PacketError::BadProtocolName,
            ),
            (
                b"\x00\x04MQTT\x05\x02\x00\x05\x00\x01a",
                PacketError::UnsupportedLevel(5),
            ),
            (
                b"\x00\x04MQTT\x04\x03\x00\x05\x00\x01a",
                PacketError::BadFlags(CONNECT),
            ),
            (
                b"\x00\x04MQTT\x04\x42\x00\x05\x00\x01a",
                PacketError::BadFlags(CONNECT),
            ),
            (
                b"\x00\x04MQTT\x04\x1a\x00\x05\x00\x01a",
                PacketError::BadFlags(CONNECT),
            ),
            (
                b"\x00\x04MQTT\x04\x02\x00\x05\x00\x02a",
                PacketError::BadBody,
            ),
            (
                b"\x00\x04MQTT\x04\x02\x00\x05\x00\x01ab",
                PacketError::BadBody,
            ),
            (
                b"\x00\x04MQTT\x04\x02\x00\x05\x00\x01\xff",
                PacketError::BadString,
            ),
            (
                b"\x00\x04MQTT\x04\x02\x00\x05\x00\x01\x00",
                PacketError::BadString,
            ),
            (
                b"\x00\x04MQTT\x04\x06\x00\x05\x00\x01a\x00\x01t",
                PacketError::BadBody,
            ),
        ];
        for (body, e) in rows {
            assert_eq!(parse_connect(body).as_ref().err(), Some(e), "{body:x?}");
        }
    }

    #[test]
    fn publish_subscribe_acks() {
        let mut out = BytesMut::new();
        let p = Publish {
            topic: "a/b",
            qos: 1,
            retain: false,
            dup: false,
            pkid: Some(7),
            payload: b"hi",
        };
        encode_publish(&p, &mut out);
        let (h, body) = frame(&out);
        check_flags(&h).unwrap();
        assert_eq!(parse_publish(&h, body).unwrap(), p);

        let mut out = BytesMut::new();
        encode_subscribe(9, &[("a/#", 1), ("b", 0)], &mut out);
        let (h, body) = frame(&out);
        check_flags(&h).unwrap();
        assert_eq!(
            parse_subscribe(body).unwrap(),
            (9, vec![("a/#", 1), ("b", 0)])
        );
        assert_eq!(
            parse_subscribe(b"\x00\x09").unwrap_err(),
            PacketError::NoTopics
        );

        let mut out = BytesMut::new();
        encode_unsubscribe(4, &["a/#", "b"], &mut out);
        let (h, body) = frame(&out);
        check_flags(&h).unwrap();
        assert_eq!(parse_unsubscribe(body).unwrap(), (4, vec!["a/#", "b"]));
        assert_eq!(
            parse_subscribe(b"\x00\x09\x00\x01a\x03").unwrap_err(),
            PacketError::BadQos
        );
        assert_eq!(
            parse_subscribe(b"\x00\x00\x00\x01a\x00").unwrap_err(),
            PacketError::ZeroPacketId
        );

        let mut out = BytesMut::new();
        encode_ack(PUBREL, 300, &mut out);
        assert_eq!(&out[..], b"\x62\x02\x01\x2c");
        let (h, body) = frame(&out);
        check_flags(&h).unwrap();
        assert_eq!(parse_pkid(body), Ok(300));

        let mut out = BytesMut::new();
        encode_suback(5, &[0, SUBACK_FAILURE], &mut out);
        let (_, body) = frame(&out);
        assert_eq!(parse_suback(body).unwrap(), (5, &[0u8, 0x80][..]));

        let mut out = BytesMut::new();
        encode_connack(false, connack::IDENTIFIER_REJECTED, &mut out);
        assert_eq!(&out[..], b"\x20\x02\x00\x02");
    }

    #[test]
    fn flags_table() {
        let h = |b: u8| FixedHeader {
            byte1: b,
            header_len: 2,
            remaining: 0,
        };
        assert!(check_flags(&h(0x82)).is_ok());
        assert!(check_flags(&h(0x80)).is_err());
        assert!(check_flags(&h(0x36)).is_err()); // PUBLISH QoS 3
        assert!(check_flags(&h(0x3d)).is_ok()); // DUP, QoS 2, RETAIN
        assert!(check_flags(&h(0x11)).is_err());
        assert!(check_flags(&h(0x00)).is_err());
        assert!(check_flags(&h(0xf0)).is_err());
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                if let Ok(Some(h)) = fixed_header(&bytes, 1 << 16) {
                    let _ = check_flags(&h);
                    let body = bytes.get(h.header_len..).unwrap_or(&[]);
                    let _ = parse_connect(body);
                    let _ = parse_publish(&h, body);
                    let _ = parse_subscribe(body);
                    let _ = parse_unsubscribe(body);
                    let _ = parse_pkid(body);
                    let _ = parse_suback(body);
                    let _ = parse_connack(body);
                }
                let _ = parse_connect(&bytes);
            }
        }
    }
}
