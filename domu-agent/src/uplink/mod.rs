//! The uplink: the agent's one MQTT session with Dom0 over the channel tty. The session as a state
//! machine without I/O (`session`), and the tty it runs on (`tty`: found, opened exclusively, raw).
//! The hub's driver (`hub::driver`) moves the bytes.

pub mod session;
pub mod tty;
