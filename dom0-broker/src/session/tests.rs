use super::*;
use crate::mqtt::connack;
use crate::mqtt::{Connect, Publish};
use crate::policy::Policy;

fn limits() -> Limits {
    Limits {
        max_packet: 64 * 1024,
        max_keepalive: Duration::from_secs(60),
        queue_bytes: 4096,
        rate_per_sec: 1000,
        burst: 1000,
        max_inflight: 8,
        violation_limit: 50,
    }
}

fn session_with(limits: Limits) -> (Session, Instant) {
    let vm = VmId::parse("vm-gui").unwrap();
    let rules = Policy::builtin().rules_for(&vm);
    let now = Instant::now();
    (Session::new(vm, limits, rules, now), now)
}

fn session() -> (Session, Instant) {
    session_with(limits())
}

fn connect(id: &str, keep_alive: u16) -> BytesMut {
    let mut out = BytesMut::new();
    mqtt::encode_connect(
        &Connect {
            clean_session: true,
            keep_alive,
            client_id: id.into(),
            will: None,
            username: None,
            password: None,
        },
        &mut out,
    );
    out
}

fn publish(topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    let pkid = (qos > 0).then_some(pkid);
    mqtt::encode_publish(
        &Publish {
            topic,
            qos,
            retain: false,
            dup: false,
            pkid,
            payload,
        },
        &mut out,
    );
    out
}

/// Parses every packet in a buffer: (type, body).
fn packets(buf: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = buf;
    while let Ok(Some(h)) = mqtt::fixed_header(rest, usize::MAX) {
        out.push((h.kind(), rest[h.header_len..h.frame_len()].to_vec()));
        rest = &rest[h.frame_len()..];
    }
    assert!(rest.is_empty(), "trailing bytes {rest:x?}");
    out
}

fn broker_connect(s: &mut Session, now: Instant) -> Connect {
    s.to_guest.clear();
    let effects = s.broker_connected(now);
    assert!(!effects.contains(&Effect::OpenBroker));
    let sent = packets(&s.to_broker);
    assert_eq!(sent[0].0, mqtt::CONNECT);
    let c = mqtt::parse_connect(&sent[0].1).unwrap();
    s.to_broker.clear();
    s.broker_in.extend_from_slice(b"\x20\x02\x00\x00");
    let effects = s.on_broker_input(&[], now);
    assert!(effects.contains(&Effect::State(LinkState::SessionUp, None)));
    assert_eq!(packets(&s.to_guest), vec![(mqtt::CONNACK, vec![0, 0])]);
    s.to_guest.clear();
    c
}

/// Brings a session live: CONNECT from the guest, broker connected, CONNACK relayed.
fn live() -> (Session, Instant) {
    let (mut s, now) = session();
    s.guest_in.extend_from_slice(&connect("vm-gui", 5));
    assert_eq!(s.on_guest_input(&[], now), vec![Effect::OpenBroker]);
    broker_connect(&mut s, now);
    (s, now)
}

#[test]
fn attach_sends_disconnect() {
    let (mut s, now) = session();
    s.attach(now);
    assert_eq!(&s.to_guest[..], &mqtt::DISCONNECT_PACKET);
}

#[test]
fn garbage_and_a_200_mb_header_before_connect_are_skipped() {
    let (mut s, now) = session();
    // A PUBLISH header declaring 200 MB, bytes that contain 0x10 but no CONNECT, a truncated
    // CONNECT-looking prefix, then the real CONNECT.
    s.guest_in
        .extend_from_slice(b"\x30\x80\x80\xe8\x5f\x10\x10\x02\xff\x10\x05\x00\x04MQTX");
    s.guest_in.extend_from_slice(&[0x10; 7]);
    s.guest_in.extend_from_slice(&connect("", 5));
    assert_eq!(s.on_guest_input(&[], now), vec![Effect::OpenBroker]);
    assert!(s.guest_in.is_empty());
    assert_eq!(
        &s.to_guest[..],
        &mqtt::DISCONNECT_PACKET,
        "a guest sending non-CONNECT bytes is told to start over"
    );
    let c = broker_connect(&mut s, now);
    assert_eq!(
        c.client_id, "vm-gui",
        "an empty client id becomes the VM name"
    );
    assert_eq!(c.username.as_deref(), Some("vm-gui"));
    assert_eq!(c.keep_alive, 5);
}

#[test]
fn connect_split_across_reads() {
    let (mut s, now) = session();
    let c = connect("vm-gui", 5);
    for chunk in c.chunks(3) {
        s.guest_in.extend_from_slice(chunk);
        let effects = s.on_guest_input(&[], now);
        if s.guest_in.is_empty() {
            assert_eq!(effects, vec![Effect::OpenBroker]);
        } else {
            assert!(effects.is_empty());
        }
    }
}

#[test]
fn another_vms_client_id_is_refused() {
    let (mut s, now) = session();
    s.guest_in.extend_from_slice(&connect("sys-usb", 5));
    let effects = s.on_guest_input(&[], now);
    assert!(matches!(
        effects.as_slice(),
        [Effect::State(LinkState::IdentityRefused, Some(_))]
    ));
    assert_eq!(
        packets(&s.to_guest),
        vec![(mqtt::CONNACK, vec![0, connack::IDENTIFIER_REJECTED])]
    );
    assert!(!s.has_broker());
}

