//! System tests: the real binaries, simulated Xen channels (ptys behind UNIX sockets), real MQTT
//! clients (Debian's mosquitto_pub/sub, rumqttc) and both brokers (embedded rumqttd, Debian's mosquitto).

// Test code: a failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod agent;
mod apps;
mod demo;
mod deploy;
mod dom0;
mod faults;
mod fidelity;
mod hostile;
mod layout;
mod legacy;
mod operations;
mod policy;
mod security;
mod vendor;
