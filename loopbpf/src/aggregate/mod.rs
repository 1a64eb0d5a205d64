//! Loop and interval aggregation: turns kernel events and per-thread state into what a user is
//! told — blocks, ongoing blocks, interval lines and the summary — for every loop thread.

pub mod leak;
pub mod usage;

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;

use crate::{
    abi::{HIST_SLOTS, ThreadState},
    decode::{Event, GcKind},
    naming::v8::LimitsHit,
};
use usage::{LoopStatus, Usage};

/// How often an ongoing block is reported again, and how long after the threshold the first time.
const ONGOING_EVERY_NS: u64 = 1_000_000_000;
/// GC pauses kept per loop thread to tell how much of a block was GC.
const GC_PAUSES_KEPT: usize = 4096;

/// Which loop of a process a thread runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadLabel {
    Main,
    /// The n-th `worker_threads` loop found in this process, from 1.
    Worker(u32),
}

impl ThreadLabel {
    pub fn kind(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Worker(_) => "worker",
        }
    }
}

impl std::fmt::Display for ThreadLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Main => f.write_str("main"),
            Self::Worker(n) => write!(f, "worker {n}"),
        }
    }
}

/// The loop thread a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopId {
    pub pid: u32,
    pub tid: u32,
    pub label: ThreadLabel,
}

/// How a block ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockEnd {
    /// The loop reached its next poll wait.
    Poll,
    /// The thread (usually the whole process) exited while busy.
    Exit,
}

/// One thing to tell the user.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Block {
        id: LoopId,
        start_ns: u64,
        duration_ns: u64,
        end: BlockEnd,
        /// Already going on when loopbpf attached: `start_ns` is the attach time and
        /// `duration_ns` a lower bound.
        before_attach: bool,
        /// Time of V8 GC pauses inside the block.
        gc_ns: u64,
        /// Time the thread was ready to run but waited for a CPU: preempted by other work,
        /// or throttled by a CPU limit.
        cpu_wait_ns: u64,
    },
    Ongoing {
        id: LoopId,
        start_ns: u64,
        duration_ns: u64,
        before_attach: bool,
        gc_ns: u64,
        /// So far (as of the kernel side's state last read).
        cpu_wait_ns: u64,
    },
    Interval {
        id: LoopId,
        elu: f64,
        iterations: u64,
        max_busy_ns: u64,
    },
    /// Memory after major GC grew over several in a row (see `leak`).
    Leak { id: LoopId, leak: leak::Leak },
    Summary {
        loops: Vec<LoopSummary>,
        elapsed_ns: u64,
        dropped_events: u64,
        /// Processes whose JS frames the naming limits left unnamed (set by the session).
        naming_limits: Vec<(u32, LimitsHit)>,
    },
}

/// One loop thread over the whole run.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopSummary {
    pub id: LoopId,
    pub elu: f64,
    pub iterations: u64,
    pub blocks: u64,
    pub max_busy_ns: u64,
    /// A block still going on when the run ended.
    pub ongoing_ns: Option<u64>,
    /// Iterations by busy time: `busy_hist[i]` counts those of [2^i, 2^(i+1)) microseconds.
    pub busy_hist: [u64; HIST_SLOTS],
    pub exited: bool,
    /// V8 GC pauses by kind, those that happened.
    pub gc: Vec<(GcKind, GcStats)>,
}

/// The GC pauses of one kind on one loop thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// `hist[i]` counts pauses of [2^i, 2^(i+1)) microseconds.
    pub hist: [u64; HIST_SLOTS],
}

impl GcStats {
    fn add(&mut self, pause_ns: u64) {
        self.count += 1;
        self.total_ns += pause_ns;
        self.max_ns = self.max_ns.max(pause_ns);
        let micros = pause_ns / 1000;
        let slot = if micros == 0 {
            0
        } else {
            micros.ilog2() as usize
        };
        self.hist[slot.min(HIST_SLOTS - 1)] += 1;
    }
}

#[derive(Debug)]
struct LoopThread {
    id: LoopId,
    /// Newest state read from the kernel side (final once the thread exited).
    state: ThreadState,
    /// Where the current interval window started, and the iterations then.
    window_start: (Usage, u64),
    /// When to report the current busy interval as ongoing next, keyed by its start.
    next_ongoing: Option<(u64, u64)>,
    exited_ns: Option<u64>,
    /// Its kernel-side entry was freed.
    forgotten: bool,
    gc: BTreeMap<GcKind, GcStats>,
    /// Recent GC pauses (start, end), to tell how much of a block was GC.
    gc_pauses: VecDeque<(u64, u64)>,
}

