//! Naming off the session's thread: a lane is a thread that owns the naming stages of the
//! processes given to it (their [`Naming`], the files they share) and the stacks of their
//! current busy intervals, fed through a bounded queue that the session never waits on.
//!
//! Jobs of a lane run in the order they were sent: every sample sent before a naming request
//! is in the stacks that request names. A lane tells how long its current job has run, so that
//! the session can move the other processes off a lane that one process keeps busy.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
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
use crate::{abi::V8Layout, decode::StackSample, target::proc::Process};

/// Jobs a lane holds before the session's sends fail: samples carry a stack copy each, so this
/// bounds the memory a slow lane holds.
const QUEUE: usize = 1024;

/// Busy intervals of a thread whose stacks are kept: the one a block request names may be a
/// few behind the newest samples (each interval holds a bounded number of distinct stacks).
const INTERVALS_KEPT: usize = 4;

/// Something for a lane to do.
#[derive(Debug)]
pub enum Job {
    /// Set up the naming of a process (reads its unwind tables and symbols: the slow part).
    Watch { pid: u32 },
    /// Drop the naming of a process and the stacks of its threads.
    Gone { pid: u32 },
    /// Re-read a process's memory maps (new libraries, an exec) and look for its V8 again.
    Refresh { pid: u32 },
    /// Unwind a sample and keep it with the stacks of its busy interval.
    Sample(Box<StackSample>),
    /// Weight and name the stacks of a busy interval.
    Name(NameJob),
}

