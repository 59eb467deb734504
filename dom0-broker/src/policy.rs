//! Per-VM policy: which topics a VM may publish to and subscribe to. Deny by default.
//!
//! Evaluation (order-independent, written down in `docs/security.md`):
//! 1. `$`-topics and the fleet's `fleet/` tree (the bridge to the operations centre) are never
//!    reachable from a VM, whatever the rules say.
//! 2. A VM's effective rules are its own section plus the `*` section; `{vm}` becomes its name;
//!    roles expand to plain filters.
//! 3. A `deny_*` filter that matches wins over every allow.
//! 4. Otherwise an allow filter must match (publish, delivery) or cover (subscribe) the topic.
//! 5. Otherwise: denied.
//!
//! A subscription with wildcards is allowed only if every topic it can match is readable: it must be
//! covered by one allowed filter and intersect no deny filter. It is refused, never narrowed.
//! Publishing to a topic whose last level is `request`, `response/<vm>` or `notification` also
//! needs a JSON object payload whose identity field (`sender`, `responder`, `origin`) is the VM
//! itself or absent (then filled in with the VM).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use topics::config_file::ConfigError;
use topics::filter::{self, filter_covers, filter_matches, filters_intersect};
use topics::topic::{Command, Notification, validate_filter};
use topics::vm::VmId;

/// Why an action was denied. Carries no payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// `$`-topics are the broker's.
    Reserved,
    /// The topic or filter is not valid under our grammar.
    Invalid(String),
    /// No allow rule matches.
    NotAllowed,
    /// A deny rule matches.
    Denied(String),
    /// A request, response or notification whose identity field (`sender`, `responder`,
    /// `origin`) names another party or is malformed, or whose payload is not a JSON object.
    Sender(String),
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Reserved => {
                f.write_str("$-topics and fleet/ topics are reserved to the broker and Dom0")
            }
            Denial::Invalid(e) => write!(f, "invalid topic: {e}"),
            Denial::NotAllowed => f.write_str("no rule allows it"),
            Denial::Denied(rule) => write!(f, "denied by rule {rule:?}"),
            Denial::Sender(e) => write!(f, "sender check failed: {e}"),
        }
    }
}

/// What `{vm}` stands for in a policy filter: the VM's own name.
pub const VM_PLACEHOLDER: &str = "{vm}";

/// Roles: sugar that expands to plain filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Asks the dictionary's commands and reads responses addressed to itself and notifications.
    Client,
    /// Serves the disk commands (`sys-usb`): reads their requests, answers them, announces files.
    DiskProvider,
    /// Answers `discover` and `benchmark` (every agent does), reads the responses addressed to it.
    Agent,
}

impl Role {
    /// (publish, subscribe) filters of the role, with `{vm}` placeholders.
    pub fn filters(self) -> (Vec<String>, Vec<String>) {
        match self {
            Role::Client => (
                vec![filter::requests(), Notification::Error.topic()],
                vec![
                    filter::responses_to(VM_PLACEHOLDER),
                    filter::notifications(),
                ],
            ),
            Role::DiskProvider => (
                vec![
                    filter::disk_responses_to("+"),
                    Notification::NewFile.topic(),
                ],
                vec![filter::disk_requests()],
            ),
            Role::Agent => (
                vec![
                    Command::Discover.response_filter("+"),
                    Command::Benchmark.response_filter("+"),
                    Notification::Error.topic(),
                    // Its components, when its session comes up and when they change.
                    Notification::Announce.topic(),
                ],
                vec![
                    Command::Discover.request_topic(),
                    Command::Benchmark.request_topic(),
                    // Responses addressed to itself: what its agent subscribes to, and where
                    // Dom0 answers a request its policy refuses.
                    filter::responses_to(VM_PLACEHOLDER),
                    // The dictionary's notifications (the note sends them to everyone): what an
                    // agent's legacy endpoint gives its MVP applications.
                    filter::notifications(),
                ],
            ),
        }
    }
}

/// One section of the policy file: rules for a VM name or for `*`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    #[serde(default)]
    pub roles: Vec<Role>,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub deny_publish: Vec<String>,
    #[serde(default)]
    pub deny_subscribe: Vec<String>,
}

