//! Memory trend from outside, by two rules, and a warning with the rule that fired.
//!
//! - **After major GC**: a process's resident memory right after each major GC, when the heap
//!   has just been cleaned; it grew over several major GCs in a row (memwatch's heuristic:
//!   five). This catches slow leaks, given time for five major GCs.
//! - **Floor over time**: the lowest resident memory of each [`FLOOR_WINDOW_NS`] (sampled about
//!   once a second, and after every major GC) rose by a large margin window after window, and
//!   never fell back: a fast leak, whose heap V8 grows instead of collecting, may see two major
//!   GCs in a minute while it takes a gigabyte. The floor ignores young-generation churn (memory
//!   that is used and freed within a window), and a large heap that stays the same size does
//!   not rise; a heap that settles at its working size rises for a while and then stops.
//!
//! Resident memory stands in for V8's heap size in use, which has no stable place to be read
//! from outside across V8 versions. After a major GC it follows the live heap; a process whose
//! memory only settles (heap growing to its working size) stops growing within a few GCs. An
//! app that loads a large cache over tens of seconds looks like a fast leak until it stops:
//! hence the question mark of the warning.

/// Major GCs in a row with more memory after each than after the one before.
pub const LEAK_STREAK: u32 = 5;
/// Less growth than this between two major GCs is noise, not growth.
const MIN_GROWTH_BYTES: u64 = 256 * 1024;

/// The floor rule's window: the lowest resident memory in it is its floor.
pub const FLOOR_WINDOW_NS: u64 = 4_000_000_000;
/// How often resident memory is sampled for the floor rule.
pub const FLOOR_SAMPLE_NS: u64 = 1_000_000_000;
/// Windows in a row whose floor rose over the one before: four rises, about 16 s of growth.
const FLOOR_RISES: u32 = 4;
/// A floor rose when it is this much over the one before (and [`FLOOR_RISE_SHARE`] of it): 2
/// MiB a second over a window, far over what a heap that settles or churns adds.
const FLOOR_RISE_BYTES: u64 = 8 << 20;
const FLOOR_RISE_SHARE: f64 = 0.02;
/// And the rises together: at least this much, and [`FLOOR_TOTAL_SHARE`] of where they began.
const FLOOR_TOTAL_BYTES: u64 = 64 << 20;
const FLOOR_TOTAL_SHARE: f64 = 0.25;

/// Which rule found a leak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeakRule {
    /// Memory after major GC grew [`LEAK_STREAK`] times in a row.
    AfterMajorGc,
    /// The floor of resident memory rose window after window.
    Floor,
}

impl LeakRule {
    /// The rule's name in JSON.
    pub fn label(self) -> &'static str {
        match self {
            Self::AfterMajorGc => "after_major_gc",
            Self::Floor => "floor",
        }
    }
}

/// A suspected leak: memory grew by `growth_bytes` over `span_ns` by `rule`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Leak {
    pub rss_bytes: u64,
    pub growth_bytes_per_min: f64,
    /// Major GCs in the growth (the streak, for [`LeakRule::AfterMajorGc`]).
    pub major_gcs: u32,
    pub rule: LeakRule,
    pub growth_bytes: u64,
    pub span_ns: u64,
}

impl Leak {
    fn new(rule: LeakRule, major_gcs: u32, from: (u64, u64), to: (u64, u64)) -> Self {
        let span_ns = to.0.saturating_sub(from.0);
        let growth_bytes = to.1.saturating_sub(from.1);
        let minutes = span_ns as f64 / 60e9;
        Self {
            rss_bytes: to.1,
            growth_bytes_per_min: if minutes > 0.0 {
                growth_bytes as f64 / minutes
            } else {
                0.0
            },
            major_gcs,
            rule,
            growth_bytes,
            span_ns,
        }
    }
}

/// One process's memory after its major GCs, and the floor of its memory over time.
#[derive(Debug, Default)]
pub struct LeakWatch {
    last_rss: Option<u64>,
    /// Growths in a row, and where the run started (time, memory).
    streak: u32,
    streak_start: Option<(u64, u64)>,
    /// The newest memory after a major GC, for the metrics.
    pub rss_after_gc: Option<u64>,
    pub warnings: u64,
    floor: Floor,
}

