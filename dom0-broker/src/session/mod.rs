//! The link's logic for one VM, without I/O: bytes from the guest and from the broker in, bytes to
//! each side, [`Effect`]s and [`Counters`] out. The session owns its buffers; the I/O driver
//! (`link.rs`) only moves bytes ([`Session::to_guest`] and [`Session::guest_written`], the same
//! for the broker), carries out effects and publishes the counters.
//!
//! Phases: `Scanning` for a well-formed CONNECT (everything before it is discarded) or, on a
//! channel whose first byte was `{`, the MVP's first line; `Connecting` while the driver opens the
//! broker connection; `Live` while MQTT packets are relayed under policy; `Legacy` while the
//! guest's JSON lines are translated. A malformed packet, an over-limit length, a frame that does
//! not complete within the keepalive window, or silence beyond 1.5 × keepalive ends the broker
//! session and returns to `Scanning`; the guest is then sent a DISCONNECT so it starts over at
//! once.
//!
//! The rooms: `connect.rs` (the way in: scan, dialect, identity), `from_guest.rs` and
//! `from_broker.rs` (the two relays), `ledger.rs` (the acknowledgements each side is owed),
//! `budget.rs` (rates, broadcasts, answers owed, refusals and their reports), `legacy.rs` (the
//! MVP's lines through the one translator).

mod budget;
mod connect;
mod from_broker;
mod from_guest;
mod ledger;
pub mod legacy;

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use topics::RequestId;
use topics::payload::LinkState;
use topics::vm::VmId;

pub use budget::{
    BROADCAST_BURST, BROADCASTS_PER_SEC, CONNECT_BURST, CONNECTS_PER_SEC, MAX_OWED, REPORTS_PER_SEC,
};
pub use connect::{MAX_CONNECT, SCAN_TIMEOUT};

use crate::mqtt;
use crate::policy::Rules;
use budget::Budget;
use ledger::Ledger;
use legacy::{Dialect, LegacyMode};

/// A delivery larger than this (bytes on the wire) is written to the guest after the small ones
/// waiting (one large one at a time).
pub const BULK_FRAME: usize = 8 * 1024;

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

/// What the link counted; the driver adds it to the VM's figures (`supervision::LinkStats`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub refused: u64,
    pub dropped: u64,
    /// Bytes discarded while scanning for CONNECT.
    pub garbage_bytes: u64,
    /// Requests not delivered: past their deadline.
    pub expired: u64,
}

impl Counters {
    /// What was counted since `earlier`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            packets_in: self.packets_in - earlier.packets_in,
            packets_out: self.packets_out - earlier.packets_out,
            bytes_in: self.bytes_in - earlier.bytes_in,
            bytes_out: self.bytes_out - earlier.bytes_out,
            refused: self.refused - earlier.refused,
            dropped: self.dropped - earlier.dropped,
            garbage_bytes: self.garbage_bytes - earlier.garbage_bytes,
            expired: self.expired - earlier.expired,
        }
    }
}

