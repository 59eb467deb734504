//! New-file announcements: a file that appears on a disk or in the local repository — written by
//! our own commands or dropped from outside — is announced once on
//! `system/disk/new_file/notification` with `disk`, `filepath` and `size_in_bytes`.
//!
//! Files from outside are seen by inotify when their writer closes them (or when they are moved
//! in); files the agent itself links into place are announced by the command that made them (an
//! O_TMPFILE linked in gives no close event under its name). One set of announced files, cleared on
//! removal, keeps each announcement single.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use topics::payload::NewFileEvent;
use topics::topic::Notification;
use topics::vm::VmId;

use crate::disk::paths;
use crate::hub::Client;
use crate::hub::Publication;

/// What commands tell the announcer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    Announce {
        disk: String,
        path: String,
        size: u64,
    },
    Forget {
        disk: String,
        path: String,
    },
}

/// A handle commands use from any thread.
#[derive(Debug, Clone, Default)]
pub struct Announcer {
    tx: Option<mpsc::UnboundedSender<Note>>,
}

impl Announcer {
    pub fn new() -> (Announcer, mpsc::UnboundedReceiver<Note>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Announcer { tx: Some(tx) }, rx)
    }

    pub fn announce(&self, disk: &str, rel: &Path, size: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Note::Announce {
                disk: disk.to_owned(),
                path: rel.display().to_string(),
                size,
            });
        }
    }

    pub fn forget(&self, disk: &str, rel: &Path) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Note::Forget {
                disk: disk.to_owned(),
                path: rel.display().to_string(),
            });
        }
    }
}

/// What a watch descriptor watches.
#[derive(Debug, Clone)]
enum Watched {
    /// The disks directory: a new subdirectory is a new disk.
    DisksRoot(PathBuf),
    /// A folder of a disk (or of the repository): (disk id, its root, folder relative to it).
    Folder {
        disk: String,
        root: PathBuf,
        rel: PathBuf,
    },
}

struct Watcher {
    inotify_watches: inotify::Watches,
    watched: HashMap<WatchDescriptor, Watched>,
    announced: HashSet<(String, String)>,
    out: Arc<Client>,
    /// The VM, as the `origin` of its announcements.
    vm: VmId,
    /// Told when a disk appears or goes (the service announces its components).
    changed: mpsc::UnboundedSender<()>,
}

const FOLDER_EVENTS: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE);

