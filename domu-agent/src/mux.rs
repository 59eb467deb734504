//! The multiplexer: many local clients (the guest's applications, the agent's own service), one
//! MQTT session with Dom0. Subscriptions are merged and reference-counted upstream, SUBACKs routed
//! back to the clients that asked, each message from Dom0 delivered once per matching client, and
//! local QoS 1 publishes acknowledged once Dom0 acknowledged them.
//!
//! Pure: client requests and session events in, [`Action`]s out; the driver (`channel.rs`) carries
//! them out. Dom0's policy is the only authority: a filter is granted to a client only once Dom0
//! granted it, and a filter Dom0 refuses is refused to the clients that asked for it, and to no
//! other. `$`-filters and malformed ones are refused here without asking.

use std::collections::{BTreeMap, HashMap};

use rumqttc::mqttbytes::QoS;
use topics::filter::filter_matches;
use topics::topic::validate_filter;

/// A local client of the multiplexer.
pub type ClientId = u64;

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Subscribe upstream (the session then renews it on every CONNACK).
    SubscribeUp(String),
    /// Unsubscribe upstream: no client wants it any more.
    UnsubscribeUp(String),
    /// Dom0 refused the filter: drop it from the session's subscriptions, nothing to send.
    ForgetUp(String),
    /// Answer a client's SUBSCRIBE: the QoS granted per filter, `None` for refused (0x80).
    SubAck {
        client: ClientId,
        pkid: u16,
        codes: Vec<Option<QoS>>,
    },
    /// Answer a client's UNSUBSCRIBE.
    UnsubAck { client: ClientId, pkid: u16 },
    /// Acknowledge a client's QoS 1 publish (Dom0 acknowledged it).
    PubAck { client: ClientId, pkid: u16 },
}

/// One client's subscription to a filter.
#[derive(Debug, Clone, Copy)]
struct Sub {
    /// The QoS it asked for (at most 1).
    asked: QoS,
    /// What it was granted, once Dom0 answered.
    granted: Option<QoS>,
}

/// A filter as subscribed upstream.
#[derive(Debug)]
struct Upstream {
    /// Clients that hold it.
    refs: usize,
    /// Dom0's grant, once it answered.
    granted: Option<QoS>,
}

/// A client's SUBSCRIBE waiting for Dom0's answers.
#[derive(Debug)]
struct PendingSubAck {
    client: ClientId,
    pkid: u16,
    /// Filter and its code: `None` while unknown, `Some(None)` refused, `Some(Some(q))` granted.
    codes: Vec<(String, Option<Option<QoS>>)>,
}

/// The multiplexer's state.
#[derive(Debug, Default)]
pub struct Mux {
    /// Each client's subscriptions.
    clients: BTreeMap<ClientId, BTreeMap<String, Sub>>,
    upstream: BTreeMap<String, Upstream>,
    /// SUBSCRIBEs waiting for Dom0, in arrival order.
    pending: Vec<PendingSubAck>,
    /// Upstream packet id of a local QoS 1 publish → (client, its own packet id).
    inflight: HashMap<u16, (ClientId, u16)>,
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) { a } else { b }
}

fn cap(q: QoS) -> QoS {
    min_qos(q, QoS::AtLeastOnce)
}

impl Mux {
    pub fn new() -> Mux {
        Mux::default()
    }

    /// A client joined.
    pub fn attach(&mut self, client: ClientId) {
        self.clients.entry(client).or_default();
    }

    /// Clients attached now.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Filters subscribed upstream now (for tests and counters).
    pub fn upstream_filters(&self) -> Vec<String> {
        self.upstream.keys().cloned().collect()
    }

    /// A client's SUBSCRIBE. Answered at once for filters already granted or refused here, once
    /// Dom0 answered otherwise.
    pub fn subscribe(
        &mut self,
        client: ClientId,
        pkid: u16,
        filters: Vec<(String, QoS)>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut codes = Vec::with_capacity(filters.len());
        for (filter, asked) in filters {
            let asked = cap(asked);
            if filter.starts_with('$') || validate_filter(&filter).is_err() {
                tracing::debug!(filter = %filter, "local subscription refused: not a valid filter");
                codes.push((filter, Some(None)));
                continue;
            }
            let subs = self.clients.entry(client).or_default();
            if let Some(sub) = subs.get_mut(&filter) {
                // Subscribed again: same filter, maybe another QoS.
                sub.asked = asked;
                let up = self.upstream.get(&filter).and_then(|u| u.granted);
                sub.granted = up.map(|g| min_qos(asked, g));
                codes.push((filter, sub.granted.map(Some)));
                continue;
            }
            let up = self.upstream.entry(filter.clone()).or_insert_with(|| {
                actions.push(Action::SubscribeUp(filter.clone()));
                Upstream {
                    refs: 0,
                    granted: None,
                }
            });
            up.refs += 1;
            let granted = up.granted.map(|g| min_qos(asked, g));
            subs.insert(filter.clone(), Sub { asked, granted });
            codes.push((filter, granted.map(Some)));
        }
        self.pending.push(PendingSubAck {
            client,
            pkid,
            codes,
        });
        self.flush_pending(&mut actions);
        actions
    }

