//! What every local endpoint (MQTT, legacy, `call`) shares: the admission of its connections and
//! an accept loop that survives running out of file descriptors.
//!
//! Admission: a connection is *pending* until its first packet (a CONNECT, a line); at most
//! `max_pending` are, and the oldest is closed to make room for a new one (so idle connections
//! cannot keep a live client out), each for at most the first-packet deadline. Then it is a
//! *client*, counted against `max_clients` (one more is refused with the endpoint's own answer).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long a new connection may take to send its first packet or line.
pub const FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(10);

/// The admission of one endpoint's connections.
#[derive(Debug)]
pub struct Gate {
    name: &'static str,
    max_pending: usize,
    max_clients: usize,
    /// Connections waiting for their first packet, oldest first, each with its eviction signal.
    pending: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
    clients: AtomicUsize,
    next: AtomicU64,
    /// Pending connections closed to make room (the figure of the hostile tests).
    evicted: AtomicU64,
}

/// A connection waiting for its first packet. Dropping it frees its place.
#[derive(Debug)]
pub struct Pending {
    gate: Arc<Gate>,
    id: u64,
    /// Fires when the gate closes this connection to make room for a newer one.
    pub evicted: oneshot::Receiver<()>,
}

/// An admitted client. Dropping it frees its place.
#[derive(Debug)]
pub struct Admitted {
    gate: Arc<Gate>,
}

impl Gate {
    pub fn new(name: &'static str, max_pending: usize, max_clients: usize) -> Arc<Gate> {
        Arc::new(Gate {
            name,
            max_pending: max_pending.max(1),
            max_clients: max_clients.max(1),
            pending: Mutex::new(VecDeque::new()),
            clients: AtomicUsize::new(0),
            next: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        })
    }

    fn pending_list(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, oneshot::Sender<()>)>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection: pending, the oldest pending one closed if there is no room.
    pub fn arrive(self: &Arc<Self>) -> Pending {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut pending = self.pending_list();
        while pending.len() >= self.max_pending {
            if let Some((_, oldest)) = pending.pop_front() {
                let _ = oldest.send(());
                if self.evicted.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        endpoint = self.name,
                        "connections that send nothing fill the endpoint: the oldest are closed"
                    );
                }
            }
        }
        pending.push_back((id, tx));
        Pending {
            gate: self.clone(),
            id,
            evicted: rx,
        }
    }

    /// Clients admitted now.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Pending connections closed to make room so far.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

