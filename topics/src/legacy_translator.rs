//! The one translation between a speaker of the MVP's JSON lines and the topics, used by Dom0's
//! legacy mode (a guest without agent on its channel) and by the agent's legacy endpoint (an MVP
//! application in a guest). Pure: bytes, messages and instants in; lines and publications out.
//!
//! - A command line becomes a request as the speaker's VM (`sender` is the identity the caller
//!   knows, never the line's `source`), with a random `request_id` the caller supplies; its
//!   answers are taken under the rule of [`crate::answers`] (its command, its id, an acceptable
//!   `responder`, each party once) and become `reponse` lines whose `source` is that checked
//!   `responder` (`dom0` for Dom0's own clients). A command nobody answered in time gets a `timeout` error line.
//! - A response line (an MVP service answering) is published with `responder` the speaker's VM and
//!   the `request_id` of the request it answers (requests handed to the speaker are remembered by
//!   command and requester); a notification line with `origin` the speaker's VM.
//! - Requests delivered to the speaker become command lines without their `request_id` (an id is
//!   never shown to a party that does not need it); notifications become lines whose `source` is
//!   their `origin` as Dom0 stamped it (or Dom0).
//! - One limit holds end to end: a line over the line limit (the packet limit of the way, unless
//!   the driver sets one) is skipped to its newline; a line whose message would not fit is answered
//!   `too_large` before anything is sent. An unfinished line is dropped once no byte of it came for
//!   [`LINE_IDLE`] (progress, not age).
//! - A `create_file` whose data is larger than a chunk travels as an upload ([`crate::upload`]):
//!   its chunks are requests of their own, sent as the window allows while the answers come; the
//!   speaker gets one answer line, the last chunk's (or the first error, or one timeout).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::answers::{Question, Responders};
use crate::legacy_line::{self, Destination, LegacyError, LegacyLine, LineItem, LineReader};
use crate::payload::{ErrorCode, RequestId};
use crate::topic::{Command, Notification, Topic};
use crate::upload::{self, Progress, Upload};
use crate::vm::VmId;

/// An unfinished line with no new byte for this long is dropped.
pub const LINE_IDLE: Duration = Duration::from_secs(2);
/// Commands of one speaker waiting for answers at once; one more is answered `busy`.
pub const MAX_ASKED: usize = 256;
/// Requests handed to a legacy service remembered for its answers (the oldest is forgotten).
pub const MAX_SERVED: usize = 256;
/// MQTT's cost around a payload: fixed header, topic length, packet id.
const PUBLISH_OVERHEAD: usize = 5 + 2 + 2;

/// What the translation asks of its driver.
#[derive(Clone, PartialEq, Eq)]
pub enum Out {
    /// A line for the speaker.
    Line(Vec<u8>),
    /// A request to publish as the speaker's VM; its answers come back through
    /// [`Translator::on_message`] (the driver routes the response topic's messages to it).
    Request {
        topic: String,
        payload: Vec<u8>,
        request_id: RequestId,
    },
    /// A response or notification to publish as the speaker's VM.
    Publish { topic: String, payload: Vec<u8> },
}

/// Payloads are shown by size: they can be megabytes of file data.
impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Out::Line(l) => write!(f, "Line({} bytes)", l.len()),
            Out::Request {
                topic,
                payload,
                request_id,
            } => write!(f, "Request({topic}, {request_id}, {} bytes)", payload.len()),
            Out::Publish { topic, payload } => {
                write!(f, "Publish({topic}, {} bytes)", payload.len())
            }
        }
    }
}

/// Who a notification comes from: its `origin` as Dom0 stamped it, the VM a link-state
/// notification is about, or Dom0 (whose own notifications carry no origin).
pub fn notification_source(n: Notification, payload: &[u8]) -> String {
    let v: Value = serde_json::from_slice(payload).unwrap_or_default();
    let field = |name: &str| {
        v.get(name)
            .and_then(Value::as_str)
            .filter(|s| VmId::parse(s).is_ok())
    };
    let from = field("origin").or_else(|| match n {
        Notification::LinkState => field("vm"),
        _ => None,
    });
    from.unwrap_or("Dom0").to_owned()
}

