//! The local MQTT endpoint: the guest's applications connect here (a UNIX socket, and optionally a
//! loopback TCP listener) with any MQTT 3.1.1 client, and reach Dom0 through the agent's one
//! session. Each connection is a task that moves bytes between its socket and a
//! [`LocalSession`], and talks to the hub as one of its clients. Bounds: a maximum number of
//! clients, a queue per client (one that does not read is dropped alone), the packet size of the
//! channel.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::endpoints::admission::{Admitted, Gate, Pending, Quiet, accept_loop};
use crate::endpoints::mqtt_session::{CloseReason, Closed, LocalEvent, LocalLimits, LocalSession};
use crate::hub::{Client, Hub, ToClient};
use crate::optional::or_never;

/// Settings of the endpoint.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Clients connected at once; one more is answered "server unavailable".
    pub max_clients: usize,
    /// Messages queued for one client before it is dropped.
    pub queue: usize,
    pub limits: LocalLimits,
}

/// What every connection shares.
#[derive(Debug)]
struct Shared {
    hub: Hub,
    cfg: EndpointConfig,
    /// Clients counted once their CONNECT arrived; as many waiting for it (oldest closed first).
    gate: Arc<Gate>,
}

/// The endpoint's listeners.
#[derive(Debug)]
pub struct Listeners {
    pub unix: Option<(UnixListener, PathBuf)>,
    pub tcp: Option<TcpListener>,
}

/// Serves the listeners until `stop`; removes the UNIX socket.
pub async fn serve(listeners: Listeners, hub: Hub, cfg: EndpointConfig, stop: CancellationToken) {
    let gate = Gate::new("mqtt", cfg.max_clients, cfg.max_clients);
    let shared = Arc::new(Shared { hub, cfg, gate });
    let (unix, tcp) = (listeners.unix, listeners.tcp);
    let on_unix = async {
        if let Some((l, path)) = unix {
            let (shared, stop) = (shared.clone(), stop.clone());
            accept_loop(
                "mqtt",
                l,
                Some(path),
                shared.gate.clone(),
                stop.clone(),
                |s, pending| {
                    connection(s, "unix".to_owned(), pending, shared.clone(), stop.clone())
                },
            )
            .await;
        }
    };
    let on_tcp = async {
        if let Some(l) = tcp {
            let (shared, stop) = (shared.clone(), stop.clone());
            accept_loop(
                "mqtt",
                l,
                None,
                shared.gate.clone(),
                stop.clone(),
                |(s, peer), pending| {
                    connection(s, peer.to_string(), pending, shared.clone(), stop.clone())
                },
            )
            .await;
        }
    };
    tokio::join!(on_unix, on_tcp);
}

/// One local client's connection, until it ends or the agent stops.
async fn connection<S>(
    stream: S,
    peer: String,
    pending: Pending,
    shared: Arc<Shared>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut c = Conn {
        ls: LocalSession::new(shared.cfg.limits.clone(), Instant::now()),
        client: None,
        rx: None,
        name: peer,
        admission: Admission::Pending(pending),
    };
    let closed = c.run(stream, &shared, stop).await;
    if let Some(closed) = closed {
        if closed.reason.is_routine() {
            tracing::debug!(client = %c.name, reason = %closed.reason, "local client left");
        } else {
            // Bad bytes, a client that does not read, silence: that client's fault, said once a
            // second at most.
            static SAID: Quiet = Quiet::new();
            if let Some(unsaid) = SAID.may_say() {
                tracing::warn!(client = %c.name, reason = %closed.reason, unsaid, "local client closed");
            }
        }
        if let (Some(w), Some(client)) = (closed.will, c.client.as_ref()) {
            client.publish(w, None).await;
        }
    }
    // Dropping the client detaches it from the hub.
}

struct Conn {
    ls: LocalSession,
    client: Option<Client>,
    rx: Option<mpsc::Receiver<ToClient>>,
    /// The peer, then the client id once known (logs).
    name: String,
    /// Waiting for its CONNECT, or a client counted against the maximum.
    admission: Admission,
}

