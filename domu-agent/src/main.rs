//! `domu-agent`: the guest side of the channel.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use domu_agent::cli::{CallArgs, Cli, Cmd, RunArgs};
use domu_agent::config::{self, ConfigError, Settings};
use domu_agent::disk::announce::{self, Announcer};
use domu_agent::disk::disks::Disks;
use domu_agent::disk::fsops;
use domu_agent::disk::service::{self, Service, Uplink};
use domu_agent::endpoints::admission::bind_unix;
use domu_agent::endpoints::call::{self as local, LocalRequests};
use domu_agent::endpoints::call_upload;
use domu_agent::endpoints::legacy::{Legacy, LegacyLimits};
use domu_agent::endpoints::mqtt::{self as local_mqtt, EndpointConfig, Listeners};
use domu_agent::endpoints::mqtt_session::LocalLimits;
use domu_agent::hub::{self, ChannelConfig, Client, Hub, ToClient};
use domu_agent::uplink::session::SessionConfig;
use rumqttc::mqttbytes::QoS;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use topics::filter;

const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version print and exit 0; a usage error exits 64 (`run` and the other
        // commands: a bad flag), or 125 for `call` (a local failure, like qrexec-client-vm).
        Err(e) => {
            let _ = e.print();
            let call = std::env::args().nth(1).as_deref() == Some("call");
            let code = match (e.exit_code(), call) {
                (0, _) => 0,
                (_, true) => domu_agent::endpoints::call_output::LOCAL_FAILURE,
                (_, false) => EX_USAGE,
            };
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Cmd::Run(a) => run(a),
        Cmd::Call(a) => call(a),
        Cmd::Channel { name } => {
            match domu_agent::uplink::tty::resolve(&domu_agent::uplink::tty::Device::Name(
                name.clone(),
            )) {
                Some(p) => {
                    println!("{}", p.display());
                    ExitCode::SUCCESS
                }
                None => fail(EX_UNAVAILABLE, &format!("no channel named {name:?}")),
            }
        }
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

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("domu-agent: {message}");
    ExitCode::from(code)
}

fn settings(a: RunArgs) -> Result<Settings, ConfigError> {
    let file = match &a.config {
        Some(p) => config::load_file(p)?,
        None => config::FileConfig::default(),
    };
    config::resolve(file, a.flags)
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

/// Why the agent cannot start: its exit code and one line for the user.
type Fail = (u8, String);

/// What the endpoints and the watcher are started with.
struct Parts {
    hub: Hub,
    /// The service's client of the hub.
    out: Arc<Client>,
    /// The client of the hub of the local requests (`call` and the legacy endpoint): it publishes
    /// them, and takes the responses on the VM's response topic to [`Parts::local`].
    requests: Arc<Client>,
    local: Arc<LocalRequests>,
    /// The one stop every task holds.
    stop: CancellationToken,
    /// Every task of the agent is spawned on it.
    tasks: TaskTracker,
}

async fn serve(s: Settings) -> ExitCode {
    domu_agent::endpoints::admission::raise_open_file_limit();
    remove_interrupted_transfers(&s);
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
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
    let mut channel = tasks.spawn(hub::run(cfg, hub_rx, stop.clone()));
    let Some((service_client, service_rx)) = hub.attach("service", 1024, true).await else {
        return fail(EX_SOFTWARE, "the channel task ended at start");
    };
    let Some((requests, responses)) = hub.attach("requests", 1024, true).await else {
        return fail(EX_SOFTWARE, "the channel task ended at start");
    };
    let mut parts = Parts {
        hub,
        out: Arc::new(service_client),
        requests: Arc::new(requests),
        local: Arc::new(LocalRequests::default()),
        stop,
        tasks,
    };
    parts.tasks.spawn(route_responses(
        parts.local.clone(),
        responses,
        parts.stop.clone(),
    ));
    let started = start(&s, &mut parts).await;
    let (service, changes) = match started {
        Ok(x) => x,
        Err((code, message)) => return fail(code, &message),
    };
    run_until_stopped(&service, service_rx, changes, &mut channel, &parts).await;
    parts.stop.cancel();
    parts.tasks.close();
    let _ = tokio::time::timeout(std::time::Duration::from_millis(800), parts.tasks.wait()).await;
    ExitCode::SUCCESS
}

/// The responses on the VM's response topic go to the local requester that asked, by id (each
/// takes or refuses them under the one answer rule).
async fn route_responses(
    local: Arc<LocalRequests>,
    mut rx: mpsc::Receiver<ToClient>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            m = rx.recv() => match m {
                Some(ToClient::Message { topic, payload, .. }) => local.deliver(topic, payload),
                Some(_) => {}
                None => return,
            },
        }
    }
}

