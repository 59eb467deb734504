//! `dom0-broker status`: what an operator types first, like `xl list`. It asks the running
//! service's controller for its counters (`system/supervision/counters`) as a Dom0 client and
//! prints one line per VM. The table is pure ([`table`]); [`fetch`] is the MQTT exchange.

use std::time::Duration;

use rumqttc::{Client, Event, MqttOptions, Packet, QoS, Transport};
use topics::payload::{self, CountersReply, LinkCounters};
use topics::topic::Command;
use topics::vm::VmId;

use crate::config::BrokerAddr;

/// How long the service has to answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// Why there is no answer: one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("dom0-broker is not running (no broker at {addr}: {reason})")]
    NotRunning { addr: String, reason: String },
    #[error(
        "the broker at {0} answers, but dom0-broker's controller does not (is dom0-broker running?)"
    )]
    NoAnswer(String),
    #[error("unreadable answer: {0}")]
    Bad(String),
}

/// Asks the counters once.
pub fn fetch(broker: &BrokerAddr) -> Result<Vec<LinkCounters>, StatusError> {
    let id = format!("dom0-status-{}", std::process::id());
    let mut o = match broker {
        BrokerAddr::Tcp(hostport) => {
            let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "1883"));
            MqttOptions::new(&id, host, port.parse().unwrap_or(1883))
        }
        BrokerAddr::Unix(path) => {
            let mut o = MqttOptions::new(&id, path.display().to_string(), 0);
            o.set_transport(Transport::Unix);
            o
        }
    };
    o.set_keep_alive(Duration::from_secs(10));
    o.set_max_packet_size(1 << 22, 1 << 22);
    let (client, mut conn) = Client::new(o, 8);
    let command = Command::SupervisionCounters;
    let request_id = format!("status-{}", std::process::id());
    let response = command.response_topic(&VmId::dom0());
    let deadline = std::time::Instant::now() + ANSWER_TIMEOUT;
    let addr = broker.to_string();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(StatusError::NoAnswer(addr));
        }
        match conn.recv_timeout(left) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                let _ = client.subscribe(response.clone(), QoS::AtLeastOnce);
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                let body = format!(r#"{{"sender":"dom0","request_id":"{request_id}"}}"#);
                let _ = client.publish(command.request_topic(), QoS::AtLeastOnce, false, body);
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == response => {
                let r = payload::decode_response::<CountersReply>(&p.payload)
                    .map_err(|e| StatusError::Bad(e.to_string()))?;
                if r.request_id.as_ref().map(|i| i.as_str()) != Some(request_id.as_str()) {
                    continue;
                }
                let _ = client.disconnect();
                return r
                    .result
                    .map(|c| c.links)
                    .map_err(|e| StatusError::Bad(e.message));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(StatusError::NotRunning {
                    addr,
                    reason: e.to_string(),
                });
            }
            Err(_) => return Err(StatusError::NoAnswer(addr)),
        }
    }
}

/// The table: one line per VM.
pub fn table(links: &[LinkCounters]) -> String {
    let mut s = format!(
        "{:<20} {:<9} {:<21} {:>9} {:>9} {:>8} {:>7} {:>7} {:>8}  {:<24} {}\n",
        "VM",
        "STATE",
        "SESSION SINCE",
        "IN",
        "OUT",
        "REFUSED",
        "DROPPED",
        "EXPIRED",
        "OVERFLOW",
        "COMPONENTS",
        "LAST ERROR"
    );
    for l in links {
        let state = match (l.linked, l.session) {
            (true, true) => "session",
            (true, false) => "linked",
            (false, _) => "unlinked",
        };
        // What it announced beyond itself (its disks).
        let components: Vec<&str> = l
            .components
            .iter()
            .filter(|c| c.id != l.vm)
            .map(|c| c.id.as_str())
            .collect();
        let components = if components.is_empty() {
            "-".to_owned()
        } else {
            components.join(",")
        };
        s.push_str(&format!(
            "{:<20} {:<9} {:<21} {:>9} {:>9} {:>8} {:>7} {:>7} {:>8}  {:<24} {}\n",
            l.vm,
            state,
            l.session_since.as_deref().unwrap_or("-"),
            l.packets_in,
            l.packets_out,
            l.refused,
            l.dropped,
            l.expired,
            l.overflowed,
            components,
            l.last_error.as_deref().unwrap_or("-"),
        ));
    }
    if links.is_empty() {
        s.push_str("(no VM channel found)\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_vm() {
        let links = vec![
            LinkCounters {
                vm: "sys-usb".into(),
                linked: true,
                session: true,
                packets_in: 12,
                packets_out: 10,
                session_since: Some("2026-12-02T10:00:00Z".into()),
                components: vec![
                    topics::payload::Component {
                        id: "sys-usb".into(),
                        label: "sys-usb".into(),
                        kind: "domu".into(),
                    },
                    topics::payload::Component {
                        id: "usb0".into(),
                        label: "KEY".into(),
                        kind: "disk".into(),
                    },
                ],
                ..LinkCounters::default()
            },
            LinkCounters {
                vm: "vm-gui".into(),
                linked: true,
                refused: 3,
                last_error: Some("refused \"x\"".into()),
                ..LinkCounters::default()
            },
        ];
        let t = table(&links);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("sys-usb") && lines[1].contains("session"));
        assert!(lines[1].contains("2026-12-02T10:00:00Z"));
        assert!(lines[0].contains("COMPONENTS") && lines[1].contains(" usb0 "));
        assert!(lines[2].contains("linked") && lines[2].contains("refused \"x\""));
        assert!(table(&[]).contains("no VM channel"));
    }
}
