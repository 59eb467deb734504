//! The topic reference (`docs/topics.md`), generated from the types so it cannot drift.
//!
//! A test compares the committed file with [`markdown`]; regenerate with
//! `cargo run -p topics --example gen-topics-doc > docs/topics.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::legacy;
use crate::payload::*;
use crate::topic::{Command, Notification};
use crate::vm::VmId;

/// Who serves a command.
fn served_by(c: Command) -> &'static str {
    match c {
        Command::Benchmark => {
            "every agent and the Dom0 controller (`disks`: agents with disks only)"
        }
        Command::Discover => "every agent, Dom0 controller",
        Command::SupervisionCounters => "Dom0 controller",
        _ => "sys-usb agent (disk provider)",
    }
}

fn describe(c: Command) -> &'static str {
    match c {
        Command::ListDisks => {
            "List the disks connected to the system, and the local repository (id `repository`) when the agent has one."
        }
        Command::ListFiles => {
            "List a disk's files, recursively. The listing is capped; `truncated: true` says the cap was hit."
        }
        Command::ReadFile => {
            "Copy a file into the local repository, at `<source_disk>/<filepath>` in the disk `repository` (the reply names both); the copy's SHA-256 is verified, then announced on `system/disk/new_file/notification`."
        }
        Command::CopyFile => {
            "Copy a file from one disk to another (same path, missing folders created). An existing target is refused with `already_exists` unless `overwrite: true`."
        }
        Command::RemoveFile => "Remove a file from a disk.",
        Command::Benchmark => {
            "Start a measurement: `module` is `messaging` (round trip over the channel) or `disks` (read throughput). Answers `started` at once, then `finished` with `figures` on the same response topic."
        }
        Command::GetFileFootprint => "The file's SHA-256, lowercase hex.",
        Command::CreateFile => {
            "Create a file from Base64 `data` (size-limited before decoding); missing parent folders are created. An existing file is refused with `already_exists` unless `overwrite: true`. A file larger than a chunk (16 KiB of file data by default) travels as an upload, so that it never holds a channel: a sequence of `create_file` requests with the same unguessable `upload_id` (bound to the first chunk's `sender`), each with its `offset` (the bytes sent before it: chunks come in order) and one chunk of `data`, the last with `final: true`, the file's `size` and its `sha256`. Each chunk is answered with `received` (bytes so far); a requester keeps at most 4 chunks unanswered. The responder writes the chunks to an unnamed file beside the target and names it on the last one, if size and footprint match, announcing `new_file` once; an upload idle for 60 s is dropped. Refused: a chunk out of order or repeated (`invalid_argument`), another sender's upload (`forbidden`), an unknown upload (`not_found`), more than the disk's limit (`too_large`), a wrong size or footprint (`invalid_argument`); nothing is visible until the last chunk succeeds. `call` and the legacy endpoint upload by themselves."
        }
        Command::Discover => {
            "List the system's components. Several parties answer, each with its own part (Dom0: itself and the linked VMs; an agent: itself and its disks)."
        }
        Command::SupervisionCounters => {
            "Dom0 extension: per-VM link counters (packets, bytes, refusals, drops)."
        }
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn vm(s: &str) -> VmId {
    VmId::parse(s).unwrap_or_else(|_| VmId::dom0())
}

fn req_id() -> Option<RequestId> {
    RequestId::parse("7").ok()
}

/// An example request and response payload for each command, built from the typed values.
pub fn example(c: Command) -> (Vec<u8>, Vec<u8>) {
    let gui = vm("vm-gui");
    let id = req_id();
    let path = || "docs/report.pdf".to_owned();
    match c {
        Command::ListDisks => (
            Request::new(gui, id.clone(), NoArgs {}).to_json(),
            Response::ok(
                id,
                ListDisksReply {
                    disks: vec![Disk {
                        label: "KINGSTON".into(),
                        id: "usb0".into(),
                    }],
                },
            )
            .to_json(),
        ),
        Command::ListFiles => (
            Request::new(
                gui,
                id.clone(),
                ListFilesArgs {
                    disk: "usb0".into(),
                },
            )
            .to_json(),
            Response::ok(
                id,
                ListFilesReply {
                    disk: "usb0".into(),
                    files: vec![
                        FileEntry {
                            path: "docs".into(),
                            size: 0,
                            name: "docs".into(),
                            kind: FileKind::Folder,
                        },
                        FileEntry {
                            path: path(),
                            size: 5120,
                            name: "report.pdf".into(),
                            kind: FileKind::File,
                        },
                    ],
                    truncated: false,
                },
            )
            .to_json(),
        ),
        Command::ReadFile => (
            Request::new(
                gui,
                id.clone(),
                ReadFileArgs {
                    source_disk: "usb0".into(),
                    filepath: path(),
                },
            )
            .to_json(),
            Response::ok(
                id,
                ReadFileReply {
                    disk: Some("repository".into()),
                    filepath: Some("usb0/docs/report.pdf".into()),
                    size_in_bytes: Some(5120),
                    footprint: Some(
                        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
                    ),
                },
            )
            .to_json(),
        ),
        Command::CopyFile => (
            Request::new(
                gui,
                id.clone(),
                CopyFileArgs {
                    source_disk: "usb0".into(),
                    filepath: path(),
                    target_disk: "usb1".into(),
                    overwrite: false,
                },
            )
            .to_json(),
            Response::ok(id, StatusOnly {}).to_json(),
        ),
        Command::RemoveFile => (
            Request::new(
                gui,
                id.clone(),
                RemoveFileArgs {
                    disk: "usb0".into(),
                    filepath: path(),
                },
            )
            .to_json(),
            Response::<StatusOnly>::error(
                id,
                ErrorBody::new(
                    ErrorCode::NotFound,
                    "no file `docs/report.pdf` on disk `usb0`",
                ),
            )
            .to_json(),
        ),
        Command::Benchmark => {
            let mut figures = BTreeMap::new();
            figures.insert("round_trip_p50_us".to_owned(), 412.0);
            figures.insert("round_trip_p99_us".to_owned(), 980.0);
            figures.insert("samples".to_owned(), 200.0);
            (
                Request::new(
                    gui,
                    id.clone(),
                    BenchmarkArgs {
                        module: "messaging".into(),
                    },
                )
                .to_json(),
                Response::with_status(
                    id,
                    Status::Finished,
                    BenchmarkReply {
                        module: "messaging".into(),
                        figures,
                    },
                )
                .to_json(),
            )
        }
        Command::GetFileFootprint => (
            Request::new(
                gui,
                id.clone(),
                FootprintArgs {
                    disk: "usb0".into(),
                    filepath: path(),
                },
            )
            .to_json(),
            Response::ok(
                id,
                FootprintReply {
                    disk: Some("usb0".into()),
                    filepath: Some(path()),
                    footprint: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                        .into(),
                },
            )
            .to_json(),
        ),
        Command::CreateFile => (
            Request::new(
                gui,
                id.clone(),
                CreateFileArgs {
                    disk: "usb0".into(),
                    filepath: "notes/hello.txt".into(),
                    data: crate::binary::encode(b"hello\n"),
                    ..Default::default()
                },
            )
            .to_json(),
            Response::ok(id, CreateFileReply::default()).to_json(),
        ),
        Command::Discover => (
            Request::new(gui, id.clone(), NoArgs {}).to_json(),
            Response::ok(
                id,
                DiscoverReply {
                    components: example_components(),
                },
            )
            .to_json(),
        ),
        Command::SupervisionCounters => (
            Request::new(vm("dom0"), id.clone(), NoArgs {}).to_json(),
            Response::ok(
                id,
                CountersReply {
                    links: vec![LinkCounters {
                        vm: "sys-usb".into(),
                        linked: true,
                        session: true,
                        packets_in: 120,
                        packets_out: 118,
                        bytes_in: 20480,
                        bytes_out: 19876,
                        refused: 1,
                        dropped: 0,
                        expired: 0,
                        overflowed: 0,
                        session_since: Some("2026-11-22T10:00:00Z".into()),
                        last_error: Some(
                            "2026-11-22T10:05:00Z refused \"system/disks/list_disks/response/vm-gui\": no rule allows it"
                                .into(),
                        ),
                        components: example_components(),
                    }],
                },
            )
            .to_json(),
        ),
    }
}

/// sys-usb and its disk, as `discover`, the counters and the announcements show them.
fn example_components() -> Vec<Component> {
    vec![
        Component {
            id: "sys-usb".into(),
            label: "sys-usb".into(),
            kind: "domu".into(),
        },
        Component {
            id: "usb0".into(),
            label: "KINGSTON".into(),
            kind: "disk".into(),
        },
    ]
}

/// An example payload for each notification.
pub fn notification_example(n: Notification) -> Vec<u8> {
    match n {
        Notification::NewFile => json(&NewFileEvent {
            disk: "usb0".into(),
            filepath: "docs/report.pdf".into(),
            size_in_bytes: 5120,
        })
        .into_bytes(),
        Notification::Error => json(&ErrorEvent {
            module: "sys-usb/disks".into(),
            datetime: "2026-11-22T10:00:00Z".into(),
            level: level::ERROR,
            description: "disk usb1 vanished during a copy".into(),
        })
        .into_bytes(),
        Notification::LinkState => json(&LinkEvent {
            vm: "vm-gui".into(),
            state: LinkState::SessionUp,
            datetime: "2026-11-22T10:00:00Z".into(),
            detail: None,
        })
        .into_bytes(),
        Notification::Announce => json(&AnnounceEvent {
            vm: "sys-usb".into(),
            components: example_components(),
        })
        .into_bytes(),
    }
}

fn describe_notification(n: Notification) -> &'static str {
    match n {
        Notification::NewFile => {
            "A new file is available on a disk or in the local repository (announced once). Published by the sys-usb agent."
        }
        Notification::Error => {
            "An error occurred in a module. `level` is a syslog severity (2 critical, 3 error, 4 warning, 5 notice); `datetime` is RFC 3339 UTC. Published by anyone; Dom0 reports policy refusals here (VM and topic, never the payload)."
        }
        Notification::LinkState => {
            "Dom0 extension: a VM link changed state (`linked`, `unlinked`, `session_up`, `session_down`, `identity_refused`, `overflow`, `violations`). Published by the Dom0 controller."
        }
        Notification::Announce => {
            "Service announcements (the note's third category, which it gives no topic): a party's components, as `discover` answers them, when its session comes up and whenever they change (a disk plugged or removed). Every agent announces itself (Dom0 files each under the `origin` it stamped: a VM announces only itself), Dom0 announces its own and, when a VM's link goes, `components: []` for it. Dom0 answers `discover` from what was announced; `dom0-broker status` shows it."
        }
    }
}

