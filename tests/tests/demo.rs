//! The demo as a newcomer meets it: `./scripts/run` (with the test's binaries, directory and
//! port), and every command it prints, run exactly as printed, from the repository; then the
//! policy example of docs/security.md in the same demo. What a user checks: every command
//! succeeds, `mosquitto_pub` at its default QoS reaches Dom0 8 times out of 8, the benchmark
//! prints three `finished` answers, and the demo's logs hold no WARN.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use system_tests::legacy::LegacyClient;
use system_tests::{DEADLINE, Proc, TestDir, free_port, wait_for};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The commands printed after "In another terminal", continuation lines joined, comments left out.
fn printed_commands(out: &str) -> Vec<String> {
    let mut cmds: Vec<String> = Vec::new();
    let mut continued = false;
    for line in out
        .lines()
        .skip_while(|l| !l.contains("In another terminal"))
        .skip(1)
    {
        let Some(text) = line.strip_prefix("  ") else {
            continue;
        };
        let text = text.trim();
        if text.is_empty() || (text.starts_with('#') && !continued) {
            continue;
        }
        if continued {
            if let Some(last) = cmds.last_mut() {
                last.push('\n');
                last.push_str(text);
            }
        } else {
            cmds.push(text.to_owned());
        }
        continued = text.ends_with('\\');
    }
    cmds
}

/// `sh -c CMD` from the repository, with a deadline.
fn run(cmd: &str) -> Output {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(repo())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "{cmd}: still running after 60 s");
        std::thread::park_timeout(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_demo_works_as_printed() {
    let dir = TestDir::new("demo");
    let run_dir = dir.join("run");
    let port = free_port();
    let bin = system_tests::bin("domu-agent");
    let bin_dir = bin.parent().unwrap();
    let mut demo = Proc::spawn(
        "scripts-run",
        &dir,
        Command::new(repo().join("scripts/run"))
            .env("DEMO_BIN", bin_dir)
            .env("DEMO_DIR", &run_dir)
            .env("PORT", port.to_string())
            .process_group(0),
    );
    let _stop = StopsTheDemo(demo.pid());
    demo.wait_log("The demo is running");
    let cmds = printed_commands(&demo.output());
    assert!(cmds.len() >= 12, "{cmds:?}");
    let mut background = Vec::new();
    // The printed Dom0 watcher (meant for another terminal, running until stopped) goes first, so
    // it sees everything the other commands do; it is subscribed once it prints a probe.
    let watch = cmds
        .iter()
        .find(|c| c.starts_with("mosquitto_sub -p"))
        .expect("the demo prints a mosquitto_sub for Dom0");
    let sub = Proc::spawn(
        "dom0-sub",
        &dir,
        // `exec`: the shell becomes the client, so stopping it leaves no orphan behind.
        Command::new("stdbuf")
            .args(["-oL", "sh", "-c", &format!("exec {watch}")])
            .current_dir(repo()),
    );
    wait_for("the printed mosquitto_sub to subscribe", DEADLINE, || {
        let _ = Command::new("mosquitto_pub")
            .args([
                "-p",
                &port.to_string(),
                "-t",
                "system/demo/probe",
                "-m",
                "x",
            ])
            .output();
        sub.output().contains("system/demo/probe")
    });
    for cmd in cmds.iter().filter(|c| *c != watch) {
        if let Some(c) = cmd.strip_suffix('&') {
            background.push(Proc::spawn(
                "printed",
                &dir,
                Command::new("sh")
                    .arg("-c")
                    .arg(format!("exec {c}"))
                    .current_dir(repo()),
            ));
            continue;
        }
        let o = run(cmd);
        assert!(o.status.success(), "{cmd}\n{}", text(&o));
        if cmd.contains(" benchmark ") {
            let out = text(&o);
            for who in ["dom0", "sys-usb", "vm-gui"] {
                assert!(
                    out.contains(&format!("{who}: messaging finished")),
                    "{who} did not finish: {out}"
                );
            }
        }
        if cmd.contains("socat") {
            assert!(text(&o).contains(r#""source":"sys-usb""#), "{}", text(&o));
        }
        if cmd.starts_with("mosquitto_pub --unix") {
            // At its default QoS (0), 8 of 8 reach Dom0.
            for _ in 0..7 {
                assert!(run(cmd).status.success());
            }
        }
    }
    wait_for("vm-gui's 8 requests at Dom0", DEADLINE, || {
        sub.output()
            .lines()
            .filter(|l| l.starts_with("system/disks/list_disks/request {"))
            .filter(|l| l.ends_with(r#""sender":"vm-gui"}"#) && l.contains(r#""deadline_ms":"#))
            .count()
            >= 8
    });
    // One MVP client on each agent's legacy endpoint (vm-gui's was the printed socat).
    let mut usb_app = LegacyClient::connect(&run_dir.join("sys-usb-legacy.sock"));
    usb_app.send_raw(b"\n");
    let mut gui_app = LegacyClient::connect(&run_dir.join("vm-gui-legacy.sock"));
    gui_app.send_raw(b"\n");
    wait_for(
        "the agents to subscribe their legacy clients' notifications",
        DEADLINE,
        || {
            let o = run(&format!(
                "mosquitto_pub -p {port} -t system/events/error/notification -m '{{\"module\":\"demo\",\"datetime\":\"x\",\"level\":5,\"description\":\"probe\"}}'"
            ));
            o.status.success()
                && usb_app.next(Duration::from_millis(200)).is_some()
                && gui_app.next(Duration::from_millis(200)).is_some()
        },
    );
    drop((usb_app, gui_app));

    // docs/security.md's policy example, in this demo.
    let doc = std::fs::read_to_string(repo().join("docs/security.md")).unwrap();
    let block = doc
        .split("<!-- demo: application topics -->\n```sh\n")
        .nth(1)
        .and_then(|b| b.split("```\n<!-- /demo -->").next())
        .expect("docs/security.md has the demo block");
    let script = block.replace("run/", &format!("{}/", run_dir.display()));
    let o = run(&script);
    assert!(o.status.success(), "{script}\n{}", text(&o));
    assert!(
        text(&o).contains("app/sys-usb/status ready"),
        "{}",
        text(&o)
    );

    // Nothing in the demo's logs says something went wrong.
    for log in ["dom0-broker.log", "sys-usb.log", "vm-gui.log"] {
        let t = std::fs::read_to_string(run_dir.join(log)).unwrap();
        let warn: Vec<&str> = t
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .filter(|l| !l.contains("app/sys-usb/status"))
            .collect();
        assert!(warn.is_empty(), "{log}: {warn:#?}");
    }
    drop(background);
    drop(sub);
    demo.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        demo.wait_exit(DEADLINE).is_some(),
        "the demo stops on SIGTERM"
    );
}

use std::os::unix::process::CommandExt;

/// Stops the demo's whole process group however the test ends (its script, the channels, Dom0,
/// the agents): nothing is left running.
struct StopsTheDemo(i32);

impl Drop for StopsTheDemo {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}
