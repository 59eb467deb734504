//! What the Dom0 controller does for the fleet: the centre's commands (`commands.rs`), and the
//! host's supervision snapshot — every `snapshot_secs`, and again whenever the bridge to the
//! centre comes up (Mosquitto's bridge or the forwarder says `1` on `fleet/bridge/state`).
//! Messages in, messages to publish out; the controller is the driver.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use topics::RequestId;
use topics::fleet::{self, Snapshot};

use crate::bench::Reply;
use crate::fleet::commands::Relay;
use crate::fleet::config::FleetSettings;
use crate::fleet::forwarder::FleetStats;
use crate::supervision::Supervision;

/// Mosquitto's count of the publishes it dropped (queues full), broker-wide: with Mosquitto, what
/// its bridge dropped is among them.
pub const MOSQUITTO_DROPPED: &str = "$SYS/broker/publish/messages/dropped";

/// The controller's fleet duties.
#[derive(Debug)]
pub struct Duties {
    settings: FleetSettings,
    relay: Relay,
    /// The forwarder's figures (embedded broker); None with Mosquitto.
    stats: Option<Arc<FleetStats>>,
    /// Mosquitto's dropped publishes, as last heard.
    broker_dropped: u64,
    next_snapshot: Instant,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Duties {
    pub fn new(settings: FleetSettings, stats: Option<Arc<FleetStats>>, now: Instant) -> Duties {
        Duties {
            next_snapshot: now + settings.snapshot_every,
            settings,
            relay: Relay::default(),
            stats,
            broker_dropped: 0,
        }
    }

    /// What the controller subscribes to for the fleet.
    pub fn filters(&self) -> Vec<String> {
        let mut f = vec![
            fleet::local_commands(),
            topics::filter::responses_to(topics::vm::FLEET),
            fleet::LOCAL_BRIDGE_STATE.to_owned(),
        ];
        if self.stats.is_none() {
            f.push(MOSQUITTO_DROPPED.to_owned());
        }
        f
    }

    /// A message the controller received: the fleet's replies, or None when it is not the
    /// fleet's.
    pub fn on_publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        supervision: &Supervision,
        now: Instant,
        new_id: impl FnOnce() -> RequestId,
    ) -> Option<Vec<Reply>> {
        if topic == fleet::LOCAL_BRIDGE_STATE {
            return Some(if payload == b"1" {
                tracing::info!("fleet: bridge to the centre up; snapshot sent");
                self.snapshot(supervision, now)
            } else {
                Vec::new()
            });
        }
        if topic == MOSQUITTO_DROPPED {
            if let Some(n) = std::str::from_utf8(payload)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                self.broker_dropped = n;
            }
            return Some(Vec::new());
        }
        if fleet::local_command(topic).is_some() {
            let reply = self.relay.command(
                topic,
                payload,
                &self.settings.allow,
                self.settings.max_age,
                (now, now_ms()),
                new_id(),
            );
            return Some(reply.into_iter().collect());
        }
        if topics::filter::filter_matches(&topics::filter::responses_to(topics::vm::FLEET), topic) {
            return Some(
                self.relay
                    .response(topic, payload, now)
                    .into_iter()
                    .collect(),
            );
        }
        None
    }

    /// Timers: unanswered commands, the periodic snapshot.
    pub fn tick(&mut self, supervision: &Supervision, now: Instant) -> Vec<Reply> {
        let mut out = self.relay.expire(now);
        if now >= self.next_snapshot {
            out.extend(self.snapshot(supervision, now));
        }
        out
    }

    pub fn next_deadline(&self) -> Instant {
        self.relay
            .next_deadline()
            .map_or(self.next_snapshot, |d| d.min(self.next_snapshot))
    }

    /// The host's snapshot, then each VM's counters on its own topic (for metrics exporters).
    fn snapshot(&mut self, supervision: &Supervision, now: Instant) -> Vec<Reply> {
        self.next_snapshot = now + self.settings.snapshot_every;
        let (dropped, queued, bytes) = match &self.stats {
            Some(s) => (
                s.dropped.load(Ordering::Relaxed),
                Some(s.queued.load(Ordering::Relaxed)),
                Some(s.queued_bytes.load(Ordering::Relaxed)),
            ),
            None => (self.broker_dropped, None, None),
        };
        let s = Snapshot {
            host: self.settings.host.to_string(),
            datetime: topics::rfc3339_now(),
            at_ms: now_ms(),
            broker: if self.stats.is_some() {
                "embedded"
            } else {
                "external"
            }
            .into(),
            links: supervision.counters(),
            outbound_dropped: dropped,
            outbound_queued: queued,
            outbound_queued_bytes: bytes,
        };
        let per_vm = s.links.iter().map(|l| Reply {
            topic: fleet::local_metrics(&l.vm),
            body: serde_json::to_vec(l).unwrap_or_default(),
        });
        let mut out = vec![Reply {
            topic: fleet::local_snapshot(),
            body: serde_json::to_vec(&s).unwrap_or_default(),
        }];
        out.extend(per_vm);
        out
    }
}
