//! Local requests: applications in the guest (and the `call` CLI) ask the dictionary's commands
//! through the agent, which owns the channel. Protocol on the agent's UNIX socket: one JSON line
//! `{"command": "list_files", "args": {"disk": "usb0"}, "timeout_ms": 10000}`; the agent adds
//! `sender` and a `request_id`, publishes the request, and writes back every response as one JSON
//! line: one for most commands, `started` then `finished` for a benchmark, one per answering party
//! for `discover` (collected until the timeout).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use topics::answers::{Question, Responders};
use topics::topic::{Command, Topic};
use topics::vm::VmId;
use topics::{ErrorBody, ErrorCode, RequestId, Response};

use crate::endpoints::admission::{FIRST_PACKET_TIMEOUT, Gate, Pending, accept_loop};
use crate::hub::Client;
use crate::hub::Publication;

/// Largest request line (create_file carries Base64 data).
const MAX_LINE: u64 = 16 * 1024 * 1024;

/// A response on the VM's response topic: its topic and payload.
pub type Delivery = (String, Bytes);

/// Where the responses to the requests of this VM's local requesters go, by request id. It only
/// routes: each requester takes or refuses what it gets under the one answer rule
/// (`topics::answers`).
#[derive(Debug, Default)]
pub struct LocalRequests {
    routes: Mutex<HashMap<RequestId, mpsc::Sender<Delivery>>>,
}

/// A request id nobody can guess: 128 bits from the kernel's generator.
pub fn random_request_id() -> RequestId {
    let mut bits = [0u8; 16];
    if let Err(e) = getrandom::getrandom(&mut bits) {
        // The kernel's generator does not fail on a running Linux; if it ever did, the ids
        // would be guessable: say so.
        tracing::error!(error = %e, "no randomness for request ids");
    }
    RequestId::random(bits)
}

impl LocalRequests {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, mpsc::Sender<Delivery>>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes a response on our response topic to whoever asked (by its `request_id`; a requester
    /// that is gone loses its route).
    pub fn deliver(&self, topic: String, payload: Bytes) {
        let id = serde_json::from_slice::<Value>(&payload)
            .ok()
            .and_then(|v| {
                v.get("request_id")
                    .and_then(Value::as_str)
                    .and_then(|s| RequestId::parse(s).ok())
            });
        let Some(id) = id else {
            tracing::debug!("response without request_id; nobody waits for it");
            return;
        };
        let mut routes = self.routes();
        if let Some(tx) = routes.get(&id) {
            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send((topic, payload)) {
                routes.remove(&id);
            }
        }
    }

    /// A new random request id whose responses come to a new receiver.
    pub fn register(&self) -> (RequestId, mpsc::Receiver<Delivery>) {
        let (tx, rx) = mpsc::channel(64);
        let id = random_request_id();
        self.route(id.clone(), tx);
        (id, rx)
    }

    /// Responses to `id` go to `tx` (a requester with several questions in flight).
    pub fn route(&self, id: RequestId, tx: mpsc::Sender<Delivery>) {
        self.routes().insert(id, tx);
    }

    pub fn unregister(&self, id: &RequestId) {
        self.routes().remove(id);
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
    Command::by_name(name)
}

/// Serves local requests until `stop`; removes the socket. At most `max_clients` requests at once
/// and as many connections that have not sent their request line yet (the oldest is closed to make
/// room), each for at most [`FIRST_PACKET_TIMEOUT`].
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    vm: VmId,
    local: std::sync::Arc<LocalRequests>,
    out: std::sync::Arc<Client>,
    max_clients: usize,
    stop: CancellationToken,
) {
    let gate = Gate::new("call", max_clients, max_clients);
    accept_loop("call", listener, Some(path), gate, stop, |conn, pending| {
        one(conn, pending, vm.clone(), local.clone(), out.clone())
    })
    .await;
}

fn error_line(code: ErrorCode, message: String) -> Vec<u8> {
    let mut v = Response::<()>::error(None, ErrorBody::new(code, message)).to_json();
    v.push(b'\n');
    v
}

async fn one(
    conn: UnixStream,
    mut pending: Pending,
    vm: VmId,
    local: std::sync::Arc<LocalRequests>,
    out: std::sync::Arc<Client>,
) {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(MAX_LINE));
    tokio::select! {
        read = tokio::time::timeout(FIRST_PACKET_TIMEOUT, reader.read_line(&mut line)) => {
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                return;
            }
        }
        _ = &mut pending.evicted => return,
    }
    let Some(_admitted) = pending.admit() else {
        let busy = "too many requests at once on the agent's socket";
        let _ = w.write_all(&error_line(ErrorCode::Busy, busy.into())).await;
        return;
    };
    let (command, req) = match parse_request(&line) {
        Ok(r) => r,
        Err(message) => {
            let _ = w
                .write_all(&error_line(ErrorCode::InvalidArgument, message))
                .await;
            return;
        }
    };
    let (id, rx) = local.register();
    let question = ask(command, req, &vm, id.clone(), &out).await;
    if let Some(question) = question {
        for l in answers(question, rx, &mut w).await {
            let _ = w.write_all(&l).await;
        }
    }
    local.unregister(&id);
    let _ = w.shutdown().await;
}

