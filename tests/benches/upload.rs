//! Benchmark of uploads in chunks (issue 28), in one run:
//! - a small request's round trip from an MVP application on vm-gui's legacy endpoint
//!   (`liste_disques` to sys-usb), idle, then while `domu-agent call` on the same vm-gui uploads
//!   1 MiB files to sys-usb one after the other: the small message must not wait behind a file;
//! - `create_file` throughput of 1 MiB and 16 MiB files through `call` (chunks of 16 KiB, 4 in
//!   flight), against the ceiling of the same run: the chunks' bytes across the slower of the two
//!   simulated channels alone (with chunks in flight both channels work at once).
//!
//! Run with `./scripts/bench` (which builds the release binaries). Prints figures; asserts nothing
//! about speed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use system_tests::bench::{
    Cpu, Report, STEP_DEADLINE, cpu_during, flag_numbers, machine_busy_during, p50_p99, rss_mib,
    stats,
};
use system_tests::channel::{Channel, SimRoundTrip};
use system_tests::legacy::LegacyClient;
use system_tests::{Agent, BrokerKind, Dom0, TestDir, bin};

const SMALL: usize = 300;

fn main() {
    system_tests::bench::run_all("Uploads in chunks (`tests/benches/upload.rs`)", run);
}

/// `domu-agent call create_file` of `file` to sys-usb's `usb1` as `name`, in chunks of `chunk`
/// bytes; its duration.
fn upload(socket: &Path, file: &Path, name: &str, chunk: usize) -> Duration {
    let t0 = Instant::now();
    let out = Command::new(bin("domu-agent"))
        .args(["call", "--json", "--timeout-ms", "20000", "--socket"])
        .arg(socket)
        .arg(format!("--chunk-bytes={chunk}"))
        .args(["create_file", "disk=usb1", "overwrite=true"])
        .arg(format!("filepath={name}"))
        .arg(format!("data=@{}", file.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "upload failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    t0.elapsed()
}

/// `n` small round trips (`liste_disques` to sys-usb) from the MVP application.
fn small_requests(app: &mut LegacyClient, n: usize) -> Vec<Duration> {
    let deadline = Instant::now() + STEP_DEADLINE * 3;
    (0..n)
        .map(|_| {
            assert!(
                Instant::now() < deadline,
                "small requests past their deadline"
            );
            let t0 = Instant::now();
            let r = app.command("liste_disques", "sys-usb", json!({}));
            assert_eq!(r["source"], "sys-usb", "{r}");
            t0.elapsed()
        })
        .collect()
}

fn run(kind: BrokerKind, report: &mut Report) {
    let dir = TestDir::new("bench-upload");
    let c = system_tests::bench::unlimited_config(&dir);
    let dom0 = Dom0::start_logging(&dir, kind, &["--config", &c], "info,rumqttd=error");
    let usb_ch = Channel::new(&dir.path, "sys-usb");
    let gui_ch = Channel::new(&dir.path, "vm-gui");
    dom0.proc.wait_log("link{vm=sys-usb}: attached to channel");
    dom0.proc.wait_log("link{vm=vm-gui}: attached to channel");
    let disks = dir.join("disks");
    std::fs::create_dir_all(disks.join("usb1")).unwrap();
    let d = disks.display().to_string();
    let usb = Agent::start_logging(&dir, &usb_ch, "sys-usb", &["--disks", &d], "info");
    // `--chunk N`: uploads in chunks of N bytes of file data (`call --chunk-bytes`, and vm-gui's
    // `upload_chunk_bytes` for its legacy endpoint; default topics::upload::CHUNK).
    let chunk = flag_numbers::<usize>("--chunk")
        .first()
        .copied()
        .unwrap_or(topics::upload::CHUNK);
    let gui_conf = dir.join("vm-gui.toml");
    std::fs::write(
        &gui_conf,
        format!("[limits]\nupload_chunk_bytes = {chunk}\n"),
    )
    .unwrap();
    let gui_conf = gui_conf.display().to_string();
    let gui = Agent::start_logging(&dir, &gui_ch, "vm-gui", &["--config", &gui_conf], "info");
    dom0.proc.wait_log("link{vm=sys-usb}: session up");
    dom0.proc.wait_log("link{vm=vm-gui}: session up");
    let one_mib = dir.join("1m.bin");
    let sixteen = dir.join("16m.bin");
    std::fs::write(&one_mib, vec![0x5au8; 1 << 20]).unwrap();
    std::fs::write(&sixteen, vec![0xa5u8; 16 << 20]).unwrap();

    eprintln!("small requests idle, then while 1 MiB files are uploaded");
    let mut app = LegacyClient::connect(&gui.legacy);
    let _ = small_requests(&mut app, 20);
    let idle = stats(small_requests(&mut app, SMALL));
    let uploading = Arc::new(AtomicBool::new(true));
    let uploaded = Arc::new(AtomicUsize::new(0));
    let loader = {
        let (uploading, uploaded) = (uploading.clone(), uploaded.clone());
        let (socket, file) = (gui.socket.clone(), one_mib.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while uploading.load(Ordering::Relaxed) {
                upload(&socket, &file, &format!("load/{}.bin", i % 8), chunk);
                uploaded.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    };
    // Uploads follow one another before the measure starts (the first one done).
    let start_by = Instant::now() + STEP_DEADLINE;
    while uploaded.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < start_by, "no upload done");
        std::thread::park_timeout(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    let (busy, machine_busy) = machine_busy_during(|| stats(small_requests(&mut app, SMALL)));
    let during = t0.elapsed();
    uploading.store(false, Ordering::Relaxed);
    loader.join().unwrap();
    let files = uploaded.load(Ordering::Relaxed);
    report.row(
        "small request (MVP `liste_disques`), vm-gui idle, p50 / p99",
        p50_p99(&idle),
    );
    report.row(
        "the same while vm-gui uploads 1 MiB files, p50 / p99 (**p99 ratio to idle**, target ≤ 2×)",
        format!(
            "{}: {:.2}× ({files} files, {:.1} MB/s meanwhile; the machine's CPUs {:.0} % busy)",
            p50_p99(&busy),
            busy.p99 / idle.p99,
            files as f64 * 1.048576 / during.as_secs_f64(),
            machine_busy * 100.0
        ),
    );

    // The ceiling: the chunk requests' bytes across the slower simulated channel, in chunk-sized
    // writes (a chunk of 16 KiB is about 21.8 KB of Base64 plus its envelope). With the CPU this
    // process spends on it (the relay, the writer and the reader), per MB of file data.
    let sim_dir = TestDir::new("bench-upload-sim");
    let mut sim = SimRoundTrip::new(&sim_dir.path);
    let request = chunk.div_ceil(3) * 4 + 400;
    let me = Cpu::Process(std::process::id() as i32);
    let mut ceiling = |file: usize| {
        let bytes = file.div_ceil(chunk) * request;
        let ((up, down), cpu) = cpu_during(&[me], || {
            (
                bytes as f64 / (sim.bulk(bytes, request, true) * 1e6),
                bytes as f64 / (sim.bulk(bytes, request, false) * 1e6),
            )
        });
        // Both directions were measured: the CPU of one, per MB of file data.
        (up.max(down), cpu[0] as f64 / 2e6 / (file as f64 / 1e6))
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (label, file, size, n) in [
        ("1 MiB", &one_mib, 1usize << 20, 16),
        ("16 MiB", &sixteen, 16 << 20, 2),
    ] {
        eprintln!("create_file of {n} × {label} through call");
        let watched = [
            Cpu::Process(dom0.proc.pid()),
            Cpu::Process(gui.proc.pid()),
            Cpu::Process(usb.proc.pid()),
            Cpu::Relay,
            Cpu::Children,
        ];
        let ((t, spent), machine_busy) = machine_busy_during(|| {
            cpu_during(&watched, || {
                (0..n)
                    .map(|i| upload(&gui.socket, file, &format!("t/{i}.bin"), chunk).as_secs_f64())
                    .sum::<f64>()
                    / n as f64
            })
        });
        // CPU per MB of file data, in ms: Dom0, both agents, both channels' relays, the `call`s
        // (Base64 of the file, a connection per chunk).
        let per_mb: Vec<f64> = spent
            .iter()
            .map(|ns| *ns as f64 / 1e6 / (n as f64 * size as f64 / 1e6))
            .collect();
        let total: f64 = per_mb.iter().sum();
        let (c, c_cpu) = ceiling(size);
        let mb = size as f64 / 1e6;
        // What the machine's CPUs allow at that cost, all of them busy all the time.
        let cpu_bound = cpus as f64 * 1e3 / total;
        let cpu = format!(
            "CPU per MB: Dom0 {:.1} ms, vm-gui agent {:.1}, sys-usb agent {:.1}, both relays {:.1}, \
             `call` {:.1}; total {total:.1} ms: {cpus} CPUs allow {cpu_bound:.1} MB/s ({:.2}× of it \
             reached; the machine's CPUs {:.0} % busy); the ceiling's own CPU {c_cpu:.1} ms per MB",
            per_mb[0],
            per_mb[1],
            per_mb[2],
            per_mb[3],
            per_mb[4],
            (mb / t) / cpu_bound,
            machine_busy * 100.0,
        );
        report.row(
            &format!(
                "`create_file` of {label} files through `call`, file data (**ratio to the ceiling**, target ≥ 0.8×)"
            ),
            format!(
                "{:.1} MB/s ({:.1} ms per file): {:.2}×; ceiling {:.1} MB/s; {cpu}",
                mb / t,
                t * 1e3,
                c / t,
                mb / c
            ),
        );
    }
    report.row(
        "RSS after the runs: vm-gui agent / sys-usb agent / Dom0",
        rss_mib(&[&gui.proc, &usb.proc, &dom0.proc]),
    );
}
