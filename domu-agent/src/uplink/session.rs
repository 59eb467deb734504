//! The agent's MQTT 3.1.1 session over the channel, as a state machine without I/O: bytes from the
//! channel and the time in, bytes for the channel and [`Event`]s out. It has no clock of its own;
//! the driver (`hub/driver.rs`) owns the tty and the timers. The codec is rumqttc's (`mqttbytes`); the
//! session logic is ours because the tty is no socket: no hangup, no EOF, stale bytes, lost bytes.
//!
//! - After each CONNECT, bytes are discarded until a well-formed CONNACK (stale bytes from an old
//!   session, Dom0's attach signal). No CONNACK within [`CONNACK_TIMEOUT`]: CONNECT again after a
//!   backoff.
//! - A DISCONNECT from Dom0 (its attach signal, or the end of a session it dropped) or bytes that do
//!   not parse mean "start over": a new CONNECT at once.
//! - Keepalive is short (default 5 s); a PINGREQ left unanswered for a keepalive means the link is
//!   dead: CONNECT again after a backoff.
//! - Subscriptions are renewed on every CONNACK; QoS 1 publishes not yet acknowledged are sent
//!   again (DUP) after a reconnect, so requests and responses in flight are not lost. QoS 1
//!   publishes made while no session is up wait (bounded) and go out after the next CONNACK.
//!
//! Untrusted input: every byte from the channel. Nothing here panics on it; a frame above
//! `max_packet` is refused on its declared length, before it is buffered whole.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    Connect, Packet, PubAck, PubComp, PubRec, Publish, Subscribe, SubscribeFilter,
    SubscribeReasonCode, Unsubscribe,
};
use rumqttc::mqttbytes::{self, QoS};
use tokio::time::Instant;
use topics::vm::VmId;

/// A publish larger than this (bytes on the wire) is written after the small ones waiting.
pub const BULK_FRAME: usize = 8 * 1024;

use topics::backoff::Backoff;

/// QoS 1 publishes waiting for Dom0's PUBACK at most; beyond, [`Session::publish`] refuses.
pub const MAX_INFLIGHT: usize = 64;

/// A publication, as every layer of the agent passes it: a local client's session, the hub, the
/// held queue, this session (and a local client's will).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

impl Publication {
    /// What the agent's own services publish: QoS 1, not retained.
    pub fn at_least_once(topic: String, payload: Bytes) -> Publication {
        Publication {
            topic,
            payload,
            qos: QoS::AtLeastOnce,
            retain: false,
        }
    }
}
/// How long a CONNECT waits for its CONNACK before it is sent again.
pub const CONNACK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a frame from Dom0 may stay half-received with no new byte. Dom0 writes a frame in one
/// go; one that stops half-way is from a Dom0 that died mid-write, and Dom0's next attach signal
/// (a DISCONNECT) would be swallowed as the rest of it: start over instead of waiting for the
/// keepalive.
pub const FRAME_STALL: Duration = Duration::from_secs(1);

/// Settings of the session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The client id sent in CONNECT (Dom0 forces it to the channel's name anyway).
    pub vm: VmId,
    /// MQTT keepalive: a PINGREQ after this much silence, and this long to get its PINGRESP.
    pub keepalive: Duration,
    /// Largest packet sent or accepted (Base64 payloads of create_file are large).
    pub max_packet: usize,
}

/// What the session tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session is up (after each accepted CONNACK).
    Up,
    /// The session that was up is gone; a new one is on its way.
    Down,
    /// A PUBLISH from Dom0 (already acknowledged in the output when QoS > 0).
    Message {
        topic: String,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    },
    /// Dom0 acknowledged the QoS 1 publish with this packet id.
    Acked(u16),
    /// Dom0 answered a SUBSCRIBE: each filter with the QoS granted, or `None` if refused.
    SubAcked(Vec<(String, Option<QoS>)>),
    /// The PINGRESP of a probe sent with [`Session::ping`], and the time it took.
    Pong { probe: u64, rtt: Duration },
}

/// Why a publish was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("packet of {size} bytes is above the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("{MAX_INFLIGHT} messages already wait for Dom0's acknowledgement")]
    Full,
    #[error("no session with Dom0 (QoS 0 is not queued)")]
    NotConnected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No channel: the tty is not open.
    Closed,
    /// CONNECT sent; everything before a well-formed CONNACK is discarded.
    AwaitingConnack { deadline: Instant },
    /// Packets flow.
    Live,
    /// Waiting before the next CONNECT.
    Backoff { until: Instant },
}

