//! `domu-agent`: the guest side of the channel.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use domu_agent::channel::{self, ChannelConfig, Hub, ToClient};
use domu_agent::config::{self, ConfigError, Settings};
use domu_agent::disks::Disks;
use domu_agent::fsops;
use domu_agent::legacy::Legacy;
use domu_agent::local::{self, LocalRequests};
use domu_agent::local_mqtt::{self, EndpointConfig, Listeners};
use domu_agent::local_session::LocalLimits;
use domu_agent::service::{self, Service, Uplink};
use domu_agent::session::SessionConfig;
use domu_agent::watch::{self as announce, Announcer};
use rumqttc::mqttbytes::QoS;
use serde_json::{Map, Value};
use tokio::sync::watch;

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;

/// The agent's local socket when none is configured (for `call`).
const DEFAULT_LOCAL_SOCKET: &str = "/run/domu-agent.sock";

#[derive(Debug, Parser)]
#[command(
    name = "domu-agent",
    version,
    about = "Guest agent: MQTT over the Xen channel, the disk service, local requests"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent on the channel tty.
    Run(RunArgs),
    /// Ask a command through the local agent and print the answer(s). Exit codes: 0 ok, 1 the
    /// command answered an error, 124 no answer in time, 125 local failure, 126 refused by Dom0.
    Call(CallArgs),
    /// Print the tty of a channel found by name (/dev/xen-channel/NAME, /dev/virtio-ports/NAME,
    /// or xenstore's device/console/N/name), as `run --channel NAME` finds it.
    Channel {
        /// The channel's name (`name=` in xl.cfg's `channel`).
        name: String,
    },
    /// Validate a config file (as `run` would read it); exit 64 with the reason if it is bad.
    CheckConfig {
        /// The config file [default: /etc/domu-agent/domu-agent.toml].
        #[arg(long, default_value = "/etc/domu-agent/domu-agent.toml")]
        config: PathBuf,
    },
    /// Write the man pages (`man`) or the bash, zsh and fish completions (`completions`) into DIR.
    #[command(hide = true)]
    Generate {
        #[arg(value_parser = ["man", "completions"])]
        what: String,
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// TOML config file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This guest's VM id (used as `sender`; Dom0 enforces it anyway).
    #[arg(long)]
    vm: Option<String>,
    /// The channel tty [default: /dev/hvc2].
    #[arg(long)]
    device: Option<PathBuf>,
    /// Find the channel by name (/dev/xen-channel/NAME, /dev/virtio-ports/NAME, or xenstore).
    #[arg(long)]
    channel: Option<String>,
    /// Serve the disk commands: each subdirectory of DIR is a disk.
    #[arg(long)]
    disks: Option<PathBuf>,
    /// The local repository that read_file copies into.
    #[arg(long)]
    repository: Option<PathBuf>,
    /// UNIX socket for local requests (`domu-agent call`).
    #[arg(long)]
    local_socket: Option<PathBuf>,
    /// UNIX socket of the local MQTT endpoint for the guest's applications
    /// [default: /run/domu-agent/mqtt.sock; `none`: off].
    #[arg(long, value_name = "PATH")]
    mqtt_socket: Option<PathBuf>,
    /// Also listen for local MQTT clients on TCP (IP:PORT, loopback unless the config allows
    /// another address) [default: off].
    #[arg(long, value_name = "ADDR")]
    mqtt_listen: Option<String>,
    /// UNIX socket of the legacy endpoint for MVP applications (JSON lines)
    /// [default: /run/domu-agent/legacy.sock; `none`: off].
    #[arg(long, value_name = "PATH")]
    legacy_socket: Option<PathBuf>,
    /// MQTT keepalive in seconds [default: 5].
    #[arg(long)]
    keepalive: Option<u64>,
}

