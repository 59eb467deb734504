//! The MVP's lines, from a hostile legacy guest (Dom0's legacy mode) or application (the agent's
//! legacy endpoint). Invariants: no panic; every request Dom0 would publish for the guest carries
//! the channel's VM as `sender`, whatever the lines claimed.
#![no_main]

use dom0_broker::legacy_mode::{LegacyMode, Out};
use libfuzzer_sys::fuzz_target;
use tokio::time::Instant;
use topics::vm::VmId;

fuzz_target!(|data: &[u8]| {
    let _ = topics::legacy_line::parse(data);
    let mut l = LegacyMode::new(VmId::parse("vm-old").unwrap());
    let now = Instant::now();
    for chunk in data.chunks(97) {
        for out in l.on_guest(chunk, now) {
            match out {
                Out::Publish { topic, payload } => {
                    if topic.ends_with("/request") {
                        let env = topics::payload::decode_envelope(&payload)
                            .expect("a translated request has a valid envelope");
                        assert_eq!(env.sender.as_str(), "vm-old", "identity taken from the line");
                    }
                    if let Ok(Some(r)) = topics::payload::claimed_responder(&payload) {
                        assert_eq!(r, "vm-old", "a response claims another responder");
                    }
                }
                Out::Line(line) => assert_eq!(line.last(), Some(&b'\n')),
            }
        }
        assert!(l.partial().len() <= topics::legacy_line::MAX_LINE + 97);
    }
    let _ = l.on_broker("system/disks/list_disks/request", data);
    let _ = l.on_broker("system/disk/new_file/notification", data);
});
