//! Benchmark of guest applications through the agents' local MQTT endpoints, in one run:
//! - request → response between an application in vm-gui and one in sys-usb (both on their agent's
//!   UNIX socket: both agents, both channels, the Dom0 links), against the same two clients talking
//!   to the broker directly, interleaved, QoS 1 both ways;
//! - small-message throughput (16 bytes, QoS 0) from the vm-gui application to the sys-usb one,
//!   against the same clients on the broker.
//!
//! The Dom0 rate limit is raised for the run (it would measure the limiter, not the path). Run with
//! `./scripts/bench` (which builds the release binaries). Prints figures; asserts nothing about speed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use system_tests::bench::{
    Cpu, Report, STEP_DEADLINE, against_direct_and_channel, chain_rows, cpu_during, rss_mib, tcp,
    throughput, us_each,
};
use system_tests::channel::Channel;
use system_tests::raw::RawClient;
use system_tests::scene::policy_opening;
use system_tests::{Agent, BrokerKind, Dom0, TestDir};

const ROUND_TRIPS: usize = 1000;
const MESSAGES: u64 = 100_000;

fn local(path: &std::path::Path, id: &str) -> RawClient<UnixStream> {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(STEP_DEADLINE)).unwrap();
    RawClient::connect(s, id)
}

/// An echo responder: what arrives on its subscription goes back on `response` (QoS 1).
fn responder<S: std::io::Read + std::io::Write + Send + 'static>(
    mut c: RawClient<S>,
    request: &str,
    response: &'static str,
) {
    c.subscribe_qos1(request);
    std::thread::spawn(move || {
        let mut pkid = 0u16;
        while let Some(p) = c.try_next_publish() {
            pkid = pkid % 60_000 + 1;
            if !c.try_publish_qos1(response, pkid, &p) {
                return;
            }
        }
    });
}

/// One QoS 1 round trip: publish `payload` on `topic`, wait for it to come back.
fn round_trip<S: std::io::Read + std::io::Write>(
    c: &mut RawClient<S>,
    topic: &str,
    pkid: u16,
    payload: &[u8],
) -> Duration {
    let t0 = Instant::now();
    assert!(c.try_publish_qos1(topic, pkid, payload));
    loop {
        match c.try_next_publish() {
            Some(p) if p == payload => return t0.elapsed(),
            Some(_) => {}
            None => panic!("no answer on {topic} within {STEP_DEADLINE:?}"),
        }
    }
}

fn main() {
    system_tests::bench::run_all("Guest applications (`tests/benches/apps.rs`)", run);
}

fn run(kind: BrokerKind, report: &mut Report) {
    let dir = TestDir::new("bench-apps");
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, policy_opening("app/#", "app/{vm}/#")).unwrap();
    let (p, c) = (
        policy.display().to_string(),
        system_tests::bench::unlimited_config(&dir),
    );
    let dom0 = Dom0::start_logging(
        &dir,
        kind,
        &["--policy", &p, "--config", &c],
        "info,rumqttd=error",
    );
    let usb_ch = Channel::new(&dir.path, "sys-usb");
    let gui_ch = Channel::new(&dir.path, "vm-gui");
    dom0.proc.wait_log("link{vm=sys-usb}: attached to channel");
    dom0.proc.wait_log("link{vm=vm-gui}: attached to channel");
    let usb = Agent::start_logging(&dir, &usb_ch, "sys-usb", &[], "info");
    let gui = Agent::start_logging(&dir, &gui_ch, "vm-gui", &[], "info");
    dom0.proc.wait_log("link{vm=sys-usb}: session up");
    dom0.proc.wait_log("link{vm=vm-gui}: session up");
    let broker_port = system_tests::bench::broker_port(&dom0, kind);

    responder(
        tcp(broker_port, "bench-responder"),
        "bench/direct/request",
        "bench/direct/response",
    );
    let mut direct_requester = tcp(broker_port, "bench-requester");
    direct_requester.subscribe_qos1("bench/direct/response");
    responder(
        local(&usb.mqtt, "usb-echo"),
        "app/vm-gui/ping",
        "app/sys-usb/pong",
    );
    let mut app = local(&gui.mqtt, "gui-app");
    app.subscribe_qos1("app/sys-usb/pong");
    let mut direct = |i: usize| {
        let payload = format!("ping-{i}");
        let pkid = (i % 60_000 + 1) as u16;
        round_trip(
            &mut direct_requester,
            "bench/direct/request",
            pkid,
            payload.as_bytes(),
        )
    };
    let mut chained = |i: usize| {
        let payload = format!("ping-{i}");
        let pkid = (i % 60_000 + 1) as u16;
        round_trip(&mut app, "app/vm-gui/ping", pkid, payload.as_bytes())
    };
    // The simulator's own share, measured apart from Dom0's socket directory.
    let (a, b, sim) = against_direct_and_channel(ROUND_TRIPS, report, &mut direct, &mut chained);
    let (a, b, sim) = (&a, &b, &sim);
    chain_rows(
        report,
        "app in vm-gui ↔ app in sys-usb (both agents), p50 / p99",
        "**ratio to direct**, p50 / p99",
        a,
        b,
        sim,
    );

    eprintln!("throughput, {MESSAGES} × 16-byte messages, QoS 0");
    // CPU per message beside the rates: the broker's own in the direct run; through the agents,
    // each process on the path (Dom0's includes the embedded broker) and the channels' relays.
    let broker_pid = dom0.mosquitto.as_ref().map_or(dom0.proc.pid(), |m| m.pid());
    let (d, t) = cpu_during(&[Cpu::Process(broker_pid)], || {
        throughput(
            MESSAGES,
            "bench/direct/flow",
            tcp(broker_port, "bench-pub"),
            tcp(broker_port, "bench-sub"),
        )
    });
    let broker = us_each(t[0], MESSAGES as f64);
    report.row(
        "throughput direct, 16-byte QoS 0; the broker's CPU per message",
        format!("{d:.0} msg/s; {broker:.2} µs"),
    );
    let mut watched = vec![
        Cpu::Process(gui.proc.pid()),
        Cpu::Process(dom0.proc.pid()),
        Cpu::Process(usb.proc.pid()),
        Cpu::Relay,
    ];
    if let Some(m) = &dom0.mosquitto {
        watched.push(Cpu::Process(m.pid()));
    }
    let (t, cpu) = cpu_during(&watched, || {
        throughput(
            MESSAGES,
            "app/vm-gui/flow",
            local(&gui.mqtt, "gui-flow"),
            local(&usb.mqtt, "usb-flow"),
        )
    });
    let each: Vec<String> = cpu
        .iter()
        .map(|t| format!("{:.2}", us_each(*t, MESSAGES as f64)))
        .collect();
    report.row(
        "throughput app → agents → app (**ratio to direct**); CPU per message: vm-gui agent / Dom0 / sys-usb agent / the channels' relays (/ Mosquitto)",
        format!("{t:.0} msg/s ({:.2}×); {} µs", t / d, each.join(" / ")),
    );
    report.row(
        "RSS after the runs: vm-gui agent / sys-usb agent / Dom0",
        rss_mib(&[&gui.proc, &usb.proc, &dom0.proc]),
    );
}
