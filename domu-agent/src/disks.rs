//! The disks of `sys-usb`: each subdirectory of the disks directory is a disk (a mounted USB
//! filesystem). Its id is the directory name; its label is the filesystem label when the directory
//! is a mount point with a labelled device, else the name. Read anew on every request: disks come
//! and go.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use cap_std::fs::Dir;
use topics::payload::Disk;

use crate::fsops::{self, FsError};
use crate::paths;

/// The disks directory.
#[derive(Debug, Clone)]
pub struct Disks {
    pub root: PathBuf,
}

impl Disks {
    /// The disks present now, sorted by id.
    pub fn list(&self) -> std::io::Result<Vec<Disk>> {
        let root_dev = std::fs::metadata(&self.root)?.dev();
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root)?.filter_map(Result::ok) {
            let Some(id) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if paths::check_disk_id(&id).is_err() {
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
        let path = self.root.join(id);
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
        let d = Disks { root: root.clone() };
        let ids: Vec<String> = d.list().unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["usb0", "usb1"]);
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
}
