//! Table tests of the legacy translation: lines and deliveries in, lines and publications out.

use super::*;
use crate::policy::Policy;
use serde_json::{Value, json};

fn vm(s: &str) -> VmId {
    VmId::parse(s).unwrap()
}

fn line_json(out: &Out) -> Value {
    match out {
        Out::Line(l) => serde_json::from_slice(l).unwrap(),
        other => panic!("not a line: {other:?}"),
    }
}

#[test]
fn a_command_becomes_a_request_as_the_vm() {
    let mut l = LegacyMode::new(vm("vm-old"));
    let now = Instant::now();
    let out = l.on_guest(
        br#"{"type":"commande","source":"sys-usb","destination":"sys-usb","payload":{"commande":"liste_fichiers","arguments":{"disk":"usb0","sender":"sys-usb"}}}
"#,
        now,
    );
    let [Out::Publish { topic, payload }] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(topic, "system/disks/list_files/request");
    let p: Value = serde_json::from_slice(payload).unwrap();
    assert_eq!(
        p["sender"], "vm-old",
        "the channel's identity, not the claimed source"
    );
    assert_eq!(p["destination"], "sys-usb");
    assert_eq!(p["disk"], "usb0");
    let id = p["request_id"].as_str().unwrap().to_owned();
    // The answer comes back as an MVP line; no timeout follows.
    let resp = format!(
        r#"{{"status":"ok","request_id":"{id}","responder":"sys-usb","disk":"usb0","files":[]}}"#
    );
    let line = l
        .on_broker("system/disks/list_files/response/vm-old", resp.as_bytes())
        .unwrap();
    let v: Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(v["type"], "reponse");
    assert_eq!(v["source"], "sys-usb");
    assert_eq!(v["payload"]["commande"], "liste_fichiers");
    assert!(l.on_tick(now + ANSWER_TIMEOUT).is_empty());
}

#[test]
fn unanswered_commands_time_out() {
    let mut l = LegacyMode::new(vm("vm-old"));
    let now = Instant::now();
    l.on_guest(
        b"{\"type\":\"commande\",\"destination\":\"tous\",\"payload\":{\"commande\":\"liste_composants\"}}\n",
        now,
    );
    let window = Duration::from_millis(legacy_line::ALL_WINDOW_MS);
    assert_eq!(l.next_deadline(), Some(now + window));
    assert!(
        l.on_tick(now + window - Duration::from_millis(1))
            .is_empty()
    );
    let lines = l.on_tick(now + window);
    let v: Value = serde_json::from_slice(&lines[0]).unwrap();
    assert_eq!(v["payload"]["erreur"]["code"], "timeout");
    assert_eq!(l.next_deadline(), None);
}

#[test]
fn bad_lines_are_answered_and_the_next_one_works() {
    let mut l = LegacyMode::new(vm("vm-old"));
    let now = Instant::now();
    let out = l.on_guest(b"garbage\n{\"type\":\"x\",\"payload\":{}}\r\n\n", now);
    assert_eq!(out.len(), 2);
    for o in &out {
        assert_eq!(line_json(o)["type"], "erreur");
    }
    // A line split across reads.
    assert!(
        l.on_guest(b"{\"type\":\"commande\",\"destination\":\"Dom0\",", now)
            .is_empty()
    );
    assert!(!l.partial().is_empty());
    let out = l.on_guest(b"\"payload\":{\"commande\":\"LISTE_COMPOSANTS\"}}\n", now);
    assert!(
        matches!(&out[..], [Out::Publish { topic, .. }] if topic == "system/components/discover/request")
    );
    // An over-long line: one error, then its rest is skipped.
    let out = l.on_guest(&vec![b'{'; legacy_line::MAX_LINE + 10], now);
    assert_eq!(out.len(), 1);
    assert!(l.on_guest(b"more of it\n", now).is_empty());
}

#[test]
fn deliveries_become_lines_the_mvp_knows() {
    let mut l = LegacyMode::new(vm("sys-old"));
    let note = l
        .on_broker(
            "system/disk/new_file/notification",
            br#"{"disk":"usb0","filepath":"a","size_in_bytes":1}"#,
        )
        .unwrap();
    let v: Value = serde_json::from_slice(&note).unwrap();
    assert_eq!(v["payload"]["evenement"], "fichier");
    // A request it serves (an MVP sys-usb), unless addressed to another VM.
    let req = l
        .on_broker(
            "system/disks/list_disks/request",
            br#"{"sender":"vm-gui","request_id":"r"}"#,
        )
        .unwrap();
    let v: Value = serde_json::from_slice(&req).unwrap();
    assert_eq!(
        v,
        json!({"type":"commande","source":"vm-gui","destination":"sys-old","payload":{"commande":"liste_disques","arguments":{"request_id":"r"}}})
    );
    assert!(
        l.on_broker(
            "system/disks/list_disks/request",
            br#"{"sender":"vm-gui","destination":"sys-usb"}"#
        )
        .is_none()
    );
    assert!(
        l.on_broker("system/disks/list_disks/response/vm-gui", b"{}")
            .is_none(),
        "not its response"
    );
    // Its answer is published as itself.
    let out = l.on_guest(
        b"{\"type\":\"reponse\",\"source\":\"x\",\"destination\":\"vm-gui\",\"payload\":{\"commande\":\"liste_disques\",\"data\":{\"disks\":[]}}}\n",
        Instant::now(),
    );
    let [Out::Publish { topic, payload }] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(topic, "system/disks/list_disks/response/vm-gui");
    let p: Value = serde_json::from_slice(payload).unwrap();
    assert_eq!(p["responder"], "sys-old");
}

#[test]
fn subscriptions_follow_the_policy() {
    let policy = Policy::builtin();
    let gui = LegacyMode::subscriptions(&vm("vm-gui"), &policy.rules_for(&vm("vm-gui")));
    assert_eq!(
        gui,
        [
            "system/+/+/response/vm-gui",
            "system/+/+/notification",
            "system/components/discover/request",
            "system/misc/benchmark/request"
        ]
    );
    let usb = LegacyMode::subscriptions(&vm("sys-usb"), &policy.rules_for(&vm("sys-usb")));
    assert!(usb.contains(&"system/disks/+/request".to_owned()));
    assert!(!usb.contains(&"system/+/+/notification".to_owned()));
}

#[test]
fn refusals_are_told_to_the_guest() {
    let mut l = LegacyMode::new(vm("vm-old"));
    let line = l.refused(
        "system/disks/create_file/request",
        br#"{"sender":"vm-old","request_id":"legacy-1"}"#,
        "no rule allows it",
    );
    let v: Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(v["payload"]["commande"], "file_creation");
    assert_eq!(v["payload"]["erreur"]["code"], "forbidden");
    assert!(looks_legacy(b"  {\"type\""));
    assert!(!looks_legacy(b"\x10\x0c"));
    assert!(!looks_legacy(b""));
}