#[derive(Debug)]
enum Phase {
    Scanning,
    /// The driver opens the broker connection (for a legacy guest: its mode, ready).
    Connecting(Option<Box<LegacyMode>>),
    Live {
        connack_seen: bool,
    },
    /// The guest speaks the MVP's JSON lines: the link translates (`legacy.rs`).
    Legacy(Box<LegacyMode>),
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
    /// Whether a client id names another party (a VM Dom0 knows, or Dom0): such a CONNECT is
    /// refused; any other id is replaced by the VM's name.
    names_a_party: NamesAParty,
    phase: Phase,
    /// What the channel speaks: decided on the first byte of its life.
    dialect: Dialect,
    /// Bytes read from the guest, not yet processed.
    guest_in: BytesMut,
    /// Bytes read from the broker, not yet processed.
    broker_in: BytesMut,
    /// Bytes waiting to be written to the guest.
    to_guest: BytesMut,
    /// Large deliveries waiting for `to_guest` to be written, oldest first: each goes once what is
    /// small has gone, so a small message waits for one large one at most (an upload's chunks).
    guest_bulk: VecDeque<(String, Bytes)>,
    guest_bulk_bytes: usize,
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
    /// Set when a CONNECT went beyond the budget: the guest is not read until then (it blocks on
    /// its full channel instead of spinning through refusals).
    hold_until: Option<Instant>,
    /// When the guest was last told to start over because it sent something other than CONNECT.
    last_nudge: Option<Instant>,
    /// What each side of the broker session is owed and awaits.
    ledger: Ledger,
    /// What the VM may spend.
    budget: Budget,
    /// Filters of this session forwarded to the broker (checked again when the policy changes).
    subscribed: BTreeSet<String>,
    /// The guest asked for a clean session (the broker's is persistent).
    guest_clean: bool,
    /// What the link counted since the session was made, and what of it the driver took.
    counters: Counters,
    reported: Counters,
    /// Dom0's wall clock: an instant and the milliseconds since the epoch it was (the driver's;
    /// without one, requests get no deadline and none expires).
    epoch: Option<(Instant, u64)>,
    effects: Vec<Effect>,
}

impl Session {
    pub fn new(vm: VmId, limits: Limits, rules: Rules, now: Instant) -> Session {
        let window = limits.max_keepalive.mul_f32(1.5);
        let budget = Budget::new(&limits, now);
        Session {
            vm,
            limits,
            rules,
            names_a_party: NamesAParty(Arc::new(|id: &str| {
                id.eq_ignore_ascii_case(topics::vm::DOM0) || VmId::parse(id).is_ok()
            })),
            phase: Phase::Scanning,
            dialect: Dialect::Undecided,
            guest_in: BytesMut::new(),
            broker_in: BytesMut::new(),
            to_guest: BytesMut::new(),
            guest_bulk: VecDeque::new(),
            guest_bulk_bytes: 0,
            to_broker: BytesMut::new(),
            pending_connect: BytesMut::new(),
            window,
            own_keepalive: None,
            last_guest: now,
            last_to_broker: now,
            partial_since: None,
            hold_until: None,
            last_nudge: None,
            ledger: Ledger::default(),
            budget,
            subscribed: BTreeSet::new(),
            guest_clean: true,
            counters: Counters::default(),
            reported: Counters::default(),
            epoch: None,
            effects: Vec::new(),
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
                // The broker keeps the VM's session: what is denied now leaves it first.
                let denied: Vec<String> = self
                    .subscribed
                    .iter()
                    .filter(|f| self.rules.check_subscribe(f).is_err())
                    .cloned()
                    .collect();
                let denied: Vec<&str> = denied.iter().map(String::as_str).collect();
                mqtt::encode_unsubscribe(1, &denied, &mut self.to_broker);
                self.end_session_as(
                    &format!("policy reloaded: subscription {f:?} no longer allowed"),
                    false,
                    true,
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
        !matches!(self.phase, Phase::Connecting(_))
            && self.hold_until.is_none()
            && self.to_broker.len() < self.limits.max_packet.max(64 * 1024)
            && self.guest_in.len() <= self.limits.max_packet + 8
    }

    /// Called when the link attaches to the channel: tell the guest to start over.
    pub fn attach(&mut self, now: Instant) {
        self.last_nudge = Some(now);
        self.to_guest.extend_from_slice(&mqtt::DISCONNECT_PACKET);
    }

    /// Dom0's wall clock: `now` was `epoch_ms` milliseconds since the epoch. Requests the guest
    /// publishes get their deadline on it; requests past theirs are not delivered.
    pub fn with_epoch(mut self, now: Instant, epoch_ms: u64) -> Session {
        self.epoch = Some((now, epoch_ms));
        self
    }

    /// Milliseconds since the epoch at `now`, on Dom0's clock.
    fn epoch_ms(&self, now: Instant) -> Option<u64> {
        self.epoch.map(|(at, ms)| {
            let since = now.saturating_duration_since(at).as_millis();
            ms.saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
        })
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
        self.budget.parties = n.max(1);
    }

    /// What the link counted since the last call: the driver adds it to the VM's figures.
    pub fn take_counters(&mut self) -> Counters {
        let since = self.counters.since(&self.reported);
        self.reported = self.counters;
        since
    }

    /// Bytes waiting to be written to the guest.
    pub fn to_guest(&self) -> &[u8] {
        &self.to_guest
    }

    /// The driver wrote the first `n` bytes of [`Session::to_guest`].
    pub fn guest_written(&mut self, n: usize) {
        self.to_guest.advance(n.min(self.to_guest.len()));
        self.next_bulk();
    }

    /// Bytes for the guest not written yet, large deliveries waiting included.
    pub(super) fn guest_queued(&self) -> usize {
        self.to_guest.len() + self.guest_bulk_bytes
    }

    /// When everything before has been written, the next large delivery.
    fn next_bulk(&mut self) {
        if self.to_guest.is_empty() {
            if let Some((_, frame)) = self.guest_bulk.pop_front() {
                self.guest_bulk_bytes -= frame.len();
                self.to_guest.extend_from_slice(&frame);
            }
        }
    }

    /// Forgets the large deliveries waiting (the session ends: the broker delivers them again).
    fn drop_bulk(&mut self) {
        self.guest_bulk.clear();
        self.guest_bulk_bytes = 0;
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
                Phase::Connecting(_) => false,
                Phase::Live { .. } => self.relay_one_from_guest(now),
                Phase::Legacy(_) => self.legacy_input(now),
            };
            if !progressed {
                break;
            }
        }
        // A legacy guest's unfinished line is the translation's to time (progress, not age).
        let nothing_partial = self.guest_in.is_empty();
        self.partial_since = match (
            nothing_partial || matches!(self.phase, Phase::Connecting(_)),
            self.partial_since,
        ) {
            (true, _) => None,
            (false, Some(t)) => Some(t),
            (false, None) => Some(now),
        };
    }

