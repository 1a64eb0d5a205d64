//! Naming off the session's thread: a lane is a thread that owns the naming stages of the
//! processes given to it (their [`Naming`], the files they share) and the stacks of their
//! current busy intervals, fed through a bounded queue that the session never waits on.
//!
//! Jobs of a lane run in the order they were sent: every sample sent before a naming request
//! is in the stacks that request names. A lane tells how long its current job has run, so that
//! the session can move the other processes off a lane that one process keeps busy.
//!
//! When a sample is unwound is decided here ([`keep`]): most busy intervals end short of the
//! threshold, and their samples are dropped unread. A sample is kept raw while its interval is
//! young ([`crate::abi::YOUNG_DIVISOR`]), and the interval's samples are unwound (their JS frames read from the heap) once it has run
//! for half the threshold, or holds [`YOUNG_KEPT`] raw samples: while it still runs, so the heap
//! still holds what its frames point at.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread,
    time::{Duration, Instant},
};

use tokio::sync::mpsc::UnboundedSender;

use super::{
    Naming, SharedFiles,
    stacks::{self, BlockProfile, RawStacks, Sample},
    v8::LimitsHit,
};
use crate::{
    abi::{V8Layout, YOUNG_DIVISOR},
    decode::StackSample,
    target::proc::Process,
};

/// Jobs a lane holds before the session's sends fail.
const QUEUE: usize = 1024;

/// Samples a lane holds, in all its queued batches, before the session's sends of samples fail:
/// each carries a stack copy of up to 32 KiB, so this bounds the memory a slow lane holds.
pub const SAMPLES_QUEUED: usize = 1024;

/// Busy intervals of a thread whose stacks are kept: the one a block request names may be a
/// few behind the newest samples (each interval holds a bounded number of distinct stacks).
const INTERVALS_KEPT: usize = 4;

/// Raw samples an interval holds before they are unwound (each carries a stack copy of up to
/// 32 KiB): at the default 200 stacks a second, 80 ms of an interval's CPU time.
const YOUNG_KEPT: usize = 16;

/// Something for a lane to do.
#[derive(Debug)]
pub enum Job {
    /// Set up the naming of a process (reads its unwind tables and symbols: the slow part).
    Watch { pid: u32 },
    /// Drop the naming of a process and the stacks of its threads.
    Gone { pid: u32 },
    /// Re-read a process's memory maps (new libraries, an exec) and look for its V8 again.
    Refresh { pid: u32 },
    /// A loop of the process was found: look for its V8 anew (see [`Naming::loop_found`]).
    LoopFound { pid: u32 },
    /// Samples of the lane's processes, in the order they were taken: each is unwound (or kept
    /// raw) with the stacks of its busy interval. Sent in batches, so that a lane is woken once
    /// per drain of the stack records, not once per record.
    Samples(Vec<StackSample>),
    /// Weight and name the stacks of a busy interval.
    Name(NameJob),
}

impl Job {
    /// The process a job is about.
    pub fn pid(&self) -> u32 {
        match self {
            Self::Watch { pid }
            | Self::Gone { pid }
            | Self::Refresh { pid }
            | Self::LoopFound { pid } => *pid,
            Self::Samples(batch) => batch.first().map_or(0, |sample| sample.of.pid),
            Self::Name(job) => job.pid,
        }
    }
}

/// A request to name the stacks of thread `tid`'s busy interval that began at `start_ns`.
#[derive(Debug, Clone, Copy)]
pub struct NameJob {
    pub ticket: u64,
    pub pid: u32,
    pub tid: u32,
    pub start_ns: u64,
    pub duration_ns: u64,
    /// The interval goes on (an ongoing block): its stacks are kept for later requests.
    pub keep: bool,
}

