//! The session's side of naming: which naming lane (see [`crate::naming::worker`]) names which
//! process, and the records that wait, in order, for their stacks to come back.
//!
//! The session never waits on naming: jobs are queued without blocking (samples go in batches,
//! one per drain of the stack records; a batch that finds its lane full is dropped and its
//! samples counted), and a record waits for its stacks only so long
//! ([`BLOCK_LIMIT`], [`ONGOING_LIMIT`]); then it is reported without them, said so and counted.
//! Processes share a lane (and the files it has read), but a process whose job has run for
//! [`STUCK`] has the lane to itself: the others move to another lane.

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
        worker::{Job, Lane, NameJob},
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

struct LaneSlot {
    lane: Lane,
    pids: BTreeSet<u32>,
    /// Watch and gone jobs that found the queue full, sent first once there is room: they are
    /// never dropped (a few per process: its watch, a look when each of its loops is found,
    /// its end).
    backlog: VecDeque<Job>,
    /// Samples not sent yet, in the order taken.
    batch: Vec<StackSample>,
}

/// The naming lanes and who is named where.
pub(super) struct Namers {
    lanes: Vec<LaneSlot>,
    lane_of: HashMap<u32, usize>,
    replies: UnboundedSender<crate::naming::worker::Reply>,
    /// The session's threshold: lanes unwind only samples of intervals that could reach it.
    threshold_ns: u64,
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
        threshold_ns: u64,
    ) -> (Self, UnboundedReceiver<crate::naming::worker::Reply>) {
        let (replies, receiver) = unbounded_channel();
        let namers = Self {
            lanes: Vec::new(),
            lane_of: HashMap::new(),
            replies,
            threshold_ns,
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
        self.lane_of.insert(pid, lane);
        self.lanes[lane].pids.insert(pid);
        self.send(lane, Job::Watch { pid });
    }

    pub(super) fn gone(&mut self, pid: u32) {
        if let Some(lane) = self.lane_of.remove(&pid) {
            self.lanes[lane].pids.remove(&pid);
            self.send(lane, Job::Gone { pid });
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
            let Some(slow) = self.lanes[stuck].lane.stuck_on(STUCK) else {
                continue;
            };
            let others: Vec<u32> = self.lanes[stuck]
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
                self.lanes[stuck].pids.remove(&pid);
                self.send(stuck, Job::Gone { pid });
                self.lane_of.insert(pid, to);
                self.lanes[to].pids.insert(pid);
                self.send(to, Job::Watch { pid });
            }
        }
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
        let batch = &mut self.lanes[lane].batch;
        batch.push(sample);
        if batch.len() >= BATCH {
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
        let batch = std::mem::take(&mut self.lanes[lane].batch);
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
        let usable =
            |i: usize, slot: &LaneSlot| Some(i) != except && slot.lane.stuck_on(STUCK).is_none();
        let least = self
            .lanes
            .iter()
            .enumerate()
            .filter(|(i, slot)| usable(*i, slot))
            .min_by_key(|(_, slot)| slot.pids.len())
            .map(|(i, slot)| (i, slot.pids.len()));
        let grow = match least {
            // Every lane is stuck (or there is none yet).
            None => self.lanes.len() < MAX_LANES,
            Some((_, processes)) => processes > 0 && self.lanes.len() < LANES,
        };
        if grow {
            match Lane::spawn(self.replies.clone(), self.threshold_ns) {
                Ok(lane) => {
                    self.lanes.push(LaneSlot {
                        lane,
                        pids: BTreeSet::new(),
                        backlog: VecDeque::new(),
                        batch: Vec::new(),
                    });
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
        let slot = &mut self.lanes[lane];
        while let Some(first) = slot.backlog.pop_front() {
            if let Err(first) = slot.lane.try_send(first) {
                slot.backlog.push_front(first);
                break;
            }
        }
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
