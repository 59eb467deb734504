//! Benchmark of Dom0 at scale (issue 26): N = 1, 8, 32, 100 simulated channels, each with a guest
//! client (the lean client of tests/src/raw.rs) asking at QoS 1 in a closed loop — sys-usb's agent
//! on its own channel (`list_disks`), then Dom0's controller (`discover`, addressed to Dom0) — and
//! sys-usb's agent again at a fixed offered rate per VM. Beside them, the same load direct: N TCP
//! clients of the broker's own port asking one TCP responder. Per N: aggregate requests/s, p50 /
//! p99 (and the slowest VM's p99), fairness (the slowest VM's requests / the fastest's), CPU per
//! request of Dom0 (the scheduler's accounting in /proc) against the broker's own in the direct run. Both
//! brokers. Writes `docs/scaling.svg` when both brokers are measured.
//!
//! Run with `./scripts/bench`. Prints figures; asserts nothing about speed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use system_tests::bench::{Report, STEP_DEADLINE, Stats, guest, stats, tcp};
use system_tests::channel::Channel;
use system_tests::plot::{Panel, Series, svg};
use system_tests::procfs::cpu_ns;
use system_tests::raw::RawClient;
use system_tests::scene::policy_with_clients;
use system_tests::{Agent, BrokerKind, Dom0, TestDir};

/// The numbers of busy VMs measured.
const NS: [usize; 4] = [1, 8, 32, 100];
/// Not counted at the start of every run.
const WARMUP: Duration = Duration::from_secs(1);
/// Counted.
const MEASURE: Duration = Duration::from_secs(4);
/// The offered rate of each VM in the fixed-rate run, requests per second.
const RATE_PER_VM: f64 = 10.0;

/// One kind of question: its request topic and what its payload carries beside the envelope.
struct Question {
    topic: &'static str,
    extra: &'static str,
}

const LIST_DISKS: Question = Question {
    topic: "system/disks/list_disks/request",
    extra: "",
};
const DISCOVER: Question = Question {
    topic: "system/components/discover/request",
    extra: r#","destination":"dom0""#,
};

/// A client that asks questions one at a time as `sender`.
struct Asker<S> {
    client: RawClient<S>,
    sender: String,
    /// For the direct clients: their own request topic (the responder answers on its `response`).
    topic: Option<String>,
    pkid: u16,
}

impl<S: Read + Write> Asker<S> {
    /// One round trip. Some(true) when answered `ok` (or echoed), Some(false) when answered
    /// otherwise, None when the client's stream is gone or silent past the step deadline.
    fn ask(&mut self, q: &Question, k: u64) -> Option<bool> {
        let id = format!("{}-{k}", self.sender);
        let body = format!(
            r#"{{"sender":"{}","request_id":"{id}"{}}}"#,
            self.sender, q.extra
        );
        self.pkid = self.pkid % 60_000 + 1;
        let topic = self.topic.as_deref().unwrap_or(q.topic);
        if !self
            .client
            .try_publish_qos1(topic, self.pkid, body.as_bytes())
        {
            return None;
        }
        loop {
            let p = self.client.try_next_publish()?;
            let v: Value = serde_json::from_slice(&p).unwrap_or(Value::Null);
            if v["request_id"] == id.as_str() {
                return Some(v.get("status").is_none_or(|s| s == "ok"));
            }
        }
    }
}

/// What one run measured.
struct Run {
    /// Requests answered in the measured window, per VM.
    per_vm: Vec<u64>,
    /// Their round trips, all VMs together.
    all: Stats,
    /// The slowest VM's p99, µs.
    worst_p99: f64,
    /// Answers other than `ok`, and clients that gave up.
    errors: u64,
    /// CPU time (ns) of each watched process over the measured window.
    cpu: Vec<u64>,
    /// The measured window's length: requests counted began within it.
    secs: f64,
}

