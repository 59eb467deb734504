use super::*;
use std::os::unix::fs::symlink;

struct Tmp(PathBuf);

impl Tmp {
    fn new(name: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!("agent-fsops-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.join("disk/docs")).unwrap();
        std::fs::create_dir_all(p.join("outside")).unwrap();
        std::fs::write(p.join("disk/docs/a.txt"), b"hello").unwrap();
        std::fs::write(p.join("outside/secret"), b"secret").unwrap();
        Tmp(p)
    }
    fn disk(&self) -> Dir {
        open_root(&self.0.join("disk")).unwrap()
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn symlinks_leaving_the_disk_are_forbidden() {
    let t = Tmp::new("symlinks");
    symlink(t.0.join("outside/secret"), t.0.join("disk/abs-link")).unwrap();
    symlink("../outside/secret", t.0.join("disk/rel-link")).unwrap();
    symlink(t.0.join("outside"), t.0.join("disk/dir-link")).unwrap();
    symlink("docs/a.txt", t.0.join("disk/inside-link")).unwrap();
    let d = t.disk();
    for p in ["abs-link", "rel-link", "dir-link/secret"] {
        let e = footprint(&d, Path::new(p)).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Forbidden, "{p}: {e}");
    }
    assert_eq!(
        footprint(&d, Path::new("inside-link")).unwrap(),
        footprint(&d, Path::new("docs/a.txt")).unwrap()
    );
    // Writing through a symlinked folder that leaves the disk is refused too.
    let e = write_atomic(&d, Path::new("dir-link/new"), false, |f| f.write_all(b"x")).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Forbidden, "{e}");
    assert!(!t.0.join("outside/new").exists());
}

#[test]
fn special_files_are_forbidden() {
    let t = Tmp::new("special");
    nix::unistd::mkfifo(
        &t.0.join("disk/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let d = t.disk();
    assert_eq!(
        footprint(&d, Path::new("fifo")).unwrap_err().code(),
        ErrorCode::Forbidden
    );
    assert_eq!(
        footprint(&d, Path::new("docs")).unwrap_err().code(),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        footprint(&d, Path::new("nope")).unwrap_err().code(),
        ErrorCode::NotFound
    );
}

#[test]
fn atomic_write_never_overwrites_silently() {
    let t = Tmp::new("atomic");
    let d = t.disk();
    write_atomic(&d, Path::new("new/deep/b.txt"), false, |f| {
        f.write_all(b"one")
    })
    .unwrap();
    assert_eq!(
        std::fs::read(t.0.join("disk/new/deep/b.txt")).unwrap(),
        b"one"
    );
    let e = write_atomic(&d, Path::new("new/deep/b.txt"), false, |f| {
        f.write_all(b"two")
    })
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::AlreadyExists);
    assert_eq!(
        std::fs::read(t.0.join("disk/new/deep/b.txt")).unwrap(),
        b"one"
    );
    write_atomic(&d, Path::new("new/deep/b.txt"), true, |f| {
        f.write_all(b"two")
    })
    .unwrap();
    assert_eq!(
        std::fs::read(t.0.join("disk/new/deep/b.txt")).unwrap(),
        b"two"
    );
    // A failing writer leaves nothing behind, not even a transfer file.
    let e = write_atomic(&d, Path::new("c.txt"), false, |f| {
        f.write_all(b"partial")?;
        Err::<(), _>(io::Error::other("source vanished"))
    })
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Io);
    assert!(!t.0.join("disk/c.txt").exists());
    let (entries, _) = list(&d, 100).unwrap();
    assert!(
        entries.iter().all(|e| !e.name.contains(".part-")),
        "{entries:?}"
    );
}

#[test]
fn part_file_fallback_and_cleanup() {
    let t = Tmp::new("parts");
    let d = t.disk();
    let part = |data: &[u8]| {
        let mut p = Pending::open_as(&d, Path::new("x.bin"), false, false)?;
        p.file().write_all(data).unwrap();
        p.commit()
    };
    part(b"data").unwrap();
    assert_eq!(std::fs::read(t.0.join("disk/x.bin")).unwrap(), b"data");
    // Dropped uncommitted: its part file goes with it.
    let mut p = Pending::open_as(&d, Path::new("z.bin"), false, false).unwrap();
    p.file().write_all(b"half").unwrap();
    drop(p);
    let (entries, _) = list(&d, 100).unwrap();
    assert!(
        entries.iter().all(|e| !e.name.contains("z.bin")),
        "{entries:?}"
    );
    let e = part(b"again").unwrap_err();
    assert_eq!(
        e.code(),
        ErrorCode::AlreadyExists,
        "RENAME_NOREPLACE keeps the existing file"
    );
    std::fs::write(
        t.0.join("disk/docs/.y.bin.part-1-2"),
        b"left by a killed agent",
    )
    .unwrap();
    assert_eq!(remove_part_files(&d), 1);
    assert!(!t.0.join("disk/docs/.y.bin.part-1-2").exists());
}

#[test]
fn copy_verifies_and_lists() {
    let t = Tmp::new("copy");
    let d = t.disk();
    let (hash, size) = copy_verified(
        &d,
        Path::new("docs/a.txt"),
        &d,
        Path::new("copy/a.txt"),
        false,
    )
    .unwrap();
    assert_eq!(size, 5);
    assert_eq!(
        hash,
        "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    );
    let (entries, truncated) = list(&d, 100).unwrap();
    assert!(!truncated);
    let names: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    assert!(
        names.contains(&"copy/a.txt") && names.contains(&"docs") && names.contains(&"docs/a.txt"),
        "{names:?}"
    );
    let (_, truncated) = list(&d, 2).unwrap();
    assert!(truncated);
    remove(&d, Path::new("copy/a.txt")).unwrap();
    assert_eq!(
        remove(&d, Path::new("copy")).unwrap_err().code(),
        ErrorCode::InvalidArgument
    );
}

#[test]
fn a_disk_directory_can_be_synced() {
    // The disk's `Dir` is an O_PATH descriptor: fsync on it fails (EBADF), so a write's new name
    // was never made durable. `sync_dir` must sync the directory itself.
    let t = Tmp::new("sync-dir");
    let d = t.disk();
    assert_eq!(
        rustix::fs::fsync(&d)
            .map_err(io::Error::from)
            .map_err(|e| e.raw_os_error()),
        Err(Some(rustix::io::Errno::BADF.raw_os_error())),
        "cap-std's Dir is expected to be O_PATH"
    );
    sync_dir(&d).unwrap();
    let docs = d.open_dir("docs").unwrap();
    sync_dir(&docs).unwrap();
}

#[test]
fn a_copy_is_read_back_chunk_by_chunk_as_it_is_written() {
    let t = Tmp::new("read-back");
    let data: Vec<u8> = (0..CHUNK * 2 + 123).map(|i| (i % 251) as u8).collect();
    let path = t.0.join("copy.bin");
    let mut dst = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    let (hash, size, back) = copy_hashing_read_back(&data[..], &mut dst).unwrap();
    assert_eq!(size, data.len() as u64);
    assert_eq!(hash, sha256(&data[..]).unwrap().0);
    assert_eq!(back, hash);
    assert_eq!(std::fs::read(&path).unwrap(), data);
}

#[test]
fn a_copy_that_does_not_land_where_written_reads_back_differently() {
    // Appending after old content: what is read back at each chunk's offset is not what was
    // written, and the hashes differ (copy_verified then refuses the copy).
    let t = Tmp::new("read-back-differs");
    let path = t.0.join("copy.bin");
    std::fs::write(&path, vec![7u8; 1000]).unwrap();
    let mut dst = std::fs::File::options()
        .read(true)
        .append(true)
        .open(&path)
        .unwrap();
    let data = vec![1u8; 5000];
    let (hash, _, back) = copy_hashing_read_back(&data[..], &mut dst).unwrap();
    assert_eq!(hash, sha256(&data[..]).unwrap().0);
    assert_ne!(back, hash);
}
