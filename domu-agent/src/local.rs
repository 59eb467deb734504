//! Local requests: applications in the guest (and the `call` CLI) ask the dictionary's commands
//! through the agent, which owns the channel. Protocol on the agent's UNIX socket: one JSON line
//! `{"command": "list_files", "args": {"disk": "usb0"}, "timeout_ms": 10000}`; the agent adds
//! `sender` and a `request_id`, publishes the request, and writes back every response as one JSON
//! line: one for most commands, `started` then `finished` for a benchmark, one per answering party
//! for `discover` (collected until the timeout).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use topics::topic::Command;
use topics::vm::VmId;
use topics::{ErrorBody, ErrorCode, Response};

use crate::channel::Client;

/// Largest request line (create_file carries Base64 data).
const MAX_LINE: u64 = 16 * 1024 * 1024;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `discover` collects answers by default.
const DISCOVER_WINDOW: Duration = Duration::from_secs(2);

/// Waiters for responses, by request id.
#[derive(Debug, Default)]
pub struct LocalRequests {
    waiters: Mutex<HashMap<String, mpsc::Sender<Bytes>>>,
    next: AtomicU64,
}

impl LocalRequests {
    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Bytes>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes a response on our response topic to whoever asked.
    pub fn deliver(&self, payload: &[u8]) {
        let id = serde_json::from_slice::<Value>(payload).ok().and_then(|v| {
            v.get("request_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        let Some(id) = id else {
            tracing::debug!("response without request_id; nobody waits for it");
            return;
        };
        if let Some(tx) = self.waiters().get(&id) {
            let _ = tx.try_send(Bytes::copy_from_slice(payload));
        }
    }

    /// A waiter for the responses to a new request id.
    pub fn register(&self, vm: &VmId) -> (String, mpsc::Receiver<Bytes>) {
        let id = format!(
            "{vm}-{}-{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = mpsc::channel(64);
        self.waiters().insert(id.clone(), tx);
        (id, rx)
    }

    pub fn unregister(&self, id: &str) {
        self.waiters().remove(id);
    }
}

/// One local request line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRequest {
    /// `list_disks`, `system/disks/list_disks`, or the MVP's `liste_disques`.
    pub command: String,
    #[serde(default)]
    pub args: Map<String, Value>,
    pub timeout_ms: Option<u64>,
}

/// The command a local request names.
pub fn command_by_name(name: &str) -> Option<Command> {
    Command::from_root(name)
        .or_else(|| {
            Command::ALL
                .into_iter()
                .find(|c| c.root().rsplit('/').next() == Some(name))
        })
        .or_else(|| topics::legacy::from_commande(name))
        .or_else(|| topics::legacy::from_type_commande(name))
}

/// Binds the local socket (replacing a stale one, never a live one), mode 0660: its owner and group.
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another agent", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

/// Serves local requests until `stop`; removes the socket.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    vm: VmId,
    local: std::sync::Arc<LocalRequests>,
    out: std::sync::Arc<Client>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            a = listener.accept() => match a {
                Ok((conn, _)) => {
                    tokio::spawn(one(conn, vm.clone(), local.clone(), out.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "local socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

fn error_line(code: ErrorCode, message: String) -> Vec<u8> {
    let mut v = Response::<()>::error(None, ErrorBody::new(code, message)).to_json();
    v.push(b'\n');
    v
}

async fn one(
    conn: UnixStream,
    vm: VmId,
    local: std::sync::Arc<LocalRequests>,
    out: std::sync::Arc<Client>,
) {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    if BufReader::new(r.take(MAX_LINE))
        .read_line(&mut line)
        .await
        .is_err()
    {
        return;
    }
    let req: LocalRequest = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let _ = w
                .write_all(&error_line(
                    ErrorCode::InvalidArgument,
                    format!("bad request line: {e}"),
                ))
                .await;
            return;
        }
    };
    let Some(command) = command_by_name(&req.command) else {
        let _ = w
            .write_all(&error_line(
                ErrorCode::InvalidArgument,
                format!("unknown command {:?}", req.command),
            ))
            .await;
        return;
    };
    let (id, mut rx) = local.register(&vm);
    let mut payload = req.args;
    payload.insert("sender".into(), Value::String(vm.to_string()));
    payload.insert("request_id".into(), Value::String(id.clone()));
    let body = Value::Object(payload).to_string();
    let sent = out
        .publish(
            command.request_topic(),
            Bytes::from(body),
            QoS::AtLeastOnce,
            false,
            None,
        )
        .await;
    if !sent {
        local.unregister(&id);
        return;
    }
    let window = req
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(match command {
            Command::Discover => DISCOVER_WINDOW,
            _ => DEFAULT_TIMEOUT,
        });
    let deadline = tokio::time::Instant::now() + window;
    let mut answers = 0;
    loop {
        let got = tokio::time::timeout_at(deadline, rx.recv()).await;
        let Ok(Some(resp)) = got else { break };
        answers += 1;
        let mut line = resp.to_vec();
        line.push(b'\n');
        if w.write_all(&line).await.is_err() {
            break;
        }
        let status = serde_json::from_slice::<Value>(&resp)
            .ok()
            .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned));
        let done = match command {
            Command::Discover => false,
            Command::Benchmark => status.as_deref() != Some("started"),
            _ => true,
        };
        if done {
            break;
        }
    }
    local.unregister(&id);
    if answers == 0 {
        let _ = w
            .write_all(&error_line(
                ErrorCode::Timeout,
                format!("no answer within {} ms", window.as_millis()),
            ))
            .await;
    }
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_names() {
        assert_eq!(command_by_name("list_disks"), Some(Command::ListDisks));
        assert_eq!(
            command_by_name("system/disks/list_files"),
            Some(Command::ListFiles)
        );
        assert_eq!(command_by_name("liste_fichiers"), Some(Command::ListFiles));
        assert_eq!(command_by_name("LISTE_COMPOSANTS"), Some(Command::Discover));
        assert_eq!(command_by_name("discover"), Some(Command::Discover));
        assert_eq!(command_by_name("benchmark"), Some(Command::Benchmark));
        assert_eq!(command_by_name("format_disk"), None);
    }

    #[test]
    fn responses_reach_their_waiter() {
        let l = LocalRequests::default();
        let vm = VmId::parse("vm-gui").unwrap();
        let (id, mut rx) = l.register(&vm);
        l.deliver(format!(r#"{{"status":"ok","request_id":"{id}"}}"#).as_bytes());
        l.deliver(br#"{"status":"ok","request_id":"someone-else"}"#);
        l.deliver(b"not json");
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
    }
}
