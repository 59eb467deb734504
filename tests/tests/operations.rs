//! What operators see and do: quiet logs, live policy reload, the Mosquitto clients (MQTT 5
//! included) against the embedded broker.

use std::process::Command;
use std::time::Duration;

use system_tests::local::{LocalClient, mosquitto_pub_unix};
use system_tests::scene::{Scene, SceneOptions};
use system_tests::{BrokerKind, DEADLINE, Dom0, TestDir, wait_for};

const DEFAULT_POLICY: &str = include_str!("../../deploy/alpine/policy.toml");
/// The default policy, and vm-gui may read `app/`.
fn with_app_reading() -> String {
    let p = DEFAULT_POLICY.replace(
        "[vm.vm-gui]\nroles = [\"client\"]",
        "[vm.vm-gui]\nroles = [\"client\"]\nsubscribe = [\"app/#\"]",
    );
    assert_ne!(p, DEFAULT_POLICY);
    p
}

/// The demo's chain: Dom0 (with a policy file), sys-usb with its disks, vm-gui.
fn scene(name: &str, kind: BrokerKind, policy: &str) -> Scene {
    Scene::start(
        name,
        kind,
        SceneOptions {
            policy: Some(policy),
            ..SceneOptions::default()
        },
    )
}

/// Lines at WARN or ERROR in a log.
fn loud(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(str::to_owned)
        .collect()
}

fn all_logs(s: &Scene) -> String {
    let mut all = s.dom0.log();
    all.push_str(&s.usb.proc.output());
    all.push_str(&s.gui.proc.output());
    all
}

