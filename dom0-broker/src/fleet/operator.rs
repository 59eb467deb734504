//! The operator's tools at the centre: `dom0-broker fleet status` (every host that reports, its
//! VMs and link counters, how fresh: the fleet's `xl list`) and `dom0-broker fleet call HOST VM
//! COMMAND KEY=VALUE...` (exit codes as `domu-agent call`'s). Each connects to the centre with a
//! clean session, its own TLS certificate, user and password, and a client id of its user's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::Value;
use topics::answers::{Question, Responders};
use topics::call_output::{self, LOCAL_FAILURE, TIMEOUT};
use topics::fleet::{self, FleetCommand, HostId, Snapshot};
use topics::vm::DOM0;
use topics::{Command, RequestId};

use crate::fleet::centre::{Centre, CentreAccess};
use crate::fleet::config::centre_addresses;

/// How to reach the centre (flags shared by `fleet status` and `fleet call`).
#[derive(Debug, Clone, clap::Args)]
pub struct CentreArgs {
    /// The centre's nodes, tried in turn: mqtts://HOST:PORT (repeat the flag or separate with commas).
    #[arg(long = "broker", required = true, value_delimiter = ',')]
    pub brokers: Vec<String>,
    /// The centre's CA certificate (PEM).
    #[arg(long)]
    pub ca_file: PathBuf,
    /// This operator's certificate (PEM), signed by the fleet's CA.
    #[arg(long)]
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    pub key_file: PathBuf,
    /// The operator's user at the centre.
    #[arg(long)]
    pub username: String,
    /// A file holding the operator's password (one line).
    #[arg(long)]
    pub password_file: PathBuf,
}

/// A failure before any answer: exit 125 with its reason.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OperatorError(pub String);

fn random_hex(n: usize) -> String {
    let mut bits = vec![0u8; n];
    let _ = getrandom::getrandom(&mut bits);
    bits.iter().map(|b| format!("{b:02x}")).collect()
}

/// Connects to the first node that takes us; gives the client and its event loop after the
/// CONNACK.
async fn connect(args: &CentreArgs) -> Result<(AsyncClient, EventLoop), OperatorError> {
    let addresses = centre_addresses(&args.brokers).map_err(|e| OperatorError(e.to_string()))?;
    let access = CentreAccess {
        addresses: addresses.clone(),
        ca_file: args.ca_file.clone(),
        cert_file: args.cert_file.clone(),
        key_file: args.key_file.clone(),
        username: args.username.clone(),
        password_file: args.password_file.clone(),
    };
    let client_id = fleet::operator_client_id(&args.username, &random_hex(6));
    let mut centre = Centre::new(
        &access,
        &client_id,
        Duration::from_secs(30),
        true,
        64 * 1024 * 1024,
    )
    .map_err(|e| OperatorError(e.to_string()))?;
    let mut why = Vec::new();
    for _ in 0..addresses.len() {
        let options = centre.next_options();
        let node = Centre::describe(&options);
        let (client, mut ev) = AsyncClient::new(options, 64);
        ev.set_network_options(Centre::network_options());
        match tokio::time::timeout(Duration::from_secs(5), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok((client, ev)),
            Ok(Ok(other)) => why.push(format!("{node}: unexpected {other:?}")),
            Ok(Err(e)) => why.push(format!("{node}: {e}")),
            Err(_) => why.push(format!("{node}: no answer in 5 s")),
        }
    }
    Err(OperatorError(format!(
        "cannot reach the centre: {}",
        why.join("; ")
    )))
}

/// One host's snapshot, as `fleet status` shows it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub snapshot: Snapshot,
    /// How old the snapshot was when printed, ms.
    pub age_ms: u64,
}

/// The table of every host (pure).
pub fn hosts_table(hosts: &BTreeMap<String, Seen>) -> String {
    let mut s = String::new();
    for (host, seen) in hosts {
        let snap = &seen.snapshot;
        s.push_str(&format!(
            "HOST {host}  broker {}  snapshot {:.1} s old ({})  queued for the centre {}  dropped {}\n",
            snap.broker,
            seen.age_ms as f64 / 1000.0,
            snap.datetime,
            snap.outbound_queued
                .map_or_else(|| "-".to_owned(), |q| q.to_string()),
            snap.outbound_dropped,
        ));
        for line in crate::status::table(&snap.links).lines() {
            s.push_str("  ");
            s.push_str(line);
            s.push('\n');
        }
    }
    s
}

