//! What a VM may spend and what its refusals cost: its publish rate, its new sessions, its
//! broadcasts (each costs one token per party that answers), the answers that ride on requests it
//! was delivered, its violations, and the budget of reports it can cause. [`Budget`] is pure
//! (instants in); the session's admission and refusal reporting, below, use it.

use std::time::Instant;

use topics::payload::ErrorCode;
use topics::topic::Topic;

use super::{Effect, Limits, Session};
use crate::mqtt::PacketError;
use crate::policy;
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
pub(super) struct Refusal {
    pub code: ErrorCode,
    pub reason: String,
    /// Counts towards the VM's violation limit (its own behaviour).
    pub violation: bool,
}

impl Refusal {
    pub fn busy(reason: impl Into<String>) -> Refusal {
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

/// One VM's budgets.
#[derive(Debug)]
pub(super) struct Budget {
    /// The guest's publish rate (from the limits), refilled for each new session.
    publishes: Bucket,
    /// The guest's new sessions.
    connects: Bucket,
    /// The guest's broadcast requests.
    broadcasts: Bucket,
    /// Refusal reports allowed now, and what was held back since the last one.
    reports: Reports,
    /// Refusals of the VM's own in this session.
    pub violations: u32,
    /// Parties that answer a broadcast (every VM Dom0 knows, and Dom0): what one costs.
    pub parties: usize,
    /// Requests delivered to the guest and not answered yet: its answers ride on them, not on its
    /// own rate (a broadcast is charged to whoever asked it).
    owed: usize,
}

fn publish_bucket(limits: &Limits, now: Instant) -> Bucket {
    Bucket::full(f64::from(limits.burst), f64::from(limits.rate_per_sec), now)
}

impl Budget {
    pub fn new(limits: &Limits, now: Instant) -> Budget {
        Budget {
            publishes: publish_bucket(limits, now),
            connects: Bucket::full(CONNECT_BURST, CONNECTS_PER_SEC, now),
            broadcasts: Bucket::full(BROADCAST_BURST, BROADCASTS_PER_SEC, now),
            reports: Reports::new(REPORTS_PER_SEC, "refusals", now),
            violations: 0,
            parties: 1,
            owed: 0,
        }
    }

    /// A new broker session: a full publish budget, no violations, nothing owed.
    pub fn new_session(&mut self, limits: &Limits, now: Instant) {
        self.publishes = publish_bucket(limits, now);
        self.violations = 0;
        self.owed = 0;
    }

    /// Takes a token of the budget of new sessions (MQTT or legacy). Err: when the next one comes.
    pub fn take_session(&mut self, now: Instant) -> Result<(), Instant> {
        if self.connects.take(now) {
            Ok(())
        } else {
            Err(self.connects.next_token(now))
        }
    }

    /// Charges a publication to the VM's rate: an answer riding on a request delivered to it is
    /// free; a broadcast costs one token per party and one of its own budget.
    pub fn charge(
        &mut self,
        topic: &str,
        payload: &[u8],
        rate_per_sec: u32,
        now: Instant,
    ) -> Result<(), Refusal> {
        if policy::is_response_topic(topic) && self.owed > 0 {
            self.owed -= 1;
            return Ok(());
        }
        let broadcast = policy::is_broadcast(topic, payload);
        let cost = if broadcast { self.parties } else { 1 };
        if broadcast && !self.broadcasts.take(now) {
            return Err(Refusal::busy(format!(
                "broadcast requests beyond {BROADCASTS_PER_SEC} a second"
            )));
        }
        if !self.publishes.take_n(cost, now) {
            let why = if broadcast {
                format!(" (a broadcast costs {cost}: one per party that answers)")
            } else {
                String::new()
            };
            return Err(Refusal::busy(format!(
                "rate limit ({rate_per_sec} msg/s) exceeded{why}"
            )));
        }
        Ok(())
    }

    /// A request reaches the guest: its answers will ride on it.
    pub fn owe_answers(&mut self, topic: &str) {
        let n = match Topic::parse(topic) {
            Ok(Topic::Request(topics::Command::Benchmark)) => 2,
            Ok(Topic::Request(_)) => 1,
            _ if policy::is_request_topic(topic) => 1,
            _ => 0,
        };
        self.owed = (self.owed + n).min(MAX_OWED);
    }

    /// Whether something the guest did may be logged (and reported) now: at most
    /// [`REPORTS_PER_SEC`] a second, shared by every kind of guest misbehaviour, so no guest floods
    /// the log. `Some` carries the suffix counting what was not reported since the last report.
    pub fn may_report(&mut self, now: Instant) -> Option<Unreported> {
        self.reports.may_report(now)
    }
}

impl Session {
    /// The one admission of a publication from the guest (MQTT or legacy): its rate, then the
    /// policy and the identity fields. Ok(Some(payload)): publish that payload instead (the
    /// identity filled in).
    pub(super) fn admit(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        self.budget
            .charge(topic, payload, self.limits.rate_per_sec, now)?;
        let now_ms = self.epoch_ms(now);
        let stamped = policy::check_publish(&self.rules, &self.vm, topic, payload, now_ms)
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

    pub(super) fn desync(&mut self, e: &PacketError, now: Instant) {
        if let Some(unreported) = self.may_report(now) {
            tracing::warn!(error = %e, "malformed packet from guest; scanning for CONNECT{unreported}");
        }
        self.counters.dropped += 1;
        self.end_session(&format!("malformed packet: {e}"), false, now);
    }

    /// A refusal of the VM's own behaviour: counted, and towards its violation limit.
    pub(super) fn refusal(&mut self) {
        self.counters.refused += 1;
        self.budget.violations += 1;
    }

    /// A refused packet that counts as a violation (see [`Session::refused_as`]).
    pub(super) fn refused(&mut self, topic: &str, reason: &str, now: Instant) -> bool {
        self.refused_as(topic, reason, true, now)
    }

    /// A refused packet: counted always, as a violation of the VM's own when `violation`;
    /// logged and reported at most [`REPORTS_PER_SEC`] a second (a flooding guest must not flood
    /// the log or the error topic), the rest summed up in the next report.
    pub(super) fn refused_as(
        &mut self,
        topic: &str,
        reason: &str,
        violation: bool,
        now: Instant,
    ) -> bool {
        if violation {
            self.refusal();
        } else {
            self.counters.refused += 1;
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

    pub(super) fn may_report(&mut self, now: Instant) -> Option<Unreported> {
        self.budget.may_report(now)
    }

    /// An acknowledgement from the guest for nothing the broker sent it (or out of order): dropped.
    pub(super) fn unsolicited(&mut self, kind: u8, id: u16, now: Instant) {
        self.counters.dropped += 1;
        if let Some(unreported) = self.may_report(now) {
            tracing::warn!(
                kind,
                id,
                "unsolicited acknowledgement from guest dropped{unreported}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(rate: u32, burst: u32) -> Limits {
        Limits {
            max_packet: 1024,
            max_keepalive: Duration::from_secs(60),
            queue_bytes: 1 << 20,
            rate_per_sec: rate,
            burst,
            max_inflight: 16,
            violation_limit: 100,
        }
    }

    const DISCOVER: &str = "system/components/discover/request";
    const ANSWER: &str = "system/components/discover/response/vm-gui";

    #[test]
    fn answers_ride_on_the_requests_delivered() {
        let now = Instant::now();
        let mut b = Budget::new(&limits(1, 1), now);
        assert!(b.charge("vm/a", b"{}", 1, now).is_ok(), "the burst");
        assert!(
            b.charge(ANSWER, b"{}", 1, now).is_err(),
            "an answer owed nothing pays"
        );
        b.owe_answers(DISCOVER);
        b.owe_answers("system/misc/benchmark/request");
        // One discover answer, two of the benchmark's (started, figures), then the rate again.
        for _ in 0..3 {
            assert!(b.charge(ANSWER, b"{}", 1, now).is_ok());
        }
        assert!(b.charge(ANSWER, b"{}", 1, now).is_err());
    }

    #[test]
    fn a_broadcast_costs_one_token_per_party() {
        let now = Instant::now();
        let mut b = Budget::new(&limits(1, 10), now);
        b.parties = 4;
        assert!(b.charge(DISCOVER, b"{}", 1, now).is_ok());
        assert!(b.charge(DISCOVER, b"{}", 1, now).is_ok());
        let r = b.charge(DISCOVER, b"{}", 1, now).unwrap_err();
        assert_eq!(r.code, ErrorCode::Busy);
        assert!(r.reason.contains("a broadcast costs 4"), "{}", r.reason);
        assert!(b.charge("vm/a", b"{}", 1, now).is_ok(), "2 tokens left");
    }

    #[test]
    fn broadcasts_have_their_own_budget() {
        let now = Instant::now();
        let mut b = Budget::new(&limits(1000, 1000), now);
        for _ in 0..BROADCAST_BURST as usize {
            assert!(b.charge(DISCOVER, b"{}", 1000, now).is_ok());
        }
        let r = b.charge(DISCOVER, b"{}", 1000, now).unwrap_err();
        assert!(
            r.reason.contains("broadcast requests beyond"),
            "{}",
            r.reason
        );
        let later = now + Duration::from_millis(200);
        assert!(b.charge(DISCOVER, b"{}", 1000, later).is_ok(), "refilled");
    }

    #[test]
    fn sessions_beyond_the_burst_wait_for_the_next_token() {
        let now = Instant::now();
        let mut b = Budget::new(&limits(1, 1), now);
        for _ in 0..CONNECT_BURST as usize {
            assert_eq!(b.take_session(now), Ok(()));
        }
        let next = b.take_session(now).unwrap_err();
        assert_eq!(next, now + Duration::from_secs_f64(1.0 / CONNECTS_PER_SEC));
        assert_eq!(b.take_session(next), Ok(()));
    }

    #[test]
    fn a_new_session_refills_the_rate_and_forgets_violations_and_debts() {
        let now = Instant::now();
        let l = limits(1, 1);
        let mut b = Budget::new(&l, now);
        assert!(b.charge("vm/a", b"{}", 1, now).is_ok());
        b.owe_answers(DISCOVER);
        b.violations = 5;
        b.new_session(&l, now);
        assert_eq!(b.violations, 0);
        assert!(b.charge("vm/a", b"{}", 1, now).is_ok(), "refilled");
        assert!(
            b.charge(ANSWER, b"{}", 1, now).is_err(),
            "owed nothing any more"
        );
    }
}
