//! Table tests of the one legacy translation: lines, messages and explicit instants in.
#![allow(clippy::unwrap_used, clippy::panic)]

use super::*;

/// The line a message gives the speaker (no upload going in these tests).
trait MessageLine {
    fn on_message_line(&mut self, topic: &str, payload: &[u8], now: Instant) -> Option<Vec<u8>>;
}

impl MessageLine for Translator {
    fn on_message_line(&mut self, topic: &str, payload: &[u8], now: Instant) -> Option<Vec<u8>> {
        let mut outs = self.on_message(topic, payload, now, &mut ids());
        assert!(outs.len() <= 1, "{outs:?}");
        outs.pop().map(|o| match o {
            Out::Line(l) => l,
            other => panic!("a line, not {other:?}"),
        })
    }
}

fn vm(s: &str) -> VmId {
    VmId::parse(s).unwrap()
}

/// Request ids 1, 2, 3, ... as 32 hex digits.
fn ids() -> impl FnMut() -> RequestId {
    let mut n = 0u8;
    move || {
        n += 1;
        RequestId::random([n; 16])
    }
}

fn json_line(l: &[u8]) -> Value {
    assert_eq!(l.last(), Some(&b'\n'));
    serde_json::from_slice(l).unwrap()
}

fn line_of(out: &Out) -> Value {
    match out {
        Out::Line(l) => json_line(l),
        Out::Request { topic, .. } | Out::Publish { topic, .. } => {
            panic!("a publication on {topic}, not a line")
        }
    }
}

/// Dom0's legacy mode for `me` (lines addressed to the VM, errors from Dom0).
fn dom0_mode(me: &str) -> Translator {
    Translator::new(vm(me), "Dom0", Some(me.to_owned()), 4 * 1024 * 1024)
}

/// The agent's legacy endpoint in `me` (lines addressed to the claimed source).
fn agent_endpoint(me: &str) -> Translator {
    Translator::new(vm(me), me, None, 4 * 1024 * 1024)
}

const LIST_FILES: &[u8] = br#"{"type":"commande","source":"app","destination":"sys-usb","payload":{"commande":"liste_fichiers","arguments":{"disk":"usb0","sender":"sys-usb","request_id":"mine"}}}
"#;

fn request_of(out: &[Out]) -> (String, Value, RequestId) {
    let [
        Out::Request {
            topic,
            payload,
            request_id,
        },
    ] = out
    else {
        panic!("{out:?}")
    };
    (
        topic.clone(),
        serde_json::from_slice(payload).unwrap(),
        request_id.clone(),
    )
}

#[test]
fn a_command_becomes_a_request_as_the_vm_with_a_random_id() {
    let mut t = dom0_mode("vm-old");
    let now = Instant::now();
    let (topic, p, id) = request_of(&t.on_bytes(LIST_FILES, now, &mut ids()));
    assert_eq!(topic, "system/disks/list_files/request");
    assert_eq!(p["sender"], "vm-old", "the channel's identity, not a claim");
    assert_eq!(p["destination"], "sys-usb");
    assert_eq!(p["disk"], "usb0");
    assert_eq!(p["request_id"], id.as_str(), "its own id, not the line's");
    assert_eq!(id.as_str().len(), 32);
    // The answer comes back as an MVP line from its checked responder; no timeout follows.
    let resp = format!(
        r#"{{"status":"ok","request_id":"{id}","responder":"sys-usb","disk":"usb0","files":[]}}"#
    );
    let line = t
        .on_message_line(
            "system/disks/list_files/response/vm-old",
            resp.as_bytes(),
            now,
        )
        .unwrap();
    let v = json_line(&line);
    assert_eq!(v["type"], "reponse");
    assert_eq!(v["source"], "sys-usb");
    assert_eq!(v["destination"], "vm-old");
    assert_eq!(v["payload"]["commande"], "liste_fichiers");
    assert!(v["payload"]["data"].get("request_id").is_none());
    assert_eq!(t.asked(), 0, "an answered command waits no more");
    assert!(t.on_tick(now + crate::answers::ANSWER_TIMEOUT).is_empty());
}

