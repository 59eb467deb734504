//! The one reader of /proc the tests and benchmarks use: a process's memory, its CPU time, what
//! it has open. Missing or unreadable entries read as 0 / nothing (the process may have ended).

use std::path::PathBuf;

/// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM`), in KiB.
fn status_kb(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resident memory now (VmRSS), KiB.
pub fn rss_kb(pid: i32) -> u64 {
    status_kb(pid, "VmRSS")
}

/// Peak resident memory so far (VmHWM), KiB.
pub fn peak_rss_kb(pid: i32) -> u64 {
    status_kb(pid, "VmHWM")
}

/// CPU time used so far (user + system), in clock ticks of 10 ms.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the 3rd, utime the 14th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    tick(11) + tick(12)
}

/// What the process's file descriptors point to.
pub fn open_files(pid: i32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_time_and_files() {
        let me = std::process::id() as i32;
        let rss = rss_kb(me);
        assert!(rss > 0);
        assert!(
            peak_rss_kb(me) >= rss,
            "the peak is never below an earlier reading"
        );
        let busy = std::time::Instant::now();
        while cpu_ticks(me) == 0 && busy.elapsed().as_secs() < 5 {}
        assert!(cpu_ticks(me) > 0);
        assert!(!open_files(me).is_empty());
        assert_eq!(rss_kb(-1), 0, "no such process");
    }
}