/// `fleet status`: listens for the hosts' snapshots for `wait` (or until every host of `hosts`
/// reported), then prints them. Exit: 0, 1 when a named host did not report, 125 on failure.
pub async fn status(
    args: &CentreArgs,
    hosts: &[String],
    wait: Duration,
    json: bool,
) -> Result<(String, u8), OperatorError> {
    let (client, mut ev) = connect(args).await?;
    client
        .subscribe(fleet::snapshots(), QoS::AtLeastOnce)
        .await
        .map_err(|e| OperatorError(e.to_string()))?;
    let end = Instant::now() + wait;
    let mut seen: BTreeMap<String, (Snapshot, Instant)> = BTreeMap::new();
    loop {
        if !hosts.is_empty() && hosts.iter().all(|h| seen.contains_key(h)) {
            break;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, ev.poll()).await {
            Err(_) => break,
            Ok(Err(e)) => return Err(OperatorError(format!("lost the centre: {e}"))),
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let Some(host) = fleet::host_of(&p.topic) else {
                    continue;
                };
                if let Ok(snap) = serde_json::from_slice::<Snapshot>(&p.payload) {
                    // The topic says who published (the centre's permissions), not the body.
                    if snap.host == host.as_str() {
                        seen.insert(host.to_string(), (snap, Instant::now()));
                    }
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    let _ = client.disconnect().await;
    let now_ms = crate::fleet::duties::now_ms();
    let shown: BTreeMap<String, Seen> = seen
        .into_iter()
        .map(|(h, (snapshot, _))| {
            let age_ms = now_ms.saturating_sub(snapshot.at_ms);
            (h, Seen { snapshot, age_ms })
        })
        .collect();
    let mut out = String::new();
    if json {
        for (h, s) in &shown {
            let mut v = serde_json::to_value(&s.snapshot).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("age_ms".into(), s.age_ms.into());
                m.insert("host".into(), h.clone().into());
            }
            out.push_str(&v.to_string());
            out.push('\n');
        }
    } else {
        out = hosts_table(&shown);
    }
    let missing: Vec<&String> = hosts.iter().filter(|h| !shown.contains_key(*h)).collect();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        return Ok((
            format!(
                "{out}no snapshot from {} within {} ms\n",
                names.join(", "),
                wait.as_millis()
            ),
            1,
        ));
    }
    if shown.is_empty() {
        return Ok((
            format!("no host reported within {} ms\n", wait.as_millis()),
            1,
        ));
    }
    Ok((out, 0))
}

/// What `fleet call` prints and its exit code.
#[derive(Debug)]
pub struct CallOutcome {
    pub stdout: String,
    pub stderr: String,
    pub code: u8,
}

/// `fleet call HOST VM COMMAND KEY=VALUE...`: the command through the centre to the host, which
/// checks it and asks its VM; the answers as `domu-agent call` prints them. `repeat`: asked that
/// many times in a row on one connection, and the round trips' p50 and p99 printed.
#[allow(clippy::too_many_arguments)]
pub async fn call(
    args: &CentreArgs,
    host: &str,
    vm: &str,
    command: &str,
    words: &[String],
    timeout: Duration,
    json: bool,
    repeat: usize,
) -> CallOutcome {
    let fail = |code: u8, why: String| CallOutcome {
        stdout: String::new(),
        stderr: format!("{why}\n"),
        code,
    };
    let host = match HostId::parse(host) {
        Ok(h) => h,
        Err(e) => return fail(LOCAL_FAILURE, format!("host {host:?}: {e}")),
    };
    let Some(command) = Command::by_name(command) else {
        return fail(LOCAL_FAILURE, format!("unknown command {command:?}"));
    };
    let fields = match call_output::args_from_words(words, |f| {
        std::fs::read(f).map_err(|e| format!("{f}: {e}"))
    }) {
        Ok(a) => a,
        Err(e) => return fail(LOCAL_FAILURE, e),
    };
    let (client, mut ev) = match connect(args).await {
        Ok(c) => c,
        Err(e) => return fail(LOCAL_FAILURE, e.0),
    };
    let answers = fleet::answer_topic(&host, command);
    if let Err(e) = client.subscribe(answers.clone(), QoS::AtLeastOnce).await {
        return fail(LOCAL_FAILURE, e.to_string());
    }
    // The subscription is in place before the first command goes.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return fail(LOCAL_FAILURE, format!("lost the centre: {e}")),
            Err(_) => {
                return fail(
                    LOCAL_FAILURE,
                    "the centre did not confirm the subscription".into(),
                );
            }
        }
    }
    let mut samples = Vec::new();
    let mut lines = Vec::new();
    for _ in 0..repeat.max(1) {
        let mut bits = [0u8; 16];
        let _ = getrandom::getrandom(&mut bits);
        let cmd = FleetCommand {
            command,
            request_id: RequestId::random(bits),
            destination: vm.to_owned(),
            issued_at_ms: crate::fleet::duties::now_ms(),
            timeout_ms: Some(timeout.as_millis() as u64),
            args: fields.clone(),
        };
        let t0 = Instant::now();
        lines = match exchange(&client, &mut ev, &host, &answers, &cmd, timeout).await {
            Ok(l) => l,
            Err((code, why)) => return fail(code, why),
        };
        samples.push(t0.elapsed());
    }
    let _ = client.disconnect().await;
    let mut out = call_output::render(command, &lines, json);
    if repeat > 1 {
        samples.sort();
        let us = |q| {
            topics::payload::quantile(&samples, q).map_or(0.0, |d: Duration| d.as_secs_f64() * 1e6)
        };
        out.stdout.push_str(&format!(
            "round trip: p50 {:.1} us  p99 {:.1} us  ({} calls)\n",
            us(0.5),
            us(0.99),
            samples.len()
        ));
    }
    CallOutcome {
        stdout: out.stdout,
        stderr: out.stderr,
        code: out.code,
    }
}

