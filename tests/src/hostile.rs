//! Hostile input, one attack class at a time: the classes as bytes (what a compromised guest writes
//! on its channel, what a compromised "Dom0" writes to an agent), and the runners that send them
//! while a neighbour keeps a request/response loop going, and measure what users would check:
//! Dom0 (or the agent) still up, its memory, the neighbour's failures and p99, the offender's
//! recovery. Used by the system test (`tests/hostile.rs`, short, asserting the invariants) and by
//! the reliability benchmark (`benches/hostile.rs`, longer, printing the figures).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;
use topics::topic::{Command, Notification};
use topics::vm::VmId;

use crate::bench::{Stats, stats};
use crate::channel::{Channel, GuestTty};
use crate::local::LocalClient;
use crate::raw::{self, packet, string};

/// The attacking VM (not in the policy: it gets the `*` rules only).
pub const EVIL: &str = "vm-evil";

/// One hostile input.
#[derive(Debug, Clone)]
pub struct Input {
    /// Sent on a live session (after a CONNECT and its CONNACK), or on a link waiting for CONNECT.
    pub live: bool,
    pub bytes: Vec<u8>,
    /// Written one byte at a time with this pause (a slow writer).
    pub pace: Option<Duration>,
    /// The channel's backend connection is cut right after (the guest vanished mid-write).
    pub vanish: bool,
}

impl Input {
    fn scanning(bytes: Vec<u8>) -> Input {
        Input {
            live: false,
            bytes,
            pace: None,
            vanish: false,
        }
    }
    fn live(bytes: Vec<u8>) -> Input {
        Input {
            live: true,
            ..Input::scanning(bytes)
        }
    }

    /// Writes the bytes with `write`: at once, or a byte at a time at its pace.
    fn send(&self, mut write: impl FnMut(&[u8])) {
        match self.pace {
            Some(p) => {
                for b in &self.bytes {
                    write(std::slice::from_ref(b));
                    std::thread::sleep(p);
                }
            }
            None => write(&self.bytes),
        }
    }
}

/// One class of the list.
#[derive(Debug, Clone)]
pub struct Class {
    pub id: u8,
    pub name: &'static str,
    pub inputs: Vec<Input>,
}

fn connect_raw(level: u8, flags: u8, keep_alive: u16, id: &[u8], props: Option<&[u8]>) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if let Some(p) = props {
        raw::remaining_length(p.len(), &mut body);
        body.extend_from_slice(p);
    }
    string(id, &mut body);
    packet(0x10, &body)
}

