//! An MVP application: JSON lines on an agent's legacy socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::DEADLINE;

/// A client of the MVP protocol: JSON lines on a UNIX socket.
#[derive(Debug)]
pub struct LegacyClient {
    w: UnixStream,
    r: BufReader<UnixStream>,
    /// Lines read while looking for another type, in order.
    backlog: std::collections::VecDeque<Value>,
}

impl LegacyClient {
    pub fn connect(path: &Path) -> LegacyClient {
        let w = UnixStream::connect(path).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        LegacyClient {
            w,
            r,
            backlog: Default::default(),
        }
    }

    pub fn send_raw(&mut self, line: &[u8]) {
        self.w.write_all(line).unwrap();
    }

    pub fn send(&mut self, v: &Value) {
        self.send_raw(format!("{v}\n").as_bytes());
    }

    /// The next line, parsed; None after `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Option<Value> {
        self.r.get_ref().set_read_timeout(Some(timeout)).unwrap();
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(n) if n > 0 => Some(serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!("not a JSON line: {line:?}: {e}");
            })),
            _ => None,
        }
    }

    /// The next line of `type` (others in between are kept for later).
    pub fn next_of(&mut self, kind: &str) -> Value {
        if let Some(i) = self.backlog.iter().position(|v| v["type"] == kind) {
            return self.backlog.remove(i).unwrap();
        }
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            if let Some(v) = self.next(Duration::from_secs(1)) {
                if v["type"] == kind {
                    return v;
                }
                self.backlog.push_back(v);
            }
        }
        panic!("no {kind} line");
    }

    pub fn command(&mut self, commande: &str, destination: &str, arguments: Value) -> Value {
        self.send(&json!({
            "type": "commande", "source": "mvp-app", "destination": destination,
            "payload": {"commande": commande, "arguments": arguments}
        }));
        self.next_of("reponse")
    }
}
