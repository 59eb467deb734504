//! Settings of `domu-agent run`: the TOML file, overridden by flags, validated. Pure.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use topics::vm::VmId;

use crate::uplink::tty::Device;

pub use topics::config_file::ConfigError;

/// The config file (`/etc/domu-agent/domu-agent.toml`); every key optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub vm: Option<String>,
    pub device: Option<PathBuf>,
    pub channel: Option<String>,
    pub disks: Option<PathBuf>,
    pub repository: Option<PathBuf>,
    /// UNIX socket of the `call` CLI; absent: no local requests.
    pub local_socket: Option<PathBuf>,
    /// UNIX socket of the local MQTT endpoint [default: /run/domu-agent/mqtt.sock]; "" turns it off.
    pub mqtt_socket: Option<PathBuf>,
    /// A TCP listener for local MQTT clients (`127.0.0.1:1883`); off when absent.
    pub mqtt_listen: Option<String>,
    /// UNIX socket of the legacy (MVP JSON lines) endpoint [default: /run/domu-agent/legacy.sock];
    /// "" turns it off.
    pub legacy_socket: Option<PathBuf>,
    pub keepalive_secs: Option<u64>,
    pub log: Option<String>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub local: LocalConfig,
}

/// `[local]`: the local MQTT endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Local MQTT clients connected at once [default: 64].
    pub max_clients: Option<usize>,
    /// Messages queued for one client before it is dropped [default: 4096].
    pub client_queue: Option<usize>,
    /// Mode of the UNIX socket, octal [default: "0660"].
    pub socket_mode: Option<String>,
    /// Group of the UNIX socket (name or number) [default: the agent's].
    pub socket_group: Option<String>,
    /// Allow `mqtt_listen` on an address other than loopback [default: false].
    #[serde(default)]
    pub allow_remote: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_packet_size: Option<usize>,
    /// Largest `create_file` content, decoded.
    pub max_create_bytes: Option<usize>,
    /// Entries of a `list_files` answer before `truncated`.
    pub max_list_entries: Option<usize>,
    /// Disk operations running at once.
    pub max_concurrent: Option<usize>,
    /// Largest file uploaded in chunks (`create_file` with `upload_id`).
    pub max_upload_bytes: Option<u64>,
    /// Bytes of all uploads going at once.
    pub max_upload_total_bytes: Option<u64>,
    /// File data per chunk when this agent uploads (its legacy endpoint).
    pub upload_chunk_bytes: Option<usize>,
}

/// Flags of `domu-agent run` (they override the file): defined once, flattened into the command
/// line by `cli.rs`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Flags {
    /// This guest's VM id (used as `sender`; Dom0 enforces it anyway).
    #[arg(long)]
    pub vm: Option<String>,
    /// The channel tty [default: /dev/hvc2].
    #[arg(long)]
    pub device: Option<PathBuf>,
    /// Find the channel by name (/dev/xen-channel/NAME, /dev/virtio-ports/NAME, or xenstore).
    #[arg(long)]
    pub channel: Option<String>,
    /// Serve the disk commands: each subdirectory of DIR is a disk.
    #[arg(long)]
    pub disks: Option<PathBuf>,
    /// The local repository that read_file copies into.
    #[arg(long)]
    pub repository: Option<PathBuf>,
    /// UNIX socket for local requests (`domu-agent call`).
    #[arg(long)]
    pub local_socket: Option<PathBuf>,
    /// UNIX socket of the local MQTT endpoint for the guest's applications
    /// [default: /run/domu-agent/mqtt.sock; `none`: off].
    #[arg(long, value_name = "PATH")]
    pub mqtt_socket: Option<PathBuf>,
    /// Also listen for local MQTT clients on TCP (IP:PORT, loopback unless the config allows
    /// another address) [default: off].
    #[arg(long, value_name = "ADDR")]
    pub mqtt_listen: Option<String>,
    /// UNIX socket of the legacy endpoint for MVP applications (JSON lines)
    /// [default: /run/domu-agent/legacy.sock; `none`: off].
    #[arg(long, value_name = "PATH")]
    pub legacy_socket: Option<PathBuf>,
    /// MQTT keepalive in seconds [default: 5].
    #[arg(long)]
    pub keepalive: Option<u64>,
}

