//! Legacy mode of a link: the guest has no agent and speaks the MVP's JSON lines on its channel (its
//! first byte is `{`). The link translates on its behalf, under the same identity rule and the same
//! policy: the guest's commands become requests (`sender` the VM, whatever `source` says), its
//! responses and notifications are published as the VM, and what the broker delivers to the VM
//! (responses, notifications, requests it serves) comes back as MVP lines.
//!
//! Pure: lines and broker deliveries in, lines and publications out; the session (`session.rs`)
//! frames the broker side and checks every publication against the policy.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use topics::ErrorCode;
use topics::filter;
use topics::legacy_line::{self, Destination, LegacyError, LegacyLine, LineItem, LineReader};
use topics::topic::{Command, Topic};
use topics::vm::VmId;

use crate::policy::Rules;

/// How long a command to one responder waits for an answer before the guest is told "timeout".
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the translation asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// A line for the guest.
    Line(Vec<u8>),
    /// A publication for the broker, as the VM (the session checks it against the policy first).
    Publish { topic: String, payload: Vec<u8> },
}

/// A command of the guest waiting for its answer.
#[derive(Debug)]
struct Pending {
    command: Command,
    deadline: Instant,
    answered: bool,
}

/// The legacy side of one link.
#[derive(Debug)]
pub struct LegacyMode {
    vm: VmId,
    /// The guest's bytes, cut into lines.
    input: LineReader,
    next_id: u64,
    /// Commands by request id.
    pending: HashMap<String, Pending>,
}

impl LegacyMode {
    pub fn new(vm: VmId) -> LegacyMode {
        LegacyMode {
            vm,
            input: LineReader::default(),
            next_id: 0,
            pending: HashMap::new(),
        }
    }

    /// What the link subscribes to for the guest: its responses, the notifications, and the
    /// requests it may serve, as far as the policy lets it read them.
    pub fn subscriptions(vm: &VmId, rules: &Rules) -> Vec<String> {
        [
            filter::responses_to(vm.as_str()),
            filter::notifications(),
            filter::disk_requests(),
            Command::Discover.request_topic(),
            Command::Benchmark.request_topic(),
        ]
        .into_iter()
        .filter(|f| rules.check_subscribe(f).is_ok())
        .collect()
    }

    /// Bytes waiting in an unfinished line.
    pub fn partial(&self) -> &[u8] {
        self.input.partial()
    }

    /// Takes the unfinished line's bytes (the guest switches to MQTT: they may be its CONNECT).
    pub fn take_partial(&mut self) -> Vec<u8> {
        self.input.take_partial()
    }

    /// Bytes from the guest: complete lines are served.
    pub fn on_guest(&mut self, bytes: &[u8], now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        self.input.push(bytes);
        while let Some(item) = self.input.next_line() {
            match item {
                LineItem::Line(line) => self.line(&line, now, &mut out),
                LineItem::TooLong => out.push(Out::Line(legacy_line::error_line(
                    "Dom0",
                    self.vm.as_str(),
                    &LegacyError::TooLong(legacy_line::MAX_LINE + 1),
                ))),
            }
        }
        out
    }

    fn line(&mut self, line: &[u8], now: Instant, out: &mut Vec<Out>) {
        let parsed = match legacy_line::parse(line) {
            Ok(l) => l,
            Err(e) => {
                out.push(Out::Line(legacy_line::error_line(
                    "Dom0",
                    self.vm.as_str(),
                    &e,
                )));
                return;
            }
        };
        match parsed {
            LegacyLine::Command {
                command,
                destination,
                arguments,
            } => {
                self.next_id += 1;
                let id = format!("legacy-{}", self.next_id);
                // The identity is the channel's: `source` and any `sender` are replaced.
                let (topic, payload) =
                    legacy_line::request(command, &destination, &arguments, &self.vm, &id);
                let window = if destination == Destination::All {
                    Duration::from_millis(legacy_line::ALL_WINDOW_MS)
                } else {
                    ANSWER_TIMEOUT
                };
                self.pending.insert(
                    id,
                    Pending {
                        command,
                        deadline: now + window,
                        answered: false,
                    },
                );
                out.push(Out::Publish { topic, payload });
            }
            other => {
                if let Some((topic, payload)) = legacy_line::publication(&other) {
                    let payload = match other {
                        LegacyLine::Response { .. } => {
                            topics::payload::with_responder(&payload, self.vm.as_str())
                        }
                        _ => payload,
                    };
                    out.push(Out::Publish { topic, payload });
                }
            }
        }
    }

    /// A refused publication: the guest hears why (a command gets its `reponse` error).
    pub fn refused(&mut self, topic: &str, payload: &[u8], reason: &str) -> Vec<u8> {
        if let Ok(Topic::Request(command)) = Topic::parse(topic) {
            if let Ok(env) = topics::payload::decode_envelope(payload) {
                if let Some(id) = env.request_id {
                    self.pending.remove(id.as_str());
                }
            }
            return legacy_line::command_error_line(
                command,
                "Dom0",
                self.vm.as_str(),
                ErrorCode::Forbidden,
                &format!("refused by Dom0: {reason}"),
            );
        }
        legacy_line::error_line(
            "Dom0",
            self.vm.as_str(),
            &LegacyError::Invalid(format!("{topic:?} refused by Dom0: {reason}")),
        )
    }

    /// A message the broker delivers to the VM, as a line for the guest.
    pub fn on_broker(&mut self, topic: &str, payload: &[u8]) -> Option<Vec<u8>> {
        match Topic::parse(topic).ok()? {
            Topic::Response { command, requester } if requester == self.vm => {
                let id = topics::payload::decode_response::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|r| r.request_id);
                if let Some(p) = id.and_then(|id| self.pending.get_mut(id.as_str())) {
                    p.answered = true;
                }
                Some(legacy_line::response_line(
                    command,
                    payload,
                    self.vm.as_str(),
                    "tous",
                ))
            }
            Topic::Response { .. } => None,
            Topic::Notification(n) => Some(legacy_line::notification_line(n, payload, "Dom0")),
            Topic::Request(command) => {
                if !legacy_line::addressed_to(payload, self.vm.as_str()) {
                    return None;
                }
                legacy_line::command_line(command, payload, self.vm.as_str())
            }
        }
    }

    /// When the next unanswered command times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Commands past their deadline: a `timeout` error for those nobody answered.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let due: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| now >= p.deadline)
            .map(|(id, _)| id.clone())
            .collect();
        let mut lines = Vec::new();
        for id in due {
            if let Some(p) = self.pending.remove(&id) {
                if !p.answered {
                    lines.push(legacy_line::command_error_line(
                        p.command,
                        "Dom0",
                        self.vm.as_str(),
                        ErrorCode::Timeout,
                        "no answer in time",
                    ));
                }
            }
        }
        lines
    }
}

/// True when `bytes` (what a guest sent first) looks like the MVP's JSON lines.
pub fn looks_legacy(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{')
}

#[cfg(test)]
mod tests;