/// A request line and the command it names; Err: why not, for the client.
fn parse_request(line: &str) -> Result<(Command, LocalRequest), String> {
    let req: LocalRequest =
        serde_json::from_str(line).map_err(|e| format!("bad request line: {e}"))?;
    let command = command_by_name(&req.command)
        .ok_or_else(|| format!("unknown command {:?}", req.command))?;
    Ok((command, req))
}

/// Publishes the request as the VM with its random id; the question its answers are taken
/// under (None: the agent is stopping).
async fn ask(
    command: Command,
    req: LocalRequest,
    vm: &VmId,
    id: RequestId,
    out: &Client,
) -> Option<Question> {
    let destination = req
        .args
        .get("destination")
        .and_then(Value::as_str)
        .filter(|d| *d != topics::legacy_line::ALL)
        .map(str::to_owned);
    let question = Question::new(
        command,
        id.clone(),
        Responders::for_request(command, destination.as_deref()),
        req.timeout_ms.map(Duration::from_millis),
        std::time::Instant::now(),
    );
    let mut payload = req.args;
    payload.insert("sender".into(), Value::String(vm.to_string()));
    payload.insert("request_id".into(), Value::String(id.to_string()));
    // The request says how long its answer is awaited: Dom0 makes it its deadline.
    let patience = u64::try_from(question.patience().as_millis()).unwrap_or(u64::MAX);
    payload.insert(topics::payload::TIMEOUT_MS.into(), Value::from(patience));
    let body = Bytes::from(Value::Object(payload).to_string());
    let topic = command.request_topic();
    if !out
        .publish(Publication::at_least_once(topic, body), None)
        .await
    {
        return None;
    }
    Some(question)
}

/// Writes every answer the question takes as it comes (one JSON line each); returns the lines
/// that end it: a timeout for nobody answering, one for each party that started and never
/// finished.
async fn answers(
    mut question: Question,
    mut rx: mpsc::Receiver<Delivery>,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> Vec<Vec<u8>> {
    let asked_at = std::time::Instant::now();
    loop {
        let now = std::time::Instant::now();
        if question.is_done(now) {
            break;
        }
        let until = tokio::time::Instant::from_std(question.next_deadline());
        let Ok(Some((topic, payload))) = tokio::time::timeout_at(until, rx.recv()).await else {
            continue;
        };
        let Ok(Topic::Response { command, .. }) = Topic::parse(&topic) else {
            continue;
        };
        match question.accept(command, &payload, std::time::Instant::now()) {
            Ok(_) => {
                let mut line = payload.to_vec();
                line.push(b'\n');
                if w.write_all(&line).await.is_err() {
                    return Vec::new();
                }
            }
            Err(why) => tracing::debug!(%why, "response not taken"),
        }
    }
    let waited = asked_at.elapsed().as_millis();
    let mut lines = Vec::new();
    if question.answered() == 0 {
        lines.push(error_line(
            ErrorCode::Timeout,
            format!("no answer within {waited} ms"),
        ));
    }
    for party in question.pending() {
        let mut v = Response::<()>::error(
            Some(question.request_id().clone()),
            ErrorBody::new(
                ErrorCode::Timeout,
                format!("no final answer within {waited} ms"),
            ),
        )
        .to_json();
        v = topics::payload::with_responder(&v, party);
        v.push(b'\n');
        lines.push(v);
    }
    lines
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
    fn responses_reach_their_waiter_by_a_random_id() {
        let l = LocalRequests::default();
        let (id, mut rx) = l.register();
        let (other, _) = l.register();
        assert_ne!(id, other);
        assert_eq!(id.as_str().len(), 32);
        let t = "system/disks/list_disks/response/vm-gui".to_owned();
        l.deliver(
            t.clone(),
            Bytes::from(format!(r#"{{"status":"ok","request_id":"{id}"}}"#)),
        );
        l.deliver(
            t.clone(),
            Bytes::from_static(br#"{"status":"ok","request_id":"someone-else"}"#),
        );
        l.deliver(t, Bytes::from_static(b"not json"));
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
    }
}