/// Bounds of the disk service.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_packet: usize,
    pub max_create_bytes: usize,
    pub max_list_entries: usize,
    pub max_concurrent: usize,
    pub max_upload_bytes: u64,
    pub max_upload_total: u64,
    pub upload_chunk: usize,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub vm: VmId,
    pub device: Device,
    pub disks: Option<PathBuf>,
    pub repository: Option<PathBuf>,
    pub local_socket: Option<PathBuf>,
    pub keepalive: Duration,
    pub limits: Limits,
    pub log: Option<String>,
    /// The local MQTT endpoint's UNIX socket (None: off).
    pub mqtt_socket: Option<PathBuf>,
    /// Its TCP listener (None: off).
    pub mqtt_listen: Option<SocketAddr>,
    /// The legacy endpoint's UNIX socket (None: off).
    pub legacy_socket: Option<PathBuf>,
    pub local: LocalSettings,
}

/// Settings of the local MQTT endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSettings {
    pub max_clients: usize,
    pub client_queue: usize,
    pub socket_mode: u32,
    /// A group name or number, resolved when the socket is made.
    pub socket_group: Option<String>,
}

pub const DEFAULT_DEVICE: &str = "/dev/hvc2";
/// Where local MQTT clients connect by default.
pub const DEFAULT_MQTT_SOCKET: &str = "/run/domu-agent/mqtt.sock";
/// Where MVP applications connect by default.
pub const DEFAULT_LEGACY_SOCKET: &str = "/run/domu-agent/legacy.sock";

/// A socket path from a flag or the file: the default when absent, off when "" or "none".
fn socket_path(given: Option<PathBuf>, default: &str) -> Option<PathBuf> {
    match given {
        Some(p) if p.as_os_str().is_empty() || p.as_os_str() == "none" => None,
        Some(p) => Some(p),
        None => Some(PathBuf::from(default)),
    }
}

pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::read(path, e))?;
    parse_file(&text, &path.display().to_string())
}

pub fn parse_file(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
    topics::config_file::parse(text, origin)
}

pub fn resolve(file: FileConfig, flags: Flags) -> Result<Settings, ConfigError> {
    let vm = flags
        .vm
        .or(file.vm)
        .ok_or_else(|| ConfigError::Invalid("--vm NAME is required (this guest's VM id)".into()))?;
    let vm = VmId::parse(&vm).map_err(|e| ConfigError::Invalid(format!("--vm {vm:?}: {e}")))?;
    let device = device(flags.device, flags.channel, file.device, file.channel)?;
    let keepalive = flags.keepalive.or(file.keepalive_secs).unwrap_or(5);
    if !(1..=600).contains(&keepalive) {
        return Err(ConfigError::Invalid(format!(
            "keepalive {keepalive} s: must be 1 to 600"
        )));
    }
    let mqtt_socket = socket_path(flags.mqtt_socket.or(file.mqtt_socket), DEFAULT_MQTT_SOCKET);
    let legacy_socket = socket_path(
        flags.legacy_socket.or(file.legacy_socket),
        DEFAULT_LEGACY_SOCKET,
    );
    let mqtt_listen = mqtt_listen(flags.mqtt_listen.or(file.mqtt_listen), &file.local)?;
    Ok(Settings {
        legacy_socket,
        mqtt_socket,
        mqtt_listen,
        local: local(file.local)?,
        vm,
        device,
        disks: flags.disks.or(file.disks),
        repository: flags.repository.or(file.repository),
        local_socket: flags.local_socket.or(file.local_socket),
        keepalive: Duration::from_secs(keepalive),
        limits: limits(file.limits)?,
        log: file.log,
    })
}

