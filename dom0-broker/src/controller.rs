//! The Dom0 controller: an MQTT client of the broker (client id `dom0`). It answers component
//! discovery and counter requests, and publishes what the links report: state changes on
//! `system/supervision/links/notification`, refusals on `system/events/error/notification`.

use std::time::Duration;

use rumqttc::{
    AsyncClient, Event as MqttEvent, MqttOptions, NetworkOptions, Packet, QoS, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use topics::legacy_line;
use topics::payload::{
    self, AnnounceEvent, Component, CountersReply, DiscoverReply, ErrorBody, ErrorCode, ErrorEvent,
    LinkEvent, LinkState, NoArgs, Response, level,
};
use topics::topic::{Command, Notification, Topic};
use topics::vm::VmId;

use crate::bench::{self, Bench, BenchRequest, Reply};
use crate::config::BrokerAddr;
use crate::fleet::duties::Duties;
use crate::supervision::{Event, Supervision};
use crate::throttle::Reports;

/// The commands the controller serves.
const SERVED: [Command; 2] = [Command::Discover, Command::SupervisionCounters];

/// Answers one request. Pure apart from reading the supervision registry.
pub fn answer(topic: &str, payload: &[u8], supervision: &Supervision) -> Option<Reply> {
    let command = match Topic::parse(topic) {
        Ok(Topic::Request(c)) if SERVED.contains(&c) => c,
        _ => return None,
    };
    if !legacy_line::addressed_to(payload, topics::vm::DOM0) {
        return None;
    }
    let request = match payload::decode_request::<NoArgs>(payload) {
        Ok(r) => r,
        Err(e) => {
            // Every VM's request carries the `sender` its link checked or filled in: this one
            // comes from a Dom0 client, which hears why on Dom0's own response topic.
            tracing::debug!(topic, error = %e, "request without a valid envelope");
            let request_id = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v.get("request_id")?.as_str().map(str::to_owned))
                .and_then(|id| topics::RequestId::parse(&id).ok());
            return Some(Reply {
                topic: command.response_topic(&VmId::dom0()),
                body: Response::<NoArgs>::error(request_id, ErrorBody::from(e)).to_json(),
            });
        }
    };
    let reply_topic = command.response_topic(&request.sender);
    let body = match command {
        // At once, from the registry: itself, and what each VM announced (the VM alone until
        // it does).
        Command::Discover => {
            let mut components = vec![dom0_component()];
            components.extend(supervision.components());
            Response::ok(request.request_id, DiscoverReply { components }).to_json()
        }
        Command::SupervisionCounters => Response::ok(
            request.request_id,
            CountersReply {
                links: supervision.counters(),
            },
        )
        .to_json(),
        _ => Response::<NoArgs>::error(
            request.request_id,
            ErrorBody::new(ErrorCode::Unsupported, "not served by Dom0"),
        )
        .to_json(),
    };
    Some(Reply {
        topic: reply_topic,
        body,
    })
}

fn dom0_component() -> Component {
    Component {
        id: "dom0".into(),
        label: "Dom0".into(),
        kind: "dom0".into(),
    }
}

/// Dom0's own announcement.
pub fn own_announcement() -> Reply {
    Reply {
        topic: Notification::Announce.topic(),
        body: serde_json::to_vec(&AnnounceEvent {
            vm: topics::vm::DOM0.into(),
            components: vec![dom0_component()],
        })
        .unwrap_or_default(),
    }
}

/// An announcement on the announcement topic: what the VM it comes from offers now, filed under
/// the `origin` its link stamped (a VM announces only itself; what names another `vm` is filed
/// under its origin all the same). Dom0's own clients publish without origin: nothing filed.
pub fn announced(payload: &[u8], supervision: &Supervision) {
    let Ok(serde_json::Value::Object(mut m)) = serde_json::from_slice(payload) else {
        return;
    };
    let origin = match m.remove("origin") {
        Some(serde_json::Value::String(o)) => o,
        _ => return,
    };
    let (Ok(vm), Ok(event)) = (
        VmId::parse(&origin),
        serde_json::from_value::<AnnounceEvent>(serde_json::Value::Object(m)),
    ) else {
        return;
    };
    if let Some(stats) = supervision.stats(&vm) {
        tracing::debug!(vm = %vm, components = event.components.len(), "components announced");
        stats.set_components(event.components);
    }
}

