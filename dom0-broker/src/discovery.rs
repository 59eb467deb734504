//! Discovery of channel sockets: a VM appears when `<name>-msg.sock` is created in the socket
//! directory and disappears when it is removed. inotify, not polling: pick-up takes milliseconds.
//! Each VM gets one link task; a re-created socket (VM reboot) gets a fresh link.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::sync::watch;
use tokio::task::JoinSet;
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
        Ok(vm) if vm.is_dom0() => {
            NameVerdict::Invalid("`dom0` is reserved to Dom0's own services".into())
        }
        Ok(vm) => NameVerdict::Vm(vm),
        Err(e) => NameVerdict::Invalid(e.to_string()),
    }
}

#[derive(Debug)]
struct Running {
    stop: watch::Sender<bool>,
    /// Distinguishes this link from a later one for the same VM (re-created socket).
    generation: u64,
}

/// Watches `dir` and runs one link per channel socket until `stop` turns true.
/// Returns once every link has ended (or after a 1 s grace).
pub async fn run(
    dir: PathBuf,
    glob: SocketGlob,
    ctx: Arc<LinkContext>,
    mut stop: watch::Receiver<bool>,
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
    let mut running: HashMap<VmId, Running> = HashMap::new();
    let mut tasks: JoinSet<(VmId, u64)> = JoinSet::new();
    let mut generation = 0u64;

    let mut entries = tokio::fs::read_dir(&dir).await?;
    while let Some(entry) = entries.next_entry().await? {
        appeared(
            &entry.file_name(),
            &dir,
            &glob,
            &ctx,
            &mut running,
            &mut tasks,
            &mut generation,
        );
    }
    tracing::info!(dir = %dir.display(), vms = running.len(), "watching for channel sockets");

    loop {
        tokio::select! {
            _ = stop.changed() => break,
            ev = events.next() => match ev {
                Some(Ok(ev)) => {
                    let Some(name) = ev.name else {
                        if ev.mask.contains(EventMask::DELETE_SELF) {
                            tracing::error!(dir = %dir.display(), "socket directory removed; no new VM can be linked");
                        }
                        continue;
                    };
                    if ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                        appeared(&name, &dir, &glob, &ctx, &mut running, &mut tasks, &mut generation);
                    } else if ev.mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM) {
                        if let NameVerdict::Vm(vm) = classify(&name, &glob) {
                            if let Some(r) = running.remove(&vm) {
                                tracing::info!(vm = %vm, "channel socket removed; link stopped");
                                let _ = r.stop.send(true);
                                ctx.supervision.forget(&vm);
                            }
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "inotify error");
                    break;
                }
                None => break,
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok((vm, generation)) = done {
                    if running.get(&vm).is_some_and(|r| r.generation == generation) {
                        running.remove(&vm);
                    }
                }
            }
        }
    }
    for r in running.values() {
        let _ = r.stop.send(true);
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    Ok(())
}

fn appeared(
    name: &OsStr,
    dir: &Path,
    glob: &SocketGlob,
    ctx: &Arc<LinkContext>,
    running: &mut HashMap<VmId, Running>,
    tasks: &mut JoinSet<(VmId, u64)>,
    generation: &mut u64,
) {
    match classify(name, glob) {
        NameVerdict::NotMatching => {}
        NameVerdict::Invalid(why) => {
            tracing::warn!(socket = ?name, reason = %why, "channel socket name is not a valid VM id; not bridged");
        }
        NameVerdict::Vm(vm) => {
            if let Some(old) = running.remove(&vm) {
                // Re-created socket: the old link belongs to a dead backend.
                let _ = old.stop.send(true);
            }
            *generation += 1;
            let (tx, rx) = watch::channel(false);
            let path = dir.join(name);
            tracing::info!(vm = %vm, path = %path.display(), "channel socket found");
            let ctx = ctx.clone();
            let gen_ = *generation;
            let v = vm.clone();
            tasks.spawn(async move {
                link::run(v.clone(), path, ctx, rx).await;
                (v, gen_)
            });
            running.insert(
                vm,
                Running {
                    stop: tx,
                    generation: *generation,
                },
            );
        }
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
