//! Hostile input toward Dom0, one attack class at a time down one guest's channel
//! (`system_tests::hostile`), while vm-gui keeps asking sys-usb `list_disks` through its agent.
//! What a user would check after each class: Dom0 still up, its memory bounded, nothing broken in
//! its log (no ERROR, warnings at a bounded rate), the neighbour's loop never failed, the offending
//! guest can start a session again. The figures (p99, CPU, recovery) are the reliability
//! benchmark's (`scripts/reliability`); no timing is asserted here.

use std::time::Duration;

use system_tests::BrokerKind;
use system_tests::hostile::run_toward_dom0;

/// Dom0's peak RSS allowed over the whole suite (embedded broker included).
const PEAK_RSS_KB: u64 = 96 * 1024;

#[test]
fn every_attack_class_toward_dom0_embedded() {
    let (base, outcomes) = run_toward_dom0(BrokerKind::Embedded, Duration::from_millis(300), &[]);
    assert_eq!(base.failed, 0, "the neighbour failed before any attack");
    assert_eq!(outcomes.len(), 12);
    for o in &outcomes {
        let class = format!("class {} ({})", o.class.id, o.class.name);
        assert!(o.up, "{class}: Dom0 died");
        assert_eq!(
            o.neighbour.failed, 0,
            "{class}: the neighbour's requests failed"
        );
        assert!(
            o.neighbour.answered > 0,
            "{class}: the neighbour got no answer"
        );
        assert!(
            o.recovery.is_ok(),
            "{class}: offender not served again: {:?}",
            o.recovery
        );
        assert!(
            o.peak_rss_kb <= PEAK_RSS_KB,
            "{class}: Dom0 peak RSS {} KiB",
            o.peak_rss_kb
        );
        assert_eq!(
            o.error_lines, 0,
            "{class}: ERROR in Dom0's log: {:?}",
            o.messages
        );
        // Guest-caused warnings: 10 a second per link (burst 10), plus one per session ended
        // (at most 5 new sessions a second, burst 10).
        let secs = o.elapsed.as_secs_f64();
        let bound = (30.0 + 20.0 * secs) as usize;
        assert!(
            o.warn_lines <= bound,
            "{class}: {} WARN lines in {secs:.1} s (bound {bound}): {:?}",
            o.warn_lines,
            o.messages
        );
    }
}

/// The agent's peak RSS allowed over the whole suite.
const AGENT_PEAK_RSS_KB: u64 = 32 * 1024;

/// The same classes from a hostile "Dom0" toward an agent: the agent stays up, its memory flat,
/// its local endpoint keeps answering applications, it logs no ERROR, and a well-behaved Dom0
/// gets a session again (a truncated frame costs at most two keepalives).
#[test]
fn every_attack_class_toward_an_agent() {
    let (base, outcomes) = system_tests::hostile::run_toward_agent(Duration::from_millis(200), &[]);
    assert_eq!(
        base.failed, 0,
        "the local endpoint failed before any attack"
    );
    assert_eq!(outcomes.len(), 12);
    for o in &outcomes {
        let class = format!("class {} ({})", o.class.id, o.class.name);
        assert!(o.up, "{class}: the agent died");
        assert_eq!(
            o.neighbour.failed, 0,
            "{class}: the local endpoint did not answer"
        );
        assert!(
            o.recovery.is_ok(),
            "{class}: no session again: {:?}",
            o.recovery
        );
        assert!(
            o.peak_rss_kb <= AGENT_PEAK_RSS_KB,
            "{class}: agent peak RSS {} KiB",
            o.peak_rss_kb
        );
        assert_eq!(
            o.error_lines, 0,
            "{class}: ERROR in the agent's log: {:?}",
            o.messages
        );
    }
}
