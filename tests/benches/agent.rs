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
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use std::cell::RefCell;

use system_tests::bench::{Report, Stats, chain_rows, guest, interleaved, p50_p99, rss_mib, tcp};
use system_tests::channel::{Channel, SimRoundTrip};
use system_tests::raw::RawClient;
use system_tests::scene::policy_opening;
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

/// Runs `f` and says how long it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t0 = Instant::now();
    let r = f();
    (r, t0.elapsed())
}

/// How long 1 GiB took, and the rate: "N ms (M MB/s)".
fn one_gib(d: Duration) -> String {
    let secs = d.as_secs_f64();
    format!("{:.0} ms ({:.0} MB/s)", secs * 1e3, 1073.741824 / secs)
}

/// How long 1 GiB took through the agent, and its speed against a baseline's: "N ms (M MB/s): R×".
fn one_gib_against(d: Duration, baseline: Duration) -> String {
    format!(
        "{}: {:.2}×",
        one_gib(d),
        baseline.as_secs_f64() / d.as_secs_f64()
    )
}

/// The per-hop paths' topics: who asks, what comes back, the path.
const DOM0_ASKS: &str = "bench/dom0/";
const GUI_ASKS: &str = "bench/vm-gui/";
const ECHO_BACK: &str = "bench/vm-echo/";
const ONE: &str = "one";
const TWO: &str = "two";

/// A guest without the agent that echoes every request of the per-hop paths back at QoS 1, on its
/// own tree under the same last level.
fn echo<S: std::io::Read + std::io::Write + Send + 'static>(mut c: RawClient<S>) {
    c.subscribe_qos1(&format!("{DOM0_ASKS}{ONE}"));
    c.subscribe_qos1(&format!("{GUI_ASKS}{TWO}"));
    std::thread::spawn(move || {
        let mut pkid = 0u16;
        while let Some((topic, p)) = c.try_next_publish_on() {
            let path = topic.rsplit('/').next().unwrap_or_default();
            pkid = pkid % 60_000 + 1;
            if !c.try_publish_qos1(&format!("{ECHO_BACK}{path}"), pkid, &p) {
                return;
            }
        }
    });
}

/// One QoS 1 round trip to the echo guest on `topic`; its duration.
fn echo_round_trip<S: std::io::Read + std::io::Write>(
    c: &mut RawClient<S>,
    topic: &str,
    i: usize,
) -> Duration {
    let id = format!("hop{i}");
    let v = json!({ "request_id": id });
    let t0 = Instant::now();
    let got = ask(c, topic, &v, &id);
    let d = t0.elapsed();
    assert_eq!(got, v);
    d
}

/// The chain's time hop by hop, by difference of round trips measured in the same run (p50): the
/// first link with its channel (Dom0 ↔ vm-echo less direct and one channel round trip), the
/// second (vm-gui ↔ vm-echo less Dom0 ↔ vm-echo and one channel round trip), the agent with the
/// dictionary's checks (vm-gui ↔ sys-usb's agent less vm-gui ↔ vm-echo).
fn hop_rows(
    report: &mut Report,
    direct: &Stats,
    chain: &Stats,
    sim: &Stats,
    one: &Stats,
    two: &Stats,
) {
    report.row(
        "per hop, p50: Dom0 ↔ a guest without the agent (one link) · vm-gui ↔ that guest (two links) · the chain",
        format!("{:.1} · {:.1} · {:.1} µs", one.p50, two.p50, chain.p50),
    );
    let first = one.p50 - direct.p50 - sim.p50;
    let second = two.p50 - one.p50 - sim.p50;
    let agent = chain.p50 - two.p50;
    let share = |x: f64| 100.0 * x / chain.p50;
    report.row(
        "**the chain, hop by hop** (p50, share of the chain): direct · 2 channel round trips · first link · second link · the agent and the dictionary's checks",
        format!(
            "{:.1} µs ({:.0} %) · {:.1} µs ({:.0} %) · {first:.1} µs ({:.0} %) · {second:.1} µs ({:.0} %) · {agent:.1} µs ({:.0} %)",
            direct.p50,
            share(direct.p50),
            2.0 * sim.p50,
            share(2.0 * sim.p50),
            share(first),
            share(second),
            share(agent),
        ),
    );
}

fn main() {
    system_tests::bench::run_all("The chain with the agent (`tests/benches/agent.rs`)", run);
}

