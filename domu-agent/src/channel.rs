//! The I/O driver of the agent's session: owns the channel tty (opened, waited for, reopened) and
//! the timers, moves bytes between the tty and the [`Session`], and hands what the session reports
//! to the application. All MQTT logic is in `session.rs`.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tracing::Instrument;

use crate::session::{Event, Session, SessionConfig};
use crate::tty::{Device, Tty};

/// Settings of the channel: where the tty is, the session, and its standing subscriptions.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    pub device: Device,
    pub session: SessionConfig,
    /// Filters subscribed to on every CONNACK.
    pub subscriptions: Vec<String>,
}

/// What the application asks of the session.
#[derive(Debug)]
pub enum ToSession {
    Publish {
        topic: String,
        payload: Bytes,
        qos: QoS,
    },
    /// Send a PINGREQ and report the time to its PINGRESP (the messaging benchmark).
    Ping(oneshot::Sender<Duration>),
}

/// What the session tells the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromSession {
    /// A session is up (after each CONNACK).
    Connected,
    Publish {
        topic: String,
        payload: Bytes,
    },
}

/// Why the tty loop ended.
enum End {
    Stop,
    /// The tty failed: reopen it.
    Reopen,
}

/// Runs the session until `stop`: opens the tty, connects, relays, reconnects.
pub async fn run(
    cfg: ChannelConfig,
    rx: mpsc::Receiver<ToSession>,
    tx: mpsc::Sender<FromSession>,
    stop: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("session", vm = %cfg.session.vm);
    drive(cfg, rx, tx, stop).instrument(span).await
}

async fn drive(
    cfg: ChannelConfig,
    mut rx: mpsc::Receiver<ToSession>,
    tx: mpsc::Sender<FromSession>,
    mut stop: watch::Receiver<bool>,
) {
    let mut d = Driver {
        session: Session::new(cfg.session, Instant::now()),
        probes: HashMap::new(),
        next_probe: 0,
        tx,
    };
    for f in cfg.subscriptions {
        d.session.subscribe(f, QoS::AtLeastOnce);
    }
    loop {
        let Some(tty) = Tty::open_wait(&cfg.device, &mut stop).await else {
            return;
        };
        match d.attached(&tty, &mut rx, &mut stop).await {
            End::Stop => return,
            End::Reopen => {
                let (delay, events) = d.session.closed();
                if !d.hand_over(events).await {
                    return;
                }
                tokio::select! {
                    _ = sleep(delay) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

struct Driver {
    session: Session,
    /// Benchmark probes waiting for their PINGRESP.
    probes: HashMap<u64, oneshot::Sender<Duration>>,
    next_probe: u64,
    tx: mpsc::Sender<FromSession>,
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl Driver {
    /// Hands the session's events to the application; false when the application is gone.
    async fn hand_over(&mut self, events: Vec<Event>) -> bool {
        for ev in events {
            let msg = match ev {
                Event::Up => FromSession::Connected,
                Event::Message { topic, payload, .. } => FromSession::Publish { topic, payload },
                Event::Pong { probe, rtt } => {
                    if let Some(reply) = self.probes.remove(&probe) {
                        let _ = reply.send(rtt);
                    }
                    continue;
                }
                // Probes of a session that is gone are never answered: their callers hear so.
                Event::Down => {
                    self.probes.clear();
                    continue;
                }
                Event::Acked(_) | Event::SubAcked(_) => continue,
            };
            if self.tx.send(msg).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Serves one opening of the tty until it fails or the agent stops.
    async fn attached(
        &mut self,
        tty: &Tty,
        rx: &mut mpsc::Receiver<ToSession>,
        stop: &mut watch::Receiver<bool>,
    ) -> End {
        let mut events = self.session.open(Instant::now());
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            // The messages first, then their acknowledgements (in the output).
            if !self.hand_over(events).await {
                return End::Stop;
            }
            let out = self.session.take_output();
            if !out.is_empty() && tty.write_all(&out).await.is_err() {
                return End::Reopen;
            }
            let deadline = self.session.next_deadline();
            let accepts = self.session.accepts_publish();
            events = tokio::select! {
                _ = stop.changed() => {
                    self.session.stop();
                    let out = self.session.take_output();
                    let _ = timeout(Duration::from_millis(200), tty.write_all(&out)).await;
                    return End::Stop;
                }
                r = tty.read(&mut chunk) => match r {
                    Ok(n) if n > 0 => self.session.on_input(chunk.get(..n).unwrap_or_default(), Instant::now()),
                    _ => return End::Reopen,
                },
                m = rx.recv(), if accepts => match m {
                    None => return End::Stop,
                    Some(ToSession::Publish { topic, payload, qos }) => {
                        if let Err(e) = self.session.publish(topic, payload, qos, false, Instant::now()) {
                            tracing::warn!(error = %e, "message not sent");
                        }
                        Vec::new()
                    }
                    Some(ToSession::Ping(reply)) => {
                        self.next_probe += 1;
                        if self.session.ping(self.next_probe, Instant::now()) {
                            self.probes.insert(self.next_probe, reply);
                        }
                        Vec::new()
                    }
                },
                _ = sleep_until_opt(deadline) => self.session.on_tick(Instant::now()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            subscriptions: vec!["system/+/+/response/vm-gui".into()],
        };
        let (to_session, rx) = mpsc::channel(8);
        let (tx, mut from_session) = mpsc::channel(8);
        let (_stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(run(cfg, rx, tx, stop_rx));

        // Dom0's side, blocking, in its own thread: returns what it read, in order.
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
            wait_for(&mut master, &mut seen, b"request-1", 1); // the PUBLISH, left unacknowledged
            master.write_all(b"\xe0\x00").unwrap(); // DISCONNECT: start over
            wait_for(&mut master, &mut seen, b"\x00\x04MQTT", 2);
            master.write_all(b"\x20\x02\x00\x00").unwrap();
            wait_for(&mut master, &mut seen, b"request-1", 2); // sent again on the new session
            seen
        });
        assert_eq!(from_session.recv().await, Some(FromSession::Connected));
        to_session
            .send(ToSession::Publish {
                topic: "system/disks/list_disks/request".into(),
                payload: Bytes::from_static(b"request-1"),
                qos: QoS::AtLeastOnce,
            })
            .await
            .unwrap();
        assert_eq!(
            from_session.recv().await,
            Some(FromSession::Connected),
            "reconnected"
        );
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
