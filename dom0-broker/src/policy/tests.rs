use super::*;

fn vm(s: &str) -> VmId {
    VmId::parse(s).unwrap()
}

#[derive(Debug, Clone, Copy)]
enum Act {
    Pub,
    Sub,
    Deliver,
}

fn decide(policy: &Policy, who: &str, act: Act, topic: &str, payload: &str) -> Result<(), Denial> {
    let v = vm(who);
    let rules = policy.rules_for(&v);
    match act {
        Act::Pub => check_publish(&rules, &v, topic, payload.as_bytes(), None).map(|_| ()),
        Act::Sub => rules.check_subscribe(topic),
        Act::Deliver => rules.check_deliver(topic),
    }
}

const GUI_REQ: &str = r#"{"sender":"vm-gui"}"#;
const USB_REQ: &str = r#"{"sender":"sys-usb"}"#;

/// The default policy: (VM, action, topic, payload) → allowed, or the kind of denial.
#[test]
fn default_policy_table() {
    use Act::*;
    let p = Policy::builtin();
    let na = || Err(Denial::NotAllowed);
    let rows: Vec<(&str, Act, &str, &str, Result<(), Denial>)> = vec![
        // vm-gui, a client: publishes requests as itself.
        (
            "vm-gui",
            Pub,
            "system/disks/list_disks/request",
            GUI_REQ,
            Ok(()),
        ),
        (
            "vm-gui",
            Pub,
            "system/disks/create_file/request",
            r#"{"sender":"vm-gui","disk":"d","filepath":"f","data":""}"#,
            Ok(()),
        ),
        (
            "vm-gui",
            Pub,
            "system/components/discover/request",
            GUI_REQ,
            Ok(()),
        ),
        (
            "vm-gui",
            Pub,
            "system/misc/benchmark/request",
            GUI_REQ,
            Ok(()),
        ),
        // ... never as another VM, never with garbage; without sender, as itself (filled in).
        (
            "vm-gui",
            Pub,
            "system/disks/list_disks/request",
            USB_REQ,
            Err(Denial::Sender(String::new())),
        ),
        (
            "vm-gui",
            Pub,
            "system/disks/list_disks/request",
            "{}",
            Ok(()),
        ),
        (
            "vm-gui",
            Pub,
            "system/disks/list_disks/request",
            "not json",
            Err(Denial::Sender(String::new())),
        ),
        (
            "vm-gui",
            Pub,
            "system/disks/list_disks/request",
            r#"{"sender":"dom0"}"#,
            Err(Denial::Sender(String::new())),
        ),
        (
            "vm-gui",
            Pub,
            "system/disks/list_disks/request",
            r#"{"sender":"VM-GUI"}"#,
            Err(Denial::Sender(String::new())),
        ),
        // ... may not answer disk requests (a fake list_disks response).
        (
            "vm-gui",
            Pub,
            "system/disks/list_disks/response/vm-gui",
            "{}",
            na(),
        ),
        (
            "vm-gui",
            Pub,
            "system/disks/list_disks/response/sys-usb",
            "{}",
            na(),
        ),
        (
            "vm-gui",
            Pub,
            "system/disk/new_file/notification",
            "{}",
            na(),
        ),
        // ... may answer discover and benchmark (every agent does), and report errors.
        (
            "vm-gui",
            Pub,
            "system/components/discover/response/sys-usb",
            "{}",
            Ok(()),
        ),
        (
            "vm-gui",
            Pub,
            "system/misc/benchmark/response/vm-gui",
            "{}",
            Ok(()),
        ),
        (
            "vm-gui",
            Pub,
            "system/events/error/notification",
            "{}",
            Ok(()),
        ),
        // ... not the supervision topics, not $, not application topics.
        (
            "vm-gui",
            Pub,
            "system/supervision/links/notification",
            "{}",
            na(),
        ),
        (
            "vm-gui",
            Pub,
            "$SYS/broker/clients",
            "{}",
            Err(Denial::Reserved),
        ),
        ("vm-gui", Pub, "apps/chat", "{}", na()),
        (
            "vm-gui",
            Pub,
            "system/+/list_disks/request",
            GUI_REQ,
            Err(Denial::Invalid(String::new())),
        ),
        (
            "vm-gui",
            Pub,
            "system//list_disks/request",
            GUI_REQ,
            Err(Denial::Invalid(String::new())),
        ),
        // vm-gui subscribes to its own responses and to notifications.
        (
            "vm-gui",
            Sub,
            "system/disks/list_disks/response/vm-gui",
            "",
            Ok(()),
        ),
        ("vm-gui", Sub, "system/+/+/response/vm-gui", "", Ok(())),
        ("vm-gui", Sub, "system/disks/+/response/vm-gui", "", Ok(())),
        (
            "vm-gui",
            Sub,
            "system/disk/new_file/notification",
            "",
            Ok(()),
        ),
        ("vm-gui", Sub, "system/+/+/notification", "", Ok(())),
        (
            "vm-gui",
            Sub,
            "system/components/discover/request",
            "",
            Ok(()),
        ),
        // ... never another VM's responses, exact or by wildcard.
        (
            "vm-gui",
            Sub,
            "system/disks/list_disks/response/sys-usb",
            "",
            na(),
        ),
        ("vm-gui", Sub, "system/+/+/response/+", "", na()),
        (
            "vm-gui",
            Sub,
            "system/disks/list_disks/response/+",
            "",
            na(),
        ),
        ("vm-gui", Sub, "system/#", "", na()),
        // `#` reaches the fleet's tree too: refused as reserved, never narrowed.
        ("vm-gui", Sub, "#", "", Err(Denial::Reserved)),
        ("vm-gui", Sub, "fleet/#", "", Err(Denial::Reserved)),
        ("vm-gui", Sub, "+/in/#", "", Err(Denial::Reserved)),
        (
            "vm-gui",
            Sub,
            "+/+/+/response/vm-gui",
            "",
            Err(Denial::Reserved),
        ),
        // ... never the disk requests.
        ("vm-gui", Sub, "system/disks/list_disks/request", "", na()),
        ("vm-gui", Sub, "system/disks/+/request", "", na()),
        ("vm-gui", Sub, "$SYS/#", "", Err(Denial::Reserved)),
        (
            "vm-gui",
            Pub,
            "fleet/in/system/disks/list_disks/request",
            "{}",
            Err(Denial::Reserved),
        ),
        (
            "vm-gui",
            Deliver,
            "fleet/out/snapshot",
            "",
            Err(Denial::Reserved),
        ),
        (
            "vm-gui",
            Sub,
            "$share/g/system/+/+/response/vm-gui",
            "",
            Err(Denial::Reserved),
        ),
        (
            "vm-gui",
            Sub,
            "system/#/x",
            "",
            Err(Denial::Invalid(String::new())),
        ),
        // Delivery (defence in depth).
        (
            "vm-gui",
            Deliver,
            "system/disks/list_disks/response/vm-gui",
            "",
            Ok(()),
        ),
        (
            "vm-gui",
            Deliver,
            "system/disks/list_disks/response/sys-usb",
            "",
            na(),
        ),
        (
            "vm-gui",
            Deliver,
            "system/disks/list_disks/request",
            "",
            na(),
        ),
        (
            "vm-gui",
            Deliver,
            "$SYS/broker/uptime",
            "",
            Err(Denial::Reserved),
        ),
        (
            "vm-gui",
            Deliver,
            "system/events/error/notification",
            "",
            Ok(()),
        ),
        // sys-usb, the disk provider.
        ("sys-usb", Sub, "system/disks/+/request", "", Ok(())),
        (
            "sys-usb",
            Sub,
            "system/disks/list_disks/request",
            "",
            Ok(()),
        ),
        ("sys-usb", Sub, "system/misc/benchmark/request", "", Ok(())),
        ("sys-usb", Sub, "system/+/+/request", "", na()),
        (
            "sys-usb",
            Pub,
            "system/disks/list_disks/response/vm-gui",
            "{}",
            Ok(()),
        ),
        (
            "sys-usb",
            Pub,
            "system/disks/get_file_footprint/response/vm-gui",
            "{}",
            Ok(()),
        ),
        (
            "sys-usb",
            Pub,
            "system/disk/new_file/notification",
            "{}",
            Ok(()),
        ),
        (
            "sys-usb",
            Pub,
            "system/events/error/notification",
            "{}",
            Ok(()),
        ),
        (
            "sys-usb",
            Deliver,
            "system/disks/remove_file/request",
            "",
            Ok(()),
        ),
        // sys-usb is not a client in the default policy.
        (
            "sys-usb",
            Pub,
            "system/disks/list_disks/request",
            USB_REQ,
            na(),
        ),
        // Every agent reads the responses addressed to itself (where Dom0 answers a refused
        // request); the agent of sys-usb subscribes to them at start.
        (
            "sys-usb",
            Sub,
            "system/disks/list_disks/response/sys-usb",
            "",
            Ok(()),
        ),
        // A VM the policy does not name gets only the `*` rules.
        (
            "vm-other",
            Pub,
            "system/disks/list_disks/request",
            r#"{"sender":"vm-other"}"#,
            na(),
        ),
        (
            "vm-other",
            Sub,
            "system/components/discover/request",
            "",
            Ok(()),
        ),
        (
            "vm-other",
            Pub,
            "system/components/discover/response/vm-gui",
            "{}",
            Ok(()),
        ),
        // Every agent reads the notifications (the MVP sent them to `tous`; its legacy endpoint
        // gives them to MVP applications).
        ("vm-other", Sub, "system/+/+/notification", "", Ok(())),
    ];
    assert!(rows.len() >= 50, "{} rows", rows.len());
    for (who, act, topic, payload, expected) in rows {
        let got = decide(&p, who, act, topic, payload);
        let same = match (&got, &expected) {
            (Err(Denial::Sender(_)), Err(Denial::Sender(_))) => true,
            (Err(Denial::Invalid(_)), Err(Denial::Invalid(_))) => true,
            _ => got == expected,
        };
        assert!(
            same,
            "{who} {act:?} {topic} {payload}: got {got:?}, expected {expected:?}"
        );
    }
}

