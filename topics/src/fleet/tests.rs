use super::*;

fn host(h: &str) -> HostId {
    HostId::parse(h).unwrap()
}

#[test]
fn host_ids_follow_the_vm_grammar_without_dots() {
    for ok in ["host-a", "h1", "dc2_rack3"] {
        assert!(HostId::parse(ok).is_ok(), "{ok}");
    }
    for bad in ["", "Host", "a.b", "a/b", "a+", "#", "-a", &"x".repeat(33)] {
        assert!(HostId::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(host("host-a").client_id(), "fleet-host-a");
}

#[test]
fn a_client_id_belongs_to_its_user_only() {
    let cases = [
        ("fleet-host-a", "host-a", true),
        ("fleet-ops.3f2a", "ops", true),
        // Another host's id, with valid credentials of its own: the takeover FLEET.md saw.
        ("fleet-host-a", "host-b", false),
        // A user whose name is a prefix of another's cannot claim it.
        ("fleet-host-a", "host", false),
        ("fleet-host-ab", "host-a", false),
        ("fleet-ops.", "ops", false),
        ("fleet-ops.a/b", "ops", false),
        ("host-a", "host-a", false),
        ("", "host-a", false),
    ];
    for (id, user, want) in cases {
        assert_eq!(client_id_belongs_to(id, user), want, "{id} as {user}");
    }
    assert!(client_id_belongs_to(
        &operator_client_id("ops", "abc123"),
        "ops"
    ));
}

#[test]
fn routes_map_by_plain_prefix_and_carry_nothing_else() {
    let r = routes(
        &host("host-a"),
        &[Outbound::Links, Outbound::Errors, Outbound::Links],
    );
    let out = |t: &str| {
        r.iter().find_map(|x| {
            (x.direction == Direction::Out)
                .then(|| x.to_remote(t))
                .flatten()
        })
    };
    let inn = |t: &str| {
        r.iter().find_map(|x| {
            (x.direction == Direction::In)
                .then(|| x.to_local(t))
                .flatten()
        })
    };
    assert_eq!(
        out("system/supervision/links/notification").as_deref(),
        Some("fleet/host-a/out/system/supervision/links/notification")
    );
    assert_eq!(
        out("system/events/error/notification").as_deref(),
        Some("fleet/host-a/out/system/events/error/notification")
    );
    assert_eq!(
        out("fleet/out/system/disks/list_disks/response").as_deref(),
        Some("fleet/host-a/out/system/disks/list_disks/response")
    );
    assert_eq!(
        out("fleet/out/snapshot").as_deref(),
        Some("fleet/host-a/out/snapshot")
    );
    // Never a response or a request of the host's own traffic, nor what was not chosen.
    for local in [
        "system/disks/read_file/response/vm-gui",
        "system/disks/list_disks/request",
        "system/disk/new_file/notification",
        "fleet/in/system/disks/list_disks/request",
        "fleet/bridge/state",
    ] {
        assert_eq!(out(local), None, "{local}");
    }
    assert_eq!(
        inn("fleet/host-a/in/system/disks/list_disks/request").as_deref(),
        Some("fleet/in/system/disks/list_disks/request")
    );
    for remote in [
        "fleet/host-b/in/system/disks/list_disks/request",
        "fleet/host-a/in/system/disks/list_disks/response/x",
        "fleet/host-a/out/system/disks/list_disks/request",
        "fleet/host-a/in/x",
    ] {
        assert_eq!(inn(remote), None, "{remote}");
    }
    assert_eq!(
        local_command("fleet/in/system/disks/list_disks/request"),
        Some(Command::ListDisks)
    );
    assert_eq!(local_command("system/disks/list_disks/request"), None);
}

#[test]
fn centre_topics_name_their_host() {
    let h = host("host-b");
    let t = command_topic(&h, Command::ListDisks);
    assert_eq!(t, "fleet/host-b/in/system/disks/list_disks/request");
    assert_eq!(host_of(&t), Some(h.clone()));
    assert_eq!(
        answer_topic(&h, Command::ListDisks),
        "fleet/host-b/out/system/disks/list_disks/response"
    );
    assert_eq!(host_of("fleet/A/out/x"), None);
    assert_eq!(host_of("other/host-b/out"), None);
}

#[test]
fn fleet_commands_are_read_or_answered_with_why() {
    let id = "0123456789abcdef0123456789abcdef";
    let ok = format!(
        r#"{{"request_id":"{id}","destination":"sys-usb","issued_at":1000,"disk":"usb0","sender":"vm-gui","deadline_ms":1}}"#
    );
    let c = parse_command(Command::ListFiles, ok.as_bytes()).unwrap();
    assert_eq!(c.destination, "sys-usb");
    assert_eq!(c.issued_at_ms, 1000);
    assert_eq!(c.timeout_ms, None);
    // What the host owns is never taken from the centre.
    assert_eq!(c.args.keys().collect::<Vec<_>>(), ["disk"]);
    assert_eq!(c.age_ms(1500), 500);
    assert_eq!(c.age_ms(500), 0);
    let back = parse_command(Command::ListFiles, &c.to_json()).unwrap();
    assert_eq!(back, c);

    let cases: [(&str, bool); 7] = [
        ("not json", false),
        ("[1]", false),
        (r#"{"destination":"sys-usb","issued_at":1}"#, false),
        (&format!(r#"{{"request_id":"{id}","issued_at":1}}"#), true),
        (
            &format!(r#"{{"request_id":"{id}","destination":"Sys","issued_at":1}}"#),
            true,
        ),
        (
            &format!(r#"{{"request_id":"{id}","destination":"sys-usb","issued_at":"x"}}"#),
            true,
        ),
        (
            &format!(
                r#"{{"request_id":"{id}","destination":"sys-usb","issued_at":1,"timeout_ms":0}}"#
            ),
            true,
        ),
    ];
    for (payload, answerable) in cases {
        let (rid, _) = parse_command(Command::ListDisks, payload.as_bytes()).unwrap_err();
        assert_eq!(rid.is_some(), answerable, "{payload}");
    }
    let dom0 = format!(r#"{{"request_id":"{id}","destination":"dom0","issued_at":1}}"#);
    assert!(parse_command(Command::Discover, dom0.as_bytes()).is_ok());
}
