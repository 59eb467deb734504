//! The link's logic for one VM, without I/O: bytes from the guest and from the broker in, bytes to
//! each side and [`Effect`]s out. The session owns its buffers and the link's counters; the I/O
//! driver (`link.rs`) only moves bytes ([`Session::to_guest`] and [`Session::guest_written`], the
//! same for the broker) and carries out effects.
//!
//! States: `Scanning` for a well-formed CONNECT (everything before it is discarded), `Connecting`
//! while the driver opens the broker connection, `Live` while packets are relayed under policy.
//! A malformed packet, an over-limit length, a frame that does not complete within the keepalive
//! window, or silence beyond 1.5 × keepalive ends the broker session and returns to `Scanning`;
//! the guest is then sent a DISCONNECT so it starts over at once.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use topics::legacy_translator::{Out as LegacyOut, Translator};
use topics::payload::{self, ErrorBody, ErrorCode, LinkState, NoArgs};
use topics::topic::Topic;
use topics::vm::VmId;
use topics::{RequestId, Response};

use crate::legacy_mode::{self, Dialect};
use crate::mqtt::{self, FixedHeader, PacketError, connack};
use crate::policy::{self, Rules};
use crate::supervision::LinkStats;
use crate::throttle::{Bucket, Reports, Unreported};

/// Refusals of one VM logged and reported on the error topic per second, at most.
pub const REPORTS_PER_SEC: f64 = 10.0;

/// CONNECTs (new broker sessions) one VM may start: a burst, then this many a second. An agent
/// reconnects with a growing backoff and never comes near; a guest starting sessions in a loop
/// gets `CONNACK 3` (server unavailable) without costing the broker a connection.
pub const CONNECT_BURST: f64 = 10.0;
pub const CONNECTS_PER_SEC: f64 = 5.0;

/// Broadcast requests (`discover`, `benchmark` to everyone) one VM may send: a burst, then this
/// many a second, whatever its publish budget (each also costs one token per party that answers).
pub const BROADCAST_BURST: f64 = 20.0;
pub const BROADCASTS_PER_SEC: f64 = 10.0;

/// Requests delivered to a guest whose answers ride on them (beyond, answers pay like any
/// publication). A benchmark is answered twice (`started`, then the figures).
pub const MAX_OWED: usize = 4096;

/// Why a publication of the guest is refused, and whether it counts against the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refusal {
    code: ErrorCode,
    reason: String,
    /// Counts towards the VM's violation limit (its own behaviour).
    violation: bool,
}

impl Refusal {
    fn busy(reason: impl Into<String>) -> Refusal {
        Refusal {
            code: ErrorCode::Busy,
            reason: reason.into(),
            violation: true,
        }
    }

    fn forbidden(reason: String) -> Refusal {
        Refusal {
            code: ErrorCode::Forbidden,
            reason,
            violation: true,
        }
    }
}

/// Longest CONNECT accepted while scanning (client id, will, credentials).
pub const MAX_CONNECT: usize = 64 * 1024;

/// How long an incomplete CONNECT candidate is waited for while scanning. A real CONNECT is written
/// in one go and takes milliseconds even on a slow channel.
pub const SCAN_TIMEOUT: Duration = Duration::from_secs(1);

/// Bounds of one link. Defaults in `config.rs`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest packet accepted from the guest or relayed to it.
    pub max_packet: usize,
    /// Channel supervision maximum; also the broker keepalive used for guests that send 0.
    pub max_keepalive: Duration,
    /// Bytes waiting for the guest before its session is dropped (it stopped reading).
    pub queue_bytes: usize,
    /// Sustained PUBLISH rate from the guest (token bucket refill per second).
    pub rate_per_sec: u32,
    /// Token bucket size.
    pub burst: u32,
    /// QoS 1/2 publishes from the guest awaiting the broker's acknowledgement.
    pub max_inflight: usize,
    /// Refusals in one session after which the VM is disconnected.
    pub violation_limit: u32,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Open a broker connection, then call [`Session::broker_connected`] or [`Session::broker_failed`].
    OpenBroker,
    /// Close the broker connection, then call [`Session::broker_released`]; with `flush`, write
    /// [`Session::to_broker`] out first (the guest's clean DISCONNECT).
    CloseBroker { flush: bool },
    /// Report a link state change.
    State(LinkState, Option<String>),
    /// A refused packet, to log at warn and report on the error topic. Never carries payload bytes.
    Refused { topic: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Scanning,
    Connecting,
    Live {
        connack_seen: bool,
    },
    /// The guest speaks the MVP's JSON lines: the link translates (`legacy_mode.rs`).
    Legacy {
        connack_seen: bool,
    },
}

/// Whether a client id names a party other than the VM (the registry of known VMs, and Dom0).
#[derive(Clone)]
pub struct NamesAParty(pub Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl std::fmt::Debug for NamesAParty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NamesAParty(..)")
    }
}

/// One VM's link state.
#[derive(Debug)]
pub struct Session {
    /// The channel's identity: never taken from bytes the guest sent.
    vm: VmId,
    limits: Limits,
    rules: Rules,
    stats: Arc<LinkStats>,
    phase: Phase,
    /// Bytes read from the guest, not yet processed.
    guest_in: BytesMut,
    /// Bytes read from the broker, not yet processed.
    broker_in: BytesMut,
    /// Bytes waiting to be written to the guest.
    to_guest: BytesMut,
    /// Bytes waiting to be written to the broker.
    to_broker: BytesMut,
    /// The rewritten CONNECT, sent once the broker connection is open.
    pending_connect: BytesMut,
    /// 1.5 × the effective keepalive: silence beyond this ends the session.
    window: Duration,
    /// When the link must ping the broker itself (guest keepalive 0).
    own_keepalive: Option<Duration>,
    last_guest: Instant,
    last_to_broker: Instant,
    /// Since when an incomplete frame sits in `guest_in`.
    partial_since: Option<Instant>,
    /// Outstanding PINGREQs to the broker, in order: true for the link's own.
    pings: VecDeque<bool>,
    /// SUBSCRIBEs with refused filters: packet id → refused positions.
    pending_subs: HashMap<u16, Vec<bool>>,
    /// QoS 2 publishes from the guest that were refused (we answered PUBREC; PUBREL gets PUBCOMP).
    refused_qos2: HashSet<u16>,
    /// QoS 2 publishes from the broker that were not delivered (we answered PUBREC).
    dropped_qos2: HashSet<u16>,
    /// Guest QoS 1/2 publishes awaiting the broker's PUBACK/PUBCOMP.
    inflight: HashSet<u16>,
    /// Broker QoS 1/2 deliveries relayed to the guest: the acknowledgement each one awaits. A
    /// guest's acknowledgement for anything else is dropped here, never shown to the broker.
    awaiting: HashMap<u16, u8>,
    /// The guest's publish rate (from the limits).
    publishes: Bucket,
    /// The guest's new sessions.
    connects: Bucket,
    /// The guest's broadcast requests.
    broadcasts: Bucket,
    /// Set when a CONNECT went beyond the budget: the guest is not read until then (it blocks on
    /// its full channel instead of spinning through refusals).
    hold_until: Option<Instant>,
    violations: u32,
    /// When the guest was last told to start over because it sent something other than CONNECT.
    last_nudge: Option<Instant>,
    /// Refusal reports allowed now, and what was held back since the last one.
    reports: Reports,
    effects: Vec<Effect>,
    /// What the channel speaks: decided on the first byte of its life.
    dialect: Dialect,
    /// The translation of a guest in legacy mode (`Phase::Legacy`, and `Connecting` towards it).
    legacy: Option<Translator>,
    /// Parties that answer a broadcast (every VM Dom0 knows, and Dom0): what one costs.
    parties: usize,
    /// Requests delivered to the guest and not answered yet: its answers ride on them, not on its
    /// own rate (a broadcast is charged to whoever asked it).
    owed: usize,
    /// Filters of this session forwarded to the broker (checked again when the policy changes).
    subscribed: BTreeSet<String>,
    /// A legacy guest's bytes that may have been a CONNECT were waited for long enough: they are
    /// a line.
    legacy_connect_waited: bool,
    /// Whether a client id names another party (a VM Dom0 knows, or Dom0): such a CONNECT is
    /// refused; any other id is replaced by the VM's name.
    names_a_party: NamesAParty,
    /// Packet ids of the publishes the link makes for a legacy guest.
    legacy_pkid: u16,
}

