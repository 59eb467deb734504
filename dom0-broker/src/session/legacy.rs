//! Legacy mode of a link: the guest has no agent and speaks the MVP's JSON lines on its channel
//! (decided once, on the first byte of the channel's life: `{`). The link translates on its
//! behalf with the one translation (`topics::legacy_translator`), under the same identity rule,
//! budgets and policy as an MQTT guest: what this room adds is how a channel's first bytes are
//! told apart, what the link subscribes to for the guest, and the phase's own state.

use std::time::Instant;

use topics::filter;
use topics::legacy_translator::{Out, Translator};
use topics::payload::LinkState;
use topics::topic::Command;
use topics::vm::VmId;

use super::connect::{Candidate, candidate};
use super::{Effect, Phase, Session, random_request_id};
use crate::mqtt::{self, FixedHeader, connack};
use crate::policy::Rules;

/// What the link subscribes to for a legacy guest: its responses, the notifications, and the
/// requests it may serve, as far as the policy lets it read them.
pub fn subscriptions(vm: &VmId, rules: &Rules) -> Vec<String> {
    [
        filter::responses_to(vm.as_str()),
        filter::notifications(),
        filter::disk_requests(),
        Command::Discover.request_topic(),
        Command::Benchmark.request_topic(),
    ]
    .into_iter()
    .filter(|f| rules.check_subscribe(f).is_ok())
    .collect()
}

/// What the first bytes of a channel's life say it speaks; None while they are only whitespace.
pub fn dialect_of(bytes: &[u8]) -> Option<Dialect> {
    bytes.iter().find(|b| !b.is_ascii_whitespace()).map(|b| {
        if *b == b'{' {
            Dialect::Legacy
        } else {
            Dialect::Mqtt
        }
    })
}

/// What a channel speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Not known yet: nothing but whitespace since the link attached.
    Undecided,
    /// The MVP's JSON lines, until a CONNECT at a line boundary.
    Legacy,
    /// MQTT, for the rest of the channel's life.
    Mqtt,
}

/// The state of a legacy session (`Phase::Legacy`, and `Phase::Connecting` towards it).
#[derive(Debug)]
pub struct LegacyMode {
    /// The translation: lines addressed to the VM, Dom0's own lines signed `Dom0`, no message
    /// over the packet limit.
    translator: Translator,
    /// The broker accepted the session.
    pub connack_seen: bool,
    /// Packet ids of the publishes the link makes for the guest.
    pkid: u16,
    /// Bytes that may have been a CONNECT were waited for long enough: they are a line.
    pub connect_waited: bool,
}

impl LegacyMode {
    pub fn new(vm: &VmId, max_packet: usize) -> LegacyMode {
        LegacyMode {
            translator: Translator::new(vm.clone(), "Dom0", Some(vm.to_string()), max_packet),
            connack_seen: false,
            pkid: 0,
            connect_waited: false,
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.translator.next_deadline()
    }

    /// The translation's timers: lines for the guest (answers that timed out).
    pub fn on_tick(&mut self, now: Instant) -> Vec<Vec<u8>> {
        self.translator.on_tick(now)
    }

    fn next_pkid(&mut self) -> u16 {
        self.pkid = self.pkid.checked_add(1).unwrap_or(1);
        self.pkid
    }
}

impl Session {
    fn legacy_mode(&mut self) -> Option<&mut LegacyMode> {
        match &mut self.phase {
            Phase::Legacy(l) => Some(l),
            _ => None,
        }
    }

    /// The guest speaks the MVP's JSON lines: open a broker session on its behalf and translate.
    /// A legacy session costs the same budget as an MQTT one; beyond it the guest is not read until
    /// a token is there (its bytes wait). Returns true if it consumed something worth looping on.
    pub(super) fn enter_legacy(&mut self, now: Instant) -> bool {
        if !self.take_session_token(now) {
            return false;
        }
        tracing::info!("guest speaks the MVP's JSON lines: legacy mode");
        // Ends, on the guest's side, the line our attach signal started.
        self.to_guest.extend_from_slice(b"\n");
        let max = self.limits.max_keepalive;
        let c = mqtt::Connect {
            // Persistent, like an MQTT guest's: what its subscriptions catch while it is away
            // waits in the broker.
            clean_session: false,
            keep_alive: u16::try_from(max.as_secs()).unwrap_or(u16::MAX).max(1),
            client_id: self.vm.to_string(),
            will: None,
            username: Some(self.vm.to_string()),
            password: None,
        };
        self.own_keepalive = Some(max / 2);
        self.window = max.mul_f32(1.5);
        let mode = LegacyMode::new(&self.vm, self.limits.max_packet);
        self.open_session(&c, Some(Box::new(mode)), now);
        false
    }

    /// The broker connection of a legacy session is open: subscribe for the guest.
    pub(super) fn legacy_subscribe(&mut self) {
        let subs = subscriptions(&self.vm, &self.rules);
        let filters: Vec<(&str, u8)> = subs.iter().map(|f| (f.as_str(), 1u8)).collect();
        if !filters.is_empty() {
            mqtt::encode_subscribe(1, &filters, &mut self.to_broker);
        }
        self.subscribed.extend(subs);
    }

