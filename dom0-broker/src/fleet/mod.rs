//! The fleet: this host seen and steered from the operations centre, through a RabbitMQ cluster
//! (never through something of ours across hosts). `topics::fleet` names everything.
//!
//! - `config.rs`: the `[fleet]` section (pure).
//! - `commands.rs`: the centre's commands in the controller: admission, re-issue as `fleet`,
//!   answers back (pure).
//! - `duties.rs`: what the controller does for the fleet: those commands, the host's snapshots.
//! - `bridge_conf.rs`: Mosquitto's bridge to the centre, rendered from `[fleet]` (pure).
//! - `outbox.rs`: the forwarder's bounded queue for the centre, with its drop count (pure).
//! - `centre.rs`: the MQTT options of a connection to the centre (TLS, credentials, failover).
//! - `forwarder.rs`: with the embedded broker, the bridge itself (driver).
//! - `operator.rs`: `dom0-broker fleet status` and `fleet call`, at the centre (driver).
//! - `login.rs`: the centre's login check for RabbitMQ's HTTP auth backend (`fleet login-check`):
//!   a client id is bound to its user (decision pure, HTTP driver thin).
//! - `tools.rs`: the entry of those subcommands and of `render-bridge` (runtime, exit codes).

pub mod bridge_conf;
pub mod centre;
pub mod commands;
pub mod config;
pub mod duties;
pub mod forwarder;
pub mod login;
pub mod operator;
pub mod outbox;
pub mod tools;
