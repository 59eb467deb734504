//! The legacy endpoint: applications written for the MVP speak its JSON lines on a local UNIX
//! socket (`/run/domu-agent/legacy.sock`), and the agent maps them onto the topics through its hub,
//! so they run unchanged. The translation is the one Dom0's legacy mode uses
//! (`topics::legacy_translator`): this module is its driver for each connection.
//!
//! Per connection: a command line is answered by one `reponse` line per responder (an error
//! `reponse` on failure or timeout), taken only under the one answer rule (its command, its random
//! request id, an acceptable responder); a response or notification line is published as the VM.
//! Every notification the VM may read reaches every connected client, its `source` the origin
//! Dom0 stamped. A bad line gets an `erreur` line back and affects nothing else.
//!
//! Bounds: a connection must send a line (an empty one will do) within
//! [`FIRST_PACKET_TIMEOUT`]; at most `max_clients` connections that did, and a few that did not
//! yet (the oldest of those is closed to make room); one line at most `max_line` (a `create_file`
//! larger than a packet is uploaded in chunks, `topics::upload`),
//! an unfinished line dropped when no byte of it came for `LINE_IDLE`, and the unfinished lines of
//! all connections together at most `max_held` bytes (the connection that would go beyond is
//! closed); a client that does not read its answers is closed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use topics::legacy_line::{self, LegacyError};
use topics::legacy_translator::{Out, Translator, notification_source};
use topics::topic::Topic;
use topics::vm::VmId;
use topics::{RequestId, filter};

use crate::endpoints::admission::{Admitted, FIRST_PACKET_TIMEOUT, Gate, Pending, accept_loop};
use crate::endpoints::call::{Delivery, LocalRequests, random_request_id};
use crate::hub::{Client, Publication, ToClient};
use crate::optional::or_never;

/// Notification lines buffered for a slow client before it misses some.
const NOTES_BUFFER: usize = 256;

/// Bounds of the endpoint.
#[derive(Debug, Clone)]
pub struct LegacyLimits {
    /// Largest message: the channel's packet limit.
    pub max_packet: usize,
    /// Largest line (a `create_file` larger than a message is uploaded in chunks).
    pub max_line: usize,
    /// File data per chunk of an upload.
    pub chunk: usize,
    /// Connections that sent their first line.
    pub max_clients: usize,
    /// Bytes of unfinished lines held for all connections together.
    pub max_held: usize,
}

/// What every legacy connection shares.
#[derive(Debug)]
pub struct Legacy {
    pub vm: VmId,
    /// Routes responses on `.../response/<vm>` to the connection that asked.
    pub local: Arc<LocalRequests>,
    /// The agent's client of the hub (requests, and what an MVP service publishes).
    pub out: Arc<Client>,
    /// Notification lines for every connected client.
    pub notes: broadcast::Sender<Bytes>,
    /// Clients connected now: notifications are subscribed to only while there is one.
    connected: watch::Sender<usize>,
    limits: LegacyLimits,
    gate: Arc<Gate>,
    /// Bytes of unfinished lines held now, all connections together.
    held: AtomicUsize,
}