/// A QoS 1 publish waiting for its PUBACK.
#[derive(Debug)]
struct InFlight {
    /// The encoded PUBLISH, DUP clear.
    frame: Bytes,
    /// True once it was written in some session (a resend then carries DUP).
    sent: bool,
}

/// The agent's session with Dom0 across reconnects.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    phase: Phase,
    /// Bytes read from the channel, not yet processed.
    input: BytesMut,
    /// Bytes waiting to be written to the channel.
    output: BytesMut,
    /// Large publishes waiting to be written, one per [`Session::take_output`] after everything
    /// small: a small message waits for one large one at most, not for a whole upload's window.
    bulk: VecDeque<(String, Bytes)>,
    /// Filters renewed on every CONNACK, with their QoS.
    subscriptions: BTreeMap<String, QoS>,
    /// SUBSCRIBEs awaiting their SUBACK: packet id → filters, in order.
    pending_subs: HashMap<u16, Vec<String>>,
    next_pkid: u16,
    /// Unacknowledged QoS 1 publishes by packet id, and their order (resent in that order).
    inflight: HashMap<u16, InFlight>,
    order: VecDeque<u16>,
    /// Outstanding PINGREQs in order: when sent, and the probe to report (None: keepalive).
    pings: VecDeque<(Instant, Option<u64>)>,
    /// When a packet was last written: the next keepalive PINGREQ is due a keepalive after.
    last_write: Instant,
    /// When the last byte came while a frame is half-received (live session).
    partial_at: Option<Instant>,
    backoff: Backoff,
    events: Vec<Event>,
}

/// Finds a well-formed CONNACK (`20 02 0s rc`) in `buf`: its offset and return code.
pub fn find_connack(buf: &[u8]) -> Option<(usize, u8)> {
    buf.windows(4)
        .position(|w| w[0] == 0x20 && w[1] == 0x02 && w[2] <= 1 && w[3] <= 5)
        .and_then(|i| buf.get(i + 3).map(|rc| (i, *rc)))
}

impl Session {
    pub fn new(cfg: SessionConfig, now: Instant) -> Session {
        Session {
            cfg,
            phase: Phase::Closed,
            input: BytesMut::new(),
            output: BytesMut::new(),
            bulk: VecDeque::new(),
            subscriptions: BTreeMap::new(),
            pending_subs: HashMap::new(),
            next_pkid: 0,
            inflight: HashMap::new(),
            order: VecDeque::new(),
            pings: VecDeque::new(),
            last_write: now,
            partial_at: None,
            backoff: Backoff::new(),
            events: Vec::new(),
        }
    }

    /// True while a session is up.
    pub fn is_live(&self) -> bool {
        self.phase == Phase::Live
    }

    /// True when a publish or probe may be handed over now: a session is up and the in-flight
    /// window has room. (QoS 1 publishes are also taken while no session is up.)
    pub fn accepts_publish(&self) -> bool {
        self.is_live() && self.inflight.len() < MAX_INFLIGHT
    }

    /// QoS 1 publishes not yet acknowledged by Dom0.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Bytes to write to the channel, handed over to the driver: everything small, then at most
    /// one large publish ([`BULK_FRAME`]); [`Session::has_bulk`] says whether more wait.
    pub fn take_output(&mut self) -> BytesMut {
        if let Some((_, frame)) = self.bulk.pop_front() {
            self.output.extend_from_slice(&frame);
        }
        self.output.split()
    }

    /// Large publishes wait for their turn in the output.
    pub fn has_bulk(&self) -> bool {
        !self.bulk.is_empty()
    }

    /// The tty is open: start a session.
    pub fn open(&mut self, now: Instant) -> Vec<Event> {
        self.connect(now);
        self.take_events()
    }

    /// The tty failed: no session until it is open again. Returns how long to wait before reopening.
    pub fn closed(&mut self) -> (Duration, Vec<Event>) {
        self.go_down();
        self.phase = Phase::Closed;
        self.input.clear();
        self.output.clear();
        // They are in flight: resent after the next CONNACK.
        self.bulk.clear();
        (self.backoff.next_delay(), self.take_events())
    }

    /// Stop: a clean DISCONNECT for Dom0 if a session is up.
    pub fn stop(&mut self) {
        if self.is_live() {
            self.encode(&Packet::Disconnect);
        }
        self.phase = Phase::Closed;
    }