/// What a lane sends back.
#[derive(Debug)]
pub enum Reply {
    /// A request's named stacks: `None` when the process has no naming on this lane.
    Named {
        ticket: u64,
        profile: Option<BlockProfile>,
    },
    /// A process's V8 was found: the kernel side can read its frames' objects when sampling.
    V8Layout { pid: u32, layout: V8Layout },
    /// A watch job is done.
    Watched { pid: u32 },
    /// Where the limits on naming a process's JS frames left them unnamed, so far.
    Limits { pid: u32, hit: LimitsHit },
}

/// The session's handle on a lane.
pub struct Lane {
    jobs: SyncSender<Job>,
    /// When the running job started ([`now_ns`]), 0 while idle.
    busy_since_ns: Arc<AtomicU64>,
    /// The process of the running job.
    busy_pid: Arc<AtomicU32>,
    /// Samples in the queued batches (at most [`SAMPLES_QUEUED`]).
    queued_samples: Arc<AtomicUsize>,
}

/// What every lane of a session names by.
#[derive(Debug, Clone, Copy)]
pub struct LaneOptions {
    /// The session's threshold: samples are unwound only for intervals that could reach it.
    pub threshold_ns: u64,
    /// Request paths keep their query strings (`--request-query`).
    pub keep_query: bool,
}

impl Lane {
    /// Starts a lane's thread; it ends once the handle is dropped and its queue is empty.
    pub fn spawn(replies: UnboundedSender<Reply>, options: LaneOptions) -> std::io::Result<Self> {
        let (jobs, queue) = sync_channel(QUEUE);
        let busy_since_ns = Arc::new(AtomicU64::new(0));
        let busy_pid = Arc::new(AtomicU32::new(0));
        let queued_samples = Arc::new(AtomicUsize::new(0));
        let (since, pid, queued) = (
            busy_since_ns.clone(),
            busy_pid.clone(),
            queued_samples.clone(),
        );
        thread::Builder::new()
            .name("loopbpf-naming".to_owned())
            .spawn(move || {
                // Made here: what it holds is shared within this thread only.
                let worker = Worker {
                    replies,
                    busy_since_ns: since,
                    busy_pid: pid,
                    queued_samples: queued,
                    shared: SharedFiles::new(),
                    namings: HashMap::new(),
                    stacks: HashMap::new(),
                    layout_sent: HashMap::new(),
                    limits_sent: HashMap::new(),
                    unwind_at_ns: options.threshold_ns / YOUNG_DIVISOR,
                    keep_query: options.keep_query,
                };
                worker.run(&queue);
            })?;
        Ok(Self {
            jobs,
            busy_since_ns,
            busy_pid,
            queued_samples,
        })
    }

    /// Queues a job without waiting; gives it back when the queue is full, or when a batch of
    /// samples would take the samples queued past [`SAMPLES_QUEUED`].
    pub fn try_send(&self, job: Job) -> Result<(), Job> {
        let samples = match &job {
            Job::Samples(batch) => batch.len(),
            _ => 0,
        };
        if samples > 0
            && self.queued_samples.fetch_add(samples, Ordering::AcqRel) + samples > SAMPLES_QUEUED
        {
            self.queued_samples.fetch_sub(samples, Ordering::AcqRel);
            return Err(job);
        }
        self.jobs.try_send(job).map_err(|e| {
            self.queued_samples.fetch_sub(samples, Ordering::AcqRel);
            match e {
                TrySendError::Full(job) | TrySendError::Disconnected(job) => job,
            }
        })
    }

    /// The process whose job has run for at least `limit`, if any.
    pub fn stuck_on(&self, limit: Duration) -> Option<u32> {
        let since = self.busy_since_ns.load(Ordering::Acquire);
        let now = now_ns();
        (since != 0 && now.saturating_sub(since) >= limit.as_nanos() as u64)
            .then(|| self.busy_pid.load(Ordering::Acquire))
    }
}

