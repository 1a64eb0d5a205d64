//! One profiling session, wiring the pipeline stages together:
//! discover -> attach probes -> decode events -> aggregate -> report, until Ctrl-C, SIGTERM,
//! `--duration`, or the target's exit.

use std::{
    fs,
    future::pending,
    io,
    os::fd::{FromRawFd, OwnedFd},
    path::PathBuf,
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
    aggregate::{Aggregator, Record},
    cli::Args,
    decode::{Event, StackSample},
    discover::{self, Target},
    flame::Flame,
    launch::StoppedChild,
    probe::Probes,
    report::{Clock, Reporter},
    stacks,
    symbolize::Symbolizer,
    unwind::Unwinder,
    v8::JsNamer,
};

/// How often the per-thread state is read for ongoing blocks.
const STATE_POLL: Duration = Duration::from_millis(100);
/// How often the target's memory map is re-read for naming stacks.
const MAPS_REFRESH: Duration = Duration::from_secs(1);

pub fn run(args: &Args) -> Result<ExitCode> {
    if args.pid.is_none() && args.command.is_empty() {
        bail!("nothing to watch: give --pid PID, or a command after `--` (see --help)");
    }
    discover::preflight()?;

    // Fork before anything starts a thread.
    let (target, child) = if let Some(pid) = args.pid {
        (discover::target_for_pid(pid)?, None)
    } else {
        let libuv = discover::libuv_for_command(&args.command[0])?;
        let child = StoppedChild::spawn(&args.command, args.json)?;
        let comm = args.command[0]
            .to_string_lossy()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        (
            Target {
                pid: child.pid(),
                comm,
                libuv,
            },
            Some(child),
        )
    };

    let probes = attach(&target, args);
    let probes = match (probes, &child) {
        (Ok(probes), _) => probes,
        (Err(e), Some(child)) => {
            child.kill();
            return Err(e);
        }
        (Err(e), None) => return Err(e),
    };
    // Before saying we are ready: reading the target's unwind tables and symbols takes a moment.
    let naming = (!args.no_stacks).then(|| Naming::new(target.pid));
    eprintln!(
        "loopbpf: watching pid {} ({}), libuv in {}; blocks are busy intervals >= {}. Ctrl-C to end.",
        target.pid,
        target.comm,
        target.libuv.shown_as.display(),
        crate::report::human(args.threshold.as_nanos() as u64)
    );
    if let Some(child) = &child {
        child.resume();
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(watch(args, &target, probes, naming, child.as_ref()))
}

fn attach(target: &Target, args: &Args) -> Result<Probes> {
    let mut probes = Probes::load(target.pid, &target.libuv, args.threshold)?;
    probes.attach_tracepoints()?;
    probes
        .attach_uprobe(&target.libuv, target.pid)
        .with_context(|| format!("attaching to pid {} (did it exit?)", target.pid))?;
    // After attaching, so that a loop waking up meanwhile is seen by the probes, not lost.
    if args.command.is_empty() {
        seed_running_loops(&mut probes, target)?;
    }
    if !args.no_stacks {
        probes.attach_off_cpu()?;
        // The main thread is a loop thread from the start; workers are sampled once found.
        probes.sample_thread(target.pid, args.sample_rate)?;
    }
    Ok(probes)
}

/// Tells the kernel side about the loops of a process that runs already: those idle in their
/// poll wait, and a main thread that is busy (perhaps stuck) as we attach.
fn seed_running_loops(probes: &mut Probes, target: &Target) -> Result<()> {
    let main_epfd = target.main_loop_epfd();
    let now_ns = Clock::monotonic_ns();
    let mut main_idle = false;
    for idle in discover::threads_in_poll(target.pid) {
        if idle.tid == target.pid {
            if main_epfd.is_some_and(|main| main != idle.epfd) {
                continue; // a nested loop's poll (a long execSync): the main loop is busy
            }
            main_idle = true;
        }
        probes.seed_idle_thread(target.pid, &idle, now_ns)?;
    }
    if !main_idle {
        probes.seed_busy_main_thread(target.pid, main_epfd.unwrap_or(-1), now_ns)?;
    }
    Ok(())
}

/// Why the session ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    TargetExited,
    Stopped,
    OutputClosed,
}

