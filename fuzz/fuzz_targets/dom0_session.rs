//! The Dom0 link's state machine, fed by a hostile guest and a broker, in any interleaving.
//! Invariants: no panic; the identity sent to the broker is the channel's; nothing the policy
//! refuses reaches the broker; the buffers stay within the configured bounds.
#![no_main]

use std::time::Duration;

use dom0_broker::mqtt;
use dom0_broker::policy::Policy;
use dom0_broker::session::{Effect, Limits, Session};
use libfuzzer_sys::fuzz_target;
use std::time::Instant;
use topics::vm::VmId;

const MAX_PACKET: usize = 4096;
const QUEUE: usize = 64 * 1024;

/// Checks every whole packet the session wrote to the broker.
fn check_to_broker(bytes: &[u8], rules: &dom0_broker::policy::Rules) {
    let mut rest = bytes;
    while let Ok(Some(h)) = mqtt::fixed_header(rest, usize::MAX) {
        let Some(frame) = rest.get(..h.frame_len()) else { break };
        let body = &frame[h.header_len..];
        match h.kind() {
            mqtt::CONNECT => {
                let c = mqtt::parse_connect(body).expect("the link sends a well-formed CONNECT");
                assert_eq!(c.client_id, "vm-gui", "identity taken from the guest's bytes");
                assert_eq!(c.username.as_deref(), Some("vm-gui"));
                assert!(c.password.is_none());
            }
            mqtt::PUBLISH => {
                let p = mqtt::parse_publish(&h, body).expect("well-formed PUBLISH to the broker");
                assert!(
                    rules.check_publish_topic(p.topic).is_ok(),
                    "refused topic {:?} reached the broker",
                    p.topic
                );
            }
            mqtt::SUBSCRIBE => {
                let (_, filters) = mqtt::parse_subscribe(body).expect("well-formed SUBSCRIBE");
                for (f, _) in filters {
                    assert!(rules.check_subscribe(f).is_ok(), "refused filter {f:?} reached the broker");
                }
            }
            _ => {}
        }
        rest = &rest[h.frame_len()..];
    }
}

fuzz_target!(|data: &[u8]| {
    let vm = VmId::parse("vm-gui").unwrap();
    let limits = Limits {
        max_packet: MAX_PACKET,
        max_keepalive: Duration::from_secs(60),
        queue_bytes: QUEUE,
        rate_per_sec: 1000,
        burst: 100,
        max_inflight: 16,
        violation_limit: 50,
    };
    // The policy is the same for every input: built once (it dominated the run time).
    static RULES: std::sync::OnceLock<dom0_broker::policy::Rules> = std::sync::OnceLock::new();
    let rules = RULES
        .get_or_init(|| Policy::builtin().rules_for(&vm))
        .clone();
    let mut now = Instant::now();
    let mut s = Session::new(vm, limits, rules.clone(), now);
    s.attach(now);
    // The input: a sequence of (op, len, bytes).
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        rest = next;
        let effects = match op % 4 {
            0 | 1 => s.on_guest_input(chunk, now),
            2 => {
                if s.has_broker() {
                    s.on_broker_input(chunk, now)
                } else {
                    Vec::new()
                }
            }
            _ => {
                now += Duration::from_millis(u64::from(*len) * 100);
                s.on_tick(now)
            }
        };
        let mut pending = effects;
        while let Some(e) = pending.pop() {
            match e {
                Effect::OpenBroker => pending.extend(s.broker_connected(now)),
                Effect::CloseBroker { .. } => s.broker_released(),
                _ => {}
            }
        }
        check_to_broker(s.to_broker(), &rules);
        assert!(s.to_guest().len() <= QUEUE + 2 * MAX_PACKET + 64, "guest queue unbounded");
        assert!(s.to_broker().len() <= 2 * MAX_PACKET + 64 * 1024, "broker queue unbounded");
        // The driver writes everything.
        let (g, b) = (s.to_guest().len(), s.to_broker().len());
        s.guest_written(g);
        s.broker_written(b);
    }
});
