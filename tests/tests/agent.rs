//! The guest agent through the real chain: dom0-broker + two agents on simulated channels.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use system_tests::channel::Channel;
use system_tests::scene::{Scene, SceneOptions};
use system_tests::{Agent, BrokerKind, DEADLINE, Proc, TestDir, sha256sum, wait_for};

/// The whole system: Dom0, sys-usb (disks usb0 and usb1, a repository) and vm-gui.
type System = Scene;

fn system(name: &str, kind: BrokerKind) -> System {
    Scene::start(name, kind, SceneOptions::default())
}

/// Asks `root` from Dom0 with mosquitto_pub; returns the responses carrying `id` on `.../response/dom0`.
fn ask_from_dom0(
    s: &System,
    sub: &Proc,
    root: &str,
    mut args: Value,
    id: &str,
    answers: usize,
) -> Vec<Value> {
    args["sender"] = json!("dom0");
    args["request_id"] = json!(id);
    s.dom0
        .publish(&format!("{root}/request"), &args.to_string());
    let needle = format!("\"request_id\":\"{id}\"");
    sub.wait_log_count(&needle, answers);
    let prefix = format!("{root}/response/dom0 ");
    sub.output()
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|p| serde_json::from_str(p).unwrap())
        .collect()
}

fn ok(v: &Value) -> &Value {
    assert_eq!(v["status"], "ok", "{v}");
    v
}

/// Each of the nine commands, issued by Dom0's mosquitto_pub and answered by sys-usb's agent.
fn dictionary_from_dom0(kind: BrokerKind) {
    let s = system("dict-dom0", kind);
    let sub = s.dom0.subscribe(&s.dir, &["system/+/+/response/dom0"]);
    let report = s.disks.join("usb0/docs/report.txt");

    let r = ask_from_dom0(&s, &sub, "system/disks/list_disks", json!({}), "d1", 1);
    assert_eq!(
        ok(&r[0])["disks"],
        json!([
            {"label": "usb0", "id": "usb0"},
            {"label": "usb1", "id": "usb1"},
            {"label": "Local repository", "id": "repository"}
        ])
    );

    let r = ask_from_dom0(
        &s,
        &sub,
        "system/disks/list_files",
        json!({"disk": "usb0"}),
        "d2",
        1,
    );
    assert_eq!(
        ok(&r[0])["files"],
        json!([
            {"path": "docs", "size": 0, "name": "docs", "type": "folder"},
            {"path": "docs/report.txt", "size": 17, "name": "report.txt", "type": "file"}
        ])
    );

    let r = ask_from_dom0(
        &s,
        &sub,
        "system/disks/get_file_footprint",
        json!({"disk": "usb0", "filepath": "docs/report.txt"}),
        "d3",
        1,
    );
    assert_eq!(ok(&r[0])["footprint"], sha256sum(&report));

    let data = topics::binary::encode(b"hello\n");
    let r = ask_from_dom0(
        &s,
        &sub,
        "system/disks/create_file",
        json!({"disk": "usb1", "filepath": "new/hello.txt", "data": data}),
        "d4",
        1,
    );
    ok(&r[0]);
    assert_eq!(
        std::fs::read(s.disks.join("usb1/new/hello.txt")).unwrap(),
        b"hello\n"
    );

    let r = ask_from_dom0(
        &s,
        &sub,
        "system/disks/copy_file",
        json!({"source_disk": "usb0", "filepath": "docs/report.txt", "target_disk": "usb1"}),
        "d5",
        1,
    );
    ok(&r[0]);
    assert_eq!(
        sha256sum(&s.disks.join("usb1/docs/report.txt")),
        sha256sum(&report)
    );

    let r = ask_from_dom0(
        &s,
        &sub,
        "system/disks/read_file",
        json!({"source_disk": "usb0", "filepath": "docs/report.txt"}),
        "d6",
        1,
    );
    assert_eq!(ok(&r[0])["filepath"], "usb0/docs/report.txt");
    assert_eq!(r[0]["footprint"], sha256sum(&report));
    assert_eq!(
        sha256sum(&s.repo.join("usb0/docs/report.txt")),
        sha256sum(&report)
    );

    let r = ask_from_dom0(
        &s,
        &sub,
        "system/disks/remove_file",
        json!({"disk": "usb1", "filepath": "new/hello.txt"}),
        "d7",
        1,
    );
    ok(&r[0]);
    assert!(!s.disks.join("usb1/new/hello.txt").exists());

    // Several parties answer discovery: Dom0's controller and each agent.
    let r = ask_from_dom0(&s, &sub, "system/components/discover", json!({}), "d8", 3);
    let all: Vec<&Value> = r
        .iter()
        .flat_map(|v| ok(v)["components"].as_array().unwrap())
        .collect();
    for (id, kind) in [
        ("dom0", "dom0"),
        ("sys-usb", "domu"),
        ("vm-gui", "domu"),
        ("usb0", "disk"),
        ("usb1", "disk"),
    ] {
        assert!(
            all.iter().any(|c| c["id"] == id && c["type"] == kind),
            "{id} in {r:?}"
        );
    }

    // Every agent and Dom0 answer benchmarks: started, then finished with figures, on the same topic.
    s.dom0.publish(
        "system/misc/benchmark/request",
        r#"{"sender":"dom0","request_id":"d9","module":"messaging"}"#,
    );
    wait_for(
        "the benchmark results of both agents and Dom0",
        DEADLINE,
        || {
            sub.output()
                .lines()
                .filter(|l| l.contains("\"d9\"") && l.contains("\"finished\""))
                .count()
                >= 3
        },
    );
    let lines: Vec<Value> = sub
        .output()
        .lines()
        .filter(|l| l.contains("\"d9\""))
        .filter_map(|l| l.strip_prefix("system/misc/benchmark/response/dom0 "))
        .map(|p| serde_json::from_str(p).unwrap())
        .collect();
    assert_eq!(
        lines.iter().filter(|v| v["status"] == "started").count(),
        3,
        "{lines:?}"
    );
    for v in lines.iter().filter(|v| v["status"] == "finished") {
        assert_eq!(v["module"], "messaging");
        assert!(
            v["figures"]["round_trip_p50_us"].as_f64().unwrap() > 0.0,
            "{v}"
        );
    }
}

