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

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// TOML config file; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub flags: crate::config::Flags,
}
