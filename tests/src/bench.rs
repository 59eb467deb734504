//! Helpers shared by the benchmarks (`tests/benches/*.rs`).

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::channel::{Channel, SimRoundTrip};
use crate::raw::RawClient;
use crate::{BrokerKind, DEADLINE, Dom0, TestDir, wait_for};

/// Every read of a benchmark's network clients has this deadline: a step that does not happen
/// ends the run with a message instead of hanging it.
pub const STEP_DEADLINE: Duration = Duration::from_secs(20);

/// The brokers to measure: `--embedded`, `--mosquitto`, or both.
pub fn kinds_from_args() -> Vec<BrokerKind> {
    match std::env::args().nth(1).as_deref() {
        Some("--mosquitto") => vec![BrokerKind::Mosquitto],
        Some("--embedded") => vec![BrokerKind::Embedded],
        _ => vec![BrokerKind::Embedded, BrokerKind::Mosquitto],
    }
}

/// A Dom0 client done right: TCP_NODELAY, and TCP_QUICKACK re-armed after every read so that a
/// broker without TCP_NODELAY (rumqttd) never holds a write for our delayed ACK.
pub fn tcp(port: u16, id: &str) -> RawClient<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(STEP_DEADLINE)).unwrap();
    RawClient::connect_with(s, id, |s| {
        let _ = socket2::SockRef::from(s).set_quickack(true);
    })
}

/// A plain client (TCP_NODELAY only), like mosquitto_pub/sub.
pub fn tcp_plain(port: u16, id: &str) -> RawClient<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(STEP_DEADLINE)).unwrap();
    RawClient::connect(s, id)
}

/// An MQTT client in a guest, on its channel tty.
pub fn guest(ch: &Channel, id: &str) -> RawClient<TimedTty> {
    // Until the backend has its Dom0 client, what the guest writes is dropped (as on Xen).
    wait_for("the link to attach", DEADLINE, || ch.has_client());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&ch.tty)
        .unwrap();
    RawClient::connect(TimedTty(f), id)
}

/// A guest's tty whose reads give up after [`STEP_DEADLINE`] (a tty has no read timeout of its own).
#[derive(Debug)]
pub struct TimedTty(pub File);

impl std::io::Read for TimedTty {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let ms = u16::try_from(STEP_DEADLINE.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "nothing from the channel within the step deadline",
            )),
            Ok(_) => self.0.read(buf),
            Err(e) => Err(e.into()),
        }
    }
}

