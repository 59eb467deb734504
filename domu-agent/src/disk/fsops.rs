//! File operations confined to a disk: every path is resolved beneath the disk's directory handle
//! (`cap-std`), so `..`, absolute paths and symlinks that leave the disk fail at open time.
//! Writes are atomic and never partial: the data goes to an unnamed O_TMPFILE (or, on filesystems
//! without it such as vfat, to a hidden `.name.part-*` file), is fsynced, and only then gets its
//! name — without replacing an existing file unless asked.
//!
//! Blocking I/O: callers run these on tokio's blocking pool.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cap_std::fs::{Dir, File, OpenOptions, OpenOptionsExt};
use sha2::{Digest, Sha256};
use topics::ErrorCode;
use topics::payload::{FileEntry, FileKind};

use crate::disk::paths::{self, PathError};

/// Read/write buffer of streaming operations: memory does not grow with file size.
pub const CHUNK: usize = 256 * 1024;

/// Why a file operation failed; each maps to a response code.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{0}")]
    Path(#[from] PathError),
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: {1}")]
    Forbidden(String, String),
    #[error("{0}: already exists (send \"overwrite\": true to replace it)")]
    AlreadyExists(String),
    #[error("{0}: is a folder")]
    IsFolder(String),
    #[error("{0}: the copy's SHA-256 differs from the source's")]
    Corrupted(String),
    #[error("{0}: {1}")]
    Io(String, io::Error),
}

impl FsError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FsError::Path(p) => p.code(),
            FsError::NotFound(_) => ErrorCode::NotFound,
            FsError::Forbidden(..) => ErrorCode::Forbidden,
            FsError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            FsError::IsFolder(_) => ErrorCode::InvalidArgument,
            FsError::Corrupted(_) | FsError::Io(..) => ErrorCode::Io,
        }
    }

    /// Classifies an I/O error on `what` (a disk-relative path, never a host path).
    pub fn from_io(what: &Path, e: io::Error) -> FsError {
        let what = what.display().to_string();
        match e.kind() {
            io::ErrorKind::NotFound => FsError::NotFound(what),
            io::ErrorKind::AlreadyExists => FsError::AlreadyExists(what),
            // cap-std reports a path that would leave the disk as PermissionDenied.
            io::ErrorKind::PermissionDenied => {
                FsError::Forbidden(what, "outside the disk or not permitted".into())
            }
            _ if e.raw_os_error() == Some(nix::libc::ELOOP) => {
                FsError::Forbidden(what, "too many symlinks".into())
            }
            _ => FsError::Io(what, e),
        }
    }
}

/// Opens a disk's directory handle: the root of every path on that disk.
pub fn open_root(path: &Path) -> io::Result<Dir> {
    Dir::open_ambient_dir(path, cap_std::ambient_authority())
}

/// A folder is `is_folder`; anything else that is not a regular file (a device, a FIFO, a socket,
/// a symlink when not followed) is `forbidden`.
fn regular(meta: &cap_std::fs::Metadata, rel: &Path) -> Result<(), FsError> {
    if meta.is_dir() {
        Err(FsError::IsFolder(rel.display().to_string()))
    } else if !meta.is_file() {
        Err(FsError::Forbidden(
            rel.display().to_string(),
            "not a regular file".into(),
        ))
    } else {
        Ok(())
    }
}

/// Opens a regular file for reading. Device files, FIFOs, sockets and folders are refused
/// (`forbidden`), and the open never blocks on a FIFO swapped in meanwhile.
pub fn open_regular(dir: &Dir, rel: &Path) -> Result<(File, u64), FsError> {
    let meta = dir.metadata(rel).map_err(|e| FsError::from_io(rel, e))?;
    regular(&meta, rel)?;
    let mut opts = OpenOptions::new();
    opts.read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY);
    let f = dir
        .open_with(rel, &opts)
        .map_err(|e| FsError::from_io(rel, e))?;
    let meta = f.metadata().map_err(|e| FsError::from_io(rel, e))?;
    if !meta.is_file() {
        return Err(FsError::Forbidden(
            rel.display().to_string(),
            "not a regular file".into(),
        ));
    }
    Ok((f, meta.len()))
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// SHA-256 of everything `r` yields, streaming; returns (hex, bytes read).
pub fn sha256<R: Read>(r: R) -> io::Result<(String, u64)> {
    copy_hashing(r, &mut io::sink())
}

