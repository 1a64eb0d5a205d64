//! The session's work on each wake-up: events drained from the ring buffer, the kernel side's
//! per-thread state read, blocks' stacks named, records handed to the outputs.

use std::{collections::HashMap, io, time::Instant};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};

use tokio::sync::mpsc::UnboundedReceiver;

use super::{
    End, Session,
    naming::{BLOCK_LIMIT, ONGOING_LIMIT, Request, Waiting},
    process::{Seed, read_v8_objects_in_samples},
};
use crate::{
    abi::{ROLE_OTHER, ThreadState},
    aggregate::Record,
    decode::{Event, GcKind},
    discover,
    naming::{v8::LimitsHit, worker::Reply},
    output::{
        Named,
        clock::Clock,
        metrics::{Health, LoopView},
        otlp::Otlp,
    },
    probe::Losses,
    target::{ProcessLabels, proc::rss_of},
};

/// Stack records taken from their ring buffer in one turn of the session's loop: unwinding and
/// naming is the costly part of the pipeline, and control events and timers wait meanwhile.
const STACKS_PER_TURN: usize = 32;

/// How much of a ring buffer to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drain {
    /// Until it is empty.
    All,
    /// What it holds now, at most: stops where new records keep coming in.
    Queued,
    /// [`STACKS_PER_TURN`] records at most.
    Some,
}

/// Whether a drain emptied its ring buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drained {
    All,
    Some,
}

/// The main threads' major GCs read in one drain: per process, the newest one's end and how
/// many there were.
#[derive(Debug, Default)]
struct MajorGcs(HashMap<u32, (u64, u32)>);

impl MajorGcs {
    fn note(&mut self, pid: u32, end_ns: u64) {
        let (newest, count) = self.0.entry(pid).or_insert((end_ns, 0));
        *newest = (*newest).max(end_ns);
        *count += 1;
    }
}