fn fields(payload: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(serde_json::Value::Object(m)) => m
            .keys()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => String::new(),
    }
}

/// The whole reference document.
pub fn markdown() -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Topics reference\n\n\
         <!-- Generated by `cargo run -p topics --example gen-topics-doc > docs/topics.md`; a test checks it. Do not edit. -->\n\n\
         The dictionary of the messaging note (`seeds/001_8d8afb6a68192828.txt`), as implemented by the crate `topics`.\n\n\
         ## Grammar\n\n\
         - Command request: `<root>/request`; response: `<root>/response/<requester>`; notification: `<root>/notification`.\n\
         - VM id (requester, `sender`, MQTT client id, channel socket name): `[a-z0-9][a-z0-9_-]{{0,31}}`. `dom0` is reserved to Dom0.\n\
         - Topics: at most 256 bytes, no empty level, no NUL, never starting with `$`; names carry no wildcard.\n\
         - Payloads: compact UTF-8 JSON objects. Unknown extra fields are ignored; a wrong type is refused naming the field.\n\n\
         ## Envelope\n\n\
         - Every request carries `sender`, the requester's VM id: Dom0 fills it in when a VM's request has none (the note writes `{{}}`) \
         and refuses one that names another VM; Dom0's own clients must set it. A request also carries a `request_id` \
         (1 to 64 visible ASCII characters) that the response echoes: the agents use 128 random bits (32 hex digits), never shown to a party that does not need it.\n\
         - A request may say how long its answer is awaited: `timeout_ms` (the agents' `call` and legacy endpoint set their own timeout; \
         none: {} s, at most {} s). Dom0 turns it into `deadline_ms`, milliseconds since the epoch on Dom0's clock, when a VM's request \
         enters the broker (whatever deadline the VM wrote is replaced; Dom0's own clients may set `deadline_ms` themselves). \
         A request past its deadline is not delivered: it waited in the broker while its responder was away, and its requester \
         has given up (`dom0-broker status`: EXPIRED). A responder that gets the same `request_id` from the same `sender` again \
         (a redelivery after a reconnect) answers it as before, without running it again.\n\
         - Every response carries `status`: `ok` or `error` (benchmarks: `started`, then `finished`), \
         and `responder`, who answered: Dom0 fills it in with the channel's VM and refuses one that names someone else \
         (Dom0's own answers say `dom0`). An error carries `error: {{\"code\", \"message\"}}`.\n\
         - Every notification a VM publishes carries `origin`, its VM, filled in or checked by Dom0 the same way (Dom0's own carry none).\n\
         - A requester takes a response only on its command's response topic, with its `request_id`, from an acceptable `responder` \
         (the destination when one was named; for `discover`, a benchmark without destination or `tous`, each party once, within 2 s), \
         as often as the command answers (once; a benchmark `started` then its figures). Unanswered: `timeout` after 10 s by default.\n\
         - Error codes: {}.\n\
         - Binary data is standard Base64 with padding; `footprint` is the lowercase hex SHA-256.\n\
         - Disks: `disk`, `source_disk` and `target_disk` name a disk of `list_disks`; the local repository is the disk `repository` \
         (where `read_file` copies to), for every command. `filepath` is always relative to the disk named beside it.\n\n\
         ## System commands\n\nThe note's first category: a request, answered on the requester's response topic.\n",
        crate::payload::DEFAULT_REQUEST_TIMEOUT.as_secs(),
        crate::payload::MAX_REQUEST_TIMEOUT.as_secs(),
        ErrorCode::ALL
            .iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    commands(&mut s);
    for (title, intro, ns) in [
        (
            "Supervision",
            "The note's second category: what happens, for whoever watches (`system/+/+/notification`). \
             `system/supervision/counters` (above) is its command.",
            &[
                Notification::NewFile,
                Notification::Error,
                Notification::LinkState,
            ][..],
        ),
        (
            "Service announcements",
            "The note's third category (\"Annonces de services\"), which it gives no topic: \
             who is there and what it offers, pushed instead of asked.",
            &[Notification::Announce][..],
        ),
    ] {
        let _ = writeln!(s, "## {title}\n\n{intro}\n");
        notifications(&mut s, ns);
    }
    s
}

