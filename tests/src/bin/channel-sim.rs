//! `channel-sim DIR VM...`: simulated Xen channels for the demo (and for trying the agent without
//! Xen). For each VM: a pty whose slave plays the guest's `/dev/hvcN` (linked as `DIR/VM.tty`) and
//! a UNIX socket `DIR/VM-msg.sock` served like QEMU's channel backend: one client at a time, and
//! what the guest writes while no client is connected is dropped. Runs until SIGTERM/SIGINT.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use system_tests::channel;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: channel-sim DIR VM...");
        std::process::exit(64);
    };
    let vms: Vec<String> = args.collect();
    if vms.is_empty() || !dir.is_dir() {
        eprintln!("usage: channel-sim DIR VM...   (DIR must exist)");
        std::process::exit(64);
    }
    let mut channels = Vec::new();
    for vm in &vms {
        let ch = channel::Channel::new(&dir, vm);
        let link = dir.join(format!("{vm}.tty"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&ch.tty, &link).expect("tty link");
        println!(
            "{vm}: guest tty {} (linked as {}), Dom0 socket {}",
            ch.tty.display(),
            link.display(),
            ch.socket.display()
        );
        channels.push((ch, link));
    }
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.thread_block().expect("block signals");
    let _ = signals.wait();
    for (_, link) in &channels {
        let _ = std::fs::remove_file(link);
    }
}
