//! A watched process: how it is taken into the session (its loops told to the kernel side,
//! its sampling started, its naming stages set up) and how it is let go.

use anyhow::Result;

use super::Session;
use crate::{
    abi::{ROLE_MAIN, ROLE_OTHER, ROLE_WORKER},
    aggregate::leak::LeakWatch,
    discover::{self, Target},
    naming::v8::LimitsHit,
    output::clock::Clock,
    probe::{KnownLoop, Probes},
    target::{ProcessLabels, container::Placement, start_time},
};

/// How much of a process's loop state to tell the kernel side as it is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seed {
    /// It runs already: loops idle in their poll wait, and a main thread busy (or stuck) now.
    Running,
    /// It exec'd a moment ago: only loops already idle in their poll wait.
    Fresh,
    /// Its probes see it from its first iteration (a launched command), or they found it.
    Nothing,
}

/// A watched process.
pub(super) struct Process {
    pub(super) target: Target,
    pub(super) life: Lifetime,
    pub(super) labels: ProcessLabels,
    /// Whether the kernel side reads V8 objects of its sampled frames yet.
    pub(super) v8_layout_set: bool,
    /// Its memory after major GCs.
    pub(super) leak: LeakWatch,
    /// Where the limits on naming its JS frames left them unnamed, as its naming lane last
    /// said (once a second, and when the process is gone).
    pub(super) naming_limits: LimitsHit,
}

/// When a watched process lived.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Lifetime {
    /// With the pid, names the process: a reused pid is another process.
    pub(super) start_time: Option<u64>,
    /// When it was found gone: fleet mode keeps its summary line and metric series for
    /// `--keep-exited`.
    pub(super) gone_ns: Option<u64>,
}

impl Session<'_> {
    /// Times the GC pauses of the processes that run `target`'s libuv object; says once when
    /// that cannot be done.
    pub(super) fn attach_gc(&mut self, target: &Target, pid: Option<u32>, which: u32) {
        let shown = target.libuv.shown_as.display();
        match self.probes.attach_gc(&target.libuv, pid, which) {
            Ok(true) => {}
            Ok(false) => note!("no GC pauses for {shown}: V8's GC callbacks are not in it"),
            Err(e) => warning!("no GC pauses for {shown}: {e}"),
        }
    }

    /// Takes a process whose libuv is probed into the session.
    pub(super) fn watch(&mut self, target: Target, seed: Seed) -> Result<()> {
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
        if let Some(otlp) = self.otlp.as_mut() {
            otlp.name_process(pid, &labels);
        }
        if let Some(recorder) = self.recorder.as_mut() {
            recorder.name_process(pid, labels.clone());
        }
        // Reading the process's unwind tables and symbols takes a moment: on a naming lane.
        if !self.args.session.no_stacks {
            self.namers.watch(pid);
        }
        let process = Process {
            target,
            life: Lifetime {
                start_time,
                gone_ns: None,
            },
            labels,
            v8_layout_set: false,
            leak: LeakWatch::default(),
            naming_limits: LimitsHit::default(),
        };
        self.processes.insert(pid, process);
        Ok(())
    }

    /// A process exited or exec'd another program: stop naming its stacks; fleet mode keeps
    /// its lines and series for `--keep-exited`.
    pub(super) fn process_gone(&mut self, pid: u32, now_ns: u64) {
        let Some(process) = self.processes.get_mut(&pid) else {
            return;
        };
        if process.life.gone_ns.is_none() {
            process.life.gone_ns = Some(now_ns);
            self.namers.gone(pid);
            self.probes.forget_process(pid);
            self.probes.stop_sampling_process(pid);
        }
    }

    /// Forgets a gone process: its lines, series and kernel-side state, and the probes on its
    /// libuv file if no other process runs it.
    pub(super) fn forget_process(&mut self, pid: u32) {
        if let Some(process) = self.processes.remove(&pid) {
            self.release_if_unused(&process.target.libuv_file);
        }
        self.namers.gone(pid);
        self.reporter.forget_process(pid);
        if let Some(otlp) = self.otlp.as_mut() {
            otlp.forget_process(pid);
        }
        self.probes.forget_process(pid);
        self.probes.stop_sampling_process(pid);
        for tid in self.aggregator.forget_process(pid) {
            self.probes.forget_thread(tid);
            if let Some(metrics) = self.metrics.as_mut() {
                metrics.forget(pid, tid);
            }
        }
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

/// Once a process's V8 is known (its naming lane says so), has the kernel side read the
/// objects that its JS frames point at when it takes a sample (they move with the GC).
pub(super) fn read_v8_objects_in_samples(
    probes: &mut Probes,
    process: &mut Process,
    layout: crate::abi::V8Layout,
) {
    if process.v8_layout_set || process.life.gone_ns.is_some() {
        return;
    }
    match probes.set_v8_layout(process.target.pid, layout) {
        Ok(()) => process.v8_layout_set = true,
        Err(e) => warning!("JS frames named after the sample: {e}"),
    }
}
