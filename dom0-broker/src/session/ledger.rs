//! The acknowledgement ledger of one broker session: what each side is owed and awaits, so the
//! link answers what it refused or dropped itself and never shows one side an acknowledgement the
//! other did not earn. Pure: packet ids in, decisions out; the session encodes the packets.
//!
//! The broker gets the first acknowledgement of its deliveries (PUBACK, PUBREC) in the order it
//! made them, as MQTT asks of a client (3.1.1, 4.6) and rumqttd enforces (an acknowledgement out
//! of order ends the connection): the link writes a large delivery to the guest after the small
//! ones waiting, and drops some itself, so the guest's acknowledgements can come in another order;
//! each waits here until every earlier delivery is acknowledged.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::mqtt;

/// The first acknowledgement a delivery at `qos` awaits: (kind, id).
fn first_ack(qos: u8, pkid: Option<u16>) -> Option<(u8, u16)> {
    match (qos, pkid) {
        (1, Some(id)) => Some((mqtt::PUBACK, id)),
        (2, Some(id)) => Some((mqtt::PUBREC, id)),
        _ => None,
    }
}

/// What becomes of the guest's PUBREL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestPubrel {
    /// For a QoS 2 publish the link refused: completed here.
    Complete,
    /// For a publish the broker has: forwarded.
    Forward,
    /// For nothing in flight: completed here (MQTT always answers a PUBREL), counted as unsolicited.
    Unsolicited,
}

/// What becomes of the broker's PUBREL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerPubrel {
    /// For a QoS 2 delivery the link dropped: completed here.
    Complete,
    /// For one the guest has: relayed, its PUBCOMP awaited.
    Relay,
}

#[derive(Debug, Default)]
pub struct Ledger {
    /// Guest QoS 1/2 publishes awaiting the broker's PUBACK/PUBCOMP.
    inflight: HashSet<u16>,
    /// QoS 2 publishes from the guest that were refused (we answered PUBREC; PUBREL gets PUBCOMP).
    refused_qos2: HashSet<u16>,
    /// Broker QoS 1/2 deliveries relayed to the guest: the acknowledgement each one awaits. A
    /// guest's acknowledgement for anything else is dropped, never shown to the broker.
    awaiting: HashMap<u16, u8>,
    /// The first acknowledgement (kind, id) of every QoS 1/2 delivery, in the broker's order, and
    /// whether it may go (the guest gave it, or the link answers it): released from the front.
    to_ack: VecDeque<(u8, u16, bool)>,
    /// QoS 2 deliveries from the broker that were not delivered (we answered PUBREC).
    dropped_qos2: HashSet<u16>,
    /// SUBSCRIBEs with refused filters: packet id → refused positions.
    pending_subs: HashMap<u16, Vec<bool>>,
    /// Outstanding PINGREQs to the broker, in order: true for the link's own.
    pings: VecDeque<bool>,
}

impl Ledger {
    /// A new broker session: nothing owed, nothing awaited.
    pub fn clear(&mut self) {
        *self = Ledger::default();
    }

    /// Whether a publish of the guest may go to the broker: its packet id is not already in flight
    /// (unless it is the redelivery), and no more than `max_inflight` are. Err: why not.
    pub fn may_publish(
        &self,
        qos: u8,
        pkid: Option<u16>,
        dup: bool,
        max_inflight: usize,
    ) -> Result<(), String> {
        if pkid.is_some_and(|id| self.inflight.contains(&id)) && !dup {
            Err("packet id already in flight".to_owned())
        } else if qos > 0 && self.inflight.len() >= max_inflight {
            Err(format!("more than {max_inflight} messages in flight"))
        } else {
            Ok(())
        }
    }

    /// The guest's publish went to the broker.
    pub fn published(&mut self, pkid: Option<u16>) {
        if let Some(id) = pkid {
            self.inflight.insert(id);
        }
    }

    /// The guest's publish was refused: the acknowledgement the link answers it with (kind, id),
    /// so its session stays sound.
    pub fn refused(&mut self, qos: u8, pkid: Option<u16>) -> Option<(u8, u16)> {
        match (qos, pkid) {
            (1, Some(id)) => Some((mqtt::PUBACK, id)),
            (2, Some(id)) => {
                self.refused_qos2.insert(id);
                Some((mqtt::PUBREC, id))
            }
            _ => None,
        }
    }

    /// The broker's PUBACK or PUBCOMP: the guest's publish is complete.
    pub fn broker_acked(&mut self, id: u16) {
        self.inflight.remove(&id);
    }

    pub fn guest_pubrel(&mut self, id: u16) -> GuestPubrel {
        if self.refused_qos2.remove(&id) {
            GuestPubrel::Complete
        } else if self.inflight.contains(&id) {
            GuestPubrel::Forward
        } else {
            GuestPubrel::Unsolicited
        }
    }

