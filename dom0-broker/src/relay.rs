//! Byte relays in front of the embedded broker, for Dom0-local clients (operators' mosquitto_pub/sub,
//! the controller): the `--listen` TCP address and the operator UNIX socket.
//!
//! Why: rumqttd sets no TCP_NODELAY on its sockets, so when it writes two packets back to back (a
//! PUBACK then a PUBLISH), the second waits for the client's ACK, which a client without
//! TCP_QUICKACK delays by 40 ms. The relay sets TCP_NODELAY towards the client and re-arms
//! TCP_QUICKACK after every read from rumqttd, so no Dom0 client ever sees that stall
//! (measured: docs/performance.md). Dom0-local clients are trusted: no policy here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;

use crate::broker::quickack;

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

/// Copies client → broker.
async fn upstream<R: AsyncRead + Unpin>(mut from: R, mut to: tokio::net::tcp::OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Copies broker → client, acknowledging the broker's segments at once.
async fn downstream<W: AsyncWrite + Unpin>(mut from: tokio::net::tcp::OwnedReadHalf, mut to: W) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        quickack(from.as_ref());
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// rumqttd's listeners: it serves MQTT 3.1.1 and 5 on separate ports; the relay picks the one the
/// client's CONNECT asks for, so Dom0 clients of either version use one address.
#[derive(Debug, Clone, Copy)]
pub struct Backends {
    pub v4: SocketAddr,
    pub v5: SocketAddr,
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

/// Relays one client connection to the broker until either side closes or `stop`.
async fn relay<R, W>(
    mut client_r: R,
    client_w: W,
    backends: Backends,
    mut stop: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Read until the CONNECT says its protocol level.
    let mut first = Vec::with_capacity(64);
    let level = loop {
        if let Some(l) = protocol_level(&first) {
            break l;
        }
        let mut buf = [0u8; 512];
        let n = tokio::select! {
            r = tokio::time::timeout(CONNECT_WAIT, client_r.read(&mut buf)) => match r {
                Ok(Ok(n)) if n > 0 => n,
                _ => return,
            },
            _ = stop.changed() => return,
        };
        first.extend_from_slice(buf.get(..n).unwrap_or_default());
    };
    let broker = if level == 5 { backends.v5 } else { backends.v4 };
    let upstream_conn = match TcpStream::connect(broker).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "relay: broker unreachable");
            return;
        }
    };
    let _ = upstream_conn.set_nodelay(true);
    let (br, mut bw) = upstream_conn.into_split();
    if bw.write_all(&first).await.is_err() {
        return;
    }
    tokio::select! {
        _ = async { tokio::join!(upstream(client_r, bw), downstream(br, client_w)) } => {}
        _ = stop.changed() => {}
    }
}

/// Serves Dom0 clients on TCP until `stop`.
pub async fn run_tcp(listener: TcpListener, backends: Backends, stop: watch::Receiver<bool>) {
    let mut stop_accept = stop.clone();
    loop {
        tokio::select! {
            _ = stop_accept.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let _ = client.set_nodelay(true);
                    let (r, w) = client.into_split();
                    tokio::spawn(relay(r, w, backends, stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// Serves Dom0 operators on a UNIX socket until `stop`, then removes the socket.
pub async fn run_unix(
    listener: UnixListener,
    path: PathBuf,
    backends: Backends,
    stop: watch::Receiver<bool>,
) {
    let mut stop_accept = stop.clone();
    loop {
        tokio::select! {
            _ = stop_accept.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let (r, w) = client.into_split();
                    tokio::spawn(relay(r, w, backends, stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "operator socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}
