//! One local MQTT client's connection to the agent (the guest's applications), server side, as a
//! state machine without I/O: bytes from the client and the time in, bytes for it and
//! [`LocalEvent`]s out. The driver (`local_mqtt.rs`) moves the bytes and talks to the multiplexer.
//!
//! MQTT 3.1.1. The first packet must be a CONNECT; another protocol level (MQTT 5, 3.1) is answered
//! "unacceptable protocol version" and the connection closed, never left hanging. Everything a
//! client says is local: its client id, keepalive, CONNECT and DISCONNECT never reach Dom0. QoS 2
//! publishes are carried as QoS 1 upstream; the client sees the QoS 2 handshake (PUBREC once Dom0
//! acknowledged, PUBCOMP on PUBREL). Bad bytes, a second CONNECT, a server-only packet, silence
//! beyond 1.5 × its keepalive, or output the client does not read end this connection only.
//!
//! Untrusted input: every byte from the client. A frame above `max_packet` is refused on its
//! declared length.

use std::collections::HashSet;
use std::time::Duration;

use crate::hub::Publication;
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{self, QoS};
use tokio::time::Instant;
use topics::topic::validate_name;

/// How long a new connection may take to send its CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds of one local connection.
#[derive(Debug, Clone)]
pub struct LocalLimits {
    /// Largest packet accepted from the client or delivered to it.
    pub max_packet: usize,
    /// Bytes waiting for the client before it is dropped (it stopped reading).
    pub max_output: usize,
}

/// A will to publish when the connection ends without DISCONNECT.
pub type Will = Publication;

/// What the client asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalEvent {
    /// A CONNECT: answer with [`LocalSession::accept`] or [`LocalSession::refuse`].
    Connect {
        client_id: String,
    },
    /// A PUBLISH to send upstream; `pkid` to acknowledge with [`LocalSession::acked`] (QoS > 0).
    Publish {
        publication: Publication,
        pkid: Option<u16>,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<(String, QoS)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
}

/// Why the connection ended, and the will to publish (none after a clean DISCONNECT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub reason: CloseReason,
    pub will: Option<Will>,
}

/// Why a local client's connection ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    #[error("client disconnected")]
    Disconnected,
    #[error("connection lost")]
    Lost,
    #[error("agent stopping")]
    Stopping,
    #[error("unreadable packet: {0}")]
    Unreadable(String),
    #[error("first packet is not a CONNECT")]
    NotConnect,
    #[error("unsupported MQTT protocol level")]
    ProtocolLevel,
    #[error("SUBSCRIBE without a filter")]
    EmptySubscribe,
    #[error("second CONNECT")]
    SecondConnect,
    #[error("a client may not send {0:?}")]
    ServerPacket(&'static str),
    #[error("empty client id without clean session")]
    EmptyClientId,
    #[error("too many local clients")]
    TooManyClients,
    #[error("client does not read")]
    NotReading,
    #[error("no CONNECT in time")]
    NoConnect,
    #[error("client silent beyond 1.5 × its keepalive")]
    Silent,
    #[error("closed to make room: no CONNECT yet")]
    Evicted,
    /// The hub dropped the client, for this reason.
    #[error("{0}")]
    Dropped(String),
}

