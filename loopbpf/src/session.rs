//! One profiling session, wiring the pipeline stages together:
//! discover -> attach probes -> decode events -> aggregate -> report, until Ctrl-C, SIGTERM,
//! `--duration`, or the target's exit.

use std::{
    future::pending,
    io,
    os::fd::{FromRawFd, OwnedFd},
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
    decode::Event,
    discover::{self, Target},
    launch::StoppedChild,
    probe::Probes,
    report::{Clock, Reporter},
};

/// How often the per-thread state is read for ongoing blocks.
const STATE_POLL: Duration = Duration::from_millis(100);

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

    let probes = attach(&target, args.threshold);
    let probes = match (probes, &child) {
        (Ok(probes), _) => probes,
        (Err(e), Some(child)) => {
            child.kill();
            return Err(e);
        }
        (Err(e), None) => return Err(e),
    };
    eprintln!(
        "loopbpf: watching pid {} ({}), libuv in {}; blocks are busy intervals >= {}. Ctrl-C to end.",
        target.pid,
        target.comm,
        target.libuv.path.display(),
        crate::report::human(args.threshold.as_nanos() as u64)
    );
    if let Some(child) = &child {
        child.resume();
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(watch(args, &target, probes, child.as_ref()))
}

fn attach(target: &Target, threshold: Duration) -> Result<Probes> {
    let mut probes = Probes::load(target.pid, &target.libuv, threshold)?;
    for (tid, epfd) in discover::threads_in_poll(target.pid) {
        probes.seed_idle_thread(target.pid, tid, epfd)?;
    }
    probes.attach_tracepoints()?;
    probes
        .attach_uprobe(&target.libuv.path, target.pid)
        .with_context(|| format!("attaching to pid {} (did it exit?)", target.pid))?;
    Ok(probes)
}

/// Why the session ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    TargetExited,
    Stopped,
    OutputClosed,
}

async fn watch(
    args: &Args,
    target: &Target,
    mut probes: Probes,
    child: Option<&StoppedChild>,
) -> Result<ExitCode> {
    let clock = Clock::new();
    let started_ns = Clock::monotonic_ns();
    let mut reporter = Reporter::new(io::stdout().lock(), args.json, clock);
    let mut aggregator = Aggregator::new(args.threshold.as_nanos() as u64);
    // SAFETY: both values own their fds and keep them open for as long as the AsyncFd lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(probes.events()?, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("watching the ring buffer")?;
    // SAFETY: as above.
    let exited = unsafe { AsyncFd::register_with_interest(pidfd(target.pid)?, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("watching the target process")?;

    let mut state_poll = tokio::time::interval(STATE_POLL);
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
                let step = drain(guard.get_inner_mut(), &mut probes, &mut aggregator, &mut reporter);
                guard.clear_ready();
                step
            }
            _ = state_poll.tick() => {
                refresh(&probes, &mut aggregator);
                report_all(&mut reporter, &aggregator.ongoing(Clock::monotonic_ns()))
            }
            () = tick(&mut interval_timer) => {
                refresh(&probes, &mut aggregator);
                let records = aggregator.interval(Clock::monotonic_ns(), window);
                window += 1;
                probes.set_window(window)?;
                report_all(&mut reporter, &records)
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
    if end == End::OutputClosed {
        return Ok(ExitCode::SUCCESS);
    }

    // Whatever the kernel side still holds: blocks that ended with the exit, final counters.
    let _ = drain(ring.get_mut(), &mut probes, &mut aggregator, &mut reporter);
    refresh(&probes, &mut aggregator);
    let now_ns = Clock::monotonic_ns();
    if end == End::TargetExited && !aggregator.knows_loops() {
        eprintln!(
            "loopbpf: pid {} exited before its event loop ran",
            target.pid
        );
    }
    let summary = aggregator.summary(now_ns, probes.dropped_events(), now_ns - started_ns);
    match reporter.report(&summary, now_ns) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    let code = child.and_then(StoppedChild::try_exit_code).unwrap_or(0);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// Reads every queued event; an exited loop thread's final state is taken and the entry freed.
fn drain(
    ring: &mut RingBuf<MapData>,
    probes: &mut Probes,
    aggregator: &mut Aggregator,
    reporter: &mut Reporter<impl io::Write>,
) -> Result<(), End> {
    let mut records = Vec::new();
    while let Some(item) = ring.next() {
        match Event::decode(&item) {
            Ok(event) => {
                if let Event::LoopExit { tid, .. } = event
                    && let Some(state) = probes.thread(tid)
                {
                    aggregator.update_state(tid, &state);
                }
                records.extend(aggregator.on_event(event));
            }
            Err(e) => eprintln!("loopbpf: skipped a malformed event: {e}"),
        }
    }
    for tid in aggregator.exited_tids() {
        probes.forget_thread(tid);
    }
    report_all(reporter, &records)
}

fn refresh(probes: &Probes, aggregator: &mut Aggregator) {
    for (tid, state) in probes.threads() {
        if state.exited_ns == 0 {
            aggregator.update_state(tid, &state);
        }
    }
}

fn report_all(reporter: &mut Reporter<impl io::Write>, records: &[Record]) -> Result<(), End> {
    let now_ns = Clock::monotonic_ns();
    for record in records {
        if reporter.report(record, now_ns).is_err() {
            // Nobody reads our output any more (`loopbpf ... | head`): a normal end.
            return Err(End::OutputClosed);
        }
    }
    Ok(())
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