/// A VM's link went: its components are withdrawn, and said so (`components: []`).
pub fn withdrawn(event: &Event, supervision: &Supervision) -> Option<Reply> {
    let Event::State { vm, state, .. } = event else {
        return None;
    };
    if matches!(state, LinkState::Linked | LinkState::SessionUp) {
        return None;
    }
    let had = supervision.stats(vm)?.set_components(Vec::new());
    (!had.is_empty()).then(|| Reply {
        topic: Notification::Announce.topic(),
        body: serde_json::to_vec(&AnnounceEvent {
            vm: vm.to_string(),
            components: Vec::new(),
        })
        .unwrap_or_default(),
    })
}

/// The notification for a link event.
pub fn notification(event: &Event) -> Reply {
    match event {
        Event::State { vm, state, detail } => Reply {
            topic: Notification::LinkState.topic(),
            body: serde_json::to_vec(&LinkEvent {
                vm: vm.to_string(),
                state: *state,
                datetime: topics::rfc3339_now(),
                detail: detail.clone(),
            })
            .unwrap_or_default(),
        },
        Event::PolicyRefused { reason } => Reply {
            topic: Notification::Error.topic(),
            body: serde_json::to_vec(&ErrorEvent {
                module: "dom0-broker/policy".into(),
                datetime: topics::rfc3339_now(),
                level: level::ERROR,
                description: format!(
                    "policy reload refused, the previous policy stays in force: {reason}"
                ),
            })
            .unwrap_or_default(),
        },
        Event::Refused { vm, topic, reason } => Reply {
            topic: Notification::Error.topic(),
            body: serde_json::to_vec(&ErrorEvent {
                module: "dom0-broker/policy".into(),
                datetime: topics::rfc3339_now(),
                level: level::WARNING,
                description: format!("{vm}: refused {topic:?}: {reason}"),
            })
            .unwrap_or_default(),
        },
    }
}

fn options(broker: &BrokerAddr, max_packet: usize) -> MqttOptions {
    let mut o = match broker {
        BrokerAddr::Tcp(hostport) => {
            let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "1883"));
            MqttOptions::new(VmId::dom0().as_str(), host, port.parse().unwrap_or(1883))
        }
        BrokerAddr::Unix(path) => {
            let mut o = MqttOptions::new(VmId::dom0().as_str(), path.display().to_string(), 0);
            o.set_transport(Transport::Unix);
            o
        }
    };
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(max_packet, max_packet);
    o.set_clean_session(true);
    o
}

/// Sends a benchmark probe (QoS 0: a lost one is reported as a timeout).
fn probe(client: &AsyncClient) {
    let _ = client.try_publish(Bench::probe_topic(), QoS::AtMostOnce, false, "probe");
}