impl Session {
    pub fn new(
        vm: VmId,
        limits: Limits,
        rules: Rules,
        stats: Arc<LinkStats>,
        now: Instant,
    ) -> Session {
        let publishes = Bucket::full(f64::from(limits.burst), f64::from(limits.rate_per_sec), now);
        let window = limits.max_keepalive.mul_f32(1.5);
        Session {
            vm,
            limits,
            rules,
            stats,
            phase: Phase::Scanning,
            guest_in: BytesMut::new(),
            broker_in: BytesMut::new(),
            to_guest: BytesMut::new(),
            to_broker: BytesMut::new(),
            pending_connect: BytesMut::new(),
            window,
            own_keepalive: None,
            last_guest: now,
            last_to_broker: now,
            partial_since: None,
            pings: VecDeque::new(),
            pending_subs: HashMap::new(),
            refused_qos2: HashSet::new(),
            dropped_qos2: HashSet::new(),
            inflight: HashSet::new(),
            awaiting: HashMap::new(),
            publishes,
            connects: Bucket::full(CONNECT_BURST, CONNECTS_PER_SEC, now),
            broadcasts: Bucket::full(BROADCAST_BURST, BROADCASTS_PER_SEC, now),
            hold_until: None,
            violations: 0,
            last_nudge: None,
            reports: Reports::new(REPORTS_PER_SEC, "refusals", now),
            effects: Vec::new(),
            dialect: Dialect::Undecided,
            legacy: None,
            parties: 1,
            owed: 0,
            legacy_pkid: 0,
            legacy_connect_waited: false,
            names_a_party: NamesAParty(Arc::new(|id: &str| {
                id.eq_ignore_ascii_case(topics::vm::DOM0) || VmId::parse(id).is_ok()
            })),
            subscribed: BTreeSet::new(),
        }
    }

    /// The policy was reloaded: the VM's new rules apply to every packet from now on. A session
    /// holding a subscription the new rules deny is restarted (the guest resubscribes at once and
    /// is refused what is denied now); deliveries are checked against the new rules meanwhile.
    pub fn set_rules(&mut self, rules: Rules, now: Instant) -> Vec<Effect> {
        if rules == self.rules {
            return Vec::new();
        }
        self.rules = rules;
        let denied = self
            .subscribed
            .iter()
            .find(|f| self.rules.check_subscribe(f).is_err())
            .cloned();
        match denied {
            Some(f) if self.has_broker() => {
                tracing::info!(filter = %f, "policy reloaded: a subscription is no longer allowed; restarting the session");
                self.end_session(
                    &format!("policy reloaded: subscription {f:?} no longer allowed"),
                    false,
                    now,
                );
            }
            _ => tracing::debug!("policy reloaded"),
        }
        std::mem::take(&mut self.effects)
    }

    /// True while a broker session is open or opening.
    pub fn has_broker(&self) -> bool {
        !matches!(self.phase, Phase::Scanning)
    }

    /// True while the driver should read the guest: not while the broker connection is opening
    /// (bytes wait in the socket), not while the broker does not keep up (backpressure on the guest),
    /// not while the guest is held for starting sessions beyond its budget.
    pub fn wants_guest_input(&self) -> bool {
        self.phase != Phase::Connecting
            && self.hold_until.is_none()
            && self.to_broker.len() < self.limits.max_packet.max(64 * 1024)
            && self.guest_in.len() <= self.limits.max_packet + 8
    }

    /// Called when the link attaches to the channel: tell the guest to start over.
    pub fn attach(&mut self, now: Instant) {
        self.stats.linked.store(true, Relaxed);
        self.last_nudge = Some(now);
        self.to_guest.extend_from_slice(&mqtt::DISCONNECT_PACKET);
    }

    /// How a client id is told to name another party: the driver gives the registry of the VMs
    /// Dom0 knows (the default, without one: any valid VM id, and Dom0).
    pub fn with_parties(mut self, names_a_party: NamesAParty) -> Session {
        self.names_a_party = names_a_party;
        self
    }

    /// How many parties answer a broadcast now (the VMs Dom0 knows, and Dom0 itself): what a
    /// broadcast request of this VM costs it.
    pub fn set_parties(&mut self, n: usize) {
        self.parties = n.max(1);
    }

    /// Called when the link leaves the channel (socket closed, service stopping).
    pub fn detach(&mut self) {
        self.stats.linked.store(false, Relaxed);
        self.stats.session.store(false, Relaxed);
    }

    /// Bytes waiting to be written to the guest.
    pub fn to_guest(&self) -> &[u8] {
        &self.to_guest
    }

    /// The driver wrote the first `n` bytes of [`Session::to_guest`].
    pub fn guest_written(&mut self, n: usize) {
        self.to_guest.advance(n.min(self.to_guest.len()));
    }

    /// Bytes waiting to be written to the broker.
    pub fn to_broker(&self) -> &[u8] {
        &self.to_broker
    }

    /// The driver wrote the first `n` bytes of [`Session::to_broker`].
    pub fn broker_written(&mut self, n: usize) {
        self.to_broker.advance(n.min(self.to_broker.len()));
    }

    /// The driver closed the broker connection (after [`Effect::CloseBroker`]): what was left for
    /// it or from it belongs to no session any more.
    pub fn broker_released(&mut self) {
        self.to_broker.clear();
        self.broker_in.clear();
    }

    /// Bytes read from the guest.
    pub fn on_guest_input(&mut self, bytes: &[u8], now: Instant) -> Vec<Effect> {
        self.guest_in.extend_from_slice(bytes);
        if !self.guest_in.is_empty() {
            self.last_guest = now;
        }
        self.process_guest(now);
        std::mem::take(&mut self.effects)
    }