impl LoopThread {
    /// GC time inside `[start_ns, end_ns)`.
    fn gc_within(&self, start_ns: u64, end_ns: u64) -> u64 {
        self.gc_pauses
            .iter()
            .map(|&(from, to)| to.min(end_ns).saturating_sub(from.max(start_ns)))
            .sum()
    }
}

/// All loop threads of the watched processes.
#[derive(Debug)]
pub struct Aggregator {
    threshold_ns: u64,
    loops: BTreeMap<u32, LoopThread>,
    workers_per_pid: BTreeMap<u32, u32>,
    /// Loop threads whose exit was read since the last [`Self::take_exited_tids`]: not found by
    /// a walk of every loop at every drain, which exited processes kept for `--keep-exited` made
    /// long.
    exited: Vec<u32>,
}

impl Aggregator {
    pub fn new(threshold_ns: u64) -> Self {
        Self {
            threshold_ns,
            loops: BTreeMap::new(),
            workers_per_pid: BTreeMap::new(),
            exited: Vec::new(),
        }
    }

    /// Takes one kernel event; returns what to report about it.
    pub fn on_event(&mut self, event: &Event) -> Option<Record> {
        match *event {
            Event::LoopFound {
                pid, tid, at_ns, ..
            } => {
                if self.loops.get(&tid).is_some_and(|t| t.exited_ns.is_some()) {
                    // Its tid again, for a new loop: the process exec'd a libuv program again.
                    self.loops.remove(&tid);
                }
                self.loop_thread(pid, tid, at_ns);
                None
            }
            Event::Block {
                pid,
                tid,
                start_ns,
                end_ns,
                before_attach,
                waited_ns,
            } => {
                let thread = self.loop_thread(pid, tid, start_ns);
                let gc_ns = thread.gc_within(start_ns, end_ns);
                // Later blocks start after this one ends.
                thread.gc_pauses.retain(|&(_, to)| to > end_ns);
                let duration_ns = end_ns.saturating_sub(start_ns);
                Some(Record::Block {
                    id: thread.id,
                    start_ns,
                    duration_ns,
                    end: BlockEnd::Poll,
                    before_attach,
                    gc_ns,
                    cpu_wait_ns: waited_ns.min(duration_ns),
                })
            }
            Event::LoopExit {
                pid,
                tid,
                busy_since_ns,
                at_ns,
                before_attach,
                waited_ns,
            } => {
                if self
                    .loops
                    .get(&tid)
                    .is_some_and(|t| t.id.pid == pid && t.exited_ns.is_some())
                {
                    // Ended already: from the threads map, its exit event late or lost.
                    return None;
                }
                let threshold_ns = self.threshold_ns;
                // Not exited before (that returned above): its entry is freed at the next drain.
                self.exited.push(tid);
                let thread = self.loop_thread(pid, tid, at_ns);
                thread.exited_ns = Some(at_ns);
                let start_ns = busy_since_ns?;
                let duration_ns = at_ns.saturating_sub(start_ns);
                (duration_ns >= threshold_ns).then(|| Record::Block {
                    id: thread.id,
                    start_ns,
                    duration_ns,
                    end: BlockEnd::Exit,
                    before_attach,
                    gc_ns: thread.gc_within(start_ns, at_ns),
                    cpu_wait_ns: waited_ns.min(duration_ns),
                })
            }
            // Stacks are kept by the naming stage.
            Event::Stack(_) | Event::Exec { .. } => None,
            Event::Gc {
                pid,
                tid,
                start_ns,
                end_ns,
                kind,
            } => {
                let thread = self.loop_thread(pid, tid, start_ns);
                thread
                    .gc
                    .entry(kind)
                    .or_default()
                    .add(end_ns.saturating_sub(start_ns));
                if thread.gc_pauses.len() == GC_PAUSES_KEPT {
                    thread.gc_pauses.pop_front();
                }
                thread.gc_pauses.push_back((start_ns, end_ns));
                None
            }
        }
    }

    /// Stores the newest kernel-side state of a thread (the last one, after it exited).
    pub fn update_state(&mut self, tid: u32, state: &ThreadState) {
        if !state.is_reported_loop() {
            return; // not (yet) known to be a loop thread, or one we do not report
        }
        let thread = self.loop_thread(state.pid, tid, state.discovered_ns);
        if !thread.state.is_reported_loop() {
            // First state of this thread: windows start where its counters start.
            thread.window_start = (
                Usage {
                    at_ns: state.discovered_ns,
                    idle_ns: state.idle_ns,
                },
                state.iterations,
            );
        }
        thread.state = *state;
    }

