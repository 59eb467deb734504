//! The broker → guest relay: the broker's packets framed (bounded all the same), deliveries the
//! VM may not read dropped and acknowledged here, the SUBACK merged with the link's refusals, the
//! link's own pings answered to it, and a guest that stops reading dropped alone.

use std::time::Instant;

use bytes::BytesMut;
use topics::payload::LinkState;

use super::ledger::BrokerPubrel;
use super::{Effect, Phase, Session};
use crate::mqtt::{self, FixedHeader, connack};
use crate::policy;

impl Session {
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
            if self.guest_queued() > self.limits.queue_bytes {
                let queued = self.guest_queued();
                tracing::warn!("guest does not read; dropping its session");
                self.counters.dropped += 1;
                self.state(LinkState::Overflow, Some(format!("{queued} bytes queued")));
                self.to_guest.clear();
                self.drop_bulk();
                self.end_session("guest queue overflow", false, now);
                break;
            }
        }
        std::mem::take(&mut self.effects)
    }

    pub(super) fn broker_packet(
        &mut self,
        h: &FixedHeader,
        frame: &[u8],
        body: &[u8],
        now: Instant,
    ) {
        if matches!(self.phase, Phase::Legacy(_)) {
            self.legacy_broker_packet(h, body, now);
            return;
        }
        match h.kind() {
            mqtt::CONNACK => self.broker_connack(frame, body),
            mqtt::PUBLISH => self.broker_publish(h, frame, body, now),
            mqtt::PUBREL => {
                match mqtt::parse_pkid(body).map(|id| (id, self.ledger.broker_pubrel(id))) {
                    Ok((id, BrokerPubrel::Complete)) => {
                        mqtt::encode_ack(mqtt::PUBCOMP, id, &mut self.to_broker);
                        self.last_to_broker = now;
                    }
                    Ok((_, BrokerPubrel::Relay)) | Err(_) => self.relay_to_guest(frame),
                }
            }
            mqtt::PUBACK | mqtt::PUBCOMP => {
                if let Ok(id) = mqtt::parse_pkid(body) {
                    self.ledger.broker_acked(id);
                }
                self.relay_to_guest(frame);
            }
            mqtt::SUBACK => self.broker_suback(frame, body),
            mqtt::PINGRESP => {
                if !self.ledger.pong() {
                    self.relay_to_guest(frame);
                }
            }
            _ => self.relay_to_guest(frame),
        }
    }

    /// The broker's CONNACK to the guest's CONNECT: the session is up, or the broker refused it.
    pub(super) fn broker_connack(&mut self, frame: &[u8], body: &[u8]) {
        let (present, rc) =
            mqtt::parse_connack(body).unwrap_or((false, connack::SERVER_UNAVAILABLE));
        if present && self.guest_clean {
            // The broker kept the VM's session; the guest asked for a clean one and is told so
            // (MQTT: a client without session state closes on "session present").
            let mut out = BytesMut::new();
            mqtt::encode_connack(false, rc, &mut out);
            self.relay_to_guest(&out);
        } else {
            self.relay_to_guest(frame);
        }
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
    pub(super) fn broker_publish(
        &mut self,
        h: &FixedHeader,
        frame: &[u8],
        body: &[u8],
        now: Instant,
    ) {
        let Ok(p) = mqtt::parse_publish(h, body) else {
            self.end_session("bad PUBLISH from broker", false, now);
            return;
        };
        if self.past_deadline(p.topic, p.payload, now) {
            self.not_delivered(p.qos, p.pkid, now);
            return;
        }
        match self.rules.check_deliver(p.topic) {
            Ok(()) => {
                self.ledger.delivered(p.qos, p.pkid);
                self.budget.owe_answers(p.topic);
                self.relay_publish_to_guest(frame, p.topic)
            }
            Err(d) => {
                if let Some(unreported) = self.may_report(now) {
                    tracing::warn!(topic = p.topic, reason = %d, "delivery refused{unreported}");
                }
                self.counters.refused += 1;
                self.not_delivered(p.qos, p.pkid, now);
            }
        }
    }

    /// A delivery the guest does not get: acknowledged to the broker here.
    fn not_delivered(&mut self, qos: u8, pkid: Option<u16>, now: Instant) {
        let acks = self.ledger.dropped(qos, pkid);
        self.acks_to_broker(&acks, now);
    }

    /// A request whose deadline passed (it waited in the broker while the VM was away) is not
    /// delivered: running it now would surprise a requester that gave up. Counted.
    pub(super) fn past_deadline(&mut self, topic: &str, payload: &[u8], now: Instant) -> bool {
        let Some(now_ms) = self.epoch_ms(now) else {
            return false;
        };
        if !policy::is_request_topic(topic) || !topics::payload::expired(payload, now_ms) {
            return false;
        }
        tracing::debug!(topic, "request past its deadline not delivered");
        self.counters.expired += 1;
        true
    }

    /// The broker's SUBACK, merged with the link's own refusals when the SUBSCRIBE had some.
    pub(super) fn broker_suback(&mut self, frame: &[u8], body: &[u8]) {
        let Ok((id, codes)) = mqtt::parse_suback(body) else {
            return self.relay_to_guest(frame);
        };
        let Some(merged) = self.ledger.merge_suback(id, codes) else {
            return self.relay_to_guest(frame);
        };
        let mut out = BytesMut::new();
        mqtt::encode_suback(id, &merged, &mut out);
        self.relay_to_guest(&out);
    }
}
