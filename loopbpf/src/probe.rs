//! Probe attach: loads the embedded eBPF object, sets its configuration, attaches its programs
//! and owns them. Dropping [`Probes`] detaches everything; so does the process dying, because
//! every attachment is a file descriptor (perf-event links, never tracefs text entries).

use std::{num::NonZeroU32, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        PerfEvent, TracePoint, UProbe,
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
        uprobe::{UProbeAttachPoint, UProbeScope},
    },
};
use thiserror::Error;

use crate::{
    decode::{BUSY_BEFORE_ATTACH, LibuvInfo, MAX_LIBUVS, ROLE_MAIN, ThreadState, V8Layout},
    discover::{IdleThread, Libuv, POLL_SYMBOL},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loopbpf.bpf.o"));

/// Tracepoint programs and where they attach: thread exits and execs, and both sides of every
/// syscall libuv's epoll backend waits in (Node 20 uses `epoll_pwait`).
const TRACEPOINTS: [(&str, &str, &str); 8] = [
    ("thread_exit", "sched", "sched_process_exit"),
    ("process_exec", "sched", "sched_process_exec"),
    ("epoll_wait_enter", "syscalls", "sys_enter_epoll_wait"),
    ("epoll_wait_exit", "syscalls", "sys_exit_epoll_wait"),
    ("epoll_pwait_enter", "syscalls", "sys_enter_epoll_pwait"),
    ("epoll_pwait_exit", "syscalls", "sys_exit_epoll_pwait"),
    ("epoll_pwait2_enter", "syscalls", "sys_enter_epoll_pwait2"),
    ("epoll_pwait2_exit", "syscalls", "sys_exit_epoll_pwait2"),
];

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
    #[error("could not attach to `{POLL_SYMBOL}` in {path}: {error}")]
    Uprobe {
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
    #[error("reading eBPF map `{name}`: {error}")]
    MapAccess {
        name: &'static str,
        error: aya::maps::MapError,
    },
}

/// The loaded and attached kernel side.
pub struct Probes {
    ebpf: Ebpf,
    threads: HashMap<MapData, u32, ThreadState>,
    window: Array<MapData, u64>,
    libuvs: Array<MapData, LibuvInfo>,
    /// Entries of `libuvs` in use: the next uprobe's cookie.
    libuvs_used: u32,
    v8_layouts: HashMap<MapData, u32, V8Layout>,
    dropped: PerCpuArray<MapData, u64>,
    /// Per loop thread cpu-clock sampling, by tid, with the thread's process.
    samplers: std::collections::HashMap<u32, (u32, PerfEventLinkId)>,
}

impl Probes {
    /// Loads the programs, configured for one target process (`None`: every process that
    /// runs a probed libuv, fleet mode) and a block threshold.
    pub fn load(target_pid: Option<u32>, threshold: Duration) -> Result<Self, ProbeError> {
        raise_memlock_limit();
        let threshold_ns = u64::try_from(threshold.as_nanos()).unwrap_or(u64::MAX);
        let target_tgid = target_pid.unwrap_or(0);
        let mut ebpf = EbpfLoader::new()
            .override_global("target_tgid", &target_tgid, true)
            .override_global("threshold_ns", &threshold_ns, true)
            .load(OBJECT)
            .map_err(ProbeError::Load)?;
        let threads = take_map(&mut ebpf, "threads")?;
        let window = take_map(&mut ebpf, "window")?;
        let libuvs = take_map(&mut ebpf, "libuvs")?;
        let v8_layouts = take_map(&mut ebpf, "v8_layouts")?;
        let dropped = take_map(&mut ebpf, "dropped")?;
        Ok(Self {
            ebpf,
            threads,
            window,
            libuvs,
            libuvs_used: 0,
            v8_layouts,
            dropped,
            samplers: std::collections::HashMap::new(),
        })
    }

    /// The ring buffer of events; call once.
    pub fn events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        take_map(&mut self.ebpf, "events")
    }

    /// Attaches the thread-exit, exec and poll-wait tracepoints, which only act on targets.
    pub fn attach_tracepoints(&mut self) -> Result<(), ProbeError> {
        for (program, category, tracepoint) in TRACEPOINTS {
            self.attach_tracepoint(program, category, tracepoint)?;
        }
        Ok(())
    }

    /// Marks a thread that sits in epoll fd `epfd` as a loop thread to be named by its next
    /// `uv__io_poll`; call before attaching, for loops idle at attach time. A main thread in
    /// its poll wait is the main loop from the start.
    pub fn seed_idle_thread(
        &mut self,
        pid: u32,
        idle: &IdleThread,
        now_ns: u64,
    ) -> Result<(), ProbeError> {
        // Idle since some time before now: its idle time counts from the attach.
        self.seed(
            idle.tid,
            &ThreadState {
                pid,
                epfd: idle.epfd,
                in_poll: 1,
                poll_counts_idle: u32::from(idle.counts_idle),
                poll_enter_ns: now_ns,
                discovered_ns: now_ns,
                role: if idle.tid == pid { ROLE_MAIN } else { 0 },
                ..ThreadState::default()
            },
        )
    }

    /// Marks the main thread, not in its loop's poll wait as we attach, as busy since `now_ns`:
    /// a block already under way (a hung loop, a long `execSync`) is reported with its time
    /// since the attach as a lower bound. `epfd` is its loop's epoll fd, -1 if unknown.
    pub fn seed_busy_main_thread(
        &mut self,
        pid: u32,
        epfd: i32,
        now_ns: u64,
    ) -> Result<(), ProbeError> {
        self.seed(
            pid,
            &ThreadState {
                pid,
                epfd,
                role: ROLE_MAIN,
                busy_since_ns: now_ns,
                discovered_ns: now_ns,
                busy_before_attach: BUSY_BEFORE_ATTACH,
                ..ThreadState::default()
            },
        )
    }

    /// Inserts a state unless the probes, already attached, have made one for the thread
    /// meanwhile: theirs is newer.
    fn seed(&mut self, tid: u32, state: &ThreadState) -> Result<(), ProbeError> {
        const BPF_NOEXIST: u64 = 1;
        match self.threads.insert(tid, *state, BPF_NOEXIST) {
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            result => result.map_err(|error| ProbeError::MapAccess {
                name: "threads",
                error,
            }),
        }
    }

    /// Attaches the `uv__io_poll` entry probe to `libuv`: for process `pid` only, or (`None`)
    /// for every process that runs it, those started later too.
    pub fn attach_uprobe(&mut self, libuv: &Libuv, pid: Option<u32>) -> Result<(), ProbeError> {
        let which = self.libuvs_used;
        if which >= MAX_LIBUVS {
            return Err(ProbeError::TooManyLibuvs);
        }
        let (worker_entry_start, worker_entry_end) = libuv.worker_entry.unwrap_or((0, 0));
        let info = LibuvInfo {
            poll_addr: libuv.poll_addr,
            worker_entry_start,
            worker_entry_end,
        };
        self.libuvs
            .set(which, info, 0)
            .map_err(|error| ProbeError::MapAccess {
                name: "libuvs",
                error,
            })?;
        let name = "uv_io_poll_entry";
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
            location: libuv.poll_file_offset.into(),
            cookie: Some(u64::from(which)),
        };
        program
            .attach(point, &libuv.path, scope)
            .map_err(|error| ProbeError::Uprobe {
                path: libuv.shown_as.display().to_string(),
                error,
            })?;
        self.libuvs_used += 1;
        Ok(())
    }

    /// Attaches the GC pause probes to `libuv`'s object, for process `pid` or (`None`) every
    /// process that runs it; `false` when V8 is not in that object (a libuv program that is not
    /// node, a node linked to a shared libnode).
    pub fn attach_gc(&mut self, libuv: &Libuv, pid: Option<u32>) -> Result<bool, ProbeError> {
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
            program
                .attach(offset, &libuv.path, scope)
                .map_err(|error| ProbeError::Program { name, error })?;
        }
        Ok(true)
    }

    fn attach_tracepoint(
        &mut self,
        name: &'static str,
        category: &'static str,
        tracepoint: &'static str,
    ) -> Result<(), ProbeError> {
        let program: &mut TracePoint = program(&mut self.ebpf, name)?;
        program
            .load()
            .map_err(|error| ProbeError::Program { name, error })?;
        program
            .attach(category, tracepoint)
            .map_err(|error| ProbeError::Tracepoint {
                category,
                name: tracepoint,
                error,
            })?;
        Ok(())
    }

    /// Attaches the off-CPU probe (`sched_switch`): where busy loop threads sleep, how long.
    pub fn attach_off_cpu(&mut self) -> Result<(), ProbeError> {
        self.attach_tracepoint("on_switch", "sched", "sched_switch")
    }

    /// Samples one loop thread's stacks `hz` times per second of its CPU time.
    pub fn sample_thread(&mut self, pid: u32, tid: u32, hz: u64) -> Result<(), ProbeError> {
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
                SamplePolicy::Frequency(hz),
                false,
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

    /// Every loop thread's state as the kernel side has it now.
    pub fn threads(&self) -> Vec<(u32, ThreadState)> {
        self.threads.iter().filter_map(Result::ok).collect()
    }

    /// One thread's state.
    pub fn thread(&self, tid: u32) -> Option<ThreadState> {
        self.threads.get(&tid, 0).ok()
    }

    /// Forgets a thread that has exited.
    pub fn forget_thread(&mut self, tid: u32) {
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
        self.v8_layouts
            .insert(pid, layout, 0)
            .map_err(|error| ProbeError::MapAccess {
                name: "v8_layouts",
                error,
            })
    }

    /// Frees what the kernel side keeps for a process that is gone.
    pub fn forget_process(&mut self, pid: u32) {
        let _ = self.v8_layouts.remove(&pid);
    }

    /// Events the kernel side could not hand over because the ring buffer was full.
    pub fn dropped_events(&self) -> u64 {
        self.dropped
            .get(&0, 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }
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
