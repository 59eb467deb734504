//! Attacks by off-the-shelf clients on a guest's channel (mosquitto_pub/sub through the guest
//! bridge), against the default policy: each is refused as specified, the legitimate traffic is
//! unaffected, and the refusal is visible on the error topic and in the log.

use std::process::Command;

use system_tests::channel::Channel;
use system_tests::guest::Bridge;
use system_tests::{
    Agent, BrokerKind, DEADLINE, Dom0, TestDir, bin, free_port, start_mosquitto, wait_for,
};

const ERRORS: &str = "system/events/error/notification";

struct Scene {
    dir: TestDir,
    dom0: Dom0,
    _usb_ch: Channel,
    _gui_ch: Channel,
    _usb: Agent,
    bridge: Bridge,
}

/// Dom0, sys-usb with its agent and one disk, vm-gui with a guest bridge for off-the-shelf clients.
fn scene(name: &str, kind: BrokerKind, dom0_args: &[&str]) -> Scene {
    let dir = TestDir::new(name);
    let disks = dir.join("disks");
    std::fs::create_dir_all(disks.join("usb0")).unwrap();
    let dom0 = Dom0::start(&dir, kind, dom0_args);
    let usb_ch = Channel::new(&dir.path, "sys-usb");
    let gui_ch = Channel::new(&dir.path, "vm-gui");
    dom0.proc.wait_log("link{vm=vm-gui}: attached to channel");
    let d = disks.display().to_string();
    let usb = Agent::start(&dir, &usb_ch, "sys-usb", &["--disks", &d]);
    gui_ch.consume_attach_signal();
    let bridge = Bridge::new(&dir, &gui_ch);
    Scene {
        dir,
        dom0,
        _usb_ch: usb_ch,
        _gui_ch: gui_ch,
        _usb: usb,
        bridge,
    }
}