    /// Loop threads that exited since the last call (their final state has been taken): the
    /// kernel side's entries to free, once each.
    pub fn take_exited_tids(&mut self) -> Vec<u32> {
        let mut tids = std::mem::take(&mut self.exited);
        tids.retain(|tid| match self.loops.get_mut(tid) {
            Some(thread) if thread.exited_ns.is_some() && !thread.forgotten => {
                thread.forgotten = true;
                true
            }
            _ => false, // forgotten as gone since, or a new loop on its tid
        });
        tids
    }

    /// Busy intervals over the threshold that have not ended yet, once a second each.
    pub fn ongoing(&mut self, now_ns: u64) -> Vec<Record> {
        let mut records = Vec::new();
        for thread in self.loops.values_mut() {
            if thread.exited_ns.is_some() {
                continue;
            }
            let Some(busy_ns) = thread.state.busy_for_ns(now_ns) else {
                thread.next_ongoing = None;
                continue;
            };
            let start_ns = thread.state.busy_since_ns;
            let due_ns = match thread.next_ongoing {
                Some((since, due)) if since == start_ns => due,
                _ => start_ns + self.threshold_ns + ONGOING_EVERY_NS,
            };
            if now_ns >= due_ns {
                records.push(Record::Ongoing {
                    id: thread.id,
                    start_ns,
                    duration_ns: busy_ns,
                    before_attach: thread.state.busy_before_attach != 0,
                    gc_ns: thread.gc_within(start_ns, now_ns),
                    cpu_wait_ns: thread.state.waited_ns.min(busy_ns),
                });
                // Keep the cadence from the due time, whatever reporting took.
                let next_ns = (due_ns + ONGOING_EVERY_NS).max(now_ns + ONGOING_EVERY_NS / 2);
                thread.next_ongoing = Some((start_ns, next_ns));
            } else {
                thread.next_ongoing = Some((start_ns, due_ns));
            }
        }
        records
    }

    /// When [`Aggregator::ongoing`] has an ongoing block to report next, as it last saw the
    /// threads: none busy, none due.
    pub fn next_ongoing_ns(&self) -> Option<u64> {
        self.loops
            .values()
            .filter(|t| t.exited_ns.is_none())
            .filter_map(|t| t.next_ongoing.map(|(_, due)| due))
            .min()
    }

    /// Every busy interval at or over the threshold that is still going on at `now_ns`, as an
    /// ongoing record, whenever it was last reported.
    pub fn still_blocked(&mut self, now_ns: u64) -> Vec<Record> {
        let threshold_ns = self.threshold_ns;
        self.loops
            .values_mut()
            .filter(|t| t.exited_ns.is_none())
            .filter_map(|thread| {
                let busy_ns = thread.state.busy_for_ns(now_ns)?;
                let start_ns = thread.state.busy_since_ns;
                (busy_ns >= threshold_ns).then(|| Record::Ongoing {
                    id: thread.id,
                    start_ns,
                    duration_ns: busy_ns,
                    before_attach: thread.state.busy_before_attach != 0,
                    gc_ns: thread.gc_within(start_ns, now_ns),
                    cpu_wait_ns: thread.state.waited_ns.min(busy_ns),
                })
            })
            .collect()
    }

    /// One interval record per live loop thread since the last call; starts the next window.
    /// `window` is the kernel-side window the states' `window_max_busy_ns` belong to.
    pub fn interval(&mut self, now_ns: u64, window: u64) -> Vec<Record> {
        let mut records = Vec::new();
        for thread in self.loops.values_mut() {
            if thread.exited_ns.is_some() || !thread.state.is_reported_loop() {
                continue;
            }
            let state = &thread.state;
            let (start, start_iterations) = thread.window_start;
            let now = Usage {
                at_ns: now_ns,
                idle_ns: state.idle_ns_at(now_ns),
            };
            let finished_max = if state.window == window {
                state.window_max_busy_ns
            } else {
                0
            };
            let max_busy_ns = finished_max.max(state.busy_for_ns(now_ns).unwrap_or(0));
            records.push(Record::Interval {
                id: thread.id,
                elu: now.elu_since(start),
                iterations: state.iterations.saturating_sub(start_iterations),
                max_busy_ns,
            });
            thread.window_start = (now, state.iterations);
        }
        records
    }

