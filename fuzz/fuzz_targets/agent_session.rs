//! The agent's session with Dom0, fed by a hostile "Dom0" (the guest must not trust its bytes
//! blindly either). Invariants: no panic; what the agent writes always parses; the in-flight
//! window stays bounded.
#![no_main]

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use domu_agent::uplink::session::{MAX_INFLIGHT, Publication, Session, SessionConfig};
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::Packet;
use tokio::time::Instant;
use topics::vm::VmId;

fuzz_target!(|data: &[u8]| {
    let cfg = SessionConfig {
        vm: VmId::parse("vm-gui").unwrap(),
        keepalive: Duration::from_secs(5),
        max_packet: 4096,
    };
    let mut now = Instant::now();
    let mut s = Session::new(cfg, now);
    s.subscribe("app/#".into(), QoS::AtLeastOnce);
    s.open(now);
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        rest = next;
        match op % 5 {
            0 | 1 => {
                s.on_input(chunk, now);
            }
            2 => {
                now += Duration::from_millis(u64::from(*len) * 50);
                s.on_tick(now);
            }
            3 => {
                let _ = s.publish(Publication { topic: "app/x".into(), payload: Bytes::copy_from_slice(chunk), qos: if len % 2 == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce }, retain: false }, now);
            }
            _ => {
                s.ping(u64::from(*len), now);
            }
        }
        assert!(s.inflight() <= MAX_INFLIGHT);
        let mut out: BytesMut = s.take_output();
        while !out.is_empty() {
            Packet::read(&mut out, usize::MAX).expect("the agent writes whole, well-formed packets");
        }
    }
});
