//! Typed payloads: the envelope of every request and response, and each command's arguments and reply.
//!
//! Field names are the note's (`disks[{label,id}]`, `files[{path,size,name,type}]`, `footprint`,
//! `components[{id,label,type}]`, `size_in_bytes`, `module`, `datetime`, `level`, `description`).
//! Decoding tolerates unknown extra fields and refuses wrong types with an error naming the field.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::topic::Command;
use crate::vm::VmId;

/// Longest `request_id` accepted, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 64;

/// Why a payload was refused. Every variant names what is wrong; none carries payload bytes
/// beyond the offending field's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    #[error("payload must be a JSON object")]
    NotObject,
    #[error("missing field `{0}`")]
    MissingField(String),
    #[error("field `{field}`: {message}")]
    InvalidField { field: String, message: String },
}

impl PayloadError {
    /// The field the error is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            PayloadError::MissingField(f) | PayloadError::InvalidField { field: f, .. } => Some(f),
            _ => None,
        }
    }

    fn invalid(field: &str, message: impl fmt::Display) -> PayloadError {
        PayloadError::InvalidField {
            field: field.to_owned(),
            message: message.to_string(),
        }
    }
}

/// A request id chosen by the requester, echoed in the response: 1 to 64 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct RequestId(String);

impl RequestId {
    pub fn parse(untrusted: &str) -> Result<RequestId, String> {
        if untrusted.is_empty() || untrusted.len() > MAX_REQUEST_ID_LEN {
            return Err(format!("must be 1 to {MAX_REQUEST_ID_LEN} bytes long"));
        }
        if !untrusted.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be visible ASCII characters".to_owned());
        }
        Ok(RequestId(untrusted.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// An id this crate built and knows to be valid.
    pub(crate) fn from_trusted(id: String) -> RequestId {
        RequestId(id)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RequestId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RequestId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The envelope fields every request carries, whatever the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The requester's VM id; Dom0 checks it against the channel's identity.
    pub sender: VmId,
    /// Optional id echoed in the response, so a requester can have several calls in flight.
    pub request_id: Option<RequestId>,
}

/// A request: envelope plus the command's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<A> {
    pub sender: VmId,
    pub request_id: Option<RequestId>,
    pub args: A,
}

fn parse_object(payload: &[u8]) -> Result<Map<String, Value>, PayloadError> {
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(PayloadError::NotObject),
        Err(e) => Err(PayloadError::NotJson(e.to_string())),
    }
}

fn take_envelope(map: &mut Map<String, Value>) -> Result<Envelope, PayloadError> {
    let sender = match map.remove("sender") {
        None | Some(Value::Null) => return Err(PayloadError::MissingField("sender".into())),
        Some(Value::String(s)) => {
            VmId::parse(&s).map_err(|e| PayloadError::invalid("sender", e))?
        }
        Some(other) => {
            return Err(PayloadError::invalid(
                "sender",
                type_error(&other, "a string"),
            ));
        }
    };
    let request_id = take_request_id(map)?;
    Ok(Envelope { sender, request_id })
}

fn take_request_id(map: &mut Map<String, Value>) -> Result<Option<RequestId>, PayloadError> {
    match map.remove("request_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => RequestId::parse(&s)
            .map(Some)
            .map_err(|e| PayloadError::invalid("request_id", e)),
        Some(other) => Err(PayloadError::invalid(
            "request_id",
            type_error(&other, "a string"),
        )),
    }
}

fn type_error(found: &Value, expected: &str) -> String {
    let kind = match found {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("invalid type: {kind}, expected {expected}")
}

fn from_map<T: DeserializeOwned>(map: Map<String, Value>) -> Result<T, PayloadError> {
    serde_path_to_error::deserialize::<_, T>(Value::Object(map)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        if let Some(rest) = message.strip_prefix("missing field `") {
            let name = rest.split('`').next().unwrap_or(rest);
            let field = if path == "." {
                name.to_owned()
            } else {
                format!("{path}.{name}")
            };
            return PayloadError::MissingField(field);
        }
        PayloadError::InvalidField {
            field: path,
            message,
        }
    })
}

/// The requester's patience in a request, in milliseconds: how long its answer is worth waiting
/// for. Dom0 turns it into [`DEADLINE_MS`] on its own clock.
pub const TIMEOUT_MS: &str = "timeout_ms";
/// When a request stops being worth running, in milliseconds since the epoch on Dom0's clock. Dom0
/// sets it on every request a VM publishes (a VM's own value is replaced); Dom0's own clients may
/// set it themselves. A link does not deliver a request past it.
pub const DEADLINE_MS: &str = "deadline_ms";
/// The patience of a request that says none.
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// The longest patience Dom0 grants.
pub const MAX_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The deadline of a request published at `now_ms` (ms since the epoch) with these fields: its
/// `timeout_ms` when a positive integer (at most [`MAX_REQUEST_TIMEOUT`]), else the default.
pub fn deadline_for(fields: &crate::raw_object::RawObject<'_>, now_ms: u64) -> u64 {
    let max = MAX_REQUEST_TIMEOUT.as_millis() as u64;
    let patience = match fields.get::<u64>(TIMEOUT_MS).and_then(Result::ok) {
        Some(t) if t > 0 => t.min(max),
        _ => DEFAULT_REQUEST_TIMEOUT.as_millis() as u64,
    };
    now_ms.saturating_add(patience)
}

/// Whether a request is past its `deadline_ms` at `now_ms`; a request without one never is.
pub fn expired(payload: &[u8], now_ms: u64) -> bool {
    // Most payloads say nothing of it: no parse for them.
    if !payload
        .windows(DEADLINE_MS.len())
        .any(|w| w == DEADLINE_MS.as_bytes())
    {
        return false;
    }
    crate::raw_object::RawObject::parse(payload)
        .ok()
        .and_then(|o| o.get::<u64>(DEADLINE_MS)?.ok())
        .is_some_and(|deadline| now_ms > deadline)
}

/// Decodes only the envelope of a request (what Dom0 checks on every request it relays).
pub fn decode_envelope(payload: &[u8]) -> Result<Envelope, PayloadError> {
    take_envelope(&mut parse_object(payload)?)
}

/// Decodes a whole request.
pub fn decode_request<A: DeserializeOwned>(payload: &[u8]) -> Result<Request<A>, PayloadError> {
    let mut map = parse_object(payload)?;
    let Envelope { sender, request_id } = take_envelope(&mut map)?;
    let args = from_map(map)?;
    Ok(Request {
        sender,
        request_id,
        args,
    })
}

/// Decodes a payload that has no envelope (a notification, or a reply body).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, PayloadError> {
    from_map(parse_object(payload)?)
}

