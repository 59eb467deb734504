//! The fleet: what a host (one Dom0) sends to the operations centre, what it takes from it, and
//! under which names, on both sides of the bridge.
//!
//! At the centre (a RabbitMQ cluster), every host owns one tree:
//! - `fleet/<host>/out/...`: what the host publishes — the link events and error notifications it
//!   chose to send (their local topic under the prefix: `fleet/<host>/out/system/...`), its
//!   supervision snapshots (`fleet/<host>/out/snapshot`), the answers to fleet commands
//!   (`fleet/<host>/out/<root>/response`);
//! - `fleet/<host>/in/<root>/request`: the commands the centre sends it.
//!
//! On the host's own broker, the bridge (Mosquitto's, or dom0-broker's forwarder) maps the trees
//! to local ones by a plain prefix: the commands arrive on `fleet/in/<root>/request`, the
//! controller publishes answers and snapshots under `fleet/out/`. The two trees are disjoint, so
//! nothing loops. `system/#` is never forwarded wholesale: responses carry file contents.
//!
//! A host id follows the VM id grammar (no dots: RabbitMQ maps `/` to `.` in its topic
//! permissions). Pure: no I/O, time comes in as an argument.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::payload::{LinkCounters, RequestId};
use crate::topic::{Command, Notification, REQUEST, RESPONSE, Topic};
use crate::vm::{self, VmIdError};

/// The first level of every fleet topic, at the centre and on a host.
pub const FLEET: &str = "fleet";
/// Level of a host's outgoing tree.
pub const OUT: &str = "out";
/// Level of a host's incoming tree.
pub const IN: &str = "in";
/// The last level of a host's supervision snapshot.
pub const SNAPSHOT: &str = "snapshot";
/// Where the bridge says whether the centre is reachable (`1`) or not (`0`), on the host's broker
/// (Mosquitto's bridge `notification_topic`; the forwarder publishes the same).
pub const LOCAL_BRIDGE_STATE: &str = "fleet/bridge/state";
/// The client id prefix of every fleet connection at the centre: a host connects as
/// `fleet-<host>`, an operator's tool as `fleet-<user>.<random>`; the centre's login check binds
/// both to the user name.
pub const CLIENT_ID_PREFIX: &str = "fleet-";

/// A validated host id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct HostId(String);

impl HostId {
    /// A host id: the VM id grammar (`[a-z0-9][a-z0-9_-]{0,31}`), which has no dots.
    pub fn parse(untrusted: &str) -> Result<HostId, VmIdError> {
        vm::validate(untrusted)?;
        Ok(HostId(untrusted.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host's client id at the centre.
    pub fn client_id(&self) -> String {
        format!("{CLIENT_ID_PREFIX}{}", self.0)
    }
}

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for HostId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HostId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The client id an operator's tool uses at the centre: `fleet-<user>.<suffix>` (the dot cannot
/// occur in a host id, so no operator can take a host's client id, nor a host another's).
pub fn operator_client_id(user: &str, suffix: &str) -> String {
    format!("{CLIENT_ID_PREFIX}{user}.{suffix}")
}

/// Whether a login of `username` with `client_id` is bound to its user: a host's own client id,
/// or one of the user's operator ids. What the centre's login check enforces (a valid password
/// alone would let a host take over another's session).
pub fn client_id_belongs_to(client_id: &str, username: &str) -> bool {
    let Some(rest) = client_id.strip_prefix(CLIENT_ID_PREFIX) else {
        return false;
    };
    match rest.strip_prefix(username) {
        Some("") => true,
        Some(tail) => tail
            .strip_prefix('.')
            .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric())),
        None => false,
    }
}

/// What a host may choose to send to the centre besides its snapshots and answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outbound {
    /// Link state changes (`system/supervision/links/notification`).
    Links,
    /// Error notifications (`system/events/error/notification`), Dom0's refusals among them.
    Errors,
    /// Service announcements (`system/components/announce/notification`).
    Announcements,
    /// New files on the disks (`system/disk/new_file/notification`): names and sizes only.
    NewFiles,
}

impl Outbound {
    pub const ALL: [Outbound; 4] = [
        Outbound::Links,
        Outbound::Errors,
        Outbound::Announcements,
        Outbound::NewFiles,
    ];

    /// The local topic it is read from (a notification: never a response, which can carry a
    /// file's contents).
    pub fn local_topic(self) -> String {
        self.notification().topic()
    }

    fn notification(self) -> Notification {
        match self {
            Outbound::Links => Notification::LinkState,
            Outbound::Errors => Notification::Error,
            Outbound::Announcements => Notification::Announce,
            Outbound::NewFiles => Notification::NewFile,
        }
    }
}

/// Which way a route carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Host → centre.
    Out,
    /// Centre → host.
    In,
}

/// One mapping between the host's broker and the centre: a topic `local_prefix + t` on the host
/// is `remote_prefix + t` at the centre, for every `t` that `pattern` matches. The same rule as
/// Mosquitto's bridge `topic` lines (a plain prefix, no wildcard in prefixes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub direction: Direction,
    pub pattern: String,
    pub local_prefix: String,
    pub remote_prefix: String,
}

