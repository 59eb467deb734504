//! Property tests: parsing topics and decoding payloads never panic, whatever the input.

use proptest::prelude::*;
use topics::filter;
use topics::payload::{self, CreateFileArgs, NoArgs};
use topics::topic::{self, Topic};

proptest! {
    #[test]
    fn topic_parsing_never_panics(s in "\\PC{0,300}") {
        let _ = Topic::parse(&s);
        let _ = topic::validate_filter(&s);
        let _ = filter::filter_matches(&s, "system/disks/list_disks/request");
        let _ = filter::filter_covers(&s, "system/+/x");
        let _ = topics::VmId::parse(&s);
    }

    #[test]
    fn topic_like_strings_never_panic(s in "(system|\\$SYS|\\+|#|[a-z_-]{0,6})(/(disks|list_disks|request|response|notification|\\+|#|[a-z0-9_-]{0,5})){0,6}") {
        if let Ok(t) = Topic::parse(&s) {
            // Whatever parses prints back to itself.
            prop_assert_eq!(t.to_string(), s);
        }
    }

    #[test]
    fn payload_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = payload::decode_request::<NoArgs>(&bytes);
        let _ = payload::decode_request::<CreateFileArgs>(&bytes);
        let _ = payload::decode_envelope(&bytes);
    }

    #[test]
    fn base64_never_panics(s in "[A-Za-z0-9+/=]{0,64}") {
        let _ = topics::binary::decode_limited(&s, 32);
    }
}