/// The floor rule's state.
#[derive(Debug, Default)]
struct Floor {
    last_sample_ns: Option<u64>,
    /// The open window: when it began, its lowest memory so far.
    window: Option<(u64, u64)>,
    /// The newest closed window's floor.
    last: Option<u64>,
    /// Rises in a row, from where (the close of the window before them, its floor).
    rises: u32,
    since: Option<(u64, u64)>,
    /// Major GCs since `since`.
    major_gcs: u32,
}

impl LeakWatch {
    /// Takes the memory after the newest of `major_gcs` major GCs (read together), which ended
    /// at `at_ns`; a leak once the run is long enough (then the count starts over, so a leak
    /// that goes on is reported again). The reading counts for the floor rule too, which may
    /// fire on it.
    pub fn after_major_gc(&mut self, at_ns: u64, rss_bytes: u64, major_gcs: u32) -> Option<Leak> {
        self.floor.major_gcs = self.floor.major_gcs.saturating_add(major_gcs);
        let by_floor = self.floor.sample(at_ns, rss_bytes);
        self.rss_after_gc = Some(rss_bytes);
        let grew = self
            .last_rss
            .is_some_and(|last| rss_bytes >= last + MIN_GROWTH_BYTES);
        if grew {
            self.streak += 1;
        } else {
            self.streak = 0;
            self.streak_start = Some((at_ns, rss_bytes));
        }
        self.last_rss = Some(rss_bytes);
        if self.streak < LEAK_STREAK {
            return self.warned(by_floor);
        }
        let since = self.streak_start?;
        let leak = Leak::new(
            LeakRule::AfterMajorGc,
            self.streak,
            since,
            (at_ns, rss_bytes),
        );
        self.streak = 0;
        self.streak_start = Some((at_ns, rss_bytes));
        self.warned(Some(leak))
    }

    /// Whether it is time for a sample of resident memory for the floor rule.
    pub fn wants_sample(&self, now_ns: u64) -> bool {
        self.floor
            .last_sample_ns
            .is_none_or(|last| now_ns >= last + FLOOR_SAMPLE_NS)
    }

    /// Takes a sample of resident memory; a leak when the floor rule fires.
    pub fn sample(&mut self, at_ns: u64, rss_bytes: u64) -> Option<Leak> {
        let leak = self.floor.sample(at_ns, rss_bytes);
        self.warned(leak)
    }

    fn warned(&mut self, leak: Option<Leak>) -> Option<Leak> {
        if leak.is_some() {
            self.warnings += 1;
        }
        leak
    }
}

