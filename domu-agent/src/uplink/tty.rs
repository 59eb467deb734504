//! The channel tty: found by path or by channel name, opened exclusively, put in raw mode on the
//! descriptor we keep (hvc ttys reset termios when the last descriptor closes), read and written
//! without blocking the runtime. While the device is absent or its backend not connected, opening
//! fails (ENOENT, ENODEV, ENXIO, EIO): the caller waits and retries, it never exits.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::termios::{self, SetArg};
use tokio::io::unix::AsyncFd;

/// How the agent finds its channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// An explicit tty path (default `/dev/hvc2`).
    Path(PathBuf),
    /// A channel name (`xl.cfg` `channel = [ "name=msg, ..." ]`).
    Name(String),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Path(p) => write!(f, "{}", p.display()),
            Device::Name(n) => write!(f, "channel {n:?}"),
        }
    }
}

/// Where a named channel may appear: an mdev/udev link, a virtio port link, or a Xen console whose
/// xenstore name matches (`device/console/N/name`, read with `xenstore-read` when installed).
pub fn resolve(device: &Device) -> Option<PathBuf> {
    match device {
        Device::Path(p) => Some(p.clone()),
        Device::Name(name) => {
            for dir in ["/dev/xen-channel", "/dev/virtio-ports"] {
                let p = Path::new(dir).join(name);
                if p.exists() {
                    return Some(p);
                }
            }
            xen_console_by_name(name)
        }
    }
}

/// `console-N` in /sys/bus/xen/devices whose xenstore `name` is `name` → `/dev/hvcN`.
fn xen_console_by_name(name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/bus/xen/devices").ok()?;
    for e in entries.filter_map(Result::ok) {
        let dev = e.file_name().to_string_lossy().into_owned();
        let Some(n) = dev
            .strip_prefix("console-")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let key = format!("device/console/{n}/name");
        if xenstore_read(&key).is_ok_and(|v| v == name) {
            return Some(PathBuf::from(format!("/dev/hvc{n}")));
        }
    }
    None
}

/// xenstore's READ request (`xs_wire.h`).
const XS_READ: u32 = 2;
/// xenstore's error answer.
const XS_ERROR: u32 = 16;

/// Reads a key of this domain's xenstore (a path relative to /local/domain/<domid>), through the
/// xenbus device as `xenstore-read` does, so a minimal guest needs no xen tools; falls back to
/// the `xenstore-read` command where the device is not there.
pub fn xenstore_read(key: &str) -> io::Result<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/xen/xenbus")
    {
        Ok(mut f) => {
            let mut msg = Vec::with_capacity(17 + key.len());
            let len = u32::try_from(key.len() + 1)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "key too long"))?;
            for word in [XS_READ, 0, 0, len] {
                msg.extend_from_slice(&word.to_ne_bytes());
            }
            msg.extend_from_slice(key.as_bytes());
            msg.push(0);
            f.write_all(&msg)?;
            let mut header = [0u8; 16];
            f.read_exact(&mut header)?;
            let word = |i: usize| {
                let mut w = [0u8; 4];
                w.copy_from_slice(header.get(i..i + 4).unwrap_or(&[0; 4]));
                u32::from_ne_bytes(w)
            };
            let (kind, len) = (word(0), word(12) as usize);
            if len > 4096 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "xenstore answer too long",
                ));
            }
            let mut body = vec![0u8; len];
            f.read_exact(&mut body)?;
            let text = String::from_utf8_lossy(&body)
                .trim_end_matches('\0')
                .to_owned();
            if kind == XS_ERROR {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("xenstore {key}: {text}"),
                ));
            }
            Ok(text)
        }
        Err(_) => {
            let out = std::process::Command::new("xenstore-read")
                .arg(key)
                .output()?;
            if !out.status.success() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("xenstore {key}"),
                ));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
    }
}

/// True for the errors that mean "not there yet": retry later.
pub fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            nix::libc::ENOENT
                | nix::libc::ENODEV
                | nix::libc::ENXIO
                | nix::libc::EIO
                | nix::libc::EAGAIN
        )
    )
}

/// An open channel tty.
#[derive(Debug)]
pub struct Tty {
    fd: AsyncFd<File>,
    /// The exclusive lock (on a duplicate of the descriptor: same open file).
    _lock: Flock<File>,
    pub path: PathBuf,
}

impl Tty {
    /// Opens the tty once: exclusive, raw, non-blocking.
    pub fn open(path: &Path) -> io::Result<Tty> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(path)?;
        let lock = Flock::lock(f.try_clone()?, FlockArg::LockExclusiveNonblock).map_err(
            |(_, errno)| {
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is held by another process ({errno})", path.display()),
                )
            },
        )?;
        match termios::tcgetattr(f.as_fd()) {
            Ok(mut t) => {
                // No echo, no CR/LF mapping, no flow-control or signal characters: bytes are bytes.
                termios::cfmakeraw(&mut t);
                termios::tcsetattr(f.as_fd(), SetArg::TCSANOW, &t).map_err(io::Error::from)?;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "not a tty; using it as a byte stream")
            }
        }
        // The safe constructor is deprecated for types that do not own their descriptor; a File
        // owns its descriptor, and the replacement (`register`) is `unsafe`, which we forbid.
        #[allow(deprecated)]
        let fd = AsyncFd::new(f)?;
        Ok(Tty {
            fd,
            _lock: lock,
            path: path.to_owned(),
        })
    }

    /// Finds the device and opens it once. While it is absent or its backend not connected the
    /// error is one of [`is_transient`]'s: the caller retries later.
    pub fn open_device(device: &Device) -> io::Result<Tty> {
        match resolve(device) {
            Some(p) => Tty::open(&p),
            None => Err(io::Error::from_raw_os_error(nix::libc::ENOENT)),
        }
    }

    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| inner.get_ref().read(buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| inner.get_ref().write(buf)) {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}