    /// Reports a state change.
    fn state(&mut self, state: LinkState, detail: Option<String>) {
        self.effects.push(Effect::State(state, detail));
    }

    /// Asks for a broker connection for this CONNECT (rewritten already), the session state new;
    /// `legacy` for a guest whose lines the link translates.
    fn open_session(&mut self, c: &mqtt::Connect, legacy: Option<Box<LegacyMode>>, now: Instant) {
        self.pending_connect.clear();
        mqtt::encode_connect(c, &mut self.pending_connect);
        self.reset_session_state(now);
        self.phase = Phase::Connecting(legacy);
        self.effects.push(Effect::OpenBroker);
    }

    fn reset_session_state(&mut self, now: Instant) {
        self.subscribed.clear();
        self.ledger.clear();
        self.budget.new_session(&self.limits, now);
        self.broker_in.clear();
        self.to_broker.clear();
    }

    /// The broker connection is open: send the CONNECT and relay from now on.
    pub fn broker_connected(&mut self, now: Instant) -> Vec<Effect> {
        self.to_broker.extend_from_slice(&self.pending_connect);
        self.last_to_broker = now;
        match std::mem::replace(&mut self.phase, Phase::Scanning) {
            Phase::Connecting(Some(legacy)) => {
                self.legacy_subscribe();
                self.phase = Phase::Legacy(legacy);
            }
            _ => {
                self.phase = Phase::Live {
                    connack_seen: false,
                }
            }
        }
        self.on_guest_input(&[], now)
    }

