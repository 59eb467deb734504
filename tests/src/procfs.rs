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
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// CPU time used so far by every thread of `pid` now alive, in nanoseconds (the scheduler's
/// own accounting, /proc/PID/task/*/schedstat: fine enough for a few requests, where clock
/// ticks are 10 ms).
pub fn cpu_ns(pid: i32) -> u64 {
    tasks_ns(&format!("/proc/{pid}/task"), |_| true)
}

/// CPU time used so far by the threads of this process named `name` (as
/// `std::thread::Builder::name` gave it, at most 15 bytes), in nanoseconds.
pub fn own_threads_ns(name: &str) -> u64 {
    tasks_ns("/proc/self/task", |task| {
        std::fs::read_to_string(task.join("comm")).is_ok_and(|c| c.trim_end() == name)
    })
}

fn tasks_ns(dir: &str, keep: impl Fn(&std::path::Path) -> bool) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|t| t.path())
        .filter(|t| keep(t))
        .filter_map(|t| {
            std::fs::read_to_string(t.join("schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// The machine's CPU time so far, all CPUs: (busy, total) in clock ticks (/proc/stat; idle and
/// I/O wait are not busy).
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// CPU time (user + system) of this process's children that ended and were waited for, in clock
/// ticks of 10 ms.
pub fn children_ticks() -> u64 {
    stat_ticks_at(
        &std::fs::read_to_string("/proc/self/stat").unwrap_or_default(),
        13,
    )
}

/// utime + stime of a `stat` line.
fn stat_ticks(stat: &str) -> u64 {
    stat_ticks_at(stat, 11)
}

/// The sum of the two tick fields at `i` and `i + 1` after the command name (utime and stime at
/// 11, the waited-for children's at 13).
fn stat_ticks_at(stat: &str, i: usize) -> u64 {
    // Fields after the command name (which may hold spaces): state is the 3rd, utime the 14th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    tick(i) + tick(i + 1)
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
        assert!(cpu_ns(me) > 0);
        let spun = std::thread::Builder::new()
            .name("procfs-spin".into())
            .spawn(|| {
                // Spins until its own accounting shows 10 ms (at most 5 s: a loaded machine
                // gives it less than the wall clock).
                let t0 = std::time::Instant::now();
                while own_threads_ns("procfs-spin") < 10_000_000 && t0.elapsed().as_secs() < 5 {}
                own_threads_ns("procfs-spin")
            })
            .unwrap();
        let ns = spun.join().unwrap();
        assert!(ns >= 10_000_000, "a named thread's own CPU time: {ns} ns");
        assert_eq!(own_threads_ns("no-such-thread"), 0);
        assert!(!open_files(me).is_empty());
        assert_eq!(rss_kb(-1), 0, "no such process");
    }
}
