//! System tests: the real binaries, simulated Xen channels (ptys behind UNIX sockets), real MQTT
//! clients (Debian's mosquitto_pub/sub, rumqttc) and both brokers (embedded rumqttd, Debian's mosquitto).

// Test code: a failed unwrap is a failed test, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// A system test run against both brokers: `both_brokers!(run: name_embedded, name_mosquitto);`
/// defines the two tests, each calling `run` with its broker.
macro_rules! both_brokers {
    ($run:ident: $embedded:ident, $mosquitto:ident) => {
        #[test]
        fn $embedded() {
            $run(system_tests::BrokerKind::Embedded);
        }

        #[test]
        fn $mosquitto() {
            $run(system_tests::BrokerKind::Mosquitto);
        }
    };
}

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
mod outage;
mod policy;
mod security;
mod upload;
mod vendor;
