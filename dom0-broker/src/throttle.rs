//! Rates: the token bucket every budget uses (a VM's publishes, its new sessions), and the budget of
//! log lines and reports something outside Dom0 can cause (one summary of what was held back rides
//! on the next line). Pure: instants in.

use std::time::{Duration, Instant};

/// A token bucket: `cap` tokens at most, refilled at `rate` a second.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    cap: f64,
    rate: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(cap: f64, rate: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: cap,
            cap,
            rate,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.cap);
    }

    /// When the next token will be there.
    pub fn next_token(&mut self, now: Instant) -> Instant {
        self.refill(now);
        now + Duration::from_secs_f64(((1.0 - self.tokens) / self.rate).max(0.0))
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.take_n(1, now)
    }

    /// Takes `n` tokens if there are that many (a full bucket always pays, so a cost above the
    /// bucket's size is possible once it refilled).
    pub fn take_n(&mut self, n: usize, now: Instant) -> bool {
        self.refill(now);
        let n = (n as f64).min(self.cap);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// What was not reported since the last report (how many, and what they are), as the suffix of
/// the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreported(pub u64, pub &'static str);

impl std::fmt::Display for Unreported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, " (and {n} more {} not reported)", self.1),
        }
    }
}

/// A budget of reports (log lines, error notifications): `per_sec` a second with a burst of as
/// many; what goes beyond is counted and said by the next report.
#[derive(Debug, Clone, Copy)]
pub struct Reports {
    bucket: Bucket,
    suppressed: u64,
    /// What is reported, in the summary (`refusals`).
    what: &'static str,
}

impl Reports {
    pub fn new(per_sec: f64, what: &'static str, now: Instant) -> Reports {
        Reports {
            bucket: Bucket::full(per_sec, per_sec, now),
            suppressed: 0,
            what,
        }
    }

    /// Whether a report may be made now; `Some` carries what was held back since the last one.
    pub fn may_report(&mut self, now: Instant) -> Option<Unreported> {
        if self.bucket.take(now) {
            Some(Unreported(std::mem::take(&mut self.suppressed), self.what))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_and_charges_costs() {
        let t0 = Instant::now();
        let mut b = Bucket::full(10.0, 10.0, t0);
        assert!(b.take_n(8, t0));
        assert!(!b.take_n(3, t0));
        assert!(b.take_n(2, t0));
        assert!(!b.take(t0));
        assert_eq!(b.next_token(t0), t0 + Duration::from_millis(100));
        assert!(b.take_n(3, t0 + Duration::from_millis(300)));
        // A cost above the bucket's size is paid by a full bucket.
        assert!(b.take_n(50, t0 + Duration::from_secs(2)));
        assert!(!b.take(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn reports_beyond_the_budget_are_summed_up_in_the_next() {
        let t0 = Instant::now();
        let mut r = Reports::new(2.0, "refusals", t0);
        assert_eq!(r.may_report(t0), Some(Unreported(0, "refusals")));
        assert_eq!(r.may_report(t0), Some(Unreported(0, "refusals")));
        for _ in 0..5 {
            assert_eq!(r.may_report(t0), None);
        }
        let later = t0 + Duration::from_millis(500);
        assert_eq!(r.may_report(later), Some(Unreported(5, "refusals")));
        assert_eq!(r.may_report(later).map(|u| u.to_string()), None);
        assert_eq!(
            Unreported(3, "refusals").to_string(),
            " (and 3 more refusals not reported)"
        );
        assert_eq!(Unreported(0, "refusals").to_string(), "");
    }
}
