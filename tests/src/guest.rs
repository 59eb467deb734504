//! Off-the-shelf MQTT clients in the guest: Debian's mosquitto_pub/sub and rumqttc, pointed at the
//! channel tty through a UNIX socket bridge (the notes' promise: any MQTT client in a DomU can use
//! the channel; in a real guest, `socat UNIX-LISTEN:...,fork FILE:/dev/hvc2,rawer` plays the bridge).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios;

use rumqttc::{Client, Event, MqttOptions, Packet, QoS, Transport};

use crate::channel::Channel;
use crate::{DEADLINE, Proc, TestDir};

/// A UNIX socket in the "guest" that relays to the channel tty, one client at a time, like
/// `socat UNIX-LISTEN:...,fork FILE:/dev/pts/N,rawer` but without socat's flaw for sequential
/// clients: a forked socat child whose client has left keeps reading the tty until its next write
/// fails, stealing the first bytes meant for the next client. This bridge stops reading the tty the
/// moment its client goes away.
#[derive(Debug)]
pub struct Bridge {
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Bridge {
    pub fn new(dir: &TestDir, ch: &Channel) -> Bridge {
        let socket = dir.join(&format!("{}-guest.sock", ch.vm));
        let listener = UnixListener::bind(&socket).expect("bind guest bridge");
        let tty = ch.tty.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(conn) = conn {
                    relay(conn, &tty);
                }
            }
        });
        Bridge { socket, stop }
    }
    /// `mosquitto_sub --unix` in the guest, with `-d` so a test can wait for its SUBACK.
    pub fn subscribe(&self, dir: &TestDir, id: &str, topics: &[&str], extra: &[&str]) -> Proc {
        // Line-buffered so the test sees each line as it is printed.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "mosquitto_sub"])
            .arg("--unix")
            .arg(&self.socket)
            .args(["-d", "-v", "-q", "1", "-k", "5", "-i", id]);
        for t in topics {
            cmd.args(["-t", t]);
        }
        cmd.args(extra);
        Proc::spawn("guest-mosquitto_sub", dir, &mut cmd)
    }

    /// `mosquitto_pub --unix` in the guest; returns its exit status and output.
    pub fn publish(&self, id: &str, topic: &str, payload: &str) -> (bool, String) {
        let out = Command::new("mosquitto_pub")
            .arg("--unix")
            .arg(&self.socket)
            .args([
                "-d", "-q", "1", "-k", "5", "-i", id, "-t", topic, "-m", payload,
            ])
            .output()
            .expect("mosquitto_pub");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// A rumqttc client in the guest. It reconnects by itself and re-subscribes on every CONNACK.
    pub fn rumqttc(&self, id: &str, topics: &[&str]) -> RumqttGuest {
        let mut o = MqttOptions::new(id, self.socket.display().to_string(), 0);
        o.set_transport(Transport::Unix);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = Client::new(o, 64);
        let (tx, rx) = mpsc::channel();
        let (conn_tx, conn_rx) = mpsc::channel();
        let sub_client = client.clone();
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        std::thread::spawn(move || {
            for ev in connection.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for t in &topics {
                            let _ = sub_client.try_subscribe(t.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(s))) => {
                        if conn_tx.send(s.return_codes.len()).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::park_timeout(Duration::from_millis(200)),
                }
            }
        });
        RumqttGuest {
            client,
            messages: rx,
            subacks: conn_rx,
        }
    }
}

/// A rumqttc client in the guest.
#[allow(missing_debug_implementations)] // rumqttc's Client is not Debug.
pub struct RumqttGuest {
    pub client: Client,
    pub messages: mpsc::Receiver<(String, Vec<u8>)>,
    /// One item per SUBACK received (after each (re)connection).
    pub subacks: mpsc::Receiver<usize>,
}

impl RumqttGuest {
    pub fn wait_subscribed(&self) {
        self.subacks
            .recv_timeout(DEADLINE)
            .expect("guest rumqttc never got a SUBACK");
    }

    /// The next message on `topic`.
    pub fn recv_on(&self, topic: &str, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            match self.messages.recv_timeout(left) {
                Ok((t, p)) if t == topic => return Some(p),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    pub fn publish(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .expect("publish");
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket);
    }
}

/// Relays one client to the tty (opened raw, as socat's `rawer` does) until the client leaves.
fn relay(mut conn: UnixStream, tty: &std::path::Path) {
    let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY)
        .open(tty)
    else {
        return;
    };
    if let Ok(mut t) = termios::tcgetattr(f.as_fd()) {
        termios::cfmakeraw(&mut t);
        let _ = termios::tcsetattr(f.as_fd(), termios::SetArg::TCSANOW, &t);
    }
    let active = Arc::new(AtomicBool::new(true));
    let (mut f_w, mut conn_r) = (
        f.try_clone().expect("dup tty"),
        conn.try_clone().expect("dup conn"),
    );
    let active_w = active.clone();
    let writer = std::thread::spawn(move || {
        let mut buf = [0u8; 16384];
        loop {
            match conn_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if f_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        active_w.store(false, Ordering::SeqCst);
    });
    let mut buf = [0u8; 16384];
    let mut f_r = &f;
    while active.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::from(20u16)), Ok(n) if n > 0) {
            continue;
        }
        if !active.load(Ordering::SeqCst) {
            break;
        }
        match f_r.read(&mut buf) {
            Ok(n) if n > 0 => {
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
}

impl Drop for RumqttGuest {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}