/// A legitimate round trip Dom0 → sys-usb → Dom0 still works.
fn round_trip_works(s: &Scene, id: &str) {
    let sub = s
        .dom0
        .subscribe(&s.dir, &["system/disks/list_disks/response/dom0"]);
    s.dom0.publish(
        "system/disks/list_disks/request",
        &format!(r#"{{"sender":"dom0","request_id":"{id}"}}"#),
    );
    sub.wait_log(&format!("\"request_id\":\"{id}\""));
}

#[test]
fn impersonation_by_sender_is_refused() {
    let s = scene("imp-sender", BrokerKind::Embedded, &[]);
    let errors = s.dom0.subscribe(&s.dir, &[ERRORS]);
    let requests = s
        .dom0
        .subscribe(&s.dir, &["system/disks/list_disks/request"]);
    // vm-gui sends a request claiming to be sys-usb (its client id is right; its `sender` lies).
    let (ok, out) = s.bridge.publish(
        "vm-gui",
        "system/disks/list_disks/request",
        r#"{"sender":"sys-usb","request_id":"forged-7x"}"#,
    );
    assert!(ok, "the session stays sound (QoS 1 acknowledged): {out}");
    errors.wait_log("vm-gui: refused \\\"system/disks/list_disks/request\\\"");
    s.dom0
        .proc
        .wait_log("link{vm=vm-gui}: refused topic=\"system/disks/list_disks/request\"");
    assert!(
        !errors.output().contains("forged-7x"),
        "the payload is never reported"
    );
    // The same request with its own name goes through.
    let (ok, _) = s.bridge.publish(
        "vm-gui",
        "system/disks/list_disks/request",
        r#"{"sender":"vm-gui","request_id":"true"}"#,
    );
    assert!(ok);
    requests.wait_log("\"request_id\":\"true\"");
    assert!(
        !requests.output().contains("forged-7x"),
        "the forged request never reached the broker"
    );
    round_trip_works(&s, "after-imp");
}

#[test]
fn reading_another_vms_responses_is_refused() {
    let s = scene("snoop", BrokerKind::Embedded, &[]);
    let errors = s.dom0.subscribe(&s.dir, &[ERRORS]);
    for filter in [
        "system/disks/list_disks/response/sys-usb",
        "system/+/+/response/+",
        "#",
    ] {
        let mut sub = s.bridge.subscribe(
            &s.dir,
            "vm-gui",
            &[filter, "system/+/+/response/vm-gui"],
            &[],
        );
        // mosquitto_sub prints the granted QoS of each filter: 128 is a refusal.
        sub.wait_log("Subscribed (mid: 1): 128, 1");
        // Responses for sys-usb never reach vm-gui; its own still do.
        s.dom0.publish(
            "system/disks/list_disks/response/sys-usb",
            r#"{"status":"ok","secret":"for sys-usb"}"#,
        );
        s.dom0.publish(
            "system/disks/list_disks/response/vm-gui",
            r#"{"status":"ok","mine":true}"#,
        );
        sub.wait_log("\"mine\":true");
        assert!(
            !sub.output().contains("for sys-usb"),
            "{filter}: {}",
            sub.output()
        );
        // A clean exit (DISCONNECT), as an application would do, before the next client.
        sub.stop();
    }
    errors.wait_log("subscription refused");
    s.dom0.proc.wait_log("link{vm=vm-gui}: refused topic=\"#\"");
    round_trip_works(&s, "after-snoop");
}

#[test]
fn fake_responses_and_sys_topics_are_refused() {
    let s = scene("fake", BrokerKind::Embedded, &[]);
    let errors = s.dom0.subscribe(&s.dir, &[ERRORS]);
    let responses = s
        .dom0
        .subscribe(&s.dir, &["system/disks/list_disks/response/#"]);
    let (ok, _) = s.bridge.publish(
        "vm-gui",
        "system/disks/list_disks/response/vm-gui",
        r#"{"status":"ok","disks":[{"label":"FAKE","id":"fake"}]}"#,
    );
    assert!(ok);
    errors.wait_log("vm-gui: refused \\\"system/disks/list_disks/response/vm-gui\\\"");
    // $SYS: refused at SUBSCRIBE (rumqttd would have disconnected the client), session kept.
    let sys = s.bridge.subscribe(
        &s.dir,
        "vm-gui",
        &["$SYS/#", "system/+/+/response/vm-gui"],
        &[],
    );
    sys.wait_log("Subscribed (mid: 1): 128, 1");
    s.dom0.publish(
        "system/disks/list_disks/response/vm-gui",
        r#"{"status":"ok","n":2}"#,
    );
    sys.wait_log("\"n\":2");
    s.dom0.proc.wait_log("topic=\"$SYS/#\"");
    assert!(
        !responses.output().contains("FAKE"),
        "the fake response never reached the broker"
    );
    round_trip_works(&s, "after-fake");
}

#[test]
fn a_flooding_vm_is_limited_and_others_are_not() {
    let dir_conf = std::env::temp_dir().join(format!("flood-{}.toml", std::process::id()));
    std::fs::write(
        &dir_conf,
        "[limits]\nrate_per_sec = 50\nburst = 50\nviolation_limit = 1000000\n",
    )
    .unwrap();
    let conf = dir_conf.display().to_string();
    let s = scene("flood", BrokerKind::Embedded, &["--config", &conf]);
    let errors = s.dom0.subscribe(&s.dir, &[ERRORS]);
    // vm-gui floods error notifications (a topic it may publish to) far above 50 msg/s.
    let mut flood = Command::new("mosquitto_pub")
        .arg("--unix")
        .arg(&s.bridge.socket)
        .args(["-i", "vm-gui", "-q", "0", "-t", ERRORS, "-l"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = flood.stdin.take().unwrap();
    // The flood goes on until Dom0 has both refused it and summed up what it did not report (the
    // summary comes with the first report after the report budget refilled, so how long that
    // takes depends on the machine's speed), at least 20 000 lines.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut i = 0u64;
            while i < 20_000 || (!stop.load(std::sync::atomic::Ordering::SeqCst) && i < 2_000_000) {
                if writeln!(
                    stdin,
                    r#"{{"module":"flood","datetime":"x","level":3,"description":"{i}"}}"#
                )
                .is_err()
                {
                    break;
                }
                i += 1;
            }
            i
        })
    };
    // Round trips through sys-usb during the flood.
    for i in 0..5 {
        round_trip_works(&s, &format!("during-flood-{i}"));
    }
    errors.wait_log("rate limit (50 msg/s) exceeded");
    wait_for("a summary of unreported refusals", DEADLINE, || {
        errors.output().contains("more refusals not reported")
            || s.dom0.log().contains("more refusals not reported")
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.join().unwrap();
    let _ = flood.wait();
    let passed = errors.output().matches("\"module\":\"flood\"").count();
    let reported = errors.output().matches("rate limit").count();
    assert!(
        (passed as u64) < written / 2,
        "most of the flood was dropped ({passed} of {written} passed)"
    );
    assert!(
        reported < 2_000,
        "refusal reports are themselves limited ({reported})"
    );
    s.dom0.proc.wait_log("rate limit");
    round_trip_works(&s, "after-flood");
    let _ = std::fs::remove_file(&dir_conf);
}

/// An invalid policy: `run` exits non-zero naming the file, the line and the reason.
#[test]
fn invalid_policy_refuses_to_start() {
    let dir = TestDir::new("badpolicy");
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[vm.vm-gui]\nroles = [\"client\"]\npublish = [\"apps/#/x\"]\n",
    )
    .unwrap();
    let out = Command::new(bin("dom0-broker"))
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--socket-dir",
        ])
        .arg(&dir.path)
        .arg("--policy")
        .arg(&policy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains(&format!("{}:3:", policy.display())),
        "file and line: {err}"
    );
    assert!(
        err.contains("apps/#/x") && err.contains("wildcard"),
        "reason: {err}"
    );
    // check-policy agrees, and prints the effective rules of a valid file.
    let out = Command::new(bin("dom0-broker"))
        .arg("check-policy")
        .arg(&policy)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[vm.\"*\"]\nroles = [\"agent\"]\n[vm.vm-gui]\nroles = [\"client\"]\n",
    )
    .unwrap();
    let out = Command::new(bin("dom0-broker"))
        .arg("check-policy")
        .arg(&good)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("[vm-gui]") && text.contains("system/+/+/response/vm-gui"),
        "{text}"
    );
}

