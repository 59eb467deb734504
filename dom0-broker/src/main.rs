//! `dom0-broker`: the Dom0 messaging service.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use dom0_broker::cli::{Cli, Cmd, RunArgs};
use dom0_broker::config::{self, BrokerAddr, BrokerChoice, ConfigError, MosquittoConfig, Settings};
use dom0_broker::link::LinkContext;
use dom0_broker::policy::Policy;
use dom0_broker::signals::shutdown_signal;
use dom0_broker::supervision::{Event, Supervision};
use dom0_broker::{acl, broker, controller, discovery};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Exit codes (sysexits.h).
const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;

/// Where the service's config lives by default.
const DEFAULT_CONFIG: &str = "/etc/dom0-broker/dom0-broker.toml";

/// The config file to read: the one given, else the default one if it exists.
fn config_file(given: Option<PathBuf>) -> Result<config::FileConfig, ConfigError> {
    match given {
        Some(p) => config::load_file(&p),
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            config::load_file(std::path::Path::new(DEFAULT_CONFIG))
        }
        None => Ok(config::FileConfig::default()),
    }
}

fn check_config(config: Option<PathBuf>, policy: Option<PathBuf>) -> ExitCode {
    let file = match config_file(config) {
        Ok(f) => f,
        Err(e) => return fail(EX_USAGE, &e.to_string()),
    };
    let flags = config::Flags {
        policy,
        ..config::Flags::default()
    };
    let s = match config::resolve(file, flags) {
        Ok(s) => s,
        Err(e) => return fail(EX_USAGE, &e.to_string()),
    };
    if let Some(p) = &s.policy {
        if let Err(e) = Policy::load(p) {
            // The deployed config names the deployed policy (/etc/dom0-broker/policy.toml):
            // checked elsewhere, say how to give another one.
            let hint = match &e {
                dom0_broker::policy::PolicyError::File(ConfigError::Read { .. }) => {
                    " (the config names this policy file; check another with --policy FILE)"
                }
                _ => "",
            };
            return fail(EX_USAGE, &format!("invalid policy: {e}{hint}"));
        }
    }
    // [fleet]: its TLS files and password are read now, as `run` reads them.
    let fleet = match &s.fleet {
        None => String::new(),
        Some(f) => {
            let access = fleet_access(f);
            if let Err(e) = dom0_broker::fleet::centre::tls_config(&access)
                .and_then(|_| dom0_broker::fleet::centre::read_password(&access.password_file))
            {
                return fail(EX_USAGE, &format!("[fleet] {e}"));
            }
            format!("; fleet: host {} ok", f.host)
        }
    };
    println!(
        "config ok; policy: {}{fleet}",
        s.policy
            .as_ref()
            .map_or("built-in".to_owned(), |p| format!("{} ok", p.display()))
    );
    ExitCode::SUCCESS
}

fn status(broker: Option<String>, config: Option<PathBuf>, watch: bool, json: bool) -> ExitCode {
    let addr = match broker {
        Some(url) => config::parse_broker_url(&url),
        None => config_file(config).and_then(|f| {
            config::resolve(f, config::Flags::default()).map(|s| match s.broker {
                BrokerChoice::Embedded(listen) => BrokerAddr::Tcp(listen.to_string()),
                BrokerChoice::External(a) => a,
            })
        }),
    };
    let addr = match addr {
        Ok(a) => a,
        Err(e) => return fail(EX_USAGE, &e.to_string()),
    };
    loop {
        match dom0_broker::status::fetch(&addr) {
            Ok(links) => {
                if json {
                    for l in &links {
                        println!("{}", serde_json::to_string(l).unwrap_or_default());
                    }
                } else {
                    // On a terminal the table is redrawn in place; into a file or a pipe the
                    // tables follow each other, no escape codes.
                    if watch && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{}", dom0_broker::status::table(&links));
                }
            }
            Err(e) => return fail(EX_UNAVAILABLE, &e.to_string()),
        }
        if !watch {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version print and exit 0; a usage error is a bad flag: 64, as documented.
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.exit_code() == 0 { 0 } else { EX_USAGE });
        }
    };
    match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::CheckPolicy { file, vms } => match Policy::load(&file) {
            Ok(p) => {
                print!("{}", acl::describe(&p, &vms));
                ExitCode::SUCCESS
            }
            Err(e) => fail(EX_USAGE, &e.to_string()),
        },
        Cmd::CheckConfig { config, policy } => check_config(config, policy),
        Cmd::ProbeChannel { socket, count } => {
            match dom0_broker::probe::probe(&socket, count, std::time::Duration::from_secs(5)) {
                Ok(p) => {
                    println!(
                        "channel round trip: p50 {:.1} us  p99 {:.1} us  ({} samples)",
                        p.p50.as_secs_f64() * 1e6,
                        p.p99.as_secs_f64() * 1e6,
                        p.samples
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EX_UNAVAILABLE, &format!("{}: {e}", socket.display())),
            }
        }
        Cmd::Status {
            broker,
            config,
            watch,
            json,
        } => status(broker, config, watch, json),
        Cmd::RenderBridge { config } => dom0_broker::fleet::tools::render_bridge(&config),
        Cmd::Fleet(cmd) => dom0_broker::fleet::tools::run(cmd),
        Cmd::RenderAcl { policy } => {
            let p = match policy {
                Some(f) => Policy::load(&f),
                None => Ok(Policy::builtin()),
            };
            match p {
                Ok(p) => {
                    print!("{}", acl::render_mosquitto(&p));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EX_USAGE, &e.to_string()),
            }
        }
    }
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("dom0-broker: {message}");
    ExitCode::from(code)
}

