//! `[fleet]` in dom0-broker's config: this host's identity at the operations centre, how to reach
//! it, what goes out, which commands may come in. Validated into [`FleetSettings`]; pure (the
//! password file is read by the caller).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use topics::Command;
use topics::config_file::ConfigError;
use topics::fleet::{HostId, Outbound};

/// `[fleet]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// This host's id at the centre (the VM id grammar; no dots).
    pub host: String,
    /// The centre's MQTT-over-TLS addresses (`HOST:PORT`, IP addresses for the static build),
    /// tried in turn: one per cluster node.
    pub centre: Vec<String>,
    /// The centre's CA (PEM), and this host's certificate and key (PEM).
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The user at the centre [default: the host id].
    pub username: Option<String>,
    /// A file holding the password (one line). The centre checks the password and that the
    /// client id is this host's own: a certificate alone does not carry the client id there.
    pub password_file: PathBuf,
    /// What goes out besides snapshots and answers [default: links, errors].
    pub outbound: Option<Vec<Outbound>>,
    /// Commands that may come in, per VM (`dom0`: the controller's own commands). Deny by default.
    #[serde(default)]
    pub allow: BTreeMap<String, Vec<String>>,
    /// A command older than this (its `issued_at`) is answered `timeout` and not run [default 300].
    pub max_age_secs: Option<u64>,
    /// Messages for the centre held while it is unreachable (the embedded broker's forwarder;
    /// with Mosquitto, render-bridge sets its `max_queued_messages`) [default 10000].
    pub queue_messages: Option<usize>,
    /// Seconds between supervision snapshots [default 30; one also follows every reconnection].
    pub snapshot_secs: Option<u64>,
    /// Keepalive with the centre, seconds [default 30].
    pub keepalive_secs: Option<u64>,
}

/// The validated `[fleet]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    pub host: HostId,
    pub centre: Vec<(String, u16)>,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub username: String,
    pub password_file: PathBuf,
    pub outbound: Vec<Outbound>,
    pub allow: Allow,
    pub max_age: Duration,
    pub queue_messages: usize,
    pub snapshot_every: Duration,
    pub keepalive: Duration,
}

/// The commands that may come in from the centre, per destination. Deny by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allow(BTreeMap<String, BTreeSet<Command>>);

impl Allow {
    pub fn permits(&self, destination: &str, command: Command) -> bool {
        self.0
            .get(destination)
            .is_some_and(|c| c.contains(&command))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &BTreeSet<Command>)> {
        self.0.iter()
    }
}

pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);
pub const DEFAULT_QUEUE_MESSAGES: usize = 10_000;
pub const DEFAULT_SNAPSHOT: Duration = Duration::from_secs(30);

fn invalid(why: String) -> ConfigError {
    ConfigError::Invalid(format!("[fleet] {why}"))
}

/// `HOST:PORT` (a bracketed IPv6 host too).
fn host_port(a: &str) -> Result<(String, u16), ConfigError> {
    let a = a
        .strip_prefix("mqtts://")
        .unwrap_or(a)
        .trim_end_matches('/');
    let (h, p) = a
        .rsplit_once(':')
        .ok_or_else(|| invalid(format!("centre address {a:?} is not HOST:PORT")))?;
    let port = p
        .parse::<u16>()
        .map_err(|_| invalid(format!("centre address {a:?}: bad port")))?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    if h.is_empty() {
        return Err(invalid(format!("centre address {a:?}: no host")));
    }
    Ok((h.to_owned(), port))
}

/// Parses the centre's address list (also the operator tools' `--centre`).
pub fn centre_addresses(list: &[String]) -> Result<Vec<(String, u16)>, ConfigError> {
    if list.is_empty() {
        return Err(invalid("`centre` names no address".into()));
    }
    list.iter().map(|a| host_port(a)).collect()
}

