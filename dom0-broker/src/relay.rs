//! The operators' UNIX socket: `mosquitto_pub --unix PATH` reaches the embedded broker through a
//! thin byte relay (rumqttd listens on TCP only). Dom0-local clients are trusted: no policy here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;

/// Binds the operator socket, replacing a stale one but never a live one.
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
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

/// Accepts operator connections and relays each to the broker until `stop`; removes the socket.
pub async fn run(
    listener: UnixListener,
    path: PathBuf,
    broker: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((mut client, _)) => {
                    let mut stop = stop.clone();
                    tokio::spawn(async move {
                        let mut upstream = match TcpStream::connect(broker).await {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::warn!(error = %e, "operator relay: broker unreachable");
                                return;
                            }
                        };
                        let _ = upstream.set_nodelay(true);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                            _ = stop.changed() => {}
                        }
                    });
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
