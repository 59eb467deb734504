//! The guest agent: the MQTT session over the channel tty, the disk service of `sys-usb`, new-file
//! announcements, and the local request socket behind the `call` CLI.
//!
//! Pure logic (`paths`, `config`, CONNACK resync in `session`, mount tables in `disks`) is kept
//! apart from I/O (`tty`, `fsops`, `watch`, `local`).

pub mod call_output;
pub mod channel;
pub mod cli;
pub mod config;
pub mod disks;
pub mod endpoint;
pub mod fsops;
pub mod legacy;
pub mod local;
pub mod local_mqtt;
pub mod local_session;
pub mod mux;
pub mod paths;
pub mod service;
pub mod session;
pub mod tty;
pub mod watch;