    /// A delivery of the broker relayed to the guest: its acknowledgement is awaited.
    pub fn delivered(&mut self, qos: u8, pkid: Option<u16>) {
        // One place in the order per id awaited: a second delivery of an id still awaited (the
        // broker does not redeliver within a connection) would otherwise hold every later one.
        if let Some((kind, id)) = first_ack(qos, pkid)
            && self.awaiting.insert(id, kind) != Some(kind)
        {
            self.to_ack.push_back((kind, id, false));
        }
    }

    /// A delivery of the broker the guest may not read: the link answers it. The acknowledgements
    /// (kind, id) the broker may have now, in order (this one once every earlier one is given).
    pub fn dropped(&mut self, qos: u8, pkid: Option<u16>) -> Vec<(u8, u16)> {
        let Some((kind, id)) = first_ack(qos, pkid) else {
            return Vec::new();
        };
        if kind == mqtt::PUBREC {
            self.dropped_qos2.insert(id);
        }
        self.to_ack.push_back((kind, id, true));
        self.release()
    }

    /// The guest's PUBACK, PUBREC or PUBCOMP. None when the broker does not await exactly this
    /// (dropped, never shown to it); else the acknowledgements (kind, id) the broker may have now,
    /// in its order: a PUBCOMP at once (after a PUBREC the broker's PUBREL comes and awaits it),
    /// a PUBACK or PUBREC once every earlier delivery is acknowledged.
    pub fn guest_ack(&mut self, kind: u8, id: u16) -> Option<Vec<(u8, u16)>> {
        if self.awaiting.get(&id) != Some(&kind) {
            return None;
        }
        self.awaiting.remove(&id);
        if kind == mqtt::PUBCOMP {
            return Some(vec![(kind, id)]);
        }
        if let Some(entry) = self
            .to_ack
            .iter_mut()
            .find(|(k, i, ready)| *k == kind && *i == id && !*ready)
        {
            entry.2 = true;
        }
        Some(self.release())
    }

    /// The acknowledgements at the front that may go, taken.
    fn release(&mut self) -> Vec<(u8, u16)> {
        let mut out = Vec::new();
        while let Some(&(kind, id, true)) = self.to_ack.front() {
            self.to_ack.pop_front();
            out.push((kind, id));
        }
        out
    }

    pub fn broker_pubrel(&mut self, id: u16) -> BrokerPubrel {
        if self.dropped_qos2.remove(&id) {
            BrokerPubrel::Complete
        } else {
            self.awaiting.insert(id, mqtt::PUBCOMP);
            BrokerPubrel::Relay
        }
    }

    /// The broker's PUBREL for a guest that reads no MQTT (legacy): every delivery was handled
    /// here; the link completes it.
    pub fn release_dropped(&mut self, id: u16) {
        self.dropped_qos2.remove(&id);
    }

    /// A SUBSCRIBE went to the broker without the filters refused at these positions: its SUBACK
    /// is merged with them.
    pub fn partly_refused(&mut self, pkid: u16, refused: Vec<bool>) {
        self.pending_subs.insert(pkid, refused);
    }

    /// The broker's SUBACK codes merged with the link's refusals; None when it had none.
    pub fn merge_suback(&mut self, pkid: u16, codes: &[u8]) -> Option<Vec<u8>> {
        let refused = self.pending_subs.remove(&pkid)?;
        let mut granted = codes.iter();
        Some(
            refused
                .iter()
                .map(|r| match r {
                    true => mqtt::SUBACK_FAILURE,
                    false => *granted.next().unwrap_or(&mqtt::SUBACK_FAILURE),
                })
                .collect(),
        )
    }

    /// A PINGREQ went to the broker: the guest's, or the link's `own`.
    pub fn ping(&mut self, own: bool) {
        self.pings.push_back(own);
    }

