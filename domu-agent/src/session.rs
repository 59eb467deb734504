//! The MQTT 3.1.1 session over the channel tty. The codec is rumqttc's (`mqttbytes`); the session
//! logic is ours because the tty is no socket: no hangup, no EOF, stale bytes, lost bytes.
//!
//! - After each CONNECT, bytes are discarded until a well-formed CONNACK (stale bytes from an old
//!   session, Dom0's attach signal).
//! - A DISCONNECT from Dom0 (its attach signal, or the end of a session it dropped) means "start
//!   over": a new CONNECT at once.
//! - Keepalive is short (default 5 s); a PINGREQ left unanswered for a keepalive means the link is
//!   dead: reconnect with backoff. No CONNACK within 2 s: CONNECT again.
//! - Subscriptions are renewed on every CONNACK; QoS 1 publishes not yet acknowledged are sent
//!   again after a reconnect, so requests and responses in flight are not lost.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish, Subscribe, SubscribeFilter};
use rumqttc::mqttbytes::{self, QoS};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use topics::vm::VmId;

use crate::tty::{Device, Tty};

/// Settings of the session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub vm: VmId,
    pub device: Device,
    pub keepalive: Duration,
    /// Largest packet sent or accepted (Base64 payloads of create_file are large).
    pub max_packet: usize,
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

/// QoS 1 publishes waiting for PUBACK at most; beyond, the application waits.
const MAX_INFLIGHT: usize = 64;
const CONNACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Finds a well-formed CONNACK (`20 02 0s rc`) in `buf`: its offset and return code.
pub fn find_connack(buf: &[u8]) -> Option<(usize, u8)> {
    buf.windows(4)
        .position(|w| w[0] == 0x20 && w[1] == 0x02 && w[2] <= 1 && w[3] <= 5)
        .and_then(|i| buf.get(i + 3).map(|rc| (i, *rc)))
}

/// Exponential backoff, 100 ms to 5 s.
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        d
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
}

/// Why a connection ended.
enum End {
    Stop,
    /// Reconnect at once (Dom0 said so).
    Now,
    /// Reconnect after a backoff.
    Later,
    /// The tty failed: reopen it.
    Reopen,
}

/// The session's state across connections.
struct State {
    cfg: SessionConfig,
    next_pkid: u16,
    /// Unacknowledged QoS 1 publishes, by packet id, in send order.
    inflight: BTreeMap<u16, Bytes>,
    order: VecDeque<u16>,
}

impl State {
    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }
}

fn encode(p: &Packet, max: usize) -> Option<BytesMut> {
    let mut out = BytesMut::new();
    match p.write(&mut out, max) {
        Ok(_) => Some(out),
        Err(e) => {
            tracing::warn!(error = %e, "packet not sent");
            None
        }
    }
}

/// Runs the session until `stop`: opens the tty, connects, relays, reconnects.
pub async fn run(
    cfg: SessionConfig,
    mut rx: mpsc::Receiver<ToSession>,
    tx: mpsc::Sender<FromSession>,
    mut stop: watch::Receiver<bool>,
) {
    let mut st = State {
        cfg,
        next_pkid: 0,
        inflight: BTreeMap::new(),
        order: VecDeque::new(),
    };
    let mut backoff = Backoff(Duration::from_millis(100));
    'device: loop {
        let Some(tty) = Tty::open_wait(&st.cfg.device, &mut stop).await else {
            return;
        };
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            match connection(
                &mut st,
                &tty,
                &mut buf,
                &mut rx,
                &tx,
                &mut stop,
                &mut backoff,
            )
            .await
            {
                End::Stop => return,
                End::Now => continue,
                End::Later => {
                    let d = backoff.next();
                    tokio::select! {
                        _ = sleep(d) => {}
                        _ = stop.changed() => return,
                    }
                }
                End::Reopen => {
                    tokio::select! {
                        _ = sleep(backoff.next()) => {}
                        _ = stop.changed() => return,
                    }
                    continue 'device;
                }
            }
        }
    }
}