/// A lane's thread and everything it owns.
struct Worker {
    replies: UnboundedSender<Reply>,
    busy_since_ns: Arc<AtomicU64>,
    busy_pid: Arc<AtomicU32>,
    queued_samples: Arc<AtomicUsize>,
    shared: SharedFiles,
    namings: HashMap<u32, Naming>,
    stacks: Stacks,
    /// Whether a process's V8 layout was sent back.
    layout_sent: HashMap<u32, bool>,
    /// What the session was last told of each process's naming limits.
    limits_sent: HashMap<u32, LimitsHit>,
    /// How long an interval runs before its samples are unwound.
    unwind_at_ns: u64,
    /// `--request-query`.
    keep_query: bool,
}

impl Worker {
    fn run(mut self, queue: &Receiver<Job>) {
        while let Ok(job) = queue.recv() {
            // A batch's samples are timed one by one (see `keep_samples`).
            if !matches!(job, Job::Samples(_)) {
                self.begin(job.pid());
            }
            self.work(job);
            self.busy_since_ns.store(0, Ordering::Release);
        }
        // The lane ended (see `Namers::end_idle_lanes`): what it read goes back to the system.
        drop(self);
        crate::target::freed_much();
    }

    /// A job (or a sample) of process `pid` starts.
    fn begin(&self, pid: u32) {
        self.busy_pid.store(pid, Ordering::Release);
        self.busy_since_ns.store(now_ns(), Ordering::Release);
        test_delay(pid);
    }

    fn work(&mut self, job: Job) {
        match job {
            Job::Watch { pid } => {
                self.namings
                    .insert(pid, Naming::new(pid, &self.shared, self.keep_query));
                self.send_layout(pid);
                let _ = self.replies.send(Reply::Watched { pid });
            }
            Job::Gone { pid } => {
                if let Some(naming) = self.namings.remove(&pid) {
                    let hit = naming.limits_hit();
                    let _ = self.replies.send(Reply::Limits { pid, hit });
                }
                self.layout_sent.remove(&pid);
                self.limits_sent.remove(&pid);
                self.stacks.retain(|_, (of, _)| *of != pid);
                self.shared.prune();
                crate::target::freed_much();
            }
            Job::Refresh { pid } | Job::LoopFound { pid } => {
                if let Some(naming) = self.namings.get_mut(&pid) {
                    if matches!(job, Job::LoopFound { .. }) {
                        naming.loop_found();
                    } else {
                        naming.refresh();
                    }
                    let hit = naming.limits_hit();
                    // Only news: a reply wakes the session.
                    if self.limits_sent.insert(pid, hit) != Some(hit) {
                        let _ = self.replies.send(Reply::Limits { pid, hit });
                    }
                    self.send_layout(pid);
                }
                crate::target::give_back_freed_memory(false);
            }
            Job::Samples(batch) => self.keep_samples(batch),
            Job::Name(job) => {
                let profile = self.name(job);
                let _ = self.replies.send(Reply::Named {
                    ticket: job.ticket,
                    profile,
                });
            }
        }
    }

