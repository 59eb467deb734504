//! Answers bound to their question and their author: the one rule every requester applies (the
//! agent's `call` socket and legacy endpoint, Dom0's legacy mode).
//!
//! A response is accepted only
//! - on the response topic of the question's command (a `list_disks` answer is never taken from a
//!   `discover` response topic),
//! - with the question's `request_id` (random, 128 bits: [`RequestId::random`]),
//! - from an acceptable `responder`: the destination when one was named, else the first party that
//!   answers a single-answer command, else (a broadcast) every party once,
//! - and only as often as its command answers: once, or `started` then a last answer (benchmark).
//!
//! `responder` is stamped (or checked) by Dom0 on every response a VM publishes, against the
//! channel's identity; a response without one comes from a Dom0-local client (only those reach
//! the broker without a link) and is Dom0's ([`responder_of`]).
//!
//! Time: a question ends at its deadline, or once its answers are all in (one responder: its last
//! answer; a broadcast: the collection window is over and every party that said `started` has
//! finished). Pure: payloads and instants in, verdicts out.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::payload::RequestId;
use crate::topic::Command;
use crate::vm::{DOM0, VmId};

/// How long a requester waits for its answer unless it says otherwise.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a broadcast (`discover`, `tous`, a benchmark without destination) collects first
/// answers from parties it does not know in advance.
pub const BROADCAST_WINDOW: Duration = Duration::from_secs(2);

impl RequestId {
    /// A request id nobody can guess: 128 random bits from the caller, as 32 hex digits.
    pub fn random(bits: [u8; 16]) -> RequestId {
        let hex: String = bits.iter().map(|b| format!("{b:02x}")).collect();
        RequestId::from_trusted(hex)
    }
}

/// Who may answer a question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Responders {
    /// Only this party (a VM id, or `dom0`).
    Named(String),
    /// The first party to answer, and then only it (a command one provider serves).
    First,
    /// Every party, each once (a broadcast).
    Everyone,
}

impl Responders {
    /// Who may answer `command` sent to `destination` (None: no destination, or `tous`).
    pub fn for_request(command: Command, destination: Option<&str>) -> Responders {
        match destination {
            Some("Dom0") => Responders::Named(DOM0.to_owned()),
            Some(d) => Responders::Named(d.to_owned()),
            None if matches!(command, Command::Discover | Command::Benchmark) => {
                Responders::Everyone
            }
            None => Responders::First,
        }
    }
}

/// Why a response was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a JSON object")]
    NotObject,
    #[error("answers another command")]
    OtherCommand,
    #[error("carries another request id")]
    OtherRequest,
    #[error("responder {0:?} was not asked")]
    NotAsked(String),
    #[error("responder field is not a VM id")]
    BadResponder,
    #[error("{0:?} already answered")]
    Repeated(String),
    #[error("the question is closed")]
    Closed,
}

/// A response that was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Who answered, as Dom0 stamped it (`dom0` for Dom0's own clients).
    pub responder: String,
    /// The responder said all it will say (anything but `started`).
    pub last: bool,
}

/// Who answered a response payload: its `responder` (a VM id or `dom0`), or `dom0` when it has
/// none (Dom0's own clients; every VM's response carries the one its link stamped). None when the
/// field is there but is not a VM id.
pub fn responder_of(payload: &serde_json::Map<String, Value>) -> Option<String> {
    match payload.get("responder") {
        None | Some(Value::Null) => Some(DOM0.to_owned()),
        Some(Value::String(r)) if VmId::parse(r).is_ok() => Some(r.clone()),
        Some(_) => None,
    }
}

/// One question waiting for its answers.
#[derive(Debug, Clone)]
pub struct Question {
    command: Command,
    request_id: RequestId,
    responders: Responders,
    /// Until when parties not heard from yet may still answer (a broadcast).
    window_end: Instant,
    deadline: Instant,
    /// How long the asker waits: what its request says (`timeout_ms`).
    patience: Duration,
    /// Who answered, and whether they are finished.
    heard: BTreeMap<String, bool>,
}

