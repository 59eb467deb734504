//! At most once on the responder's side: a request seen again (the same sender, command and
//! `request_id`: a redelivery after a reconnect, its acknowledgement lost on the way) is answered
//! with what it was answered, not run again; one seen again while it still runs gets that answer
//! too when it is ready. Bounded in entries and in bytes of answers kept: the oldest are
//! forgotten first. Pure.

use std::collections::{HashMap, VecDeque};

use topics::RequestId;
use topics::topic::Command;
use topics::vm::VmId;

/// Requests remembered at most.
pub const REMEMBERED: usize = 1024;
/// Bytes of answers kept at most (an answer larger than this is not kept: a redelivery of its
/// request is then run again).
pub const KEPT_BYTES: usize = 4 << 20;

/// What identifies a request across its deliveries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub sender: VmId,
    pub command: Command,
    pub request_id: RequestId,
}

/// What a delivery of a request is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The first: run it.
    First,
    /// Again, while the first still runs: its answer will be sent once more.
    Running,
    /// Again, after it was answered: send this answer again.
    Answered(Vec<u8>),
}

#[derive(Debug)]
enum Entry {
    Running { again: usize },
    Answered(Vec<u8>),
}

#[derive(Debug)]
pub struct Once {
    entries: HashMap<Key, Entry>,
    /// Keys in the order they were first seen (the oldest is forgotten first).
    order: VecDeque<Key>,
    kept_bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl Default for Once {
    fn default() -> Once {
        Once::new(REMEMBERED, KEPT_BYTES)
    }
}

impl Once {
    pub fn new(max_entries: usize, max_bytes: usize) -> Once {
        Once {
            entries: HashMap::new(),
            order: VecDeque::new(),
            kept_bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
        }
    }

    /// A delivery of the request `key`.
    pub fn seen(&mut self, key: Key) -> Seen {
        match self.entries.get_mut(&key) {
            Some(Entry::Running { again }) => {
                *again += 1;
                Seen::Running
            }
            Some(Entry::Answered(body)) => Seen::Answered(body.clone()),
            None => {
                while self.entries.len() >= self.max_entries {
                    self.forget_oldest();
                }
                self.order.push_back(key.clone());
                self.entries.insert(key, Entry::Running { again: 0 });
                Seen::First
            }
        }
    }

    /// The request `key` was answered with `body`: how many more times to send it (once per
    /// delivery seen while it ran).
    pub fn answered(&mut self, key: &Key, body: &[u8]) -> usize {
        let again = match self.entries.get(key) {
            Some(Entry::Running { again }) => *again,
            _ => return 0,
        };
        if body.len() > self.max_bytes {
            self.entries.remove(key);
            return again;
        }
        while self.kept_bytes + body.len() > self.max_bytes {
            if !self.forget_oldest() {
                break;
            }
        }
        if self.entries.contains_key(key) {
            self.kept_bytes += body.len();
            self.entries
                .insert(key.clone(), Entry::Answered(body.to_vec()));
        }
        again
    }

    /// Forgets the oldest request; false when there is none.
    fn forget_oldest(&mut self) -> bool {
        while let Some(k) = self.order.pop_front() {
            if let Some(e) = self.entries.remove(&k) {
                if let Entry::Answered(b) = e {
                    self.kept_bytes -= b.len();
                }
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> Key {
        Key {
            sender: VmId::parse("vm-gui").unwrap(),
            command: Command::CreateFile,
            request_id: RequestId::parse(id).unwrap(),
        }
    }

    #[test]
    fn a_redelivery_is_answered_alike_and_not_run_again() {
        let mut once = Once::default();
        assert_eq!(once.seen(key("a")), Seen::First);
        assert_eq!(once.seen(key("a")), Seen::Running, "again while it runs");
        assert_eq!(
            once.answered(&key("a"), b"ok"),
            1,
            "the second delivery is answered too"
        );
        assert_eq!(once.seen(key("a")), Seen::Answered(b"ok".to_vec()));
        // Another id, sender or command is another request.
        assert_eq!(once.seen(key("b")), Seen::First);
        let mut other = key("a");
        other.command = Command::RemoveFile;
        assert_eq!(once.seen(other), Seen::First);
        let mut other = key("a");
        other.sender = VmId::parse("vm-other").unwrap();
        assert_eq!(once.seen(other), Seen::First);
    }

    #[test]
    fn the_oldest_are_forgotten_first() {
        let mut once = Once::new(2, 100);
        for id in ["a", "b", "c"] {
            assert_eq!(once.seen(key(id)), Seen::First);
            assert_eq!(once.answered(&key(id), id.as_bytes()), 0);
        }
        assert_eq!(once.seen(key("a")), Seen::First, "forgotten: run again");
        assert_eq!(once.seen(key("c")), Seen::Answered(b"c".to_vec()));
    }

    #[test]
    fn answers_kept_stay_within_their_bytes() {
        let mut once = Once::new(100, 10);
        once.seen(key("a"));
        once.answered(&key("a"), b"123456");
        once.seen(key("b"));
        once.answered(&key("b"), b"123456");
        assert_eq!(once.kept_bytes, 6, "the oldest made room");
        assert_eq!(once.seen(key("b")), Seen::Answered(b"123456".to_vec()));
        assert_eq!(once.seen(key("a")), Seen::First);
        once.seen(key("big"));
        assert_eq!(
            once.answered(&key("big"), &[0u8; 11]),
            0,
            "too large to keep"
        );
        assert_eq!(once.seen(key("big")), Seen::First);
    }
}
