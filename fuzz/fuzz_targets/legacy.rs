//! The MVP's lines, from a hostile legacy guest (Dom0's legacy mode) or application (the agent's
//! legacy endpoint): both run `topics::legacy_translator`. Invariants: no panic; every request
//! published for the speaker carries its VM as `sender`, every response and notification its VM as
//! `responder` and `origin`, whatever the lines claimed; no message over the way's limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};
use topics::RequestId;
use topics::legacy_translator::{Out, Translator};
use topics::vm::VmId;

const LIMIT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let _ = topics::legacy_line::parse(data);
    let mut t = Translator::new(VmId::parse("vm-old").unwrap(), "Dom0", None, LIMIT);
    let mut n = 0u8;
    let mut ids = || {
        n = n.wrapping_add(1);
        RequestId::random([n; 16])
    };
    let mut now = Instant::now();
    for chunk in data.chunks(97) {
        now += Duration::from_millis(u64::from(chunk[0]) * 10);
        for out in t.on_bytes(chunk, now, &mut ids) {
            match out {
                Out::Request { topic, payload, .. } => {
                    assert!(topic.len() + payload.len() <= LIMIT, "over the limit");
                    let env = topics::payload::decode_envelope(&payload)
                        .expect("a translated request has a valid envelope");
                    assert_eq!(env.sender.as_str(), "vm-old", "identity taken from the line");
                }
                Out::Publish { topic, payload } => {
                    assert!(topic.len() + payload.len() <= LIMIT, "over the limit");
                    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    let who = v.get("responder").or_else(|| v.get("origin"));
                    assert_eq!(who.and_then(|w| w.as_str()), Some("vm-old"), "identity claimed");
                }
                Out::Line(line) => assert_eq!(line.last(), Some(&b'\n')),
            }
        }
        assert!(t.partial().len() <= LIMIT + 97);
        let _ = t.on_tick(now);
    }
    let _ = t.on_message("system/disks/list_disks/request", data, now, &mut ids);
    let _ = t.on_message("system/disk/new_file/notification", data, now, &mut ids);
    let _ = t.on_message("system/disks/list_disks/response/vm-old", data, now, &mut ids);
    let _ = t.on_message("system/disks/create_file/response/vm-old", data, now, &mut ids);
});