/// A command of the speaker waiting for its answers.
#[derive(Debug)]
struct Asked {
    question: Question,
    /// Who the answer lines are addressed to (the line's `source`, for display only).
    client: String,
    /// A chunk of an upload: its upload id and offset.
    chunk: Option<(String, u64)>,
}

/// An upload of the speaker going: its chunks are [`Asked`] with their upload's id.
#[derive(Debug)]
struct Uploading {
    upload: Upload,
    destination: Destination,
    /// The line's arguments (the caller's) but its data, which travel with every chunk.
    arguments: Map<String, Value>,
    client: String,
}

/// One speaker's translation.
#[derive(Debug)]
pub struct Translator {
    /// The speaker's VM: the identity of everything it publishes.
    me: VmId,
    /// The name on the lines the translation writes itself (errors).
    router: String,
    /// Who lines are addressed to: fixed (a channel's VM), or the line's claimed `source`.
    addressee: Option<String>,
    /// Largest message the way carries.
    max_packet: usize,
    input: LineReader,
    /// When the last byte of the unfinished line arrived.
    last_byte: Option<Instant>,
    asked: HashMap<RequestId, Asked>,
    /// Requests handed to the speaker: (command, requester, request id), oldest first.
    served: VecDeque<(Command, VmId, RequestId)>,
    /// File data per chunk of an upload.
    chunk: usize,
    uploads: HashMap<String, Uploading>,
}

impl Translator {
    /// A translation for `me`, writing its own lines as `router`, addressed to `addressee` (None:
    /// to whatever `source` each line claims), for messages of at most `max_packet` bytes.
    pub fn new(me: VmId, router: &str, addressee: Option<String>, max_packet: usize) -> Translator {
        Translator {
            me,
            router: router.to_owned(),
            addressee,
            max_packet,
            input: LineReader::with_limit(max_packet.min(legacy_line::MAX_LINE)),
            last_byte: None,
            asked: HashMap::new(),
            served: VecDeque::new(),
            chunk: upload::CHUNK,
            uploads: HashMap::new(),
        }
    }

    /// Lines of up to `line_limit` bytes (a `create_file` larger than a packet travels as an
    /// upload), uploads in chunks of `chunk` bytes of file data.
    pub fn with_uploads(mut self, line_limit: usize, chunk: usize) -> Translator {
        self.input = LineReader::with_limit(line_limit);
        self.chunk = chunk.max(1);
        self
    }

    /// Bytes waiting in an unfinished line.
    pub fn partial(&self) -> &[u8] {
        self.input.partial()
    }

    /// Takes the unfinished line's bytes (the speaker switches to MQTT: they may be its CONNECT).
    pub fn take_partial(&mut self) -> Vec<u8> {
        self.last_byte = None;
        self.input.take_partial()
    }

    /// Commands waiting for answers.
    pub fn asked(&self) -> usize {
        self.asked.len()
    }

    /// True while the command with this request id waits for answers.
    pub fn asks(&self, id: &RequestId) -> bool {
        self.asked.contains_key(id)
    }

    fn addressee_of(&self, line: &[u8]) -> String {
        match &self.addressee {
            Some(a) => a.clone(),
            None => legacy_line::claimed_source(line).unwrap_or_else(|| "application".into()),
        }
    }

    fn error(&self, to: &str, e: &LegacyError) -> Out {
        Out::Line(legacy_line::error_line(&self.router, to, e))
    }

    /// Bytes from the speaker; `new_id` gives each command its random request id.
    pub fn on_bytes(
        &mut self,
        bytes: &[u8],
        now: Instant,
        new_id: &mut dyn FnMut() -> RequestId,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        self.input.push(bytes);
        while let Some(item) = self.input.next_line() {
            match item {
                LineItem::Line(line) => self.line(&line, now, new_id, &mut out),
                LineItem::TooLong => {
                    let to = self
                        .addressee
                        .clone()
                        .unwrap_or_else(|| "application".into());
                    out.push(self.error(&to, &LegacyError::TooLong(self.input.limit())));
                }
            }
        }
        self.last_byte = match (self.input.in_line(), bytes.is_empty()) {
            (false, _) => None,
            (true, false) => Some(now),
            (true, true) => self.last_byte.or(Some(now)),
        };
        out
    }