/// The channel: a path or a name, from the flags or else the file (never both).
fn device(
    flag_path: Option<PathBuf>,
    flag_name: Option<String>,
    file_path: Option<PathBuf>,
    file_name: Option<String>,
) -> Result<Device, ConfigError> {
    match (flag_path, flag_name) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(
            "give --device or --channel, not both".into(),
        )),
        (Some(p), None) => Ok(Device::Path(p)),
        (None, Some(n)) => Ok(Device::Name(n)),
        (None, None) => match (file_path, file_name) {
            (Some(_), Some(_)) => Err(ConfigError::Invalid(
                "config: device and channel are exclusive".into(),
            )),
            (Some(p), None) => Ok(Device::Path(p)),
            (None, Some(n)) => Ok(Device::Name(n)),
            (None, None) => Ok(Device::Path(PathBuf::from(DEFAULT_DEVICE))),
        },
    }
}

/// `[limits]`, with their defaults; a `create_file` must fit a packet once in Base64.
fn limits(l: LimitsConfig) -> Result<Limits, ConfigError> {
    let limits = Limits {
        max_packet: l.max_packet_size.unwrap_or(4 * 1024 * 1024),
        max_create_bytes: l.max_create_bytes.unwrap_or(2 * 1024 * 1024),
        max_list_entries: l.max_list_entries.unwrap_or(10_000),
        max_concurrent: l.max_concurrent.unwrap_or(4),
        max_upload_bytes: l.max_upload_bytes.unwrap_or(1 << 30),
        max_upload_total: l.max_upload_total_bytes.unwrap_or(4 << 30),
        upload_chunk: l.upload_chunk_bytes.unwrap_or(topics::upload::CHUNK),
    };
    if limits.upload_chunk == 0 || limits.upload_chunk > limits.max_create_bytes {
        return Err(ConfigError::Invalid(format!(
            "[limits] upload_chunk_bytes {} must be between 1 and max_create_bytes {}",
            limits.upload_chunk, limits.max_create_bytes
        )));
    }
    // Base64 grows data by 4/3; the request must still fit in one packet.
    if limits.max_create_bytes / 3 * 4 + 4096 > limits.max_packet {
        return Err(ConfigError::Invalid(format!(
            "[limits] max_create_bytes {} does not fit in max_packet_size {} once Base64-encoded",
            limits.max_create_bytes, limits.max_packet
        )));
    }
    if limits.max_list_entries == 0 || limits.max_concurrent == 0 {
        return Err(ConfigError::Invalid(
            "[limits] max_list_entries and max_concurrent must be at least 1".into(),
        ));
    }
    Ok(limits)
}

/// The TCP listener of the local MQTT endpoint: loopback unless `[local] allow_remote`.
fn mqtt_listen(a: Option<String>, lc: &LocalConfig) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(a) = a else {
        return Ok(None);
    };
    let addr: SocketAddr = a
        .parse()
        .map_err(|e| ConfigError::Invalid(format!("--mqtt-listen {a:?}: {e} (give IP:PORT)")))?;
    if !addr.ip().is_loopback() && !lc.allow_remote {
        return Err(ConfigError::Invalid(format!(
            "--mqtt-listen {addr} is not loopback; set [local] allow_remote = true to allow it"
        )));
    }
    Ok(Some(addr))
}

