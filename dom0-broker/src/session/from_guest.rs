//! The guest → broker relay of a live MQTT session: each packet framed and bounded, publishes
//! admitted (rate, policy, identity) or refused and acknowledged here, subscriptions checked, the
//! guest's acknowledgements forwarded only for what the broker sent it.

use std::time::Instant;

use bytes::BytesMut;
use topics::payload::{self, ErrorBody, ErrorCode, LinkState, NoArgs};
use topics::topic::Topic;
use topics::{RequestId, Response};

use super::Session;
use super::budget::Refusal;
use super::ledger::GuestPubrel;
use crate::mqtt::{self, FixedHeader, PacketError};

impl Session {
    /// Frames and relays one packet from the guest. Returns false when it needs more bytes.
    pub(super) fn relay_one_from_guest(&mut self, now: Instant) -> bool {
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
        self.counters.packets_in += 1;
        self.counters.bytes_in += frame.len() as u64;
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
                mqtt::parse_pkid(body).map(|id| self.guest_ack(kind, id, now))
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
                self.ledger.ping(false);
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
        match result {
            Err(e) => self.desync(&e, now),
            Ok(()) => self.enforce_violation_limit(now),
        }
        true
    }

    /// A VM that reached its limit of refusals in one session is disconnected.
    fn enforce_violation_limit(&mut self, now: Instant) {
        if self.budget.violations >= self.limits.violation_limit {
            tracing::warn!(
                violations = self.budget.violations,
                "too many refusals; disconnecting the VM"
            );
            self.state(
                LinkState::Violations,
                Some(format!("{} refusals", self.budget.violations)),
            );
            self.end_session("too many policy violations", false, now);
        }
    }

    /// The guest's PUBACK, PUBREC or PUBCOMP: given to the broker only for what it sent the guest,
    /// in the order it sent it (see the ledger).
    pub(super) fn guest_ack(&mut self, kind: u8, id: u16, now: Instant) {
        match self.ledger.guest_ack(kind, id) {
            Some(acks) => self.acks_to_broker(&acks, now),
            None => self.unsolicited(kind, id, now),
        }
    }

    /// The guest's PUBREL: completed here for a refused QoS 2 publish (or nothing in flight),
    /// forwarded for one the broker has.
    pub(super) fn guest_pubrel(&mut self, id: u16, frame: &[u8], now: Instant) {
        match self.ledger.guest_pubrel(id) {
            GuestPubrel::Complete => mqtt::encode_ack(mqtt::PUBCOMP, id, &mut self.to_guest),
            GuestPubrel::Forward => self.forward(frame, now),
            GuestPubrel::Unsolicited => {
                // Nothing of the guest's in flight under this id: completed here (MQTT: a PUBREL
                // is always answered by a PUBCOMP), the broker never sees it.
                self.unsolicited(mqtt::PUBREL, id, now);
                mqtt::encode_ack(mqtt::PUBCOMP, id, &mut self.to_guest);
            }
        }
    }

    pub(super) fn guest_publish(
        &mut self,
        h: &FixedHeader,
        frame: &[u8],
        now: Instant,
    ) -> Result<(), PacketError> {
        let body = frame.get(h.header_len..).unwrap_or_default();
        let p = mqtt::parse_publish(h, body)?;
        let verdict = match self
            .ledger
            .may_publish(p.qos, p.pkid, p.dup, self.limits.max_inflight)
        {
            Err(why) => Err(Refusal::busy(why)),
            Ok(()) => self.admit(p.topic, p.payload, now),
        };
        match verdict {
            Ok(stamped) => {
                self.ledger.published(p.pkid);
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
                if let Some((kind, id)) = self.ledger.refused(p.qos, p.pkid) {
                    mqtt::encode_ack(kind, id, &mut self.to_guest);
                }
            }
        }
        Ok(())
    }

    /// Answers a refused request on the VM's own response topic of its command (when the VM may
    /// read it): `status: error`, the code, the reason, the request's `request_id`.
    pub(super) fn answer_refused_request(
        &mut self,
        topic: &str,
        payload: &[u8],
        code: ErrorCode,
        why: &str,
    ) {
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

    pub(super) fn guest_subscribe(&mut self, body: &[u8], now: Instant) -> Result<(), PacketError> {
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
            self.ledger.partly_refused(pkid, refused);
        }
        Ok(())
    }
}
