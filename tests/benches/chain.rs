//! Benchmark of the Dom0 link: a client talking to the broker directly against the same client
//! talking through a simulated channel and the link, in one run, with the ratios.
//!
//! Run with `./scripts/bench` (it builds the release binaries first). Not a test: it asserts nothing
//! about speed; it prints the figures recorded in docs/performance.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpStream;
use std::time::{Duration, Instant};

use system_tests::bench::{guest, tcp, tcp_plain, throughput};
use system_tests::channel::Channel;
use system_tests::raw::RawClient;
use system_tests::{BrokerKind, Dom0, TestDir};

/// Each run has its own command so a responder of one run never answers another run's requests.
const DIRECT: &str = "system/disks/list_files";
const CHAINED: &str = "system/disks/list_disks";
const NOTIFY: &str = "system/disk/new_file/notification";
const ERRORS: &str = "system/events/error/notification";
const ROUND_TRIPS: usize = 2000;
const MESSAGES: u64 = 200_000;

/// A responder that answers every request of `command` on its response topic, at QoS 1.
fn responder<S: std::io::Read + std::io::Write + Send + 'static>(
    mut c: RawClient<S>,
    command: &'static str,
) {
    // Request and response at the same QoS (1), as the requester's.
    c.subscribe_qos1(&format!("{command}/request"));
    let response = format!("{command}/response/dom0");
    std::thread::spawn(move || {
        let mut pkid = 0u16;
        while let Some(p) = c.try_next_publish() {
            pkid = pkid % 60_000 + 1;
            if !c.try_publish_qos1(&response, pkid, &p) {
                return;
            }
        }
    });
}

struct Stats {
    p50: Duration,
    p99: Duration,
    max: Duration,
    stalls: usize,
}

fn round_trips(mut c: RawClient<TcpStream>, command: &str) -> Stats {
    c.subscribe_qos1(&format!("{command}/response/dom0"));
    let request = format!("{command}/request");
    let mut samples = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS + 200 {
        let payload = format!(r#"{{"sender":"dom0","request_id":"{i}"}}"#);
        let t0 = Instant::now();
        assert!(c.try_publish_qos1(&request, (i % 60_000 + 1) as u16, payload.as_bytes()));
        let got = c.next_publish();
        let dt = t0.elapsed();
        assert_eq!(got, payload.as_bytes());
        if i >= 200 {
            samples.push(dt);
        }
    }
    samples.sort();
    Stats {
        p50: samples[samples.len() / 2],
        p99: samples[samples.len() * 99 / 100],
        max: *samples.last().unwrap(),
        stalls: samples
            .iter()
            .filter(|d| **d >= Duration::from_millis(40))
            .count(),
    }
}

fn main() {
    let kinds = system_tests::bench::kinds_from_args();
    for kind in kinds {
        run(kind);
    }
}

fn run(kind: BrokerKind) {
    let dir = TestDir::new("bench");
    let conf = dir.join("dom0.toml");
    // Guest publishes are rate-limited by default; the benchmark measures capacity.
    std::fs::write(
        &conf,
        "[limits]\nrate_per_sec = 10000000\nburst = 10000000\n",
    )
    .unwrap();
    let conf_arg = conf.display().to_string();
    let dom0 = Dom0::start_logging(&dir, kind, &["--config", &conf_arg], "info,rumqttd=error");
    let ch = Channel::new(&dir.path, "sys-usb");
    dom0.proc.wait_log("link{vm=sys-usb}: attached to channel");

    let broker_port = system_tests::bench::broker_port(&dom0, kind);

    println!("== {kind:?} broker: request → response, {ROUND_TRIPS} sequential round trips, QoS 1");
    // (a) both clients talk to the broker directly.
    responder(tcp(broker_port, "bench-direct-responder"), DIRECT);
    let direct = round_trips(tcp(broker_port, "bench-direct-requester"), DIRECT);
    // (b) the responder is a guest behind its channel and the Dom0 link (policy checks included).
    responder(guest(&ch, "sys-usb"), CHAINED);
    let chained = round_trips(tcp(broker_port, "bench-chain-requester"), CHAINED);
    // (c) a requester without TCP_QUICKACK (like mosquitto_pub), on the broker's own port and on
    // the address Dom0 clients use (--listen: dom0-broker's relay for the embedded broker).
    let plain_own = round_trips(tcp_plain(broker_port, "bench-plain-own"), CHAINED);
    let plain_listen = round_trips(tcp_plain(dom0.port, "bench-plain-listen"), CHAINED);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let line = |what: &str, s: &Stats| {
        println!(
            "{what:<52} p50 {:7.1} µs  p99 {:7.1} µs  max {:8.1} µs  ≥40 ms: {}",
            us(s.p50),
            us(s.p99),
            us(s.max),
            s.stalls
        )
    };
    line("direct  client ↔ broker ↔ client", &direct);
    line("through the channel and the link", &chained);
    println!(
        "{:<52} p50 {:7.2}×    p99 {:7.2}×",
        "ratio to direct",
        us(chained.p50) / us(direct.p50),
        us(chained.p99) / us(direct.p99)
    );
    // The link's own cost: what remains after the broker (direct) and the simulated channel's
    // own round trip, measured in the same run, in a directory Dom0 does not watch.
    let sim_dir = TestDir::new("bench-chain-sim");
    let sim = system_tests::bench::stats(system_tests::channel::round_trip_samples(
        &sim_dir.path,
        ROUND_TRIPS,
    ));
    let own = us(chained.p50) - us(direct.p50) - sim.p50;
    println!(
        "{:<52} p50 {:7.1} µs; link's own cost p50 {own:6.1} µs ({:.2}× direct + channel; target ≤ 20 µs, ≤ 1.10×)",
        "the simulated channel alone",
        sim.p50,
        us(chained.p50) / (us(direct.p50) + sim.p50)
    );
    line(
        "requester without TCP_QUICKACK, broker's own port",
        &plain_own,
    );
    line(
        "requester without TCP_QUICKACK, via --listen",
        &plain_listen,
    );

    println!("== {kind:?} broker: throughput, {MESSAGES} × 16-byte messages, QoS 0");
    let d = throughput(
        MESSAGES,
        NOTIFY,
        tcp(dom0.port, "bench-pub-a"),
        tcp(dom0.port, "bench-sub-a"),
    );
    println!("direct  client → broker → client            {d:10.0} msg/s");
    // A second channel for the throughput runs, so the responder above stays out of the way.
    let ch2 = Channel::new(&dir.path, "vm-gui");
    dom0.proc.wait_log("link{vm=vm-gui}: attached to channel");
    let down = throughput(
        MESSAGES,
        NOTIFY,
        tcp(broker_port, "bench-pub-b"),
        guest(&ch2, "vm-gui"),
    );
    println!(
        "Dom0 → guest through the link               {down:10.0} msg/s  ({:.2} of direct)",
        down / d
    );
    let ch3 = Channel::new(&dir.path, "vm-three");
    dom0.proc.wait_log("link{vm=vm-three}: attached to channel");
    // Any VM may publish error notifications (the `*` rules of the default policy).
    let up = throughput(
        MESSAGES,
        ERRORS,
        guest(&ch3, "vm-three"),
        tcp(broker_port, "bench-sub-c"),
    );
    println!(
        "guest → Dom0 through the link               {up:10.0} msg/s  ({:.2} of direct)",
        up / d
    );
    println!("Dom0 RSS after the runs: {} KiB", dom0.proc.rss_kb());
}