/// The rendered ACL, loaded into Debian's mosquitto, enforces the same denials for clients whose
/// client id and user name are the VM's (as the links make them).
#[test]
fn rendered_acl_enforced_by_mosquitto() {
    let dir = TestDir::new("acl");
    let acl = dir.join("acl");
    let out = Command::new(bin("dom0-broker"))
        .arg("render-acl")
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&acl, &out.stdout).unwrap();
    let port = free_port();
    let _m = start_mosquitto(&dir, port, &format!("acl_file {}", acl.display()));
    let p = port.to_string();
    let sub = |id: &str, topics: &[&str]| {
        system_tests::mosquitto_sub(
            &dir,
            &format!("sub-{id}"),
            port,
            &["-i", id, "-u", id],
            topics,
        )
    };
    // Publishers use the VM's user name with their own client id (the same client id would take
    // the subscriber's session over).
    let publish = |user: &str, topic: &str, msg: &str| {
        let id = format!("{user}-pub");
        let ok = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &p,
                "-q",
                "1",
                "-i",
                &id,
                "-u",
                user,
                "-t",
                topic,
                "-m",
                msg,
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    let dom0 = sub("dom0", &["#"]);
    let gui = sub(
        "vm-gui",
        &["system/+/+/response/+", "system/disks/+/request", "$SYS/#"],
    );
    // Allowed: a request from vm-gui reaches Dom0; a response to vm-gui reaches vm-gui.
    publish(
        "vm-gui",
        "system/disks/list_disks/request",
        r#"{"sender":"vm-gui","n":"allowed"}"#,
    );
    dom0.wait_log("\"n\":\"allowed\"");
    publish(
        "dom0",
        "system/disks/list_disks/response/vm-gui",
        r#"{"n":"yours"}"#,
    );
    gui.wait_log("\"n\":\"yours\"");
    // Denied: a fake response from vm-gui; reading sys-usb's responses and the disk requests.
    publish(
        "vm-gui",
        "system/disks/list_disks/response/vm-gui",
        r#"{"n":"fake"}"#,
    );
    publish(
        "dom0",
        "system/disks/list_disks/response/sys-usb",
        r#"{"n":"not yours"}"#,
    );
    publish(
        "dom0",
        "system/disks/list_disks/request",
        r#"{"sender":"dom0","n":"not for vm-gui"}"#,
    );
    publish(
        "dom0",
        "system/disks/list_disks/response/vm-gui",
        r#"{"n":"marker"}"#,
    );
    gui.wait_log("\"n\":\"marker\"");
    dom0.wait_log("\"n\":\"marker\"");
    assert!(
        !dom0.output().contains("\"n\":\"fake\""),
        "mosquitto dropped the fake response"
    );
    assert!(!gui.output().contains("not yours"), "{}", gui.output());
    assert!(!gui.output().contains("not for vm-gui"), "{}", gui.output());
    assert!(!gui.output().contains("$SYS/broker"), "{}", gui.output());
}
