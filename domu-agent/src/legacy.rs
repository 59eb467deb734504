//! The legacy endpoint: applications written for the MVP speak its JSON lines on a local UNIX
//! socket (`/run/domu-agent/legacy.sock`), and the agent maps them onto the topics through its hub,
//! so they run unchanged. The line format and its translation are `topics::legacy_line`'s.
//!
//! Per connection: one line is one command (answered by one `reponse` line per responder, an
//! error `reponse` on failure or timeout), or a response or notification the client publishes (an
//! MVP service). Every notification the VM may read reaches every connected client. A client's
//! `source` is replaced by the VM's id. A bad line gets an `erreur` line back and affects nothing
//! else; a line over `legacy_line::MAX_LINE` is skipped up to its newline (`LineReader`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, watch};
use topics::legacy_line::{self, Destination, LegacyError, LegacyLine, LineItem, LineReader};
use topics::topic::{Command, Topic};
use topics::vm::VmId;
use topics::{ErrorCode, filter};

use crate::channel::{Client, ToClient};
use crate::local::LocalRequests;

/// How long a command to one responder waits for its answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Notification lines buffered for a slow client before it misses some.
const NOTES_BUFFER: usize = 256;

/// What every legacy connection shares.
#[derive(Debug)]
pub struct Legacy {
    pub vm: VmId,
    /// Routes responses on `.../response/<vm>` to the waiting command.
    pub local: Arc<LocalRequests>,
    /// The agent's client of the hub (requests, and what an MVP service publishes).
    pub out: Arc<Client>,
    /// Notification lines for every connected client.
    pub notes: broadcast::Sender<Bytes>,
    /// Clients connected now: notifications are subscribed to only while there is one.
    connected: watch::Sender<usize>,
}

impl Legacy {
    pub fn new(vm: VmId, local: Arc<LocalRequests>, out: Arc<Client>) -> Arc<Legacy> {
        let (notes, _) = broadcast::channel(NOTES_BUFFER);
        let (connected, _) = watch::channel(0);
        Arc::new(Legacy {
            vm,
            local,
            out,
            notes,
            connected,
        })
    }
}

/// Turns the notifications of a hub client into legacy lines for every client. It subscribes
/// while a legacy client is connected (a VM whose policy refuses notifications says so only when
/// an MVP application is there to miss them).
pub async fn notifications(
    legacy: Arc<Legacy>,
    client: Client,
    mut rx: mpsc::Receiver<ToClient>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connected = legacy.connected.subscribe();
    let mut subscribed = false;
    loop {
        let m = tokio::select! {
            _ = stop.changed() => return,
            c = connected.changed() => {
                if c.is_err() {
                    return;
                }
                let want = *connected.borrow_and_update() > 0;
                if want && !subscribed {
                    client.subscribe(0, vec![(filter::notifications(), QoS::AtLeastOnce)]).await;
                } else if !want && subscribed {
                    client.unsubscribe(0, vec![filter::notifications()]).await;
                }
                subscribed = want;
                continue;
            }
            m = rx.recv() => m,
        };
        match m {
            Some(ToClient::Message { topic, payload, .. }) => {
                if let Ok(Topic::Notification(n)) = Topic::parse(&topic) {
                    let source = notification_source(n, &payload);
                    let line = legacy_line::notification_line(n, &payload, &source);
                    // Nobody connected: nothing to do.
                    let _ = legacy.notes.send(Bytes::from(line));
                }
            }
            Some(ToClient::SubAck { codes, .. }) if codes.iter().all(Option::is_none) => {
                tracing::info!(
                    "notifications are not readable by this VM: legacy clients get none"
                );
            }
            Some(_) => {}
            None => return,
        }
    }
}

/// Who a notification comes from, as far as its payload tells (else the router, Dom0).
fn notification_source(n: topics::Notification, payload: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
    let from = match n {
        topics::Notification::LinkState => v.get("vm").and_then(|x| x.as_str()),
        topics::Notification::Error => v
            .get("module")
            .and_then(|x| x.as_str())
            .and_then(|m| m.split('/').next()),
        topics::Notification::NewFile => None,
    };
    from.filter(|f| VmId::parse(f).is_ok())
        .unwrap_or("Dom0")
        .to_owned()
}

