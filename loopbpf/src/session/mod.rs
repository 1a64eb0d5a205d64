//! One profiling session, wiring the pipeline stages together:
//! discover -> attach probes -> decode events -> aggregate -> report and serve metrics, until
//! Ctrl-C, SIGTERM, `--duration`, or the target's exit.
//!
//! A session watches a set of processes: the one of `--pid` or of a launched command, or, with
//! `--all`, every libuv process of the host, which comes and goes: those running at the start,
//! those that exec a libuv program later (the exec tracepoint says when), and those that start
//! a program already probed (its uprobe finds their loops).

mod launch;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::pending,
    io,
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::{Instant, Interval, interval_at},
};

use crate::{
    abi::{ROLE_MAIN, ROLE_OTHER, ROLE_WORKER},
    aggregate::{Aggregator, Record, leak::LeakWatch},
    cli::{Args, RecordArgs},
    decode::{Event, GcKind},
    discover::{self, LibuvCache, Target},
    naming::{
        Naming, SharedFiles,
        stacks::{self, Sample},
    },
    output::{
        clock::{Clock, human},
        flame::Flame,
        metrics::{self, Health, LoopView, Metrics},
        record::Recorder,
        report::Reporter,
    },
    probe::{KnownLoop, Probes},
    target::{ProcessLabels, container::Placement, files::FileId, proc::rss_of, start_time},
};
use launch::StoppedChild;

/// How often the per-thread state is read for ongoing blocks.
const STATE_POLL: Duration = Duration::from_millis(100);
/// How often the targets' memory maps are re-read for naming stacks, gone processes are
/// looked for, and metrics are rendered.
const MAPS_REFRESH: Duration = Duration::from_secs(1);
/// How long after an exec fleet mode looks again for libuv in the new program: a shared libuv
/// is mapped by the dynamic loader, a moment after the exec.
const EXEC_SECOND_LOOK_NS: u64 = 1_000_000_000;

/// Runs the parsed command line: a session that reports on the terminal, or, with `record`, one
/// whose output is an evidence bundle.
pub fn run(args: &Args) -> Result<ExitCode> {
    let (args, record) = args.resolve();
    crate::diag::set_quiet(args.session.quiet);
    run_with(&args, record)
}

fn run_with(args: &Args, record: Option<&RecordArgs>) -> Result<ExitCode> {
    if !args.session.all && args.session.pid.is_none() && args.command.is_empty() {
        bail!("nothing to watch: give --pid PID, --all, or a command after `--` (see --help)");
    }
    discover::preflight()?;
    let listener = args.metrics.map(metrics::bind).transpose()?;

    // Fork before anything starts a thread.
    let (target, child) = if args.session.all {
        (None, None)
    } else if let Some(pid) = args.session.pid {
        (Some(discover::target_for_pid(pid)?), None)
    } else {
        let libuv = discover::libuv_for_command(&args.command[0])?;
        let child = StoppedChild::spawn(&args.command, args.json)?;
        let comm = args.command[0]
            .to_string_lossy()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let target = Target {
            pid: child.pid(),
            comm,
            libuv,
            libuv_file: FileId::default(),
        };
        (Some(target), Some(child))
    };

    // Once the target is known: a bad pid leaves no empty bundle directory behind.
    let recorder = record.map(Recorder::new).transpose()?;
    let session = Session::start(args, target.as_ref(), recorder);
    let mut session = match (session, &child) {
        (Ok(session), _) => session,
        (Err(e), Some(child)) => {
            child.kill();
            return Err(e);
        }
        (Err(e), None) => return Err(e),
    };
    let threshold = human(args.session.threshold.as_nanos() as u64);
    if let Some(target) = &target {
        status!(
            "watching pid {} ({}), libuv in {}; blocks are busy intervals >= {threshold}. Ctrl-C to end.",
            target.pid,
            target.comm,
            target.libuv.shown_as.display(),
        );
    } else {
        session.watch_running_processes();
        status!(
            "watching every libuv process ({} now); blocks are busy intervals >= {threshold}. Ctrl-C to end.",
            session.processes.len()
        );
    }
    if let Some(addr) = args.metrics {
        status!("metrics on http://{addr}/metrics");
    }
    if let Some(child) = &child {
        child.resume();
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    let target_pid = target.map(|t| t.pid);
    runtime.block_on(watch(session, target_pid, child.as_ref(), listener))
}

/// Why the session ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    TargetExited,
    Stopped,
    OutputClosed,
}