    /// Bytes read from the channel.
    pub fn on_input(&mut self, bytes: &[u8], now: Instant) -> Vec<Event> {
        self.input.extend_from_slice(bytes);
        loop {
            match self.phase {
                Phase::AwaitingConnack { .. } => {
                    if !self.scan_connack(now) {
                        break;
                    }
                }
                Phase::Live => {
                    self.process_live(now);
                    let live = self.phase == Phase::Live;
                    self.partial_at = (live && !self.input.is_empty()).then_some(now);
                    break;
                }
                Phase::Closed | Phase::Backoff { .. } => {
                    // Nothing is expected: stale bytes of a session that is over.
                    self.input.clear();
                    break;
                }
            }
        }
        self.take_events()
    }

    /// Publishes a message. QoS 1 (and 2, sent as 1) returns its packet id and waits for Dom0's
    /// PUBACK ([`Event::Acked`]); taken while no session is up, it goes out after the next CONNACK.
    pub fn publish(
        &mut self,
        publication: Publication,
        now: Instant,
    ) -> Result<Option<u16>, PublishError> {
        let Publication {
            topic,
            payload,
            qos,
            retain,
        } = publication;
        let qos = if qos == QoS::AtMostOnce {
            qos
        } else {
            QoS::AtLeastOnce
        };
        if qos == QoS::AtMostOnce && !self.is_live() {
            return Err(PublishError::NotConnected);
        }
        if qos != QoS::AtMostOnce && self.inflight.len() >= MAX_INFLIGHT {
            return Err(PublishError::Full);
        }
        let bulk_topic = topic.clone();
        let mut p = Publish::from_bytes(topic, qos, payload);
        p.retain = retain;
        let size = p.size();
        if size > self.cfg.max_packet {
            return Err(PublishError::TooLarge {
                size,
                max: self.cfg.max_packet,
            });
        }
        if qos == QoS::AtMostOnce {
            self.encode(&Packet::Publish(p));
            self.last_write = now;
            return Ok(None);
        }
        p.pkid = self.pkid();
        let mut frame = BytesMut::with_capacity(size + 5);
        if p.write(&mut frame).is_err() {
            return Err(PublishError::TooLarge {
                size,
                max: self.cfg.max_packet,
            });
        }
        let frame = frame.freeze();
        let live = self.is_live();
        if live {
            // A large publish waits for its turn; so does a small one on the topic of a waiting
            // large one (one topic's messages stay in order).
            if frame.len() > BULK_FRAME || self.bulk.iter().any(|(t, _)| *t == bulk_topic) {
                self.bulk.push_back((bulk_topic, frame.clone()));
            } else {
                self.output.extend_from_slice(&frame);
            }
            self.last_write = now;
        }
        self.inflight.insert(p.pkid, InFlight { frame, sent: live });
        self.order.push_back(p.pkid);
        Ok(Some(p.pkid))
    }

    /// Adds a filter to the subscriptions renewed on every CONNACK, and subscribes now if a session
    /// is up. The answer comes as [`Event::SubAcked`].
    pub fn subscribe(&mut self, filter: String, qos: QoS) {
        let filters = vec![(filter.clone(), qos)];
        self.subscriptions.insert(filter, qos);
        if self.is_live() {
            self.send_subscribe(filters);
        }
    }

    /// Removes a filter; unsubscribes now if a session is up.
    pub fn unsubscribe(&mut self, filter: &str) {
        if self.subscriptions.remove(filter).is_some() && self.is_live() {
            let mut u = Unsubscribe::new(filter);
            u.pkid = self.pkid();
            self.encode(&Packet::Unsubscribe(u));
        }
    }

    /// Drops a filter Dom0 refused from the subscriptions renewed on every CONNACK; nothing is sent.
    pub fn forget(&mut self, filter: &str) {
        self.subscriptions.remove(filter);
    }

    /// Sends a PINGREQ whose PINGRESP is reported as [`Event::Pong`] with `probe`. False when no
    /// session is up (nothing sent).
    pub fn ping(&mut self, probe: u64, now: Instant) -> bool {
        if !self.is_live() {
            return false;
        }
        self.encode(&Packet::PingReq);
        self.pings.push_back((now, Some(probe)));
        self.last_write = now;
        true
    }

