//! Table tests of a local client's connection: bytes from the client and explicit time in.

use super::*;
use rumqttc::mqttbytes::v4::{LastWill, Subscribe, Unsubscribe};

fn limits() -> LocalLimits {
    LocalLimits {
        max_packet: 4096,
        max_output: 8192,
    }
}

fn encoded(p: Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    p.write(&mut out, usize::MAX).unwrap();
    out.to_vec()
}

fn connect(id: &str, keep_alive: u16) -> Vec<u8> {
    let mut c = Connect::new(id);
    c.keep_alive = keep_alive;
    encoded(Packet::Connect(c))
}

fn sent(s: &mut LocalSession) -> Vec<Packet> {
    let mut out = s.take_output();
    let mut v = Vec::new();
    while !out.is_empty() {
        v.push(Packet::read(&mut out, usize::MAX).unwrap());
    }
    v
}

fn live() -> (LocalSession, Instant) {
    let now = Instant::now();
    let mut s = LocalSession::new(limits(), now);
    let ev = s.on_input(&connect("app", 10), now).unwrap();
    assert_eq!(
        ev,
        vec![LocalEvent::Connect {
            client_id: "app".into()
        }]
    );
    assert!(s.accept(now).unwrap().is_empty());
    assert_eq!(
        sent(&mut s),
        vec![Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false
        ))]
    );
    (s, now)
}

#[test]
fn what_a_client_asks_is_reported() {
    let (mut s, now) = live();
    let mut p = Publish::new("app/x", QoS::AtLeastOnce, "hi");
    p.pkid = 5;
    p.retain = true;
    let mut sub = Subscribe::new("app/#", QoS::AtLeastOnce);
    sub.pkid = 6;
    let mut unsub = Unsubscribe::new("app/#");
    unsub.pkid = 7;
    let mut input = encoded(Packet::Publish(p));
    input.extend(encoded(Packet::Subscribe(sub)));
    input.extend(encoded(Packet::Unsubscribe(unsub)));
    input.extend(encoded(Packet::PingReq));
    assert_eq!(
        s.on_input(&input, now).unwrap(),
        vec![
            LocalEvent::Publish {
                publication: Publication {
                    topic: "app/x".into(),
                    payload: Bytes::from_static(b"hi"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                },
                pkid: Some(5)
            },
            LocalEvent::Subscribe {
                pkid: 6,
                filters: vec![("app/#".into(), QoS::AtLeastOnce)]
            },
            LocalEvent::Unsubscribe {
                pkid: 7,
                filters: vec!["app/#".into()]
            },
        ]
    );
    assert_eq!(
        sent(&mut s),
        vec![Packet::PingResp],
        "pings are answered locally"
    );
    s.acked(5);
    s.suback(6, &[None]);
    s.unsuback(7);
    assert_eq!(
        sent(&mut s),
        vec![
            Packet::PubAck(PubAck::new(5)),
            Packet::SubAck(SubAck::new(6, vec![SubscribeReasonCode::Failure])),
            Packet::UnsubAck(UnsubAck::new(7)),
        ]
    );
}

#[test]
fn packets_after_the_connect_wait_for_the_decision() {
    let now = Instant::now();
    let mut s = LocalSession::new(limits(), now);
    let mut input = connect("a", 0);
    input.extend(encoded(Packet::Publish(Publish::new(
        "app/x",
        QoS::AtMostOnce,
        "1",
    ))));
    assert_eq!(s.on_input(&input, now).unwrap().len(), 1);
    let ev = s.accept(now).unwrap();
    assert!(
        matches!(&ev[..], [LocalEvent::Publish { publication, .. }] if publication.topic == "app/x")
    );
}

#[test]
fn other_protocol_levels_are_answered_and_closed() {
    // MQTT 5 (level 5, with properties) and MQTT 3.1 (MQIsdp, level 3).
    let v5: &[u8] = b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03app";
    let v31: &[u8] = b"\x10\x11\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x03app";
    for input in [v5, v31] {
        let now = Instant::now();
        let mut s = LocalSession::new(limits(), now);
        let closed = s.on_input(input, now).unwrap_err();
        assert!(
            closed.reason.to_string().contains("protocol level"),
            "{closed:?}"
        );
        assert_eq!(
            sent(&mut s),
            vec![Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::RefusedProtocolVersion,
                false
            ))]
        );
    }
}

