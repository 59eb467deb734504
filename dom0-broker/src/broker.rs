//! The broker: the embedded rumqttd, or an external one reached by TCP or a UNIX socket.
//!
//! Every connection we open sets TCP_NODELAY, and so does the embedded rumqttd on its side (a
//! vendored patch: upstream rumqttd sets none, and a small write of its waited 40 ms for a client's
//! delayed ACK). For external brokers configured without it, we re-arm TCP_QUICKACK after every
//! read so that our ACK is never delayed (see docs/performance.md for the measurement).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream, tcp, unix};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::BrokerAddr;
use crate::front_door;
use crate::session::Limits;
use crate::throttle::Reports;

/// Why the broker cannot be used (exit code: [`BrokerError::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("embedded broker did not start listening on {0}")]
    NotListening(SocketAddr),
    #[error("broker {addr} unreachable: {source}")]
    Unreachable { addr: String, source: io::Error },
    #[error("cannot start the embedded broker: {0}")]
    Thread(io::Error),
    #[error("no free loopback port for the broker: {0}")]
    NoLoopbackPort(io::Error),
    #[error("operator socket {}: {source}", path.display())]
    OperatorSocket { path: PathBuf, source: io::Error },
    #[error("the embedded broker's start was interrupted: {0}")]
    Interrupted(String),
}

impl BrokerError {
    /// The service's exit code for this failure (sysexits: 69 unavailable, 70 software).
    pub fn exit_code(&self) -> u8 {
        match self {
            BrokerError::Interrupted(_) => 70,
            _ => 69,
        }
    }
}

/// The embedded broker, started: where Dom0's own clients connect (`addr`), where the links are
/// handed over (`links`), and what it reports of the messages it dropped (see
/// [`watch_overflows`]).
pub struct Embedded {
    pub addr: BrokerAddr,
    pub links: rumqttd::LocalServer,
    pub alerts: rumqttd::alerts::AlertsLink,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// The embedded broker: Dom0 clients reach rumqttd through the front door on `listen` (and the
/// operator socket), which hands each to rumqttd's server of its MQTT version (`front_door.rs`);
/// rumqttd itself listens on private loopback ports (Dom0's own clients — the controller, the
/// forwarder — and links with `embedded_links = "tcp"`: the address returned); in-process links
/// are served through the returned `LocalServer`. The front door's tasks run on `tasks` until
/// `stop`.
pub async fn start_embedded_service(
    listen: SocketAddr,
    operator_socket: Option<PathBuf>,
    limits: &Limits,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<Embedded, BrokerError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| BrokerError::Bind {
            addr: listen,
            source,
        })?;
    let (internal, internal_v5) = (free_loopback_port()?, free_loopback_port()?);
    let limits = limits.clone();
    let (backends, links, alerts) =
        tokio::task::spawn_blocking(move || start_embedded(internal, internal_v5, &limits))
            .await
            .map_err(|e| BrokerError::Interrupted(e.to_string()))??;
    tracing::info!(listen = %listen, internal = %internal, internal_v5 = %internal_v5, "embedded broker listening");
    let door = front_door::run(
        listener,
        None,
        backends.clone(),
        tasks.clone(),
        stop.clone(),
    );
    tasks.spawn(door);
    if let Some(path) = operator_socket {
        let l =
            front_door::bind_unix(&path)
                .await
                .map_err(|source| BrokerError::OperatorSocket {
                    path: path.clone(),
                    source,
                })?;
        tracing::info!(path = %path.display(), "operator socket listening");
        tasks.spawn(front_door::run(
            l,
            Some(path),
            backends,
            tasks.clone(),
            stop.clone(),
        ));
    }
    Ok(Embedded {
        addr: BrokerAddr::Tcp(internal.to_string()),
        links,
        alerts,
    })
}

/// How often the embedded broker reports what it dropped.
const ALERTS_EVERY_S: u64 = 1;