fn settings(args: RunArgs) -> Result<Settings, ConfigError> {
    let file = match &args.config {
        Some(p) => config::load_file(p)?,
        None => config::FileConfig::default(),
    };
    config::resolve(file, args.flags)
}

fn init_logging(configured: Option<&str>) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| configured.map(str::to_owned))
        .unwrap_or_else(|| "info,rumqttd=warn,rumqttc=warn".to_owned());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // rumqttd's routine departures ("router-drop", "disconnected", …) are at debug in the
    // vendored copy (vendor/PATCHES.md), so an operator who greps for ERROR sees only what is broken.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        // `LEVEL link{vm=..}: message fields`: the VM comes from the span (`link`, `session`).
        .with_target(false);
    tracing_subscriber::registry().with(filter).with(fmt).init();
}

fn run(args: RunArgs) -> ExitCode {
    let settings = match settings(args) {
        Ok(s) => s,
        Err(e) => return fail(EX_USAGE, &e.to_string()),
    };
    let policy = match &settings.policy {
        Some(p) => Policy::load(p),
        None => Ok(Policy::builtin()),
    };
    let policy = match policy {
        Ok(p) => Arc::new(p),
        Err(e) => return fail(EX_USAGE, &format!("invalid policy, refusing to start: {e}")),
    };
    if !settings.socket_dir.is_dir() {
        return fail(
            EX_USAGE,
            &format!(
                "socket directory {} does not exist",
                settings.socket_dir.display()
            ),
        );
    }
    init_logging(settings.log.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(EX_SOFTWARE, &format!("cannot start the runtime: {e}")),
    };
    let code = runtime.block_on(serve(settings, policy));
    // rumqttd's threads cannot be joined; leaving the process ends them.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

/// Why the service cannot start: its exit code and one line for the operator.
type Fail = (u8, String);

async fn serve(settings: Settings, policy: Arc<Policy>) -> ExitCode {
    // The one stop every task holds, and the tracker every task is spawned on.
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let started = start(&settings, policy, &tasks, &stop).await;
    let mut discovery = match started {
        Ok(d) => d,
        Err((code, message)) => return fail(code, &message),
    };
    let code = tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("stopping");
            ExitCode::SUCCESS
        }
        r = &mut discovery => match r {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => fail(EX_UNAVAILABLE, &format!("socket discovery in {}: {e}", settings.socket_dir.display())),
            Err(e) => fail(EX_SOFTWARE, &e.to_string()),
        },
    };
    stop.cancel();
    tasks.close();
    let _ = tokio::time::timeout(std::time::Duration::from_millis(900), tasks.wait()).await;
    code
}

