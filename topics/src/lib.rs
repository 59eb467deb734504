//! The messaging dictionary: topic grammar, typed payloads, legacy names.
//!
//! Architecture invariant: this crate does no I/O and knows nothing of sockets, ttys or brokers.
//! It is the single source of truth for every topic and payload that crosses a channel; the Dom0
//! service, the guest agent and the documentation (`docs/topics.md`) all come from it.

pub mod answers;
pub mod backoff;
pub mod binary;
pub mod call_output;
pub mod config_file;
pub mod filter;
pub mod fleet;
pub mod legacy;
pub mod legacy_line;
pub mod legacy_translator;
pub mod payload;
pub mod raw_object;
pub mod reference;
pub mod topic;
pub mod upload;
pub mod vm;

pub use payload::{ErrorBody, ErrorCode, PayloadError, Request, RequestId, Response, Status};
pub use topic::{Command, Notification, Topic, TopicError};
pub use vm::{VmId, VmIdError};

/// Current time as RFC 3339 UTC (`2026-11-22T10:00:00Z`) from seconds since the Unix epoch.
///
/// Pure: the caller supplies the time. Uses the civil-from-days algorithm (H. Hinnant).
pub fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// The current time as RFC 3339 UTC (the `datetime` of notifications).
pub fn rfc3339_now() -> String {
    rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_308_245), "2026-11-22T00:44:05Z");
        assert_eq!(super::rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