/// What a forger sends back, and whether the speaker sees it: only the answer bound to the
/// question and its author becomes a line.
#[test]
fn forged_answers_never_become_lines() {
    for mut t in [dom0_mode("vm-gui"), agent_endpoint("vm-gui")] {
        let now = Instant::now();
        let (_, _, id) = request_of(&t.on_bytes(
            br#"{"type":"commande","destination":"sys-usb","payload":{"commande":"get_file_footprint","arguments":{"disk":"usb0","filepath":"a"}}}
"#,
            now,
            &mut ids(),
        ));
        let forged = [
            // Another command's response topic, the right id, the right responder claimed.
            (
                "system/components/discover/response/vm-gui",
                format!(r#"{{"status":"ok","request_id":"{id}","responder":"sys-usb","components":[]}}"#),
            ),
            // The right topic and id, another responder (Dom0 stamps the truth).
            (
                "system/disks/get_file_footprint/response/vm-gui",
                format!(r#"{{"status":"ok","request_id":"{id}","responder":"vm-evil","footprint":"00"}}"#),
            ),
            // No responder: a Dom0 client, not the destination.
            (
                "system/disks/get_file_footprint/response/vm-gui",
                format!(r#"{{"status":"ok","request_id":"{id}","footprint":"00"}}"#),
            ),
            // A guessed id.
            (
                "system/disks/get_file_footprint/response/vm-gui",
                r#"{"status":"ok","request_id":"vm-gui-1-1","responder":"sys-usb","footprint":"00"}"#.to_owned(),
            ),
            // Addressed to another requester.
            (
                "system/disks/get_file_footprint/response/vm-other",
                format!(r#"{{"status":"ok","request_id":"{id}","responder":"sys-usb","footprint":"00"}}"#),
            ),
        ];
        for (topic, payload) in &forged {
            assert_eq!(
                t.on_message_line(topic, payload.as_bytes(), now),
                None,
                "{payload}"
            );
        }
        let real = format!(
            r#"{{"status":"ok","request_id":"{id}","responder":"sys-usb","footprint":"ab"}}"#
        );
        let topic = "system/disks/get_file_footprint/response/vm-gui";
        let v = json_line(&t.on_message_line(topic, real.as_bytes(), now).unwrap());
        assert_eq!(v["source"], "sys-usb");
        assert_eq!(v["payload"]["data"]["footprint"], "ab");
        assert_eq!(t.on_message_line(topic, real.as_bytes(), now), None, "once");
    }
}

/// One naming of a response's source in both paths (the drift of the two translations: Dom0
/// named a response without responder "tous", the agent named it after the destination).
#[test]
fn a_response_is_named_after_its_checked_responder_in_both_paths() {
    for mut t in [dom0_mode("vm-gui"), agent_endpoint("vm-gui")] {
        let now = Instant::now();
        let (_, _, id) = request_of(&t.on_bytes(
            br#"{"type":"commande","destination":"tous","payload":{"commande":"liste_composants"}}
"#,
            now,
            &mut ids(),
        ));
        let topic = "system/components/discover/response/vm-gui";
        let mut sources = Vec::new();
        for responder in [None, Some("sys-usb")] {
            let mut p = json!({"status":"ok","request_id":id.as_str(),"components":[]});
            if let Some(r) = responder {
                p["responder"] = r.into();
            }
            let line = t
                .on_message_line(topic, p.to_string().as_bytes(), now)
                .unwrap();
            sources.push(json_line(&line)["source"].as_str().unwrap().to_owned());
        }
        assert_eq!(sources, ["dom0", "sys-usb"]);
    }
}

/// `started` then the last answer, in both paths (only the agent handled `started` before).
#[test]
fn a_benchmark_answers_started_then_finished_in_both_paths() {
    for mut t in [dom0_mode("vm-gui"), agent_endpoint("vm-gui")] {
        let now = Instant::now();
        let (_, _, id) = request_of(&t.on_bytes(
            br#"{"type":"commande","destination":"tous","payload":{"commande":"start_benchmark","arguments":{"module":"messaging"}}}
"#,
            now,
            &mut ids(),
        ));
        let topic = "system/misc/benchmark/response/vm-gui";
        let mut etats = Vec::new();
        for (who, status) in [
            ("dom0", "started"),
            ("sys-usb", "started"),
            ("dom0", "finished"),
            ("dom0", "finished"),
        ] {
            let p = json!({"status":status,"request_id":id.as_str(),"responder":who,"module":"messaging"});
            if let Some(l) = t.on_message_line(topic, p.to_string().as_bytes(), now) {
                let v = json_line(&l);
                etats.push(format!("{} {}", v["source"], v["payload"]["data"]["etat"]));
            }
        }
        assert_eq!(
            etats,
            [
                r#""dom0" "demarre""#,
                r#""sys-usb" "demarre""#,
                r#""dom0" "termine""#
            ]
        );
        // sys-usb never finishes: at the deadline its timeout is said, not a "no answer".
        let lines = t.on_tick(now + crate::answers::ANSWER_TIMEOUT);
        assert_eq!(lines.len(), 1);
        let v = json_line(&lines[0]);
        assert_eq!(v["source"], "sys-usb");
        assert_eq!(v["payload"]["erreur"]["code"], "timeout");
    }
}

#[test]
fn unanswered_commands_time_out_after_the_one_window() {
    let mut t = dom0_mode("vm-old");
    let now = Instant::now();
    t.on_bytes(
        b"{\"type\":\"commande\",\"destination\":\"tous\",\"payload\":{\"commande\":\"liste_composants\"}}\n",
        now,
        &mut ids(),
    );
    let window = crate::answers::BROADCAST_WINDOW;
    assert_eq!(t.next_deadline(), Some(now + window));
    assert!(
        t.on_tick(now + window - Duration::from_millis(1))
            .is_empty()
    );
    let lines = t.on_tick(now + window);
    assert_eq!(json_line(&lines[0])["payload"]["erreur"]["code"], "timeout");
    assert_eq!(t.next_deadline(), None);
}

#[test]
fn bad_lines_are_answered_and_the_next_one_works() {
    let mut t = dom0_mode("vm-old");
    let now = Instant::now();
    let out = t.on_bytes(
        b"garbage\n{\"type\":\"x\",\"payload\":{}}\r\n\n",
        now,
        &mut ids(),
    );
    assert_eq!(out.len(), 2);
    for o in &out {
        assert_eq!(line_of(o)["type"], "erreur");
        assert_eq!(line_of(o)["source"], "Dom0");
    }
    // A line split across reads, split at every byte.
    let line = b"{\"type\":\"commande\",\"destination\":\"Dom0\",\"payload\":{\"commande\":\"LISTE_COMPOSANTS\"}}\n";
    let mut got = Vec::new();
    for b in line {
        got.extend(t.on_bytes(std::slice::from_ref(b), now, &mut ids()));
    }
    assert!(
        matches!(&got[..], [Out::Request { topic, .. }] if topic == "system/components/discover/request")
    );
}

#[test]
fn coalesced_lines_are_each_served() {
    let mut t = agent_endpoint("vm-gui");
    let now = Instant::now();
    let mut bytes = LIST_FILES.to_vec();
    bytes.extend_from_slice(b"{\"type\":\"notification\",\"payload\":{\"evenement\":\"erreur\",\"data\":{\"module\":\"m\"}}}\n");
    bytes.extend_from_slice(LIST_FILES);
    let out = t.on_bytes(&bytes, now, &mut ids());
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(
        matches!(&out[1], Out::Publish { topic, .. } if topic == "system/events/error/notification")
    );
    assert_eq!(t.asked(), 2);
}

/// One limit end to end: a line over the way's packet limit is refused before anything is sent
/// (its rest skipped, the next line read); one under it whose message would not fit is answered
/// `too_large`.
#[test]
fn one_line_limit_holds_end_to_end() {
    let limit = 64 * 1024;
    let mut t = Translator::new(vm("vm-old"), "Dom0", Some("vm-old".into()), limit);
    let now = Instant::now();
    let out = t.on_bytes(&vec![b'{'; limit + 10], now, &mut ids());
    assert_eq!(out.len(), 1);
    assert!(
        line_of(&out[0])["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("over the limit")
    );
    assert!(t.on_bytes(b"more of it\n", now, &mut ids()).is_empty());
    let data = "A".repeat(limit - 150);
    let line = format!(
        r#"{{"type":"commande","destination":"sys-usb","payload":{{"commande":"create_file","arguments":{{"disk":"usb0","filepath":"f","data":"{data}"}}}}}}"#
    );
    assert!(line.len() < limit);
    let out = t.on_bytes(format!("{line}\n").as_bytes(), now, &mut ids());
    let v = line_of(&out[0]);
    assert_eq!(v["payload"]["erreur"]["code"], "too_large");
    assert_eq!(t.asked(), 0);
    let out = t.on_bytes(LIST_FILES, now, &mut ids());
    assert!(matches!(&out[..], [Out::Request { .. }]));
}

/// The line timer measures progress: a line trickling in is never cut; one that stops is dropped
/// after LINE_IDLE without a byte, and what follows is a new line (even after an over-long one).
#[test]
fn an_unfinished_line_is_dropped_only_without_progress() {
    let mut t = dom0_mode("vm-old");
    let t0 = Instant::now();
    let mut now = t0;
    for chunk in LIST_FILES[..LIST_FILES.len() - 1].chunks(8) {
        now += Duration::from_millis(900);
        assert!(t.on_tick(now).is_empty(), "cut while it progresses");
        assert!(t.on_bytes(chunk, now, &mut ids()).is_empty());
    }
    assert!(now > t0 + LINE_IDLE * 3);
    assert!(matches!(
        &t.on_bytes(b"\n", now, &mut ids())[..],
        [Out::Request { .. }]
    ));
    // A line that stops half-way.
    t.on_bytes(b"{\"type\":\"comm", now, &mut ids());
    assert_eq!(
        t.next_deadline().unwrap().min(now + LINE_IDLE),
        now + LINE_IDLE
    );
    let lines = t.on_tick(now + LINE_IDLE);
    assert!(
        json_line(&lines[0])["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("unfinished line")
    );
    assert!(t.partial().is_empty());
    // An over-long line that stops: the next valid line is read, not swallowed.
    let mut t = Translator::new(vm("vm-old"), "Dom0", Some("vm-old".into()), 1024);
    assert_eq!(t.on_bytes(&[b'{'; 2000], now, &mut ids()).len(), 1);
    t.on_tick(now + LINE_IDLE);
    let out = t.on_bytes(LIST_FILES, now + LINE_IDLE * 2, &mut ids());
    assert!(matches!(&out[..], [Out::Request { .. }]), "{out:?}");
}

#[test]
fn requests_served_become_lines_without_their_id_and_answers_get_it_back() {
    let mut t = dom0_mode("sys-old");
    let now = Instant::now();
    let note = t
        .on_message_line(
            "system/disk/new_file/notification",
            br#"{"disk":"usb0","filepath":"a","size_in_bytes":1,"origin":"sys-usb"}"#,
            now,
        )
        .unwrap();
    let v = json_line(&note);
    assert_eq!(v["payload"]["evenement"], "fichier");
    assert_eq!(v["source"], "sys-usb", "the origin Dom0 stamped");
    let req = t
        .on_message_line(
            "system/disks/list_disks/request",
            br#"{"sender":"vm-gui","request_id":"r1"}"#,
            now,
        )
        .unwrap();
    assert_eq!(
        json_line(&req),
        json!({"type":"commande","source":"vm-gui","destination":"sys-old","payload":{"commande":"liste_disques","arguments":{}}})
    );
    assert!(
        t.on_message_line(
            "system/disks/list_disks/request",
            br#"{"sender":"vm-gui","destination":"sys-usb"}"#,
            now
        )
        .is_none()
    );
    // Its answer is published as itself, with the id of the request it answers.
    let out = t.on_bytes(
        b"{\"type\":\"reponse\",\"source\":\"x\",\"destination\":\"vm-gui\",\"payload\":{\"commande\":\"liste_disques\",\"data\":{\"disks\":[]}}}\n",
        now,
        &mut ids(),
    );
    let [Out::Publish { topic, payload }] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(topic, "system/disks/list_disks/response/vm-gui");
    let p: Value = serde_json::from_slice(payload).unwrap();
    assert_eq!(p["responder"], "sys-old");
    assert_eq!(p["request_id"], "r1");
}

#[test]
fn notification_sources_come_from_the_stamped_origin() {
    let rows: [(Notification, &str, &str); 5] = [
        (Notification::Error, r#"{"module":"sys-usb/disks"}"#, "Dom0"),
        (
            Notification::Error,
            r#"{"module":"sys-usb/disks","origin":"vm-evil"}"#,
            "vm-evil",
        ),
        (Notification::NewFile, r#"{"origin":"sys-usb"}"#, "sys-usb"),
        (Notification::LinkState, r#"{"vm":"vm-gui"}"#, "vm-gui"),
        (Notification::Error, r#"{"origin":"../x"}"#, "Dom0"),
    ];
    for (n, payload, want) in rows {
        assert_eq!(
            notification_source(n, payload.as_bytes()),
            want,
            "{payload}"
        );
    }
}

#[test]
fn refusals_are_told_to_the_speaker() {
    let mut t = dom0_mode("vm-old");
    let now = Instant::now();
    let (topic, p, _) = request_of(&t.on_bytes(
        b"{\"type\":\"commande\",\"destination\":\"sys-usb\",\"payload\":{\"commande\":\"create_file\",\"arguments\":{}}}\n",
        now,
        &mut ids(),
    ));
    let line = t.refused(&topic, p.to_string().as_bytes(), "no rule allows it");
    let v = json_line(&line);
    assert_eq!(v["payload"]["commande"], "file_creation");
    assert_eq!(v["payload"]["erreur"]["code"], "forbidden");
    assert_eq!(t.asked(), 0, "a refused command waits no more");
}

#[test]
fn commands_in_flight_are_bounded() {
    let mut t = dom0_mode("vm-old");
    let now = Instant::now();
    let mut n = 0u32;
    let mut next = move || {
        n += 1;
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&n.to_be_bytes());
        RequestId::random(b)
    };
    for _ in 0..MAX_ASKED {
        assert!(matches!(
            &t.on_bytes(LIST_FILES, now, &mut next)[..],
            [Out::Request { .. }]
        ));
    }
    let out = t.on_bytes(LIST_FILES, now, &mut next);
    assert_eq!(line_of(&out[0])["payload"]["erreur"]["code"], "busy");
}

/// An MVP `create_file` line for `data`.
fn create_file_line(data: &[u8]) -> Vec<u8> {
    let mut l = json!({"type": "commande", "source": "app", "destination": "sys-usb",
        "payload": {"commande": "create_file", "arguments": {
            "disk": "usb0", "filepath": "big.bin", "data": crate::binary::encode(data)}}})
    .to_string()
    .into_bytes();
    l.push(b'\n');
    l
}

/// The requests among `outs`: (request id, payload).
fn requests(outs: &[Out]) -> Vec<(RequestId, Value)> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Request {
                payload,
                request_id,
                ..
            } => Some((request_id.clone(), serde_json::from_slice(payload).unwrap())),
            _ => None,
        })
        .collect()
}

fn chunk_answer(id: &RequestId, received: u64) -> Vec<u8> {
    format!(r#"{{"status":"ok","request_id":"{id}","responder":"sys-usb","received":{received}}}"#)
        .into_bytes()
}

const CREATE_RESPONSE: &str = "system/disks/create_file/response/vm-gui";

#[test]
fn a_create_file_larger_than_a_chunk_is_uploaded_and_answered_once() {
    let mut t = agent_endpoint("vm-gui").with_uploads(1 << 20, 4);
    let now = Instant::now();
    let mut new_id = ids();
    let data: Vec<u8> = (0..14u8).collect();
    let first = requests(&t.on_bytes(&create_file_line(&data), now, &mut new_id));
    // 14 bytes in chunks of 4: 4 chunks, all within the window of 4.
    assert_eq!(first.len(), 4);
    let upload_id = first[0].1["upload_id"].as_str().unwrap().to_owned();
    assert!(crate::upload::valid_id(&upload_id));
    for (i, (_, p)) in first.iter().enumerate() {
        assert_eq!(p["offset"], i as u64 * 4);
        assert_eq!(p["upload_id"], upload_id.as_str());
        assert_eq!(p["sender"], "vm-gui");
        assert_eq!(p["destination"], "sys-usb");
        assert_eq!(p["disk"], "usb0");
    }
    assert_eq!(first[3].1["final"], true);
    assert_eq!(first[3].1["size"], 14);
    assert_eq!(
        first[3].1["sha256"],
        crate::upload::sha256_hex(&data).as_str()
    );
    // Three answers: no line yet; the last: one `reponse` line from sys-usb.
    for (i, (id, _)) in first.iter().take(3).enumerate() {
        let outs = t.on_message(
            CREATE_RESPONSE,
            &chunk_answer(id, (i as u64 + 1) * 4),
            now,
            &mut new_id,
        );
        assert!(outs.is_empty(), "{outs:?}");
    }
    let outs = t.on_message(
        CREATE_RESPONSE,
        &chunk_answer(&first[3].0, 14),
        now,
        &mut new_id,
    );
    let [Out::Line(line)] = outs.as_slice() else {
        panic!("{outs:?}")
    };
    let v = json_line(line);
    assert_eq!(v["type"], "reponse");
    assert_eq!(v["source"], "sys-usb");
    assert!(v["payload"].get("erreur").is_none(), "{v}");
    assert_eq!(v["payload"]["data"]["received"], 14);
    assert!(
        t.on_tick(now + Duration::from_secs(3600)).is_empty(),
        "nothing left waiting"
    );
}

#[test]
fn an_upload_sends_as_the_window_allows_and_ends_at_the_first_error_or_timeout() {
    let mut t = agent_endpoint("vm-gui").with_uploads(1 << 20, 2);
    let now = Instant::now();
    let mut new_id = ids();
    let first = requests(&t.on_bytes(&create_file_line(&[9; 20]), now, &mut new_id));
    assert_eq!(first.len(), 4, "a window of 4 chunks of 2 bytes");
    let more = requests(&t.on_message(
        CREATE_RESPONSE,
        &chunk_answer(&first[0].0, 2),
        now,
        &mut new_id,
    ));
    assert_eq!(more.len(), 1, "one answer, one more chunk");
    assert_eq!(more[0].1["offset"], 8);
    let refused = format!(
        r#"{{"status":"error","request_id":"{}","responder":"sys-usb","error":{{"code":"too_large","message":"x"}}}}"#,
        first[1].0
    );
    let outs = t.on_message(CREATE_RESPONSE, refused.as_bytes(), now, &mut new_id);
    let [Out::Line(line)] = outs.as_slice() else {
        panic!("{outs:?}")
    };
    assert_eq!(json_line(line)["payload"]["erreur"]["code"], "too_large");
    assert!(
        t.on_message(
            CREATE_RESPONSE,
            &chunk_answer(&first[2].0, 6),
            now,
            &mut new_id
        )
        .is_empty(),
        "the upload is over"
    );
    assert!(
        t.on_tick(now + Duration::from_secs(3600)).is_empty(),
        "no timeout after the error"
    );
    // Another upload nobody answers: one timeout line, not one per chunk.
    let again = requests(&t.on_bytes(&create_file_line(&[9; 20]), now, &mut new_id));
    assert_eq!(again.len(), 4);
    let lines = t.on_tick(now + Duration::from_secs(3600));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(json_line(&lines[0])["payload"]["erreur"]["code"], "timeout");
}

#[test]
fn a_small_create_file_stays_one_message() {
    let mut t = agent_endpoint("vm-gui").with_uploads(1 << 20, 64);
    let outs = t.on_bytes(&create_file_line(b"hello"), Instant::now(), &mut ids());
    let (_, p, _) = request_of(&outs);
    assert_eq!(p["data"], crate::binary::encode(b"hello").as_str());
    assert!(p.get("upload_id").is_none());
}
