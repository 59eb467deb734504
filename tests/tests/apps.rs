//! Guest applications through the agents' local MQTT endpoints: any client, application topics,
//! many clients multiplexed over each guest's one channel session, Dom0 in between, both brokers.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use system_tests::local::{LocalClient, mosquitto_pub_unix, mosquitto_sub_unix};
use system_tests::scene::{Scene, SceneOptions, policy_opening};
use system_tests::{BrokerKind, DEADLINE, wait_for};

/// The default roles, and application topics opened: each VM publishes under `app/<itself>/`,
/// and reads all of `app/`.
fn app_policy() -> String {
    policy_opening("app/#", "app/{vm}/#")
}

const STATUS: &str = "app/sys-usb/status";

/// Dom0 and the two agents, under `policy` (None: the default policy).
fn scene(name: &str, kind: BrokerKind, policy: Option<&str>) -> Scene {
    scene_with(name, kind, policy, "")
}

/// The same, with `gui_config` as vm-gui's agent config file.
fn scene_with(name: &str, kind: BrokerKind, policy: Option<&str>, gui_config: &str) -> Scene {
    Scene::start(
        name,
        kind,
        SceneOptions {
            policy,
            gui_config,
            ..Default::default()
        },
    )
}

/// mosquitto_sub on vm-gui's endpoint gets what mosquitto_pub on sys-usb's publishes.
fn application_topics_between_two_vms(kind: BrokerKind) {
    let s = scene("app-topics", kind, Some(&app_policy()));
    let sub = mosquitto_sub_unix(&s.dir, "gui-sub", &s.gui.mqtt, &[STATUS]);
    let out = mosquitto_pub_unix(&s.usb.mqtt, STATUS, "disk inserted");
    assert!(out.status.success(), "{out:?}");
    sub.wait_log(&format!("{STATUS} disk inserted"));
    assert_eq!(sub.output().matches("disk inserted").count(), 1);
}

both_brokers!(application_topics_between_two_vms: application_topics_between_two_vms_embedded, application_topics_between_two_vms_mosquitto);

/// Under the default policy the subscription is refused, mosquitto_sub says so, nothing arrives.
fn default_policy_refuses_application_topics(kind: BrokerKind) {
    let s = scene("app-refused", kind, None);
    let mut sub = Command::new("mosquitto_sub")
        .arg("--unix")
        .arg(&s.gui.mqtt)
        .args(["-d", "-q", "1", "-t", STATUS])
        .output()
        .unwrap();
    // mosquitto_sub ends by itself when all its subscriptions are denied.
    let said =
        String::from_utf8_lossy(&sub.stdout).into_owned() + &String::from_utf8_lossy(&sub.stderr);
    assert!(
        said.contains("All subscription requests were denied"),
        "{said}"
    );
    assert!(said.contains("Subscribed (mid: 1): 128"), "{said}");
    sub.stdout.clear();
    // A local client that may read notifications sees sys-usb's publish refused, and never the
    // message itself.
    let watcher = LocalClient::connect(&s.gui.mqtt, "watcher");
    assert_eq!(
        watcher.subscribe(&["app/#", "system/events/error/notification"]),
        [false, true],
        "refused to the client that asked, the other filter granted"
    );
    let out = mosquitto_pub_unix(&s.usb.mqtt, STATUS, "secret");
    assert!(
        out.status.success(),
        "a refused QoS 1 publish is acknowledged"
    );
    let mut seen = Vec::new();
    let refused = (0..100).find_map(|_| {
        let (topic, payload) = watcher.recv(DEADLINE)?;
        seen.push(topic.clone());
        let text = String::from_utf8_lossy(&payload).into_owned();
        (text.contains("sys-usb") && text.contains(STATUS)).then_some(text)
    });
    assert!(refused.is_some(), "no refusal report: {seen:?}");
    assert!(!seen.iter().any(|t| t == STATUS), "{seen:?}");
}

both_brokers!(default_policy_refuses_application_topics: default_policy_refuses_application_topics_embedded, default_policy_refuses_application_topics_mosquitto);

/// A rumqttc application asks list_disks of sys-usb while `domu-agent call` does the same.
#[test]
fn a_library_client_and_call_at_the_same_moment() {
    let s = scene("app-rumqttc", BrokerKind::Embedded, None);
    let app = LocalClient::connect(&s.gui.mqtt, "inventory-app");
    let response = "system/disks/list_disks/response/vm-gui";
    assert_eq!(app.subscribe(&[response]), [true]);
    let gui = &s.gui;
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let call = scope.spawn(|| gui.call("list_disks", &[]));
        let body = json!({"sender": "vm-gui", "request_id": "app-1"}).to_string();
        app.publish("system/disks/list_disks/request", body.as_bytes());
        let mut mine = Vec::new();
        while mine.is_empty() {
            let (topic, payload) = app.recv(DEADLINE).expect("no answer for the application");
            assert_eq!(topic, response);
            let v: Value = serde_json::from_slice(&payload).unwrap();
            if v["request_id"] == "app-1" {
                mine.push(v);
            }
        }
        let (ok, lines) = call.join().unwrap();
        assert!(ok, "{lines:?}");
        assert_eq!(lines[0]["disks"][0]["id"], "usb0", "{lines:?}");
        mine
    });
    assert_eq!(answers[0]["status"], "ok");
    assert_eq!(answers[0]["disks"][0]["id"], "usb0", "{answers:?}");
}

