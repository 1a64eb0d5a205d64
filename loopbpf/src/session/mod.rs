//! One profiling session, wiring the pipeline stages together:
//! discover -> attach probes -> decode events -> aggregate -> report and serve metrics, until
//! Ctrl-C, SIGTERM, `--duration`, or the target's exit.
//!
//! A session watches a set of processes: the one of `--pid` or of a launched command, or, with
//! `--all`, every libuv process of the host, which comes and goes: those running at the start,
//! those that exec a libuv program later (the exec tracepoint says when), and those that start
//! a program already probed (its uprobe finds their loops).

mod events;
mod fleet;
mod launch;
mod naming;
mod poll;
mod process;
mod reconcile;
mod wake;

use std::{
    collections::{BTreeMap, VecDeque},
    future::pending,
    io,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc::{UnboundedReceiver, error::TryRecvError},
    time::{Instant, interval_at},
};

use crate::{
    aggregate::Aggregator,
    cli::{Args, RecordArgs},
    discover::{self, Target},
    naming::worker::{LaneOptions, Reply},
    output::{
        clock::{Clock, human},
        flame::Flame,
        metrics::{self, Metrics},
        otlp::{self, Otlp},
        record::Recorder,
        report::Reporter,
    },
    probe::{Losses, Probes},
    target::files::FileId,
};
use events::{Drain, Drained};
use fleet::Fleet;
use launch::{RunAs, StoppedChild};
use naming::{Namers, Waiting};
use process::{Process, Seed};
use wake::{ring_fd, tick, until, watch_exit};

/// How often the per-thread state is read, the targets' memory maps are re-read for naming
/// stacks, gone processes are looked for, and metrics are rendered (`poll`: what is done
/// between these ticks).
const TICK: Duration = Duration::from_secs(1);

/// How long a session with one target waits for its naming to be set up before watching.
const FIRST_NAMING_WAIT: Duration = Duration::from_secs(10);

/// Runs the parsed command line: a session that reports on the terminal, or, with `record`, one
/// whose output is an evidence bundle.
pub fn run(args: &Args) -> Result<ExitCode> {
    let (args, record) = args.resolve();
    crate::diag::set_quiet(args.session.quiet);
    // One malloc arena: glibc gives each naming lane an arena of its own, and what one thread
    // frees there is not used by another (measured with 50 node processes: 106 MB of RSS with
    // per-thread arenas, 78 MB with one, at the same CPU).
    // SAFETY: mallopt only sets an allocator parameter; no thread is running yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    run_with(&args, record)
}