/// The footprint of a file on a disk.
pub fn footprint(dir: &Dir, rel: &Path) -> Result<String, FsError> {
    let (f, _) = open_regular(dir, rel)?;
    sha256(f)
        .map(|(h, _)| h)
        .map_err(|e| FsError::from_io(rel, e))
}

/// What [`walk`] does after visiting an entry.
enum Visit {
    Next,
    /// The entry is a folder to walk into.
    Descend,
    Stop,
}

/// Walks the folders under `dir` (at most 64 deep; symlinks are never followed into), calling
/// `visit(folder, its path, entry)` for each entry, in name order within a folder.
fn walk(
    dir: &Dir,
    mut visit: impl FnMut(&Dir, &Path, &cap_std::fs::DirEntry) -> Visit,
) -> io::Result<()> {
    const MAX_DEPTH: usize = 64;
    let mut stack: Vec<(PathBuf, usize)> = vec![(PathBuf::new(), 0)];
    while let Some((rel, depth)) = stack.pop() {
        let sub;
        let d = if rel.as_os_str().is_empty() {
            dir
        } else {
            match dir.open_dir(&rel) {
                Ok(s) => {
                    sub = s;
                    &sub
                }
                Err(_) => continue,
            }
        };
        let mut entries: Vec<_> = d.entries()?.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in &entries {
            match visit(d, &rel, e) {
                Visit::Next => {}
                Visit::Descend if depth + 1 < MAX_DEPTH => {
                    stack.push((rel.join(e.file_name()), depth + 1))
                }
                Visit::Descend => {}
                Visit::Stop => return Ok(()),
            }
        }
    }
    Ok(())
}

/// Lists a disk recursively, at most `max` entries. Symlinks, special files and the agent's
/// transfer files are not listed. Returns (entries, truncated).
pub fn list(dir: &Dir, max: usize) -> io::Result<(Vec<FileEntry>, bool)> {
    let mut out = Vec::new();
    let mut truncated = false;
    walk(dir, |_, rel, e| {
        let name = e.file_name();
        let Some(name_str) = name.to_str().filter(|n| !paths::is_part_file(n)) else {
            return Visit::Next;
        };
        let Ok(ft) = e.file_type() else {
            return Visit::Next;
        };
        let kind = match (ft.is_dir(), ft.is_file()) {
            (true, _) => FileKind::Folder,
            (_, true) => FileKind::File,
            _ => return Visit::Next,
        };
        if out.len() >= max {
            truncated = true;
            return Visit::Stop;
        }
        let size = if ft.is_file() {
            e.metadata().map(|m| m.len()).unwrap_or(0)
        } else {
            0
        };
        out.push(FileEntry {
            path: rel.join(&name).display().to_string(),
            size,
            name: name_str.to_owned(),
            kind,
        });
        if ft.is_dir() {
            Visit::Descend
        } else {
            Visit::Next
        }
    })?;
    Ok((out, truncated))
}

