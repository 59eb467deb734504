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

/// Relays one client connection to the broker until either side closes or `stop`.
async fn relay<R, W>(client_r: R, client_w: W, broker: SocketAddr, mut stop: watch::Receiver<bool>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let upstream_conn = match TcpStream::connect(broker).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "relay: broker unreachable");
            return;
        }
    };
    let _ = upstream_conn.set_nodelay(true);
    let (br, bw) = upstream_conn.into_split();
    tokio::select! {
        _ = async { tokio::join!(upstream(client_r, bw), downstream(br, client_w)) } => {}
        _ = stop.changed() => {}
    }
}

/// Serves Dom0 clients on TCP until `stop`.
pub async fn run_tcp(listener: TcpListener, broker: SocketAddr, stop: watch::Receiver<bool>) {
    let mut stop_accept = stop.clone();
    loop {
        tokio::select! {
            _ = stop_accept.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let _ = client.set_nodelay(true);
                    let (r, w) = client.into_split();
                    tokio::spawn(relay(r, w, broker, stop.clone()));
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
    broker: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    let mut stop_accept = stop.clone();
    loop {
        tokio::select! {
            _ = stop_accept.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let (r, w) = client.into_split();
                    tokio::spawn(relay(r, w, broker, stop.clone()));
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