    fn process_guest(&mut self, now: Instant) {
        loop {
            let progressed = match self.phase {
                Phase::Scanning => self.scan(now),
                Phase::Connecting => false,
                Phase::Live { .. } => self.relay_one_from_guest(now),
                Phase::Legacy { .. } => self.legacy_input(now),
            };
            if !progressed {
                break;
            }
        }
        // A legacy guest's unfinished line is the translation's to time (progress, not age).
        let nothing_partial = self.guest_in.is_empty();
        self.partial_since = match (
            nothing_partial || self.phase == Phase::Connecting,
            self.partial_since,
        ) {
            (true, _) => None,
            (false, Some(t)) => Some(t),
            (false, None) => Some(now),
        };
    }

    /// Looks for a CONNECT in `guest_in` (or, on a legacy channel, starts a legacy session).
    /// Returns true if it consumed something worth looping on.
    fn scan(&mut self, now: Instant) -> bool {
        if self.dialect == Dialect::Undecided {
            match legacy_mode::dialect_of(&self.guest_in) {
                None => return false,
                Some(d) => self.dialect = d,
            }
        }
        if self.dialect == Dialect::Legacy {
            let starts_connect = self.guest_in.first() == Some(&(mqtt::CONNECT << 4));
            match candidate(&self.guest_in) {
                Candidate::Connect(..) | Candidate::Level(..) => {
                    tracing::info!("legacy guest switches to MQTT");
                    self.dialect = Dialect::Mqtt;
                }
                // It may be a CONNECT: wait (the partial-frame timer bounds the wait).
                Candidate::Incomplete if starts_connect => return false,
                _ if self.guest_in.iter().all(u8::is_ascii_whitespace) => return false,
                _ => return self.enter_legacy(now),
            }
        }
        let start = self.guest_in.iter().position(|b| *b == mqtt::CONNECT << 4);
        let skipped = start.unwrap_or(self.guest_in.len());
        if skipped > 0 {
            self.discard(skipped);
            self.nudge(now);
        }
        if start.is_none() {
            return false;
        }
        match candidate(&self.guest_in) {
            Candidate::NotConnect => {
                self.discard(1);
                true
            }
            Candidate::Incomplete => false,
            Candidate::Level(h, level) => {
                // A real CONNECT of a protocol we do not speak: say so (3.1.1 clients understand rc 1).
                self.guest_in.advance(h.frame_len());
                if !self.connect_within_budget(now) {
                    return true;
                }
                if let Some(unreported) = self.may_report(now) {
                    tracing::warn!(
                        level,
                        "CONNECT with unsupported protocol level refused{unreported}"
                    );
                }
                mqtt::encode_connack(false, connack::UNACCEPTABLE_PROTOCOL, &mut self.to_guest);
                true
            }
            Candidate::Connect(h, c) => {
                self.guest_in.advance(h.frame_len());
                self.stats.packets_in.fetch_add(1, Relaxed);
                self.stats.bytes_in.fetch_add(h.frame_len() as u64, Relaxed);
                self.on_connect(c, now)
            }
        }
    }

    /// The guest speaks the MVP's JSON lines: open a broker session on its behalf and translate.
    /// A legacy session costs the same budget as an MQTT one; beyond it the guest is not read until
    /// a token is there (its bytes wait). Returns true if it consumed something worth looping on.
    fn enter_legacy(&mut self, now: Instant) -> bool {
        if !self.take_session_token(now) {
            return false;
        }
        tracing::info!("guest speaks the MVP's JSON lines: legacy mode");
        // Ends, on the guest's side, the line our attach signal started.
        self.to_guest.extend_from_slice(b"\n");
        self.legacy = Some(legacy_mode::translator(&self.vm, self.limits.max_packet));
        let max = self.limits.max_keepalive;
        let c = mqtt::Connect {
            clean_session: true,
            keep_alive: u16::try_from(max.as_secs()).unwrap_or(u16::MAX).max(1),
            client_id: self.vm.to_string(),
            will: None,
            username: Some(self.vm.to_string()),
            password: None,
        };
        self.pending_connect.clear();
        mqtt::encode_connect(&c, &mut self.pending_connect);
        self.own_keepalive = Some(max / 2);
        self.window = max.mul_f32(1.5);
        self.reset_session_state(now);
        self.phase = Phase::Connecting;
        self.effects.push(Effect::OpenBroker);
        false
    }

    /// Feeds the guest's bytes to the legacy translation, a line at a time; a CONNECT at a line
    /// boundary switches the guest to MQTT. True when the phase changed.
    fn legacy_input(&mut self, now: Instant) -> bool {
        loop {
            let Some(l) = self.legacy.as_mut() else {
                return true;
            };
            if l.partial().is_empty() && self.guest_in.first() == Some(&(mqtt::CONNECT << 4)) {
                match candidate(&self.guest_in) {
                    Candidate::Connect(..) | Candidate::Level(..) => {
                        tracing::info!("legacy guest switches to MQTT");
                        self.dialect = Dialect::Mqtt;
                        self.leave_legacy("guest switched to MQTT");
                        return true;
                    }
                    // It may be a CONNECT: wait (the partial-frame timer bounds the wait).
                    Candidate::Incomplete if !self.legacy_connect_waited => return false,
                    // Not a CONNECT: a line like any other.
                    Candidate::Incomplete | Candidate::NotConnect => {}
                }
            }
            self.legacy_connect_waited = false;
            if self.guest_in.is_empty() {
                return false;
            }
            let n = self
                .guest_in
                .iter()
                .position(|b| *b == b'\n')
                .map_or(self.guest_in.len(), |i| i + 1);
            let chunk = self.guest_in.split_to(n);
            self.stats.bytes_in.fetch_add(n as u64, Relaxed);
            let outs = l.on_bytes(&chunk, now, &mut random_request_id);
            self.legacy_outs(outs, now);
        }
    }

    /// Ends the legacy broker session (the guest switches to MQTT, or the broker went away).
    fn leave_legacy(&mut self, why: &str) {
        let was_up = self.phase == Phase::Legacy { connack_seen: true };
        self.legacy = None;
        self.phase = Phase::Scanning;
        self.effects.push(Effect::CloseBroker { flush: false });
        if was_up {
            self.state(LinkState::SessionDown, Some(why.to_owned()));
        }
    }

    /// Carries out what the legacy translation asks: lines to the guest, publications under the
    /// same bounds and policy as an MQTT guest's.
    fn legacy_outs(&mut self, outs: Vec<LegacyOut>, now: Instant) {
        for o in outs {
            let (topic, payload) = match o {
                LegacyOut::Line(line) => {
                    self.relay_to_guest(&line);
                    continue;
                }
                LegacyOut::Request { topic, payload, .. }
                | LegacyOut::Publish { topic, payload } => (topic, payload),
            };
            self.stats.packets_in.fetch_add(1, Relaxed);
            match self.admit(&topic, &payload, now) {
                Ok(stamped) => {
                    self.legacy_pkid = self.legacy_pkid.checked_add(1).unwrap_or(1);
                    mqtt::encode_publish(
                        &mqtt::Publish {
                            topic: &topic,
                            qos: 1,
                            retain: false,
                            dup: false,
                            pkid: Some(self.legacy_pkid),
                            payload: stamped.as_deref().unwrap_or(&payload),
                        },
                        &mut self.to_broker,
                    );
                    self.last_to_broker = now;
                }
                Err(r) => {
                    let shown: String = topic.chars().take(128).collect();
                    self.refused_as(&shown, &r.reason, r.violation, now);
                    let line = self
                        .legacy
                        .as_mut()
                        .map(|l| l.refused(&topic, &payload, &r.reason));
                    if let Some(line) = line {
                        self.relay_to_guest(&line);
                    }
                }
            }
        }
    }