/// The stages that name stacks: unwinding, JS frames from V8's heap, symbols.
struct Naming {
    pid: u32,
    unwinder: Unwinder,
    symbolizer: Symbolizer,
    /// `None` while the process has no V8 we can read (a launched command before its exec, a
    /// libuv program that is not Node, metadata we cannot use).
    js: Option<JsNamer>,
    /// The executable `js` was last looked for in: looked for again only when it changes.
    js_looked_in: Option<PathBuf>,
}

impl Naming {
    fn new(pid: u32) -> Self {
        let mut naming = Self {
            pid,
            unwinder: Unwinder::new(pid),
            symbolizer: Symbolizer::new(pid),
            js: None,
            js_looked_in: None,
        };
        naming.find_v8();
        naming
    }

    fn find_v8(&mut self) {
        let exe = fs::read_link(format!("/proc/{}/exe", self.pid)).ok();
        if self.js.is_some() || exe.is_none() || exe == self.js_looked_in {
            return;
        }
        self.js_looked_in = exe;
        match JsNamer::new(self.pid) {
            Ok(js) => self.js = js,
            Err(why) => eprintln!("loopbpf: warning: JS frames stay unnamed ([JS]): {why}"),
        }
    }

    /// Unwinds a sample and names its JS frames, then drops its stack copy.
    fn unwind(&mut self, sample: &mut StackSample) {
        self.unwinder.unwind(sample);
        if let Some(js) = self.js.as_mut() {
            sample.js = js.js_frames(sample);
        }
        sample.stack = Vec::new();
    }

    /// New mappings (a library loaded, a launched command's exec) since the last refresh.
    fn refresh(&mut self) {
        self.symbolizer.refresh();
        self.unwinder.refresh();
        self.find_v8();
    }
}

/// The running pipeline: kernel side, aggregation, naming, outputs.
struct Session<'a, W: io::Write> {
    args: &'a Args,
    probes: Probes,
    aggregator: Aggregator,
    reporter: Reporter<W>,
    /// `None` with `--no-stacks`.
    naming: Option<Naming>,
    flame: Flame,
    /// Lost events already warned about.
    dropped_warned: u64,
    /// Whether the kernel side reads V8 objects of sampled frames yet.
    v8_layout_set: bool,
}

impl<W: io::Write> Session<'_, W> {
    /// Reads every queued event; an exited loop thread's final state is taken and the entry
    /// freed.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> Result<(), End> {
        let mut records = Vec::new();
        while let Some(item) = ring.next() {
            match Event::decode(&item) {
                Ok(mut event) => {
                    self.follow_threads(&event);
                    if let (Event::Stack(sample), Some(naming)) = (&mut event, &mut self.naming) {
                        naming.unwind(sample);
                    }
                    records.extend(self.aggregator.on_event(event));
                }
                Err(e) => eprintln!("loopbpf: skipped a malformed event: {e}"),
            }
        }
        for tid in self.aggregator.take_exited_tids() {
            self.probes.forget_thread(tid);
        }
        self.report_all(records)
    }

    /// Starts sampling loop threads as they are found; takes the final state of those that exit.
    fn follow_threads(&mut self, event: &Event) {
        match *event {
            Event::LoopFound { tid, .. } if self.naming.is_some() => {
                if let Err(e) = self.probes.sample_thread(tid, self.args.sample_rate) {
                    eprintln!("loopbpf: no stack samples for thread {tid}: {e}");
                }
            }
            Event::LoopExit { tid, .. } => {
                self.probes.stop_sampling(tid);
                if let Some(state) = self.probes.thread(tid) {
                    self.aggregator.update_state(tid, &state);
                }
            }
            _ => {}
        }
    }

    fn refresh(&mut self) {
        for (tid, state) in self.probes.threads() {
            if state.exited_ns == 0 {
                self.aggregator.update_state(tid, &state);
            }
        }
    }

    /// Names the stacks of blocks (the symbolize stage), then reports.
    fn report_all(&mut self, mut records: Vec<Record>) -> Result<(), End> {
        let now_ns = Clock::monotonic_ns();
        for record in &mut records {
            self.name_stacks(record, matches!(record, Record::Block { .. }));
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
        let Some(naming) = self.naming.as_mut() else {
            return;
        };
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
        // New mappings (a library loaded, a launched command's exec) since the last refresh.
        naming.symbolizer.refresh();
        let named = stacks::profile(
            stacks,
            *duration_ns,
            &mut naming.symbolizer,
            naming.js.as_ref(),
        );
        if into_flame {
            self.flame.add(id, &named);
        }
        *profile = Some(named);
    }

    /// Once the target's V8 is known, has the kernel side read the objects that JS frames
    /// point at when it takes a sample (they move with the GC).
    fn read_v8_objects_in_samples(&mut self) {
        if self.v8_layout_set {
            return;
        }
        let Some(js) = self.naming.as_ref().and_then(|naming| naming.js.as_ref()) else {
            return;
        };
        match self.probes.set_v8_layout(js.kernel_layout()) {
            Ok(()) => self.v8_layout_set = true,
            Err(e) => eprintln!("loopbpf: warning: JS frames named after the sample: {e}"),
        }
    }

    /// Says so, at most once a second, when the kernel side could not hand events over: counts
    /// and stacks are then incomplete, and the user must know.
    fn warn_of_lost_events(&mut self) {
        let dropped = self.probes.dropped_events();
        if dropped > self.dropped_warned {
            eprintln!(
                "loopbpf: warning: {dropped} events lost so far (ring buffer full); blocks or stacks may be missing"
            );
            self.dropped_warned = dropped;
        }
    }

    /// The summary, then the `--folded` and `--flamegraph` files.
    fn finish(&mut self, pid: u32, end: &End, started_ns: u64) -> Result<()> {
        self.refresh();
        let now_ns = Clock::monotonic_ns();
        if *end == End::TargetExited && !self.aggregator.knows_loops() {
            eprintln!("loopbpf: pid {pid} exited before its event loop ran");
        }
        let dropped = self.probes.dropped_events();
        let summary = self
            .aggregator
            .summary(now_ns, dropped, now_ns - started_ns);
        match self.reporter.report(&summary, now_ns) {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e.into()),
            _ => {}
        }
        // A loop still stuck as we stop (Ctrl-C on a hung process) is blocked time too.
        for mut stuck in self.aggregator.still_blocked(now_ns) {
            self.name_stacks(&mut stuck, true);
        }
        self.write_files(pid)
    }

    /// Writes `--folded` and `--flamegraph` files.
    fn write_files(&self, pid: u32) -> Result<()> {
        if let Some(path) = &self.args.folded {
            self.flame.write_folded(path)?;
        }
        if let Some(path) = &self.args.flamegraph {
            let title = format!("loopbpf: blocked time of pid {pid}");
            self.flame.write_svg(path, &title)?;
        }
        Ok(())
    }
}

