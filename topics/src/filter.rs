//! Topic filters: matching, covering and intersection under MQTT's rules, and the filters the
//! services subscribe with and the policy's roles are made of. Every filter of the dictionary is
//! built here; nobody else writes one by hand.
//!
//! Every command and notification root has three levels (`system/<group>/<name>`, checked by a
//! test), so `system/+/+/...` filters cover them all.

use crate::topic::{Command, NOTIFICATION, REQUEST, RESPONSE};

/// The first level of every dictionary topic.
pub const SYSTEM: &str = "system";
/// The root group of the disk commands (`system/disks/<name>`).
pub const DISKS: &str = "system/disks";
/// Dom0's own benchmark probe: controller → broker → controller, on a topic no VM may publish or
/// read (no role allows `system/supervision/...` but the counters' request).
pub const DOM0_BENCH_PROBE: &str = "system/supervision/bench/dom0";

/// Every command request: `system/+/+/request`.
pub fn requests() -> String {
    format!("{SYSTEM}/+/+/{REQUEST}")
}

/// Every response addressed to `requester` (a VM id, `+`, or a placeholder such as the policy's
/// `{vm}`): `system/+/+/response/<requester>`.
pub fn responses_to(requester: &str) -> String {
    format!("{SYSTEM}/+/+/{RESPONSE}/{requester}")
}

/// Every notification: `system/+/+/notification`.
pub fn notifications() -> String {
    format!("{SYSTEM}/+/+/{NOTIFICATION}")
}

/// Every disk command request: `system/disks/+/request`.
pub fn disk_requests() -> String {
    format!("{DISKS}/+/{REQUEST}")
}

/// Every disk command response addressed to `requester` (or `+`): `system/disks/+/response/<r>`.
pub fn disk_responses_to(requester: &str) -> String {
    format!("{DISKS}/+/{RESPONSE}/{requester}")
}

impl Command {
    /// The responses of this command addressed to `requester` (a VM id, `+`, or a placeholder):
    /// `<root>/response/<requester>`.
    pub fn response_filter(self, requester: &str) -> String {
        format!("{}/{RESPONSE}/{requester}", self.root())
    }
}

/// True when `topic` (a name, no wildcard) matches `filter` under MQTT's rules.
///
/// A filter starting with a wildcard does not match a `$` topic (MQTT 3.1.1 §4.7.2).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when every topic matched by `inner` is also matched by `outer`.
///
/// Used to decide whether a (possibly wildcard) subscription stays within what a policy allows.
pub fn filter_covers(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(il)) if il != "#" => {}
            (Some(ol), Some(il)) if ol == il && ol != "+" && ol != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when two filters can match a common topic.
pub fn filters_intersect(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::{Notification, validate_filter};

    #[test]
    fn every_root_has_three_levels_and_disk_commands_share_their_group() {
        for c in Command::ALL {
            assert_eq!(c.root().split('/').count(), 3, "{}", c.root());
            assert!(filter_matches(&requests(), &c.request_topic()));
            assert!(filter_matches(
                &responses_to("vm-gui"),
                &c.response_filter("vm-gui")
            ));
            assert_eq!(
                c.is_disk_command(),
                filter_matches(&disk_requests(), &c.request_topic()),
                "{c:?}"
            );
        }
        for n in Notification::ALL {
            assert!(filter_matches(&notifications(), &n.topic()), "{n:?}");
        }
        assert!(!filter_matches(&requests(), DOM0_BENCH_PROBE));
        assert!(!filter_matches(&notifications(), DOM0_BENCH_PROBE));
    }

    #[test]
    fn builders_write_the_expected_filters() {
        let rows = [
            (requests(), "system/+/+/request"),
            (responses_to("{vm}"), "system/+/+/response/{vm}"),
            (notifications(), "system/+/+/notification"),
            (disk_requests(), "system/disks/+/request"),
            (disk_responses_to("+"), "system/disks/+/response/+"),
            (
                Command::Discover.response_filter("+"),
                "system/components/discover/response/+",
            ),
        ];
        for (built, expected) in rows {
            assert_eq!(built, expected);
            assert_eq!(validate_filter(&built.replace("{vm}", "x")), Ok(()));
        }
    }

    #[test]
    fn matching_table() {
        let rows = [
            ("#", "a/b", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+/c", "a/b/c", true),
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("+", "$SYS", false),
            ("#", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/b/c", "a/b", false),
        ];
        for (f, t, m) in rows {
            assert_eq!(filter_matches(f, t), m, "{f} vs {t}");
        }
    }

    #[test]
    fn covering_table() {
        let rows = [
            ("#", "a/+/#", true),
            ("a/#", "a/b/+", true),
            ("a/+/c", "a/x/c", true),
            ("a/+/c", "a/+/c", true),
            ("a/+/c", "a/#", false),
            ("a/x/c", "a/+/c", false),
            ("a/+", "a/#", false),
            ("a/b", "a/b/c", false),
            ("x/response/vm-gui", "x/response/+", false),
        ];
        for (o, i, c) in rows {
            assert_eq!(filter_covers(o, i), c, "{o} covers {i}");
        }
    }

    #[test]
    fn intersections() {
        let rows = [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/#", "+/c/d", true),
            ("a/b", "a/c", false),
            ("a/+/c", "a/b/d", false),
            ("a", "a/b", false),
            ("#", "x", true),
        ];
        for (a, b, i) in rows {
            assert_eq!(filters_intersect(a, b), i, "{a} ∩ {b}");
            assert_eq!(filters_intersect(b, a), i, "{b} ∩ {a}");
        }
    }
}
