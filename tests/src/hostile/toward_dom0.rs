//! What a compromised guest writes on its channel, class by class.

use std::time::Duration;

use topics::topic::Notification;

use super::{Class, Input, kib_flood, noise, publish_cuts, unacknowledged};
use crate::raw::{self, ack, connect_raw, publish_raw, string, subscribe_raw};

/// What a compromised guest writes on its channel, class by class (`vm` is its own name: the
/// identity Dom0 expects).
pub fn toward_dom0(vm: &str) -> Vec<Class> {
    let id = vm.as_bytes();
    let allowed = Notification::Error.topic();
    let t = allowed.as_bytes();
    let good_publish = publish_raw(0x30, t, None, b"{\"x\":1}");
    let good_connect = connect_raw(4, 0x02, 1, id, None);
    let mut classes = Vec::new();

    classes.push(Class {
        id: 1,
        name: "non-CONNECT first packet; second CONNECT",
        inputs: vec![
            Input::scanning(good_publish.clone()),
            Input::scanning(subscribe_raw(0x82, 1, b"#", 0)),
            Input::scanning(raw::PINGREQ.to_vec()),
            Input::scanning(raw::DISCONNECT.to_vec()),
            Input::live(connect_raw(4, 0x02, 1, id, None)),
            Input::live(connect_raw(4, 0x02, 1, b"sys-usb", None)),
        ],
    });

    let mut reserved_flags = vec![
        Input::live(vec![0x20, 0x02, 0x00, 0x00]),       // CONNACK
        Input::live(vec![0x90, 0x03, 0x00, 0x01, 0x00]), // SUBACK
        Input::live(vec![0xB0, 0x02, 0x00, 0x01]),       // UNSUBACK
        Input::live(vec![0xD0, 0x00]),                   // PINGRESP
        Input::live(vec![0x00, 0x00]),                   // reserved type 0
        Input::live(vec![0xF0, 0x00]),                   // reserved type 15
        Input::live(subscribe_raw(0x80, 2, t, 0)),       // SUBSCRIBE flags must be 0010
        Input::live(vec![0xC1, 0x00]),                   // PINGREQ with a flag
        Input::live(publish_raw(0x38, t, None, b"dup at qos 0")),
    ];
    reserved_flags.push(Input::scanning(connect_raw(4, 0x03, 1, id, None))); // reserved bit 0
    reserved_flags.push(Input::scanning({
        let mut c = good_connect.clone();
        c[0] = 0x11;
        c
    }));
    classes.push(Class {
        id: 2,
        name: "server-to-client types, reserved types 0 and 15, reserved flag bits",
        inputs: reserved_flags,
    });

    let mut nonminimal = vec![0x30, 0x80 | 9, 0x00]; // 9 encoded on two bytes
    nonminimal.extend_from_slice(&good_publish[2..]);
    let mut mismatch = vec![0x30, 0x0A, 0x00, 0xC8]; // 10 bytes, topic "length 200"
    mismatch.extend_from_slice(&[b'a'; 8]);
    let mut huge_connect = vec![0x10, 0xFF, 0xFF, 0xFF, 0x7F];
    huge_connect.extend(noise(4096, 1));
    let mut huge_publish = vec![0x30, 0xFF, 0xFF, 0xFF, 0x7F];
    huge_publish.extend(noise(65536, 2));
    classes.push(Class {
        id: 3,
        name: "remaining length: 5 bytes, non-minimal, body mismatch, huge before CONNECT",
        inputs: vec![
            Input::scanning(vec![0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),
            Input::live(vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            Input::scanning({
                let mut c = vec![0x10, 0x80 | (good_connect.len() as u8 - 2), 0x00];
                c.extend_from_slice(&good_connect[2..]);
                c
            }),
            Input::live(nonminimal),
            Input::live(mismatch),
            Input::scanning(huge_connect),
            Input::live(huge_publish),
        ],
    });

    // Every field of a CONNECT and of a QoS 1 PUBLISH cut short.
    let full_connect = connect_raw(4, 0x02, 1, id, None);
    let full_publish = publish_raw(0x32, t, Some(7), b"{\"cut\":true}");
    let mut cuts: Vec<Input> = (1..full_connect.len())
        .map(|n| Input::scanning(full_connect[..n].to_vec()))
        .collect();
    cuts.extend(publish_cuts(&full_publish, t.len()));
    classes.push(Class {
        id: 4,
        name: "truncation at every field",
        inputs: cuts,
    });

    let bad_strings: [&[u8]; 5] = [
        b"\xC3\x28",     // invalid UTF-8
        b"\xED\xA0\x80", // a surrogate (U+D800) encoded in UTF-8
        b"vm-evil\x00",  // NUL
        b"vm-\x01evil",  // control character
        b"\xFF\xFE\xFD", // not UTF-8 at all
    ];
    let mut strings = Vec::new();
    for s in bad_strings {
        strings.push(Input::scanning(connect_raw(4, 0x02, 1, s, None)));
        let mut topic = t.to_vec();
        topic.extend_from_slice(s);
        strings.push(Input::live(publish_raw(0x30, &topic, None, b"{}")));
        strings.push(Input::live(subscribe_raw(0x82, 3, &topic, 0)));
    }
    classes.push(Class {
        id: 5,
        name: "invalid UTF-8, surrogates, NUL, control characters in client id and topics",
        inputs: strings,
    });

    let long = vec![b'a'; 65535];
    let mut topics_class: Vec<Input> = [
        &b""[..],
        b"system/+/x",
        b"#",
        b"system/events/error/notification#",
        b"a+/b",
        b"$SYS/broker/uptime",
        &long,
    ]
    .iter()
    .map(|topic| Input::live(publish_raw(0x30, topic, None, b"{}")))
    .collect();
    for f in [
        &b""[..],
        b"a/#/b",
        b"a+/b",
        b"$SYS/#",
        b"#",
        b"+/+/+/+",
        &long,
    ] {
        topics_class.push(Input::live(subscribe_raw(0x82, 4, f, 0)));
    }
    classes.push(Class {
        id: 6,
        name: "empty topics, wildcards in PUBLISH, misplaced + and #, over-long, $ topics",
        inputs: topics_class,
    });

    classes.push(Class {
        id: 7,
        name: "QoS 3, packet id 0 with QoS > 0",
        inputs: vec![
            Input::live(publish_raw(0x36, t, Some(5), b"{}")),
            Input::live(publish_raw(0x32, t, Some(0), b"{}")),
            Input::live(publish_raw(0x34, t, Some(0), b"{}")),
            Input::live(subscribe_raw(0x82, 5, t, 3)),
            Input::live(subscribe_raw(0x82, 0, t, 1)),
        ],
    });

    classes.push(Class {
        id: 8,
        name: "unsolicited or out-of-order PUBACK, PUBREC, PUBREL, PUBCOMP",
        inputs: vec![
            Input::live(ack(0x40, 7)),
            Input::live(ack(0x50, 8)),
            Input::live(ack(0x62, 9)),
            Input::live(ack(0x70, 10)),
            Input::live({
                // QoS 2 publish, then PUBCOMP before PUBREL, then PUBREL twice.
                let mut b = publish_raw(0x34, t, Some(11), b"{}");
                b.extend(ack(0x70, 11));
                b.extend(ack(0x62, 11));
                b.extend(ack(0x62, 11));
                b
            }),
        ],
    });

    let (qos1, qos2) = unacknowledged(t);
    classes.push(Class {
        id: 9,
        name: "in-flight overflow: 2000 QoS 1, then 2000 QoS 2 publishes unacknowledged",
        inputs: vec![Input::live(qos1), Input::live(qos2)],
    });

    // MQTT 5: properties on CONNECT (session expiry, receive maximum 0: a protocol error, a big
    // user property) and a lying properties length.
    let mut props = vec![0x11, 0, 0, 0x0E, 0x10, 0x21, 0, 0, 0x26];
    string(&[b'k'; 300], &mut props);
    string(&[b'v'; 3000], &mut props);
    classes.push(Class {
        id: 10,
        name: "MQTT 5 CONNECT and properties",
        inputs: vec![
            Input::scanning(connect_raw(5, 0x02, 1, id, Some(&props))),
            Input::scanning(connect_raw(5, 0x02, 1, id, Some(&[0x11, 0, 0, 0, 5]))),
            Input::scanning({
                let mut c = connect_raw(5, 0x02, 1, id, Some(&[]));
                c[12] = 0x7F; // properties length far beyond the packet
                c
            }),
        ],
    });

    let flood = kib_flood(t);
    classes.push(Class {
        id: 11,
        name: "slow writer, idle session, payload flood (2 MiB of 1 KiB publishes)",
        inputs: vec![
            Input {
                pace: Some(Duration::from_millis(20)),
                ..Input::scanning(full_connect.clone())
            },
            Input::live(Vec::new()), // connected, then silent until the next input
            Input::live(flood),
        ],
    });

    classes.push(Class {
        id: 12,
        name: "a guest that vanishes mid-write",
        inputs: vec![
            Input {
                vanish: true,
                ..Input::live(full_publish[..full_publish.len() / 2].to_vec())
            },
            Input {
                vanish: true,
                ..Input::scanning(full_connect[..full_connect.len() / 2].to_vec())
            },
        ],
    });
    classes
}
