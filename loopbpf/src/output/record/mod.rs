//! Incident mode (`loopbpf record`): an output that keeps the evidence in a directory instead
//! of printing it, and takes an action (a core dump, a signal, a command) while a loop is still
//! blocked, so that the culprit is on the stack when it runs.
//!
//! The bundle: report.txt and report.json (the blocks with their stacks, the summary, ELU over
//! time, the actions taken), flamegraph.svg (blocked time only), timeline.svg (each loop
//! thread's busy and idle time, every block marked) and index.html, which shows it all from
//! disk. It is rewritten every few seconds while recording, each file replaced whole, so a
//! recording cut short (a hung target, a kill) still leaves the evidence so far. The directory
//! and everything in it is private to loopbpf's user ([`bundle`]).

mod bundle;
mod page;
mod timeline;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    fs, io,
    os::{fd::OwnedFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    aggregate::{
        LoopId, Record,
        usage::{LoopStatus, Usage},
    },
    cli::{BlockAction, RecordArgs},
    naming::{
        frame::{Frame, FrameKind},
        stacks::BlockProfile,
    },
    output::{
        Named,
        clock::{Clock, human, ms},
        flame::Flame,
        json,
        report::Reporter,
        safe_json,
    },
    target::{ProcessLabels, proc::Process},
};

/// How often the bundle is rewritten while something changed.
const REWRITE_EVERY: Duration = Duration::from_secs(2);
/// How long the end of a recording waits for actions still under way (a core dump being
/// written, a heap snapshot the target has not finished).
const ACTIONS_GRACE: Duration = Duration::from_secs(30);

/// One action taken, and what came of it.
#[derive(Debug)]
struct Trigger {
    action: BlockAction,
    id: LoopId,
    at_ns: u64,
    /// How long the loop had been blocked when the action was taken.
    blocked_ns: u64,
    /// `gcore` or the command, while it runs.
    child: Option<Child>,
    /// A heap snapshot is awaited in the target's working directory.
    snapshot_dir: Option<PathBuf>,
    /// The file the action produced (a core, a heap snapshot), as loopbpf can open it.
    file: Option<PathBuf>,
    /// How it ended: "done", "exit status 1", "failed: ...", or `None` while under way.
    outcome: Option<String>,
}

impl Trigger {
    fn json(&self, clock: Clock) -> json::Trigger {
        json::Trigger {
            action: self.action.to_string(),
            at_unix_ms: clock.unix_ms(self.at_ns),
            blocked_ms: ms(self.blocked_ns),
            file: self.file.as_ref().map(|f| f.display().to_string()),
            outcome: self.outcome.as_deref().unwrap_or("under way").to_owned(),
            pid: self.id.pid,
            size_bytes: self
                .file
                .as_ref()
                // A heap snapshot is in the target's directory: never another file it links to.
                .and_then(|f| fs::symlink_metadata(f).ok())
                .map(|m| m.len()),
            thread: self.id.label.kind(),
            tid: self.id.tid,
        }
    }

    fn done(&self) -> bool {
        self.outcome.is_some()
    }
}

/// ELU of one loop thread over the recording, a point per state poll.
#[derive(Debug)]
struct Track {
    id: LoopId,
    /// (time, ELU since the previous point).
    points: Vec<(u64, f64)>,
    last: Option<Usage>,
}

/// A record as report.json and report.txt carry it.
struct Rendered<T> {
    json: T,
    text: String,
}

/// The newest report of a block still going on.
struct Ongoing {
    json: json::Block,
    text: String,
    mark: Mark,
    profile: Option<BlockProfile>,
}

/// A block on the timeline.
#[derive(Debug, Clone)]
struct Mark {
    id: LoopId,
    start_ns: u64,
    duration_ns: u64,
    ongoing: bool,
    /// The heaviest stack's leaf-most frame above the plumbing, for the timeline's tooltip.
    culprit: Option<String>,
}

