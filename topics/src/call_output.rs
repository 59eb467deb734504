//! What `domu-agent call` and `dom0-broker fleet call` print and how they exit, from the response
//! lines they received.
//! Pure: lines in, text and an exit code out.
//!
//! Exit codes, like `qrexec-client-vm`: 0 ok; 1 the command answered `error` (its message on
//! stderr); 124 no answer before the timeout; 125 local failure (agent not running, bad
//! arguments); 126 refused by Dom0's policy.

use crate::Command;
use crate::payload::{
    self, BenchmarkReply, CountersReply, DiscoverReply, FootprintReply, ListDisksReply,
    ListFilesReply, ReadFileReply,
};
use serde_json::Value;

pub const OK: u8 = 0;
pub const ERROR: u8 = 1;
pub const TIMEOUT: u8 = 124;
pub const LOCAL_FAILURE: u8 = 125;
pub const REFUSED: u8 = 126;

/// The `args` of a request from a caller's KEY=VALUE words: `KEY=@FILE` is FILE's content in
/// Base64 (read by `read`, the caller's I/O), `true`/`false` are booleans, anything else a string.
pub fn args_from_words(
    words: &[String],
    mut read: impl FnMut(&str) -> Result<Vec<u8>, String>,
) -> Result<serde_json::Map<String, Value>, String> {
    let mut args = serde_json::Map::new();
    for w in words {
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| format!("argument {w:?} is not KEY=VALUE"))?;
        let value = if let Some(file) = v.strip_prefix('@') {
            Value::String(crate::binary::encode(&read(file)?))
        } else if v == "true" || v == "false" {
            Value::Bool(v == "true")
        } else {
            Value::String(v.to_owned())
        };
        args.insert(k.to_owned(), value);
    }
    Ok(args)
}

/// What to print and the exit code.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub code: u8,
}

/// How serious an outcome is: the worst one decides the exit code.
fn rank(code: u8) -> u8 {
    match code {
        OK => 0,
        ERROR => 1,
        TIMEOUT => 2,
        REFUSED => 3,
        _ => 4,
    }
}

/// Formats the response lines of one call. `json`: print the lines as they are.
pub fn render(command: Command, lines: &[String], json: bool) -> Output {
    let mut out = Output::default();
    if lines.is_empty() {
        out.stderr = "no answer from the agent\n".into();
        out.code = LOCAL_FAILURE;
        return out;
    }
    let mut worst = OK;
    for l in lines {
        let (text, code, err) = one(command, l);
        if json {
            out.stdout.push_str(l);
            out.stdout.push('\n');
        } else {
            out.stdout.push_str(&text);
        }
        out.stderr.push_str(&err);
        if rank(code) > rank(worst) {
            worst = code;
        }
    }
    if command == Command::Discover && !json {
        out.stdout = components_table(lines);
    }
    out.code = worst;
    out
}

/// The answers to `discover` as one table: a row per component, with every party that reported
/// it (Dom0 lists the VMs it links; each agent lists itself and its disks).
fn components_table(lines: &[String]) -> String {
    let mut rows: Vec<(payload::Component, Vec<String>)> = Vec::new();
    for l in lines {
        let Ok(Response { result: Ok(r), .. }) =
            payload::decode_response::<DiscoverReply>(l.as_bytes())
        else {
            continue;
        };
        let responder = serde_json::from_str::<Value>(l)
            .ok()
            .and_then(|v| v.get("responder")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| "?".to_owned());
        for c in r.components {
            match rows
                .iter_mut()
                .find(|(k, _)| k.id == c.id && k.kind == c.kind)
            {
                Some((_, by)) => {
                    if !by.contains(&responder) {
                        by.push(responder.clone());
                    }
                }
                None => rows.push((c, vec![responder.clone()])),
            }
        }
    }
    let mut s = format!(
        "{:<24} {:<6} {:<24} {}\n",
        "COMPONENT", "TYPE", "LABEL", "REPORTED BY"
    );
    for (c, by) in rows {
        s.push_str(&format!(
            "{:<24} {:<6} {:<24} {}\n",
            c.id,
            c.kind,
            c.label,
            by.join(", ")
        ));
    }
    s
}

