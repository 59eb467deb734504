//! The centre's commands on a host, in the controller: admitted against the `[fleet]` allow list
//! and their age, re-issued under the reserved requester `fleet` with a request id of the host's
//! own, and their answers — taken under the one answer rule (`topics::answers`: the question's
//! topic, its id, its destination) — published back under the centre's `request_id` on
//! `fleet/out/<root>/response`. A refused or stale command is answered (`forbidden`, `timeout`),
//! never silent. Pure: payloads and instants in, messages to publish out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use topics::answers::{Question, Responders};
use topics::fleet::{self, FleetCommand, FleetCommandError};
use topics::payload::{DEADLINE_MS, MAX_REQUEST_TIMEOUT, TIMEOUT_MS};
use topics::topic::{Command, Topic};
use topics::vm::{DOM0, FLEET};
use topics::{ErrorBody, ErrorCode, RequestId, Response};

use crate::bench::Reply;
use crate::fleet::config::Allow;

/// Fleet commands in flight on a host at once; beyond, a command is answered `busy`.
pub const MAX_PENDING: usize = 64;
/// How far ahead of the host's clock a command's `issued_at` may be (clocks differ).
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// Why a command is not run: its answer's error.
pub fn admit(
    c: &FleetCommand,
    allow: &Allow,
    max_age: Duration,
    now_ms: u64,
) -> Result<(), ErrorBody> {
    let max_age_ms = max_age.as_millis() as u64;
    if c.issued_at_ms > now_ms.saturating_add(CLOCK_SKEW.as_millis() as u64) {
        return Err(ErrorBody::new(
            ErrorCode::InvalidArgument,
            format!(
                "`issued_at` is {} ms ahead of this host's clock",
                c.issued_at_ms - now_ms
            ),
        ));
    }
    if c.age_ms(now_ms) > max_age_ms {
        return Err(ErrorBody::new(
            ErrorCode::Timeout,
            format!(
                "issued {} ms ago, older than this host's maximum age ({} ms): not run",
                c.age_ms(now_ms),
                max_age_ms
            ),
        ));
    }
    if !allow.permits(&c.destination, c.command) {
        return Err(ErrorBody::new(
            ErrorCode::Forbidden,
            format!(
                "{} for {} is not on this host's fleet allow list",
                c.command.short_name(),
                c.destination
            ),
        ));
    }
    Ok(())
}

#[derive(Debug)]
struct Pending {
    centre_id: RequestId,
    question: Question,
}

/// The commands re-issued on this host and waiting for their answers.
#[derive(Debug, Default)]
pub struct Relay {
    pending: HashMap<RequestId, Pending>,
}

/// An answer from the host itself (`responder: dom0`).
fn refusal(command: Command, centre_id: Option<RequestId>, error: ErrorBody) -> Reply {
    Reply {
        topic: fleet::local_answer(command),
        body: topics::payload::with_responder(
            &Response::<topics::payload::NoArgs>::error(centre_id, error).to_json(),
            DOM0,
        ),
    }
}

impl Relay {
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// A command on `fleet/in/<root>/request`: a request to publish on the host's broker, or
    /// the answer that refuses it. `local_id` is a fresh random id for the re-issued request.
    pub fn command(
        &mut self,
        topic: &str,
        payload: &[u8],
        allow: &Allow,
        max_age: Duration,
        (now, now_ms): (Instant, u64),
        local_id: RequestId,
    ) -> Option<Reply> {
        let command = fleet::local_command(topic)?;
        let c = match fleet::parse_command(command, payload) {
            Ok(c) => c,
            Err((None, FleetCommandError::Unanswerable)) | Err((None, _)) => {
                tracing::debug!(topic, "fleet command without a request_id; cannot answer");
                return None;
            }
            Err((Some(id), e)) => {
                return Some(refusal(
                    command,
                    Some(id),
                    ErrorBody::new(ErrorCode::InvalidArgument, e.to_string()),
                ));
            }
        };
        if let Err(e) = admit(&c, allow, max_age, now_ms) {
            tracing::warn!(command = command.short_name(), destination = %c.destination,
                code = %e.code, "fleet command refused");
            return Some(refusal(command, Some(c.request_id), e));
        }
        if self.pending.len() >= MAX_PENDING {
            return Some(refusal(
                command,
                Some(c.request_id),
                ErrorBody::new(
                    ErrorCode::Busy,
                    format!("{MAX_PENDING} fleet commands already in flight on this host"),
                ),
            ));
        }
        let patience = c
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(topics::answers::ANSWER_TIMEOUT)
            .min(MAX_REQUEST_TIMEOUT);
        let mut body = c.args.clone();
        body.insert("sender".into(), FLEET.into());
        body.insert("request_id".into(), local_id.as_str().into());
        body.insert("destination".into(), c.destination.clone().into());
        body.insert(TIMEOUT_MS.into(), (patience.as_millis() as u64).into());
        body.insert(
            DEADLINE_MS.into(),
            now_ms.saturating_add(patience.as_millis() as u64).into(),
        );
        let question = Question::new(
            command,
            local_id.clone(),
            Responders::Named(c.destination.clone()),
            Some(patience),
            now,
        );
        self.pending.insert(
            local_id,
            Pending {
                centre_id: c.request_id,
                question,
            },
        );
        Some(Reply {
            topic: command.request_topic(),
            body: Value::Object(body).to_string().into_bytes(),
        })
    }

