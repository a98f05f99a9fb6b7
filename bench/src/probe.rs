//! Probes: a process's CPU time and memory from /proc, the relay's metrics
//! endpoint, and the slot's lag from PostgreSQL.

use std::collections::HashMap;

/// CPU seconds (user + system) used by a process so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat_cpu_seconds(&stat)
}

/// The CPU seconds in a `/proc/.../stat` line (a process's or a thread's).
fn stat_cpu_seconds(stat: &str) -> f64 {
    // utime and stime are fields 14 and 15, in clock ticks.
    let ticks: f64 = [14, 15].iter().filter_map(|n| stat_field(stat, *n)).sum();
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

/// One thread's use so far: its name (librdkafka names its threads
/// `rdk:...`), CPU seconds (user + system), how many times it blocked
/// (voluntary context switches: each is a sleep and a wake-up), and the
/// seconds it waited for a core.
pub struct ThreadUse {
    pub name: String,
    pub cpu_s: f64,
    pub wakeups: u64,
    pub waiting_s: f64,
}

/// [`ThreadUse`] for each thread of a process alive now, by thread id.
pub fn threads_use(pid: u32) -> HashMap<u32, ThreadUse> {
    threads(pid)
        .filter_map(|(tid, dir)| {
            // A thread that exits while it is read is left out (it would
            // count as zeros, a negative delta).
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let schedstat = std::fs::read_to_string(dir.join("schedstat")).ok()?;
            let name = stat.split_once('(')?.1.rsplit_once(')')?.0.to_owned();
            let sched = parse_sched(&schedstat, &status);
            Some((
                tid,
                ThreadUse {
                    name,
                    cpu_s: stat_cpu_seconds(&stat),
                    wakeups: sched.wakeups,
                    waiting_s: sched.waiting_s,
                },
            ))
        })
        .collect()
}

/// CPU seconds, wake-ups and waits for a core between two [`threads_use`]
/// readings, split into librdkafka's threads (`rdk:*`) and the rest;
/// threads started in between count from 0. The rest's CPU is the process's
/// (`process_cpu_s`, which keeps the time of threads that exited) less
/// librdkafka's, so the two add up to the process's.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ThreadSplit {
    pub own_cpu_s: f64,
    pub own_wakeups: u64,
    pub own_waiting_s: f64,
    pub librdkafka_cpu_s: f64,
    pub librdkafka_wakeups: u64,
    pub librdkafka_waiting_s: f64,
}

pub fn thread_split(
    before: &HashMap<u32, ThreadUse>,
    after: &HashMap<u32, ThreadUse>,
    process_cpu_s: f64,
) -> ThreadSplit {
    let mut split = ThreadSplit::default();
    for (tid, t) in after {
        let (cpu0, wakeups0, waiting0) = before
            .get(tid)
            .map_or((0.0, 0, 0.0), |b| (b.cpu_s, b.wakeups, b.waiting_s));
        let (cpu, wakeups, waiting) = (
            t.cpu_s - cpu0,
            t.wakeups.saturating_sub(wakeups0),
            t.waiting_s - waiting0,
        );
        if t.name.starts_with("rdk:") {
            split.librdkafka_cpu_s += cpu;
            split.librdkafka_wakeups += wakeups;
            split.librdkafka_waiting_s += waiting;
        } else {
            split.own_wakeups += wakeups;
            split.own_waiting_s += waiting;
        }
    }
    split.own_cpu_s = (process_cpu_s - split.librdkafka_cpu_s).max(0.0);
    split
}

/// A single-threaded process's scheduler accounting (a walsender's), from
/// `/proc/<pid>/schedstat` (nanoseconds, so finer than the 10 ms ticks of
/// `stat`) and `/proc/<pid>/status`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Sched {
    /// Seconds on a core.
    pub on_cpu_s: f64,
    /// Seconds runnable but waiting for a core.
    pub waiting_s: f64,
    /// Times it blocked (voluntary context switches).
    pub wakeups: u64,
}

/// `None` when the process is gone (or its files cannot be read).
pub fn sched(pid: u32) -> Option<Sched> {
    let schedstat = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(parse_sched(&schedstat, &status))
}

fn parse_sched(schedstat: &str, status: &str) -> Sched {
    let ns: Vec<f64> = schedstat
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    Sched {
        on_cpu_s: ns.first().copied().unwrap_or(0.0) / 1e9,
        waiting_s: ns.get(1).copied().unwrap_or(0.0) / 1e9,
        wakeups: status_field(status, "voluntary_ctxt_switches:") as u64,
    }
}

/// Seconds since a process started (`/proc/<pid>/stat` field 22, in clock
/// ticks since boot, against `/proc/uptime`): 10 ms resolution.
pub fn age_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let started = stat_field(&stat, 22)? / 100.0; // USER_HZ
    let now: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    Some((now - started).max(0.0))
}

