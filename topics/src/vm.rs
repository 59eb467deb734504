//! The VM id grammar: the one definition of what a domain name may look like.
//!
//! A VM id is the Xen domain name as PSEC names them (`sys-usb`, `vm-gui`): it appears in topics
//! (`.../response/vm-gui`), in `sender` fields, as MQTT client ids and in channel socket names
//! (`vm-gui-msg.sock`). Grammar: `[a-z0-9][a-z0-9_-]{0,31}`. It contains no MQTT wildcard, no `/`
//! and no `$`, so it can never widen a topic filter it is substituted into.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest VM id accepted (Xen allows longer domain names; we do not need them).
pub const MAX_VM_ID_LEN: usize = 32;

/// The id of Dom0's own services (the controller). Reserved: no channel may carry it.
pub const DOM0: &str = "dom0";

/// The requester the Dom0 controller re-issues the operations centre's commands as (issue 22's
/// fleet). Reserved like [`DOM0`]: no channel and no policy section may carry it.
pub const FLEET: &str = "fleet";

/// A validated VM id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(String);

/// Why a string is not a VM id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmIdError {
    #[error("VM id is empty")]
    Empty,
    #[error("VM id is {0} bytes long (at most {MAX_VM_ID_LEN})")]
    TooLong(usize),
    #[error("VM id must start with a lowercase letter or a digit")]
    BadFirstChar,
    #[error("VM id contains {0:?} (allowed: a-z 0-9 _ -)")]
    BadChar(char),
}

impl VmId {
    /// Parses a VM id, checking the grammar `[a-z0-9][a-z0-9_-]{0,31}`.
    pub fn parse(untrusted: &str) -> Result<VmId, VmIdError> {
        validate(untrusted)?;
        Ok(VmId(untrusted.to_owned()))
    }

    /// The id of Dom0's controller.
    pub fn dom0() -> VmId {
        VmId(DOM0.to_owned())
    }

    /// True for the reserved Dom0 id.
    pub fn is_dom0(&self) -> bool {
        self.0 == DOM0
    }

    /// The requester of the centre's commands on a host.
    pub fn fleet() -> VmId {
        VmId(FLEET.to_owned())
    }

    /// True for an id no VM may have: Dom0's own, and the fleet's requester.
    pub fn is_reserved(&self) -> bool {
        self.0 == DOM0 || self.0 == FLEET
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks the VM id grammar without allocating.
pub fn validate(untrusted: &str) -> Result<(), VmIdError> {
    let mut chars = untrusted.chars();
    let first = chars.next().ok_or(VmIdError::Empty)?;
    if untrusted.len() > MAX_VM_ID_LEN {
        return Err(VmIdError::TooLong(untrusted.len()));
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return Err(VmIdError::BadFirstChar);
    }
    match chars.find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        Some(bad) => Err(VmIdError::BadChar(bad)),
        None => Ok(()),
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for VmId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for VmId {
    type Err = VmIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VmId::parse(s)
    }
}

impl Serialize for VmId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for VmId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        VmId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammar_table() {
        let rows: &[(&str, Result<(), VmIdError>)] = &[
            ("sys-usb", Ok(())),
            ("vm-gui", Ok(())),
            ("dom0", Ok(())),
            ("0", Ok(())),
            ("a_b-c9", Ok(())),
            ("abcdefghijklmnopqrstuvwxyz012345", Ok(())),
            ("", Err(VmIdError::Empty)),
            (
                "abcdefghijklmnopqrstuvwxyz0123456",
                Err(VmIdError::TooLong(33)),
            ),
            ("-vm", Err(VmIdError::BadFirstChar)),
            ("_vm", Err(VmIdError::BadFirstChar)),
            ("Vm", Err(VmIdError::BadFirstChar)),
            ("vM", Err(VmIdError::BadChar('M'))),
            ("vm+", Err(VmIdError::BadChar('+'))),
            ("vm#", Err(VmIdError::BadChar('#'))),
            ("vm/x", Err(VmIdError::BadChar('/'))),
            ("vm$", Err(VmIdError::BadChar('$'))),
            ("vm x", Err(VmIdError::BadChar(' '))),
            ("vm\0", Err(VmIdError::BadChar('\0'))),
            ("vmé", Err(VmIdError::BadChar('é'))),
            ("$sys", Err(VmIdError::BadFirstChar)),
        ];
        for (input, expected) in rows {
            assert_eq!(&validate(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn serde_checks_grammar() {
        let ok: VmId = serde_json::from_str("\"vm-gui\"").unwrap();
        assert_eq!(ok.as_str(), "vm-gui");
        let err = serde_json::from_str::<VmId>("\"VM\"").unwrap_err();
        assert!(err.to_string().contains("must start"), "{err}");
    }
}