impl Route {
    /// The local filter this route reads (Out) or writes under (In).
    pub fn local_filter(&self) -> String {
        format!("{}{}", self.local_prefix, self.pattern)
    }

    /// The centre's filter this route writes under (Out) or reads (In).
    pub fn remote_filter(&self) -> String {
        format!("{}{}", self.remote_prefix, self.pattern)
    }

    /// The centre's name of a local topic this route carries out.
    pub fn to_remote(&self, local: &str) -> Option<String> {
        let t = local.strip_prefix(&self.local_prefix)?;
        crate::filter::filter_matches(&self.pattern, t)
            .then(|| format!("{}{t}", self.remote_prefix))
    }

    /// The local name of a centre's topic this route carries in.
    pub fn to_local(&self, remote: &str) -> Option<String> {
        let t = remote.strip_prefix(&self.remote_prefix)?;
        crate::filter::filter_matches(&self.pattern, t).then(|| format!("{}{t}", self.local_prefix))
    }
}

/// `fleet/<host>/out/`
pub fn remote_out_prefix(host: &HostId) -> String {
    format!("{FLEET}/{host}/{OUT}/")
}

/// `fleet/<host>/in/`
pub fn remote_in_prefix(host: &HostId) -> String {
    format!("{FLEET}/{host}/{IN}/")
}

/// `fleet/out/`: what the host's controller publishes for the centre only.
pub fn local_out_prefix() -> String {
    format!("{FLEET}/{OUT}/")
}

/// `fleet/in/`: where the centre's commands arrive on the host's broker.
pub fn local_in_prefix() -> String {
    format!("{FLEET}/{IN}/")
}

/// Every route of a host: the chosen notifications and the controller's `fleet/out/` tree out,
/// the command requests in. Nothing else crosses.
pub fn routes(host: &HostId, outbound: &[Outbound]) -> Vec<Route> {
    let mut chosen: Vec<Outbound> = outbound.to_vec();
    chosen.sort();
    chosen.dedup();
    let mut r: Vec<Route> = chosen
        .into_iter()
        .map(|o| Route {
            direction: Direction::Out,
            pattern: o.local_topic(),
            local_prefix: String::new(),
            remote_prefix: remote_out_prefix(host),
        })
        .collect();
    r.push(Route {
        direction: Direction::Out,
        pattern: "#".into(),
        local_prefix: local_out_prefix(),
        remote_prefix: remote_out_prefix(host),
    });
    r.push(Route {
        direction: Direction::In,
        pattern: crate::filter::requests(),
        local_prefix: local_in_prefix(),
        remote_prefix: remote_in_prefix(host),
    });
    r
}

/// The local filter of the commands from the centre: `fleet/in/system/+/+/request`.
pub fn local_commands() -> String {
    format!("{}{}", local_in_prefix(), crate::filter::requests())
}

/// The command a local fleet command topic carries (`fleet/in/<root>/request`).
pub fn local_command(topic: &str) -> Option<Command> {
    match Topic::parse(topic.strip_prefix(&local_in_prefix())?) {
        Ok(Topic::Request(c)) => Some(c),
        _ => None,
    }
}

/// Where the controller answers a fleet command on the host: `fleet/out/<root>/response`.
pub fn local_answer(command: Command) -> String {
    format!("{}{}/{RESPONSE}", local_out_prefix(), command.root())
}

/// Where the controller publishes its supervision snapshot on the host: `fleet/out/snapshot`.
pub fn local_snapshot() -> String {
    format!("{}{SNAPSHOT}", local_out_prefix())
}

/// The level under which a host publishes one VM's counters for metrics exporters.
pub const METRICS: &str = "metrics";

/// Where the controller publishes a VM's counters on the host: `fleet/out/metrics/<vm>` (one
/// flat object per VM, for exporters that read one device per topic, such as mqtt2prometheus).
pub fn local_metrics(vm: &str) -> String {
    format!("{}{METRICS}/{vm}", local_out_prefix())
}

/// Where the centre sends a host a command: `fleet/<host>/in/<root>/request`.
pub fn command_topic(host: &HostId, command: Command) -> String {
    format!("{}{}/{REQUEST}", remote_in_prefix(host), command.root())
}

/// Where a host answers the centre's commands: `fleet/<host>/out/<root>/response`.
pub fn answer_topic(host: &HostId, command: Command) -> String {
    format!("{}{}/{RESPONSE}", remote_out_prefix(host), command.root())
}

/// Every host's snapshots: `fleet/+/out/snapshot`.
pub fn snapshots() -> String {
    format!("{FLEET}/+/{OUT}/{SNAPSHOT}")
}

/// The whole fleet tree, on a host (`fleet/in`, `fleet/out`, the bridge's state) and at the
/// centre: `fleet/#`. No VM may publish, read or subscribe under it.
pub fn everything() -> String {
    format!("{FLEET}/#")
}

