//! Deployment: the static executables run where there is no libc at all (a busybox-only root, as
//! in a guest's initramfs or a minimal Alpine).

use std::path::{Path, PathBuf};
use std::process::Command;

use system_tests::channel::Channel;
use system_tests::{BrokerKind, DEADLINE, Dom0, Proc, TestDir, wait_for};

/// `target/static/NAME`, built by `scripts/build-static` (`.ci/run` builds them, then runs these
/// tests: `cargo test -p system-tests --test system -- --ignored deploy`).
fn static_bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/static")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run ./scripts/build-static (.ci/run does)",
        p.display()
    );
    p
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A root with busybox and nothing else: no libc, no loader.
fn busybox_root(dir: &TestDir) -> PathBuf {
    let root = dir.join("root");
    for d in ["bin", "dev/pts", "disks/usb0", "run", "tmp", "proc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox (apt-get install busybox-static)");
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    for b in ["dom0-broker", "domu-agent"] {
        std::fs::copy(static_bin(b), root.join("bin").join(b)).unwrap();
    }
    std::fs::write(root.join("disks/usb0/in-chroot.txt"), b"static\n").unwrap();
    root
}

#[test]
#[ignore = "needs the static build: .ci/run builds it and runs these"]
fn static_binaries_are_static() {
    for b in ["dom0-broker", "domu-agent"] {
        let out = Command::new("file").arg(static_bin(b)).output().unwrap();
        let what = String::from_utf8_lossy(&out.stdout);
        assert!(
            what.contains("statically linked") || what.contains("static-pie linked"),
            "{what}"
        );
    }
}

/// Both binaries answer `--version` in a busybox-only root, and the static agent there answers a
/// request from Dom0 through a (simulated) channel.
#[test]
#[ignore = "needs the static build: .ci/run builds it and runs these"]
fn static_binaries_run_in_a_busybox_root() {
    if !is_root() {
        eprintln!(
            "static_binaries_run_in_a_busybox_root: needs root (chroot, mount namespace); not run"
        );
        return;
    }
    let dir = TestDir::new("busybox");
    let root = busybox_root(&dir);
    assert!(!root.join("lib").exists() && !root.join("lib64").exists());
    for b in ["dom0-broker", "domu-agent"] {
        let out = Command::new("chroot")
            .arg(&root)
            .arg(format!("/bin/{b}"))
            .arg("--version")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{b} --version in the busybox root: {out:?}"
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(b));
    }
    // Dom0 on the host; the static agent in the busybox root, its channel tty bind-mounted there.
    let dom0 = Dom0::start(&dir, BrokerKind::Embedded, &[]);
    let ch = Channel::new(&dir.path, "sys-usb");
    dom0.proc.wait_log("link{vm=sys-usb}: attached to channel");
    let script = format!(
        "mount --bind /dev/pts {root}/dev/pts && exec chroot {root} /bin/domu-agent run --vm sys-usb \
         --device {tty} --disks /disks --mqtt-socket /run/mqtt.sock --legacy-socket none",
        root = root.display(),
        tty = ch.tty.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("RUST_LOG", "info");
    let agent = Proc::spawn("static-agent", &dir, &mut cmd);
    agent.wait_log("session up");
    let sub = dom0.subscribe(&dir, &["system/disks/list_files/response/dom0"]);
    dom0.publish(
        "system/disks/list_files/request",
        r#"{"sender":"dom0","disk":"usb0"}"#,
    );
    sub.wait_log("in-chroot.txt");
    wait_for("the answer", DEADLINE, || {
        sub.output().contains("\"status\":\"ok\"")
    });
}