/// Removes a regular file from a disk. Folders, special files and symlinks are refused.
pub fn remove(dir: &Dir, rel: &Path) -> Result<(), FsError> {
    let meta = dir
        .symlink_metadata(rel)
        .map_err(|e| FsError::from_io(rel, e))?;
    regular(&meta, rel)?;
    dir.remove_file(rel).map_err(|e| FsError::from_io(rel, e))
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn part_name(name: &OsStr) -> String {
    format!(
        "{}{}{}{}-{}",
        paths::PART_PREFIX,
        name.to_string_lossy(),
        paths::PART_INFIX,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes a file atomically at `rel` on a disk: missing parent folders (inside the disk) are
/// created; `fill` writes the content to a file that has no name yet; the file is fsynced, then
/// linked in, and the directory is fsynced. An existing target is refused unless `overwrite`. On
/// any error before the link, nothing is left; if only the final directory sync fails, the file
/// is in place but its name may not survive a crash, and the error says so. Returns what `fill`
/// returned.
pub fn write_atomic<T>(
    dir: &Dir,
    rel: &Path,
    overwrite: bool,
    fill: impl FnOnce(&mut std::fs::File) -> io::Result<T>,
) -> Result<T, FsError> {
    let mut pending = Pending::open(dir, rel, overwrite)?;
    let out = fill(pending.file()).map_err(|e| FsError::from_io(rel, e))?;
    pending.commit()?;
    Ok(out)
}

/// A file being written that has no name yet (an unnamed O_TMPFILE beside its target or, on
/// filesystems without it, a hidden `.name.part-*` file): written through [`Pending::file`],
/// named by [`Pending::commit`]. Dropped uncommitted, nothing is left (the kernel frees the
/// unnamed file; the part file is removed; after a kill, [`remove_part_files`] at the next start).
#[derive(Debug)]
pub struct Pending {
    parent: Dir,
    name: std::ffi::OsString,
    rel: PathBuf,
    overwrite: bool,
    file: std::fs::File,
    /// The hidden part file's name, when the filesystem has no O_TMPFILE.
    part: Option<String>,
}

impl Pending {
    /// A new unnamed file for `rel` on a disk (missing parent folders created); an existing
    /// target is refused now unless `overwrite` (and again, atomically, at the commit).
    pub fn open(dir: &Dir, rel: &Path, overwrite: bool) -> Result<Pending, FsError> {
        Pending::open_as(dir, rel, overwrite, true)
    }

    /// [`Pending::open`]; `tmpfile` false: the part file even where O_TMPFILE works (tests).
    fn open_as(dir: &Dir, rel: &Path, overwrite: bool, tmpfile: bool) -> Result<Pending, FsError> {
        let name = rel.file_name().ok_or(FsError::Path(PathError::NoFile))?;
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent = if parent_rel.as_os_str().is_empty() {
            dir.try_clone().map_err(|e| FsError::from_io(rel, e))?
        } else {
            match dir.create_dir_all(parent_rel) {
                // "Exists" may be a symlink out of the disk: opening it below says which.
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(FsError::from_io(parent_rel, e));
                }
                _ => {}
            }
            dir.open_dir(parent_rel)
                .map_err(|e| FsError::from_io(parent_rel, e))?
        };
        if let Ok(existing) = parent.symlink_metadata(name) {
            let what = rel.display().to_string();
            if !overwrite {
                // Fail early (the final link/rename checks again, atomically).
                return Err(FsError::AlreadyExists(what));
            }
            if existing.is_dir() {
                return Err(FsError::IsFolder(what));
            }
            if !existing.is_file() {
                // A symlink (wherever it points) or a special file is never replaced.
                return Err(FsError::Forbidden(what, "not a regular file".into()));
            }
        }
        let io = |e: io::Error| FsError::from_io(rel, e);
        let unnamed = if tmpfile {
            rustix::fs::openat(
                &parent,
                ".",
                rustix::fs::OFlags::TMPFILE
                    | rustix::fs::OFlags::RDWR
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::from_raw_mode(0o644),
            )
        } else {
            Err(rustix::io::Errno::OPNOTSUPP)
        };
        let (file, part) = match unnamed {
            // Unnamed until the end: if we die, the kernel frees it; nothing partial is visible.
            Ok(fd) => (std::fs::File::from(fd), None),
            Err(
                rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL,
            ) => {
                // vfat, exfat: a hidden part file, renamed at the end.
                let tmp = part_name(name);
                let mut opts = OpenOptions::new();
                opts.read(true).write(true).create_new(true);
                let f = parent.open_with(&tmp, &opts).map_err(io)?;
                (f.into_std(), Some(tmp))
            }
            Err(e) => return Err(io(e.into())),
        };
        Ok(Pending {
            parent,
            name: name.to_owned(),
            rel: rel.to_owned(),
            overwrite,
            file,
            part,
        })
    }

    /// Where the content goes.
    pub fn file(&mut self) -> &mut std::fs::File {
        &mut self.file
    }

    /// Fsyncs the file, names it (without replacing an existing file unless `overwrite`), and
    /// fsyncs its directory.
    pub fn commit(mut self) -> Result<(), FsError> {
        let rel = self.rel.clone();
        let io = |e: io::Error| FsError::from_io(&rel, e);
        self.file.sync_all().map_err(io)?;
        let (parent, name) = (&self.parent, self.name.as_os_str());
        match self.part.take() {
            None => {
                let proc_path = format!(
                    "/proc/self/fd/{}",
                    std::os::fd::AsRawFd::as_raw_fd(&self.file)
                );
                let link = |target: &OsStr| {
                    rustix::fs::linkat(
                        rustix::fs::CWD,
                        proc_path.as_str(),
                        parent,
                        target,
                        rustix::fs::AtFlags::SYMLINK_FOLLOW,
                    )
                };
                if self.overwrite {
                    let tmp = part_name(name);
                    link(OsStr::new(&tmp)).map_err(|e| io(e.into()))?;
                    if let Err(e) = rustix::fs::renameat(parent, tmp.as_str(), parent, name) {
                        let _ = parent.remove_file(&tmp);
                        return Err(io(e.into()));
                    }
                } else {
                    link(name).map_err(|e| io(e.into()))?;
                }
            }
            Some(tmp) => {
                let flags = if self.overwrite {
                    rustix::fs::RenameFlags::empty()
                } else {
                    rustix::fs::RenameFlags::NOREPLACE
                };
                if let Err(e) = rustix::fs::renameat_with(parent, tmp.as_str(), parent, name, flags)
                {
                    let _ = parent.remove_file(&tmp);
                    return Err(io(e.into()));
                }
            }
        }
        sync_dir(parent).map_err(io)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(tmp) = self.part.take() {
            let _ = self.parent.remove_file(&tmp);
        }
    }
}

/// Makes a directory's entries durable (after a link or a rename into it). A [`Dir`] holds an
/// `O_PATH` descriptor, on which `fsync` fails (EBADF): the directory is opened for reading here.
/// Filesystems that cannot sync a directory (EINVAL) have nothing more to make durable.
fn sync_dir(dir: &Dir) -> io::Result<()> {
    let fd = rustix::fs::openat(
        dir,
        ".",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    match rustix::fs::fsync(&fd) {
        Ok(()) | Err(rustix::io::Errno::INVAL) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Streams `src` into `dst` and returns the SHA-256 of what was read, and its size.
pub fn copy_hashing<R: Read, W: Write>(mut src: R, dst: &mut W) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
        total += n as u64;
    }
    Ok((hex(&h.finalize()), total))
}

/// Copies a regular file from one disk to another (or into the repository) atomically, and
/// verifies the copy: its SHA-256, read back before it gets its name, must equal the source's.
/// Returns (footprint, size).
pub fn copy_verified(
    src_dir: &Dir,
    src: &Path,
    dst_dir: &Dir,
    dst: &Path,
    overwrite: bool,
) -> Result<(String, u64), FsError> {
    let (f, _) = open_regular(src_dir, src)?;
    let src_label = src.display().to_string();
    write_atomic(dst_dir, dst, overwrite, |out| {
        let (hash, size, back) = copy_hashing_read_back(f, out)?;
        if back != hash {
            return Err(io::Error::other(
                FsError::Corrupted(src_label.clone()).to_string(),
            ));
        }
        Ok((hash, size))
    })
}

/// Streams `src` into `dst` like [`copy_hashing`], and reads every chunk back from `dst` once it
/// is written, on a second thread, hashing what it reads: (source hash, size, read-back hash).
/// The two hashes run at once (on two CPUs, twice as fast as hashing the copy after it is done);
/// memory stays a few chunks whatever the size.
fn copy_hashing_read_back<R: Read>(
    src: R,
    dst: &mut std::fs::File,
) -> io::Result<(String, u64, String)> {
    use std::os::unix::fs::FileExt;
    let back = dst.try_clone()?;
    // Written chunks on their way to the reader (offset, length); a bound keeps memory flat.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, usize)>(4);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> io::Result<String> {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            for (at, n) in rx {
                let chunk = buf.get_mut(..n).unwrap_or_default();
                back.read_exact_at(chunk, at)?;
                h.update(&*chunk);
            }
            Ok(hex(&h.finalize()))
        });
        // The writer is dropped at the end of this statement, which ends the reader's loop.
        let written = copy_hashing(src, &mut ReadBack { dst, tx, at: 0 });
        let back = reader
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("read-back thread panicked")));
        match (written, back) {
            (Ok((hash, size)), Ok(back)) => Ok((hash, size, back)),
            // The reader's error first: it is why a write found the reader gone.
            (_, Err(e)) | (Err(e), _) => Err(e),
        }
    })
}

/// A writer to a file that tells the read-back thread where each write landed.
struct ReadBack<'a> {
    dst: &'a mut std::fs::File,
    tx: std::sync::mpsc::SyncSender<(u64, usize)>,
    at: u64,
}

impl Write for ReadBack<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.dst.write(buf)?;
        self.tx
            .send((self.at, n))
            .map_err(|_| io::Error::other("the read-back thread stopped"))?;
        self.at += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.dst.flush()
    }
}

/// Removes the agent's leftover transfer files under `dir` (after a kill on a filesystem without
/// O_TMPFILE). Returns how many were removed.
pub fn remove_part_files(dir: &Dir) -> usize {
    let mut removed = 0;
    let _ = walk(dir, |d, _, e| {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            return Visit::Descend;
        }
        let name = e.file_name();
        if name.to_str().is_some_and(paths::is_part_file) && d.remove_file(&name).is_ok() {
            removed += 1;
        }
        Visit::Next
    });
    removed
}

#[cfg(test)]
mod tests;