/// The host a centre topic belongs to (`fleet/<host>/...`).
pub fn host_of(topic: &str) -> Option<HostId> {
    let mut levels = topic.split('/');
    (levels.next()? == FLEET)
        .then(|| levels.next())
        .flatten()
        .and_then(|h| HostId::parse(h).ok())
}

/// When the centre issued a command, in milliseconds since the epoch (MQTT 3.1.1 has no expiry:
/// the host refuses a command older than its maximum age).
pub const ISSUED_AT: &str = "issued_at";
/// The VM a fleet command is for (`dom0`: the host's controller itself).
pub const DESTINATION: &str = "destination";

/// A command from the centre, as the host reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetCommand {
    pub command: Command,
    pub request_id: RequestId,
    /// The VM it is for, or `dom0`.
    pub destination: String,
    pub issued_at_ms: u64,
    /// The requester's patience (`timeout_ms`), if it said.
    pub timeout_ms: Option<u64>,
    /// The command's own arguments (everything else; `sender` and the deadline are the host's).
    pub args: Map<String, Value>,
}

/// Why a fleet command cannot even be answered or is refused as malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetCommandError {
    /// Not JSON, not an object, or no valid `request_id`: nobody to answer.
    #[error("no valid request_id: cannot answer")]
    Unanswerable,
    #[error("{0}")]
    Invalid(String),
}

/// Reads a command that arrived on `command`'s fleet topic. A command without a readable
/// `request_id` cannot be answered ([`FleetCommandError::Unanswerable`]); other defects are
/// answered (`invalid_request`).
pub fn parse_command(
    command: Command,
    payload: &[u8],
) -> Result<FleetCommand, (Option<RequestId>, FleetCommandError)> {
    let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(payload) else {
        return Err((None, FleetCommandError::Unanswerable));
    };
    let request_id = match m.remove("request_id") {
        Some(Value::String(s)) => RequestId::parse(&s).ok(),
        _ => None,
    };
    let Some(request_id) = request_id else {
        return Err((None, FleetCommandError::Unanswerable));
    };
    let bad = |why: String| (Some(request_id.clone()), FleetCommandError::Invalid(why));
    let destination = match m.remove(DESTINATION) {
        Some(Value::String(d)) if d == vm::DOM0 || vm::validate(&d).is_ok() => d,
        Some(_) => return Err(bad(format!("`{DESTINATION}` is not a VM id"))),
        None => return Err(bad(format!("`{DESTINATION}` is missing (a VM, or dom0)"))),
    };
    let issued_at_ms = match m.remove(ISSUED_AT).as_ref().and_then(Value::as_u64) {
        Some(t) => t,
        None => {
            return Err(bad(format!(
                "`{ISSUED_AT}` is missing or not milliseconds since the epoch"
            )));
        }
    };
    let timeout_ms = match m.remove(crate::payload::TIMEOUT_MS) {
        None => None,
        Some(v) => match v.as_u64() {
            Some(t) if t > 0 => Some(t),
            _ => return Err(bad("`timeout_ms` is not a positive integer".into())),
        },
    };
    for host_owned in ["sender", crate::payload::DEADLINE_MS, "responder", "origin"] {
        m.remove(host_owned);
    }
    Ok(FleetCommand {
        command,
        request_id,
        destination,
        issued_at_ms,
        timeout_ms,
        args: m,
    })
}

impl FleetCommand {
    /// The command as the operator's tool publishes it.
    pub fn to_json(&self) -> Vec<u8> {
        let mut m = self.args.clone();
        m.insert("request_id".into(), self.request_id.as_str().into());
        m.insert(DESTINATION.into(), self.destination.clone().into());
        m.insert(ISSUED_AT.into(), self.issued_at_ms.into());
        if let Some(t) = self.timeout_ms {
            m.insert(crate::payload::TIMEOUT_MS.into(), t.into());
        }
        Value::Object(m).to_string().into_bytes()
    }

    /// How old the command is at `now_ms` (0 when issued "in the future", within the skew the
    /// admission allows).
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.issued_at_ms)
    }
}

/// A host's supervision snapshot (`fleet/<host>/out/snapshot`): its links and what its bridge
/// to the centre holds back. Published periodically and after every reconnection to the centre.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub host: String,
    /// RFC 3339, UTC.
    pub datetime: String,
    /// Milliseconds since the epoch (the operator's staleness).
    pub at_ms: u64,
    /// The host's broker: `embedded` or `external`.
    pub broker: String,
    pub links: Vec<LinkCounters>,
    /// Messages for the centre the host's bridge dropped because its queue was full (the
    /// embedded broker's forwarder; with Mosquitto, its broker-wide dropped publishes).
    #[serde(default)]
    pub outbound_dropped: u64,
    /// Messages waiting for the centre (the forwarder), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_queued: Option<u64>,
    /// The bytes they hold (topics and payloads), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_queued_bytes: Option<u64>,
}

#[cfg(test)]
mod tests;
