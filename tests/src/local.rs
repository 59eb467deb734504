//! Applications in a guest: MQTT clients on an agent's local endpoint (its UNIX socket), with
//! rumqttc, and with Debian's mosquitto_pub/sub (`--unix`).

use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS, SubscribeReasonCode, Transport};

use crate::{DEADLINE, Proc, TestDir};

/// A rumqttc client of an agent's local endpoint. Its event loop runs in a thread.
#[allow(missing_debug_implementations)] // rumqttc's Client is not Debug.
pub struct LocalClient {
    pub client: Client,
    messages: mpsc::Receiver<(String, Vec<u8>)>,
    subacks: mpsc::Receiver<Vec<bool>>,
    pubacks: mpsc::Receiver<u16>,
    /// CONNACKs received: 1 while the connection was never lost.
    pub connacks: Arc<Mutex<usize>>,
}

impl LocalClient {
    /// Connects `id` to the UNIX socket `path` and waits for its CONNACK.
    pub fn connect(path: &Path, id: &str) -> LocalClient {
        let mut o = MqttOptions::new(id, path.display().to_string(), 0);
        o.set_transport(Transport::Unix);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(1 << 22, 1 << 22);
        let (client, mut conn) = Client::new(o, 64);
        let (msg_tx, messages) = mpsc::channel();
        let (sub_tx, subacks) = mpsc::channel();
        let (ack_tx, pubacks) = mpsc::channel();
        let connacks = Arc::new(Mutex::new(0));
        let (c2, (conn_tx, conn_rx)) = (connacks.clone(), mpsc::channel());
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        *c2.lock().unwrap() += 1;
                        let _ = conn_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = msg_tx.send((p.topic, p.payload.to_vec()));
                    }
                    Ok(Event::Incoming(Packet::SubAck(s))) => {
                        let ok = s
                            .return_codes
                            .iter()
                            .map(|c| matches!(c, SubscribeReasonCode::Success(_)))
                            .collect();
                        let _ = sub_tx.send(ok);
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let _ = ack_tx.send(a.pkid);
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        conn_rx
            .recv_timeout(DEADLINE)
            .expect("local client got no CONNACK");
        LocalClient {
            client,
            messages,
            subacks,
            pubacks,
            connacks,
        }
    }

    /// Subscribes and waits for the SUBACK: one bool per filter, true when granted.
    pub fn subscribe(&self, filters: &[&str]) -> Vec<bool> {
        let filters: Vec<rumqttc::SubscribeFilter> = filters
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce))
            .collect();
        self.client.subscribe_many(filters).unwrap();
        self.subacks
            .recv_timeout(DEADLINE)
            .expect("local client got no SUBACK")
    }

    pub fn unsubscribe(&self, filter: &str) {
        self.client.unsubscribe(filter).unwrap();
    }

    /// Publishes at QoS 1.
    pub fn publish(&self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .unwrap();
    }

    /// Publishes at QoS 1 and waits for its PUBACK (Dom0 acknowledged it).
    pub fn publish_acked(&self, topic: &str, payload: &[u8]) {
        self.publish(topic, payload);
        self.pubacks
            .recv_timeout(DEADLINE)
            .expect("local client got no PUBACK");
    }

    /// The next message, whatever its topic.
    pub fn recv(&self, timeout: Duration) -> Option<(String, Vec<u8>)> {
        self.messages.recv_timeout(timeout).ok()
    }

    /// Every message received within `window`.
    pub fn drain(&self, window: Duration) -> Vec<(String, Vec<u8>)> {
        let end = Instant::now() + window;
        let mut v = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.messages.recv_timeout(left) {
                Ok(m) => v.push(m),
                Err(_) => break,
            }
        }
        v
    }

    /// The next message whose payload is `payload`, skipping others.
    pub fn wait_payload(&self, payload: &[u8], timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.messages.recv_timeout(left) {
                Ok((_, p)) if p == payload => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}

/// `mosquitto_sub --unix PATH -d -v -t TOPIC...`, line-buffered; returns once it printed its SUBACK.
pub fn mosquitto_sub_unix(dir: &TestDir, name: &str, path: &Path, topics: &[&str]) -> Proc {
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", "mosquitto_sub", "--unix"])
        .arg(path)
        .args(["-d", "-v", "-q", "1", "-i", name]);
    for t in topics {
        cmd.args(["-t", t]);
    }
    let p = Proc::spawn(name, dir, &mut cmd);
    p.wait_log("received SUBACK");
    p
}

/// `mosquitto_pub --unix PATH -q 1 -t TOPIC -m MESSAGE`: its exit status and output.
pub fn mosquitto_pub_unix(path: &Path, topic: &str, message: &str) -> std::process::Output {
    Command::new("mosquitto_pub")
        .arg("--unix")
        .arg(path)
        .args(["-q", "1", "-t", topic, "-m", message])
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)")
}

/// A request on an agent's `call` socket, as `domu-agent call` makes it: one JSON line, then every
/// line the agent writes back until it closes (or `DEADLINE`), parsed.
pub fn call_socket(
    path: &Path,
    command: &str,
    args: serde_json::Value,
    timeout_ms: Option<u64>,
) -> Vec<serde_json::Value> {
    use std::io::{BufRead, Write};
    let mut req = serde_json::json!({"command": command, "args": args});
    if let Some(t) = timeout_ms {
        req["timeout_ms"] = t.into();
    }
    let Ok(mut conn) = std::os::unix::net::UnixStream::connect(path) else {
        return Vec::new();
    };
    let _ = conn.set_read_timeout(Some(DEADLINE));
    if conn.write_all(format!("{req}\n").as_bytes()).is_err() {
        return Vec::new();
    }
    std::io::BufReader::new(conn)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}
