//! What Dom0 knows about its links: the registry of VMs, their counters, and the events the links
//! report to the controller (state changes, refusals).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use topics::payload::{Component, LinkCounters, LinkState};
use topics::vm::VmId;

use crate::session::Counters;

/// One link's counters, updated by the link without locks (it adds its session's [`Counters`]).
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Dom0 is attached to the channel socket.
    pub linked: AtomicBool,
    /// An MQTT session is up.
    pub session: AtomicBool,
    pub packets_in: AtomicU64,
    pub packets_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub refused: AtomicU64,
    pub dropped: AtomicU64,
    /// Bytes discarded while scanning for CONNECT.
    pub garbage_bytes: AtomicU64,
    /// Requests not delivered: past their deadline.
    pub expired: AtomicU64,
    /// Messages for the VM that the broker dropped, its queue full while its link was away.
    pub overflowed: AtomicU64,
    /// Seconds since the epoch when the current session came up (0: none).
    pub session_since: AtomicU64,
    /// The last refusal or session loss, for `dom0-broker status`.
    pub last_error: Mutex<Option<String>>,
    /// What the VM announced (`system/components/announce/notification`), until its link goes.
    pub components: Mutex<Vec<Component>>,
}

impl LinkStats {
    pub fn snapshot(&self, vm: &VmId) -> LinkCounters {
        LinkCounters {
            vm: vm.to_string(),
            linked: self.linked.load(Relaxed),
            session: self.session.load(Relaxed),
            packets_in: self.packets_in.load(Relaxed),
            packets_out: self.packets_out.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            refused: self.refused.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            expired: self.expired.load(Relaxed),
            overflowed: self.overflowed.load(Relaxed),
            session_since: match self.session_since.load(Relaxed) {
                0 => None,
                t => Some(topics::rfc3339(t)),
            },
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            components: self.components(),
        }
    }

    /// What the VM announced.
    pub fn components(&self) -> Vec<Component> {
        self.components
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces what the VM announced; returns what it had announced.
    pub fn set_components(&self, components: Vec<Component>) -> Vec<Component> {
        std::mem::replace(
            &mut *self.components.lock().unwrap_or_else(|p| p.into_inner()),
            components,
        )
    }

    /// Adds what a link's session counted.
    pub fn add(&self, c: &Counters) {
        for (counter, n) in [
            (&self.packets_in, c.packets_in),
            (&self.packets_out, c.packets_out),
            (&self.bytes_in, c.bytes_in),
            (&self.bytes_out, c.bytes_out),
            (&self.refused, c.refused),
            (&self.dropped, c.dropped),
            (&self.garbage_bytes, c.garbage_bytes),
            (&self.expired, c.expired),
        ] {
            if n > 0 {
                counter.fetch_add(n, Relaxed);
            }
        }
    }

    /// Keeps `linked` and `session` true to a state the link reports.
    fn on_state(&self, state: &LinkState) {
        match state {
            LinkState::Linked => self.linked.store(true, Relaxed),
            LinkState::Unlinked => {
                self.linked.store(false, Relaxed);
                self.session.store(false, Relaxed);
            }
            LinkState::SessionUp => self.session.store(true, Relaxed),
            LinkState::SessionDown | LinkState::Overflow | LinkState::Violations => {
                self.session.store(false, Relaxed)
            }
            _ => {}
        }
    }

    fn note(&self, what: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(what);
    }
}

/// Something a link reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    State {
        vm: VmId,
        state: LinkState,
        detail: Option<String>,
    },
    /// A refused packet: the VM and the topic, never the payload.
    Refused {
        vm: VmId,
        topic: String,
        reason: String,
    },
    /// A new policy file was refused on reload; the previous policy stays in force.
    PolicyRefused { reason: String },
}

/// Shared by the links, the discovery loop and the controller.
#[derive(Debug, Clone)]
pub struct Supervision {
    links: Arc<Mutex<BTreeMap<VmId, Arc<LinkStats>>>>,
    /// The number of known VMs plus Dom0, read by every link on every read (no lock).
    parties: Arc<AtomicUsize>,
    events: mpsc::Sender<Event>,
}

/// Events waiting for the controller; beyond this, events are dropped (and counted in the log).
const EVENT_QUEUE: usize = 1024;

