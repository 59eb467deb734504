//! With the embedded broker, the bridge to the operations centre (Mosquitto has its own:
//! `bridge_conf.rs`): one MQTT client of the local broker, one of the centre (TLS, persistent
//! session, the cluster's nodes in turn with the shared backoff), the routes of
//! `topics::fleet::routes` between them. What goes out waits in a bounded [`Outbox`] until the
//! centre acknowledges it; what comes in (commands) is published on the local `fleet/in/` tree
//! for the controller. The bridge's state is published on `fleet/bridge/state` (`1`, `0`) as
//! Mosquitto's bridge does, and the controller sends a fresh snapshot on every `1`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Outgoing, Packet, QoS, Transport};
use tokio_util::sync::CancellationToken;
use topics::backoff::Backoff;
use topics::fleet::{self, Direction, Route};

use crate::config::BrokerAddr;
use crate::fleet::centre::Centre;
use crate::fleet::config::FleetSettings;
use crate::fleet::outbox::Outbox;
use crate::throttle::Reports;

/// Messages unacknowledged by the centre at once.
pub const WINDOW: usize = 64;
/// The local client's id on the embedded broker: not a valid VM id (a dot), so no VM's link can
/// ever connect with it and take the forwarder's session.
pub const LOCAL_CLIENT_ID: &str = "dom0.fleet";

/// What the forwarder tells the controller's snapshots.
#[derive(Debug, Default)]
pub struct FleetStats {
    pub dropped: AtomicU64,
    pub queued: AtomicU64,
    pub queued_bytes: AtomicU64,
    pub connected: AtomicBool,
}

fn local_options(broker: &BrokerAddr, max_packet: usize) -> MqttOptions {
    let mut o = match broker {
        BrokerAddr::Tcp(hostport) => {
            let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "1883"));
            MqttOptions::new(LOCAL_CLIENT_ID, host, port.parse().unwrap_or(1883))
        }
        BrokerAddr::Unix(path) => {
            let mut o = MqttOptions::new(LOCAL_CLIENT_ID, path.display().to_string(), 0);
            o.set_transport(Transport::Unix);
            o
        }
    };
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(max_packet, max_packet);
    o.set_clean_session(true);
    o
}

struct Forwarder {
    routes: Vec<Route>,
    outbox: Outbox,
    stats: Arc<FleetStats>,
    local: AsyncClient,
    centre: AsyncClient,
    connected: bool,
    /// The budget of "dropped" lines (a guest can cause errors, and so drops).
    drops: Reports,
}

impl Forwarder {
    fn publish_stats(&self) {
        self.stats
            .dropped
            .store(self.outbox.dropped(), Ordering::Relaxed);
        self.stats
            .queued
            .store(self.outbox.queued() as u64, Ordering::Relaxed);
        self.stats
            .queued_bytes
            .store(self.outbox.bytes() as u64, Ordering::Relaxed);
        self.stats
            .connected
            .store(self.connected, Ordering::Relaxed);
    }

    /// Hands the client what the window allows.
    fn flush(&mut self) {
        if !self.connected {
            return;
        }
        for (topic, payload) in self.outbox.to_send(WINDOW) {
            if let Err(e) = self
                .centre
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
            {
                // The client's channel holds more than the window: only a broken client gets
                // here. Everything goes again after the reconnection.
                tracing::warn!(error = %e, "fleet forwarder could not hand a message to its client");
                self.outbox.connection_lost();
                break;
            }
        }
        self.publish_stats();
    }

    /// A message from the local broker: out to the centre when a route carries it.
    fn on_local(&mut self, topic: &str, payload: Bytes) {
        let remote = self
            .routes
            .iter()
            .filter(|r| r.direction == Direction::Out)
            .find_map(|r| r.to_remote(topic));
        let Some(remote) = remote else {
            return;
        };
        if !self.outbox.push(remote, payload) {
            if let Some(unreported) = self.drops.may_report(Instant::now()) {
                tracing::warn!(
                    dropped = self.outbox.dropped(),
                    "fleet queue full: the newest message for the centre dropped{unreported}"
                );
            }
        }
        self.flush();
    }

