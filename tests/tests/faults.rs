//! Faults while vm-gui keeps asking sys-usb `list_disks` at QoS 1 (`system_tests::faults`): after
//! each one, what a user would check — the services are up, a new request is answered, and no
//! half-written file is left. Requests caught by the fault get an answer or a timeout their
//! requester sees (and may retry on); how many, and the outage, are the benchmark's figures
//! (`scripts/reliability`), not asserted here.

use std::time::Duration;

use system_tests::BrokerKind;
use system_tests::faults::run_faults;

fn every_fault(kind: BrokerKind) {
    let outcomes = run_faults(
        kind,
        Duration::from_millis(300),
        Duration::from_secs(5),
        &[],
    );
    assert!(outcomes.len() >= 5);
    for o in &outcomes {
        let fault = o.fault.name();
        assert!(o.requests.answered > 0, "{fault}: no request answered");
        assert!(
            o.served_after,
            "{fault}: a request after the fault was not answered"
        );
        assert_eq!(o.partial_files, 0, "{fault}: half-written files left");
        if let Some(caught) = o.caught_mid_write {
            assert!(caught, "{fault}: no kill landed in the middle of a write");
        }
    }
}

both_brokers!(every_fault: every_fault_embedded, every_fault_mosquitto);
