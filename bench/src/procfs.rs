//! Memory and CPU of processes, read from /proc.
//!
//! The service runs as a separate process precisely so that its resident memory can be read here
//! without the bench's own allocations mixed in. CPU times tell which of service, PostgreSQL and
//! bench used the machine's two cores during a run.

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

use anyhow::{Context, Result};

/// Resident memory of a process, in kB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// VmRSS: resident now.
    pub rss_kb: u64,
    /// VmHWM: the highest resident size since the process started.
    pub hwm_kb: u64,
}

pub fn memory(pid: u32) -> Result<Memory> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok(Memory {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
    })
}

/// Fields of /proc/PID/stat after the command name: (ppid, utime+stime, cutime+cstime) in ticks.
fn stat(pid: &str) -> Option<(u32, u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; the fields start after the last ')'.
    let fields: Vec<&str> = text.get(text.rfind(')')? + 2..)?.split(' ').collect();
    let number = |index: usize| fields.get(index)?.parse::<u64>().ok();
    // After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    let ppid = u32::try_from(number(1)?).ok()?;
    Some((ppid, number(11)? + number(12)?, number(13)? + number(14)?))
}

fn ticks(ticks: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// CPU time used by one process (all its threads).
pub fn cpu(pid: u32) -> Duration {
    stat(&pid.to_string()).map_or(Duration::ZERO, |(_, own, _)| ticks(own))
}

/// CPU time used by a process tree: the root, its live descendants, and the children it has
/// already reaped (a PostgreSQL postmaster reaps its backends, so their time lands in its cutime).
pub fn cpu_tree(root: u32) -> Duration {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    let mut parent = HashMap::new();
    let mut own = HashMap::new();
    let mut reaped = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((ppid, used, children)) = stat(&pid.to_string()) {
            parent.insert(pid, ppid);
            own.insert(pid, used);
            if pid == root {
                reaped = children;
            }
        }
    }
    let in_tree = |mut pid: u32| {
        // Bounded walk: a pid table cannot be deeper than the number of processes.
        for _ in 0..parent.len() {
            if pid == root {
                return true;
            }
            match parent.get(&pid) {
                Some(&ppid) if ppid != 0 && ppid != pid => pid = ppid,
                _ => return false,
            }
        }
        false
    };
    let total: u64 = own
        .iter()
        .filter(|(pid, _)| in_tree(**pid))
        .map(|(_, used)| used)
        .sum();
    ticks(total + reaped)
}

/// Busy CPU time of the whole machine (all cores, all processes), from /proc/stat.
pub fn machine_busy() -> Duration {
    let Ok(text) = fs::read_to_string("/proc/stat") else {
        return Duration::ZERO;
    };
    let Some(line) = text.lines().find(|line| line.starts_with("cpu ")) else {
        return Duration::ZERO;
    };
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    let busy: u64 = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .filter_map(|(_, value)| value.parse::<u64>().ok())
        .sum();
    ticks(busy)
}

/// The filesystem type and device of the mount holding `path` (the longest mount point that is
/// a prefix of it), from /proc/self/mounts.
pub fn filesystem(path: &std::path::Path) -> Option<(String, String)> {
    let text = fs::read_to_string("/proc/self/mounts").ok()?;
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, mount, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(mount)
                .then(|| (mount.len(), kind.to_owned(), device.to_owned()))
        })
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, kind, device)| (kind, device))
}

/// CPU time of this process.
pub fn own_cpu() -> Duration {
    cpu(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let memory = memory(std::process::id()).unwrap();
        assert!(memory.rss_kb > 0 && memory.hwm_kb >= memory.rss_kb);
        // Own CPU first: both only grow, and the test's other threads keep running meanwhile.
        let before = own_cpu();
        assert!(cpu_tree(std::process::id()) >= before);
    }
}
