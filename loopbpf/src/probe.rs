//! Probe attach: loads the embedded eBPF object, sets its configuration, attaches its programs
//! and owns them. Dropping [`Probes`] detaches everything; so does the process dying, because
//! every attachment is a file descriptor (perf-event links, never tracefs text entries).

use std::{
    num::NonZeroU32,
    time::{Duration, Instant},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf},
    programs::{
        PerfEvent, UProbe,
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
        uprobe::{UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use thiserror::Error;

mod loop_tids;

use self::loop_tids::LoopTids;
use crate::{
    abi::{
        BUSY_BEFORE_ATTACH, FULL_ASLEEP, FULL_THREADS, LOST_CONTROL, LOST_STACK, LibuvInfo,
        MAX_ASLEEP, MAX_LIBUVS, MAX_THREADS, MAX_V8_LAYOUTS, ROLE_MAIN, ROLE_UNKNOWN,
        RawStackEvent, SAMPLE_PERIOD_NS, STACK_RING_BYTES_PER_CPU, STACK_RING_MAX_BYTES,
        STACK_RING_MIN_BYTES, STACKS_LIMITED, StackBudget, ThreadState, V8Layout,
    },
    discover::{IdleThread, Libuv, POLL_SYMBOL},
};

mod batch;
mod tracepoints;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loopbpf.bpf.o"));

/// How long the `uv__io_poll` probe, which traps on every iteration, stays after attaching
/// to an object whose libuv counts its iterations: loops already running are found there.
/// Loops that start later are found by the `uv_run` probe.
pub const DISCOVERY: Duration = Duration::from_secs(2);
/// The longest it stays while a loop thread seen asleep at attach is still unnamed.
pub const DISCOVERY_MAX: Duration = Duration::from_secs(30);

/// Each process may send this many times `--sample-rate` stack records a second: a loop thread
/// busy all the time sends about `--sample-rate` of them (on-CPU samples of its CPU time and
/// off-CPU stacks of its sleeps together), so two loops of one process blocked at once are
/// never limited; a process with more busy loops, or one flooding, is held to that.
pub const STACK_RATE_PER_SAMPLE_RATE: u64 = 2;
/// The most stack records one process may send ahead of its rate: at most this share of the
/// stack ring buffer, and at most a quarter second of its rate.
const STACK_BURST_RING_SHARE: u64 = 4;
const STACK_BURST_MAX: Duration = Duration::from_millis(250);

/// What the kernel side (and the loading of its maps) could not do, counted: events dropped,
/// stacks held back by the per-process limit, map entries not made because a map was full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Losses {
    /// Control events (loops found, blocks, exits, execs, GC pauses) dropped: ring buffer full.
    pub control: u64,
    /// Stack records dropped: their ring buffer was full.
    pub stacks: u64,
    /// Stack records not taken: their process was over its stack rate.
    pub rate_limited: u64,
    /// Entries not made because the map was full, by map (see [`Losses::MAPS`]).
    pub map_full: [u64; 4],
}

impl Losses {
    /// The maps whose fullness is counted, in `map_full`'s order, with their size.
    pub const MAPS: [(&str, u32); 4] = [
        ("threads", MAX_THREADS),
        ("asleep", MAX_ASLEEP),
        ("libuvs", MAX_LIBUVS),
        ("v8_layouts", MAX_V8_LAYOUTS),
    ];

    /// Events the ring buffers could not take, of both kinds.
    pub fn events(&self) -> u64 {
        self.control + self.stacks
    }
}

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "could not load the eBPF programs: {0} (loopbpf needs BPF ring buffers and uprobe attach cookies, Linux 5.15 or newer)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the kernel rejected eBPF program `{name}`: {error}")]
    Program {
        name: &'static str,
        error: aya::programs::ProgramError,
    },
    #[error("could not attach to `{symbol}` in {path}: {error}")]
    Uprobe {
        symbol: &'static str,
        path: String,
        error: aya::programs::ProgramError,
    },
    #[error("could not attach to tracepoint {category}/{name}: {error}")]
    Tracepoint {
        category: &'static str,
        name: &'static str,
        error: aya::programs::ProgramError,
    },
    #[error("more than {MAX_LIBUVS} distinct libuv programs to probe: the rest are not watched")]
    TooManyLibuvs,
    #[error("eBPF map or program `{0}` is missing or of the wrong type")]
    Map(&'static str),
    #[error("could not map eBPF map `{name}` into memory: {error}")]
    Mmap {
        name: &'static str,
        error: std::io::Error,
    },
    #[error("reading eBPF map `{name}`: {error}")]
    MapAccess {
        name: &'static str,
        error: aya::maps::MapError,
    },
}

