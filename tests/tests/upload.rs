//! Large files in chunks (`topics::upload`): a file larger than a chunk travels as an upload, lands
//! atomically with its footprint, and nothing of it is visible before; every refusal has its code.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use system_tests::scene::{Scene, SceneOptions};
use system_tests::{BrokerKind, DEADLINE, bin, sha256sum, wait_for};

fn scene(name: &str, kind: BrokerKind) -> Scene {
    Scene::start(name, kind, SceneOptions::default())
}

/// `len` bytes that are not all alike, written to `path`.
fn random_file(path: &Path, len: usize) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, data).unwrap();
}

/// The names under a disk's directory (hidden ones included).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// vm-gui's `call create_file` of a 16 MiB file: uploaded in chunks, answered once, the file
/// whole on sys-usb's disk with the same footprint, announced once.
fn a_large_file_is_uploaded_through_call(kind: BrokerKind) {
    let s = scene("upload-call", kind);
    let mut news = s
        .dom0
        .subscribe(&s.dir, &["system/disk/new_file/notification"]);
    let file = s.dir.join("big.bin");
    random_file(&file, 16 << 20);
    let data = format!("data=@{}", file.display());
    let (ok, answers) = s.gui.call(
        "create_file",
        &[
            "disk=usb1",
            "filepath=in/big.bin",
            &data,
            "--timeout-ms",
            "30000",
        ],
    );
    assert!(ok, "{answers:?}");
    assert_eq!(answers.len(), 1, "one answer: {answers:?}");
    assert_eq!(answers[0]["status"], "ok");
    assert_eq!(answers[0]["received"], 16 << 20);
    let landed = s.disks.join("usb1/in/big.bin");
    assert_eq!(sha256sum(&landed), sha256sum(&file));
    assert_eq!(
        names(&s.disks.join("usb1/in")),
        ["big.bin"],
        "nothing else left"
    );
    wait_for("the new_file notification", DEADLINE, || {
        news.output().contains("big.bin")
    });
    assert_eq!(
        news.output().matches("in/big.bin").count(),
        1,
        "announced once"
    );
    news.stop();
}

both_brokers!(a_large_file_is_uploaded_through_call: a_large_file_is_uploaded_through_call_embedded, a_large_file_is_uploaded_through_call_mosquitto);

/// An MVP application on vm-gui's legacy endpoint sends a 16 MiB file in one `create_file` line
/// (22 MB of Base64, far over a packet): the agent uploads it in chunks and answers the line once.
fn a_large_file_is_uploaded_through_the_legacy_endpoint(kind: BrokerKind) {
    let s = scene("upload-legacy", kind);
    let file = s.dir.join("big.bin");
    random_file(&file, 16 << 20);
    let data = topics::binary::encode(&std::fs::read(&file).unwrap());
    let mut app = system_tests::legacy::LegacyClient::connect(&s.gui.legacy);
    let answer = app.command(
        "create_file",
        "sys-usb",
        json!({"disk": "usb1", "filepath": "from-mvp.bin", "data": data}),
    );
    assert_eq!(answer["source"], "sys-usb", "{answer}");
    assert!(answer["payload"].get("erreur").is_none(), "{answer}");
    assert_eq!(answer["payload"]["data"]["received"], 16 << 20, "{answer}");
    assert!(
        app.next(std::time::Duration::from_millis(300))
            .is_none_or(|v| v["type"] != "reponse"),
        "one answer"
    );
    assert_eq!(
        sha256sum(&s.disks.join("usb1/from-mvp.bin")),
        sha256sum(&file)
    );
    assert_eq!(names(&s.disks.join("usb1")), ["from-mvp.bin"]);
}

both_brokers!(a_large_file_is_uploaded_through_the_legacy_endpoint: a_large_file_is_uploaded_through_the_legacy_endpoint_embedded, a_large_file_is_uploaded_through_the_legacy_endpoint_mosquitto);