/// One response: (text for humans, exit code, text for stderr).
fn one(command: Command, line: &str) -> (String, u8, String) {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return (
            String::new(),
            LOCAL_FAILURE,
            format!("unreadable answer: {line}\n"),
        );
    };
    let status = v.get("status").and_then(Value::as_str).unwrap_or("");
    let responder = v.get("responder").and_then(Value::as_str).unwrap_or("");
    if status == "error" {
        let code = v
            .pointer("/error/code")
            .and_then(Value::as_str)
            .unwrap_or("");
        let message = v
            .pointer("/error/message")
            .and_then(Value::as_str)
            .unwrap_or("");
        let from = if responder.is_empty() {
            String::new()
        } else {
            format!("{responder}: ")
        };
        let exit = match code {
            "timeout" if responder.is_empty() => TIMEOUT,
            "forbidden" if responder == crate::vm::DOM0 => REFUSED,
            _ => ERROR,
        };
        return (String::new(), exit, format!("{from}{code}: {message}\n"));
    }
    (
        human(command, line.as_bytes(), responder),
        OK,
        String::new(),
    )
}

/// One answer for humans; its raw JSON when it cannot be read as its command's.
fn human(command: Command, body: &[u8], responder: &str) -> String {
    let text = match command {
        Command::ListDisks => decoded(body, disks_table),
        Command::ListFiles => decoded(body, files_listing),
        Command::GetFileFootprint => decoded(body, footprint_line),
        Command::ReadFile => decoded(body, read_file_line),
        // One table for all the answers: `components_table`.
        Command::Discover => Some(String::new()),
        Command::Benchmark => payload::decode_response::<BenchmarkReply>(body)
            .ok()
            .map(|r| benchmark_line(r, responder)),
        Command::SupervisionCounters => decoded(body, counters_table),
        Command::CopyFile | Command::RemoveFile | Command::CreateFile => Some("ok\n".into()),
    };
    text.unwrap_or_else(|| format!("{}\n", String::from_utf8_lossy(body)))
}

/// The text of an `ok` answer of reply `D`; None when it is not one.
fn decoded<D: serde::de::DeserializeOwned>(body: &[u8], text: fn(D) -> String) -> Option<String> {
    match payload::decode_response::<D>(body) {
        Ok(Response { result: Ok(d), .. }) => Some(text(d)),
        _ => None,
    }
}

fn disks_table(r: ListDisksReply) -> String {
    let mut s = format!("{:<24} {}\n", "ID", "LABEL");
    for d in r.disks {
        s.push_str(&format!("{:<24} {}\n", d.id, d.label));
    }
    s
}

fn files_listing(l: ListFilesReply) -> String {
    let mut s = String::new();
    for f in &l.files {
        let kind = match f.kind {
            payload::FileKind::File => "file",
            payload::FileKind::Folder => "folder",
        };
        s.push_str(&format!("{kind:<7} {:>12}  {}\n", f.size, f.path));
    }
    if l.truncated {
        s.push_str("(listing truncated)\n");
    }
    s
}

/// Like `sha256sum`: `footprint  disk:path`.
fn footprint_line(f: FootprintReply) -> String {
    let path = match (&f.disk, &f.filepath) {
        (Some(d), Some(p)) => format!("{d}:{p}"),
        (_, Some(p)) => p.clone(),
        _ => String::new(),
    };
    format!("{}  {path}\n", f.footprint)
}

/// Like `get_file_footprint`'s `footprint  disk:path`: the copy is a file of the disk
/// `repository`, usable by every disk command.
fn read_file_line(r: ReadFileReply) -> String {
    format!(
        "{}  {}:{}  ({} bytes)\n",
        r.footprint.unwrap_or_default(),
        r.disk.as_deref().unwrap_or("repository"),
        r.filepath.unwrap_or_default(),
        r.size_in_bytes.unwrap_or(0)
    )
}

