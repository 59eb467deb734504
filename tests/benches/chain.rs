//! Benchmark of the Dom0 link: a client talking to the broker directly against the same client
//! talking through a simulated channel and the link, in one run, with the ratios; Dom0 clients on
//! `--listen` and the operator socket against the broker's own port; throughput both ways.
//!
//! Run with `./scripts/bench` (it builds the release binaries first and puts the tables in
//! docs/performance.md). Not a test: it asserts nothing about speed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::net::UnixStream;
use std::time::Duration;

use system_tests::bench::{
    Cpu, Report, STEP_DEADLINE, Stats, cpu_during, guest, interleaved, p50_p99, ratios, requester,
    responder, tcp, tcp_plain, throughput, throughput_of, us_each,
};
use system_tests::channel::{Channel, SimRoundTrip};
use system_tests::raw::RawClient;
use system_tests::scene::policy_opening;
use system_tests::{BrokerKind, Dom0, TestDir};

/// Each path has its own command so that a responder of one path never answers another's requests.
const DIRECT: &str = "system/disks/list_files";
const CHAINED: &str = "system/disks/list_disks";
const LISTEN: &str = "system/disks/get_file_footprint";
const OPERATOR: &str = "system/disks/create_file";
const OWN_PLAIN: &str = "system/disks/remove_file";
const NOTIFY: &str = "system/disk/new_file/notification";
const ROUND_TRIPS: usize = 2000;
const WARMUP: usize = 200;
const MESSAGES: u64 = 200_000;
/// Bytes of the bulk runs (4 KiB publishes and the raw channel).
const BULK_BYTES: usize = 64 * 1024 * 1024;

fn main() {
    system_tests::bench::run_all("Dom0 link (`tests/benches/chain.rs`)", run);
}