fn run_with(args: &Args, record: Option<&RecordArgs>) -> Result<ExitCode> {
    if !args.session.all && args.session.pid.is_none() && args.command.is_empty() {
        bail!("nothing to watch: give --pid PID, --all, or a command after `--` (see --help)");
    }
    discover::preflight()?;
    let listener = args.metrics.map(metrics::bind).transpose()?;
    let otlp = match otlp::Config::resolve(
        args.session.otlp.as_deref(),
        args.session.service_name.as_deref(),
        |name| std::env::var(name).ok(),
    ) {
        Ok(config) => config,
        Err(e) if args.session.otlp.is_some() => return Err(e),
        // Variables set for the apps of this shell do not keep loopbpf from running.
        Err(e) => {
            warning!("{e:#}; blocks are not exported as OTLP spans");
            None
        }
    };

    // Fork before anything starts a thread.
    let (target, child) = if args.session.all {
        (None, None)
    } else if let Some(pid) = args.session.pid {
        (Some(discover::target_for_pid(pid)?), None)
    } else {
        let libuv = discover::libuv_for_command(&args.command[0])?;
        let run_as = RunAs::choose(args.user.as_deref())?;
        match &run_as {
            Some(user) if user.uid != 0 => {}
            // SAFETY: geteuid has no preconditions.
            _ if unsafe { libc::geteuid() } == 0 => status!(
                "running `{}` as root (--user USER runs it as another user)",
                args.command[0].to_string_lossy()
            ),
            _ => {}
        }
        let child = StoppedChild::spawn(&args.command, args.json, run_as.as_ref())?;
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
    let session = Session::start(args, target.as_ref(), recorder, otlp);
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
    if let Some(otlp) = &session.otlp {
        status!("blocks exported as OTLP spans to {}", otlp.describe());
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
    /// `--otlp`: blocks as OpenTelemetry spans.
    otlp: Option<Otlp>,
    /// The naming lanes, which unwind and name stacks off this thread.
    namers: Namers,
    /// What they send back; taken by the select loop.
    replies: Option<UnboundedReceiver<Reply>>,
    /// Records waiting, in order, to be reported (for their stacks to be named first).
    waiting: VecDeque<Waiting>,
    /// Dropped samples already warned about.
    samples_dropped_warned: u64,
    flame: Flame,
    /// Losses already warned about.
    losses_warned: Losses,
    /// Stacks dropped by the per-process limit already warned about, by process.
    limited_warned: BTreeMap<u32, u64>,
    /// That limit, in stack records a second.
    stack_rate: u64,
    started_ns: u64,
    /// The periodic work's memory between ticks.
    poll: poll::Poll,
}

impl<'a> Session<'a> {
    /// Loads and attaches the kernel side, for `target` or (`None`) for the whole host.
    fn start(
        args: &'a Args,
        target: Option<&Target>,
        recorder: Option<Recorder>,
        otlp: Option<otlp::Config>,
    ) -> Result<Self> {
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
        let (namers, replies) = Namers::new(LaneOptions {
            threshold_ns: args.session.threshold.as_nanos() as u64,
            keep_query: args.session.request_query,
        });
        let otlp = otlp
            .map(|config| Otlp::start(config, Clock::new()))
            .transpose()?;
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
            otlp,
            namers,
            replies: Some(replies),
            waiting: VecDeque::new(),
            samples_dropped_warned: 0,
            flame: Flame::default(),
            losses_warned: Losses::default(),
            limited_warned: BTreeMap::new(),
            stack_rate: Probes::stack_rate(stacks_hz).unwrap_or(0),
            started_ns: Clock::monotonic_ns(),
            poll: poll::Poll::default(),
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
            session.await_naming(target.pid);
        }
        Ok(session)
    }

    /// One target: before its first block, its naming is set up and the kernel side reads its
    /// JS frames' objects, as long as that takes at most [`FIRST_NAMING_WAIT`] (there is no
    /// other process to hold up).
    fn await_naming(&mut self, pid: u32) {
        if self.args.session.no_stacks {
            return;
        }
        let Some(mut replies) = self.replies.take() else {
            return;
        };
        let until = std::time::Instant::now() + FIRST_NAMING_WAIT;
        while std::time::Instant::now() < until {
            match replies.try_recv() {
                Ok(Reply::Watched { pid: of }) if of == pid => break,
                Ok(reply) => self.on_reply(reply),
                Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(5)),
                Err(TryRecvError::Disconnected) => break,
            }
        }
        self.replies = Some(replies);
    }
}

async fn watch(
    mut session: Session<'_>,
    target_pid: Option<u32>,
    child: Option<&StoppedChild>,
    listener: Option<std::net::TcpListener>,
) -> Result<ExitCode> {
    let args = session.args;
    let mut control = ring_fd(session.probes.control_events()?, "the control events")?;
    let mut stacks = ring_fd(session.probes.stack_events()?, "the stack records")?;
    let exited = target_pid.map(watch_exit).transpose()?;
    let mut replies = session
        .replies
        .take()
        .context("the naming replies are taken once")?;
    session.refresh_metrics(Clock::monotonic_ns());
    if let (Some(listener), Some(metrics)) = (listener, session.metrics.as_ref()) {
        tokio::spawn(metrics::serve(listener, metrics.exposition()));
    }

    let mut ticks = tokio::time::interval(TICK);
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
        let due = session.next_due();
        let poll_due = session.next_poll();
        let step = tokio::select! {
            // Control events first: a flood of stacks only delays them, never drops them. The
            // stacks already queued go in before them, so that a block's stacks reach its naming
            // lane before the block does.
            biased;
            guard = control.readable_mut() => {
                let mut guard = guard.context("waiting for the control events")?;
                let _ = session.drain(stacks.get_mut(), Drain::Queued);
                let step = session.drain(guard.get_inner_mut(), Drain::All);
                guard.clear_ready();
                step.map(drop)
            }
            Some(reply) = replies.recv() => {
                session.on_reply(reply);
                session.report_ready()
            }
            () = until(due) => session.report_ready(),
            guard = stacks.readable_mut() => {
                // A few at a time, the control events and timers getting their turn between.
                let mut guard = guard.context("waiting for the stack records")?;
                if session.drain(guard.get_inner_mut(), Drain::Some) == Ok(Drained::All) {
                    guard.clear_ready();
                }
                Ok(())
            }
            _ = ticks.tick() => session.poll_state(stacks.get_mut(), control.get_mut(), true),
            () = until(poll_due) => session.poll_state(stacks.get_mut(), control.get_mut(), false),
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
    let _ = session.drain(stacks.get_mut(), Drain::Queued);
    let _ = session.drain(control.get_mut(), Drain::All);
    session.finish(target_pid, &end, &mut replies).await?;
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
