//! Benchmark of idle links: 200 VMs linked, each with an MQTT session up and idle; prints
//! dom0-broker's memory per link and its CPU use while idle. Both brokers; with Mosquitto the
//! broker's own memory is outside dom0-broker, with the embedded broker it is inside.
//!
//! Run with `./scripts/bench`. Prints figures; asserts nothing about speed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use system_tests::bench::Report;
use system_tests::channel::Channel;
use system_tests::{BrokerKind, DEADLINE, Dom0, TestDir, raw, wait_for};

const VMS: usize = 200;
const IDLE: Duration = Duration::from_secs(10);

use system_tests::procfs::cpu_ticks;

fn main() {
    system_tests::bench::run_all(&format!("{VMS} idle links (`tests/benches/idle.rs`)"), run);
}

fn run(kind: BrokerKind, report: &mut Report) {
    let dir = TestDir::new("bench-idle");
    let dom0 = Dom0::start_logging(&dir, kind, &[], "info,rumqttd=error");
    wait_for("the controller", DEADLINE, || {
        dom0.log().contains("controller connected")
    });
    let rss0 = dom0.proc.rss_kb();
    let channels: Vec<Channel> = (0..VMS)
        .map(|i| Channel::new(&dir.path, &format!("vm-{i:03}")))
        .collect();
    dom0.proc.wait_log_count("attached to channel", VMS);
    let rss_linked = dom0.proc.rss_kb();
    // Each guest opens an MQTT session (keepalive 0: legal, and idle for good) and stays silent.
    let mut guests = Vec::new();
    for (i, ch) in channels.iter().enumerate() {
        wait_for("the backend's client", DEADLINE, || ch.has_client());
        let mut g = ch.guest();
        g.write(&raw::connect(&format!("vm-{i:03}"), 0));
        guests.push(g);
    }
    dom0.proc.wait_log_count("session up", VMS);
    let rss_sessions = dom0.proc.rss_kb();
    let pid = dom0.proc.pid();
    let t0 = cpu_ticks(pid);
    std::thread::sleep(IDLE);
    let ticks = cpu_ticks(pid) - t0;
    let hz = 100.0; // USER_HZ on Linux
    report.row(
        &format!("dom0-broker RSS alone / {VMS} attached / {VMS} sessions"),
        format!(
            "{:.1} / {:.1} / {:.1} MiB",
            rss0 as f64 / 1024.0,
            rss_linked as f64 / 1024.0,
            rss_sessions as f64 / 1024.0
        ),
    );
    report.row(
        "**per link**, attached / with its session (target ≤ 16 KiB)",
        format!(
            "{:.1} / {:.1} KiB{}",
            (rss_linked.saturating_sub(rss0)) as f64 / VMS as f64,
            (rss_sessions.saturating_sub(rss0)) as f64 / VMS as f64,
            if kind == BrokerKind::Embedded {
                " (rumqttd's per-connection state included)"
            } else {
                ""
            }
        ),
    );
    report.row(
        &format!("**CPU while idle** for {} s (target 0 %)", IDLE.as_secs()),
        format!(
            "{ticks} ticks = {:.2} % of one core",
            ticks as f64 / hz / IDLE.as_secs_f64() * 100.0
        ),
    );
    drop(guests);
}