impl Watcher {
    /// Watches a folder and everything below it; announces the files already there when `announce_existing`.
    async fn add_tree(&mut self, disk: &str, root: &Path, rel: &Path, announce_existing: bool) {
        let mut stack = vec![rel.to_path_buf()];
        let mut found = Vec::new();
        while let Some(rel) = stack.pop() {
            let abs = root.join(&rel);
            match self.inotify_watches.add(
                &abs,
                FOLDER_EVENTS | WatchMask::DONT_FOLLOW | WatchMask::ONLYDIR,
            ) {
                Ok(wd) => {
                    self.watched.insert(
                        wd,
                        Watched::Folder {
                            disk: disk.to_owned(),
                            root: root.to_owned(),
                            rel: rel.clone(),
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(disk, folder = %rel.display(), error = %e, "cannot watch folder");
                    continue;
                }
            }
            let Ok(entries) = std::fs::read_dir(&abs) else {
                continue;
            };
            for e in entries.filter_map(Result::ok) {
                let Ok(ft) = e.file_type() else { continue };
                let child = rel.join(e.file_name());
                if ft.is_dir() {
                    stack.push(child);
                } else if ft.is_file() && announce_existing && !is_part(&e.file_name()) {
                    found.push((child, e.metadata().map(|m| m.len()).unwrap_or(0)));
                }
            }
        }
        for (path, size) in found {
            self.announce(disk, &path.display().to_string(), size).await;
        }
    }

    async fn announce(&mut self, disk: &str, path: &str, size: u64) {
        if !self.announced.insert((disk.to_owned(), path.to_owned())) {
            return;
        }
        tracing::info!(disk, path, size, "new file");
        let ev = NewFileEvent {
            disk: disk.to_owned(),
            filepath: path.to_owned(),
            size_in_bytes: size,
        };
        let body = serde_json::to_vec(&ev).unwrap_or_default();
        let payload = Bytes::from(topics::payload::with_origin(&body, self.vm.as_str()));
        let p = Publication::at_least_once(Notification::NewFile.topic(), payload);
        self.out.publish(p, None).await;
    }

    async fn on_event(&mut self, wd: &WatchDescriptor, mask: EventMask, name: Option<&OsStr>) {
        let Some(w) = self.watched.get(wd).cloned() else {
            return;
        };
        let Some(name) = name else {
            if mask.contains(EventMask::IGNORED) {
                self.watched.remove(wd);
            }
            return;
        };
        match w {
            Watched::DisksRoot(root) => {
                let Some(id) = name.to_str().filter(|n| paths::check_disk_id(n).is_ok()) else {
                    return;
                };
                if !mask.contains(EventMask::ISDIR) {
                    return;
                }
                if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                    tracing::info!(disk = id, "disk appeared");
                    let _ = self.changed.send(());
                    self.add_tree(id, &root.join(id), Path::new(""), true).await;
                } else if mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM) {
                    tracing::info!(disk = id, "disk removed");
                    self.announced.retain(|(disk, _)| disk != id);
                    let _ = self.changed.send(());
                }
            }
            Watched::Folder { disk, root, rel } => {
                let path = rel.join(name);
                if mask.contains(EventMask::ISDIR) {
                    if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                        self.add_tree(&disk, &root, &path, true).await;
                    }
                    return;
                }
                if is_part(name) {
                    return;
                }
                let key = path.display().to_string();
                if mask.intersects(EventMask::CLOSE_WRITE | EventMask::MOVED_TO) {
                    let size = std::fs::symlink_metadata(root.join(&path))
                        .ok()
                        .filter(|m| m.is_file())
                        .map(|m| m.len());
                    if let Some(size) = size {
                        self.announce(&disk, &key, size).await;
                    }
                } else if mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM) {
                    self.announced.remove(&(disk, key));
                }
            }
        }
    }
}

fn is_part(name: &OsStr) -> bool {
    name.to_str().is_some_and(paths::is_part_file)
}

/// Runs the announcer until `stop`.
#[allow(clippy::too_many_arguments)] // replaced by a struct of settings in the agent's rework
pub async fn run(
    vm: VmId,
    disks: Option<PathBuf>,
    repository: Option<(String, PathBuf)>,
    mut notes: mpsc::UnboundedReceiver<Note>,
    out: Arc<Client>,
    changed: mpsc::UnboundedSender<()>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let inotify = Inotify::init()?;
    let mut w = Watcher {
        inotify_watches: inotify.watches(),
        watched: HashMap::new(),
        announced: HashSet::new(),
        out,
        vm,
        changed,
    };
    // What is already there when the agent starts is not new: watch it silently.
    if let Some(root) = &disks {
        let wd = w.inotify_watches.add(
            root,
            WatchMask::CREATE
                | WatchMask::MOVED_TO
                | WatchMask::DELETE
                | WatchMask::MOVED_FROM
                | WatchMask::ONLYDIR,
        )?;
        w.watched.insert(wd, Watched::DisksRoot(root.clone()));
        for e in std::fs::read_dir(root)?.filter_map(Result::ok) {
            let id = e.file_name().to_string_lossy().into_owned();
            if paths::check_disk_id(&id).is_ok() && e.file_type().is_ok_and(|t| t.is_dir()) {
                w.add_tree(&id, &root.join(&id), Path::new(""), false).await;
            }
        }
    }
    if let Some((name, root)) = &repository {
        w.add_tree(name, root, Path::new(""), false).await;
    }
    let mut events = inotify.into_event_stream(vec![0u8; 16384])?;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            ev = events.next() => match ev {
                Some(Ok(ev)) => {
                    if ev.mask.contains(EventMask::Q_OVERFLOW) {
                        tracing::warn!("inotify queue overflow: some new files may not be announced");
                    }
                    w.on_event(&ev.wd, ev.mask, ev.name.as_deref()).await;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
            Some(note) = notes.recv() => match note {
                Note::Announce { disk, path, size } => w.announce(&disk, &path, size).await,
                Note::Forget { disk, path } => {
                    w.announced.remove(&(disk, path));
                }
            },
        }
    }
}
