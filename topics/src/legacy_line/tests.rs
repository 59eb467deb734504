//! Table tests of the MVP's line format and its translation.

use super::*;

fn vm(s: &str) -> VmId {
    VmId::parse(s).unwrap()
}

fn parsed(line: &str) -> Result<LegacyLine, LegacyError> {
    parse(line.as_bytes())
}

fn json_of(bytes: &[u8]) -> Value {
    assert_eq!(bytes.last(), Some(&b'\n'), "a line ends with a newline");
    let v: Value = serde_json::from_slice(bytes).unwrap();
    assert!(
        !String::from_utf8_lossy(&bytes[..bytes.len() - 1]).contains('\n'),
        "one line"
    );
    v
}

#[test]
fn commands_in_both_spellings() {
    for name in [
        "liste_fichiers",
        "LISTE_FICHIERS",
        "TypeCommande.LISTE_FICHIERS",
    ] {
        let l = parsed(&format!(
            r#"{{"type":"commande","source":"whoever","destination":"sys-usb","payload":{{"commande":"{name}","arguments":{{"disk":"usb0"}}}}}}"#
        ))
        .unwrap();
        let LegacyLine::Command {
            command,
            destination,
            arguments,
        } = l
        else {
            panic!("not a command")
        };
        assert_eq!(command, Command::ListFiles);
        assert_eq!(destination, Destination::Vm(vm("sys-usb")));
        assert_eq!(arguments["disk"], "usb0");
    }
    for (d, expected) in [
        ("tous", Destination::All),
        ("Dom0", Destination::Dom0),
        ("dom0", Destination::Dom0),
    ] {
        let l = parsed(&format!(
            r#"{{"type":"commande","source":"x","destination":"{d}","payload":{{"commande":"liste_composants"}}}}"#
        ))
        .unwrap();
        assert!(matches!(l, LegacyLine::Command { destination, .. } if destination == expected));
    }
}

#[test]
fn bad_lines_say_why() {
    let long = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_LINE));
    let rows: [(&str, &str); 10] = [
        ("not json", "not JSON"),
        ("[1,2]", "not a JSON object"),
        (r#"{"payload":{}}"#, "missing field `type`"),
        (r#"{"type":"commande"}"#, "missing field `payload`"),
        (r#"{"type":"ordre","payload":{}}"#, "unknown type \"ordre\""),
        (
            r#"{"type":"commande","destination":"tous","payload":{"commande":"formate"}}"#,
            "unknown commande \"formate\"",
        ),
        (
            r#"{"type":"commande","payload":{"commande":"liste_disques"}}"#,
            "missing field `destination`",
        ),
        (
            r#"{"type":"commande","destination":"VM!","payload":{"commande":"liste_disques"}}"#,
            "destination \"VM!\"",
        ),
        (
            r#"{"type":"commande","destination":"tous","payload":{"commande":"liste_disques","arguments":[1]}}"#,
            "`arguments` must be an object",
        ),
        (&long, "over the limit"),
    ];
    for (input, why) in rows {
        let e = parsed(input).unwrap_err().to_string();
        assert!(e.contains(why), "{input:.60}: {e}");
        let l = json_of(&error_line("vm-gui", "app", &parsed(input).unwrap_err()));
        assert_eq!(l["type"], "erreur");
        assert_eq!(l["payload"]["code"], "invalid_argument");
    }
}

#[test]
fn requests_carry_sender_id_and_destination() {
    let mut args = Map::new();
    args.insert("disk".into(), json!("usb0"));
    args.insert("sender".into(), json!("forged"));
    let (topic, payload) = request(
        Command::ListFiles,
        &Destination::Vm(vm("sys-usb")),
        &args,
        &vm("vm-gui"),
        "r1",
        std::time::Duration::from_secs(10),
    );
    assert_eq!(topic, "system/disks/list_files/request");
    let p: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        p,
        json!({"disk":"usb0","sender":"vm-gui","request_id":"r1","destination":"sys-usb","timeout_ms":10000})
    );
    assert!(addressed_to(&payload, "sys-usb"));
    assert!(!addressed_to(&payload, "vm-other"));
    let (_, all) = request(
        Command::Discover,
        &Destination::All,
        &Map::new(),
        &vm("a"),
        "2",
        std::time::Duration::from_secs(2),
    );
    assert!(addressed_to(&all, "anyone"));
    let (_, d0) = request(
        Command::Discover,
        &Destination::Dom0,
        &Map::new(),
        &vm("a"),
        "3",
        std::time::Duration::from_secs(2),
    );
    assert!(addressed_to(&d0, "dom0") && !addressed_to(&d0, "sys-usb"));
}

#[test]
fn responses_in_the_mvp_kinds() {
    let rows: [(Command, &str, Value); 5] = [
        (
            Command::ListFiles,
            r#"{"status":"ok","request_id":"r1","responder":"sys-usb","disk":"usb0","files":[]}"#,
            json!({"commande":"liste_fichiers","data":{"status":"ok","disk":"usb0","files":[]}}),
        ),
        (
            Command::GetFileFootprint,
            r#"{"status":"ok","disk":"usb0","filepath":"a","footprint":"ab"}"#,
            json!({"commande":"file_footprint","data":{"status":"ok","disk":"usb0","filepath":"a","footprint":"ab"}}),
        ),
        (
            Command::CreateFile,
            r#"{"status":"error","error":{"code":"forbidden","message":"no"}}"#,
            json!({"commande":"file_creation","erreur":{"code":"forbidden","message":"no"}}),
        ),
        (
            Command::Benchmark,
            r#"{"status":"started","module":"disks"}"#,
            json!({"commande":"benchmark_files","data":{"status":"started","module":"disks","etat":"demarre"}}),
        ),
        (
            Command::Benchmark,
            r#"{"status":"error","error":{"code":"busy","message":"m"}}"#,
            json!({"commande":"benchmark_files","data":{"status":"error","error":{"code":"busy","message":"m"},"etat":"erreur"}}),
        ),
    ];
    for (command, payload, expected) in rows {
        let l = json_of(&response_line(
            command,
            payload.as_bytes(),
            "vm-gui",
            "sys-usb",
        ));
        assert_eq!(l["type"], "reponse");
        assert_eq!(l["source"], "sys-usb");
        assert_eq!(l["destination"], "vm-gui");
        assert_eq!(l["payload"], expected, "{payload}");
    }
    let l = json_of(&response_line(
        Command::ListDisks,
        b"garbage",
        "vm-gui",
        "sys-usb",
    ));
    assert_eq!(l["payload"]["erreur"]["code"], "internal");
}

#[test]
fn notifications_and_what_a_legacy_service_sends() {
    let l = json_of(&notification_line(
        Notification::NewFile,
        br#"{"disk":"usb0","filepath":"a","size_in_bytes":1}"#,
        "sys-usb",
    ));
    assert_eq!(
        l,
        json!({"type":"notification","source":"sys-usb","destination":"tous","payload":{"evenement":"fichier","data":{"disk":"usb0","filepath":"a","size_in_bytes":1}}})
    );
    assert_eq!(evenement(Notification::LinkState), "etat_domu");
    // An MVP service answering, and announcing.
    let r = parsed(
        r#"{"type":"reponse","source":"x","destination":"vm-gui","payload":{"commande":"liste_disques","data":{"disks":[]}}}"#,
    )
    .unwrap();
    let (topic, payload) = publication(&r).unwrap();
    assert_eq!(topic, "system/disks/list_disks/response/vm-gui");
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap(),
        json!({"disks":[],"status":"ok"})
    );
    let n = parsed(
        r#"{"type":"notification","source":"x","destination":"tous","payload":{"evenement":"TypeEvenement.FICHIER","data":{"disk":"d"}}}"#,
    )
    .unwrap();
    assert_eq!(
        publication(&n).unwrap().0,
        "system/disk/new_file/notification"
    );
    // And a request it is to serve.
    let c = command_line(
        Command::ListFiles,
        br#"{"sender":"vm-gui","request_id":"r","disk":"usb0"}"#,
        "sys-usb",
    )
    .unwrap();
    assert_eq!(
        json_of(&c),
        json!({"type":"commande","source":"vm-gui","destination":"sys-usb","payload":{"commande":"liste_fichiers","arguments":{"disk":"usb0"}}})
    );
}