    /// The broker's PINGRESP: true when it answers the link's own ping (not relayed).
    pub fn pong(&mut self) -> bool {
        self.pings.pop_front() == Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_in_flight_is_not_taken_twice_unless_redelivered() {
        let mut l = Ledger::default();
        assert_eq!(l.may_publish(1, Some(7), false, 2), Ok(()));
        l.published(Some(7));
        assert_eq!(
            l.may_publish(1, Some(7), false, 2),
            Err("packet id already in flight".to_owned())
        );
        assert_eq!(l.may_publish(1, Some(7), true, 2), Ok(()));
        l.published(Some(8));
        assert_eq!(
            l.may_publish(1, Some(9), false, 2),
            Err("more than 2 messages in flight".to_owned())
        );
        assert_eq!(
            l.may_publish(0, None, false, 2),
            Ok(()),
            "QoS 0 is never held"
        );
        l.broker_acked(7);
        assert_eq!(l.may_publish(1, Some(9), false, 2), Ok(()));
    }

    #[test]
    fn refusals_are_acknowledged_and_their_pubrel_completed_here() {
        // (qos, pkid) → the acknowledgement the guest gets.
        let table = [
            (0, None, None),
            (1, Some(3), Some((mqtt::PUBACK, 3))),
            (2, Some(4), Some((mqtt::PUBREC, 4))),
        ];
        let mut l = Ledger::default();
        for (qos, pkid, ack) in table {
            assert_eq!(l.refused(qos, pkid), ack, "qos {qos}");
        }
        assert_eq!(l.guest_pubrel(4), GuestPubrel::Complete);
        assert_eq!(l.guest_pubrel(4), GuestPubrel::Unsolicited, "only once");
        l.published(Some(5));
        assert_eq!(l.guest_pubrel(5), GuestPubrel::Forward);
    }

    #[test]
    fn the_guest_acknowledges_only_what_it_was_sent() {
        let mut l = Ledger::default();
        l.delivered(1, Some(1));
        l.delivered(2, Some(2));
        l.delivered(0, None);
        // (kind, id, what the broker gets: None = dropped)
        let table: [(u8, u16, Option<Vec<(u8, u16)>>); 6] = [
            (mqtt::PUBREC, 1, None),
            (mqtt::PUBACK, 1, Some(vec![(mqtt::PUBACK, 1)])),
            (mqtt::PUBACK, 1, None),
            (mqtt::PUBCOMP, 2, None),
            (mqtt::PUBREC, 2, Some(vec![(mqtt::PUBREC, 2)])),
            (mqtt::PUBACK, 9, None),
        ];
        for (kind, id, got) in table {
            assert_eq!(l.guest_ack(kind, id), got, "kind {kind} id {id}");
        }
        assert_eq!(l.broker_pubrel(2), BrokerPubrel::Relay);
        assert_eq!(
            l.guest_ack(mqtt::PUBCOMP, 2),
            Some(vec![(mqtt::PUBCOMP, 2)])
        );
    }

    #[test]
    fn the_broker_gets_its_acknowledgements_in_the_order_of_its_deliveries() {
        let mut l = Ledger::default();
        // Deliveries 1 (a large one, written to the guest last), 2, 3 (the link drops it), 4.
        l.delivered(1, Some(1));
        l.delivered(1, Some(2));
        assert_eq!(l.dropped(1, Some(3)), vec![], "waits for 1 and 2");
        l.delivered(2, Some(4));
        // The guest acknowledges in the order it got them: 2, 4, then 1.
        assert_eq!(l.guest_ack(mqtt::PUBACK, 2), Some(vec![]));
        assert_eq!(l.guest_ack(mqtt::PUBREC, 4), Some(vec![]));
        assert_eq!(
            l.guest_ack(mqtt::PUBACK, 1),
            Some(vec![
                (mqtt::PUBACK, 1),
                (mqtt::PUBACK, 2),
                (mqtt::PUBACK, 3),
                (mqtt::PUBREC, 4)
            ])
        );
        // Nothing waits any more: the next goes at once.
        assert_eq!(l.dropped(1, Some(5)), vec![(mqtt::PUBACK, 5)]);
        // A second acknowledgement of the same id is dropped, not queued.
        assert_eq!(l.guest_ack(mqtt::PUBACK, 1), None);
    }

    #[test]
    fn a_second_delivery_of_an_awaited_id_takes_no_second_place() {
        let mut l = Ledger::default();
        l.delivered(1, Some(7));
        l.delivered(1, Some(7));
        l.delivered(1, Some(8));
        assert_eq!(l.guest_ack(mqtt::PUBACK, 7), Some(vec![(mqtt::PUBACK, 7)]));
        assert_eq!(l.guest_ack(mqtt::PUBACK, 8), Some(vec![(mqtt::PUBACK, 8)]));
    }

    #[test]
    fn dropped_deliveries_are_completed_with_the_broker() {
        let mut l = Ledger::default();
        assert_eq!(l.dropped(1, Some(1)), vec![(mqtt::PUBACK, 1)]);
        assert_eq!(l.dropped(2, Some(2)), vec![(mqtt::PUBREC, 2)]);
        assert_eq!(l.dropped(0, None), vec![]);
        assert_eq!(l.broker_pubrel(2), BrokerPubrel::Complete);
        assert_eq!(l.broker_pubrel(2), BrokerPubrel::Relay, "only once");
    }

    #[test]
    fn a_partly_refused_subscribe_gets_one_merged_suback() {
        let mut l = Ledger::default();
        assert_eq!(
            l.merge_suback(1, &[0]),
            None,
            "nothing refused: relayed as is"
        );
        l.partly_refused(2, vec![true, false, true, false]);
        assert_eq!(
            l.merge_suback(2, &[1, 0]),
            Some(vec![mqtt::SUBACK_FAILURE, 1, mqtt::SUBACK_FAILURE, 0])
        );
        assert_eq!(l.merge_suback(2, &[1, 0]), None, "only once");
    }

    #[test]
    fn the_links_own_pings_are_answered_to_it() {
        let mut l = Ledger::default();
        l.ping(false);
        l.ping(true);
        assert!(!l.pong(), "the guest's ping first");
        assert!(l.pong());
        assert!(!l.pong(), "a PINGRESP for nothing goes to the guest");
        l.ping(true);
        l.clear();
        assert!(!l.pong(), "a new session awaits nothing");
    }
}
