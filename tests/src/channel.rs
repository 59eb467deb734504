//! A simulator of the Xen channel backend (QEMU's chardev socket server), as measured on real Xen:
//! a pty whose slave plays the guest's `/dev/hvcN`, and a UNIX socket server `<vm>-msg.sock` that
//! serves one client at a time and relays to the pty master. Like the real backend, it drops what
//! the guest writes while no Dom0 client is connected, and a Dom0 disconnect is invisible to the guest.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::termios::{self, FlushArg, SetArg};

#[derive(Debug, Default)]
struct Shared {
    /// The Dom0 client being served, if any (write side).
    client: Mutex<Option<UnixStream>>,
    stop: AtomicBool,
    /// Serving generation: bumping it makes the accept loop stop.
    generation: AtomicU64,
    /// Connections accepted so far.
    accepted: AtomicU64,
    /// Bytes the guest wrote while no client was connected (dropped).
    dropped: AtomicU64,
}

/// One VM's simulated channel.
#[derive(Debug)]
pub struct Channel {
    pub vm: String,
    /// `<dir>/<vm>-msg.sock`, what Dom0 connects to.
    pub socket: PathBuf,
    /// `/dev/pts/N`, what the guest opens.
    pub tty: PathBuf,
    master: Arc<File>,
    /// Held open so the pty never hangs up (the real hvc device always exists).
    slave: File,
    shared: Arc<Shared>,
}

/// The name of the simulator's relay threads, whose CPU time the benchmarks read
/// ([`crate::procfs::own_threads_ns`]): the backend's share of a run.
pub const RELAY_THREAD: &str = "sim-relay";

fn relay_thread(f: impl FnOnce() + Send + 'static) {
    thread::Builder::new()
        .name(RELAY_THREAD.into())
        .spawn(f)
        .expect("spawn a relay thread");
}

impl Channel {
    /// Creates the pty and serves `<dir>/<vm>-msg.sock`.
    pub fn new(dir: &Path, vm: &str) -> Channel {
        let c = Channel::unserved(dir, vm);
        c.serve();
        c
    }

    /// Creates the pty only; call [`Channel::serve`] to create the socket.
    pub fn unserved(dir: &Path, vm: &str) -> Channel {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let master = File::from(pty.master);
        let slave = File::from(pty.slave);
        let tty = nix::unistd::ttyname(slave.as_fd()).expect("ttyname");
        let mut t = termios::tcgetattr(slave.as_fd()).expect("tcgetattr");
        termios::cfmakeraw(&mut t);
        termios::tcsetattr(slave.as_fd(), SetArg::TCSANOW, &t).expect("tcsetattr");
        let c = Channel {
            vm: vm.to_owned(),
            socket: dir.join(format!("{vm}-msg.sock")),
            tty,
            master: Arc::new(master),
            slave,
            shared: Arc::default(),
        };
        c.start_guest_reader();
        c
    }

    /// Guest → Dom0: read the pty master; forward to the client, or drop when there is none.
    fn start_guest_reader(&self) {
        let master = self.master.clone();
        let shared = self.shared.clone();
        relay_thread(move || {
            let mut buf = [0u8; 16384];
            loop {
                let n = match (&*master).read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                let mut client = shared.client.lock().unwrap();
                match client.as_mut() {
                    Some(c) => {
                        if c.write_all(&buf[..n]).is_err() {
                            *client = None;
                        }
                    }
                    None => {
                        shared.dropped.fetch_add(n as u64, Ordering::SeqCst);
                    }
                }
            }
        });
    }

