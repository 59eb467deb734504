//! The Dom0 service: links, identity, resynchronisation, VM lifecycle, broker restarts, isolation.

use system_tests::channel::Channel;
use system_tests::guest::Bridge;
use system_tests::{BrokerKind, DEADLINE, Dom0, TestDir, raw};

const RESPONSE: &str = "system/disks/list_disks/response/vm-gui";
const REQUEST: &str = "system/disks/list_disks/request";

/// Off-the-shelf clients in the guest (mosquitto_sub/pub through socat on the pty) exchange
/// messages with mosquitto_pub/sub on Dom0, through the service.
fn guest_and_dom0_exchange(kind: BrokerKind) {
    exchange(kind, "");
}

/// The same, the links reaching the embedded broker over its loopback TCP port instead of in
/// process (`embedded_links = "tcp"`).
#[test]
fn guest_and_dom0_exchange_embedded_over_tcp() {
    exchange(BrokerKind::Embedded, "embedded_links = \"tcp\"\n");
}

/// The exchanges of [`guest_and_dom0_exchange`], Dom0 run with `config` as its config file.
fn exchange(kind: BrokerKind, config: &str) {
    let dir = TestDir::new("exchange");
    let conf = dir.join("dom0.toml");
    std::fs::write(&conf, config).unwrap();
    let conf = conf.display().to_string();
    let dom0 = Dom0::start(&dir, kind, &["--config", &conf]);
    let ch = Channel::new(&dir.path, "vm-gui");
    // The attach signal (a DISCONNECT) waits in the tty; an off-the-shelf client must not read it
    // first (our agent skips it; mosquitto_sub would call it a protocol error).
    ch.consume_attach_signal();
    let bridge = Bridge::new(&dir, &ch);

    // Dom0 → guest.
    let sub = bridge.subscribe(&dir, "vm-gui", &[RESPONSE], &["-C", "1"]);
    sub.wait_log("received SUBACK");
    dom0.publish(RESPONSE, r#"{"status":"ok","disks":[]}"#);
    sub.wait_log(&format!("{RESPONSE} {{\"status\":\"ok\",\"disks\":[]}}"));

    // Guest → Dom0.
    let dsub = dom0.subscribe(&dir, &[REQUEST]);
    let (ok, out) = bridge.publish("vm-gui", REQUEST, r#"{"sender":"vm-gui","request_id":"1"}"#);
    assert!(ok, "guest mosquitto_pub failed: {out}");
    // Dom0 adds the request's deadline on its own clock (keys come sorted).
    dsub.wait_log(&format!("{REQUEST} {{\"deadline_ms\":"));
    dsub.wait_log(r#""request_id":"1","sender":"vm-gui"}"#);

    // rumqttc in the guest, both ways.
    let guest = bridge.rumqttc("vm-gui", &[RESPONSE]);
    guest.wait_subscribed();
    dom0.publish(
        RESPONSE,
        r#"{"status":"ok","disks":[{"label":"L","id":"usb0"}]}"#,
    );
    let got = guest
        .recv_on(RESPONSE, DEADLINE)
        .expect("rumqttc guest got the response");
    assert!(String::from_utf8_lossy(&got).contains("usb0"));
    guest.publish(REQUEST, br#"{"sender":"vm-gui","request_id":"2"}"#);
    dsub.wait_log(r#""request_id":"2","sender":"vm-gui"}"#);
}

both_brokers!(guest_and_dom0_exchange: guest_and_dom0_exchange_embedded, guest_and_dom0_exchange_mosquitto);

/// A CONNECT with another VM's client id is refused (identifier rejected, logged at warn); an
/// empty one becomes the VM's name (Mosquitto's own log shows the client id and user name).
#[test]
fn identity_is_the_channel() {
    let dir = TestDir::new("identity");
    let dom0 = Dom0::start(&dir, BrokerKind::Mosquitto, &[]);
    let ch = Channel::new(&dir.path, "vm-gui");
    ch.consume_attach_signal();
    let mut g = ch.guest();
    assert_eq!(
        raw::connect_until_connack(&mut g, "sys-usb", 5, DEADLINE),
        2,
        "identifier rejected"
    );
    dom0.proc.wait_log("WARN");
    assert!(
        dom0.log().contains(
            "link{vm=vm-gui}: CONNECT with another VM's client id refused claimed=\"sys-usb\""
        ),
        "{}",
        dom0.log()
    );

    assert_eq!(
        raw::connect_until_connack(&mut g, "", 5, DEADLINE),
        0,
        "an empty id is accepted"
    );
    let mosquitto = dom0.mosquitto.as_ref().unwrap();
    // The broker session is the VM's, and persistent (c0): it outlives the link.
    mosquitto.wait_log("as vm-gui (p2, c0, k5, u'vm-gui')");
}

/// Garbage (with a header declaring 200 MB) before CONNECT, a packet cut off by a guest restart,
/// and a CONNECT on a live session: each ends with a working session, and Dom0's memory stays flat.
fn resync(kind: BrokerKind) {
    let dir = TestDir::new("resync");
    let dom0 = Dom0::start(&dir, kind, &[]);
    let ch = Channel::new(&dir.path, "vm-gui");
    ch.consume_attach_signal();
    let rss_before = dom0.proc.rss_kb();
    let mut g = ch.guest();

    // Works when the guest can subscribe and receive what Dom0 publishes.
    let works = |g: &mut system_tests::channel::GuestTty, pkid: u16| {
        let from = g.seen.len();
        g.write(&raw::subscribe(pkid, RESPONSE, 0));
        g.read_until("SUBACK", DEADLINE, |b| {
            raw::packets(&b[from.min(b.len())..])
                .iter()
                .any(|(t, body)| *t == 0x90 && body[..2] == pkid.to_be_bytes())
        });
        let marker = format!("{{\"status\":\"ok\",\"n\":{pkid}}}");
        dom0.publish(RESPONSE, &marker);
        g.read_until("Dom0's publish", DEADLINE, |b| {
            String::from_utf8_lossy(&b[from.min(b.len())..]).contains(&marker)
        });
    };

    // 1. Garbage, including a PUBLISH header that declares 200 MB, then a CONNECT.
    let mut garbage = vec![0x30, 0x80, 0x80, 0xE8, 0x5F];
    garbage.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    g.write(&garbage);
    assert_eq!(raw::connect_until_connack(&mut g, "vm-gui", 5, DEADLINE), 0);
    works(&mut g, 1);

    // 2. Half a packet, then the guest "restarts" and connects again.
    let p = raw::publish("system/events/error/notification", &[b'x'; 200]);
    g.write(&p[..100]);
    assert_eq!(raw::connect_until_connack(&mut g, "vm-gui", 5, DEADLINE), 0);
    works(&mut g, 2);

    // 3. A CONNECT on the live session ends it and starts a new one.
    assert_eq!(raw::connect_until_connack(&mut g, "vm-gui", 5, DEADLINE), 0);
    works(&mut g, 3);

    let rss_after = dom0.proc.rss_kb();
    assert!(
        rss_after < rss_before + 16 * 1024,
        "Dom0 RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(rss_after < 128 * 1024, "Dom0 RSS {rss_after} KiB");
}

both_brokers!(resync: resync_embedded, resync_mosquitto);

/// A socket created after start is linked; removed and re-created, it is linked again; a backend
/// that refuses connections is retried with a growing delay, not in a busy loop.
fn vm_lifecycle(kind: BrokerKind) {
    let dir = TestDir::new("lifecycle");
    let dom0 = Dom0::start(&dir, kind, &[]);

    let ch = Channel::new(&dir.path, "vm-gui");
    dom0.proc.wait_log("link{vm=vm-gui}: attached to channel");
    ch.consume_attach_signal();
    let mut g = ch.guest();
    assert_eq!(raw::connect_until_connack(&mut g, "vm-gui", 5, DEADLINE), 0);

    // VM destroyed: the socket goes away.
    ch.shutdown();
    dom0.proc
        .wait_log("channel socket removed; link stopped vm=vm-gui");
    // VM rebooted: a new socket, linked again, and the guest gets a session again.
    ch.serve();
    dom0.proc
        .wait_log_count("link{vm=vm-gui}: attached to channel", 2);
    ch.consume_attach_signal();
    assert_eq!(raw::connect_until_connack(&mut g, "vm-gui", 5, DEADLINE), 0);

    // A backend that refuses: retried with backoff.
    let other = Channel::unserved(&dir.path, "sys-usb");
    other.refuse();
    dom0.proc
        .wait_log("link{vm=sys-usb}: channel socket still not accepting attempts=5");
    let times: Vec<f64> = dom0
        .log()
        .lines()
        .filter(|l| l.contains("vm=sys-usb") && l.contains("not accepting"))
        .map(timestamp_secs)
        .collect();
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 4, "{gaps:?}");
    for w in gaps.windows(2) {
        assert!(
            w[1] >= w[0] * 1.5,
            "the delay between attempts grows: {gaps:?}"
        );
    }
    other.serve();
    dom0.proc.wait_log("link{vm=sys-usb}: attached to channel");
}

both_brokers!(vm_lifecycle: vm_lifecycle_embedded, vm_lifecycle_mosquitto);

/// Seconds within the day of a tracing timestamp (`2026-11-22T02:39:08.949404Z ...`).
fn timestamp_secs(line: &str) -> f64 {
    let t = &line[11..26];
    let h: f64 = t[0..2].parse().unwrap();
    let m: f64 = t[3..5].parse().unwrap();
    let s: f64 = t[6..].parse().unwrap();
    h * 3600.0 + m * 60.0 + s
}

/// The external Mosquitto is killed and restarted: the links recover without restarting the service.
#[test]
fn broker_restart() {
    let dir = TestDir::new("brokerrestart");
    let mut dom0 = Dom0::start(&dir, BrokerKind::Mosquitto, &[]);
    let ch = Channel::new(&dir.path, "vm-gui");
    ch.consume_attach_signal();
    let bridge = Bridge::new(&dir, &ch);
    let guest = bridge.rumqttc("vm-gui", &[RESPONSE]);
    guest.wait_subscribed();
    dom0.publish(RESPONSE, r#"{"status":"ok","n":1}"#);
    assert!(guest.recv_on(RESPONSE, DEADLINE).is_some());

    let pid = dom0.proc.pid();
    drop(dom0.mosquitto.take());
    dom0.proc.wait_log("broker closed the connection");
    dom0.mosquitto = Some(system_tests::start_mosquitto(&dir, dom0.port, ""));
    guest.wait_subscribed();
    assert!(dom0.proc.is_running());
    assert_eq!(dom0.proc.pid(), pid);
    dom0.publish(RESPONSE, r#"{"status":"ok","n":2}"#);
    let got = guest
        .recv_on(RESPONSE, DEADLINE)
        .expect("message after the broker restart");
    assert!(String::from_utf8_lossy(&got).contains("\"n\":2"));
}

/// Dom0 restarts under a guest that believes its session alive: the attach signal makes it
/// reconnect at once, without waiting for its keepalive to expire.
fn dom0_restart_tells_guests_to_reconnect(kind: BrokerKind) {
    let dir = TestDir::new("dom0restart");
    let mut dom0 = Dom0::start(&dir, kind, &[]);
    let ch = Channel::new(&dir.path, "vm-gui");
    ch.consume_attach_signal();
    let mut g = ch.guest();
    assert_eq!(
        raw::connect_until_connack(&mut g, "vm-gui", 60, DEADLINE),
        0
    );
    let from = g.seen.len();
    dom0.restart(&dir, kind, &[]);
    g.read_until("the attach signal", DEADLINE, |b| {
        b[from..].windows(2).any(|w| w == raw::DISCONNECT)
    });
}

both_brokers!(dom0_restart_tells_guests_to_reconnect: dom0_restart_tells_guests_to_reconnect_embedded, dom0_restart_tells_guests_to_reconnect_mosquitto);

/// SIGTERM stops the service, leaving no operator socket behind.
#[test]
fn sigterm_stops_cleanly() {
    let dir = TestDir::new("sigterm");
    let op = dir.join("op.sock");
    let op_arg = op.display().to_string();
    let mut dom0 = Dom0::start(&dir, BrokerKind::Embedded, &["--operator-socket", &op_arg]);
    let _ch = Channel::new(&dir.path, "vm-gui");
    dom0.proc.wait_log("link{vm=vm-gui}: attached to channel");
    assert!(op.exists());
    // The operator socket reaches the broker (mosquitto_sub --unix).
    let out = std::process::Command::new("mosquitto_pub")
        .arg("--unix")
        .arg(&op)
        .args(["-t", "system/events/error/notification", "-m", "{}"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dom0.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(dom0.proc.wait_exit(DEADLINE), Some(0));
    assert!(!op.exists(), "stale operator socket");
}

/// Component discovery answered with the linked VMs, to a Dom0 client and to a guest.
fn discover_lists_linked_vms(kind: BrokerKind) {
    let dir = TestDir::new("discover");
    let dom0 = Dom0::start(&dir, kind, &[]);
    let gui = Channel::new(&dir.path, "vm-gui");
    let _usb = Channel::new(&dir.path, "sys-usb");
    dom0.proc.wait_log("link{vm=sys-usb}: attached to channel");
    dom0.proc.wait_log("link{vm=vm-gui}: attached to channel");
    let sub = dom0.subscribe(&dir, &["system/components/discover/response/dom0"]);
    dom0.publish(
        "system/components/discover/request",
        r#"{"sender":"dom0","request_id":"d1"}"#,
    );
    sub.wait_log("\"request_id\":\"d1\"");
    let line = sub
        .output()
        .lines()
        .find(|l| l.contains("d1"))
        .unwrap()
        .to_owned();
    for id in ["\"id\":\"dom0\"", "\"id\":\"sys-usb\"", "\"id\":\"vm-gui\""] {
        assert!(line.contains(id), "{line}");
    }

    // From the guest, through its link and the policy.
    gui.consume_attach_signal();
    let bridge = Bridge::new(&dir, &gui);
    let guest = bridge.rumqttc("vm-gui", &["system/components/discover/response/vm-gui"]);
    guest.wait_subscribed();
    guest.publish(
        "system/components/discover/request",
        br#"{"sender":"vm-gui"}"#,
    );
    let got = guest
        .recv_on("system/components/discover/response/vm-gui", DEADLINE)
        .expect("discover answer");
    assert!(String::from_utf8_lossy(&got).contains("\"id\":\"sys-usb\""));
}

both_brokers!(discover_lists_linked_vms: discover_lists_linked_vms_embedded, discover_lists_linked_vms_mosquitto);

/// A guest that never reads while Dom0 floods its topic is dropped alone; another VM's round trip
/// keeps working during the flood.
fn a_guest_that_does_not_read_is_dropped_alone(kind: BrokerKind) {
    let dir = TestDir::new("isolation");
    let conf = dir.join("dom0.toml");
    std::fs::write(
        &conf,
        "[limits]\nqueue_bytes = 65536\nmax_packet_size = 16384\n",
    )
    .unwrap();
    let conf_arg = conf.display().to_string();
    let dom0 = Dom0::start(&dir, kind, &["--config", &conf_arg]);

    // vm-gui subscribes to the notifications, then never reads its tty again.
    let gui = Channel::new(&dir.path, "vm-gui");
    gui.consume_attach_signal();
    let mut g = gui.guest();
    assert_eq!(
        raw::connect_until_connack(&mut g, "vm-gui", 60, DEADLINE),
        0
    );
    g.write(&raw::subscribe(1, "system/+/+/notification", 0));
    g.read_until("SUBACK", DEADLINE, |b| {
        raw::packets(b).iter().any(|(t, _)| *t == 0x90)
    });

    // sys-usb answers requests (a round trip Dom0 → sys-usb → Dom0).
    let usb = Channel::new(&dir.path, "sys-usb");
    usb.consume_attach_signal();
    let bridge = Bridge::new(&dir, &usb);
    let provider = bridge.rumqttc("sys-usb", &["system/disks/+/request"]);
    provider.wait_subscribed();
    let replies = dom0.subscribe(&dir, &["system/disks/list_disks/response/dom0"]);

    // The flood: 1 KiB notifications, far more than vm-gui's 64 KiB queue and the buffers before it.
    let line = "x".repeat(1000);
    let mut flood = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &dom0.port.to_string(),
            "-t",
            "system/disk/new_file/notification",
            "-l",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = flood.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        for _ in 0..20_000 {
            if writeln!(stdin, "{line}").is_err() {
                break;
            }
        }
    });

    // Round trips through sys-usb while vm-gui is flooded.
    for i in 0..5 {
        let id = format!("rt{i}");
        dom0.publish(
            "system/disks/list_disks/request",
            &format!(r#"{{"sender":"dom0","request_id":"{id}"}}"#),
        );
        let req = provider
            .recv_on("system/disks/list_disks/request", DEADLINE)
            .expect("sys-usb got the request");
        assert!(String::from_utf8_lossy(&req).contains(&id));
        provider.publish(
            "system/disks/list_disks/response/dom0",
            format!(r#"{{"status":"ok","request_id":"{id}","disks":[]}}"#).as_bytes(),
        );
        replies.wait_log(&format!("\"request_id\":\"{id}\""));
    }
    dom0.proc
        .wait_log("link{vm=vm-gui}: guest does not read; dropping its session");
    writer.join().unwrap();
    let _ = flood.wait();
    assert!(
        !dom0
            .log()
            .contains("link{vm=sys-usb}: guest does not read; dropping its session")
    );
}

both_brokers!(a_guest_that_does_not_read_is_dropped_alone: a_guest_that_does_not_read_is_dropped_alone_embedded, a_guest_that_does_not_read_is_dropped_alone_mosquitto);

/// A bad config or an unreachable broker: one line naming the problem, exit 64 / 69.
#[test]
fn bad_config_and_unreachable_broker_exit_cleanly() {
    let dir = TestDir::new("exitcodes");
    let conf = dir.join("bad.toml");
    std::fs::write(&conf, "listen = \"127.0.0.1:1\"\nlimits = 5\n").unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(system_tests::bin("dom0-broker"))
            .arg("run")
            .arg("--socket-dir")
            .arg(&dir.path)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let conf_arg = conf.display().to_string();
    let (code, err) = run(&["--config", &conf_arg]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.starts_with(&format!("dom0-broker: {conf_arg}:")) && err.lines().count() == 1,
        "{err}"
    );
    let (code, err) = run(&["--listen", "0.0.0.0:1883"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("not loopback"), "{err}");
    let port = system_tests::free_port();
    let (code, err) = run(&["--broker", &format!("mqtt://127.0.0.1:{port}")]);
    assert_eq!(code, Some(69), "{err}");
    assert!(
        err.contains("unreachable") && err.lines().count() == 1,
        "{err}"
    );
    let (code, err) = run(&["--broker", "http://x"]);
    assert_eq!(code, Some(64), "{err}");
}

/// A guest CONNECT with keepalive 0 (legal MQTT, used by PSEC guests, refused by rumqttd) gets a
/// working session with either broker.
fn keepalive_zero(kind: BrokerKind) {
    let dir = TestDir::new("keepalive0");
    let dom0 = Dom0::start(&dir, kind, &[]);
    let ch = Channel::new(&dir.path, "vm-gui");
    ch.consume_attach_signal();
    let mut g = ch.guest();
    assert_eq!(raw::connect_until_connack(&mut g, "vm-gui", 0, DEADLINE), 0);
    let from = g.seen.len();
    g.write(&raw::subscribe(1, RESPONSE, 0));
    g.read_until("SUBACK", DEADLINE, |b| {
        raw::packets(&b[from..]).iter().any(|(t, _)| *t == 0x90)
    });
    dom0.publish(RESPONSE, r#"{"status":"ok","k":0}"#);
    g.read_until("the publish", DEADLINE, |b| {
        String::from_utf8_lossy(b).contains("\"k\":0")
    });
}

both_brokers!(keepalive_zero: keepalive_zero_embedded, keepalive_zero_mosquitto);