fn publish_raw(byte1: u8, topic: &[u8], pkid: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic, &mut body);
    if let Some(id) = pkid {
        body.extend_from_slice(&id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(byte1, &body)
}

fn subscribe_raw(byte1: u8, pkid: u16, filter: &[u8], qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    string(filter, &mut body);
    body.push(qos);
    packet(byte1, &body)
}

fn ack(byte1: u8, pkid: u16) -> Vec<u8> {
    packet(byte1, &pkid.to_be_bytes())
}

/// A QoS 1 PUBLISH on `t` cut short at every field: in the header, the length, the topic length,
/// the topic, the packet id, the payload (live inputs).
fn publish_cuts(full_publish: &[u8], topic_len: usize) -> Vec<Input> {
    let last = full_publish.len() - 1;
    [1, 2, 3, 4, 10, topic_len + 4, topic_len + 5, last]
        .iter()
        .map(|n| Input::live(full_publish[..(*n).min(last)].to_vec()))
        .collect()
}

/// 2000 QoS 1 publishes on `t`, and 2000 QoS 2 ones, packet ids 1 to 2000.
fn unacknowledged(t: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut qos1 = Vec::new();
    let mut qos2 = Vec::new();
    for i in 1..=2000u16 {
        qos1.extend(publish_raw(0x32, t, Some(i), b"{}"));
        qos2.extend(publish_raw(0x34, t, Some(i), b"{}"));
    }
    (qos1, qos2)
}

/// 2 MiB of 1 KiB QoS 0 publishes on `t`.
fn kib_flood(t: &[u8]) -> Vec<u8> {
    publish_raw(0x30, t, None, &[b'f'; 1024]).repeat(2048)
}

/// Deterministic noise.
fn noise(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// What a compromised guest writes on its channel, class by class (`vm` is its own name: the
/// identity Dom0 expects).
pub fn toward_dom0(vm: &str) -> Vec<Class> {
    let id = vm.as_bytes();
    let allowed = Notification::Error.topic();
    let t = allowed.as_bytes();
    let good_publish = publish_raw(0x30, t, None, b"{\"x\":1}");
    let good_connect = connect_raw(4, 0x02, 1, id, None);
    let mut classes = Vec::new();

    classes.push(Class {
        id: 1,
        name: "non-CONNECT first packet; second CONNECT",
        inputs: vec![
            Input::scanning(good_publish.clone()),
            Input::scanning(subscribe_raw(0x82, 1, b"#", 0)),
            Input::scanning(raw::PINGREQ.to_vec()),
            Input::scanning(raw::DISCONNECT.to_vec()),
            Input::live(connect_raw(4, 0x02, 1, id, None)),
            Input::live(connect_raw(4, 0x02, 1, b"sys-usb", None)),
        ],
    });

    let mut reserved_flags = vec![
        Input::live(vec![0x20, 0x02, 0x00, 0x00]),       // CONNACK
        Input::live(vec![0x90, 0x03, 0x00, 0x01, 0x00]), // SUBACK
        Input::live(vec![0xB0, 0x02, 0x00, 0x01]),       // UNSUBACK
        Input::live(vec![0xD0, 0x00]),                   // PINGRESP
        Input::live(vec![0x00, 0x00]),                   // reserved type 0
        Input::live(vec![0xF0, 0x00]),                   // reserved type 15
        Input::live(subscribe_raw(0x80, 2, t, 0)),       // SUBSCRIBE flags must be 0010
        Input::live(vec![0xC1, 0x00]),                   // PINGREQ with a flag
        Input::live(publish_raw(0x38, t, None, b"dup at qos 0")),
    ];
    reserved_flags.push(Input::scanning(connect_raw(4, 0x03, 1, id, None))); // reserved bit 0
    reserved_flags.push(Input::scanning({
        let mut c = good_connect.clone();
        c[0] = 0x11;
        c
    }));
    classes.push(Class {
        id: 2,
        name: "server-to-client types, reserved types 0 and 15, reserved flag bits",
        inputs: reserved_flags,
    });

    let mut nonminimal = vec![0x30, 0x80 | 9, 0x00]; // 9 encoded on two bytes
    nonminimal.extend_from_slice(&good_publish[2..]);
    let mut mismatch = vec![0x30, 0x0A, 0x00, 0xC8]; // 10 bytes, topic "length 200"
    mismatch.extend_from_slice(&[b'a'; 8]);
    let mut huge_connect = vec![0x10, 0xFF, 0xFF, 0xFF, 0x7F];
    huge_connect.extend(noise(4096, 1));
    let mut huge_publish = vec![0x30, 0xFF, 0xFF, 0xFF, 0x7F];
    huge_publish.extend(noise(65536, 2));
    classes.push(Class {
        id: 3,
        name: "remaining length: 5 bytes, non-minimal, body mismatch, huge before CONNECT",
        inputs: vec![
            Input::scanning(vec![0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),
            Input::live(vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            Input::scanning({
                let mut c = vec![0x10, 0x80 | (good_connect.len() as u8 - 2), 0x00];
                c.extend_from_slice(&good_connect[2..]);
                c
            }),
            Input::live(nonminimal),
            Input::live(mismatch),
            Input::scanning(huge_connect),
            Input::live(huge_publish),
        ],
    });

    // Every field of a CONNECT and of a QoS 1 PUBLISH cut short.
    let full_connect = connect_raw(4, 0x02, 1, id, None);
    let full_publish = publish_raw(0x32, t, Some(7), b"{\"cut\":true}");
    let mut cuts: Vec<Input> = (1..full_connect.len())
        .map(|n| Input::scanning(full_connect[..n].to_vec()))
        .collect();
    cuts.extend(publish_cuts(&full_publish, t.len()));
    classes.push(Class {
        id: 4,
        name: "truncation at every field",
        inputs: cuts,
    });

    let bad_strings: [&[u8]; 5] = [
        b"\xC3\x28",     // invalid UTF-8
        b"\xED\xA0\x80", // a surrogate (U+D800) encoded in UTF-8
        b"vm-evil\x00",  // NUL
        b"vm-\x01evil",  // control character
        b"\xFF\xFE\xFD", // not UTF-8 at all
    ];
    let mut strings = Vec::new();
    for s in bad_strings {
        strings.push(Input::scanning(connect_raw(4, 0x02, 1, s, None)));
        let mut topic = t.to_vec();
        topic.extend_from_slice(s);
        strings.push(Input::live(publish_raw(0x30, &topic, None, b"{}")));
        strings.push(Input::live(subscribe_raw(0x82, 3, &topic, 0)));
    }
    classes.push(Class {
        id: 5,
        name: "invalid UTF-8, surrogates, NUL, control characters in client id and topics",
        inputs: strings,
    });

    let long = vec![b'a'; 65535];
    let mut topics_class: Vec<Input> = [
        &b""[..],
        b"system/+/x",
        b"#",
        b"system/events/error/notification#",
        b"a+/b",
        b"$SYS/broker/uptime",
        &long,
    ]
    .iter()
    .map(|topic| Input::live(publish_raw(0x30, topic, None, b"{}")))
    .collect();
    for f in [
        &b""[..],
        b"a/#/b",
        b"a+/b",
        b"$SYS/#",
        b"#",
        b"+/+/+/+",
        &long,
    ] {
        topics_class.push(Input::live(subscribe_raw(0x82, 4, f, 0)));
    }
    classes.push(Class {
        id: 6,
        name: "empty topics, wildcards in PUBLISH, misplaced + and #, over-long, $ topics",
        inputs: topics_class,
    });

    classes.push(Class {
        id: 7,
        name: "QoS 3, packet id 0 with QoS > 0",
        inputs: vec![
            Input::live(publish_raw(0x36, t, Some(5), b"{}")),
            Input::live(publish_raw(0x32, t, Some(0), b"{}")),
            Input::live(publish_raw(0x34, t, Some(0), b"{}")),
            Input::live(subscribe_raw(0x82, 5, t, 3)),
            Input::live(subscribe_raw(0x82, 0, t, 1)),
        ],
    });

    classes.push(Class {
        id: 8,
        name: "unsolicited or out-of-order PUBACK, PUBREC, PUBREL, PUBCOMP",
        inputs: vec![
            Input::live(ack(0x40, 7)),
            Input::live(ack(0x50, 8)),
            Input::live(ack(0x62, 9)),
            Input::live(ack(0x70, 10)),
            Input::live({
                // QoS 2 publish, then PUBCOMP before PUBREL, then PUBREL twice.
                let mut b = publish_raw(0x34, t, Some(11), b"{}");
                b.extend(ack(0x70, 11));
                b.extend(ack(0x62, 11));
                b.extend(ack(0x62, 11));
                b
            }),
        ],
    });

    let (qos1, qos2) = unacknowledged(t);
    classes.push(Class {
        id: 9,
        name: "in-flight overflow: 2000 QoS 1, then 2000 QoS 2 publishes unacknowledged",
        inputs: vec![Input::live(qos1), Input::live(qos2)],
    });

    // MQTT 5: properties on CONNECT (session expiry, receive maximum 0: a protocol error, a big
    // user property) and a lying properties length.
    let mut props = vec![0x11, 0, 0, 0x0E, 0x10, 0x21, 0, 0, 0x26];
    string(&[b'k'; 300], &mut props);
    string(&[b'v'; 3000], &mut props);
    classes.push(Class {
        id: 10,
        name: "MQTT 5 CONNECT and properties",
        inputs: vec![
            Input::scanning(connect_raw(5, 0x02, 1, id, Some(&props))),
            Input::scanning(connect_raw(5, 0x02, 1, id, Some(&[0x11, 0, 0, 0, 5]))),
            Input::scanning({
                let mut c = connect_raw(5, 0x02, 1, id, Some(&[]));
                c[12] = 0x7F; // properties length far beyond the packet
                c
            }),
        ],
    });

    let flood = kib_flood(t);
    classes.push(Class {
        id: 11,
        name: "slow writer, idle session, payload flood (2 MiB of 1 KiB publishes)",
        inputs: vec![
            Input {
                pace: Some(Duration::from_millis(20)),
                ..Input::scanning(full_connect.clone())
            },
            Input::live(Vec::new()), // connected, then silent until the next input
            Input::live(flood),
        ],
    });

    classes.push(Class {
        id: 12,
        name: "a guest that vanishes mid-write",
        inputs: vec![
            Input {
                vanish: true,
                ..Input::live(full_publish[..full_publish.len() / 2].to_vec())
            },
            Input {
                vanish: true,
                ..Input::scanning(full_connect[..full_connect.len() / 2].to_vec())
            },
        ],
    });
    classes
}

/// Dom0's peak resident memory so far (VmHWM), KiB.
pub fn peak_rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

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

/// CPU time a process used so far (user + system), in clock ticks of 10 ms.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the 3rd, utime the 14th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    tick(11) + tick(12)
}

/// What the neighbour saw during a run.
#[derive(Debug, Clone)]
pub struct LoopRun {
    pub answered: usize,
    /// Requests without an answer within 5 s.
    pub failed: usize,
    pub stats: Option<Stats>,
    /// The longest round trip.
    pub max: Option<Duration>,
}

/// A request loop measured while a class runs: each step is timed; a step that fails (no answer
/// within 5 s) is counted.
#[allow(missing_debug_implementations)]
pub struct Neighbour {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Vec<Duration>, usize)>,
}

impl Neighbour {
    /// Runs `step` (true: answered) in a loop on a thread of its own until [`Neighbour::stop`],
    /// `pace` apart (not timed): a loop that leaves the machine no breath measures only itself.
    pub fn spawn(pace: Duration, mut step: impl FnMut(u64) -> bool + Send + 'static) -> Neighbour {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut samples, mut failed) = (Vec::new(), 0);
            let mut i = 0u64;
            while !flag.load(Ordering::SeqCst) {
                i += 1;
                let t0 = Instant::now();
                if step(i) {
                    samples.push(t0.elapsed());
                } else {
                    failed += 1;
                }
                std::thread::sleep(pace);
            }
            (samples, failed)
        });
        Neighbour { stop, handle }
    }

    /// vm-gui asking sys-usb `list_disks` in a loop, through its agent's local MQTT endpoint.
    pub fn start(mqtt: &Path, name: &str) -> Neighbour {
        Neighbour::requests(mqtt, name, Duration::from_secs(5))
    }

    /// The same, each request waiting up to `timeout` for its answer (QoS 1 both ways).
    pub fn requests(mqtt: &Path, name: &str, timeout: Duration) -> Neighbour {
        let gui = VmId::parse("vm-gui").expect("vm id");
        let client = LocalClient::connect(mqtt, name);
        let response = Command::ListDisks.response_topic(&gui);
        assert_eq!(client.subscribe(&[&response]), [true]);
        let request = Command::ListDisks.request_topic();
        let name = name.to_owned();
        Neighbour::spawn(Duration::ZERO, move |i| {
            let rid = format!("{name}-{i}");
            let body = json!({"sender": "vm-gui", "request_id": rid}).to_string();
            client.publish(&request, body.as_bytes());
            let deadline = Instant::now() + timeout;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                let Some((_, p)) = client.recv(left) else {
                    return false;
                };
                if serde_json::from_slice::<serde_json::Value>(&p)
                    .is_ok_and(|v| v["request_id"] == rid.as_str())
                {
                    return true;
                }
            }
            false
        })
    }

    /// An application connecting to the agent's local MQTT endpoint in a loop (CONNECT → CONNACK,
    /// then DISCONNECT): the endpoint stays responsive whatever Dom0 does.
    pub fn local_connects(mqtt: &Path) -> Neighbour {
        let path = mqtt.to_owned();
        Neighbour::spawn(Duration::from_millis(1), move |i| {
            use std::io::{Read, Write};
            let Ok(mut s) = std::os::unix::net::UnixStream::connect(&path) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut connack = [0u8; 4];
            let ok = s.write_all(&raw::connect(&format!("app-{i}"), 5)).is_ok()
                && s.read_exact(&mut connack).is_ok()
                && connack == [0x20, 0x02, 0x00, 0x00];
            let _ = s.write_all(&raw::DISCONNECT);
            ok
        })
    }

    pub fn stop(self) -> LoopRun {
        self.stop.store(true, Ordering::SeqCst);
        let (samples, failed) = self.handle.join().expect("neighbour thread");
        LoopRun {
            answered: samples.len(),
            max: samples.iter().max().copied(),
            failed,
            stats: (!samples.is_empty()).then(|| stats(samples)),
        }
    }
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

