//! The Dom0 controller: an MQTT client of the broker (client id `dom0`). It answers component
//! discovery and counter requests, and publishes what the links report: state changes on
//! `system/supervision/links/notification`, refusals on `system/events/error/notification`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, Event as MqttEvent, MqttOptions, NetworkOptions, Packet, QoS, Transport,
};
use tokio::sync::{mpsc, watch};
use topics::payload::{
    self, BenchmarkArgs, BenchmarkReply, Component, CountersReply, DiscoverReply, ErrorBody,
    ErrorCode, ErrorEvent, LinkEvent, NoArgs, Response, Status, level,
};
use topics::topic::{Command, Notification, Topic};
use topics::vm::VmId;

use crate::config::BrokerAddr;
use crate::supervision::{Event, Supervision};

pub fn now_rfc3339() -> String {
    topics::rfc3339(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// The commands the controller serves.
const SERVED: [Command; 2] = [Command::Discover, Command::SupervisionCounters];

/// A reply to publish: topic and payload.
type Reply = (String, Vec<u8>);

/// Dom0's `messaging` benchmark: round trips controller → broker → controller on a topic that no
/// VM may publish or read.
pub const BENCH_TOPIC: &str = "system/supervision/bench/dom0";
const BENCH_SAMPLES: usize = 100;

/// A running benchmark.
#[derive(Debug)]
struct Bench {
    reply_topic: String,
    request_id: Option<topics::RequestId>,
    sent: std::time::Instant,
    samples: Vec<Duration>,
}

impl Bench {
    /// The `finished` response.
    fn finish(mut self) -> Reply {
        self.samples.sort();
        let us = |d: Duration| (d.as_secs_f64() * 1e7).round() / 10.0;
        let n = self.samples.len();
        let figures = [
            (
                "round_trip_p50_us".to_owned(),
                self.samples.get(n / 2).map_or(0.0, |d| us(*d)),
            ),
            (
                "round_trip_p99_us".to_owned(),
                self.samples.get(n * 99 / 100).map_or(0.0, |d| us(*d)),
            ),
            ("samples".to_owned(), n as f64),
        ]
        .into();
        let body = BenchmarkReply {
            module: "messaging".into(),
            figures,
        };
        (
            self.reply_topic,
            Response::with_status(self.request_id, Status::Finished, body).to_json(),
        )
    }
}

/// What a benchmark request asks of Dom0: (reply topic, immediate answer, start the measurement?).
fn bench_request(payload: &[u8]) -> Option<(String, Vec<u8>, Option<Bench>)> {
    let request = match payload::decode_request::<BenchmarkArgs>(payload) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "benchmark request without a valid envelope; cannot answer");
            return None;
        }
    };
    let reply_topic = Command::Benchmark.response_topic(&request.sender);
    match request.args.module.as_str() {
        "messaging" => {
            let started = BenchmarkReply {
                module: "messaging".into(),
                figures: Default::default(),
            };
            let body = Response::with_status(request.request_id.clone(), Status::Started, started)
                .to_json();
            let bench = Bench {
                reply_topic: reply_topic.clone(),
                request_id: request.request_id,
                sent: std::time::Instant::now(),
                samples: Vec::with_capacity(BENCH_SAMPLES),
            };
            Some((reply_topic, body, Some(bench)))
        }
        // Dom0 has no disks; the agents that have answer.
        "disks" => None,
        other => {
            let e = ErrorBody::new(
                ErrorCode::Unsupported,
                format!("unknown module {other:?} (messaging, disks)"),
            );
            Some((
                reply_topic,
                Response::<NoArgs>::error(request.request_id, e).to_json(),
                None,
            ))
        }
    }
}

