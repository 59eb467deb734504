//! The runners: a class sent down the attacker's channel (or to an agent from a fake Dom0) while
//! the neighbour's loop runs, and what users would check measured.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{Class, EVIL, LoopRun, Neighbour, toward_agent, toward_dom0};
use crate::channel::{Channel, GuestTty};
use crate::procfs::{cpu_ticks, peak_rss_kb};
use crate::raw;

/// The WARN and ERROR lines of `log`, timestamps and digits taken out, counted.
fn distinct_warnings(log: &str) -> Vec<(String, usize)> {
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    for line in log.lines() {
        let Some(at) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
            continue;
        };
        let text: String = line[at..]
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(160)
            .collect();
        *seen.entry(text).or_default() += 1;
    }
    seen.into_iter().collect()
}

/// The figures of one class.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub class: Class,
    pub inputs_sent: usize,
    pub up: bool,
    pub rss_kb: u64,
    pub peak_rss_kb: u64,
    /// How long the class ran (its inputs, then the offender's recovery).
    pub elapsed: Duration,
    /// Dom0's CPU use during the class, % of one core.
    pub cpu: f64,
    /// WARN and ERROR lines Dom0 logged during the class (refusals are logged at a bounded rate).
    pub warn_lines: usize,
    pub error_lines: usize,
    /// Those lines, timestamps and numbers taken out, with how many times each came.
    pub messages: Vec<(String, usize)>,
    /// The neighbour's loop alone just before the class (the machine's own noise, same minute).
    pub unloaded: LoopRun,
    pub neighbour: LoopRun,
    /// Time for the offending guest to get a CONNACK again after the class, or what it got.
    pub recovery: Result<Duration, String>,
}

/// What is measured of the attacked process during a class: from [`Watch::begin`] to
/// [`Watch::finish`].
struct Watch {
    logged: usize,
    cpu0: u64,
    t0: Instant,
}

impl Watch {
    fn begin(target: &crate::Proc) -> Watch {
        Watch {
            logged: target.output().len(),
            cpu0: cpu_ticks(target.pid()),
            t0: Instant::now(),
        }
    }

    /// The class's figures; `sent` is what the attack returned (inputs sent, recovery).
    fn finish(
        self,
        target: &mut crate::Proc,
        class: Class,
        sent: (usize, Result<Duration, String>),
        unloaded: LoopRun,
        neighbour: LoopRun,
    ) -> Outcome {
        let pid = target.pid();
        let log = target.output();
        let log = log.get(self.logged..).unwrap_or_default();
        let elapsed = self.t0.elapsed();
        Outcome {
            class,
            inputs_sent: sent.0,
            up: target.is_running(),
            rss_kb: target.rss_kb(),
            peak_rss_kb: peak_rss_kb(pid),
            elapsed,
            cpu: (cpu_ticks(pid) - self.cpu0) as f64 / elapsed.as_secs_f64(),
            warn_lines: log.matches(" WARN ").count(),
            error_lines: log.matches(" ERROR ").count(),
            messages: distinct_warnings(log),
            unloaded,
            neighbour,
            recovery: sent.1,
        }
    }
}

/// Connects like a guest; the time it took, or what went wrong within `limit`.
fn reconnect(g: &mut GuestTty, vm: &str, limit: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut last = None;
    // A refusal may be the answer to a hostile CONNECT sent just before: ask again until `limit`.
    while let Some(left) = limit.checked_sub(t0.elapsed()) {
        g.seen.clear();
        match raw::try_connect_until_connack(g, vm, 1, left) {
            Some(0) => return Ok(t0.elapsed()),
            Some(rc) => last = Some(rc),
            None => break,
        }
    }
    Err(match last {
        Some(rc) => format!("CONNACK {rc:#04x}"),
        None => format!("no CONNACK in {limit:?}"),
    })
}