both_brokers!(dictionary_from_dom0: dictionary_from_dom0_embedded, dictionary_from_dom0_mosquitto);

/// The same commands from vm-gui, through its own agent and channel (`domu-agent call`).
#[test]
fn dictionary_from_vm_gui() {
    let s = system("dict-gui", BrokerKind::Embedded);
    let report = s.disks.join("usb0/docs/report.txt");
    let call = |cmd: &str, args: &[&str]| {
        let (success, lines) = s.gui.call(cmd, args);
        assert!(success, "{cmd} {args:?}: {lines:?}");
        lines
    };
    let r = call("list_disks", &[]);
    // usb0, usb1 and the local repository, a disk like the others.
    assert_eq!(r[0]["disks"].as_array().unwrap().len(), 3);
    assert_eq!(r[0]["disks"][2]["id"], "repository");
    // Request ids are unguessable: 128 random bits.
    let id = r[0]["request_id"].as_str().unwrap();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    let r = call("list_files", &["disk=usb0"]);
    assert_eq!(r[0]["files"][1]["path"], "docs/report.txt");
    let r = call(
        "get_file_footprint",
        &["disk=usb0", "filepath=docs/report.txt"],
    );
    assert_eq!(r[0]["footprint"], sha256sum(&report));
    let src = s.dir.join("upload.bin");
    std::fs::write(&src, (0..=255u8).cycle().take(100_000).collect::<Vec<u8>>()).unwrap();
    let data = format!("data=@{}", src.display());
    call("create_file", &["disk=usb1", "filepath=up/load.bin", &data]);
    assert_eq!(
        sha256sum(&s.disks.join("usb1/up/load.bin")),
        sha256sum(&src)
    );
    call(
        "copy_file",
        &[
            "source_disk=usb1",
            "filepath=up/load.bin",
            "target_disk=usb0",
        ],
    );
    assert_eq!(
        sha256sum(&s.disks.join("usb0/up/load.bin")),
        sha256sum(&src)
    );
    let r = call("read_file", &["source_disk=usb0", "filepath=up/load.bin"]);
    assert_eq!(r[0]["footprint"], sha256sum(&src));
    assert!(s.repo.join("usb0/up/load.bin").exists());
    call("remove_file", &["disk=usb0", "filepath=up/load.bin"]);
    assert!(!s.disks.join("usb0/up/load.bin").exists());
    let r = call("discover", &[]);
    assert!(r.len() >= 3, "Dom0 and both agents answer: {r:?}");
    let r = call("benchmark", &["module=disks"]);
    let statuses: Vec<&str> = r.iter().map(|v| v["status"].as_str().unwrap()).collect();
    assert!(
        statuses.contains(&"started") && statuses.contains(&"finished"),
        "{r:?}"
    );
}

