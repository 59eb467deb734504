//! The I/O driver of the agent's one session with Dom0 and of the hub: owns the channel tty
//! (opened, waited for, reopened) and the timers, moves bytes between the tty and the
//! [`Session`], and carries out what the [`Mux`] decides for the clients attached through the
//! [`Hub`](super::Hub). There is no other path to the channel.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::mux::{Action, ClientId, Mux};
use super::{ChannelConfig, ToClient, ToHub};
use crate::endpoints::admission::Quiet;
use crate::hub::Publication;
use crate::optional::or_never;
use crate::uplink::session::{Event, PublishError, Session};
use crate::uplink::tty::{Device, Tty};

/// Messages held by the hub while the session cannot take them (no session, in-flight window
/// full); beyond, a local client's publish closes it, the agent's own is dropped with a warning.
pub const MAX_HELD: usize = 1024;
/// Client requests served per wake-up before the output is written (one write, not one per message).
const BATCH: usize = 256;
/// How often an absent channel is looked for.
const REOPEN_EVERY: Duration = Duration::from_millis(500);

/// Runs the channel and the hub until `stop`.
pub async fn run(cfg: ChannelConfig, rx: mpsc::Receiver<ToHub>, stop: CancellationToken) {
    let span = tracing::info_span!("session", vm = %cfg.session.vm);
    drive(cfg, rx, stop).instrument(span).await
}

/// Why a message did not reach a client.
enum Unsent {
    /// Its queue is full: it does not take its messages.
    Full,
    /// It is gone.
    Gone,
}

/// An attached client, as the hub sees it.
#[derive(Debug)]
struct Attached {
    name: String,
    tx: mpsc::Sender<ToClient>,
    lossless: bool,
}

/// A publish the session could not take yet.
#[derive(Debug)]
struct Held {
    client: ClientId,
    publication: Publication,
    pkid: Option<u16>,
}

struct Driver {
    session: Session,
    mux: Mux,
    clients: HashMap<ClientId, Attached>,
    held: VecDeque<Held>,
    /// Benchmark probes waiting for their PINGRESP.
    probes: HashMap<u64, oneshot::Sender<Duration>>,
    next_probe: u64,
}

async fn drive(cfg: ChannelConfig, mut rx: mpsc::Receiver<ToHub>, stop: CancellationToken) {
    let mut d = Driver {
        session: Session::new(cfg.session, Instant::now()),
        mux: Mux::new(),
        clients: HashMap::new(),
        held: VecDeque::new(),
        probes: HashMap::new(),
        next_probe: 0,
    };
    let mut ch = TtyState {
        tty: None,
        reopen_at: Some(Instant::now()),
        said_waiting: false,
    };
    let mut chunk = vec![0u8; 64 * 1024];
    let mut events: Vec<Event> = Vec::new();
    loop {
        // Messages to the clients first, then their acknowledgements to Dom0 (in the output).
        d.handle(std::mem::take(&mut events)).await;
        d.drain_held();
        let out = d.session.take_output();
        if let (Some(t), false) = (&ch.tty, out.is_empty()) {
            if let Err(e) = t.write_all(&out).await {
                tracing::info!(error = %e, "channel write failed; reopening");
                events = ch.lost(&mut d.session);
                continue;
            }
        }
        let deadline = d.session.next_deadline();
        events = tokio::select! {
            _ = stop.cancelled() => {
                d.session.stop();
                let out = d.session.take_output();
                if let Some(t) = &ch.tty {
                    let _ = timeout(Duration::from_millis(200), t.write_all(&out)).await;
                }
                return;
            }
            _ = or_never(ch.reopen_at.map(sleep_until)), if ch.tty.is_none() => ch.open(&cfg.device, &mut d.session),
            r = or_never(ch.tty.as_ref().map(|t| t.read(&mut chunk))) => match r {
                Ok(n) if n > 0 => {
                    let events = d.session.on_input(chunk.get(..n).unwrap_or_default(), Instant::now());
                    // Let the clients' tasks take what the last batch brought them.
                    tokio::task::yield_now().await;
                    events
                }
                other => {
                    tracing::info!(result = ?other.map(|_| 0), "channel read failed; reopening");
                    ch.lost(&mut d.session)
                }
            },
            m = rx.recv() => match m {
                Some(m) => {
                    // What else is waiting goes in the same write to the tty.
                    let mut events = d.request(m).await;
                    for _ in 0..BATCH {
                        match rx.try_recv() {
                            Ok(m) => events.extend(d.request(m).await),
                            Err(_) => break,
                        }
                    }
                    events
                }
                None => return,
            },
            _ = or_never(deadline.map(sleep_until)) => d.session.on_tick(Instant::now()),
            // The next large publish, once what came meanwhile (small first) was taken.
            _ = std::future::ready(()), if ch.tty.is_some() && d.session.has_bulk() => Vec::new(),
        };
    }
}