/// One connection: CONNECT, wait for CONNACK, then relay until it ends.
async fn connection(
    st: &mut State,
    tty: &Tty,
    buf: &mut BytesMut,
    rx: &mut mpsc::Receiver<ToSession>,
    tx: &mpsc::Sender<FromSession>,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
) -> End {
    let max = st.cfg.max_packet;
    let keepalive = st.cfg.keepalive;
    let mut connect = Connect::new(st.cfg.vm.as_str());
    connect.keep_alive = u16::try_from(keepalive.as_secs())
        .unwrap_or(u16::MAX)
        .max(1);
    connect.clean_session = true;
    let Some(bytes) = encode(&Packet::Connect(connect), max) else {
        return End::Stop;
    };
    if tty.write_all(&bytes).await.is_err() {
        return End::Reopen;
    }

    // Discard until a well-formed CONNACK.
    let deadline = Instant::now() + CONNACK_TIMEOUT;
    let mut chunk = vec![0u8; 64 * 1024];
    let rc = loop {
        if let Some((at, rc)) = find_connack(buf) {
            let _ = buf.split_to(at + 4);
            break rc;
        }
        // Keep only what could be the start of a CONNACK.
        if buf.len() > 3 {
            let keep = buf.len() - 3;
            let _ = buf.split_to(keep);
        }
        tokio::select! {
            r = timeout(deadline.saturating_duration_since(Instant::now()), tty.read(&mut chunk)) => match r {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                Ok(Ok(_)) | Ok(Err(_)) => return End::Reopen,
                Err(_) => {
                    tracing::debug!("no CONNACK; sending CONNECT again");
                    return End::Later;
                }
            },
            _ = stop.changed() => return End::Stop,
        }
    };
    if rc != 0 {
        tracing::warn!(vm = %st.cfg.vm, rc, "Dom0 refused the session");
        return End::Later;
    }
    tracing::info!(vm = %st.cfg.vm, "session up");
    backoff.reset();

    // Renew subscriptions; resend what was in flight.
    if !st.cfg.subscriptions.is_empty() {
        let filters: Vec<SubscribeFilter> = st
            .cfg
            .subscriptions
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
            .collect();
        let mut sub = Subscribe::new_many(filters);
        sub.pkid = st.pkid();
        let Some(bytes) = encode(&Packet::Subscribe(sub), max) else {
            return End::Stop;
        };
        if tty.write_all(&bytes).await.is_err() {
            return End::Reopen;
        }
    }
    for id in st.order.clone() {
        if let Some(p) = st.inflight.get(&id) {
            let mut again = BytesMut::from(&p[..]);
            if let Some(b) = again.first_mut() {
                *b |= 0x08; // DUP
            }
            if tty.write_all(&again).await.is_err() {
                return End::Reopen;
            }
        }
    }
    if tx.send(FromSession::Connected).await.is_err() {
        return End::Stop;
    }

    let mut last_write = Instant::now();
    let mut pings: VecDeque<(Instant, Option<oneshot::Sender<Duration>>)> = VecDeque::new();
    loop {
        // Frame what we have.
        let mut acks = BytesMut::new();
        loop {
            match Packet::read(buf, max) {
                Ok(p) => match p {
                    Packet::Publish(p) => {
                        if p.qos == QoS::AtLeastOnce {
                            // Acknowledged after the batch is handed over: the message first.
                            let _ = Packet::PubAck(PubAck::new(p.pkid)).write(&mut acks, max);
                        }
                        let msg = FromSession::Publish {
                            topic: p.topic,
                            payload: p.payload,
                        };
                        if tx.send(msg).await.is_err() {
                            return End::Stop;
                        }
                    }
                    Packet::PubAck(a) if st.inflight.remove(&a.pkid).is_some() => {
                        st.order.retain(|id| *id != a.pkid);
                    }
                    Packet::SubAck(s) => {
                        for (f, code) in st.cfg.subscriptions.iter().zip(&s.return_codes) {
                            if matches!(code, mqttbytes::v4::SubscribeReasonCode::Failure) {
                                tracing::warn!(filter = %f, "subscription refused by Dom0's policy");
                            }
                        }
                    }
                    Packet::PingResp => {
                        if let Some((t, Some(reply))) = pings.pop_front() {
                            let _ = reply.send(t.elapsed());
                        }
                    }
                    Packet::Disconnect => {
                        tracing::info!(vm = %st.cfg.vm, "Dom0 asked to start over");
                        buf.clear();
                        return End::Now;
                    }
                    _ => {}
                },
                Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable bytes from Dom0; reconnecting");
                    buf.clear();
                    return End::Now;
                }
            }
        }

        if !acks.is_empty() {
            if tty.write_all(&acks).await.is_err() {
                return End::Reopen;
            }
            last_write = Instant::now();
        }
        let next_ping = match pings.front() {
            Some((t, _)) => *t + keepalive,
            None => last_write + keepalive,
        };
        tokio::select! {
            _ = stop.changed() => {
                if let Some(d) = encode(&Packet::Disconnect, max) {
                    let _ = timeout(Duration::from_millis(200), tty.write_all(&d)).await;
                }
                return End::Stop;
            }
            r = tty.read(&mut chunk) => match r {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return End::Reopen,
            },
            m = rx.recv(), if st.inflight.len() < MAX_INFLIGHT => {
                let Some(m) = m else { return End::Stop };
                let bytes = match m {
                    ToSession::Publish { topic, payload, qos } => {
                        let mut p = Publish::from_bytes(topic, qos, payload);
                        if qos != QoS::AtMostOnce {
                            p.pkid = st.pkid();
                        }
                        let pkid = p.pkid;
                        let Some(bytes) = encode(&Packet::Publish(p), max) else { continue };
                        let bytes = bytes.freeze();
                        if qos != QoS::AtMostOnce {
                            st.inflight.insert(pkid, bytes.clone());
                            st.order.push_back(pkid);
                        }
                        bytes
                    }
                    ToSession::Ping(reply) => {
                        pings.push_back((Instant::now(), Some(reply)));
                        encode(&Packet::PingReq, max).map(BytesMut::freeze).unwrap_or_default()
                    }
                };
                if tty.write_all(&bytes).await.is_err() {
                    return End::Reopen;
                }
                last_write = Instant::now();
            }
            _ = sleep_until(next_ping) => {
                if pings.front().is_some_and(|(t, _)| t.elapsed() >= keepalive) {
                    tracing::warn!(vm = %st.cfg.vm, "no PINGRESP from Dom0; reconnecting");
                    return End::Later;
                }
                let Some(p) = encode(&Packet::PingReq, max) else { return End::Stop };
                if tty.write_all(&p).await.is_err() {
                    return End::Reopen;
                }
                pings.push_back((Instant::now(), None));
                last_write = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connack_is_found_after_stale_bytes() {
        assert_eq!(find_connack(b"\x20\x02\x00\x00"), Some((0, 0)));
        assert_eq!(
            find_connack(b"\xe0\x00\x30\x03\x00\x01a\x20\x02\x01\x00"),
            Some((7, 0))
        );
        assert_eq!(find_connack(b"\x20\x02\x00\x02"), Some((0, 2)));
        assert_eq!(
            find_connack(b"\x20\x02\x02\x00"),
            None,
            "reserved flag bits"
        );
        assert_eq!(
            find_connack(b"\x20\x02\x00\x09"),
            None,
            "unknown return code"
        );
        assert_eq!(find_connack(b"\x20\x02\x00"), None);
    }

    /// Plays Dom0 on the master side of a pty: QoS 1 publishes not acknowledged when Dom0 says
    /// "start over" are sent again (DUP) on the new session, after the renewed SUBSCRIBE.
    #[tokio::test(flavor = "current_thread")]
    async fn in_flight_publishes_survive_a_reconnect() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        let pty = nix::pty::openpty(None, None).unwrap();
        let slave_path = nix::unistd::ttyname(pty.slave.as_fd()).unwrap();
        let mut master = std::fs::File::from(pty.master);
        let cfg = SessionConfig {
            vm: VmId::parse("vm-gui").unwrap(),
            device: Device::Path(slave_path),
            keepalive: Duration::from_secs(30),
            max_packet: 1 << 20,
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

    #[test]
    fn backoff_doubles_to_five_seconds() {
        let mut b = Backoff(Duration::from_millis(100));
        let d: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(d, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }
}