    /// The summary over the whole run, at `now_ns`.
    pub fn summary(&self, now_ns: u64, dropped_events: u64, elapsed_ns: u64) -> Record {
        let loops = self
            .loops
            .values()
            .filter(|t| t.state.is_reported_loop())
            .map(|thread| {
                let state = &thread.state;
                let end_ns = thread.exited_ns.unwrap_or(now_ns);
                let status = LoopStatus::new(thread.id, state);
                let end = Usage {
                    at_ns: end_ns,
                    idle_ns: state.idle_ns_at(end_ns),
                };
                let ongoing_ns = if thread.exited_ns.is_none() {
                    state
                        .busy_for_ns(now_ns)
                        .filter(|&busy| busy >= self.threshold_ns)
                } else {
                    None
                };
                LoopSummary {
                    id: thread.id,
                    elu: end.elu_since(status.found()),
                    iterations: state.iterations,
                    blocks: state.blocks,
                    max_busy_ns: state.max_busy_ns.max(ongoing_ns.unwrap_or(0)),
                    ongoing_ns,
                    busy_hist: state.busy_hist,
                    exited: thread.exited_ns.is_some(),
                    gc: thread.gc.iter().map(|(k, s)| (*k, *s)).collect(),
                }
            })
            .collect();
        Record::Summary {
            loops,
            elapsed_ns,
            dropped_events,
            naming_limits: Vec::new(),
        }
    }

    /// Whether any loop thread of `pid` is known.
    pub fn knows_loops(&self) -> bool {
        !self.loops.is_empty()
    }

