//! The guest's way in: the scan for a well-formed CONNECT on a channel without a session (what
//! comes before it is discarded, a frame that only looks like one is skipped), the dialect of the
//! channel's first bytes, the budget of new sessions, and the identity rule: the client id is the
//! channel's, a CONNECT naming another party is refused.

use std::time::{Duration, Instant};

use bytes::Buf;
use topics::payload::LinkState;

use super::legacy::{self, Dialect};
use super::{CONNECTS_PER_SEC, Effect, Phase, Session};
use crate::mqtt::{self, FixedHeader, PacketError, connack};
use crate::policy;

/// Longest CONNECT accepted while scanning (client id, will, credentials).
pub const MAX_CONNECT: usize = 64 * 1024;

/// How long an incomplete CONNECT candidate is waited for while scanning. A real CONNECT is written
/// in one go and takes milliseconds even on a slow channel.
pub const SCAN_TIMEOUT: Duration = Duration::from_secs(1);

impl Session {
    /// Looks for a CONNECT in `guest_in` (or, on a legacy channel, starts a legacy session).
    /// Returns true if it consumed something worth looping on.
    pub(super) fn scan(&mut self, now: Instant) -> bool {
        if self.dialect == Dialect::Undecided {
            match legacy::dialect_of(&self.guest_in) {
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
                self.counters.packets_in += 1;
                self.counters.bytes_in += h.frame_len() as u64;
                self.on_connect(c, now)
            }
        }
    }

    /// The guest sends something other than CONNECT while it has no session: it may believe an old
    /// session is alive (our attach signal was lost). Tell it again, at most once a second.
    pub(super) fn nudge(&mut self, now: Instant) {
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

    pub(super) fn discard(&mut self, n: usize) {
        let n = n.min(self.guest_in.len());
        if n > 0 {
            self.counters.garbage_bytes += n as u64;
            self.guest_in.advance(n);
        }
    }

    /// Takes a token of the CONNECT budget; without one, the CONNECT is answered `CONNACK 3`.
    pub(super) fn connect_within_budget(&mut self, now: Instant) -> bool {
        if self.take_session_token(now) {
            return true;
        }
        mqtt::encode_connack(false, connack::SERVER_UNAVAILABLE, &mut self.to_guest);
        false
    }

    /// Takes a token of the budget of new sessions (MQTT or legacy); without one, the guest is
    /// not read until the next token.
    pub(super) fn take_session_token(&mut self, now: Instant) -> bool {
        let Err(next) = self.budget.take_session(now) else {
            return true;
        };
        self.counters.dropped += 1;
        self.hold_until = Some(next);
        if let Some(unreported) = self.may_report(now) {
            tracing::warn!("new session beyond {CONNECTS_PER_SEC} a second refused{unreported}");
        }
        false
    }

    /// A well-formed CONNECT: check identity and will, rewrite, ask for a broker connection.
    pub(super) fn on_connect(&mut self, mut c: mqtt::Connect, now: Instant) -> bool {
        if !self.connect_within_budget(now) || self.refuses_identity(&c, now) {
            return true;
        }
        if let Some(w) = c.will.as_mut() {
            match policy::check_publish(&self.rules, &self.vm, &w.topic, &w.payload, None) {
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
        self.keepalive_of(&mut c);
        // Identity is the channel's: client id and user name are the VM name; no password travels.
        // A client's own id (PSEC's `Diag`, `notify-disk-added`) is replaced, said at debug.
        if !c.client_id.is_empty() && c.client_id != self.vm.as_str() {
            tracing::debug!(client_id = %c.client_id.chars().take(64).collect::<String>(), "client id replaced by the VM's name");
        }
        c.client_id = self.vm.to_string();
        c.username = Some(self.vm.to_string());
        c.password = None;
        // The broker keeps the VM's session while its link is away (its subscriptions, and what
        // they catch meanwhile): a new guest session on the channel gets it. The guest is told
        // what it asked for (a clean session: no session present).
        self.guest_clean = c.clean_session;
        c.clean_session = false;
        self.open_session(&c, None, now);
        false
    }

    /// A client id that names another party (a VM Dom0 knows, or Dom0) is refused: `CONNACK 2`,
    /// a violation, the state reported. True when refused.
    fn refuses_identity(&mut self, c: &mqtt::Connect, now: Instant) -> bool {
        if c.client_id == self.vm.as_str() || !(self.names_a_party.0)(&c.client_id) {
            return false;
        }
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
        true
    }

    /// The session's timers from the keepalive the guest asked (bounded by the limits); the
    /// keepalive the broker is told (never 0).
    fn keepalive_of(&mut self, c: &mut mqtt::Connect) {
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
    }

    /// A new session on a live link: the old broker session ends, a new one starts.
    pub(super) fn connect_on_a_live_link(&mut self, frame: &[u8], now: Instant) {
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
}

pub(super) enum Candidate {
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
pub(super) fn candidate(buf: &[u8]) -> Candidate {
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