#[test]
fn mqtt5_connect_gets_unacceptable_protocol() {
    let (mut s, now) = session();
    let mut c = connect("vm-gui", 5);
    c[8] = 5; // protocol level byte
    s.guest_in.extend_from_slice(&c);
    assert!(s.on_guest_input(&[], now).is_empty());
    assert_eq!(
        packets(&s.to_guest),
        vec![(mqtt::CONNACK, vec![0, connack::UNACCEPTABLE_PROTOCOL])]
    );
}

#[test]
fn truncated_connect_then_real_connect() {
    let (mut s, now) = session();
    let c = connect("vm-gui", 5);
    s.guest_in.extend_from_slice(&c[..c.len() - 3]);
    assert!(s.on_guest_input(&[], now).is_empty());
    // The guest restarted and sends a whole CONNECT: absorbed by the stale candidate's length at first.
    s.guest_in.extend_from_slice(&connect("vm-gui", 7));
    let effects = s.on_guest_input(&[], now);
    if effects.is_empty() {
        let t = s.next_deadline().unwrap();
        assert!(t <= now + SCAN_TIMEOUT);
        assert_eq!(s.on_tick(t), vec![Effect::OpenBroker]);
    } else {
        assert_eq!(effects, vec![Effect::OpenBroker]);
    }
    assert_eq!(broker_connect(&mut s, now).keep_alive, 7);
}

#[test]
fn relays_publish_both_ways() {
    let (mut s, now) = live();
    let p = publish(
        "system/disks/list_disks/request",
        1,
        3,
        br#"{"sender":"vm-gui"}"#,
    );
    s.guest_in.extend_from_slice(&p);
    assert!(s.on_guest_input(&[], now).is_empty());
    assert_eq!(&s.to_broker[..], &p[..]);
    let r = publish(
        "system/disks/list_disks/response/vm-gui",
        1,
        9,
        br#"{"status":"ok","disks":[]}"#,
    );
    s.broker_in.extend_from_slice(&r);
    s.broker_in.extend_from_slice(b"\x40\x02\x00\x03");
    assert!(s.on_broker_input(&[], now).is_empty());
    let mut expected = r.to_vec();
    expected.extend_from_slice(b"\x40\x02\x00\x03");
    assert_eq!(&s.to_guest[..], &expected[..]);
}

#[test]
fn refused_publishes_are_acknowledged_not_forwarded() {
    let (mut s, now) = live();
    // Impersonation by sender, QoS 1.
    s.guest_in.extend_from_slice(&publish(
        "system/disks/list_disks/request",
        1,
        4,
        br#"{"sender":"sys-usb"}"#,
    ));
    // A fake response, QoS 2, then its PUBREL.
    s.guest_in.extend_from_slice(&publish(
        "system/disks/list_disks/response/vm-gui",
        2,
        5,
        b"{}",
    ));
    s.guest_in.extend_from_slice(b"\x62\x02\x00\x05");
    // $SYS, QoS 0.
    s.guest_in.extend_from_slice(&publish("$SYS/x", 0, 0, b""));
    let effects = s.on_guest_input(&[], now);
    assert_eq!(effects.len(), 3);
    assert!(effects.iter().all(|e| matches!(e, Effect::Refused { .. })));
    assert!(s.to_broker.is_empty(), "nothing reaches the broker");
    let sent = packets(&s.to_guest);
    // The refused request is answered on the VM's own response topic (issue 10), then the acks.
    assert_eq!(sent[0].0, mqtt::PUBLISH);
    let answer = String::from_utf8_lossy(&sent[0].1).into_owned();
    assert!(
        answer.starts_with("\0\x27system/disks/list_disks/response/vm-gui{")
            && answer.contains(r#""code":"forbidden""#)
            && answer.contains(r#""responder":"dom0""#),
        "{answer}"
    );
    assert_eq!(
        sent[1..],
        vec![
            (mqtt::PUBACK, vec![0, 4]),
            (mqtt::PUBREC, vec![0, 5]),
            (mqtt::PUBCOMP, vec![0, 5])
        ]
    );
}

#[test]
fn subscribe_partially_refused_gets_merged_suback() {
    let (mut s, now) = live();
    let mut sub = BytesMut::new();
    mqtt::encode_subscribe(
        11,
        &[
            ("system/+/+/response/+", 1),
            ("system/+/+/response/vm-gui", 1),
            ("$SYS/#", 0),
            ("#", 0),
        ],
        &mut sub,
    );
    s.guest_in.extend_from_slice(&sub);
    let effects = s.on_guest_input(&[], now);
    assert_eq!(effects.len(), 3);
    // Only the allowed filter goes to the broker.
    let sent = packets(&s.to_broker);
    assert_eq!(
        mqtt::parse_subscribe(&sent[0].1).unwrap(),
        (11, vec![("system/+/+/response/vm-gui", 1)])
    );
    s.broker_in.extend_from_slice(b"\x90\x03\x00\x0b\x01");
    s.on_broker_input(&[], now);
    assert_eq!(
        packets(&s.to_guest),
        vec![(mqtt::SUBACK, vec![0, 11, 0x80, 1, 0x80, 0x80])]
    );

    // All refused: answered by the link alone.
    s.to_guest.clear();
    s.to_broker.clear();
    let mut sub = BytesMut::new();
    mqtt::encode_subscribe(
        12,
        &[("system/disks/list_disks/response/sys-usb", 0)],
        &mut sub,
    );
    s.guest_in.extend_from_slice(&sub);
    s.on_guest_input(&[], now);
    assert!(s.to_broker.is_empty());
    assert_eq!(
        packets(&s.to_guest),
        vec![(mqtt::SUBACK, vec![0, 12, 0x80])]
    );
}

#[test]
fn delivery_filter_acks_to_broker() {
    let (mut s, now) = live();
    s.broker_in.extend_from_slice(&publish(
        "system/disks/list_disks/response/sys-usb",
        1,
        21,
        b"{}",
    ));
    s.on_broker_input(&[], now);
    assert!(s.to_guest.is_empty());
    assert_eq!(packets(&s.to_broker), vec![(mqtt::PUBACK, vec![0, 21])]);
}

#[test]
fn silence_ends_the_session() {
    let (mut s, now) = live();
    // The link's own ping comes first (it keeps the broker's timer from ending the session
    // before the link's supervision of the guest does).
    let ping = s.next_deadline().unwrap();
    assert_eq!(ping, now + Duration::from_millis(2500), "keepalive 5 s / 2");
    s.on_tick(ping);
    assert_eq!(packets(&s.to_broker), vec![(mqtt::PINGREQ, vec![])]);
    s.to_broker.clear();
    let t = now + Duration::from_millis(7500);
    assert!(s.next_deadline().unwrap() <= t);
    let effects = s.on_tick(t);
    assert!(effects.contains(&Effect::CloseBroker { flush: false }));
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::State(LinkState::SessionDown, _)))
    );
    assert_eq!(&s.to_guest[..], &mqtt::DISCONNECT_PACKET);
    assert!(!s.has_broker());
}