/// What a compromised Dom0 writes to an agent, class by class (`vm` is the agent's VM). `live`
/// inputs follow a `CONNACK 0`; the others come instead of it.
pub fn toward_agent(vm: &str) -> Vec<Class> {
    let me = VmId::parse(vm).expect("vm id");
    let response = Command::ListDisks.response_topic(&me);
    let t = response.as_bytes();
    let connack = vec![0x20, 0x02, 0x00, 0x00];
    let full_publish = publish_raw(0x32, t, Some(7), b"{\"status\":\"ok\",\"disks\":[]}");
    let mut classes = Vec::new();

    classes.push(Class {
        id: 1,
        name: "non-CONNACK first packet; second CONNACK",
        inputs: vec![
            Input::scanning(publish_raw(0x30, t, None, b"{}")),
            Input::scanning(vec![0x90, 0x03, 0x00, 0x01, 0x00]),
            Input::scanning(vec![0xD0, 0x00]),
            Input::live(connack.clone()),
            Input::live(vec![0x20, 0x02, 0x00, 0x05]),
        ],
    });

    classes.push(Class {
        id: 2,
        name: "client-to-server types, reserved types 0 and 15, reserved flag bits",
        inputs: vec![
            Input::live(raw::connect("dom0", 5)),
            Input::live(subscribe_raw(0x82, 1, b"#", 0)),
            Input::live(vec![0xA2, 0x05, 0x00, 0x01, 0x00, 0x01, b'#']),
            Input::live(raw::PINGREQ.to_vec()),
            Input::live(vec![0x00, 0x00]),
            Input::live(vec![0xF0, 0x00]),
            Input::live(vec![0xD1, 0x00]),
            Input::live(publish_raw(0x38, t, None, b"{}")),
            Input::scanning(vec![0x21, 0x02, 0x00, 0x00]),
        ],
    });

    let mut nonminimal = vec![0x30, 0x80 | 9, 0x00];
    let small = publish_raw(0x30, b"a/b", None, b"{\"x\":1}");
    nonminimal.extend_from_slice(&small[2..]);
    let mut huge = vec![0x30, 0xFF, 0xFF, 0xFF, 0x7F];
    huge.extend(noise(65536, 3));
    classes.push(Class {
        id: 3,
        name: "remaining length: 5 bytes, non-minimal, body mismatch, huge",
        inputs: vec![
            Input::scanning(vec![0x20, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),
            Input::live(vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            Input::live(nonminimal),
            Input::live(vec![0x30, 0x04, 0x00, 0xC8, b'a', b'b']),
            Input::live(huge),
        ],
    });

    let mut cuts: Vec<Input> = (1..connack.len())
        .map(|n| Input::scanning(connack[..n].to_vec()))
        .collect();
    cuts.extend(publish_cuts(&full_publish, t.len()));
    classes.push(Class {
        id: 4,
        name: "truncation at every field",
        inputs: cuts,
    });

    let bad: [&[u8]; 4] = [b"\xC3\x28", b"\xED\xA0\x80", b"\x00", b"\x01"];
    classes.push(Class {
        id: 5,
        name: "invalid UTF-8, surrogates, NUL, control characters in topics",
        inputs: bad
            .iter()
            .map(|b| {
                let mut topic = t.to_vec();
                topic.extend_from_slice(b);
                Input::live(publish_raw(0x30, &topic, None, b"{}"))
            })
            .collect(),
    });

    let long = vec![b'a'; 65535];
    classes.push(Class {
        id: 6,
        name: "empty topics, wildcards in PUBLISH, over-long, $ topics, topics never subscribed",
        inputs: [
            &b""[..],
            b"system/+/x",
            b"#",
            b"$SYS/x",
            &long,
            b"app/other/x",
        ]
        .iter()
        .map(|topic| Input::live(publish_raw(0x30, topic, None, b"{}")))
        .collect(),
    });

    classes.push(Class {
        id: 7,
        name: "QoS 3, packet id 0 with QoS > 0",
        inputs: vec![
            Input::live(publish_raw(0x36, t, Some(5), b"{}")),
            Input::live(publish_raw(0x32, t, Some(0), b"{}")),
            Input::live(publish_raw(0x34, t, Some(0), b"{}")),
        ],
    });

    classes.push(Class {
        id: 8,
        name: "unsolicited PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK",
        inputs: vec![
            Input::live(ack(0x40, 7)),
            Input::live(ack(0x50, 8)),
            Input::live(ack(0x62, 9)),
            Input::live(ack(0x70, 10)),
            Input::live(vec![0x90, 0x03, 0x00, 0x33, 0x01]),
            Input::live(ack(0xB0, 11)),
        ],
    });

    let (qos1, qos2) = unacknowledged(t);
    classes.push(Class {
        id: 9,
        name: "2000 QoS 1, then 2000 QoS 2 publishes toward the agent",
        inputs: vec![Input::live(qos1), Input::live(qos2)],
    });

    let props = vec![0x20, 0x08, 0x00, 0x00, 0x05, 0x21, 0x00, 0x0A, 0x22, 0x00];
    classes.push(Class {
        id: 10,
        name: "MQTT 5 CONNACK with properties",
        inputs: vec![
            Input::scanning(props),
            Input::scanning(vec![0x20, 0x03, 0x00, 0x00, 0x00]),
        ],
    });

    let flood = kib_flood(t);
    classes.push(Class {
        id: 11,
        name: "slow CONNACK, no CONNACK at all, payload flood (2 MiB of 1 KiB publishes)",
        inputs: vec![
            Input {
                pace: Some(Duration::from_millis(20)),
                ..Input::scanning(connack.clone())
            },
            Input::scanning(Vec::new()),
            Input::live(flood),
        ],
    });

    classes.push(Class {
        id: 12,
        name: "a Dom0 that vanishes mid-write",
        inputs: vec![
            Input {
                vanish: true,
                ..Input::live(full_publish[..full_publish.len() / 2].to_vec())
            },
            Input {
                vanish: true,
                ..Input::scanning(connack[..2].to_vec())
            },
        ],
    });
    classes
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
