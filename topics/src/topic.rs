//! Topic grammar: the dictionary's commands and notifications, and building and parsing their topics.
//!
//! - command request: `<root>/request`
//! - command response: `<root>/response/<requester>`
//! - notification: `<root>/notification`
//!
//! Parsing never panics and returns a typed error for anything that is not one of the dictionary's
//! topics. The generic checks ([`validate_name`], [`validate_filter`]) apply to every topic, including
//! application topics outside the dictionary.

use std::fmt;

use crate::vm::{VmId, VmIdError};

/// Longest topic name or filter accepted, in bytes (MQTT allows 65535; nothing here needs more).
pub const MAX_TOPIC_LEN: usize = 256;

/// Suffix of a command request topic.
pub const REQUEST: &str = "request";
/// Level preceding the requester in a response topic.
pub const RESPONSE: &str = "response";
/// Suffix of a notification topic.
pub const NOTIFICATION: &str = "notification";

/// Every command (RPC) of the dictionary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Command {
    ListDisks,
    ListFiles,
    ReadFile,
    CopyFile,
    RemoveFile,
    Benchmark,
    GetFileFootprint,
    CreateFile,
    Discover,
    /// Dom0 extension (not in the note): per-VM link counters from the Dom0 controller.
    SupervisionCounters,
}

impl Command {
    /// All commands, in the note's order, then Dom0's extensions.
    pub const ALL: [Command; 10] = [
        Command::ListDisks,
        Command::ListFiles,
        Command::ReadFile,
        Command::CopyFile,
        Command::RemoveFile,
        Command::Benchmark,
        Command::GetFileFootprint,
        Command::CreateFile,
        Command::Discover,
        Command::SupervisionCounters,
    ];

    /// The topic root, exactly as written in the note.
    pub const fn root(self) -> &'static str {
        match self {
            Command::ListDisks => "system/disks/list_disks",
            Command::ListFiles => "system/disks/list_files",
            Command::ReadFile => "system/disks/read_file",
            Command::CopyFile => "system/disks/copy_file",
            Command::RemoveFile => "system/disks/remove_file",
            Command::Benchmark => "system/misc/benchmark",
            Command::GetFileFootprint => "system/disks/get_file_footprint",
            Command::CreateFile => "system/disks/create_file",
            Command::Discover => "system/components/discover",
            Command::SupervisionCounters => "system/supervision/counters",
        }
    }

    /// The command whose root is `root`.
    pub fn from_root(root: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.root() == root)
    }

    /// The command a person names: its topic root, its last level (`list_disks`), or the MVP's
    /// names (`liste_disques`, `LISTE_DISQUES`).
    pub fn by_name(name: &str) -> Option<Command> {
        Command::from_root(name)
            .or_else(|| {
                Command::ALL
                    .into_iter()
                    .find(|c| c.root().rsplit('/').next() == Some(name))
            })
            .or_else(|| crate::legacy::from_commande(name))
            .or_else(|| crate::legacy::from_type_commande(name))
    }

    /// The last level of its root (`list_disks`): what people type.
    pub fn short_name(self) -> &'static str {
        let root = self.root();
        root.rsplit('/').next().unwrap_or(root)
    }

    /// True for the commands of the messaging note; false for Dom0's extensions.
    pub const fn in_note(self) -> bool {
        !matches!(self, Command::SupervisionCounters)
    }

    /// True when the command is served by the disk provider (`sys-usb`).
    pub const fn is_disk_command(self) -> bool {
        matches!(
            self,
            Command::ListDisks
                | Command::ListFiles
                | Command::ReadFile
                | Command::CopyFile
                | Command::RemoveFile
                | Command::GetFileFootprint
                | Command::CreateFile
        )
    }

    /// `<root>/request`.
    pub fn request_topic(self) -> String {
        format!("{}/{REQUEST}", self.root())
    }

    /// `<root>/response/<requester>`.
    pub fn response_topic(self, requester: &VmId) -> String {
        format!("{}/{RESPONSE}/{requester}", self.root())
    }
}

