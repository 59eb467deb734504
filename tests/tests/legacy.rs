//! Legacy compatibility: MVP applications on the agent's legacy endpoint, an un-upgraded guest
//! served by Dom0's legacy mode, and `domu-agent call` in both output modes with its exit codes.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use system_tests::channel::Channel;
use system_tests::legacy::LegacyClient;
use system_tests::scene::{Scene, SceneOptions};
use system_tests::{Agent, BrokerKind, DEADLINE, Dom0, TestDir, sha256sum, wait_for};

fn scene(name: &str) -> Scene {
    Scene::start(name, BrokerKind::Embedded, SceneOptions::default())
}

/// An MVP application on vm-gui's legacy socket uses sys-usb's disks, all in MVP format.
#[test]
fn an_mvp_application_runs_unchanged() {
    let s = scene("legacy-app");
    let mut app = LegacyClient::connect(&s.gui.legacy);
    let r = app.command("liste_disques", "sys-usb", json!({}));
    assert_eq!(r["type"], "reponse");
    assert_eq!(r["source"], "sys-usb");
    assert_eq!(r["payload"]["commande"], "liste_disques");
    let ids: Vec<&str> = r["payload"]["data"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["usb0", "usb1", "repository"], "{r}");

    let r = app.command("LISTE_FICHIERS", "sys-usb", json!({"disk": "usb0"}));
    assert_eq!(r["payload"]["commande"], "liste_fichiers");
    assert_eq!(r["payload"]["data"]["disk"], "usb0");
    let files = r["payload"]["data"]["files"].to_string();
    assert!(files.contains("docs/report.txt"), "{r}");

    let r = app.command(
        "get_file_footprint",
        "sys-usb",
        json!({"disk": "usb0", "filepath": "docs/report.txt"}),
    );
    assert_eq!(r["payload"]["commande"], "file_footprint");
    assert_eq!(
        r["payload"]["data"]["footprint"],
        sha256sum(&s.disks.join("usb0/docs/report.txt"))
    );
    assert_eq!(r["payload"]["data"]["filepath"], "docs/report.txt");

    let data = topics::binary::encode(b"made by an MVP app\n");
    let r = app.command(
        "create_file",
        "sys-usb",
        json!({"disk": "usb1", "filepath": "from-mvp.txt", "data": data}),
    );
    assert_eq!(r["payload"]["commande"], "file_creation", "{r}");
    assert_eq!(r["payload"]["data"]["status"], "ok", "{r}");
    assert_eq!(
        std::fs::read(s.disks.join("usb1/from-mvp.txt")).unwrap(),
        b"made by an MVP app\n"
    );
    // The new file is announced to the legacy client (among the link events it may also see).
    let n = loop {
        let n = app.next_of("notification");
        if n["payload"]["evenement"] == "fichier" {
            break n;
        }
    };
    assert_eq!(n["payload"]["data"]["filepath"], "from-mvp.txt");

    // A failed command: a `reponse` with `erreur`, in the MVP's kind.
    let r = app.command(
        "supprime_fichier",
        "sys-usb",
        json!({"disk": "usb0", "filepath": "../outside"}),
    );
    assert_eq!(r["payload"]["commande"], "supprime_fichier");
    assert_eq!(r["payload"]["erreur"]["code"], "forbidden", "{r}");
}

/// `tous` collects the answers of every responder; `Dom0` reaches Dom0 only.
#[test]
fn destinations_are_honoured() {
    let s = scene("legacy-tous");
    let mut app = LegacyClient::connect(&s.gui.legacy);
    app.send(
        &json!({"type": "commande", "source": "x", "destination": "tous",
                     "payload": {"commande": "LISTE_COMPOSANTS"}}),
    );
    let mut sources = Vec::new();
    let end = Instant::now() + DEADLINE;
    while sources.len() < 3 && Instant::now() < end {
        if let Some(v) = app.next(Duration::from_secs(1)) {
            if v["type"] == "reponse" {
                assert_eq!(v["payload"]["commande"], "liste_composants");
                sources.push(v["source"].as_str().unwrap().to_owned());
            }
        }
    }
    sources.sort();
    assert_eq!(sources, ["dom0", "sys-usb", "vm-gui"]);
    let r = app.command("liste_composants", "Dom0", json!({}));
    assert_eq!(r["source"], "dom0");
    // Nothing more comes for that command: only Dom0 answered.
    let more = app.next(Duration::from_millis(300));
    assert!(
        more.as_ref().is_none_or(|v| v["type"] != "reponse"),
        "{more:?}"
    );
    let r = app.command("liste_composants", "sys-usb", json!({}));
    assert_eq!(r["source"], "sys-usb");
}

