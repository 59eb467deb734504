//! The Dom0 service: the broker (embedded rumqttd or external), one identity-bound MQTT link per VM
//! channel, the per-VM policy, and the Dom0 controller.
//!
//! Pure logic (`mqtt`, `session`, `policy`, `acl`, `config`) is kept apart from the I/O drivers
//! (`link`, `discovery`, `broker`, `front_door`, `controller`).

pub mod acl;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod config;
pub mod controller;
pub mod discovery;
pub mod fleet;
pub mod front_door;
pub mod link;
pub mod mqtt;
pub mod policy;
pub mod probe;
pub mod session;
pub mod signals;
pub mod status;
pub mod supervision;
pub mod throttle;