/// Sends one request per line with `mosquitto_pub -l` (many requests, one process).
fn publish_lines(s: &System, topic: &str, lines: &[String]) {
    use std::io::Write;
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &s.dom0.port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-l",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for l in lines {
        writeln!(stdin, "{l}").unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

/// Every path in the hostile corpus is refused by every command, and nothing outside the disk is
/// read, written or removed.
#[test]
fn hostile_paths_are_refused() {
    let s = system("hostile", BrokerKind::Embedded);
    let outside = s.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"do not leak").unwrap();
    let usb0 = s.disks.join("usb0");
    std::os::unix::fs::symlink(outside.join("secret"), usb0.join("link-out")).unwrap();
    std::os::unix::fs::symlink("../../outside/secret", usb0.join("rel-out")).unwrap();
    std::os::unix::fs::symlink(&outside, usb0.join("dir-out")).unwrap();
    std::os::unix::fs::symlink("/dev/null", usb0.join("dev-link")).unwrap();
    nix::unistd::mkfifo(
        &usb0.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    // A real device node on the disk (root only; CI runs as root).
    let dev_node = nix::sys::stat::mknod(
        &usb0.join("null-dev"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .is_ok();
    let before: Vec<(PathBuf, Vec<u8>)> = walk(&outside);

    let long_name = "n".repeat(300);
    let long_path = "d/".repeat(2100);
    let mut corpus: Vec<String> = [
        "../outside/secret",
        "../../outside/secret",
        "/etc/passwd",
        "//etc/passwd",
        "docs/../../../outside/secret",
        "docs/../..",
        "..",
        "./../outside",
        "link-out",
        "rel-out",
        "dir-out/secret",
        "dir-out/../usb0/docs/report.txt",
        "link-out/../secret",
        "dir-out",
        "dev-link",
        "fifo",
        "docs/\u{0}report.txt",
        "docs\u{0}/../../x",
        ".",
        "",
        "docs/.report.txt.part-1-1",
    ]
    .iter()
    .map(|p| p.to_string())
    .collect();
    corpus.push(long_name);
    corpus.push(long_path);
    if dev_node {
        corpus.push("null-dev".into());
    }
    assert!(corpus.len() >= 20);

    let data = topics::binary::encode(b"pwned");
    let mut n = 0;
    let mut requests: Vec<(&str, Vec<String>)> = vec![];
    for (root, make) in [
        ("system/disks/get_file_footprint", 0),
        ("system/disks/create_file", 1),
        ("system/disks/remove_file", 2),
        ("system/disks/copy_file", 3),
        ("system/disks/read_file", 4),
    ] {
        let mut lines = vec![];
        for p in &corpus {
            n += 1;
            let id = format!("h{n}");
            let v = match make {
                0 | 2 => json!({"sender": "dom0", "request_id": id, "disk": "usb0", "filepath": p}),
                1 => {
                    json!({"sender": "dom0", "request_id": id, "disk": "usb0", "filepath": p, "data": data, "overwrite": true})
                }
                3 => {
                    json!({"sender": "dom0", "request_id": id, "source_disk": "usb0", "filepath": p, "target_disk": "usb1", "overwrite": true})
                }
                _ => {
                    json!({"sender": "dom0", "request_id": id, "source_disk": "usb0", "filepath": p})
                }
            };
            lines.push(v.to_string());
        }
        requests.push((root, lines));
    }
    let sub = s.dom0.subscribe(&s.dir, &["system/+/+/response/dom0"]);
    for (root, lines) in &requests {
        publish_lines(&s, &format!("{root}/request"), lines);
    }
    wait_for("every hostile request answered", DEADLINE, || {
        sub.output()
            .lines()
            .filter(|l| l.contains("\"request_id\":\"h"))
            .count()
            >= n
    });
    let mut by_id = std::collections::HashMap::new();
    for l in sub.output().lines() {
        if let Some((_, p)) = l.split_once(' ') {
            if let Ok(v) = serde_json::from_str::<Value>(p) {
                if let Some(id) = v["request_id"].as_str() {
                    by_id.insert(id.to_owned(), v);
                }
            }
        }
    }
    let mut i = 0;
    for (root, _) in &requests {
        for p in &corpus {
            i += 1;
            let v = &by_id[&format!("h{i}")];
            let code = v["error"]["code"].as_str().unwrap_or("none");
            assert!(
                v["status"] == "error" && (code == "forbidden" || code == "invalid_argument"),
                "{root} {p:?}: {v}"
            );
        }
    }
    assert_eq!(walk(&outside), before, "nothing outside the disk changed");
    assert!(std::fs::metadata("/etc/passwd").is_ok());
    assert!(
        walk(&s.repo).is_empty(),
        "nothing was read into the repository"
    );
    assert!(s.usb.proc.output().contains("session up"));
}

/// Every file under `dir` with its content (sorted).
fn walk(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push((e.path(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Each error path gives its code; the agent survives malformed requests.
#[test]
fn error_codes() {
    let s = system("errors", BrokerKind::Embedded);
    let sub = s.dom0.subscribe(
        &s.dir,
        &[
            "system/+/+/response/dom0",
            "system/events/error/notification",
        ],
    );
    // Above the agent's 2 MiB create_file limit, below the 4 MiB packet limit once in Base64.
    let big = topics::binary::encode(&vec![0u8; 2 * 1024 * 1024 + 512 * 1024]);
    let rows: Vec<(&str, Value, &str, &str)> = vec![
        (
            "system/disks/list_files",
            json!({"disk": "nope"}),
            "not_found",
            "nope",
        ),
        (
            "system/disks/list_files",
            json!({"disk": 5}),
            "invalid_argument",
            "`disk`",
        ),
        (
            "system/disks/list_files",
            json!({}),
            "invalid_argument",
            "`disk`",
        ),
        (
            "system/disks/get_file_footprint",
            json!({"disk": "usb0", "filepath": "missing"}),
            "not_found",
            "missing",
        ),
        (
            "system/disks/get_file_footprint",
            json!({"disk": "usb0", "filepath": "docs"}),
            "invalid_argument",
            "folder",
        ),
        (
            "system/disks/remove_file",
            json!({"disk": "usb0", "filepath": "docs"}),
            "invalid_argument",
            "folder",
        ),
        (
            "system/disks/create_file",
            json!({"disk": "usb0", "filepath": "docs/report.txt", "data": "eA=="}),
            "already_exists",
            "overwrite",
        ),
        (
            "system/disks/create_file",
            json!({"disk": "usb0", "filepath": "x", "data": "not base64!"}),
            "invalid_argument",
            "`data`",
        ),
        (
            "system/disks/create_file",
            json!({"disk": "usb0", "filepath": "x", "data": big}),
            "too_large",
            "`data`",
        ),
        (
            "system/disks/copy_file",
            json!({"source_disk": "usb0", "filepath": "docs/report.txt", "target_disk": "usb9"}),
            "not_found",
            "usb9",
        ),
        (
            "system/disks/copy_file",
            json!({"source_disk": "usb0", "filepath": "docs/report.txt", "target_disk": "usb0"}),
            "already_exists",
            "report.txt",
        ),
        (
            "system/disks/read_file",
            json!({"source_disk": "usb0", "filepath": "nope.txt"}),
            "not_found",
            "nope.txt",
        ),
        (
            "system/misc/benchmark",
            json!({"module": "gpu"}),
            "unsupported",
            "gpu",
        ),
    ];
    for (i, (root, mut args, code, needle)) in rows.into_iter().enumerate() {
        let id = format!("e{i}");
        let r = ask_from_dom0(
            &s,
            &sub,
            root,
            {
                args["sender"] = json!("dom0");
                args.take()
            },
            &id,
            1,
        );
        let r = r.last().unwrap();
        assert_eq!(r["error"]["code"], code, "{root}: {r}");
        assert!(
            r["error"]["message"].as_str().unwrap().contains(needle),
            "{root}: {r}"
        );
    }
    // Not JSON at all, or the note's `{}` from a Dom0 client (no sender: only Dom0's own clients
    // reach the broker without a link to fill it in): answered `invalid_argument` on Dom0's
    // response topic, never dropped in silence; the agent lives on.
    s.dom0
        .publish("system/disks/list_disks/request", "{not json");
    sub.wait_log(r#"system/disks/list_disks/response/dom0 {"error":{"code":"invalid_argument","message":"payload is not valid JSON"#);
    s.dom0.publish("system/disks/list_disks/request", "{}");
    sub.wait_log(r#"{"error":{"code":"invalid_argument","message":"missing field `sender`"}"#);
    let r = ask_from_dom0(&s, &sub, "system/disks/list_disks", json!({}), "after", 1);
    ok(&r[0]);
}

/// New files are announced once: those made by the agent's commands and those dropped on a disk
/// from outside.
#[test]
fn new_files_are_announced_once() {
    let s = system("newfile", BrokerKind::Embedded);
    let sub = s
        .dom0
        .subscribe(&s.dir, &["system/disk/new_file/notification"]);
    let (ok_, _) = s.gui.call(
        "create_file",
        &["disk=usb1", "filepath=made/by/agent.txt", "data=aGk="],
    );
    assert!(ok_);
    sub.wait_log(
        r#"{"disk":"usb1","filepath":"made/by/agent.txt","origin":"sys-usb","size_in_bytes":2}"#,
    );
    // Dropped from outside (a writer that opens, writes twice, closes; then reopens and appends).
    let p = s.disks.join("usb0/dropped.bin");
    std::fs::write(&p, vec![7u8; 1000]).unwrap();
    sub.wait_log(
        r#"{"disk":"usb0","filepath":"dropped.bin","origin":"sys-usb","size_in_bytes":1000}"#,
    );
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"more").unwrap();
    }
    // A folder copied in.
    std::fs::create_dir_all(s.disks.join("usb1/folder/sub")).unwrap();
    std::fs::write(s.disks.join("usb1/folder/sub/inner.txt"), b"abc").unwrap();
    sub.wait_log(r#""filepath":"folder/sub/inner.txt""#);
    // read_file announces the copy in the repository.
    let (ok_, _) = s.gui.call(
        "read_file",
        &["source_disk=usb0", "filepath=docs/report.txt"],
    );
    assert!(ok_);
    sub.wait_log(
        r#"{"disk":"repository","filepath":"usb0/docs/report.txt","origin":"sys-usb","size_in_bytes":17}"#,
    );
    // Each announced exactly once (the append above announced nothing).
    let out = sub.output();
    for f in [
        "made/by/agent.txt",
        "\"dropped.bin\"",
        "folder/sub/inner.txt",
        "usb0/docs/report.txt",
    ] {
        assert_eq!(out.matches(f).count(), 1, "{f} in {out}");
    }
}

/// Several requests in flight from one requester, told apart by request_id.
#[test]
fn requests_in_flight_are_told_apart() {
    let s = system("inflight", BrokerKind::Embedded);
    for i in 0..6 {
        std::fs::write(
            s.disks.join(format!("usb0/f{i}.bin")),
            vec![i as u8; 200_000 + i * 1000],
        )
        .unwrap();
    }
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let socket = s.gui.socket.clone();
            std::thread::spawn(move || {
                let out = Command::new(system_tests::bin("domu-agent"))
                    .arg("call")
                    .arg("--json")
                    .arg("--socket")
                    .arg(&socket)
                    .args([
                        "get_file_footprint",
                        "disk=usb0",
                        &format!("filepath=f{i}.bin"),
                    ])
                    .output()
                    .unwrap();
                serde_json::from_slice::<Value>(&out.stdout).unwrap()
            })
        })
        .collect();
    let answers: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut ids = std::collections::HashSet::new();
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a["filepath"], format!("f{i}.bin"), "{a}");
        assert_eq!(
            a["footprint"],
            sha256sum(&s.disks.join(format!("usb0/f{i}.bin")))
        );
        assert!(ids.insert(a["request_id"].as_str().unwrap().to_owned()));
    }
    // And from Dom0: three requests published back to back, three answers matched by id.
    let sub = s.dom0.subscribe(&s.dir, &["system/+/+/response/dom0"]);
    let lines: Vec<String> = (0..3)
        .map(|i| json!({"sender": "dom0", "request_id": format!("q{i}"), "disk": "usb0", "filepath": format!("f{i}.bin")}).to_string())
        .collect();
    publish_lines(&s, "system/disks/get_file_footprint/request", &lines);
    for i in 0..3 {
        sub.wait_log(&format!("\"request_id\":\"q{i}\""));
        let line = sub
            .output()
            .lines()
            .find(|l| l.contains(&format!("\"q{i}\"")))
            .unwrap()
            .to_owned();
        assert!(
            line.contains(&format!("\"filepath\":\"f{i}.bin\"")),
            "{line}"
        );
    }
}

/// Dom0 restarted while the agents run: they are served again without restarting; an agent
/// restarted: same.
#[test]
fn agents_survive_restarts() {
    let mut s = system("restarts", BrokerKind::Embedded);
    let usb_pid = s.usb.proc.pid();
    s.dom0.restart(&s.dir, BrokerKind::Embedded, &[]);
    // The attach signal makes the agent start over at once (not after a keepalive timeout).
    s.usb.proc.wait_log("Dom0 asked to start over");
    s.usb.proc.wait_log_count("session up", 2);
    s.gui.proc.wait_log_count("session up", 2);
    assert_eq!(s.usb.proc.pid(), usb_pid, "the agent was not restarted");
    let (ok_, r) = s.gui.call("list_disks", &[]);
    assert!(ok_, "{r:?}");

    // The agent restarted (killed, started again on the same tty).
    s.usb.proc.signal(nix::sys::signal::Signal::SIGKILL);
    s.usb.proc.wait_exit(DEADLINE);
    let d = s.disks.display().to_string();
    let r = s.repo.display().to_string();
    s.usb = Agent::start(
        &s.dir,
        &s.usb_ch,
        "sys-usb",
        &["--disks", &d, "--repository", &r],
    );
    let (ok_, r) = s.gui.call("list_disks", &[]);
    assert!(ok_, "{r:?}");
}

/// A 1 GiB file: the footprint equals sha256sum's and the agent's memory stays flat; a copy
/// interrupted by killing the agent leaves no partial file.
#[test]
fn one_gib_file() {
    let mut s = system("gib", BrokerKind::Embedded);
    let big = s.disks.join("usb0/big.bin");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&big).unwrap();
        let block: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        for _ in 0..1024 {
            f.write_all(&block).unwrap();
        }
    }
    let rss_before = s.usb.proc.rss_kb();
    let pid = s.usb.proc.pid();
    let max_rss = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (max_rss, done) = (max_rss.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let kb = rss_of(pid);
                max_rss.fetch_max(kb, std::sync::atomic::Ordering::SeqCst);
                std::thread::park_timeout(std::time::Duration::from_millis(5));
            }
        })
    };
    let out = Command::new(system_tests::bin("domu-agent"))
        .arg("call")
        .arg("--json")
        .arg("--socket")
        .arg(&s.gui.socket)
        .args([
            "--timeout-ms",
            "120000",
            "get_file_footprint",
            "disk=usb0",
            "filepath=big.bin",
        ])
        .output()
        .unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.join().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["footprint"], sha256sum(&big));
    let peak = max_rss.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        peak < rss_before + 16 * 1024,
        "agent RSS went from {rss_before} KiB to {peak} KiB while hashing 1 GiB"
    );

    // Interrupted copy: kill the agent while the copy runs.
    let socket = s.gui.socket.clone();
    let copier = std::thread::spawn(move || {
        Command::new(system_tests::bin("domu-agent"))
            .arg("call")
            .arg("--json")
            .arg("--socket")
            .arg(&socket)
            .args([
                "--timeout-ms",
                "5000",
                "copy_file",
                "source_disk=usb0",
                "filepath=big.bin",
                "target_disk=usb1",
            ])
            .output()
            .unwrap()
    });
    // The copy is under way when the agent holds an unnamed file open for writing.
    wait_for("the copy to start", DEADLINE, || has_unnamed_file(pid));
    s.usb.proc.signal(nix::sys::signal::Signal::SIGKILL);
    s.usb.proc.wait_exit(DEADLINE);
    let _ = copier.join();
    assert!(
        !s.disks.join("usb1/big.bin").exists(),
        "no partial file under the target name"
    );
    assert!(
        walk(&s.disks.join("usb1")).is_empty(),
        "no partial file at all: {:?}",
        walk(&s.disks.join("usb1")).len()
    );
}