/// Transfer files left by a killed agent (on filesystems without O_TMPFILE) go first.
fn remove_interrupted_transfers(s: &Settings) {
    let disks = s.disks.iter().flat_map(|d| {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
    });
    for root in disks.chain(s.repository.clone()) {
        if let Ok(dir) = fsops::open_root(&root) {
            let n = fsops::remove_part_files(&dir);
            if n > 0 {
                tracing::info!(dir = %root.display(), removed = n, "removed interrupted transfer files");
            }
        }
    }
}

/// The service, its subscriptions, the local endpoints and the watcher; returns the service and
/// where the watcher says the components changed.
async fn start(
    s: &Settings,
    parts: &mut Parts,
) -> Result<(Arc<Service>, mpsc::UnboundedReceiver<()>), Fail> {
    let (announcer, notes) = if s.disks.is_some() || s.repository.is_some() {
        let (a, n) = Announcer::new();
        (a, Some(n))
    } else {
        (Announcer::default(), None)
    };
    let service = Arc::new(Service::new(
        s.vm.clone(),
        Disks::new(s.disks.clone(), s.repository.clone()),
        s.repository.clone(),
        s.limits.clone(),
        Uplink {
            client: parts.out.clone(),
            hub: parts.hub.clone(),
        },
        announcer,
    ));
    let filters = service
        .subscriptions()
        .into_iter()
        .map(|f| (f, QoS::AtLeastOnce))
        .collect();
    parts.out.subscribe(0, filters).await;
    if s.local_socket.is_some() || s.legacy_socket.is_some() {
        let responses = vec![(filter::responses_to(s.vm.as_str()), QoS::AtLeastOnce)];
        parts.requests.subscribe(0, responses).await;
    }
    // Uploads without a chunk for their idle time are dropped, their unnamed files with them
    // (checked when the next one falls idle, and once per idle time: within twice of it).
    let (sweeper, stop) = (service.clone(), parts.stop.clone());
    parts.tasks.spawn(async move {
        loop {
            let wake = sweeper.next_idle_upload().map_or_else(
                || tokio::time::Instant::now() + topics::upload::IDLE,
                tokio::time::Instant::from_std,
            );
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(wake) => sweeper.drop_idle_uploads(),
            }
        }
    });
    start_call_socket(s, parts).await?;
    start_legacy(s, parts).await?;
    start_mqtt_endpoint(s, parts).await?;
    let (changed, changes) = mpsc::unbounded_channel::<()>();
    if let Some(notes) = notes {
        let repo = s
            .repository
            .clone()
            .map(|r| (service::REPOSITORY.to_owned(), r));
        let (vm, disks, out, stop) = (
            s.vm.clone(),
            s.disks.clone(),
            parts.out.clone(),
            parts.stop.clone(),
        );
        parts.tasks.spawn(async move {
            if let Err(e) = announce::run(vm, disks, repo, notes, out, changed, stop).await {
                tracing::error!(error = %e, "new-file announcements stopped");
            }
        });
    }
    Ok((service, changes))
}

/// Serves the messages of the service's hub client until a signal, the channel's end or `stop`.
async fn run_until_stopped(
    service: &Arc<Service>,
    mut service_rx: mpsc::Receiver<ToClient>,
    mut changes: mpsc::UnboundedReceiver<()>,
    channel: &mut tokio::task::JoinHandle<()>,
    parts: &Parts,
) {
    loop {
        tokio::select! {
            _ = shutdown_signal() => {
                tracing::info!("stopping");
                return;
            }
            _ = &mut *channel => return,
            _ = parts.stop.cancelled() => return,
            m = service_rx.recv() => match m {
                Some(ToClient::Message { topic, payload, .. }) => {
                    service.on_message(topic, payload, &parts.tasks)
                }
                // Its components, each time the session comes up and when a disk comes or goes.
                Some(ToClient::SessionUp) => service.announce().await,
                Some(_) => {}
                None => return,
            },
            Some(()) = changes.recv() => service.announce().await,
        }
    }
}

/// The group of the local sockets, as configured.
fn socket_group(s: &Settings) -> Result<Option<u32>, Fail> {
    match &s.local.socket_group {
        None => Ok(None),
        Some(g) => group_id(g)
            .map(Some)
            .map_err(|e| (EX_USAGE, format!("[local] socket_group {g:?}: {e}"))),
    }
}

/// The `call` socket (local requests), when configured.
async fn start_call_socket(s: &Settings, parts: &mut Parts) -> Result<(), Fail> {
    let Some(path) = s.local_socket.clone() else {
        return Ok(());
    };
    let l = bind_unix(&path, s.local.socket_mode, socket_group(s)?)
        .await
        .map_err(|e| (EX_UNAVAILABLE, format!("local socket: {e}")))?;
    tracing::info!(path = %path.display(), "local requests socket listening");
    parts.tasks.spawn(local::serve(
        l,
        path,
        s.vm.clone(),
        parts.local.clone(),
        parts.requests.clone(),
        s.local.max_clients,
        parts.stop.clone(),
    ));
    Ok(())
}