/// rumqttd's metrics settings: alerts pushed every [`ALERTS_EVERY_S`], no meters
/// (`MetricSettings` has no constructor, only its serde form).
fn alerts_pushed() -> HashMap<rumqttd::MetricType, rumqttd::MetricSettings> {
    serde_json::from_value(serde_json::json!({ "alerts": { "push_interval": ALERTS_EVERY_S } }))
        .unwrap_or_default()
}

/// Reads the embedded broker's alerts until `stop`: each time it skipped messages a client had
/// not read yet (a filter's log holds 2 MiB: a subscriber slower than its publishers, or a VM's
/// persistent session away longer than that, loses the oldest), `lost(client_id, count)` with
/// the counts of one push summed per client and filter. A link's client id is its VM's name.
/// Logged at most [`OVERFLOW_REPORTS_PER_S`] lines a second (a guest can cause them), the rest
/// counted in the next line.
pub async fn watch_overflows(
    alerts: rumqttd::alerts::AlertsLink,
    lost: impl Fn(&str, u64),
    stop: CancellationToken,
) {
    let mut reports = Reports::new(
        OVERFLOW_REPORTS_PER_S,
        "reports of dropped messages",
        Instant::now(),
    );
    loop {
        let batch = tokio::select! {
            _ = stop.cancelled() => return,
            batch = alerts.next() => batch,
        };
        let Ok(batch) = batch else { return };
        let mut sums: BTreeMap<(String, String), u64> = BTreeMap::new();
        for alert in batch {
            if let rumqttd::AlertKind::CursorJump { filter, lost: n } = alert.kind
                && n > 0
            {
                *sums.entry((alert.client_id, filter)).or_default() += n as u64;
            }
        }
        for ((client, filter), n) in sums {
            lost(&client, n);
            if let Some(unreported) = reports.may_report(Instant::now()) {
                tracing::warn!(
                    client = %client.chars().take(64).collect::<String>(),
                    filter = %filter.chars().take(128).collect::<String>(),
                    lost = n,
                    "the broker dropped messages for a client: it took them more slowly than they came, or its link was away{unreported}"
                );
            }
        }
    }
}

/// Lines a second at most about messages the embedded broker dropped.
const OVERFLOW_REPORTS_PER_S: f64 = 5.0;

/// A free port on loopback, for one of the embedded broker's private listeners.
fn free_loopback_port() -> Result<SocketAddr, BrokerError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(BrokerError::NoLoopbackPort)
}

/// Starts rumqttd on `listen` (MQTT 3.1.1) and `listen_v5` (MQTT 5) in its own threads and waits
/// until it accepts. Returns where the front door hands Dom0 clients over.
pub fn start_embedded(
    listen: SocketAddr,
    listen_v5: SocketAddr,
    limits: &Limits,
) -> Result<
    (
        front_door::Backends,
        rumqttd::LocalServer,
        rumqttd::alerts::AlertsLink,
    ),
    BrokerError,
> {
    // rumqttd logs a bind failure from its own thread and carries on; find out first.
    for addr in [listen, listen_v5] {
        drop(
            std::net::TcpListener::bind(addr)
                .map_err(|source| BrokerError::Bind { addr, source })?,
        );
    }
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 5000,
        max_payload_size: limits.max_packet,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v4".to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    let server_v5 = rumqttd::ServerSettings {
        name: "v5".to_owned(),
        listen: listen_v5,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            // Published bytes stay in per-filter logs. A consumer that falls further behind than
            // the log skips ahead (messages lost), so the log must hold a burst: it keeps at least
            // (count - 1) segments, at most count × (segment + one packet) of packet bytes per
            // filter (rumqttd's `CommitLog::apply_retention`). See docs/performance.md.
            max_segment_size: 1024 * 1024,
            max_segment_count: 2,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        v5: Some(HashMap::from([("v5".to_owned(), server_v5)])),
        // The alerts say what the router dropped for whom (vendored patch: with the count).
        metrics: Some(alerts_pushed()),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    let front_door = crate::front_door::Backends {
        v4: broker.handoff("v4"),
        v5: broker.handoff("v5"),
    };
    let links = broker
        .local_v4("v4")
        .ok_or_else(|| BrokerError::Interrupted("no MQTT 3.1.1 server configured".into()))?;
    let alerts = broker
        .alerts()
        .map_err(|e| BrokerError::Interrupted(e.to_string()))?;
    std::thread::Builder::new()
        .name("rumqttd".to_owned())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if is_listening(listen.port()) && is_listening(listen_v5.port()) {
            return Ok((front_door, links, alerts));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(BrokerError::NotListening(listen))
}

/// True when a TCP socket listens on `port` (read from /proc/net/tcp{,6}; connecting to find out
/// would make rumqttd log an error for the aborted client).
fn is_listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .any(|f| std::fs::read_to_string(f).is_ok_and(|table| listening_in(&table, port)))
}

