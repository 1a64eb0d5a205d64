//! The session's side of naming: which naming lane (see [`crate::naming::worker`]) names which
//! process, and the records that wait, in order, for their stacks to come back.
//!
//! The session never waits on naming: jobs are queued without blocking (samples go in batches,
//! one per drain of the stack records; a batch that finds its lane full is dropped and its
//! samples counted), and a record waits for its stacks only so long
//! ([`BLOCK_LIMIT`], [`ONGOING_LIMIT`]); then it is reported without them, said so and counted.
//! Processes share a lane (and the files it has read), but a process whose job has run for
//! [`STUCK`] has the lane to itself: the others move to another lane.
//!
//! Every lane holds its own copy of what its processes' files gave (a node binary's symbols,
//! the kernel's, unwind tables: 40-50 MB for a node binary), so a lane started for a stuck one
//! ends once it has named no process for [`IDLE_LANE_ENDS`].

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    time::{Duration, Instant},
};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::{
    aggregate::Record,
    decode::StackSample,
    naming::{
        stacks::BlockProfile,
        worker::{Job, Lane, LaneOptions, NameJob},
    },
};

/// Lanes started before any is stuck: one, so that each file is read once (every lane reads
/// the binaries of its processes for itself). A lane stuck on one process for [`STUCK`] gets a
/// new lane started for its other processes.
const LANES: usize = 1;
/// Lanes there can be, started as lanes get stuck.
const MAX_LANES: usize = 4;
/// A job that has run this long has its lane to itself.
const STUCK: Duration = Duration::from_secs(1);
/// How long a block waits for its stacks to be named.
pub(super) const BLOCK_LIMIT: Duration = Duration::from_secs(2);
/// Samples a lane's batch holds before it is sent: a batch is sent at the latest as a drain of
/// the stack records ends, or before any other job of its lane (jobs keep their order).
const BATCH: usize = 64;
/// How long an ongoing block waits for its stacks to be named (it is reported again).
pub(super) const ONGOING_LIMIT: Duration = Duration::from_millis(500);
/// How long a lane started for a stuck one names no process before it ends: a lane ended and
/// started again at once would read every file again (and the allocator keeps some of it).
const IDLE_LANE_ENDS: Duration = Duration::from_secs(30);

struct LaneSlot {
    lane: Lane,
    pids: BTreeSet<u32>,
    /// Watch and gone jobs that found the queue full, sent first once there is room: they are
    /// never dropped (a few per process: its watch, a look when each of its loops is found,
    /// its end).
    backlog: VecDeque<Job>,
    /// Samples not sent yet, in the order taken.
    batch: Vec<StackSample>,
    /// Since when it names no process.
    idle_since: Option<Instant>,
}

/// The naming lanes and who is named where.
pub(super) struct Namers {
    /// By index (`lane_of`'s): `None` where a lane was ended (see [`Namers::end_idle_lanes`]).
    lanes: Vec<Option<LaneSlot>>,
    lane_of: HashMap<u32, usize>,
    replies: UnboundedSender<crate::naming::worker::Reply>,
    /// The session's threshold: lanes unwind only samples of intervals that could reach it.
    options: LaneOptions,
    next_ticket: u64,
    /// Samples dropped because their lane's queue was full.
    pub(super) samples_dropped: u64,
    /// Records reported without their stacks: naming took too long.
    pub(super) timeouts: u64,
}

/// Whether a naming request went out.
pub(super) enum Request {
    Sent(u64),
    /// The process is not named (not watched, gone, or `--no-stacks`).
    NoNaming,
    /// Its lane's queue is full: as good as timed out.
    Full,
}

impl Namers {
    /// No lane runs before the first process is watched.
    pub(super) fn new(
        options: LaneOptions,
    ) -> (Self, UnboundedReceiver<crate::naming::worker::Reply>) {
        let (replies, receiver) = unbounded_channel();
        let namers = Self {
            lanes: Vec::new(),
            lane_of: HashMap::new(),
            replies,
            options,
            next_ticket: 0,
            samples_dropped: 0,
            timeouts: 0,
        };
        (namers, receiver)
    }

