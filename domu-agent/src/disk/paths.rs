//! Path arguments, as the requester sent them: checked here (pure) before any file is touched.
//!
//! This is the first gate; the second is the capability-style directory API (`cap-std`) that
//! resolves every path beneath its disk, so a symlink that leaves the disk is refused at open time.

use std::path::{Component, Path, PathBuf};

use topics::ErrorCode;

/// Longest path argument accepted, in bytes (PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Longest path component accepted, in bytes (NAME_MAX).
pub const MAX_NAME: usize = 255;

/// Why a path argument is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path is {0} bytes long (at most {MAX_PATH})")]
    TooLong(usize),
    #[error("a path component is {0} bytes long (at most {MAX_NAME})")]
    NameTooLong(usize),
    #[error("absolute paths are refused: paths are relative to their disk")]
    Absolute,
    #[error("`..` is refused: a path may not leave its disk")]
    ParentDir,
    #[error("path names the disk itself, not a file")]
    NoFile,
    #[error("hidden transfer files (`.*.part-*`) are the agent's own")]
    Reserved,
}

impl PathError {
    /// The response code: leaving the disk is `forbidden`, a malformed argument `invalid_argument`.
    pub fn code(&self) -> ErrorCode {
        match self {
            PathError::Absolute | PathError::ParentDir | PathError::Reserved => {
                ErrorCode::Forbidden
            }
            _ => ErrorCode::InvalidArgument,
        }
    }
}

/// The prefix of the agent's temporary files (on filesystems without O_TMPFILE).
pub const PART_PREFIX: &str = ".";
pub const PART_INFIX: &str = ".part-";

/// True for the agent's own transfer files, hidden from listings and announcements.
pub fn is_part_file(name: &str) -> bool {
    name.starts_with(PART_PREFIX) && name.contains(PART_INFIX)
}

/// Checks a path argument and normalises it (`a/./b//c` → `a/b/c`). The result is relative,
/// has at least one component, and contains no `..`.
pub fn check(untrusted: &str) -> Result<PathBuf, PathError> {
    if untrusted.is_empty() {
        return Err(PathError::Empty);
    }
    if untrusted.contains('\0') {
        return Err(PathError::Nul);
    }
    if untrusted.len() > MAX_PATH {
        return Err(PathError::TooLong(untrusted.len()));
    }
    if untrusted.starts_with('/') {
        return Err(PathError::Absolute);
    }
    let mut out = PathBuf::new();
    for c in Path::new(untrusted).components() {
        match c {
            Component::Normal(name) => {
                let len = name.len();
                if len > MAX_NAME {
                    return Err(PathError::NameTooLong(len));
                }
                if name.to_str().is_some_and(is_part_file) {
                    return Err(PathError::Reserved);
                }
                out.push(name);
            }
            Component::CurDir => {}
            Component::ParentDir => return Err(PathError::ParentDir),
            Component::RootDir | Component::Prefix(_) => return Err(PathError::Absolute),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(PathError::NoFile);
    }
    Ok(out)
}

/// Checks a disk id as sent by a requester: one plain directory name.
pub fn check_disk_id(untrusted: &str) -> Result<&str, PathError> {
    match check(untrusted)?.components().count() {
        1 if !untrusted.contains('/') && !untrusted.starts_with('.') => Ok(untrusted),
        _ => Err(PathError::ParentDir),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let long_name = "a".repeat(256);
        let long_path = "a/".repeat(2100);
        let rows: Vec<(&str, Result<&str, PathError>)> = vec![
            ("file.txt", Ok("file.txt")),
            ("docs/report.pdf", Ok("docs/report.pdf")),
            ("./docs//report.pdf", Ok("docs/report.pdf")),
            ("docs/./a", Ok("docs/a")),
            ("docs/", Ok("docs")),
            ("", Err(PathError::Empty)),
            (".", Err(PathError::NoFile)),
            ("./", Err(PathError::NoFile)),
            ("/etc/passwd", Err(PathError::Absolute)),
            ("//etc/passwd", Err(PathError::Absolute)),
            ("..", Err(PathError::ParentDir)),
            ("../x", Err(PathError::ParentDir)),
            ("a/../../x", Err(PathError::ParentDir)),
            ("a/..", Err(PathError::ParentDir)),
            ("a\0b", Err(PathError::Nul)),
            (&long_name, Err(PathError::NameTooLong(256))),
            (&long_path, Err(PathError::TooLong(4200))),
            (".x.part-12", Err(PathError::Reserved)),
            ("a/.report.pdf.part-9-1", Err(PathError::Reserved)),
        ];
        for (input, expected) in rows {
            let got = check(input).map(|p| p.display().to_string());
            assert_eq!(got, expected.map(str::to_owned), "{input:?}");
        }
        assert_eq!(PathError::ParentDir.code(), ErrorCode::Forbidden);
        assert_eq!(PathError::Nul.code(), ErrorCode::InvalidArgument);
    }

    #[test]
    fn disk_ids() {
        assert_eq!(check_disk_id("usb0"), Ok("usb0"));
        for bad in ["", "..", "a/b", ".hidden", "/abs"] {
            assert!(check_disk_id(bad).is_err(), "{bad}");
        }
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn never_panics_and_never_escapes(s in "[a-z./\\\\\\x00-]{0,40}") {
                if let Ok(p) = check(&s) {
                    prop_assert!(p.is_relative());
                    prop_assert!(p.components().all(|c| matches!(c, Component::Normal(_))));
                }
            }
        }
    }
}
