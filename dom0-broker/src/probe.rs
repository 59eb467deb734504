//! `dom0-broker probe-channel SOCKET`: the channel's own round trip, for comparing the chain with
//! the platform it runs on. Dom0 writes a small message on a channel socket whose guest echoes it
//! back (`stty raw -echo; cat /dev/hvcN > /dev/hvcN`), and times each round trip. Use a channel
//! that no link holds (the backend serves one client at a time).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The figures of a probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub samples: usize,
    pub p50: Duration,
    pub p99: Duration,
}

/// `count` round trips of a 32-byte message (after a tenth as warm-up), each within `deadline`.
pub fn probe(socket: &Path, count: usize, deadline: Duration) -> std::io::Result<Probe> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(deadline))?;
    let msg = *b"xen-msg channel probe 0123456789";
    let mut back = [0u8; 32];
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + count / 10 + 1 {
        let t0 = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        let rtt = t0.elapsed();
        if back != msg {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the guest did not echo the probe byte for byte (is the tty raw?)",
            ));
        }
        if i > count / 10 {
            samples.push(rtt);
        }
    }
    samples.sort();
    Ok(Probe {
        samples: samples.len(),
        p50: topics::payload::quantile(&samples, 0.5).unwrap_or_default(),
        p99: topics::payload::quantile(&samples, 0.99).unwrap_or_default(),
    })
}