impl Run {
    fn total(&self) -> u64 {
        self.per_vm.iter().sum()
    }
    fn per_sec(&self) -> f64 {
        self.total() as f64 / self.secs.max(1e-3)
    }
    fn fairness(&self) -> f64 {
        let min = self.per_vm.iter().copied().min().unwrap_or(0) as f64;
        let max = self.per_vm.iter().copied().max().unwrap_or(0) as f64;
        if max > 0.0 { min / max } else { 0.0 }
    }
    /// CPU time of the `i`-th watched process per answered request, µs.
    fn cpu_per_request(&self, i: usize) -> f64 {
        self.cpu[i] as f64 / 1e3 / self.total().max(1) as f64
    }
    fn latency(&self) -> String {
        format!(
            "{:.0} / {:.0} µs (slowest VM {:.0})",
            self.all.p50, self.all.p99, self.worst_p99
        )
    }
}

/// Every asker asks `q` from its own thread for WARMUP + MEASURE, in a closed loop or at `rate`
/// requests per second each. The measured window starts once every asker is past its warm-up
/// (a condition, waited for with a deadline) and ends with the last request begun before the
/// end; the CPU time of `pids` is read at its start and once every asker has finished.
fn load<S: Read + Write + Send>(
    askers: &mut [Asker<S>],
    q: &Question,
    rate: Option<f64>,
    pids: &[i32],
) -> Run {
    let n = askers.len();
    let start = Instant::now();
    let from = start + WARMUP;
    let end = from + MEASURE;
    // How many askers are past their warm-up (or gone).
    let warm = (Mutex::new(0usize), Condvar::new());
    let warmed = || {
        *warm.0.lock().unwrap() += 1;
        warm.1.notify_all();
    };
    std::thread::scope(|s| {
        let threads: Vec<_> = askers
            .iter_mut()
            .enumerate()
            .map(|(v, a)| {
                let warmed = &warmed;
                s.spawn(move || {
                    // (when it began, how long it took, answered ok)
                    let mut samples: Vec<(Instant, Duration, bool)> = Vec::new();
                    let mut is_warm = false;
                    // Spread the VMs' first requests over one period (fixed rate).
                    let phase = v as f64 / n as f64;
                    for k in 0u64.. {
                        if let Some(r) = rate {
                            // The offered rate is the load itself: the request waits for its turn.
                            let at = start + Duration::from_secs_f64((k as f64 + phase) / r);
                            if at >= end {
                                break;
                            }
                            std::thread::sleep(at.saturating_duration_since(Instant::now()));
                        }
                        let t0 = Instant::now();
                        if t0 >= end {
                            break;
                        }
                        if t0 >= from && !is_warm {
                            is_warm = true;
                            warmed();
                        }
                        let answer = a.ask(q, k);
                        samples.push((t0, t0.elapsed(), answer == Some(true)));
                        if answer.is_none() {
                            break;
                        }
                    }
                    if !is_warm {
                        warmed();
                    }
                    samples
                })
            })
            .collect();
        let deadline = from + STEP_DEADLINE;
        let mut count = warm.0.lock().unwrap();
        while *count < n && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            count = warm.1.wait_timeout(count, left).unwrap().0;
        }
        drop(count);
        let began = Instant::now();
        let t0: Vec<u64> = pids.iter().map(|p| cpu_ns(*p)).collect();
        let mut per_vm = Vec::new();
        let mut all = Vec::new();
        let mut worst_p99 = 0.0f64;
        let mut errors = 0;
        for t in threads {
            let counted: Vec<(Duration, bool)> = t
                .join()
                .unwrap()
                .into_iter()
                .filter(|(at, _, _)| *at >= began)
                .map(|(_, d, ok)| (d, ok))
                .collect();
            per_vm.push(counted.len() as u64);
            errors += counted.iter().filter(|(_, ok)| !ok).count() as u64;
            let samples: Vec<Duration> = counted.into_iter().map(|(d, _)| d).collect();
            worst_p99 = worst_p99.max(stats(samples.clone()).p99);
            all.extend(samples);
        }
        let cpu = pids
            .iter()
            .zip(t0)
            .map(|(p, t)| cpu_ns(*p).saturating_sub(t))
            .collect();
        Run {
            per_vm,
            all: stats(all),
            worst_p99,
            errors,
            cpu,
            secs: end.saturating_duration_since(began).as_secs_f64(),
        }
    })
}

