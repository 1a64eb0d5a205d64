//! The session's periodic work, on one timer. Once a [`super::TICK`], the chores: every loop
//! thread's state read from the kernel side (one batch), records submitted without a wake-up
//! (GC pauses), lost exits, ongoing blocks, memory for the leak rule, naming's memory maps,
//! gone processes, the metrics. Between those ticks loopbpf wakes only when something is due
//! then: an ongoing block's next line (its time is known from the state read at the tick
//! before: a block that starts after a tick is due a second past the threshold, after the next
//! one), an exec's second look, the end of loop discovery; every [`FAST_POLL`] for `record`'s
//! timeline, or while GC pauses come so fast that the control ring buffer could fill.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};

use super::{End, Session, events::Drain};
use crate::output::clock::Clock;

/// How often the state is polled when it must be: `record` and fast GC pauses.
pub(super) const FAST_POLL: Duration = Duration::from_millis(100);

/// GC pauses a second over which the control ring buffer is read every [`FAST_POLL`]: its
/// 1 MiB holds about 18,000 records, which GC pauses fill without waking loopbpf.
const FAST_GC_PER_S: u64 = 2_000;

/// What the periodic work keeps between ticks.
#[derive(Debug, Default)]
pub(super) struct Poll {
    /// Loop threads seen in `/proc` since their entry in the kernel's `threads` map was made
    /// (with its `discovered_ns`): the kernel side sees their exit, `/proc` is not asked again.
    pub(super) in_proc: HashMap<u32, u64>,
    /// GC pause records read so far.
    pub(super) gc_pauses: u64,
    /// The last poll: when, and `gc_pauses` then.
    last: Option<(Instant, u64)>,
    /// Whether GC pauses come too fast for the control ring buffer to wait a tick.
    fast: bool,
}

impl Poll {
    /// Notes a poll at `now`; says whether the GC pauses read since the one before came at
    /// [`FAST_GC_PER_S`] or more.
    fn polled(&mut self, now: Instant) {
        if let Some((last, gc_then)) = self.last {
            let secs = now.duration_since(last).as_secs_f64().max(0.01);
            let rate = self.gc_pauses.saturating_sub(gc_then) as f64 / secs;
            self.fast = rate >= FAST_GC_PER_S as f64;
        }
        self.last = Some((now, self.gc_pauses));
    }
}

impl Session<'_> {
    /// A poll of the kernel side's state; with `tick`, the once-a-tick chores too.
    pub(super) fn poll_state(
        &mut self,
        stacks: &mut RingBuf<MapData>,
        control: &mut RingBuf<MapData>,
        tick: bool,
    ) -> Result<(), End> {
        self.drain(stacks, Drain::Queued)?;
        self.drain(control, Drain::All)?;
        let now_ns = Clock::monotonic_ns();
        self.look_at_execs(now_ns);
        if tick {
            // Keep the memory maps current while the targets live, so that stacks of a
            // block that ends with an exit can still be named.
            self.refresh_naming();
            self.tend_fleet(now_ns);
        }
        let mut threads = self.probes.threads();
        // Exits lost on the way end their threads before anything is said ongoing.
        self.reconcile_threads(&mut threads, now_ns, tick)?;
        self.refresh_from(&threads);
        let mut records = self.aggregator.ongoing(now_ns);
        records.extend(self.sample_memory(now_ns));
        self.report_all(records)?;
        if tick {
            self.refresh_metrics(now_ns);
        }
        self.poll.polled(Instant::now());
        self.record_tick(now_ns)
    }

    /// When the next poll between ticks is due, if one is.
    pub(super) fn next_poll(&self) -> Option<Instant> {
        let now = Instant::now();
        if self.recorder.is_some() || self.poll.fast {
            return Some(self.poll.last.map_or(now, |(last, _)| last + FAST_POLL));
        }
        let now_ns = Clock::monotonic_ns();
        let due_ns = [
            self.aggregator.next_ongoing_ns(),
            self.fleet
                .as_ref()
                .and_then(super::fleet::Fleet::next_exec_ns),
        ]
        .into_iter()
        .flatten()
        .min();
        // A millisecond late rather than a moment early, which would find nothing due yet.
        let due = due_ns.map(|ns| {
            now + Duration::from_nanos(ns.saturating_sub(now_ns)) + Duration::from_millis(1)
        });
        due.into_iter().chain(self.probes.discovery_due()).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_pauses_coming_fast_make_the_poll_fast_and_slow_again() {
        let mut poll = Poll::default();
        let start = Instant::now();
        poll.polled(start);
        assert!(!poll.fast);
        // 50 pauses in a second: a tick's wait is fine.
        poll.gc_pauses += 50;
        poll.polled(start + Duration::from_secs(1));
        assert!(!poll.fast);
        // 300 in 100 ms: 3,000 a second.
        poll.gc_pauses += 300;
        poll.polled(start + Duration::from_millis(1100));
        assert!(poll.fast);
        poll.gc_pauses += 10;
        poll.polled(start + Duration::from_millis(1200));
        assert!(!poll.fast);
    }
}
