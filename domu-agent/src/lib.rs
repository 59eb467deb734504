//! The guest agent: the MQTT session over the channel tty, the disk service of `sys-usb`, the
//! local request socket behind the `call` CLI.
//!
//! Pure logic (`paths`, `config`, the framing in `session`) is kept apart from I/O (`tty`, `fsops`,
//! `watch`, `local`).

pub mod fsops;
pub mod paths;