#[test]
fn keepalive_zero_is_kept_alive_by_the_link() {
    let (mut s, now) = session();
    s.guest_in.extend_from_slice(&connect("vm-gui", 0));
    s.on_guest_input(&[], now);
    let c = broker_connect(&mut s, now);
    assert_eq!(c.keep_alive, 60, "the broker never sees keepalive 0");
    let t = s.next_deadline().unwrap();
    assert_eq!(t, now + Duration::from_secs(30));
    assert!(s.on_tick(t).is_empty());
    assert_eq!(&s.to_broker[..], &mqtt::PINGREQ_PACKET);
    s.broker_in.extend_from_slice(b"\xd0\x00");
    s.on_broker_input(&[], t);
    assert!(
        s.to_guest.is_empty(),
        "the link's own PINGRESP is not relayed"
    );
    // The guest's own ping is relayed both ways.
    s.guest_in.extend_from_slice(b"\xc0\x00");
    s.on_guest_input(&[], t);
    s.broker_in.extend_from_slice(b"\xd0\x00");
    s.on_broker_input(&[], t);
    assert_eq!(&s.to_guest[..], b"\xd0\x00");
}

#[test]
fn malformed_packet_sends_back_to_scanning() {
    for bad in [
        &b"\x20\x02\x00\x00"[..],
        b"\x80\x03\x00\x01\x00",
        b"\x30\x80\x80\xe8\x5f",
        b"\x31\x80\x00",
    ] {
        let (mut s, now) = live();
        s.guest_in.extend_from_slice(bad);
        let effects = s.on_guest_input(&[], now);
        assert!(
            effects.contains(&Effect::CloseBroker { flush: false }),
            "{bad:x?}: {effects:?}"
        );
        assert_eq!(&s.to_guest[..], &mqtt::DISCONNECT_PACKET);
        // A fresh CONNECT starts a new session.
        s.guest_in.extend_from_slice(&connect("vm-gui", 5));
        assert_eq!(
            s.on_guest_input(&[], now),
            vec![Effect::OpenBroker],
            "{bad:x?}"
        );
    }
}

#[test]
fn partial_frame_on_live_session_times_out() {
    let (mut s, now) = live();
    s.guest_in
        .extend_from_slice(&publish("system/disks/list_disks/request", 0, 0, b"{}")[..6]);
    s.on_guest_input(&[], now);
    let t = now + Duration::from_secs(1);
    s.guest_in.clear(); // keep the guest "active" but stuck: only the partial frame remains
    s.guest_in
        .extend_from_slice(&publish("system/disks/list_disks/request", 0, 0, b"{}")[..6]);
    s.on_guest_input(&[], t);
    // 1.5 × keepalive 5 s after the frame started (the link's own pings come before).
    assert!(
        s.on_tick(now + Duration::from_millis(7400))
            .iter()
            .all(|e| !matches!(e, Effect::CloseBroker { .. }))
    );
    let effects = s.on_tick(now + Duration::from_millis(7500));
    assert!(effects.contains(&Effect::CloseBroker { flush: false }));
}

#[test]
fn connect_on_live_session_restarts_it() {
    let (mut s, now) = live();
    s.guest_in.extend_from_slice(&connect("vm-gui", 5));
    let effects = s.on_guest_input(&[], now);
    assert_eq!(effects[0], Effect::CloseBroker { flush: false });
    assert_eq!(effects.last(), Some(&Effect::OpenBroker));
}