/// The legacy endpoint (the MVP's JSON lines), when configured.
async fn start_legacy(s: &Settings, parts: &mut Parts) -> Result<(), Fail> {
    let Some(path) = s.legacy_socket.clone() else {
        return Ok(());
    };
    let listener = bind_unix(&path, s.local.socket_mode, socket_group(s)?)
        .await
        .map_err(|e| (EX_UNAVAILABLE, format!("legacy socket: {e}")))?;
    tracing::info!(path = %path.display(), "legacy endpoint listening");
    let limits = LegacyLimits {
        max_packet: s.limits.max_packet,
        max_line: topics::legacy_line::MAX_LINE,
        chunk: s.limits.upload_chunk,
        max_clients: s.local.max_clients,
        // One longest line and a few packets' worth of others.
        max_held: topics::legacy_line::MAX_LINE + s.limits.max_packet.saturating_mul(4),
    };
    let legacy = Legacy::new(
        s.vm.clone(),
        parts.local.clone(),
        parts.requests.clone(),
        limits,
    );
    let Some((client, rx)) = parts.hub.attach("legacy-notifications", 1024, true).await else {
        return Err((EX_SOFTWARE, "the channel task ended at start".into()));
    };
    let stop = parts.stop.clone();
    parts
        .tasks
        .spawn(domu_agent::endpoints::legacy::notifications(
            legacy.clone(),
            client,
            rx,
            stop.clone(),
        ));
    parts.tasks.spawn(domu_agent::endpoints::legacy::serve(
        listener, path, legacy, stop,
    ));
    Ok(())
}

/// The local MQTT endpoint (UNIX socket, optional loopback TCP), when configured.
async fn start_mqtt_endpoint(s: &Settings, parts: &mut Parts) -> Result<(), Fail> {
    let Some(listeners) = local_listeners(s).await? else {
        return Ok(());
    };
    let cfg = EndpointConfig {
        max_clients: s.local.max_clients,
        queue: s.local.client_queue,
        limits: LocalLimits {
            max_packet: s.limits.max_packet,
            max_output: s.limits.max_packet.saturating_mul(2).max(1 << 20),
        },
    };
    parts.tasks.spawn(local_mqtt::serve(
        listeners,
        parts.hub.clone(),
        cfg,
        parts.stop.clone(),
    ));
    Ok(())
}

/// Binds the local MQTT endpoint's listeners; None when both are off.
async fn local_listeners(s: &Settings) -> Result<Option<Listeners>, Fail> {
    let unix = match &s.mqtt_socket {
        None => None,
        Some(path) => {
            let l = bind_unix(path, s.local.socket_mode, socket_group(s)?)
                .await
                .map_err(|e| (EX_UNAVAILABLE, format!("local MQTT socket: {e}")))?;
            tracing::info!(path = %path.display(), "local MQTT endpoint listening");
            Some((l, path.clone()))
        }
    };
    let tcp = match s.mqtt_listen {
        None => None,
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| (EX_UNAVAILABLE, format!("--mqtt-listen {addr}: {e}")))?;
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

/// Builds the `args` object of a local request from KEY=VALUE words (`data=@FILE` reads FILE).
fn call_args(words: &[String]) -> Result<Map<String, Value>, String> {
    topics::call_output::args_from_words(words, |file| {
        std::fs::read(file).map_err(|e| format!("{file}: {e}"))
    })
}

fn call(a: CallArgs) -> ExitCode {
    use domu_agent::endpoints::call_output::{self, LOCAL_FAILURE};
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
    // A file larger than a chunk goes as an upload; the caller gets one answer, as ever.
    let to_upload = match (command == topics::Command::CreateFile)
        .then(|| {
            req.get("args")
                .and_then(Value::as_object)
                .and_then(|args| topics::upload::prepare(args, a.chunk_bytes))
        })
        .flatten()
    {
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => return fail(LOCAL_FAILURE, &e),
        None => None,
    };
    // The request in one message (not built for an upload: it would hold the whole file again).
    let mut line = String::new();
    if to_upload.is_none() {
        line = Value::Object(req).to_string();
        line.push('\n');
    }
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
        if let Some(prepared) = &to_upload {
            let t0 = std::time::Instant::now();
            lines = match call_upload::upload(&a.socket, prepared, a.timeout_ms, a.chunk_bytes) {
                Ok(l) => l,
                Err(e) => return fail(LOCAL_FAILURE, &e),
            };
            samples.push(t0.elapsed());
            continue;
        }
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
