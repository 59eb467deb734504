//! The disks of `sys-usb`: each subdirectory of the disks directory is a disk (a mounted USB
//! filesystem). Its id is the directory name; its label is the filesystem label when the directory
//! is a mount point with a labelled device, else the name. Read anew on every request: disks come
//! and go. The local repository, when configured, is a disk like the others under the reserved id
//! `repository` (a directory of that name under the disks directory is not a disk).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cap_std::fs::Dir;
use topics::payload::Disk;

use crate::disk::fsops::{self, FsError};
use crate::disk::paths;

/// The id of the local repository as a disk.
pub const REPOSITORY: &str = "repository";
/// Its label in `list_disks` and `discover`.
pub const REPOSITORY_LABEL: &str = "Local repository";

/// The disks directory and the local repository (either may be absent, not both).
#[derive(Debug, Clone)]
pub struct Disks {
    pub root: Option<PathBuf>,
    pub repository: Option<PathBuf>,
}

impl Disks {
    /// The disks of `root` and the repository; None when neither is configured.
    pub fn new(root: Option<PathBuf>, repository: Option<PathBuf>) -> Option<Disks> {
        (root.is_some() || repository.is_some()).then_some(Disks { root, repository })
    }

    /// The disks present now, sorted by id, then the repository.
    pub fn list(&self) -> std::io::Result<Vec<Disk>> {
        let mut out = match &self.root {
            Some(root) => self.list_root(root)?,
            None => Vec::new(),
        };
        if self.repository.is_some() {
            out.push(Disk {
                label: REPOSITORY_LABEL.to_owned(),
                id: REPOSITORY.to_owned(),
            });
        }
        Ok(out)
    }

    fn list_root(&self, root: &Path) -> std::io::Result<Vec<Disk>> {
        let root_dev = std::fs::metadata(root)?.dev();
        let mut out = Vec::new();
        for e in std::fs::read_dir(root)?.filter_map(Result::ok) {
            let Some(id) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if paths::check_disk_id(&id).is_err() || id == REPOSITORY {
                continue;
            }
            // A disk is a real directory (not a symlink to elsewhere).
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if !meta.is_dir() {
                continue;
            }
            let label = if meta.dev() != root_dev {
                mount_label(&e.path())
            } else {
                None
            };
            out.push(Disk {
                label: label.unwrap_or_else(|| id.clone()),
                id,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Opens a disk by the id a requester sent.
    pub fn open(&self, untrusted_id: &str) -> Result<Dir, FsError> {
        let id = paths::check_disk_id(untrusted_id)?;
        if id == REPOSITORY {
            return match &self.repository {
                Some(repo) => fsops::open_root(repo).map_err(|e| FsError::from_io(repo, e)),
                None => Err(FsError::NotFound(
                    "disk `repository` (no local repository)".into(),
                )),
            };
        }
        let Some(root) = &self.root else {
            return Err(FsError::NotFound(format!("disk `{id}`")));
        };
        let path = root.join(id);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {
                fsops::open_root(&path).map_err(|e| FsError::from_io(Path::new(id), e))
            }
            _ => Err(FsError::NotFound(format!("disk `{id}`"))),
        }
    }
}

/// The filesystem label of the device mounted on `mount_point`, via /proc/self/mountinfo and
/// /dev/disk/by-label.
fn mount_label(mount_point: &Path) -> Option<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let device = device_of(&mountinfo, mount_point)?;
    let device = std::fs::canonicalize(device).ok()?;
    for e in std::fs::read_dir("/dev/disk/by-label")
        .ok()?
        .filter_map(Result::ok)
    {
        if std::fs::canonicalize(e.path()).ok().as_deref() == Some(device.as_path()) {
            return Some(unescape(&e.file_name().to_string_lossy()));
        }
    }
    None
}

/// The mount source of `mount_point` in a mountinfo table (the last mount wins).
pub fn device_of(mountinfo: &str, mount_point: &Path) -> Option<PathBuf> {
    let wanted = mount_point.to_str()?;
    mountinfo.lines().rev().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let mp = unescape(fields.get(4)?);
        let sep = fields.iter().position(|f| *f == "-")?;
        let source = fields.get(sep + 2)?;
        (mp == wanted && source.starts_with('/')).then(|| PathBuf::from(unescape(source)))
    })
}