    /// Feeds the guest's bytes to the legacy translation, a line at a time; a CONNECT at a line
    /// boundary switches the guest to MQTT. True when the phase changed.
    pub(super) fn legacy_input(&mut self, now: Instant) -> bool {
        loop {
            let Phase::Legacy(l) = &mut self.phase else {
                return true;
            };
            if l.translator.partial().is_empty()
                && self.guest_in.first() == Some(&(mqtt::CONNECT << 4))
            {
                match candidate(&self.guest_in) {
                    Candidate::Connect(..) | Candidate::Level(..) => {
                        tracing::info!("legacy guest switches to MQTT");
                        self.dialect = Dialect::Mqtt;
                        self.leave_legacy("guest switched to MQTT");
                        return true;
                    }
                    // It may be a CONNECT: wait (the partial-frame timer bounds the wait).
                    Candidate::Incomplete if !l.connect_waited => return false,
                    // Not a CONNECT: a line like any other.
                    Candidate::Incomplete | Candidate::NotConnect => {}
                }
            }
            l.connect_waited = false;
            if self.guest_in.is_empty() {
                return false;
            }
            let n = self
                .guest_in
                .iter()
                .position(|b| *b == b'\n')
                .map_or(self.guest_in.len(), |i| i + 1);
            let chunk = self.guest_in.split_to(n);
            let outs = l.translator.on_bytes(&chunk, now, &mut random_request_id);
            self.counters.bytes_in += n as u64;
            self.legacy_outs(outs, now);
        }
    }

    /// Ends the legacy broker session (the guest switches to MQTT, or the broker went away).
    fn leave_legacy(&mut self, why: &str) {
        let was_up = matches!(&self.phase, Phase::Legacy(l) if l.connack_seen);
        self.phase = Phase::Scanning;
        self.effects.push(Effect::CloseBroker { flush: false });
        if was_up {
            self.state(LinkState::SessionDown, Some(why.to_owned()));
        }
    }

    /// Carries out what the legacy translation asks: lines to the guest, publications under the
    /// same bounds and policy as an MQTT guest's.
    fn legacy_outs(&mut self, outs: Vec<Out>, now: Instant) {
        for o in outs {
            let (topic, payload) = match o {
                Out::Line(line) => {
                    self.relay_to_guest(&line);
                    continue;
                }
                Out::Request { topic, payload, .. } | Out::Publish { topic, payload } => {
                    (topic, payload)
                }
            };
            self.counters.packets_in += 1;
            match self.admit(&topic, &payload, now) {
                Ok(stamped) => {
                    let pkid = self.legacy_mode().map(LegacyMode::next_pkid);
                    mqtt::encode_publish(
                        &mqtt::Publish {
                            topic: &topic,
                            qos: 1,
                            retain: false,
                            dup: false,
                            pkid: Some(pkid.unwrap_or(1)),
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
                        .legacy_mode()
                        .map(|l| l.translator.refused(&topic, &payload, &r.reason));
                    if let Some(line) = line {
                        self.relay_to_guest(&line);
                    }
                }
            }
        }
    }

    /// A packet from the broker for a legacy guest.
    pub(super) fn legacy_broker_packet(&mut self, h: &FixedHeader, body: &[u8], now: Instant) {
        match h.kind() {
            mqtt::CONNACK => {
                let rc = mqtt::parse_connack(body)
                    .map(|(_, rc)| rc)
                    .unwrap_or(connack::SERVER_UNAVAILABLE);
                if let (connack::ACCEPTED, Some(l)) = (rc, self.legacy_mode()) {
                    l.connack_seen = true;
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
                // Every delivery is handled here: acknowledged to the broker at once.
                let acks = self.ledger.dropped(p.qos, p.pkid);
                self.acks_to_broker(&acks, now);
                if !self.past_deadline(p.topic, p.payload, now)
                    && self.rules.check_deliver(p.topic).is_ok()
                {
                    let outs = self
                        .legacy_mode()
                        .map(|l| {
                            l.translator
                                .on_message(p.topic, p.payload, now, &mut random_request_id)
                        })
                        .unwrap_or_default();
                    if outs.iter().any(|o| matches!(o, Out::Line(_))) {
                        self.budget.owe_answers(p.topic);
                    }
                    // A line for the guest, and an upload's next chunks.
                    self.legacy_outs(outs, now);
                }
            }
            mqtt::PUBREL => {
                if let Ok(id) = mqtt::parse_pkid(body) {
                    self.ledger.release_dropped(id);
                    mqtt::encode_ack(mqtt::PUBCOMP, id, &mut self.to_broker);
                }
            }
            mqtt::PINGRESP => {
                self.ledger.pong();
            }
            // SUBACK (a refused filter simply delivers nothing), PUBACK: nothing to do.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn vm(s: &str) -> VmId {
        VmId::parse(s).unwrap()
    }

    #[test]
    fn subscriptions_follow_the_policy() {
        let policy = Policy::builtin();
        let gui = subscriptions(&vm("vm-gui"), &policy.rules_for(&vm("vm-gui")));
        assert_eq!(
            gui,
            [
                "system/+/+/response/vm-gui",
                "system/+/+/notification",
                "system/components/discover/request",
                "system/misc/benchmark/request"
            ]
        );
        let usb = subscriptions(&vm("sys-usb"), &policy.rules_for(&vm("sys-usb")));
        assert!(usb.contains(&"system/disks/+/request".to_owned()));
    }

    #[test]
    fn the_first_bytes_tell_the_dialect() {
        assert_eq!(dialect_of(b"  {\"type\""), Some(Dialect::Legacy));
        assert_eq!(dialect_of(b"\x10\x0c"), Some(Dialect::Mqtt));
        assert_eq!(dialect_of(b" \r\n"), None);
        assert_eq!(dialect_of(b""), None);
    }
}