/// Serves the socket until `stop`; removes it.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    legacy: Arc<Legacy>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            a = listener.accept() => match a {
                Ok((conn, _)) => { tasks.spawn(connection(conn, legacy.clone(), stop.clone())); }
                Err(e) => {
                    tracing::warn!(error = %e, "legacy socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    let _ = std::fs::remove_file(&path);
    tasks.shutdown().await;
}

/// Counts a connected client while it lives.
struct Connected(Arc<Legacy>);

impl Connected {
    fn new(legacy: Arc<Legacy>) -> Connected {
        legacy.connected.send_modify(|n| *n += 1);
        Connected(legacy)
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.connected.send_modify(|n| *n = n.saturating_sub(1));
    }
}

async fn connection(conn: UnixStream, legacy: Arc<Legacy>, mut stop: watch::Receiver<bool>) {
    let _counted = Connected::new(legacy.clone());
    let (mut r, mut w) = conn.into_split();
    // Every writer (commands in flight, notifications) goes through one queue: lines never mix.
    let (tx, mut lines_out) = mpsc::channel::<Bytes>(64);
    let mut notes = legacy.notes.subscribe();
    let mut input = LineReader::default();
    let mut buf = vec![0u8; 64 * 1024];
    let me = legacy.vm.to_string();
    let mut tasks = tokio::task::JoinSet::new();
    // After the client's end of input (`echo ... | socat`), its commands are still answered.
    let mut reading = true;
    loop {
        if !reading && tasks.is_empty() && lines_out.is_empty() {
            break;
        }
        tokio::select! {
            _ = stop.changed() => break,
            n = r.read(&mut buf), if reading => {
                let n = match n {
                    Ok(n) if n > 0 => n,
                    _ => {
                        reading = false;
                        continue;
                    }
                };
                input.push(buf.get(..n).unwrap_or_default());
                while let Some(item) = input.next_line() {
                    let reply = match item {
                        LineItem::TooLong => Some(legacy_line::error_line(
                            &me,
                            "application",
                            &LegacyError::TooLong(legacy_line::MAX_LINE + 1),
                        )),
                        LineItem::Line(line) => one_line(&legacy, &line, &tx, &mut tasks).await,
                    };
                    if let Some(reply) = reply {
                        let _ = tx.send(Bytes::from(reply)).await;
                    }
                }
            }
            Some(line) = lines_out.recv() => {
                if w.write_all(&line).await.is_err() {
                    break;
                }
            }
            n = notes.recv() => match n {
                Ok(line) => {
                    if w.write_all(&line).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(k)) => {
                    tracing::warn!(missed = k, "a legacy client reads too slowly; notifications skipped");
                }
                Err(broadcast::error::RecvError::Closed) => {}
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

/// Serves one line; returns what to answer at once (errors), commands answer from their task.
async fn one_line(
    legacy: &Arc<Legacy>,
    line: &[u8],
    tx: &mpsc::Sender<Bytes>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Option<Vec<u8>> {
    let me = legacy.vm.as_str();
    let client = legacy_line::claimed_source(line).unwrap_or_else(|| "application".into());
    let parsed = match legacy_line::parse(line) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "bad legacy line");
            return Some(legacy_line::error_line(me, &client, &e));
        }
    };
    match parsed {
        LegacyLine::Command {
            command,
            destination,
            arguments,
        } => {
            let (id, rx) = legacy.local.register(&legacy.vm);
            let (topic, payload) =
                legacy_line::request(command, &destination, &arguments, &legacy.vm, &id);
            if !legacy
                .out
                .publish(topic, Bytes::from(payload), QoS::AtLeastOnce, false, None)
                .await
            {
                legacy.local.unregister(&id);
                return Some(legacy_line::command_error_line(
                    command,
                    me,
                    &client,
                    ErrorCode::Internal,
                    "the agent is stopping",
                ));
            }
            let (legacy, tx) = (legacy.clone(), tx.clone());
            tasks.spawn(
                async move { answers(&legacy, command, destination, id, rx, client, tx).await },
            );
            None
        }
        other => {
            // An MVP service's response or notification: published as the VM, under Dom0's policy.
            let (topic, payload) = legacy_line::publication(&other)?;
            legacy
                .out
                .publish(topic, Bytes::from(payload), QoS::AtLeastOnce, false, None)
                .await;
            None
        }
    }
}

/// Forwards the answers to one command: the first (or `started` then the last) from one
/// responder, all of them within the window for `tous`; a timeout error if none came.
async fn answers(
    legacy: &Legacy,
    command: Command,
    destination: Destination,
    id: String,
    mut rx: mpsc::Receiver<Bytes>,
    client: String,
    tx: mpsc::Sender<Bytes>,
) {
    let me = legacy.vm.as_str();
    let all = destination == Destination::All;
    let window = if all {
        Duration::from_millis(legacy_line::ALL_WINDOW_MS)
    } else {
        ANSWER_TIMEOUT
    };
    let deadline = tokio::time::Instant::now() + window;
    let fallback = destination.as_line().to_owned();
    let mut answered = 0;
    while let Ok(Some(resp)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        answered += 1;
        let line = legacy_line::response_line(command, &resp, &client, &fallback);
        if tx.send(Bytes::from(line)).await.is_err() {
            break;
        }
        let started = serde_json::from_slice::<serde_json::Value>(&resp)
            .ok()
            .and_then(|v| {
                v.get("status")
                    .and_then(|s| s.as_str())
                    .map(|s| s == "started")
            })
            .unwrap_or(false);
        if !all && !started {
            break;
        }
    }
    legacy.local.unregister(&id);
    if answered == 0 {
        let msg = format!("no answer within {} ms", window.as_millis());
        let line = legacy_line::command_error_line(command, me, &client, ErrorCode::Timeout, &msg);
        let _ = tx.send(Bytes::from(line)).await;
    }
}