/// Every notification of the dictionary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Notification {
    /// `TypeEvenement.FICHIER`: a new file on a disk or in the local repository.
    NewFile,
    /// `TypeEvenement.ERREUR`: an error in a module.
    Error,
    /// Dom0 extension (not in the note): a VM link changed state.
    LinkState,
    /// The note's third category, service announcements (it gives them no topic): a party's
    /// components, when its session comes up and whenever they change.
    Announce,
}

impl Notification {
    pub const ALL: [Notification; 4] = [
        Notification::NewFile,
        Notification::Error,
        Notification::LinkState,
        Notification::Announce,
    ];

    /// The topic root, exactly as written in the note (`system/disk/new_file` is singular there).
    pub const fn root(self) -> &'static str {
        match self {
            Notification::NewFile => "system/disk/new_file",
            Notification::Error => "system/events/error",
            Notification::LinkState => "system/supervision/links",
            Notification::Announce => "system/components/announce",
        }
    }

    pub fn from_root(root: &str) -> Option<Notification> {
        Notification::ALL.into_iter().find(|n| n.root() == root)
    }

    /// True for the notifications of the note's table; the announcements are the note's third
    /// category, which it gives no topic.
    pub const fn in_note(self) -> bool {
        !matches!(self, Notification::LinkState | Notification::Announce)
    }

    /// `<root>/notification`.
    pub fn topic(self) -> String {
        format!("{}/{NOTIFICATION}", self.root())
    }
}

/// A parsed dictionary topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Request(Command),
    Response { command: Command, requester: VmId },
    Notification(Notification),
}

/// Why a string is not a valid topic (or not one of the dictionary's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is {0} bytes long (at most {MAX_TOPIC_LEN})")]
    TooLong(usize),
    #[error("topic contains a NUL character")]
    Nul,
    #[error("topic name contains a wildcard ('+' or '#')")]
    Wildcard,
    #[error("wildcard must occupy a whole level, and '#' only the last one")]
    MisplacedWildcard,
    #[error("topics starting with '$' are reserved to the broker")]
    DollarPrefix,
    #[error("topic has an empty level (leading, trailing or double '/')")]
    EmptyLevel,
    #[error("topic root {0:?} is not in the dictionary")]
    UnknownRoot(String),
    #[error("topic {0:?} does not end in /request, /response/<vm> or /notification")]
    BadSuffix(String),
    #[error("invalid requester in response topic: {0}")]
    InvalidRequester(VmIdError),
}

fn validate_common(untrusted: &str) -> Result<(), TopicError> {
    if untrusted.is_empty() {
        return Err(TopicError::Empty);
    }
    if untrusted.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong(untrusted.len()));
    }
    if untrusted.contains('\0') {
        return Err(TopicError::Nul);
    }
    if untrusted.starts_with('$') {
        return Err(TopicError::DollarPrefix);
    }
    if untrusted.split('/').any(str::is_empty) {
        return Err(TopicError::EmptyLevel);
    }
    Ok(())
}

/// Checks a topic name (what a PUBLISH carries): our grammar, no wildcard.
pub fn validate_name(untrusted: &str) -> Result<(), TopicError> {
    validate_common(untrusted)?;
    if untrusted.contains(['+', '#']) {
        return Err(TopicError::Wildcard);
    }
    Ok(())
}

/// Checks a topic filter (what a SUBSCRIBE carries): our grammar, wildcards well placed.
pub fn validate_filter(untrusted: &str) -> Result<(), TopicError> {
    validate_common(untrusted)?;
    let levels: Vec<&str> = untrusted.split('/').collect();
    let last = levels.len() - 1;
    for (i, level) in levels.iter().enumerate() {
        let wild = level.contains(['+', '#']);
        let ok = !wild || *level == "+" || (*level == "#" && i == last);
        if !ok {
            return Err(TopicError::MisplacedWildcard);
        }
    }
    Ok(())
}

