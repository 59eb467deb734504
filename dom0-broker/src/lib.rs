//! The Dom0 service: the broker (embedded rumqttd or external), one identity-bound MQTT link per VM
//! channel, the per-VM policy, and the Dom0 controller.
//!
//! Pure logic (`mqtt`, `session`, `policy`, `config`, `discovery`'s name rules) is kept apart from
//! the I/O drivers (`link`, `discovery`, `broker`, `relay`, `controller`).

pub mod mqtt;
pub mod policy;
pub mod session;
pub mod supervision;