    /// Every main and worker loop thread with its newest state, exited ones too.
    pub fn loops(&self) -> impl Iterator<Item = LoopStatus<'_>> {
        self.loops
            .values()
            .filter(|t| t.state.is_reported_loop())
            .map(|t| LoopStatus::new(t.id, &t.state))
    }

    /// Whether loop thread `tid` is known to have exited.
    pub fn has_exited(&self, tid: u32) -> bool {
        self.loops.get(&tid).is_some_and(|t| t.exited_ns.is_some())
    }

    /// A thread found gone without an exit event: it is no loop any more (and no block).
    pub fn thread_gone(&mut self, tid: u32, at_ns: u64) {
        if let Some(thread) = self.loops.get_mut(&tid) {
            thread.exited_ns.get_or_insert(at_ns);
            thread.forgotten = true;
        }
    }

    /// Forgets every loop thread of a process that is gone; returns their tids.
    pub fn forget_process(&mut self, pid: u32) -> Vec<u32> {
        self.workers_per_pid.remove(&pid);
        let tids: Vec<u32> = self
            .loops
            .values()
            .filter(|t| t.id.pid == pid)
            .map(|t| t.id.tid)
            .collect();
        for tid in &tids {
            self.loops.remove(tid);
        }
        tids
    }

    fn loop_thread(&mut self, pid: u32, tid: u32, first_ns: u64) -> &mut LoopThread {
        if self.loops.get(&tid).is_some_and(|t| t.id.pid != pid) {
            // The tid was reused by another process (fleet mode sees many come and go).
            self.loops.remove(&tid);
        }
        let workers = &mut self.workers_per_pid;
        self.loops.entry(tid).or_insert_with(|| {
            let label = if pid == tid {
                ThreadLabel::Main
            } else {
                let n = workers.entry(pid).or_insert(0);
                *n += 1;
                ThreadLabel::Worker(*n)
            };
            LoopThread {
                id: LoopId { pid, tid, label },
                state: ThreadState::default(),
                window_start: (
                    Usage {
                        at_ns: first_ns,
                        idle_ns: 0,
                    },
                    0,
                ),
                next_ongoing: None,
                exited_ns: None,
                forgotten: false,
                gc: BTreeMap::new(),
                gc_pauses: VecDeque::new(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::ROLE_MAIN;
    use usage::utilization;

    const MS: u64 = 1_000_000;

    fn state(pid: u32, discovered_ns: u64) -> ThreadState {
        ThreadState {
            loop_addr: 0x1000,
            pid,
            discovered_ns,
            role: ROLE_MAIN,
            ..ThreadState::default()
        }
    }

    #[test]
    fn blocks_carry_the_thread_label() {
        let mut agg = Aggregator::new(100 * MS);
        agg.on_event(&Event::LoopFound {
            pid: 7,
            tid: 7,
            loop_addr: 1,
            at_ns: 0,
        });
        agg.on_event(&Event::LoopFound {
            pid: 7,
            tid: 9,
            loop_addr: 2,
            at_ns: 0,
        });
        agg.on_event(&Event::LoopFound {
            pid: 7,
            tid: 8,
            loop_addr: 3,
            at_ns: 0,
        });
        let Some(Record::Block {
            id,
            duration_ns,
            end,
            ..
        }) = agg.on_event(&Event::Block {
            pid: 7,
            tid: 8,
            start_ns: 10 * MS,
            end_ns: 260 * MS,
            before_attach: false,
            waited_ns: 0,
        })
        else {
            panic!("no block")
        };
        assert_eq!(id.label, ThreadLabel::Worker(2));
        assert_eq!(duration_ns, 250 * MS);
        assert_eq!(end, BlockEnd::Poll);
    }

    #[test]
    fn a_block_counts_the_gc_pauses_inside_it() {
        let mut agg = Aggregator::new(100 * MS);
        let gc = |start_ns, end_ns, kind| Event::Gc {
            pid: 7,
            tid: 7,
            start_ns,
            end_ns,
            kind,
        };
        // One pause before the block, one inside, one straddling its start.
        agg.on_event(&gc(5 * MS, 8 * MS, GcKind::Minor));
        agg.on_event(&gc(95 * MS, 110 * MS, GcKind::Minor));
        agg.on_event(&gc(150 * MS, 230 * MS, GcKind::Major));
        let Some(Record::Block { gc_ns, .. }) = agg.on_event(&Event::Block {
            pid: 7,
            tid: 7,
            start_ns: 100 * MS,
            end_ns: 300 * MS,
            before_attach: false,
            waited_ns: 0,
        }) else {
            panic!("no block")
        };
        assert_eq!(gc_ns, 90 * MS);
        let thread = &agg.loops[&7];
        assert!(
            thread.gc_pauses.is_empty(),
            "pauses of ended blocks are dropped"
        );
        assert_eq!(thread.gc[&GcKind::Minor].count, 2);
        assert_eq!(thread.gc[&GcKind::Major].total_ns, 80 * MS);
    }

    #[test]
    fn a_reused_tid_is_a_new_loop_and_gone_processes_are_forgotten() {
        let mut agg = Aggregator::new(100 * MS);
        let found = |pid, tid| Event::LoopFound {
            pid,
            tid,
            loop_addr: 1,
            at_ns: 0,
        };
        agg.on_event(&found(7, 7));
        agg.on_event(&found(7, 8));
        agg.update_state(7, &state(7, 0));
        agg.update_state(8, &state(7, 0));
        // The main thread execs node again: its loop ends, and a new one starts on its tid.
        agg.on_event(&Event::LoopExit {
            pid: 7,
            tid: 7,
            busy_since_ns: None,
            at_ns: 5 * MS,
            before_attach: false,
            waited_ns: 0,
        });
        assert_eq!(agg.take_exited_tids(), [7]);
        assert!(agg.take_exited_tids().is_empty(), "once each");
        agg.on_event(&found(7, 7));
        assert!(agg.loops[&7].exited_ns.is_none());
        // Another process gets tid 8.
        agg.on_event(&found(9, 8));
        assert_eq!(agg.loops[&8].id.pid, 9);
        assert_eq!(agg.loops[&8].id.label, ThreadLabel::Worker(1));
        let mut forgotten = agg.forget_process(7);
        forgotten.sort_unstable();
        assert_eq!(forgotten, [7]);
        assert!(agg.loops.keys().eq([&8]));
    }

    #[test]
    fn a_thread_dying_busy_reports_its_block_only_over_the_threshold() {
        let mut agg = Aggregator::new(100 * MS);
        let exit = |busy_since| Event::LoopExit {
            pid: 5,
            tid: 5,
            busy_since_ns: busy_since,
            at_ns: 500 * MS,
            before_attach: true,
            waited_ns: 0,
        };
        assert!(matches!(
            agg.on_event(&exit(Some(300 * MS))),
            Some(Record::Block { duration_ns, end: BlockEnd::Exit, before_attach: true, .. })
                if duration_ns == 200 * MS
        ));
        let mut agg = Aggregator::new(100 * MS);
        assert_eq!(agg.on_event(&exit(Some(450 * MS))), None);
        assert_eq!(agg.on_event(&exit(None)), None);
    }

    #[test]
    fn an_exit_taken_from_the_threads_map_is_not_reported_again_when_its_event_comes() {
        let mut agg = Aggregator::new(100 * MS);
        let mut s = state(5, 0);
        s.busy_since_ns = 300 * MS;
        agg.update_state(5, &s);
        let exit = Event::LoopExit {
            pid: 5,
            tid: 5,
            busy_since_ns: Some(300 * MS),
            at_ns: 500 * MS,
            before_attach: false,
            waited_ns: 0,
        };
        assert!(matches!(
            agg.on_event(&exit),
            Some(Record::Block {
                end: BlockEnd::Exit,
                ..
            })
        ));
        assert!(agg.has_exited(5));
        // Still busy by its last state, but gone: never ongoing, and the late event is no news.
        assert!(agg.ongoing(5000 * MS).is_empty());
        assert_eq!(agg.on_event(&exit), None);
        assert_eq!(agg.take_exited_tids(), [5]);
    }

    #[test]
    fn ongoing_after_a_second_past_the_threshold_then_every_second() {
        let mut agg = Aggregator::new(100 * MS);
        let mut s = state(1, 0);
        s.busy_since_ns = 1000 * MS;
        agg.update_state(1, &s);
        assert_eq!(agg.next_ongoing_ns(), None);
        assert!(agg.ongoing(1500 * MS).is_empty());
        // The poll that reports it can wait until then.
        assert_eq!(agg.next_ongoing_ns(), Some(2100 * MS));
        assert!(agg.ongoing(2050 * MS).is_empty());
        let first = agg.ongoing(2120 * MS);
        assert!(
            matches!(first[..], [Record::Ongoing { duration_ns, .. }] if duration_ns == 1120 * MS)
        );
        assert_eq!(agg.next_ongoing_ns(), Some(3100 * MS));
        assert!(agg.ongoing(2600 * MS).is_empty());
        assert_eq!(agg.ongoing(3130 * MS).len(), 1);
        // The loop polls again: no more ongoing lines, and no poll is needed for them.
        s.busy_since_ns = 0;
        s.in_poll = 1;
        agg.update_state(1, &s);
        assert!(agg.ongoing(9000 * MS).is_empty());
        assert_eq!(agg.next_ongoing_ns(), None);
    }

    #[test]
    fn interval_elu_counts_an_ongoing_idle_wait() {
        let mut agg = Aggregator::new(100 * MS);
        let mut s = state(1, 0);
        agg.update_state(1, &s);
        // 1 s window: 300 ms idle finished, then idle since 800 ms.
        s.idle_ns = 300 * MS;
        s.in_poll = 1;
        s.poll_enter_ns = 800 * MS;
        s.iterations = 42;
        s.window = 1;
        s.window_max_busy_ns = 250 * MS;
        agg.update_state(1, &s);
        let records = agg.interval(1000 * MS, 1);
        let [
            Record::Interval {
                elu,
                iterations,
                max_busy_ns,
                ..
            },
        ] = records[..]
        else {
            panic!("{records:?}")
        };
        assert!((elu - 0.5).abs() < 1e-9, "{elu}");
        assert_eq!(iterations, 42);
        assert_eq!(max_busy_ns, 250 * MS);
        // A stale window's maximum is not reported again.
        let records = agg.interval(2000 * MS, 2);
        assert!(matches!(
            records[..],
            [Record::Interval {
                max_busy_ns: 0,
                iterations: 0,
                ..
            }]
        ));
    }

    #[test]
    fn summary_includes_a_block_still_going_on() {
        let mut agg = Aggregator::new(100 * MS);
        let mut s = state(1, 0);
        s.max_busy_ns = 120 * MS;
        s.busy_since_ns = 1000 * MS;
        s.idle_ns = 500 * MS;
        agg.update_state(1, &s);
        let Record::Summary { loops, .. } = agg.summary(2000 * MS, 0, 2000 * MS) else {
            panic!()
        };
        assert_eq!(loops[0].ongoing_ns, Some(1000 * MS));
        assert_eq!(loops[0].max_busy_ns, 1000 * MS);
        assert!((loops[0].elu - 0.75).abs() < 1e-9);
    }

    #[test]
    fn utilization_is_bounded() {
        assert!((utilization(0, 0)).abs() < f64::EPSILON);
        assert!((utilization(10, 20)).abs() < f64::EPSILON);
        assert!((utilization(10, 0) - 1.0).abs() < f64::EPSILON);
    }
}