/// Twenty runs of mosquitto_pub, mosquitto_sub and mosquitto_rr from Dom0 leave no WARN and no
/// ERROR anywhere; a policy refusal leaves exactly one WARN.
#[test]
fn routine_departures_leave_no_error() {
    let s = scene("quiet", BrokerKind::Embedded, DEFAULT_POLICY);
    let port = s.dom0.port.to_string();
    for i in 0..20 {
        let out = Command::new("mosquitto_rr")
            .args(["-p", &port, "-W", "10"])
            .args(["-t", "system/disks/list_disks/request"])
            .args(["-e", "system/disks/list_disks/response/dom0"])
            .args([
                "-m",
                &format!(r#"{{"sender":"dom0","request_id":"rr{i}"}}"#),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "mosquitto_rr: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("usb0"));
        // Subscribes, gets its SUBACK, leaves.
        let out = Command::new("mosquitto_sub")
            .args(["-p", &port, "-t", "system/#", "-E"])
            .output()
            .unwrap();
        assert!(out.status.success(), "mosquitto_sub: {out:?}");
        let out = Command::new("mosquitto_pub")
            .args(["-p", &port, "-t", "system/misc/benchmark/request"])
            .args(["-m", r#"{"sender":"dom0","module":"nothing"}"#])
            .output()
            .unwrap();
        assert!(out.status.success(), "mosquitto_pub: {out:?}");
    }
    // Every agent and Dom0 answered each unknown benchmark module with an error response; let the
    // last of them land before reading the logs.
    let marker = Command::new("mosquitto_rr")
        .args([
            "-p",
            &port,
            "-W",
            "10",
            "-t",
            "system/components/discover/request",
        ])
        .args(["-e", "system/components/discover/response/dom0"])
        .args(["-m", r#"{"sender":"dom0","destination":"sys-usb"}"#])
        .output()
        .unwrap();
    assert!(marker.status.success());
    let quiet = loud(&all_logs(&s));
    assert!(
        quiet.is_empty(),
        "WARN/ERROR in normal operation:\n{}",
        quiet.join("\n")
    );
    // A refusal: an application of vm-gui publishes where the policy says no.
    let out = mosquitto_pub_unix(&s.gui.mqtt, "app/vm-gui/forbidden", "x");
    assert!(out.status.success());
    s.dom0
        .proc
        .wait_log("refused topic=\"app/vm-gui/forbidden\"");
    wait_for("the refusal to be logged once", DEADLINE, || {
        !loud(&all_logs(&s)).is_empty()
    });
    let lines = loud(&all_logs(&s));
    assert_eq!(lines.len(), 1, "{}", lines.join("\n"));
    assert!(
        lines[0].contains(" WARN ") && lines[0].contains("vm-gui"),
        "{}",
        lines[0]
    );
}

/// `mosquitto_rr` with its defaults (MQTT 5) gets its answer from the embedded broker, and MQTT
/// 3.1.1 clients on the same topics keep working (the broker does not fall over).
#[test]
fn mosquitto_rr_with_its_defaults() {
    let s = scene("rr", BrokerKind::Embedded, DEFAULT_POLICY);
    let port = s.dom0.port.to_string();
    let watcher = s
        .dom0
        .subscribe(&s.dir, &["system/disks/list_disks/request"]);
    let out = Command::new("mosquitto_rr")
        .args(["-p", &port, "-W", "10"])
        .args(["-t", "system/disks/list_disks/request"])
        .args(["-e", "system/disks/list_disks/response/dom0"])
        .args(["-m", r#"{"sender":"dom0"}"#])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.contains(r#""status":"ok""#) && answer.contains("usb0"),
        "{answer}"
    );
    watcher.wait_log("system/disks/list_disks/request");
    // The links (MQTT 3.1.1) still work: vm-gui asks sys-usb.
    let (ok, lines) = s.gui.call("list_disks", &[]);
    assert!(ok, "{lines:?}");
}

fn reload(dom0: &Dom0) {
    dom0.proc.signal(nix::sys::signal::Signal::SIGHUP);
}

/// A subscription allowed, then denied by a reload, stops delivering; a broken policy on reload is
/// refused and the old one stays in force.
fn policy_reload(kind: BrokerKind) {
    let s = scene("reload", kind, &with_app_reading());
    let errors = s
        .dom0
        .subscribe(&s.dir, &["system/events/error/notification"]);
    let reader = LocalClient::connect(&s.gui.mqtt, "reader");
    assert_eq!(reader.subscribe(&["app/#"]), [true]);
    // Dom0 publishes app messages (Dom0 clients are trusted): delivered while allowed.
    s.dom0.publish("app/dom0/news", "one");
    assert!(reader.wait_payload(b"one", DEADLINE));

    // A broken file on reload: refused with its reason, the old policy stays in force.
    std::fs::write(
        s.policy.as_ref().unwrap(),
        "[vm.vm-gui]\nsubscribe = [\"app/#/x\"]\n",
    )
    .unwrap();
    reload(&s.dom0);
    s.dom0.proc.wait_log("policy reload refused");
    errors.wait_log("policy reload refused");
    s.dom0.publish("app/dom0/news", "two");
    assert!(
        reader.wait_payload(b"two", DEADLINE),
        "old policy still in force"
    );

    // The default policy: vm-gui may not read app/ any more: delivery stops at once.
    std::fs::write(s.policy.as_ref().unwrap(), DEFAULT_POLICY).unwrap();
    reload(&s.dom0);
    s.dom0.proc.wait_log("policy reloaded");
    s.dom0.proc.wait_log("restarting the session");
    // The agent resubscribes; Dom0 refuses app/# now; the reader hears nothing more.
    s.gui
        .proc
        .wait_log("subscription refused by Dom0's policy filter=app/#");
    s.dom0.publish("app/dom0/news", "three");
    // Anything vm-gui may still read arrives (a marker), and "three" never does.
    let (ok, _) = s.gui.call("list_disks", &[]);
    assert!(ok);
    let got = reader.drain(Duration::from_millis(500));
    assert!(
        !got.iter().any(|(_, p)| p == b"three"),
        "delivered after the reload: {got:?}"
    );
    assert_eq!(
        *reader.connacks.lock().unwrap(),
        1,
        "the local client stayed connected"
    );
    let _ = &s.usb;
}

both_brokers!(policy_reload: policy_reload_embedded, policy_reload_mosquitto);

/// `dom0-broker status` shows both VMs with live counters; a clear line when the service is down.
#[test]
fn status_shows_the_links() {
    let s = scene("status", BrokerKind::Embedded, DEFAULT_POLICY);
    let (ok, _) = s.gui.call("list_disks", &[]);
    assert!(ok);
    let url = format!("mqtt://127.0.0.1:{}", s.dom0.port);
    let out = Command::new(system_tests::bin("dom0-broker"))
        .args(["status", "--broker", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    for vm in ["sys-usb", "vm-gui"] {
        let line = table
            .lines()
            .find(|l| l.starts_with(vm))
            .unwrap_or_else(|| panic!("no line for {vm}:\n{table}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], "session", "{line}");
        assert!(cols[2].ends_with('Z'), "session since: {line}");
        assert!(cols[3].parse::<u64>().unwrap() > 0, "packets in: {line}");
    }
    let out = Command::new(system_tests::bin("dom0-broker"))
        .args(["status", "--json", "--broker", &url])
        .output()
        .unwrap();
    let vms: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(vms.len(), 2);
    assert!(vms.iter().all(|v| v["session"] == true), "{vms:?}");
    // Nothing listening there: one clear line, exit 69.
    let free = system_tests::free_port();
    let out = Command::new(system_tests::bin("dom0-broker"))
        .args(["status", "--broker", &format!("mqtt://127.0.0.1:{free}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not running") && err.lines().count() == 1,
        "{err}"
    );
}

/// `check-config` (what the OpenRC service runs before starting) refuses a bad config and a bad
/// policy with one line each.
#[test]
fn check_config_refuses_bad_files() {
    let dir = TestDir::new("checkconf");
    let good = dir.join("good.toml");
    std::fs::write(&good, "listen = \"127.0.0.1:1883\"\n").unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "listen = \"0.0.0.0:1883\"\n").unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, "[vm.vm-gui]\npublish = [\"a/#/b\"]\n").unwrap();
    let run = |args: &[&str]| {
        Command::new(system_tests::bin("dom0-broker"))
            .arg("check-config")
            .args(args)
            .output()
            .unwrap()
    };
    let g = good.display().to_string();
    let out = run(&["--config", &g]);
    assert!(out.status.success(), "{out:?}");
    for (args, why) in [
        (vec!["--config", bad.to_str().unwrap()], "not loopback"),
        (
            vec!["--config", &g, "--policy", policy.to_str().unwrap()],
            "wildcard",
        ),
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why) && err.lines().count() == 1, "{err}");
    }
}

/// `[fleet]`: check-config reads its TLS files and password as `run` would, and says which one is
/// missing; render-bridge refuses a config without the section, and renders one with it.
#[test]
fn check_config_and_render_bridge_read_the_fleet_section() {
    let dir = TestDir::new("fleetconf");
    let fleet = |d: &std::path::Path| {
        format!(
            "listen = \"127.0.0.1:1883\"\n[fleet]\nhost = \"host-a\"\ncentre = [\"127.0.0.1:8883\"]\n\
             ca_file = \"{0}/ca.pem\"\ncert_file = \"{0}/host.pem\"\nkey_file = \"{0}/host.key\"\n\
             password_file = \"{0}/password\"\n[fleet.allow]\n\"sys-usb\" = [\"list_disks\"]\n",
            d.display()
        )
    };
    let conf = dir.join("fleet.toml");
    std::fs::write(&conf, fleet(&dir.path)).unwrap();
    let run = |cmd: &str, c: &std::path::Path| {
        Command::new(system_tests::bin("dom0-broker"))
            .args([cmd, "--config"])
            .arg(c)
            .output()
            .unwrap()
    };
    let out = run("check-config", &conf);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ca.pem") && err.lines().count() == 1, "{err}");
    std::fs::write(dir.join("password"), "s3cret\n").unwrap();
    let out = run("render-bridge", &conf);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("remote_clientid fleet-host-a"), "{text}");
    assert!(
        text.contains("topic system/+/+/request in 1 fleet/in/ fleet/host-a/in/"),
        "{text}"
    );
    let plain = dir.join("plain.toml");
    std::fs::write(&plain, "listen = \"127.0.0.1:1883\"\n").unwrap();
    let out = run("render-bridge", &plain);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [fleet] section"));
}

/// The embedded broker to Dom0 clients, like Mosquitto: keepalive 0 accepted.
#[test]
fn embedded_broker_accepts_keepalive_zero() {
    use std::io::{Read, Write};
    let dir = TestDir::new("k0");
    let dom0 = Dom0::start(&dir, BrokerKind::Embedded, &[]);
    let mut c = std::net::TcpStream::connect(("127.0.0.1", dom0.port)).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    c.write_all(&system_tests::raw::connect("keepalive-zero", 0))
        .unwrap();
    let mut connack = [0u8; 4];
    c.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    c.write_all(&system_tests::raw::subscribe(1, "k0/t", 0))
        .unwrap();
    let mut suback = [0u8; 5];
    c.read_exact(&mut suback).unwrap();
    assert_eq!(suback[0], 0x90);
    dom0.publish("k0/t", "still here");
    let mut buf = [0u8; 64];
    let n = c.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("still here"));
}

/// The will of a Dom0 client whose keepalive expires is published, once per subscriber.
#[test]
fn embedded_broker_publishes_the_will_when_a_keepalive_expires() {
    let dir = TestDir::new("will");
    let dom0 = Dom0::start(&dir, BrokerKind::Embedded, &[]);
    let watcher = dom0.subscribe(&dir, &["will/#"]);
    let port = dom0.port.to_string();
    let mut silent = Command::new("stdbuf")
        .args([
            "-oL",
            "mosquitto_sub",
            "-p",
            &port,
            "-t",
            "x",
            "-k",
            "5",
            "-d",
        ])
        .args(["--will-topic", "will/tool", "--will-payload", "gone"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // stdbuf execs mosquitto_sub: same pid.
    let pid = nix::unistd::Pid::from_raw(silent.id() as i32);
    // Connected (its CONNACK printed), then silent: stopped, it sends no PINGREQ.
    {
        use std::io::BufRead;
        let mut out = std::io::BufReader::new(silent.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("CONNACK") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "mosquitto_sub ended");
        }
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // 1.5 × 5 s later the broker gives up on it and publishes its will.
    watcher.wait_log("will/tool gone");
    let _ = silent.kill();
    let _ = silent.wait();
    assert_eq!(watcher.output().matches("will/tool gone").count(), 1);
}

/// `$`-topics are never matched by a filter starting with a wildcard.
#[test]
fn embedded_broker_does_not_match_dollar_topics_with_wildcards() {
    let dir = TestDir::new("dollar");
    let dom0 = Dom0::start(&dir, BrokerKind::Embedded, &[]);
    let watcher = dom0.subscribe(&dir, &["#", "+/+"]);
    dom0.publish("$app/x", "dollar");
    dom0.publish("app/x", "plain");
    watcher.wait_log("app/x plain");
    assert!(!watcher.output().contains("dollar"), "{}", watcher.output());
}
