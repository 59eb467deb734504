//! Fidelity to the messaging note: the local repository is a disk like the others, the note's `{}`
//! requests are answered, PSEC guests with their own client ids keep working, and the note's third
//! category — service announcements — has its topic, its registry in Dom0 and its withdrawals.

use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};

use system_tests::channel::Channel;
use system_tests::guest::Bridge;
use system_tests::legacy::LegacyClient;
use system_tests::local::{LocalClient, mosquitto_pub_unix};
use system_tests::raw;
use system_tests::scene::{Scene, SceneOptions};
use system_tests::{BrokerKind, DEADLINE, sha256sum, wait_for};

/// The default policy, with vm-bare and vm-psec (guests without the agent) asking like vm-gui.
fn policy() -> String {
    system_tests::scene::policy_with_clients(&["vm-bare", "vm-psec"])
}

fn scene(name: &str, kind: BrokerKind) -> Scene {
    let policy = policy();
    let opts = SceneOptions {
        policy: Some(&policy),
        ..SceneOptions::default()
    };
    Scene::start(name, kind, opts)
}

/// The note's flow: read a file of sys-usb's usb0 into the repository, check its footprint there,
/// hand it on to usb1, list and clean the repository — through `call`, then through the legacy
/// endpoint.
fn repository_is_a_disk(kind: BrokerKind) {
    let s = scene("repo-disk", kind);
    let report = s.disks.join("usb0/docs/report.txt");
    let call = |cmd: &str, args: &[&str]| {
        let (ok, lines) = s.gui.call(cmd, args);
        assert!(ok, "{cmd} {args:?}: {lines:?}");
        lines.into_iter().next().unwrap()
    };
    let r = call(
        "read_file",
        &["source_disk=usb0", "filepath=docs/report.txt"],
    );
    assert_eq!(r["disk"], "repository");
    assert_eq!(r["filepath"], "usb0/docs/report.txt");
    let r = call(
        "get_file_footprint",
        &["disk=repository", "filepath=usb0/docs/report.txt"],
    );
    assert_eq!(r["footprint"], sha256sum(&report));
    call(
        "copy_file",
        &[
            "source_disk=repository",
            "filepath=usb0/docs/report.txt",
            "target_disk=usb1",
        ],
    );
    assert_eq!(
        std::fs::read(s.disks.join("usb1/usb0/docs/report.txt")).unwrap(),
        std::fs::read(&report).unwrap()
    );
    let r = call("list_files", &["disk=repository"]);
    assert!(
        r["files"].to_string().contains("usb0/docs/report.txt"),
        "{r}"
    );
    call(
        "remove_file",
        &["disk=repository", "filepath=usb0/docs/report.txt"],
    );
    assert!(!s.repo.join("usb0/docs/report.txt").exists());
    let r = call("list_disks", &[]);
    assert!(
        r["disks"].to_string().contains(r#""id":"repository""#),
        "{r}"
    );

    // The same through the MVP's lines (a file of usb1 this time).
    std::fs::write(s.disks.join("usb1/mvp.txt"), b"for the MVP\n").unwrap();
    let mut app = LegacyClient::connect(&s.gui.legacy);
    let mut ask = |commande: &str, args: Value| {
        let r = app.command(commande, "sys-usb", args);
        assert!(r["payload"].get("erreur").is_none(), "{commande}: {r}");
        r["payload"]["data"].clone()
    };
    let d = ask(
        "lit_fichier",
        json!({"source_disk": "usb1", "filepath": "mvp.txt"}),
    );
    assert_eq!(d["disk"], "repository", "{d}");
    let d = ask(
        "get_file_footprint",
        json!({"disk": "repository", "filepath": "usb1/mvp.txt"}),
    );
    assert_eq!(d["footprint"], sha256sum(&s.disks.join("usb1/mvp.txt")));
    ask(
        "copie_fichier",
        json!({"source_disk": "repository", "filepath": "usb1/mvp.txt", "target_disk": "usb0"}),
    );
    assert!(s.disks.join("usb0/usb1/mvp.txt").exists());
    let d = ask("liste_fichiers", json!({"disk": "repository"}));
    assert!(d["files"].to_string().contains("usb1/mvp.txt"), "{d}");
    ask(
        "supprime_fichier",
        json!({"disk": "repository", "filepath": "usb1/mvp.txt"}),
    );
    assert!(!s.repo.join("usb1/mvp.txt").exists());
}

both_brokers!(repository_is_a_disk: the_repository_is_a_disk_embedded, the_repository_is_a_disk_mosquitto);

/// `{}` on `system/disks/list_disks/request`, as the note writes it: from an application on
/// vm-gui's agent (mosquitto_pub on its local endpoint), and from a guest without agent straight
/// on its channel, answered on `.../response/<vm>`; from a Dom0 client, `invalid_argument` on
/// `.../response/dom0`.
fn the_notes_requests(kind: BrokerKind) {
    let s = scene("note-req", kind);
    let app = LocalClient::connect(&s.gui.mqtt, "listener");
    app.subscribe(&["system/disks/list_disks/response/vm-gui"]);
    let out = mosquitto_pub_unix(&s.gui.mqtt, "system/disks/list_disks/request", "{}");
    assert!(out.status.success());
    let (_, answer) = app.recv(DEADLINE).expect("vm-gui's {} answered");
    let v: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["responder"], "sys-usb");

    let bare = Channel::new(&s.dir.path, "vm-bare");
    s.dom0
        .proc
        .wait_log("link{vm=vm-bare}: attached to channel");
    let bridge = Bridge::new(&s.dir, &bare);
    let guest = bridge.rumqttc(
        "app-of-vm-bare",
        &["system/disks/list_disks/response/vm-bare"],
    );
    guest.wait_subscribed();
    guest.publish("system/disks/list_disks/request", b"{}");
    let answer = guest
        .recv_on("system/disks/list_disks/response/vm-bare", DEADLINE)
        .expect("vm-bare's {} answered");
    let v: Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(v["status"], "ok", "{v}");

    let sub = s.dom0.subscribe(&s.dir, &["system/+/+/response/dom0"]);
    s.dom0.publish("system/components/discover/request", "{}");
    s.dom0.publish("system/disks/list_disks/request", "{}");
    for root in ["system/components/discover", "system/disks/list_disks"] {
        wait_for(
            &format!("{root}: invalid_argument to Dom0"),
            DEADLINE,
            || {
                sub.output().lines().any(|l| {
                    l.starts_with(&format!("{root}/response/dom0 "))
                        && l.contains("invalid_argument")
                        && l.contains("sender")
                })
            },
        );
    }
}

