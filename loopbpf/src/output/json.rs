//! The JSON schema, in one place: every object loopbpf emits as JSON, as serde structs. The
//! JSON lines of `--json` are [`Line`]s; a recording's report.json is a [`Report`], and its
//! index.html is rendered from the same [`Report`].
//!
//! Keys come out in alphabetical order, as they always have (the records were once built as
//! `serde_json::Value` maps, which sort their keys), so every struct declares its fields in
//! that order; the golden tests (`output::golden`) hold the bytes. A key that only some records
//! have is skipped when absent; one that is always there is `null` when unknown. README.md
//! ("JSON lines") documents the fields.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use serde::Serialize;

use super::{
    Named,
    clock::{Clock, ms},
};
use crate::{
    aggregate::{BlockEnd, LoopId, LoopSummary, Record, ThreadLabel},
    naming::{
        frame::{self, FrameKind},
        request::Request,
        stacks::{BlockProfile, NamedStack},
    },
    target::ProcessLabels,
};

/// One JSON line: a record of any kind, as `--json` prints it.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Line {
    /// `block` or `ongoing`.
    Block(Block),
    Interval(Interval),
    Leak(Leak),
    Summary(Summary),
}

/// Which of the two records a [`Block`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockEvent {
    /// A block that ended.
    Block,
    /// A block still going on, reported again every second.
    Ongoing,
}

/// A block, or one still going on.
#[derive(Debug, Clone, Serialize)]
pub struct Block {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Of its time, how long the thread was ready to run but waited for a CPU (preempted by
    /// other work, or throttled by a CPU limit): part of `on_cpu_ms`, the time it was not
    /// asleep, which its on-CPU stacks share.
    pub cpu_wait_ms: f64,
    pub duration_ms: f64,
    /// How it ended; an ongoing block has not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end: Option<BlockEnd>,
    pub event: BlockEvent,
    pub gc_ms: f64,
    pub gc_share: f64,
    /// With `on_cpu_ms` and `stacks`: there unless stacks are off (`--no-stacks`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub off_cpu_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_cpu_ms: Option<f64>,
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The HTTP request the block ran for; `null` when none was found.
    pub request: Option<RequestJson>,
    /// Heaviest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stacks: Option<Vec<Stack>>,
    /// Its stacks were not named in time: no `stacks`, `on_cpu_ms` or `off_cpu_ms`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub naming_timed_out: bool,
    pub start_unix_ms: f64,
    pub started_before_attach: bool,
    /// `main` or `worker`.
    pub thread: &'static str,
    pub tid: u32,
    /// The worker's number, for workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<u32>,
}

/// The request a block ran for (the one with the most sample weight).
#[derive(Debug, Clone, Serialize)]
pub struct RequestJson {
    pub method: String,
    /// Other requests on the block's stacks.
    pub others: u32,
    /// The caller's span id of its `traceparent`, 16 hex digits.
    pub parent_span_id: Option<String>,
    pub path: String,
    /// The route template the framework matched.
    pub route: Option<String>,
    /// The trace id of its `traceparent`, 32 hex digits.
    pub trace_id: Option<String>,
}

impl RequestJson {
    fn new(request: &Request) -> Self {
        Self {
            method: request.method.clone(),
            others: request.others,
            parent_span_id: request.trace.map(|t| t.parent_span_id_hex()),
            path: request.path.clone(),
            route: request.route.clone(),
            trace_id: request.trace.map(|t| t.trace_id_hex()),
        }
    }
}

/// One stack of a block and the time it took.
#[derive(Debug, Clone, Serialize)]
pub struct Stack {
    /// Leaf first.
    pub frames: Vec<Frame>,
    pub on_cpu: bool,
    pub weight_ms: f64,
}

/// A frame of a stack.
#[derive(Debug, Clone, Serialize)]
pub struct Frame {
    pub column: Option<u32>,
    pub file: Option<Arc<str>>,
    pub kind: FrameKind,
    pub line: Option<u32>,
    pub module: Arc<str>,
    pub name: Arc<str>,
    /// Where the position comes from in the source the script was built from (a source map).
    pub original: Option<Original>,
}

/// A position in the source a script was built from.
#[derive(Debug, Clone, Serialize)]
pub struct Original {
    pub column: u32,
    pub file: String,
    pub line: u32,
}

/// A loop thread's utilization over an `--interval`.
#[derive(Debug, Clone, Serialize)]
pub struct Interval {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    pub elu: f64,
    /// Always `interval`.
    pub event: &'static str,
    pub iterations: u64,
    pub max_busy_ms: f64,
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub thread: &'static str,
    pub tid: u32,
    pub unix_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<u32>,
}

/// Memory that kept growing, by one of two rules (see [`crate::aggregate::leak`]).
#[derive(Debug, Clone, Serialize)]
pub struct Leak {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Always `leak`.
    pub event: &'static str,
    /// How much memory grew over `span_ms`.
    pub growth_bytes: u64,
    pub growth_bytes_per_min: f64,
    pub major_gcs: u32,
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub rss_bytes: u64,
    /// `after_major_gc` or `floor`.
    pub rule: &'static str,
    pub span_ms: f64,
    pub thread: &'static str,
    pub tid: u32,
    pub unix_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<u32>,
}

/// The end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub dropped_events: u64,
    pub duration_ms: f64,
    /// Always `summary`.
    pub event: &'static str,
    pub loops: Vec<LoopLine>,
    /// Processes whose JS frames the naming limits left unnamed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub naming_limits: Vec<NamingLimits>,
}

