//! Table tests of the agent's session: bytes from "Dom0" and explicit time in, bytes and events out.
//! No tty, no runtime, no wall-clock time.

use super::*;

const KEEPALIVE: Duration = Duration::from_secs(5);

fn session() -> (Session, Instant) {
    let cfg = SessionConfig {
        vm: VmId::parse("vm-gui").unwrap(),
        keepalive: KEEPALIVE,
        max_packet: 64 * 1024,
    };
    let now = Instant::now();
    (Session::new(cfg, now), now)
}

/// Every packet in the session's output.
fn sent(s: &mut Session) -> Vec<Packet> {
    let mut out = s.take_output();
    let mut packets = Vec::new();
    while !out.is_empty() {
        packets.push(Packet::read(&mut out, usize::MAX).unwrap());
    }
    packets
}

fn encoded(p: Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    p.write(&mut out, usize::MAX).unwrap();
    out.to_vec()
}

const CONNACK: &[u8] = b"\x20\x02\x00\x00";
const DISCONNECT: &[u8] = b"\xe0\x00";
const PINGRESP: &[u8] = b"\xd0\x00";

fn is_connect(p: &Packet) -> bool {
    matches!(p, Packet::Connect(c) if c.client_id == "vm-gui" && c.keep_alive == 5)
}

/// A session that is up, its output drained.
fn live(subscriptions: &[&str]) -> (Session, Instant) {
    let (mut s, t0) = session();
    for f in subscriptions {
        s.subscribe((*f).to_owned(), QoS::AtLeastOnce);
    }
    assert!(s.open(t0).is_empty());
    assert!(is_connect(&sent(&mut s)[0]));
    assert_eq!(s.on_input(CONNACK, t0), vec![Event::Up]);
    let _ = sent(&mut s);
    (s, t0)
}

