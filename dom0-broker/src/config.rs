//! Settings: the TOML config file, overridden by command-line flags, validated into [`Settings`].
//! Pure: no file is opened here except by [`load_file`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::session::Limits;

pub use topics::config_file::ConfigError;

/// The config file (`/etc/dom0-broker/dom0-broker.toml`). Every key is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub socket_dir: Option<PathBuf>,
    pub socket_glob: Option<String>,
    /// Embedded broker's MQTT 3.1.1 listener.
    pub listen: Option<String>,
    /// External broker URL (`mqtt://HOST:PORT` or `unix:///PATH`); absent: embedded broker.
    pub broker: Option<String>,
    pub policy: Option<PathBuf>,
    /// UNIX socket for Dom0 operators (`mosquitto_pub --unix`), served by the embedded broker.
    pub operator_socket: Option<PathBuf>,
    /// How the links reach the embedded broker: `in-process` (default: an in-memory pipe served by
    /// rumqttd's connection code on our runtime, no socket) or `tcp` (its private loopback port,
    /// as Dom0's own clients).
    pub embedded_links: Option<EmbeddedLinks>,
    /// Allow `listen` on a non-loopback address. Off by default: nothing listens beyond Dom0.
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// tracing filter, e.g. `info` or `debug,rumqttd=warn`; RUST_LOG overrides it.
    pub log: Option<String>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[mosquitto]`: with Mosquitto as the broker, the ACL rendered from the policy.
    #[serde(default)]
    pub mosquitto: MosquittoConfig,
    /// `[fleet]`: this host at the operations centre (`docs/fleet.md`); absent: no fleet.
    pub fleet: Option<crate::fleet::config::FleetConfig>,
}

/// `[mosquitto]`: where the rendered ACL goes and how to tell Mosquitto to reread it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MosquittoConfig {
    /// Re-rendered from the policy at start and on every reload (Mosquitto's `acl_file`).
    pub acl_file: Option<PathBuf>,
    /// Mosquitto's pid file: it gets SIGHUP after the ACL is rewritten.
    pub pid_file: Option<PathBuf>,
}

/// `[limits]`: the bounds of every link and of the embedded broker.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_packet_size: Option<usize>,
    pub max_keepalive_secs: Option<u64>,
    pub queue_bytes: Option<usize>,
    pub rate_per_sec: Option<u32>,
    pub burst: Option<u32>,
    pub max_inflight: Option<usize>,
    pub violation_limit: Option<u32>,
    pub broker_connect_timeout_ms: Option<u64>,
}

/// Flags of `dom0-broker run` (they override the file): defined once, flattened into the command
/// line by `cli.rs`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Flags {
    /// Directory of the channel sockets [default: /var/run].
    #[arg(long)]
    pub socket_dir: Option<PathBuf>,
    /// Channel socket names; `*` is the VM name [default: *-msg.sock].
    #[arg(long)]
    pub socket_glob: Option<String>,
    /// Embedded broker's MQTT 3.1.1 listener [default: 127.0.0.1:1883]; loopback only unless the config allows.
    #[arg(long)]
    pub listen: Option<String>,
    /// Use this broker instead of the embedded one: mqtt://HOST:PORT or unix:///PATH.
    #[arg(long)]
    pub broker: Option<String>,
    /// Policy file [default: the built-in policy, deploy/alpine/policy.toml].
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// UNIX socket for Dom0 operators, served by the embedded broker (mosquitto_pub --unix).
    #[arg(long)]
    pub operator_socket: Option<PathBuf>,
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerAddr {
    /// `host:port`
    Tcp(String),
    Unix(PathBuf),
}

impl std::fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerAddr::Tcp(a) => write!(f, "mqtt://{a}"),
            BrokerAddr::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// How the links reach the embedded broker (`embedded_links`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmbeddedLinks {
    /// An in-memory pipe each, its other end served by rumqttd's connection code on our runtime.
    #[default]
    InProcess,
    /// rumqttd's private loopback port.
    Tcp,
}

/// Which broker the service uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerChoice {
    /// rumqttd inside this process, listening on this address.
    Embedded(SocketAddr),
    External(BrokerAddr),
}

/// The pattern of channel socket names: one `*`, which is the VM name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketGlob {
    prefix: String,
    suffix: String,
}

impl SocketGlob {
    pub fn parse(glob: &str) -> Result<SocketGlob, ConfigError> {
        match glob.split_once('*') {
            Some((p, s)) if !s.contains('*') && !glob.contains('/') && !glob.contains('?') => {
                Ok(SocketGlob {
                    prefix: p.to_owned(),
                    suffix: s.to_owned(),
                })
            }
            _ => Err(ConfigError::Invalid(format!(
                "socket glob {glob:?} must contain exactly one '*' (the VM name) and no '/' or '?'"
            ))),
        }
    }

    /// The part of `file_name` that `*` matched: the VM name candidate.
    pub fn capture<'a>(&self, file_name: &'a str) -> Option<&'a str> {
        let rest = file_name.strip_prefix(&self.prefix)?;
        let name = rest.strip_suffix(&self.suffix)?;
        (!name.is_empty()).then_some(name)
    }
}

/// Validated settings of `run`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub socket_dir: PathBuf,
    pub socket_glob: SocketGlob,
    pub broker: BrokerChoice,
    /// With the embedded broker: how the links reach it.
    pub embedded_links: EmbeddedLinks,
    pub policy: Option<PathBuf>,
    pub operator_socket: Option<PathBuf>,
    pub limits: Limits,
    pub connect_timeout: Duration,
    pub log: Option<String>,
    pub mosquitto: MosquittoConfig,
    pub fleet: Option<crate::fleet::config::FleetSettings>,
}

pub const DEFAULT_SOCKET_DIR: &str = "/var/run";
pub const DEFAULT_SOCKET_GLOB: &str = "*-msg.sock";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1883";

/// Reads a config file.
pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::read(path, e))?;
    parse_file(&text, &path.display().to_string())
}

pub fn parse_file(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
    topics::config_file::parse(text, origin)
}

/// Parses `mqtt://HOST:PORT` or `unix:///PATH`.
pub fn parse_broker_url(url: &str) -> Result<BrokerAddr, ConfigError> {
    let bad = |why: &str| ConfigError::Invalid(format!("broker URL {url:?}: {why}"));
    if let Some(path) = url.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(bad(
                "a unix URL needs an absolute path (unix:///run/mosquitto.sock)",
            ));
        }
        return Ok(BrokerAddr::Unix(PathBuf::from(path)));
    }
    let hostport = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or_else(|| bad("expected mqtt://HOST:PORT or unix:///PATH"))?;
    let hostport = hostport.trim_end_matches('/');
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| bad("missing :PORT"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad("expected HOST:PORT"));
    }
    Ok(BrokerAddr::Tcp(hostport.to_owned()))
}

