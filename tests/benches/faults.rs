//! Fault figures: each fault of `system_tests::faults` while vm-gui keeps asking sys-usb
//! `list_disks` at QoS 1; prints one Markdown table per broker (requests answered and timed out,
//! the longest round trip — the outage as the requester saw it —, half-written files left).
//! `scripts/reliability` puts them in docs/reliability.md.
//!
//! `cargo bench -p system-tests --bench faults -- [--embedded|--mosquitto] [--secs N] [--fault N]...`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use system_tests::BrokerKind;
use system_tests::bench::flag_numbers;
use system_tests::faults::{REQUEST_TIMEOUT, run_faults};

fn main() {
    let secs: u64 = flag_numbers("--secs").first().copied().unwrap_or(2);
    let only: Vec<u8> = flag_numbers("--fault");
    for kind in system_tests::bench::kinds_from_args() {
        let outcomes = run_faults(kind, Duration::from_secs(secs), REQUEST_TIMEOUT, &only);
        println!(
            "\n### Faults, {} broker ({secs} s of requests before and after each)\n",
            match kind {
                BrokerKind::Embedded => "embedded rumqttd",
                BrokerKind::Mosquitto => "Mosquitto",
            }
        );
        println!(
            "| fault | requests answered | requests timed out ({} s; the requester may retry) | longest answered round trip (the outage) | served after | killed mid-write | half-written files left |",
            REQUEST_TIMEOUT.as_secs()
        );
        println!("|---|---|---|---|---|---|---|");
        for o in outcomes {
            println!(
                "| {} | {} | {} | {} ms | {} | {} | {} |",
                o.fault.name(),
                o.requests.answered,
                o.requests.failed,
                o.worst.as_millis(),
                if o.served_after { "yes" } else { "**no**" },
                match o.caught_mid_write {
                    None => "",
                    Some(true) => "yes",
                    Some(false) => "**not caught**",
                },
                o.partial_files
            );
        }
    }
}
