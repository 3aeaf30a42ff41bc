//! What /proc says about a process tree (a balancer and its workers) and about the host's
//! sockets, for the hold mode's memory figures; and this process's own fd limit.

use std::collections::HashSet;
use std::fs;

/// Memory and thread figures of a process and all its descendants, summed.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeUsage {
    /// Processes in the tree.
    pub processes: u64,
    /// Resident set, KiB (VmRSS).
    pub rss_kib: u64,
    /// Page tables, KiB (VmPTE): kernel memory charged to the process.
    pub pte_kib: u64,
    /// Threads (Threads:).
    pub threads: u64,
}

fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))
        .and_then(|l| l[name.len() + 1..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and every process descending from it.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            {
                if let Some(pp) = parent_of(p) {
                    all.push((p, pp));
                }
            }
        }
    }
    let mut found: HashSet<u32> = HashSet::from([pid]);
    loop {
        let before = found.len();
        for &(p, pp) in &all {
            if found.contains(&pp) {
                found.insert(p);
            }
        }
        if found.len() == before {
            break;
        }
    }
    let mut v: Vec<u32> = found.into_iter().collect();
    v.sort_unstable();
    v
}

/// Sums /proc/PID/status over the tree rooted at `pid`. Err if `pid` itself is gone.
pub fn usage(pid: u32) -> Result<TreeUsage, String> {
    let mut u = TreeUsage::default();
    fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    for p in tree(pid) {
        let Ok(status) = fs::read_to_string(format!("/proc/{p}/status")) else {
            continue;
        };
        u.processes += 1;
        u.rss_kib += status_field(&status, "VmRSS").unwrap_or(0);
        u.pte_kib += status_field(&status, "VmPTE").unwrap_or(0);
        u.threads += status_field(&status, "Threads").unwrap_or(0);
    }
    Ok(u)
}

/// CPU time (user + system) used so far by the tree rooted at `pid`, in seconds, exited
/// threads included (the kernel folds them into their process). Resolution: one clock tick
/// (USER_HZ, 100 per second on Linux).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    fs::metadata(format!("/proc/{pid}")).ok()?;
    let mut ticks = 0u64;
    for p in tree(pid) {
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // After the command: state(3) ppid(4) ... utime(14) stime(15); index 0 is state.
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
        let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        ticks += utime + stime;
    }
    Some(ticks as f64 / 100.0)
}

/// Kernel memory held by TCP sockets on the whole host, KiB (/proc/net/sockstat "TCP: ... mem
/// PAGES"): socket buffers of every socket, both ends, every process.
pub fn tcp_mem_kib() -> Option<u64> {
    let text = fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "mem")?;
    let pages: u64 = words.get(i + 1)?.parse().ok()?;
    Some(pages * 4)
}

/// This process's soft and hard limits on open files (/proc/self/limits).
pub fn nofile_limits() -> Option<(u64, u64)> {
    let text = fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    match nums.as_slice() {
        [soft, hard, ..] => Some((*soft, *hard)),
        _ => None,
    }
}

/// Makes sure this process may open `needed` files: raises the soft limit toward the hard one
/// with util-linux `prlimit` (the crate forbids itself `unsafe`, and std has no setrlimit).
/// Returns the soft limit in force afterwards.
pub fn ensure_nofile(needed: u64) -> u64 {
    let Some((soft, hard)) = nofile_limits() else {
        return u64::MAX;
    };
    if soft >= needed || soft >= hard {
        return soft;
    }
    let _ = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard}:{hard}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    nofile_limits().map(|(s, _)| s).unwrap_or(soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_tree_and_status_are_readable() {
        let u = usage(std::process::id()).unwrap();
        assert!(u.processes >= 1);
        assert!(u.rss_kib > 0);
        assert!(u.threads >= 1);
        assert!(tree(std::process::id()).contains(&std::process::id()));
        assert!(nofile_limits().is_some());
        // Burn CPU until the counter (10 ms ticks) moves, for 5 s at most.
        let start = cpu_seconds(std::process::id()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut x = 0u64;
        while cpu_seconds(std::process::id()).unwrap() <= start {
            assert!(std::time::Instant::now() < deadline, "CPU time never moved");
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
    }

    #[test]
    fn status_fields_are_parsed_by_exact_name() {
        let s = "VmRSS:\t  1234 kB\nVmRSSx:\t 9 kB\nThreads:\t7\n";
        assert_eq!(status_field(s, "VmRSS"), Some(1234));
        assert_eq!(status_field(s, "Threads"), Some(7));
        assert_eq!(status_field(s, "VmPTE"), None);
    }
}
