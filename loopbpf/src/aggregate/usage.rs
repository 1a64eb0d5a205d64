//! Event loop utilization, one way for every output: a loop's [`Usage`] at a moment (its time
//! and idle time so far), ELU between two of them, and a sliding [`EluWindow`]. Counted the way
//! libuv and `performance.eventLoopUtilization()` count it: the share of time not idle.

use std::collections::VecDeque;

use super::LoopId;
use crate::abi::{HIST_SLOTS, ThreadState};

/// A loop thread's time at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub at_ns: u64,
    /// Time idle in its poll wait since it was found, up to `at_ns`.
    pub idle_ns: u64,
}

impl Usage {
    /// ELU from `earlier` to this moment.
    pub fn elu_since(self, earlier: Usage) -> f64 {
        utilization(
            self.at_ns.saturating_sub(earlier.at_ns),
            self.idle_ns.saturating_sub(earlier.idle_ns),
        )
    }
}

/// Event loop utilization: the share of `wall_ns` not spent idle.
pub fn utilization(wall_ns: u64, idle_ns: u64) -> f64 {
    if wall_ns == 0 {
        return 0.0;
    }
    (1.0 - idle_ns.min(wall_ns) as f64 / wall_ns as f64).clamp(0.0, 1.0)
}

/// ELU over the last `window_ns`, from usages taken now and then.
#[derive(Debug, Default)]
pub struct EluWindow {
    marks: VecDeque<Usage>,
}

impl EluWindow {
    /// Takes the usage now; ELU over the window up to it (from `first`, the loop's start,
    /// while the window is not full yet).
    pub fn push(&mut self, now: Usage, first: Usage, window_ns: u64) -> f64 {
        self.marks.push_back(now);
        while self
            .marks
            .get(1)
            .is_some_and(|m| now.at_ns.saturating_sub(m.at_ns) >= window_ns)
        {
            self.marks.pop_front();
        }
        let from = self
            .marks
            .front()
            .copied()
            .filter(|m| m.at_ns < now.at_ns)
            .unwrap_or(first);
        now.elu_since(from)
    }
}

/// What the outputs may know of a loop thread: its counters as the kernel side keeps them,
/// read through one view rather than the raw kernel record.
#[derive(Debug, Clone, Copy)]
pub struct LoopStatus<'a> {
    pub id: LoopId,
    state: &'a ThreadState,
}

impl<'a> LoopStatus<'a> {
    pub fn new(id: LoopId, state: &'a ThreadState) -> Self {
        Self { id, state }
    }

    /// When loopbpf found the loop: its counters start there.
    pub fn found(&self) -> Usage {
        Usage {
            at_ns: self.state.discovered_ns,
            idle_ns: 0,
        }
    }

    /// When the thread exited, if it did.
    pub fn exited_ns(&self) -> Option<u64> {
        (self.state.exited_ns != 0).then_some(self.state.exited_ns)
    }

    /// Its usage at `now_ns`, or at its exit if it has exited.
    pub fn usage(&self, now_ns: u64) -> Usage {
        let at_ns = self.exited_ns().unwrap_or(now_ns);
        Usage {
            at_ns,
            idle_ns: self.state.idle_ns_at(at_ns),
        }
    }

    pub fn iterations(&self) -> u64 {
        self.state.iterations
    }

    /// The busy interval under way at `now_ns`: its start and how long it has lasted.
    pub fn busy(&self, now_ns: u64) -> Option<(u64, u64)> {
        if self.exited_ns().is_some() {
            return None;
        }
        let busy_ns = self.state.busy_for_ns(now_ns)?;
        Some((self.state.busy_since_ns, busy_ns))
    }

    /// Iterations by busy time: `[i]` counts those of [2^i, 2^(i+1)) microseconds.
    pub fn busy_hist(&self) -> &'a [u64; HIST_SLOTS] {
        &self.state.busy_hist
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn at(at_ns: u64, idle_ns: u64) -> Usage {
        Usage { at_ns, idle_ns }
    }

    #[test]
    fn elu_is_the_share_of_time_not_idle() {
        assert!((at(10 * S, 4 * S).elu_since(at(0, 0)) - 0.6).abs() < 1e-9);
        assert!(at(5, 0).elu_since(at(5, 0)).abs() < 1e-12);
        // Idle time read a moment after the clock cannot make ELU negative.
        assert!(at(10, 20).elu_since(at(0, 0)).abs() < 1e-12);
    }

    #[test]
    fn the_window_slides() {
        let mut window = EluWindow::default();
        let first = at(0, 0);
        // Idle for 20 s, then busy.
        for second in 1..=20 {
            window.push(at(second * S, second * S), first, 10 * S);
        }
        let mut elu = 0.0;
        for second in 21..=30 {
            elu = window.push(at(second * S, 20 * S), first, 10 * S);
        }
        assert!((elu - 1.0).abs() < 1e-9, "{elu}");
    }
}