    /// Dom0 answered a SUBSCRIBE (the first one, or a renewal after a reconnect).
    pub fn on_suback(&mut self, results: Vec<(String, Option<QoS>)>) -> Vec<Action> {
        let mut actions = Vec::new();
        for (filter, granted) in results {
            for p in &mut self.pending {
                for (f, code) in &mut p.codes {
                    if *f == filter && code.is_none() {
                        *code = Some(granted.map(cap));
                    }
                }
            }
            let Some(up) = self.upstream.get_mut(&filter) else {
                // Nobody wants it any more (left while Dom0 was answering).
                continue;
            };
            match granted {
                Some(g) => {
                    let g = cap(g);
                    up.granted = Some(g);
                    for subs in self.clients.values_mut() {
                        if let Some(sub) = subs.get_mut(&filter) {
                            sub.granted = Some(min_qos(sub.asked, g));
                        }
                    }
                }
                None => {
                    // Refused to every client that holds it: they asked for it (or, after a
                    // policy reload, no longer get it).
                    self.upstream.remove(&filter);
                    for subs in self.clients.values_mut() {
                        subs.remove(&filter);
                    }
                    actions.push(Action::ForgetUp(filter.clone()));
                }
            }
        }
        self.flush_pending(&mut actions);
        actions
    }

    /// Answers, in order, the SUBSCRIBEs whose every code is known.
    fn flush_pending(&mut self, actions: &mut Vec<Action>) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].codes.iter().all(|(_, c)| c.is_some()) {
                let p = self.pending.remove(i);
                // The client asked QoS q, Dom0 granted g: the client gets min(q, g).
                let subs = self.clients.get(&p.client);
                let codes = p
                    .codes
                    .into_iter()
                    .map(|(f, c)| {
                        c.flatten()
                            .and_then(|g| subs.and_then(|s| s.get(&f)).map(|s| min_qos(s.asked, g)))
                    })
                    .collect();
                actions.push(Action::SubAck {
                    client: p.client,
                    pkid: p.pkid,
                    codes,
                });
            } else {
                i += 1;
            }
        }
    }

    /// A client's UNSUBSCRIBE: answered at once.
    pub fn unsubscribe(&mut self, client: ClientId, pkid: u16, filters: &[String]) -> Vec<Action> {
        let mut actions = Vec::new();
        for f in filters {
            let had = self
                .clients
                .get_mut(&client)
                .and_then(|subs| subs.remove(f))
                .is_some();
            if had {
                self.release(f, &mut actions);
            }
        }
        actions.push(Action::UnsubAck { client, pkid });
        actions
    }

    /// A client left (or was dropped): its subscriptions are released, its waiting answers and
    /// acknowledgements forgotten.
    pub fn detach(&mut self, client: ClientId) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(subs) = self.clients.remove(&client) {
            for f in subs.keys() {
                self.release(f, &mut actions);
            }
        }
        self.pending.retain(|p| p.client != client);
        self.inflight.retain(|_, (c, _)| *c != client);
        actions
    }

    fn release(&mut self, filter: &str, actions: &mut Vec<Action>) {
        if let Some(up) = self.upstream.get_mut(filter) {
            up.refs = up.refs.saturating_sub(1);
            if up.refs == 0 {
                self.upstream.remove(filter);
                actions.push(Action::UnsubscribeUp(filter.to_owned()));
            }
        }
    }

    /// Who gets a message from Dom0 on `topic` sent at `qos`: each client once (overlapping
    /// filters of one client: one copy, at the highest QoS granted among them, at most `qos`).
    pub fn deliver(&self, topic: &str, qos: QoS) -> Vec<(ClientId, QoS)> {
        let mut out = Vec::new();
        for (client, subs) in &self.clients {
            let best = subs
                .iter()
                .filter_map(|(f, s)| s.granted.filter(|_| filter_matches(f, topic)))
                .max_by_key(|q| *q as u8);
            if let Some(g) = best {
                out.push((*client, min_qos(cap(qos), g)));
            }
        }
        out
    }

    /// A client's QoS 1 publish went upstream with packet id `upstream`.
    pub fn published(&mut self, client: ClientId, local: u16, upstream: u16) {
        self.inflight.insert(upstream, (client, local));
    }

    /// Dom0 acknowledged the upstream packet id: acknowledge the client that published it.
    pub fn acked(&mut self, upstream: u16) -> Option<Action> {
        self.inflight
            .remove(&upstream)
            .map(|(client, pkid)| Action::PubAck { client, pkid })
    }
}

#[cfg(test)]
mod tests;
