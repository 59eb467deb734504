//! The multiplexer: many local clients (the guest's applications, the agent's own service), one
//! MQTT session with Dom0. Subscriptions are merged and reference-counted upstream, SUBACKs routed
//! back to the clients that asked, each message from Dom0 delivered once per matching client, and
//! local QoS 1 publishes acknowledged once Dom0 acknowledged them.
//!
//! Upstream, a filter covered by another one Dom0 granted (`app/x/status` under `app/#`) is not
//! subscribed again: it is granted here (what Dom0 lets the VM read under `app/#` it lets it read
//! under `app/x/status`), so a broker that sends one copy per matching subscription (rumqttd does;
//! Mosquitto does not) sends one. When the last client holding a covering filter lets it go while
//! filters it covers are still held, it stays subscribed upstream (held by nobody, delivered to
//! nobody but through the filters it covers) until they go too: swapping it for them would either
//! lose messages (rumqttd drops what it routed to a filter and had not sent yet when that filter is
//! unsubscribed) or deliver some twice (while both are subscribed). A filter whose cover was asked
//! upstream and not answered yet waits for that answer (granted with it, or sent upstream if Dom0
//! refuses the cover), and a SUBSCRIBE that holds both asks the cover first. Filters
//! that merely overlap (`app/+/status` and `app/x/#`) are both subscribed upstream.
//!
//! Pure: client requests and session events in, [`Action`]s out; the driver (`channel.rs`) carries
//! them out. Dom0's policy is the only authority: a filter is granted to a client only once Dom0
//! granted it, and a filter Dom0 refuses is refused to the clients that asked for it, and to no
//! other. `$`-filters and malformed ones are refused here without asking.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rumqttc::mqttbytes::QoS;
use topics::filter::{filter_covers, filter_matches};
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