#[test]
fn bad_bytes_close_this_connection() {
    let rows: [(&[u8], &str); 4] = [
        (b"\x30\x05\x00\x01a", "first packet is not a CONNECT"),
        (b"GET / HTTP/1.1\r\n", "first packet is not a CONNECT"),
        (b"\x10\xff\xff\xff\x7f", "unreadable packet"),
        (
            b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x00\x00\x00",
            "second CONNECT",
        ),
    ];
    for (input, reason) in rows {
        let now = Instant::now();
        let mut s = LocalSession::new(limits(), now);
        let r = s.on_input(input, now);
        let r = match r {
            Ok(ev) if !ev.is_empty() => s
                .accept(now)
                .and_then(|_| s.on_input(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x00\x00\x00", now)),
            other => other,
        };
        let closed = r.unwrap_err();
        assert!(
            closed.reason.to_string().contains(reason),
            "{input:x?}: {closed:?}"
        );
    }
    let (mut s, now) = live();
    let closed = s.on_input(b"\x20\x02\x00\x00", now).unwrap_err();
    assert!(closed.reason.to_string().contains("CONNACK"), "{closed:?}");
    let (mut s, now) = live();
    let big = vec![0u8; 5000];
    let mut p = encoded(Packet::Publish(Publish::new("app/x", QoS::AtMostOnce, big)));
    p.truncate(10);
    assert!(
        s.on_input(&p, now)
            .unwrap_err()
            .reason
            .to_string()
            .contains("unreadable")
    );
}

#[test]
fn the_will_goes_out_unless_the_client_disconnects() {
    let will_connect = || {
        let mut c = Connect::new("w");
        c.keep_alive = 2;
        c.last_will = Some(LastWill::new(
            "app/w/status",
            "gone",
            QoS::AtLeastOnce,
            true,
        ));
        encoded(Packet::Connect(c))
    };
    let now = Instant::now();
    let mut s = LocalSession::new(limits(), now);
    s.on_input(&will_connect(), now).unwrap();
    s.accept(now).unwrap();
    assert_eq!(s.next_deadline(), Some(now + Duration::from_secs(3)));
    assert!(s.on_tick(now + Duration::from_millis(2999)).is_ok());
    let closed = s.on_tick(now + Duration::from_secs(3)).unwrap_err();
    assert!(closed.reason.to_string().contains("keepalive"));
    assert_eq!(
        closed.will,
        Some(Will {
            topic: "app/w/status".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: true
        })
    );
    let mut s = LocalSession::new(limits(), now);
    s.on_input(&will_connect(), now).unwrap();
    s.accept(now).unwrap();
    let closed = s.on_input(&encoded(Packet::Disconnect), now).unwrap_err();
    assert_eq!(closed.will, None);
}

#[test]
fn no_connect_in_time_closes() {
    let now = Instant::now();
    let mut s = LocalSession::new(limits(), now);
    assert_eq!(s.next_deadline(), Some(now + CONNECT_TIMEOUT));
    assert!(s.on_tick(now + CONNECT_TIMEOUT).is_err());
}

#[test]
fn qos2_publishes_complete_their_handshake_once() {
    let (mut s, now) = live();
    let mut p = Publish::new("app/x", QoS::ExactlyOnce, "2");
    p.pkid = 9;
    let ev = s
        .on_input(&encoded(Packet::Publish(p.clone())), now)
        .unwrap();
    assert_eq!(ev.len(), 1);
    p.dup = true;
    assert!(
        s.on_input(&encoded(Packet::Publish(p)), now)
            .unwrap()
            .is_empty(),
        "a DUP is not sent again"
    );
    s.acked(9);
    s.on_input(
        &encoded(Packet::PubRel(rumqttc::mqttbytes::v4::PubRel::new(9))),
        now,
    )
    .unwrap();
    assert_eq!(
        sent(&mut s),
        vec![
            Packet::PubRec(PubRec::new(9)),
            Packet::PubComp(PubComp::new(9))
        ]
    );
}

#[test]
fn invalid_topics_are_acknowledged_and_dropped() {
    let (mut s, now) = live();
    for (i, t) in ["$SYS/x", "a/+/b", "a//b"].iter().enumerate() {
        let mut p = Publish::new(*t, QoS::AtLeastOnce, "x");
        p.pkid = i as u16 + 1;
        assert!(
            s.on_input(&encoded(Packet::Publish(p)), now)
                .unwrap()
                .is_empty(),
            "{t}"
        );
    }
    assert_eq!(sent(&mut s).len(), 3);
}

#[test]
fn a_client_that_does_not_read_is_closed() {
    let (mut s, _) = live();
    let mut result = Ok(());
    for _ in 0..100 {
        result = s.deliver(
            "app/x".into(),
            Bytes::from(vec![0u8; 1000]),
            QoS::AtLeastOnce,
            false,
        );
        if result.is_err() {
            break;
        }
    }
    assert!(
        result
            .unwrap_err()
            .reason
            .to_string()
            .contains("does not read")
    );
}

#[test]
fn deliveries_carry_their_own_packet_ids() {
    let (mut s, _) = live();
    s.deliver("a".into(), Bytes::new(), QoS::AtLeastOnce, true)
        .unwrap();
    s.deliver("b".into(), Bytes::new(), QoS::AtMostOnce, false)
        .unwrap();
    s.deliver("c".into(), Bytes::new(), QoS::AtLeastOnce, false)
        .unwrap();
    let ids: Vec<(u16, bool)> = sent(&mut s)
        .into_iter()
        .map(|p| match p {
            Packet::Publish(p) => (p.pkid, p.retain),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, [(1, true), (0, false), (2, false)]);
}

/// Found by a new user: `mosquitto_pub` at QoS 0 sends CONNECT, PUBLISH and DISCONNECT at once,
/// and 5 of 8 publishes were lost (the DISCONNECT ended the connection before the PUBLISH parsed
/// with it was carried out). Every QoS, in one read, and split at every byte.
#[test]
fn a_last_publish_and_its_disconnect_in_one_read_are_both_carried_out() {
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let mut p = Publish::new("app/x", qos, "last words");
        if qos != QoS::AtMostOnce {
            p.pkid = 1;
        }
        let mut input = connect("pub", 60);
        input.extend(encoded(Packet::Publish(p)));
        input.extend(encoded(Packet::Disconnect));
        for split in [None, Some(1)] {
            let now = Instant::now();
            let mut s = LocalSession::new(limits(), now);
            let chunks: Vec<&[u8]> = match split {
                None => vec![&input[..]],
                Some(n) => input.chunks(n).collect(),
            };
            let mut published = Vec::new();
            let mut closed = None;
            for chunk in chunks {
                let mut events = match s.on_input(chunk, now) {
                    Ok(ev) => ev,
                    Err(c) => {
                        closed = Some(c);
                        break;
                    }
                };
                while let Some(ev) = events.pop() {
                    match ev {
                        LocalEvent::Connect { .. } => match s.accept(now) {
                            Ok(more) => events.extend(more),
                            Err(c) => closed = Some(c),
                        },
                        LocalEvent::Publish { publication, .. } => {
                            published.push(publication.topic)
                        }
                        _ => {}
                    }
                }
                if let Some(c) = s.take_closed() {
                    closed = Some(c);
                    break;
                }
            }
            assert_eq!(published, ["app/x"], "{qos:?} split {split:?}");
            let closed = closed.expect("the DISCONNECT ends the connection");
            assert_eq!(closed.reason, CloseReason::Disconnected);
            assert!(closed.will.is_none());
        }
    }
}