    /// A packet from the broker for a legacy guest.
    fn legacy_broker_packet(&mut self, h: &FixedHeader, body: &[u8], now: Instant) {
        match h.kind() {
            mqtt::CONNACK => {
                let rc = mqtt::parse_connack(body)
                    .map(|(_, rc)| rc)
                    .unwrap_or(connack::SERVER_UNAVAILABLE);
                if rc == connack::ACCEPTED {
                    self.phase = Phase::Legacy { connack_seen: true };
                    tracing::info!("session up (legacy mode)");
                    self.state(LinkState::SessionUp, Some("legacy mode".into()));
                } else {
                    tracing::warn!(rc, "broker refused the legacy session");
                    self.leave_legacy("broker refused the session");
                }
            }
            mqtt::PUBLISH => {
                let Ok(p) = mqtt::parse_publish(h, body) else {
                    self.end_session("bad PUBLISH from broker", false, now);
                    return;
                };
                match (p.qos, p.pkid) {
                    (1, Some(id)) => mqtt::encode_ack(mqtt::PUBACK, id, &mut self.to_broker),
                    (2, Some(id)) => {
                        self.dropped_qos2.insert(id);
                        mqtt::encode_ack(mqtt::PUBREC, id, &mut self.to_broker);
                    }
                    _ => {}
                }
                if self.rules.check_deliver(p.topic).is_ok() {
                    let line = self
                        .legacy
                        .as_mut()
                        .and_then(|l| l.on_message(p.topic, p.payload, now));
                    if let Some(line) = line {
                        self.owe_answers(p.topic);
                        self.relay_to_guest(&line);
                    }
                }
            }
            mqtt::PUBREL => {
                if let Ok(id) = mqtt::parse_pkid(body) {
                    self.dropped_qos2.remove(&id);
                    mqtt::encode_ack(mqtt::PUBCOMP, id, &mut self.to_broker);
                }
            }
            mqtt::PINGRESP => {
                self.pings.pop_front();
            }
            // SUBACK (a refused filter simply delivers nothing), PUBACK: nothing to do.
            _ => {}
        }
    }

    /// The guest sends something other than CONNECT while it has no session: it may believe an old
    /// session is alive (our attach signal was lost). Tell it again, at most once a second.
    fn nudge(&mut self, now: Instant) {
        if self
            .last_nudge
            .is_none_or(|t| now >= t + Duration::from_secs(1))
        {
            self.last_nudge = Some(now);
            tracing::debug!(
                "guest sent non-CONNECT bytes without a session; telling it to start over"
            );
            self.to_guest.extend_from_slice(&mqtt::DISCONNECT_PACKET);
        }
    }

    /// Reports a state change, and keeps the `session` counter true to it.
    fn state(&mut self, state: LinkState, detail: Option<String>) {
        match state {
            LinkState::SessionUp => self.stats.session.store(true, Relaxed),
            LinkState::SessionDown | LinkState::Overflow | LinkState::Violations => {
                self.stats.session.store(false, Relaxed)
            }
            _ => {}
        }
        self.effects.push(Effect::State(state, detail));
    }

    fn discard(&mut self, n: usize) {
        let n = n.min(self.guest_in.len());
        if n > 0 {
            self.stats.garbage_bytes.fetch_add(n as u64, Relaxed);
            self.guest_in.advance(n);
        }
    }

    /// Takes a token of the CONNECT budget; without one, the CONNECT is answered `CONNACK 3`.
    fn connect_within_budget(&mut self, now: Instant) -> bool {
        if self.take_session_token(now) {
            return true;
        }
        mqtt::encode_connack(false, connack::SERVER_UNAVAILABLE, &mut self.to_guest);
        false
    }

    /// Takes a token of the budget of new sessions (MQTT or legacy); without one, the guest is
    /// not read until the next token.
    fn take_session_token(&mut self, now: Instant) -> bool {
        if self.connects.take(now) {
            return true;
        }
        self.stats.dropped.fetch_add(1, Relaxed);
        self.hold_until = Some(self.connects.next_token(now));
        if let Some(unreported) = self.may_report(now) {
            tracing::warn!("new session beyond {CONNECTS_PER_SEC} a second refused{unreported}");
        }
        false
    }

    /// A well-formed CONNECT: check identity and will, rewrite, ask for a broker connection.
    fn on_connect(&mut self, mut c: mqtt::Connect, now: Instant) -> bool {
        if !self.connect_within_budget(now) {
            return true;
        }
        if c.client_id != self.vm.as_str() && (self.names_a_party.0)(&c.client_id) {
            let claimed: String = c.client_id.chars().take(64).collect();
            if let Some(unreported) = self.may_report(now) {
                tracing::warn!(claimed = ?claimed, "CONNECT with another VM's client id refused{unreported}");
            }
            self.refusal();
            mqtt::encode_connack(false, connack::IDENTIFIER_REJECTED, &mut self.to_guest);
            self.state(
                LinkState::IdentityRefused,
                Some(format!("claimed client id {claimed:?}")),
            );
            return true;
        }
        if let Some(w) = c.will.as_mut() {
            match policy::check_publish(&self.rules, &self.vm, &w.topic, &w.payload) {
                Ok(None) => {}
                Ok(Some(stamped)) => w.payload = stamped.into(),
                Err(d) => {
                    let topic: String = w.topic.chars().take(128).collect();
                    self.refused(&topic, &format!("will message refused: {d}"), now);
                    mqtt::encode_connack(false, connack::NOT_AUTHORIZED, &mut self.to_guest);
                    return true;
                }
            }
        }
        let max = self.limits.max_keepalive;
        let asked = Duration::from_secs(u64::from(c.keep_alive));
        let effective = if asked.is_zero() || asked > max {
            max
        } else {
            asked
        };
        self.window = effective.mul_f32(1.5);
        if c.keep_alive == 0 {
            // rumqttd refuses keepalive 0: keep the broker side alive ourselves.
            c.keep_alive = u16::try_from(max.as_secs()).unwrap_or(u16::MAX).max(1);
        }
        // The link pings the broker itself whenever it sent nothing for half the keepalive it
        // announced: the broker never ends the session on its own timer (its 1.5 × keepalive
        // counts from the last packet it got, which can be earlier than the guest's last byte, e.g.
        // a frame left half-way); the link's supervision of the guest decides.
        self.own_keepalive = Some(Duration::from_secs(u64::from(c.keep_alive)) / 2);
        // Identity is the channel's: client id and user name are the VM name; no password travels.
        // A client's own id (PSEC's `Diag`, `notify-disk-added`) is replaced, said at debug.
        if !c.client_id.is_empty() && c.client_id != self.vm.as_str() {
            tracing::debug!(client_id = %c.client_id.chars().take(64).collect::<String>(), "client id replaced by the VM's name");
        }
        c.client_id = self.vm.to_string();
        c.username = Some(self.vm.to_string());
        c.password = None;
        self.pending_connect.clear();
        mqtt::encode_connect(&c, &mut self.pending_connect);
        self.reset_session_state(now);
        self.phase = Phase::Connecting;
        self.effects.push(Effect::OpenBroker);
        false
    }

