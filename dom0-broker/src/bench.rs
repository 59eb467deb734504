//! Dom0's `messaging` benchmark: round trips controller → broker → controller on
//! [`DOM0_BENCH_PROBE`], a topic no VM may publish or read. Pure apart from the clock: the
//! controller publishes the probes and the replies.

use std::time::{Duration, Instant};

use topics::filter::DOM0_BENCH_PROBE;
use topics::payload::{self, BenchmarkArgs, BenchmarkReply, ErrorBody, ErrorCode, NoArgs};
use topics::topic::Command;
use topics::{RequestId, Response, Status};

/// Round trips measured per benchmark.
pub const SAMPLES: usize = 100;
/// A probe not back within this is reported as a timeout (QoS 0 probes can be lost).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A message the controller publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub topic: String,
    pub body: Vec<u8>,
}

/// What a benchmark request asks of Dom0.
#[derive(Debug)]
pub enum BenchRequest {
    /// Measure: answer `started` now, `finished` once the samples are in.
    Start(Bench),
    /// Answer at once (an error) and measure nothing.
    Answer(Reply),
    /// Nothing for Dom0: the `disks` module (Dom0 has no disks), or no valid envelope to answer.
    Ignore,
}

/// A benchmark in progress.
#[derive(Debug)]
pub struct Bench {
    reply_topic: String,
    request_id: Option<RequestId>,
    /// When the probe in flight was sent.
    sent: Instant,
    samples: Vec<Duration>,
}

/// Reads a benchmark request.
pub fn request(payload: &[u8]) -> BenchRequest {
    let request = match payload::decode_request::<BenchmarkArgs>(payload) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "benchmark request without a valid envelope; cannot answer");
            return BenchRequest::Ignore;
        }
    };
    let reply_topic = Command::Benchmark.response_topic(&request.sender);
    match request.args.module.as_str() {
        "messaging" => BenchRequest::Start(Bench {
            reply_topic,
            request_id: request.request_id,
            sent: Instant::now(),
            samples: Vec::with_capacity(SAMPLES),
        }),
        "disks" => BenchRequest::Ignore,
        other => BenchRequest::Answer(Reply {
            topic: reply_topic,
            body: Response::<NoArgs>::error(
                request.request_id,
                ErrorBody::new(
                    ErrorCode::Unsupported,
                    format!("unknown module {other:?} (messaging, disks)"),
                ),
            )
            .to_json(),
        }),
    }
}

impl Bench {
    /// The topic the probes travel on.
    pub fn probe_topic() -> &'static str {
        DOM0_BENCH_PROBE
    }

    /// The `started` answer; the first probe is sent now.
    pub fn started(&mut self) -> Reply {
        self.sent = Instant::now();
        let body = BenchmarkReply {
            module: "messaging".into(),
            figures: Default::default(),
        };
        Reply {
            topic: self.reply_topic.clone(),
            body: Response::with_status(self.request_id.clone(), Status::Started, body).to_json(),
        }
    }

    /// The `busy` answer to a second request while this one runs.
    pub fn busy(&self) -> Reply {
        let e = ErrorBody::new(ErrorCode::Busy, "a benchmark is already running");
        Reply {
            topic: self.reply_topic.clone(),
            body: Response::<NoArgs>::error(self.request_id.clone(), e).to_json(),
        }
    }

    /// A probe came back. True while more samples are wanted (send the next probe now).
    pub fn probe_back(&mut self) -> bool {
        self.samples.push(self.sent.elapsed());
        self.sent = Instant::now();
        self.samples.len() < SAMPLES
    }

    /// When the probe in flight is declared lost.
    pub fn deadline(&self) -> Instant {
        self.sent + PROBE_TIMEOUT
    }

    /// The `finished` answer with the figures.
    pub fn finish(mut self) -> Reply {
        let body = BenchmarkReply::round_trips(&mut self.samples);
        Reply {
            topic: self.reply_topic,
            body: Response::with_status(self.request_id, Status::Finished, body).to_json(),
        }
    }

    /// The answer when a probe did not come back.
    pub fn timed_out(self) -> Reply {
        let e = ErrorBody::new(
            ErrorCode::Timeout,
            format!(
                "a benchmark probe did not come back within {} s",
                PROBE_TIMEOUT.as_secs()
            ),
        );
        Reply {
            topic: self.reply_topic,
            body: Response::<NoArgs>::error(self.request_id, e).to_json(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benchmark_requests() {
        let BenchRequest::Start(mut b) =
            request(br#"{"sender":"vm-gui","request_id":"b1","module":"messaging"}"#)
        else {
            panic!("not started")
        };
        let Reply { topic, body } = b.started();
        assert_eq!(topic, "system/misc/benchmark/response/vm-gui");
        assert!(String::from_utf8_lossy(&body).contains("\"started\""));
        assert!(String::from_utf8_lossy(&b.busy().body).contains("busy"));
        b.samples = vec![Duration::from_micros(100); SAMPLES];
        let done = b.finish().body;
        let r: Response<BenchmarkReply> = payload::decode_response(&done).unwrap();
        assert_eq!(r.status, Status::Finished);
        assert_eq!(r.result.unwrap().figures["round_trip_p50_us"], 100.0);
        assert!(
            matches!(
                request(br#"{"sender":"vm-gui","module":"disks"}"#),
                BenchRequest::Ignore
            ),
            "Dom0 has no disks"
        );
        let BenchRequest::Answer(Reply { body, .. }) =
            request(br#"{"sender":"vm-gui","module":"gpu"}"#)
        else {
            panic!("not answered")
        };
        assert!(String::from_utf8_lossy(&body).contains("unsupported"));
        assert!(matches!(request(b"{}"), BenchRequest::Ignore));
    }

    #[test]
    fn samples_until_enough() {
        let BenchRequest::Start(mut b) = request(br#"{"sender":"vm-gui","module":"messaging"}"#)
        else {
            panic!("not started")
        };
        let more: Vec<bool> = (0..SAMPLES).map(|_| b.probe_back()).collect();
        assert!(more[..SAMPLES - 1].iter().all(|m| *m));
        assert!(!more[SAMPLES - 1]);
        assert!(String::from_utf8_lossy(&b.timed_out().body).contains("timeout"));
    }
}