/// Where the limits on naming a process's JS frames (its read budget, the bounds on what is
/// kept) left them unnamed.
#[derive(Debug, Clone, Serialize)]
pub struct NamingLimits {
    /// Samples whose JS frames were left unnamed because the read budget was spent.
    pub budget_exceeded: u64,
    /// Times a cache was cleared because it was full, or an entry refused as too large.
    pub cache_evictions: u64,
    /// Frames left `[JS]` because the table of named frames was full.
    pub frames_refused: u64,
    pub pid: u32,
}

/// One loop thread over the whole run.
#[derive(Debug, Clone, Serialize)]
pub struct LoopLine {
    pub blocks: u64,
    pub busy_hist_us: Vec<Bucket>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    pub elu: f64,
    pub exited: bool,
    /// By kind (`minor`, `major`, `incremental`, `weakcb`), those that happened.
    pub gc: BTreeMap<&'static str, Gc>,
    pub iterations: u64,
    pub max_busy_ms: f64,
    /// A block still going on when the run ended.
    pub ongoing_ms: Option<f64>,
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub thread: &'static str,
    pub tid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<u32>,
}

/// The GC pauses of one kind.
#[derive(Debug, Clone, Serialize)]
pub struct Gc {
    pub count: u64,
    pub hist_us: Vec<Bucket>,
    pub max_ms: f64,
    pub total_ms: f64,
}

/// A bucket of a log2 histogram that counted something: [`from`, `to`) microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    pub count: u64,
    pub from: u64,
    pub to: u64,
}

/// report.json: the whole of a recording.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// The ended blocks in order, then those still going on.
    pub blocks: Vec<&'a Block>,
    pub elu: Vec<EluTrack>,
    pub ended_unix_ms: f64,
    /// loopbpf's version.
    pub loopbpf: &'static str,
    /// What was recorded: `pid N` or `every libuv process`.
    pub recorded: &'a str,
    pub started_unix_ms: f64,
    pub summary: Option<&'a Summary>,
    pub threshold_ms: f64,
    pub triggers: Vec<Trigger>,
}

/// A loop thread's ELU over a recording.
#[derive(Debug, Serialize)]
pub struct EluTrack {
    pub pid: u32,
    /// (unix ms, ELU since the previous point).
    pub points: Vec<(f64, f64)>,
    /// `main` or `worker N`.
    pub thread: String,
    pub tid: u32,
}

/// An action a recording took while a loop was blocked.
#[derive(Debug, Serialize)]
pub struct Trigger {
    /// `core`, `signal:SIG` or `exec:CMD`.
    pub action: String,
    pub at_unix_ms: f64,
    pub blocked_ms: f64,
    /// What it produced (a core, a heap snapshot).
    pub file: Option<String>,
    /// `done`, `under way`, `exit status: 1`, `failed: ...`.
    pub outcome: String,
    pub pid: u32,
    pub size_bytes: Option<u64>,
    pub thread: &'static str,
    pub tid: u32,
}

