//! What waits for the centre: the forwarder's queue, bounded, in order, kept until the centre
//! acknowledges it (QoS 1), handed to the MQTT client a window at a time. After a lost connection
//! everything not acknowledged goes again, in order (at least once; the client's own replay is
//! not used: it forgets its unacknowledged messages when the centre has no session for it).
//! Beyond the bound, the newest message is dropped and counted (as Mosquitto's bridge does).
//! Pure: no I/O, no clock.

use std::collections::VecDeque;

use bytes::Bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not handed to the client yet (or handed on a connection that was lost).
    Waiting,
    /// Handed to the client; its packet id not known yet.
    Handed,
    /// On the wire under this packet id.
    Sent(u16),
    Acked,
}

#[derive(Debug)]
struct Item {
    topic: String,
    payload: Bytes,
    state: State,
}

/// The queue for the centre.
#[derive(Debug)]
pub struct Outbox {
    items: VecDeque<Item>,
    bound: usize,
    dropped: u64,
}

impl Outbox {
    pub fn new(bound: usize) -> Outbox {
        Outbox {
            items: VecDeque::new(),
            bound: bound.max(1),
            dropped: 0,
        }
    }

    /// Queues a message; false when it was dropped (the queue is full).
    pub fn push(&mut self, topic: String, payload: Bytes) -> bool {
        if self.items.len() >= self.bound {
            self.dropped += 1;
            return false;
        }
        self.items.push_back(Item {
            topic,
            payload,
            state: State::Waiting,
        });
        true
    }

    /// Messages to hand to the client now, in order, so that at most `window` are unacknowledged.
    pub fn to_send(&mut self, window: usize) -> Vec<(String, Bytes)> {
        let mut out_now = self
            .items
            .iter()
            .filter(|i| matches!(i.state, State::Handed | State::Sent(_)))
            .count();
        let mut batch = Vec::new();
        for i in self.items.iter_mut() {
            if out_now >= window {
                break;
            }
            if i.state == State::Waiting {
                i.state = State::Handed;
                out_now += 1;
                batch.push((i.topic.clone(), i.payload.clone()));
            }
        }
        batch
    }

    /// The client put the oldest handed message on the wire under `pkid`.
    pub fn sent(&mut self, pkid: u16) {
        if let Some(i) = self.items.iter_mut().find(|i| i.state == State::Handed) {
            i.state = State::Sent(pkid);
        }
    }

    /// The centre acknowledged `pkid`: that message is done; the acknowledged head leaves.
    pub fn acked(&mut self, pkid: u16) {
        if let Some(i) = self.items.iter_mut().find(|i| i.state == State::Sent(pkid)) {
            i.state = State::Acked;
        }
        while self.items.front().is_some_and(|i| i.state == State::Acked) {
            self.items.pop_front();
        }
    }

    /// The connection was lost: everything unacknowledged goes again, in order.
    pub fn connection_lost(&mut self) {
        for i in self.items.iter_mut() {
            if matches!(i.state, State::Handed | State::Sent(_)) {
                i.state = State::Waiting;
            }
        }
    }

    /// Messages not yet acknowledged by the centre.
    pub fn queued(&self) -> usize {
        self.items
            .iter()
            .filter(|i| i.state != State::Acked)
            .count()
    }

    /// Messages dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Bytes held (topics and payloads): the forwarder's memory for its queue.
    pub fn bytes(&self) -> usize {
        self.items
            .iter()
            .map(|i| i.topic.len() + i.payload.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u32) -> (String, Bytes) {
        (format!("t/{n}"), Bytes::from(n.to_string()))
    }

    fn names(batch: &[(String, Bytes)]) -> Vec<&str> {
        batch.iter().map(|(t, _)| t.as_str()).collect()
    }

    #[test]
    fn in_order_within_a_window_until_acknowledged() {
        let mut o = Outbox::new(10);
        for n in 0..5 {
            let (t, p) = msg(n);
            assert!(o.push(t, p));
        }
        let b = o.to_send(2);
        assert_eq!(names(&b), ["t/0", "t/1"]);
        assert!(o.to_send(2).is_empty(), "window full");
        o.sent(7);
        o.sent(8);
        // Acknowledged out of order: the head leaves only once it is acknowledged itself.
        o.acked(8);
        assert_eq!(o.queued(), 4);
        assert_eq!(names(&o.to_send(2)), ["t/2"]);
        o.acked(7);
        assert_eq!(o.queued(), 3);
        assert_eq!(names(&o.to_send(2)), ["t/3"]);
    }

    #[test]
    fn a_lost_connection_sends_everything_unacknowledged_again_in_order() {
        let mut o = Outbox::new(10);
        for n in 0..4 {
            let (t, p) = msg(n);
            o.push(t, p);
        }
        o.to_send(3);
        o.sent(1);
        o.sent(2);
        o.acked(1);
        o.connection_lost();
        assert_eq!(names(&o.to_send(10)), ["t/1", "t/2", "t/3"]);
        // A stale acknowledgement of the old connection's packet id does nothing.
        o.acked(2);
        assert_eq!(o.queued(), 3);
    }

    #[test]
    fn beyond_the_bound_the_newest_is_dropped_and_counted() {
        let mut o = Outbox::new(3);
        for n in 0..5 {
            let (t, p) = msg(n);
            o.push(t, p);
        }
        assert_eq!(o.queued(), 3);
        assert_eq!(o.dropped(), 2);
        assert_eq!(names(&o.to_send(10)), ["t/0", "t/1", "t/2"]);
        assert_eq!(o.bytes(), 3 * 4);
    }
}
