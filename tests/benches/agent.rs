//! Benchmark of the whole chain with the guest agent (issue 4), in one run:
//! - request → response from vm-gui to sys-usb's agent and back, through two channels and the Dom0
//!   links, against two clients talking to the broker directly;
//! - `get_file_footprint` against `sha256sum` on the same (cached) file;
//! - `create_file` throughput through the channel.
//!
//! Run with `./scripts/bench` (which builds the release binaries). Prints figures; asserts nothing
//! about speed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};
use system_tests::bench::{guest, stats, tcp};
use system_tests::channel::Channel;
use system_tests::raw::RawClient;
use system_tests::{Agent, BrokerKind, Dom0, TestDir};

const ROUND_TRIPS: usize = 1000;

/// Sends `payload` (QoS 1) on `topic` and waits for the response that echoes `id`.
fn ask<S: std::io::Read + std::io::Write>(
    c: &mut RawClient<S>,
    topic: &str,
    payload: &Value,
    id: &str,
) -> Value {
    let body = payload.to_string();
    assert!(c.try_publish_qos1(topic, 1, body.as_bytes()));
    loop {
        let p = c.next_publish();
        let v: Value = serde_json::from_slice(&p).unwrap();
        if v["request_id"] == id {
            return v;
        }
    }
}

fn main() {
    let kinds = system_tests::bench::kinds_from_args();
    for kind in kinds {
        run(kind);
    }
}