/// The loaded and attached kernel side.
pub struct Probes {
    ebpf: Ebpf,
    /// The stack ring's size, as made at load.
    stack_ring_bytes: u32,
    /// The kernel's types, for the BTF tracepoint; dropped once it is attached.
    btf: Option<Btf>,
    threads: HashMap<MapData, u32, ThreadState>,
    /// Which tids `threads` may hold: set before an entry is made, cleared before it goes.
    loop_tids: LoopTids,
    window: Array<MapData, u64>,
    libuvs: Array<MapData, LibuvInfo>,
    /// Entries of `libuvs` ever used; the next new uprobe cookie unless one was released.
    libuvs_used: u32,
    /// Entries of `libuvs` released by [`Probes::release_libuv`], to be used again.
    libuvs_free: Vec<u32>,
    /// The uprobes on each `libuvs` entry's object (but `discovering`'s), by program.
    object_links: std::collections::HashMap<u32, Vec<(&'static str, UProbeLinkId)>>,
    v8_layouts: HashMap<MapData, u32, V8Layout>,
    /// The kernel side's counters (`enum loopbpf_counter`), per CPU.
    counters: PerCpuArray<MapData, u64>,
    /// Each process's stack rate: how many of its records the limit dropped.
    stack_budgets: HashMap<MapData, u32, StackBudget>,
    /// Stack records the limit dropped, by process, as last read (an evicted budget starts
    /// again from 0: the deltas are added up).
    stacks_limited: std::collections::BTreeMap<u32, (u64, u64)>,
    /// Inserts userspace made that failed on a full map: `threads` (seeds), `libuvs`,
    /// `v8_layouts`, in [`Losses::MAPS`]'s order.
    user_map_full: [u64; 4],
    /// Per loop thread cpu-clock sampling, by tid, with the thread's process.
    samplers: std::collections::HashMap<u32, (u32, PerfEventLinkId)>,
    /// `uv__io_poll` probes still finding running loops, by `libuvs` entry, with their start
    /// and the object's path as shown.
    discovering: std::collections::HashMap<u32, (UProbeLinkId, Instant, String)>,
}

impl Probes {
    /// Loads the programs, configured for one target process (`None`: every process that
    /// runs a probed libuv, fleet mode), a block threshold, and stacks per second of a busy
    /// loop thread's CPU time (`None`: no stacks).
    pub fn load(
        target_pid: Option<u32>,
        threshold: Duration,
        stacks_hz: Option<u64>,
    ) -> Result<Self, ProbeError> {
        raise_memlock_limit();
        let threshold_ns = u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX);
        let target_tgid = target_pid.unwrap_or(0);
        // The sampler runs every SAMPLE_PERIOD_NS of CPU time; every n-th sample has stacks.
        let samples_per_s = 1_000_000_000 / SAMPLE_PERIOD_NS;
        let stack_every: u32 = stacks_hz.map_or(0, |hz| {
            (samples_per_s as f64 / hz.clamp(1, samples_per_s) as f64).round() as u32
        });
        let ring_bytes = stack_ring_bytes(aya::util::online_cpus().map_or(1, |cpus| cpus.len()));
        let (stack_interval_ns, stack_burst_ns) = stack_limit(stack_every, ring_bytes);
        let btf = Btf::from_sys_fs().ok();
        let mut ebpf = EbpfLoader::new()
            .btf(btf.as_ref())
            .map_max_entries("stacks", ring_bytes)
            .override_global("target_tgid", &target_tgid, true)
            .override_global("threshold_ns", &threshold_ns, true)
            .override_global("stack_every", &stack_every, true)
            .override_global("stack_interval_ns", &stack_interval_ns, true)
            .override_global("stack_burst_ns", &stack_burst_ns, true)
            .override_global("stack_ring_bytes", &u64::from(ring_bytes), true)
            .load(OBJECT)
            .map_err(ProbeError::Load)?;
        let threads = take_map(&mut ebpf, "threads")?;
        let Some(Map::Array(loop_tids)) = ebpf.take_map("loop_tids") else {
            return Err(ProbeError::Map("loop_tids"));
        };
        let loop_tids = LoopTids::new(loop_tids).map_err(|error| ProbeError::Mmap {
            name: "loop_tids",
            error,
        })?;
        let window = take_map(&mut ebpf, "window")?;
        let libuvs = take_map(&mut ebpf, "libuvs")?;
        let v8_layouts = take_map(&mut ebpf, "v8_layouts")?;
        let counters = take_map(&mut ebpf, "counters")?;
        let stack_budgets = take_map(&mut ebpf, "stack_budgets")?;
        Ok(Self {
            ebpf,
            stack_ring_bytes: ring_bytes,
            btf,
            threads,
            loop_tids,
            window,
            libuvs,
            libuvs_used: 0,
            libuvs_free: Vec::new(),
            object_links: std::collections::HashMap::new(),
            v8_layouts,
            counters,
            stack_budgets,
            stacks_limited: std::collections::BTreeMap::new(),
            user_map_full: [0; 4],
            samplers: std::collections::HashMap::new(),
            discovering: std::collections::HashMap::new(),
        })
    }

