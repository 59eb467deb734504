//! Uploads, the responder's side: which chunk of which upload a `create_file` request is, and
//! whether to take it. Pure (arguments, sizes and instants in; decisions out); the service keeps
//! each upload's unnamed file in the entry (`F`) and does the file work. The requester's side and
//! the contract: `topics::upload`.
//!
//! Rules: an upload is created by its chunk at offset 0 and bound to that chunk's `sender` (another
//! sender's chunk is `forbidden`); chunks come in order (`offset` = bytes received: a repeated or
//! early chunk is `invalid_argument`, the upload stays); the last chunk's `size` and `sha256` must
//! match what came (else `invalid_argument`, the upload is dropped). Bounds: uploads per sender,
//! bytes per upload, bytes of all uploads; an upload without a chunk for [`upload::IDLE`] is dropped.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use topics::payload::CreateFileArgs;
use topics::upload;
use topics::{ErrorBody, ErrorCode, VmId};

/// Uploads one sender may have going at once.
pub const PER_SENDER: usize = 4;

/// The bounds of the uploads of one agent.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Bytes of one upload (the file's size).
    pub max_bytes: u64,
    /// Bytes of all uploads going at once.
    pub max_total: u64,
    pub idle: Duration,
}

/// One upload going.
#[derive(Debug)]
pub struct Entry<F> {
    pub sender: VmId,
    pub disk: String,
    pub filepath: String,
    pub received: u64,
    hasher: Sha256,
    last_chunk: Instant,
    /// The unnamed file the chunks go to.
    pub file: F,
}

impl<F> Entry<F> {
    /// Takes `data` as the next chunk (the service wrote it to the file).
    pub fn took(&mut self, data: &[u8], now: Instant) {
        self.hasher.update(data);
        self.received += data.len() as u64;
        self.last_chunk = now;
    }

    /// The last chunk came: its `size` and `sha256` must be what was received.
    pub fn check_final(self, args: &CreateFileArgs) -> Result<F, (F, ErrorBody)> {
        let sha = self
            .hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let refuse = |m: String| ErrorBody::new(ErrorCode::InvalidArgument, m);
        if args.size != Some(self.received) {
            let m = format!(
                "upload: size {:?} announced, {} bytes received",
                args.size, self.received
            );
            return Err((self.file, refuse(m)));
        }
        if args.sha256.as_deref().map(str::to_ascii_lowercase) != Some(sha.clone()) {
            let m = "upload: the data received does not have the announced sha256".to_owned();
            return Err((self.file, refuse(m)));
        }
        Ok(self.file)
    }
}

/// What to do with a chunk that was taken.
#[derive(Debug)]
pub enum Chunk<F> {
    /// The first chunk of a new upload: open its file, write, then [`Uploads::start`].
    First,
    /// The next chunk of an upload going (taken out of the table while the service writes it; put
    /// back with [`Uploads::put_back`] unless it is the last).
    Next(Box<Entry<F>>),
}

/// The uploads going on this agent.
#[derive(Debug)]
pub struct Uploads<F> {
    going: HashMap<String, Entry<F>>,
    bounds: Bounds,
    /// Uploads dropped for idleness since the start.
    pub dropped_idle: u64,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(code, message)
}

