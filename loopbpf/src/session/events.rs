//! The session's work on each wake-up: events drained from the ring buffer, the kernel side's
//! per-thread state read, blocks' stacks named, records handed to the outputs.

use std::io;

use anyhow::Result;
use aya::maps::{MapData, RingBuf};

use super::{
    End, Session,
    process::{Seed, read_v8_objects_in_samples},
};
use crate::{
    abi::{ROLE_OTHER, RawStackEvent, STACK_RING_BYTES},
    aggregate::Record,
    decode::{Event, GcKind},
    discover,
    naming::{
        Naming,
        stacks::{self, BlockProfile, Sample},
        v8::LimitsHit,
    },
    output::{
        Named,
        clock::Clock,
        metrics::{Health, LoopView},
    },
    probe::Losses,
    target::{
        ProcessLabels,
        proc::{Process, rss_of},
    },
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
            Drain::Queued => (STACK_RING_BYTES / size_of::<RawStackEvent>() as u64) as usize + 1,
            Drain::Some => STACKS_PER_TURN,
        };
        let mut records = Vec::new();
        let mut taken = 0;
        let mut drained = Drained::All;
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
                        let sample = match self.naming_of(sample.of.pid) {
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
        self.report_all(&records).map(|()| drained)
    }

    /// Starts sampling loop threads as they are found; takes the final state of those that
    /// exit; in fleet mode, takes in processes found by their probes or by their exec.
    pub(super) fn follow_threads(&mut self, event: &Event) {
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
                    fleet.exec_seen(pid, at_ns);
                }
            }
            _ => {}
        }
    }

    /// Counts a GC pause for the metrics; after a major GC of a main thread, looks at the
    /// process's memory for a leak.
    pub(super) fn follow_gc(&mut self, event: &Event) -> Option<Record> {
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
        let id = self.aggregator.loops().find(|l| l.id.tid == tid)?.id;
        Some(Record::Leak { id, leak })
    }

    pub(super) fn refresh(&mut self) {
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
        };
        metrics.refresh(now_ns, &loops, &health);
    }

    /// Where the limits on naming JS frames left them unnamed, by process.
    fn naming_limits(&self) -> Vec<(u32, LimitsHit)> {
        let mut limits: Vec<(u32, LimitsHit)> = self
            .processes
            .iter()
            .map(|(&pid, p)| {
                let hit = p.naming.as_ref().map(Naming::limits_hit);
                (pid, hit.unwrap_or(p.naming_limits_at_end))
            })
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

    /// Names the stacks of blocks (the symbolize stage), then reports.
    pub(super) fn report_all(&mut self, records: &[Record]) -> Result<(), End> {
        let now_ns = Clock::monotonic_ns();
        for record in records {
            if let (
                Record::Block {
                    id, duration_ns, ..
                },
                Some(metrics),
            ) = (record, self.metrics.as_mut())
            {
                metrics.on_block(id.pid, id.tid, *duration_ns);
            }
            let profile = self.name_stacks(record, matches!(record, Record::Block { .. }));
            let named = Named {
                record,
                profile: profile.as_ref(),
            };
            if let Some(recorder) = self.recorder.as_mut() {
                recorder.take(named, now_ns);
            }
            if self.reporter.report(named, now_ns).is_err() {
                // Nobody reads our output any more (`loopbpf ... | head`): a normal end.
                return Err(End::OutputClosed);
            }
        }
        Ok(())
    }

    /// Weights and names the stacks of a block or ongoing block (`None` for other records, and
    /// for a process without naming); `into_flame` adds them to the blocked time of `--folded`
    /// and `--flamegraph`.
    pub(super) fn name_stacks(
        &mut self,
        record: &Record,
        into_flame: bool,
    ) -> Option<BlockProfile> {
        let (Record::Block {
            id,
            duration_ns,
            stacks,
            ..
        }
        | Record::Ongoing {
            id,
            duration_ns,
            stacks,
            ..
        }) = record
        else {
            return None;
        };
        let naming = self.processes.get_mut(&id.pid)?.naming.as_mut()?;
        // New mappings (a library loaded, a launched command's exec) since the last refresh.
        naming.symbolizer.refresh();
        // A worker's heap goes with its thread: read after that, memory another isolate reuses
        // could give a frame a wrong name. Its JS frames stay unnamed ([JS]) instead.
        let heap_alive = id.tid == id.pid || Process::new(id.pid).has_task(id.tid);
        let named = stacks::profile(
            stacks,
            *duration_ns,
            &mut naming.symbolizer,
            naming.js.as_ref().filter(|_| heap_alive),
        );
        if into_flame {
            self.flame.add(id, &named);
        }
        Some(named)
    }

    /// Once a second: current memory maps for naming, V8 layouts, lost events.
    pub(super) fn refresh_naming(&mut self) {
        for process in self.processes.values_mut() {
            if let Some(naming) = process.naming.as_mut() {
                naming.refresh();
            }
            read_v8_objects_in_samples(&mut self.probes, process);
        }
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
    }

    /// The summary, then the `--folded` and `--flamegraph` files.
    pub(super) fn finish(&mut self, target_pid: Option<u32>, end: &End) -> Result<()> {
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
            let profile = self.name_stacks(&stuck, true);
            if let Some(recorder) = self.recorder.as_mut() {
                let named = Named {
                    record: &stuck,
                    profile: profile.as_ref(),
                };
                recorder.take(named, now_ns);
            }
        }
        if let Some(recorder) = self.recorder.as_mut() {
            recorder.take(Named::bare(&summary), now_ns);
            recorder.finish(&self.flame)?;
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
