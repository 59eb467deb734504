//! Topic parsing and payload decoding on hostile input. Invariants: no panic; what parses builds
//! back to the same string.
#![no_main]

use libfuzzer_sys::fuzz_target;
use topics::payload::{self, CreateFileArgs, ListFilesReply};
use topics::topic::{Topic, validate_filter, validate_name};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = Topic::parse(s) {
            assert_eq!(t.to_string(), s, "a parsed topic builds back to itself");
            assert!(validate_name(s).is_ok());
        }
        let _ = validate_filter(s);
    }
    let _ = payload::decode_envelope(data);
    let _ = payload::decode_request::<CreateFileArgs>(data);
    let _ = payload::decode_response::<ListFilesReply>(data);
    let _ = payload::claimed_responder(data);
    let _ = topics::binary::decode_limited(&String::from_utf8_lossy(data), 1 << 16);
});