/// Answers one request. Pure apart from reading the supervision registry.
pub fn answer(topic: &str, payload: &[u8], supervision: &Supervision) -> Option<Reply> {
    let command = match Topic::parse(topic) {
        Ok(Topic::Request(c)) if SERVED.contains(&c) => c,
        _ => return None,
    };
    let request = match payload::decode_request::<NoArgs>(payload) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(topic, error = %e, "request without a valid envelope; cannot answer");
            return None;
        }
    };
    let reply_topic = command.response_topic(&request.sender);
    let body = match command {
        Command::Discover => {
            let mut components = vec![Component {
                id: "dom0".into(),
                label: "Dom0".into(),
                kind: "dom0".into(),
            }];
            components.extend(supervision.vms().into_iter().map(|vm| Component {
                id: vm.to_string(),
                label: vm.to_string(),
                kind: "domu".into(),
            }));
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
    Some((reply_topic, body))
}

/// The notification for a link event.
pub fn notification(event: &Event) -> Reply {
    match event {
        Event::State { vm, state, detail } => (
            Notification::LinkState.topic(),
            serde_json::to_vec(&LinkEvent {
                vm: vm.to_string(),
                state: *state,
                datetime: now_rfc3339(),
                detail: detail.clone(),
            })
            .unwrap_or_default(),
        ),
        Event::Refused { vm, topic, reason } => (
            Notification::Error.topic(),
            serde_json::to_vec(&ErrorEvent {
                module: "dom0-broker/policy".into(),
                datetime: now_rfc3339(),
                level: level::WARNING,
                description: format!("{vm}: refused {topic:?}: {reason}"),
            })
            .unwrap_or_default(),
        ),
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

/// Runs the controller until `stop`.
pub async fn run(
    broker: BrokerAddr,
    max_packet: usize,
    supervision: Supervision,
    mut events: mpsc::Receiver<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let (client, mut eventloop) = AsyncClient::new(options(&broker, max_packet), 256);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let mut connected = false;
    let mut bench: Option<Bench> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            ev = eventloop.poll() => match ev {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    tracing::info!(broker = %broker, "controller connected");
                    let topics = SERVED.iter().map(|c| c.request_topic())
                        .chain([Command::Benchmark.request_topic(), BENCH_TOPIC.to_owned()]);
                    for t in topics {
                        if let Err(e) = client.try_subscribe(t, QoS::AtLeastOnce) {
                            tracing::warn!(error = %e, "controller subscribe failed");
                        }
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let mut replies = Vec::new();
                    if p.topic == BENCH_TOPIC {
                        if let Some(b) = bench.as_mut() {
                            b.samples.push(b.sent.elapsed());
                            if b.samples.len() < BENCH_SAMPLES {
                                b.sent = std::time::Instant::now();
                                let _ = client.try_publish(BENCH_TOPIC, QoS::AtMostOnce, false, "probe");
                            } else if let Some(done) = bench.take() {
                                replies.push(done.finish());
                            }
                        }
                    } else if p.topic == Command::Benchmark.request_topic() {
                        if let Some((topic, body, start)) = bench_request(&p.payload) {
                            match (start, bench.is_some()) {
                                (Some(_), true) => {
                                    let e = ErrorBody::new(ErrorCode::Busy, "a benchmark is already running");
                                    let rid = payload::decode_envelope(&p.payload).ok().and_then(|e| e.request_id);
                                    replies.push((topic, Response::<NoArgs>::error(rid, e).to_json()));
                                }
                                (Some(mut b), false) => {
                                    replies.push((topic, body));
                                    b.sent = std::time::Instant::now();
                                    let _ = client.try_publish(BENCH_TOPIC, QoS::AtMostOnce, false, "probe");
                                    bench = Some(b);
                                }
                                (None, _) => replies.push((topic, body)),
                            }
                        }
                    } else if let Some(reply) = answer(&p.topic, &p.payload, &supervision) {
                        replies.push(reply);
                    }
                    for (topic, body) in replies {
                        if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, body) {
                            tracing::warn!(error = %e, "controller reply dropped");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        tracing::warn!(error = %e, "controller lost the broker; reconnecting");
                    }
                    connected = false;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.changed() => break,
                    }
                }
            },
            _ = async {
                match &bench {
                    Some(b) => tokio::time::sleep_until((b.sent + Duration::from_secs(5)).into()).await,
                    None => std::future::pending().await,
                }
            } => {
                // A probe was lost (QoS 0): report instead of hanging the benchmark.
                if let Some(b) = bench.take() {
                    let e = ErrorBody::new(ErrorCode::Timeout, "a benchmark probe did not come back within 5 s");
                    let _ = client.try_publish(b.reply_topic, QoS::AtLeastOnce, false, Response::<NoArgs>::error(b.request_id, e).to_json());
                }
            }
            Some(event) = events.recv() => {
                if connected {
                    let (topic, body) = notification(&event);
                    if let Err(e) = client.try_publish(topic, QoS::AtMostOnce, false, body) {
                        tracing::debug!(error = %e, "supervision notification dropped");
                    }
                }
            }
        }
    }
    let _ = client.try_disconnect();
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
        let (topic, body) = answer(
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
    fn benchmark_requests() {
        let (topic, body, bench) =
            bench_request(br#"{"sender":"vm-gui","request_id":"b1","module":"messaging"}"#)
                .unwrap();
        assert_eq!(topic, "system/misc/benchmark/response/vm-gui");
        assert!(String::from_utf8_lossy(&body).contains("\"started\""));
        let mut b = bench.unwrap();
        b.samples = vec![Duration::from_micros(100); BENCH_SAMPLES];
        let (_, done) = b.finish();
        let r: Response<BenchmarkReply> = payload::decode_response(&done).unwrap();
        assert_eq!(r.status, Status::Finished);
        assert_eq!(r.result.unwrap().figures["round_trip_p50_us"], 100.0);
        assert!(
            bench_request(br#"{"sender":"vm-gui","module":"disks"}"#).is_none(),
            "Dom0 has no disks"
        );
        let (_, body, bench) = bench_request(br#"{"sender":"vm-gui","module":"gpu"}"#).unwrap();
        assert!(bench.is_none() && String::from_utf8_lossy(&body).contains("unsupported"));
        assert!(bench_request(b"{}").is_none());
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
        assert!(answer("system/components/discover/request", b"{}", &sup).is_none());
        assert!(answer("system/components/discover/response/vm-gui", b"{}", &sup).is_none());
    }

    #[test]
    fn refusal_notification_names_vm_and_topic_not_payload() {
        let ev = Event::Refused {
            vm: VmId::parse("vm-gui").unwrap(),
            topic: "system/disks/list_disks/response/vm-gui".into(),
            reason: "no rule allows it".into(),
        };
        let (topic, body) = notification(&ev);
        assert_eq!(topic, "system/events/error/notification");
        let e: ErrorEvent = payload::decode(&body).unwrap();
        assert!(e.description.contains("vm-gui") && e.description.contains("list_disks/response"));
        let st = Event::State {
            vm: VmId::parse("vm-gui").unwrap(),
            state: LinkState::SessionUp,
            detail: None,
        };
        assert_eq!(notification(&st).0, "system/supervision/links/notification");
    }
}