    /// Names a process's stacks from now on, on the least busy lane that is not stuck.
    pub(super) fn watch(&mut self, pid: u32) {
        if self.lane_of.contains_key(&pid) {
            return;
        }
        let Some(lane) = self.free_lane(None) else {
            warning!("stacks of pid {pid} stay unnamed: no naming thread could be started");
            return;
        };
        self.place(pid, lane);
        self.send(lane, Job::Watch { pid });
    }

    pub(super) fn gone(&mut self, pid: u32) {
        if let Some(lane) = self.lane_of.remove(&pid) {
            self.unplace(pid, lane);
            self.send(lane, Job::Gone { pid });
        }
    }

    /// Lanes running now.
    fn lanes_running(&self) -> usize {
        self.lanes.iter().flatten().count()
    }

    fn slot(&mut self, lane: usize) -> Option<&mut LaneSlot> {
        self.lanes.get_mut(lane).and_then(Option::as_mut)
    }

    /// Process `pid` is named on `lane` from now on.
    fn place(&mut self, pid: u32, lane: usize) {
        if let Some(slot) = self.slot(lane) {
            slot.pids.insert(pid);
            slot.idle_since = None;
            self.lane_of.insert(pid, lane);
        }
    }

    /// Process `pid` is named on `lane` no more.
    fn unplace(&mut self, pid: u32, lane: usize) {
        if let Some(slot) = self.slot(lane)
            && slot.pids.remove(&pid)
            && slot.pids.is_empty()
        {
            slot.idle_since = Some(Instant::now());
        }
    }

    /// Ends the lanes started for stuck ones that have named no process for
    /// [`IDLE_LANE_ENDS`] and whose every job is queued: dropping a lane's handle lets its
    /// thread finish those jobs (their replies still come), then end, freeing what it read.
    /// The first [`LANES`] lanes stay.
    fn end_idle_lanes(&mut self, now: Instant) {
        for lane in LANES..self.lanes.len() {
            let Some(slot) = self.slot(lane) else {
                continue;
            };
            slot.send_backlog();
            let idle = slot
                .idle_since
                .is_some_and(|since| now.saturating_duration_since(since) >= IDLE_LANE_ENDS);
            if idle && slot.pids.is_empty() && slot.backlog.is_empty() {
                // Samples of its processes taken before they were gone are of no use now.
                self.lanes[lane] = None;
                crate::target::freed_much();
            }
        }
    }

    /// Once a second: every process's maps re-read on its lane; the other processes of a stuck
    /// lane moved off it.
    pub(super) fn refresh(&mut self) {
        let pids: Vec<(u32, usize)> = self.lane_of.iter().map(|(&p, &l)| (p, l)).collect();
        for (pid, lane) in pids {
            self.send(lane, Job::Refresh { pid });
        }
        for stuck in 0..self.lanes.len() {
            let Some(stuck_slot) = self.slot(stuck) else {
                continue;
            };
            let Some(slow) = stuck_slot.lane.stuck_on(STUCK) else {
                continue;
            };
            let others: Vec<u32> = stuck_slot
                .pids
                .iter()
                .copied()
                .filter(|&pid| pid != slow)
                .collect();
            for pid in others {
                let Some(to) = self.free_lane(Some(stuck)) else {
                    break;
                };
                status!("naming of pid {slow} is slow: pid {pid} is named on another thread");
                self.unplace(pid, stuck);
                self.send(stuck, Job::Gone { pid });
                self.place(pid, to);
                self.send(to, Job::Watch { pid });
            }
        }
        self.end_idle_lanes(Instant::now());
    }

    /// A process's mappings re-read and its V8 looked for now, ahead of the next refresh (its
    /// loop was just found). Sent like a watch job: it is never dropped, so it comes before
    /// the samples of the loop's first block.
    pub(super) fn look_again(&mut self, pid: u32) {
        if let Some(&lane) = self.lane_of.get(&pid) {
            self.send_control(lane, Job::LoopFound { pid });
        }
    }