    /// True when a message on `topic` with `payload` fits the way.
    fn fits(&self, topic: &str, payload: &[u8]) -> Result<(), LegacyError> {
        let size = topic.len() + payload.len() + PUBLISH_OVERHEAD;
        if size > self.max_packet {
            return Err(LegacyError::TooLarge(size, self.max_packet));
        }
        Ok(())
    }

    fn line(
        &mut self,
        line: &[u8],
        now: Instant,
        new_id: &mut dyn FnMut() -> RequestId,
        out: &mut Vec<Out>,
    ) {
        let client = self.addressee_of(line);
        let parsed = match legacy_line::parse(line) {
            Ok(l) => l,
            Err(e) => return out.push(self.error(&client, &e)),
        };
        match parsed {
            LegacyLine::Command {
                command,
                destination,
                arguments,
            } => self.command(command, &destination, &arguments, client, now, new_id, out),
            LegacyLine::Response {
                command,
                destination,
                fields,
            } => {
                let id = self.served_id(command, &destination);
                let mut fields = fields;
                fields.insert("responder".into(), json!(self.me.as_str()));
                if let Some(id) = id {
                    fields.insert("request_id".into(), json!(id.as_str()));
                }
                let topic = command.response_topic(&destination);
                let payload = Value::Object(fields).to_string().into_bytes();
                match self.fits(&topic, &payload) {
                    Ok(()) => out.push(Out::Publish { topic, payload }),
                    Err(e) => out.push(self.error(&client, &e)),
                }
            }
            LegacyLine::Notification { notification, data } => {
                let mut data = data;
                data.insert("origin".into(), json!(self.me.as_str()));
                let topic = notification.topic();
                let payload = Value::Object(data).to_string().into_bytes();
                match self.fits(&topic, &payload) {
                    Ok(()) => out.push(Out::Publish { topic, payload }),
                    Err(e) => out.push(self.error(&client, &e)),
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn command(
        &mut self,
        command: Command,
        destination: &Destination,
        arguments: &Map<String, Value>,
        client: String,
        now: Instant,
        new_id: &mut dyn FnMut() -> RequestId,
        out: &mut Vec<Out>,
    ) {
        if self.asked.len() >= MAX_ASKED {
            let busy = format!("{MAX_ASKED} commands already wait for their answers");
            return out.push(self.refusal(command, &client, ErrorCode::Busy, &busy));
        }
        if command == Command::CreateFile {
            // Arguments that do not make a `create_file` go whole: its responder says why.
            if let Some(Ok(p)) = upload::prepare(arguments, self.chunk) {
                // An unguessable upload id: the driver's random request ids are.
                let id = new_id().to_string();
                let upload = Upload::new(p.base, p.data, id.clone(), self.chunk, upload::WINDOW);
                self.uploads.insert(
                    id.clone(),
                    Uploading {
                        upload,
                        destination: destination.clone(),
                        arguments: p.rest,
                        client,
                    },
                );
                return self.send_chunks(&id, now, new_id, out);
            }
        }
        out.push(self.ask(command, destination, arguments, client, None, now, new_id));
    }

    /// A request for `command` as the speaker's VM, waiting for its answers (a chunk of an upload
    /// when `chunk`); a line instead when it would not fit.
    #[allow(clippy::too_many_arguments)]
    fn ask(
        &mut self,
        command: Command,
        destination: &Destination,
        arguments: &Map<String, Value>,
        client: String,
        chunk: Option<(String, u64)>,
        now: Instant,
        new_id: &mut dyn FnMut() -> RequestId,
    ) -> Out {
        let id = new_id();
        let responders = Responders::for_request(command, destination.name());
        let question = Question::new(command, id.clone(), responders, None, now);
        let (topic, payload) = legacy_line::request(
            command,
            destination,
            arguments,
            &self.me,
            id.as_str(),
            question.patience(),
        );
        if let Err(e) = self.fits(&topic, &payload) {
            return self.refusal(command, &client, ErrorCode::TooLarge, &e.to_string());
        }
        self.asked.insert(
            id.clone(),
            Asked {
                question,
                client,
                chunk,
            },
        );
        Out::Request {
            topic,
            payload,
            request_id: id,
        }
    }

    /// The `reponse` error line to `client` for its `command`, from the router.
    fn refusal(&self, command: Command, client: &str, code: ErrorCode, message: &str) -> Out {
        Out::Line(legacy_line::command_error_line(
            command,
            &self.router,
            client,
            code,
            message,
        ))
    }

    /// Sends the chunks of upload `id` the window has room for.
    fn send_chunks(
        &mut self,
        id: &str,
        now: Instant,
        new_id: &mut dyn FnMut() -> RequestId,
        out: &mut Vec<Out>,
    ) {
        loop {
            let Some(u) = self.uploads.get_mut(id) else {
                return;
            };
            let Some((offset, chunk)) = u.upload.next_chunk() else {
                return;
            };
            let arguments = upload::chunk_arguments(&u.arguments, &chunk);
            let (destination, client) = (u.destination.clone(), u.client.clone());
            let o = self.ask(
                Command::CreateFile,
                &destination,
                &arguments,
                client,
                Some((id.to_owned(), offset)),
                now,
                new_id,
            );
            let sent = matches!(o, Out::Request { .. });
            out.push(o);
            if !sent {
                // Its refusal line is the speaker's answer: the upload is over.
                self.end_upload(id);
                return;
            }
        }
    }

    /// Forgets upload `id` and its chunks still waiting.
    fn end_upload(&mut self, id: &str) {
        self.uploads.remove(id);
        self.asked
            .retain(|_, a| a.chunk.as_ref().is_none_or(|(u, _)| u != id));
    }

    /// The answer (accepted) to the chunk at `offset` of upload `id`: more chunks, or the line
    /// that ends the upload.
    #[allow(clippy::too_many_arguments)]
    fn chunk_answered(
        &mut self,
        id: &str,
        offset: u64,
        payload: &[u8],
        responder: &str,
        now: Instant,
        new_id: &mut dyn FnMut() -> RequestId,
        out: &mut Vec<Out>,
    ) {
        let Some(u) = self.uploads.get_mut(id) else {
            return;
        };
        let command = Command::CreateFile;
        match u.upload.on_answer(offset, payload) {
            Progress::Going => self.send_chunks(id, now, new_id, out),
            Progress::Done => {
                out.push(Out::Line(legacy_line::response_line(
                    command, payload, &u.client, responder,
                )));
                self.end_upload(id);
            }
            Progress::Failed => {
                let refused = serde_json::from_slice::<Value>(payload)
                    .is_ok_and(|v| v.get("status").and_then(Value::as_str) == Some("error"));
                let line = if refused {
                    legacy_line::response_line(command, payload, &u.client, responder)
                } else {
                    legacy_line::command_error_line(
                        command,
                        responder,
                        &u.client,
                        ErrorCode::Internal,
                        "upload: the responder's count of bytes received is wrong",
                    )
                };
                out.push(Out::Line(line));
                self.end_upload(id);
            }
        }
    }

    /// The id of the oldest request of `command` from `requester` handed to the speaker.
    fn served_id(&mut self, command: Command, requester: &VmId) -> Option<RequestId> {
        let at = self
            .served
            .iter()
            .position(|(c, r, _)| *c == command && r == requester)?;
        self.served.remove(at).map(|(_, _, id)| id)
    }

    /// A publication the way refused (Dom0's policy, a rate): the speaker hears why; a command
    /// gets its `reponse` error and waits no more.
    pub fn refused(&mut self, topic: &str, payload: &[u8], reason: &str) -> Vec<u8> {
        if let Ok(Topic::Request(command)) = Topic::parse(topic) {
            let id = crate::payload::decode_envelope(payload)
                .ok()
                .and_then(|e| e.request_id);
            let asked = id.and_then(|id| self.asked.remove(&id));
            if let Some((upload, _)) = asked.as_ref().and_then(|a| a.chunk.clone()) {
                self.end_upload(&upload);
            }
            let client = asked
                .map(|a| a.client)
                .unwrap_or_else(|| self.me.to_string());
            return legacy_line::command_error_line(
                command,
                &self.router,
                &client,
                ErrorCode::Forbidden,
                &format!("refused by {}: {reason}", self.router),
            );
        }
        legacy_line::error_line(
            &self.router,
            self.addressee.as_deref().unwrap_or("application"),
            &LegacyError::Invalid(format!("{topic:?} refused by {}: {reason}", self.router)),
        )
    }

    /// A message for the speaker's VM: the line the speaker gets, if any, and the next chunks of
    /// an upload whose chunk it answers. Responses are taken only under the rule of
    /// [`crate::answers`]; requests only when the speaker serves them.
    pub fn on_message(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
        new_id: &mut dyn FnMut() -> RequestId,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        if let Some(line) = self.message(topic, payload, now, new_id, &mut out) {
            out.push(Out::Line(line));
        }
        out
    }

    fn message(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
        new_id: &mut dyn FnMut() -> RequestId,
        out: &mut Vec<Out>,
    ) -> Option<Vec<u8>> {
        match Topic::parse(topic).ok()? {
            Topic::Response { command, requester } if requester == self.me => {
                let id = serde_json::from_slice::<Value>(payload)
                    .ok()?
                    .get("request_id")?
                    .as_str()
                    .and_then(|s| RequestId::parse(s).ok())?;
                let asked = self.asked.get_mut(&id)?;
                let accepted = asked.question.accept(command, payload, now).ok()?;
                if let Some((upload, offset)) = asked.chunk.clone() {
                    // A chunk has one answer.
                    self.asked.remove(&id);
                    let responder = accepted.responder.clone();
                    self.chunk_answered(&upload, offset, payload, &responder, now, new_id, out);
                    return None;
                }
                let line = legacy_line::response_line(
                    command,
                    payload,
                    &asked.client,
                    &accepted.responder,
                );
                if asked.question.is_done(now) {
                    self.asked.remove(&id);
                }
                Some(line)
            }
            Topic::Response { .. } => None,
            Topic::Notification(n) => Some(legacy_line::notification_line(
                n,
                payload,
                &notification_source(n, payload),
            )),
            Topic::Request(command) => {
                if !legacy_line::addressed_to(payload, self.me.as_str()) {
                    return None;
                }
                let env = crate::payload::decode_envelope(payload).ok()?;
                let line = legacy_line::command_line(command, payload, self.me.as_str())?;
                if let Some(id) = env.request_id {
                    if self.served.len() >= MAX_SERVED {
                        self.served.pop_front();
                    }
                    self.served.push_back((command, env.sender, id));
                }
                Some(line)
            }
        }
    }

    /// When [`Translator::on_tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let line = self.last_byte.map(|t| t + LINE_IDLE);
        let asked = self
            .asked
            .values()
            .map(|a| a.question.next_deadline())
            .min();
        match (line, asked) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops an unfinished line without progress, and ends the commands whose time is up: a
    /// `timeout` line for each that nobody answered, and for each party that started and did
    /// not finish.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        if self.last_byte.is_some_and(|t| now >= t + LINE_IDLE) {
            let dropped = self.take_partial();
            let to = self
                .addressee
                .clone()
                .unwrap_or_else(|| "application".into());
            lines.push(legacy_line::error_line(
                &self.router,
                &to,
                &LegacyError::Invalid(format!(
                    "unfinished line of {} bytes dropped: no byte for {} s",
                    dropped.len(),
                    LINE_IDLE.as_secs()
                )),
            ));
        }
        let done: Vec<RequestId> = self
            .asked
            .iter()
            .filter(|(_, a)| a.question.is_done(now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in done {
            let Some(a) = self.asked.remove(&id) else {
                continue;
            };
            if let Some((upload, _)) = &a.chunk {
                // One timeout line for the upload, whichever of its chunks ran out first.
                if !self.uploads.contains_key(upload) {
                    continue;
                }
                self.end_upload(upload);
            }
            let command = a.question.command();
            let timeout = |source: &str, message: &str| {
                legacy_line::command_error_line(
                    command,
                    source,
                    &a.client,
                    ErrorCode::Timeout,
                    message,
                )
            };
            if a.question.answered() == 0 {
                lines.push(timeout(&self.router, "no answer in time"));
            }
            for party in a.question.pending() {
                lines.push(timeout(party, "no final answer in time"));
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests;