/// How much of a process's loop state to tell the kernel side as it is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seed {
    /// It runs already: loops idle in their poll wait, and a main thread busy (or stuck) now.
    Running,
    /// It exec'd a moment ago: only loops already idle in their poll wait.
    Fresh,
    /// Its probes see it from its first iteration (a launched command), or they found it.
    Nothing,
}

/// A watched process.
struct Process {
    target: Target,
    /// With the pid, names the process: a reused pid is another process.
    start_time: Option<u64>,
    labels: ProcessLabels,
    /// `None` with `--no-stacks`, and once the process is gone.
    naming: Option<Naming>,
    /// Whether the kernel side reads V8 objects of its sampled frames yet.
    v8_layout_set: bool,
    /// When it was found gone: fleet mode keeps its summary line and metric series for
    /// `--keep-exited`.
    gone_ns: Option<u64>,
    /// Its memory after major GCs.
    leak: LeakWatch,
}

/// Fleet mode's discovery state.
#[derive(Default)]
struct Fleet {
    cache: LibuvCache,
    /// Files probed already, with their `libuvs` entry: one uprobe serves every process that
    /// runs the file. Their probes come off when the last of those processes is forgotten.
    probed: HashMap<FileId, u32>,
    /// Files that could not be probed: not tried again.
    unprobeable: HashSet<FileId>,
    /// Processes that exec'd, to look at for libuv: (pid, when to look, looks left).
    execs: Vec<(u32, u64, u8)>,
    attach_failures: u64,
}

/// The running pipeline: kernel side, processes, aggregation, naming, outputs.
struct Session<'a> {
    args: &'a Args,
    probes: Probes,
    processes: BTreeMap<u32, Process>,
    /// `None` unless `--all`.
    fleet: Option<Fleet>,
    aggregator: Aggregator,
    reporter: Reporter<Box<dyn io::Write>>,
    /// `loopbpf record`: where the records go instead of the terminal.
    recorder: Option<Recorder>,
    metrics: Option<Metrics>,
    /// Object files, read once for every process that maps them.
    shared: SharedFiles,
    flame: Flame,
    /// Lost events already warned about.
    dropped_warned: u64,
    started_ns: u64,
}

impl<'a> Session<'a> {
    /// Loads and attaches the kernel side, for `target` or (`None`) for the whole host.
    fn start(args: &'a Args, target: Option<&Target>, recorder: Option<Recorder>) -> Result<Self> {
        let stacks_hz = (!args.session.no_stacks).then_some(args.session.sample_rate);
        let mut probes = Probes::load(target.map(|t| t.pid), args.session.threshold, stacks_hz)?;
        probes.attach_tracepoints()?;
        let out: Box<dyn io::Write> = if recorder.is_some() {
            Box::new(io::sink())
        } else {
            Box::new(io::stdout().lock())
        };
        let mut reporter = Reporter::new(out, args.json, Clock::new());
        if target.is_none() {
            reporter = reporter.with_command_column();
        }
        let mut session = Self {
            args,
            probes,
            processes: BTreeMap::new(),
            fleet: target.is_none().then(Fleet::default),
            aggregator: Aggregator::new(args.session.threshold.as_nanos() as u64),
            reporter,
            recorder,
            metrics: args
                .metrics
                .map(|_| Metrics::new(args.session.threshold.as_nanos() as u64)),
            shared: SharedFiles::new(),
            flame: Flame::default(),
            dropped_warned: 0,
            started_ns: Clock::monotonic_ns(),
        };
        if let Some(target) = target {
            let seed = if args.command.is_empty() {
                Seed::Running
            } else {
                Seed::Nothing
            };
            let which = session
                .probes
                .attach_uprobe(&target.libuv, Some(target.pid))
                .with_context(|| format!("attaching to pid {} (did it exit?)", target.pid))?;
            session.attach_gc(target, Some(target.pid), which);
            session.watch(target.clone(), seed)?;
        }
        Ok(session)
    }