/// docs/migration.md holds the generated mapping table, as it is now.
#[test]
fn migration_table_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/migration.md");
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    let begin = "<!-- mapping:begin (generated by topics::legacy_line::mapping_table) -->\n";
    let end = "<!-- mapping:end -->";
    let table = doc
        .split_once(begin)
        .and_then(|(_, rest)| rest.split_once(end))
        .map(|(t, _)| t);
    let expected = mapping_table();
    assert!(
        table == Some(expected.as_str()),
        "docs/migration.md's table is stale; between the markers it must read:\n{expected}"
    );
}

#[test]
fn lines_are_cut_and_over_long_ones_skipped() {
    let mut l = LineReader::default();
    l.push(b"{\"a\":1}\r\n\n  \n{\"b\"");
    assert_eq!(l.next_line(), Some(LineItem::Line(b"{\"a\":1}".to_vec())));
    assert_eq!(l.next_line(), None);
    assert_eq!(l.partial(), b"{\"b\"");
    l.push(b":2}\n");
    assert_eq!(l.next_line(), Some(LineItem::Line(b"{\"b\":2}".to_vec())));
    // An over-long line: one TooLong, its rest dropped, the next line read.
    l.push(&vec![b'x'; MAX_LINE + 1]);
    assert_eq!(l.next_line(), Some(LineItem::TooLong));
    l.push(&vec![b'x'; 1000]);
    assert_eq!(l.next_line(), None);
    l.push(b"tail\n{\"c\":3}\n");
    assert_eq!(l.next_line(), Some(LineItem::Line(b"{\"c\":3}".to_vec())));
    assert_eq!(l.next_line(), None);
    l.push(b"half");
    assert_eq!(l.take_partial(), b"half");
    assert!(l.partial().is_empty());
}

#[test]
fn lines_split_at_every_byte_or_in_pieces_read_the_same() {
    let input = b"{\"a\":1}\n{\"bb\":22}\r\n\n{\"ccc\":333}\n{\"d\"";
    let read = |pieces: &mut dyn Iterator<Item = &[u8]>| {
        let mut l = LineReader::with_limit(64);
        let mut lines = Vec::new();
        for p in pieces {
            l.push(p);
            while let Some(item) = l.next_line() {
                lines.push(item);
            }
        }
        (lines, l.partial().to_vec())
    };
    let whole = read(&mut std::iter::once(&input[..]));
    assert_eq!(whole.0.len(), 3);
    assert_eq!(whole.1, b"{\"d\"");
    for size in 1..input.len() {
        assert_eq!(read(&mut input.chunks(size)), whole, "pieces of {size}");
    }
    // After a line skipped for its length, the next one is found whatever the pieces.
    let mut long = vec![b'x'; 100];
    long.extend_from_slice(b"\n{\"e\":5}\n");
    for size in [1, 7, 64, 200] {
        let (lines, _) = read(&mut long.chunks(size));
        assert_eq!(
            lines,
            [LineItem::TooLong, LineItem::Line(b"{\"e\":5}".to_vec())],
            "pieces of {size}"
        );
    }
}