impl std::io::Write for TimedTty {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// The broker's own port: rumqttd's private port for the embedded broker (Dom0 clients normally
/// go through dom0-broker's relay on --listen), Mosquitto's listener otherwise.
pub fn broker_port(dom0: &Dom0, kind: BrokerKind) -> u16 {
    match kind {
        BrokerKind::Embedded => {
            let log = dom0.log();
            let at = log
                .find("internal=127.0.0.1:")
                .expect("internal broker port in the log")
                + 19;
            log[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        }
        BrokerKind::Mosquitto => dom0.port,
    }
}

/// Messages per second from `publisher` to `subscriber`, 16-byte QoS 0 messages, with at most
/// 5000 in flight (so the broker's logs never drop what a consumer has not read yet).
pub fn throughput<P, S>(
    messages: u64,
    topic: &str,
    publisher: RawClient<P>,
    subscriber: RawClient<S>,
) -> f64
where
    P: std::io::Read + std::io::Write,
    S: std::io::Read + std::io::Write + Send + 'static,
{
    throughput_of(messages, topic, 16, publisher, subscriber)
}

/// Messages per second from `publisher` to `subscriber`, QoS 0 messages of `size` bytes, with at
/// most 5000 or 512 KiB in flight (rumqttd keeps 2 MiB per filter; a consumer further behind
/// would skip messages). Messages lost are reported.
pub fn throughput_of<P, S>(
    messages: u64,
    topic: &str,
    size: usize,
    mut publisher: RawClient<P>,
    mut subscriber: RawClient<S>,
) -> f64
where
    P: std::io::Read + std::io::Write,
    S: std::io::Read + std::io::Write + Send + 'static,
{
    let window: u64 = (512 * 1024 / size as u64).clamp(1, 5_000);
    let batch_len: u64 = (window / 20).clamp(1, 250);
    subscriber.subscribe(topic);
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    // The subscriber leaves once it has every message: a subscriber left behind would make the
    // broker deliver the next run's messages twice (to it as well), halving that run's figure.
    std::thread::spawn(move || {
        while r.load(Ordering::Relaxed) < messages && subscriber.try_next_publish().is_some() {
            r.fetch_add(1, Ordering::Relaxed);
        }
        subscriber.try_disconnect();
    });
    let payload: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let batch: Vec<u8> = (0..batch_len)
        .flat_map(|_| crate::raw::publish(topic, &payload))
        .collect();
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut last = (0u64, Instant::now());
    loop {
        let got = received.load(Ordering::Relaxed);
        if got >= messages {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) {
            eprintln!("  (stalled: {got} of {sent} sent messages arrived)");
            break;
        }
        if sent < messages && sent - got < window {
            publisher.write_raw(&batch);
            sent += batch_len;
        } else {
            std::thread::yield_now();
        }
    }
    received.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

/// Round-trip figures, in microseconds, and the round trips that took 40 ms or more (a Nagle stall).
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub p50: f64,
    pub p99: f64,
    pub stalls: usize,
}

/// The figures of a run's samples.
pub fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let us =
        |q| topics::payload::quantile(&samples, q).map_or(0.0, |d: Duration| d.as_secs_f64() * 1e6);
    Stats {
        p50: us(0.5),
        p99: us(0.99),
        stalls: samples
            .iter()
            .filter(|d| **d >= Duration::from_millis(40))
            .count(),
    }
}

/// The values given to `flag` on the command line (`--flag V`, possibly repeated).
pub fn flag_values(flag: &str) -> Vec<String> {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].clone())
        .collect()
}