/// The policy file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Sections keyed by VM name or `*`.
    #[serde(default)]
    pub vm: BTreeMap<String, Section>,
}

/// A VM's effective rules, `{vm}` substituted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    pub deny_publish: Vec<String>,
    pub deny_subscribe: Vec<String>,
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    file: PolicyFile,
}

/// Why a policy cannot be used. `run` refuses to start on any of these.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not read, or not TOML of the policy's keys (the one reading of config files).
    #[error(transparent)]
    File(#[from] ConfigError),
    #[error("{path}:{line}: [vm.{section:?}]: {message}")]
    Invalid {
        path: String,
        /// 1-based line of the offending entry (0 when it cannot be found).
        line: usize,
        section: String,
        message: String,
    },
}

/// The policy built in when no file is given (same as `deploy/alpine/policy.toml`).
pub const DEFAULT_POLICY: &str = include_str!("../../deploy/alpine/policy.toml");

impl Policy {
    /// Parses and validates a policy; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        let file: PolicyFile = topics::config_file::parse(text, origin)?;
        for (name, section) in &file.vm {
            // The line of the section header, and of an entry within the section.
            let header = line_of(text, 0, &[format!("vm.{name}]"), format!("vm.\"{name}\"]")]);
            let invalid_at = |needle: Option<&str>, message: String| PolicyError::Invalid {
                path: origin.to_owned(),
                line: match needle {
                    Some(n) => line_of(text, header, &[format!("\"{n}\""), format!("'{n}'")]),
                    None => header,
                },
                section: name.clone(),
                message,
            };
            let invalid = |message: String| invalid_at(None, message);
            if name != "*" {
                VmId::parse(name).map_err(|e| invalid(format!("not a VM name: {e}")))?;
                if name == topics::vm::DOM0 {
                    return Err(invalid("`dom0` is Dom0 itself, not a VM".into()));
                }
                if name == topics::vm::FLEET {
                    return Err(invalid(
                        "`fleet` is the operations centre's requester, not a VM".into(),
                    ));
                }
            }
            let lists = [
                ("publish", &section.publish),
                ("subscribe", &section.subscribe),
                ("deny_publish", &section.deny_publish),
                ("deny_subscribe", &section.deny_subscribe),
            ];
            for (list, filters) in lists {
                for f in filters {
                    let bad = |why: String| invalid_at(Some(f), format!("{list}: {f:?}: {why}"));
                    let concrete = f.replace(VM_PLACEHOLDER, "x");
                    if concrete.contains(['{', '}']) {
                        return Err(bad("only {vm} may be substituted".into()));
                    }
                    validate_filter(&concrete).map_err(|e| bad(e.to_string()))?;
                    if f.split('/')
                        .any(|l| l.contains(VM_PLACEHOLDER) && l != VM_PLACEHOLDER)
                    {
                        return Err(bad("{vm} must be a whole level".into()));
                    }
                }
            }
        }
        Ok(Policy { file })
    }

    /// Loads a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::read(path, e))?;
        Policy::parse(&text, &path.display().to_string())
    }

    /// The built-in default policy.
    pub fn builtin() -> Policy {
        // The built-in policy is tested to parse; fall back to deny-all rather than panic.
        Policy::parse(DEFAULT_POLICY, "built-in policy").unwrap_or(Policy {
            file: PolicyFile::default(),
        })
    }

    /// VM names with their own section.
    pub fn named_vms(&self) -> impl Iterator<Item = &str> {
        self.file
            .vm
            .keys()
            .filter(|k| *k != "*")
            .map(String::as_str)
    }

    /// The effective rules of a VM: the `*` section and its own, `{vm}` its name, without repeats.
    pub fn rules_for(&self, vm: &VmId) -> Rules {
        let mut rules = Rules::default();
        for key in ["*", vm.as_str()] {
            if let Some(section) = self.file.vm.get(key) {
                section.expand_into(vm.as_str(), &mut rules);
            }
        }
        for list in [
            &mut rules.publish,
            &mut rules.subscribe,
            &mut rules.deny_publish,
            &mut rules.deny_subscribe,
        ] {
            let mut seen = std::collections::BTreeSet::new();
            list.retain(|f| seen.insert(f.clone()));
        }
        rules
    }

    /// The rendered section names, for the Mosquitto ACL and `check-policy`.
    pub fn sections(&self) -> &BTreeMap<String, Section> {
        &self.file.vm
    }
}