fn rss_of(pid: i32) -> u64 {
    system_tests::procfs::rss_kb(pid)
}

/// True when the process has an O_TMPFILE (a "/#123 (deleted)" descriptor) open.
fn has_unnamed_file(pid: i32) -> bool {
    system_tests::procfs::open_files(pid).iter().any(|t| {
        let t = t.display().to_string();
        t.contains("/#") && t.ends_with("(deleted)")
    })
}

/// The agent waits for a device that is not there yet (never exits), and when Dom0 stops
/// answering its pings it reconnects (a new CONNECT), without restarting.
#[test]
fn agent_waits_for_its_device_and_notices_a_dead_link() {
    use std::io::{Read, Write};
    let dir = TestDir::new("liveness");
    let ch = Channel::new(&dir.path, "vm-gui");
    let link = dir.join("hvc-later");
    let mut cmd = Command::new(system_tests::bin("domu-agent"));
    cmd.args(["run", "--vm", "vm-gui", "--keepalive", "1", "--device"])
        .arg(&link)
        .arg("--mqtt-socket")
        .arg(dir.join("mqtt.sock"))
        .arg("--legacy-socket")
        .arg(dir.join("legacy.sock"))
        .env("RUST_LOG", "debug");
    let mut agent = Proc::spawn("domu-agent", &dir, &mut cmd);
    agent.wait_log("channel not available yet; waiting");
    assert!(
        agent.is_running(),
        "the agent does not exit while its channel is absent"
    );

    // A fake Dom0 on the backend socket: it accepts the session, then never answers a ping.
    let mut dom0 = std::os::unix::net::UnixStream::connect(&ch.socket).unwrap();
    wait_for("the backend's client", DEADLINE, || ch.has_client());
    std::os::unix::fs::symlink(&ch.tty, &link).unwrap();
    agent.wait_log("channel opened");
    let mut seen = Vec::new();
    dom0.set_read_timeout(Some(std::time::Duration::from_millis(100)))
        .unwrap();
    let read_until = |dom0: &mut std::os::unix::net::UnixStream,
                      seen: &mut Vec<u8>,
                      pred: &dyn Fn(&[u8]) -> bool| {
        let mut buf = [0u8; 4096];
        wait_for("bytes from the agent", DEADLINE, || {
            if let Ok(n) = dom0.read(&mut buf) {
                seen.extend_from_slice(&buf[..n]);
            }
            pred(seen)
        });
    };
    let connects = |b: &[u8]| b.windows(6).filter(|w| w == b"\x00\x04MQTT").count();
    read_until(&mut dom0, &mut seen, &|b| connects(b) >= 1);
    dom0.write_all(b"\x20\x02\x00\x00").unwrap();
    agent.wait_log("session up");
    // PINGREQs go unanswered; after a keepalive without PINGRESP the agent connects again.
    read_until(&mut dom0, &mut seen, &|b| connects(b) >= 2);
    agent.wait_log("no PINGRESP from Dom0; reconnecting");
    assert!(
        seen.windows(2).any(|w| w == [0xC0, 0x00]),
        "the agent pinged"
    );
    assert!(agent.is_running());
}