/// Bad lines get legacy errors and change nothing; two clients get their own answers.
#[test]
fn bad_lines_and_two_clients() {
    let s = scene("legacy-bad");
    let mut a = LegacyClient::connect(&s.gui.legacy);
    let mut b = LegacyClient::connect(&s.gui.legacy);
    let bad: [&[u8]; 5] = [
        b"this is not json\n",
        b"{\"type\":\"ordre\",\"payload\":{}}\n",
        b"{\"type\":\"commande\",\"destination\":\"sys-usb\",\"payload\":{\"commande\":\"formate_disque\"}}\n",
        b"{\"type\":\"commande\",\"payload\":{\"commande\":\"liste_disques\"}}\n",
        b"[1,2,3]\n",
    ];
    for line in bad {
        a.send_raw(line);
        let e = a.next_of("erreur");
        assert_eq!(e["payload"]["code"], "invalid_argument", "{e}");
    }
    // An over-long line (over the legacy line limit): one error, the next line works.
    let mut long = vec![b'{'; topics::legacy_line::MAX_LINE + 100];
    long.push(b'\n');
    a.send_raw(&long);
    let e = a.next_of("erreur");
    assert!(
        e["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("over the limit"),
        "{e}"
    );
    // Two clients at once, each its own answer.
    a.send(
        &json!({"type":"commande","source":"a","destination":"sys-usb",
                   "payload":{"commande":"liste_fichiers","arguments":{"disk":"usb0"}}}),
    );
    b.send(
        &json!({"type":"commande","source":"b","destination":"sys-usb",
                   "payload":{"commande":"liste_fichiers","arguments":{"disk":"usb1"}}}),
    );
    let ra = a.next_of("reponse");
    let rb = b.next_of("reponse");
    assert_eq!(ra["payload"]["data"]["disk"], "usb0", "{ra}");
    assert_eq!(rb["payload"]["data"]["disk"], "usb1", "{rb}");
    assert_eq!(ra["destination"], "a", "the client's own name comes back");
    let _ = (&s.dom0, &s.usb, &s.dir);
}

/// A guest with no agent speaks MVP lines on its channel: Dom0's legacy mode serves it, it cannot
/// pose as another VM, and it can switch to MQTT later.
#[test]
fn an_un_upgraded_guest_is_served_by_dom0() {
    let dir = TestDir::new("legacy-dom0");
    let disks = dir.join("disks");
    std::fs::create_dir_all(disks.join("usb0")).unwrap();
    // The default policy, and vm-old asks like vm-gui does.
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "{}\n[vm.vm-old]\nroles = [\"client\"]\n",
            include_str!("../../deploy/alpine/policy.toml")
        ),
    )
    .unwrap();
    let p = policy.display().to_string();
    let dom0 = Dom0::start(&dir, BrokerKind::Embedded, &["--policy", &p]);
    let usb_ch = Channel::new(&dir.path, "sys-usb");
    let old_ch = Channel::new(&dir.path, "vm-old");
    dom0.proc.wait_log("link{vm=sys-usb}: attached to channel");
    dom0.proc.wait_log("link{vm=vm-old}: attached to channel");
    let d = disks.display().to_string();
    let usb = Agent::start(&dir, &usb_ch, "sys-usb", &["--disks", &d]);
    dom0.proc.wait_log("link{vm=sys-usb}: session up");
    // Who else sees what: a Dom0 subscriber on the responses to sys-usb.
    let spy = dom0.subscribe(&dir, &["system/+/+/response/sys-usb"]);
    let mut g = old_ch.guest();
    g.write(
        br#"{"type":"commande","source":"sys-usb","destination":"sys-usb","payload":{"commande":"liste_disques","arguments":{"sender":"sys-usb"}}}
"#,
    );
    g.read_until("the MVP answer", DEADLINE, |seen| {
        String::from_utf8_lossy(seen).contains("\"commande\":\"liste_disques\"")
    });
    let text = String::from_utf8_lossy(&g.seen).into_owned();
    let line = text.lines().find(|l| l.contains("liste_disques")).unwrap();
    let v: Value = serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
    assert_eq!(v["type"], "reponse");
    assert_eq!(v["source"], "sys-usb");
    assert_eq!(
        v["destination"], "vm-old",
        "answered to the channel's VM, not the claimed one"
    );
    assert_eq!(v["payload"]["data"]["disks"][0]["id"], "usb0", "{v}");
    dom0.proc
        .wait_log("link{vm=vm-old}: guest speaks the MVP's JSON lines");
    // sys-usb saw the request from vm-old, and nobody answered as or to sys-usb.
    assert!(usb.proc.output().contains("sender=vm-old"));
    assert!(
        !spy.output().contains("response/sys-usb "),
        "{}",
        spy.output()
    );
    // What its policy refuses is answered in MVP format, not silently dropped.
    g.write(
        b"{\"type\":\"notification\",\"source\":\"sys-usb\",\"destination\":\"tous\",\"payload\":{\"evenement\":\"fichier\",\"data\":{\"disk\":\"usb0\",\"filepath\":\"fake\",\"size_in_bytes\":1}}}\n",
    );
    g.read_until("the refusal", DEADLINE, |seen| {
        String::from_utf8_lossy(seen).contains("refused by Dom0")
    });
    // Later the guest switches to MQTT on the same channel, without restarting Dom0.
    let code = system_tests::raw::connect_until_connack(&mut g, "vm-old", 5, DEADLINE);
    assert_eq!(code, 0, "MQTT session accepted");
    dom0.proc
        .wait_log("link{vm=vm-old}: legacy guest switches to MQTT");
    wait_for("the MQTT session", DEADLINE, || {
        dom0.log().matches("link{vm=vm-old}: session up").count() >= 2
    });
}