#[derive(Debug, clap::Args)]
struct CallArgs {
    /// The agent's local socket.
    #[arg(long, default_value = DEFAULT_LOCAL_SOCKET)]
    socket: PathBuf,
    /// How long to wait for the answer(s), in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Print the answers as the JSON lines they are.
    #[arg(long)]
    json: bool,
    /// Ask N times in a row and print the round trips' p50 and p99 (after the last answer).
    #[arg(long, value_name = "N")]
    repeat: Option<usize>,
    /// list_disks, list_files, read_file, copy_file, remove_file, get_file_footprint, create_file,
    /// discover, benchmark (or a topic root, or the MVP's name).
    command: String,
    /// Arguments as KEY=VALUE; `data=@FILE` sends FILE's content (Base64); true/false are booleans.
    args: Vec<String>,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Run(a) => run(a),
        Cmd::Call(a) => call(a),
        Cmd::Channel { name } => {
            match domu_agent::tty::resolve(&domu_agent::tty::Device::Name(name.clone())) {
                Some(p) => {
                    println!("{}", p.display());
                    ExitCode::SUCCESS
                }
                None => fail(EX_UNAVAILABLE, &format!("no channel named {name:?}")),
            }
        }
        Cmd::Generate { what, dir } => generate(&what, &dir),
        Cmd::CheckConfig { config } => {
            let checked = config::load_file(&config)
                .and_then(|f| config::resolve(f, config::Flags::default()));
            match checked {
                Ok(s) => {
                    println!("{}: ok (vm {}, {})", config.display(), s.vm, s.device);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EX_USAGE, &e.to_string()),
            }
        }
    }
}

