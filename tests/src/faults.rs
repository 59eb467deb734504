//! Faults, one at a time, while vm-gui keeps asking sys-usb `list_disks` at QoS 1 through both
//! agents and Dom0: what a user would check is that no request is silently lost (each one answered
//! within [`REQUEST_TIMEOUT`], a timeout the requester could retry on), how long the outage lasted
//! as the requester saw it (its longest round trip), and that no half-written file is left.
//! Used by the system test (`tests/faults.rs`) and the benchmark (`benches/faults.rs`).

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::BrokerKind;
use crate::hostile::{LoopRun, Neighbour};
use crate::scene::{Scene, SceneOptions};

/// How long a request of the benchmark waits for its answer before it counts as timed out: beyond
/// any recovery here.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// dom0-broker SIGKILLed (the embedded broker with it) and started again.
    Dom0Killed,
    /// The external Mosquitto SIGKILLed and started again on its port.
    BrokerKilled,
    /// sys-usb's channel socket removed and created again (the VM rebooted, its agent kept).
    SocketRecreated,
    /// The backend drops Dom0's connection while sys-usb writes (bytes meanwhile are lost).
    Dom0Detached,
    /// Garbage and half frames written into sys-usb's channel between the agent's frames.
    Garbage,
    /// sys-usb's agent SIGKILLed in the middle of a `copy_file` of [`BIG`] bytes, then started
    /// again.
    AgentKilledMidCopy,
    /// sys-usb's agent SIGKILLed while it writes the file of a 2 MiB `create_file` (tried until a
    /// kill lands in the write, at most [`CREATE_TRIES`] times), then started again.
    AgentKilledMidCreate,
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::Dom0Killed,
        Fault::BrokerKilled,
        Fault::SocketRecreated,
        Fault::Dom0Detached,
        Fault::Garbage,
        Fault::AgentKilledMidCopy,
        Fault::AgentKilledMidCreate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Dom0Killed => "Dom0 service SIGKILLed and restarted",
            Fault::BrokerKilled => "broker (Mosquitto) SIGKILLed and restarted",
            Fault::SocketRecreated => "sys-usb's channel socket removed and re-created",
            Fault::Dom0Detached => "Dom0 detached while sys-usb writes",
            Fault::Garbage => "garbage and half frames injected into sys-usb's channel",
            Fault::AgentKilledMidCopy => "sys-usb's agent SIGKILLed mid-copy_file, restarted",
            Fault::AgentKilledMidCreate => "sys-usb's agent SIGKILLed mid-create_file, restarted",
        }
    }

    /// Whether the fault exists with this broker.
    pub fn applies(self, kind: BrokerKind) -> bool {
        self != Fault::BrokerKilled || kind == BrokerKind::Mosquitto
    }
}

/// The figures of one fault.
#[derive(Debug, Clone)]
pub struct FaultOutcome {
    pub fault: Fault,
    /// The requests during the run: answered, and timed out (no answer within the timeout: the
    /// requester knows, and may ask again).
    pub requests: LoopRun,
    /// The longest answered round trip: the outage as the requester saw it.
    pub worst: Duration,
    /// For the agent kills: whether the agent was seen with the file open just before the kill.
    pub caught_mid_write: Option<bool>,
    /// A request asked after the fault (`domu-agent call list_disks`) was answered.
    pub served_after: bool,
    /// Files under the disks and the repository that are not whole files of the scene: files of
    /// a write cut short.
    pub partial_files: usize,
}

/// Every regular file under `root` with its size.
fn files(root: &Path, out: &mut Vec<(std::path::PathBuf, u64)>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => files(&p, out),
            Ok(_) => out.push((p.clone(), e.metadata().map_or(0, |m| m.len()))),
            Err(_) => {}
        }
    }
}

/// How many `create_file`s [`Fault::AgentKilledMidCreate`] tries to kill in the middle of.
pub const CREATE_TRIES: usize = 30;

/// The size of those files: just under the agent's default `create_file` limit (2 MiB).
const CREATE_SIZE: u64 = 2 * 1024 * 1024 - 4096;

/// The file `copy_file` copies in [`Fault::AgentKilledMidCopy`].
const BIG: u64 = 256 << 20;