impl FleetConfig {
    pub fn validate(self) -> Result<FleetSettings, ConfigError> {
        let host =
            HostId::parse(&self.host).map_err(|e| invalid(format!("host {:?}: {e}", self.host)))?;
        let centre = centre_addresses(&self.centre)?;
        let mut allow = BTreeMap::new();
        for (dest, commands) in self.allow {
            if dest != topics::vm::DOM0 && topics::VmId::parse(&dest).is_err() {
                return Err(invalid(format!("allow: {dest:?} is not a VM id (or dom0)")));
            }
            let mut set = BTreeSet::new();
            for c in commands {
                let command = Command::by_name(&c)
                    .ok_or_else(|| invalid(format!("allow.{dest}: unknown command {c:?}")))?;
                set.insert(command);
            }
            allow.insert(dest, set);
        }
        let secs = |v: Option<u64>, d: Duration, what: &str, max: u64| match v {
            None => Ok(d),
            Some(s) if (1..=max).contains(&s) => Ok(Duration::from_secs(s)),
            Some(s) => Err(invalid(format!("{what} = {s}: must be 1 to {max}"))),
        };
        let queue_messages = self.queue_messages.unwrap_or(DEFAULT_QUEUE_MESSAGES);
        if !(1..=10_000_000).contains(&queue_messages) {
            return Err(invalid("queue_messages must be 1 to 10000000".into()));
        }
        let username = self.username.unwrap_or_else(|| host.to_string());
        if username.is_empty() || username.contains('.') {
            return Err(invalid(format!(
                "username {username:?}: empty or with a dot"
            )));
        }
        Ok(FleetSettings {
            centre,
            ca_file: self.ca_file,
            cert_file: self.cert_file,
            key_file: self.key_file,
            username,
            password_file: self.password_file,
            outbound: self
                .outbound
                .unwrap_or_else(|| vec![Outbound::Links, Outbound::Errors]),
            allow: Allow(allow),
            max_age: secs(self.max_age_secs, DEFAULT_MAX_AGE, "max_age_secs", 86_400)?,
            queue_messages,
            snapshot_every: secs(self.snapshot_secs, DEFAULT_SNAPSHOT, "snapshot_secs", 3600)?,
            keepalive: secs(
                self.keepalive_secs,
                Duration::from_secs(30),
                "keepalive_secs",
                600,
            )?,
            host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<FleetSettings, ConfigError> {
        let text = format!(
            "host = \"host-a\"\ncentre = [\"127.0.0.1:8883\", \"mqtts://127.0.0.1:8884\"]\n\
             ca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n\
             password_file = \"/pw\"\n{extra}"
        );
        topics::config_file::parse::<FleetConfig>(&text, "test")?.validate()
    }

    #[test]
    fn defaults_deny_every_command() {
        let s = parse("").unwrap();
        assert_eq!(s.username, "host-a");
        assert_eq!(
            s.centre,
            [("127.0.0.1".into(), 8883), ("127.0.0.1".into(), 8884)]
        );
        assert_eq!(s.outbound, [Outbound::Links, Outbound::Errors]);
        assert!(!s.allow.permits("sys-usb", Command::ListDisks));
        assert_eq!(s.max_age, DEFAULT_MAX_AGE);
    }

    #[test]
    fn allow_list_by_vm_and_command_name() {
        let s = parse(
            "outbound = [\"links\", \"new_files\"]\n[allow]\n\"sys-usb\" = [\"list_disks\", \"system/disks/list_files\"]\ndom0 = [\"counters\"]\n",
        )
        .unwrap();
        assert!(s.allow.permits("sys-usb", Command::ListDisks));
        assert!(s.allow.permits("sys-usb", Command::ListFiles));
        assert!(!s.allow.permits("sys-usb", Command::ReadFile));
        assert!(!s.allow.permits("vm-gui", Command::ListDisks));
        assert!(s.allow.permits("dom0", Command::SupervisionCounters));
        assert_eq!(s.outbound, [Outbound::Links, Outbound::NewFiles]);
    }

    #[test]
    fn bad_sections_say_why() {
        for (extra, why) in [
            (
                "[allow]\n\"sys-usb\" = [\"format_disk\"]\n",
                "unknown command",
            ),
            ("[allow]\n\"Sys\" = [\"list_disks\"]\n", "not a VM id"),
            ("max_age_secs = 0\n", "max_age_secs"),
            ("queue_messages = 0\n", "queue_messages"),
            ("outbound = [\"responses\"]\n", "unknown variant"),
            ("username = \"a.b\"\n", "dot"),
        ] {
            let e = parse(extra).unwrap_err().to_string();
            assert!(e.contains(why), "{extra}: {e}");
        }
        let e = topics::config_file::parse::<FleetConfig>("host = \"a.b\"\ncentre = []\nca_file=\"\"\ncert_file=\"\"\nkey_file=\"\"\npassword_file=\"\"", "t")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("host"), "{e}");
    }
}