/// A filter some client holds (or a covering one kept upstream for the filters it covers).
#[derive(Debug)]
struct Filter {
    /// Clients that hold it (0: kept upstream only because held filters are under it).
    refs: usize,
    /// Its grant: Dom0's answer, or the grant of a filter that covers it.
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
    /// Every filter some client holds.
    filters: BTreeMap<String, Filter>,
    /// The filters subscribed upstream: those no granted filter covers.
    up: BTreeSet<String>,
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
        self.up.iter().cloned().collect()
    }

    /// The best grant among the granted filters, other than `f`, that cover `f`.
    fn covering_grant(&self, f: &str) -> Option<QoS> {
        self.filters
            .iter()
            .filter(|(g, e)| g.as_str() != f && e.granted.is_some() && filter_covers(g, f))
            .filter_map(|(_, e)| e.granted)
            .max_by_key(|q| *q as u8)
    }

    /// Records a filter's grant and passes it on to the clients that hold it.
    fn grant(&mut self, f: &str, g: QoS) {
        if let Some(e) = self.filters.get_mut(f) {
            e.granted = Some(g);
        }
        for subs in self.clients.values_mut() {
            if let Some(sub) = subs.get_mut(f) {
                sub.granted = Some(min_qos(sub.asked, g));
            }
        }
        self.resolve(f, Some(g));
    }

    /// Fills in the unknown codes of waiting SUBSCRIBEs for `f`.
    fn resolve(&mut self, f: &str, code: Option<QoS>) {
        for p in &mut self.pending {
            for (pf, c) in &mut p.codes {
                if pf == f && c.is_none() {
                    *c = Some(code);
                }
            }
        }
    }

    /// Filters that were covered by `gone` and are covered by nothing now go upstream.
    fn uncover(&mut self, gone: &str, actions: &mut Vec<Action>) {
        let uncovered: Vec<String> = self
            .filters
            .keys()
            .filter(|h| filter_covers(gone, h) && !self.up.contains(*h))
            .filter(|h| self.covering_grant(h).is_none())
            .cloned()
            .collect();
        for h in uncovered {
            self.up.insert(h.clone());
            actions.push(Action::SubscribeUp(h));
        }
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
        // Filters that another filter of the same request covers come after it, so that they wait
        // for its grant instead of going upstream beside it (the answer keeps the request's order).
        let covered_here = |f: &str| {
            filters
                .iter()
                .any(|(g, _)| g != f && !g.starts_with('$') && filter_covers(g, f))
        };
        let mut order: Vec<usize> = (0..filters.len()).collect();
        order.sort_by_key(|&i| covered_here(&filters[i].0));
        let mut codes: Vec<(String, Option<Option<QoS>>)> =
            filters.iter().map(|(f, _)| (f.clone(), None)).collect();
        for i in order {
            let (filter, asked) = filters[i].clone();
            let code = self.subscribe_one(client, filter, asked, &mut actions);
            codes[i].1 = code;
        }
        self.pending.push(PendingSubAck {
            client,
            pkid,
            codes,
        });
        self.flush_pending(&mut actions);
        actions
    }

    /// One filter of a client's SUBSCRIBE: its code if known now (None: once Dom0 answered).
    fn subscribe_one(
        &mut self,
        client: ClientId,
        filter: String,
        asked: QoS,
        actions: &mut Vec<Action>,
    ) -> Option<Option<QoS>> {
        {
            let asked = cap(asked);
            if filter.starts_with('$') || validate_filter(&filter).is_err() {
                tracing::debug!(filter = %filter, "local subscription refused: not a valid filter");
                return Some(None);
            }
            let known = self.filters.get(&filter).map(|e| e.granted);
            let subs = self.clients.entry(client).or_default();
            if let Some(sub) = subs.get_mut(&filter) {
                // Subscribed again: same filter, maybe another QoS.
                sub.asked = asked;
                sub.granted = known.flatten().map(|g| min_qos(asked, g));
                return sub.granted.map(Some);
            }
            let granted = match known {
                Some(g) => g,
                None => {
                    let cover = self.covering_grant(&filter);
                    // A cover already asked upstream and not answered yet: wait for its grant
                    // rather than subscribing beside it (rumqttd would send one copy per filter
                    // until this one was unsubscribed again).
                    let cover_asked = self
                        .up
                        .iter()
                        .any(|g| *g != filter && filter_covers(g, &filter));
                    if cover.is_none() && !cover_asked {
                        self.up.insert(filter.clone());
                        actions.push(Action::SubscribeUp(filter.clone()));
                    }
                    self.filters.insert(
                        filter.clone(),
                        Filter {
                            refs: 0,
                            granted: cover,
                        },
                    );
                    cover
                }
            };
            if let Some(e) = self.filters.get_mut(&filter) {
                e.refs += 1;
            }
            let granted = granted.map(|g| min_qos(asked, g));
            if let Some(subs) = self.clients.get_mut(&client) {
                subs.insert(filter.clone(), Sub { asked, granted });
            }
            granted.map(Some)
        }
    }

    /// Dom0 answered a SUBSCRIBE (the first one, or a renewal after a reconnect).
    pub fn on_suback(&mut self, results: Vec<(String, Option<QoS>)>) -> Vec<Action> {
        let mut actions = Vec::new();
        for (filter, granted) in results {
            if !self.up.contains(&filter) {
                // Nobody wants it any more, or a granted filter covers it now: answered already.
                self.resolve(&filter, None);
                continue;
            }
            match granted.map(cap) {
                Some(g) => {
                    self.grant(&filter, g);
                    // Filters that waited for this cover (never asked upstream) are granted.
                    let waiting: Vec<String> = self
                        .filters
                        .iter()
                        .filter(|(h, e)| {
                            **h != filter
                                && e.granted.is_none()
                                && !self.up.contains(*h)
                                && filter_covers(&filter, h)
                        })
                        .map(|(h, _)| h.clone())
                        .collect();
                    for h in waiting {
                        self.grant(&h, g);
                    }
                    // What it covers need not be subscribed upstream any more.
                    let covered: Vec<String> = self
                        .up
                        .iter()
                        .filter(|h| **h != filter && filter_covers(&filter, h))
                        .cloned()
                        .collect();
                    for h in covered {
                        self.up.remove(&h);
                        if self.filters.get(&h).is_some_and(|e| e.refs == 0) {
                            // Kept only as a cover: the new cover does its job.
                            self.filters.remove(&h);
                        } else if self.filters.get(&h).is_some_and(|e| e.granted.is_none()) {
                            self.grant(&h, g);
                        }
                        actions.push(Action::UnsubscribeUp(h));
                    }
                }
                None => {
                    // Refused to every client that holds it: they asked for it (or, after a
                    // policy reload, no longer get it).
                    self.resolve(&filter, None);
                    self.filters.remove(&filter);
                    self.up.remove(&filter);
                    for subs in self.clients.values_mut() {
                        subs.remove(&filter);
                    }
                    actions.push(Action::ForgetUp(filter.clone()));
                    self.uncover(&filter, &mut actions);
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
        let Some(e) = self.filters.get_mut(filter) else {
            return;
        };
        e.refs = e.refs.saturating_sub(1);
        if e.refs > 0 {
            return;
        }
        if !(self.up.contains(filter) && self.covers_held(filter)) {
            self.drop_filter(filter, actions);
        }
        // Covers kept for what they covered, now covering nothing held, go.
        let idle: Vec<String> = self
            .filters
            .iter()
            .filter(|(f, e)| e.refs == 0 && !self.covers_held(f))
            .map(|(f, _)| f.clone())
            .collect();
        for f in idle {
            self.drop_filter(&f, actions);
        }
    }

    /// True when a filter some client holds is under `f`.
    fn covers_held(&self, f: &str) -> bool {
        self.filters
            .iter()
            .any(|(h, e)| h != f && e.refs > 0 && filter_covers(f, h))
    }

    fn drop_filter(&mut self, filter: &str, actions: &mut Vec<Action>) {
        self.filters.remove(filter);
        if self.up.remove(filter) {
            // What it covered (nothing held, unless Dom0 refused it) goes upstream first.
            self.uncover(filter, actions);
            actions.push(Action::UnsubscribeUp(filter.to_owned()));
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