async fn watch(
    args: &Args,
    target: &Target,
    mut probes: Probes,
    naming: Option<Naming>,
    child: Option<&StoppedChild>,
) -> Result<ExitCode> {
    let clock = Clock::new();
    let started_ns = Clock::monotonic_ns();
    // SAFETY: both values own their fds and keep them open for as long as the AsyncFd lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(probes.events()?, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("watching the ring buffer")?;
    // SAFETY: as above.
    let exited = unsafe { AsyncFd::register_with_interest(pidfd(target.pid)?, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("watching the target process")?;
    let mut session = Session {
        args,
        probes,
        aggregator: Aggregator::new(args.threshold.as_nanos() as u64),
        reporter: Reporter::new(io::stdout().lock(), args.json, clock),
        naming,
        flame: Flame::default(),
        dropped_warned: 0,
        v8_layout_set: false,
    };
    session.read_v8_objects_in_samples();

    let mut state_poll = tokio::time::interval(STATE_POLL);
    let mut maps_refresh = tokio::time::interval(MAPS_REFRESH);
    let mut interval_timer = args
        .interval
        .map(|every| interval_at(Instant::now() + every, every));
    let mut window = 0u64;
    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => pending().await,
        }
    };
    tokio::pin!(deadline);
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
                session.refresh();
                let records = session.aggregator.ongoing(Clock::monotonic_ns());
                session.report_all(records)
            }
            _ = maps_refresh.tick() => {
                // Keep the memory map current while the target lives, so that stacks of a
                // block that ends with its exit can still be named.
                if let Some(naming) = session.naming.as_mut() {
                    naming.refresh();
                }
                session.read_v8_objects_in_samples();
                session.warn_of_lost_events();
                Ok(())
            }
            () = tick(&mut interval_timer) => {
                session.refresh();
                let records = session.aggregator.interval(Clock::monotonic_ns(), window);
                window += 1;
                session.probes.set_window(window)?;
                session.report_all(records)
            }
            _ = exited.readable() => Err(End::TargetExited),
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
    session.finish(target.pid, &end, started_ns)?;
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