impl Floor {
    fn sample(&mut self, at_ns: u64, rss_bytes: u64) -> Option<Leak> {
        self.last_sample_ns = Some(at_ns);
        let Some((began_ns, lowest)) = self.window else {
            self.window = Some((at_ns, rss_bytes));
            return None;
        };
        if at_ns < began_ns + FLOOR_WINDOW_NS {
            self.window = Some((began_ns, lowest.min(rss_bytes)));
            return None;
        }
        // The window closes; this sample opens the next.
        self.window = Some((at_ns, rss_bytes));
        let closed = (at_ns, lowest);
        let rose = self.last.is_some_and(|last| {
            lowest >= last + FLOOR_RISE_BYTES
                && lowest as f64 >= last as f64 * (1.0 + FLOOR_RISE_SHARE)
        });
        self.last = Some(lowest);
        if !rose {
            self.rises = 0;
            self.since = Some(closed);
            self.major_gcs = 0;
            return None;
        }
        self.rises += 1;
        let since = self.since?;
        let total = lowest.saturating_sub(since.1);
        if self.rises < FLOOR_RISES
            || total < FLOOR_TOTAL_BYTES
            || (total as f64) < since.1 as f64 * FLOOR_TOTAL_SHARE
        {
            return None;
        }
        let leak = Leak::new(LeakRule::Floor, self.major_gcs, since, closed);
        self.rises = 0;
        self.since = Some(closed);
        self.major_gcs = 0;
        Some(leak)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;
    const S: u64 = 1_000_000_000;

    #[test]
    fn five_growths_in_a_row_are_a_leak_with_its_rate() {
        let mut watch = LeakWatch::default();
        let mut leaks = Vec::new();
        // +10 MB per major GC, one GC every 6 s: 100 MB a minute.
        for i in 0..=5 {
            leaks.extend(watch.after_major_gc(i * 6 * S, 100 * MB + i * 10 * MB, 1));
        }
        assert_eq!(leaks.len(), 1, "{leaks:?}");
        assert_eq!(leaks[0].rule, LeakRule::AfterMajorGc);
        assert_eq!(leaks[0].major_gcs, LEAK_STREAK);
        assert_eq!(leaks[0].growth_bytes, 50 * MB);
        assert_eq!(leaks[0].span_ns, 30 * S);
        assert!((leaks[0].growth_bytes_per_min - 100.0 * MB as f64).abs() < 1.0);
        assert_eq!(watch.warnings, 1);
    }

    #[test]
    fn settling_or_noisy_memory_is_no_leak() {
        let mut watch = LeakWatch::default();
        // Grows four times (the heap reaching its working size), then wobbles.
        let rss = [100, 110, 120, 130, 140, 139, 141, 140, 142, 139, 140, 141];
        for (i, mb) in rss.iter().enumerate() {
            assert_eq!(
                watch.after_major_gc(i as u64 * S, mb * MB, 1),
                None,
                "at {i}"
            );
        }
        // Growth under the noise floor does not count.
        for i in 0..20 {
            assert_eq!(
                watch.after_major_gc(100 * S + i * S, 150 * MB + i * 1024, 1),
                None
            );
        }
    }

    /// Feeds `rss(second)` once a second for `seconds`, a major GC reading where `gc_at` says;
    /// the leaks found, with the second they were found at.
    fn run(
        seconds: u64,
        rss: impl Fn(u64) -> u64,
        gc_at: impl Fn(u64) -> bool,
    ) -> Vec<(u64, Leak)> {
        let mut watch = LeakWatch::default();
        let mut leaks = Vec::new();
        for t in 0..seconds {
            assert!(watch.wants_sample(t * S));
            let leak = if gc_at(t) {
                watch.after_major_gc(t * S, rss(t), 1)
            } else {
                watch.sample(t * S, rss(t))
            };
            leaks.extend(leak.map(|l| (t, l)));
        }
        assert_eq!(watch.warnings, leaks.len() as u64);
        leaks
    }

    /// Young-generation churn: up to 48 MB used and freed, changing every second.
    fn churn(t: u64) -> u64 {
        (t * 37 % 49) * MB
    }

    #[test]
    fn a_fast_leak_with_few_major_gcs_is_warned_by_its_floor_within_30_s() {
        // 25 MB a second kept, over churn; two major GCs in the minute.
        let leaks = run(
            60,
            |t| 80 * MB + t * 25 * MB + churn(t),
            |t| t == 20 || t == 50,
        );
        let (at, first) = leaks.first().expect("no warning");
        assert!(*at <= 30, "warned at {at} s");
        assert_eq!(first.rule, LeakRule::Floor);
        // 25 MB/s is 1.5 GB a minute; the floor misses the churn's peaks only.
        let per_min = first.growth_bytes_per_min / (25.0 * 60.0 * MB as f64);
        assert!((0.8..1.2).contains(&per_min), "{first:?}");
        assert!(
            first.growth_bytes >= 300 * MB && first.span_ns >= 12 * S,
            "{first:?}"
        );
        // A leak that goes on is reported again.
        assert!(leaks.len() >= 2, "{leaks:?}");
    }

    #[test]
    fn a_large_stable_heap_with_heavy_churn_is_no_leak() {
        // 900 MB held, 48 MB of churn over it, a major GC every 7 s: five minutes.
        let leaks = run(300, |t| 900 * MB + churn(t), |t| t % 7 == 0);
        assert_eq!(leaks, []);
    }

    #[test]
    fn a_heap_settling_or_falling_back_is_no_leak() {
        // A fresh process's heap reaches its working size: 10 MB a second for 12 s, then flat.
        let settling = |t: u64| 60 * MB + t.min(12) * 10 * MB + churn(t) / 4;
        assert_eq!(run(120, settling, |t| t % 9 == 0), []);
        // Fast growth that is freed every 12 s (a batch job's buffers): it falls back.
        let batches = |t: u64| 200 * MB + (t % 12) * 40 * MB;
        assert_eq!(run(120, batches, |_| false), []);
        // Slow growth (a few MB a minute) is the other rule's to find, given major GCs.
        let slow = |t: u64| 200 * MB + t * 100 * 1024;
        assert_eq!(run(120, slow, |_| false), []);
    }
}