    /// A response addressed to `fleet`: forwarded to the centre under its own request id when
    /// it answers a pending question; anything else is dropped.
    pub fn response(&mut self, topic: &str, payload: &[u8], now: Instant) -> Option<Reply> {
        let Ok(Topic::Response { command, requester }) = Topic::parse(topic) else {
            return None;
        };
        if requester.as_str() != FLEET {
            return None;
        }
        let id = serde_json::from_slice::<Value>(payload)
            .ok()?
            .get("request_id")?
            .as_str()
            .and_then(|s| RequestId::parse(s).ok())?;
        let p = self.pending.get_mut(&id)?;
        if let Err(why) = p.question.accept(command, payload, now) {
            tracing::debug!(%why, "answer to a fleet command not taken");
            return None;
        }
        let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(payload) else {
            return None;
        };
        m.insert("request_id".into(), p.centre_id.as_str().into());
        if p.question.is_done(now) {
            self.pending.remove(&id);
        }
        Some(Reply {
            topic: fleet::local_answer(command),
            body: Value::Object(m).to_string().into_bytes(),
        })
    }

    /// Questions over: the unanswered ones get a `timeout` answer.
    pub fn expire(&mut self, now: Instant) -> Vec<Reply> {
        let done: Vec<RequestId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.question.is_done(now))
            .map(|(id, _)| id.clone())
            .collect();
        done.into_iter()
            .filter_map(|id| self.pending.remove(&id))
            .filter(|p| p.question.answered() == 0)
            .map(|p| {
                refusal(
                    p.question.command(),
                    Some(p.centre_id),
                    ErrorBody::new(
                        ErrorCode::Timeout,
                        format!(
                            "no answer within {} ms on this host",
                            p.question.patience().as_millis()
                        ),
                    ),
                )
            })
            .collect()
    }

    /// When [`Relay::expire`] has work next.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .map(|p| p.question.next_deadline())
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CENTRE_ID: &str = "c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0";
    const NOW_MS: u64 = 1_800_000_000_000;

    fn allow() -> Allow {
        let text = "host = \"h\"\ncentre = [\"127.0.0.1:1\"]\nca_file=\"\"\ncert_file=\"\"\nkey_file=\"\"\npassword_file=\"\"\n[allow]\n\"sys-usb\" = [\"list_disks\"]\n";
        topics::config_file::parse::<crate::fleet::config::FleetConfig>(text, "t")
            .unwrap()
            .validate()
            .unwrap()
            .allow
    }

    fn local_id(n: u8) -> RequestId {
        RequestId::random([n; 16])
    }

    fn cmd(command: Command, dest: &str, issued_at: u64) -> (String, Vec<u8>) {
        (
            format!("fleet/in/{}/request", command.root()),
            format!(
                r#"{{"request_id":"{CENTRE_ID}","destination":"{dest}","issued_at":{issued_at},"sender":"vm-gui"}}"#
            )
            .into_bytes(),
        )
    }

    fn json(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn admitted_commands_are_reissued_as_fleet_and_answered_back_under_the_centres_id() {
        let mut r = Relay::default();
        let t0 = Instant::now();
        let (topic, body) = cmd(Command::ListDisks, "sys-usb", NOW_MS - 1000);
        let out = r
            .command(
                &topic,
                &body,
                &allow(),
                Duration::from_secs(60),
                (t0, NOW_MS),
                local_id(1),
            )
            .unwrap();
        assert_eq!(out.topic, "system/disks/list_disks/request");
        let req = json(&out.body);
        assert_eq!(req["sender"], "fleet", "never the sender the centre wrote");
        assert_eq!(req["destination"], "sys-usb");
        assert_eq!(req["request_id"], local_id(1).as_str());
        assert_eq!(req["deadline_ms"], NOW_MS + 10_000);
        assert_eq!(r.pending(), 1);

        let resp_topic = "system/disks/list_disks/response/fleet";
        let answer = |id: &str, responder: &str| {
            format!(r#"{{"request_id":"{id}","status":"ok","responder":"{responder}","disks":[]}}"#)
        };
        // Not the question's author, not its id, not its topic: dropped.
        let l1 = local_id(1);
        for (t, p) in [
            (resp_topic, answer(l1.as_str(), "vm-gui")),
            (resp_topic, answer(CENTRE_ID, "sys-usb")),
            (
                "system/disks/list_files/response/fleet",
                answer(l1.as_str(), "sys-usb"),
            ),
            (
                "system/disks/list_disks/response/vm-gui",
                answer(l1.as_str(), "sys-usb"),
            ),
        ] {
            assert_eq!(r.response(t, p.as_bytes(), t0), None, "{t} {p}");
        }
        let back = r
            .response(resp_topic, answer(l1.as_str(), "sys-usb").as_bytes(), t0)
            .unwrap();
        assert_eq!(back.topic, "fleet/out/system/disks/list_disks/response");
        let a = json(&back.body);
        assert_eq!(a["request_id"], CENTRE_ID);
        assert_eq!(a["responder"], "sys-usb");
        assert_eq!(r.pending(), 0);
        // Answered once: a repeat is dropped.
        assert_eq!(
            r.response(resp_topic, answer(l1.as_str(), "sys-usb").as_bytes(), t0),
            None
        );
    }

    #[test]
    fn refused_and_stale_commands_are_answered_and_nothing_is_published() {
        let t0 = Instant::now();
        let max_age = Duration::from_secs(60);
        let cases = [
            (cmd(Command::ReadFile, "sys-usb", NOW_MS), "forbidden"),
            (cmd(Command::ListDisks, "vm-gui", NOW_MS), "forbidden"),
            (
                cmd(Command::ListDisks, "sys-usb", NOW_MS - 61_000),
                "timeout",
            ),
            (
                cmd(Command::ListDisks, "sys-usb", NOW_MS + 31_000),
                "invalid_argument",
            ),
            (
                (
                    "fleet/in/system/disks/list_disks/request".into(),
                    format!(r#"{{"request_id":"{CENTRE_ID}","issued_at":1}}"#).into_bytes(),
                ),
                "invalid_argument",
            ),
        ];
        for ((topic, body), code) in cases {
            let mut r = Relay::default();
            let out = r
                .command(&topic, &body, &allow(), max_age, (t0, NOW_MS), local_id(2))
                .unwrap();
            assert!(out.topic.starts_with("fleet/out/"), "{}", out.topic);
            let a = json(&out.body);
            assert_eq!(a["error"]["code"], code, "{a}");
            assert_eq!(a["request_id"], CENTRE_ID);
            assert_eq!(a["responder"], "dom0");
            assert_eq!(r.pending(), 0);
        }
        // Without a request id there is nobody to answer.
        let mut r = Relay::default();
        assert_eq!(
            r.command(
                "fleet/in/system/disks/list_disks/request",
                b"{}",
                &allow(),
                max_age,
                (t0, NOW_MS),
                local_id(3)
            ),
            None
        );
    }

    #[test]
    fn an_unanswered_command_times_out_with_an_answer() {
        let mut r = Relay::default();
        let t0 = Instant::now();
        let (topic, body) = cmd(Command::ListDisks, "sys-usb", NOW_MS);
        r.command(
            &topic,
            &body,
            &allow(),
            Duration::from_secs(60),
            (t0, NOW_MS),
            local_id(4),
        )
        .unwrap();
        assert!(r.expire(t0 + Duration::from_secs(1)).is_empty());
        let deadline = r.next_deadline().unwrap();
        let out = r.expire(deadline);
        assert_eq!(out.len(), 1);
        assert_eq!(json(&out[0].body)["error"]["code"], "timeout");
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn in_flight_commands_are_bounded() {
        let mut r = Relay::default();
        let t0 = Instant::now();
        let (topic, body) = cmd(Command::ListDisks, "sys-usb", NOW_MS);
        for i in 0..MAX_PENDING {
            let mut bits = [0u8; 16];
            bits[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let out = r
                .command(
                    &topic,
                    &body,
                    &allow(),
                    Duration::from_secs(60),
                    (t0, NOW_MS),
                    RequestId::random(bits),
                )
                .unwrap();
            assert!(out.topic.ends_with("/request"));
        }
        let out = r
            .command(
                &topic,
                &body,
                &allow(),
                Duration::from_secs(60),
                (t0, NOW_MS),
                local_id(9),
            )
            .unwrap();
        assert_eq!(json(&out.body)["error"]["code"], "busy");
    }
}