/// Undoes the octal (`\040`) and udev (`\x20`) escapes of mount tables and by-label names.
pub fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if b.get(i + 1) == Some(&b'x') {
                if let Some(v) = s
                    .get(i + 2..i + 4)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    out.push(v);
                    i += 4;
                    continue;
                }
            } else if let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_and_escapes() {
        let table = "36 35 98:0 / /media/usb0 rw,noatime master:1 - vfat /dev/sdb1 rw\n\
                     37 35 98:0 / /media/my\\040stick rw - ext4 /dev/sdc1 rw\n\
                     38 35 0:5 / /media/tmp rw - tmpfs tmpfs rw\n";
        assert_eq!(
            device_of(table, Path::new("/media/usb0")),
            Some(PathBuf::from("/dev/sdb1"))
        );
        assert_eq!(
            device_of(table, Path::new("/media/my stick")),
            Some(PathBuf::from("/dev/sdc1"))
        );
        assert_eq!(device_of(table, Path::new("/media/tmp")), None);
        assert_eq!(unescape("KINGSTON\\x20USB"), "KINGSTON USB");
    }

    #[test]
    fn lists_and_opens_disks() {
        let root = std::env::temp_dir().join(format!("agent-disks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("usb0")).unwrap();
        std::fs::create_dir_all(root.join("usb1")).unwrap();
        std::fs::write(root.join("not-a-disk"), b"").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("evil")).unwrap();
        let d = Disks::new(Some(root.clone()), None).unwrap();
        let ids: Vec<String> = d.list().unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["usb0", "usb1"]);
        assert_eq!(
            d.open("repository").unwrap_err().code(),
            topics::ErrorCode::NotFound,
            "no repository configured"
        );
        assert!(d.open("usb0").is_ok());
        assert_eq!(
            d.open("evil").unwrap_err().code(),
            topics::ErrorCode::NotFound
        );
        assert_eq!(
            d.open("nope").unwrap_err().code(),
            topics::ErrorCode::NotFound
        );
        assert_eq!(
            d.open("../etc").unwrap_err().code(),
            topics::ErrorCode::Forbidden
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    /// The repository is a disk under its reserved id; a directory of that name under the disks
    /// directory is not one.
    #[test]
    fn the_repository_is_a_disk() {
        let base = std::env::temp_dir().join(format!("agent-repo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("disks/usb0")).unwrap();
        std::fs::create_dir_all(base.join("disks/repository")).unwrap();
        std::fs::create_dir_all(base.join("repo")).unwrap();
        std::fs::write(base.join("repo/in-repo.txt"), b"x").unwrap();
        let d = Disks::new(Some(base.join("disks")), Some(base.join("repo"))).unwrap();
        let listed: Vec<(String, String)> = d
            .list()
            .unwrap()
            .into_iter()
            .map(|d| (d.id, d.label))
            .collect();
        assert_eq!(
            listed,
            [
                ("usb0".to_owned(), "usb0".to_owned()),
                (REPOSITORY.to_owned(), REPOSITORY_LABEL.to_owned())
            ]
        );
        let repo = d.open("repository").unwrap();
        assert!(
            repo.exists("in-repo.txt"),
            "the configured repository, not disks/repository"
        );
        let only_repo = Disks::new(None, Some(base.join("repo"))).unwrap();
        assert_eq!(only_repo.list().unwrap().len(), 1);
        assert!(only_repo.open("usb0").is_err());
        assert!(Disks::new(None, None).is_none());
        let _ = std::fs::remove_dir_all(&base);
    }
}