impl Legacy {
    pub fn new(
        vm: VmId,
        local: Arc<LocalRequests>,
        out: Arc<Client>,
        limits: LegacyLimits,
    ) -> Arc<Legacy> {
        let (notes, _) = broadcast::channel(NOTES_BUFFER);
        let (connected, _) = watch::channel(0);
        let gate = Gate::new("legacy", limits.max_clients, limits.max_clients);
        Arc::new(Legacy {
            vm,
            local,
            out,
            notes,
            connected,
            limits,
            gate,
            held: AtomicUsize::new(0),
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
    stop: CancellationToken,
) {
    let mut connected = legacy.connected.subscribe();
    let mut subscribed = false;
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => return,
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

/// Serves the socket until `stop`; removes it.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    legacy: Arc<Legacy>,
    stop: CancellationToken,
) {
    let gate = legacy.gate.clone();
    accept_loop(
        "legacy",
        listener,
        Some(path),
        gate,
        stop.clone(),
        |conn, pending| connection(conn, pending, legacy.clone(), stop.clone()),
    )
    .await;
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

/// Where a connection stands.
enum Admission {
    Pending(Pending, tokio::time::Instant),
    Client(#[allow(dead_code)] Admitted, #[allow(dead_code)] Connected),
}

/// One connection's state: its translation, the ids it asked, its output.
struct Conn {
    legacy: Arc<Legacy>,
    t: Translator,
    /// The request ids of its commands (their routes are removed when it ends).
    mine: Vec<RequestId>,
    routes: mpsc::Sender<Delivery>,
    /// Bytes for the client, written as it reads.
    out: BytesMut,
    /// Bytes of unfinished lines this connection counts in `Legacy::held`.
    held: usize,
}

impl Conn {
    /// What the translation asks: lines for the client, publications as the VM.
    async fn carry_out(&mut self, outs: Vec<Out>) {
        for o in outs {
            match o {
                Out::Line(l) => self.out.extend_from_slice(&l),
                Out::Request {
                    topic,
                    payload,
                    request_id,
                } => {
                    self.legacy
                        .local
                        .route(request_id.clone(), self.routes.clone());
                    self.mine.push(request_id);
                    self.publish(topic, payload).await;
                }
                Out::Publish { topic, payload } => self.publish(topic, payload).await,
            }
        }
    }

    async fn publish(&mut self, topic: String, payload: Vec<u8>) {
        let out = &self.legacy.out;
        if !out
            .publish(
                Publication::at_least_once(topic, Bytes::from(payload)),
                None,
            )
            .await
        {
            tracing::debug!("the agent is stopping; a legacy line is not sent");
        }
    }

    /// Bytes from the client: its first line admits it; its lines are translated. Err: the
    /// line to write before closing (no room for another client, too many unfinished lines).
    async fn read(&mut self, bytes: &[u8], admission: Admission) -> Result<Admission, Vec<u8>> {
        let me = self.legacy.vm.clone();
        let refuse = |why: String| {
            legacy_line::error_line(me.as_str(), "application", &LegacyError::Invalid(why))
        };
        let admission = match admission {
            Admission::Pending(p, _) if bytes.contains(&b'\n') => match p.admit() {
                Some(admitted) => Admission::Client(admitted, Connected::new(self.legacy.clone())),
                None => {
                    return Err(refuse(format!(
                        "{} legacy clients already connected",
                        self.legacy.limits.max_clients
                    )));
                }
            },
            other => other,
        };
        let outs = self
            .t
            .on_bytes(bytes, Instant::now(), &mut random_request_id);
        self.carry_out(outs).await;
        if !self.hold() {
            return Err(refuse("the agent holds too many unfinished lines".into()));
        }
        Ok(admission)
    }

    /// The translation's timers: unfinished lines without progress, commands whose time is up.
    fn tick(&mut self) {
        for line in self.t.on_tick(Instant::now()) {
            self.out.extend_from_slice(&line);
        }
        self.prune();
        let _ = self.hold();
    }

    /// Forgets the routes of commands that wait no more.
    fn prune(&mut self) {
        let (t, local) = (&self.t, &self.legacy.local);
        self.mine.retain(|id| {
            let keep = t.asks(id);
            if !keep {
                local.unregister(id);
            }
            keep
        });
    }

    /// Counts this connection's unfinished line in the endpoint's total; false when the total
    /// would go beyond the bound.
    fn hold(&mut self) -> bool {
        let now = self.t.partial().len();
        let total = &self.legacy.held;
        if now > self.held {
            let more = now - self.held;
            if total.fetch_add(more, Ordering::Relaxed) + more > self.legacy.limits.max_held {
                total.fetch_sub(more, Ordering::Relaxed);
                return false;
            }
        } else {
            total.fetch_sub(self.held - now, Ordering::Relaxed);
        }
        self.held = now;
        true
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.legacy.held.fetch_sub(self.held, Ordering::Relaxed);
        for id in &self.mine {
            self.legacy.local.unregister(id);
        }
    }
}

async fn evicted(a: &mut Admission) {
    match a {
        Admission::Pending(p, _) => {
            let _ = (&mut p.evicted).await;
        }
        Admission::Client(..) => std::future::pending().await,
    }
}

async fn connection(
    conn: UnixStream,
    pending: Pending,
    legacy: Arc<Legacy>,
    stop: CancellationToken,
) {
    let (mut r, mut w) = conn.into_split();
    let (routes, mut responses) = mpsc::channel::<Delivery>(256);
    let me = legacy.vm.clone();
    let mut c = Conn {
        t: Translator::new(me.clone(), me.as_str(), None, legacy.limits.max_packet)
            .with_uploads(legacy.limits.max_line, legacy.limits.chunk),
        legacy: legacy.clone(),
        mine: Vec::new(),
        routes,
        out: BytesMut::new(),
        held: 0,
    };
    let max_out = legacy.limits.max_packet.saturating_mul(2).max(1 << 20);
    let mut admission =
        Admission::Pending(pending, tokio::time::Instant::now() + FIRST_PACKET_TIMEOUT);
    let mut notes = legacy.notes.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    // After the client's end of input (`echo ... | socat`), its commands are still answered.
    let mut reading = true;
    loop {
        if !reading && c.t.asked() == 0 && c.out.is_empty() {
            break;
        }
        if c.out.len() > max_out {
            tracing::debug!("a legacy client does not read its answers; closed");
            break;
        }
        let first_line_by = match admission {
            Admission::Pending(_, t) => Some(t),
            Admission::Client(..) => None,
        };
        let next_tick = c.t.next_deadline().map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = evicted(&mut admission) => break,
            _ = or_never(first_line_by.map(tokio::time::sleep_until)) => break,
            n = r.read(&mut buf), if reading => {
                let Some(bytes) = n.ok().filter(|n| *n > 0).and_then(|n| buf.get(..n)) else {
                    reading = false;
                    continue;
                };
                admission = match c.read(bytes, admission).await {
                    Ok(a) => a,
                    Err(last_words) => {
                        let _ = w.write_all(&last_words).await;
                        break;
                    }
                };
            }
            Some((topic, payload)) = responses.recv() => {
                // A line for the client, and an upload's next chunks.
                let outs = c.t.on_message(&topic, &payload, Instant::now(), &mut random_request_id);
                c.carry_out(outs).await;
                c.prune();
            }
            _ = or_never(next_tick.map(tokio::time::sleep_until)) => c.tick(),
            n = w.write(&c.out), if !c.out.is_empty() => match n {
                Ok(n) if n > 0 => c.out.advance(n),
                _ => break,
            },
            n = notes.recv(), if matches!(admission, Admission::Client(..)) => match n {
                Ok(line) => c.out.extend_from_slice(&line),
                Err(broadcast::error::RecvError::Lagged(k)) => {
                    tracing::debug!(missed = k, "a legacy client reads too slowly; notifications skipped");
                }
                Err(broadcast::error::RecvError::Closed) => {}
            },
        }
    }
}
