//! Hostile input, one attack class at a time: the classes as bytes (what a compromised guest writes
//! on its channel, what a compromised "Dom0" writes to an agent), and the runners that send them
//! while a neighbour keeps a request/response loop going, and measure what users would check:
//! Dom0 (or the agent) still up, its memory, the neighbour's failures and p99, the offender's
//! recovery. Used by the system test (`tests/hostile.rs`, short, asserting the invariants) and by
//! the reliability benchmark (`benches/hostile.rs`, longer, printing the figures).
//!
//! The rooms: the class tables (`toward_dom0.rs`: what a compromised guest writes on its channel;
//! `toward_agent.rs`: what a compromised Dom0 writes to an agent), the neighbour's load
//! (`neighbour.rs`), and the runners that send a class and measure (`runner.rs`).

mod neighbour;
mod runner;
mod toward_agent;
mod toward_dom0;

use std::time::Duration;

use crate::raw::publish_raw;

pub use neighbour::{LoopRun, Neighbour};
pub use runner::{AgentUnderTest, Outcome, attack, run_toward_agent, run_toward_dom0};
pub use toward_agent::toward_agent;
pub use toward_dom0::toward_dom0;

/// The attacking VM (not in the policy: it gets the `*` rules only).
pub const EVIL: &str = "vm-evil";

/// One hostile input.
#[derive(Debug, Clone)]
pub struct Input {
    /// Sent on a live session (after a CONNECT and its CONNACK), or on a link waiting for CONNECT.
    pub live: bool,
    pub bytes: Vec<u8>,
    /// Written one byte at a time with this pause (a slow writer).
    pub pace: Option<Duration>,
    /// The channel's backend connection is cut right after (the guest vanished mid-write).
    pub vanish: bool,
}

impl Input {
    fn scanning(bytes: Vec<u8>) -> Input {
        Input {
            live: false,
            bytes,
            pace: None,
            vanish: false,
        }
    }
    fn live(bytes: Vec<u8>) -> Input {
        Input {
            live: true,
            ..Input::scanning(bytes)
        }
    }

    /// Writes the bytes with `write`: at once, or a byte at a time at its pace.
    fn send(&self, mut write: impl FnMut(&[u8])) {
        match self.pace {
            Some(p) => {
                for b in &self.bytes {
                    write(std::slice::from_ref(b));
                    std::thread::sleep(p);
                }
            }
            None => write(&self.bytes),
        }
    }
}

/// One class of the list.
#[derive(Debug, Clone)]
pub struct Class {
    pub id: u8,
    pub name: &'static str,
    pub inputs: Vec<Input>,
}

/// A QoS 1 PUBLISH on `t` cut short at every field: in the header, the length, the topic length,
/// the topic, the packet id, the payload (live inputs).
fn publish_cuts(full_publish: &[u8], topic_len: usize) -> Vec<Input> {
    let last = full_publish.len() - 1;
    [1, 2, 3, 4, 10, topic_len + 4, topic_len + 5, last]
        .iter()
        .map(|n| Input::live(full_publish[..(*n).min(last)].to_vec()))
        .collect()
}

/// 2000 QoS 1 publishes on `t`, and 2000 QoS 2 ones, packet ids 1 to 2000.
fn unacknowledged(t: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut qos1 = Vec::new();
    let mut qos2 = Vec::new();
    for i in 1..=2000u16 {
        qos1.extend(publish_raw(0x32, t, Some(i), b"{}"));
        qos2.extend(publish_raw(0x34, t, Some(i), b"{}"));
    }
    (qos1, qos2)
}

/// 2 MiB of 1 KiB QoS 0 publishes on `t`.
fn kib_flood(t: &[u8]) -> Vec<u8> {
    publish_raw(0x30, t, None, &[b'f'; 1024]).repeat(2048)
}
/// Deterministic noise.
fn noise(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}