/// Parses a /proc/net/tcp table: `sl local_address rem_address st ...`, LISTEN is state 0A.
fn listening_in(table: &str, port: u16) -> bool {
    let wanted = format!("{port:04X}");
    table.lines().skip(1).any(|line| {
        let mut cols = line.split_whitespace().skip(1);
        let local = cols.next().unwrap_or_default();
        let state = cols.nth(1).unwrap_or_default();
        state == "0A" && local.rsplit(':').next() == Some(wanted.as_str())
    })
}

/// Checks that an external broker accepts connections.
pub async fn check_reachable(addr: &BrokerAddr) -> Result<(), BrokerError> {
    connect(addr, false)
        .await
        .map(drop)
        .map_err(|source| BrokerError::Unreachable {
            addr: addr.to_string(),
            source,
        })
}

/// Read half of a broker connection.
#[derive(Debug)]
pub enum BrokerRead {
    /// `quickack`: re-arm TCP_QUICKACK after every read (see [`connect`]).
    Tcp {
        half: tcp::OwnedReadHalf,
        quickack: bool,
    },
    Unix(unix::OwnedReadHalf),
    /// In process (see [`LinkRoute::InProcess`]).
    Pipe(ReadHalf<DuplexStream>),
}

/// Write half of a broker connection.
#[derive(Debug)]
pub enum BrokerWrite {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
    Pipe(WriteHalf<DuplexStream>),
}

/// How a link reaches the broker.
#[derive(Clone)]
pub enum LinkRoute {
    /// The embedded rumqttd in process: each link's connection is an in-memory pipe whose other
    /// end rumqttd's MQTT 3.1.1 connection code serves on this runtime, as a task of `tasks`
    /// (`rumqttd::LocalServer`, vendored patch 0011): no socket, no system call and no thread
    /// between the link and rumqttd's router (docs/performance.md).
    InProcess {
        server: rumqttd::LocalServer,
        tasks: TaskTracker,
    },
    /// A broker at an address: an external one, or the embedded one over loopback TCP
    /// (`embedded_links = "tcp"`). `quickack`: see [`connect`].
    Connect { addr: BrokerAddr, quickack: bool },
}

impl std::fmt::Display for LinkRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkRoute::InProcess { .. } => f.write_str("the embedded broker (in process)"),
            LinkRoute::Connect { addr, .. } => addr.fmt(f),
        }
    }
}

impl std::fmt::Debug for LinkRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Bytes an in-process link's pipe holds each way before a writer waits.
const PIPE_BYTES: usize = 256 * 1024;

impl LinkRoute {
    /// Opens a link's connection to the broker; in process, with the task serving the broker's
    /// side (it ends after the link closes its end).
    pub async fn open(
        &self,
    ) -> io::Result<(BrokerRead, BrokerWrite, Option<tokio::task::JoinHandle<()>>)> {
        match self {
            LinkRoute::Connect { addr, quickack } => {
                let (r, w) = connect(addr, *quickack).await?;
                Ok((r, w, None))
            }
            LinkRoute::InProcess { server, tasks } => {
                let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
                // It ends when the link drops its end (end of stream) or rumqttd drops the
                // connection.
                let served = tasks.spawn(server.serve(theirs));
                let (r, w) = tokio::io::split(ours);
                Ok((BrokerRead::Pipe(r), BrokerWrite::Pipe(w), Some(served)))
            }
        }
    }
}