impl<F> Uploads<F> {
    pub fn new(bounds: Bounds) -> Uploads<F> {
        Uploads {
            going: HashMap::new(),
            bounds,
            dropped_idle: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.going.len()
    }

    pub fn is_empty(&self) -> bool {
        self.going.is_empty()
    }

    /// A chunk from `sender` with `args` and `len` bytes of data: taken or refused.
    pub fn chunk(
        &mut self,
        sender: &VmId,
        args: &CreateFileArgs,
        len: u64,
    ) -> Result<Chunk<F>, ErrorBody> {
        let id = args.upload_id.as_deref().unwrap_or_default();
        if !upload::valid_id(id) {
            return Err(refuse(
                ErrorCode::InvalidArgument,
                "field `upload_id`: 16 to 64 letters, digits, - or _",
            ));
        }
        let offset = args.offset.ok_or_else(|| {
            refuse(
                ErrorCode::InvalidArgument,
                "field `offset`: missing (an upload's chunk)",
            )
        })?;
        let total: u64 = self.going.values().map(|e| e.received).sum();
        if total + len > self.bounds.max_total {
            return Err(refuse(
                ErrorCode::Busy,
                format!(
                    "uploads going hold {total} bytes already (at most {})",
                    self.bounds.max_total
                ),
            ));
        }
        let Some(entry) = self.going.get(id) else {
            if offset != 0 {
                return Err(refuse(
                    ErrorCode::NotFound,
                    "upload: no such upload going (never started, finished, refused or idle too long)",
                ));
            }
            if self.going.values().filter(|e| &e.sender == sender).count() >= PER_SENDER {
                return Err(refuse(
                    ErrorCode::Busy,
                    format!("upload: {PER_SENDER} uploads of {sender} going already"),
                ));
            }
            self.fits(len)?;
            return Ok(Chunk::First);
        };
        if &entry.sender != sender {
            return Err(refuse(
                ErrorCode::Forbidden,
                "upload: another requester's upload",
            ));
        }
        if entry.disk != args.disk || entry.filepath != args.filepath {
            return Err(refuse(
                ErrorCode::InvalidArgument,
                "upload: disk and filepath differ from the upload's first chunk",
            ));
        }
        if offset != entry.received {
            let what = if offset < entry.received {
                "repeated"
            } else {
                "out of order"
            };
            return Err(refuse(
                ErrorCode::InvalidArgument,
                format!(
                    "upload: chunk at offset {offset} {what}: {} bytes received",
                    entry.received
                ),
            ));
        }
        self.fits(entry.received + len)?;
        let entry = self
            .going
            .remove(id)
            .ok_or_else(|| refuse(ErrorCode::Internal, "upload vanished"))?;
        Ok(Chunk::Next(Box::new(entry)))
    }

    fn fits(&self, size: u64) -> Result<(), ErrorBody> {
        if size > self.bounds.max_bytes {
            return Err(refuse(
                ErrorCode::TooLarge,
                format!("upload: more than {} bytes", self.bounds.max_bytes),
            ));
        }
        Ok(())
    }

    /// Files a new upload whose first chunk (`data`) was written to `file`.
    pub fn start(
        &mut self,
        sender: VmId,
        args: &CreateFileArgs,
        data: &[u8],
        file: F,
        now: Instant,
    ) -> u64 {
        let mut e = Entry {
            sender,
            disk: args.disk.clone(),
            filepath: args.filepath.clone(),
            received: 0,
            hasher: Sha256::new(),
            last_chunk: now,
            file,
        };
        e.took(data, now);
        let received = e.received;
        self.going
            .insert(args.upload_id.clone().unwrap_or_default(), e);
        received
    }

    /// Puts back an upload whose chunk was written (not the last).
    pub fn put_back(&mut self, id: &str, entry: Entry<F>) {
        self.going.insert(id.to_owned(), entry);
    }

    /// Drops the uploads without a chunk for the idle time: their files, for the service to
    /// discard.
    pub fn drop_idle(&mut self, now: Instant) -> Vec<F> {
        let idle = self.bounds.idle;
        let gone: Vec<String> = self
            .going
            .iter()
            .filter(|(_, e)| now.duration_since(e.last_chunk) >= idle)
            .map(|(id, _)| id.clone())
            .collect();
        self.dropped_idle += gone.len() as u64;
        gone.into_iter()
            .filter_map(|id| self.going.remove(&id).map(|e| e.file))
            .collect()
    }

    /// When [`Uploads::drop_idle`] has something to do.
    pub fn next_idle(&self) -> Option<Instant> {
        self.going
            .values()
            .map(|e| e.last_chunk + self.bounds.idle)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn bounds() -> Bounds {
        Bounds {
            max_bytes: 100,
            max_total: 150,
            idle: Duration::from_secs(60),
        }
    }

    fn vm(s: &str) -> VmId {
        VmId::parse(s).unwrap()
    }

    fn args(id: &str, offset: u64) -> CreateFileArgs {
        CreateFileArgs {
            disk: "usb0".into(),
            filepath: "big.bin".into(),
            upload_id: Some(id.into()),
            offset: Some(offset),
            ..Default::default()
        }
    }

    fn code<T: std::fmt::Debug>(r: Result<T, ErrorBody>) -> ErrorCode {
        r.unwrap_err().code
    }

    /// An upload of `n` bytes started by vm-gui with `ID` (its file: the bytes written).
    fn started(u: &mut Uploads<Vec<u8>>, n: usize, now: Instant) {
        let a = args(ID, 0);
        assert!(matches!(
            u.chunk(&vm("vm-gui"), &a, n as u64),
            Ok(Chunk::First)
        ));
        u.start(vm("vm-gui"), &a, &vec![1; n], vec![1; n], now);
    }

    #[test]
    fn chunks_in_order_then_the_final_check() {
        let now = Instant::now();
        let mut u = Uploads::new(bounds());
        started(&mut u, 10, now);
        let Ok(Chunk::Next(mut e)) = u.chunk(&vm("vm-gui"), &args(ID, 10), 5) else {
            panic!("next chunk refused");
        };
        e.took(&[1; 5], now);
        let mut last = args(ID, 15);
        last.last = true;
        last.size = Some(15);
        last.sha256 = Some(upload::sha256_hex(&[1; 15]).to_uppercase());
        assert!(e.check_final(&last).is_ok(), "hex in either case");
        assert!(u.is_empty(), "the last chunk's entry is the service's");
    }

    #[test]
    fn a_wrong_size_or_footprint_is_refused() {
        let now = Instant::now();
        let mut u = Uploads::new(bounds());
        started(&mut u, 10, now);
        let Ok(Chunk::Next(e)) = u.chunk(&vm("vm-gui"), &args(ID, 10), 0) else {
            panic!()
        };
        let mut last = args(ID, 10);
        last.size = Some(11);
        last.sha256 = Some(upload::sha256_hex(&[1; 10]));
        let (_, why) = e.check_final(&last).unwrap_err();
        assert_eq!(why.code, ErrorCode::InvalidArgument);
        started(&mut u, 10, now);
        let Ok(Chunk::Next(e)) = u.chunk(&vm("vm-gui"), &args(ID, 10), 0) else {
            panic!()
        };
        last.size = Some(10);
        last.sha256 = Some(upload::sha256_hex(&[2; 10]));
        assert_eq!(
            e.check_final(&last).unwrap_err().1.code,
            ErrorCode::InvalidArgument
        );
    }

    #[test]
    fn chunks_repeated_early_or_from_another_sender_are_refused_and_the_upload_stays() {
        let now = Instant::now();
        let mut u = Uploads::new(bounds());
        started(&mut u, 10, now);
        assert_eq!(
            code(u.chunk(&vm("vm-gui"), &args(ID, 0), 10)),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(u.chunk(&vm("vm-gui"), &args(ID, 20), 10)),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            code(u.chunk(&vm("vm-evil"), &args(ID, 10), 10)),
            ErrorCode::Forbidden
        );
        let mut elsewhere = args(ID, 10);
        elsewhere.filepath = "other.bin".into();
        assert_eq!(
            code(u.chunk(&vm("vm-gui"), &elsewhere, 10)),
            ErrorCode::InvalidArgument
        );
        assert_eq!(u.len(), 1);
        assert!(matches!(
            u.chunk(&vm("vm-gui"), &args(ID, 10), 10),
            Ok(Chunk::Next(_))
        ));
    }

    #[test]
    fn unknown_uploads_bad_ids_and_missing_offsets_are_refused() {
        let mut u: Uploads<Vec<u8>> = Uploads::new(bounds());
        assert_eq!(
            code(u.chunk(&vm("vm-gui"), &args(ID, 10), 10)),
            ErrorCode::NotFound
        );
        assert_eq!(
            code(u.chunk(&vm("vm-gui"), &args("short", 0), 10)),
            ErrorCode::InvalidArgument
        );
        let mut a = args(ID, 0);
        a.offset = None;
        assert_eq!(
            code(u.chunk(&vm("vm-gui"), &a, 10)),
            ErrorCode::InvalidArgument
        );
    }

    #[test]
    fn bounds_per_upload_per_sender_and_in_all() {
        let now = Instant::now();
        let mut u = Uploads::new(bounds());
        assert_eq!(
            code(u.chunk(&vm("vm-gui"), &args(ID, 0), 101)),
            ErrorCode::TooLarge
        );
        started(&mut u, 90, now);
        assert_eq!(
            code(u.chunk(&vm("vm-gui"), &args(ID, 90), 11)),
            ErrorCode::TooLarge
        );
        let id = |i: usize| format!("{i:032}");
        for i in 1..PER_SENDER {
            let a = args(&id(i), 0);
            assert!(matches!(u.chunk(&vm("vm-gui"), &a, 1), Ok(Chunk::First)));
            u.start(vm("vm-gui"), &a, &[1], vec![1], now);
        }
        assert_eq!(
            code(u.chunk(&vm("vm-gui"), &args(&id(9), 0), 1)),
            ErrorCode::Busy
        );
        assert!(matches!(
            u.chunk(&vm("vm-other"), &args(&id(9), 0), 50),
            Ok(Chunk::First)
        ));
        assert_eq!(
            code(u.chunk(&vm("vm-other"), &args(&id(9), 0), 60)),
            ErrorCode::Busy,
            "150 in all"
        );
    }

    #[test]
    fn idle_uploads_are_dropped_and_counted() {
        let t0 = Instant::now();
        let mut u = Uploads::new(bounds());
        started(&mut u, 10, t0);
        assert_eq!(u.next_idle(), Some(t0 + Duration::from_secs(60)));
        assert!(u.drop_idle(t0 + Duration::from_secs(59)).is_empty());
        assert_eq!(u.drop_idle(t0 + Duration::from_secs(60)), vec![vec![1; 10]]);
        assert_eq!((u.len(), u.dropped_idle), (0, 1));
        assert_eq!(u.next_idle(), None);
    }
}
