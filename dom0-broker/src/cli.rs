//! The command line: what `dom0-broker --help` shows, the man pages and the completions are made of.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "dom0-broker",
    version,
    about = "Bridges every guest's Xen PV channel into an MQTT broker under a per-VM policy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the service: broker, one link per channel socket, controller.
    Run(RunArgs),
    /// Validate a policy file and print the effective rules per VM.
    CheckPolicy {
        /// The policy file.
        file: PathBuf,
        /// Also print the rules of these VMs (besides those the file names).
        #[arg(long = "vm")]
        vms: Vec<String>,
    },
    /// Render a policy as a Mosquitto ACL file (pattern lines with %c).
    RenderAcl {
        /// The policy file (default: the built-in policy).
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// Render Mosquitto's bridge to the operations centre from [fleet] of the config (it holds
    /// the password: install it readable by Mosquitto only; restart Mosquitto to apply).
    RenderBridge {
        /// The config file with a [fleet] section.
        #[arg(long, default_value = "/etc/dom0-broker/dom0-broker.toml")]
        config: PathBuf,
    },
    /// The operations centre's tools: every host's status, a command to a host's VM.
    #[command(subcommand)]
    Fleet(FleetCmd),
    /// Validate the config file and the policy it names; exit 64 with the reason if either is bad.
    CheckConfig {
        /// The config file [default: /etc/dom0-broker/dom0-broker.toml if it exists].
        #[arg(long)]
        config: Option<PathBuf>,
        /// The policy file, when the service is given one with --policy.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// Time round trips on a channel whose guest echoes what it reads (the platform's own cost).
    ProbeChannel {
        /// The channel socket (one that no link holds).
        socket: PathBuf,
        /// Round trips to time.
        #[arg(long, default_value_t = 200)]
        count: usize,
    },
    /// One line per VM: link state, session up since, messages in and out, refusals, last error.
    Status {
        /// The service's broker [default: the configured one, else 127.0.0.1:1883]:
        /// mqtt://HOST:PORT or unix:///PATH.
        #[arg(long)]
        broker: Option<String>,
        /// The config file to read the broker from [default: /etc/dom0-broker/dom0-broker.toml].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Refresh every 2 seconds until interrupted.
        #[arg(long)]
        watch: bool,
        /// Print the counters as JSON (one object a line) for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum FleetCmd {
    /// Every host that reports: its VMs, their links and counters, how fresh (the fleet's `xl
    /// list`). Exit 0; 1 when a host named with --hosts (or any host) did not report; 125 when
    /// the centre cannot be reached.
    Status {
        #[command(flatten)]
        centre: crate::fleet::operator::CentreArgs,
        /// Stop waiting once these hosts reported (comma-separated).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// How long to listen for the hosts' snapshots (they come every snapshot_secs and after
        /// every reconnection), in milliseconds.
        #[arg(long, default_value_t = 35_000)]
        wait_ms: u64,
        /// One JSON object per host (its snapshot and `age_ms`).
        #[arg(long)]
        json: bool,
    },
    /// Ask a host's VM a command through the centre; exit codes as `domu-agent call`: 0 ok, 1
    /// the command answered `error`, 124 no answer in time, 125 local failure (centre
    /// unreachable, command not acknowledged, bad arguments), 126 refused by the host.
    Call {
        #[command(flatten)]
        centre: crate::fleet::operator::CentreArgs,
        /// How long the VM has to answer, in milliseconds (the host adds its own margin).
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Print the answers as the JSON lines they are.
        #[arg(long)]
        json: bool,
        /// Ask N times in a row (one connection) and print the round trips' p50 and p99.
        #[arg(long, value_name = "N", default_value_t = 1)]
        repeat: usize,
        /// The host id.
        host: String,
        /// The VM on that host (or dom0).
        vm: String,
        /// The command (list_disks, list_files, get_file_footprint, counters, ...).
        command: String,
        /// Arguments as KEY=VALUE; `data=@FILE` sends FILE's content (Base64).
        args: Vec<String>,
    },
    /// At the centre: the login check of RabbitMQ's HTTP auth backend (password and a client
    /// id of the user's own).
    LoginCheck {
        /// Where RabbitMQ reaches it (auth_http.user_path).
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: std::net::SocketAddr,
        /// The users file (`USER SALT SHA256HEX` lines, from hash-password).
        #[arg(long)]
        users: PathBuf,
    },
    /// Print a users file line for USER, the password read from standard input.
    HashPassword { user: String },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// TOML config file; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub flags: crate::config::Flags,
}