    fn reset_session_state(&mut self, now: Instant) {
        self.subscribed.clear();
        self.pings.clear();
        self.pending_subs.clear();
        self.refused_qos2.clear();
        self.dropped_qos2.clear();
        self.inflight.clear();
        self.awaiting.clear();
        self.violations = 0;
        self.owed = 0;
        self.publishes = Bucket::full(
            f64::from(self.limits.burst),
            f64::from(self.limits.rate_per_sec),
            now,
        );
        self.broker_in.clear();
        self.to_broker.clear();
    }

    /// The broker connection is open: send the CONNECT and relay from now on.
    pub fn broker_connected(&mut self, now: Instant) -> Vec<Effect> {
        self.to_broker.extend_from_slice(&self.pending_connect);
        self.last_to_broker = now;
        if self.legacy.is_some() {
            let filters: Vec<(&str, u8)> = Vec::new();
            let subs = legacy_mode::subscriptions(&self.vm, &self.rules);
            self.subscribed.extend(subs.iter().cloned());
            let mut filters = filters;
            filters.extend(subs.iter().map(|f| (f.as_str(), 1u8)));
            if !filters.is_empty() {
                mqtt::encode_subscribe(1, &filters, &mut self.to_broker);
            }
            self.phase = Phase::Legacy {
                connack_seen: false,
            };
        } else {
            self.phase = Phase::Live {
                connack_seen: false,
            };
        }
        self.on_guest_input(&[], now)
    }

    /// The broker could not be reached: tell the guest, which will retry.
    pub fn broker_failed(&mut self) {
        if self.legacy.take().is_none() {
            mqtt::encode_connack(false, connack::SERVER_UNAVAILABLE, &mut self.to_guest);
        }
        self.phase = Phase::Scanning;
    }

    /// The broker closed the connection: the guest's session is over.
    pub fn broker_closed(&mut self, now: Instant) -> Vec<Effect> {
        if self.has_broker() {
            self.end_session("broker closed the connection", false, now);
        }
        std::mem::take(&mut self.effects)
    }

    /// Ends the broker session and sends the guest back to CONNECT. `flush` marks the guest's own
    /// DISCONNECT: it is forwarded to the broker first (so no will is published).
    fn end_session(&mut self, why: &str, flush: bool, now: Instant) {
        // What was partial belonged to the session that ends (or to the legacy translation).
        if self.guest_in.is_empty() {
            self.partial_since = None;
        }
        let was_live = matches!(
            self.phase,
            Phase::Live { connack_seen: true } | Phase::Legacy { connack_seen: true }
        );
        self.phase = Phase::Scanning;
        self.effects.push(Effect::CloseBroker { flush });
        if self.legacy.take().is_some() {
            // A legacy guest reads lines, not MQTT: it is told nothing; its next line starts a
            // new legacy session.
            self.to_guest.extend_from_slice(b"\n");
        } else if !flush {
            // Not the guest's own DISCONNECT: tell it to start over. (After its DISCONNECT the guest
            // has gone; a byte sent now would wait in the tty for whoever opens it next.)
            self.to_guest.extend_from_slice(&mqtt::DISCONNECT_PACKET);
            self.last_nudge = Some(now);
        }
        if was_live {
            self.state(LinkState::SessionDown, Some(why.to_owned()));
        }
        tracing::info!(reason = why, "session ended");
    }

    fn desync(&mut self, e: &PacketError, now: Instant) {
        if let Some(unreported) = self.may_report(now) {
            tracing::warn!(error = %e, "malformed packet from guest; scanning for CONNECT{unreported}");
        }
        self.stats.dropped.fetch_add(1, Relaxed);
        self.end_session(&format!("malformed packet: {e}"), false, now);
    }

    fn refusal(&mut self) {
        self.stats.refused.fetch_add(1, Relaxed);
        self.violations += 1;
    }

    /// A refused packet that counts as a violation (see [`Session::refused_as`]).
    fn refused(&mut self, topic: &str, reason: &str, now: Instant) -> bool {
        self.refused_as(topic, reason, true, now)
    }

    /// A refused packet: counted always, as a violation of the VM's own when `violation`;
    /// logged and reported at most [`REPORTS_PER_SEC`] a second (a flooding guest must not flood
    /// the log or the error topic), the rest summed up in the next report.
    fn refused_as(&mut self, topic: &str, reason: &str, violation: bool, now: Instant) -> bool {
        if violation {
            self.refusal();
        } else {
            self.stats.refused.fetch_add(1, Relaxed);
        }
        let Some(unreported) = self.may_report(now) else {
            return false;
        };
        let reason = format!("{reason}{unreported}");
        tracing::warn!(topic, reason = %reason, "refused");
        self.effects.push(Effect::Refused {
            topic: topic.to_owned(),
            reason,
        });
        true
    }

    /// Whether something the guest did may be logged (and reported) now: at most
    /// [`REPORTS_PER_SEC`] a second, shared by every kind of guest misbehaviour, so no guest floods
    /// the log. `Some` carries the suffix counting what was not reported since the last report.
    fn may_report(&mut self, now: Instant) -> Option<Unreported> {
        self.reports.may_report(now)
    }

    /// An acknowledgement from the guest for nothing the broker sent it (or out of order): dropped.
    fn unsolicited(&mut self, kind: u8, id: u16, now: Instant) {
        self.stats.dropped.fetch_add(1, Relaxed);
        if let Some(unreported) = self.may_report(now) {
            tracing::warn!(
                kind,
                id,
                "unsolicited acknowledgement from guest dropped{unreported}"
            );
        }
    }