/// The payloads `c` receives up to `marker` (excluded).
fn payloads_until(c: &LocalClient, marker: &[u8]) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    loop {
        let (_, p) = c.recv(DEADLINE).expect("the marker never came");
        if p == marker {
            return v;
        }
        v.push(p);
    }
}

/// Overlapping subscriptions: one copy each; when one leaves, the other keeps receiving.
fn overlapping_subscriptions(kind: BrokerKind) {
    let s = scene("app-overlap", kind, Some(&app_policy()));
    let a = LocalClient::connect(&s.gui.mqtt, "dashboard");
    let b = LocalClient::connect(&s.gui.mqtt, "status-panel");
    assert_eq!(a.subscribe(&["app/#", "app/+/status"]), [true, true]);
    assert_eq!(b.subscribe(&[STATUS]), [true]);
    let publisher = LocalClient::connect(&s.usb.mqtt, "usb-daemon");
    for i in 0..5 {
        publisher.publish_acked(STATUS, format!("n{i}").as_bytes());
    }
    publisher.publish_acked(STATUS, b"end");
    let expected: Vec<Vec<u8>> = (0..5).map(|i| format!("n{i}").into_bytes()).collect();
    assert_eq!(
        payloads_until(&a, b"end"),
        expected,
        "one copy for the dashboard"
    );
    assert_eq!(
        payloads_until(&b, b"end"),
        expected,
        "one copy for the panel"
    );
    // One unsubscribes one of its filters: both still receive, once.
    a.unsubscribe("app/+/status");
    publisher.publish_acked(STATUS, b"after-unsubscribe");
    publisher.publish_acked(STATUS, b"end");
    assert_eq!(payloads_until(&a, b"end"), [b"after-unsubscribe".to_vec()]);
    assert_eq!(payloads_until(&b, b"end"), [b"after-unsubscribe".to_vec()]);
    // It disconnects: the other keeps receiving, once.
    drop(a);
    publisher.publish_acked(STATUS, b"after-disconnect");
    publisher.publish_acked(STATUS, b"end");
    let got = payloads_until(&b, b"end");
    if got != [b"after-disconnect".to_vec()] {
        eprintln!(
            "GUI AGENT LOG\n{}\nDOM0 LOG\n{}",
            s.gui.proc.output(),
            s.dom0.log()
        );
    }
    assert_eq!(got, [b"after-disconnect".to_vec()]);
}

both_brokers!(overlapping_subscriptions: overlapping_subscriptions_embedded, overlapping_subscriptions_mosquitto);

/// Dom0 restarts: local clients stay connected and receive again; a QoS 1 message published
/// during the outage arrives exactly once.
fn dom0_restart_keeps_local_clients(kind: BrokerKind) {
    let mut s = scene("app-restart", kind, Some(&app_policy()));
    let panel = LocalClient::connect(&s.gui.mqtt, "panel");
    assert_eq!(panel.subscribe(&[STATUS]), [true]);
    let publisher = LocalClient::connect(&s.gui.mqtt, "gui-events");
    let usb_app = LocalClient::connect(&s.usb.mqtt, "usb-daemon");
    publisher.publish_acked("app/vm-gui/event", b"before");

    // Dom0 stops; vm-gui's application publishes while it is away.
    s.dom0.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(s.dom0.proc.wait_exit(DEADLINE).is_some());
    publisher.publish("app/vm-gui/event", b"during-outage");
    // vm-gui's channel is not served until a Dom0 subscriber is back, so the message cannot
    // arrive before someone listens for it (with the embedded broker, the broker restarts too).
    s.gui_ch.refuse();
    let args = s.dom0_args.clone();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    s.dom0.restart(&s.dir, kind, &args);
    let dom0_sub = s.dom0.subscribe(&s.dir, &["app/vm-gui/event"]);
    s.gui_ch.serve();
    dom0_sub.wait_log("app/vm-gui/event during-outage");
    publisher.publish_acked("app/vm-gui/event", b"after-restart");
    dom0_sub.wait_log("app/vm-gui/event after-restart");
    assert_eq!(
        dom0_sub.output().matches("during-outage").count(),
        1,
        "exactly once"
    );
    // The panel receives again once both sessions are back (its subscription renewed).
    let mut i = 0;
    wait_for("the panel to receive after the restart", DEADLINE, || {
        i += 1;
        usb_app.publish(STATUS, format!("back-{i}").as_bytes());
        panel
            .recv(Duration::from_millis(200))
            .is_some_and(|(t, _)| t == STATUS)
    });
    for c in [&panel, &publisher, &usb_app] {
        assert_eq!(*c.connacks.lock().unwrap(), 1, "a local client reconnected");
    }
}