pub struct Recorder {
    bundle: bundle::Bundle,
    out: PathBuf,
    what: String,
    clock: Clock,
    threshold_ns: u64,
    started_ns: u64,
    action: Option<BlockAction>,
    on_block_min_ns: u64,
    max_triggers: u32,
    stop_after_blocks: Option<u64>,
    /// The terminal's text and JSON renderings of every record: report.txt and report.json
    /// say what the terminal would have said.
    text: Reporter<Vec<u8>>,
    json: Reporter<Vec<u8>>,
    /// Ended blocks, in order.
    blocks: Vec<Rendered<json::Block>>,
    /// The newest report of each block still going on, by (tid, start).
    ongoing: BTreeMap<(u32, u64), Ongoing>,
    summary: Option<Rendered<json::Summary>>,
    marks: Vec<Mark>,
    tracks: BTreeMap<u32, Track>,
    triggers: Vec<Trigger>,
    /// Busy intervals an action was taken for already, by (tid, start).
    triggered: HashSet<(u32, u64)>,
    worst_ns: u64,
    dirty: bool,
    written_at: Option<Instant>,
    progress: bool,
    /// A pidfd of every watched process, taken when it was found: `--on-block signal:` goes
    /// to that process, never to another that got its pid after it exited.
    pidfds: HashMap<u32, OwnedFd>,
}

/// How many pidfds are kept before those of exited processes are let go.
const PIDFDS_KEPT: usize = 256;

impl Recorder {
    pub fn new(args: &RecordArgs) -> Result<Self> {
        let bundle = bundle::Bundle::open(&args.out)?;
        let out = bundle.path().to_path_buf();
        let clock = Clock::new();
        let threshold_ns = args.session.threshold.as_nanos() as u64;
        Ok(Self {
            bundle,
            out,
            what: args.session.pid.map_or_else(
                || "every libuv process".to_owned(),
                |pid| format!("pid {pid}"),
            ),
            clock,
            threshold_ns,
            started_ns: Clock::monotonic_ns(),
            action: args.on_block.clone(),
            on_block_min_ns: args
                .on_block_min
                .map_or(threshold_ns, |d| d.as_nanos() as u64),
            max_triggers: args.max_triggers,
            stop_after_blocks: args.stop_after_blocks,
            text: if args.session.all {
                Reporter::new(Vec::new(), false, clock).with_command_column()
            } else {
                Reporter::new(Vec::new(), false, clock)
            },
            json: Reporter::new(Vec::new(), true, clock),
            blocks: Vec::new(),
            ongoing: BTreeMap::new(),
            summary: None,
            marks: Vec::new(),
            tracks: BTreeMap::new(),
            triggers: Vec::new(),
            triggered: HashSet::new(),
            worst_ns: 0,
            dirty: true,
            written_at: None,
            progress: crate::diag::progress_wanted(),
            pidfds: HashMap::new(),
        })
    }

    /// Names the process of every report line (fleet recordings watch many); called when the
    /// process is found, which is when its pidfd is taken.
    pub fn name_process(&mut self, pid: u32, labels: ProcessLabels) {
        self.text.name_process(pid, labels.clone());
        self.json.name_process(pid, labels);
        if self
            .action
            .as_ref()
            .is_some_and(|a| matches!(a, BlockAction::Signal(..)))
        {
            if self.pidfds.len() >= PIDFDS_KEPT {
                self.pidfds.retain(|_, fd| !exited(fd));
            }
            if let Some(fd) = open_pidfd(pid) {
                self.pidfds.insert(pid, fd);
            }
        }
    }

    /// Sends `signal` to the watched process `pid` through its pidfd.
    fn send_signal(&mut self, pid: u32, signal: i32) -> io::Result<()> {
        let signal = rustix::process::Signal::from_named_raw(signal)
            .ok_or_else(|| io::Error::other(format!("signal {signal} cannot be sent")))?;
        // A process found before the recorder knew of it: its pidfd is taken now, while its
        // loop is blocked (so it is still the process the block is in).
        let fd = match self.pidfds.entry(pid) {
            std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
            std::collections::hash_map::Entry::Vacant(new) => {
                new.insert(open_pidfd(pid).ok_or_else(|| io::Error::other("the process is gone"))?)
            }
        };
        rustix::process::pidfd_send_signal(fd, signal).map_err(|e| match e {
            rustix::io::Errno::SRCH => io::Error::other("the process is gone"),
            e => e.into(),
        })
    }