/// The channel tty: open, or waited for.
struct TtyState {
    tty: Option<Tty>,
    /// When to try opening it again.
    reopen_at: Option<Instant>,
    /// "Waiting for the channel" was said (once per wait).
    said_waiting: bool,
}

impl TtyState {
    /// Tries to open the channel: the session starts on it, or the next try is scheduled.
    fn open(&mut self, device: &Device, session: &mut Session) -> Vec<Event> {
        match Tty::open_device(device) {
            Ok(t) => {
                tracing::info!(device = %t.path.display(), "channel opened");
                self.said_waiting = false;
                self.tty = Some(t);
                self.reopen_at = None;
                session.open(Instant::now())
            }
            Err(e) => {
                if !self.said_waiting {
                    tracing::info!(device = %device, error = %e, "channel not available yet; waiting");
                    self.said_waiting = true;
                }
                if !crate::uplink::tty::is_transient(&e)
                    && e.kind() != std::io::ErrorKind::WouldBlock
                {
                    tracing::warn!(device = %device, error = %e, "cannot open the channel; retrying");
                }
                self.reopen_at = Some(Instant::now() + REOPEN_EVERY);
                Vec::new()
            }
        }
    }

    /// The channel failed: closed, the session told, reopened after its delay.
    fn lost(&mut self, session: &mut Session) -> Vec<Event> {
        self.tty = None;
        let (delay, events) = session.closed();
        self.reopen_at = Some(Instant::now() + delay);
        events
    }
}