impl Topic {
    /// Parses one of the dictionary's topics.
    pub fn parse(untrusted: &str) -> Result<Topic, TopicError> {
        validate_name(untrusted)?;
        if let Some(root) = untrusted.strip_suffix(&format!("/{REQUEST}")) {
            return Command::from_root(root)
                .map(Topic::Request)
                .ok_or_else(|| unknown(root));
        }
        if let Some(root) = untrusted.strip_suffix(&format!("/{NOTIFICATION}")) {
            return Notification::from_root(root)
                .map(Topic::Notification)
                .ok_or_else(|| unknown(root));
        }
        if let Some((head, requester)) = untrusted.rsplit_once('/') {
            if let Some(root) = head.strip_suffix(&format!("/{RESPONSE}")) {
                let command = Command::from_root(root).ok_or_else(|| unknown(root))?;
                let requester = VmId::parse(requester).map_err(TopicError::InvalidRequester)?;
                return Ok(Topic::Response { command, requester });
            }
        }
        Err(TopicError::BadSuffix(untrusted.to_owned()))
    }

    /// The command of a request or response topic.
    pub fn command(&self) -> Option<Command> {
        match self {
            Topic::Request(c) | Topic::Response { command: c, .. } => Some(*c),
            Topic::Notification(_) => None,
        }
    }
}