    /// The broker could not be reached: tell the guest, which will retry (a legacy guest is told
    /// nothing: its next line tries again).
    pub fn broker_failed(&mut self) {
        if !matches!(self.phase, Phase::Connecting(Some(_))) {
            mqtt::encode_connack(false, mqtt::connack::SERVER_UNAVAILABLE, &mut self.to_guest);
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
        self.end_session_as(why, flush, flush, now);
    }

    /// [`Session::end_session`], with the guest's own leaving (`guest_left`: it is told nothing)
    /// apart from flushing what the link wrote to the broker first (`flush`).
    fn end_session_as(&mut self, why: &str, guest_left: bool, flush: bool, now: Instant) {
        // What was partial belonged to the session that ends (or to the legacy translation).
        if self.guest_in.is_empty() {
            self.partial_since = None;
        }
        let was_live = match &self.phase {
            Phase::Live { connack_seen } => *connack_seen,
            Phase::Legacy(l) => l.connack_seen,
            _ => false,
        };
        let was_legacy = matches!(self.phase, Phase::Legacy(_) | Phase::Connecting(Some(_)));
        self.phase = Phase::Scanning;
        self.drop_bulk();
        self.effects.push(Effect::CloseBroker { flush });
        if was_legacy {
            // A legacy guest reads lines, not MQTT: it is told nothing; its next line starts a
            // new legacy session.
            self.to_guest.extend_from_slice(b"\n");
        } else if !guest_left {
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

    fn relay_to_guest(&mut self, frame: &[u8]) {
        self.counters.packets_out += 1;
        self.counters.bytes_out += frame.len() as u64;
        self.to_guest.extend_from_slice(frame);
    }

    /// A delivery on `topic` for the guest: a large one (or one on the topic of a large one
    /// waiting: a topic's messages stay in order) waits for its turn after what is small.
    fn relay_publish_to_guest(&mut self, frame: &[u8], topic: &str) {
        if frame.len() <= BULK_FRAME && !self.guest_bulk.iter().any(|(t, _)| t == topic) {
            return self.relay_to_guest(frame);
        }
        self.counters.packets_out += 1;
        self.counters.bytes_out += frame.len() as u64;
        self.guest_bulk_bytes += frame.len();
        self.guest_bulk
            .push_back((topic.to_owned(), Bytes::copy_from_slice(frame)));
        self.next_bulk();
    }

    fn forward(&mut self, frame: &[u8], now: Instant) {
        self.to_broker.extend_from_slice(frame);
        self.last_to_broker = now;
    }

    /// Acknowledgements (kind, id) for the broker, written in this order.
    fn acks_to_broker(&mut self, acks: &[(u8, u16)], now: Instant) {
        for &(kind, id) in acks {
            mqtt::encode_ack(kind, id, &mut self.to_broker);
            self.last_to_broker = now;
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
                t + if matches!(self.phase, Phase::Scanning | Phase::Legacy(_)) {
                    SCAN_TIMEOUT
                } else {
                    self.window
                },
            );
        }
        if matches!(self.phase, Phase::Live { .. }) {
            consider(self.last_guest + self.window);
        }
        if matches!(self.phase, Phase::Live { .. } | Phase::Legacy(_)) {
            if let Some(k) = self.own_keepalive {
                consider(self.last_to_broker + k);
            }
        }
        if let Some(t) = match &self.phase {
            Phase::Legacy(l) => l.next_deadline(),
            _ => None,
        } {
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
            match &mut self.phase {
                Phase::Scanning if now >= since + SCAN_TIMEOUT => {
                    // A CONNECT that never completed (the guest restarted while sending it): skip its
                    // first byte and look again in what followed.
                    self.discard(1);
                    self.partial_since = None;
                    self.process_guest(now);
                }
                Phase::Legacy(l) if now >= since + SCAN_TIMEOUT => {
                    // What looked like the start of a CONNECT never completed: it is a line.
                    l.connect_waited = true;
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
            self.counters.dropped += 1;
            self.end_session("guest silent beyond 1.5 × keepalive", false, now);
        }
        let lines = match &mut self.phase {
            Phase::Legacy(l) => l.on_tick(now),
            _ => Vec::new(),
        };
        for line in lines {
            self.relay_to_guest(&line);
        }
        if let (Some(k), Phase::Live { .. } | Phase::Legacy(_)) = (self.own_keepalive, &self.phase)
        {
            if now >= self.last_to_broker + k {
                self.to_broker.extend_from_slice(&mqtt::PINGREQ_PACKET);
                self.ledger.ping(true);
                self.last_to_broker = now;
            }
        }
        std::mem::take(&mut self.effects)
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