    /// Takes a record whose stacks are named.
    pub fn take(&mut self, named: Named<'_>, now_ns: u64) {
        let record = named.record;
        if self.text.report(named, now_ns).is_err() {
            return;
        }
        let mut text = String::from_utf8(std::mem::take(self.text.out_mut())).unwrap_or_default();
        // The column header comes with the first record; report.txt writes its own.
        if text.starts_with("TIME ") {
            text = text
                .split_once('\n')
                .map(|(_, rest)| rest.to_owned())
                .unwrap_or_default();
        }
        let profile = named.profile;
        match (record, self.json.json_line(named, now_ns)) {
            (
                Record::Block {
                    id,
                    start_ns,
                    duration_ns,
                    ..
                },
                json::Line::Block(json),
            ) => {
                self.ongoing.remove(&(id.tid, *start_ns));
                self.blocks.push(Rendered { json, text });
                self.worst_ns = self.worst_ns.max(*duration_ns);
                self.marks.push(Mark {
                    id: *id,
                    start_ns: *start_ns,
                    duration_ns: *duration_ns,
                    ongoing: false,
                    culprit: culprit(profile),
                });
            }
            (
                Record::Ongoing {
                    id,
                    start_ns,
                    duration_ns,
                    ..
                },
                json::Line::Block(json),
            ) => {
                self.worst_ns = self.worst_ns.max(*duration_ns);
                let mark = Mark {
                    id: *id,
                    start_ns: *start_ns,
                    duration_ns: *duration_ns,
                    ongoing: true,
                    culprit: culprit(profile),
                };
                let ongoing = Ongoing {
                    json,
                    text,
                    mark,
                    profile: profile.cloned(),
                };
                self.ongoing.insert((id.tid, *start_ns), ongoing);
            }
            (Record::Summary { .. }, json::Line::Summary(json)) => {
                self.summary = Some(Rendered { json, text });
            }
            _ => {}
        }
        self.dirty = true;
    }

    /// Blocks seen so far: ended ones and those still going on.
    fn block_count(&self) -> u64 {
        (self.blocks.len() + self.ongoing.len()) as u64
    }

    /// Whether `--stop-after-blocks` is reached.
    pub fn has_enough(&self) -> bool {
        self.stop_after_blocks
            .is_some_and(|enough| self.block_count() >= enough)
    }