/// sys-usb's agent killed in the middle of an upload: no file, partial or hidden, on its disk; the
/// caller hears a failure, not success.
fn an_agent_killed_mid_upload_leaves_nothing(kind: BrokerKind) {
    let mut s = scene("upload-kill", kind);
    let file = s.dir.join("huge.bin");
    random_file(&file, 64 << 20);
    let data = format!("data=@{}", file.display());
    let caller = Command::new(bin("domu-agent"))
        .args(["call", "--json", "--timeout-ms", "3000", "--socket"])
        .arg(&s.gui.socket)
        .args(["create_file", "disk=usb1", "filepath=huge.bin", &data])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Chunks are being taken: the agent has started the upload.
    s.usb.proc.wait_log("upload started");
    s.usb.proc.signal(nix::sys::signal::Signal::SIGKILL);
    s.usb.proc.wait_exit(DEADLINE);
    let out = caller.wait_with_output().unwrap();
    assert!(!out.status.success(), "the caller must not hear success");
    assert!(
        names(&s.disks.join("usb1")).is_empty(),
        "nothing visible: {:?}",
        names(&s.disks.join("usb1"))
    );
}

both_brokers!(an_agent_killed_mid_upload_leaves_nothing: an_agent_killed_mid_upload_leaves_nothing_embedded, an_agent_killed_mid_upload_leaves_nothing_mosquitto);

/// Chunks sent by hand (as a Dom0 client naming its sender): each wrong one refused with its code,
/// and nothing visible.
fn wrong_chunks_are_refused(kind: BrokerKind) {
    let s = scene("upload-wrong", kind);
    let mut sub = s.dom0.subscribe(
        &s.dir,
        &[
            "system/disks/create_file/response/vm-gui",
            "system/disks/create_file/response/vm-evil",
        ],
    );
    let chunk = |sender: &str, rid: &str, id: &str, offset: u64, data: &[u8], extra: Value| {
        let mut v = json!({
            "sender": sender, "request_id": rid, "disk": "usb1", "filepath": "up.bin",
            "upload_id": id, "offset": offset, "data": topics::binary::encode(data),
        });
        if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
            m.extend(e);
        }
        s.dom0
            .publish("system/disks/create_file/request", &v.to_string());
    };
    let answer = |sub: &mut system_tests::Proc, rid: &str| -> Value {
        wait_for(rid, DEADLINE, || {
            sub.output().contains(&format!("\"{rid}\""))
        });
        sub.output()
            .lines()
            .filter(|l| l.contains(&format!("\"{rid}\"")))
            .find_map(|l| {
                l.split_once(' ')
                    .and_then(|(_, p)| serde_json::from_str(p).ok())
            })
            .unwrap()
    };
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or("ok").to_owned();
    let id = "feedfacefeedfacefeedfacefeedface";
    chunk("vm-gui", "c1", id, 0, &[1; 10], json!({}));
    assert_eq!(answer(&mut sub, "c1")["received"], 10);
    chunk("vm-gui", "c2", id, 0, &[1; 10], json!({}));
    assert_eq!(
        code(&answer(&mut sub, "c2")),
        "invalid_argument",
        "a repeated chunk"
    );
    chunk("vm-gui", "c3", id, 20, &[1; 10], json!({}));
    assert_eq!(
        code(&answer(&mut sub, "c3")),
        "invalid_argument",
        "out of order"
    );
    chunk("vm-evil", "c4", id, 10, &[6; 10], json!({}));
    assert_eq!(
        code(&answer(&mut sub, "c4")),
        "forbidden",
        "another sender's upload"
    );
    chunk(
        "vm-gui",
        "c5",
        id,
        10,
        &[1; 10],
        json!({"final": true, "size": 20, "sha256": "00"}),
    );
    assert_eq!(
        code(&answer(&mut sub, "c5")),
        "invalid_argument",
        "a wrong footprint"
    );
    chunk("vm-gui", "c6", id, 20, &[1; 10], json!({}));
    assert_eq!(
        code(&answer(&mut sub, "c6")),
        "not_found",
        "the refused upload is gone"
    );
    let big = "0123456789abcdef0123456789abcdef";
    chunk(
        "vm-gui",
        "c7",
        big,
        0,
        &[1; 10],
        json!({"size": 1u64 << 40}),
    );
    assert_eq!(answer(&mut sub, "c7")["received"], 10);
    assert!(names(&s.disks.join("usb1")).is_empty(), "nothing visible");
    sub.stop();
    // The right one lands.
    let mut sub = s
        .dom0
        .subscribe(&s.dir, &["system/disks/create_file/response/vm-gui"]);
    let good = "00112233445566778899aabbccddeeff";
    let sha = topics::upload::sha256_hex(&[7; 20]);
    chunk("vm-gui", "g1", good, 0, &[7; 10], json!({}));
    chunk(
        "vm-gui",
        "g2",
        good,
        10,
        &[7; 10],
        json!({"final": true, "size": 20, "sha256": sha}),
    );
    assert_eq!(answer(&mut sub, "g2")["status"], "ok");
    assert_eq!(std::fs::read(s.disks.join("usb1/up.bin")).unwrap(), [7; 20]);
    sub.stop();
}

