//! The MVP's wire format: one compact JSON object a line, `{"type", "source", "destination",
//! "payload"}`, and its translation to and from the dictionary's topics and payloads. Pure: the
//! agent's legacy endpoint and Dom0's legacy mode for un-upgraded guests both use it.
//!
//! - command: `{"type":"commande","source":S,"destination":D,"payload":{"commande":"liste_disques","arguments":{..}}}`
//!   (`commande` may also be a `TypeCommande` name); D is a VM name, `Dom0`/`dom0`, or `tous`.
//! - response: `{"type":"reponse","source":R,"destination":S,"payload":{"commande":KIND,"data":{..}}}`
//!   with the MVP's kinds (`liste_disques`, `liste_fichiers`, `file_footprint`, `file_creation`,
//!   `benchmark_files` with `data.etat` = `demarre|termine|erreur`, ...). `data` is the response's
//!   fields (`status` included, `request_id` and `responder` left out).
//! - notification: `{"type":"notification","source":V,"destination":"tous","payload":{"evenement":E,"data":{..}}}`
//!   with E = `fichier` (new file), `erreur` (error), `etat_domu` (a link's state).
//!
//! Errors, which the MVP had no shape for (stable from now on):
//! - a command that failed: `{"type":"reponse",...,"payload":{"commande":KIND,"erreur":{"code":C,"message":M}}}`
//!   with the dictionary's error codes (`not_found`, `forbidden`, `timeout`, ...);
//! - a line that is not a command: `{"type":"erreur","source":..,"destination":..,"payload":{"code":"invalid_argument","message":M}}`.

use serde_json::{Map, Value, json};

use crate::legacy;
use crate::payload::{ErrorCode, Status};
use crate::topic::{Command, Notification};
use crate::vm::{DOM0, VmId};

/// Longest line accepted, in bytes (a `create_file` carries its data in Base64: up to 24 MiB of
/// file data, which the agent's legacy endpoint uploads in chunks). Where a line becomes one
/// message (Dom0's legacy mode), the packet limit of the way is the line limit.
pub const MAX_LINE: usize = 32 * 1024 * 1024;
/// The MVP's "every domain".
pub const ALL: &str = "tous";

/// One item of a legacy byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineItem {
    /// A line, without its `\n` (or `\r\n`).
    Line(Vec<u8>),
    /// A line over [`MAX_LINE`]: reported once, then skipped up to its newline.
    TooLong,
}

/// Cuts a byte stream into the MVP's lines, as bytes arrive: `\n` or `\r\n`, blank lines
/// skipped, at most [`MAX_LINE`] bytes buffered (an over-long line is reported once and skipped up
/// to its newline, so the next line reads as usual).
#[derive(Debug)]
pub struct LineReader {
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts.
    start: usize,
    /// How far `buf` was searched for a newline (0: from `start`).
    scanned: usize,
    /// Inside an over-long line.
    skipping: bool,
    /// Longest line, in bytes.
    limit: usize,
}

impl Default for LineReader {
    fn default() -> LineReader {
        LineReader::with_limit(MAX_LINE)
    }
}

impl LineReader {
    /// A reader of lines of at most `limit` bytes.
    pub fn with_limit(limit: usize) -> LineReader {
        LineReader {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            skipping: false,
            limit,
        }
    }

    /// The longest line this reader takes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// True while bytes of an unfinished line are held or skipped.
    pub fn in_line(&self) -> bool {
        self.skipping || !self.partial().is_empty()
    }

    /// Bytes as they arrived.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.scanned = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.scanned = self.scanned.saturating_sub(self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line (or over-long one), if there is one.
    pub fn next_line(&mut self) -> Option<LineItem> {
        loop {
            let rest = self.buf.get(self.start..).unwrap_or_default();
            // The bytes of the unfinished line already looked at hold no newline: a long line
            // arriving in pieces is scanned once, not once per piece.
            let from = self.scanned.saturating_sub(self.start).min(rest.len());
            let found = rest
                .get(from..)
                .unwrap_or_default()
                .iter()
                .position(|b| *b == b'\n')
                .map(|i| i + from);
            self.scanned = match found {
                Some(_) => 0,
                None => self.buf.len(),
            };
            match found {
                Some(at) => {
                    let line = rest.get(..at).unwrap_or_default();
                    let line = line.strip_suffix(b"\r").unwrap_or(line).to_vec();
                    self.start += at + 1;
                    if std::mem::take(&mut self.skipping)
                        || line.iter().all(u8::is_ascii_whitespace)
                    {
                        continue;
                    }
                    // Over the limit, however its bytes arrived (whole in one read too).
                    if line.len() > self.limit {
                        return Some(LineItem::TooLong);
                    }
                    return Some(LineItem::Line(line));
                }
                None if rest.len() > self.limit || (self.skipping && !rest.is_empty()) => {
                    self.buf.clear();
                    self.start = 0;
                    self.scanned = 0;
                    if !std::mem::replace(&mut self.skipping, true) {
                        return Some(LineItem::TooLong);
                    }
                    return None;
                }
                None => return None,
            }
        }
    }

