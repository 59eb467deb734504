//! Policy decisions on hostile filters and topics. Invariants: no panic; a subscription allowed
//! means every valid topic it matches may be delivered; `$`-topics are never reachable.
#![no_main]

use dom0_broker::policy::Rules;
use libfuzzer_sys::fuzz_target;
use topics::filter::{filter_covers, filter_matches};
use topics::topic::validate_name;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parts: Vec<&str> = text.split('\n').collect();
    let [allow, deny, filter, topic, ..] = parts[..] else { return };
    let rules = Rules {
        publish: vec![allow.to_owned()],
        subscribe: vec![allow.to_owned()],
        deny_publish: vec![deny.to_owned()],
        deny_subscribe: vec![deny.to_owned()],
    };
    let sub = rules.check_subscribe(filter);
    let deliver = rules.check_deliver(topic);
    let publish = rules.check_publish_topic(topic);
    if topic.starts_with('$') {
        assert!(deliver.is_err() && publish.is_err(), "a $-topic was reachable");
    }
    if filter.starts_with('$') {
        assert!(sub.is_err());
    }
    if sub.is_ok() && validate_name(topic).is_ok() && filter_matches(filter, topic) {
        assert!(deliver.is_ok(), "subscribed to {filter:?}, yet {topic:?} is not deliverable");
    }
    // Covering is consistent with matching.
    if filter_covers(allow, filter) && filter_matches(filter, topic) && !topic.starts_with('$') {
        assert!(filter_matches(allow, topic), "{allow:?} covers {filter:?} but not {topic:?}");
    }
});