both_brokers!(wrong_chunks_are_refused: wrong_chunks_are_refused_embedded, wrong_chunks_are_refused_mosquitto);

/// An upload over the disk's limit (sys-usb's `max_upload_bytes`) is refused `too_large` and
/// leaves nothing.
fn an_upload_over_the_limit_is_refused(kind: BrokerKind) {
    let s = Scene::start(
        "upload-limit",
        kind,
        SceneOptions {
            usb_config: "[limits]\nmax_upload_bytes = 200000\n",
            ..Default::default()
        },
    );
    let file = s.dir.join("over.bin");
    random_file(&file, 300_000);
    let data = format!("data=@{}", file.display());
    let (ok, answers) = s
        .gui
        .call("create_file", &["disk=usb1", "filepath=over.bin", &data]);
    assert!(!ok);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0]["error"]["code"], "too_large", "{answers:?}");
    assert!(names(&s.disks.join("usb1")).is_empty());
    // Within the limit, the same way lands.
    random_file(&file, 150_000);
    let (ok, answers) = s
        .gui
        .call("create_file", &["disk=usb1", "filepath=over.bin", &data]);
    assert!(ok, "{answers:?}");
    assert_eq!(sha256sum(&s.disks.join("usb1/over.bin")), sha256sum(&file));
}

both_brokers!(an_upload_over_the_limit_is_refused: an_upload_over_the_limit_is_refused_embedded, an_upload_over_the_limit_is_refused_mosquitto);

/// Small requests while vm-gui uploads: sys-usb's link writes the upload's chunks after the small
/// requests waiting, so sys-usb acknowledges them in another order than the broker sent them; the
/// link gives the broker its acknowledgements in the broker's order (rumqttd ends a connection on
/// one out of order). No session ends, nothing is logged at ERROR, every request is answered.
fn small_requests_during_an_upload_keep_every_session(kind: BrokerKind) {
    let s = scene("upload-busy", kind);
    let file = s.dir.join("busy.bin");
    random_file(&file, 8 << 20);
    let socket = s.gui.socket.clone();
    let data = format!("data=@{}", file.display());
    let upload = std::thread::spawn(move || {
        Command::new(bin("domu-agent"))
            .args(["call", "--json", "--timeout-ms", "60000", "--socket"])
            .arg(&socket)
            .args(["create_file", "disk=usb1", "filepath=busy.bin", &data])
            .output()
            .unwrap()
    });
    let mut asked = 0;
    while !upload.is_finished() {
        let (ok, answers) = s.gui.call("list_disks", &[]);
        assert!(ok, "list_disks during the upload: {answers:?}");
        asked += 1;
    }
    let out = upload.join().unwrap();
    assert!(
        out.status.success(),
        "upload: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(asked > 0, "no small request during the upload");
    assert_eq!(sha256sum(&s.disks.join("usb1/busy.bin")), sha256sum(&file));
    let log = s.dom0.log();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("session ended"))
        .collect();
    assert!(bad.is_empty(), "after {asked} small requests: {bad:#?}");
}

both_brokers!(small_requests_during_an_upload_keep_every_session: small_requests_during_an_upload_keep_every_session_embedded, small_requests_during_an_upload_keep_every_session_mosquitto);