fn benchmark_line(r: Response<BenchmarkReply>, responder: &str) -> String {
    let who = if responder.is_empty() { "?" } else { responder };
    let status = serde_json::to_value(r.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let b = r.result.unwrap_or_default();
    let mut s = format!("{who}: {} {status}", b.module);
    for (k, v) in &b.figures {
        s.push_str(&format!(" {k}={v}"));
    }
    s.push('\n');
    s
}

fn counters_table(r: CountersReply) -> String {
    let mut s = format!(
        "{:<20} {:<7} {:<8} {:>10} {:>10} {:>8} {:>8}\n",
        "VM", "LINKED", "SESSION", "IN", "OUT", "REFUSED", "DROPPED"
    );
    for l in r.links {
        s.push_str(&format!(
            "{:<20} {:<7} {:<8} {:>10} {:>10} {:>8} {:>8}\n",
            l.vm, l.linked, l.session, l.packets_in, l.packets_out, l.refused, l.dropped
        ));
    }
    s
}

use crate::Response;

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn readable_output_and_exit_codes() {
        let rows: [(Command, &[&str], &str, u8); 8] = [
            (
                Command::ListDisks,
                &[r#"{"status":"ok","disks":[{"id":"usb0","label":"USB"}]}"#],
                "usb0                     USB\n",
                OK,
            ),
            (
                Command::ListFiles,
                &[
                    r#"{"status":"ok","disk":"usb0","files":[{"path":"a/b","size":3,"name":"b","type":"file"}]}"#,
                ],
                "file               3  a/b\n",
                OK,
            ),
            (
                Command::GetFileFootprint,
                &[r#"{"status":"ok","disk":"usb0","filepath":"a","footprint":"ab12"}"#],
                "ab12  usb0:a\n",
                OK,
            ),
            (
                Command::Discover,
                &[
                    r#"{"status":"ok","responder":"dom0","components":[{"id":"dom0","label":"Dom0","type":"dom0"},{"id":"sys-usb","label":"sys-usb","type":"domu"}]}"#,
                    r#"{"status":"ok","responder":"sys-usb","components":[{"id":"sys-usb","label":"sys-usb","type":"domu"}]}"#,
                ],
                "sys-usb                  domu   sys-usb                  dom0, sys-usb\n",
                OK,
            ),
            (
                Command::CreateFile,
                &[
                    r#"{"status":"error","responder":"sys-usb","error":{"code":"forbidden","message":"`..` leaves the disk"}}"#,
                ],
                "",
                ERROR,
            ),
            (
                Command::ListDisks,
                &[
                    r#"{"status":"error","responder":"dom0","error":{"code":"forbidden","message":"refused by Dom0"}}"#,
                ],
                "",
                REFUSED,
            ),
            (
                Command::ListDisks,
                &[
                    r#"{"status":"error","error":{"code":"timeout","message":"no answer within 10 ms"}}"#,
                ],
                "",
                TIMEOUT,
            ),
            (
                Command::Benchmark,
                &[
                    r#"{"status":"started","module":"messaging","responder":"vm-gui"}"#,
                    r#"{"status":"finished","module":"messaging","responder":"vm-gui","figures":{"samples":100.0}}"#,
                ],
                "vm-gui: messaging finished samples=100\n",
                OK,
            ),
        ];
        for (command, input, contains, code) in rows {
            let o = render(command, &lines(input), false);
            assert!(o.stdout.contains(contains), "{command:?}: {:?}", o.stdout);
            assert_eq!(o.code, code, "{command:?}: {o:?}");
            if code != OK {
                assert!(!o.stderr.is_empty());
            }
            let j = render(command, &lines(input), true);
            assert_eq!(j.stdout.lines().count(), input.len());
            assert_eq!(j.code, code);
        }
        assert_eq!(render(Command::ListDisks, &[], false).code, LOCAL_FAILURE);
    }

    /// `call discover`: a header, one row per component, and who reported it (Dom0 and each
    /// agent name the same VM: once, with both).
    #[test]
    fn discover_is_one_table_with_who_reported_what() {
        let input = lines(&[
            r#"{"status":"ok","responder":"dom0","components":[{"id":"dom0","label":"Dom0","type":"dom0"},{"id":"sys-usb","label":"sys-usb","type":"domu"},{"id":"vm-gui","label":"vm-gui","type":"domu"}]}"#,
            r#"{"status":"ok","responder":"vm-gui","components":[{"id":"vm-gui","label":"vm-gui","type":"domu"}]}"#,
            r#"{"status":"ok","responder":"sys-usb","components":[{"id":"sys-usb","label":"sys-usb","type":"domu"},{"id":"usb0","label":"KEY","type":"disk"}]}"#,
        ]);
        let o = render(Command::Discover, &input, false);
        let rows: Vec<&str> = o.stdout.lines().collect();
        assert!(rows[0].starts_with("COMPONENT") && rows[0].ends_with("REPORTED BY"));
        assert_eq!(rows.len(), 5, "{}", o.stdout);
        assert!(rows[2].starts_with("sys-usb") && rows[2].ends_with("dom0, sys-usb"));
        assert!(rows[3].starts_with("vm-gui") && rows[3].ends_with("dom0, vm-gui"));
        assert!(rows[4].starts_with("usb0") && rows[4].contains("KEY"));
    }
}