    /// Frames and relays one packet from the guest. Returns false when it needs more bytes.
    fn relay_one_from_guest(&mut self, now: Instant) -> bool {
        let h = match mqtt::fixed_header(&self.guest_in, self.limits.max_packet) {
            Ok(None) => return false,
            Ok(Some(h)) if self.guest_in.len() < h.frame_len() => return false,
            Ok(Some(h)) => h,
            Err(e) => {
                self.desync(&e, now);
                return true;
            }
        };
        let frame = self.guest_in.split_to(h.frame_len()).freeze();
        self.stats.packets_in.fetch_add(1, Relaxed);
        self.stats.bytes_in.fetch_add(frame.len() as u64, Relaxed);
        if let Err(e) = mqtt::check_flags(&h) {
            self.desync(&e, now);
            return true;
        }
        let body = frame.get(h.header_len..).unwrap_or_default();
        let result = match h.kind() {
            mqtt::CONNECT => {
                self.connect_on_a_live_link(&frame, now);
                return true;
            }
            mqtt::PUBLISH => self.guest_publish(&h, &frame, now),
            kind @ (mqtt::PUBACK | mqtt::PUBREC | mqtt::PUBCOMP) => {
                mqtt::parse_pkid(body).map(|id| self.guest_ack(kind, id, &frame, now))
            }
            mqtt::PUBREL => mqtt::parse_pkid(body).map(|id| self.guest_pubrel(id, &frame, now)),
            mqtt::SUBSCRIBE => self.guest_subscribe(body, now),
            mqtt::UNSUBSCRIBE => mqtt::parse_unsubscribe(body).map(|(_, filters)| {
                for f in filters {
                    self.subscribed.remove(f);
                }
                self.forward(&frame, now)
            }),
            mqtt::PINGREQ if body.is_empty() => {
                self.pings.push_back(false);
                self.forward(&frame, now);
                Ok(())
            }
            mqtt::DISCONNECT if body.is_empty() => {
                self.forward(&frame, now);
                self.end_session("guest disconnected", true, now);
                return true;
            }
            kind => Err(PacketError::BadType(kind)),
        };
        if let Err(e) = result {
            self.desync(&e, now);
        } else if self.violations >= self.limits.violation_limit {
            tracing::warn!(
                violations = self.violations,
                "too many refusals; disconnecting the VM"
            );
            self.state(
                LinkState::Violations,
                Some(format!("{} refusals", self.violations)),
            );
            self.end_session("too many policy violations", false, now);
        }
        true
    }

    /// A new session on a live link: the old broker session ends, a new one starts.
    fn connect_on_a_live_link(&mut self, frame: &[u8], now: Instant) {
        match candidate(frame) {
            Candidate::Connect(_, c) => {
                self.phase = Phase::Scanning;
                self.effects.push(Effect::CloseBroker { flush: false });
                self.state(LinkState::SessionDown, Some("new CONNECT".into()));
                self.on_connect(c, now);
            }
            _ => self.desync(&PacketError::BadBody, now),
        }
    }

    /// The guest's PUBACK, PUBREC or PUBCOMP: forwarded only for what the broker sent it.
    fn guest_ack(&mut self, kind: u8, id: u16, frame: &[u8], now: Instant) {
        if self.awaiting.get(&id) == Some(&kind) {
            // After a PUBREC, the broker's PUBREL comes and awaits the PUBCOMP.
            self.awaiting.remove(&id);
            self.forward(frame, now);
        } else {
            self.unsolicited(kind, id, now);
        }
    }

    /// The guest's PUBREL: completed here for a refused QoS 2 publish (or nothing in flight),
    /// forwarded for one the broker has.
    fn guest_pubrel(&mut self, id: u16, frame: &[u8], now: Instant) {
        if self.refused_qos2.remove(&id) {
            mqtt::encode_ack(mqtt::PUBCOMP, id, &mut self.to_guest);
        } else if self.inflight.contains(&id) {
            self.forward(frame, now);
        } else {
            // Nothing of the guest's in flight under this id: completed here (MQTT: a PUBREL is
            // always answered by a PUBCOMP), the broker never sees it.
            self.unsolicited(mqtt::PUBREL, id, now);
            mqtt::encode_ack(mqtt::PUBCOMP, id, &mut self.to_guest);
        }
    }

    fn forward(&mut self, frame: &[u8], now: Instant) {
        self.to_broker.extend_from_slice(frame);
        self.last_to_broker = now;
    }