fn run(kind: BrokerKind, report: &mut Report) {
    let dir = TestDir::new("bench-agent");
    let disks = dir.join("disks");
    std::fs::create_dir_all(disks.join("usb0")).unwrap();
    std::fs::create_dir_all(disks.join("usb1")).unwrap();
    // The default roles, and `bench/` open to every VM for the per-hop paths.
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, policy_opening("bench/#", "bench/{vm}/#")).unwrap();
    let policy = policy.display().to_string();
    let dom0 = Dom0::start_logging(&dir, kind, &["--policy", &policy], "info,rumqttd=error");
    let usb_ch = Channel::new(&dir.path, "sys-usb");
    let gui_ch = Channel::new(&dir.path, "vm-gui");
    let echo_ch = Channel::new(&dir.path, "vm-echo");
    dom0.proc.wait_log("link{vm=sys-usb}: attached to channel");
    dom0.proc.wait_log("link{vm=vm-gui}: attached to channel");
    dom0.proc.wait_log("link{vm=vm-echo}: attached to channel");
    let d = disks.display().to_string();
    let repo = dir.join("repository");
    std::fs::create_dir_all(&repo).unwrap();
    let r = repo.display().to_string();
    let usb = Agent::start_logging(
        &dir,
        &usb_ch,
        "sys-usb",
        &["--disks", &d, "--repository", &r],
        "info",
    );
    dom0.proc.wait_log("link{vm=sys-usb}: session up");
    let broker_port = system_tests::bench::broker_port(&dom0, kind);

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
    let mut direct = |i: usize| {
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
        d
    };
    // (b) vm-gui (a client on its channel) asks sys-usb's agent for list_disks: two channels,
    // two links, policy checks, the agent's session and service.
    let gui = RefCell::new(guest(&gui_ch, "vm-gui"));
    gui.borrow_mut()
        .subscribe_qos1("system/+/+/response/vm-gui");
    gui.borrow_mut()
        .subscribe_qos1(&format!("{ECHO_BACK}{TWO}"));
    let mut chained = |i: usize| {
        let id = format!("rt{i}");
        let t0 = Instant::now();
        let v = ask(
            &mut gui.borrow_mut(),
            "system/disks/list_disks/request",
            &json!({"sender": "vm-gui", "request_id": id}),
            &id,
        );
        let c = t0.elapsed();
        assert_eq!(v["status"], "ok", "{v}");
        c
    };
    // The hops one at a time (the per-hop timeline, by difference, same run): an echo guest with
    // no agent (a raw client on its channel, vm-echo) answers (d) a Dom0 client — one link and its
    // channel — and (e) vm-gui — two links, two channels, no agent.
    echo(guest(&echo_ch, "vm-echo"));
    let mut dom0_asker = tcp(broker_port, "bench-hop-requester");
    dom0_asker.subscribe_qos1(&format!("{ECHO_BACK}{ONE}"));
    let mut one = |i: usize| echo_round_trip(&mut dom0_asker, &format!("{DOM0_ASKS}{ONE}"), i);
    let mut two = |i: usize| echo_round_trip(&mut gui.borrow_mut(), &format!("{GUI_ASKS}{TWO}"), i);
    // (c) The simulator's own share: the chain crosses two simulated channels there and back.
    let sim_dir = TestDir::new("bench-sim");
    let mut sim_channel = SimRoundTrip::new(&sim_dir.path);
    let mut sim = |_| sim_channel.once();
    eprintln!("{ROUND_TRIPS} rounds of 5 interleaved round trips…");
    let s = interleaved(
        ROUND_TRIPS,
        100,
        &mut [&mut direct, &mut chained, &mut sim, &mut one, &mut two],
    );
    let [a, b, sim, one, two] = &s[..] else {
        unreachable!("five paths, five statistics")
    };
    report.row("round trip direct, p50 / p99", p50_p99(a));
    chain_rows(
        report,
        "vm-gui → sys-usb → vm-gui, p50 / p99",
        "**ratio to direct**, p50 / p99 (targets ≤ 3× / ≤ 5×)",
        a,
        b,
        sim,
    );
    hop_rows(report, a, b, sim, one, two);
    let mut gui = gui.into_inner();
    report.row(
        "round trips ≥ 40 ms, all paths",
        (a.stalls + b.stalls + sim.stalls).to_string(),
    );

    eprintln!("get_file_footprint vs sha256sum, 1 GiB file (page cache warm)");
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
    let (out, t_sum) = timed(|| Command::new("sha256sum").arg(&big).output().unwrap());
    let expected = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let rss_before = usb.proc.rss_kb();
    let (v, t_agent) = timed(|| {
        ask(
            &mut gui,
            "system/disks/get_file_footprint/request",
            &json!({"sender": "vm-gui", "request_id": "fp", "disk": "usb0", "filepath": "big.bin"}),
            "fp",
        )
    });
    assert_eq!(v["footprint"], expected);
    report.row("`sha256sum` 1 GiB (page cache warm)", one_gib(t_sum));
    report.row(
        "`get_file_footprint` 1 GiB asked by vm-gui (**ratio to `sha256sum`**, target ≥ 3×)",
        one_gib_against(t_agent, t_sum),
    );
    report.row(
        "sys-usb agent RSS before / after hashing 1 GiB",
        format!("{} / {} KiB", rss_before, usb.proc.rss_kb()),
    );

    eprintln!("read_file (copy into the repository) vs dd conv=fsync, 1 GiB file");
    let (ok, t_dd) = timed(|| {
        Command::new("dd")
            .arg(format!("if={}", big.display()))
            .arg(format!("of={}", dir.join("dd-copy.bin").display()))
            .args(["bs=1M", "conv=fsync", "status=none"])
            .status()
            .unwrap()
            .success()
    });
    assert!(ok, "dd failed");
    let _ = std::fs::remove_file(dir.join("dd-copy.bin"));
    let (v, t_read) = timed(|| {
        ask(
            &mut gui,
            "system/disks/read_file/request",
            &json!({"sender": "vm-gui", "request_id": "rf", "source_disk": "usb0", "filepath": "big.bin"}),
            "rf",
        )
    });
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["footprint"], expected);
    report.row("`dd conv=fsync` 1 GiB (page cache warm)", one_gib(t_dd));
    report.row(
        "`read_file` 1 GiB into the repository (copy, fsync, read back and compared) asked by vm-gui (**ratio to `dd`**)",
        format!(
            "{}; agent RSS {} KiB",
            one_gib_against(t_read, t_dd),
            usb.proc.rss_kb()
        ),
    );
    let _ = std::fs::remove_file(repo.join("usb0/big.bin"));

    eprintln!("create_file through the channel, 16 × 1 MiB (Base64: 1.33 MiB per request)");
    let data = topics::binary::encode(&vec![0x5au8; 1024 * 1024]);
    let files = system_tests::bench::flag_numbers::<usize>("--create-files")
        .first()
        .copied()
        .unwrap_or(16)
        .max(1);
    let create = |i: usize| json!({"sender": "vm-gui", "request_id": format!("cf{i}"), "disk": "usb1", "filepath": format!("c/{i}.bin"), "data": data});
    let t0 = Instant::now();
    for i in 0..files {
        let v = ask(
            &mut gui,
            "system/disks/create_file/request",
            &create(i),
            &format!("cf{i}"),
        );
        assert_eq!(v["status"], "ok", "{v}");
    }
    let t_create = t0.elapsed().as_secs_f64() / files as f64;
    // The ceiling of one message per file: the same request's bytes crossing the two simulated
    // channels alone (vm-gui's up, sys-usb's down; one write each), with no link, broker or agent.
    let request = system_tests::raw::publish_qos1(
        "system/disks/create_file/request",
        1,
        create(0).to_string().as_bytes(),
    )
    .len();
    let sim_dir = TestDir::new("bench-agent-sim");
    let mut sim_channel = SimRoundTrip::new(&sim_dir.path);
    let mut crossing = |up| request as f64 / (sim_channel.bulk(request, request, up) * 1e6);
    let t_channels = (0..files)
        .map(|_| crossing(true) + crossing(false))
        .sum::<f64>()
        / files as f64;
    let per_file = |secs: f64| {
        format!(
            "{:.1} MB/s ({:.1} ms per file)",
            1.048576 / secs,
            secs * 1e3
        )
    };
    report.row(
        "`create_file` of 1 MiB files asked by vm-gui one after the other, file data (**ratio to the ceiling below**)",
        format!("{}: {:.2}×", per_file(t_create), t_channels / t_create),
    );
    report.row(
        "ceiling of one message per file: its bytes across the two simulated channels alone",
        per_file(t_channels),
    );
    report.row(
        "sys-usb agent RSS after / Dom0 RSS",
        rss_mib(&[&usb.proc, &dom0.proc]),
    );
}