impl Driver {
    /// Carries out the session's events: deliveries, acknowledgements, SUBACKs, probes.
    async fn handle(&mut self, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::Up => {
                    let own: Vec<ClientId> = self
                        .clients
                        .iter()
                        .filter(|(_, c)| c.lossless)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in own {
                        self.send(id, ToClient::SessionUp).await;
                    }
                }
                Event::Down => {}
                Event::Message {
                    topic,
                    payload,
                    qos,
                    retain,
                } => {
                    for (client, qos) in self.mux.deliver(&topic, qos) {
                        let msg = ToClient::Message {
                            topic: topic.clone(),
                            payload: payload.clone(),
                            qos,
                            retain,
                        };
                        self.send(client, msg).await;
                    }
                }
                Event::Acked(upstream) => {
                    if let Some(a) = self.mux.acked(upstream) {
                        self.act(vec![a]).await;
                    }
                }
                Event::SubAcked(results) => {
                    let actions = self.mux.on_suback(results);
                    self.act(actions).await;
                }
                Event::Pong { probe, rtt } => {
                    if let Some(reply) = self.probes.remove(&probe) {
                        let _ = reply.send(rtt);
                    }
                }
            }
        }
        // Probes of a session that is gone are never answered: their callers hear so.
        if !self.session.is_live() {
            self.probes.clear();
        }
    }

    /// Serves one request of a client; returns the session's events.
    async fn request(&mut self, m: ToHub) -> Vec<Event> {
        match m {
            ToHub::Attach {
                client,
                name,
                to_client,
                lossless,
            } => {
                tracing::debug!(id = client, client = %name, "local client attached");
                self.mux.attach(client);
                self.clients.insert(
                    client,
                    Attached {
                        name,
                        tx: to_client,
                        lossless,
                    },
                );
            }
            ToHub::Detach(client) => self.detach(client, None).await,
            ToHub::Publish {
                client,
                publication,
                pkid,
            } => {
                let held = Held {
                    client,
                    publication,
                    pkid,
                };
                if self.held.is_empty() {
                    if let Some(h) = self.try_publish(held) {
                        self.hold(h).await;
                    }
                } else {
                    self.hold(held).await;
                }
            }
            ToHub::Subscribe {
                client,
                pkid,
                filters,
            } => {
                let actions = self.mux.subscribe(client, pkid, filters);
                self.act(actions).await;
            }
            ToHub::Unsubscribe {
                client,
                pkid,
                filters,
            } => {
                let actions = self.mux.unsubscribe(client, pkid, &filters);
                self.act(actions).await;
            }
            ToHub::Ping(reply) => {
                self.next_probe += 1;
                if self.session.ping(self.next_probe, Instant::now()) {
                    self.probes.insert(self.next_probe, reply);
                }
            }
        }
        Vec::new()
    }

    /// Hands a publish to the session; gives it back if the session cannot take it now.
    fn try_publish(&mut self, h: Held) -> Option<Held> {
        let can = match h.publication.qos {
            QoS::AtMostOnce => self.session.is_live(),
            _ => self.session.inflight() < crate::uplink::session::MAX_INFLIGHT,
        };
        if !can {
            return Some(h);
        }
        let (client, pkid) = (h.client, h.pkid);
        match self.session.publish(h.publication, Instant::now()) {
            Ok(Some(upstream)) => {
                if let Some(local) = pkid {
                    self.mux.published(client, local, upstream);
                }
            }
            Ok(None) => {}
            Err(e) => {
                // Not sendable at all (too large): said once; a QoS 1 publisher is acknowledged
                // so it does not wait forever.
                static SAID: Quiet = Quiet::new();
                if let Some(unsaid) = SAID.may_say() {
                    tracing::warn!(client, error = %e, unsaid, "message not sent");
                }
                if let (Some(local), PublishError::TooLarge { .. }) = (pkid, &e) {
                    if let Some(c) = self.clients.get(&client) {
                        let _ = c.tx.try_send(ToClient::PubAck(local));
                    }
                }
            }
        }
        None
    }

    async fn hold(&mut self, h: Held) {
        if h.publication.qos == QoS::AtMostOnce && !self.session.is_live() {
            // At most once: nothing waits for a session that is not there.
            tracing::debug!(
                client = h.client,
                "QoS 0 message dropped: no session with Dom0"
            );
            return;
        }
        if self.held.len() < MAX_HELD {
            self.held.push_back(h);
            return;
        }
        let lossless = self.clients.get(&h.client).is_none_or(|c| c.lossless);
        if lossless {
            // An application (or a Dom0 that never acknowledges) can cause this at any rate.
            static SAID: Quiet = Quiet::new();
            if let Some(unsaid) = SAID.may_say() {
                tracing::warn!(
                    unsaid,
                    "too many messages waiting for the session; one dropped"
                );
            }
        } else {
            self.detach(
                h.client,
                Some("too many messages waiting for the session".into()),
            )
            .await;
        }
    }

    /// Hands held publishes to the session while it takes them, in order.
    fn drain_held(&mut self) {
        while let Some(h) = self.held.pop_front() {
            if let Some(h) = self.try_publish(h) {
                self.held.push_front(h);
                break;
            }
        }
    }

    async fn act(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::SubscribeUp(f) => self.session.subscribe(f, QoS::AtLeastOnce),
                Action::UnsubscribeUp(f) => self.session.unsubscribe(&f),
                Action::ForgetUp(f) => self.session.forget(&f),
                Action::SubAck {
                    client,
                    pkid,
                    codes,
                } => self.send(client, ToClient::SubAck { pkid, codes }).await,
                Action::UnsubAck { client, pkid } => {
                    self.send(client, ToClient::UnsubAck(pkid)).await
                }
                Action::PubAck { client, pkid } => self.send(client, ToClient::PubAck(pkid)).await,
            }
        }
    }

    /// Sends to a client: waits for a lossless one, drops one whose queue is full.
    async fn send(&mut self, client: ClientId, msg: ToClient) {
        let Some(c) = self.clients.get(&client) else {
            return;
        };
        let result = if c.lossless {
            c.tx.send(msg).await.map_err(|_| Unsent::Gone)
        } else {
            c.tx.try_send(msg).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Unsent::Full,
                mpsc::error::TrySendError::Closed(_) => Unsent::Gone,
            })
        };
        match result {
            Ok(()) => {}
            Err(Unsent::Full) => {
                Box::pin(self.detach(
                    client,
                    Some("client does not take its messages; dropped".into()),
                ))
                .await
            }
            Err(Unsent::Gone) => Box::pin(self.detach(client, None)).await,
        }
    }

    /// Detaches a client: its subscriptions released, told why if it is dropped.
    async fn detach(&mut self, client: ClientId, why: Option<String>) {
        let Some(c) = self.clients.remove(&client) else {
            return;
        };
        match why {
            Some(why) => {
                static SAID: Quiet = Quiet::new();
                if let Some(unsaid) = SAID.may_say() {
                    tracing::warn!(id = client, client = %c.name, reason = %why, unsaid, "local client dropped");
                }
                let _ = c.tx.try_send(ToClient::Closed(why));
            }
            None => tracing::debug!(id = client, client = %c.name, "local client detached"),
        }
        self.held.retain(|h| h.client != client);
        let actions = self.mux.detach(client);
        Box::pin(self.act(actions)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Hub;
    use crate::uplink::session::SessionConfig;
    use bytes::Bytes;
    use topics::vm::VmId;

    /// Plays Dom0 on the master side of a pty: QoS 1 publishes not acknowledged when Dom0 says
    /// "start over" are sent again (DUP) on the new session, after the renewed SUBSCRIBE.
    #[tokio::test(flavor = "current_thread")]
    async fn in_flight_publishes_survive_a_reconnect() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        let pty = nix::pty::openpty(None, None).unwrap();
        let slave_path = nix::unistd::ttyname(pty.slave.as_fd()).unwrap();
        let mut master = std::fs::File::from(pty.master);
        let cfg = ChannelConfig {
            device: Device::Path(slave_path),
            session: SessionConfig {
                vm: VmId::parse("vm-gui").unwrap(),
                keepalive: Duration::from_secs(30),
                max_packet: 1 << 20,
            },
        };
        let (hub, rx) = Hub::new(8);
        tokio::spawn(run(cfg, rx, CancellationToken::new()));
        let (client, _from_hub) = hub.attach("test", 8, true).await.unwrap();
        client
            .subscribe(
                0,
                vec![("system/+/+/response/vm-gui".into(), QoS::AtLeastOnce)],
            )
            .await;

        // Dom0's side, blocking, in its own thread: returns what it read, in order.
        let (published_tx, published_rx) = std::sync::mpsc::channel::<()>();
        let dom0 = std::thread::spawn(move || {
            let mut seen: Vec<u8> = Vec::new();
            let wait_for =
                |master: &mut std::fs::File, seen: &mut Vec<u8>, pat: &[u8], n: usize| {
                    let mut buf = [0u8; 4096];
                    while seen.windows(pat.len()).filter(|w| *w == pat).count() < n {
                        let k = master.read(&mut buf).unwrap();
                        seen.extend_from_slice(&buf[..k]);
                    }
                };
            wait_for(&mut master, &mut seen, b"\x00\x04MQTT", 1);
            master.write_all(b"\x20\x02\x00\x00").unwrap(); // CONNACK
            published_tx.send(()).unwrap();
            wait_for(&mut master, &mut seen, b"request-1", 1); // the PUBLISH, left unacknowledged
            master.write_all(b"\xe0\x00").unwrap(); // DISCONNECT: start over
            wait_for(&mut master, &mut seen, b"\x00\x04MQTT", 2);
            master.write_all(b"\x20\x02\x00\x00").unwrap();
            wait_for(&mut master, &mut seen, b"request-1", 2); // sent again on the new session
            seen
        });
        tokio::task::spawn_blocking(move || published_rx.recv().unwrap())
            .await
            .unwrap();
        client
            .publish(
                Publication::at_least_once(
                    "system/disks/list_disks/request".into(),
                    Bytes::from_static(b"request-1"),
                ),
                None,
            )
            .await;
        let seen = tokio::task::spawn_blocking(move || dom0.join().unwrap())
            .await
            .unwrap();
        let second = seen.windows(9).rposition(|w| w == b"request-1").unwrap();
        // Walk back to the PUBLISH's first byte: 0x3A = PUBLISH, DUP, QoS 1.
        let topic_len = "system/disks/list_disks/request".len();
        let start = second - 2 - 2 - topic_len - 2;
        assert_eq!(
            seen[start],
            0x3A,
            "resent with DUP at QoS 1: {:x?}",
            &seen[start..]
        );
        let renewed_sub = seen.windows(8).filter(|w| *w == b"response").count();
        assert_eq!(renewed_sub, 2, "SUBSCRIBE renewed on the second CONNACK");
    }
}