/// Field `n` (1-based, as in proc(5)) of a `stat` line, for fields after
/// the parenthesised command name (n >= 3).
fn stat_field(stat: &str, n: usize) -> Option<f64> {
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// A numeric field of a `/proc/.../status` file; 0 when absent.
fn status_field(status: &str, name: &str) -> f64 {
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// A reading of the machine's idle time, for the cores busy over a window.
///
/// Busy is the cores minus their idle and I/O-wait time, not /proc/stat's
/// user, system and interrupt fields: those are sampled at the timer tick
/// and miss short bursts of work (in a 10-row steady run they gave 0.48
/// cores where every task's schedstat summed to 0.66), while a tickless
/// kernel measures idle time at each idle entry and exit.
pub struct Busy {
    at: std::time::Instant,
    idle_s: f64,
    cores: usize,
}

impl Busy {
    pub fn now() -> Self {
        let (idle_s, cores) =
            parse_idle(&std::fs::read_to_string("/proc/stat").unwrap_or_default());
        Self {
            at: std::time::Instant::now(),
            idle_s,
            cores,
        }
    }

    /// The machine's cores, as /proc/stat counts them.
    pub fn cores(&self) -> usize {
        self.cores
    }

    /// Busy CPU seconds since this reading, and the seconds elapsed.
    pub fn since(&self) -> (f64, f64) {
        let now = Self::now();
        let seconds = now.at.duration_since(self.at).as_secs_f64();
        let busy = (self.cores as f64 * seconds - (now.idle_s - self.idle_s)).max(0.0);
        (busy, seconds)
    }

    /// Cores busy on average since this reading.
    pub fn cores_since(&self) -> f64 {
        let (busy, seconds) = self.since();
        if seconds > 0.0 { busy / seconds } else { 0.0 }
    }
}

/// Idle plus I/O-wait seconds over all cores, and the number of cores, from
/// /proc/stat (the `cpu` line's 4th and 5th fields, in USER_HZ ticks; one
/// `cpuN` line per core).
fn parse_idle(stat: &str) -> (f64, usize) {
    let idle = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .map(|cpu| {
            cpu.split_whitespace()
                .skip(4)
                .take(2)
                .filter_map(|v| v.parse::<f64>().ok())
                .sum::<f64>()
        })
        .unwrap_or(0.0);
    let cores = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    (idle / 100.0, cores) // USER_HZ
}

/// Resident and peak resident memory of a process, in MiB.
pub fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (
        status_field(&status, "VmRSS:") / 1024.0,
        status_field(&status, "VmHWM:") / 1024.0,
    )
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
    fn stat_fields_count_from_one_past_the_command_name() {
        let stat = "42 (post gres) S 1 42 42 0 -1 4194368 10 0 0 0 150 50 0 0 20 0 1 0 12345 0";
        assert_eq!(stat_field(stat, 3), None); // the state letter is not a number
        assert_eq!(stat_field(stat, 4), Some(1.0));
        assert_eq!(stat_field(stat, 22), Some(12345.0));
        assert_eq!(stat_field(stat, 2), None);
    }

    #[test]
    fn sched_reads_nanoseconds_and_voluntary_switches() {
        let status =
            "Name:\tpostgres\nvoluntary_ctxt_switches:\t1200\nnonvoluntary_ctxt_switches:\t7\n";
        let s = parse_sched("1500000000 250000000 900\n", status);
        assert_eq!(
            s,
            Sched {
                on_cpu_s: 1.5,
                waiting_s: 0.25,
                wakeups: 1200
            }
        );
        assert_eq!(parse_sched("", ""), Sched::default());
    }

    #[test]
    fn thread_split_separates_librdkafka_and_counts_new_threads_from_zero() {
        let t = |name: &str, cpu_s, wakeups, waiting_s| ThreadUse {
            name: name.into(),
            cpu_s,
            wakeups,
            waiting_s,
        };
        let before = HashMap::from([
            (1, t("outbox-relay", 1.0, 100, 0.5)),
            (2, t("rdk:broker1", 0.5, 50, 0.25)),
        ]);
        let after = HashMap::from([
            (1, t("outbox-relay", 1.5, 160, 0.75)),
            (2, t("rdk:broker1", 0.75, 90, 0.5)),
            (3, t("rdk:broker2", 0.25, 10, 0.125)),
        ]);
        // The process used 1.1 s: 0.5 by librdkafka's threads, so 0.6 by
        // its own (a thread that exited meanwhile is in the process's time).
        assert_eq!(
            thread_split(&before, &after, 1.1),
            ThreadSplit {
                own_cpu_s: 0.6000000000000001,
                own_wakeups: 60,
                own_waiting_s: 0.25,
                librdkafka_cpu_s: 0.5,
                librdkafka_wakeups: 50,
                librdkafka_waiting_s: 0.375,
            }
        );
    }

    #[test]
    fn idle_is_idle_plus_iowait_over_the_cores() {
        let stat = "cpu  100 5 50 1000 20 3 4 7 0 0\ncpu0 50 2 25 500 10 1 2 3 0 0\ncpu1 50 3 25 500 10 2 2 4 0 0\nintr 1 2 3\n";
        assert_eq!(parse_idle(stat), (10.2, 2));
        assert_eq!(parse_idle(""), (0.0, 0));
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