    /// Hands a sample to its process's lane, in a batch sent by [`Self::flush_samples`] (or
    /// once full); a sample of a process not named is not kept.
    pub(super) fn sample(&mut self, sample: StackSample) {
        let Some(&lane) = self.lane_of.get(&sample.of.pid) else {
            return;
        };
        let Some(slot) = self.slot(lane) else {
            return;
        };
        slot.batch.push(sample);
        if slot.batch.len() >= BATCH {
            self.send_batch(lane);
        }
    }

    /// Sends every lane's batch of samples: one job, and one wake-up of the lane, per drain.
    pub(super) fn flush_samples(&mut self) {
        for lane in 0..self.lanes.len() {
            self.send_batch(lane);
        }
    }

    /// Sends a lane's batch; its samples are dropped and counted if the lane is full.
    fn send_batch(&mut self, lane: usize) {
        let Some(slot) = self.slot(lane) else {
            return;
        };
        let batch = std::mem::take(&mut slot.batch);
        let samples = batch.len() as u64;
        if samples > 0 && !self.send_as(lane, Job::Samples(batch), false) {
            self.samples_dropped += samples;
        }
    }

    /// Asks for the stacks of thread `tid`'s busy interval that began at `start_ns`.
    pub(super) fn request(
        &mut self,
        pid: u32,
        tid: u32,
        start_ns: u64,
        duration_ns: u64,
        keep: bool,
    ) -> Request {
        let Some(&lane) = self.lane_of.get(&pid) else {
            return Request::NoNaming;
        };
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        let job = Job::Name(NameJob {
            ticket,
            pid,
            tid,
            start_ns,
            duration_ns,
            keep,
        });
        if self.send(lane, job) {
            Request::Sent(ticket)
        } else {
            Request::Full
        }
    }

    /// A lane for a process: the one with the fewest processes among those not stuck (and not
    /// `except`), or a new one.
    fn free_lane(&mut self, except: Option<usize>) -> Option<usize> {
        let least = self
            .lanes
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| Some((i, slot.as_ref()?)))
            .filter(|(i, slot)| Some(*i) != except && slot.lane.stuck_on(STUCK).is_none())
            .min_by_key(|(_, slot)| slot.pids.len())
            .map(|(i, slot)| (i, slot.pids.len()));
        let running = self.lanes_running();
        let grow = match least {
            // Every lane is stuck (or there is none yet).
            None => running < MAX_LANES,
            Some((_, processes)) => processes > 0 && running < LANES,
        };
        if grow {
            match Lane::spawn(self.replies.clone(), self.options) {
                Ok(lane) => {
                    let slot = LaneSlot {
                        lane,
                        pids: BTreeSet::new(),
                        backlog: VecDeque::new(),
                        batch: Vec::new(),
                        idle_since: Some(Instant::now()),
                    };
                    // In the place of an ended lane, so that indexes stay few.
                    if let Some(index) = self.lanes.iter().position(Option::is_none) {
                        self.lanes[index] = Some(slot);
                        return Some(index);
                    }
                    self.lanes.push(Some(slot));
                    return Some(self.lanes.len() - 1);
                }
                Err(e) => warning!("could not start a naming thread: {e}"),
            }
        }
        least.map(|(i, _)| i)
    }

    /// Queues a job without waiting. Watch and gone jobs wait in a backlog when the queue is
    /// full; other jobs are then not sent (false), nor while the backlog is not empty, so that
    /// jobs keep their order.
    fn send(&mut self, lane: usize, job: Job) -> bool {
        let control = matches!(job, Job::Watch { .. } | Job::Gone { .. });
        self.send_as(lane, job, control)
    }

    /// Queues a job that is never dropped, as watch and gone jobs are.
    fn send_control(&mut self, lane: usize, job: Job) {
        self.send_as(lane, job, true);
    }

    fn send_as(&mut self, lane: usize, job: Job, control: bool) -> bool {
        // The samples taken before this job go first: a naming request names them too.
        if !matches!(job, Job::Samples(_)) {
            self.send_batch(lane);
        }
        let Some(slot) = self.slot(lane) else {
            return false;
        };
        slot.send_backlog();
        if slot.backlog.is_empty() {
            match slot.lane.try_send(job) {
                Ok(()) => return true,
                Err(job) if control => slot.backlog.push_back(job),
                Err(_) => return false,
            }
        } else if control {
            slot.backlog.push_back(job);
        } else {
            return false;
        }
        true
    }
}