both_brokers!(the_notes_requests: the_notes_requests_are_answered_embedded, the_notes_requests_are_answered_mosquitto);

/// A PSEC-style guest: its own client id (`Diag`), keepalive 0 (paho's default in PSEC's tools),
/// `{}` payloads, straight on its channel: it connects, asks, gets its answer. A client id naming
/// another VM is still refused.
fn psec_guest(kind: BrokerKind) {
    let s = scene("psec", kind);
    let ch = Channel::new(&s.dir.path, "vm-psec");
    s.dom0
        .proc
        .wait_log("link{vm=vm-psec}: attached to channel");
    ch.consume_attach_signal();
    let mut g = ch.guest();
    assert_eq!(
        raw::connect_until_connack(&mut g, "sys-usb", 0, DEADLINE),
        2,
        "a client id naming another VM is refused"
    );
    assert_eq!(
        raw::connect_until_connack(&mut g, "Diag", 0, DEADLINE),
        0,
        "PSEC's own client id is accepted"
    );
    g.write(&raw::subscribe(
        1,
        "system/disks/list_disks/response/vm-psec",
        1,
    ));
    g.read_until("the SUBACK", DEADLINE, |seen| {
        seen.windows(2).any(|w| w == [0x90, 0x03])
    });
    g.write(&raw::publish("system/disks/list_disks/request", b"{}"));
    g.read_until("the answer", DEADLINE, |seen| {
        String::from_utf8_lossy(seen).contains(r#""disks":[{"#)
    });
    assert!(String::from_utf8_lossy(&g.seen).contains(r#""responder":"sys-usb""#));
}

both_brokers!(psec_guest: psec_guests_keep_working_embedded, psec_guests_keep_working_mosquitto);

/// A disk plugged (a directory created under sys-usb's `--disks`) and removed while vm-gui holds a
/// subscription: an announcement each time, `discover` and `dom0-broker status` show it, then
/// not; sys-usb's agent stopped: Dom0 withdraws its components and says so.
fn announcements(kind: BrokerKind) {
    let mut s = scene("announce", kind);
    let app = LocalClient::connect(&s.gui.mqtt, "watcher");
    app.subscribe(&["system/components/announce/notification"]);
    let next_announcement = |what: &str, pred: &dyn Fn(&Value) -> bool| {
        let end = Instant::now() + DEADLINE;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if let Some((_, p)) = app.recv(left) {
                let v: Value = serde_json::from_slice(&p).unwrap();
                if pred(&v) {
                    return v;
                }
            }
        }
        panic!("no announcement {what}");
    };
    let has = |v: &Value, id: &str| {
        v["components"]
            .to_string()
            .contains(&format!(r#""id":"{id}""#))
    };
    let status = || {
        let o = Command::new(system_tests::bin("dom0-broker"))
            .args([
                "status",
                "--broker",
                &format!("mqtt://127.0.0.1:{}", s.dom0.port),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let discover = || {
        let (_, lines) = s.gui.call("discover", &[]);
        lines.iter().map(Value::to_string).collect::<String>()
    };
    // Plugged.
    let t0 = Instant::now();
    std::fs::create_dir(s.disks.join("usb7")).unwrap();
    let v = next_announcement("with usb7", &|v| v["origin"] == "sys-usb" && has(v, "usb7"));
    let plugged = t0.elapsed();
    assert_eq!(v["vm"], "sys-usb");
    wait_for("Dom0's registry to list usb7", DEADLINE, || {
        status()
            .lines()
            .any(|l| l.starts_with("sys-usb") && l.contains("usb7"))
    });
    let d = discover();
    assert!(
        d.contains(r#""responder":"dom0""#) && d.contains(r#""id":"usb7""#),
        "{d}"
    );
    // Removed.
    let t0 = Instant::now();
    std::fs::remove_dir(s.disks.join("usb7")).unwrap();
    next_announcement("without usb7", &|v| {
        v["origin"] == "sys-usb" && !has(v, "usb7")
    });
    let removed = t0.elapsed();
    wait_for("Dom0's registry to forget usb7", DEADLINE, || {
        !status().contains("usb7")
    });
    assert!(!discover().contains("usb7"));
    println!("announcements ({kind:?}): disk plugged {plugged:?}, removed {removed:?}");
    // sys-usb's agent stops: its components are withdrawn.
    s.usb.proc.stop();
    let v = next_announcement("withdrawing sys-usb", &|v| {
        v["vm"] == "sys-usb" && v["components"] == json!([])
    });
    assert!(v.get("origin").is_none(), "Dom0's own announcement: {v}");
    wait_for(
        "Dom0's registry to withdraw sys-usb's components",
        DEADLINE,
        || {
            status()
                .lines()
                .any(|l| l.starts_with("sys-usb") && !l.contains("usb0"))
        },
    );
}

both_brokers!(announcements: components_are_announced_and_withdrawn_embedded, components_are_announced_and_withdrawn_mosquitto);