/// Opens a connection to the broker (TCP_NODELAY on TCP). `quickack`: re-arm TCP_QUICKACK after
/// every read, for a broker that may not set TCP_NODELAY (an external one); the embedded rumqttd
/// does (vendored patch), so its links save that system call per read.
pub async fn connect(addr: &BrokerAddr, quickack: bool) -> io::Result<(BrokerRead, BrokerWrite)> {
    match addr {
        BrokerAddr::Tcp(a) => {
            let s = TcpStream::connect(a).await?;
            s.set_nodelay(true)?;
            let (half, w) = s.into_split();
            Ok((BrokerRead::Tcp { half, quickack }, BrokerWrite::Tcp(w)))
        }
        BrokerAddr::Unix(p) => {
            let s = UnixStream::connect(p).await?;
            let (r, w) = s.into_split();
            Ok((BrokerRead::Unix(r), BrokerWrite::Unix(w)))
        }
    }
}

/// Re-arms TCP_QUICKACK (Linux clears it after a while): our ACKs go out at once, so the broker's
/// Nagle never holds a small write for a delayed ACK.
pub fn quickack(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_quickack(true);
}

/// Most bytes taken from the broker in one go before the link gets to write them to the guest.
const READ_BATCH: usize = 256 * 1024;

impl BrokerRead {
    /// Reads what the broker sent: waits for some bytes, then takes what else is already there
    /// (a broker with TCP_NODELAY sends one segment per message; batching here saves the guest
    /// one write per message under load).
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let mut n = match self {
            BrokerRead::Tcp { half, .. } => half.read_buf(buf).await?,
            BrokerRead::Unix(r) => r.read_buf(buf).await?,
            BrokerRead::Pipe(r) => r.read_buf(buf).await?,
        };
        while n > 0 && n < READ_BATCH {
            buf.reserve(16 * 1024);
            let more = match self {
                BrokerRead::Tcp { half, .. } => half.try_read_buf(buf),
                BrokerRead::Unix(r) => r.try_read_buf(buf),
                // What the pipe holds now, without waiting.
                BrokerRead::Pipe(r) => {
                    futures_util::FutureExt::now_or_never(r.read_buf(buf)).unwrap_or(Ok(0))
                }
            };
            match more {
                Ok(m) if m > 0 => n += m,
                _ => break,
            }
        }
        if let BrokerRead::Tcp {
            half,
            quickack: true,
        } = self
        {
            quickack(half.as_ref());
        }
        Ok(n)
    }
}

impl BrokerWrite {
    pub async fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BrokerWrite::Tcp(w) => w.write(buf).await,
            BrokerWrite::Unix(w) => w.write(buf).await,
            BrokerWrite::Pipe(w) => w.write(buf).await,
        }
    }

    pub async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            BrokerWrite::Tcp(w) => w.write_all(buf).await,
            BrokerWrite::Unix(w) => w.write_all(buf).await,
            BrokerWrite::Pipe(w) => w.write_all(buf).await,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_embedded_broker_pushes_its_alerts() {
        let m = super::alerts_pushed();
        assert_eq!(m.len(), 1);
        assert!(m.contains_key(&rumqttd::MetricType::Alerts));
    }

    #[test]
    fn proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n   \
            0: 0100007F:075B 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n   \
            1: 0100007F:075C 0100007F:9C40 01 00000000:00000000 00:00000000 00000000\n";
        assert!(super::listening_in(table, 1883));
        assert!(
            !super::listening_in(table, 1884),
            "established, not listening"
        );
        assert!(!super::listening_in(table, 80));
    }
}