    /// Once a state poll: a point of ELU per loop thread, actions for loops blocked long
    /// enough, progress of actions under way.
    pub fn tick<'a>(&mut self, now_ns: u64, loops: impl Iterator<Item = LoopStatus<'a>>) {
        for status in loops {
            let id = status.id;
            let track = self.tracks.entry(id.tid).or_insert_with(|| Track {
                id,
                points: Vec::new(),
                last: None,
            });
            let now = status.usage(now_ns);
            if let Some(last) = track.last
                && now.at_ns > last.at_ns
            {
                track.points.push((now.at_ns, now.elu_since(last)));
            }
            track.last = Some(now);
            if let Some((busy_since_ns, busy_ns)) = status.busy(now_ns)
                && busy_ns >= self.on_block_min_ns
            {
                self.maybe_trigger(id, busy_since_ns, busy_ns, now_ns);
            }
        }
        self.follow_triggers();
        self.show_progress(now_ns);
    }

    fn maybe_trigger(&mut self, id: LoopId, start_ns: u64, blocked_ns: u64, now_ns: u64) {
        let Some(action) = self.action.clone() else {
            return;
        };
        // One core dump of a process at a time: gcore cannot attach twice.
        let dumping =
            |t: &Trigger| !t.done() && t.action == BlockAction::Core && t.id.pid == id.pid;
        if self.triggers.len() >= self.max_triggers as usize
            || self.triggers.iter().any(dumping)
            || !self.triggered.insert((id.tid, start_ns))
        {
            return;
        }
        let n = self.triggers.len() + 1;
        let mut trigger = Trigger {
            action: action.clone(),
            id,
            at_ns: now_ns,
            blocked_ns,
            child: None,
            snapshot_dir: None,
            file: None,
            outcome: None,
        };
        match &action {
            BlockAction::Core => {
                // core-N.PID, gdb's messages in gcore-N.log.
                let prefix = self.out.join(format!("core-{n}"));
                let log = self
                    .bundle
                    .create(&format!("gcore-{n}.log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from);
                self.bundle.remove(&format!("core-{n}.{}", id.pid));
                let mut gcore = Command::new("gcore");
                // gdb creates the core by path: 0600, like the rest of the bundle.
                // SAFETY: umask is async-signal-safe and touches no memory.
                unsafe {
                    gcore.pre_exec(|| {
                        libc::umask(0o077);
                        Ok(())
                    });
                }
                match gcore
                    .arg("-o")
                    .arg(&prefix)
                    .arg(id.pid.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                {
                    Ok(child) => {
                        trigger.child = Some(child);
                        trigger.file = Some(self.out.join(format!("core-{n}.{}", id.pid)));
                    }
                    Err(e) => {
                        trigger.outcome = Some(format!(
                            "failed: cannot run gcore ({e}): install gdb, which has it"
                        ));
                    }
                }
            }
            BlockAction::Signal(signal, _) => {
                let sent = self.send_signal(id.pid, *signal);
                if let Err(e) = sent {
                    trigger.outcome = Some(format!("failed: {e}"));
                } else {
                    // Node writes heap snapshots (and reports) into its working directory.
                    trigger.snapshot_dir = Process::new(id.pid).cwd();
                    if trigger.snapshot_dir.is_none() {
                        trigger.outcome = Some("done".into());
                    }
                }
            }
            BlockAction::Exec(command) => {
                match Command::new("sh")
                    .arg("-c")
                    .arg(command)
                    .env("LOOPBPF_PID", id.pid.to_string())
                    .env("LOOPBPF_TID", id.tid.to_string())
                    .env("LOOPBPF_THREAD", id.label.kind())
                    .env("LOOPBPF_BLOCKED_MS", format!("{:.0}", ms(blocked_ns)))
                    .env("LOOPBPF_OUT", &self.out)
                    .stdin(Stdio::null())
                    .spawn()
                {
                    Ok(child) => trigger.child = Some(child),
                    Err(e) => trigger.outcome = Some(format!("failed: cannot run sh ({e})")),
                }
            }
        }
        status!(
            "{}: pid {} {} blocked for {}",
            action,
            id.pid,
            id.label,
            human(blocked_ns)
        );
        self.triggers.push(trigger);
        self.dirty = true;
    }

    /// Notes actions that finished: a command's exit, a core written, a heap snapshot that
    /// appeared and stopped growing.
    fn follow_triggers(&mut self) {
        let clock = self.clock;
        for trigger in self.triggers.iter_mut().filter(|t| !t.done()) {
            if let Some(child) = trigger.child.as_mut() {
                let Ok(Some(status)) = child.try_wait() else {
                    continue;
                };
                trigger.outcome = Some(if status.success() {
                    "done".to_owned()
                } else {
                    status.to_string()
                });
                if trigger.file.as_ref().is_some_and(|f| !f.exists()) {
                    trigger.file = None;
                }
                self.dirty = true;
            } else if let Some(dir) = &trigger.snapshot_dir {
                let since = std::time::SystemTime::UNIX_EPOCH
                    + Duration::from_nanos(clock.unix_ns(trigger.at_ns).max(0) as u64);
                if let Some((path, size)) = newest_snapshot(dir, since) {
                    let previous = trigger
                        .file
                        .as_ref()
                        .and_then(|f| fs::metadata(f).ok())
                        .map(|m| m.len());
                    // Finished once it stops growing between two polls.
                    if trigger.file.as_ref() == Some(&path) && previous == Some(size) && size > 0 {
                        trigger.outcome = Some("done".into());
                    }
                    trigger.file = Some(path);
                    self.dirty = true;
                }
            }
        }
    }

    fn show_progress(&mut self, now_ns: u64) {
        if !self.progress {
            return;
        }
        let worst = if self.worst_ns > 0 {
            human(self.worst_ns)
        } else {
            "-".to_owned()
        };
        let mut line = format!(
            "recording {} into {}  {:.0} s  blocks {}  worst {worst}",
            self.what,
            self.out.display(),
            now_ns.saturating_sub(self.started_ns) as f64 / 1e9,
            self.block_count(),
        );
        if !self.triggers.is_empty() {
            let _ = write!(line, "  actions {}", self.triggers.len());
        }
        crate::diag::progress(&line);
    }

    /// Rewrites the bundle if something changed since the last write, at most every few
    /// seconds.
    pub fn write_if_due(&mut self, flame: &Flame) {
        if !self.dirty
            || self
                .written_at
                .is_some_and(|at| at.elapsed() < REWRITE_EVERY)
        {
            return;
        }
        if let Err(e) = self.write(flame) {
            warning!("the bundle could not be written: {e:#}");
        }
    }

    /// Waits a while for actions under way, then writes the bundle a last time.
    pub fn finish(&mut self, flame: &Flame) -> Result<()> {
        let deadline = Instant::now() + ACTIONS_GRACE;
        let mut told = false;
        while self.triggers.iter().any(|t| !t.done()) && Instant::now() < deadline {
            if !told {
                status!("waiting up to 30 s for the actions under way");
                told = true;
            }
            self.follow_triggers();
            std::thread::sleep(Duration::from_millis(200));
        }
        for trigger in self.triggers.iter_mut().filter(|t| !t.done()) {
            trigger.outcome = Some("not finished when the recording ended".into());
        }
        self.write(flame)?;
        status!(
            "bundle written to {}: {} block{}, worst {}; open index.html",
            self.out.display(),
            self.block_count(),
            if self.block_count() == 1 { "" } else { "s" },
            if self.worst_ns > 0 {
                human(self.worst_ns)
            } else {
                "none".to_owned()
            }
        );
        Ok(())
    }

    fn write(&mut self, flame: &Flame) -> Result<()> {
        let now_ns = Clock::monotonic_ns();
        let report = self.report_json(now_ns);
        self.bundle
            .write("report.json", &safe_json::to_vec_pretty(&report)?)?;
        self.bundle
            .write("report.txt", self.report_text(now_ns).as_bytes())?;
        // The blocks still going on are blocked time too.
        let mut flame = flame.clone();
        for ongoing in self.ongoing.values() {
            if let Some(profile) = &ongoing.profile {
                flame.add(&ongoing.mark.id, profile);
            }
        }
        let mut svg = Vec::new();
        let title = format!("loopbpf: blocked time of {}", self.what);
        flame.write_svg_to(&mut svg, &title)?;
        self.bundle.write("flamegraph.svg", &svg)?;
        let marks: Vec<Mark> = self
            .marks
            .iter()
            .cloned()
            .chain(self.ongoing.values().map(|o| o.mark.clone()))
            .collect();
        let tracks: Vec<timeline::Row<'_>> = self
            .tracks
            .values()
            .map(|t| timeline::Row {
                id: t.id,
                points: &t.points,
            })
            .collect();
        let svg = timeline::render(
            &tracks,
            &marks,
            self.started_ns,
            now_ns,
            self.threshold_ns,
            self.clock,
        );
        self.bundle.write("timeline.svg", svg.as_bytes())?;
        self.bundle
            .write("index.html", page::render(&report).as_bytes())?;
        self.dirty = false;
        self.written_at = Some(Instant::now());
        Ok(())
    }

    fn report_json(&self, now_ns: u64) -> json::Report<'_> {
        json::Report {
            blocks: self
                .blocks
                .iter()
                .map(|b| &b.json)
                .chain(self.ongoing.values().map(|o| &o.json))
                .collect(),
            elu: self
                .tracks
                .values()
                .map(|t| json::EluTrack {
                    pid: t.id.pid,
                    points: t
                        .points
                        .iter()
                        .map(|&(at, elu)| (self.clock.unix_ms(at), round3(elu)))
                        .collect(),
                    thread: t.id.label.to_string(),
                    tid: t.id.tid,
                })
                .collect(),
            ended_unix_ms: self.clock.unix_ms(now_ns),
            loopbpf: env!("CARGO_PKG_VERSION"),
            recorded: &self.what,
            started_unix_ms: self.clock.unix_ms(self.started_ns),
            summary: self.summary.as_ref().map(|s| &s.json),
            threshold_ms: ms(self.threshold_ns),
            triggers: self.triggers.iter().map(|t| t.json(self.clock)).collect(),
        }
    }

    fn report_text(&self, now_ns: u64) -> String {
        let mut text = format!(
            "loopbpf {}: {} from {} to {}, blocks are busy intervals >= {}\n\n",
            env!("CARGO_PKG_VERSION"),
            self.what,
            self.clock.time_of_day(self.started_ns),
            self.clock.time_of_day(now_ns),
            human(self.threshold_ns),
        );
        text += "Blocks, in order:\n";
        if self.blocks.is_empty() && self.ongoing.is_empty() {
            text += "  none\n";
        } else if self.what.starts_with("every") {
            text += "TIME          PID      COMMAND         THREAD     EVENT     DURATION\n";
        } else {
            text += "TIME          PID      THREAD     EVENT     DURATION\n";
        }
        for block in &self.blocks {
            text += &block.text;
        }
        for ongoing in self.ongoing.values() {
            text += &ongoing.text;
        }
        if !self.triggers.is_empty() {
            text += "\nActions taken:\n";
            for t in &self.triggers {
                let v = t.json(self.clock);
                let _ = writeln!(
                    text,
                    "  {}  {}  pid {} {} blocked {}  {}{}",
                    self.clock.time_of_day(t.at_ns),
                    t.action,
                    t.id.pid,
                    t.id.label,
                    human(t.blocked_ns),
                    v.outcome,
                    t.file
                        .as_ref()
                        .map(|f| format!(": {} ({} bytes)", f.display(), v.size_bytes.unwrap_or(0)))
                        .unwrap_or_default()
                );
            }
        }
        text += "\nEvent loop utilization per second:\n";
        for track in self.tracks.values() {
            let _ = write!(text, "  pid {} {}:", track.id.pid, track.id.label);
            for chunk in track.points.chunks(10) {
                let mean = chunk.iter().map(|(_, e)| e).sum::<f64>() / chunk.len() as f64;
                let _ = write!(text, " {mean:.2}");
            }
            text += "\n";
        }
        if let Some(summary) = &self.summary {
            text += &summary.text;
        }
        text
    }
}

/// Who to name for a block: in its heaviest stack, the innermost JS function of the app (not
/// of node's own `node:` modules), else the innermost JS function, else the leaf.
fn culprit(profile: Option<&BlockProfile>) -> Option<String> {
    let frames = &profile?.stacks.first()?.frames;
    let js = |f: &&Frame| f.kind == FrameKind::Js;
    frames
        .iter()
        .filter(js)
        .find(|f| !f.file.as_deref().unwrap_or_default().starts_with("node:"))
        .or_else(|| frames.iter().find(js))
        .or_else(|| frames.first())
        .map(|f| f.name.to_string())
}

fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    let pid = rustix::process::Pid::from_raw(pid.cast_signed())?;
    rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
}