/// What the plot shows of one line: (N, requests/s, fairness, Dom0 CPU per request µs).
type Points = Vec<(f64, f64, f64, f64)>;
static PLOT: Mutex<Vec<(String, Points)>> = Mutex::new(Vec::new());

fn plot(name: String, points: Points) {
    PLOT.lock().unwrap().push((name, points));
}

fn main() {
    system_tests::bench::run_all("Busy VMs, 1 to 100 (`tests/benches/scale.rs`)", run);
    let lines = PLOT.lock().unwrap().clone();
    if system_tests::bench::kinds_from_args().len() < 2 {
        return;
    }
    let panel = |title: &str, y: &str, at: fn(&(f64, f64, f64, f64)) -> f64, target| Panel {
        title: title.to_owned(),
        y_label: y.to_owned(),
        series: lines
            .iter()
            .map(|(name, pts)| Series {
                name: name.clone(),
                points: pts.iter().map(|p| (p.0, at(p))).collect(),
            })
            .collect(),
        target,
    };
    let chart = svg(
        &[
            panel("Aggregate throughput", "requests/s", |p| p.1, None),
            panel(
                "Fairness (slowest VM / fastest)",
                "fairness",
                |p| p.2,
                Some(0.8),
            ),
            panel("Dom0's CPU per request", "µs", |p| p.3, None),
        ],
        &NS.map(|n| n as f64),
        "busy VMs",
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/scaling.svg");
    std::fs::write(&path, chart).unwrap();
    eprintln!("scale: {} written", path.display());
    println!(
        "![Aggregate throughput, fairness and Dom0's CPU per request from 1 to 100 busy VMs](scaling.svg)\n"
    );
}

fn run(kind: BrokerKind, report: &mut Report) {
    let dir = TestDir::new("bench-scale");
    let names: Vec<String> = (0..NS[NS.len() - 1])
        .map(|i| format!("vm-{i:03}"))
        .collect();
    let conf = system_tests::bench::unlimited_config(&dir);
    let policy = dir.join("policy.toml");
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    std::fs::write(&policy, policy_with_clients(&refs)).unwrap();
    let policy = policy.display().to_string();
    let dom0 = Dom0::start_logging(
        &dir,
        kind,
        &["--config", &conf, "--policy", &policy],
        "info,rumqttd=error",
    );
    let disks = dir.join("disks");
    std::fs::create_dir_all(disks.join("usb0")).unwrap();
    let usb_ch = Channel::new(&dir.path, "sys-usb");
    dom0.proc.wait_log("link{vm=sys-usb}: attached to channel");
    let usb = Agent::start_logging(
        &dir,
        &usb_ch,
        "sys-usb",
        &["--disks", &disks.display().to_string()],
        "info",
    );
    dom0.proc.wait_log("link{vm=sys-usb}: session up");
    let channels: Vec<Channel> = names.iter().map(|n| Channel::new(&dir.path, n)).collect();
    dom0.proc
        .wait_log_count("attached to channel", names.len() + 1);
    let mut guests: Vec<Asker<_>> = channels
        .iter()
        .map(|ch| {
            let mut client = guest(ch, &ch.vm);
            client.subscribe_qos1(&format!("system/+/+/response/{}", ch.vm));
            Asker {
                client,
                sender: ch.vm.clone(),
                topic: None,
                pkid: 0,
            }
        })
        .collect();
    let broker_port = system_tests::bench::broker_port(&dom0, kind);
    // The direct load: as many TCP clients, one responder echoing each on its own topic.
    let mut responder = tcp(broker_port, "bench-scale-responder");
    responder.subscribe_qos1("bench/scale/+/request");
    std::thread::spawn(move || {
        let mut pkid = 0u16;
        while let Some((topic, p)) = responder.try_next_publish_on() {
            pkid = pkid % 60_000 + 1;
            let answer = topic.replace("/request", "/response");
            if !responder.try_publish_qos1(&answer, pkid, &p) {
                return;
            }
        }
    });
    let mut direct: Vec<Asker<_>> = names
        .iter()
        .map(|n| {
            let mut client = tcp(broker_port, &format!("bench-scale-{n}"));
            client.subscribe_qos1(&format!("bench/scale/{n}/response"));
            Asker {
                client,
                sender: n.clone(),
                topic: Some(format!("bench/scale/{n}/request")),
                pkid: 0,
            }
        })
        .collect();

    let dom0_pid = dom0.proc.pid();
    let broker_pid = dom0.mosquitto.as_ref().map_or(dom0_pid, |m| m.pid());
    let mosquitto = dom0.mosquitto.is_some();
    // Watched: Dom0, (Mosquitto,) sys-usb's agent.
    let mut pids = vec![dom0_pid];
    if mosquitto {
        pids.push(broker_pid);
    }
    pids.push(usb.proc.pid());
    let cpu = |r: &Run, agent: bool| {
        let mut s = format!("{:.0}", r.cpu_per_request(0));
        if mosquitto {
            s.push_str(&format!(" + {:.0}", r.cpu_per_request(1)));
        }
        if agent {
            s.push_str(&format!(" / {:.0}", r.cpu_per_request(pids.len() - 1)));
        }
        s + " µs"
    };
    let errors = |r: &Run| {
        if r.errors == 0 {
            String::new()
        } else {
            format!(" · **{} errors**", r.errors)
        }
    };
    let rss = || match &dom0.mosquitto {
        Some(m) => system_tests::bench::rss_mib(&[&dom0.proc, m, &usb.proc]),
        None => system_tests::bench::rss_mib(&[&dom0.proc, &usb.proc]),
    };
    let broker = broker_name_short(kind);
    let (mut agent_pts, mut ctrl_pts, mut direct_pts) =
        (Points::new(), Points::new(), Points::new());
    let mut closed: Vec<(usize, Run, Run, Run)> = Vec::new();
    for n in NS {
        eprintln!("N = {n}…");
        let d = load(&mut direct[..n], &LIST_DISKS, None, &[broker_pid]);
        report.row(
            &format!("N = {n}, direct (TCP clients ↔ one TCP responder): requests/s · p50 / p99 · fairness · the broker's CPU per request"),
            format!(
                "{:.0}/s · {} · {:.2} · {:.0} µs{}",
                d.per_sec(),
                d.latency(),
                d.fairness(),
                d.cpu_per_request(0),
                errors(&d)
            ),
        );
        let a = load(&mut guests[..n], &LIST_DISKS, None, &pids);
        report.row(
            &format!("N = {n}, guests ↔ sys-usb's agent (`list_disks`), closed loop: requests/s · p50 / p99 · fairness · CPU per request: Dom0 (+ Mosquitto) / agent"),
            format!(
                "{:.0}/s · {} · {:.2} · {}{}",
                a.per_sec(),
                a.latency(),
                a.fairness(),
                cpu(&a, true),
                errors(&a)
            ),
        );
        let c = load(&mut guests[..n], &DISCOVER, None, &pids);
        report.row(
            &format!("N = {n}, guests ↔ Dom0's controller (`discover`), closed loop: requests/s · p50 / p99 · fairness · CPU per request: Dom0 (+ Mosquitto)"),
            format!(
                "{:.0}/s · {} · {:.2} · {}{}",
                c.per_sec(),
                c.latency(),
                c.fairness(),
                cpu(&c, false),
                errors(&c)
            ),
        );
        let f = load(&mut guests[..n], &LIST_DISKS, Some(RATE_PER_VM), &pids);
        report.row(
            &format!("N = {n}, guests ↔ sys-usb's agent at {RATE_PER_VM:.0} requests/s each: answered/s · p50 / p99 · CPU per request: Dom0 (+ Mosquitto) / agent"),
            format!(
                "{:.0}/s · {} · {}{}",
                f.per_sec(),
                f.latency(),
                cpu(&f, true),
                errors(&f)
            ),
        );
        report.row(
            &format!("N = {n}, RSS after these runs: dom0-broker (+ Mosquitto) / sys-usb agent"),
            rss(),
        );
        let x = n as f64;
        direct_pts.push((x, d.per_sec(), d.fairness(), d.cpu_per_request(0)));
        agent_pts.push((x, a.per_sec(), a.fairness(), a.cpu_per_request(0)));
        ctrl_pts.push((x, c.per_sec(), c.fairness(), c.cpu_per_request(0)));
        closed.push((n, d, a, c));
    }
    summary(report, &closed, !mosquitto);
    plot(format!("{broker}, sys-usb's agent"), agent_pts);
    plot(format!("{broker}, Dom0's controller"), ctrl_pts);
    plot(format!("{broker}, direct (the broker's CPU)"), direct_pts);
    drop(guests);
    drop(direct);
}

/// The targets: aggregate from 8 to 100, fairness at every N, Dom0's CPU per request against
/// N = 1 and against the broker's own, p99 growth.
fn summary(report: &mut Report, closed: &[(usize, Run, Run, Run)], embedded: bool) {
    let at = |n: usize| closed.iter().find(|c| c.0 == n);
    let (Some(first), Some(eight), Some(last)) = (at(1), at(8), closed.last()) else {
        return;
    };
    let pair = |f: &dyn Fn(&Run) -> f64| {
        format!(
            "{:.2} · {:.2}",
            f(&last.2) / f(&eight.2),
            f(&last.3) / f(&eight.3)
        )
    };
    report.row(
        &format!(
            "**aggregate throughput at {} / at 8 VMs** (target ≥ 0.8×): agent · controller",
            last.0
        ),
        pair(&|r| r.per_sec()) + "×",
    );
    let lowest = |f: fn(&(usize, Run, Run, Run)) -> &Run| {
        closed
            .iter()
            .map(|c| f(c).fairness())
            .fold(f64::MAX, f64::min)
    };
    report.row(
        "**fairness, lowest over N** (target ≥ 0.8): agent · controller",
        format!("{:.2} · {:.2}", lowest(|c| &c.2), lowest(|c| &c.3)),
    );
    let highest = |f: fn(&(usize, Run, Run, Run)) -> &Run| {
        closed
            .iter()
            .map(|c| f(c).cpu_per_request(0) / f(first).cpu_per_request(0).max(1e-9))
            .fold(0.0, f64::max)
    };
    report.row(
        "**Dom0's CPU per request, highest over N / N = 1** (target ≤ 1.25×): agent · controller",
        format!("{:.2}× · {:.2}×", highest(|c| &c.2), highest(|c| &c.3)),
    );
    // The link's CPU per request: Dom0's, less (embedded broker, in the same process) the
    // broker's own as measured in the direct run of the same N.
    let link = |c: &(usize, Run, Run, Run)| {
        let dom0 = c.2.cpu_per_request(0);
        if embedded {
            dom0 - c.1.cpu_per_request(0)
        } else {
            dom0
        }
    };
    report.row(
        &format!(
            "**the links' CPU per request / the broker's own** (direct run; target ≤ 1×), N = 1 · N = {}: agent",
            last.0
        ),
        format!(
            "{:.0} / {:.0} µs = {:.2}× · {:.0} / {:.0} µs = {:.2}×",
            link(first),
            first.1.cpu_per_request(0),
            link(first) / first.1.cpu_per_request(0).max(1e-9),
            link(last),
            last.1.cpu_per_request(0),
            link(last) / last.1.cpu_per_request(0).max(1e-9)
        ),
    );
    report.row(
        &format!(
            "p99 growth from 1 to {} VMs: direct · agent · controller",
            last.0
        ),
        format!(
            "{:.1}× · {:.1}× · {:.1}×",
            last.1.all.p99 / first.1.all.p99,
            last.2.all.p99 / first.2.all.p99,
            last.3.all.p99 / first.3.all.p99
        ),
    );
}

fn broker_name_short(kind: BrokerKind) -> &'static str {
    match kind {
        BrokerKind::Embedded => "rumqttd",
        BrokerKind::Mosquitto => "Mosquitto",
    }
}
