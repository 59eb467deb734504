//! The hub: the one path from the agent's clients (the guest's MQTT applications, the service,
//! the `call` and legacy requests) to the channel session. Its API ([`Hub`], [`Client`], what
//! they say to each other); the multiplexer of subscriptions and deliveries (`mux`, pure); and the
//! driver that owns the tty and carries out what the session and the multiplexer decide
//! (`driver`).
//!
//! A client that does not take its messages (its queue is full) is dropped alone; the agent's own
//! clients are `lossless`: the hub waits for them (they hand work off at once).

pub mod driver;
pub mod mux;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::sync::{mpsc, oneshot};

pub use driver::{MAX_HELD, run};
use mux::ClientId;

pub use crate::uplink::session::Publication;
use crate::uplink::session::SessionConfig;
use crate::uplink::tty::Device;

/// Settings of the channel: where the tty is, and the session.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    pub device: Device,
    pub session: SessionConfig,
}

/// What a client asks of the hub.
#[derive(Debug)]
pub enum ToHub {
    Attach {
        client: ClientId,
        /// Its name in logs (a local MQTT client id, or `service`).
        name: String,
        to_client: mpsc::Sender<ToClient>,
        /// Never dropped for a full queue: the hub waits.
        lossless: bool,
    },
    Detach(ClientId),
    Publish {
        client: ClientId,
        publication: Publication,
        /// The client's packet id, to acknowledge once Dom0 did (QoS > 0).
        pkid: Option<u16>,
    },
    Subscribe {
        client: ClientId,
        pkid: u16,
        filters: Vec<(String, QoS)>,
    },
    Unsubscribe {
        client: ClientId,
        pkid: u16,
        filters: Vec<String>,
    },
    /// A PINGREQ whose round trip is reported (the messaging benchmark).
    Ping(oneshot::Sender<Duration>),
}

/// What the hub tells a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToClient {
    Message {
        topic: String,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    },
    /// Dom0 acknowledged the client's publish with this packet id.
    PubAck(u16),
    SubAck {
        pkid: u16,
        codes: Vec<Option<QoS>>,
    },
    UnsubAck(u16),
    /// The hub dropped the client.
    Closed(String),
    /// The session with Dom0 is up (again): told to the agent's own (lossless) clients, so the
    /// service announces its components.
    SessionUp,
}

/// The handle clients use to reach the hub.
#[derive(Debug, Clone)]
pub struct Hub {
    tx: mpsc::Sender<ToHub>,
    next: Arc<AtomicU64>,
}

/// One attached client. Detached when dropped.
#[derive(Debug)]
pub struct Client {
    id: ClientId,
    tx: mpsc::Sender<ToHub>,
}

impl Hub {
    /// A hub handle and the receiver the driver ([`run`]) serves.
    pub fn new(capacity: usize) -> (Hub, mpsc::Receiver<ToHub>) {
        let (tx, rx) = mpsc::channel(capacity);
        let hub = Hub {
            tx,
            next: Arc::new(AtomicU64::new(1)),
        };
        (hub, rx)
    }

    /// Attaches a client with a queue of `queue` messages. None when the hub is gone.
    pub async fn attach(
        &self,
        name: &str,
        queue: usize,
        lossless: bool,
    ) -> Option<(Client, mpsc::Receiver<ToClient>)> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (to_client, rx) = mpsc::channel(queue.max(1));
        self.tx
            .send(ToHub::Attach {
                client: id,
                name: name.to_owned(),
                to_client,
                lossless,
            })
            .await
            .ok()?;
        Some((
            Client {
                id,
                tx: self.tx.clone(),
            },
            rx,
        ))
    }

    /// A round trip to Dom0 and back (PINGREQ → PINGRESP). None without a session.
    pub async fn ping(&self) -> Option<Duration> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(ToHub::Ping(tx)).await.ok()?;
        rx.await.ok()
    }
}

impl Client {
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// Publishes; false when the hub is gone.
    pub async fn publish(&self, publication: Publication, pkid: Option<u16>) -> bool {
        self.send(ToHub::Publish {
            client: self.id,
            publication,
            pkid,
        })
        .await
    }

    pub async fn subscribe(&self, pkid: u16, filters: Vec<(String, QoS)>) -> bool {
        self.send(ToHub::Subscribe {
            client: self.id,
            pkid,
            filters,
        })
        .await
    }

    pub async fn unsubscribe(&self, pkid: u16, filters: Vec<String>) -> bool {
        self.send(ToHub::Unsubscribe {
            client: self.id,
            pkid,
            filters,
        })
        .await
    }

    async fn send(&self, m: ToHub) -> bool {
        self.tx.send(m).await.is_ok()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // If the hub's queue is full, the hub notices the client is gone at its next delivery.
        let _ = self.tx.try_send(ToHub::Detach(self.id));
    }
}