    /// The unfinished line's bytes.
    pub fn partial(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or_default()
    }

    /// Takes the unfinished line's bytes (they may be the start of something else); an over-long
    /// line being skipped is over too: what comes next starts a new line.
    pub fn take_partial(&mut self) -> Vec<u8> {
        let rest = self.partial().to_vec();
        self.buf.clear();
        self.start = 0;
        self.scanned = 0;
        self.skipping = false;
        rest
    }
}

/// Where a command goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// One VM: only it answers.
    Vm(VmId),
    /// `Dom0`: only Dom0's controller answers.
    Dom0,
    /// `tous`: every responder answers.
    All,
}

impl Destination {
    pub fn parse(untrusted: &str) -> Result<Destination, LegacyError> {
        match untrusted {
            ALL => Ok(Destination::All),
            "Dom0" | DOM0 => Ok(Destination::Dom0),
            other => VmId::parse(other)
                .map(Destination::Vm)
                .map_err(|e| LegacyError::Invalid(format!("destination {other:?}: {e}"))),
        }
    }

    /// The name responders compare with their own (`dom0`, a VM id), or None for everyone.
    pub fn name(&self) -> Option<&str> {
        match self {
            Destination::Vm(v) => Some(v.as_str()),
            Destination::Dom0 => Some(DOM0),
            Destination::All => None,
        }
    }

    /// As written in lines: the VM, `Dom0`, `tous`.
    pub fn as_line(&self) -> &str {
        match self {
            Destination::Vm(v) => v.as_str(),
            Destination::Dom0 => "Dom0",
            Destination::All => ALL,
        }
    }
}

/// Why a line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegacyError {
    /// The line is over this limit, in bytes.
    #[error("line over the limit of {0} bytes")]
    TooLong(usize),
    /// What the line asks would not fit in one message on the way (the broker's packet limit).
    #[error("the message this line makes is {0} bytes, over the limit of {1} bytes")]
    TooLarge(usize, usize),
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("unknown type {0:?} (commande, reponse, notification)")]
    UnknownType(String),
    #[error("unknown commande {0:?}")]
    UnknownCommand(String),
    #[error("unknown evenement {0:?}")]
    UnknownEvent(String),
    #[error("{0}")]
    Invalid(String),
}

/// A parsed line.
#[derive(Debug, Clone, PartialEq)]
pub enum LegacyLine {
    Command {
        command: Command,
        destination: Destination,
        arguments: Map<String, Value>,
    },
    /// A response the client sends (an MVP service answering a command).
    Response {
        command: Command,
        /// The requester it answers.
        destination: VmId,
        /// `data` (or the error, as the dictionary's response fields).
        fields: Map<String, Value>,
    },
    Notification {
        notification: Notification,
        data: Map<String, Value>,
    },
}