    /// Binds the socket and serves one client at a time until [`Channel::shutdown`].
    pub fn serve(&self) {
        let _ = std::fs::remove_file(&self.socket);
        let listener = UnixListener::bind(&self.socket).expect("bind channel socket");
        let generation = self.shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let shared = self.shared.clone();
        let master = self.master.clone();
        relay_thread(move || {
            for conn in listener.incoming() {
                if shared.stop.load(Ordering::SeqCst)
                    || shared.generation.load(Ordering::SeqCst) != generation
                {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                *shared.client.lock().unwrap() = conn.try_clone().ok();
                // Dom0 → guest, until the client goes away.
                let mut buf = [0u8; 16384];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if (&*master).write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                *shared.client.lock().unwrap() = None;
            }
        });
    }

    /// The backend goes away (VM destroyed): the client is cut off and the socket file removed.
    pub fn shutdown(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        self.drop_client();
        // Unblock the accept loop so it sees the new generation.
        let _ = UnixStream::connect(&self.socket);
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Cuts the current Dom0 client off (backend restart); the guest notices nothing.
    pub fn drop_client(&self) {
        if let Some(c) = self.shared.client.lock().unwrap().take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Makes the socket file exist with nobody accepting: connections are refused.
    pub fn refuse(&self) {
        let _ = std::fs::remove_file(&self.socket);
        drop(UnixListener::bind(&self.socket).expect("bind"));
    }

    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    pub fn has_client(&self) -> bool {
        self.shared.client.lock().unwrap().is_some()
    }

    /// Discards what waits in the guest's tty input (stale bytes from before the guest started).
    pub fn flush_guest_input(&self) {
        termios::tcflush(self.slave.as_fd(), FlushArg::TCIFLUSH).expect("tcflush");
    }

    /// Waits for Dom0's attach signal (an MQTT DISCONNECT) on the guest side and reads it away.
    pub fn consume_attach_signal(&self) {
        self.guest()
            .read_until("Dom0's attach signal", super::DEADLINE, |b| {
                b.ends_with(&[0xE0, 0x00])
            });
    }

    /// Opens the guest side for raw reads and writes by the test itself.
    pub fn guest(&self) -> GuestTty {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK)
            .open(&self.tty)
            .expect("open guest tty");
        GuestTty {
            f,
            seen: Vec::new(),
        }
    }
}

/// Round trips through a simulated channel alone (guest tty → backend socket → guest tty, 40
/// bytes each way): the simulator's own share of any chain measured through it. Sorted samples.
pub fn round_trip_samples(dir: &Path, n: usize) -> Vec<Duration> {
    let mut sim = SimRoundTrip::new(dir);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let d = sim.once();
        if i >= n / 10 {
            samples.push(d);
        }
    }
    samples.sort();
    samples
}

/// A bare pty's bulk throughput in MB/s (raw mode, no relay thread, nothing else): `bytes` written
/// in `chunk`-byte writes by one thread into the slave (`up`, as a guest writes its hvc) or the
/// master, read from the other end by this one. The ceiling of any channel built on a pty (it
/// depends on the write size: large writes make writer and reader take turns on a full buffer).
pub fn pty_bulk(bytes: usize, chunk: usize, up: bool) -> f64 {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let mut t = termios::tcgetattr(pty.slave.as_fd()).expect("tcgetattr");
    termios::cfmakeraw(&mut t);
    termios::tcsetattr(pty.slave.as_fd(), SetArg::TCSANOW, &t).expect("tcsetattr");
    let (master, slave) = (File::from(pty.master), File::from(pty.slave));
    let (to, from) = if up { (slave, master) } else { (master, slave) };
    pump(
        Box::new(to),
        &mut crate::bench::TimedTty(from),
        bytes,
        chunk,
    )
}

/// MB/s of `bytes` written to `to` in `chunk`-byte writes by one thread and read from `from` by
/// this one. `to` stays open until everything was read (a pty's master must not see its slave
/// closed with bytes still in flight).
fn pump(mut to: Box<dyn Write + Send>, from: &mut dyn Read, bytes: usize, chunk: usize) -> f64 {
    let t0 = Instant::now();
    let writer = thread::spawn(move || {
        let chunk = vec![0x5au8; chunk];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            to.write_all(&chunk[..n]).expect("bulk write");
            left -= n;
        }
        to
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < bytes {
        let n = from.read(&mut buf).expect("bulk read");
        assert!(n > 0, "the channel closed");
        got += n;
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(writer.join().expect("writer"));
    bytes as f64 / secs / 1e6
}

/// The simulated channel's own round trip, one at a time (benchmarks interleave it with the
/// round trips they compare it with): 40 bytes from the guest's tty to the Dom0 side of the
/// socket and back. Its channel must be in a directory Dom0 does not watch.
#[derive(Debug)]
pub struct SimRoundTrip {
    dom0: UnixStream,
    guest: crate::bench::TimedTty,
    _ch: Channel,
}

impl SimRoundTrip {
    pub fn new(dir: &Path) -> SimRoundTrip {
        let ch = Channel::new(dir, "vm-simcost");
        let dom0 = UnixStream::connect(&ch.socket).expect("connect to the simulated backend");
        dom0.set_read_timeout(Some(crate::bench::STEP_DEADLINE))
            .expect("read timeout");
        super::wait_for("the backend's client", super::DEADLINE, || ch.has_client());
        let guest = crate::bench::TimedTty(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&ch.tty)
                .expect("open tty"),
        );
        SimRoundTrip {
            dom0,
            guest,
            _ch: ch,
        }
    }

    /// The channel's bulk throughput in MB/s, from the guest's tty to Dom0's side (`up`) or the
    /// other way: `bytes` written in `chunk`-byte writes by one thread, read by this one.
    pub fn bulk(&mut self, bytes: usize, chunk: usize, up: bool) -> f64 {
        let to: Box<dyn Write + Send> = if up {
            Box::new(self.guest.0.try_clone().expect("clone the tty"))
        } else {
            Box::new(self.dom0.try_clone().expect("clone the socket"))
        };
        let from: &mut dyn Read = if up { &mut self.dom0 } else { &mut self.guest };
        pump(to, from, bytes, chunk)
    }

    /// One round trip.
    pub fn once(&mut self) -> Duration {
        let msg = [0x30u8; 40];
        let mut buf = [0u8; 40];
        let t0 = Instant::now();
        self.guest.write_all(&msg).expect("guest write");
        self.dom0.read_exact(&mut buf).expect("backend read");
        self.dom0.write_all(&msg).expect("backend write");
        self.guest.read_exact(&mut buf).expect("guest read");
        t0.elapsed()
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shutdown();
        // Wake the guest reader.
        let _ = (&self.slave).write_all(b"\0");
    }
}

/// The guest's end of the channel, driven byte by byte by a test.
#[derive(Debug)]
pub struct GuestTty {
    f: File,
    /// Everything read so far.
    pub seen: Vec<u8>,
}

impl GuestTty {
    pub fn write(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !rest.is_empty() {
            match self.f.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    let mut fds = [nix::poll::PollFd::new(
                        self.f.as_fd(),
                        nix::poll::PollFlags::POLLOUT,
                    )];
                    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u16));
                }
                Err(e) => panic!("guest write: {e}"),
            }
        }
    }

    /// Reads what is available now into `seen`.
    pub fn poll(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.f.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => self.seen.extend_from_slice(&buf[..n]),
                Err(_) => return,
            }
        }
    }

    /// Reads and discards what is available now; returns how many bytes.
    pub fn drain(&mut self) -> usize {
        let mut buf = [0u8; 16384];
        let mut n = 0;
        while let Ok(k) = self.f.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    }

    /// Waits until the tty has bytes to read, at most `timeout`.
    pub fn wait_readable(&self, timeout: Duration) {
        let mut fds = [nix::poll::PollFd::new(
            self.f.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
    }

    /// Reads until `seen` satisfies `pred`, or panics after `timeout`.
    pub fn read_until(&mut self, what: &str, timeout: Duration, pred: impl Fn(&[u8]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll();
            if pred(&self.seen) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "guest never saw {what}; got {:x?}",
                self.seen
            );
            let fd = self.f.as_fd();
            let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u16));
        }
    }
}
