//! `domu-agent`: the guest side of the channel.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use domu_agent::channel::{self, ChannelConfig, FromSession};
use domu_agent::config::{self, ConfigError, Settings};
use domu_agent::disks::Disks;
use domu_agent::fsops;
use domu_agent::local::{self, LocalRequests};
use domu_agent::service::{self, Service};
use domu_agent::session::SessionConfig;
use domu_agent::watch::{self as announce, Announcer};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};

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
    /// Ask a command through the local agent and print the response(s), one JSON line each.
    Call(CallArgs),
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
    let (to_session, from_app) = mpsc::channel(256);
    let (to_app, mut from_session) = mpsc::channel(256);
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
        to_session.clone(),
        announcer,
        local.clone(),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(path) = s.local_socket.clone() {
        match local::bind(&path).await {
            Ok(l) => {
                tracing::info!(path = %path.display(), "local requests socket listening");
                tasks.spawn(local::serve(
                    l,
                    path,
                    s.vm.clone(),
                    local.clone(),
                    to_session.clone(),
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
    if let Some(notes) = notes {
        let repo = s
            .repository
            .clone()
            .map(|r| (service::REPOSITORY.to_owned(), r));
        let (disks, out, stop) = (s.disks.clone(), to_session.clone(), stop_rx.clone());
        tasks.spawn(async move {
            if let Err(e) = announce::run(disks, repo, notes, out, stop).await {
                tracing::error!(error = %e, "new-file announcements stopped");
            }
        });
    }
    let cfg = ChannelConfig {
        device: s.device.clone(),
        session: SessionConfig {
            vm: s.vm.clone(),
            keepalive: s.keepalive,
            max_packet: s.limits.max_packet,
        },
        subscriptions: service.subscriptions(s.local_socket.is_some()),
    };
    tracing::info!(vm = %s.vm, device = %s.device, disks = s.disks.is_some(), "agent starting");
    let mut session = tokio::spawn(channel::run(cfg, from_app, to_app, stop_rx.clone()));
    let mut stop_watch = stop_rx.clone();
    loop {
        tokio::select! {
            _ = shutdown_signal() => {
                tracing::info!("stopping");
                break;
            }
            _ = &mut session => break,
            _ = stop_watch.changed() => break,
            m = from_session.recv() => match m {
                Some(FromSession::Publish { topic, payload }) => {
                    service.on_message(topic, payload);
                }
                Some(FromSession::Connected) => {}
                None => break,
            },
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_millis(800), async {
        let _ = (&mut session).await;
        while tasks.join_next().await.is_some() {}
    })
    .await;
    ExitCode::SUCCESS
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
    let args = match call_args(&a.args) {
        Ok(x) => x,
        Err(e) => return fail(EX_USAGE, &e),
    };
    if local::command_by_name(&a.command).is_none() {
        return fail(EX_USAGE, &format!("unknown command {:?}", a.command));
    }
    let mut req = Map::new();
    req.insert("command".into(), Value::String(a.command));
    req.insert("args".into(), Value::Object(args));
    if let Some(t) = a.timeout_ms {
        req.insert("timeout_ms".into(), Value::from(t));
    }
    let mut conn = match std::os::unix::net::UnixStream::connect(&a.socket) {
        Ok(c) => c,
        Err(e) => {
            return fail(
                EX_UNAVAILABLE,
                &format!("agent socket {}: {e}", a.socket.display()),
            );
        }
    };
    let mut line = Value::Object(req).to_string();
    line.push('\n');
    if let Err(e) = conn.write_all(line.as_bytes()) {
        return fail(EX_UNAVAILABLE, &format!("agent socket: {e}"));
    }
    let mut ok = false;
    let stdout = std::io::stdout();
    for l in std::io::BufReader::new(conn).lines() {
        let Ok(l) = l else { break };
        let status = serde_json::from_str::<Value>(&l)
            .ok()
            .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned));
        ok = matches!(status.as_deref(), Some("ok" | "finished" | "started"));
        let _ = writeln!(stdout.lock(), "{l}");
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