/// The 1-based number of the first line at or after line `from` that contains one of `needles`
/// (0 when none does).
fn line_of(text: &str, from: usize, needles: &[String]) -> usize {
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| needles.iter().any(|n| l.contains(n.as_str())))
        .map_or(0, |(i, _)| i + 1)
}

impl Section {
    /// Adds the section's filters to `rules`, roles expanded and `{vm}` replaced by `name` (a VM
    /// name, or Mosquitto's `%c` in the rendered ACL).
    pub fn expand_into(&self, name: &str, rules: &mut Rules) {
        let subst = |filters: &[String]| -> Vec<String> {
            filters
                .iter()
                .map(|f| f.replace(VM_PLACEHOLDER, name))
                .collect()
        };
        for role in &self.roles {
            let (publish, subscribe) = role.filters();
            rules.publish.extend(subst(&publish));
            rules.subscribe.extend(subst(&subscribe));
        }
        rules.publish.extend(subst(&self.publish));
        rules.subscribe.extend(subst(&self.subscribe));
        rules.deny_publish.extend(subst(&self.deny_publish));
        rules.deny_subscribe.extend(subst(&self.deny_subscribe));
    }
}

impl Rules {
    /// May the VM publish to `topic` (a name)? The topic alone: [`check_publish`] adds the
    /// `sender` check of requests.
    pub fn check_publish_topic(&self, topic: &str) -> Result<(), Denial> {
        if topic.starts_with('$') || filter_matches(&topics::fleet::everything(), topic) {
            return Err(Denial::Reserved);
        }
        topics::topic::validate_name(topic).map_err(|e| Denial::Invalid(e.to_string()))?;
        if let Some(d) = self.deny_publish.iter().find(|d| filter_matches(d, topic)) {
            return Err(Denial::Denied(d.clone()));
        }
        if self.publish.iter().any(|a| filter_matches(a, topic)) {
            Ok(())
        } else {
            Err(Denial::NotAllowed)
        }
    }

    /// May the VM subscribe to `filter`? Every topic it can match must be readable.
    pub fn check_subscribe(&self, filter: &str) -> Result<(), Denial> {
        if filter.starts_with('$') || filters_intersect(&topics::fleet::everything(), filter) {
            return Err(Denial::Reserved);
        }
        validate_filter(filter).map_err(|e| Denial::Invalid(e.to_string()))?;
        if let Some(d) = self
            .deny_subscribe
            .iter()
            .find(|d| filters_intersect(d, filter))
        {
            return Err(Denial::Denied(d.clone()));
        }
        if self.subscribe.iter().any(|a| filter_covers(a, filter)) {
            Ok(())
        } else {
            Err(Denial::NotAllowed)
        }
    }

    /// May a message on `topic` be delivered to the VM? (Defence in depth at delivery.)
    pub fn check_deliver(&self, topic: &str) -> Result<(), Denial> {
        if topic.starts_with('$') || filter_matches(&topics::fleet::everything(), topic) {
            return Err(Denial::Reserved);
        }
        if let Some(d) = self
            .deny_subscribe
            .iter()
            .find(|d| filter_matches(d, topic))
        {
            return Err(Denial::Denied(d.clone()));
        }
        if self.subscribe.iter().any(|a| filter_matches(a, topic)) {
            Ok(())
        } else {
            Err(Denial::NotAllowed)
        }
    }
}

/// True for topics whose payload must carry the publisher's own `sender`.
pub fn is_request_topic(topic: &str) -> bool {
    topic.rsplit('/').next() == Some(topics::topic::REQUEST)
}

/// True for topics `.../notification`, whose `origin` is the publisher.
pub fn is_notification_topic(topic: &str) -> bool {
    topic.rsplit('/').next() == Some(topics::topic::NOTIFICATION)
}