impl Job {
    /// The process a job is about.
    pub fn pid(&self) -> u32 {
        match self {
            Self::Watch { pid } | Self::Gone { pid } | Self::Refresh { pid } => *pid,
            Self::Sample(sample) => sample.of.pid,
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
}

impl Lane {
    /// Starts a lane's thread; it ends once the handle is dropped and its queue is empty.
    pub fn spawn(replies: UnboundedSender<Reply>) -> std::io::Result<Self> {
        let (jobs, queue) = sync_channel(QUEUE);
        let busy_since_ns = Arc::new(AtomicU64::new(0));
        let busy_pid = Arc::new(AtomicU32::new(0));
        let (since, pid) = (busy_since_ns.clone(), busy_pid.clone());
        thread::Builder::new()
            .name("loopbpf-naming".to_owned())
            .spawn(move || {
                // Made here: what it holds is shared within this thread only.
                let worker = Worker {
                    replies,
                    busy_since_ns: since,
                    busy_pid: pid,
                    shared: SharedFiles::new(),
                    namings: HashMap::new(),
                    stacks: HashMap::new(),
                    layout_sent: HashMap::new(),
                };
                worker.run(&queue);
            })?;
        Ok(Self {
            jobs,
            busy_since_ns,
            busy_pid,
        })
    }

    /// Queues a job without waiting; gives it back when the queue is full.
    pub fn try_send(&self, job: Job) -> Result<(), Job> {
        self.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(job) | TrySendError::Disconnected(job) => job,
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
    shared: SharedFiles,
    namings: HashMap<u32, Naming>,
    stacks: Stacks,
    /// Whether a process's V8 layout was sent back.
    layout_sent: HashMap<u32, bool>,
}

impl Worker {
    fn run(mut self, queue: &Receiver<Job>) {
        while let Ok(job) = queue.recv() {
            self.busy_pid.store(job.pid(), Ordering::Release);
            self.busy_since_ns.store(now_ns(), Ordering::Release);
            test_delay(job.pid());
            self.work(job);
            self.busy_since_ns.store(0, Ordering::Release);
        }
    }

    fn work(&mut self, job: Job) {
        match job {
            Job::Watch { pid } => {
                self.namings.insert(pid, Naming::new(pid, &self.shared));
                self.send_layout(pid);
                let _ = self.replies.send(Reply::Watched { pid });
            }
            Job::Gone { pid } => {
                if let Some(naming) = self.namings.remove(&pid) {
                    let hit = naming.limits_hit();
                    let _ = self.replies.send(Reply::Limits { pid, hit });
                }
                self.layout_sent.remove(&pid);
                self.stacks.retain(|_, (of, _)| *of != pid);
                self.shared.prune();
            }
            Job::Refresh { pid } => {
                if let Some(naming) = self.namings.get_mut(&pid) {
                    naming.refresh();
                    let hit = naming.limits_hit();
                    let _ = self.replies.send(Reply::Limits { pid, hit });
                    self.send_layout(pid);
                }
            }
            Job::Sample(raw) => {
                let sample = match self.namings.get_mut(&raw.of.pid) {
                    Some(naming) => naming.unwind(&raw),
                    None => Sample::unwound_by_kernel(*raw),
                };
                keep(&mut self.stacks, sample);
            }
            Job::Name(job) => {
                let profile = self.name(job);
                let _ = self.replies.send(Reply::Named {
                    ticket: job.ticket,
                    profile,
                });
            }
        }
    }

    fn name(&mut self, job: NameJob) -> Option<BlockProfile> {
        let raw = interval_stacks(&mut self.stacks, &job);
        let naming = self.namings.get_mut(&job.pid)?;
        // New mappings (a library loaded, a launched command's exec) since the last refresh.
        naming.symbolizer.refresh();
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

/// Per thread: its process, and the stacks of its last few busy intervals by their start,
/// newest last.
type Stacks = HashMap<u32, (u32, VecDeque<(u64, RawStacks)>)>;

/// Keeps a sample with the stacks of its busy interval. The last few intervals are kept,
/// not only the current one: the stack records are drained before the control events, so
/// samples taken after a block ended (the next intervals') may come in before the request
/// to name the block's.
fn keep(stacks: &mut Stacks, sample: Sample) {
    let of = sample.of;
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
        intervals.push_back((of.busy_since_ns, RawStacks::default()));
    }
    if let Some((_, raw)) = intervals.back_mut() {
        raw.add(sample);
    }
}

/// The stacks of the busy interval `job` names: taken, or copied when it goes on.
fn interval_stacks(stacks: &mut Stacks, job: &NameJob) -> RawStacks {
    let interval = stacks
        .get_mut(&job.tid)
        .filter(|(pid, _)| *pid == job.pid)
        .and_then(|(_, intervals)| {
            intervals
                .iter_mut()
                .find(|(since, _)| *since == job.start_ns)
        });
    match interval {
        Some((_, raw)) if job.keep => raw.clone(),
        Some((_, raw)) => std::mem::take(raw),
        None => RawStacks::default(),
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

    fn sample(busy_since_ns: u64, leaf: u64) -> Sample {
        Sample {
            of: SampleOf {
                pid: 7,
                tid: 8,
                busy_since_ns,
                at_ns: busy_since_ns + 1,
                off_cpu_ns: None,
            },
            user: vec![leaf],
            kernel: Vec::new(),
            js: Vec::new(),
            request: None,
        }
    }

    fn request(start_ns: u64, keep: bool) -> NameJob {
        NameJob {
            ticket: 1,
            pid: 7,
            tid: 8,
            start_ns,
            duration_ns: 100,
            keep,
        }
    }

    /// Regression: the stack records are drained before the control events, so samples of the
    /// intervals after a block came in before the request for the block's, and replaced them
    /// (a block reported with `"stacks":[]`).
    #[test]
    fn a_blocks_stacks_outlive_the_samples_of_the_next_intervals() {
        let mut stacks = Stacks::new();
        keep(&mut stacks, sample(100, 1));
        keep(&mut stacks, sample(100, 1));
        keep(&mut stacks, sample(200, 2));
        keep(&mut stacks, sample(300, 3));
        let ongoing = interval_stacks(&mut stacks, &request(100, true));
        assert_eq!(ongoing.on_cpu_samples, 2);
        let block = interval_stacks(&mut stacks, &request(100, false));
        assert_eq!(block.on_cpu_samples, 2);
        // Taken once.
        assert_eq!(
            interval_stacks(&mut stacks, &request(100, false)).on_cpu_samples,
            0
        );
        assert_eq!(
            interval_stacks(&mut stacks, &request(300, false)).on_cpu_samples,
            1
        );
    }

    #[test]
    fn only_the_last_intervals_are_kept() {
        let mut stacks = Stacks::new();
        for since in 1..=10 {
            keep(&mut stacks, sample(since, since));
        }
        assert_eq!(stacks[&8].1.len(), INTERVALS_KEPT);
        assert_eq!(
            interval_stacks(&mut stacks, &request(1, false)).on_cpu_samples,
            0
        );
        assert_eq!(
            interval_stacks(&mut stacks, &request(10, false)).on_cpu_samples,
            1
        );
    }
}