/// One command and its answers (the host's refusal is its only answer).
async fn exchange(
    client: &AsyncClient,
    ev: &mut EventLoop,
    host: &HostId,
    answers: &str,
    cmd: &FleetCommand,
    timeout: Duration,
) -> Result<Vec<String>, (u8, String)> {
    let started = Instant::now();
    // The host's own margin: its answer (even a timeout) comes after the VM's patience.
    let patience = timeout + Duration::from_secs(5);
    let end = started + patience;
    let mut question = Question::new(
        cmd.command,
        cmd.request_id.clone(),
        Responders::Named(cmd.destination.clone()),
        Some(patience),
        started,
    );
    client
        .publish(
            fleet::command_topic(host, cmd.command),
            QoS::AtLeastOnce,
            false,
            cmd.to_json(),
        )
        .await
        .map_err(|e| (LOCAL_FAILURE, e.to_string()))?;
    let mut acknowledged = false;
    let mut lines = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || question.is_done(Instant::now()) {
            break;
        }
        match tokio::time::timeout(left, ev.poll()).await {
            Err(_) => break,
            Ok(Err(e)) => {
                let why = if acknowledged {
                    format!("lost the centre while waiting for the answer: {e}")
                } else {
                    format!("the centre did not take the command (no acknowledgement): {e}")
                };
                return Err((LOCAL_FAILURE, why));
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acknowledged = true,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == answers => {
                let taken = match question.accept(cmd.command, &p.payload, Instant::now()) {
                    Ok(_) => true,
                    // The host itself refuses (allow list, age): its answer is the last.
                    Err(topics::answers::Refusal::NotAsked(r)) if r == DOM0 => {
                        serde_json::from_slice::<Value>(&p.payload).is_ok_and(|v| {
                            v.get("request_id").and_then(Value::as_str)
                                == Some(cmd.request_id.as_str())
                        })
                    }
                    Err(_) => false,
                };
                if taken {
                    lines.push(String::from_utf8_lossy(&p.payload).into_owned());
                    if !question_answered_by_vm(&p.payload, &cmd.destination) {
                        break;
                    }
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    if lines.is_empty() {
        return Err(if acknowledged {
            (
                TIMEOUT,
                format!("no answer from {host} within {} ms", patience.as_millis()),
            )
        } else {
            (
                LOCAL_FAILURE,
                "the centre did not acknowledge the command".to_owned(),
            )
        });
    }
    Ok(lines)
}

fn question_answered_by_vm(payload: &[u8], vm: &str) -> bool {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v.get("responder")?.as_str().map(|r| r == vm))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_table_names_each_host_its_freshness_and_its_vms() {
        let snap: Snapshot = serde_json::from_str(
            r#"{"host":"host-a","datetime":"2026-12-07T10:00:00Z","at_ms":1,"broker":"embedded",
                "links":[],"outbound_dropped":3,"outbound_queued":7}"#,
        )
        .unwrap();
        let mut hosts = BTreeMap::new();
        hosts.insert(
            "host-a".to_owned(),
            Seen {
                snapshot: snap,
                age_ms: 1500,
            },
        );
        let t = hosts_table(&hosts);
        assert!(
            t.starts_with("HOST host-a  broker embedded  snapshot 1.5 s old"),
            "{t}"
        );
        assert!(t.contains("queued for the centre 7  dropped 3"), "{t}");
        assert!(t.contains("  VM "), "{t}");
    }
}