/// Runs the controller until `stop`.
pub async fn run(
    broker: BrokerAddr,
    max_packet: usize,
    supervision: Supervision,
    mut events: mpsc::Receiver<Event>,
    fleet: Option<Duties>,
    stop: CancellationToken,
) {
    let (client, mut eventloop) = AsyncClient::new(options(&broker, max_packet), 256);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let mut c = Controller {
        client,
        supervision,
        connected: false,
        running: None,
        // Replies the client could not queue (a flood of requests): said once a second at most.
        dropped: Reports::new(1.0, "replies dropped", std::time::Instant::now()),
        fleet,
    };
    loop {
        let bench_deadline = c.running.as_ref().map(Bench::deadline);
        let fleet_deadline = c.fleet.as_ref().map(Duties::next_deadline);
        tokio::select! {
            _ = stop.cancelled() => break,
            ev = eventloop.poll() => match ev {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(broker = %broker, "controller connected");
                    c.connected_again();
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => c.on_publish(&p.topic, &p.payload),
                Ok(_) => {}
                Err(e) => {
                    if c.connected {
                        tracing::warn!(error = %e, "controller lost the broker; reconnecting");
                    }
                    c.connected = false;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.cancelled() => break,
                    }
                }
            },
            _ = async {
                match bench_deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => c.benchmark_timed_out(),
            _ = async {
                match fleet_deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => c.fleet_tick(),
            Some(event) = events.recv() => c.on_event(&event),
        }
    }
    let _ = c.client.try_disconnect();
}

/// The controller's state between the broker's events.
struct Controller {
    client: AsyncClient,
    supervision: Supervision,
    connected: bool,
    /// Dom0's `messaging` benchmark, while one runs.
    running: Option<Bench>,
    /// The budget of "reply dropped" lines.
    dropped: Reports,
    /// The fleet's commands and snapshots, with `[fleet]`.
    fleet: Option<Duties>,
}

impl Controller {
    /// Subscribes what it serves and announces itself, on every CONNACK.
    fn connected_again(&mut self) {
        self.connected = true;
        let topics = SERVED.iter().map(|c| c.request_topic()).chain([
            Command::Benchmark.request_topic(),
            Bench::probe_topic().to_owned(),
            Notification::Announce.topic(),
        ]);
        let fleet = self.fleet.iter().flat_map(Duties::filters);
        for t in topics.chain(fleet) {
            if let Err(e) = self.client.try_subscribe(t, QoS::AtLeastOnce) {
                tracing::warn!(error = %e, "controller subscribe failed");
            }
        }
        let Reply { topic, body } = own_announcement();
        let _ = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, body);
    }

    fn on_publish(&mut self, topic: &str, payload: &[u8]) {
        let mut replies = Vec::new();
        let fleet = self.fleet.as_mut().and_then(|f| {
            f.on_publish(
                topic,
                payload,
                &self.supervision,
                std::time::Instant::now(),
                crate::session::random_request_id,
            )
        });
        if let Some(out) = fleet {
            self.publish_all(out);
            return;
        }
        if topic == Notification::Announce.topic() {
            announced(payload, &self.supervision);
        } else if topic == Bench::probe_topic() {
            if let Some(b) = self.running.as_mut() {
                if b.probe_back() {
                    probe(&self.client);
                } else if let Some(done) = self.running.take() {
                    replies.push(done.finish());
                }
            }
        } else if topic == Command::Benchmark.request_topic()
            && legacy_line::addressed_to(payload, topics::vm::DOM0)
        {
            match (bench::request(payload), self.running.as_ref()) {
                (BenchRequest::Start(b), Some(_)) => replies.push(b.busy()),
                (BenchRequest::Start(mut b), None) => {
                    replies.push(b.started());
                    probe(&self.client);
                    self.running = Some(b);
                }
                (BenchRequest::Answer(r), _) => replies.push(r),
                (BenchRequest::Ignore, _) => {}
            }
        } else if let Some(reply) = answer(topic, payload, &self.supervision) {
            replies.push(reply);
        }
        for reply in replies {
            self.reply(reply);
        }
    }

    /// Publishes an answer as Dom0 (`responder: dom0`); one it cannot queue is said, within the
    /// budget of such lines.
    fn reply(&mut self, Reply { topic, body }: Reply) {
        let body = payload::with_responder(&body, topics::vm::DOM0);
        if let Err(e) = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, body)
        {
            if let Some(unreported) = self.dropped.may_report(std::time::Instant::now()) {
                tracing::warn!(error = %e, "controller reply dropped{unreported}");
            }
        }
    }

    /// The fleet's messages as they are: answers keep the responder that answered, refusals and
    /// snapshots carry Dom0's own.
    fn publish_all(&mut self, out: Vec<Reply>) {
        for Reply { topic, body } in out {
            if let Err(e) = self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, body)
            {
                if let Some(unreported) = self.dropped.may_report(std::time::Instant::now()) {
                    tracing::warn!(error = %e, "controller fleet message dropped{unreported}");
                }
            }
        }
    }

    fn fleet_tick(&mut self) {
        let out = match self.fleet.as_mut() {
            Some(f) => f.tick(&self.supervision, std::time::Instant::now()),
            None => return,
        };
        if self.connected {
            self.publish_all(out);
        }
    }

    /// A probe was lost (QoS 0): report instead of hanging the benchmark.
    fn benchmark_timed_out(&mut self) {
        if let Some(b) = self.running.take() {
            self.reply(b.timed_out());
        }
    }

    /// A link's event: its notification, and the withdrawal of its components when it went.
    fn on_event(&mut self, event: &Event) {
        let withdrawal = withdrawn(event, &self.supervision);
        if !self.connected {
            return;
        }
        let Reply { topic, body } = notification(event);
        if let Err(e) = self.client.try_publish(topic, QoS::AtMostOnce, false, body) {
            tracing::debug!(error = %e, "supervision notification dropped");
        }
        if let Some(Reply { topic, body }) = withdrawal {
            let _ = self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use topics::payload::LinkState;

    #[test]
    fn discover_lists_dom0_and_known_vms() {
        let (sup, _rx) = Supervision::new();
        sup.register(&VmId::parse("sys-usb").unwrap());
        sup.register(&VmId::parse("vm-gui").unwrap());
        let Reply { topic, body } = answer(
            "system/components/discover/request",
            br#"{"sender":"vm-gui","request_id":"9"}"#,
            &sup,
        )
        .unwrap();
        assert_eq!(topic, "system/components/discover/response/vm-gui");
        let r: Response<DiscoverReply> = payload::decode_response(&body).unwrap();
        assert_eq!(r.request_id.unwrap().as_str(), "9");
        let ids: Vec<String> = r
            .result
            .unwrap()
            .components
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(ids, ["dom0", "sys-usb", "vm-gui"]);
    }

    #[test]
    fn ignores_what_it_does_not_serve() {
        let (sup, _rx) = Supervision::new();
        assert!(
            answer(
                "system/disks/list_disks/request",
                br#"{"sender":"vm-gui"}"#,
                &sup
            )
            .is_none()
        );
        assert!(answer("system/components/discover/response/vm-gui", b"{}", &sup).is_none());
    }

    /// The note's `{}` from a Dom0 client (a VM's link fills `sender` in): answered
    /// `invalid_argument` on Dom0's own response topic, never dropped in silence.
    #[test]
    fn a_dom0_request_without_sender_is_told_why() {
        let (sup, _rx) = Supervision::new();
        let Reply { topic, body } = answer(
            "system/components/discover/request",
            br#"{"request_id":"r1"}"#,
            &sup,
        )
        .unwrap();
        assert_eq!(topic, "system/components/discover/response/dom0");
        let r: Response<NoArgs> = payload::decode_response(&body).unwrap();
        assert_eq!(r.request_id.unwrap().as_str(), "r1");
        let e = r.result.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("sender"), "{}", e.message);
    }

    #[test]
    fn refusal_notification_names_vm_and_topic_not_payload() {
        let ev = Event::Refused {
            vm: VmId::parse("vm-gui").unwrap(),
            topic: "system/disks/list_disks/response/vm-gui".into(),
            reason: "no rule allows it".into(),
        };
        let Reply { topic, body } = notification(&ev);
        assert_eq!(topic, "system/events/error/notification");
        let e: ErrorEvent = payload::decode(&body).unwrap();
        assert!(e.description.contains("vm-gui") && e.description.contains("list_disks/response"));
        let st = Event::State {
            vm: VmId::parse("vm-gui").unwrap(),
            state: LinkState::SessionUp,
            detail: None,
        };
        assert_eq!(
            notification(&st).topic,
            "system/supervision/links/notification"
        );
    }
}
