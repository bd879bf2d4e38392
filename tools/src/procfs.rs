//! What the load tool reads from `/proc`: a process's CPU time and RSS, the kernel's slab size,
//! and the machine description for reports.

use std::fs;

/// utime + stime of `pid` in seconds (None when the process is gone).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields restart after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ... utime is field 14, stime 15 (1-based over the whole line).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// Sum of [`cpu_seconds`] over several processes (missing ones count 0).
pub fn cpu_seconds_all(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&pid| cpu_seconds(pid)).sum()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&status, key)
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// Sum of RSS over several processes, KiB.
pub fn rss_kib_all(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&pid| rss_kib(pid)).sum()
}

/// The kernel's slab memory (`Slab` in /proc/meminfo), KiB.
pub fn slab_kib() -> u64 {
    fs::read_to_string("/proc/meminfo").ok().and_then(|m| kib_field(&m, "Slab")).unwrap_or(0)
}

/// Per-CPU (busy, total) jiffies from /proc/stat; busy counts user, system, irq, softirq and
/// steal (a process's own utime+stime misses the softirq work loopback TCP puts on the sender).
pub fn cpu_jiffies() -> Vec<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// Busy fraction of each CPU between two [`cpu_jiffies`] snapshots.
pub fn cpu_busy(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let total = a.1.saturating_sub(b.1);
            if total == 0 {
                0.0
            } else {
                a.0.saturating_sub(b.0) as f64 / total as f64
            }
        })
        .collect()
}

/// `nproc`, kernel release and CPU model.
pub fn machine() -> (usize, String, String) {
    // SAFETY: sysconf has no memory-safety preconditions. (Not available_parallelism: it
    // follows the affinity mask, and the tool usually runs pinned.)
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())))
        .unwrap_or_default();
    (cores, kernel, model)
}

/// CLOCK_MONOTONIC in nanoseconds (the clock publishers stamp payloads with).
#[inline]
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(super::cpu_seconds(pid).is_some());
        assert!(super::rss_kib(pid).unwrap() > 0);
        assert!(super::slab_kib() > 0);
    }
}
