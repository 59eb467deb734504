//! The guest agent, in four parts:
//! - `uplink`: the MQTT session with Dom0 over the channel tty (the session is pure);
//! - `hub`: the one path from every local client to that session (the multiplexer is pure; its
//!   driver owns the tty);
//! - `endpoints`: the guest's applications' ways in (MQTT, the MVP's lines, `call`);
//! - `disk`: the disk service of `sys-usb` and its announcements.
//!
//! `config` and `cli` are the command line and the config file.

pub mod cli;
pub mod config;
pub mod disk;
pub mod endpoints;
pub mod hub;
pub mod optional;
pub mod uplink;