#[test]
fn vm_placeholder_and_deny_rules() {
    let p = Policy::parse(
        r#"
        [vm."*"]
        publish = ["apps/{vm}/#", "apps/shared/+"]
        subscribe = ["apps/+/inbox/{vm}", "apps/shared/#"]
        deny_subscribe = ["apps/shared/secret"]
        [vm.vm-a]
        deny_publish = ["apps/shared/forbidden"]
        "#,
        "test",
    )
    .unwrap();
    use Act::*;
    let rows: Vec<(&str, Act, &str, bool)> = vec![
        ("vm-a", Pub, "apps/vm-a/x/y", true),
        ("vm-a", Pub, "apps/vm-b/x", false),
        ("vm-a", Pub, "apps/shared/forbidden", false),
        ("vm-b", Pub, "apps/shared/forbidden", true),
        ("vm-a", Sub, "apps/x/inbox/vm-a", true),
        ("vm-a", Sub, "apps/+/inbox/vm-a", true),
        ("vm-a", Sub, "apps/+/inbox/+", false),
        ("vm-a", Sub, "apps/shared/public", true),
        ("vm-a", Sub, "apps/shared/#", false),
        ("vm-a", Sub, "apps/shared/+", false),
        ("vm-a", Sub, "apps/shared/secret", false),
        ("vm-a", Deliver, "apps/shared/secret", false),
        ("vm-a", Deliver, "apps/shared/other", true),
        // `{vm}` is the channel's name, so it can never be a wildcard.
        ("vm-b", Sub, "apps/x/inbox/vm-a", false),
    ];
    for (who, act, topic, allowed) in rows {
        assert_eq!(
            decide(&p, who, act, topic, "{}").is_ok(),
            allowed,
            "{who} {act:?} {topic}"
        );
    }
}