/// Sends `class` down `ch` (the attacker's channel, `vm`'s) for `time`, then measures recovery.
pub fn attack(
    ch: &Channel,
    vm: &str,
    class: &Class,
    time: Duration,
) -> (usize, Result<Duration, String>) {
    let mut g = ch.guest();
    let t0 = Instant::now();
    let mut sent = 0;
    // Every input at least once, again and again until `time` is up.
    while sent == 0 || t0.elapsed() < time {
        for input in &class.inputs {
            // Without a session (no CONNACK in time), the input goes to a scanning link: hostile
            // input all the same.
            if input.live {
                let _ = reconnect(&mut g, vm, Duration::from_secs(15));
            }
            input.send(|b| g.write(b));
            g.poll();
            g.seen.clear();
            if input.vanish {
                ch.drop_client();
            }
            sent += 1;
        }
    }
    let recovery = reconnect(&mut g, vm, Duration::from_secs(30));
    (sent, recovery)
}

/// The whole suite toward Dom0: a scene (Dom0, sys-usb, vm-gui) and the attacker's channel; for
/// each class (or those in `only`), the neighbour's loop alone for `time`, then with the class for
/// `time`.
pub fn run_toward_dom0(
    kind: crate::BrokerKind,
    time: Duration,
    only: &[u8],
) -> (LoopRun, Vec<Outcome>) {
    let mut s = crate::scene::Scene::start("hostile", kind, crate::scene::SceneOptions::default());
    let evil = Channel::new(&s.dir.path, EVIL);
    s.dom0
        .proc
        .wait_log("link{vm=vm-evil}: attached to channel");
    let quiet = |name: &str| {
        let n = Neighbour::start(&s.gui.mqtt, name);
        let t0 = Instant::now();
        while t0.elapsed() < time {
            std::thread::park_timeout(time.saturating_sub(t0.elapsed()));
        }
        n.stop()
    };
    let baseline = quiet("neighbour-0");
    let mut out = Vec::new();
    for class in toward_dom0(EVIL) {
        if !only.is_empty() && !only.contains(&class.id) {
            continue;
        }
        let unloaded = quiet(&format!("quiet-{}", class.id));
        let watch = Watch::begin(&s.dom0.proc);
        let nb = Neighbour::start(&s.gui.mqtt, &format!("neighbour-{}", class.id));
        let sent = attack(&evil, EVIL, &class, time);
        let neighbour = nb.stop();
        out.push(watch.finish(&mut s.dom0.proc, class, sent, unloaded, neighbour));
    }
    (baseline, out)
}

/// Plays Dom0 on the channel's backend socket.
struct FakeDom0 {
    stream: std::os::unix::net::UnixStream,
    seen: Vec<u8>,
}

impl FakeDom0 {
    /// Takes the backend socket (the previous client is dropped), says DISCONNECT like Dom0's
    /// attach signal, and waits for the agent's CONNECT.
    fn attach(ch: &Channel, limit: Duration) -> Option<FakeDom0> {
        ch.drop_client();
        let stream = std::os::unix::net::UnixStream::connect(&ch.socket).ok()?;
        let deadline = Instant::now() + limit;
        while !ch.has_client() {
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::park_timeout(Duration::from_millis(5));
        }
        let mut d = FakeDom0 {
            stream,
            seen: Vec::new(),
        };
        d.write(&raw::DISCONNECT);
        let _ = d.stream.set_read_timeout(Some(Duration::from_millis(50)));
        while Instant::now() < deadline {
            d.read();
            if d.seen.windows(6).any(|w| w == b"\x00\x04MQTT") {
                d.seen.clear();
                return Some(d);
            }
        }
        None
    }