fn unknown(root: &str) -> TopicError {
    TopicError::UnknownRoot(root.to_owned())
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::Request(c) => write!(f, "{}/{REQUEST}", c.root()),
            Topic::Response { command, requester } => {
                write!(f, "{}/{RESPONSE}/{requester}", command.root())
            }
            Topic::Notification(n) => write!(f, "{}/{NOTIFICATION}", n.root()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(s: &str) -> VmId {
        VmId::parse(s).unwrap()
    }

    #[test]
    fn note_roots_are_exact() {
        let rows = [
            (Command::ListDisks, "system/disks/list_disks"),
            (Command::ListFiles, "system/disks/list_files"),
            (Command::ReadFile, "system/disks/read_file"),
            (Command::CopyFile, "system/disks/copy_file"),
            (Command::RemoveFile, "system/disks/remove_file"),
            (Command::Benchmark, "system/misc/benchmark"),
            (Command::GetFileFootprint, "system/disks/get_file_footprint"),
            (Command::CreateFile, "system/disks/create_file"),
            (Command::Discover, "system/components/discover"),
        ];
        for (c, root) in rows {
            assert_eq!(c.root(), root);
            assert!(c.in_note());
        }
        assert_eq!(Notification::NewFile.root(), "system/disk/new_file");
        assert_eq!(Notification::Error.root(), "system/events/error");
    }

    #[test]
    fn every_topic_builds_and_parses_back() {
        let requester = vm("vm-gui");
        for c in Command::ALL {
            let req = c.request_topic();
            assert_eq!(Topic::parse(&req), Ok(Topic::Request(c)), "{req}");
            assert_eq!(Topic::Request(c).to_string(), req);
            let resp = c.response_topic(&requester);
            let parsed = Topic::parse(&resp).unwrap();
            assert_eq!(
                parsed,
                Topic::Response {
                    command: c,
                    requester: requester.clone()
                }
            );
            assert_eq!(parsed.to_string(), resp);
            assert_eq!(parsed.command(), Some(c));
        }
        for n in Notification::ALL {
            let t = n.topic();
            assert_eq!(Topic::parse(&t), Ok(Topic::Notification(n)));
            assert_eq!(Topic::Notification(n).to_string(), t);
        }
        assert_eq!(
            Command::ListDisks.response_topic(&requester),
            "system/disks/list_disks/response/vm-gui"
        );
    }

    #[test]
    fn disk_commands() {
        let disk: Vec<_> = Command::ALL
            .into_iter()
            .filter(|c| c.is_disk_command())
            .collect();
        assert_eq!(
            disk,
            [
                Command::ListDisks,
                Command::ListFiles,
                Command::ReadFile,
                Command::CopyFile,
                Command::RemoveFile,
                Command::GetFileFootprint,
                Command::CreateFile
            ]
        );
    }

    #[test]
    fn invalid_topics_table() {
        let long = format!("system/{}", "a".repeat(300));
        let rows: Vec<(&str, TopicError)> = vec![
            ("", TopicError::Empty),
            (&long, TopicError::TooLong(307)),
            ("system/disks/list_disks/request\0", TopicError::Nul),
            ("system/+/list_disks/request", TopicError::Wildcard),
            ("system/disks/#", TopicError::Wildcard),
            ("system/disks/list_disks/response/+", TopicError::Wildcard),
            ("$SYS/broker/uptime", TopicError::DollarPrefix),
            (
                "$share/g/system/disks/list_disks/request",
                TopicError::DollarPrefix,
            ),
            ("/system/disks/list_disks/request", TopicError::EmptyLevel),
            ("system/disks/list_disks/request/", TopicError::EmptyLevel),
            ("system//disks/list_disks/request", TopicError::EmptyLevel),
            ("/", TopicError::EmptyLevel),
            (
                "system/disks/format_disk/request",
                TopicError::UnknownRoot("system/disks/format_disk".into()),
            ),
            (
                "system/disks/new_file/notification",
                TopicError::UnknownRoot("system/disks/new_file".into()),
            ),
            (
                "system/disks/list_disks/notification",
                TopicError::UnknownRoot("system/disks/list_disks".into()),
            ),
            ("request", TopicError::BadSuffix("request".into())),
            (
                "system/disks/list_disks",
                TopicError::BadSuffix("system/disks/list_disks".into()),
            ),
            (
                "system/disks/list_disks/requests",
                TopicError::BadSuffix("system/disks/list_disks/requests".into()),
            ),
            (
                "system/disks/list_disks/response",
                TopicError::BadSuffix("system/disks/list_disks/response".into()),
            ),
            (
                "system/disks/list_disks/response/vm-gui/extra",
                TopicError::BadSuffix("system/disks/list_disks/response/vm-gui/extra".into()),
            ),
            (
                "system/disks/list_disks/response/VM",
                TopicError::InvalidRequester(VmIdError::BadFirstChar),
            ),
            (
                "system/disks/list_disks/response/vm gui",
                TopicError::InvalidRequester(VmIdError::BadChar(' ')),
            ),
            (
                "system/disks/list_disks/response/abcdefghijklmnopqrstuvwxyz0123456",
                TopicError::InvalidRequester(VmIdError::TooLong(33)),
            ),
            (
                "system/Disks/list_disks/request",
                TopicError::UnknownRoot("system/Disks/list_disks".into()),
            ),
            (
                "apps/myapp/request",
                TopicError::UnknownRoot("apps/myapp".into()),
            ),
        ];
        for (input, expected) in rows {
            assert_eq!(Topic::parse(input), Err(expected), "input {input:?}");
        }
    }

    #[test]
    fn filters() {
        let ok = [
            "#",
            "+",
            "system/#",
            "system/+/list_disks/request",
            "a/+/+/#",
            "system/disks/list_disks/response/vm-gui",
        ];
        for f in ok {
            assert_eq!(validate_filter(f), Ok(()), "{f}");
        }
        let bad = [
            ("system/#/x", TopicError::MisplacedWildcard),
            ("system/a#", TopicError::MisplacedWildcard),
            ("system/+a", TopicError::MisplacedWildcard),
            ("$SYS/#", TopicError::DollarPrefix),
            ("system//#", TopicError::EmptyLevel),
            ("", TopicError::Empty),
        ];
        for (f, e) in bad {
            assert_eq!(validate_filter(f), Err(e), "{f}");
        }
    }
}