/// The broker, the policy's reload, the controller, and the discovery of channel sockets (the
/// task returned: it runs one link per VM).
async fn start(
    settings: &Settings,
    policy: Arc<Policy>,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, Fail> {
    let (supervision, events) = Supervision::new();
    let (broker_addr, link_route) = match &settings.broker {
        BrokerChoice::Embedded(listen) => {
            let embedded = broker::start_embedded_service(
                *listen,
                settings.operator_socket.clone(),
                &settings.limits,
                tasks,
                stop,
            )
            .await
            .map_err(|e| (e.exit_code(), e.to_string()))?;
            let counted = supervision.clone();
            tasks.spawn(broker::watch_overflows(
                embedded.alerts,
                move |client, n| counted.overflowed(client, n),
                stop.clone(),
            ));
            let route = match settings.embedded_links {
                config::EmbeddedLinks::InProcess => broker::LinkRoute::InProcess {
                    server: embedded.links,
                    tasks: tasks.clone(),
                },
                config::EmbeddedLinks::Tcp => broker::LinkRoute::Connect {
                    addr: embedded.addr.clone(),
                    // rumqttd sets TCP_NODELAY itself (vendored patch 0003).
                    quickack: false,
                },
            };
            (embedded.addr, route)
        }
        BrokerChoice::External(addr) => {
            if settings.operator_socket.is_some() {
                return Err((
                    EX_USAGE,
                    "operator_socket is for the embedded broker; Mosquitto has its own unix listener"
                        .into(),
                ));
            }
            broker::check_reachable(addr)
                .await
                .map_err(|e| (EX_UNAVAILABLE, e.to_string()))?;
            tracing::info!(broker = %addr, "using external broker");
            let route = broker::LinkRoute::Connect {
                addr: addr.clone(),
                quickack: true,
            };
            (addr.clone(), route)
        }
    };
    let (policy_tx, policy_rx) = watch::channel(policy);
    acl::install(&settings.mosquitto, &policy_rx.borrow())
        .map_err(|e| (EX_UNAVAILABLE, e.to_string()))?;
    tasks.spawn(reload_on_hangup(
        settings.policy.clone(),
        settings.mosquitto.clone(),
        policy_tx,
        supervision.clone(),
        stop.clone(),
    ));
    let duties = match &settings.fleet {
        None => None,
        Some(f) => Some(start_fleet(settings, f, &broker_addr, tasks, stop)?),
    };
    tasks.spawn(controller::run(
        broker_addr.clone(),
        settings.limits.max_packet,
        supervision.clone(),
        events,
        duties,
        stop.clone(),
    ));
    let ctx = Arc::new(LinkContext {
        broker: link_route,
        limits: settings.limits.clone(),
        policy: policy_rx,
        supervision,
        connect_timeout: settings.connect_timeout,
    });
    let (dir, glob, stop) = (
        settings.socket_dir.clone(),
        settings.socket_glob.clone(),
        stop.clone(),
    );
    Ok(tasks.spawn(async move { discovery::run(dir, glob, ctx, stop).await }))
}

/// `[fleet]`: with the embedded broker, the forwarder to the centre (its TLS files and password
/// read now: a bad one stops the start with its reason); the controller's fleet duties either way
/// (with Mosquitto, its bridge from `render-bridge` carries the messages).
fn start_fleet(
    settings: &Settings,
    f: &dom0_broker::fleet::config::FleetSettings,
    broker_addr: &BrokerAddr,
    tasks: &TaskTracker,
    stop: &CancellationToken,
) -> Result<dom0_broker::fleet::duties::Duties, Fail> {
    use dom0_broker::fleet::{centre, duties::Duties, forwarder};
    let stats = match settings.broker {
        BrokerChoice::External(_) => {
            tracing::info!(host = %f.host, "fleet: Mosquitto's bridge carries this host's messages (render-bridge)");
            None
        }
        BrokerChoice::Embedded(_) => {
            let access = fleet_access(f);
            let centre = centre::Centre::new(
                &access,
                &f.host.client_id(),
                f.keepalive,
                false,
                settings.limits.max_packet,
            )
            .map_err(|e| (EX_USAGE, format!("[fleet] {e}")))?;
            let stats = Arc::new(forwarder::FleetStats::default());
            tasks.spawn(forwarder::run(
                f.clone(),
                centre,
                broker_addr.clone(),
                settings.limits.max_packet,
                stats.clone(),
                stop.clone(),
            ));
            Some(stats)
        }
    };
    Ok(Duties::new(f.clone(), stats, std::time::Instant::now()))
}

fn fleet_access(
    f: &dom0_broker::fleet::config::FleetSettings,
) -> dom0_broker::fleet::centre::CentreAccess {
    dom0_broker::fleet::centre::CentreAccess {
        addresses: f.centre.clone(),
        ca_file: f.ca_file.clone(),
        cert_file: f.cert_file.clone(),
        key_file: f.key_file.clone(),
        username: f.username.clone(),
        password_file: f.password_file.clone(),
    }
}

/// SIGHUP (`rc-service dom0-broker reload`) rereads the policy file. A valid policy is in force at
/// once for every link; then the Mosquitto ACL is rewritten and Mosquitto told (SIGHUP). An invalid
/// one is refused with its reason (ERROR, and `system/events/error/notification`): the previous
/// policy stays in force. There is never a moment without a policy.
async fn reload_on_hangup(
    path: Option<PathBuf>,
    mosquitto: MosquittoConfig,
    policy: watch::Sender<Arc<Policy>>,
    supervision: Supervision,
    stop: CancellationToken,
) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot catch SIGHUP: no live policy reload");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            h = hup.recv() => if h.is_none() { return },
        }
        let Some(p) = &path else {
            tracing::info!("SIGHUP: the built-in policy is in force; nothing to reload");
            continue;
        };
        match Policy::load(p) {
            Ok(new) => {
                let new = Arc::new(new);
                policy.send_replace(new.clone());
                tracing::info!(path = %p.display(), "policy reloaded");
                if let Err(e) = acl::install(&mosquitto, &new) {
                    tracing::error!(error = %e, "Mosquitto ACL not updated");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "policy reload refused; the previous policy stays in force");
                supervision.emit(Event::PolicyRefused {
                    reason: e.to_string(),
                });
            }
        }
    }
}