impl Supervision {
    pub fn new() -> (Supervision, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        (
            Supervision {
                links: Arc::default(),
                parties: Arc::new(AtomicUsize::new(1)),
                events: tx,
            },
            rx,
        )
    }

    fn links(&self) -> std::sync::MutexGuard<'_, BTreeMap<VmId, Arc<LinkStats>>> {
        // A poisoned lock only means a panic elsewhere; the map itself is still consistent.
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a VM (its socket appeared) and returns its counters.
    pub fn register(&self, vm: &VmId) -> Arc<LinkStats> {
        let mut links = self.links();
        let stats = links.entry(vm.clone()).or_default().clone();
        self.parties.store(links.len() + 1, Relaxed);
        stats
    }

    /// Forgets a VM (its socket went away).
    pub fn forget(&self, vm: &VmId) {
        let mut links = self.links();
        links.remove(vm);
        self.parties.store(links.len() + 1, Relaxed);
    }

    /// Parties that answer a broadcast: every VM Dom0 knows, and Dom0 itself.
    pub fn parties(&self) -> usize {
        self.parties.load(Relaxed)
    }

    /// True when `name` is a VM Dom0 knows (its channel socket exists).
    pub fn knows(&self, name: &str) -> bool {
        VmId::parse(name).is_ok_and(|vm| self.links().contains_key(&vm))
    }

    /// The known VMs, sorted.
    pub fn vms(&self) -> Vec<VmId> {
        self.links().keys().cloned().collect()
    }

    /// The counters of one VM, if Dom0 knows it.
    pub fn stats(&self, vm: &VmId) -> Option<Arc<LinkStats>> {
        self.links().get(vm).cloned()
    }

    /// Every component known: each VM's announcement (or the VM alone, until it announces).
    pub fn components(&self) -> Vec<Component> {
        let mut out = Vec::new();
        for (vm, stats) in self.links().iter() {
            let announced = stats.components();
            if announced.is_empty() {
                out.push(Component {
                    id: vm.to_string(),
                    label: vm.to_string(),
                    kind: "domu".into(),
                });
            }
            for c in announced {
                if !out
                    .iter()
                    .any(|o: &Component| o.id == c.id && o.kind == c.kind)
                {
                    out.push(c);
                }
            }
        }
        out
    }

    /// The broker dropped `n` messages for `client` (it read more slowly than its publishers, or
    /// its link was away): counted for the VM of that name (a link's client id). Logged by the
    /// broker's watcher.
    pub fn overflowed(&self, client: &str, n: u64) {
        if let Ok(vm) = VmId::parse(client)
            && let Some(stats) = self.stats(&vm)
        {
            stats.overflowed.fetch_add(n, Relaxed);
        }
    }

    pub fn counters(&self) -> Vec<LinkCounters> {
        self.links().iter().map(|(vm, s)| s.snapshot(vm)).collect()
    }

    /// Reports an event; never blocks a link. The VM's record (session since, last error) is
    /// kept up to date on the way.
    pub fn emit(&self, event: Event) {
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        match &event {
            Event::State { vm, state, detail } => {
                if let Some(stats) = self.links().get(vm) {
                    stats.on_state(state);
                    match state {
                        LinkState::SessionUp => stats.session_since.store(now(), Relaxed),
                        LinkState::Linked => {}
                        other => {
                            stats.session_since.store(0, Relaxed);
                            let what = serde_json::to_value(other)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_owned))
                                .unwrap_or_default();
                            if !matches!(other, LinkState::Unlinked) || detail.is_some() {
                                stats.note(format!(
                                    "{} {what}{}",
                                    topics::rfc3339(now()),
                                    detail
                                        .as_deref()
                                        .map(|d| format!(": {d}"))
                                        .unwrap_or_default()
                                ));
                            }
                        }
                    }
                }
            }
            Event::Refused { vm, topic, reason } => {
                if let Some(stats) = self.links().get(vm) {
                    stats.note(format!(
                        "{} refused {topic:?}: {reason}",
                        topics::rfc3339(now())
                    ));
                }
            }
            Event::PolicyRefused { .. } => {}
        }
        if self.events.try_send(event).is_err() {
            tracing::debug!("supervision event dropped: controller queue full or gone");
        }
    }
}