impl Pending {
    /// The first packet arrived: a client, if there is room for one (None: refuse it).
    pub fn admit(self) -> Option<Admitted> {
        let gate = self.gate.clone();
        drop(self);
        let n = gate.clients.fetch_add(1, Ordering::Relaxed);
        if n >= gate.max_clients {
            gate.clients.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Admitted { gate })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.gate.pending_list().retain(|(id, _)| *id != self.id);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.gate.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A log line that something outside the agent (an application, Dom0) can cause: said at most
/// once a second, with how many were not said since. Usable as a `static`.
#[derive(Debug)]
pub struct Quiet {
    /// When it was last said, and how many times it was not since.
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl Quiet {
    pub const fn new() -> Quiet {
        Quiet {
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(unsaid)` when the line may be said now.
    pub fn may_say(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0.is_none_or(|t| now >= t + Duration::from_secs(1)) {
            st.0 = Some(now);
            Some(std::mem::take(&mut st.1))
        } else {
            st.1 += 1;
            None
        }
    }
}

impl Default for Quiet {
    fn default() -> Quiet {
        Quiet::new()
    }
}

/// Waits before accepting again after a failed accept (EMFILE: out of file descriptors), saying
/// so once a second at most.
#[derive(Debug)]
struct AcceptBackoff {
    name: &'static str,
    said: Quiet,
}

impl AcceptBackoff {
    fn new(name: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            name,
            said: Quiet::new(),
        }
    }

    async fn failed(&mut self, e: &std::io::Error) {
        if let Some(unsaid) = self.said.may_say() {
            tracing::warn!(endpoint = self.name, error = %e, unsaid, "accept failed; backing off");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What an endpoint accepts connections on.
pub trait Listener: Send + 'static {
    type Conn: Send + 'static;
    fn accept_conn(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send;
}

impl Listener for UnixListener {
    type Conn = UnixStream;
    async fn accept_conn(&self) -> std::io::Result<UnixStream> {
        self.accept().await.map(|(conn, _)| conn)
    }
}

/// A TCP connection (Nagle off: local clients send small packets) and its peer.
impl Listener for TcpListener {
    type Conn = (TcpStream, SocketAddr);
    async fn accept_conn(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        let (conn, peer) = self.accept().await?;
        let _ = conn.set_nodelay(true);
        Ok((conn, peer))
    }
}

/// The one accept loop of the local endpoints: accepts until `stop`, gives each connection its
/// place at the `gate` and a task of its own (`serve`), reaps the tasks that ended, backs off
/// when accepting fails (no file descriptors left). On `stop` it removes the `socket` file, if
/// any, and ends every connection (they have seen `stop` too; those that have not finished within
/// the agent's shutdown are aborted).
pub async fn accept_loop<L, F, Fut>(
    name: &'static str,
    listener: L,
    socket: Option<PathBuf>,
    gate: Arc<Gate>,
    stop: CancellationToken,
    mut serve: F,
) where
    L: Listener,
    F: FnMut(L::Conn, Pending) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    let mut backoff = AcceptBackoff::new(name);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept_conn() => match a {
                Ok(conn) => {
                    let pending = gate.arrive();
                    tasks.spawn(serve(conn, pending));
                }
                Err(e) => backoff.failed(&e).await,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    if let Some(path) = socket {
        let _ = std::fs::remove_file(path);
    }
    tasks.shutdown().await;
}

/// Binds a UNIX socket: a stale one is replaced, a live one (another agent) refused; the parent
/// directory is created if missing; `mode` and `group` applied to the socket.
pub async fn bind_unix(
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> std::io::Result<UnixListener> {
    let with_path =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(with_path)?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another agent", path.display()),
            ));
        }
        std::fs::remove_file(path).map_err(with_path)?;
    }
    let l = UnixListener::bind(path).map_err(with_path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(with_path)?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| with_path(std::io::Error::from(e)))?;
    }
    Ok(l)
}

/// Raises the soft limit of open files to the hard limit (a default OpenRC service starts with
/// 1024): every endpoint is bounded, but the agent should not be the first to run short.
pub fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(error = %e, "open-file limit stays at {soft}");
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_pending_connection_makes_room() {
        let gate = Gate::new("test", 2, 10);
        let mut a = gate.arrive();
        let mut b = gate.arrive();
        let c = gate.arrive();
        assert!(a.evicted.try_recv().is_ok(), "the oldest is closed");
        assert!(b.evicted.try_recv().is_err());
        assert_eq!(gate.evicted(), 1);
        drop(a);
        let admitted = c.admit().unwrap();
        assert_eq!(gate.clients(), 1);
        let d = gate.arrive();
        assert!(
            b.evicted.try_recv().is_err(),
            "room was made by the admission"
        );
        drop((admitted, d, b));
        assert_eq!(gate.clients(), 0);
    }

    #[test]
    fn a_quiet_line_is_said_once_a_second_with_the_count() {
        let q = Quiet::new();
        assert_eq!(q.may_say(), Some(0));
        assert_eq!(q.may_say(), None);
        assert_eq!(q.may_say(), None);
        q.state.lock().unwrap().0 = Some(std::time::Instant::now() - Duration::from_secs(2));
        assert_eq!(q.may_say(), Some(2));
    }

    #[test]
    fn clients_beyond_the_maximum_are_refused() {
        let gate = Gate::new("test", 10, 2);
        let first = gate.arrive().admit().unwrap();
        let _second = gate.arrive().admit().unwrap();
        assert!(gate.arrive().admit().is_none());
        drop(first);
        assert!(gate.arrive().admit().is_some());
    }
}
