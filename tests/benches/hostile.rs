//! Reliability figures under hostile input: each attack class of `system_tests::hostile` down one
//! guest's channel for a few seconds while vm-gui keeps asking sys-usb `list_disks`; prints one
//! Markdown table per broker (Dom0 up, its memory, the neighbour's failures and p99 against its
//! unloaded p99, the offender's recovery). `scripts/reliability` puts them in docs/reliability.md.
//!
//! The same classes from a hostile "Dom0" toward an agent with `--agent`.
//!
//! `cargo bench -p system-tests --bench hostile -- [--embedded|--mosquitto|--agent] [--secs N] [--class N]...`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use system_tests::BrokerKind;
use system_tests::bench::flag_numbers;
use system_tests::hostile::{LoopRun, Outcome, run_toward_agent, run_toward_dom0};

fn main() {
    let secs: u64 = flag_numbers("--secs").first().copied().unwrap_or(3);
    let only: Vec<u8> = flag_numbers("--class");
    if std::env::args().any(|a| a == "--agent") {
        let (base, outcomes) = run_toward_agent(Duration::from_secs(secs), &only);
        let title = format!("Toward an agent, from a hostile Dom0 ({secs} s per class)");
        print_table(
            &title,
            "agent",
            "an application connecting to the agent's local MQTT endpoint",
            &base,
            &outcomes,
        );
        return;
    }
    for kind in system_tests::bench::kinds_from_args() {
        let (base, outcomes) = run_toward_dom0(kind, Duration::from_secs(secs), &only);
        let title = format!(
            "Toward Dom0, {} broker ({secs} s per class)",
            match kind {
                BrokerKind::Embedded => "embedded rumqttd",
                BrokerKind::Mosquitto => "Mosquitto",
            }
        );
        print_table(
            &title,
            "Dom0",
            "vm-gui asking sys-usb `list_disks` through both agents and Dom0",
            &base,
            &outcomes,
        );
    }
}

fn ms(d: &Result<Duration, String>) -> String {
    match d {
        Ok(d) => format!("{} ms", d.as_millis()),
        Err(e) => format!("**{e}**"),
    }
}

fn print_table(title: &str, who: &str, neighbour: &str, base: &LoopRun, outcomes: &[Outcome]) {
    println!("\n### {title}\n");
    println!(
        "The neighbour: {neighbour}. Alone at the start: {} round trips, {} failed, p50 {:.0} µs, p99 {:.0} µs.\n",
        base.answered,
        base.failed,
        base.stats.map_or(f64::NAN, |s| s.p50),
        base.stats.map_or(f64::NAN, |s| s.p99),
    );
    println!(
        "| # | class | inputs sent (in) | {who} up | {who} CPU | {who} RSS after / peak | {who} WARN / ERROR lines | neighbour round trips (failed) | neighbour p99: alone just before → under attack | session again after |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for o in outcomes {
        for (m, n) in &o.messages {
            eprintln!("class {}: {n} × {m}", o.class.id);
        }
        let p99 = o.neighbour.stats.map_or(f64::NAN, |s| s.p99);
        let base_p99 = o.unloaded.stats.map_or(f64::NAN, |s| s.p99);
        println!(
            "| {} | {} | {} ({:.1} s) | {} | {:.0}% | {:.1} / {:.1} MiB | {} / {} | {} ({}) | {:.0} → {:.0} µs ({:.2}×) | {} |",
            o.class.id,
            o.class.name,
            o.inputs_sent,
            o.elapsed.as_secs_f64(),
            if o.up { "yes" } else { "**no**" },
            o.cpu,
            o.rss_kb as f64 / 1024.0,
            o.peak_rss_kb as f64 / 1024.0,
            o.warn_lines,
            o.error_lines,
            o.neighbour.answered,
            o.neighbour.failed,
            base_p99,
            p99,
            p99 / base_p99,
            ms(&o.recovery),
        );
    }
}
