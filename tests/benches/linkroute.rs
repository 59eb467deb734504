//! The links' route to the embedded broker, A/B in the same run (issue 26, part 3): loopback TCP
//! to rumqttd's private port (`embedded_links = "tcp"`, before) against the in-process route (an
//! in-memory pipe per link, served by rumqttd's connection code on Dom0's runtime: the default,
//! after).
//! Two Dom0s with the embedded broker, one per route, each with a guest responder on a simulated
//! channel; per run, round trips interleaved (direct on each broker's own port, through each link,
//! the simulated channel alone; the order of the two Dom0s alternates from run to run), then
//! `perf stat` on each Dom0 over the same number of round trips through its link and directly:
//! system calls, context switches and CPU per round trip, the link's share being the difference.
//! Three runs, each with fresh processes.
//!
//! Run with `./scripts/bench` (embedded broker only). Not a test: it asserts nothing about speed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use system_tests::bench::{
    PerfCounts, Report, Stats, guest, interleaved, perf_during, requester, responder, tcp,
    unlimited_config,
};
use system_tests::channel::{Channel, SimRoundTrip};
use system_tests::scene::policy_opening;
use system_tests::{BrokerKind, Dom0, TestDir};

const DIRECT: &str = "system/disks/list_files";
const CHAINED: &str = "system/disks/list_disks";
const RUNS: usize = 3;
const ROUND_TRIPS: usize = 2000;
const WARMUP: usize = 200;
/// Round trips counted by perf, per path.
const PERF_ROUNDS: usize = 2000;
const ROUTES: [&str; 2] = ["tcp", "in-process"];

/// A Dom0 with the embedded broker whose links take `route`, and sys-usb's channel.
struct Side {
    dir: TestDir,
    dom0: Dom0,
    ch: Channel,
    port: u16,
}

fn side(route: &str) -> Side {
    let dir = TestDir::new("bench-route");
    let conf = unlimited_config(&dir);
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.insert_str(0, &format!("embedded_links = \"{route}\"\n"));
    std::fs::write(&conf, text).unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, policy_opening("bench/all/#", "bench/{vm}/#")).unwrap();
    let policy = policy.display().to_string();
    let dom0 = Dom0::start_logging(
        &dir,
        BrokerKind::Embedded,
        &["--config", &conf, "--policy", &policy],
        "info,rumqttd=error",
    );
    let ch = Channel::new(&dir.path, "sys-usb");
    dom0.proc.wait_log("link{vm=sys-usb}: attached to channel");
    let port = system_tests::bench::broker_port(&dom0, BrokerKind::Embedded);
    Side {
        dir,
        dom0,
        ch,
        port,
    }
}

/// What one run measured for one route.
#[derive(Default)]
struct Figures {
    own_us: f64,
    ratio: f64,
    chained: Option<(f64, f64)>,
    perf_link: Option<PerfCounts>,
    perf_chained: Option<PerfCounts>,
}