fn run(kind: BrokerKind) {
    let dir = TestDir::new("bench-agent");
    let disks = dir.join("disks");
    std::fs::create_dir_all(disks.join("usb0")).unwrap();
    std::fs::create_dir_all(disks.join("usb1")).unwrap();
    let dom0 = Dom0::start_logging(&dir, kind, &[], "info,rumqttd=error");
    let usb_ch = Channel::new(&dir.path, "sys-usb");
    let gui_ch = Channel::new(&dir.path, "vm-gui");
    dom0.proc.wait_log("link{vm=sys-usb}: attached to channel");
    dom0.proc.wait_log("link{vm=vm-gui}: attached to channel");
    let d = disks.display().to_string();
    let usb = Agent::start(&dir, &usb_ch, "sys-usb", &["--disks", &d]);
    dom0.proc.wait_log("link{vm=sys-usb}: session up");
    let broker_port = system_tests::bench::broker_port(&dom0, kind);

    println!("== {kind:?} broker: request → response, {ROUND_TRIPS} sequential round trips, QoS 1");
    // (a) Direct: a requester and a responder, both clients of the broker.
    let mut responder = tcp(broker_port, "bench-responder");
    responder.subscribe_qos1("bench/direct/request");
    std::thread::spawn(move || {
        let mut pkid = 0u16;
        while let Some(p) = responder.try_next_publish() {
            pkid = pkid % 60_000 + 1;
            if !responder.try_publish_qos1("bench/direct/response", pkid, &p) {
                return;
            }
        }
    });
    let mut requester = tcp(broker_port, "bench-requester");
    requester.subscribe_qos1("bench/direct/response");
    // (b) vm-gui (a client on its channel) asks sys-usb's agent for list_disks: two channels,
    // two links, policy checks, the agent's session and service.
    let mut gui = guest(&gui_ch, "vm-gui");
    gui.subscribe_qos1("system/+/+/response/vm-gui");
    // The two are interleaved, so both see the same machine (a 2-core VM is noisy).
    let mut direct = Vec::new();
    let mut chained = Vec::new();
    for i in 0..ROUND_TRIPS + 100 {
        let payload = format!(r#"{{"sender":"dom0","request_id":"{i}"}}"#);
        let t0 = Instant::now();
        assert!(requester.try_publish_qos1(
            "bench/direct/request",
            (i % 60_000 + 1) as u16,
            payload.as_bytes()
        ));
        let got = requester.next_publish();
        let d = t0.elapsed();
        assert_eq!(got, payload.as_bytes());
        let id = format!("rt{i}");
        let t0 = Instant::now();
        let v = ask(
            &mut gui,
            "system/disks/list_disks/request",
            &json!({"sender": "vm-gui", "request_id": id}),
            &id,
        );
        let c = t0.elapsed();
        assert_eq!(v["status"], "ok", "{v}");
        if i >= 100 {
            direct.push(d);
            chained.push(c);
        }
    }
    let (a, b) = (stats(direct), stats(chained));
    // The simulator's own share: the chain crosses two simulated channels there and back.
    // Measured in a directory Dom0 does not watch (there, Dom0 would take the channel first).
    let sim_dir = TestDir::new("bench-agent-sim");
    let sim = stats(system_tests::channel::round_trip_samples(
        &sim_dir.path,
        ROUND_TRIPS,
    ));
    println!(
        "direct  client ↔ broker ↔ client                 p50 {:8.1} µs  p99 {:8.1} µs  ≥40 ms: {}",
        a.p50, a.p99, a.stalls
    );
    println!(
        "vm-gui → link → broker → link → sys-usb agent → …  p50 {:8.1} µs  p99 {:8.1} µs  ≥40 ms: {}",
        b.p50, b.p99, b.stalls
    );
    println!(
        "ratio                                            p50 {:8.2}×    p99 {:8.2}×",
        b.p50 / a.p50,
        b.p99 / a.p99
    );
    println!(
        "the simulated channel alone, per round trip:     p50 {:8.1} µs; the chain crosses it twice; \
         ratio without those two: p50 {:.2}×",
        sim.p50,
        (b.p50 - 2.0 * sim.p50) / a.p50
    );

    println!("== {kind:?} broker: get_file_footprint vs sha256sum, 1 GiB file (page cache warm)");
    let big = disks.join("usb0/big.bin");
    {
        use std::io::Write;
        let mut f = File::create(&big).unwrap();
        let block: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        for _ in 0..1024 {
            f.write_all(&block).unwrap();
        }
    }
    let _ = Command::new("cat")
        .arg(&big)
        .stdout(std::process::Stdio::null())
        .status();
    let t0 = Instant::now();
    let out = Command::new("sha256sum").arg(&big).output().unwrap();
    let t_sum = t0.elapsed();
    let expected = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let rss_before = usb.proc.rss_kb();
    let t0 = Instant::now();
    let v = ask(
        &mut gui,
        "system/disks/get_file_footprint/request",
        &json!({"sender": "vm-gui", "request_id": "fp", "disk": "usb0", "filepath": "big.bin"}),
        "fp",
    );
    let t_agent = t0.elapsed();
    assert_eq!(v["footprint"], expected);
    println!(
        "sha256sum                         {:8.0} ms  {:7.0} MB/s",
        t_sum.as_secs_f64() * 1e3,
        1073.741824 / t_sum.as_secs_f64()
    );
    println!(
        "get_file_footprint via vm-gui     {:8.0} ms  {:7.0} MB/s  ({:.2}× sha256sum)",
        t_agent.as_secs_f64() * 1e3,
        1073.741824 / t_agent.as_secs_f64(),
        t_sum.as_secs_f64() / t_agent.as_secs_f64()
    );
    println!(
        "sys-usb agent RSS: {} KiB before, {} KiB after",
        rss_before,
        usb.proc.rss_kb()
    );

    println!(
        "== {kind:?} broker: create_file through the channel, 16 × 1 MiB (Base64: 1.33 MiB per request)"
    );
    let data = topics::binary::encode(&vec![0x5au8; 1024 * 1024]);
    let t0 = Instant::now();
    for i in 0..16 {
        let id = format!("cf{i}");
        let v = ask(
            &mut gui,
            "system/disks/create_file/request",
            &json!({"sender": "vm-gui", "request_id": id, "disk": "usb1", "filepath": format!("c/{i}.bin"), "data": data}),
            &id,
        );
        assert_eq!(v["status"], "ok", "{v}");
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "create_file                       {:8.1} MB/s of file data ({:.1} MB/s on the wire)",
        16.0 * 1.048576 / secs,
        16.0 * 1.398 / secs
    );
    println!(
        "sys-usb agent RSS after: {} KiB; Dom0 RSS: {} KiB",
        usb.proc.rss_kb(),
        dom0.proc.rss_kb()
    );
}