    /// A command from the centre: onto the local `fleet/in/` tree.
    fn on_centre(&mut self, topic: &str, payload: Bytes) {
        let local = self
            .routes
            .iter()
            .filter(|r| r.direction == Direction::In)
            .find_map(|r| r.to_local(topic));
        match local {
            Some(local) => {
                if let Err(e) = self
                    .local
                    .try_publish(local, QoS::AtLeastOnce, false, payload)
                {
                    tracing::warn!(error = %e, "fleet command not handed to the local broker");
                }
            }
            None => tracing::debug!(topic, "message from the centre outside this host's routes"),
        }
    }

    fn bridge_state(&self, up: bool) {
        let _ = self.local.try_publish(
            fleet::LOCAL_BRIDGE_STATE,
            QoS::AtLeastOnce,
            true,
            if up { "1" } else { "0" },
        );
    }
}

/// Runs the forwarder until `stop`.
pub async fn run(
    settings: FleetSettings,
    mut centre: Centre,
    broker: BrokerAddr,
    max_packet: usize,
    stats: Arc<FleetStats>,
    stop: CancellationToken,
) {
    let routes = fleet::routes(&settings.host, &settings.outbound);
    let (local, mut local_loop) = AsyncClient::new(local_options(&broker, max_packet), 1024);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    local_loop.set_network_options(net);
    let (centre_client, mut centre_loop) = AsyncClient::new(centre.next_options(), WINDOW * 2 + 16);
    centre_loop.set_network_options(Centre::network_options());
    let mut f = Forwarder {
        routes,
        outbox: Outbox::new(settings.queue_messages),
        stats,
        local,
        centre: centre_client,
        connected: false,
        drops: Reports::new(1.0, "fleet drops", Instant::now()),
    };
    let in_filter = f
        .routes
        .iter()
        .filter(|r| r.direction == Direction::In)
        .map(Route::remote_filter)
        .collect::<Vec<_>>();
    let mut backoff = Backoff::new();
    let mut centre_retry: Option<tokio::time::Instant> = None;
    let mut local_retry: Option<tokio::time::Instant> = None;
    let mut was_up = true;
    tracing::info!(host = %settings.host, nodes = settings.centre.len(), "fleet forwarder started");
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            ev = local_loop.poll(), if local_retry.is_none() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for r in f.routes.iter().filter(|r| r.direction == Direction::Out) {
                        let _ = f.local.try_subscribe(r.local_filter(), QoS::AtLeastOnce);
                    }
                    f.bridge_state(f.connected);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => f.on_local(&p.topic, p.payload),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "fleet forwarder lost the local broker");
                    local_retry = Some(tokio::time::Instant::now() + Duration::from_millis(200));
                }
            },
            ev = centre_loop.poll(), if centre_retry.is_none() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    tracing::info!(node = %Centre::describe(&centre_loop.mqtt_options),
                        session_present = ack.session_present, "fleet: connected to the centre");
                    backoff.reset();
                    was_up = true;
                    f.connected = true;
                    for filter in &in_filter {
                        let _ = f.centre.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    f.bridge_state(true);
                    f.flush();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => f.on_centre(&p.topic, p.payload),
                Ok(Event::Incoming(Packet::PubAck(a))) => {
                    f.outbox.acked(a.pkid);
                    f.flush();
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => f.outbox.sent(pkid),
                Ok(_) => {}
                Err(e) => {
                    if was_up {
                        tracing::warn!(node = %Centre::describe(&centre_loop.mqtt_options),
                            error = %e, queued = f.outbox.queued(),
                            "fleet: the centre is unreachable; queueing, trying the next node");
                        was_up = false;
                    } else {
                        tracing::debug!(error = %e, "fleet: centre node unreachable");
                    }
                    if f.connected {
                        f.connected = false;
                        f.bridge_state(false);
                    }
                    // What was unacknowledged goes again from the outbox, in order: the
                    // client's own replay is dropped (it forgets it on a fresh session).
                    centre_loop.pending.clear();
                    f.outbox.connection_lost();
                    f.publish_stats();
                    centre_loop.mqtt_options = centre.next_options();
                    centre_retry = Some(tokio::time::Instant::now() + backoff.next_delay());
                }
            },
            _ = sleep_until(centre_retry) => centre_retry = None,
            _ = sleep_until(local_retry) => local_retry = None,
        }
    }
    let _ = f.centre.try_disconnect();
    let _ = f.local.try_disconnect();
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_vm_can_carry_the_forwarders_client_id() {
        assert!(topics::VmId::parse(super::LOCAL_CLIENT_ID).is_err());
    }
}