fn str_field<'a>(m: &'a Map<String, Value>, name: &'static str) -> Result<&'a str, LegacyError> {
    match m.get(name) {
        None | Some(Value::Null) => Err(LegacyError::Missing(name)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(LegacyError::Invalid(format!("`{name}` must be a string"))),
    }
}

fn object_field(
    m: &mut Map<String, Value>,
    name: &'static str,
    required: bool,
) -> Result<Map<String, Value>, LegacyError> {
    match m.remove(name) {
        Some(Value::Object(o)) => Ok(o),
        None | Some(Value::Null) if !required => Ok(Map::new()),
        None | Some(Value::Null) => Err(LegacyError::Missing(name)),
        Some(_) => Err(LegacyError::Invalid(format!("`{name}` must be an object"))),
    }
}

/// The command a `commande` string names: the MVP's lowercase string or a `TypeCommande` name.
pub fn command_named(untrusted: &str) -> Option<Command> {
    legacy::from_commande(untrusted).or_else(|| legacy::from_type_commande(untrusted))
}

/// Parses one line (without its newline). `source` is not trusted and not returned: the caller
/// replaces it with the identity it knows.
pub fn parse(untrusted: &[u8]) -> Result<LegacyLine, LegacyError> {
    if untrusted.len() > MAX_LINE {
        return Err(LegacyError::TooLong(MAX_LINE));
    }
    let mut m = match serde_json::from_slice::<Value>(untrusted) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(LegacyError::NotObject),
        Err(e) => return Err(LegacyError::NotJson(e.to_string())),
    };
    let kind = str_field(&m, "type")?.to_owned();
    let mut payload = object_field(&mut m, "payload", true)?;
    match kind.as_str() {
        "commande" => {
            let name = str_field(&payload, "commande")?;
            let command =
                command_named(name).ok_or_else(|| LegacyError::UnknownCommand(name.to_owned()))?;
            let destination = Destination::parse(str_field(&m, "destination")?)?;
            let arguments = object_field(&mut payload, "arguments", false)?;
            Ok(LegacyLine::Command {
                command,
                destination,
                arguments,
            })
        }
        "reponse" => {
            let name = str_field(&payload, "commande")?;
            let command = legacy::from_response_kind(name)
                .or_else(|| command_named(name))
                .ok_or_else(|| LegacyError::UnknownCommand(name.to_owned()))?;
            let destination = str_field(&m, "destination")?;
            let destination = VmId::parse(destination)
                .map_err(|e| LegacyError::Invalid(format!("destination {destination:?}: {e}")))?;
            let fields = match object_field(&mut payload, "erreur", false)? {
                e if !e.is_empty() => {
                    let mut f = Map::new();
                    f.insert("status".into(), json!(Status::Error));
                    f.insert("error".into(), Value::Object(e));
                    f
                }
                _ => {
                    let mut data = object_field(&mut payload, "data", false)?;
                    if let Some(etat) = data.remove("etat") {
                        let status = match etat.as_str() {
                            Some("demarre") => Status::Started,
                            Some("termine") => Status::Finished,
                            Some("erreur") => Status::Error,
                            _ => Status::Ok,
                        };
                        data.insert("status".into(), json!(status));
                    }
                    data.entry("status").or_insert_with(|| json!(Status::Ok));
                    data
                }
            };
            Ok(LegacyLine::Response {
                command,
                destination,
                fields,
            })
        }
        "notification" => {
            let name = str_field(&payload, "evenement")?;
            let notification = legacy::from_evenement(name)
                .or_else(|| legacy::from_type_evenement(name))
                .ok_or_else(|| LegacyError::UnknownEvent(name.to_owned()))?;
            let data = object_field(&mut payload, "data", false)?;
            Ok(LegacyLine::Notification { notification, data })
        }
        other => Err(LegacyError::UnknownType(other.to_owned())),
    }
}

/// The request a command becomes: its topic and payload (`sender`, `request_id` and the asker's
/// patience, `timeout_ms`, added, and `destination` unless it goes to everyone).
pub fn request(
    command: Command,
    destination: &Destination,
    arguments: &Map<String, Value>,
    sender: &VmId,
    request_id: &str,
    patience: std::time::Duration,
) -> (String, Vec<u8>) {
    let mut p = arguments.clone();
    p.insert("sender".into(), json!(sender.as_str()));
    p.insert("request_id".into(), json!(request_id));
    p.insert(
        crate::payload::TIMEOUT_MS.into(),
        json!(u64::try_from(patience.as_millis()).unwrap_or(u64::MAX)),
    );
    match destination.name() {
        Some(d) => p.insert("destination".into(), json!(d)),
        None => p.remove("destination"),
    };
    (
        command.request_topic(),
        Value::Object(p).to_string().into_bytes(),
    )
}

fn line(kind: &str, source: &str, destination: &str, payload: Value) -> Vec<u8> {
    let mut v =
        json!({"type": kind, "source": source, "destination": destination, "payload": payload})
            .to_string()
            .into_bytes();
    v.push(b'\n');
    v
}

/// The MVP `reponse` line for a response payload of `command` (a JSON object from the topics).
/// `source` is the responder as the answer rule established it (`Dom0`, or a VM's id).
pub fn response_line(command: Command, payload: &[u8], requester: &str, source: &str) -> Vec<u8> {
    let kind = legacy::response_kind(command).unwrap_or_else(|| command.root());
    let mut m = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => m,
        _ => {
            return command_error_line(
                command,
                source,
                requester,
                ErrorCode::Internal,
                "the responder's answer is not a JSON object",
            );
        }
    };
    m.remove("responder");
    m.remove("request_id");
    let status = m.get("status").and_then(Value::as_str).map(str::to_owned);
    if status.as_deref() == Some("error") && command != Command::Benchmark {
        let err = m.remove("error").unwrap_or(Value::Null);
        return line(
            "reponse",
            source,
            requester,
            json!({"commande": kind, "erreur": err}),
        );
    }
    if command == Command::Benchmark {
        let etat = match status.as_deref() {
            Some("started") => "demarre",
            Some("finished") | Some("ok") => "termine",
            _ => "erreur",
        };
        m.insert("etat".into(), json!(etat));
    }
    line(
        "reponse",
        source,
        requester,
        json!({"commande": kind, "data": Value::Object(m)}),
    )
}

/// A `reponse` line saying a command failed.
pub fn command_error_line(
    command: Command,
    source: &str,
    destination: &str,
    code: ErrorCode,
    message: &str,
) -> Vec<u8> {
    let kind = legacy::response_kind(command).unwrap_or_else(|| command.root());
    line(
        "reponse",
        source,
        destination,
        json!({"commande": kind, "erreur": {"code": code, "message": message}}),
    )
}

