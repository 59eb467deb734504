//! The embedded broker's front door for Dom0-local clients (operators' mosquitto_pub/sub/rr, the
//! controller): the `--listen` TCP address and the operator UNIX socket.
//!
//! rumqttd serves MQTT 3.1.1 and MQTT 5 on separate listeners. The front door accepts, reads the
//! CONNECT until its protocol level, and hands the connection with those bytes to rumqttd's server
//! of that version (`rumqttd::Broker::handoff`, a vendored patch): from then on the client talks to
//! rumqttd directly, with no relay in between (a byte relay here cost 1.4–1.85× the broker's own
//! round trip; docs/performance.md). rumqttd's sockets set TCP_NODELAY (the same patch), so no
//! client waits 40 ms for Nagle. Dom0-local clients are trusted: no policy here.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Binds the operator socket, replacing a stale one but never a live one.
pub async fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    UnixListener::bind(path)
}

/// rumqttd's servers: MQTT 3.1.1 and 5 are served separately; the front door hands each client to
/// the one its CONNECT asks for, so Dom0 clients of either version use one address.
#[derive(Debug, Clone)]
pub struct Backends {
    pub v4: rumqttd::HandoffSender,
    pub v5: rumqttd::HandoffSender,
}

/// How long a new client may take to say which protocol it speaks.
const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The protocol level of the CONNECT at the start of `buf`: None while incomplete; 4 for anything
/// that is not a CONNECT (rumqttd's MQTT 3.1.1 listener then refuses it as it should).
fn protocol_level(buf: &[u8]) -> Option<u8> {
    let h = match crate::mqtt::fixed_header(buf, usize::MAX) {
        Ok(Some(h)) => h,
        Ok(None) => return None,
        Err(_) => return Some(4),
    };
    if h.kind() != crate::mqtt::CONNECT {
        return Some(4);
    }
    let body = buf.get(h.header_len..).unwrap_or_default();
    match body.get(..7) {
        None => None,
        Some([0, 4, b'M', b'Q', b'T', b'T', level]) => Some(*level),
        Some(_) => Some(4),
    }
}

/// Reads a new client's first bytes until its CONNECT says its protocol level (None: the client
/// left, said nothing in time, or `stop`).
async fn first_bytes<R: AsyncRead + Unpin>(
    client: &mut R,
    stop: &CancellationToken,
) -> Option<(u8, Vec<u8>)> {
    let mut first = Vec::with_capacity(64);
    loop {
        if let Some(l) = protocol_level(&first) {
            return Some((l, first));
        }
        let mut buf = [0u8; 512];
        let n = tokio::select! {
            r = tokio::time::timeout(CONNECT_WAIT, client.read(&mut buf)) => match r {
                Ok(Ok(n)) if n > 0 => n,
                _ => return None,
            },
            _ = stop.cancelled() => return None,
        };
        first.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
}

/// Hands one client to rumqttd's server of its protocol level.
async fn hand_over(handoff: rumqttd::Handoff, level: u8, backends: &Backends) {
    let to = if level == 5 {
        &backends.v5
    } else {
        &backends.v4
    };
    if to.send_async(handoff).await.is_err() {
        tracing::warn!("front door: the embedded broker is gone");
    }
}

/// A client the front door can hand over: its stream, and how it becomes a `Handoff`.
pub trait Client: AsyncRead + Unpin {
    fn into_handoff(self, first: Vec<u8>) -> std::io::Result<rumqttd::Handoff>;
}

impl Client for TcpStream {
    fn into_handoff(self, first: Vec<u8>) -> std::io::Result<rumqttd::Handoff> {
        Ok(rumqttd::Handoff::Tcp(self.into_std()?, first))
    }
}

impl Client for UnixStream {
    fn into_handoff(self, first: Vec<u8>) -> std::io::Result<rumqttd::Handoff> {
        Ok(rumqttd::Handoff::Unix(self.into_std()?, first))
    }
}

/// Reads a new client's CONNECT far enough, then hands it over.
async fn serve_client<C: Client>(mut client: C, backends: Backends, stop: CancellationToken) {
    let Some((level, first)) = first_bytes(&mut client, &stop).await else {
        return;
    };
    match client.into_handoff(first) {
        Ok(h) => hand_over(h, level, &backends).await,
        Err(e) => tracing::warn!(error = %e, "front door: cannot hand the connection over"),
    }
}

/// A listener of the front door: the TCP address or the operator socket.
pub trait Listener: Send + 'static {
    type Conn: Client + Send + 'static;
    fn accept_client(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send;
}

impl Listener for TcpListener {
    type Conn = TcpStream;
    async fn accept_client(&self) -> std::io::Result<TcpStream> {
        let (client, _) = self.accept().await?;
        let _ = client.set_nodelay(true);
        Ok(client)
    }
}

impl Listener for UnixListener {
    type Conn = UnixStream;
    async fn accept_client(&self) -> std::io::Result<UnixStream> {
        self.accept().await.map(|(client, _)| client)
    }
}

/// Serves Dom0 clients on `listener` until `stop`, each new client in a task of `tasks` (it lives
/// until handed over, at most [`CONNECT_WAIT`]); then removes the `socket` file, if any.
pub async fn run<L: Listener>(
    listener: L,
    socket: Option<PathBuf>,
    backends: Backends,
    tasks: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept_client() => match accepted {
                Ok(client) => {
                    tasks.spawn(serve_client(client, backends.clone(), stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "front door: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
    if let Some(path) = socket {
        let _ = std::fs::remove_file(&path);
    }
}

#[cfg(test)]
mod tests {
    use super::protocol_level;

    #[test]
    fn the_connect_says_which_server_takes_the_client() {
        // MQTT 3.1.1 and MQTT 5 CONNECTs (fixed header, protocol name, level).
        assert_eq!(
            protocol_level(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4]),
            Some(4)
        );
        assert_eq!(
            protocol_level(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 5]),
            Some(5)
        );
        // Not yet known: read more.
        assert_eq!(protocol_level(&[]), None);
        assert_eq!(protocol_level(&[0x10]), None);
        assert_eq!(protocol_level(&[0x10, 12, 0, 4, b'M', b'Q']), None);
        // Anything else goes to the 3.1.1 server, which refuses it as MQTT says.
        assert_eq!(protocol_level(&[0x30, 2, 0, 0]), Some(4));
        assert_eq!(
            protocol_level(&[0x10, 12, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p']),
            Some(4)
        );
        assert_eq!(protocol_level(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF]), Some(4));
    }
}