impl Session<'_> {
    /// Reads queued events, as many as `how` says; an exited loop thread's final state is taken
    /// and the entry freed.
    pub(super) fn drain(
        &mut self,
        ring: &mut RingBuf<MapData>,
        how: Drain,
    ) -> Result<Drained, End> {
        let most = match how {
            Drain::All => usize::MAX,
            // As many stack records as their ring buffer holds.
            Drain::Queued => self.probes.stack_ring_records() + 1,
            Drain::Some => STACKS_PER_TURN,
        };
        let mut taken = 0;
        let mut drained = Drained::All;
        let mut major_gcs = MajorGcs::default();
        loop {
            if taken == most {
                drained = Drained::Some;
                break;
            }
            let Some(item) = ring.next() else { break };
            taken += 1;
            match Event::decode(&item) {
                Ok(event) => {
                    self.follow_threads(&event);
                    if let Event::Stack(sample) = event {
                        // Unwound and kept on its process's naming lane.
                        self.namers.sample(sample);
                        continue;
                    }
                    // Queued (their stacks asked for) right away: the samples after this event
                    // are of the thread's next busy interval.
                    if let Some((pid, end_ns)) = self.follow_gc(&event) {
                        major_gcs.note(pid, end_ns);
                    }
                    if let Some(record) = self.aggregator.on_event(&event) {
                        self.queue(record);
                    }
                }
                Err(e) => status!("skipped a malformed event: {e}"),
            }
        }
        self.namers.flush_samples();
        for (pid, (end_ns, count)) in major_gcs.0 {
            if let Some(leak) = self.memory_after_major_gc(pid, end_ns, count) {
                self.queue(leak);
            }
        }
        for tid in self.aggregator.take_exited_tids() {
            self.probes.forget_thread(tid);
        }
        self.report_ready().map(|()| drained)
    }

    /// Starts sampling loop threads as they are found; takes the final state of those that
    /// exit; in fleet mode, takes in processes found by their probes or by their exec.
    pub(super) fn follow_threads(&mut self, event: &Event) {
        match *event {
            Event::LoopFound { pid, tid, .. } => {
                if self.processes.contains_key(&pid) {
                    // Watched before its loop ran: a launched command watched before its exec,
                    // or a process taken in at its exec. Its lane looks for V8 (and re-reads
                    // its mappings) now, not at the next refresh, so that a block in its first
                    // second has its JS frames named.
                    self.namers.look_again(pid);
                } else if let Some(fleet) = self.fleet.as_mut()
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
                    fleet.exec_seen(pid, at_ns);
                }
            }
            _ => {}
        }
    }

    /// Counts a GC pause for the metrics; says the process and end of a main thread's major GC,
    /// whose process's memory is then looked at for a leak.
    pub(super) fn follow_gc(&mut self, event: &Event) -> Option<(u32, u64)> {
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
        self.poll.gc_pauses += 1;
        if let Some(metrics) = self.metrics.as_mut() {
            metrics.on_gc(pid, tid, kind, end_ns.saturating_sub(start_ns));
        }
        (kind == GcKind::Major && tid == pid).then_some((pid, end_ns))
    }

    /// The process's memory after its newest major GC (of `count` read in one drain: GC
    /// records wait for loopbpf's next look, so one reading of memory stands for them all).
    fn memory_after_major_gc(&mut self, pid: u32, end_ns: u64, count: u32) -> Option<Record> {
        let process = self.processes.get_mut(&pid)?;
        let leak = process.leak.after_major_gc(end_ns, rss_of(pid)?, count)?;
        let id = self.aggregator.loops().find(|l| l.id.tid == pid)?.id;
        Some(Record::Leak { id, leak })
    }

    /// About once a second, each process's resident memory for the leak rule on its floor.
    pub(super) fn sample_memory(&mut self, now_ns: u64) -> Vec<Record> {
        let mut leaks = Vec::new();
        for (&pid, process) in &mut self.processes {
            if process.life.gone_ns.is_some() || !process.leak.wants_sample(now_ns) {
                continue;
            }
            let Some(leak) = rss_of(pid).and_then(|rss| process.leak.sample(now_ns, rss)) else {
                continue;
            };
            if let Some(main) = self.aggregator.loops().find(|l| l.id.tid == pid) {
                leaks.push(Record::Leak { id: main.id, leak });
            }
        }
        leaks
    }

    pub(super) fn refresh(&mut self) {
        let threads = self.probes.threads();
        self.refresh_from(&threads);
    }

    /// Takes the threads' state as read from the kernel side.
    pub(super) fn refresh_from(&mut self, threads: &[(u32, ThreadState)]) {
        let mut unnamed = false;
        for (tid, state) in threads {
            let (tid, state) = (*tid, *state);
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
    pub(super) fn refresh_metrics(&mut self, now_ns: u64) {
        if self.metrics.is_none() {
            return;
        }
        let naming_limits = self.naming_limits();
        let Some(metrics) = self.metrics.as_mut() else {
            return;
        };
        let unknown = ProcessLabels::default();
        let loops: Vec<LoopView<'_>> = self
            .aggregator
            .loops()
            .map(|status| {
                let id = status.id;
                let process = self.processes.get(&id.pid);
                LoopView {
                    status,
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
                .filter(|p| p.life.gone_ns.is_none())
                .count() as u64,
            losses: self.probes.losses(),
            stacks_limited: self.probes.stacks_limited(),
            attach_failures: self.fleet.as_ref().map_or(0, |f| f.attach_failures),
            naming_limits,
            naming_timeouts: self.namers.timeouts,
            samples_dropped: self.namers.samples_dropped,
            otlp: self.otlp.as_ref().map(Otlp::counts),
        };
        metrics.refresh(now_ns, &loops, &health);
    }

    /// Where the limits on naming JS frames left them unnamed, by process.
    fn naming_limits(&self) -> Vec<(u32, LimitsHit)> {
        let mut limits: Vec<(u32, LimitsHit)> = self
            .processes
            .iter()
            .map(|(&pid, p)| (pid, p.naming_limits))
            .collect();
        limits.sort_by_key(|&(pid, _)| pid);
        limits
    }

    /// `loopbpf record`, once a state poll: the timeline, the actions, the bundle so far; ends
    /// the session once `--stop-after-blocks` is reached.
    pub(super) fn record_tick(&mut self, now_ns: u64) -> Result<(), End> {
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

    /// Queues records to report, in order; a block or ongoing block first has its stacks
    /// named on its process's naming lane.
    pub(super) fn report_all(&mut self, records: Vec<Record>) -> Result<(), End> {
        for record in records {
            self.queue(record);
        }
        self.report_ready()
    }

    /// Counts a block for the metrics and queues it (any record) for reporting.
    fn queue(&mut self, record: Record) {
        if let (
            Record::Block {
                id,
                duration_ns,
                cpu_wait_ns,
                ..
            },
            Some(metrics),
        ) = (&record, self.metrics.as_mut())
        {
            metrics.on_block(id.pid, id.tid, *duration_ns, *cpu_wait_ns);
        }
        self.enqueue(record, Clock::monotonic_ns(), false);
    }

    /// Queues a record; asks for its stacks if it is a block or an ongoing block.
    fn enqueue(&mut self, record: Record, now_ns: u64, final_only: bool) {
        let (id, start_ns, duration_ns, keep, limit) = match &record {
            Record::Block {
                id,
                start_ns,
                duration_ns,
                ..
            } => (*id, *start_ns, *duration_ns, false, BLOCK_LIMIT),
            Record::Ongoing {
                id,
                start_ns,
                duration_ns,
                ..
            } => (*id, *start_ns, *duration_ns, !final_only, ONGOING_LIMIT),
            _ => {
                self.waiting.push_back(Waiting {
                    record,
                    now_ns,
                    wait: None,
                    profile: None,
                    into_flame: false,
                    timed_out: false,
                    final_only,
                });
                return;
            }
        };
        // With `--no-stacks` no process is given to a lane: nothing to wait for.
        let (wait, timed_out) =
            match self
                .namers
                .request(id.pid, id.tid, start_ns, duration_ns, keep)
            {
                Request::Sent(ticket) => (Some((ticket, Instant::now() + limit)), false),
                Request::NoNaming => (None, false),
                Request::Full => {
                    self.namers.timeouts += 1;
                    (None, true)
                }
            };
        self.waiting.push_back(Waiting {
            into_flame: matches!(record, Record::Block { .. }) || final_only,
            record,
            now_ns,
            wait,
            profile: None,
            timed_out,
            final_only,
        });
    }

    /// What a naming lane sent back: a record's stacks, or a process's V8 layout.
    pub(super) fn on_reply(&mut self, reply: Reply) {
        match reply {
            Reply::Named { ticket, profile } => {
                if let Some(waiting) = self
                    .waiting
                    .iter_mut()
                    .find(|w| w.wait.is_some_and(|(t, _)| t == ticket))
                {
                    waiting.wait = None;
                    waiting.profile = profile;
                }
            }
            Reply::V8Layout { pid, layout } => {
                if let Some(process) = self.processes.get_mut(&pid) {
                    read_v8_objects_in_samples(&mut self.probes, process, layout);
                }
            }
            Reply::Watched { .. } => {}
            Reply::Limits { pid, hit } => {
                if let Some(process) = self.processes.get_mut(&pid) {
                    process.naming_limits = hit;
                }
            }
        }
    }

    /// When the next waiting record's time is up, if one waits.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.waiting
            .iter()
            .filter_map(|w| w.wait.map(|(_, due)| due))
            .min()
    }

    /// Reports the waiting records whose stacks are named or whose time is up (those go
    /// without their stacks), each after the earlier records of its process: a process's
    /// records keep their order, and a slow process holds up no other's.
    pub(super) fn report_ready(&mut self) -> Result<(), End> {
        let now = Instant::now();
        let mut held: Vec<u32> = Vec::new();
        let mut index = 0;
        while index < self.waiting.len() {
            let waiting = &self.waiting[index];
            let pid = record_pid(&waiting.record);
            let waits = waiting.wait.is_some_and(|(_, due)| due > now);
            if waits || pid.is_some_and(|pid| held.contains(&pid)) {
                held.extend(pid);
                index += 1;
                continue;
            }
            let Some(mut waiting) = self.waiting.remove(index) else {
                break;
            };
            if waiting.wait.is_some() {
                waiting.timed_out = true;
                self.namers.timeouts += 1;
            }
            self.report_one(&waiting)?;
        }
        Ok(())
    }

    fn report_one(&mut self, waiting: &Waiting) -> Result<(), End> {
        if let (true, Some(profile), Record::Block { id, .. } | Record::Ongoing { id, .. }) = (
            waiting.into_flame && self.keeps_flame(),
            &waiting.profile,
            &waiting.record,
        ) {
            self.flame.add(id, profile);
        }
        if let (
            Record::Block {
                id, duration_ns, ..
            },
            Some(metrics),
            Some(route),
            false,
        ) = (
            &waiting.record,
            self.metrics.as_mut(),
            waiting
                .profile
                .as_ref()
                .and_then(|p| p.request.as_ref()?.route.as_deref()),
            waiting.final_only,
        ) {
            metrics.on_route_block(id.pid, id.tid, route, *duration_ns);
        }
        let named = Named {
            record: &waiting.record,
            profile: waiting.profile.as_ref(),
            naming_timed_out: waiting.timed_out,
        };
        if let Some(recorder) = self.recorder.as_mut() {
            recorder.take(named, waiting.now_ns);
        }
        if let Some(otlp) = self.otlp.as_mut() {
            otlp.take(named);
        }
        if !waiting.final_only && self.reporter.report(named, waiting.now_ns).is_err() {
            // Nobody reads our output any more (`loopbpf ... | head`): a normal end.
            return Err(End::OutputClosed);
        }
        Ok(())
    }

    /// Reports every waiting record, each once its stacks are named or its time is up.
    async fn settle(&mut self, replies: &mut UnboundedReceiver<Reply>) -> Result<(), End> {
        self.report_ready()?;
        while let Some(due) = self.next_due() {
            tokio::select! {
                reply = replies.recv() => match reply {
                    Some(reply) => self.on_reply(reply),
                    None => break,
                },
                () = tokio::time::sleep_until(due.into()) => {}
            }
            self.report_ready()?;
        }
        self.report_ready()
    }

    /// Once a second: current memory maps for naming (V8 layouts come back once found), stuck
    /// naming lanes, lost events and samples.
    pub(super) fn refresh_naming(&mut self) {
        self.namers.refresh();
        self.warn_of_lost_events();
    }

    /// Says so, at most once a second, when the kernel side could not hand events over, held
    /// a process's stacks back, or had a full map: the output then misses something, and the
    /// user must know what and whose.
    pub(super) fn warn_of_lost_events(&mut self) {
        let losses = self.probes.losses();
        let warned = self.losses_warned;
        if losses.events() > warned.events() {
            loss!(
                "{} events lost so far (ring buffer full): {} control events (loops found, blocks, exits, GC pauses), {} stacks; blocks or stacks may be missing",
                losses.events(),
                losses.control,
                losses.stacks,
            );
        }
        for (i, (map, entries)) in Losses::MAPS.into_iter().enumerate() {
            if losses.map_full[i] > 0 && warned.map_full[i] == 0 {
                loss!(
                    "the kernel map `{map}` is full ({entries} entries): {}",
                    match map {
                        "threads" => "loop threads beyond it are not watched",
                        "asleep" => "off-CPU stacks of busy loop threads are missing",
                        "libuvs" => "programs beyond it are not watched",
                        _ => "JS frames of processes beyond it are not named",
                    }
                );
            }
        }
        let rate = self.stack_rate;
        let limited_now = self.probes.stacks_limited();
        self.limited_warned
            .retain(|pid, _| limited_now.iter().any(|(of, _)| of == pid));
        for (pid, limited) in limited_now {
            let before = self.limited_warned.insert(pid, limited).unwrap_or(0);
            if limited > before {
                loss!(
                    "{limited} stacks of pid {pid} dropped so far by the per-process limit ({rate}/s); its blocks are all reported, with fewer stacks"
                );
            }
        }
        self.losses_warned = losses;
        if let Some(otlp) = self.otlp.as_mut() {
            otlp.warn_of_drops(false);
        }
        let samples = self.namers.samples_dropped;
        if samples > self.samples_dropped_warned {
            loss!(
                "{samples} stack samples dropped so far (naming fell behind); stacks may be missing"
            );
            self.samples_dropped_warned = samples;
        }
    }

    /// Whether blocked time is kept as folded stacks: only for an output that shows it. Its
    /// lines are per process, so under churn (`--all` on a host of short-lived processes) they
    /// grow with every block (measured: +4 MB a minute at 12 blocks a second).
    fn keeps_flame(&self) -> bool {
        self.args.folded.is_some() || self.args.flamegraph.is_some() || self.recorder.is_some()
    }

    /// The summary, then the `--folded` and `--flamegraph` files.
    pub(super) async fn finish(
        &mut self,
        target_pid: Option<u32>,
        end: &End,
        replies: &mut UnboundedReceiver<Reply>,
    ) -> Result<()> {
        // The blocks still waiting for their stacks come before the summary.
        let _ = self.settle(replies).await;
        self.refresh();
        self.warn_of_lost_events();
        let now_ns = Clock::monotonic_ns();
        if let Some(pid) = target_pid
            && *end == End::TargetExited
            && !self.aggregator.knows_loops()
        {
            status!("pid {pid} exited before its event loop ran");
        }
        let dropped = self.probes.losses().events();
        let mut summary = self
            .aggregator
            .summary(now_ns, dropped, now_ns - self.started_ns);
        if let Record::Summary { naming_limits, .. } = &mut summary {
            *naming_limits = self.naming_limits();
            naming_limits.retain(|(_, hit)| *hit != LimitsHit::default());
        }
        match self.reporter.report(Named::bare(&summary), now_ns) {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e.into()),
            _ => {}
        }
        // A loop still stuck as we stop (Ctrl-C on a hung process) is blocked time too.
        for stuck in self.aggregator.still_blocked(now_ns) {
            self.enqueue(stuck, now_ns, true);
        }
        let _ = self.settle(replies).await;
        let timeouts = self.namers.timeouts;
        if timeouts > 0 {
            loss!("{timeouts} blocks reported without stacks: naming them took too long");
        }
        if let Some(recorder) = self.recorder.as_mut() {
            recorder.take(Named::bare(&summary), now_ns);
            recorder.finish(&self.flame)?;
        }
        if let Some(otlp) = self.otlp.as_mut() {
            otlp.finish(crate::output::otlp::FINISH_WAIT);
        }
        self.write_files(target_pid)
    }

    /// Writes `--folded` and `--flamegraph` files.
    pub(super) fn write_files(&self, target_pid: Option<u32>) -> Result<()> {
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

/// The process a record is about.
fn record_pid(record: &Record) -> Option<u32> {
    match record {
        Record::Block { id, .. }
        | Record::Ongoing { id, .. }
        | Record::Interval { id, .. }
        | Record::Leak { id, .. } => Some(id.pid),
        Record::Summary { .. } => None,
    }
}