#[test]
fn a_small_delivery_goes_before_large_ones_waiting_but_not_before_its_own_topic() {
    let (mut s, now) = live();
    s.limits.queue_bytes = 1 << 20;
    let big = "system/disks/create_file/response/vm-gui";
    let chunk = |i: u16| publish(big, 1, i, &[b'c'; 20_000]);
    let small = publish("system/disks/list_disks/response/vm-gui", 1, 9, b"{}");
    let small_on_big = publish(big, 1, 4, b"{}");
    for p in [
        chunk(1),
        chunk(2),
        small.clone(),
        chunk(3),
        small_on_big.clone(),
    ] {
        s.broker_in.extend_from_slice(&p);
    }
    s.on_broker_input(&[], now);
    let mut sizes = Vec::new();
    while !s.to_guest.is_empty() {
        sizes.extend(
            packets(&s.to_guest)
                .into_iter()
                .map(|(_, body)| body.len() + 2),
        );
        let n = s.to_guest.len();
        s.guest_written(n);
    }
    // The first large one was alone when it came: written first; then the small one; then the
    // other large ones, and the small one on their topic after them.
    let (c, sm, sb) = (chunk(1).len(), small.len(), small_on_big.len());
    assert_eq!(sizes.len(), 5, "{sizes:?}");
    assert!(sizes[0] >= c - 4 && sizes[1] == sm, "{sizes:?}");
    assert!(sizes[2] >= c - 4 && sizes[3] >= c - 4, "{sizes:?}");
    assert_eq!(sizes[4], sb, "{sizes:?}");
}

#[test]
fn the_broker_gets_acknowledgements_in_its_order_when_the_guest_got_a_large_one_last() {
    let (mut s, now) = live();
    s.limits.queue_bytes = 1 << 20;
    let big = "system/disks/create_file/response/vm-gui";
    // Two large deliveries, then a small one: the guest gets 1, then 3 (small first), then 2.
    for p in [
        publish(big, 1, 1, &[b'c'; 20_000]),
        publish(big, 1, 2, &[b'c'; 20_000]),
        publish("system/disks/list_disks/response/vm-gui", 1, 3, b"{}"),
    ] {
        s.broker_in.extend_from_slice(&p);
    }
    s.on_broker_input(&[], now);
    while !s.to_guest.is_empty() {
        let n = s.to_guest.len();
        s.guest_written(n);
    }
    s.to_broker.clear();
    // The guest acknowledges in the order it got them: 1, 3, 2.
    let acked = |s: &mut Session, id: u16| {
        s.on_guest_input(&[0x40, 2, 0, id as u8], now);
        packets(&s.to_broker)
            .into_iter()
            .map(|(kind, body)| (kind, u16::from_be_bytes([body[0], body[1]])))
            .collect::<Vec<_>>()
    };
    // (PUBACK, id) written to the broker so far.
    assert_eq!(acked(&mut s, 1), vec![(4, 1)]);
    assert_eq!(acked(&mut s, 3), vec![(4, 1)], "3 waits for 2");
    assert_eq!(acked(&mut s, 2), vec![(4, 1), (4, 2), (4, 3)]);
}

#[test]
fn guest_that_stops_reading_overflows_alone() {
    let (mut s, now) = live();
    let p = publish("system/disk/new_file/notification", 0, 0, &[b'x'; 1000]);
    for _ in 0..5 {
        s.broker_in.extend_from_slice(&p);
    }
    let effects = s.on_broker_input(&[], now);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::State(LinkState::Overflow, _))),
        "{effects:?}"
    );
    assert!(effects.contains(&Effect::CloseBroker { flush: false }));
    assert_eq!(
        &s.to_guest[..],
        &mqtt::DISCONNECT_PACKET,
        "queue dropped, guest told to start over"
    );
}

#[test]
fn rate_limit_refuses_beyond_the_bucket() {
    let mut l = limits();
    l.rate_per_sec = 10;
    l.burst = 5;
    l.violation_limit = 1000;
    let (mut s, now) = session_with(l);
    s.guest_in.extend_from_slice(&connect("vm-gui", 5));
    s.on_guest_input(&[], now);
    broker_connect(&mut s, now);
    for _ in 0..20 {
        s.guest_in
            .extend_from_slice(&publish("system/events/error/notification", 0, 0, b"{}"));
    }
    let effects = s.on_guest_input(&[], now);
    assert_eq!(s.counters.refused, 15, "5 pass, 15 refused");
    assert_eq!(effects.len(), 10, "reports are limited to 10 a second");
    assert_eq!(packets(&s.to_broker).len(), 5);
    // A second later the bucket has refilled by 10.
    s.to_broker.clear();
    for _ in 0..20 {
        s.guest_in
            .extend_from_slice(&publish("system/events/error/notification", 0, 0, b"{}"));
    }
    let effects = s.on_guest_input(&[], now + Duration::from_secs(1));
    assert_eq!(
        packets(&s.to_broker).len(),
        5,
        "refill capped at the burst size"
    );
    // The next report says how many were not reported.
    assert!(
        matches!(&effects[0], Effect::Refused { reason, .. } if reason.contains("and 5 more refusals not reported")),
        "{effects:?}"
    );
}

