//! The neighbour's load: a request loop (or an application's connects) measured while a class
//! runs.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;
use topics::topic::Command;
use topics::vm::VmId;

use crate::bench::{Stats, stats};
use crate::local::LocalClient;
use crate::raw;

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
