//! Uploads: a file larger than a chunk travels as a sequence of `create_file` requests, so that
//! no message holds a channel for long and every hop works on one chunk while the next is on its
//! way. The requester's side lives here, pure (which chunk goes next, what an answer means), used
//! by `domu-agent call` and by the one MVP translation; the responder's side is the disk service's
//! (`domu-agent/src/disk/upload.rs`).
//!
//! - Every chunk is a `create_file` request of its own (its own `request_id`) with the upload's
//!   `upload_id`, its `offset` (the bytes sent before it) and its `data`; the last also has
//!   `final: true`, the file's `size` and `sha256`.
//! - Each chunk is answered with `received` (the bytes the responder has); at most
//!   [`Upload::window`] chunks are unanswered at once. The first error ends the upload: its answer
//!   is the caller's. The last chunk's answer is the caller's answer.

use std::collections::BTreeSet;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::payload::CreateFileArgs;

/// File data per chunk, by default: 16 KiB (21,848 bytes of Base64). A chunk crosses each channel
/// whole, so a small message may wait for the chunk in progress at each hop: on real Xen (under
/// TCG) a small request's p99 during a 4 MiB upload was 1.46× its idle p99 with 16 KiB chunks and
/// 17.5× with 64 KiB, for the same upload time (docs/performance.md).
pub const CHUNK: usize = 16 * 1024;
/// Chunks unanswered at once, by default.
pub const WINDOW: usize = 4;
/// An upload with no chunk for this long is dropped by its responder.
pub const IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// True when `data` bytes of a file travel as an upload rather than in one message.
pub fn needed(data: usize, chunk: usize) -> bool {
    data > chunk
}

/// A `create_file` ready to go as an upload.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The caller's arguments but `data` (disk, filepath, a destination...): every chunk repeats
    /// them. Without the data, so that a chunk's arguments cost a chunk, not the file.
    pub rest: Map<String, Value>,
    pub base: CreateFileArgs,
    /// The file data, decoded.
    pub data: Vec<u8>,
}

/// A `create_file`'s arguments as an upload, when its data is larger than `chunk` bytes and it is
/// not a chunk already: None when it goes in one message; Some(Err) when the other arguments do
/// not make a `create_file` (what is wrong).
pub fn prepare(args: &Map<String, Value>, chunk: usize) -> Option<Result<Prepared, String>> {
    let data = args.get("data")?.as_str()?;
    let len = crate::binary::decoded_len(data).ok()?;
    if !needed(len, chunk) || args.contains_key("upload_id") {
        return None;
    }
    // Data that is not Base64 goes whole too: its responder refuses it with its code.
    let data = crate::binary::decode_limited(data, len).ok()?;
    let rest: Map<String, Value> = args
        .iter()
        .filter(|(k, _)| k.as_str() != "data")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut fields = rest.clone();
    fields.insert("data".into(), Value::String(String::new()));
    Some(
        serde_json::from_value::<CreateFileArgs>(Value::Object(fields))
            .map_err(|e| format!("create_file arguments: {e}"))
            .map(|base| Prepared { rest, base, data }),
    )
}

/// One chunk's arguments: the caller's other arguments ([`Prepared::rest`]) and the chunk's own.
pub fn chunk_arguments(rest: &Map<String, Value>, chunk: &CreateFileArgs) -> Map<String, Value> {
    let mut a = rest.clone();
    if let Ok(Value::Object(c)) = serde_json::to_value(chunk) {
        a.extend(c);
    }
    a
}

/// An upload id from 128 random bits: 32 lowercase hex digits.
pub fn new_id(bits: [u8; 16]) -> String {
    bits.iter().map(|b| format!("{b:02x}")).collect()
}