#[test]
fn repeated_violations_disconnect() {
    let mut l = limits();
    l.violation_limit = 3;
    let (mut s, now) = session_with(l);
    s.guest_in.extend_from_slice(&connect("vm-gui", 5));
    s.on_guest_input(&[], now);
    broker_connect(&mut s, now);
    for _ in 0..3 {
        s.guest_in.extend_from_slice(&publish("$SYS/x", 0, 0, b""));
    }
    let effects = s.on_guest_input(&[], now);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::State(LinkState::Violations, _))),
        "{effects:?}"
    );
    assert!(!s.has_broker());
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary guest bytes, in arbitrary chunks, never panic and never grow the buffers
        /// beyond the limits.
        #[test]
        fn arbitrary_guest_bytes(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
            let (mut s, now) = session();
            let mut connected = false;
            for c in chunks {
                s.guest_in.extend_from_slice(&c);
                for e in s.on_guest_input(&[], now) {
                    if e == Effect::OpenBroker && !connected {
                        s.broker_connected(now);
                        connected = true;
                    }
                }
                prop_assert!(s.guest_in.len() <= 64 * 1024 + 300);
                s.to_guest.clear();
                s.to_broker.clear();
            }
            if let Some(t) = s.next_deadline() {
                s.on_tick(t);
            }
        }

        #[test]
        fn arbitrary_broker_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let (mut s, now) = live();
            s.broker_in.extend_from_slice(&bytes);
            s.on_broker_input(&[], now);
        }
    }
}

#[test]
fn guest_disconnect_is_forwarded_and_not_answered() {
    let (mut s, now) = live();
    s.guest_in.extend_from_slice(b"\xe0\x00");
    let effects = s.on_guest_input(&[], now);
    assert!(effects.contains(&Effect::CloseBroker { flush: true }));
    assert_eq!(
        &s.to_broker[..],
        b"\xe0\x00",
        "the broker sees a clean DISCONNECT (no will)"
    );
    assert!(
        s.to_guest.is_empty(),
        "nothing is left in the tty for the next client"
    );
}