both_brokers!(dom0_restart_keeps_local_clients: dom0_restart_keeps_local_clients_embedded, dom0_restart_keeps_local_clients_mosquitto);

/// A local client that stops reading is dropped alone; another client's round trips go on.
#[test]
fn a_client_that_stops_reading_is_dropped_alone() {
    use std::io::Write;
    // A small queue per client, so a few megabytes overflow it.
    let s = scene_with(
        "app-slow",
        BrokerKind::Embedded,
        Some(&app_policy()),
        "[local]\nclient_queue = 32\n",
    );
    // A raw client: CONNECT, SUBSCRIBE app/#, then never reads.
    let mut slow = std::os::unix::net::UnixStream::connect(&s.gui.mqtt).unwrap();
    slow.write_all(b"\x10\x11\x00\x04MQTT\x04\x02\x00\x00\x00\x05stuck")
        .unwrap();
    slow.write_all(b"\x82\x0a\x00\x01\x00\x05app/#\x00")
        .unwrap();
    let worker = LocalClient::connect(&s.gui.mqtt, "worker");
    let response = "system/disks/list_disks/response/vm-gui";
    assert_eq!(worker.subscribe(&[response]), [true]);
    s.gui.proc.wait_log("client=stuck");
    // sys-usb floods app/sys-usb/bulk with 16 KiB messages until the stuck client is dropped. How
    // many it takes is not fixed: the embedded broker skips messages for a subscriber that lags
    // (QoS 0), so the bytes reaching vm-gui vary from run to run.
    let usb_mqtt: PathBuf = s.usb.mqtt.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = stop.clone();
    let flood = std::thread::spawn(move || {
        let p = LocalClient::connect(&usb_mqtt, "flood");
        let chunk = vec![b'x'; 16 * 1024];
        let started = std::time::Instant::now();
        while !flooding.load(std::sync::atomic::Ordering::Relaxed) && started.elapsed() < DEADLINE {
            p.publish("app/sys-usb/bulk", &chunk);
        }
        p.publish_acked("app/sys-usb/bulk", b"end");
    });
    let started = std::time::Instant::now();
    let mut round_trips = 0;
    let mut dropped = false;
    while !dropped || round_trips < 5 {
        round_trips += 1;
        let id = format!("rt-{round_trips}");
        let body = json!({"sender": "vm-gui", "request_id": id}).to_string();
        worker.publish("system/disks/list_disks/request", body.as_bytes());
        loop {
            let (_, payload) = worker
                .recv(DEADLINE)
                .expect("a round trip failed during the flood");
            let v: Value = serde_json::from_slice(&payload).unwrap();
            if v["request_id"] == id.as_str() {
                break;
            }
        }
        dropped = s
            .gui
            .proc
            .output()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("client=stuck "));
        assert!(
            started.elapsed() < DEADLINE,
            "the slow client was never dropped ({round_trips} round trips)"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    let log = s.gui.proc.output();
    let dropped = |who: &str| {
        log.lines()
            .any(|l| l.contains("WARN") && l.contains(&format!("client={who} ")))
    };
    assert!(dropped("stuck"), "{log}");
    assert!(!dropped("worker"), "{log}");
    // What the embedded broker skipped for vm-gui's link while it lagged is counted, and its log
    // stays within its budget (5 lines a second; it was 2 or 3 lines per MiB of the flood).
    let dom0_log = s.dom0.proc.output();
    let skipped = dom0_log
        .lines()
        .filter(|l| l.contains("dropped messages for a client"))
        .count();
    let budget = 5 * (started.elapsed().as_secs() as usize + 2);
    assert!(
        skipped <= budget,
        "{skipped} lines (budget {budget}): {dom0_log}"
    );
    assert!(!dom0_log.contains("jump"), "{dom0_log}");
    assert_eq!(*worker.connacks.lock().unwrap(), 1);
    let (ok, _) = s.gui.call("list_disks", &[]);
    assert!(ok, "the agent's own service goes on");
}

/// MQTT 5 and 3.1 clients are told the protocol is not supported; they never hang.
#[test]
fn other_protocol_versions_are_refused_at_once() {
    let s = scene("app-v5", BrokerKind::Embedded, Some(&app_policy()));
    for version in ["mqttv5", "mqttv31"] {
        let out = Command::new("timeout")
            .args(["10", "mosquitto_sub", "--unix"])
            .arg(&s.gui.mqtt)
            .args(["-V", version, "-t", STATUS, "-C", "1"])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(124), "{version} hung");
        assert!(!out.status.success(), "{version}");
        assert!(
            said.to_lowercase().contains("protocol version")
                || said.to_lowercase().contains("unacceptable"),
            "{version}: {said}"
        );
    }
    let _ = (&s.usb_ch, &s.usb);
}
