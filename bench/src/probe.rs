//! Probes: a process's CPU time and memory from /proc, the relay's metrics
//! endpoint, and the slot's lag from PostgreSQL.

/// CPU seconds (user + system) used by a process so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat_cpu_seconds(&stat)
}

/// The CPU seconds in a `/proc/.../stat` line (a process's or a thread's).
fn stat_cpu_seconds(stat: &str) -> f64 {
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// The `/proc/<pid>/task/<tid>` folders of a process's threads alive now,
/// with their thread ids.
fn threads(pid: u32) -> impl Iterator<Item = (u32, std::path::PathBuf)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let t = t.ok()?;
            Some((t.file_name().to_str()?.parse().ok()?, t.path()))
        })
}

/// CPU seconds (user + system) per thread of a process so far, by thread
/// id, with each thread's name (librdkafka names its threads `rdk:...`).
pub fn thread_cpu_seconds(pid: u32) -> std::collections::HashMap<u32, (String, f64)> {
    threads(pid)
        .filter_map(|(tid, dir)| {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let name = stat.split_once('(')?.1.rsplit_once(')')?.0.to_owned();
            Some((tid, (name, stat_cpu_seconds(&stat))))
        })
        .collect()
}

/// CPU seconds librdkafka's threads (`rdk:*`) used between two
/// [`thread_cpu_seconds`] readings; threads started in between count from 0.
pub fn librdkafka_cpu_seconds(
    before: &std::collections::HashMap<u32, (String, f64)>,
    after: &std::collections::HashMap<u32, (String, f64)>,
) -> f64 {
    after
        .iter()
        .filter(|(_, (name, _))| name.starts_with("rdk:"))
        .map(|(tid, (_, cpu))| cpu - before.get(tid).map_or(0.0, |(_, c)| *c))
        .sum()
}

/// Seconds a process's threads have spent runnable but waiting for a core
/// (the scheduler's run-queue delay, /proc/<pid>/task/*/schedstat), summed
/// over the threads alive now.
pub fn run_queue_wait_seconds(pid: u32) -> f64 {
    threads(pid)
        .filter_map(|(_, dir)| std::fs::read_to_string(dir.join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

/// CPU seconds this machine's cores spent busy so far (user, nice, system,
/// interrupts and steal; not idle or I/O wait), from /proc/stat.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let fields: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|i| fields.get(*i))
        .sum();
    busy / 100.0 // USER_HZ
}

/// Resident and peak resident memory of a process, in MiB.
pub fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `after - before`, bucket by bucket.
pub fn histogram_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(b, c)| {
            let prev = before
                .iter()
                .find(|(pb, _)| pb == b)
                .map(|(_, pc)| *pc)
                .unwrap_or(0.0);
            (*b, c - prev)
        })
        .collect()
}

/// A quantile from a cumulative histogram, interpolated linearly inside its
/// bucket; in milliseconds.
pub fn quantile_ms(hist: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = hist.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let target = q * total;
    let mut lower_bound = 0.0;
    let mut lower_count = 0.0;
    for (bound, count) in hist {
        if *count >= target {
            let upper = if bound.is_finite() {
                *bound
            } else {
                lower_bound * 2.0
            };
            let span = count - lower_count;
            let frac = if span > 0.0 {
                (target - lower_count) / span
            } else {
                1.0
            };
            return Some((lower_bound + frac * (upper - lower_bound)) * 1000.0);
        }
        lower_bound = *bound;
        lower_count = *count;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_user_plus_system_seconds() {
        // A thread name with a space and a parenthesis, as /proc shows it.
        let stat = "42 (rdk:broker (1)) S 1 42 42 0 -1 4194368 10 0 0 0 150 50 0 0 20 0 9 0";
        assert_eq!(stat_cpu_seconds(stat), 2.0);
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let h = vec![(0.001, 50.0), (0.002, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile_ms(&h, 0.5).unwrap() - 1.0).abs() < 1e-9);
        assert!((quantile_ms(&h, 0.75).unwrap() - 1.5).abs() < 1e-9);
        assert_eq!(quantile_ms(&[(0.001, 0.0)], 0.5), None);
        let d = histogram_delta(&[(0.001, 10.0)], &[(0.001, 15.0)]);
        assert_eq!(d, vec![(0.001, 5.0)]);
    }
}