    fn guest_publish(
        &mut self,
        h: &FixedHeader,
        frame: &[u8],
        now: Instant,
    ) -> Result<(), PacketError> {
        let body = frame.get(h.header_len..).unwrap_or_default();
        let p = mqtt::parse_publish(h, body)?;
        let verdict = if p.pkid.is_some_and(|id| self.inflight.contains(&id)) && !p.dup {
            Err(Refusal::busy("packet id already in flight"))
        } else if p.qos > 0 && self.inflight.len() >= self.limits.max_inflight {
            Err(Refusal::busy(format!(
                "more than {} messages in flight",
                self.limits.max_inflight
            )))
        } else {
            self.admit(p.topic, p.payload, now)
        };
        match verdict {
            Ok(stamped) => {
                if let Some(id) = p.pkid {
                    self.inflight.insert(id);
                }
                match stamped {
                    None => self.forward(frame, now),
                    Some(payload) => {
                        let mut out = BytesMut::new();
                        mqtt::encode_publish(
                            &mqtt::Publish {
                                payload: &payload,
                                ..p
                            },
                            &mut out,
                        );
                        self.forward(&out, now);
                    }
                }
            }
            Err(r) => {
                let topic: String = p.topic.chars().take(128).collect();
                if self.refused_as(&topic, &r.reason, r.violation, now) {
                    // A refused request is answered, so its caller fails at once (rate-limited
                    // with the refusal reports).
                    self.answer_refused_request(p.topic, p.payload, r.code, &r.reason);
                }
                // Acknowledge so the guest's session stays sound; the message goes nowhere.
                match (p.qos, p.pkid) {
                    (1, Some(id)) => mqtt::encode_ack(mqtt::PUBACK, id, &mut self.to_guest),
                    (2, Some(id)) => {
                        self.refused_qos2.insert(id);
                        mqtt::encode_ack(mqtt::PUBREC, id, &mut self.to_guest);
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The one admission of a publication from the guest (MQTT or legacy): its rate, then the
    /// policy and the identity fields. An answer to a request delivered to the guest rides on that
    /// request (a broadcast is charged to whoever asked it, never to those who answer); a
    /// broadcast costs its sender one token per party that answers, and its own tight budget.
    /// Ok(Some(payload)): publish that payload instead (the identity filled in).
    fn admit(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        let answer = policy::is_response_topic(topic);
        if answer && self.owed > 0 {
            self.owed -= 1;
        } else {
            let broadcast = policy::is_broadcast(topic, payload);
            let cost = if broadcast { self.parties } else { 1 };
            if broadcast && !self.broadcasts.take(now) {
                return Err(Refusal::busy(format!(
                    "broadcast requests beyond {BROADCASTS_PER_SEC} a second"
                )));
            }
            if !self.publishes.take_n(cost, now) {
                return Err(Refusal::busy(format!(
                    "rate limit ({} msg/s) exceeded{}",
                    self.limits.rate_per_sec,
                    if broadcast {
                        format!(" (a broadcast costs {cost}: one per party that answers)")
                    } else {
                        String::new()
                    }
                )));
            }
        }
        let stamped = policy::check_publish(&self.rules, &self.vm, topic, payload)
            .map_err(|d| Refusal::forbidden(d.to_string()))?;
        let size = topic.len() + stamped.as_ref().map_or(payload.len(), Vec::len) + 9;
        if size > self.limits.max_packet {
            return Err(Refusal {
                code: ErrorCode::TooLarge,
                reason: format!(
                    "{size} bytes once its identity is filled in: over the packet limit"
                ),
                violation: false,
            });
        }
        Ok(stamped)
    }

    /// Answers a refused request on the VM's own response topic of its command (when the VM may
    /// read it): `status: error`, the code, the reason, the request's `request_id`.
    fn answer_refused_request(&mut self, topic: &str, payload: &[u8], code: ErrorCode, why: &str) {
        let Ok(Topic::Request(command)) = Topic::parse(topic) else {
            return;
        };
        let reply_topic = command.response_topic(&self.vm);
        if self.rules.check_deliver(&reply_topic).is_err() {
            return;
        }
        let request_id = payload::decode_envelope(payload)
            .ok()
            .and_then(|e| e.request_id)
            .or_else(|| {
                serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v.get("request_id")?.as_str().map(str::to_owned))
                    .and_then(|id| RequestId::parse(&id).ok())
            });
        let body = Response::<NoArgs>::error(
            request_id,
            ErrorBody::new(code, format!("refused by Dom0: {why}")),
        )
        .to_json();
        let body = payload::with_responder(&body, topics::vm::DOM0);
        let mut out = BytesMut::new();
        mqtt::encode_publish(
            &mqtt::Publish {
                topic: &reply_topic,
                qos: 0,
                retain: false,
                dup: false,
                pkid: None,
                payload: &body,
            },
            &mut out,
        );
        self.relay_to_guest(&out);
    }

    fn guest_subscribe(&mut self, body: &[u8], now: Instant) -> Result<(), PacketError> {
        let (pkid, filters) = mqtt::parse_subscribe(body)?;
        let mut refused = Vec::with_capacity(filters.len());
        let mut allowed = Vec::with_capacity(filters.len());
        let mut denials = Vec::new();
        for (f, q) in &filters {
            match self.rules.check_subscribe(f) {
                Ok(()) => {
                    refused.push(false);
                    allowed.push((*f, *q));
                }
                Err(d) => {
                    refused.push(true);
                    denials.push((f.chars().take(128).collect::<String>(), d.to_string()));
                }
            }
        }
        for (f, d) in denials {
            self.refused(&f, &format!("subscription refused: {d}"), now);
        }
        if allowed.is_empty() {
            let codes = vec![mqtt::SUBACK_FAILURE; refused.len()];
            mqtt::encode_suback(pkid, &codes, &mut self.to_guest);
        } else if allowed.len() == filters.len() {
            self.subscribed
                .extend(allowed.iter().map(|(f, _)| (*f).to_owned()));
            mqtt::encode_subscribe(pkid, &allowed, &mut self.to_broker);
            self.last_to_broker = now;
        } else {
            self.subscribed
                .extend(allowed.iter().map(|(f, _)| (*f).to_owned()));
            mqtt::encode_subscribe(pkid, &allowed, &mut self.to_broker);
            self.last_to_broker = now;
            self.pending_subs.insert(pkid, refused);
        }
        Ok(())
    }

    /// Bytes read from the broker.
    pub fn on_broker_input(&mut self, bytes: &[u8], now: Instant) -> Vec<Effect> {
        self.broker_in.extend_from_slice(bytes);
        loop {
            // Our broker connection carries what the broker accepted; bound it all the same.
            let h = match mqtt::fixed_header(&self.broker_in, self.limits.max_packet) {
                Ok(None) => break,
                Ok(Some(h)) if self.broker_in.len() < h.frame_len() => break,
                Ok(Some(h)) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "bad packet from broker");
                    self.end_session("bad packet from broker", false, now);
                    break;
                }
            };
            let frame = self.broker_in.split_to(h.frame_len()).freeze();
            let body = frame.get(h.header_len..).unwrap_or_default();
            self.broker_packet(&h, &frame, body, now);
            if !self.has_broker() {
                break;
            }
            if self.to_guest.len() > self.limits.queue_bytes {
                let queued = self.to_guest.len();
                tracing::warn!("guest does not read; dropping its session");
                self.stats.dropped.fetch_add(1, Relaxed);
                self.state(LinkState::Overflow, Some(format!("{queued} bytes queued")));
                self.to_guest.clear();
                self.end_session("guest queue overflow", false, now);
                break;
            }
        }
        std::mem::take(&mut self.effects)
    }

    /// The broker's CONNACK to the guest's CONNECT: the session is up, or the broker refused it.
    fn broker_connack(&mut self, frame: &[u8], body: &[u8]) {
        let rc = mqtt::parse_connack(body)
            .map(|(_, rc)| rc)
            .unwrap_or(connack::SERVER_UNAVAILABLE);
        self.relay_to_guest(frame);
        if rc == connack::ACCEPTED {
            self.phase = Phase::Live { connack_seen: true };
            tracing::info!("session up");
            self.state(LinkState::SessionUp, None);
        } else {
            tracing::warn!(rc, "broker refused the session");
            self.phase = Phase::Scanning;
            self.effects.push(Effect::CloseBroker { flush: false });
        }
    }

    /// A delivery: relayed when the VM may read it (its acknowledgement awaited), else dropped
    /// and acknowledged to the broker.
    fn broker_publish(&mut self, h: &FixedHeader, frame: &[u8], body: &[u8], now: Instant) {
        let Ok(p) = mqtt::parse_publish(h, body) else {
            self.end_session("bad PUBLISH from broker", false, now);
            return;
        };
        match self.rules.check_deliver(p.topic) {
            Ok(()) => {
                match (p.qos, p.pkid) {
                    (1, Some(id)) => self.awaiting.insert(id, mqtt::PUBACK),
                    (2, Some(id)) => self.awaiting.insert(id, mqtt::PUBREC),
                    _ => None,
                };
                self.owe_answers(p.topic);
                self.relay_to_guest(frame)
            }
            Err(d) => {
                if let Some(unreported) = self.may_report(now) {
                    tracing::warn!(topic = p.topic, reason = %d, "delivery refused{unreported}");
                }
                self.stats.refused.fetch_add(1, Relaxed);
                match (p.qos, p.pkid) {
                    (1, Some(id)) => mqtt::encode_ack(mqtt::PUBACK, id, &mut self.to_broker),
                    (2, Some(id)) => {
                        self.dropped_qos2.insert(id);
                        mqtt::encode_ack(mqtt::PUBREC, id, &mut self.to_broker);
                    }
                    _ => {}
                }
                self.last_to_broker = now;
            }
        }
    }

    /// The broker's SUBACK, merged with the link's own refusals when the SUBSCRIBE had some.
    fn broker_suback(&mut self, frame: &[u8], body: &[u8]) {
        let Ok((id, codes)) = mqtt::parse_suback(body) else {
            return self.relay_to_guest(frame);
        };
        let Some(refused) = self.pending_subs.remove(&id) else {
            return self.relay_to_guest(frame);
        };
        let mut granted = codes.iter();
        let merged: Vec<u8> = refused
            .iter()
            .map(|r| {
                if *r {
                    mqtt::SUBACK_FAILURE
                } else {
                    *granted.next().unwrap_or(&mqtt::SUBACK_FAILURE)
                }
            })
            .collect();
        let mut out = BytesMut::new();
        mqtt::encode_suback(id, &merged, &mut out);
        self.relay_to_guest(&out);
    }

    /// A request reaches the guest: its answers will ride on it.
    fn owe_answers(&mut self, topic: &str) {
        let n = match Topic::parse(topic) {
            Ok(Topic::Request(topics::Command::Benchmark)) => 2,
            Ok(Topic::Request(_)) => 1,
            _ if policy::is_request_topic(topic) => 1,
            _ => 0,
        };
        self.owed = (self.owed + n).min(MAX_OWED);
    }

    fn relay_to_guest(&mut self, frame: &[u8]) {
        self.stats.packets_out.fetch_add(1, Relaxed);
        self.stats.bytes_out.fetch_add(frame.len() as u64, Relaxed);
        self.to_guest.extend_from_slice(frame);
    }

    fn broker_packet(&mut self, h: &FixedHeader, frame: &[u8], body: &[u8], now: Instant) {
        if self.legacy.is_some() {
            self.legacy_broker_packet(h, body, now);
            return;
        }
        match h.kind() {
            mqtt::CONNACK => self.broker_connack(frame, body),
            mqtt::PUBLISH => self.broker_publish(h, frame, body, now),
            mqtt::PUBREL => match mqtt::parse_pkid(body) {
                Ok(id) if self.dropped_qos2.remove(&id) => {
                    mqtt::encode_ack(mqtt::PUBCOMP, id, &mut self.to_broker);
                    self.last_to_broker = now;
                }
                Ok(id) => {
                    self.awaiting.insert(id, mqtt::PUBCOMP);
                    self.relay_to_guest(frame)
                }
                Err(_) => self.relay_to_guest(frame),
            },
            mqtt::PUBACK | mqtt::PUBCOMP => {
                if let Ok(id) = mqtt::parse_pkid(body) {
                    self.inflight.remove(&id);
                }
                self.relay_to_guest(frame);
            }
            mqtt::SUBACK => self.broker_suback(frame, body),
            mqtt::PINGRESP => {
                if self.pings.pop_front() != Some(true) {
                    self.relay_to_guest(frame);
                }
            }
            _ => self.relay_to_guest(frame),
        }
    }

    /// The next instant at which [`Session::on_tick`] has something to check.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(t) = self.hold_until {
            consider(t);
        }
        if let Some(t) = self.partial_since {
            consider(
                t + if matches!(self.phase, Phase::Scanning | Phase::Legacy { .. }) {
                    SCAN_TIMEOUT
                } else {
                    self.window
                },
            );
        }
        if matches!(self.phase, Phase::Live { .. }) {
            consider(self.last_guest + self.window);
        }
        if matches!(self.phase, Phase::Live { .. } | Phase::Legacy { .. }) {
            if let Some(k) = self.own_keepalive {
                consider(self.last_to_broker + k);
            }
        }
        if let Some(t) = self.legacy.as_ref().and_then(Translator::next_deadline) {
            consider(t);
        }
        next
    }