/// Who a record is about: the loop thread and, when known, its process's labels.
struct Who {
    comm: Option<String>,
    container: Option<String>,
    pid: u32,
    pod: Option<String>,
    thread: &'static str,
    tid: u32,
    worker: Option<u32>,
}

impl Who {
    fn new(id: &LoopId, processes: &HashMap<u32, ProcessLabels>) -> Self {
        let labels = processes.get(&id.pid);
        let label = |pick: fn(&ProcessLabels) -> &String| {
            labels.map(pick).filter(|s| !s.is_empty()).cloned()
        };
        Self {
            // A process's name is there even when empty; container and pod only when it runs in one.
            comm: labels.map(|p| p.comm.clone()),
            container: label(|p| &p.container),
            pid: id.pid,
            pod: label(|p| &p.pod),
            thread: id.label.kind(),
            tid: id.tid,
            worker: match id.label {
                ThreadLabel::Worker(n) => Some(n),
                ThreadLabel::Main => None,
            },
        }
    }
}

/// A record as its JSON line, its times made wall-clock times by `clock`; interval and leak
/// lines are stamped `now_ns`.
#[expect(clippy::too_many_lines, reason = "one arm per kind of record")]
pub fn line(
    named: Named<'_>,
    now_ns: u64,
    clock: Clock,
    processes: &HashMap<u32, ProcessLabels>,
) -> Line {
    let record = named.record;
    match record {
        Record::Block {
            id,
            start_ns,
            duration_ns,
            before_attach,
            gc_ns,
            cpu_wait_ns,
            ..
        }
        | Record::Ongoing {
            id,
            start_ns,
            duration_ns,
            before_attach,
            gc_ns,
            cpu_wait_ns,
        } => {
            let (event, end) = match record {
                Record::Block { end, .. } => (BlockEvent::Block, Some(*end)),
                _ => (BlockEvent::Ongoing, None),
            };
            Line::Block(
                Block::new(
                    event,
                    Who::new(id, processes),
                    Times {
                        unix_ms: clock.unix_ms(*start_ns),
                        duration_ns: *duration_ns,
                        gc_ns: *gc_ns,
                        cpu_wait_ns: *cpu_wait_ns,
                    },
                    end,
                    *before_attach,
                    named.profile,
                )
                .naming_timed_out(named.naming_timed_out),
            )
        }
        Record::Interval {
            id,
            elu,
            iterations,
            max_busy_ns,
        } => {
            let who = Who::new(id, processes);
            Line::Interval(Interval {
                comm: who.comm,
                container: who.container,
                elu: round4(*elu),
                event: "interval",
                iterations: *iterations,
                max_busy_ms: ms(*max_busy_ns),
                pid: who.pid,
                pod: who.pod,
                thread: who.thread,
                tid: who.tid,
                unix_ms: clock.unix_ms(now_ns),
                worker: who.worker,
            })
        }
        Record::Leak { id, leak } => {
            let who = Who::new(id, processes);
            Line::Leak(Leak {
                comm: who.comm,
                container: who.container,
                event: "leak",
                growth_bytes: leak.growth_bytes,
                growth_bytes_per_min: leak.growth_bytes_per_min.round(),
                major_gcs: leak.major_gcs,
                pid: who.pid,
                pod: who.pod,
                rss_bytes: leak.rss_bytes,
                rule: leak.rule.label(),
                span_ms: ms(leak.span_ns),
                thread: who.thread,
                tid: who.tid,
                unix_ms: clock.unix_ms(now_ns),
                worker: who.worker,
            })
        }
        Record::Summary {
            loops,
            elapsed_ns,
            dropped_events,
            naming_limits,
        } => Line::Summary(Summary {
            dropped_events: *dropped_events,
            duration_ms: ms(*elapsed_ns),
            event: "summary",
            loops: loops
                .iter()
                .map(|l| LoopLine::new(l, Who::new(&l.id, processes)))
                .collect(),
            naming_limits: naming_limits
                .iter()
                .map(|&(pid, hit)| NamingLimits {
                    budget_exceeded: hit.budget_exceeded,
                    cache_evictions: hit.cache_evictions,
                    frames_refused: hit.frames_refused,
                    pid,
                })
                .collect(),
        }),
    }
}