    /// Keeps a batch's samples, each timed as if it were a job of its own process: one slow
    /// process is told apart from the others of its batch.
    fn keep_samples(&mut self, batch: Vec<StackSample>) {
        for raw in batch {
            self.begin(raw.of.pid);
            let namings = &mut self.namings;
            keep(&mut self.stacks, raw, self.unwind_at_ns, |raw| {
                unwind(namings, raw)
            });
            self.queued_samples.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn name(&mut self, job: NameJob) -> Option<BlockProfile> {
        let namings = &mut self.namings;
        let raw = interval_stacks(&mut self.stacks, &job, |raw| unwind(namings, raw));
        let naming = self.namings.get_mut(&job.pid)?;
        // New mappings (a library loaded, a launched command's exec) since the last refresh.
        naming.refresh_maps();
        // A worker's heap goes with its thread: read after that, memory another isolate reuses
        // could give a frame a wrong name. Its JS frames stay unnamed ([JS]) instead.
        let heap_alive = job.tid == job.pid || Process::new(job.pid).has_task(job.tid);
        Some(stacks::profile(
            &raw,
            job.duration_ns,
            &mut naming.symbolizer,
            naming.js.as_ref().filter(|_| heap_alive),
        ))
    }

    /// Sends a process's V8 layout back once its V8 is known.
    fn send_layout(&mut self, pid: u32) {
        let Some(js) = self.namings.get(&pid).and_then(|n| n.js.as_ref()) else {
            return;
        };
        let sent = self.layout_sent.entry(pid).or_insert(false);
        if !*sent {
            *sent = true;
            let _ = self.replies.send(Reply::V8Layout {
                pid,
                layout: js.kernel_layout(),
            });
        }
    }
}

/// A sample unwound by its process's naming, or by the kernel's frame-pointer walk alone when
/// the process has none on this lane.
fn unwind(namings: &mut HashMap<u32, Naming>, raw: StackSample) -> Sample {
    match namings.get_mut(&raw.of.pid) {
        Some(naming) => naming.unwind(&raw),
        None => Sample::unwound_by_kernel(raw),
    }
}

/// A busy interval's stacks: raw while it is young, unwound once it could become a block.
#[derive(Debug, Default)]
struct Interval {
    /// Samples not unwound yet, oldest first.
    young: Vec<StackSample>,
    /// Unwound: every sample from now on is unwound as it comes.
    grown: bool,
    stacks: RawStacks,
}

impl Interval {
    /// Unwinds the samples held raw; from now on samples are unwound as they come.
    fn grow(&mut self, unwind: &mut impl FnMut(StackSample) -> Sample) {
        self.grown = true;
        for raw in self.young.drain(..) {
            self.stacks.add(unwind(raw));
        }
    }
}

/// Per thread: its process, and its last few busy intervals by their start, newest last.
type Stacks = HashMap<u32, (u32, VecDeque<(u64, Interval)>)>;

/// Keeps a sample with its busy interval: raw while the interval is younger than
/// `unwind_at_ns` and holds fewer than [`YOUNG_KEPT`] raw samples, unwound (with those before
/// it) once it is not. The last few intervals are kept, not only the current one: the stack
/// records are drained before the control events, so samples taken after a block ended (the
/// next intervals') may come in before the request to name the block's.
fn keep(
    stacks: &mut Stacks,
    raw: StackSample,
    unwind_at_ns: u64,
    mut unwind: impl FnMut(StackSample) -> Sample,
) {
    let of = raw.of;
    let (pid, intervals) = stacks
        .entry(of.tid)
        .or_insert_with(|| (of.pid, VecDeque::new()));
    if *pid != of.pid {
        // The tid was reused by another process.
        *pid = of.pid;
        intervals.clear();
    }
    if intervals
        .back()
        .is_none_or(|(since, _)| *since != of.busy_since_ns)
    {
        if intervals.len() == INTERVALS_KEPT {
            intervals.pop_front();
        }
        intervals.push_back((of.busy_since_ns, Interval::default()));
    }
    let Some((_, interval)) = intervals.back_mut() else {
        return;
    };
    // An off-CPU sample is reported as its sleep ends.
    let age_ns = (of.at_ns + of.off_cpu_ns.unwrap_or(0)).saturating_sub(of.busy_since_ns);
    if interval.grown {
        interval.stacks.add(unwind(raw));
        return;
    }
    interval.young.push(raw);
    if age_ns >= unwind_at_ns || interval.young.len() >= YOUNG_KEPT {
        interval.grow(&mut unwind);
    }
}

/// The stacks of the busy interval `job` names (any still raw unwound now): taken, or copied
/// when it goes on.
fn interval_stacks(
    stacks: &mut Stacks,
    job: &NameJob,
    mut unwind: impl FnMut(StackSample) -> Sample,
) -> RawStacks {
    let interval = stacks
        .get_mut(&job.tid)
        .filter(|(pid, _)| *pid == job.pid)
        .and_then(|(_, intervals)| {
            intervals
                .iter_mut()
                .find(|(since, _)| *since == job.start_ns)
        });
    let Some((_, interval)) = interval else {
        return RawStacks::default();
    };
    interval.grow(&mut unwind);
    if job.keep {
        interval.stacks.clone()
    } else {
        std::mem::take(&mut interval.stacks)
    }
}

/// Nanoseconds since the first call, never 0.
fn now_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// Test only: `LOOPBPF_TEST_NAMING_DELAY=PID:MS` has every job of that process take that much
/// longer, to show that one slow process does not hold up the others. Read in debug builds
/// and with the `test-hooks` feature only.
fn test_delay(pid: u32) {
    #[cfg(any(debug_assertions, feature = "test-hooks"))]
    {
        use std::sync::OnceLock;
        static DELAY: OnceLock<Option<(u32, Duration)>> = OnceLock::new();
        let delay = DELAY.get_or_init(|| {
            let value = std::env::var("LOOPBPF_TEST_NAMING_DELAY").ok()?;
            let (of, ms) = value.split_once(':')?;
            let (of, ms) = (of.parse().ok()?, ms.parse().ok()?);
            status!("test hook: every naming job of pid {of} takes {ms} ms longer");
            Some((of, Duration::from_millis(ms)))
        });
        if let Some((of, delay)) = *delay
            && of == pid
        {
            thread::sleep(delay);
        }
    }
    let _ = pid;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::SampleOf;

    /// Half a 100 ms threshold.
    const UNWIND_AT: u64 = 50;

    /// A raw sample taken `age` ns into the interval that began at `busy_since_ns`.
    fn raw(busy_since_ns: u64, age: u64, leaf: u64) -> StackSample {
        StackSample {
            of: SampleOf {
                pid: 7,
                tid: 8,
                busy_since_ns,
                at_ns: busy_since_ns + age,
                off_cpu_ns: None,
                periods: 1,
            },
            user: vec![leaf],
            kernel: Vec::new(),
            regs: [0; 3],
            stack: Vec::new(),
            captured: Vec::new(),
        }
    }

    #[test]
    fn a_lane_holds_a_bounded_number_of_samples() {
        let (replies, _receiver) = tokio::sync::mpsc::unbounded_channel();
        let options = LaneOptions {
            threshold_ns: 100,
            keep_query: false,
        };
        let lane = Lane::spawn(replies, options).expect("a lane");
        let too_many = (0..=SAMPLES_QUEUED as u64).map(|i| raw(1, i, i)).collect();
        let Err(Job::Samples(back)) = lane.try_send(Job::Samples(too_many)) else {
            panic!("a batch over the bound was taken");
        };
        assert_eq!(
            back.len(),
            SAMPLES_QUEUED + 1,
            "the batch is given back whole"
        );
        // The refused batch is not counted as queued: a batch within the bound goes through,
        // and once its samples are kept the room is there again.
        for _ in 0..3 {
            let batch = (0..SAMPLES_QUEUED as u64 / 2)
                .map(|i| raw(1, i, i))
                .collect();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut job = Job::Samples(batch);
            while let Err(back) = lane.try_send(job) {
                assert!(Instant::now() < deadline, "the lane never made room");
                thread::sleep(Duration::from_millis(1));
                job = back;
            }
        }
    }

    /// Keeps a sample, counting the unwinds.
    fn keep_counted(stacks: &mut Stacks, sample: StackSample, unwound: &mut u32) {
        keep(stacks, sample, UNWIND_AT, |raw| {
            *unwound += 1;
            Sample::unwound_by_kernel(raw)
        });
    }

    fn name(stacks: &mut Stacks, start_ns: u64, keep: bool) -> RawStacks {
        let job = NameJob {
            ticket: 1,
            pid: 7,
            tid: 8,
            start_ns,
            duration_ns: 100,
            keep,
        };
        interval_stacks(stacks, &job, Sample::unwound_by_kernel)
    }

    /// Regression: the stack records are drained before the control events, so samples of the
    /// intervals after a block came in before the request for the block's, and replaced them
    /// (a block reported with `"stacks":[]`).
    #[test]
    fn a_blocks_stacks_outlive_the_samples_of_the_next_intervals() {
        let mut stacks = Stacks::new();
        let mut unwound = 0;
        keep_counted(&mut stacks, raw(100, 1, 1), &mut unwound);
        keep_counted(&mut stacks, raw(100, 60, 1), &mut unwound);
        keep_counted(&mut stacks, raw(200, 1, 2), &mut unwound);
        keep_counted(&mut stacks, raw(300, 1, 3), &mut unwound);
        let ongoing = name(&mut stacks, 100, true);
        assert_eq!(ongoing.on_cpu_samples, 2);
        let block = name(&mut stacks, 100, false);
        assert_eq!(block.on_cpu_samples, 2);
        // Taken once.
        assert_eq!(name(&mut stacks, 100, false).on_cpu_samples, 0);
        assert_eq!(name(&mut stacks, 300, false).on_cpu_samples, 1);
    }

    #[test]
    fn only_the_last_intervals_are_kept() {
        let mut stacks = Stacks::new();
        let mut unwound = 0;
        for since in 1..=10 {
            keep_counted(&mut stacks, raw(since * 1000, 1, since), &mut unwound);
        }
        assert_eq!(stacks[&8].1.len(), INTERVALS_KEPT);
        assert_eq!(name(&mut stacks, 1000, false).on_cpu_samples, 0);
        assert_eq!(name(&mut stacks, 10_000, false).on_cpu_samples, 1);
    }

    /// The point of holding samples raw: intervals that end young are never unwound.
    #[test]
    fn samples_of_young_intervals_are_not_unwound() {
        let mut stacks = Stacks::new();
        let mut unwound = 0;
        for since in 1..=100 {
            keep_counted(&mut stacks, raw(since * 1000, 10, 1), &mut unwound);
            keep_counted(&mut stacks, raw(since * 1000, 40, 2), &mut unwound);
        }
        assert_eq!(unwound, 0);
    }

    /// Once an interval has run for half the threshold, its samples so far are unwound, the
    /// first one included, and every later one as it comes (while the interval still runs).
    #[test]
    fn an_interval_past_half_the_threshold_is_unwound_from_its_first_sample() {
        let mut stacks = Stacks::new();
        let mut unwound = 0;
        keep_counted(&mut stacks, raw(1000, 1, 1), &mut unwound);
        keep_counted(&mut stacks, raw(1000, 20, 2), &mut unwound);
        assert_eq!(unwound, 0);
        keep_counted(&mut stacks, raw(1000, UNWIND_AT, 3), &mut unwound);
        assert_eq!(unwound, 3);
        keep_counted(&mut stacks, raw(1000, 70, 4), &mut unwound);
        assert_eq!(unwound, 4);
        let block = name(&mut stacks, 1000, false);
        assert_eq!(block.on_cpu_samples, 4);
        assert_eq!(block.stacks.len(), 4, "the first sample's stack is there");
    }

    /// Raw samples are bounded: a thread sampled often within half a long threshold has them
    /// unwound once it holds a few.
    #[test]
    fn raw_samples_held_are_bounded() {
        let mut stacks = Stacks::new();
        let mut unwound = 0;
        for i in 0..YOUNG_KEPT as u64 - 1 {
            keep_counted(&mut stacks, raw(1000, i, i), &mut unwound);
        }
        assert_eq!(unwound, 0);
        keep_counted(&mut stacks, raw(1000, 30, 99), &mut unwound);
        assert_eq!(unwound, YOUNG_KEPT as u32);
    }

    /// A block whose samples all came in its first half (the rest of it asleep without a
    /// stack, or its stacks limited) still has them: unwound when it is named.
    #[test]
    fn a_block_named_young_has_its_samples() {
        let mut stacks = Stacks::new();
        let mut unwound = 0;
        keep_counted(&mut stacks, raw(1000, 5, 1), &mut unwound);
        assert_eq!(unwound, 0);
        assert_eq!(name(&mut stacks, 1000, false).on_cpu_samples, 1);
    }
}
