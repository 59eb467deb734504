//! Discovery of channel sockets: a VM appears when `<name>-msg.sock` is created in the socket
//! directory and disappears when it is removed. inotify, not polling: pick-up takes milliseconds.
//! Each VM gets one link task; a re-created socket (VM reboot) gets a fresh link.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use topics::vm::VmId;

use crate::config::SocketGlob;
use crate::link::{self, LinkContext};

/// Why a file name is not bridged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameVerdict {
    /// Not a channel socket name at all (ignored silently).
    NotMatching,
    /// Matches the glob but the name is not a valid VM id (logged, not bridged).
    Invalid(String),
    Vm(VmId),
}

/// Decides what a file name in the socket directory is. Pure.
pub fn classify(file_name: &OsStr, glob: &SocketGlob) -> NameVerdict {
    let Some(name) = file_name.to_str() else {
        return NameVerdict::NotMatching;
    };
    let Some(candidate) = glob.capture(name) else {
        return NameVerdict::NotMatching;
    };
    match VmId::parse(candidate) {
        Ok(vm) if vm.is_reserved() => NameVerdict::Invalid(format!(
            "`{vm}` is reserved to Dom0's own services (dom0, fleet)"
        )),
        Ok(vm) => NameVerdict::Vm(vm),
        Err(e) => NameVerdict::Invalid(e.to_string()),
    }
}

#[derive(Debug)]
struct Running {
    stop: CancellationToken,
    /// Distinguishes this link from a later one for the same VM (re-created socket).
    generation: u64,
}

/// Watches `dir` and runs one link per channel socket until `stop` turns true.
/// Returns once every link has ended (or after a 1 s grace).
pub async fn run(
    dir: PathBuf,
    glob: SocketGlob,
    ctx: Arc<LinkContext>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    // Watch first, then list: a socket created in between is seen by one or the other.
    let inotify = Inotify::init()?;
    inotify.watches().add(
        &dir,
        WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE_SELF,
    )?;
    let mut events = inotify.into_event_stream(vec![0u8; 4096])?;
    let mut links = Links {
        dir,
        glob,
        ctx,
        running: HashMap::new(),
        tasks: JoinSet::new(),
        generation: 0,
        stop: stop.clone(),
    };
    let mut entries = tokio::fs::read_dir(&links.dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        links.appeared(&entry.file_name());
    }
    tracing::info!(dir = %links.dir.display(), vms = links.running.len(), "watching for channel sockets");
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            ev = events.next() => match ev {
                Some(Ok(ev)) => links.on_event(ev.mask, ev.name.as_deref()),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "inotify error");
                    break;
                }
                None => break,
            },
            Some(done) = links.tasks.join_next(), if !links.tasks.is_empty() => {
                if let Ok((vm, generation)) = done {
                    links.ended(&vm, generation);
                }
            }
        }
    }
    links.stop_all().await;
    Ok(())
}

/// The links of the socket directory: one task per VM.
struct Links {
    dir: PathBuf,
    glob: SocketGlob,
    ctx: Arc<LinkContext>,
    running: HashMap<VmId, Running>,
    tasks: JoinSet<(VmId, u64)>,
    generation: u64,
    /// The service's stop: each link's own stop is a child of it.
    stop: CancellationToken,
}

impl Links {
    fn on_event(&mut self, mask: EventMask, name: Option<&OsStr>) {
        let Some(name) = name else {
            if mask.contains(EventMask::DELETE_SELF) {
                tracing::error!(dir = %self.dir.display(), "socket directory removed; no new VM can be linked");
            }
            return;
        };
        if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
            self.appeared(name);
        } else if mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM) {
            self.removed(name);
        }
    }

    /// A socket appeared: a link for its VM (a re-created socket gets a fresh one).
    fn appeared(&mut self, name: &OsStr) {
        let vm = match classify(name, &self.glob) {
            NameVerdict::NotMatching => return,
            NameVerdict::Invalid(why) => {
                tracing::warn!(socket = ?name, reason = %why, "channel socket name is not a valid VM id; not bridged");
                return;
            }
            NameVerdict::Vm(vm) => vm,
        };
        if let Some(old) = self.running.remove(&vm) {
            // Re-created socket: the old link belongs to a dead backend.
            old.stop.cancel();
        }
        self.generation += 1;
        let stop = self.stop.child_token();
        let path = self.dir.join(name);
        tracing::info!(vm = %vm, path = %path.display(), "channel socket found");
        let (ctx, generation, v, link_stop) =
            (self.ctx.clone(), self.generation, vm.clone(), stop.clone());
        self.tasks.spawn(async move {
            link::run(v.clone(), path, ctx, link_stop).await;
            (v, generation)
        });
        self.running.insert(vm, Running { stop, generation });
    }

    /// A socket went: its link stops, Dom0 forgets the VM.
    fn removed(&mut self, name: &OsStr) {
        if let NameVerdict::Vm(vm) = classify(name, &self.glob) {
            if let Some(r) = self.running.remove(&vm) {
                tracing::info!(vm = %vm, "channel socket removed; link stopped");
                r.stop.cancel();
                self.ctx.supervision.forget(&vm);
            }
        }
    }

    /// A link task ended: forgotten, unless a later link of the VM runs.
    fn ended(&mut self, vm: &VmId, generation: u64) {
        if self
            .running
            .get(vm)
            .is_some_and(|r| r.generation == generation)
        {
            self.running.remove(vm);
        }
    }

    /// Stops every link; waits a second for them.
    async fn stop_all(&mut self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        self.tasks.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_names() {
        let g = SocketGlob::parse("*-msg.sock").unwrap();
        let vm = |s: &str| NameVerdict::Vm(VmId::parse(s).unwrap());
        assert_eq!(classify(OsStr::new("sys-usb-msg.sock"), &g), vm("sys-usb"));
        assert_eq!(classify(OsStr::new("vm-gui-msg.sock"), &g), vm("vm-gui"));
        assert_eq!(
            classify(OsStr::new("mqtt.sock"), &g),
            NameVerdict::NotMatching
        );
        assert!(matches!(
            classify(OsStr::new("VM-msg.sock"), &g),
            NameVerdict::Invalid(_)
        ));
        assert!(matches!(
            classify(OsStr::new("a b-msg.sock"), &g),
            NameVerdict::Invalid(_)
        ));
        assert!(matches!(
            classify(OsStr::new("dom0-msg.sock"), &g),
            NameVerdict::Invalid(_)
        ));
    }
}
