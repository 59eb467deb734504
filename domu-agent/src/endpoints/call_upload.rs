//! `domu-agent call create_file ... data=@FILE` for a file larger than a chunk: the upload
//! (`topics::upload`) driven over the agent's call socket, one connection per chunk, at most a
//! window of them unanswered; the caller gets one answer, the last chunk's (or the first error).
//! Blocking: the `call` command is a plain program.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::{Map, Value};
use topics::upload::{self, Prepared, Progress, Upload};

/// Uploads `prepared` (a `create_file` larger than a chunk: [`upload::prepare`]) through the call
/// socket at `socket`; returns the answer lines for the caller (one: the last chunk's answer, or
/// the first error).
pub fn upload(
    socket: &Path,
    prepared: &Prepared,
    timeout_ms: Option<u64>,
    chunk: usize,
) -> Result<Vec<String>, String> {
    let mut bits = [0u8; 16];
    getrandom::getrandom(&mut bits).map_err(|e| format!("no randomness for the upload id: {e}"))?;
    let mut up = Upload::new(
        prepared.base.clone(),
        prepared.data.clone(),
        upload::new_id(bits),
        chunk,
        upload::WINDOW,
    );
    let mut waiting: VecDeque<(u64, BufReader<UnixStream>)> = VecDeque::new();
    loop {
        while let Some((offset, chunk_args)) = up.next_chunk() {
            // The caller's other arguments (a destination) travel with every chunk.
            let a = upload::chunk_arguments(&prepared.rest, &chunk_args);
            let mut req = Map::new();
            req.insert("command".into(), Value::String("create_file".into()));
            req.insert("args".into(), Value::Object(a));
            if let Some(t) = timeout_ms {
                req.insert("timeout_ms".into(), Value::from(t));
            }
            let mut line = Value::Object(req).to_string();
            line.push('\n');
            let mut conn = UnixStream::connect(socket).map_err(|e| {
                format!(
                    "agent socket {}: {e} (is the agent running?)",
                    socket.display()
                )
            })?;
            conn.write_all(line.as_bytes())
                .map_err(|e| format!("agent socket: {e}"))?;
            waiting.push_back((offset, BufReader::new(conn)));
        }
        let Some((offset, conn)) = waiting.pop_front() else {
            return Err("upload: no chunk left to send and none answered".into());
        };
        let lines: Vec<String> = conn.lines().map_while(Result::ok).collect();
        // One answer per chunk (a timeout or the agent's own refusal is one line too).
        let Some(answer) = lines.into_iter().next() else {
            return Err(format!("upload: no answer to the chunk at offset {offset}"));
        };
        match up.on_answer(offset, answer.as_bytes()) {
            Progress::Going => {}
            Progress::Done => return Ok(vec![answer]),
            Progress::Failed if answer.contains(r#""status":"error""#) => return Ok(vec![answer]),
            Progress::Failed => {
                let why =
                    format!("upload: the responder's count of bytes received is wrong: {answer}");
                let line = topics::Response::<()>::error(
                    None,
                    topics::ErrorBody::new(topics::ErrorCode::Internal, why),
                )
                .to_json();
                return Ok(vec![String::from_utf8_lossy(&line).into_owned()]);
            }
        }
    }
}
