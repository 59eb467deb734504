//! Legacy mode of a link: the guest has no agent and speaks the MVP's JSON lines on its channel
//! (decided once, on the first byte of the channel's life: `{`). The link translates on its
//! behalf with the one translation (`topics::legacy_translator`), under the same identity rule and
//! the same policy as an MQTT guest: what this module adds is what the link subscribes to for the
//! guest and how a channel's first bytes are told apart.

use topics::filter;
use topics::legacy_translator::Translator;
use topics::topic::Command;
use topics::vm::VmId;

use crate::policy::Rules;

/// What the link subscribes to for a legacy guest: its responses, the notifications, and the
/// requests it may serve, as far as the policy lets it read them.
pub fn subscriptions(vm: &VmId, rules: &Rules) -> Vec<String> {
    [
        filter::responses_to(vm.as_str()),
        filter::notifications(),
        filter::disk_requests(),
        Command::Discover.request_topic(),
        Command::Benchmark.request_topic(),
    ]
    .into_iter()
    .filter(|f| rules.check_subscribe(f).is_ok())
    .collect()
}

/// The translation of a legacy guest on `vm`'s channel: lines addressed to the VM, Dom0's own
/// lines signed `Dom0`, no message over `max_packet`.
pub fn translator(vm: &VmId, max_packet: usize) -> Translator {
    Translator::new(vm.clone(), "Dom0", Some(vm.to_string()), max_packet)
}

/// What the first bytes of a channel's life say it speaks; None while they are only whitespace.
pub fn dialect_of(bytes: &[u8]) -> Option<Dialect> {
    bytes.iter().find(|b| !b.is_ascii_whitespace()).map(|b| {
        if *b == b'{' {
            Dialect::Legacy
        } else {
            Dialect::Mqtt
        }
    })
}

/// What a channel speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Not known yet: nothing but whitespace since the link attached.
    Undecided,
    /// The MVP's JSON lines, until a CONNECT at a line boundary.
    Legacy,
    /// MQTT, for the rest of the channel's life.
    Mqtt,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn vm(s: &str) -> VmId {
        VmId::parse(s).unwrap()
    }

    #[test]
    fn subscriptions_follow_the_policy() {
        let policy = Policy::builtin();
        let gui = subscriptions(&vm("vm-gui"), &policy.rules_for(&vm("vm-gui")));
        assert_eq!(
            gui,
            [
                "system/+/+/response/vm-gui",
                "system/+/+/notification",
                "system/components/discover/request",
                "system/misc/benchmark/request"
            ]
        );
        let usb = subscriptions(&vm("sys-usb"), &policy.rules_for(&vm("sys-usb")));
        assert!(usb.contains(&"system/disks/+/request".to_owned()));
    }

    #[test]
    fn the_first_bytes_tell_the_dialect() {
        assert_eq!(dialect_of(b"  {\"type\""), Some(Dialect::Legacy));
        assert_eq!(dialect_of(b"\x10\x0c"), Some(Dialect::Mqtt));
        assert_eq!(dialect_of(b" \r\n"), None);
        assert_eq!(dialect_of(b""), None);
    }
}