/// Man pages and completions from the clap definitions, for packagers (the APKBUILD).
fn generate(what: &str, dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let written = std::fs::create_dir_all(dir).and_then(|()| match what {
        "man" => clap_mangen::generate_to(cmd, dir),
        _ => [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ]
        .into_iter()
        .try_for_each(|shell| {
            clap_complete::generate_to(shell, &mut cmd, "domu-agent", dir).map(drop)
        }),
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EX_SOFTWARE, &format!("{}: {e}", dir.display())),
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("domu-agent: {message}");
    ExitCode::from(code)
}

fn settings(a: RunArgs) -> Result<Settings, ConfigError> {
    let file = match &a.config {
        Some(p) => config::load_file(p)?,
        None => config::FileConfig::default(),
    };
    let flags = config::Flags {
        vm: a.vm,
        device: a.device,
        channel: a.channel,
        disks: a.disks,
        repository: a.repository,
        local_socket: a.local_socket,
        mqtt_socket: a.mqtt_socket,
        mqtt_listen: a.mqtt_listen,
        legacy_socket: a.legacy_socket,
        keepalive: a.keepalive,
    };
    config::resolve(file, flags)
}

fn run(a: RunArgs) -> ExitCode {
    let s = match settings(a) {
        Ok(s) => s,
        Err(e) => return fail(EX_USAGE, &e.to_string()),
    };
    for (what, dir) in [("disks", &s.disks), ("repository", &s.repository)] {
        if let Some(d) = dir {
            if !d.is_dir() {
                return fail(
                    EX_USAGE,
                    &format!("{what} directory {} does not exist", d.display()),
                );
            }
        }
    }
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or(s.log.clone())
        .unwrap_or_else(|| "info".to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        // `LEVEL link{vm=..}: message fields`: the VM comes from the span (`link`, `session`).
        .with_target(false)
        .init();
    // One thread: the tty, the session and the dispatch hand messages to each other without
    // crossing threads (latency); file work runs on the blocking pool.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(EX_SOFTWARE, &format!("cannot start the runtime: {e}")),
    };
    let code = rt.block_on(serve(s));
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

async fn serve(s: Settings) -> ExitCode {
    // Transfer files left by a killed agent (on filesystems without O_TMPFILE) go first.
    for root in s
        .disks
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(d)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
        })
        .chain(s.repository.clone())
    {
        if let Ok(dir) = fsops::open_root(&root) {
            let n = fsops::remove_part_files(&dir);
            if n > 0 {
                tracing::info!(dir = %root.display(), removed = n, "removed interrupted transfer files");
            }
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    // The channel and its hub: the one path to Dom0 for the service, `call` and applications.
    let (hub, hub_rx) = Hub::new(1024);
    let cfg = ChannelConfig {
        device: s.device.clone(),
        session: SessionConfig {
            vm: s.vm.clone(),
            keepalive: s.keepalive,
            max_packet: s.limits.max_packet,
        },
    };
    tracing::info!(vm = %s.vm, device = %s.device, disks = s.disks.is_some(), "agent starting");
    let mut channel = tokio::spawn(channel::run(cfg, hub_rx, stop_rx.clone()));
    let Some((service_client, mut service_rx)) = hub.attach("service", 1024, true).await else {
        return fail(EX_SOFTWARE, "the channel task ended at start");
    };
    let out = Arc::new(service_client);
    let (announcer, notes) = if s.disks.is_some() || s.repository.is_some() {
        let (a, n) = Announcer::new();
        (a, Some(n))
    } else {
        (Announcer::default(), None)
    };
    let local = Arc::new(LocalRequests::default());
    let service = Arc::new(Service::new(
        s.vm.clone(),
        s.disks.clone().map(|root| Disks { root }),
        s.repository.clone(),
        s.limits.clone(),
        Uplink {
            client: out.clone(),
            hub: hub.clone(),
        },
        announcer,
        local.clone(),
    ));
    let filters = service
        .subscriptions(s.local_socket.is_some() || s.legacy_socket.is_some())
        .into_iter()
        .map(|f| (f, QoS::AtLeastOnce))
        .collect();
    out.subscribe(0, filters).await;
    if let Some(path) = s.local_socket.clone() {
        match local::bind(&path).await {
            Ok(l) => {
                tracing::info!(path = %path.display(), "local requests socket listening");
                tasks.spawn(local::serve(
                    l,
                    path,
                    s.vm.clone(),
                    local.clone(),
                    out.clone(),
                    stop_rx.clone(),
                ));
            }
            Err(e) => {
                return fail(
                    EX_UNAVAILABLE,
                    &format!("local socket {}: {e}", path.display()),
                );
            }
        }
    }
    if let Some(path) = s.legacy_socket.clone() {
        let group = match &s.local.socket_group {
            None => None,
            Some(g) => match group_id(g) {
                Ok(id) => Some(id),
                Err(e) => return fail(EX_USAGE, &format!("[local] socket_group {g:?}: {e}")),
            },
        };
        let listener = match local_mqtt::bind_unix(&path, s.local.socket_mode, group).await {
            Ok(l) => l,
            Err(e) => return fail(EX_UNAVAILABLE, &format!("legacy socket: {e}")),
        };
        tracing::info!(path = %path.display(), "legacy endpoint listening");
        let legacy = Legacy::new(s.vm.clone(), local.clone(), out.clone());
        let Some((client, rx)) = hub.attach("legacy-notifications", 1024, true).await else {
            return fail(EX_SOFTWARE, "the channel task ended at start");
        };
        tasks.spawn(domu_agent::legacy::notifications(
            legacy.clone(),
            client,
            rx,
            stop_rx.clone(),
        ));
        tasks.spawn(domu_agent::legacy::serve(
            listener,
            path,
            legacy,
            stop_rx.clone(),
        ));
    }
    match local_listeners(&s).await {
        Ok(Some(listeners)) => {
            let cfg = EndpointConfig {
                max_clients: s.local.max_clients,
                queue: s.local.client_queue,
                limits: LocalLimits {
                    max_packet: s.limits.max_packet,
                    max_output: s.limits.max_packet.saturating_mul(2).max(1 << 20),
                },
            };
            tasks.spawn(local_mqtt::serve(
                listeners,
                hub.clone(),
                cfg,
                stop_rx.clone(),
            ));
        }
        Ok(None) => {}
        Err(e) => return fail(EX_UNAVAILABLE, &e),
    }
    if let Some(notes) = notes {
        let repo = s
            .repository
            .clone()
            .map(|r| (service::REPOSITORY.to_owned(), r));
        let (disks, out, stop) = (s.disks.clone(), out.clone(), stop_rx.clone());
        tasks.spawn(async move {
            if let Err(e) = announce::run(disks, repo, notes, out, stop).await {
                tracing::error!(error = %e, "new-file announcements stopped");
            }
        });
    }
    let mut stop_watch = stop_rx.clone();
    loop {
        tokio::select! {
            _ = shutdown_signal() => {
                tracing::info!("stopping");
                break;
            }
            _ = &mut channel => break,
            _ = stop_watch.changed() => break,
            m = service_rx.recv() => match m {
                Some(ToClient::Message { topic, payload, .. }) => service.on_message(topic, payload),
                Some(_) => {}
                None => break,
            },
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_millis(800), async {
        let _ = (&mut channel).await;
        while tasks.join_next().await.is_some() {}
    })
    .await;
    ExitCode::SUCCESS
}

/// Binds the local MQTT endpoint's listeners; None when both are off. Err: one line for the user.
async fn local_listeners(s: &Settings) -> Result<Option<Listeners>, String> {
    let unix = match &s.mqtt_socket {
        None => None,
        Some(path) => {
            let group = match &s.local.socket_group {
                None => None,
                Some(g) => {
                    Some(group_id(g).map_err(|e| format!("[local] socket_group {g:?}: {e}"))?)
                }
            };
            let l = local_mqtt::bind_unix(path, s.local.socket_mode, group)
                .await
                .map_err(|e| format!("local MQTT socket: {e}"))?;
            tracing::info!(path = %path.display(), "local MQTT endpoint listening");
            Some((l, path.clone()))
        }
    };
    let tcp = match s.mqtt_listen {
        None => None,
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("--mqtt-listen {addr}: {e}"))?;
            tracing::info!(addr = %addr, "local MQTT endpoint listening on TCP");
            Some(l)
        }
    };
    Ok((unix.is_some() || tcp.is_some()).then_some(Listeners { unix, tcp }))
}

/// A group name or number → its id.
fn group_id(g: &str) -> Result<u32, String> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(g) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err("no such group".into()),
        Err(e) => Err(e.to_string()),
    }
}