#[test]
fn a_legacy_guest_is_translated_and_can_switch_to_mqtt() {
    let (mut s, now) = session();
    let line = b"{\"type\":\"commande\",\"source\":\"sys-usb\",\"destination\":\"sys-usb\",\"payload\":{\"commande\":\"liste_disques\"}}\n";
    assert_eq!(s.on_guest_input(line, now), vec![Effect::OpenBroker]);
    s.broker_connected(now);
    let sent = packets(&s.to_broker);
    let c = mqtt::parse_connect(&sent[0].1).unwrap();
    assert_eq!(c.client_id, "vm-gui", "the channel's identity");
    assert_eq!(sent[1].0, mqtt::SUBSCRIBE);
    assert_eq!(sent[2].0, mqtt::PUBLISH);
    let request = String::from_utf8_lossy(&sent[2].1).into_owned();
    assert!(
        request.contains("system/disks/list_disks/request")
            && request.contains(r#""sender":"vm-gui""#)
            && !request.contains(r#""sender":"sys-usb""#),
        "{request}"
    );
    let id_at = request.find(r#""request_id":""#).unwrap() + 14;
    let id = &request[id_at..id_at + 32];
    s.to_broker.clear();
    let effects = s.on_broker_input(b"\x20\x02\x00\x00", now);
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::State(LinkState::SessionUp, _))),
        "{effects:?}"
    );
    // The answer comes back as an MVP line, and is acknowledged to the broker.
    s.to_guest.clear();
    let answer = publish(
        "system/disks/list_disks/response/vm-gui",
        1,
        9,
        format!(r#"{{"status":"ok","request_id":"{id}","responder":"sys-usb","disks":[]}}"#)
            .as_bytes(),
    );
    s.on_broker_input(&answer, now);
    let to_guest = String::from_utf8_lossy(&s.to_guest).into_owned();
    assert!(
        to_guest.contains(r#""type":"reponse""#)
            && to_guest.contains(r#""commande":"liste_disques""#),
        "{to_guest}"
    );
    assert!(to_guest.ends_with('\n'));
    assert_eq!(packets(&s.to_broker), vec![(mqtt::PUBACK, vec![0, 9])]);
    // A CONNECT at a line boundary: the guest switches to MQTT.
    let effects = s.on_guest_input(&connect("vm-gui", 5), now);
    assert_eq!(
        effects.first(),
        Some(&Effect::CloseBroker { flush: false }),
        "{effects:?}"
    );
    assert_eq!(effects.last(), Some(&Effect::OpenBroker));
}

/// Regression (found by the `dom0_session` fuzz target): a legacy guest's unfinished line, then
/// the broker closing its session, left a partial-frame timer with nothing left to discard; the
/// next tick panicked advancing an empty buffer.
#[test]
fn a_tick_after_a_legacy_session_ended_mid_line() {
    let (mut s, now) = session();
    assert_eq!(
        s.on_guest_input(b"{\"type\":\"comm", now),
        vec![Effect::OpenBroker]
    );
    s.broker_connected(now);
    s.on_broker_input(b"\x20\x02\x00\x00", now);
    let effects = s.broker_closed(now);
    assert!(effects.contains(&Effect::CloseBroker { flush: false }));
    s.broker_released();
    let later = now + SCAN_TIMEOUT * 3;
    let _ = s.on_tick(later);
    let _ = s.on_tick(later + SCAN_TIMEOUT);
    // And it still scans: a CONNECT starts a session.
    assert_eq!(
        s.on_guest_input(&connect("vm-gui", 5), later),
        vec![Effect::OpenBroker]
    );
}

#[test]
fn acknowledgements_for_nothing_the_broker_sent_are_dropped() {
    let (mut s, now) = live();
    let ack = |kind: u8, id: u16| {
        let mut b = BytesMut::new();
        mqtt::encode_ack(kind, id, &mut b);
        b
    };
    // (what the guest sends, what reaches the broker, what the guest gets back)
    let unsolicited: [(BytesMut, &[u8], Vec<(u8, Vec<u8>)>); 4] = [
        (ack(mqtt::PUBACK, 7), b"", vec![]),
        (ack(mqtt::PUBREC, 8), b"", vec![]),
        (ack(mqtt::PUBCOMP, 10), b"", vec![]),
        // MQTT: a PUBREL is always answered; completed here, the broker never sees it.
        (ack(mqtt::PUBREL, 9), b"", vec![(mqtt::PUBCOMP, vec![0, 9])]),
    ];
    for (sent, to_broker, to_guest) in unsolicited {
        s.guest_in.extend_from_slice(&sent);
        assert!(s.on_guest_input(&[], now).is_empty());
        assert_eq!(&s.to_broker[..], to_broker, "{sent:x?}");
        assert_eq!(packets(&s.to_guest), to_guest, "{sent:x?}");
        s.to_guest.clear();
    }
    assert_eq!(s.counters.dropped, 4);
    assert!(matches!(s.phase, Phase::Live { connack_seen: true }));

    // A QoS 1 delivery: its PUBACK reaches the broker once; a second one is dropped.
    let topic = "system/disks/list_disks/response/vm-gui";
    s.broker_in.extend_from_slice(&publish(topic, 1, 21, b"{}"));
    s.on_broker_input(&[], now);
    for _ in 0..2 {
        s.guest_in.extend_from_slice(&ack(mqtt::PUBACK, 21));
        s.on_guest_input(&[], now);
    }
    assert_eq!(&s.to_broker[..], &ack(mqtt::PUBACK, 21)[..]);
    s.to_broker.clear();

    // A QoS 2 delivery: PUBCOMP before the broker's PUBREL is dropped; PUBREC, then PUBCOMP after
    // the PUBREL, reach the broker; a PUBACK for it (the wrong kind) is dropped.
    s.broker_in.extend_from_slice(&publish(topic, 2, 22, b"{}"));
    s.on_broker_input(&[], now);
    for kind in [mqtt::PUBCOMP, mqtt::PUBACK, mqtt::PUBREC] {
        s.guest_in.extend_from_slice(&ack(kind, 22));
        s.on_guest_input(&[], now);
    }
    assert_eq!(&s.to_broker[..], &ack(mqtt::PUBREC, 22)[..]);
    s.to_broker.clear();
    s.broker_in.extend_from_slice(&ack(mqtt::PUBREL, 22));
    s.on_broker_input(&[], now);
    s.guest_in.extend_from_slice(&ack(mqtt::PUBCOMP, 22));
    s.on_guest_input(&[], now);
    assert_eq!(&s.to_broker[..], &ack(mqtt::PUBCOMP, 22)[..]);
    assert_eq!(s.counters.dropped, 7);

    // The guest's own QoS 2 publish: its PUBREL (after the broker's PUBREC) reaches the broker.
    s.to_broker.clear();
    s.guest_in.extend_from_slice(&publish(
        "system/disks/list_disks/request",
        2,
        5,
        br#"{"sender":"vm-gui"}"#,
    ));
    s.on_guest_input(&[], now);
    assert_eq!(packets(&s.to_broker)[0].0, mqtt::PUBLISH);
    s.to_broker.clear();
    s.guest_in.extend_from_slice(&ack(mqtt::PUBREL, 5));
    s.on_guest_input(&[], now);
    assert_eq!(&s.to_broker[..], &ack(mqtt::PUBREL, 5)[..]);
}

#[test]
fn sessions_started_in_a_loop_are_limited() {
    let (mut s, start) = session();
    let mut opened = 0;
    let mut refused = 0;
    // 30 CONNECTs within 100 ms: the burst opens broker sessions, the rest get CONNACK 3.
    for i in 0..30u32 {
        let now = start + Duration::from_millis(u64::from(i) * 3);
        s.to_guest.clear();
        s.guest_in.extend_from_slice(&connect("vm-gui", 5));
        if s.on_guest_input(&[], now).contains(&Effect::OpenBroker) {
            opened += 1;
            broker_connect(&mut s, now);
        } else {
            assert_eq!(
                packets(&s.to_guest),
                vec![(mqtt::CONNACK, vec![0, connack::SERVER_UNAVAILABLE])]
            );
            refused += 1;
        }
    }
    assert_eq!((opened, refused), (10, 20));
    // Refused: the guest is not read until the next token (it blocks on its channel).
    assert!(!s.wants_guest_input());
    let next = s.next_deadline().unwrap();
    assert!(next > start + Duration::from_millis(87) && next <= start + Duration::from_millis(300));
    s.on_tick(next);
    assert!(s.wants_guest_input());
    // A second later, new sessions may start again.
    s.to_guest.clear();
    s.guest_in.extend_from_slice(&connect("vm-gui", 5));
    assert_eq!(
        s.on_guest_input(&[], start + Duration::from_secs(1)),
        vec![Effect::OpenBroker]
    );
}

#[test]
fn warnings_a_guest_causes_do_not_flood_the_log() {
    // Found by the hostile suite: an MQTT 5 CONNECT loop wrote one WARN line per CONNECT (33 000
    // a second). Every guest-caused warning now shares the report budget.
    let (mut s, now) = session();
    let mut c = connect("vm-gui", 5);
    c[8] = 5;
    for _ in 0..200 {
        s.guest_in.extend_from_slice(&c);
    }
    s.on_guest_input(&[], now);
    // 10 reported (the burst), the other 190 counted for the next report.
    let later = s.may_report(now + Duration::from_secs(1)).unwrap();
    assert_eq!(later.to_string(), " (and 190 more refusals not reported)");
    let next = s.may_report(now + Duration::from_secs(1)).unwrap();
    assert_eq!(next.to_string(), "");
}

/// Found by the hostile suite (class 4): a guest that left a frame half-way kept its link waiting
/// for the frame (1.5 × keepalive from the frame's start) while the broker, which had heard nothing
/// since the last whole packet, timed the session out first (an ERROR in rumqttd's log). The link
/// now pings the broker itself, so the broker never goes 1.5 × keepalive without a packet.
#[test]
fn a_frame_left_half_way_never_lets_the_broker_time_the_session_out() {
    let (mut s, now) = live();
    s.to_broker.clear();
    let start = now + Duration::from_secs(3);
    s.guest_in
        .extend_from_slice(&publish("system/disks/list_disks/request", 0, 0, b"{}")[..6]);
    s.on_guest_input(&[], start);
    let mut last_to_broker = now;
    let end = loop {
        let t = s.next_deadline().unwrap();
        let effects = s.on_tick(t);
        if !s.to_broker.is_empty() {
            assert!(
                t - last_to_broker <= Duration::from_secs(5),
                "the broker heard nothing for {:?}",
                t - last_to_broker
            );
            last_to_broker = t;
            s.to_broker.clear();
        }
        if effects.contains(&Effect::CloseBroker { flush: false }) {
            break t;
        }
        assert!(t < now + Duration::from_secs(60), "the session never ended");
    };
    assert!(end - last_to_broker <= Duration::from_secs(5));
    assert_eq!(end, start + Duration::from_millis(7500));
}

/// Found by the attack corpus: `\x10\n` then a valid line, every 20 ms, re-entered legacy mode
/// without the budget of new sessions (~197 legacy sessions in 5 s). A byte that only looks like
/// a CONNECT is a line like any other, and a legacy channel's sessions cost the same budget as
/// MQTT ones.
#[test]
fn legacy_sessions_cost_the_session_budget() {
    let line = b"{\"type\":\"commande\",\"destination\":\"sys-usb\",\"payload\":{\"commande\":\"liste_disques\"}}\n";
    let mut opened = [0, 0];
    for (run, close_each_time) in [false, true].into_iter().enumerate() {
        let (mut s, t0) = session();
        for i in 0..250u64 {
            let now = t0 + Duration::from_millis(20 * i);
            let _ = s.on_tick(now);
            let mut bytes = if i == 0 {
                Vec::new()
            } else {
                b"\x10\n".to_vec()
            };
            bytes.extend_from_slice(line);
            for e in s.on_guest_input(&bytes, now) {
                if e == Effect::OpenBroker {
                    opened[run] += 1;
                    s.broker_connected(now);
                    s.on_broker_input(b"\x20\x02\x00\x00", now);
                }
            }
            if close_each_time && s.has_broker() {
                s.broker_closed(now);
                s.broker_released();
            }
        }
    }
    assert_eq!(opened[0], 1, "one legacy session serves every line");
    // 5 s: the burst (10) and 5 a second.
    assert!(opened[1] <= 10 + 5 * 5 + 1, "{} sessions in 5 s", opened[1]);
    assert!(
        opened[1] >= 10,
        "{}: the legacy guest is still served",
        opened[1]
    );
}

/// Found by the attack corpus: after a resync ("too many policy violations"), an agent's link
/// tested the next bytes for `{` again and ran in legacy mode on MQTT bytes (a publish payload).
/// The dialect is decided once, on the first byte of the channel's life.
#[test]
fn an_mqtt_channel_never_turns_legacy() {
    let (mut s, now) = live();
    // The session ends (a malformed packet), and what follows starts with `{`.
    s.guest_in.extend_from_slice(b"\xf0\x00");
    let _ = s.on_guest_input(&[], now);
    assert!(!s.has_broker());
    let effects = s.on_guest_input(br#"{"sender":"vm-gui"}"#, now);
    assert!(!effects.contains(&Effect::OpenBroker), "{effects:?}");
    assert!(!matches!(
        s.phase,
        Phase::Legacy(_) | Phase::Connecting(Some(_))
    ));
    // Its next CONNECT starts a session as usual.
    assert_eq!(
        s.on_guest_input(&connect("vm-gui", 5), now + Duration::from_secs(2)),
        vec![Effect::OpenBroker]
    );
}

#[test]
fn the_first_byte_decides_and_whitespace_waits() {
    let (mut s, now) = session();
    assert!(s.on_guest_input(b" \r\n", now).is_empty());
    assert_eq!(s.dialect, Dialect::Undecided);
    assert_eq!(
        s.on_guest_input(&connect("vm-gui", 5), now),
        vec![Effect::OpenBroker]
    );
    assert_eq!(s.dialect, Dialect::Mqtt);
}

fn forwarded_payloads(buf: &[u8]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut rest = buf;
    while let Ok(Some(h)) = mqtt::fixed_header(rest, usize::MAX) {
        if h.kind() == mqtt::PUBLISH {
            let p = mqtt::parse_publish(&h, &rest[h.header_len..h.frame_len()]).unwrap();
            out.push(serde_json::from_slice(p.payload).unwrap());
        }
        rest = &rest[h.frame_len()..];
    }
    out
}

/// The note's `{}`: a request without `sender` goes out as the VM's; a response without
/// `responder` and a notification without `origin` are stamped with the channel's identity.
#[test]
fn identity_fields_are_filled_in_on_the_way() {
    let (mut s, now) = live();
    s.guest_in
        .extend_from_slice(&publish("system/disks/list_disks/request", 0, 0, b"{}"));
    s.guest_in.extend_from_slice(&publish(
        "system/components/discover/response/sys-usb",
        1,
        3,
        br#"{"status":"ok","components":[]}"#,
    ));
    s.guest_in.extend_from_slice(&publish(
        "system/events/error/notification",
        0,
        0,
        br#"{"module":"sys-usb/disks","origin":"sys-usb"}"#,
    ));
    s.guest_in.extend_from_slice(&publish(
        "system/events/error/notification",
        0,
        0,
        br#"{"module":"x"}"#,
    ));
    let effects = s.on_guest_input(&[], now);
    let sent = forwarded_payloads(&s.to_broker);
    assert_eq!(sent.len(), 3, "{effects:?}");
    assert_eq!(sent[0]["sender"], "vm-gui");
    assert_eq!(sent[1]["responder"], "vm-gui");
    assert_eq!(sent[2]["origin"], "vm-gui");
    assert!(
        matches!(&effects[..], [Effect::Refused { reason, .. }] if reason.contains("origin")),
        "a notification claiming another origin is refused: {effects:?}"
    );
    // The QoS 1 response keeps its packet id.
    let pubs: Vec<_> = packets(&s.to_broker)
        .into_iter()
        .filter(|(k, _)| *k == mqtt::PUBLISH)
        .collect();
    let body = &pubs[1].1;
    let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    assert_eq!(&body[2 + len..4 + len], &[0, 3]);
}

/// Found by the attack corpus: one VM's `tous` flood, within its own rate, pushed the VMs that
/// answered over *their* rate, and their refused answers disconnected them. A broadcast costs
/// its sender one token per party; answers to requests delivered to a VM ride on them.
#[test]
fn a_broadcast_costs_whoever_asked_and_answers_ride_on_their_requests() {
    let mut l = limits();
    l.rate_per_sec = 100;
    l.burst = 100;
    l.violation_limit = 5;
    let (mut s, now) = session_with(l.clone());
    s.set_parties(10);
    s.guest_in.extend_from_slice(&connect("vm-gui", 5));
    s.on_guest_input(&[], now);
    broker_connect(&mut s, now);
    for _ in 0..12 {
        s.guest_in
            .extend_from_slice(&publish("system/components/discover/request", 0, 0, b"{}"));
    }
    s.on_guest_input(&[], now);
    assert_eq!(
        forwarded_payloads(&s.to_broker).len(),
        10,
        "100 tokens: 10 broadcasts to 10 parties"
    );

    // A responder receives 500 requests and answers each: never refused, never disconnected.
    let (mut r, now) = session_with(l);
    r.guest_in.extend_from_slice(&connect("vm-gui", 5));
    r.on_guest_input(&[], now);
    broker_connect(&mut r, now);
    r.to_broker.clear();
    for i in 0..500u16 {
        r.on_broker_input(
            &publish(
                "system/components/discover/request",
                1,
                i + 1,
                br#"{"sender":"vm-evil"}"#,
            ),
            now,
        );
        r.to_guest.clear();
        r.guest_in.extend_from_slice(&publish(
            "system/components/discover/response/vm-evil",
            0,
            0,
            br#"{"status":"ok","components":[]}"#,
        ));
        let effects = r.on_guest_input(&[], now);
        assert!(effects.is_empty(), "answer {i}: {effects:?}");
    }
    assert_eq!(r.counters.refused, 0);
    assert!(r.has_broker());
    // Beyond what it owes, a VM's answers pay like any publication.
    for _ in 0..150 {
        r.guest_in.extend_from_slice(&publish(
            "system/components/discover/response/vm-evil",
            0,
            0,
            br#"{"status":"ok","components":[]}"#,
        ));
    }
    r.on_guest_input(&[], now);
    assert!(r.counters.refused > 0);
}

/// A guest's last PUBLISH and its DISCONNECT in one read (every `mosquitto_pub` does it), at each
/// QoS, whole and split at every byte: the PUBLISH reaches the broker before the DISCONNECT.
#[test]
fn a_last_publish_and_its_disconnect_in_one_read_both_reach_the_broker() {
    for qos in [0u8, 1, 2] {
        let mut input = publish("system/events/error/notification", qos, 7, br#"{"m":1}"#).to_vec();
        input.extend_from_slice(b"\xe0\x00");
        for split in [input.len(), 1] {
            let (mut s, now) = live();
            let mut effects = Vec::new();
            for chunk in input.chunks(split) {
                effects.extend(s.on_guest_input(chunk, now));
            }
            assert!(
                effects.contains(&Effect::CloseBroker { flush: true }),
                "qos {qos}"
            );
            let sent = packets(&s.to_broker);
            let kinds: Vec<u8> = sent.iter().map(|(k, _)| *k).collect();
            assert_eq!(
                kinds,
                [mqtt::PUBLISH, mqtt::DISCONNECT],
                "qos {qos} split {split}"
            );
        }
    }
}