fn main() {
    if !system_tests::bench::kinds_from_args().contains(&BrokerKind::Embedded) {
        return;
    }
    let mut report = Report::with_columns(
        "The links' route to the embedded broker, A/B (`tests/benches/linkroute.rs`)",
        &[
            "loopback TCP (`embedded_links = \"tcp\"`, before)",
            "in process (the default, after)",
        ],
    );
    let mut all: [Vec<Figures>; 2] = [Vec::new(), Vec::new()];
    for run in 0..RUNS {
        let sides = [side(ROUTES[0]), side(ROUTES[1])];
        let mut direct = Vec::new();
        let mut chained = Vec::new();
        for s in &sides {
            responder(tcp(s.port, "bench-direct-responder"), DIRECT);
            direct.push(requester(tcp(s.port, "bench-direct-requester"), DIRECT));
            responder(guest(&s.ch, "sys-usb"), CHAINED);
            chained.push(requester(tcp(s.port, "bench-chain-requester"), CHAINED));
        }
        let sim_dir = TestDir::new("bench-route-sim");
        let mut sim_channel = SimRoundTrip::new(&sim_dir.path);
        let mut sim = move |_| sim_channel.once();
        // Alternate which Dom0 goes first in each round.
        let first = run % 2;
        let a = first;
        let stats = {
            let [d0, d1] = &mut direct[..] else {
                unreachable!()
            };
            let [c0, c1] = &mut chained[..] else {
                unreachable!()
            };
            let mut paths: Vec<&mut dyn FnMut(usize) -> Duration> = if a == 0 {
                vec![d0, c0, d1, c1, &mut sim]
            } else {
                vec![d1, c1, d0, c0, &mut sim]
            };
            eprintln!(
                "run {}: {ROUND_TRIPS} rounds of 5 interleaved round trips…",
                run + 1
            );
            interleaved(ROUND_TRIPS, WARMUP, &mut paths)
        };
        let at = |route: usize| if route == a { 0 } else { 2 };
        let sim_p50 = stats[4].p50;
        for (route, side) in sides.iter().enumerate() {
            let (d, c): (&Stats, &Stats) = (&stats[at(route)], &stats[at(route) + 1]);
            let mut f = Figures {
                own_us: c.p50 - d.p50 - sim_p50,
                ratio: c.p50 / (d.p50 + sim_p50),
                chained: Some((c.p50, c.p99)),
                ..Figures::default()
            };
            // perf: the same number of round trips directly (the broker alone) and through the
            // link, on this Dom0 only.
            let pid = side.dom0.proc.pid();
            let i = route;
            let (_, pd) = perf_during(&side.dir, pid, || {
                (0..PERF_ROUNDS).for_each(|n| {
                    direct[i](n);
                })
            });
            let (_, pc) = perf_during(&side.dir, pid, || {
                (0..PERF_ROUNDS).for_each(|n| {
                    chained[i](n);
                })
            });
            let rounds = PERF_ROUNDS as f64;
            f.perf_chained = pc.map(|c| c.per(rounds));
            f.perf_link = pc.zip(pd).map(|(c, d)| c.less(&d).per(rounds));
            eprintln!(
                "run {} {}: link's own cost {:.1} µs ({:.2}×); {}",
                run + 1,
                ROUTES[route],
                f.own_us,
                f.ratio,
                perf_text(f.perf_link.as_ref())
            );
            all[route].push(f);
        }
        eprintln!("run {}: sim channel p50 {sim_p50:.1} µs", run + 1);
    }
    for (route, runs) in all.iter().enumerate() {
        report.column(route);
        for (n, f) in runs.iter().enumerate() {
            let (p50, p99) = f.chained.unwrap_or_default();
            report.row(
                &format!(
                    "run {}: round trip through channel + link, p50 / p99; **the link's own cost** p50 (ratio to direct + channel)",
                    n + 1
                ),
                format!("{p50:.1} / {p99:.1} µs; {:.1} µs ({:.2}×)", f.own_us, f.ratio),
            );
        }
        let mean = |g: fn(&Figures) -> f64| runs.iter().map(g).sum::<f64>() / runs.len() as f64;
        report.row(
            "**the link's own cost**, mean of the runs (target ≤ 20 µs, ≤ 1.10× direct + channel)",
            format!("{:.1} µs ({:.2}×)", mean(|f| f.own_us), mean(|f| f.ratio)),
        );
        let perf_mean = |g: fn(&Figures) -> Option<PerfCounts>| {
            let got: Vec<PerfCounts> = runs.iter().filter_map(g).collect();
            (!got.is_empty()).then(|| {
                let n = got.len() as f64;
                PerfCounts {
                    syscalls: got.iter().map(|c| c.syscalls).sum::<f64>() / n,
                    switches: got.iter().map(|c| c.switches).sum::<f64>() / n,
                    cpu_ms: got.iter().map(|c| c.cpu_ms).sum::<f64>() / n,
                }
            })
        };
        report.row(
            "Dom0 (link + broker) per round trip through the link: system calls · context switches · CPU (perf stat, mean of the runs)",
            perf_text(perf_mean(|f| f.perf_chained).as_ref()),
        );
        report.row(
            "**the link's share** per round trip (through the link less directly, same Dom0): system calls · context switches · CPU",
            perf_text(perf_mean(|f| f.perf_link).as_ref()),
        );
    }
    report.print();
}

fn perf_text(c: Option<&PerfCounts>) -> String {
    match c {
        Some(c) => format!("{:.1} · {:.1} · {:.1} µs", c.syscalls, c.switches, c.cpu_ms),
        None => "perf not available".to_owned(),
    }
}