    fn read(&mut self) {
        use std::io::Read;
        let mut buf = [0u8; 65536];
        if let Ok(n) = self.stream.read(&mut buf) {
            self.seen.extend_from_slice(&buf[..n]);
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let _ = self.stream.write_all(bytes);
    }
}

/// The agent under attack, with the files of its run.
#[allow(missing_debug_implementations)]
pub struct AgentUnderTest {
    pub dir: crate::TestDir,
    pub ch: Channel,
    pub proc: crate::Proc,
    pub mqtt: std::path::PathBuf,
}

impl AgentUnderTest {
    pub fn start(vm: &str) -> AgentUnderTest {
        let dir = crate::TestDir::new("hostile-dom0");
        let ch = Channel::new(&dir.path, vm);
        let mqtt = dir.join("mqtt.sock");
        let mut cmd = std::process::Command::new(crate::bin("domu-agent"));
        cmd.args(["run", "--vm", vm, "--device"])
            .arg(&ch.tty)
            .arg("--local-socket")
            .arg(dir.join("agent.sock"))
            .arg("--mqtt-socket")
            .arg(&mqtt)
            .arg("--legacy-socket")
            .arg(dir.join("legacy.sock"))
            .env("RUST_LOG", "info");
        let proc = crate::Proc::spawn("domu-agent", &dir, &mut cmd);
        proc.wait_log("channel opened");
        AgentUnderTest {
            dir,
            ch,
            proc,
            mqtt,
        }
    }

    /// A well-behaved Dom0 attaches: the time until the agent logged a new "session up".
    fn recover(&mut self, limit: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        let before = self.proc.output().matches("session up").count();
        let Some(mut d) = FakeDom0::attach(&self.ch, limit) else {
            return Err(format!("no CONNECT in {limit:?}"));
        };
        d.write(&[0x20, 0x02, 0x00, 0x00]);
        while t0.elapsed() < limit {
            d.read();
            if self.proc.output().matches("session up").count() > before {
                return Ok(t0.elapsed());
            }
        }
        Err(format!("no session in {limit:?}"))
    }

    /// Sends `class` for `time` (each input to a freshly attached fake Dom0), then recovery.
    fn attack(&mut self, class: &Class, time: Duration) -> (usize, Result<Duration, String>) {
        let t0 = Instant::now();
        let mut sent = 0;
        while sent == 0 || t0.elapsed() < time {
            for input in &class.inputs {
                // The agent backs off (up to 5 s) from a Dom0 that misbehaves: wait for it.
                let Some(mut d) = FakeDom0::attach(&self.ch, Duration::from_secs(15)) else {
                    continue;
                };
                if input.live {
                    d.write(&[0x20, 0x02, 0x00, 0x00]);
                }
                input.send(|b| d.write(b));
                d.read();
                if input.vanish {
                    self.ch.drop_client();
                }
                sent += 1;
            }
        }
        (sent, self.recover(Duration::from_secs(30)))
    }
}

/// The whole suite toward an agent (vm-gui's): each class (or those in `only`) for `time`, while
/// an application keeps connecting to the agent's local MQTT endpoint.
pub fn run_toward_agent(time: Duration, only: &[u8]) -> (LoopRun, Vec<Outcome>) {
    let mut a = AgentUnderTest::start("vm-gui");
    let first = a.recover(Duration::from_secs(30));
    assert!(first.is_ok(), "the agent never got a session: {first:?}");
    let quiet = |mqtt: &Path| {
        let n = Neighbour::local_connects(mqtt);
        let t0 = Instant::now();
        while t0.elapsed() < time {
            std::thread::park_timeout(time.saturating_sub(t0.elapsed()));
        }
        n.stop()
    };
    let baseline = quiet(&a.mqtt);
    let mut out = Vec::new();
    for class in toward_agent("vm-gui") {
        if !only.is_empty() && !only.contains(&class.id) {
            continue;
        }
        let unloaded = quiet(&a.mqtt);
        let watch = Watch::begin(&a.proc);
        let nb = Neighbour::local_connects(&a.mqtt);
        let sent = a.attack(&class, time);
        let neighbour = nb.stop();
        out.push(watch.finish(&mut a.proc, class, sent, unloaded, neighbour));
    }
    (baseline, out)
}