    /// Fleet mode: every libuv process running now.
    fn watch_running_processes(&mut self) {
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        for target in discover::libuv_processes(&mut fleet.cache) {
            self.watch_in_fleet(target, Seed::Running);
        }
    }

    /// Fleet mode: probes the process's libuv unless its file is probed already, then watches.
    fn watch_in_fleet(&mut self, target: Target, seed: Seed) {
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        if self.processes.contains_key(&target.pid)
            || fleet.unprobeable.contains(&target.libuv_file)
        {
            return;
        }
        if !fleet.probed.contains_key(&target.libuv_file) {
            let which = match self.probes.attach_uprobe(&target.libuv, None) {
                Ok(which) => which,
                Err(e) => {
                    warning!("pid {} ({}) is not watched: {e}", target.pid, target.comm);
                    fleet.attach_failures += 1;
                    fleet.unprobeable.insert(target.libuv_file);
                    return;
                }
            };
            fleet.probed.insert(target.libuv_file.clone(), which);
            self.attach_gc(&target, None, which);
        }
        let (pid, comm, file) = (target.pid, target.comm.clone(), target.libuv_file.clone());
        if let Err(e) = self.watch(target, seed) {
            // One that exited meanwhile is no failure.
            if start_time(pid).is_some() {
                warning!("pid {pid} ({comm}) is not fully watched: {e:#}");
                if let Some(fleet) = self.fleet.as_mut() {
                    fleet.attach_failures += 1;
                }
            }
            self.release_if_unused(&file);
        }
    }

    /// Fleet mode: takes the probes off a libuv file no watched process runs (one started
    /// later has them put back).
    fn release_if_unused(&mut self, file: &FileId) {
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        if self
            .processes
            .values()
            .any(|p| &p.target.libuv_file == file)
        {
            return;
        }
        if let Some(which) = fleet.probed.remove(file) {
            self.probes.release_libuv(which);
        }
    }

    /// Times the GC pauses of the processes that run `target`'s libuv object; says once when
    /// that cannot be done.
    fn attach_gc(&mut self, target: &Target, pid: Option<u32>, which: u32) {
        let shown = target.libuv.shown_as.display();
        match self.probes.attach_gc(&target.libuv, pid, which) {
            Ok(true) => {}
            Ok(false) => note!("no GC pauses for {shown}: V8's GC callbacks are not in it"),
            Err(e) => warning!("no GC pauses for {shown}: {e}"),
        }
    }

    /// Takes a process whose libuv is probed into the session.
    fn watch(&mut self, target: Target, seed: Seed) -> Result<()> {
        let pid = target.pid;
        // First: a process that exits during the attach must still be found gone.
        let start_time = start_time(pid);
        // After attaching, so that a loop waking up meanwhile is seen by the probes, not lost.
        match seed {
            // Fleet mode: only a main thread known to run libuv's default loop is taken for
            // busy (a program may link libuv and never run its loop on the main thread).
            Seed::Running => {
                let busy_main = self.fleet.is_none() || target.main_loop_epfd().is_some();
                seed_running_loops(&mut self.probes, &target, busy_main)?;
            }
            Seed::Fresh => seed_running_loops(&mut self.probes, &target, false)?,
            Seed::Nothing => {}
        }
        // The main thread is a loop thread from the start; workers are sampled once found.
        // Sampling is not only for stacks: it reads the loops' iteration counts.
        self.probes.sample_thread(pid, pid)?;
        let placement = Placement::of(pid);
        let labels = ProcessLabels {
            comm: target.comm.clone(),
            container: placement.container,
            pod: placement.pod,
        };
        self.reporter.name_process(pid, labels.clone());
        if let Some(recorder) = self.recorder.as_mut() {
            recorder.name_process(pid, labels.clone());
        }
        // Reading the process's unwind tables and symbols takes a moment.
        let naming = (!self.args.session.no_stacks).then(|| Naming::new(pid, &self.shared));
        let mut process = Process {
            target,
            start_time,
            labels,
            naming,
            v8_layout_set: false,
            gone_ns: None,
            leak: LeakWatch::default(),
        };
        read_v8_objects_in_samples(&mut self.probes, &mut process);
        self.processes.insert(pid, process);
        Ok(())
    }

