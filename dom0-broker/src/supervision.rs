//! What Dom0 knows about its links: the registry of VMs, their counters, and the events the links
//! report to the controller (state changes, refusals).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use topics::payload::{LinkCounters, LinkState};
use topics::vm::VmId;

/// One link's counters, updated by the link without locks.
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
        }
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
        self.links().entry(vm.clone()).or_default().clone()
    }

    /// Forgets a VM (its socket went away).
    pub fn forget(&self, vm: &VmId) {
        self.links().remove(vm);
    }

    /// The known VMs, sorted.
    pub fn vms(&self) -> Vec<VmId> {
        self.links().keys().cloned().collect()
    }

    pub fn counters(&self) -> Vec<LinkCounters> {
        self.links().iter().map(|(vm, s)| s.snapshot(vm)).collect()
    }

    /// Reports an event; never blocks a link.
    pub fn emit(&self, event: Event) {
        if self.events.try_send(event).is_err() {
            tracing::debug!("supervision event dropped: controller queue full or gone");
        }
    }
}