/// Merges file and flags, applies defaults, validates.
pub fn resolve(file: FileConfig, flags: Flags) -> Result<Settings, ConfigError> {
    let socket_dir = flags
        .socket_dir
        .or(file.socket_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR));
    let glob = flags
        .socket_glob
        .or(file.socket_glob)
        .unwrap_or_else(|| DEFAULT_SOCKET_GLOB.to_owned());
    let socket_glob = SocketGlob::parse(&glob)?;
    let broker = match flags.broker.or(file.broker) {
        Some(_) if file.embedded_links.is_some() => {
            return Err(ConfigError::Invalid(
                "embedded_links is for the embedded broker; an external broker is reached at its URL"
                    .into(),
            ));
        }
        Some(url) => BrokerChoice::External(parse_broker_url(&url)?),
        None => {
            let listen = flags
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
            let addr: SocketAddr = listen.parse().map_err(|_| {
                ConfigError::Invalid(format!("listen address {listen:?} is not IP:PORT"))
            })?;
            if !addr.ip().is_loopback() && !file.allow_non_loopback {
                return Err(ConfigError::Invalid(format!(
                    "listen address {addr} is not loopback; set allow_non_loopback = true in the config to allow it"
                )));
            }
            BrokerChoice::Embedded(addr)
        }
    };
    let l = file.limits;
    let limits = Limits {
        max_packet: l.max_packet_size.unwrap_or(4 * 1024 * 1024),
        max_keepalive: Duration::from_secs(l.max_keepalive_secs.unwrap_or(60)),
        queue_bytes: l.queue_bytes.unwrap_or(8 * 1024 * 1024),
        rate_per_sec: l.rate_per_sec.unwrap_or(2000),
        burst: l.burst.unwrap_or(4000),
        max_inflight: l.max_inflight.unwrap_or(100),
        violation_limit: l.violation_limit.unwrap_or(100),
    };
    let checks = [
        (
            limits.max_packet >= 1024 && limits.max_packet <= 256 * 1024 * 1024,
            "max_packet_size must be 1 KiB to 256 MiB",
        ),
        (
            (1..=3600).contains(&limits.max_keepalive.as_secs()),
            "max_keepalive_secs must be 1 to 3600",
        ),
        (
            limits.queue_bytes >= limits.max_packet,
            "queue_bytes must be at least max_packet_size",
        ),
        (
            limits.rate_per_sec >= 1 && limits.burst >= 1,
            "rate_per_sec and burst must be at least 1",
        ),
        (limits.max_inflight >= 1, "max_inflight must be at least 1"),
        (
            limits.violation_limit >= 1,
            "violation_limit must be at least 1",
        ),
    ];
    if let Some((_, why)) = checks.iter().find(|(ok, _)| !ok) {
        return Err(ConfigError::Invalid(format!("[limits] {why}")));
    }
    Ok(Settings {
        socket_dir,
        socket_glob,
        broker,
        embedded_links: file.embedded_links.unwrap_or_default(),
        policy: flags.policy.or(file.policy),
        operator_socket: flags.operator_socket.or(file.operator_socket),
        limits,
        connect_timeout: Duration::from_millis(l.broker_connect_timeout_ms.unwrap_or(2000)),
        log: file.log,
        mosquitto: file.mosquitto,
        fleet: file.fleet.map(|f| f.validate()).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = SocketGlob::parse("*-msg.sock").unwrap();
        assert_eq!(g.capture("sys-usb-msg.sock"), Some("sys-usb"));
        assert_eq!(g.capture("vm-gui-msg.sock"), Some("vm-gui"));
        assert_eq!(g.capture("-msg.sock"), None);
        assert_eq!(g.capture("vm-gui-msg.sock.bak"), None);
        assert_eq!(g.capture("mqtt.sock"), None);
        let g = SocketGlob::parse("xen-*.chan").unwrap();
        assert_eq!(g.capture("xen-a.chan"), Some("a"));
        for bad in ["msg.sock", "*-*.sock", "a/*.sock", "?.sock"] {
            assert!(SocketGlob::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtt://127.0.0.1:1883").unwrap(),
            BrokerAddr::Tcp("127.0.0.1:1883".into())
        );
        assert_eq!(
            parse_broker_url("mqtt://localhost:1883/").unwrap(),
            BrokerAddr::Tcp("localhost:1883".into())
        );
        assert_eq!(
            parse_broker_url("unix:///run/m.sock").unwrap(),
            BrokerAddr::Unix("/run/m.sock".into())
        );
        for bad in [
            "127.0.0.1:1883",
            "mqtt://host",
            "mqtt://:1883",
            "mqtt://h:99999",
            "unix://rel.sock",
            "http://h:1",
        ] {
            assert!(parse_broker_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_flags_and_refusals() {
        let s = resolve(FileConfig::default(), Flags::default()).unwrap();
        assert_eq!(s.socket_dir, PathBuf::from("/var/run"));
        assert_eq!(
            s.broker,
            BrokerChoice::Embedded("127.0.0.1:1883".parse().unwrap())
        );

        let file = parse_file(
            "listen = \"127.0.0.1:2000\"\n[limits]\nmax_keepalive_secs = 30\n",
            "f",
        )
        .unwrap();
        let flags = Flags {
            listen: Some("127.0.0.1:3000".into()),
            ..Flags::default()
        };
        let s = resolve(file, flags).unwrap();
        assert_eq!(
            s.broker,
            BrokerChoice::Embedded("127.0.0.1:3000".parse().unwrap()),
            "flags win"
        );
        assert_eq!(s.limits.max_keepalive, Duration::from_secs(30));

        let non_loopback = Flags {
            listen: Some("0.0.0.0:1883".into()),
            ..Flags::default()
        };
        let err = resolve(FileConfig::default(), non_loopback.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not loopback"), "{err}");
        let allowed = FileConfig {
            allow_non_loopback: true,
            ..FileConfig::default()
        };
        assert!(resolve(allowed, non_loopback).is_ok());

        let err = parse_file("listne = 1\n", "dom0.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("dom0.toml") && err.contains("unknown field"),
            "{err}"
        );
        let bad = parse_file("[limits]\nmax_packet_size = 10\n", "f").unwrap();
        assert!(resolve(bad, Flags::default()).is_err());
    }

    #[test]
    fn embedded_links() {
        let links = |text: &str| {
            resolve(parse_file(text, "f")?, Flags::default()).map(|s| s.embedded_links)
        };
        assert_eq!(links("").unwrap(), EmbeddedLinks::InProcess, "the default");
        assert_eq!(
            links("embedded_links = \"in-process\"\n").unwrap(),
            EmbeddedLinks::InProcess
        );
        assert_eq!(
            links("embedded_links = \"tcp\"\n").unwrap(),
            EmbeddedLinks::Tcp
        );
        let err = links("embedded_links = \"udp\"\n").unwrap_err().to_string();
        assert!(err.contains("unknown variant"), "{err}");
        let err = links("broker = \"mqtt://127.0.0.1:1883\"\nembedded_links = \"tcp\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("embedded_links is for the embedded broker"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod deploy_tests {
    use super::*;

    /// The shipped configuration is valid.
    #[test]
    fn deploy_config_parses() {
        let text = include_str!("../../deploy/alpine/dom0-broker.toml");
        let s = resolve(
            parse_file(text, "dom0-broker.toml").unwrap(),
            Flags::default(),
        )
        .unwrap();
        assert_eq!(
            s.broker,
            BrokerChoice::External(BrokerAddr::Unix("/run/mosquitto/guests.sock".into()))
        );
        assert_eq!(
            s.policy,
            Some(PathBuf::from("/etc/dom0-broker/policy.toml"))
        );
    }
}