/// `[local]`, with its defaults.
fn local(lc: LocalConfig) -> Result<LocalSettings, ConfigError> {
    let socket_mode = match &lc.socket_mode {
        None => 0o660,
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "[local] socket_mode {m:?}: give an octal mode like \"0660\""
                ))
            })?,
    };
    let local = LocalSettings {
        max_clients: lc.max_clients.unwrap_or(64),
        client_queue: lc.client_queue.unwrap_or(4096),
        socket_mode,
        socket_group: lc.socket_group,
    };
    if local.max_clients == 0 || local.client_queue == 0 {
        return Err(ConfigError::Invalid(
            "[local] max_clients and client_queue must be at least 1".into(),
        ));
    }
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let flags = Flags {
            vm: Some("sys-usb".into()),
            ..Flags::default()
        };
        let s = resolve(FileConfig::default(), flags).unwrap();
        assert_eq!(s.device, Device::Path("/dev/hvc2".into()));
        assert_eq!(s.keepalive, Duration::from_secs(5));
        assert_eq!(s.mqtt_socket, Some(PathBuf::from(DEFAULT_MQTT_SOCKET)));
        assert_eq!(s.mqtt_listen, None);
        assert_eq!(s.local.socket_mode, 0o660);
        let file = parse_file(
            "vm = \"vm-gui\"\nchannel = \"msg\"\nkeepalive_secs = 3\n",
            "a.toml",
        )
        .unwrap();
        let s = resolve(
            file,
            Flags {
                keepalive: Some(7),
                ..Flags::default()
            },
        )
        .unwrap();
        assert_eq!(s.vm.as_str(), "vm-gui");
        assert_eq!(s.device, Device::Name("msg".into()));
        assert_eq!(s.keepalive, Duration::from_secs(7));
    }

    #[test]
    fn refusals() {
        assert!(
            resolve(FileConfig::default(), Flags::default())
                .unwrap_err()
                .to_string()
                .contains("--vm")
        );
        let bad_vm = Flags {
            vm: Some("VM".into()),
            ..Flags::default()
        };
        assert!(resolve(FileConfig::default(), bad_vm).is_err());
        let both = Flags {
            vm: Some("a".into()),
            device: Some("/dev/x".into()),
            channel: Some("m".into()),
            ..Flags::default()
        };
        assert!(resolve(FileConfig::default(), both).is_err());
        let e = parse_file("vm = 1\n", "agent.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("agent.toml"), "{e}");
        let file = parse_file("[limits]\nmax_create_bytes = 100000000\n", "f").unwrap();
        assert!(
            resolve(
                file,
                Flags {
                    vm: Some("a".into()),
                    ..Flags::default()
                }
            )
            .is_err()
        );
    }
}

#[cfg(test)]
mod local_tests {
    use super::*;

    fn with(text: &str, flags: Flags) -> Result<Settings, ConfigError> {
        let flags = Flags {
            vm: Some("vm-gui".into()),
            ..flags
        };
        resolve(parse_file(text, "agent.toml").unwrap(), flags)
    }

    #[test]
    fn the_local_endpoint() {
        let s = with(
            "mqtt_listen = \"127.0.0.1:1884\"\n[local]\nsocket_mode = \"0600\"\nsocket_group = \"apps\"\n",
            Flags::default(),
        )
        .unwrap();
        assert_eq!(s.mqtt_listen, Some("127.0.0.1:1884".parse().unwrap()));
        assert_eq!(s.local.socket_mode, 0o600);
        assert_eq!(s.local.socket_group.as_deref(), Some("apps"));
        let off = Flags {
            mqtt_socket: Some("none".into()),
            ..Flags::default()
        };
        assert_eq!(with("", off).unwrap().mqtt_socket, None);
        let rows = [
            ("mqtt_listen = \"0.0.0.0:1883\"\n", "not loopback"),
            ("mqtt_listen = \"localhost\"\n", "IP:PORT"),
            ("[local]\nsocket_mode = \"rw\"\n", "octal"),
            ("[local]\nmax_clients = 0\n", "at least 1"),
        ];
        for (text, why) in rows {
            let e = with(text, Flags::default()).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        let allowed = with(
            "mqtt_listen = \"0.0.0.0:1883\"\n[local]\nallow_remote = true\n",
            Flags::default(),
        )
        .unwrap();
        assert!(allowed.mqtt_listen.is_some());
    }
}

#[cfg(test)]
mod deploy_tests {
    use super::*;

    /// The shipped configuration is valid.
    #[test]
    fn deploy_config_parses() {
        let text = include_str!("../../deploy/alpine/domu-agent.toml");
        let s = resolve(
            parse_file(text, "domu-agent.toml").unwrap(),
            Flags::default(),
        )
        .unwrap();
        assert_eq!(s.vm.as_str(), "sys-usb");
        assert_eq!(s.device, Device::Name("msg".into()));
    }
}