impl CloseReason {
    /// A client's own departure (or the agent's): nothing to warn about.
    pub fn is_routine(&self) -> bool {
        matches!(
            self,
            CloseReason::Disconnected | CloseReason::Lost | CloseReason::Stopping
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the CONNECT.
    New {
        deadline: Instant,
    },
    /// CONNECT received, waiting for the driver's decision.
    Deciding,
    Live,
}

/// One local client's connection.
#[derive(Debug)]
pub struct LocalSession {
    limits: LocalLimits,
    phase: Phase,
    /// Bytes from the client, not yet processed.
    input: BytesMut,
    /// Bytes waiting to be written to the client.
    output: BytesMut,
    /// 1.5 × the client's keepalive (None: keepalive 0, no supervision).
    window: Option<Duration>,
    last_input: Instant,
    will: Option<Will>,
    /// Packet ids of the QoS 1 deliveries to this client.
    next_pkid: u16,
    /// QoS 2 publishes from the client not yet released (PUBREL): a DUP of one is not sent again.
    qos2: HashSet<u16>,
    events: Vec<LocalEvent>,
    /// The connection ends, after the events parsed before its end are carried out (a client's
    /// last PUBLISH and its DISCONNECT arrive in one read: every `mosquitto_pub` does it).
    closing: Option<Closed>,
}

impl LocalSession {
    pub fn new(limits: LocalLimits, now: Instant) -> LocalSession {
        LocalSession {
            limits,
            phase: Phase::New {
                deadline: now + CONNECT_TIMEOUT,
            },
            input: BytesMut::new(),
            output: BytesMut::new(),
            window: None,
            last_input: now,
            will: None,
            next_pkid: 0,
            qos2: HashSet::new(),
            events: Vec::new(),
            closing: None,
        }
    }

    /// Bytes to write to the client, handed over to the driver.
    pub fn take_output(&mut self) -> BytesMut {
        self.output.split()
    }

    /// Bytes waiting for the client (the driver's write queue is counted in).
    pub fn pending_output(&self) -> usize {
        self.output.len()
    }

    fn closed(&mut self, reason: CloseReason) -> Closed {
        Closed {
            reason,
            will: self.will.take(),
        }
    }

    /// Bytes read from the client. The events come first: when the client's input ends the
    /// connection after some packets (PUBLISH then DISCONNECT), they are returned, and the end is
    /// taken with [`LocalSession::take_closed`] once they are carried out.
    pub fn on_input(&mut self, bytes: &[u8], now: Instant) -> Result<Vec<LocalEvent>, Closed> {
        if let Some(c) = self.closing.take() {
            return Err(c);
        }
        self.input.extend_from_slice(bytes);
        self.last_input = now;
        self.process()?;
        Ok(std::mem::take(&mut self.events))
    }

    /// The end of the connection that followed the events last returned, if any.
    pub fn take_closed(&mut self) -> Option<Closed> {
        self.closing.take()
    }

    fn process(&mut self) -> Result<(), Closed> {
        match self.process_packets() {
            Err(c) if !self.events.is_empty() => {
                self.closing = Some(c);
                Ok(())
            }
            other => other,
        }
    }

    fn process_packets(&mut self) -> Result<(), Closed> {
        while matches!(self.phase, Phase::New { .. } | Phase::Live) {
            if matches!(self.phase, Phase::New { .. }) {
                match mqttbytes::check(self.input.iter(), self.limits.max_packet) {
                    Ok(_) | Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => return Err(self.closed(CloseReason::Unreadable(e.to_string()))),
                }
                // The protocol level is checked before parsing: rumqttc's v4 codec would read an
                // MQTT 5 CONNECT's properties as a client id.
                match connect_level(&self.input) {
                    None => return Ok(()),
                    Some(Err(())) => return Err(self.closed(CloseReason::NotConnect)),
                    Some(Ok(4)) => {}
                    Some(Ok(_)) => {
                        self.encode(&Packet::ConnAck(ConnAck::new(
                            ConnectReturnCode::RefusedProtocolVersion,
                            false,
                        )));
                        return Err(self.closed(CloseReason::ProtocolLevel));
                    }
                }
            }
            let packet = match Packet::read(&mut self.input, self.limits.max_packet) {
                Ok(p) => p,
                Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(()),
                Err(e) => return Err(self.closed(CloseReason::Unreadable(e.to_string()))),
            };
            self.packet(packet)?;
        }
        Ok(())
    }

    fn packet(&mut self, p: Packet) -> Result<(), Closed> {
        if matches!(self.phase, Phase::New { .. }) {
            let Packet::Connect(c) = p else {
                return Err(self.closed(CloseReason::NotConnect));
            };
            return self.connect(c);
        }
        match p {
            Packet::Publish(p) => self.publish(p),
            Packet::PubRel(r) => {
                self.qos2.remove(&r.pkid);
                self.encode(&Packet::PubComp(PubComp::new(r.pkid)));
            }
            // Acknowledgements of our deliveries: nothing is resent on a clean session.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::Subscribe(s) => {
                if s.filters.is_empty() {
                    return Err(self.closed(CloseReason::EmptySubscribe));
                }
                self.events.push(LocalEvent::Subscribe {
                    pkid: s.pkid,
                    filters: s.filters.into_iter().map(|f| (f.path, f.qos)).collect(),
                });
            }
            Packet::Unsubscribe(u) => self.events.push(LocalEvent::Unsubscribe {
                pkid: u.pkid,
                filters: u.topics,
            }),
            Packet::PingReq => self.encode(&Packet::PingResp),
            Packet::Disconnect => {
                self.will = None;
                return Err(self.closed(CloseReason::Disconnected));
            }
            Packet::Connect(_) => return Err(self.closed(CloseReason::SecondConnect)),
            other => {
                return Err(self.closed(CloseReason::ServerPacket(packet_name(&other))));
            }
        }
        Ok(())
    }

    fn connect(&mut self, c: Connect) -> Result<(), Closed> {
        if c.client_id.is_empty() && !c.clean_session {
            self.encode(&Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::BadClientId,
                false,
            )));
            return Err(self.closed(CloseReason::EmptyClientId));
        }
        self.window =
            (c.keep_alive > 0).then(|| Duration::from_secs(u64::from(c.keep_alive)) * 3 / 2);
        self.will = c.last_will.map(|w| Will {
            topic: w.topic,
            payload: w.message,
            qos: w.qos,
            retain: w.retain,
        });
        self.phase = Phase::Deciding;
        self.events.push(LocalEvent::Connect {
            client_id: c.client_id,
        });
        Ok(())
    }

    /// The driver accepts the connection: CONNACK, then what the client sent after its CONNECT
    /// (its end, if it came with it, through [`LocalSession::take_closed`]).
    pub fn accept(&mut self, now: Instant) -> Result<Vec<LocalEvent>, Closed> {
        self.encode(&Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )));
        self.phase = Phase::Live;
        self.last_input = now;
        self.process()?;
        Ok(std::mem::take(&mut self.events))
    }

    /// The connection was lost without DISCONNECT: the will goes out.
    pub fn lost(&mut self) -> Closed {
        self.closed(CloseReason::Lost)
    }

    /// The driver refuses the connection (too many clients): CONNACK "server unavailable".
    pub fn refuse(&mut self) -> Closed {
        self.encode(&Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::ServiceUnavailable,
            false,
        )));
        self.will = None;
        self.closed(CloseReason::TooManyClients)
    }

    fn publish(&mut self, p: Publish) {
        let pkid = (p.qos != QoS::AtMostOnce).then_some(p.pkid);
        if let Err(e) = validate_name(&p.topic) {
            // Dom0 would refuse it anyway; acknowledge so the client's session stays sound.
            tracing::debug!(topic = %p.topic.chars().take(128).collect::<String>(), error = %e, "local publish dropped");
            match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.encode(&Packet::PubAck(PubAck::new(p.pkid))),
                QoS::ExactlyOnce => {
                    self.qos2.insert(p.pkid);
                    self.encode(&Packet::PubRec(PubRec::new(p.pkid)));
                }
            }
            return;
        }
        if p.qos == QoS::ExactlyOnce && !self.qos2.insert(p.pkid) {
            // A DUP of a QoS 2 publish already taken: not sent again.
            return;
        }
        self.events.push(LocalEvent::Publish {
            publication: Publication {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
            },
            pkid,
        });
    }

    /// Dom0 acknowledged the client's publish `pkid` (sent at `qos`).
    pub fn acked(&mut self, pkid: u16) {
        if self.qos2.contains(&pkid) {
            self.encode(&Packet::PubRec(PubRec::new(pkid)));
        } else {
            self.encode(&Packet::PubAck(PubAck::new(pkid)));
        }
    }

    /// Answers a SUBSCRIBE: the QoS granted per filter, `None` for refused.
    pub fn suback(&mut self, pkid: u16, codes: &[Option<QoS>]) {
        let codes = codes
            .iter()
            .map(|c| match c {
                Some(q) => SubscribeReasonCode::Success(*q),
                None => SubscribeReasonCode::Failure,
            })
            .collect();
        self.encode(&Packet::SubAck(SubAck::new(pkid, codes)));
    }

    pub fn unsuback(&mut self, pkid: u16) {
        self.encode(&Packet::UnsubAck(UnsubAck::new(pkid)));
    }

    /// Delivers a message. Err when the client does not read (its output is over the limit).
    pub fn deliver(
        &mut self,
        topic: String,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> Result<(), Closed> {
        let mut p = Publish::from_bytes(topic, qos, payload);
        p.retain = retain;
        if qos != QoS::AtMostOnce {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            p.pkid = self.next_pkid;
        }
        self.encode(&Packet::Publish(p));
        if self.output.len() > self.limits.max_output {
            self.output.clear();
            return Err(self.closed(CloseReason::NotReading));
        }
        Ok(())
    }

    /// When [`LocalSession::on_tick`] has something to check.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::New { deadline } => Some(deadline),
            Phase::Deciding => None,
            Phase::Live => self.window.map(|w| self.last_input + w),
        }
    }

    /// Checks the CONNECT deadline and the client's keepalive.
    pub fn on_tick(&mut self, now: Instant) -> Result<(), Closed> {
        match self.phase {
            Phase::New { deadline } if now >= deadline => Err(self.closed(CloseReason::NoConnect)),
            Phase::Live => match self.window {
                Some(w) if now >= self.last_input + w => Err(self.closed(CloseReason::Silent)),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    fn encode(&mut self, p: &Packet) {
        // Only deliveries can exceed the limit, and those were accepted upstream under the same
        // limit; anything else that fails is logged and not sent.
        if let Err(e) = p.write(&mut self.output, usize::MAX) {
            tracing::debug!(error = %e, "packet to a local client not sent");
        }
    }
}

/// The protocol level of the CONNECT at the start of `buf`: `None` while too short to tell,
/// `Some(Err)` if it is not a CONNECT at all.
fn connect_level(buf: &[u8]) -> Option<Result<u8, ()>> {
    let first = *buf.first()?;
    if first != 0x10 {
        return Some(Err(()));
    }
    // Skip the remaining length (1 to 4 bytes).
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Some(Err(()));
        }
    }
    let name_len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
    let name = buf.get(i + 2..i + 2 + name_len);
    let level = *buf.get(i + 2 + name_len)?;
    match name {
        Some(b"MQTT" | b"MQIsdp") => Some(Ok(level)),
        Some(_) => Some(Err(())),
        None => None,
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::ConnAck(_) => "CONNACK",
        Packet::SubAck(_) => "SUBACK",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingResp => "PINGRESP",
        _ => "this packet",
    }
}

#[cfg(test)]
mod tests;