fn run(kind: BrokerKind, report: &mut Report) {
    let dir = TestDir::new("bench");
    let conf_arg = system_tests::bench::unlimited_config(&dir);
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, policy_opening("bench/all/#", "bench/{vm}/#")).unwrap();
    let policy_arg = policy.display().to_string();
    let operator = dir.join("operator.sock");
    let operator_arg = operator.display().to_string();
    let mut args = vec![
        "--config",
        conf_arg.as_str(),
        "--policy",
        policy_arg.as_str(),
    ];
    if kind == BrokerKind::Embedded {
        args.extend(["--operator-socket", operator_arg.as_str()]);
    }
    let dom0 = Dom0::start_logging(&dir, kind, &args, "info,rumqttd=error");
    let ch = Channel::new(&dir.path, "sys-usb");
    dom0.proc.wait_log("link{vm=sys-usb}: attached to channel");
    let broker_port = system_tests::bench::broker_port(&dom0, kind);

    // Round trips, QoS 1 both ways, interleaved (one of each path per round).
    // (a) both clients on the broker's own port (the lean client of tests/src/raw.rs, with
    // TCP_NODELAY and TCP_QUICKACK);
    responder(tcp(broker_port, "bench-direct-responder"), DIRECT);
    let mut direct = requester(tcp(broker_port, "bench-direct-requester"), DIRECT);
    // (b) the responder is a guest behind the simulated channel and the Dom0 link;
    responder(guest(&ch, "sys-usb"), CHAINED);
    let mut chained = requester(tcp(broker_port, "bench-chain-requester"), CHAINED);
    // (c) the simulated channel's own round trip, in a directory Dom0 does not watch;
    let sim_dir = TestDir::new("bench-chain-sim");
    let mut sim = SimRoundTrip::new(&sim_dir.path);
    let mut sim = move |_| sim.once();
    // (d) plain requesters (TCP_NODELAY, no TCP_QUICKACK: like mosquitto_pub) on the broker's own
    // port, and — embedded broker — on the addresses Dom0 clients use: --listen and the operator
    // socket (dom0-broker's front door). Their responders are direct.
    responder(tcp(broker_port, "bench-own-responder"), OWN_PLAIN);
    let mut own_plain = requester(tcp_plain(broker_port, "bench-plain-own"), OWN_PLAIN);
    let mut paths: Vec<&mut dyn FnMut(usize) -> Duration> =
        vec![&mut direct, &mut chained, &mut sim, &mut own_plain];
    let mut listen;
    let mut unix;
    if kind == BrokerKind::Embedded {
        responder(tcp(broker_port, "bench-listen-responder"), LISTEN);
        listen = requester(tcp_plain(dom0.port, "bench-plain-listen"), LISTEN);
        responder(tcp(broker_port, "bench-operator-responder"), OPERATOR);
        let s = UnixStream::connect(&operator).unwrap();
        s.set_read_timeout(Some(STEP_DEADLINE)).unwrap();
        unix = requester(RawClient::connect(s, "bench-plain-operator"), OPERATOR);
        paths.push(&mut listen);
        paths.push(&mut unix);
    }
    eprintln!(
        "{ROUND_TRIPS} rounds of {} interleaved round trips…",
        paths.len()
    );
    let s = interleaved(ROUND_TRIPS, WARMUP, &mut paths);
    let (direct, chained, sim, own_plain) = (&s[0], &s[1], &s[2], &s[3]);
    report.row(
        "round trip direct (broker's own port), p50 / p99",
        p50_p99(direct),
    );
    report.row(
        "round trip through channel + link, p50 / p99",
        p50_p99(chained),
    );
    report.row("**ratio to direct**, p50 / p99", ratios(chained, direct));
    report.row(
        "the simulated channel alone, one round trip, p50",
        format!("{:.1} µs", sim.p50),
    );
    let own = chained.p50 - direct.p50 - sim.p50;
    report.row(
        "**the link's own cost** p50 (target ≤ 20 µs, ≤ 1.10× direct + channel)",
        format!("{own:.1} µs ({:.2}×)", chained.p50 / (direct.p50 + sim.p50)),
    );
    let stalls: usize = s.iter().map(|s: &Stats| s.stalls).sum();
    report.row(
        "round trips ≥ 40 ms (Nagle stalls), all paths",
        stalls.to_string(),
    );
    report.row(
        "plain client (no TCP_QUICKACK) on the broker's own port, p50 / p99",
        p50_p99(own_plain),
    );
    if let [.., listen, unix] = s.as_slice()
        && kind == BrokerKind::Embedded
    {
        report.row(
            "plain client on `--listen`, p50 / p99 (**ratio to direct**, target ≤ 1.10×)",
            format!("{} ({})", p50_p99(listen), ratios(listen, direct)),
        );
        report.row(
            "plain client on the operator socket, p50 / p99 (**ratio to direct**)",
            format!("{} ({})", p50_p99(unix), ratios(unix, direct)),
        );
    }

    eprintln!("throughput, {MESSAGES} × 16-byte messages, QoS 0");
    // CPU per message and per MB beside every rate (a figure that does not depend on how many
    // cores the machine has): the broker's own in the direct runs; through a link, the link's
    // (Dom0's, less the broker's own of the direct run when the broker is inside Dom0) and the
    // simulated channel's relay threads'.
    let dom0_pid = dom0.proc.pid();
    let broker_pid = dom0.mosquitto.as_ref().map_or(dom0_pid, |m| m.pid());
    let embedded = kind == BrokerKind::Embedded;
    let through = [Cpu::Process(dom0_pid), Cpu::Relay];
    let (d, t) = cpu_during(&[Cpu::Process(broker_pid)], || {
        throughput(
            MESSAGES,
            NOTIFY,
            tcp(broker_port, "bench-pub-a"),
            tcp(broker_port, "bench-sub-a"),
        )
    });
    let broker_msg = us_each(t[0], MESSAGES as f64);
    report.row(
        "throughput direct (broker's own port), 16-byte QoS 0; the broker's CPU per message",
        format!("{d:.0} msg/s; {broker_msg:.2} µs"),
    );
    // The link's and the relay's CPU per unit (µs per message, or ms per MB with units in MB),
    // against the broker's own per unit in the direct run: "link L (R× the broker's), relay C".
    let link_cpu = |t: &[u64], units: f64, broker: f64| {
        let dom0 = us_each(t[0], units);
        let link = if embedded { dom0 - broker } else { dom0 };
        (link, us_each(t[1], units))
    };
    // A second channel for the throughput runs, so the responder above stays out of the way.
    let ch2 = Channel::new(&dir.path, "vm-gui");
    dom0.proc.wait_log("link{vm=vm-gui}: attached to channel");
    let (down, t) = cpu_during(&through, || {
        throughput(
            MESSAGES,
            NOTIFY,
            tcp(broker_port, "bench-pub-b"),
            guest(&ch2, "vm-gui"),
        )
    });
    let (link, relay) = link_cpu(&t, MESSAGES as f64, broker_msg);
    report.row(
        "Dom0 → guest through the link (**ratio to direct**, target ≥ 0.9×); CPU per message: the link's (**ratio to the broker's**, target ≤ 1×), the channel relay's",
        format!(
            "{down:.0} msg/s ({:.2}×); link {link:.2} µs ({:.2}×), relay {relay:.2} µs",
            down / d,
            link / broker_msg
        ),
    );
    let ch3 = Channel::new(&dir.path, "vm-three");
    dom0.proc.wait_log("link{vm=vm-three}: attached to channel");
    // Any VM may publish under `bench/<itself>/` (the policy of this run); a notification would
    // have to be a JSON object naming its origin.
    let (up, t) = cpu_during(&through, || {
        throughput(
            MESSAGES,
            "bench/vm-three/up",
            guest(&ch3, "vm-three"),
            tcp(broker_port, "bench-sub-c"),
        )
    });
    let (link, relay) = link_cpu(&t, MESSAGES as f64, broker_msg);
    report.row(
        "guest → Dom0 through the link (**ratio to direct**, target ≥ 0.9×); CPU per message: the link's (**ratio to the broker's**, target ≤ 1×), the channel relay's",
        format!(
            "{up:.0} msg/s ({:.2}×); link {link:.2} µs ({:.2}×), relay {relay:.2} µs",
            up / d,
            link / broker_msg
        ),
    );
    // Bulk: 4 KiB publishes through one channel against the simulated channel's own bulk
    // throughput (a pty behind a UNIX socket), same direction, same run.
    let bulk_dir = TestDir::new("bench-chain-bulk");
    let mut bulk = SimRoundTrip::new(&bulk_dir.path);
    let ch4 = Channel::new(&dir.path, "vm-four");
    dom0.proc.wait_log("link{vm=vm-four}: attached to channel");
    // The raw channel's and a bare pty's best (the most flattering baselines for them): writes of
    // 4, 16 and 64 KiB, twice each.
    const CHUNKS: [usize; 6] = [4096, 16384, 65536, 4096, 16384, 65536];
    let best = |bulk: &mut SimRoundTrip, up| {
        CHUNKS
            .iter()
            .map(|c| bulk.bulk(BULK_BYTES, *c, up))
            .fold(0.0, f64::max)
    };
    let best_pty = |up| {
        CHUNKS
            .iter()
            .map(|c| system_tests::channel::pty_bulk(BULK_BYTES, *c, up))
            .fold(0.0, f64::max)
    };
    let mb = BULK_BYTES as f64 / 1e6;
    // ms per MB: µs per MB / 1000.
    let (direct4, t) = cpu_during(&[Cpu::Process(broker_pid)], || {
        throughput_of(
            (BULK_BYTES / 4096) as u64,
            "bench/all/direct",
            4096,
            tcp(broker_port, "bench-pub-f"),
            tcp(broker_port, "bench-sub-f"),
        ) * 4096.0
            / 1e6
    });
    let broker_mb = us_each(t[0], mb) / 1e3;
    report.row(
        "4 KiB publishes direct (broker's own port), payload MB/s; the broker's CPU per MB",
        format!("{direct4:.0} MB/s; {broker_mb:.1} ms"),
    );
    let raw_up = best(&mut bulk, true);
    let (up4, t) = cpu_during(&through, || {
        throughput_of(
            (BULK_BYTES / 4096) as u64,
            "bench/vm-four/bulk",
            4096,
            guest(&ch4, "vm-four"),
            tcp(broker_port, "bench-sub-d"),
        ) * 4096.0
            / 1e6
    });
    let (link, relay) = link_cpu(&t, mb, broker_mb * 1e3);
    let (link, relay) = (link / 1e3, relay / 1e3);
    let pty_up = best_pty(true);
    report.row(
        "4 KiB publishes guest → Dom0, payload MB/s (**ratio to the simulated channel's / a bare pty's bulk**, target ≥ 0.5×); CPU per MB: the link's, the channel relay's (**link / relay**, target ≤ 2×)",
        format!(
            "{up4:.0} MB/s; channel {raw_up:.0} MB/s ({:.2}×); pty {pty_up:.0} MB/s ({:.2}×); link {link:.1} ms, relay {relay:.1} ms ({:.2}×)",
            up4 / raw_up,
            up4 / pty_up,
            link / relay.max(1e-9)
        ),
    );
    let raw_down = best(&mut bulk, false);
    let ch5 = Channel::new(&dir.path, "vm-five");
    dom0.proc.wait_log("link{vm=vm-five}: attached to channel");
    let (down4, t) = cpu_during(&through, || {
        throughput_of(
            (BULK_BYTES / 4096) as u64,
            "bench/all/bulk",
            4096,
            tcp(broker_port, "bench-pub-e"),
            guest(&ch5, "vm-five"),
        ) * 4096.0
            / 1e6
    });
    let (link, relay) = link_cpu(&t, mb, broker_mb * 1e3);
    let (link, relay) = (link / 1e3, relay / 1e3);
    let pty_down = best_pty(false);
    report.row(
        "4 KiB publishes Dom0 → guest, payload MB/s (**ratio to the simulated channel's / a bare pty's bulk**, target ≥ 0.5×); CPU per MB: the link's, the channel relay's (**link / relay**, target ≤ 2×)",
        format!(
            "{down4:.0} MB/s; channel {raw_down:.0} MB/s ({:.2}×); pty {pty_down:.0} MB/s ({:.2}×); link {link:.1} ms, relay {relay:.1} ms ({:.2}×)",
            down4 / raw_down,
            down4 / pty_down,
            link / relay.max(1e-9)
        ),
    );
    // What Dom0's messaging costs in memory: dom0-broker (with the embedded broker inside it), or
    // dom0-broker and Mosquitto.
    let dom0_rss = dom0.proc.rss_kb() as f64 / 1024.0;
    report.row(
        "RSS after the runs: dom0-broker (+ Mosquitto) = total",
        match &dom0.mosquitto {
            Some(m) => {
                let m = m.rss_kb() as f64 / 1024.0;
                format!("{dom0_rss:.1} + {m:.1} = {:.1} MiB", dom0_rss + m)
            }
            None => format!("{dom0_rss:.1} MiB"),
        },
    );
}