/// Whether the process of a pidfd has exited (the pidfd is then readable).
fn exited(pidfd: &OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&now)).is_ok_and(|n| n > 0)
}

/// The newest `*.heapsnapshot` in `dir` written since `since`, with its size.
fn newest_snapshot(dir: &Path, since: std::time::SystemTime) -> Option<(PathBuf, u64)> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".heapsnapshot"))
        // Not a symlink the target planted: its size and path would be another file's.
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            let modified = meta.modified().ok()?;
            (modified >= since).then(|| (modified, e.path(), meta.len()))
        })
        .max_by_key(|(modified, _, _)| *modified)
        .map(|(_, path, size)| {
            // Shown as the target sees it (its cwd), which is where the user will look; only
            // the directory is resolved, the file's own name is kept.
            let real = fs::canonicalize(dir)
                .ok()
                .zip(path.file_name())
                .map_or_else(|| path.clone(), |(dir, name)| dir.join(name));
            (real, size)
        })
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{
        cli::{Args, Mode},
        output::golden,
    };

    /// A recorder of the golden records, on the fixtures' clock, with an ELU track and an action.
    fn recorder(out: &Path) -> Recorder {
        let args = Args::try_parse_from([
            "loopbpf",
            "record",
            "--pid",
            "4242",
            "--out",
            out.to_str().unwrap(),
        ])
        .unwrap();
        let Some(Mode::Record(record)) = &args.mode else {
            panic!("not a record command: {args:?}");
        };
        let mut recorder = Recorder::new(record).unwrap();
        let clock = golden::clock();
        recorder.clock = clock;
        recorder.text = Reporter::new(Vec::new(), false, clock);
        recorder.json = Reporter::new(Vec::new(), true, clock);
        recorder.started_ns = 500_000_000;
        recorder.progress = false;
        for (pid, labels) in golden::processes() {
            recorder.name_process(pid, labels);
        }
        for (record, profile, now_ns) in golden::records() {
            let named = Named {
                record: &record,
                profile: profile.as_ref(),
                naming_timed_out: false,
            };
            recorder.take(named, now_ns);
        }
        recorder.tracks.insert(
            golden::MAIN.tid,
            Track {
                id: golden::MAIN,
                points: vec![(1_500_000_000, 0.25), (2_500_000_000, 0.123_456)],
                last: None,
            },
        );
        recorder.triggers.push(Trigger {
            action: BlockAction::Exec("kill -USR2 \"$LOOPBPF_PID\"".to_owned()),
            id: golden::MAIN,
            at_ns: 5_100_000_000,
            blocked_ns: 100_000_001,
            child: None,
            snapshot_dir: None,
            file: None,
            outcome: Some("done".to_owned()),
        });
        recorder
    }

    #[test]
    fn report_json_and_page_are_unchanged() {
        let out = std::env::temp_dir().join(format!("loopbpf-golden-{}", std::process::id()));
        let recorder = recorder(&out);
        let report = recorder.report_json(13_000_000_000);
        let version = env!("CARGO_PKG_VERSION");
        let json = safe_json::to_string_pretty(&report)
            .unwrap()
            .replace(&format!("\"{version}\""), "\"VERSION\"");
        golden::check("report.json", &json);
        let html =
            page::render(&report).replace(&format!("loopbpf {version};"), "loopbpf VERSION;");
        golden::check("index.html", &html);
        let _ = fs::remove_dir_all(out);
    }

    #[test]
    fn report_json_escapes_what_a_terminal_acts_on() {
        // DEL, C1's CSI, bidi overrides and a noncharacter: JSON lets them through raw.
        const NAME: &str = "fib\u{9b}2J\u{202e}gpj.exe\u{7f}\u{2066}\u{fffe}";
        let out = std::env::temp_dir().join(format!("loopbpf-escaped-{}", std::process::id()));
        let mut recorder = recorder(&out);
        recorder.name_process(
            golden::MAIN.pid,
            ProcessLabels {
                comm: NAME.to_owned(),
                ..ProcessLabels::default()
            },
        );
        let (record, profile, now_ns) = golden::records()
            .into_iter()
            .find(|(r, p, _)| {
                matches!(r, Record::Block { id, .. } if *id == golden::MAIN) && p.is_some()
            })
            .expect("a block of the main thread with stacks");
        let mut profile = profile.unwrap();
        profile.stacks[0].frames[0].name = NAME.into();
        recorder.take(
            Named {
                record: &record,
                profile: Some(&profile),
                naming_timed_out: false,
            },
            now_ns,
        );
        recorder.write(&Flame::default()).unwrap();
        let json = fs::read_to_string(out.join("report.json")).unwrap();
        let _ = fs::remove_dir_all(&out);

        for raw in ['\u{9b}', '\u{202e}', '\u{7f}', '\u{2066}', '\u{fffe}'] {
            assert!(!json.contains(raw), "{raw:?} raw in report.json");
        }
        let escaped = r"fib\u009b2J\u202egpj.exe\u007f\u2066\ufffe";
        assert!(json.contains(&format!("\"comm\": \"{escaped}\"")), "{json}");
        assert!(json.contains(&format!("\"name\": \"{escaped}\"")), "{json}");
        let report: serde_json::Value = serde_json::from_str(&json).unwrap();
        let block = report["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["comm"] == NAME)
            .expect("the hostile block, its comm decoded unchanged");
        assert_eq!(block["stacks"][0]["frames"][0]["name"], NAME);
    }
}
