//! One local MQTT client's connection to the agent, fed by a hostile application. Invariants: no
//! panic; the output stays bounded; bad bytes close this connection only (an `Err`).
#![no_main]

use std::time::Duration;

use domu_agent::endpoints::mqtt_session::{LocalEvent, LocalLimits, LocalSession};
use libfuzzer_sys::fuzz_target;
use tokio::time::Instant;

fuzz_target!(|data: &[u8]| {
    let limits = LocalLimits {
        max_packet: 4096,
        max_output: 64 * 1024,
    };
    let mut now = Instant::now();
    let mut s = LocalSession::new(limits, now);
    for chunk in data.chunks(61) {
        now += Duration::from_millis(10);
        let events = match s.on_input(chunk, now) {
            Ok(e) => e,
            Err(_) => return,
        };
        for e in events {
            match e {
                LocalEvent::Connect { .. } => {
                    if s.accept(now).is_err() {
                        return;
                    }
                }
                LocalEvent::Publish { pkid: Some(id), .. } => s.acked(id),
                LocalEvent::Subscribe { pkid, filters } => {
                    s.suback(pkid, &vec![None; filters.len()])
                }
                LocalEvent::Unsubscribe { pkid, .. } => s.unsuback(pkid),
                LocalEvent::Publish { .. } => {}
            }
        }
        assert!(s.pending_output() <= 64 * 1024 + 8192);
        let _ = s.take_output();
        if s.on_tick(now).is_err() {
            return;
        }
    }
});