/// The numbers given to `flag` (those that parse).
pub fn flag_numbers<T: std::str::FromStr>(flag: &str) -> Vec<T> {
    flag_values(flag)
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Round trips measured in turn, one of each path per round, so that every path sees the same
/// machine (a 2-core VM is noisy). `warmup` rounds are not counted. Each path is a closure doing
/// one round trip (given the round's number) and returning its duration.
pub fn interleaved(
    rounds: usize,
    warmup: usize,
    paths: &mut [&mut dyn FnMut(usize) -> Duration],
) -> Vec<Stats> {
    let mut samples: Vec<Vec<Duration>> =
        paths.iter().map(|_| Vec::with_capacity(rounds)).collect();
    for i in 0..warmup + rounds {
        for (path, s) in paths.iter_mut().zip(samples.iter_mut()) {
            let d = path(i);
            if i >= warmup {
                s.push(d);
            }
        }
    }
    samples.into_iter().map(stats).collect()
}

/// `direct` and `chained` measured [`interleaved`] with the simulated channel alone (one round
/// trip, in a directory of its own that Dom0 does not watch: there, Dom0 would take the channel
/// first), after 100 warm-up rounds: their statistics, in that order. The report's first row.
pub fn against_direct_and_channel(
    rounds: usize,
    report: &mut Report,
    direct: &mut dyn FnMut(usize) -> Duration,
    chained: &mut dyn FnMut(usize) -> Duration,
) -> (Stats, Stats, Stats) {
    let sim_dir = TestDir::new("bench-sim");
    let mut sim_channel = SimRoundTrip::new(&sim_dir.path);
    let mut sim = |_| sim_channel.once();
    eprintln!("{rounds} rounds of 3 interleaved round trips…");
    let mut s = interleaved(rounds, 100, &mut [direct, chained, &mut sim]).into_iter();
    let (a, b, sim) = (s.next(), s.next(), s.next());
    let (Some(a), Some(b), Some(sim)) = (a, b, sim) else {
        unreachable!("three paths, three statistics")
    };
    report.row("round trip direct, p50 / p99", p50_p99(&a));
    (a, b, sim)
}

/// The rows of a chain measured against the direct path and the simulated channel (the chain,
/// its ratio to direct, the channel alone, its ratio to direct plus two channel round trips).
pub fn chain_rows(
    report: &mut Report,
    chain: &str,
    ratio: &str,
    direct: &Stats,
    chained: &Stats,
    sim: &Stats,
) {
    report.row(chain, p50_p99(chained));
    report.row(ratio, ratios(chained, direct));
    report.row(
        "the simulated channel alone, one round trip, p50",
        format!("{:.1} µs", sim.p50),
    );
    report.row(
        "ratio p50 to direct + the two channel round trips",
        beyond_channels(chained, direct, sim, 2.0),
    );
}

/// A dom0-broker config file in `dir` with the guests' rate limit lifted (a benchmark measures
/// capacity, not the limiter): its path, as the `--config` argument.
pub fn unlimited_config(dir: &TestDir) -> String {
    let conf = dir.join("dom0.toml");
    std::fs::write(
        &conf,
        "[limits]\nrate_per_sec = 10000000\nburst = 10000000\n",
    )
    .unwrap();
    conf.display().to_string()
}

/// What a benchmark reads the CPU time of: a process, or this process's simulated channels'
/// relay threads (the backend's share).
#[derive(Debug, Clone, Copy)]
pub enum Cpu {
    Process(i32),
    Relay,
    /// This process's children that ended and were waited for (`domu-agent call`s; 10 ms ticks).
    Children,
}

/// The CPU time (ns) each of `watched` spends while `f` runs, beside `f`'s result.
pub fn cpu_during<T>(watched: &[Cpu], f: impl FnOnce() -> T) -> (T, Vec<u64>) {
    let now = || -> Vec<u64> {
        watched
            .iter()
            .map(|w| match w {
                Cpu::Process(pid) => crate::procfs::cpu_ns(*pid),
                Cpu::Relay => crate::procfs::own_threads_ns(crate::channel::RELAY_THREAD),
                Cpu::Children => crate::procfs::children_ticks() * 10_000_000,
            })
            .collect()
    };
    let before = now();
    let r = f();
    let spent = now()
        .into_iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(b))
        .collect();
    (r, spent)
}

/// How busy the machine's CPUs were (0 to 1, all CPUs) while `f` ran, beside `f`'s result.
pub fn machine_busy_during<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let (busy0, total0) = crate::procfs::machine_ticks();
    let r = f();
    let (busy, total) = crate::procfs::machine_ticks();
    let share = busy.saturating_sub(busy0) as f64 / total.saturating_sub(total0).max(1) as f64;
    (r, share)
}

/// CPU time per unit in µs: `ns` shared by `units`.
pub fn us_each(ns: u64, units: f64) -> f64 {
    ns as f64 / 1e3 / units.max(1.0)
}

/// "a / b / c MiB": the resident memory of `procs`, in order.
pub fn rss_mib(procs: &[&crate::Proc]) -> String {
    let each: Vec<String> = procs
        .iter()
        .map(|p| format!("{:.1}", p.rss_kb() as f64 / 1024.0))
        .collect();
    format!("{} MiB", each.join(" / "))
}

/// A benchmark's table for `docs/performance.md`: one row per figure, one column per broker.
/// Each figure is also printed to stderr as it comes; `print` writes the Markdown to stdout
/// (`./scripts/bench` collects it into the document).
#[derive(Debug)]
pub struct Report {
    title: String,
    columns: Vec<String>,
    column: usize,
    rows: Vec<(String, Vec<String>)>,
}