fn to_object<T: Serialize>(value: &T) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map,
        // Our payload types are all structs; anything else is a programming error caught by tests.
        _ => Map::new(),
    }
}

impl<A: Serialize> Request<A> {
    pub fn new(sender: VmId, request_id: Option<RequestId>, args: A) -> Request<A> {
        Request {
            sender,
            request_id,
            args,
        }
    }

    /// The compact JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        let mut map = to_object(&self.args);
        map.insert("sender".into(), Value::String(self.sender.to_string()));
        if let Some(id) = &self.request_id {
            map.insert("request_id".into(), Value::String(id.to_string()));
        }
        Value::Object(map).to_string().into_bytes()
    }
}

/// `status` of a response. Benchmarks answer `started` then `finished`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Error,
    Started,
    Finished,
}

/// The closed set of error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Unknown disk, missing file.
    NotFound,
    /// Malformed JSON, wrong type, bad value; the message names the field.
    InvalidArgument,
    /// A path leaving its disk, a device file, a refused topic.
    Forbidden,
    /// The target exists and the request did not ask to overwrite it.
    AlreadyExists,
    /// Data above the configured limit.
    TooLarge,
    /// A filesystem error.
    Io,
    /// The service is doing something that excludes this request (e.g. a benchmark running).
    Busy,
    /// The command or module is not served here.
    Unsupported,
    /// No answer in time.
    Timeout,
    /// A bug: the request was fine, we failed.
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::NotFound,
        ErrorCode::InvalidArgument,
        ErrorCode::Forbidden,
        ErrorCode::AlreadyExists,
        ErrorCode::TooLarge,
        ErrorCode::Io,
        ErrorCode::Busy,
        ErrorCode::Unsupported,
        ErrorCode::Timeout,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Io => "io",
            ErrorCode::Busy => "busy",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `error` of a response whose status is `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

impl From<PayloadError> for ErrorBody {
    fn from(e: PayloadError) -> ErrorBody {
        ErrorBody::new(ErrorCode::InvalidArgument, e.to_string())
    }
}

/// A response: `status`, the echoed `request_id`, then either the reply fields or `error`.
#[derive(Debug, Clone, PartialEq)]
pub struct Response<D> {
    pub request_id: Option<RequestId>,
    /// `ok`, `started` or `finished` with a body; `error` with an [`ErrorBody`].
    pub status: Status,
    pub result: Result<D, ErrorBody>,
}

impl<D> Response<D> {
    pub fn ok(request_id: Option<RequestId>, body: D) -> Response<D> {
        Response {
            request_id,
            status: Status::Ok,
            result: Ok(body),
        }
    }

    pub fn with_status(request_id: Option<RequestId>, status: Status, body: D) -> Response<D> {
        Response {
            request_id,
            status,
            result: Ok(body),
        }
    }

    pub fn error(request_id: Option<RequestId>, error: ErrorBody) -> Response<D> {
        Response {
            request_id,
            status: Status::Error,
            result: Err(error),
        }
    }
}

impl<D: Serialize> Response<D> {
    pub fn to_json(&self) -> Vec<u8> {
        let mut map = match &self.result {
            Ok(body) => to_object(body),
            Err(_) => Map::new(),
        };
        map.insert(
            "status".into(),
            serde_json::to_value(self.status).unwrap_or(Value::Null),
        );
        if let Some(id) = &self.request_id {
            map.insert("request_id".into(), Value::String(id.to_string()));
        }
        if let Err(e) = &self.result {
            map.insert(
                "error".into(),
                serde_json::to_value(e).unwrap_or(Value::Null),
            );
        }
        Value::Object(map).to_string().into_bytes()
    }
}

/// Decodes a response to a command whose reply body is `D`.
pub fn decode_response<D: DeserializeOwned>(payload: &[u8]) -> Result<Response<D>, PayloadError> {
    let mut map = parse_object(payload)?;
    let status: Status = match map.remove("status") {
        None => return Err(PayloadError::MissingField("status".into())),
        Some(v) => serde_json::from_value(v).map_err(|e| PayloadError::invalid("status", e))?,
    };
    let request_id = take_request_id(&mut map)?;
    let result = if status == Status::Error {
        match map.remove("error") {
            None => return Err(PayloadError::MissingField("error".into())),
            Some(Value::Object(m)) => Err(from_map::<ErrorBody>(m).map_err(|e| match e {
                PayloadError::MissingField(f) => PayloadError::MissingField(format!("error.{f}")),
                PayloadError::InvalidField { field, message } => PayloadError::InvalidField {
                    field: format!("error.{field}"),
                    message,
                },
                other => other,
            })?),
            Some(other) => {
                return Err(PayloadError::invalid(
                    "error",
                    type_error(&other, "an object"),
                ));
            }
        }
    } else {
        Ok(from_map::<D>(map)?)
    };
    Ok(Response {
        request_id,
        status,
        result,
    })
}

// ---------------------------------------------------------------------------------------------
// Command arguments (the request payload beyond `sender` and `request_id`).

/// `list_disks` and `discover` take no argument.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoArgs {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFilesArgs {
    pub disk: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFileArgs {
    pub source_disk: String,
    pub filepath: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyFileArgs {
    pub source_disk: String,
    pub filepath: String,
    pub target_disk: String,
    /// Replace an existing target (default: refuse with `already_exists`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub overwrite: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveFileArgs {
    pub disk: String,
    pub filepath: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchmarkArgs {
    /// `messaging` (round trip over the channel) or `disks` (read throughput).
    pub module: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FootprintArgs {
    pub disk: String,
    pub filepath: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateFileArgs {
    pub disk: String,
    pub filepath: String,
    /// File content, standard Base64 with padding: the whole file, or one chunk of an upload.
    pub data: String,
    /// Replace an existing file (default: refuse with `already_exists`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub overwrite: bool,
    /// An upload in chunks (files larger than a chunk, [`crate::upload`]): its id, chosen by the
    /// requester, unguessable (32 hex digits), bound to its `sender` by the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    /// Where this chunk goes in the file: the bytes received so far (chunks come in order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The upload's last chunk, which carries `size` and `sha256`.
    #[serde(default, rename = "final", skip_serializing_if = "is_false")]
    pub last: bool,
    /// The whole file's size in bytes (the last chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The whole file's SHA-256, lowercase hex (the last chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// `create_file`'s reply: a status; for a chunk of an upload, the bytes received so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateFileReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

// ---------------------------------------------------------------------------------------------
// Reply bodies (the response payload beyond `status`, `request_id`, `error`).

/// A reply that is only a status (`read_file`'s optional fields aside).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusOnly {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub label: String,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListDisksReply {
    pub disks: Vec<Disk>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Folder,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the disk, `/`-separated.
    pub path: String,
    pub size: u64,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FileKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFilesReply {
    pub disk: String,
    pub files: Vec<FileEntry>,
    /// True when the listing hit its entry cap and is incomplete.
    #[serde(default, skip_serializing_if = "is_false")]
    pub truncated: bool,
}

/// `read_file`: the note's reply is only `status`; we add where the copy landed: the disk
/// `repository` and the path in it (`<source_disk>/<filepath>`), usable by every disk command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFileReply {
    /// `repository`: the local repository, a disk like the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Path of the copy, relative to the disk named beside it (the repository).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filepath: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_in_bytes: Option<u64>,
    /// SHA-256 of the copy, verified against the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub footprint: Option<String>,
}

/// `get_file_footprint`: the note's `footprint` plus the MVP's `disk` and `filepath`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FootprintReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filepath: Option<String>,
    /// Lowercase hex SHA-256.
    pub footprint: String,
}

/// `benchmark`: `started` at once, then `finished` with the figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchmarkReply {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub module: String,
    /// Named figures, e.g. `round_trip_p50_us`, `read_mb_per_s`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub figures: BTreeMap<String, f64>,
}

/// A response body with `"responder": <who>` added: who answered (an agent's VM, or `dom0`). Dom0
/// checks it against the channel's identity, as it checks `sender`. A body that is not a JSON
/// object is returned unchanged.
pub fn with_responder(body: &[u8], responder: &str) -> Vec<u8> {
    with_field(body, "responder", responder)
}

/// A notification body with `"origin": <who>` added: who published it. Dom0 stamps (or checks)
/// it against the channel's identity on every notification a VM publishes; Dom0's own carry none.
pub fn with_origin(body: &[u8], origin: &str) -> Vec<u8> {
    with_field(body, "origin", origin)
}

fn with_field(body: &[u8], field: &str, value: &str) -> Vec<u8> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut m)) => {
            m.insert(field.into(), Value::String(value.to_owned()));
            Value::Object(m).to_string().into_bytes()
        }
        _ => body.to_vec(),
    }
}

/// The `responder` a response claims, if any (`Err` when present but not a string).
pub fn claimed_responder(payload: &[u8]) -> Result<Option<String>, PayloadError> {
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => match m.get("responder") {
            None => Ok(None),
            Some(Value::String(r)) => Ok(Some(r.clone())),
            Some(_) => Err(PayloadError::InvalidField {
                field: "responder".into(),
                message: "must be a string".into(),
            }),
        },
        _ => Ok(None),
    }
}

/// The `q`-th quantile (0.0..=1.0) of sorted samples: the sample at `⌊len × q⌋`, the last one at
/// most; `None` when there are none.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    let at = ((sorted.len() as f64 * q) as usize).min(last);
    sorted.get(at).copied()
}

impl BenchmarkReply {
    /// The `messaging` figures of round-trip samples: `round_trip_p50_us`, `round_trip_p99_us`
    /// (µs, one decimal) and `samples`.
    pub fn round_trips(samples: &mut [std::time::Duration]) -> BenchmarkReply {
        samples.sort();
        let us = |d: Option<std::time::Duration>| {
            d.map_or(0.0, |d| (d.as_secs_f64() * 1e7).round() / 10.0)
        };
        BenchmarkReply {
            module: "messaging".into(),
            figures: [
                ("round_trip_p50_us".to_owned(), us(quantile(samples, 0.5))),
                ("round_trip_p99_us".to_owned(), us(quantile(samples, 0.99))),
                ("samples".to_owned(), samples.len() as f64),
            ]
            .into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub id: String,
    pub label: String,
    /// `dom0`, `domu` or `disk`.
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoverReply {
    pub components: Vec<Component>,
}

/// Dom0 extension: one VM link's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkCounters {
    pub vm: String,
    /// Dom0 is attached to the channel socket.
    pub linked: bool,
    /// An MQTT session is up through the link.
    pub session: bool,
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Packets refused by identity or policy checks.
    pub refused: u64,
    /// Sessions dropped (overflow, silence, protocol error).
    pub dropped: u64,
    /// Requests not delivered to the VM because their deadline had passed (they waited for it
    /// while it was away).
    #[serde(default)]
    pub expired: u64,
    /// Messages for the VM that the broker dropped, oldest first, because its queue was full while
    /// its link was away (the embedded broker; Mosquitto logs its own drops).
    #[serde(default)]
    pub overflowed: u64,
    /// When the current session came up (RFC 3339), if one is up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_since: Option<String>,
    /// The last thing that went wrong on the link (a refusal, a dropped session), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The components the VM announced (itself, its disks), while its link is up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<Component>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersReply {
    pub links: Vec<LinkCounters>,
}

// ---------------------------------------------------------------------------------------------
// Notifications.

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewFileEvent {
    /// Disk id, or the repository's name for the local repository.
    pub disk: String,
    pub filepath: String,
    pub size_in_bytes: u64,
}

/// A service announcement: the components of `vm` (the note's `discover` answer), published
/// when its session comes up and whenever they change; Dom0 keeps them (a VM announces only
/// itself: Dom0 files it under the `origin` it stamped) and withdraws them when the VM's link
/// goes, announcing `components: []`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceEvent {
    pub vm: String,
    pub components: Vec<Component>,
}

/// Severity levels of [`ErrorEvent::level`], as syslog's (RFC 5424).
pub mod level {
    pub const CRITICAL: u8 = 2;
    pub const ERROR: u8 = 3;
    pub const WARNING: u8 = 4;
    pub const NOTICE: u8 = 5;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEvent {
    /// Who reports: e.g. `dom0-broker/link`, `sys-usb/disks`.
    pub module: String,
    /// RFC 3339, UTC.
    pub datetime: String,
    /// Syslog severity (see [`level`]).
    pub level: u8,
    pub description: String,
}

/// Dom0 extension: the state a VM link moved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// Dom0 attached to the VM's channel socket.
    Linked,
    /// The channel socket went away.
    Unlinked,
    /// The VM's MQTT session is up.
    SessionUp,
    /// The VM's MQTT session ended.
    SessionDown,
    /// A CONNECT claimed another identity and was refused.
    IdentityRefused,
    /// The VM did not read its messages; its session was dropped.
    Overflow,
    /// The VM kept violating the policy; its session was dropped.
    Violations,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkEvent {
    pub vm: String,
    pub state: LinkState,
    pub datetime: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The argument and reply types of each command, for code that is generic over commands.
pub trait CommandSpec {
    const COMMAND: Command;
    type Args: Serialize + DeserializeOwned;
    type Reply: Serialize + DeserializeOwned;
}

macro_rules! spec {
    ($name:ident, $cmd:expr, $args:ty, $reply:ty) => {
        #[doc = concat!("Types of `", stringify!($name), "`.")]
        #[derive(Debug)]
        pub struct $name;
        impl CommandSpec for $name {
            const COMMAND: Command = $cmd;
            type Args = $args;
            type Reply = $reply;
        }
    };
}

spec!(ListDisks, Command::ListDisks, NoArgs, ListDisksReply);
spec!(ListFiles, Command::ListFiles, ListFilesArgs, ListFilesReply);
spec!(ReadFile, Command::ReadFile, ReadFileArgs, ReadFileReply);
spec!(CopyFile, Command::CopyFile, CopyFileArgs, StatusOnly);
spec!(RemoveFile, Command::RemoveFile, RemoveFileArgs, StatusOnly);
spec!(Benchmark, Command::Benchmark, BenchmarkArgs, BenchmarkReply);
spec!(
    GetFileFootprint,
    Command::GetFileFootprint,
    FootprintArgs,
    FootprintReply
);
spec!(
    CreateFile,
    Command::CreateFile,
    CreateFileArgs,
    CreateFileReply
);
spec!(Discover, Command::Discover, NoArgs, DiscoverReply);
spec!(
    SupervisionCounters,
    Command::SupervisionCounters,
    NoArgs,
    CountersReply
);

#[cfg(test)]
mod tests;