impl LaneSlot {
    /// Sends the jobs of the backlog that the lane's queue has room for, in order.
    fn send_backlog(&mut self) {
        while let Some(first) = self.backlog.pop_front() {
            if let Err(first) = self.lane.try_send(first) {
                self.backlog.push_front(first);
                break;
            }
        }
    }
}

/// A record waiting to be reported, in order.
pub(super) struct Waiting {
    pub(super) record: Record,
    /// When it was made: what the outputs are told.
    pub(super) now_ns: u64,
    /// The naming request it waits for, and until when.
    pub(super) wait: Option<(u64, Instant)>,
    pub(super) profile: Option<BlockProfile>,
    /// Its stacks go into the blocked time of `--folded` and `--flamegraph`.
    pub(super) into_flame: bool,
    /// Its stacks did not come back in time.
    pub(super) timed_out: bool,
    /// A block still going on at the end: for the bundle and the flame graph only.
    pub(super) final_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::worker::Reply;

    /// Pids no process has (over the kernel's `pid_max` limit of 2^22): their naming reads
    /// nothing.
    const A: u32 = 4_200_001;
    const B: u32 = 4_200_002;
    const C: u32 = 4_200_003;
    const D: u32 = 4_200_004;

    /// A lane started as one is when another gets stuck.
    fn start_extra_lane(namers: &mut Namers) -> usize {
        let lane = Lane::spawn(namers.replies.clone(), namers.options).expect("a lane");
        namers.lanes.push(Some(LaneSlot {
            lane,
            pids: BTreeSet::new(),
            backlog: VecDeque::new(),
            batch: Vec::new(),
            idle_since: None,
        }));
        namers.lanes.len() - 1
    }

    /// A lane started for a stuck one holds its own copy of the node binary's symbols, the
    /// kernel's and the unwind tables: kept for good, they were tens of MB each.
    #[test]
    fn a_lane_started_for_a_stuck_one_ends_once_idle() {
        let (mut namers, mut replies) = Namers::new(LaneOptions {
            threshold_ns: 50_000_000,
            keep_query: false,
        });
        namers.watch(A);
        namers.watch(D);
        assert_eq!((namers.lane_of[&A], namers.lane_of[&D]), (0, 0));
        let extra = start_extra_lane(&mut namers);
        namers.place(B, extra);
        namers.send(extra, Job::Watch { pid: B });
        assert_eq!(namers.lanes_running(), 2);

        namers.watch(C);
        assert_eq!(namers.lane_of[&C], extra, "the least busy lane");
        namers.gone(C);

        // A request sent before the last process of the extra lane is gone still gets its reply.
        let Request::Sent(ticket) = namers.request(B, B, 1, 60_000_000, false) else {
            panic!("the request was not sent");
        };
        namers.gone(B);
        let idle = Instant::now();
        // Not at once: it may be needed again soon.
        namers.end_idle_lanes(idle + IDLE_LANE_ENDS / 2);
        assert_eq!(namers.lanes_running(), 2);
        namers.end_idle_lanes(idle + IDLE_LANE_ENDS);
        assert!(namers.lanes[extra].is_none(), "the extra lane still runs");
        assert_eq!(namers.lanes_running(), 1);
        let named = std::iter::from_fn(|| replies.blocking_recv())
            .find(|reply| matches!(reply, Reply::Named { .. }));
        assert!(
            matches!(named, Some(Reply::Named { ticket: t, .. }) if t == ticket),
            "{named:?}"
        );

        // The first lane stays, even with no process.
        for pid in [A, D] {
            namers.gone(pid);
        }
        namers.end_idle_lanes(Instant::now() + IDLE_LANE_ENDS * 2);
        assert_eq!(namers.lanes_running(), 1);
    }
}