impl Report {
    pub fn new(title: &str, kinds: &[BrokerKind]) -> Report {
        let names: Vec<String> = kinds.iter().map(|k| broker_name(*k)).collect();
        Report::with_columns(title, &names.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// A table whose columns are not brokers (an A/B of one broker).
    pub fn with_columns(title: &str, columns: &[&str]) -> Report {
        Report {
            title: title.to_owned(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            column: 0,
            rows: Vec::new(),
        }
    }

    /// The figures that follow are for the `i`-th broker.
    pub fn column(&mut self, i: usize) {
        self.column = i;
        eprintln!("== {}: {}", self.title, self.columns[i]);
    }

    /// Records one figure of the current broker.
    pub fn row(&mut self, label: &str, value: String) {
        eprintln!("{label:<60} {value}");
        let n = self.columns.len();
        let at = match self.rows.iter().position(|(l, _)| l == label) {
            Some(at) => at,
            None => {
                self.rows.push((label.to_owned(), vec![String::new(); n]));
                self.rows.len() - 1
            }
        };
        self.rows[at].1[self.column] = value;
    }

    /// The Markdown table.
    pub fn markdown(&self) -> String {
        let mut out = format!("| {} | {} |\n|---|", self.title, self.columns.join(" | "));
        out.push_str(&"---|".repeat(self.columns.len()));
        out.push('\n');
        for (label, values) in &self.rows {
            let cells: Vec<&str> = values
                .iter()
                .map(|v| if v.is_empty() { "—" } else { v.as_str() })
                .collect();
            out.push_str(&format!("| {label} | {} |\n", cells.join(" | ")));
        }
        out
    }

    pub fn print(&self) {
        println!("{}", self.markdown());
    }
}

/// The broker's name and version, as the tables show it.
pub fn broker_name(kind: BrokerKind) -> String {
    match kind {
        BrokerKind::Embedded => "embedded rumqttd".to_owned(),
        BrokerKind::Mosquitto => {
            let out = std::process::Command::new("mosquitto").arg("-h").output();
            let text = out
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            match text
                .split_whitespace()
                .skip_while(|w| *w != "version")
                .nth(1)
            {
                Some(v) => format!("Mosquitto {v}"),
                None => "Mosquitto".to_owned(),
            }
        }
    }
}

/// Runs `run` on every broker the command line asks for, each in its column of one table, then
/// prints the table.
pub fn run_all(title: &str, run: fn(BrokerKind, &mut Report)) {
    let kinds = kinds_from_args();
    let mut report = Report::new(title, &kinds);
    for (i, kind) in kinds.into_iter().enumerate() {
        report.column(i);
        run(kind, &mut report);
    }
    report.print();
}

/// A chain's p50 against the direct p50 plus the `crossings` channel round trips it makes.
pub fn beyond_channels(chain: &Stats, direct: &Stats, channel: &Stats, crossings: f64) -> String {
    let base = direct.p50 + crossings * channel.p50;
    format!(
        "{:.2}× ({:.1} µs beyond them)",
        chain.p50 / base,
        chain.p50 - base
    )
}

/// `p50 / p99` in microseconds.
pub fn p50_p99(s: &Stats) -> String {
    format!("{:.1} / {:.1} µs", s.p50, s.p99)
}

/// `p50 / p99` of `b` against `a`, as ratios.
pub fn ratios(b: &Stats, a: &Stats) -> String {
    format!("{:.2}× / {:.2}×", b.p50 / a.p50, b.p99 / a.p99)
}

/// A responder that answers every request of `command` on its response topic, at QoS 1.
pub fn responder<S: Read + Write + Send + 'static>(mut c: RawClient<S>, command: &'static str) {
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

/// A requester of `command`: each call is one QoS 1 round trip.
pub fn requester<S: Read + Write>(
    mut c: RawClient<S>,
    command: &str,
) -> impl FnMut(usize) -> Duration + use<S> {
    c.subscribe_qos1(&format!("{command}/response/dom0"));
    let request = format!("{command}/request");
    move |i| {
        let payload = format!(r#"{{"sender":"dom0","request_id":"{i}"}}"#);
        let t0 = Instant::now();
        assert!(c.try_publish_qos1(&request, (i % 60_000 + 1) as u16, payload.as_bytes()));
        let got = c.next_publish();
        let dt = t0.elapsed();
        // The answer is the request echoed; on a channel, Dom0 fills in its `responder`.
        let answer: serde_json::Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(answer["request_id"], i.to_string(), "{answer}");
        dt
    }
}

/// What `perf stat` counted for a process over a stretch of work.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerfCounts {
    pub syscalls: f64,
    pub switches: f64,
    /// task-clock: CPU time, ms.
    pub cpu_ms: f64,
}

impl PerfCounts {
    /// Per unit of work, and CPU time in µs.
    pub fn per(&self, units: f64) -> PerfCounts {
        let u = units.max(1.0);
        PerfCounts {
            syscalls: self.syscalls / u,
            switches: self.switches / u,
            cpu_ms: self.cpu_ms * 1e3 / u,
        }
    }

    /// `self - other`, field by field.
    pub fn less(&self, other: &PerfCounts) -> PerfCounts {
        PerfCounts {
            syscalls: self.syscalls - other.syscalls,
            switches: self.switches - other.switches,
            cpu_ms: self.cpu_ms - other.cpu_ms,
        }
    }
}

/// System calls, context switches and CPU time of every thread of `pid` while `f` runs, counted
/// by `perf stat` (Debian's linux-perf): started with its events disabled, enabled and disabled
/// around `f` through its control FIFOs (each command waited for by its acknowledgement, with the
/// step deadline). `None` beside `f`'s result when perf is missing or may not watch the process.
pub fn perf_during<T>(dir: &TestDir, pid: i32, f: impl FnOnce() -> T) -> (T, Option<PerfCounts>) {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let (ctl, ack, out) = (
        dir.join(&format!("perf{n}.ctl")),
        dir.join(&format!("perf{n}.ack")),
        dir.join(&format!("perf{n}.csv")),
    );
    for fifo in [&ctl, &ack] {
        if nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::S_IRWXU).is_err() {
            return (f(), None);
        }
    }
    let perf = std::process::Command::new("perf")
        .args([
            "stat",
            "-x,",
            "-e",
            "raw_syscalls:sys_enter,context-switches,task-clock",
        ])
        .args(["-D", "-1", "--control"])
        .arg(format!("fifo:{},{}", ctl.display(), ack.display()))
        .arg("-o")
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut perf) = perf else {
        return (f(), None);
    };
    // Read and write ends held by us (O_RDWR never blocks on a FIFO): perf's opening of either end
    // never waits for us, and a perf that died leaves us a deadline, not a hang.
    let open = |p: &std::path::Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .ok()
    };
    let (Some(mut ctl_w), Some(ack_r)) = (open(&ctl), open(&ack)) else {
        let _ = perf.kill();
        let _ = perf.wait();
        return (f(), None);
    };
    let mut ack_r = TimedTty(ack_r);
    let mut command = |what: &str| -> bool {
        let mut got = [0u8; 16];
        ctl_w.write_all(format!("{what}\n").as_bytes()).is_ok()
            && ack_r
                .read(&mut got)
                .is_ok_and(|n| got[..n].starts_with(b"ack"))
    };
    let enabled = command("enable");
    let r = f();
    let disabled = enabled && command("disable");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(perf.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = perf.wait();
    if !disabled {
        return (r, None);
    }
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let value = |event: &str| {
        text.lines()
            .filter_map(|l| {
                let cols: Vec<&str> = l.split(',').collect();
                (cols.get(2) == Some(&event)).then(|| cols[0].parse::<f64>().ok())?
            })
            .next()
    };
    let counts = match (
        value("raw_syscalls:sys_enter"),
        value("context-switches"),
        value("task-clock"),
    ) {
        (Some(syscalls), Some(switches), Some(cpu_ms)) => Some(PerfCounts {
            syscalls,
            switches,
            cpu_ms,
        }),
        _ => None,
    };
    (r, counts)
}