/// `domu-agent call`: each command in both output modes, and each exit code once.
#[test]
fn call_output_and_exit_codes() {
    let s = scene("legacy-call");
    let call = |args: &[&str]| {
        Command::new(system_tests::bin("domu-agent"))
            .arg("call")
            .arg("--socket")
            .arg(&s.gui.socket)
            .args(args)
            .output()
            .unwrap()
    };
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let content = s.dir.join("c.txt");
    std::fs::write(&content, b"content\n").unwrap();
    let data_arg = format!("data=@{}", content.display());
    let readable: [(&[&str], &str); 7] = [
        (&["list_disks"], "usb0"),
        (&["LISTE_FICHIERS", "disk=usb0"], "docs/report.txt"),
        (
            &[
                "get_file_footprint",
                "disk=usb0",
                "filepath=docs/report.txt",
            ],
            "  usb0:docs/report.txt",
        ),
        (
            &["create_file", "disk=usb1", "filepath=c.txt", &data_arg],
            "ok",
        ),
        (
            &[
                "copy_file",
                "source_disk=usb1",
                "target_disk=usb0",
                "filepath=c.txt",
            ],
            "ok",
        ),
        (&["remove_file", "disk=usb0", "filepath=c.txt"], "ok"),
        (&["discover"], "sys-usb"),
    ];
    for (args, expected) in readable {
        let o = call(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {o:?}");
        assert!(text(&o).contains(expected), "{args:?}: {}", text(&o));
        assert!(
            serde_json::from_str::<Value>(text(&o).lines().next().unwrap_or("")).is_err(),
            "{args:?}: readable, not JSON"
        );
        let mut j = vec!["--json"];
        j.extend_from_slice(args);
        if args[0] == "remove_file" || args[0] == "copy_file" || args[0] == "create_file" {
            continue; // not idempotent: the JSON mode is shown on the others
        }
        let o = call(&j);
        assert_eq!(o.status.code(), Some(0));
        for l in text(&o).lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["status"], "ok");
        }
    }
    let o = call(&["--timeout-ms", "20000", "benchmark", "module=messaging"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(text(&o).contains("finished"), "{}", text(&o));
    // 1: the command answered an error.
    let o = call(&["get_file_footprint", "disk=usb0", "filepath=missing"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("not_found"));
    // 124: no answer in time (a request addressed to a VM that does not exist).
    let o = call(&["--timeout-ms", "300", "list_disks", "destination=vm-nobody"]);
    assert_eq!(o.status.code(), Some(124), "{o:?}");
    // 125: local failure: bad arguments, then no agent.
    assert_eq!(call(&["list_files", "disk"]).status.code(), Some(125));
    assert_eq!(call(&["format_disk"]).status.code(), Some(125));
    let o = Command::new(system_tests::bin("domu-agent"))
        .args(["call", "--socket", "/nonexistent/agent.sock", "list_disks"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is the agent running"));
    // 126: refused by Dom0's policy: under the default policy sys-usb serves, it does not ask.
    let o = Command::new(system_tests::bin("domu-agent"))
        .arg("call")
        .arg("--socket")
        .arg(&s.usb.socket)
        .arg("list_disks")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(126), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("forbidden"));
}