#[test]
fn invalid_policies_are_refused() {
    // (text, expected start: file and line, expected reason)
    let rows = [
        (
            "[vm.\"VM\"]\npublish=[\"a\"]",
            "policy.toml:1:",
            "not a VM name",
        ),
        (
            "# x\n[vm.dom0]\npublish=[\"a\"]",
            "policy.toml:2:",
            "Dom0 itself",
        ),
        (
            "[vm.a]\nsubscribe=[\"b\"]\npublish=[\"ok/+\", \"a/#/b\"]",
            "policy.toml:3:",
            "wildcard",
        ),
        (
            "[vm.a]\npublish=[\"a/{name}\"]",
            "policy.toml:2:",
            "only {vm}",
        ),
        (
            "[vm.a]\n\npublish=['a/x{vm}']",
            "policy.toml:3:",
            "whole level",
        ),
        ("[vm.a]\npublish=[\"\"]", "policy.toml:2:", "empty"),
        ("[vm.a]\npublish=\"a\"", "policy.toml:", "invalid type"),
        ("[vm.a]\npublsh=[\"a\"]", "policy.toml:", "unknown field"),
        (
            "[vm.a]\nroles=[\"admin\"]",
            "policy.toml:",
            "unknown variant",
        ),
        ("[vm.a\n", "policy.toml:", "line 1"),
        ("[other]\n", "policy.toml:", "unknown field"),
    ];
    for (text, start, reason) in rows {
        let err = Policy::parse(text, "policy.toml").unwrap_err().to_string();
        assert!(err.starts_with(start), "{text:?}: {err}");
        assert!(err.contains(reason), "{text:?}: {err}");
    }
    // toml's own errors carry their line too.
    let err = Policy::parse("[vm.a]\npublish=[\"a\"]\nsubscribe=[1]\n", "p.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 3"), "{err}");
}