    /// Checks the timers: keepalive silence, stuck partial frames, the link's own broker pings.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Effect> {
        if self.hold_until.is_some_and(|t| now >= t) {
            self.hold_until = None;
        }
        if let Some(since) = self.partial_since {
            match self.phase {
                Phase::Scanning if now >= since + SCAN_TIMEOUT => {
                    // A CONNECT that never completed (the guest restarted while sending it): skip its
                    // first byte and look again in what followed.
                    self.discard(1);
                    self.partial_since = None;
                    self.process_guest(now);
                }
                Phase::Legacy { .. } if now >= since + SCAN_TIMEOUT => {
                    // What looked like the start of a CONNECT never completed: it is a line.
                    self.legacy_connect_waited = true;
                    self.partial_since = None;
                    self.process_guest(now);
                }
                Phase::Live { .. } if now >= since + self.window => {
                    tracing::warn!(
                        bytes = self.guest_in.len(),
                        "incomplete frame timed out; scanning"
                    );
                    self.partial_since = None;
                    self.end_session("incomplete frame timed out", false, now);
                    self.process_guest(now);
                }
                _ => {}
            }
        }
        if matches!(self.phase, Phase::Live { .. }) && now >= self.last_guest + self.window {
            self.stats.dropped.fetch_add(1, Relaxed);
            self.end_session("guest silent beyond 1.5 × keepalive", false, now);
        }
        let lines = self
            .legacy
            .as_mut()
            .map(|l| l.on_tick(now))
            .unwrap_or_default();
        for line in lines {
            self.relay_to_guest(&line);
        }
        if let (Some(k), Phase::Live { .. } | Phase::Legacy { .. }) =
            (self.own_keepalive, self.phase)
        {
            if now >= self.last_to_broker + k {
                self.to_broker.extend_from_slice(&mqtt::PINGREQ_PACKET);
                self.pings.push_back(true);
                self.last_to_broker = now;
            }
        }
        std::mem::take(&mut self.effects)
    }
}

enum Candidate {
    /// These bytes cannot start a CONNECT.
    NotConnect,
    /// They may: wait for more.
    Incomplete,
    /// A CONNECT of another protocol level.
    Level(FixedHeader, u8),
    Connect(FixedHeader, mqtt::Connect),
}

/// Decides whether `buf` starts with a well-formed CONNECT. Checks what it can as bytes arrive,
/// so garbage that merely contains 0x10 is skipped at once instead of being waited on.
fn candidate(buf: &[u8]) -> Candidate {
    let h = match mqtt::fixed_header(buf, MAX_CONNECT) {
        Ok(Some(h)) => h,
        Ok(None) => return Candidate::Incomplete,
        Err(_) => return Candidate::NotConnect,
    };
    if h.byte1 != mqtt::CONNECT << 4 || h.remaining < 10 {
        return Candidate::NotConnect;
    }
    let body = buf.get(h.header_len..).unwrap_or_default();
    const PREFIX: &[u8] = b"\x00\x04MQTT";
    let n = body.len().min(PREFIX.len());
    if body.get(..n) != PREFIX.get(..n) {
        return Candidate::NotConnect;
    }
    if body.len() < h.remaining {
        return Candidate::Incomplete;
    }
    let body = body.get(..h.remaining).unwrap_or_default();
    match mqtt::parse_connect(body) {
        Ok(c) => Candidate::Connect(h, c),
        Err(PacketError::UnsupportedLevel(level)) if (3..=5).contains(&level) => {
            Candidate::Level(h, level)
        }
        Err(_) => Candidate::NotConnect,
    }
}

/// A request id nobody can guess, for the commands of a legacy guest.
pub fn random_request_id() -> RequestId {
    let mut bits = [0u8; 16];
    if let Err(e) = getrandom::getrandom(&mut bits) {
        // The kernel's generator does not fail on a running Linux; if it ever did, the ids of
        // this link would be guessable: say so.
        tracing::error!(error = %e, "no randomness for request ids");
    }
    RequestId::random(bits)
}

#[cfg(test)]
mod tests;