    /// The ring buffer of control events (loops found, blocks, exits, execs, GC pauses); call
    /// once.
    pub fn control_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        take_map(&mut self.ebpf, "events")
    }

    /// The ring buffer of stack records; call once.
    pub fn stack_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        take_map(&mut self.ebpf, "stacks")
    }

    /// Marks a thread that sits in epoll fd `epfd` as a loop thread to be named by its next
    /// `uv__io_poll`, or named now by `known`; call before attaching, for loops idle at attach
    /// time. A main thread in its poll wait is the main loop from the start.
    pub fn seed_idle_thread(
        &mut self,
        pid: u32,
        idle: &IdleThread,
        known: Option<&KnownLoop>,
        now_ns: u64,
    ) -> Result<(), ProbeError> {
        // Idle since some time before now: its idle time counts from the attach.
        let state = ThreadState {
            pid,
            epfd: idle.epfd,
            in_poll: 1,
            poll_enter_ns: now_ns,
            discovered_ns: now_ns,
            role: if idle.tid == pid {
                ROLE_MAIN
            } else {
                ROLE_UNKNOWN
            },
            ..ThreadState::default()
        };
        let state = known.map_or(state, |known| known.apply(&state, now_ns));
        self.seed(idle.tid, &state)
    }

    /// Marks the main thread, not in its loop's poll wait as we attach, as busy since `now_ns`:
    /// a block already under way (a hung loop, a long `execSync`) is reported with its time
    /// since the attach as a lower bound. `epfd` is its loop's epoll fd, -1 if unknown.
    pub fn seed_busy_main_thread(
        &mut self,
        pid: u32,
        epfd: i32,
        main: Option<&KnownLoop>,
        now_ns: u64,
    ) -> Result<(), ProbeError> {
        let state = ThreadState {
            pid,
            epfd,
            role: ROLE_MAIN,
            busy_since_ns: now_ns,
            discovered_ns: now_ns,
            busy_before_attach: BUSY_BEFORE_ATTACH,
            ..ThreadState::default()
        };
        let state = main.map_or(state, |main| main.apply(&state, now_ns));
        self.seed(pid, &state)
    }

    /// Inserts a state unless the probes, already attached, have made one for the thread
    /// meanwhile: theirs is newer.
    fn seed(&mut self, tid: u32, state: &ThreadState) -> Result<(), ProbeError> {
        const BPF_NOEXIST: u64 = 1;
        self.loop_tids.mark(tid);
        match self.threads.insert(tid, *state, BPF_NOEXIST) {
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            result => result.map_err(|error| {
                if is_full(&error) {
                    self.user_map_full[0] += 1;
                }
                ProbeError::MapAccess {
                    name: "threads",
                    error,
                }
            }),
        }
    }

    /// Attaches the loop-finding probes to `libuv`, for process `pid` only, or (`None`) for
    /// every process that runs it, those started later too: `uv_run`'s, for good, and
    /// `uv__io_poll`'s, until [`Probes::end_discovery`] (for good where libuv does not count
    /// its iterations). Returns the object's `libuvs` entry, for [`Probes::attach_gc`] and
    /// [`Probes::release_libuv`].
    pub fn attach_uprobe(&mut self, libuv: &Libuv, pid: Option<u32>) -> Result<u32, ProbeError> {
        let which = match self.libuvs_free.pop() {
            Some(which) => which,
            None if self.libuvs_used < MAX_LIBUVS => {
                self.libuvs_used += 1;
                self.libuvs_used - 1
            }
            None => {
                self.user_map_full[2] += 1;
                return Err(ProbeError::TooManyLibuvs);
            }
        };
        let attached = self.attach_loop_probes(libuv, pid, which);
        if attached.is_err() {
            self.release_libuv(which);
        }
        attached.map(|()| which)
    }

    fn attach_loop_probes(
        &mut self,
        libuv: &Libuv,
        pid: Option<u32>,
        which: u32,
    ) -> Result<(), ProbeError> {
        let (worker_entry_start, worker_entry_end) = libuv.worker_entry.unwrap_or((0, 0));
        // Without uv_run's probe, uv__io_poll's must stay to find loops that start later.
        let counts_iterations = libuv.counts_iterations && libuv.run.is_some();
        let info = LibuvInfo {
            poll_addr: libuv.poll_addr,
            run_addr: libuv.run.map_or(0, |(addr, _)| addr),
            worker_entry_start,
            worker_entry_end,
            counts_iterations: u32::from(counts_iterations),
            reserved: 0,
        };
        self.libuvs
            .set(which, info, 0)
            .map_err(|error| ProbeError::MapAccess {
                name: "libuvs",
                error,
            })?;
        if let Some((_, run_offset)) = libuv.run {
            let link =
                self.attach_loop_probe("uv_run_entry", "uv_run", run_offset, which, libuv, pid)?;
            self.object_links
                .entry(which)
                .or_default()
                .push(("uv_run_entry", link));
        }
        let poll = self.attach_loop_probe(
            "uv_io_poll_entry",
            POLL_SYMBOL,
            libuv.poll_file_offset,
            which,
            libuv,
            pid,
        )?;
        if counts_iterations {
            let shown = libuv.shown_as.display().to_string();
            self.discovering
                .insert(which, (poll, Instant::now(), shown));
        } else {
            self.object_links
                .entry(which)
                .or_default()
                .push(("uv_io_poll_entry", poll));
        }
        Ok(())
    }

    /// Takes every probe off the object of `libuvs` entry `which` (fleet mode, once no process
    /// runs it), and frees the entry. An object with a uprobe stays open in the kernel: the
    /// old binary of an upgraded service would keep its disk space.
    pub fn release_libuv(&mut self, which: u32) {
        let mut links = self.object_links.remove(&which).unwrap_or_default();
        if let Some((link, ..)) = self.discovering.remove(&which) {
            links.push(("uv_io_poll_entry", link));
        }
        for (name, link) in links {
            if let Ok(program) = program::<UProbe>(&mut self.ebpf, name) {
                let _ = program.detach(link);
            }
        }
        self.libuvs_free.push(which);
    }

    fn attach_loop_probe(
        &mut self,
        name: &'static str,
        symbol: &'static str,
        offset: u64,
        which: u32,
        libuv: &Libuv,
        pid: Option<u32>,
    ) -> Result<UProbeLinkId, ProbeError> {
        let program: &mut UProbe = program(&mut self.ebpf, name)?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|error| ProbeError::Program { name, error })?;
        }
        let scope = pid
            .and_then(NonZeroU32::new)
            .map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
        // The cookie tells the program which object it sits in.
        let point = UProbeAttachPoint {
            location: offset.into(),
            cookie: Some(u64::from(which)),
        };
        program
            .attach(point, libuv.attach_path(), scope)
            .map_err(|error| ProbeError::Uprobe {
                symbol,
                path: libuv.shown_as.display().to_string(),
                error,
            })
    }

    /// Takes the per-iteration `uv__io_poll` probes off objects whose libuv counts its
    /// iterations, once they have had [`DISCOVERY`] to find the loops already running (and,
    /// while `unnamed` says a loop thread seen asleep at attach is still to be named, up to
    /// [`DISCOVERY_MAX`]). Returns the objects whose probe came off.
    pub fn end_discovery(&mut self, unnamed: bool) -> Vec<String> {
        let done: Vec<u32> = self
            .discovering
            .iter()
            .filter(|(_, (_, since, _))| {
                let age = since.elapsed();
                age >= DISCOVERY_MAX || (age >= DISCOVERY && !unnamed)
            })
            .map(|(which, _)| *which)
            .collect();
        let mut ended = Vec::new();
        for which in done {
            let Some((link, _, shown)) = self.discovering.remove(&which) else {
                continue;
            };
            if let Ok(program) = program::<UProbe>(&mut self.ebpf, "uv_io_poll_entry") {
                let _ = program.detach(link);
            }
            ended.push(shown);
        }
        ended
    }

    /// When the next `uv__io_poll` probe is due to come off, if that is still to come (one kept
    /// longer for an unnamed loop comes off at a later look).
    pub fn discovery_due(&self) -> Option<Instant> {
        let now = Instant::now();
        self.discovering
            .values()
            .map(|(_, since, _)| *since + DISCOVERY)
            .filter(|due| *due > now)
            .min()
    }

    /// Attaches the GC pause probes to `libuv`'s object, for process `pid` or (`None`) every
    /// process that runs it; `false` when V8 is not in that object (a libuv program that is not
    /// node, a node linked to a shared libnode). `which` is the object's `libuvs` entry: the
    /// probes come off with [`Probes::release_libuv`].
    pub fn attach_gc(
        &mut self,
        libuv: &Libuv,
        pid: Option<u32>,
        which: u32,
    ) -> Result<bool, ProbeError> {
        let Some(gc) = libuv.gc_probes else {
            return Ok(false);
        };
        let end_program = if gc.end_takes_collector {
            "gc_epilogue_collector"
        } else {
            "gc_epilogue"
        };
        let scope = pid
            .and_then(NonZeroU32::new)
            .map_or(UProbeScope::AllProcesses, UProbeScope::OneProcess);
        for (name, offset) in [("gc_prologue", gc.start), (end_program, gc.end)] {
            let program: &mut UProbe = program(&mut self.ebpf, name)?;
            if program.fd().is_err() {
                program
                    .load()
                    .map_err(|error| ProbeError::Program { name, error })?;
            }
            let link = program
                .attach(offset, libuv.attach_path(), scope)
                .map_err(|error| ProbeError::Program { name, error })?;
            self.object_links
                .entry(which)
                .or_default()
                .push((name, link));
        }
        Ok(true)
    }

    /// Samples one loop thread every [`SAMPLE_PERIOD_NS`] of its CPU time: the sampler reads
    /// its iteration count, and takes its stacks while it is busy. A main thread's sampler is
    /// inherited by the threads it creates from now on: a new worker is sampled from its first
    /// instruction, before loopbpf hears of it.
    pub fn sample_thread(&mut self, pid: u32, tid: u32) -> Result<(), ProbeError> {
        if self.samplers.get(&tid).is_some_and(|&(of, _)| of == pid) {
            return Ok(());
        }
        // A tid reused by another process: that sampler's thread is gone.
        self.stop_sampling(tid);
        let name = "on_cpu_sample";
        let program: &mut PerfEvent = program(&mut self.ebpf, name)?;
        if program.fd().is_err() {
            program
                .load()
                .map_err(|error| ProbeError::Program { name, error })?;
        }
        let link = program
            .attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::OneProcess {
                    pid: tid,
                    cpu: None,
                },
                SamplePolicy::Period(SAMPLE_PERIOD_NS),
                tid == pid,
            )
            .map_err(|error| ProbeError::Program { name, error })?;
        self.samplers.insert(tid, (pid, link));
        Ok(())
    }

    /// Stops sampling a thread that exited.
    pub fn stop_sampling(&mut self, tid: u32) {
        let Some((_, link)) = self.samplers.remove(&tid) else {
            return;
        };
        if let Some(program) = self
            .ebpf
            .program_mut("on_cpu_sample")
            .and_then(|p| <&mut PerfEvent>::try_from(p).ok())
        {
            let _ = program.detach(link);
        }
    }

    /// Stops sampling every thread of a process that is gone (threads that exited before
    /// saying so, a process that exec'd).
    pub fn stop_sampling_process(&mut self, pid: u32) {
        let tids: Vec<u32> = self
            .samplers
            .iter()
            .filter(|(_, (of, _))| *of == pid)
            .map(|(tid, _)| *tid)
            .collect();
        for tid in tids {
            self.stop_sampling(tid);
        }
    }

    /// Every loop thread's state as the kernel side has it now: in one system call per 128
    /// threads, or (a kernel without batch lookups) two per thread.
    pub fn threads(&self) -> Vec<(u32, ThreadState)> {
        use aya::maps::IterableMap;
        batch::lookup_all(self.threads.map())
            .unwrap_or_else(|_| self.threads.iter().filter_map(Result::ok).collect())
    }

    /// One thread's state.
    pub fn thread(&self, tid: u32) -> Option<ThreadState> {
        self.threads.get(&tid, 0).ok()
    }

    /// Forgets a thread that has exited.
    pub fn forget_thread(&mut self, tid: u32) {
        self.loop_tids.unmark(tid);
        let _ = self.threads.remove(&tid);
    }

    /// Starts a new reporting window for `window_max_busy_ns`.
    pub fn set_window(&mut self, window: u64) -> Result<(), ProbeError> {
        self.window
            .set(0, window, 0)
            .map_err(|error| ProbeError::MapAccess {
                name: "window",
                error,
            })
    }

    /// Turns on reading the V8 objects of JS frames when samples of `pid` are taken.
    pub fn set_v8_layout(&mut self, pid: u32, layout: V8Layout) -> Result<(), ProbeError> {
        self.v8_layouts.insert(pid, layout, 0).map_err(|error| {
            if is_full(&error) {
                self.user_map_full[3] += 1;
            }
            ProbeError::MapAccess {
                name: "v8_layouts",
                error,
            }
        })
    }

    /// Frees what the kernel side keeps for a process that is gone.
    pub fn forget_process(&mut self, pid: u32) {
        let _ = self.v8_layouts.remove(&pid);
        let _ = self.stack_budgets.remove(&pid);
        self.stacks_limited.remove(&pid);
    }

    /// One kernel-side counter, summed over the CPUs.
    fn counter(&self, which: u32) -> u64 {
        self.counters
            .get(&which, 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    /// Everything lost or held back so far.
    pub fn losses(&self) -> Losses {
        let [threads, libuvs, v8_layouts] = [0, 2, 3].map(|i| self.user_map_full[i]);
        Losses {
            control: self.counter(LOST_CONTROL),
            stacks: self.counter(LOST_STACK),
            rate_limited: self.counter(STACKS_LIMITED),
            map_full: [
                self.counter(FULL_THREADS) + threads,
                self.counter(FULL_ASLEEP),
                libuvs,
                v8_layouts,
            ],
        }
    }

    /// Stack records the per-process limit dropped so far, by process (those with any).
    pub fn stacks_limited(&mut self) -> Vec<(u32, u64)> {
        use aya::maps::IterableMap;
        // One system call for every process's budget, not two each, once a tick.
        let budgets: Vec<(u32, StackBudget)> = batch::lookup_all(self.stack_budgets.map())
            .unwrap_or_else(|_| self.stack_budgets.iter().filter_map(Result::ok).collect());
        for (pid, budget) in budgets {
            let (last, total) = self.stacks_limited.entry(pid).or_default();
            // Evicted and made again: it counts from 0.
            *total += budget.limited.checked_sub(*last).unwrap_or(budget.limited);
            *last = budget.limited;
        }
        self.stacks_limited
            .iter()
            .filter(|(_, (_, total))| *total > 0)
            .map(|(pid, (_, total))| (*pid, *total))
            .collect()
    }

    /// How many stack records the stack ring holds.
    pub fn stack_ring_records(&self) -> usize {
        stack_ring_records(self.stack_ring_bytes)
    }

    /// The per-process stack rate the kernel side enforces, in records a second (`None`: no
    /// stacks taken).
    pub fn stack_rate(stacks_hz: Option<u64>) -> Option<u64> {
        let samples_per_s = 1_000_000_000 / SAMPLE_PERIOD_NS;
        let stack_every = stacks_hz
            .map(|hz| (samples_per_s as f64 / hz.clamp(1, samples_per_s) as f64).round() as u64)?;
        let (interval_ns, _) = stack_limit(u32::try_from(stack_every).ok()?, STACK_RING_MIN_BYTES);
        (interval_ns > 0).then(|| 1_000_000_000 / interval_ns)
    }
}

/// What userspace can tell the kernel side of a running loop before any probe fires, from
/// the target's memory: a main thread's default loop, a sleeping worker's loop.
#[derive(Debug, Clone, Copy)]
pub struct KnownLoop {
    pub loop_addr: u64,
    /// `enum loopbpf_role`.
    pub role: u32,
    /// Where libuv 1.45+ counts its iterations, and the count as read.
    pub count: Option<(u64, u64)>,
}

impl KnownLoop {
    fn apply(&self, state: &ThreadState, now_ns: u64) -> ThreadState {
        let (count_addr, seen_count) = self.count.unwrap_or((0, 0));
        ThreadState {
            loop_addr: self.loop_addr,
            role: self.role,
            counts_iterations: u32::from(self.count.is_some()),
            count_addr,
            seen_count,
            seen_ns: now_ns,
            ..*state
        }
    }
}

/// The per-process stack limit for stacks on every `stack_every`-th sample: the interval
/// between records, and how far ahead of it a process may be, in nanoseconds (0, 0: no stacks,
/// no limit).
fn stack_limit(stack_every: u32, ring_bytes: u32) -> (u64, u64) {
    if stack_every == 0 {
        return (0, 0);
    }
    let stack_period_ns = u64::from(stack_every) * SAMPLE_PERIOD_NS;
    let interval_ns = stack_period_ns / STACK_RATE_PER_SAMPLE_RATE;
    let ring_records = stack_ring_records(ring_bytes) as u64;
    let burst_ns = (interval_ns * (ring_records / STACK_BURST_RING_SHARE))
        .min(STACK_BURST_MAX.as_nanos() as u64);
    (interval_ns, burst_ns)
}

/// The stack ring's size for `cpus` online CPUs: at most one sampled loop thread runs on a
/// CPU at a time, so the records that can come before loopbpf drains them grow with the CPUs.
/// A power of two (the kernel's rule for ring buffers) within the header's bounds.
fn stack_ring_bytes(cpus: usize) -> u32 {
    u32::try_from(cpus)
        .unwrap_or(u32::MAX)
        .saturating_mul(STACK_RING_BYTES_PER_CPU)
        .clamp(STACK_RING_MIN_BYTES, STACK_RING_MAX_BYTES)
        .next_power_of_two()
}

/// How many stack records a ring of `ring_bytes` holds.
pub fn stack_ring_records(ring_bytes: u32) -> usize {
    ring_bytes as usize / size_of::<RawStackEvent>()
}

/// Whether a map insert failed because the map is full.
fn is_full(error: &aya::maps::MapError) -> bool {
    matches!(error, aya::maps::MapError::SyscallError(e)
        if e.io_error.raw_os_error() == Some(libc::E2BIG))
}

/// The embedded object's program `name`, as its type.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, ProbeError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(ProbeError::Map(name))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ProbeError>
where
    T: TryFrom<aya::maps::Map>,
{
    ebpf.take_map(name)
        .and_then(|map| T::try_from(map).ok())
        .ok_or(ProbeError::Map(name))
}

/// Kernels before 5.11 charge BPF maps to `RLIMIT_MEMLOCK`.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct; failure only means the old limit stays.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_process_gets_twice_the_sample_rate_and_a_bounded_burst() {
        let ring = 8 * 1024 * 1024;
        // The default --sample-rate 199: stacks on every 5th sample, 200 a second of a thread's
        // CPU time; a process may send 400 a second, 60 of them (a quarter of the ring) at once.
        let (interval_ns, burst_ns) = stack_limit(5, ring);
        assert_eq!(interval_ns, 2_500_000);
        assert_eq!(burst_ns / interval_ns, 60);
        assert_eq!(Probes::stack_rate(Some(199)), Some(400));
        // Half the ring, half the burst.
        let (_, burst_ns) = stack_limit(5, ring / 2);
        assert_eq!(burst_ns / interval_ns, 30);
        // --sample-rate 1000: 2000 a second; the burst stays a quarter of the ring.
        let (interval_ns, burst_ns) = stack_limit(1, ring);
        assert_eq!(1_000_000_000 / interval_ns, 2000);
        assert_eq!(burst_ns / interval_ns, 60);
        // A low rate: the burst is at most a quarter second.
        let (interval_ns, burst_ns) = stack_limit(100, ring);
        assert_eq!(burst_ns, 250_000_000);
        assert!(burst_ns / interval_ns < 60);
        assert_eq!(stack_limit(0, ring), (0, 0));
        assert_eq!(Probes::stack_rate(None), None);
    }

    #[test]
    fn the_stack_ring_grows_with_the_cpus_as_a_power_of_two_within_bounds() {
        const MIB: u32 = 1024 * 1024;
        assert_eq!(stack_ring_bytes(1), 4 * MIB);
        assert_eq!(stack_ring_bytes(2), 4 * MIB);
        assert_eq!(stack_ring_bytes(3), 8 * MIB);
        assert_eq!(stack_ring_bytes(4), 8 * MIB);
        assert_eq!(stack_ring_bytes(9), 32 * MIB);
        assert_eq!(stack_ring_bytes(4096), 32 * MIB);
        // About 34 KiB a record.
        assert_eq!(stack_ring_records(4 * MIB), 121);
    }
}