/// Where a connection stands with the endpoint's gate.
#[derive(Debug)]
enum Admission {
    Pending(Pending),
    Client(#[allow(dead_code)] Admitted),
    /// Between the two (its CONNECT is being decided).
    Deciding,
}

async fn evicted(a: &mut Admission) {
    match a {
        Admission::Pending(p) => {
            let _ = (&mut p.evicted).await;
        }
        _ => std::future::pending().await,
    }
}

impl Conn {
    /// Returns how the connection ended (None when the agent stops).
    async fn run<S>(
        &mut self,
        stream: S,
        shared: &Shared,
        stop: CancellationToken,
    ) -> Option<Closed>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut r, mut w) = tokio::io::split(stream);
        let mut buf = vec![0u8; 16 * 1024];
        // Bytes for the client: taken from the session at once, written as the client reads. The
        // hub's queue is drained meanwhile, so a slow reader is measured in bytes here.
        let mut out = BytesMut::new();
        loop {
            out.extend_from_slice(&self.ls.take_output());
            let step = if out.len() > shared.cfg.limits.max_output {
                Err(Closed {
                    reason: CloseReason::NotReading,
                    will: None,
                })
            } else {
                let deadline = self.ls.next_deadline();
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = evicted(&mut self.admission) => Err(Closed {
                        reason: CloseReason::Evicted,
                        will: None,
                    }),
                    n = r.read(&mut buf) => match n {
                        Ok(0) | Err(_) => Err(self.ls.lost()),
                        Ok(n) => match self.ls.on_input(buf.get(..n).unwrap_or_default(), Instant::now()) {
                            Ok(events) => self.events(events, shared).await,
                            Err(c) => Err(c),
                        },
                    },
                    n = w.write(&out), if !out.is_empty() => match n {
                        Ok(n) if n > 0 => {
                            out.advance(n);
                            Ok(())
                        }
                        _ => Err(self.ls.lost()),
                    },
                    m = or_never(self.rx.as_mut().map(|rx| rx.recv())) => {
                        // Everything already queued goes into the same write.
                        let mut r = self.on_hub(m);
                        while r.is_ok() {
                            match self.rx.as_mut().map(mpsc::Receiver::try_recv) {
                                Some(Ok(m)) => r = self.on_hub(Some(m)),
                                _ => break,
                            }
                        }
                        r
                    }
                    _ = or_never(deadline.map(sleep_until)) => self.ls.on_tick(Instant::now()),
                }
            };
            if let Err(closed) = step {
                // What the session said last (a CONNACK refusal) goes out before closing.
                out.extend_from_slice(&self.ls.take_output());
                if !out.is_empty() && closed.reason != CloseReason::NotReading {
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_millis(200),
                        w.write_all(&out),
                    )
                    .await;
                }
                let _ = w.shutdown().await;
                return Some(closed);
            }
        }
    }

    async fn events(&mut self, events: Vec<LocalEvent>, shared: &Shared) -> Result<(), Closed> {
        let mut queue = std::collections::VecDeque::from(events);
        while let Some(ev) = queue.pop_front() {
            match ev {
                LocalEvent::Connect { client_id } => {
                    let admitted = match std::mem::replace(&mut self.admission, Admission::Deciding)
                    {
                        Admission::Pending(p) => p.admit(),
                        _ => None,
                    };
                    let Some(admitted) = admitted else {
                        return Err(self.ls.refuse());
                    };
                    self.admission = Admission::Client(admitted);
                    if !client_id.is_empty() {
                        self.name = client_id;
                    }
                    let Some((client, rx)) =
                        shared.hub.attach(&self.name, shared.cfg.queue, false).await
                    else {
                        return Err(Closed {
                            reason: CloseReason::Stopping,
                            will: None,
                        });
                    };
                    self.client = Some(client);
                    self.rx = Some(rx);
                    queue.extend(self.ls.accept(Instant::now())?);
                }
                LocalEvent::Publish { publication, pkid } => {
                    if let Some(c) = &self.client {
                        c.publish(publication, pkid).await;
                    }
                }
                LocalEvent::Subscribe { pkid, filters } => {
                    if let Some(c) = &self.client {
                        c.subscribe(pkid, filters).await;
                    }
                }
                LocalEvent::Unsubscribe { pkid, filters } => {
                    if let Some(c) = &self.client {
                        c.unsubscribe(pkid, filters).await;
                    }
                }
            }
        }
        // The client's end, when it came in the same read as these events.
        match self.ls.take_closed() {
            Some(c) => Err(c),
            None => Ok(()),
        }
    }

    fn on_hub(&mut self, m: Option<ToClient>) -> Result<(), Closed> {
        match m {
            Some(ToClient::Message {
                topic,
                payload,
                qos,
                retain,
            }) => self.ls.deliver(topic, payload, qos, retain),
            Some(ToClient::PubAck(pkid)) => {
                self.ls.acked(pkid);
                Ok(())
            }
            Some(ToClient::SubAck { pkid, codes }) => {
                self.ls.suback(pkid, &codes);
                Ok(())
            }
            Some(ToClient::UnsubAck(pkid)) => {
                self.ls.unsuback(pkid);
                Ok(())
            }
            Some(ToClient::Closed(why)) => Err(Closed {
                reason: CloseReason::Dropped(why),
                will: None,
            }),
            Some(ToClient::SessionUp) => Ok(()),
            None => Err(Closed {
                reason: CloseReason::Stopping,
                will: None,
            }),
        }
    }
}