/// Runs `fault` on a scene, `settle` of requests before and after it.
fn run_one(s: &mut Scene, fault: Fault, settle: Duration, timeout: Duration) -> FaultOutcome {
    let nb = Neighbour::requests(&s.gui.mqtt, &format!("faults-{fault:?}"), timeout);
    let mut caught = None;
    std::thread::park_timeout(settle);
    let kind = s.kind;
    match fault {
        Fault::Dom0Killed => {
            let args: Vec<String> = s.dom0_args.clone();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            s.dom0.restart_after(Signal::SIGKILL, &s.dir, kind, &args);
        }
        Fault::BrokerKilled => {
            if let Some(m) = s.dom0.mosquitto.as_mut() {
                m.signal(Signal::SIGKILL);
                m.wait_exit(crate::DEADLINE);
            }
            s.dom0.mosquitto = Some(crate::start_mosquitto(&s.dir, s.dom0.port, ""));
        }
        Fault::SocketRecreated => {
            // Re-created once Dom0 has seen it gone (a reboot, not a blink).
            const GONE: &str = "channel socket removed; link stopped";
            let before = s.dom0.log().matches(GONE).count();
            s.usb_ch.shutdown();
            s.dom0.proc.wait_log_count(GONE, before + 1);
            s.usb_ch.serve();
        }
        Fault::Dom0Detached => s.usb_ch.drop_client(),
        Fault::Garbage => {
            let mut g = s.usb_ch.guest();
            let half = crate::raw::publish_qos1("system/disks/list_disks/response/vm-gui", 9, b"{");
            for i in 0..20u8 {
                g.write(&[0x30, 0x7F, i, 0x00]);
                g.write(&half[..half.len() / 2]);
                std::thread::park_timeout(Duration::from_millis(25));
            }
        }
        Fault::AgentKilledMidCopy => {
            // vm-gui asks sys-usb to copy a big file to its other disk; sys-usb's agent is killed
            // while it writes the copy.
            make_big(&s.disks.join("usb0/big.bin"));
            let _ = std::fs::remove_file(s.disks.join("usb1/big.bin"));
            let mut call = std::process::Command::new(crate::bin("domu-agent"))
                .arg("call")
                .arg("--socket")
                .arg(&s.gui.socket)
                .args(["--timeout-ms", "20000", "copy_file", "source_disk=usb0"])
                .args(["filepath=big.bin", "target_disk=usb1"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let usb_pid = s.usb.proc.pid();
            crate::wait_for("sys-usb's agent to start writing", crate::DEADLINE, || {
                writing(usb_pid)
            });
            kill_and_restart_usb(s);
            caught = Some(true);
            let _ = call.wait();
        }
        Fault::AgentKilledMidCreate => {
            // 2 MiB create_files one after the other; the agent is SIGKILLed as soon as it is seen
            // with the new file open (the write takes milliseconds: tried again until it lands).
            let data = s.dir.join("create.bin");
            std::fs::write(&data, vec![0x5Au8; CREATE_SIZE as usize]).unwrap();
            let data_arg = format!("data=@{}", data.display());
            caught = Some(false);
            for i in 0..CREATE_TRIES {
                let mut call = std::process::Command::new(crate::bin("domu-agent"))
                    .arg("call")
                    .arg("--socket")
                    .arg(&s.gui.socket)
                    .args(["--timeout-ms", "10000", "create_file", "disk=usb1"])
                    .arg(format!("filepath=created-{i}.bin"))
                    .arg(&data_arg)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                let usb_pid = s.usb.proc.pid();
                let mut seen = false;
                while matches!(call.try_wait(), Ok(None)) {
                    if writing(usb_pid) {
                        seen = true;
                        break;
                    }
                }
                if seen {
                    kill_and_restart_usb(s);
                    caught = Some(true);
                    let _ = call.wait();
                    break;
                }
            }
        }
    }
    std::thread::park_timeout(settle);
    let requests = nb.stop();
    let (served_after, _) = s.gui.call("list_disks", &[]);
    let worst = requests.max.unwrap_or_default();
    let mut found = Vec::new();
    files(&s.disks, &mut found);
    files(&s.repo, &mut found);
    let partial_files = found
        .iter()
        .filter(|(p, size)| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let whole_created = name.starts_with("created-") && *size == CREATE_SIZE;
            !(name == "report.txt" || (name == "big.bin" && *size == BIG) || whole_created)
        })
        .count();
    FaultOutcome {
        fault,
        requests,
        worst,
        caught_mid_write: caught,
        served_after,
        partial_files,
    }
}

/// SIGKILLs sys-usb's agent and starts it again.
fn kill_and_restart_usb(s: &mut Scene) {
    s.usb.proc.signal(Signal::SIGKILL);
    s.usb.proc.wait_exit(crate::DEADLINE);
    let (d, r) = (s.disks.display().to_string(), s.repo.display().to_string());
    s.usb = crate::Agent::start(
        &s.dir,
        &s.usb_ch,
        "sys-usb",
        &["--disks", &d, "--repository", &r],
    );
}

/// True while `pid` has a file open for writing under a disk (an unnamed O_TMPFILE or a named
/// one): the agent is in the middle of a write.
fn writing(pid: i32) -> bool {
    crate::procfs::open_files(pid)
        .iter()
        .any(|t| t.to_string_lossy().contains("/disks/usb1"))
}

/// Writes the [`BIG`] file the copy reads (once per scene).
fn make_big(path: &Path) {
    use std::io::Write;
    if std::fs::metadata(path).is_ok_and(|m| m.len() == BIG) {
        return;
    }
    let mut f = std::fs::File::create(path).unwrap();
    let block: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
    for _ in 0..BIG >> 20 {
        f.write_all(&block).unwrap();
    }
}

/// Every fault that applies to `kind` (or those in `only`, by position in [`Fault::ALL`] from 1).
/// Each request waits `timeout` for its answer.
pub fn run_faults(
    kind: BrokerKind,
    settle: Duration,
    timeout: Duration,
    only: &[u8],
) -> Vec<FaultOutcome> {
    let mut s = Scene::start("faults", kind, SceneOptions::default());
    let mut out = Vec::new();
    for (i, fault) in Fault::ALL.into_iter().enumerate() {
        let n = u8::try_from(i + 1).unwrap_or(u8::MAX);
        if !fault.applies(kind) || (!only.is_empty() && !only.contains(&n)) {
            continue;
        }
        out.push(run_one(&mut s, fault, settle, timeout));
    }
    out
}
