//! What a compromised Dom0 writes to an agent, class by class.

use std::time::Duration;

use topics::topic::Command;
use topics::vm::VmId;

use super::{Class, Input, kib_flood, noise, publish_cuts, unacknowledged};
use crate::raw::{self, ack, publish_raw, subscribe_raw};

/// What a compromised Dom0 writes to an agent, class by class (`vm` is the agent's VM). `live`
/// inputs follow a `CONNACK 0`; the others come instead of it.
pub fn toward_agent(vm: &str) -> Vec<Class> {
    let me = VmId::parse(vm).expect("vm id");
    let response = Command::ListDisks.response_topic(&me);
    let t = response.as_bytes();
    let connack = vec![0x20, 0x02, 0x00, 0x00];
    let full_publish = publish_raw(0x32, t, Some(7), b"{\"status\":\"ok\",\"disks\":[]}");
    let mut classes = Vec::new();

    classes.push(Class {
        id: 1,
        name: "non-CONNACK first packet; second CONNACK",
        inputs: vec![
            Input::scanning(publish_raw(0x30, t, None, b"{}")),
            Input::scanning(vec![0x90, 0x03, 0x00, 0x01, 0x00]),
            Input::scanning(vec![0xD0, 0x00]),
            Input::live(connack.clone()),
            Input::live(vec![0x20, 0x02, 0x00, 0x05]),
        ],
    });

    classes.push(Class {
        id: 2,
        name: "client-to-server types, reserved types 0 and 15, reserved flag bits",
        inputs: vec![
            Input::live(raw::connect("dom0", 5)),
            Input::live(subscribe_raw(0x82, 1, b"#", 0)),
            Input::live(vec![0xA2, 0x05, 0x00, 0x01, 0x00, 0x01, b'#']),
            Input::live(raw::PINGREQ.to_vec()),
            Input::live(vec![0x00, 0x00]),
            Input::live(vec![0xF0, 0x00]),
            Input::live(vec![0xD1, 0x00]),
            Input::live(publish_raw(0x38, t, None, b"{}")),
            Input::scanning(vec![0x21, 0x02, 0x00, 0x00]),
        ],
    });

    let mut nonminimal = vec![0x30, 0x80 | 9, 0x00];
    let small = publish_raw(0x30, b"a/b", None, b"{\"x\":1}");
    nonminimal.extend_from_slice(&small[2..]);
    let mut huge = vec![0x30, 0xFF, 0xFF, 0xFF, 0x7F];
    huge.extend(noise(65536, 3));
    classes.push(Class {
        id: 3,
        name: "remaining length: 5 bytes, non-minimal, body mismatch, huge",
        inputs: vec![
            Input::scanning(vec![0x20, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),
            Input::live(vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            Input::live(nonminimal),
            Input::live(vec![0x30, 0x04, 0x00, 0xC8, b'a', b'b']),
            Input::live(huge),
        ],
    });

    let mut cuts: Vec<Input> = (1..connack.len())
        .map(|n| Input::scanning(connack[..n].to_vec()))
        .collect();
    cuts.extend(publish_cuts(&full_publish, t.len()));
    classes.push(Class {
        id: 4,
        name: "truncation at every field",
        inputs: cuts,
    });

    let bad: [&[u8]; 4] = [b"\xC3\x28", b"\xED\xA0\x80", b"\x00", b"\x01"];
    classes.push(Class {
        id: 5,
        name: "invalid UTF-8, surrogates, NUL, control characters in topics",
        inputs: bad
            .iter()
            .map(|b| {
                let mut topic = t.to_vec();
                topic.extend_from_slice(b);
                Input::live(publish_raw(0x30, &topic, None, b"{}"))
            })
            .collect(),
    });

    let long = vec![b'a'; 65535];
    classes.push(Class {
        id: 6,
        name: "empty topics, wildcards in PUBLISH, over-long, $ topics, topics never subscribed",
        inputs: [
            &b""[..],
            b"system/+/x",
            b"#",
            b"$SYS/x",
            &long,
            b"app/other/x",
        ]
        .iter()
        .map(|topic| Input::live(publish_raw(0x30, topic, None, b"{}")))
        .collect(),
    });

    classes.push(Class {
        id: 7,
        name: "QoS 3, packet id 0 with QoS > 0",
        inputs: vec![
            Input::live(publish_raw(0x36, t, Some(5), b"{}")),
            Input::live(publish_raw(0x32, t, Some(0), b"{}")),
            Input::live(publish_raw(0x34, t, Some(0), b"{}")),
        ],
    });

    classes.push(Class {
        id: 8,
        name: "unsolicited PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK",
        inputs: vec![
            Input::live(ack(0x40, 7)),
            Input::live(ack(0x50, 8)),
            Input::live(ack(0x62, 9)),
            Input::live(ack(0x70, 10)),
            Input::live(vec![0x90, 0x03, 0x00, 0x33, 0x01]),
            Input::live(ack(0xB0, 11)),
        ],
    });

    let (qos1, qos2) = unacknowledged(t);
    classes.push(Class {
        id: 9,
        name: "2000 QoS 1, then 2000 QoS 2 publishes toward the agent",
        inputs: vec![Input::live(qos1), Input::live(qos2)],
    });

    let props = vec![0x20, 0x08, 0x00, 0x00, 0x05, 0x21, 0x00, 0x0A, 0x22, 0x00];
    classes.push(Class {
        id: 10,
        name: "MQTT 5 CONNACK with properties",
        inputs: vec![
            Input::scanning(props),
            Input::scanning(vec![0x20, 0x03, 0x00, 0x00, 0x00]),
        ],
    });

    let flood = kib_flood(t);
    classes.push(Class {
        id: 11,
        name: "slow CONNACK, no CONNACK at all, payload flood (2 MiB of 1 KiB publishes)",
        inputs: vec![
            Input {
                pace: Some(Duration::from_millis(20)),
                ..Input::scanning(connack.clone())
            },
            Input::scanning(Vec::new()),
            Input::live(flood),
        ],
    });

    classes.push(Class {
        id: 12,
        name: "a Dom0 that vanishes mid-write",
        inputs: vec![
            Input {
                vanish: true,
                ..Input::live(full_publish[..full_publish.len() / 2].to_vec())
            },
            Input {
                vanish: true,
                ..Input::scanning(connack[..2].to_vec())
            },
        ],
    });
    classes
}
