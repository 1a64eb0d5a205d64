//! Memory trend from outside: a process's resident memory right after each major GC, when the
//! heap has just been cleaned, and a warning when it grew over several major GCs in a row
//! (memwatch's heuristic: five), with the growth rate.
//!
//! Resident memory stands in for V8's heap size in use, which has no stable place to be read
//! from outside across V8 versions. After a major GC it follows the live heap; a process whose
//! memory only settles (heap growing to its working size) stops growing within a few GCs.

/// Major GCs in a row with more memory after each than after the one before.
pub const LEAK_STREAK: u32 = 5;
/// Less growth than this between two major GCs is noise, not growth.
const MIN_GROWTH_BYTES: u64 = 256 * 1024;

/// A suspected leak: memory after major GC grew `major_gcs` times in a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Leak {
    pub rss_bytes: u64,
    pub growth_bytes_per_min: f64,
    pub major_gcs: u32,
}

/// One process's memory after its major GCs.
#[derive(Debug, Default)]
pub struct LeakWatch {
    last_rss: Option<u64>,
    /// Growths in a row, and where the run started (time, memory).
    streak: u32,
    streak_start: Option<(u64, u64)>,
    /// The newest memory after a major GC, for the metrics.
    pub rss_after_gc: Option<u64>,
    pub warnings: u64,
}

impl LeakWatch {
    /// Takes the memory after a major GC at `at_ns`; a leak once the run is long enough (then
    /// the count starts over, so a leak that goes on is reported again).
    pub fn after_major_gc(&mut self, at_ns: u64, rss_bytes: u64) -> Option<Leak> {
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
            return None;
        }
        let (since_ns, since_rss) = self.streak_start?;
        let minutes = at_ns.saturating_sub(since_ns) as f64 / 60e9;
        let leak = Leak {
            rss_bytes,
            growth_bytes_per_min: if minutes > 0.0 {
                rss_bytes.saturating_sub(since_rss) as f64 / minutes
            } else {
                0.0
            },
            major_gcs: self.streak,
        };
        self.streak = 0;
        self.streak_start = Some((at_ns, rss_bytes));
        self.warnings += 1;
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
            leaks.extend(watch.after_major_gc(i * 6 * S, 100 * MB + i * 10 * MB));
        }
        assert_eq!(leaks.len(), 1, "{leaks:?}");
        assert_eq!(leaks[0].major_gcs, LEAK_STREAK);
        assert!((leaks[0].growth_bytes_per_min - 100.0 * MB as f64).abs() < 1.0);
        assert_eq!(watch.warnings, 1);
    }

    #[test]
    fn settling_or_noisy_memory_is_no_leak() {
        let mut watch = LeakWatch::default();
        // Grows four times (the heap reaching its working size), then wobbles.
        let rss = [100, 110, 120, 130, 140, 139, 141, 140, 142, 139, 140, 141];
        for (i, mb) in rss.iter().enumerate() {
            assert_eq!(watch.after_major_gc(i as u64 * S, mb * MB), None, "at {i}");
        }
        // Growth under the noise floor does not count.
        for i in 0..20 {
            assert_eq!(
                watch.after_major_gc(100 * S + i * S, 150 * MB + i * 1024),
                None
            );
        }
    }
}
