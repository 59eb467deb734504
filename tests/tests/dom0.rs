//! The Dom0 service: links, identity, resynchronisation, VM lifecycle, broker restarts, isolation.

use crate::support::channel::Channel;
use crate::support::guest::Bridge;
use crate::support::{BrokerKind, DEADLINE, Dom0, TestDir};

const RESPONSE: &str = "system/disks/list_disks/response/vm-gui";
const REQUEST: &str = "system/disks/list_disks/request";

/// Off-the-shelf clients in the guest (mosquitto_sub/pub through socat on the pty) exchange
/// messages with mosquitto_pub/sub on Dom0, through the service.
fn guest_and_dom0_exchange(kind: BrokerKind) {
    let dir = TestDir::new("exchange");
    let dom0 = Dom0::start(&dir, kind, &[]);
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
    dsub.wait_log(&format!(
        "{REQUEST} {{\"sender\":\"vm-gui\",\"request_id\":\"1\"}}"
    ));

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
    dsub.wait_log(&format!(
        "{REQUEST} {{\"sender\":\"vm-gui\",\"request_id\":\"2\"}}"
    ));
}

#[test]
fn guest_and_dom0_exchange_embedded() {
    guest_and_dom0_exchange(BrokerKind::Embedded);
}

#[test]
fn guest_and_dom0_exchange_mosquitto() {
    guest_and_dom0_exchange(BrokerKind::Mosquitto);
}