    /// The next instant at which [`Session::on_tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Closed => None,
            Phase::AwaitingConnack { deadline } => Some(deadline),
            Phase::Backoff { until } => Some(until),
            // With a PINGREQ outstanding, its PINGRESP is what is waited for; otherwise the next
            // keepalive PINGREQ.
            Phase::Live => {
                let keepalive = match self.pings.front() {
                    Some((sent, _)) => *sent + self.cfg.keepalive,
                    None => self.last_write + self.cfg.keepalive,
                };
                Some(match self.partial_at {
                    Some(t) => keepalive.min(t + FRAME_STALL),
                    None => keepalive,
                })
            }
        }
    }

    /// Checks the timers: CONNACK timeout, backoff over, keepalive ping due or unanswered.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Event> {
        match self.phase {
            Phase::Closed => {}
            Phase::AwaitingConnack { deadline } if now >= deadline => {
                tracing::debug!("no CONNACK; sending CONNECT again");
                self.retry_later(now);
            }
            Phase::Backoff { until } if now >= until => self.connect(now),
            Phase::Live => {
                if self.partial_at.is_some_and(|t| now >= t + FRAME_STALL) {
                    tracing::warn!(
                        bytes = self.input.len(),
                        "a frame from Dom0 stopped half-way; reconnecting"
                    );
                    self.connect(now);
                } else if self
                    .pings
                    .front()
                    .is_some_and(|(sent, _)| now >= *sent + self.cfg.keepalive)
                {
                    tracing::warn!("no PINGRESP from Dom0; reconnecting");
                    self.retry_later(now);
                } else if self.pings.is_empty() && now >= self.last_write + self.cfg.keepalive {
                    self.encode(&Packet::PingReq);
                    self.pings.push_back((now, None));
                    self.last_write = now;
                }
            }
            Phase::AwaitingConnack { .. } | Phase::Backoff { .. } => {}
        }
        self.take_events()
    }

    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            let id = self.next_pkid;
            if !self.inflight.contains_key(&id) && !self.pending_subs.contains_key(&id) {
                return id;
            }
        }
    }

    /// Encodes a packet of ours into the output. Only publishes can exceed the limit, and those are
    /// checked before; anything else that fails is logged and not sent.
    fn encode(&mut self, p: &Packet) {
        if let Err(e) = p.write(&mut self.output, self.cfg.max_packet) {
            tracing::warn!(error = %e, "packet not sent");
        }
    }

    /// Sends CONNECT and waits for the CONNACK.
    fn connect(&mut self, now: Instant) {
        self.go_down();
        self.input.clear();
        self.partial_at = None;
        let mut c = Connect::new(self.cfg.vm.as_str());
        c.keep_alive = u16::try_from(self.cfg.keepalive.as_secs())
            .unwrap_or(u16::MAX)
            .max(1);
        c.clean_session = true;
        // rumqttc's `Connect::write` patches its flags byte at an index counted from the start of
        // the buffer, not from where the packet starts: behind other bytes (a PUBACK queued in the
        // same output) it corrupted "MQTT" instead, and Dom0 discarded the CONNECT (found by the
        // `agent_session` fuzz target). Encoded on its own, then appended.
        let mut frame = BytesMut::with_capacity(64);
        match Packet::Connect(c).write(&mut frame, self.cfg.max_packet) {
            Ok(_) => self.output.extend_from_slice(&frame),
            Err(e) => tracing::warn!(error = %e, "CONNECT not sent"),
        }
        self.last_write = now;
        self.phase = Phase::AwaitingConnack {
            deadline: now + CONNACK_TIMEOUT,
        };
    }

    /// Leaves a live session (if any): what is in flight stays, to be resent.
    fn go_down(&mut self) {
        if self.is_live() {
            self.events.push(Event::Down);
        }
        self.pings.clear();
        self.pending_subs.clear();
    }

    fn retry_later(&mut self, now: Instant) {
        self.go_down();
        self.input.clear();
        self.partial_at = None;
        self.phase = Phase::Backoff {
            until: now + self.backoff.next_delay(),
        };
    }

    /// Looks for the CONNACK; true if the phase changed (process the rest of the input).
    fn scan_connack(&mut self, now: Instant) -> bool {
        let Some((at, rc)) = find_connack(&self.input) else {
            // Keep only what could be the start of a CONNACK.
            let keep = self.input.len().min(3);
            let drop = self.input.len() - keep;
            let _ = self.input.split_to(drop);
            return false;
        };
        let _ = self.input.split_to(at + 4);
        if rc != 0 {
            tracing::warn!(rc, "Dom0 refused the session");
            self.retry_later(now);
            return true;
        }
        tracing::info!("session up");
        self.phase = Phase::Live;
        self.backoff.reset();
        self.last_write = now;
        // Renew subscriptions; resend what was in flight, in order.
        if !self.subscriptions.is_empty() {
            let filters: Vec<(String, QoS)> = self
                .subscriptions
                .iter()
                .map(|(f, q)| (f.clone(), *q))
                .collect();
            self.send_subscribe(filters);
        }
        for id in &self.order {
            if let Some(m) = self.inflight.get_mut(id) {
                let at = self.output.len();
                self.output.extend_from_slice(&m.frame);
                if m.sent {
                    if let Some(b) = self.output.get_mut(at) {
                        *b |= 0x08; // DUP
                    }
                }
                m.sent = true;
            }
        }
        self.events.push(Event::Up);
        true
    }

    fn send_subscribe(&mut self, filters: Vec<(String, QoS)>) {
        let pkid = self.pkid();
        let names: Vec<String> = filters.iter().map(|(f, _)| f.clone()).collect();
        let mut s =
            Subscribe::new_many(filters.into_iter().map(|(f, q)| SubscribeFilter::new(f, q)));
        s.pkid = pkid;
        self.encode(&Packet::Subscribe(s));
        self.pending_subs.insert(pkid, names);
    }

    fn process_live(&mut self, now: Instant) {
        loop {
            match Packet::read(&mut self.input, self.cfg.max_packet) {
                Ok(p) => {
                    if !self.packet(p, now) {
                        return;
                    }
                }
                Err(mqttbytes::Error::InsufficientBytes(_)) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable bytes from Dom0; reconnecting");
                    self.connect(now);
                    return;
                }
            }
        }
    }

    /// One packet from Dom0; false when the session ended.
    fn packet(&mut self, p: Packet, now: Instant) -> bool {
        match p {
            Packet::Publish(p) => {
                match p.qos {
                    QoS::AtMostOnce => {}
                    // Acknowledged in the output, which the driver writes after handing the
                    // message over: the message first.
                    QoS::AtLeastOnce => self.ack(Packet::PubAck(PubAck::new(p.pkid)), now),
                    QoS::ExactlyOnce => self.ack(Packet::PubRec(PubRec::new(p.pkid)), now),
                }
                self.events.push(Event::Message {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos,
                    retain: p.retain,
                });
            }
            Packet::PubRel(r) => self.ack(Packet::PubComp(PubComp::new(r.pkid)), now),
            Packet::PubAck(a) => {
                if self.inflight.remove(&a.pkid).is_some() {
                    self.order.retain(|id| *id != a.pkid);
                    self.events.push(Event::Acked(a.pkid));
                }
            }
            Packet::SubAck(s) => {
                if let Some(filters) = self.pending_subs.remove(&s.pkid) {
                    let mut codes = s.return_codes.iter();
                    let results = filters
                        .into_iter()
                        .map(|f| {
                            let granted = match codes.next() {
                                Some(SubscribeReasonCode::Success(q)) => Some(*q),
                                _ => None,
                            };
                            if granted.is_none() {
                                // An application can ask again and again: said once a second.
                                static SAID: crate::endpoints::admission::Quiet = crate::endpoints::admission::Quiet::new();
                                if let Some(unsaid) = SAID.may_say() {
                                    tracing::warn!(filter = %f, unsaid, "subscription refused by Dom0's policy");
                                }
                            }
                            (f, granted)
                        })
                        .collect();
                    self.events.push(Event::SubAcked(results));
                }
            }
            Packet::PingResp => {
                if let Some((sent, Some(probe))) = self.pings.pop_front() {
                    self.events.push(Event::Pong {
                        probe,
                        rtt: now.saturating_duration_since(sent),
                    });
                }
            }
            Packet::Disconnect => {
                tracing::info!("Dom0 asked to start over");
                self.connect(now);
                return false;
            }
            other => tracing::debug!(packet = ?other, "unexpected packet from Dom0; ignored"),
        }
        true
    }

    fn ack(&mut self, p: Packet, now: Instant) {
        self.encode(&p);
        self.last_write = now;
    }
}

#[cfg(test)]
mod tests;