/// True for topics `.../response/<requester>`, whose `responder` is the publisher.
pub fn is_response_topic(topic: &str) -> bool {
    let mut levels = topic.rsplit('/');
    levels.next();
    levels.next() == Some(topics::topic::RESPONSE)
}

/// The identity field of a publication on `topic`: `sender` of a request, `responder` of a
/// response, `origin` of a notification; None for other topics.
pub fn identity_field(topic: &str) -> Option<&'static str> {
    if is_request_topic(topic) {
        Some("sender")
    } else if is_response_topic(topic) {
        Some("responder")
    } else if is_notification_topic(topic) {
        Some("origin")
    } else {
        None
    }
}

/// Checks the identity field of a payload against the channel's VM: absent, it is filled in (the
/// payload to send instead is returned; the note writes `{}` and the channel says who it is);
/// naming anyone else, refused. A request's `request_id`, when present, must be a valid one; with
/// `now_ms` (Dom0's clock, ms since the epoch), a request gets its `deadline_ms` from its
/// `timeout_ms` (whatever deadline the VM wrote is replaced).
pub fn stamp_identity(
    vm: &VmId,
    field: &str,
    payload: &[u8],
    now_ms: Option<u64>,
) -> Result<Option<Vec<u8>>, Denial> {
    // The other fields stay as they came (a chunk's data is not decoded and encoded again).
    let mut m =
        topics::raw_object::RawObject::parse(payload).map_err(|e| Denial::Sender(e.to_string()))?;
    let mut rewritten = false;
    if field == "sender" {
        match m.get::<serde_json::Value>("request_id") {
            None | Some(Ok(serde_json::Value::Null)) => {}
            Some(Ok(serde_json::Value::String(id))) => {
                topics::RequestId::parse(&id)
                    .map_err(|e| Denial::Sender(format!("request_id: {e}")))?;
            }
            Some(_) => return Err(Denial::Sender("request_id must be a string".into())),
        }
        if let Some(now) = now_ms {
            let deadline = topics::payload::deadline_for(&m, now);
            m.set(topics::payload::DEADLINE_MS, &deadline.into());
            rewritten = true;
        }
    }
    if m.is_unset(field) {
        m.set(field, &serde_json::Value::String(vm.to_string()));
        rewritten = true;
    } else {
        match m.get::<serde_json::Value>(field) {
            Some(Ok(serde_json::Value::String(r))) if r == vm.as_str() => {}
            Some(Ok(serde_json::Value::String(r))) => {
                return Err(Denial::Sender(format!(
                    "{field} is {:?}, not the channel's VM",
                    r.chars().take(64).collect::<String>()
                )));
            }
            _ => return Err(Denial::Sender(format!("{field} must be a string"))),
        }
    }
    Ok(rewritten.then(|| m.to_vec()))
}

/// The whole publish decision: topic rules, then the identity field of requests, responses and
/// notifications (see [`stamp_identity`]), and with `now_ms` a request's deadline. Ok(Some(payload)):
/// publish that payload instead.
pub fn check_publish(
    rules: &Rules,
    vm: &VmId,
    topic: &str,
    payload: &[u8],
    now_ms: Option<u64>,
) -> Result<Option<Vec<u8>>, Denial> {
    rules.check_publish_topic(topic)?;
    match identity_field(topic) {
        Some(field) => stamp_identity(vm, field, payload, now_ms),
        None => Ok(None),
    }
}

/// True when a request reaches every party (`discover` or `benchmark` with no destination, or
/// `tous`): what it costs its sender is the number of answers it causes.
pub fn is_broadcast(topic: &str, payload: &[u8]) -> bool {
    let Ok(topics::topic::Topic::Request(c)) = topics::topic::Topic::parse(topic) else {
        return false;
    };
    if !matches!(c, Command::Discover | Command::Benchmark) {
        return false;
    }
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(v) => match v.get("destination").and_then(serde_json::Value::as_str) {
            None => true,
            Some(d) => d == topics::legacy_line::ALL,
        },
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests;