    fn naming_of(&mut self, pid: u32) -> Option<&mut Naming> {
        self.processes.get_mut(&pid)?.naming.as_mut()
    }

    /// Reads every queued event; an exited loop thread's final state is taken and the entry
    /// freed.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> Result<(), End> {
        let mut records = Vec::new();
        while let Some(item) = ring.next() {
            match Event::decode(&item) {
                Ok(event) => {
                    self.follow_threads(&event);
                    if let Event::Stack(sample) = event {
                        let sample = match self.naming_of(sample.pid) {
                            Some(naming) => naming.unwind(&sample),
                            None => Sample::unwound_by_kernel(sample),
                        };
                        self.aggregator.on_stack(sample);
                        continue;
                    }
                    if let Event::Gc { .. } = event {
                        records.extend(self.follow_gc(&event));
                    }
                    records.extend(self.aggregator.on_event(&event));
                }
                Err(e) => status!("skipped a malformed event: {e}"),
            }
        }
        for tid in self.aggregator.take_exited_tids() {
            self.probes.forget_thread(tid);
        }
        self.report_all(records)
    }

    /// Starts sampling loop threads as they are found; takes the final state of those that
    /// exit; in fleet mode, takes in processes found by their probes or by their exec.
    fn follow_threads(&mut self, event: &Event) {
        match *event {
            Event::LoopFound { pid, tid, .. } => {
                if let Some(fleet) = self.fleet.as_mut()
                    && !self.processes.contains_key(&pid)
                    && let Ok(target) = discover::find_target(pid, &mut fleet.cache)
                {
                    self.watch_in_fleet(target, Seed::Nothing);
                }
                if let Err(e) = self.probes.sample_thread(pid, tid) {
                    status!("thread {tid} is not sampled: {:#}", anyhow::Error::from(e));
                }
            }
            Event::LoopExit { tid, .. } => {
                self.probes.stop_sampling(tid);
                if let Some(state) = self.probes.thread(tid) {
                    self.aggregator.update_state(tid, &state);
                }
            }
            Event::Exec { pid, at_ns } => {
                if self.fleet.is_none() {
                    return;
                }
                // The program it ran is gone; the new one may be another libuv program.
                self.process_gone(pid, at_ns);
                if let Some(fleet) = self.fleet.as_mut() {
                    fleet.execs.push((pid, at_ns, 2));
                }
            }
            _ => {}
        }
    }

    /// Counts a GC pause for the metrics; after a major GC of a main thread, looks at the
    /// process's memory for a leak.
    fn follow_gc(&mut self, event: &Event) -> Option<Record> {
        let Event::Gc {
            pid,
            tid,
            start_ns,
            end_ns,
            kind,
        } = *event
        else {
            return None;
        };
        if let Some(metrics) = self.metrics.as_mut() {
            metrics.on_gc(pid, tid, kind, end_ns.saturating_sub(start_ns));
        }
        if kind != GcKind::Major || tid != pid {
            return None;
        }
        let process = self.processes.get_mut(&pid)?;
        let leak = process.leak.after_major_gc(end_ns, rss_of(pid)?)?;
        let id = self.aggregator.loops().find(|(id, _)| id.tid == tid)?.0;
        Some(Record::Leak { id, leak })
    }

    /// Fleet mode: looks at processes that exec'd for libuv, once right away and once a
    /// second later.
    fn look_at_execs(&mut self, now_ns: u64) {
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        let mut due = Vec::new();
        fleet.execs.retain_mut(|(pid, when_ns, looks)| {
            if *when_ns > now_ns {
                return true;
            }
            due.push(*pid);
            *looks -= 1;
            *when_ns = now_ns + EXEC_SECOND_LOOK_NS;
            *looks > 0
        });
        for pid in due {
            let Some(fleet) = self.fleet.as_mut() else {
                return;
            };
            if self
                .processes
                .get(&pid)
                .is_some_and(|p| p.gone_ns.is_none())
            {
                continue; // its probe found it first
            }
            if let Ok(target) = discover::find_target(pid, &mut fleet.cache) {
                // The program it ran before is gone for good.
                self.forget_process(pid);
                self.watch_in_fleet(target, Seed::Fresh);
            }
        }
    }

    /// A process exited or exec'd another program: stop naming its stacks; fleet mode keeps
    /// its lines and series for `--keep-exited`.
    fn process_gone(&mut self, pid: u32, now_ns: u64) {
        let Some(process) = self.processes.get_mut(&pid) else {
            return;
        };
        if process.gone_ns.is_none() {
            process.gone_ns = Some(now_ns);
            process.naming = None;
            self.shared.prune();
            self.probes.forget_process(pid);
            self.probes.stop_sampling_process(pid);
        }
    }

    /// Fleet mode, once a second: finds processes that are gone, forgets those gone for longer
    /// than `--keep-exited`, and frees kernel-side entries of threads that no longer exist.
    fn tend_fleet(&mut self, now_ns: u64) {
        if self.fleet.is_none() {
            return;
        }
        let gone: Vec<u32> = self
            .processes
            .iter()
            .filter(|(pid, p)| {
                p.gone_ns.is_none() && (p.start_time.is_none() || start_time(**pid) != p.start_time)
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            self.process_gone(pid, now_ns);
        }
        let keep_ns = self.args.keep_exited.as_nanos() as u64;
        let expired: Vec<u32> = self
            .processes
            .iter()
            .filter(|(_, p)| {
                p.gone_ns
                    .is_some_and(|gone| now_ns.saturating_sub(gone) >= keep_ns)
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in expired {
            self.forget_process(pid);
        }
        // Threads that ended without a word to us (an exit we lost); those that said so are
        // freed once their last state is read.
        for (tid, state) in self.probes.threads() {
            if state.exited_ns == 0
                && !Path::new(&format!("/proc/{}/task/{tid}", state.pid)).exists()
            {
                self.probes.forget_thread(tid);
                self.probes.stop_sampling(tid);
                self.aggregator.thread_gone(tid, now_ns);
            }
        }
    }

    /// Forgets a gone process: its lines, series and kernel-side state, and the probes on its
    /// libuv file if no other process runs it.
    fn forget_process(&mut self, pid: u32) {
        if let Some(process) = self.processes.remove(&pid) {
            self.release_if_unused(&process.target.libuv_file);
        }
        self.reporter.forget_process(pid);
        self.probes.forget_process(pid);
        self.probes.stop_sampling_process(pid);
        for tid in self.aggregator.forget_process(pid) {
            self.probes.forget_thread(tid);
            if let Some(metrics) = self.metrics.as_mut() {
                metrics.forget(pid, tid);
            }
        }
    }

    fn refresh(&mut self) {
        let mut unnamed = false;
        for (tid, state) in self.probes.threads() {
            if state.exited_ns == 0 {
                self.aggregator.update_state(tid, &state);
                // Seen asleep in a poll wait at attach, its loop not known yet.
                unnamed |= state.loop_addr == 0 && state.role != ROLE_OTHER;
            }
        }
        for shown in self.probes.end_discovery(unnamed) {
            status!("loops running in {shown} found; no probe left on its iterations");
        }
    }

    /// Renders the metrics with the newest state of every loop thread.
    fn refresh_metrics(&mut self, now_ns: u64) {
        let Some(metrics) = self.metrics.as_mut() else {
            return;
        };
        let unknown = ProcessLabels::default();
        let loops: Vec<LoopView<'_>> = self
            .aggregator
            .loops()
            .map(|(id, state)| {
                let process = self.processes.get(&id.pid);
                LoopView {
                    id,
                    state,
                    process: process.map_or(&unknown, |p| &p.labels),
                    memory: process
                        .filter(|_| id.tid == id.pid)
                        .and_then(|p| Some((p.leak.rss_after_gc?, p.leak.warnings))),
                }
            })
            .collect();
        let health = Health {
            processes: self
                .processes
                .values()
                .filter(|p| p.gone_ns.is_none())
                .count() as u64,
            lost_events: self.probes.dropped_events(),
            attach_failures: self.fleet.as_ref().map_or(0, |f| f.attach_failures),
        };
        metrics.refresh(now_ns, &loops, health);
    }

    /// `loopbpf record`, once a state poll: the timeline, the actions, the bundle so far; ends
    /// the session once `--stop-after-blocks` is reached.
    fn record_tick(&mut self, now_ns: u64) -> Result<(), End> {
        let Some(recorder) = self.recorder.as_mut() else {
            return Ok(());
        };
        recorder.tick(now_ns, self.aggregator.loops());
        recorder.write_if_due(&self.flame);
        if recorder.has_enough() {
            return Err(End::Stopped);
        }
        Ok(())
    }

    /// Names the stacks of blocks (the symbolize stage), then reports.
    fn report_all(&mut self, mut records: Vec<Record>) -> Result<(), End> {
        let now_ns = Clock::monotonic_ns();
        for record in &mut records {
            if let (
                Record::Block {
                    id, duration_ns, ..
                },
                Some(metrics),
            ) = (&*record, self.metrics.as_mut())
            {
                metrics.on_block(id.pid, id.tid, *duration_ns);
            }
            self.name_stacks(record, matches!(record, Record::Block { .. }));
            if let Some(recorder) = self.recorder.as_mut() {
                recorder.take(record, now_ns);
            }
            if self.reporter.report(record, now_ns).is_err() {
                // Nobody reads our output any more (`loopbpf ... | head`): a normal end.
                return Err(End::OutputClosed);
            }
        }
        Ok(())
    }

    /// Weights and names a record's stacks; `into_flame` adds them to the blocked time of
    /// `--folded` and `--flamegraph`.
    fn name_stacks(&mut self, record: &mut Record, into_flame: bool) {
        let (Record::Block {
            id,
            duration_ns,
            stacks,
            profile,
            ..
        }
        | Record::Ongoing {
            id,
            duration_ns,
            stacks,
            profile,
            ..
        }) = record
        else {
            return;
        };
        let Some(naming) = self
            .processes
            .get_mut(&id.pid)
            .and_then(|p| p.naming.as_mut())
        else {
            return;
        };
        // New mappings (a library loaded, a launched command's exec) since the last refresh.
        naming.symbolizer.refresh();
        // A worker's heap goes with its thread: read after that, memory another isolate reuses
        // could give a frame a wrong name. Its JS frames stay unnamed ([JS]) instead.
        let heap_alive =
            id.tid == id.pid || Path::new(&format!("/proc/{}/task/{}", id.pid, id.tid)).exists();
        let named = stacks::profile(
            stacks,
            *duration_ns,
            &mut naming.symbolizer,
            naming.js.as_ref().filter(|_| heap_alive),
        );
        if into_flame {
            self.flame.add(id, &named);
        }
        *profile = Some(named);
    }

    /// Once a second: current memory maps for naming, V8 layouts, lost events.
    fn refresh_naming(&mut self) {
        for process in self.processes.values_mut() {
            if let Some(naming) = process.naming.as_mut() {
                naming.refresh();
            }
            read_v8_objects_in_samples(&mut self.probes, process);
        }
        self.warn_of_lost_events();
    }

    /// Says so, at most once a second, when the kernel side could not hand events over: counts
    /// and stacks are then incomplete, and the user must know.
    fn warn_of_lost_events(&mut self) {
        let dropped = self.probes.dropped_events();
        if dropped > self.dropped_warned {
            loss!(
                "{dropped} events lost so far (ring buffer full); blocks or stacks may be missing"
            );
            self.dropped_warned = dropped;
        }
    }

    /// The summary, then the `--folded` and `--flamegraph` files.
    fn finish(&mut self, target_pid: Option<u32>, end: &End) -> Result<()> {
        self.refresh();
        self.warn_of_lost_events();
        let now_ns = Clock::monotonic_ns();
        if let Some(pid) = target_pid
            && *end == End::TargetExited
            && !self.aggregator.knows_loops()
        {
            status!("pid {pid} exited before its event loop ran");
        }
        let dropped = self.probes.dropped_events();
        let summary = self
            .aggregator
            .summary(now_ns, dropped, now_ns - self.started_ns);
        match self.reporter.report(&summary, now_ns) {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e.into()),
            _ => {}
        }
        // A loop still stuck as we stop (Ctrl-C on a hung process) is blocked time too.
        for mut stuck in self.aggregator.still_blocked(now_ns) {
            self.name_stacks(&mut stuck, true);
            if let Some(recorder) = self.recorder.as_mut() {
                recorder.take(&stuck, now_ns);
            }
        }
        if let Some(recorder) = self.recorder.as_mut() {
            recorder.take(&summary, now_ns);
            recorder.finish(&self.flame)?;
        }
        self.write_files(target_pid)
    }

    /// Writes `--folded` and `--flamegraph` files.
    fn write_files(&self, target_pid: Option<u32>) -> Result<()> {
        if let Some(path) = &self.args.folded {
            self.flame.write_folded(path)?;
        }
        if let Some(path) = &self.args.flamegraph {
            let title = match target_pid {
                Some(pid) => format!("loopbpf: blocked time of pid {pid}"),
                None => "loopbpf: blocked time of every watched process".to_owned(),
            };
            self.flame.write_svg(path, &title)?;
        }
        Ok(())
    }
}

/// Tells the kernel side about the loops of a process that runs already: those idle in their
/// poll wait, and (with `busy_main`) a main thread that is busy (perhaps stuck) as we attach.
fn seed_running_loops(probes: &mut Probes, target: &Target, busy_main: bool) -> Result<()> {
    let main_epfd = target.main_loop_epfd();
    let main = main_epfd
        .and(target.libuv.default_loop_addr)
        .map(|loop_addr| KnownLoop {
            loop_addr,
            role: ROLE_MAIN,
            count: target.loop_count(loop_addr),
        });
    let now_ns = Clock::monotonic_ns();
    let mut main_idle = false;
    for idle in discover::threads_in_poll(target.pid) {
        if idle.tid == target.pid {
            if main_epfd.is_some_and(|main| main != idle.epfd) {
                continue; // a nested loop's poll (a long execSync): the main loop is busy
            }
            main_idle = true;
        }
        let known = if idle.tid == target.pid {
            main
        } else {
            target.sleeping_loop(&idle).map(|found| KnownLoop {
                loop_addr: found.loop_addr,
                role: if found.worker {
                    ROLE_WORKER
                } else {
                    ROLE_OTHER
                },
                count: target.loop_count(found.loop_addr),
            })
        };
        probes.seed_idle_thread(target.pid, &idle, known.as_ref(), now_ns)?;
        if known.is_some_and(|known| known.role == ROLE_WORKER) {
            // Named here, it never reaches the probes that start a worker's sampling.
            probes.sample_thread(target.pid, idle.tid)?;
        }
    }
    if busy_main && !main_idle {
        probes.seed_busy_main_thread(target.pid, main_epfd.unwrap_or(-1), main.as_ref(), now_ns)?;
    }
    Ok(())
}

/// Once a process's V8 is known, has the kernel side read the objects that its JS frames
/// point at when it takes a sample (they move with the GC).
fn read_v8_objects_in_samples(probes: &mut Probes, process: &mut Process) {
    if process.v8_layout_set {
        return;
    }
    let Some(js) = process
        .naming
        .as_ref()
        .and_then(|naming| naming.js.as_ref())
    else {
        return;
    };
    match probes.set_v8_layout(process.target.pid, js.kernel_layout()) {
        Ok(()) => process.v8_layout_set = true,
        Err(e) => warning!("JS frames named after the sample: {e}"),
    }
}

async fn watch(
    mut session: Session<'_>,
    target_pid: Option<u32>,
    child: Option<&StoppedChild>,
    listener: Option<std::net::TcpListener>,
) -> Result<ExitCode> {
    let args = session.args;
    // SAFETY: both values own their fds and keep them open for as long as the AsyncFd lives.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(session.probes.events()?, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("watching the ring buffer")?;
    let exited = match target_pid {
        // SAFETY: as above.
        Some(pid) => Some(
            unsafe { AsyncFd::register_with_interest(pidfd(pid)?, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
                .context("watching the target process")?,
        ),
        None => None,
    };
    session.refresh_metrics(Clock::monotonic_ns());
    if let (Some(listener), Some(metrics)) = (listener, session.metrics.as_ref()) {
        tokio::spawn(metrics::serve(listener, metrics.exposition()));
    }

    let mut state_poll = tokio::time::interval(STATE_POLL);
    let mut maps_refresh = tokio::time::interval(MAPS_REFRESH);
    let mut interval_timer = args
        .interval
        .map(|every| interval_at(Instant::now() + every, every));
    let mut window = 0u64;
    let deadline = async {
        match args.session.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => pending().await,
        }
    };
    tokio::pin!(deadline);
    let target_exited = async {
        match &exited {
            Some(fd) => {
                let _ = fd.readable().await;
            }
            None => pending().await,
        }
    };
    tokio::pin!(target_exited);
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;

    let end = loop {
        let step = tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting for the ring buffer")?;
                let step = session.drain(guard.get_inner_mut());
                guard.clear_ready();
                step
            }
            _ = state_poll.tick() => {
                let now_ns = Clock::monotonic_ns();
                session.look_at_execs(now_ns);
                session.refresh();
                let records = session.aggregator.ongoing(now_ns);
                session.report_all(records).and_then(|()| session.record_tick(now_ns))
            }
            _ = maps_refresh.tick() => {
                // Keep the memory maps current while the targets live, so that stacks of a
                // block that ends with an exit can still be named.
                let now_ns = Clock::monotonic_ns();
                session.refresh_naming();
                session.tend_fleet(now_ns);
                session.refresh();
                session.refresh_metrics(now_ns);
                Ok(())
            }
            () = tick(&mut interval_timer) => {
                session.refresh();
                let records = session.aggregator.interval(Clock::monotonic_ns(), window);
                window += 1;
                session.probes.set_window(window)?;
                session.report_all(records)
            }
            () = &mut target_exited => Err(End::TargetExited),
            () = &mut deadline => Err(End::Stopped),
            _ = sigint.recv() => Err(End::Stopped),
            _ = sigterm.recv() => Err(End::Stopped),
        };
        if let Err(end) = step {
            break end;
        }
    };
    // Whatever the kernel side still holds: blocks that ended with the exit, final counters.
    let _ = session.drain(ring.get_mut());
    session.finish(target_pid, &end)?;
    // A launched command that ended by itself passes its exit status on, like `time` does;
    // one still running when we stop is ended with us.
    let code = match (child, end) {
        (Some(child), End::TargetExited) => child.try_exit_code().unwrap_or(0),
        (Some(child), _) => {
            child.terminate(Duration::from_secs(2));
            0
        }
        (None, _) => 0,
    };
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

async fn tick(timer: &mut Option<Interval>) {
    match timer {
        Some(timer) => {
            timer.tick().await;
        }
        None => pending().await,
    }
}

fn pidfd(pid: u32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.cast_signed(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context(format!("pid {pid} is gone"));
    }
    // SAFETY: the kernel just gave us this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