async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Builds the `args` object of a local request from KEY=VALUE words.
fn call_args(words: &[String]) -> Result<Map<String, Value>, String> {
    let mut args = Map::new();
    for w in words {
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| format!("argument {w:?} is not KEY=VALUE"))?;
        let value = if let Some(file) = v.strip_prefix('@') {
            let bytes = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
            Value::String(topics::binary::encode(&bytes))
        } else if v == "true" || v == "false" {
            Value::Bool(v == "true")
        } else {
            Value::String(v.to_owned())
        };
        args.insert(k.to_owned(), value);
    }
    Ok(args)
}

fn call(a: CallArgs) -> ExitCode {
    use domu_agent::call_output::{self, LOCAL_FAILURE};
    let args = match call_args(&a.args) {
        Ok(x) => x,
        Err(e) => return fail(LOCAL_FAILURE, &e),
    };
    let Some(command) = local::command_by_name(&a.command) else {
        return fail(LOCAL_FAILURE, &format!("unknown command {:?}", a.command));
    };
    let mut req = Map::new();
    req.insert("command".into(), Value::String(a.command));
    req.insert("args".into(), Value::Object(args));
    if let Some(t) = a.timeout_ms {
        req.insert("timeout_ms".into(), Value::from(t));
    }
    let mut line = Value::Object(req).to_string();
    line.push('\n');
    let ask = || -> Result<Vec<String>, String> {
        let mut conn = std::os::unix::net::UnixStream::connect(&a.socket).map_err(|e| {
            format!(
                "agent socket {}: {e} (is the agent running?)",
                a.socket.display()
            )
        })?;
        conn.write_all(line.as_bytes())
            .map_err(|e| format!("agent socket: {e}"))?;
        Ok(std::io::BufReader::new(conn)
            .lines()
            .map_while(Result::ok)
            .collect())
    };
    let mut samples = Vec::new();
    let mut lines = Vec::new();
    for _ in 0..a.repeat.unwrap_or(1).max(1) {
        let t0 = std::time::Instant::now();
        lines = match ask() {
            Ok(l) => l,
            Err(e) => return fail(LOCAL_FAILURE, &e),
        };
        samples.push(t0.elapsed());
    }
    let out = call_output::render(command, &lines, a.json);
    let _ = std::io::stdout().lock().write_all(out.stdout.as_bytes());
    if a.repeat.is_some() {
        samples.sort();
        let us = |q| {
            topics::payload::quantile(&samples, q)
                .map_or(0.0, |d: std::time::Duration| d.as_secs_f64() * 1e6)
        };
        println!(
            "round trip: p50 {:.1} us  p99 {:.1} us  ({} calls)",
            us(0.5),
            us(0.99),
            samples.len()
        );
    }
    let _ = std::io::stderr().lock().write_all(out.stderr.as_bytes());
    ExitCode::from(out.code)
}