/// An `erreur` line: what the client sent was not a command.
pub fn error_line(source: &str, destination: &str, e: &LegacyError) -> Vec<u8> {
    line(
        "erreur",
        source,
        destination,
        json!({"code": ErrorCode::InvalidArgument, "message": e.to_string()}),
    )
}

/// The MVP `evenement` of a notification.
pub fn evenement(n: Notification) -> &'static str {
    legacy::evenement(n).unwrap_or("etat_domu")
}

/// The MVP `notification` line for a notification payload.
pub fn notification_line(n: Notification, payload: &[u8], source: &str) -> Vec<u8> {
    let data = match serde_json::from_slice::<Value>(payload) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({}),
    };
    line(
        "notification",
        source,
        ALL,
        json!({"evenement": evenement(n), "data": data}),
    )
}

/// The MVP `commande` line a request becomes for a legacy responder (Dom0's legacy mode).
pub fn command_line(command: Command, payload: &[u8], destination: &str) -> Option<Vec<u8>> {
    let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(payload) else {
        return None;
    };
    let sender = match m.remove("sender") {
        Some(Value::String(s)) => s,
        _ => return None,
    };
    // The request id stays with Dom0 (the translation gives the answer its id back), and so do
    // the request's patience and deadline: the MVP knows none of them.
    m.remove("destination");
    m.remove("request_id");
    m.remove(crate::payload::TIMEOUT_MS);
    m.remove(crate::payload::DEADLINE_MS);
    let name = legacy::commande(command)?;
    Some(line(
        "commande",
        &sender,
        destination,
        json!({"commande": name, "arguments": Value::Object(m)}),
    ))
}

/// The topic and payload a legacy response or notification becomes (Dom0's legacy mode).
/// `request_id` is not known to an MVP service: responses carry none.
pub fn publication(l: &LegacyLine) -> Option<(String, Vec<u8>)> {
    match l {
        LegacyLine::Response {
            command,
            destination,
            fields,
        } => Some((
            command.response_topic(destination),
            Value::Object(fields.clone()).to_string().into_bytes(),
        )),
        LegacyLine::Notification { notification, data } => Some((
            notification.topic(),
            Value::Object(data.clone()).to_string().into_bytes(),
        )),
        LegacyLine::Command { .. } => None,
    }
}

/// True when a request payload is addressed to `me` (no `destination`, `tous`, or `me`).
pub fn addressed_to(payload: &[u8], me: &str) -> bool {
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(payload) else {
        return true;
    };
    match m.get("destination") {
        Some(Value::String(d)) => d == ALL || d == me || (me == DOM0 && d == "Dom0"),
        _ => true,
    }
}

/// Validates a VM name given as a line's `source`, for logs only (never trusted).
pub fn claimed_source(m: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(m).ok()?;
    v.get("source")?
        .as_str()
        .map(|s| s.chars().take(64).collect())
}

/// Field names of a JSON object example, in order, without the envelope.
fn fields(example: &[u8]) -> String {
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(example) else {
        return String::new();
    };
    let names: Vec<String> = m
        .keys()
        .filter(|k| !matches!(k.as_str(), "sender" | "request_id" | "responder" | "error"))
        .map(|k| format!("`{k}`"))
        .collect();
    if names.is_empty() {
        "—".into()
    } else {
        names.join(", ")
    }
}

/// The mapping table of `docs/migration.md` (between its `mapping` markers), generated here so
/// the document cannot drift from the code.
pub fn mapping_table() -> String {
    let mut t = String::from(
        "| MVP `commande` | `TypeCommande` | request topic | MVP response kind | arguments | response `data` |\n\
         |---|---|---|---|---|---|\n",
    );
    for c in Command::ALL.into_iter().filter(|c| c.in_note()) {
        let (req, resp) = crate::reference::example(c);
        t.push_str(&format!(
            "| `{}` | `{}` | `{}` | `{}` | {} | {} |\n",
            legacy::commande(c).unwrap_or("—"),
            legacy::type_commande(c).unwrap_or("—"),
            c.request_topic(),
            legacy::response_kind(c).unwrap_or("—"),
            fields(&req),
            fields(&resp),
        ));
    }
    t.push_str("\n| MVP `evenement` | `TypeEvenement` | topic | `data` |\n|---|---|---|---|\n");
    for n in Notification::ALL {
        t.push_str(&format!(
            "| `{}` | `{}` | `{}` | {} |\n",
            evenement(n),
            legacy::type_evenement(n).unwrap_or("—"),
            n.topic(),
            fields(&crate::reference::notification_example(n)),
        ));
    }
    t
}

#[cfg(test)]
mod tests;