impl Question {
    /// A question asked at `now` with a patience of `timeout` (None: [`ANSWER_TIMEOUT`]; a
    /// `discover` without one waits [`BROADCAST_WINDOW`], the time parties take to answer).
    pub fn new(
        command: Command,
        request_id: RequestId,
        responders: Responders,
        timeout: Option<Duration>,
        now: Instant,
    ) -> Question {
        let patience = timeout.unwrap_or(match (command, &responders) {
            (Command::Discover, Responders::Everyone) => BROADCAST_WINDOW,
            _ => ANSWER_TIMEOUT,
        });
        let window = match (command, &responders) {
            // Discover: everyone answers at once; a longer patience is a longer window.
            (Command::Discover, _) => patience,
            _ => BROADCAST_WINDOW.min(patience),
        };
        Question {
            command,
            request_id,
            responders,
            window_end: now + window,
            deadline: now + patience,
            patience,
            heard: BTreeMap::new(),
        }
    }

    /// How long the asker waits for the answers: the request's `timeout_ms`.
    pub fn patience(&self) -> Duration {
        self.patience
    }

    pub fn command(&self) -> Command {
        self.command
    }

    pub fn request_id(&self) -> &RequestId {
        &self.request_id
    }

    /// Responses taken so far (one per responder).
    pub fn answered(&self) -> usize {
        self.heard.len()
    }

    /// Parties that said `started` and have not finished.
    pub fn pending(&self) -> impl Iterator<Item = &str> {
        self.heard
            .iter()
            .filter(|(_, done)| !**done)
            .map(|(r, _)| r.as_str())
    }

    /// Takes or refuses a response that arrived on the response topic of `command` addressed to
    /// the requester.
    pub fn accept(
        &mut self,
        command: Command,
        payload: &[u8],
        now: Instant,
    ) -> Result<Accepted, Refusal> {
        if self.is_done(now) {
            return Err(Refusal::Closed);
        }
        if command != self.command {
            return Err(Refusal::OtherCommand);
        }
        let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(payload) else {
            return Err(Refusal::NotObject);
        };
        if m.get("request_id").and_then(Value::as_str) != Some(self.request_id.as_str()) {
            return Err(Refusal::OtherRequest);
        }
        let responder = responder_of(&m).ok_or(Refusal::BadResponder)?;
        let known = self.heard.get(&responder).copied();
        let admitted = match &self.responders {
            Responders::Named(n) => *n == responder,
            Responders::First => self.heard.is_empty() || known.is_some(),
            Responders::Everyone => known.is_some() || now < self.window_end,
        };
        if !admitted {
            return Err(Refusal::NotAsked(responder));
        }
        if known == Some(true) {
            return Err(Refusal::Repeated(responder));
        }
        let last = m.get("status").and_then(Value::as_str) != Some("started");
        if known == Some(false) && !last {
            return Err(Refusal::Repeated(responder));
        }
        self.heard.insert(responder.clone(), last);
        Ok(Accepted { responder, last })
    }

    /// True once nothing more will be taken: the deadline passed, or every answer is in.
    pub fn is_done(&self, now: Instant) -> bool {
        if now >= self.deadline {
            return true;
        }
        let all_finished = self.heard.values().all(|done| *done);
        match self.responders {
            Responders::Named(_) | Responders::First => !self.heard.is_empty() && all_finished,
            Responders::Everyone => now >= self.window_end && all_finished,
        }
    }

    /// When [`Question::is_done`] may turn true without an answer arriving.
    pub fn next_deadline(&self) -> Instant {
        match self.responders {
            Responders::Everyone if self.heard.values().all(|d| *d) => {
                self.window_end.min(self.deadline)
            }
            _ => self.deadline,
        }
    }
}

#[cfg(test)]
mod tests;
