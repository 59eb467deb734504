//! The system tests' support library, used by the test binary (`tests/system.rs`), the benchmarks
//! and `channel-sim`: fresh directories, the built binaries, Debian's mosquitto tools, free ports,
//! the simulated Xen channel (`channel`), off-the-shelf guest clients on it (`guest`), a raw MQTT
//! client (`raw`), benchmark helpers (`bench`), and waiting on conditions with deadlines (never on
//! time alone).

// Test support: a failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod bench;
pub mod channel;
pub mod faults;
pub mod guest;
pub mod hostile;
pub mod legacy;
pub mod local;
pub mod plot;
pub mod procfs;
pub mod raw;
pub mod scene;

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Generous deadline for conditions on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

/// A fresh directory for one test, removed when dropped.
#[derive(Debug)]
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static N: AtomicU64 = AtomicU64::new(0);
        // Short paths: UNIX socket paths are limited to 108 bytes.
        let path = std::env::temp_dir().join(format!(
            "st-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            name.chars().take(12).collect::<String>()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TestDir { path }
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A binary of this workspace, built by `cargo build --workspace --bins` (the test command does it).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/system-xxxx → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` (scripts/test does)",
        p.display()
    );
    p
}

/// A free TCP port on loopback (never assumes 1883 is free).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running process, killed when dropped; its stderr (and stdout) go to a log file.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, dir: &TestDir, cmd: &mut Command) -> Proc {
        static N: AtomicU64 = AtomicU64::new(0);
        let log = dir.join(&format!("{name}-{}.log", N.fetch_add(1, Ordering::SeqCst)));
        let f = File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            log,
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything the process logged so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) {
        self.wait_log_count(needle, 1);
    }

    /// Waits until the log contains `needle` at least `n` times.
    pub fn wait_log_count(&self, needle: &str, n: usize) {
        wait_for(
            &format!("{} to log {needle:?} ×{n}", self.name),
            DEADLINE,
            || self.output().matches(needle).count() >= n,
        );
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::park_timeout(Duration::from_millis(10));
        }
    }

    /// Asks the process to stop (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(
            self.wait_exit(DEADLINE).is_some(),
            "{} did not stop on SIGTERM",
            self.name
        );
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kb(&self) -> u64 {
        procfs::rss_kb(self.pid())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            // A failing test shows what each of its processes said (the last 60 lines).
            // Repeated lines (same text after the timestamp) are folded.
            let out = self.output();
            let mut lines: Vec<(String, usize)> = Vec::new();
            for l in out.lines() {
                let key = l.get(27..).unwrap_or(l);
                match lines.last_mut() {
                    Some((last, n)) if last.get(27..).unwrap_or(last) == key => *n += 1,
                    _ => lines.push((l.to_owned(), 1)),
                }
            }
            let tail = lines[lines.len().saturating_sub(80)..]
                .iter()
                .map(|(l, n)| {
                    if *n > 1 {
                        format!("{l}  (×{n})")
                    } else {
                        l.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!(
                "----- {} (pid {}) -----\n{tail}",
                self.name,
                self.child.id()
            );
        }
    }
}

/// The tracing filter of the services under test.
pub const TEST_LOG: &str = "debug,rumqttd=warn,rumqttc=warn";

/// Which broker a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    Embedded,
    Mosquitto,
}

/// A Dom0 service under test, with its broker.
#[derive(Debug)]
pub struct Dom0 {
    pub proc: Proc,
    /// Where Dom0-local clients (mosquitto_pub/sub) reach the broker.
    pub port: u16,
    /// The external mosquitto, when used.
    pub mosquitto: Option<Proc>,
}

/// Starts Debian's mosquitto on a free loopback port, with the settings of deploy/alpine.
pub fn start_mosquitto(dir: &TestDir, port: u16, extra: &str) -> Proc {
    let conf = dir.join(&format!("mosquitto-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_packet_size 4194304\n\
             log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\npersistence false\n\
             max_queued_messages 1000\nmax_queued_bytes 16777216\n{extra}\n"
        ),
    )
    .unwrap();
    let exe = if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    };
    let p = Proc::spawn("mosquitto", dir, Command::new(exe).arg("-c").arg(&conf));
    p.wait_log(&format!("Opening ipv4 listen socket on port {port}"));
    wait_for("mosquitto to accept", DEADLINE, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    p
}

impl Dom0 {
    /// Starts `dom0-broker run` on `dir` with a broker of the given kind.
    pub fn start(dir: &TestDir, kind: BrokerKind, extra: &[&str]) -> Dom0 {
        Dom0::start_logging(dir, kind, extra, TEST_LOG)
    }

    /// Like [`Dom0::start`] with a given tracing filter (benchmarks run at `info`).
    pub fn start_logging(dir: &TestDir, kind: BrokerKind, extra: &[&str], log: &str) -> Dom0 {
        // A free port can be taken by someone else before we bind it (other tests run in
        // parallel): try again with another one.
        for _ in 0..5 {
            let port = free_port();
            let mosquitto = (kind == BrokerKind::Mosquitto).then(|| start_mosquitto(dir, port, ""));
            if let Some(proc) = Dom0::try_spawn(dir, port, kind, extra, log) {
                return Dom0 {
                    proc,
                    port,
                    mosquitto,
                };
            }
        }
        panic!("dom0-broker did not start (ports kept being taken)");
    }

    /// Spawns the service; None if it exited because its port was taken.
    fn try_spawn(
        dir: &TestDir,
        port: u16,
        kind: BrokerKind,
        extra: &[&str],
        log: &str,
    ) -> Option<Proc> {
        let mut cmd = Command::new(bin("dom0-broker"));
        cmd.arg("run").arg("--socket-dir").arg(&dir.path);
        match kind {
            BrokerKind::Embedded => cmd.arg("--listen").arg(format!("127.0.0.1:{port}")),
            BrokerKind::Mosquitto => cmd.arg("--broker").arg(format!("mqtt://127.0.0.1:{port}")),
        };
        cmd.args(extra);
        cmd.env("RUST_LOG", log);
        let mut p = Proc::spawn("dom0-broker", dir, &mut cmd);
        wait_for("dom0-broker to start or exit", DEADLINE, || {
            p.output().contains("watching for channel sockets") || !p.is_running()
        });
        if p.output().contains("watching for channel sockets") {
            return Some(p);
        }
        assert!(
            p.output().contains("in use"),
            "dom0-broker failed: {}",
            p.output()
        );
        None
    }

    fn spawn_service(
        dir: &TestDir,
        port: u16,
        kind: BrokerKind,
        extra: &[&str],
        log: &str,
    ) -> Proc {
        Dom0::try_spawn(dir, port, kind, extra, log).expect("dom0-broker could not bind its port")
    }

    /// Restarts the service (same broker, same port).
    pub fn restart(&mut self, dir: &TestDir, kind: BrokerKind, extra: &[&str]) {
        self.restart_after(nix::sys::signal::Signal::SIGTERM, dir, kind, extra);
    }

    /// Stops the service with `signal` (SIGKILL: a crash) and starts it again.
    pub fn restart_after(
        &mut self,
        signal: nix::sys::signal::Signal,
        dir: &TestDir,
        kind: BrokerKind,
        extra: &[&str],
    ) {
        self.proc.signal(signal);
        // (A process killed by a signal has no exit code: wait for it to be gone.)
        let proc = &mut self.proc;
        wait_for(
            &format!("dom0-broker to stop on {signal}"),
            DEADLINE,
            || !proc.is_running(),
        );
        if kind == BrokerKind::Embedded {
            wait_for("the port to be free", DEADLINE, || {
                TcpListener::bind(("127.0.0.1", self.port)).is_ok()
            });
        }
        self.proc = Dom0::spawn_service(dir, self.port, kind, extra, TEST_LOG);
    }

    pub fn log(&self) -> String {
        self.proc.output()
    }

    /// `mosquitto_pub` from Dom0.
    pub fn publish(&self, topic: &str, payload: &str) {
        use std::io::Write;
        // The payload goes through stdin (-s): it may be larger than an argument can be.
        let port = self.port.to_string();
        let mut child = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-t", topic, "-s"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub (apt-get install mosquitto-clients)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(payload.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            // What Dom0 logged last says which side dropped the connection.
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "mosquitto_pub: {}\ndom0-broker's last lines:\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// A `mosquitto_sub` on Dom0 that prints `topic payload` lines; returns once it is subscribed.
    pub fn subscribe(&self, dir: &TestDir, topics: &[&str]) -> Proc {
        let id = format!("dom0-sub-{}", free_port());
        mosquitto_sub(
            dir,
            "mosquitto_sub",
            self.port,
            &["-q", "1", "-i", &id],
            topics,
        )
    }
}

/// A `mosquitto_sub` on 127.0.0.1:`port` with `-d -v` and `args`, line-buffered so a test sees each
/// line as it is printed; returns once it has its SUBACK.
pub fn mosquitto_sub(dir: &TestDir, name: &str, port: u16, args: &[&str], topics: &[&str]) -> Proc {
    let mut cmd = Command::new("stdbuf");
    cmd.args([
        "-oL",
        "mosquitto_sub",
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-d",
        "-v",
    ])
    .args(args);
    for t in topics {
        cmd.args(["-t", t]);
    }
    let p = Proc::spawn(name, dir, &mut cmd);
    p.wait_log("received SUBACK");
    p
}

/// A guest agent under test, on a simulated channel.
#[derive(Debug)]
pub struct Agent {
    pub proc: Proc,
    /// Its local request socket (for `domu-agent call`).
    pub socket: PathBuf,
    /// Its local MQTT endpoint (for the guest's applications).
    pub mqtt: PathBuf,
    /// Its legacy endpoint (the MVP's JSON lines).
    pub legacy: PathBuf,
}

impl Agent {
    /// Starts `domu-agent run --vm VM --device <tty>` with `extra` flags and waits for its session.
    /// It logs at debug level (tests read its log).
    pub fn start(dir: &TestDir, ch: &channel::Channel, vm: &str, extra: &[&str]) -> Agent {
        Agent::start_logging(dir, ch, vm, extra, "debug")
    }

    /// Like [`Agent::start`], with `RUST_LOG` set to `log` (benchmarks use the default level,
    /// `info`, as deployed: a debug line per request is a cost the product does not pay).
    pub fn start_logging(
        dir: &TestDir,
        ch: &channel::Channel,
        vm: &str,
        extra: &[&str],
        log: &str,
    ) -> Agent {
        Agent::start_under(dir, ch, vm, extra, log, &[])
    }

    /// Like [`Agent::start_logging`], run by `wrapper` (e.g. `prlimit --nofile=1024:1024 --`).
    pub fn start_under(
        dir: &TestDir,
        ch: &channel::Channel,
        vm: &str,
        extra: &[&str],
        log: &str,
        wrapper: &[&str],
    ) -> Agent {
        let socket = dir.join(&format!("{vm}-agent.sock"));
        let mqtt = dir.join(&format!("{vm}-mqtt.sock"));
        let legacy = dir.join(&format!("{vm}-legacy.sock"));
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("domu-agent"));
                c
            }
            None => Command::new(bin("domu-agent")),
        };
        cmd.args(["run", "--vm", vm, "--device"])
            .arg(&ch.tty)
            .arg("--local-socket")
            .arg(&socket)
            .arg("--mqtt-socket")
            .arg(&mqtt)
            .arg("--legacy-socket")
            .arg(&legacy)
            .args(extra)
            .env("RUST_LOG", log);
        let proc = Proc::spawn(&format!("domu-agent-{vm}"), dir, &mut cmd);
        proc.wait_log("session up");
        Agent {
            proc,
            socket,
            mqtt,
            legacy,
        }
    }

    /// `domu-agent call COMMAND ARGS...`: exit status and the response lines, parsed.
    pub fn call(&self, command: &str, args: &[&str]) -> (bool, Vec<serde_json::Value>) {
        let out = Command::new(bin("domu-agent"))
            .arg("call")
            .arg("--json")
            .arg("--socket")
            .arg(&self.socket)
            .arg(command)
            .args(args)
            .output()
            .unwrap();
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
            .collect();
        (out.status.success(), lines)
    }
}

/// `sha256sum FILE`'s hex digest: what a user compares a footprint with.
pub fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}