/// The section of every command: its topics, who serves it, its fields and an example.
fn commands(s: &mut String) {
    for c in Command::ALL {
        let (req, resp) = example(c);
        let legacy = match (legacy::type_commande(c), legacy::commande(c)) {
            (Some(t), Some(l)) => format!("`TypeCommande.{t}` / `\"commande\": \"{l}\"`"),
            _ => "none (Dom0 extension)".to_owned(),
        };
        let _ = writeln!(
            s,
            "### `{root}`\n\n{desc}\n\n\
             | | |\n|---|---|\n\
             | request | `{root}/request` |\n\
             | response | `{root}/response/<requester>` |\n\
             | served by | {served} |\n\
             | legacy | {legacy} |\n\
             | request fields | {rf} |\n\
             | response fields | {pf} |\n\n\
             ```json\n{req}\n{resp}\n```\n",
            root = c.root(),
            desc = describe(c),
            served = served_by(c),
            rf = fields(&req),
            pf = fields(&resp),
            req = String::from_utf8_lossy(&req),
            resp = String::from_utf8_lossy(&resp),
        );
    }
}

fn notifications(s: &mut String, ns: &[Notification]) {
    for &n in ns {
        let ex = notification_example(n);
        let legacy = match (legacy::type_evenement(n), legacy::evenement(n)) {
            (Some(t), Some(l)) => format!("`TypeEvenement.{t}` / `\"evenement\": \"{l}\"`"),
            _ => "none (Dom0 extension)".to_owned(),
        };
        let _ = writeln!(
            s,
            "### `{root}`\n\n{desc}\n\n\
             | | |\n|---|---|\n\
             | topic | `{root}/notification` |\n\
             | legacy | {legacy} |\n\
             | fields | {f} |\n\n\
             ```json\n{ex}\n```\n",
            root = n.root(),
            desc = describe_notification(n),
            f = fields(&ex),
            ex = String::from_utf8_lossy(&ex),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every example decodes with its command's types: the reference shows payloads the code accepts.
    #[test]
    fn examples_decode() {
        fn check<S: CommandSpec>() {
            let (req, resp) = example(S::COMMAND);
            decode_request::<S::Args>(&req)
                .unwrap_or_else(|e| panic!("{:?} request: {e}", S::COMMAND));
            decode_response::<S::Reply>(&resp)
                .unwrap_or_else(|e| panic!("{:?} response: {e}", S::COMMAND));
        }
        check::<ListDisks>();
        check::<ListFiles>();
        check::<ReadFile>();
        check::<CopyFile>();
        check::<RemoveFile>();
        check::<Benchmark>();
        check::<GetFileFootprint>();
        check::<CreateFile>();
        check::<Discover>();
        check::<SupervisionCounters>();
        decode::<NewFileEvent>(&notification_example(Notification::NewFile)).unwrap();
        decode::<ErrorEvent>(&notification_example(Notification::Error)).unwrap();
        decode::<LinkEvent>(&notification_example(Notification::LinkState)).unwrap();
        decode::<AnnounceEvent>(&notification_example(Notification::Announce)).unwrap();
    }

    #[test]
    fn committed_reference_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/topics.md");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == markdown(),
            "docs/topics.md is stale: run `cargo run -p topics --example gen-topics-doc > docs/topics.md`"
        );
    }
}