/// An acceptable upload id: 16 to 64 of `[0-9A-Za-z_-]` (unguessable ids are the requester's
/// business; this only keeps ids printable and bounded).
pub fn valid_id(id: &str) -> bool {
    (16..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The SHA-256 of `data`, lowercase hex (a file's footprint).
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What an answer to a chunk means for the upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Taken; more to send or to hear.
    Going,
    /// The last chunk's answer, ok: the file is in place. This answer is the caller's.
    Done,
    /// An error (or an answer that makes no sense): the upload is over. This answer is the
    /// caller's.
    Failed,
}

/// One upload, on the requester's side.
#[derive(Debug)]
pub struct Upload {
    /// The request's arguments but `data` (disk, filepath, overwrite).
    base: CreateFileArgs,
    id: String,
    data: Vec<u8>,
    sha256: String,
    chunk: usize,
    window: usize,
    /// Bytes sent so far: the next chunk's offset.
    sent: usize,
    /// Offsets of the chunks sent and not answered yet.
    unanswered: BTreeSet<u64>,
    over: bool,
}

impl Upload {
    /// An upload of `data` as `args` asks (its `data` field is ignored), under `id`, in chunks of
    /// `chunk` bytes, `window` unanswered at most (both at least 1).
    pub fn new(
        args: CreateFileArgs,
        data: Vec<u8>,
        id: String,
        chunk: usize,
        window: usize,
    ) -> Upload {
        let sha256 = sha256_hex(&data);
        Upload {
            base: CreateFileArgs {
                data: String::new(),
                upload_id: None,
                offset: None,
                last: false,
                size: None,
                sha256: None,
                ..args
            },
            id,
            data,
            sha256,
            chunk: chunk.max(1),
            window: window.max(1),
            sent: 0,
            unanswered: BTreeSet::new(),
            over: false,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// The next chunk's offset and arguments, when the window has room and data is left.
    pub fn next_chunk(&mut self) -> Option<(u64, CreateFileArgs)> {
        if self.over || self.sent >= self.data.len() || self.unanswered.len() >= self.window {
            return None;
        }
        let offset = self.sent;
        let end = (offset + self.chunk).min(self.data.len());
        let last = end == self.data.len();
        self.sent = end;
        self.unanswered.insert(offset as u64);
        let args = CreateFileArgs {
            data: crate::binary::encode(&self.data[offset..end]),
            upload_id: Some(self.id.clone()),
            offset: Some(offset as u64),
            last,
            size: last.then_some(self.data.len() as u64),
            sha256: last.then(|| self.sha256.clone()),
            ..self.base.clone()
        };
        Some((offset as u64, args))
    }

    /// The answer to the chunk sent at `offset`.
    pub fn on_answer(&mut self, offset: u64, payload: &[u8]) -> Progress {
        if self.over || !self.unanswered.remove(&offset) {
            return Progress::Going;
        }
        let v: Value = serde_json::from_slice(payload).unwrap_or_default();
        let ok = v.get("status").and_then(Value::as_str) == Some("ok");
        let end = (offset as usize + self.chunk).min(self.data.len()) as u64;
        let received = v.get("received").and_then(Value::as_u64);
        if !ok || received != Some(end) {
            self.over = true;
            return Progress::Failed;
        }
        if end == self.data.len() as u64 {
            self.over = true;
            return Progress::Done;
        }
        Progress::Going
    }

    /// True once the upload ended (done or failed).
    pub fn is_over(&self) -> bool {
        self.over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> CreateFileArgs {
        CreateFileArgs {
            disk: "usb0".into(),
            filepath: "big.bin".into(),
            data: "ignored".into(),
            overwrite: true,
            ..Default::default()
        }
    }

    fn ok(received: u64) -> Vec<u8> {
        format!(r#"{{"status":"ok","request_id":"x","received":{received}}}"#).into_bytes()
    }

    #[test]
    fn chunks_in_order_within_the_window_and_the_last_carries_size_and_footprint() {
        let data: Vec<u8> = (0..10u8).collect();
        let mut u = Upload::new(args(), data.clone(), "a".repeat(32), 4, 2);
        let (o1, c1) = u.next_chunk().unwrap();
        let (o2, c2) = u.next_chunk().unwrap();
        assert_eq!((o1, o2), (0, 4));
        assert!(u.next_chunk().is_none(), "window of 2");
        assert_eq!(c1.upload_id.as_deref(), Some("a".repeat(32).as_str()));
        assert_eq!(
            crate::binary::decode_limited(&c1.data, 100).unwrap(),
            &data[..4]
        );
        assert!(!c1.last && c1.size.is_none() && c1.sha256.is_none());
        assert!(
            c2.overwrite,
            "the request's own arguments travel with every chunk"
        );
        assert_eq!(u.on_answer(0, &ok(4)), Progress::Going);
        let (o3, c3) = u.next_chunk().unwrap();
        assert_eq!(o3, 8);
        assert!(c3.last);
        assert_eq!(c3.size, Some(10));
        assert_eq!(c3.sha256.as_deref(), Some(sha256_hex(&data).as_str()));
        assert!(u.next_chunk().is_none(), "all sent");
        assert_eq!(u.on_answer(4, &ok(8)), Progress::Going);
        assert_eq!(u.on_answer(8, &ok(10)), Progress::Done);
        assert!(u.is_over());
    }

    #[test]
    fn the_first_error_ends_the_upload() {
        let mut u = Upload::new(args(), vec![0; 10], "b".repeat(32), 4, 4);
        while u.next_chunk().is_some() {}
        let refused = br#"{"status":"error","error":{"code":"invalid_argument","message":"x"}}"#;
        assert_eq!(u.on_answer(0, refused), Progress::Failed);
        assert_eq!(u.on_answer(4, &ok(8)), Progress::Going, "ignored once over");
        assert!(u.next_chunk().is_none());
    }

    #[test]
    fn a_count_that_does_not_add_up_fails() {
        let mut u = Upload::new(args(), vec![0; 10], "c".repeat(32), 4, 4);
        u.next_chunk();
        assert_eq!(u.on_answer(0, &ok(3)), Progress::Failed);
    }

    #[test]
    fn an_answer_to_no_chunk_is_ignored() {
        let mut u = Upload::new(args(), vec![0; 10], "d".repeat(32), 4, 4);
        u.next_chunk();
        assert_eq!(u.on_answer(4, &ok(8)), Progress::Going);
        assert_eq!(u.on_answer(0, &ok(4)), Progress::Going);
    }

    #[test]
    fn a_large_create_file_is_prepared_once_and_its_chunks_repeat_the_other_arguments() {
        let data = vec![7u8; 10];
        let args = |data: &[u8]| -> Map<String, Value> {
            serde_json::from_value(serde_json::json!({
                "disk": "usb0",
                "filepath": "big.bin",
                "overwrite": true,
                "destination": "sys-usb",
                "data": crate::binary::encode(data),
            }))
            .unwrap()
        };
        assert!(prepare(&args(&data[..4]), 4).is_none(), "one message");
        let p = prepare(&args(&data), 4).unwrap().unwrap();
        assert_eq!(p.data, data);
        assert!(!p.rest.contains_key("data"), "the file is not repeated");
        assert_eq!((p.base.disk.as_str(), p.base.overwrite), ("usb0", true));
        let mut u = Upload::new(p.base.clone(), p.data.clone(), "e".repeat(32), 4, 4);
        let (_, c) = u.next_chunk().unwrap();
        let a = chunk_arguments(&p.rest, &c);
        assert_eq!(a["destination"], "sys-usb");
        assert_eq!(a["data"], crate::binary::encode(&data[..4]));
        assert_eq!(a["offset"], 0);
        let mut chunk = args(&data);
        chunk.insert("upload_id".into(), "f".repeat(32).into());
        assert!(prepare(&chunk, 4).is_none(), "already a chunk");
        let mut bad = args(&data);
        bad.remove("disk");
        assert!(prepare(&bad, 4).unwrap().is_err());
    }

    #[test]
    fn ids() {
        assert_eq!(new_id([0xab; 16]), "ab".repeat(16));
        assert!(valid_id(&new_id([7; 16])));
        assert!(!valid_id("short"));
        assert!(!valid_id(&"x/".repeat(10)));
        assert!(!valid_id(&"x".repeat(65)));
        assert!(needed(CHUNK + 1, CHUNK) && !needed(CHUNK, CHUNK));
    }
}
