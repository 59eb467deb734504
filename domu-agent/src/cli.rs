//! The command line: what `domu-agent --help` shows, the man pages and the completions are made of.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The agent's local socket when none is configured (for `call`).
pub const DEFAULT_LOCAL_SOCKET: &str = "/run/domu-agent.sock";

#[derive(Debug, Parser)]
#[command(
    name = "domu-agent",
    version,
    about = "Guest agent: MQTT over the Xen channel, the disk service, local requests"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
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
        /// The config file.
        #[arg(long, default_value = "/etc/domu-agent/domu-agent.toml")]
        config: PathBuf,
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

#[derive(Debug, clap::Args)]
pub struct CallArgs {
    /// The agent's local socket.
    #[arg(long, default_value = DEFAULT_LOCAL_SOCKET)]
    pub socket: PathBuf,
    /// How long to wait for the answer(s), in milliseconds [default: 10000; `discover`: 2000, the
    /// time every party takes to answer; a benchmark to everyone: each party's figures, within it].
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Print the answers as the JSON lines they are.
    #[arg(long)]
    pub json: bool,
    /// Ask N times in a row and print the round trips' p50 and p99 (after the last answer).
    #[arg(long, value_name = "N")]
    pub repeat: Option<usize>,
    /// `create_file` data larger than this many bytes is uploaded in chunks of this size.
    #[arg(long, value_name = "BYTES", default_value_t = topics::upload::CHUNK,
          value_parser = clap::value_parser!(usize))]
    pub chunk_bytes: usize,
    /// list_disks, list_files, read_file, copy_file, remove_file, get_file_footprint, create_file,
    /// discover, benchmark (or a topic root, or the MVP's name).
    pub command: String,
    /// Arguments as KEY=VALUE; `data=@FILE` sends FILE's content (Base64); true/false are booleans.
    pub args: Vec<String>,
}