fn subscribed_filters(p: &[Packet]) -> Vec<String> {
    p.iter()
        .filter_map(|p| match p {
            Packet::Subscribe(s) => Some(s.filters.iter().map(|f| f.path.clone())),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn connack_is_found_after_stale_bytes() {
    let rows: [(&[u8], Option<(usize, u8)>); 6] = [
        (b"\x20\x02\x00\x00", Some((0, 0))),
        (b"\xe0\x00\x30\x03\x00\x01a\x20\x02\x01\x00", Some((7, 0))),
        (b"\x20\x02\x00\x02", Some((0, 2))),
        (b"\x20\x02\x02\x00", None), // reserved flag bits
        (b"\x20\x02\x00\x09", None), // unknown return code
        (b"\x20\x02\x00", None),
    ];
    for (input, expected) in rows {
        assert_eq!(find_connack(input), expected, "{input:x?}");
    }
}

#[test]
fn garbage_then_connack_brings_the_session_up() {
    let (mut s, t0) = session();
    s.subscribe("system/+/+/response/vm-gui".into(), QoS::AtLeastOnce);
    s.open(t0);
    assert!(is_connect(&sent(&mut s)[0]));
    // Stale bytes of an old session, Dom0's attach DISCONNECT, a CONNACK cut in two.
    let rows: [(&[u8], Vec<Event>); 4] = [
        (b"\x30\x0b\x00\x03a/b", vec![]),
        (b"hello\xe0\x00", vec![]),
        (b"\x20\x02", vec![]),
        (b"\x00\x00", vec![Event::Up]),
    ];
    for (input, expected) in rows {
        assert_eq!(s.on_input(input, t0), expected, "after {input:x?}");
    }
    assert!(s.is_live());
    assert_eq!(
        subscribed_filters(&sent(&mut s)),
        ["system/+/+/response/vm-gui"]
    );
}

#[test]
fn bytes_after_the_connack_are_processed() {
    let (mut s, t0) = session();
    s.open(t0);
    let _ = sent(&mut s);
    let mut input = CONNACK.to_vec();
    input.extend(encoded(Packet::Publish(Publish::new(
        "a/b",
        QoS::AtMostOnce,
        "x",
    ))));
    let events = s.on_input(&input, t0);
    assert_eq!(events.len(), 2);
    assert_eq!(events[0], Event::Up);
    assert!(matches!(&events[1], Event::Message { topic, .. } if topic == "a/b"));
}

#[test]
fn refused_connack_retries_after_a_backoff() {
    let (mut s, t0) = session();
    s.open(t0);
    let _ = sent(&mut s);
    assert!(s.on_input(b"\x20\x02\x00\x05", t0).is_empty());
    assert!(!s.is_live());
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_millis(100)));
    assert!(sent(&mut s).is_empty());
    s.on_tick(t0 + Duration::from_millis(100));
    assert!(is_connect(&sent(&mut s)[0]));
}

#[test]
fn no_connack_means_connect_again_with_growing_delays() {
    let (mut s, t0) = session();
    s.open(t0);
    let _ = sent(&mut s);
    let mut t = t0;
    for delay_ms in [100, 200, 400] {
        t += CONNACK_TIMEOUT;
        assert_eq!(s.next_deadline(), Some(t));
        s.on_tick(t);
        assert!(sent(&mut s).is_empty(), "nothing during the backoff");
        t += Duration::from_millis(delay_ms);
        assert_eq!(s.next_deadline(), Some(t));
        s.on_tick(t);
        assert!(is_connect(&sent(&mut s)[0]));
    }
    // A CONNACK resets the backoff.
    s.on_input(CONNACK, t);
    assert!(s.is_live());
    s.on_input(DISCONNECT, t);
    s.on_tick(t + CONNACK_TIMEOUT);
    assert_eq!(
        s.next_deadline(),
        Some(t + CONNACK_TIMEOUT + Duration::from_millis(100))
    );
}

#[test]
fn disconnect_from_dom0_means_a_new_connect_at_once() {
    let (mut s, t0) = live(&[]);
    assert_eq!(s.on_input(DISCONNECT, t0), vec![Event::Down]);
    assert!(!s.is_live());
    let out = sent(&mut s);
    assert_eq!(out.len(), 1);
    assert!(is_connect(&out[0]));
    assert_eq!(s.on_input(CONNACK, t0), vec![Event::Up]);
}

#[test]
fn missing_pingresp_means_reconnect() {
    let (mut s, t0) = live(&[]);
    // Silence for a keepalive: a PINGREQ.
    assert_eq!(s.next_deadline(), Some(t0 + KEEPALIVE));
    s.on_tick(t0 + KEEPALIVE - Duration::from_millis(1));
    assert!(sent(&mut s).is_empty(), "not before the keepalive");
    s.on_tick(t0 + KEEPALIVE);
    assert_eq!(sent(&mut s), vec![Packet::PingReq]);
    // Answered: the next one a keepalive later.
    s.on_input(PINGRESP, t0 + KEEPALIVE);
    s.on_tick(t0 + KEEPALIVE * 2);
    assert_eq!(sent(&mut s), vec![Packet::PingReq]);
    // Not answered within a keepalive: the session is dead.
    assert_eq!(s.next_deadline(), Some(t0 + KEEPALIVE * 3));
    assert_eq!(s.on_tick(t0 + KEEPALIVE * 3), vec![Event::Down]);
    assert!(!s.is_live());
    assert!(sent(&mut s).is_empty());
    let retry = t0 + KEEPALIVE * 3 + Duration::from_millis(100);
    assert_eq!(s.next_deadline(), Some(retry));
    s.on_tick(retry);
    assert!(is_connect(&sent(&mut s)[0]));
}

#[test]
fn traffic_postpones_the_keepalive_ping() {
    let (mut s, t0) = live(&[]);
    let t1 = t0 + Duration::from_secs(3);
    s.publish(
        Publication {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: false,
        },
        t1,
    )
    .unwrap();
    let _ = sent(&mut s);
    assert_eq!(s.next_deadline(), Some(t1 + KEEPALIVE));
}

#[test]
fn qos1_is_resent_with_dup_after_a_reconnect_and_subscriptions_renewed() {
    let (mut s, t0) = live(&["system/+/+/response/vm-gui", "app/#"]);
    let id = s
        .publish(
            Publication::at_least_once(
                "system/disks/list_disks/request".into(),
                Bytes::from_static(b"request-1"),
            ),
            t0,
        )
        .unwrap()
        .unwrap();
    let first = sent(&mut s);
    assert!(matches!(&first[..], [Packet::Publish(p)] if !p.dup && p.pkid == id));
    // Dom0 says start over before acknowledging it.
    s.on_input(DISCONNECT, t0);
    let _ = sent(&mut s);
    s.on_input(CONNACK, t0);
    let again = sent(&mut s);
    assert_eq!(
        subscribed_filters(&again),
        ["app/#", "system/+/+/response/vm-gui"],
        "SUBSCRIBE renewed on the second CONNACK"
    );
    let resent: Vec<&Publish> = again
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(resent.len(), 1);
    assert!(resent[0].dup && resent[0].pkid == id && resent[0].qos == QoS::AtLeastOnce);
    assert_eq!(&resent[0].payload[..], b"request-1");
    // Acknowledged now: never sent again.
    assert_eq!(
        s.on_input(&encoded(Packet::PubAck(PubAck::new(id))), t0),
        vec![Event::Acked(id)]
    );
    s.on_input(DISCONNECT, t0);
    let _ = sent(&mut s);
    s.on_input(CONNACK, t0);
    assert!(!sent(&mut s).iter().any(|p| matches!(p, Packet::Publish(_))));
}

#[test]
fn qos1_taken_while_down_goes_out_after_the_connack_without_dup() {
    let (mut s, t0) = session();
    s.open(t0);
    let _ = sent(&mut s);
    assert_eq!(
        s.publish(
            Publication {
                topic: "a/b".into(),
                payload: Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: false
            },
            t0
        ),
        Err(PublishError::NotConnected)
    );
    let id = s
        .publish(
            Publication {
                topic: "a/b".into(),
                payload: Bytes::from_static(b"q"),
                qos: QoS::AtLeastOnce,
                retain: true,
            },
            t0,
        )
        .unwrap()
        .unwrap();
    assert!(sent(&mut s).is_empty(), "nothing before the CONNACK");
    s.on_input(CONNACK, t0);
    let out = sent(&mut s);
    assert!(
        matches!(&out[..], [Packet::Publish(p)] if !p.dup && p.retain && p.pkid == id),
        "{out:?}"
    );
}

#[test]
fn publishes_from_dom0_are_delivered_and_acknowledged() {
    let (mut s, t0) = live(&[]);
    let mut p = Publish::new("system/disks/list_disks/request", QoS::AtLeastOnce, "{}");
    p.pkid = 7;
    let events = s.on_input(&encoded(Packet::Publish(p)), t0);
    assert_eq!(
        events,
        vec![Event::Message {
            topic: "system/disks/list_disks/request".into(),
            payload: Bytes::from_static(b"{}"),
            qos: QoS::AtLeastOnce,
            retain: false,
        }]
    );
    assert_eq!(sent(&mut s), vec![Packet::PubAck(PubAck::new(7))]);
}

#[test]
fn subscriptions_refused_by_dom0_are_reported_per_filter() {
    let (mut s, t0) = live(&[]);
    s.subscribe("app/x".into(), QoS::AtLeastOnce);
    let Packet::Subscribe(sub) = &sent(&mut s)[0] else {
        panic!("no SUBSCRIBE")
    };
    let suback = rumqttc::mqttbytes::v4::SubAck::new(sub.pkid, vec![SubscribeReasonCode::Failure]);
    assert_eq!(
        s.on_input(&encoded(Packet::SubAck(suback)), t0),
        vec![Event::SubAcked(vec![("app/x".into(), None)])]
    );
    s.unsubscribe("app/x");
    assert!(matches!(&sent(&mut s)[..], [Packet::Unsubscribe(u)] if u.topics == ["app/x"]));
    // Not renewed any more.
    s.on_input(DISCONNECT, t0);
    let _ = sent(&mut s);
    s.on_input(CONNACK, t0);
    assert!(subscribed_filters(&sent(&mut s)).is_empty());
}

#[test]
fn unreadable_or_oversized_bytes_mean_a_new_connect() {
    let rows: [&[u8]; 3] = [
        b"\x30\xff\xff\xff\xff\x01", // remaining length of 5 bytes
        b"\x30\xff\xff\xff\x7f",     // 256 MiB declared, above max_packet
        b"\x00\x00",                 // reserved type 0
    ];
    for input in rows {
        let (mut s, t0) = live(&[]);
        assert_eq!(s.on_input(input, t0), vec![Event::Down], "{input:x?}");
        assert!(is_connect(&sent(&mut s)[0]), "{input:x?}");
    }
}

#[test]
fn probes_report_their_round_trip() {
    let (mut s, t0) = live(&[]);
    assert!(s.ping(1, t0));
    assert_eq!(sent(&mut s), vec![Packet::PingReq]);
    let rtt = Duration::from_micros(250);
    assert_eq!(
        s.on_input(PINGRESP, t0 + rtt),
        vec![Event::Pong { probe: 1, rtt }]
    );
    let (mut down, t0) = session();
    assert!(!down.ping(1, t0), "no probe without a session");
}

#[test]
fn the_in_flight_window_is_bounded() {
    let (mut s, t0) = live(&[]);
    for _ in 0..MAX_INFLIGHT {
        s.publish(Publication::at_least_once("a/b".into(), Bytes::new()), t0)
            .unwrap();
    }
    assert!(!s.accepts_publish());
    assert_eq!(
        s.publish(Publication::at_least_once("a/b".into(), Bytes::new()), t0),
        Err(PublishError::Full)
    );
    let big = Bytes::from(vec![0u8; 65 * 1024]);
    let (mut s, t0) = live(&[]);
    assert!(matches!(
        s.publish(
            Publication {
                topic: "a/b".into(),
                payload: big,
                qos: QoS::AtMostOnce,
                retain: false
            },
            t0
        ),
        Err(PublishError::TooLarge { .. })
    ));
}

#[test]
fn a_closed_tty_waits_and_keeps_what_is_in_flight() {
    let (mut s, t0) = live(&[]);
    s.publish(
        Publication::at_least_once("a/b".into(), Bytes::from_static(b"m")),
        t0,
    )
    .unwrap();
    let _ = sent(&mut s);
    let (delay, events) = s.closed();
    assert_eq!(events, vec![Event::Down]);
    assert_eq!(delay, Duration::from_millis(100));
    assert_eq!(s.next_deadline(), None);
    assert!(
        s.on_input(CONNACK, t0).is_empty(),
        "nothing is read while closed"
    );
    s.open(t0);
    let _ = sent(&mut s);
    s.on_input(CONNACK, t0);
    assert!(matches!(&sent(&mut s)[..], [Packet::Publish(p)] if p.dup));
}

/// Regression (found by the `agent_session` fuzz target): a CONNECT encoded behind other output (a
/// PUBCOMP for Dom0's PUBREL, then Dom0's DISCONNECT in the same read) had its "MQTT" corrupted by
/// rumqttc's `Connect::write`, so the reconnection waited for the CONNACK timeout.
#[test]
fn connect_behind_other_output_is_well_formed() {
    let (mut s, t0) = live(&[]);
    let mut input = encoded(Packet::PubRel(rumqttc::mqttbytes::v4::PubRel::new(3)));
    input.extend_from_slice(DISCONNECT);
    s.on_input(&input, t0);
    let out = sent(&mut s);
    assert!(matches!(out[0], Packet::PubComp(_)), "{out:?}");
    assert!(is_connect(&out[1]), "{out:?}");
}

#[test]
fn a_frame_from_dom0_stopped_half_way_means_a_new_connect() {
    let (mut s, t0) = live(&[]);
    // Half a PUBLISH (Dom0 died mid-write), then Dom0's attach signal, swallowed as its body.
    let publish = encoded(Packet::Publish(Publish::new(
        "system/disks/list_disks/response/vm-gui",
        QoS::AtMostOnce,
        vec![b'x'; 100],
    )));
    assert!(s.on_input(&publish[..40], t0).is_empty());
    let t1 = t0 + Duration::from_millis(300);
    assert!(s.on_input(DISCONNECT, t1).is_empty());
    // Bytes keep the frame alive; a second without one ends it, well before the keepalive.
    assert_eq!(s.next_deadline(), Some(t1 + FRAME_STALL));
    assert!(
        s.on_tick(t1 + FRAME_STALL - Duration::from_millis(1))
            .is_empty()
    );
    assert_eq!(s.on_tick(t1 + FRAME_STALL), vec![Event::Down]);
    let out = sent(&mut s);
    assert!(is_connect(&out[0]), "{out:?}");
    assert_eq!(s.on_input(CONNACK, t1 + FRAME_STALL), vec![Event::Up]);
    // A whole frame leaves no stall deadline behind.
    assert!(s.on_input(&publish, t1 + FRAME_STALL).len() == 1);
    assert_eq!(s.next_deadline(), Some(t1 + FRAME_STALL + KEEPALIVE));
}

#[test]
fn a_small_publish_goes_before_large_ones_waiting_but_not_before_its_own_topic() {
    let (mut s, t0) = live(&[]);
    let publish = |s: &mut Session, topic: &str, len: usize| {
        s.publish(
            Publication::at_least_once(topic.to_owned(), Bytes::from(vec![b'x'; len])),
            t0,
        )
        .unwrap()
    };
    let topics_of = |packets: Vec<Packet>| -> Vec<(String, usize)> {
        packets
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some((p.topic, p.payload.len())),
                _ => None,
            })
            .collect()
    };
    publish(&mut s, "up/chunk", 20_000);
    publish(&mut s, "up/chunk", 20_000);
    publish(&mut s, "small/a", 10);
    publish(&mut s, "up/chunk", 10);
    assert!(s.has_bulk());
    // The small one first, then one large at a time; the small one on the large ones' topic
    // keeps its place after them.
    assert_eq!(
        topics_of(sent(&mut s)),
        [("small/a".to_owned(), 10), ("up/chunk".to_owned(), 20_000)]
    );
    publish(&mut s, "small/b", 10);
    assert_eq!(
        topics_of(sent(&mut s)),
        [("small/b".to_owned(), 10), ("up/chunk".to_owned(), 20_000)]
    );
    assert_eq!(topics_of(sent(&mut s)), [("up/chunk".to_owned(), 10)]);
    assert!(!s.has_bulk());
}