/// The identity field of a request, response or notification is filled in when absent, kept when
/// it names the VM, refused when it names anyone else.
#[test]
fn identity_fields_are_stamped_or_refused() {
    let p = Policy::builtin();
    let usb = vm("sys-usb");
    let rules = p.rules_for(&usb);
    let rows: [(&str, &str, Result<Option<&str>, ()>); 9] = [
        (
            "system/disks/list_disks/response/vm-gui",
            r#"{"status":"ok"}"#,
            Ok(Some("responder")),
        ),
        (
            "system/disks/list_disks/response/vm-gui",
            r#"{"status":"ok","responder":"sys-usb"}"#,
            Ok(None),
        ),
        (
            "system/disks/list_disks/response/vm-gui",
            r#"{"status":"ok","responder":"dom0"}"#,
            Err(()),
        ),
        (
            "system/disks/list_disks/response/vm-gui",
            r#"{"status":"ok","responder":7}"#,
            Err(()),
        ),
        (
            "system/disk/new_file/notification",
            r#"{"disk":"usb0"}"#,
            Ok(Some("origin")),
        ),
        (
            "system/disk/new_file/notification",
            r#"{"disk":"usb0","origin":"vm-gui"}"#,
            Err(()),
        ),
        ("system/disk/new_file/notification", "ffff", Err(())),
        (
            "system/events/error/notification",
            r#"{"module":"dom0-broker/link"}"#,
            Ok(Some("origin")),
        ),
        (
            "system/components/discover/request",
            r#"{"request_id":"bad id"}"#,
            Err(()),
        ),
    ];
    for (topic, payload, want) in rows {
        let got = check_publish(&rules, &usb, topic, payload.as_bytes(), None);
        match (got, want) {
            (Ok(None), Ok(None)) | (Err(_), Err(())) => {}
            (Ok(Some(stamped)), Ok(Some(field))) => {
                let v: serde_json::Value = serde_json::from_slice(&stamped).unwrap();
                assert_eq!(v[field], "sys-usb", "{topic} {payload}");
            }
            (got, want) => panic!("{topic} {payload}: got {got:?}, expected {want:?}"),
        }
    }
    let gui = vm("vm-gui");
    let stamped = check_publish(
        &p.rules_for(&gui),
        &gui,
        "system/disks/list_disks/request",
        b"{}",
        None,
    )
    .unwrap()
    .unwrap();
    assert_eq!(stamped, br#"{"sender":"vm-gui"}"#);
    // On Dom0's clock, a request gets its deadline: its patience, or the default; whatever
    // deadline the VM wrote is replaced.
    let rules = p.rules_for(&gui);
    let at = |payload: &[u8]| -> serde_json::Value {
        let out = check_publish(
            &rules,
            &gui,
            "system/disks/list_disks/request",
            payload,
            Some(1000),
        );
        serde_json::from_slice(&out.unwrap().unwrap()).unwrap()
    };
    assert_eq!(at(br#"{"timeout_ms":500}"#)["deadline_ms"], 1500);
    let default = topics::payload::DEFAULT_REQUEST_TIMEOUT.as_millis() as u64;
    assert_eq!(
        at(br#"{"deadline_ms":99999999999}"#)["deadline_ms"],
        1000 + default
    );
    assert_eq!(at(br#"{"sender":"vm-gui"}"#)["sender"], "vm-gui");
}

#[test]
fn broadcasts_are_told_apart() {
    let rows = [
        (
            "system/components/discover/request",
            r#"{"sender":"x"}"#,
            true,
        ),
        (
            "system/components/discover/request",
            r#"{"destination":"tous"}"#,
            true,
        ),
        (
            "system/components/discover/request",
            r#"{"destination":"sys-usb"}"#,
            false,
        ),
        (
            "system/misc/benchmark/request",
            r#"{"module":"messaging"}"#,
            true,
        ),
        ("system/disks/list_disks/request", r#"{}"#, false),
        ("system/components/discover/response/vm-gui", r#"{}"#, false),
    ];
    for (topic, payload, want) in rows {
        assert_eq!(
            is_broadcast(topic, payload.as_bytes()),
            want,
            "{topic} {payload}"
        );
    }
}