/// When a block started, how long it took, and how long its GC pauses and its waits for a
/// CPU took.
#[derive(Clone, Copy)]
struct Times {
    unix_ms: f64,
    duration_ns: u64,
    gc_ns: u64,
    cpu_wait_ns: u64,
}

impl Block {
    fn naming_timed_out(mut self, timed_out: bool) -> Self {
        self.naming_timed_out = timed_out;
        self
    }

    fn new(
        event: BlockEvent,
        who: Who,
        times: Times,
        end: Option<BlockEnd>,
        before_attach: bool,
        profile: Option<&BlockProfile>,
    ) -> Self {
        let Times {
            unix_ms,
            duration_ns,
            gc_ns,
            cpu_wait_ns,
        } = times;
        Self {
            comm: who.comm,
            container: who.container,
            cpu_wait_ms: ms(cpu_wait_ns),
            duration_ms: ms(duration_ns),
            end,
            event,
            gc_ms: ms(gc_ns),
            gc_share: round4(gc_ns as f64 / duration_ns.max(1) as f64),
            off_cpu_ms: profile.map(|p| ms(p.off_cpu_ns)),
            on_cpu_ms: profile.map(|p| ms(p.on_cpu_ns)),
            pid: who.pid,
            pod: who.pod,
            request: profile
                .and_then(|p| p.request.as_ref())
                .map(RequestJson::new),
            stacks: profile.map(|p| p.stacks.iter().map(Stack::new).collect()),
            naming_timed_out: false,
            start_unix_ms: unix_ms,
            started_before_attach: before_attach,
            thread: who.thread,
            tid: who.tid,
            worker: who.worker,
        }
    }
}

impl Stack {
    fn new(stack: &NamedStack) -> Self {
        Self {
            frames: stack.frames.iter().map(Frame::new).collect(),
            on_cpu: stack.on_cpu,
            weight_ms: ms(stack.weight_ns),
        }
    }
}

impl Frame {
    fn new(frame: &frame::Frame) -> Self {
        Self {
            column: frame.column,
            file: frame.file.clone(),
            kind: frame.kind,
            line: frame.line,
            module: frame.module.clone(),
            name: frame.name.clone(),
            original: frame.original.as_ref().map(|o| Original {
                column: o.column,
                file: o.file.clone(),
                line: o.line,
            }),
        }
    }
}

impl LoopLine {
    fn new(l: &LoopSummary, who: Who) -> Self {
        Self {
            blocks: l.blocks,
            busy_hist_us: buckets(&l.busy_hist),
            comm: who.comm,
            container: who.container,
            elu: round4(l.elu),
            exited: l.exited,
            gc: l
                .gc
                .iter()
                .map(|(kind, g)| {
                    let gc = Gc {
                        count: g.count,
                        hist_us: buckets(&g.hist),
                        max_ms: ms(g.max_ns),
                        total_ms: ms(g.total_ns),
                    };
                    (kind.label(), gc)
                })
                .collect(),
            iterations: l.iterations,
            max_busy_ms: ms(l.max_busy_ns),
            ongoing_ms: l.ongoing_ns.map(ms),
            pid: who.pid,
            pod: who.pod,
            thread: who.thread,
            tid: who.tid,
            worker: who.worker,
        }
    }
}

/// The buckets of a log2 histogram that counted something.
fn buckets(hist: &[u64]) -> Vec<Bucket> {
    hist.iter()
        .enumerate()
        .filter(|&(_, &count)| count > 0)
        .map(|(slot, &count)| Bucket {
            count,
            from: bucket_low(slot),
            to: 1 << (slot + 1),
        })
        .collect()
}

/// Where bucket `slot` of a log2 histogram starts, in microseconds (the first takes 0 too).
pub fn bucket_low(slot: usize) -> u64 {
    if slot == 0 { 0 } else { 1 << slot }
}

/// To four decimals: ELU and shares.
fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}
