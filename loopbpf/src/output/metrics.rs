//! Prometheus output (`--metrics ADDR`): per loop thread event-loop time, ELU, blocks and busy
//! time per iteration, and loopbpf's own health, served as text on `/metrics`.
//!
//! Names follow what Node users know from prom-client and the OpenTelemetry runtime metrics,
//! with a `loopbpf_` prefix and base units (seconds, ratios). The session renders the
//! exposition once a second into a shared buffer; a scrape only takes a reference to it, so
//! scrapers never wait for the pipeline and the pipeline never waits for scrapers.
//!
//! The server is open to whoever can reach the port, and a node can be crowded: a connection
//! has [`HEADER_TIMEOUT`] to send each request's head (hyper's timer also runs while a
//! keep-alive connection waits for its next request, so an idle one is closed then too) and
//! lives [`CONNECTION_LIFETIME`] at most (a client that stops reading its response); at most
//! [`MAX_CONNECTIONS`] are served at once, the next wait in the kernel's accept queue; a
//! failing `accept` (out of file descriptors) is retried after a pause that grows to
//! [`ACCEPT_BACKOFF_MAX`], never in a busy loop.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{
    Encoder, TextEncoder,
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{
    abi::HIST_SLOTS,
    aggregate::usage::{EluWindow, LoopStatus, Usage},
    decode::GcKind,
    diag::printable,
    naming::v8::LimitsHit,
    probe::Losses,
    target::{ProcessLabels, proc::Process},
};

/// Longest label value served, in bytes: a process names itself (comm, container, pod), and
/// a scraper's memory goes with every distinct value.
const MAX_LABEL_BYTES: usize = 128;
/// What ends a label value that was cut.
const LABEL_CUT: &str = "...";

/// Time a client has to send a request's head (and an idle keep-alive connection to start
/// its next request): a slow client cannot hold a connection.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of a connection, however it is used.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// Largest request buffered (hyper's least): a scrape's head is a few hundred bytes.
const MAX_REQUEST_BUFFER: usize = 8192;
/// Pauses after a failed `accept`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(100);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The window of the ELU gauge.
const ELU_WINDOW_NS: u64 = 10_000_000_000;

/// Upper bounds of the block-duration buckets, in seconds; those under the threshold are left
/// out and the threshold itself is the first.
const BLOCK_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds of the GC pause buckets, in seconds: prom-client's for
/// `nodejs_gc_duration_seconds`, so dashboards built for it read these too.
const GC_BUCKETS: [f64; 6] = [0.001, 0.01, 0.1, 1.0, 2.0, 5.0];

/// One loop thread as the session sees it at a refresh.
pub struct LoopView<'a> {
    pub status: LoopStatus<'a>,
    pub process: &'a ProcessLabels,
    /// Main threads: the process's memory after its last major GC, and leak warnings so far.
    pub memory: Option<(u64, u64)>,
}

/// loopbpf's own state at a refresh.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub processes: u64,
    /// What the kernel side lost, held back, or had no room for.
    pub losses: Losses,
    /// Stack records the per-process limit dropped, by process.
    pub stacks_limited: Vec<(u32, u64)>,
    pub attach_failures: u64,
    /// By pid: where the limits on naming JS frames left them unnamed.
    pub naming_limits: Vec<(u32, LimitsHit)>,
    /// Blocks and ongoing blocks reported without stacks: naming took too long.
    pub naming_timeouts: u64,
    /// Stack samples dropped: naming fell behind.
    pub samples_dropped: u64,
    /// Spans exported and dropped, with `--otlp`.
    pub otlp: Option<super::otlp::Counts>,
}

/// What the metrics keep beyond the kernel-side state: blocks by duration, the ELU window.
#[derive(Debug, Default)]
struct LoopMetrics {
    /// Blocks per bucket of `buckets` (not cumulative), and their count and total time.
    block_counts: Vec<u64>,
    blocks: u64,
    blocked_ns: u64,
    /// Of that, the time the thread waited for a CPU.
    blocked_cpu_wait_ns: u64,
    elu: EluWindow,
    /// The (active, idle) time last served.
    last_time: (u64, u64),
    /// GC pauses by kind: per bucket of `GC_BUCKETS` (not cumulative), all of them, their
    /// total time.
    gc: std::collections::BTreeMap<GcKind, ([u64; GC_BUCKETS.len()], u64, u64)>,
    /// Blocked time by the route template of the request it ran for: at most [`MAX_ROUTES`]
    /// routes, the rest under [`OTHER_ROUTE`].
    routes: std::collections::BTreeMap<String, u64>,
}

/// Routes counted per loop thread, and the label of the blocked time of any others: a label
/// value per route template is bounded by the app's routes, but not one a target chooses.
const MAX_ROUTES: usize = 50;
const OTHER_ROUTE: &str = "other";

/// The metrics of every loop thread, and the exposition scrapers get.
#[derive(Debug)]
pub struct Metrics {
    threshold_ns: u64,
    buckets: Vec<f64>,
    /// By (pid, tid): a tid reused by another process starts with fresh series.
    loops: HashMap<(u32, u32), LoopMetrics>,
    exposition: Arc<Mutex<Bytes>>,
}

impl Metrics {
    pub fn new(threshold_ns: u64) -> Self {
        let threshold = threshold_ns as f64 / 1e9;
        let buckets = std::iter::once(threshold)
            .chain(
                BLOCK_BUCKETS
                    .into_iter()
                    .filter(|&b| b > threshold * 1.0001),
            )
            .collect();
        Self {
            threshold_ns,
            buckets,
            loops: HashMap::new(),
            exposition: Arc::new(Mutex::new(Bytes::new())),
        }
    }

    /// The text the server hands out.
    pub fn exposition(&self) -> Arc<Mutex<Bytes>> {
        Arc::clone(&self.exposition)
    }

    /// Counts a block of loop thread `tid` (one that ended, at a poll wait or with the thread).
    pub fn on_block(&mut self, pid: u32, tid: u32, duration_ns: u64, cpu_wait_ns: u64) {
        let buckets = &self.buckets;
        let m = self.loops.entry((pid, tid)).or_default();
        m.block_counts.resize(buckets.len(), 0);
        let seconds = duration_ns as f64 / 1e9;
        if let Some(i) = buckets.iter().position(|&le| seconds <= le) {
            m.block_counts[i] += 1;
        }
        m.blocks += 1;
        m.blocked_ns += duration_ns;
        m.blocked_cpu_wait_ns += cpu_wait_ns;
    }

    /// Counts a block that ran for a request matched to `route` (once its stacks are named).
    pub fn on_route_block(&mut self, pid: u32, tid: u32, route: &str, duration_ns: u64) {
        let routes = &mut self.loops.entry((pid, tid)).or_default().routes;
        // Kept as the label will show it, so that routes cut alike count as one.
        let route = label_value(route);
        let key = if routes.contains_key(&route)
            || routes.keys().filter(|r| *r != OTHER_ROUTE).count() < MAX_ROUTES
        {
            route
        } else {
            OTHER_ROUTE.to_owned()
        };
        *routes.entry(key).or_default() += duration_ns;
    }

    /// Counts a GC pause of loop thread `tid` of `pid`.
    pub fn on_gc(&mut self, pid: u32, tid: u32, kind: GcKind, pause_ns: u64) {
        let (counts, count, total_ns) = self
            .loops
            .entry((pid, tid))
            .or_default()
            .gc
            .entry(kind)
            .or_default();
        let seconds = pause_ns as f64 / 1e9;
        if let Some(i) = GC_BUCKETS.iter().position(|&le| seconds <= le) {
            counts[i] += 1;
        }
        *count += 1;
        *total_ns += pause_ns;
    }

    /// Drops a loop thread's series (its process is gone and its grace period over).
    pub fn forget(&mut self, pid: u32, tid: u32) {
        self.loops.remove(&(pid, tid));
    }

    /// Renders every series as of `now_ns` into the exposition.
    pub fn refresh(&mut self, now_ns: u64, loops: &[LoopView<'_>], health: &Health) {
        let mut families = Families::default();
        for view in loops {
            let m = self
                .loops
                .entry((view.status.id.pid, view.status.id.tid))
                .or_default();
            m.block_counts.resize(self.buckets.len(), 0);
            loop_series(
                &mut families,
                view,
                m,
                &self.buckets,
                self.threshold_ns,
                now_ns,
            );
        }
        health_series(&mut families, loops.len(), health);
        let mut text = Vec::new();
        if TextEncoder::new()
            .encode(&families.into_vec(), &mut text)
            .is_ok()
            && let Ok(mut exposition) = self.exposition.lock()
        {
            *exposition = Bytes::from(text);
        }
    }
}

/// The metric families being built, in a fixed order.
#[derive(Default)]
struct Families {
    order: Vec<&'static str>,
    by_name: HashMap<&'static str, MetricFamily>,
}

impl Families {
    fn add(&mut self, name: &'static str, help: &str, kind: MetricType, metric: Metric) {
        let family = self.by_name.entry(name).or_insert_with(|| {
            self.order.push(name);
            let mut family = MetricFamily::default();
            family.set_name(name.to_owned());
            family.set_help(help.to_owned());
            family.set_field_type(kind);
            family
        });
        family.mut_metric().push(metric);
    }

    fn into_vec(mut self) -> Vec<MetricFamily> {
        self.order
            .iter()
            .filter_map(|name| self.by_name.remove(name))
            .collect()
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value(label_value(value));
            pair
        })
        .collect()
}

/// A label value as served, whatever a target named itself: printable (no control
/// characters; the encoder escapes quotes and backslashes) and at most [`MAX_LABEL_BYTES`],
/// cut on a character boundary with `...` to say so.
fn label_value(value: &str) -> String {
    let value = printable(value);
    if value.len() <= MAX_LABEL_BYTES {
        return value.into_owned();
    }
    let mut end = MAX_LABEL_BYTES - LABEL_CUT.len();
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{LABEL_CUT}", &value[..end])
}

fn counter(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(value);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_counter(c);
    m
}

fn gauge(labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_gauge(g);
    m
}

/// A histogram from per-bucket (not cumulative) counts with these upper bounds; `count` also
/// has those over the last bound (+Inf).
fn histogram(
    labels: Vec<LabelPair>,
    bounds: &[f64],
    counts: &[u64],
    count: u64,
    sum: f64,
) -> Metric {
    let mut cumulative = 0;
    let buckets = bounds
        .iter()
        .zip(counts)
        .map(|(&le, &n)| {
            cumulative += n;
            let mut b = Bucket::default();
            b.set_upper_bound(le);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut h = Histogram::default();
    h.set_bucket(buckets);
    h.set_sample_count(count);
    h.set_sample_sum(sum);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_histogram(h);
    m
}

fn loop_series(
    families: &mut Families,
    view: &LoopView<'_>,
    m: &mut LoopMetrics,
    buckets: &[f64],
    threshold_ns: u64,
    now_ns: u64,
) {
    let status = view.status;
    let (pid, tid) = (
        view.status.id.pid.to_string(),
        view.status.id.tid.to_string(),
    );
    let base = [
        ("pid", pid.as_str()),
        ("tid", tid.as_str()),
        ("thread", view.status.id.label.kind()),
        ("comm", view.process.comm.as_str()),
        ("container", view.process.container.as_str()),
        ("pod", view.process.pod.as_str()),
    ];
    let with = |extra: (&'static str, &'static str)| {
        let mut pairs = base.to_vec();
        pairs.push(extra);
        labels(&pairs)
    };
    let found = status.found();
    let usage = status.usage(now_ns);
    let wall_ns = usage.at_ns.saturating_sub(found.at_ns);
    let idle_ns = usage.idle_ns.min(wall_ns);
    // Counters never go down: a poll wait that ended after `now_ns` (the state was read a
    // moment later) would otherwise move time from active back to idle.
    let active_ns = (wall_ns - idle_ns).max(m.last_time.0);
    let idle_ns = idle_ns.max(m.last_time.1);
    m.last_time = (active_ns, idle_ns);
    families.add(
        "loopbpf_event_loop_time_seconds_total",
        "Time the event loop spent active (running callbacks) or idle (waiting for I/O), since loopbpf found it.",
        MetricType::COUNTER,
        counter(with(("state", "active")), active_ns as f64 / 1e9),
    );
    families.add(
        "loopbpf_event_loop_time_seconds_total",
        "",
        MetricType::COUNTER,
        counter(with(("state", "idle")), idle_ns as f64 / 1e9),
    );

    let now = Usage {
        at_ns: usage.at_ns,
        idle_ns,
    };
    let elu = m.elu.push(now, found, ELU_WINDOW_NS);
    families.add(
        "loopbpf_event_loop_utilization_ratio",
        "Event loop utilization over the last 10 s: the share of time not idle, as performance.eventLoopUtilization() counts it.",
        MetricType::GAUGE,
        gauge(labels(&base), elu),
    );
    families.add(
        "loopbpf_event_loop_iterations_total",
        "Loop iterations (one uv__io_poll to the next).",
        MetricType::COUNTER,
        counter(labels(&base), status.iterations() as f64),
    );
    block_series(families, &status, m, &base, buckets, threshold_ns, now_ns);
    gc_and_memory_series(families, view, m, &base);
    // The kernel side's log2 buckets: slot i counts iterations busy for [2^i, 2^(i+1)) us.
    let bounds: Vec<f64> = (0..HIST_SLOTS)
        .map(|slot| (1u64 << (slot + 1)) as f64 / 1e6)
        .collect();
    families.add(
        "loopbpf_event_loop_iteration_busy_seconds",
        "Busy time per loop iteration (log2 buckets); the sum is the loop's active time.",
        MetricType::HISTOGRAM,
        histogram(
            labels(&base),
            &bounds,
            status.busy_hist(),
            status.busy_hist().iter().sum(),
            active_ns as f64 / 1e9,
        ),
    );
}

/// A loop thread's blocked time by the route of the request it ran for.
fn route_series(families: &mut Families, m: &LoopMetrics, base: &[(&str, &str)]) {
    for (route, ns) in &m.routes {
        let mut pairs = base.to_vec();
        pairs.push(("route", route));
        families.add(
            "loopbpf_event_loop_blocked_by_route_seconds_total",
            "Time spent in blocked intervals that ended, by the route template of the HTTP request they ran for (at most 50 routes per loop thread; the rest under route=\"other\").",
            MetricType::COUNTER,
            counter(labels(&pairs), *ns as f64 / 1e9),
        );
    }
}

/// A loop's blocks: by duration, their time and its waits for a CPU, by route, and the one
/// going on now.
fn block_series(
    families: &mut Families,
    status: &LoopStatus<'_>,
    m: &LoopMetrics,
    base: &[(&str, &str)],
    buckets: &[f64],
    threshold_ns: u64,
    now_ns: u64,
) {
    families.add(
        "loopbpf_event_loop_blocked_duration_seconds",
        "Blocked intervals (busy intervals at or over the threshold) by duration.",
        MetricType::HISTOGRAM,
        histogram(
            labels(base),
            buckets,
            &m.block_counts,
            m.blocks,
            m.blocked_ns as f64 / 1e9,
        ),
    );
    families.add(
        "loopbpf_event_loop_blocked_seconds_total",
        "Time spent in blocked intervals that ended.",
        MetricType::COUNTER,
        counter(labels(base), m.blocked_ns as f64 / 1e9),
    );
    families.add(
        "loopbpf_event_loop_blocked_cpu_wait_seconds_total",
        "Of the time in blocks that ended, the time the loop thread was ready to run but waited \
         for a CPU (preempted by other work, or throttled by a CPU limit).",
        MetricType::COUNTER,
        counter(labels(base), m.blocked_cpu_wait_ns as f64 / 1e9),
    );
    route_series(families, m, base);
    let ongoing_ns = status
        .busy(now_ns)
        .map(|(_, busy_ns)| busy_ns)
        .filter(|&busy_ns| busy_ns >= threshold_ns)
        .unwrap_or(0);
    families.add(
        "loopbpf_event_loop_ongoing_block_seconds",
        "How long the loop has been blocked right now (0 when it is not).",
        MetricType::GAUGE,
        gauge(labels(base), ongoing_ns as f64 / 1e9),
    );
}

/// A loop thread's GC pauses by kind, and for a main thread its process's memory after GC.
fn gc_and_memory_series(
    families: &mut Families,
    view: &LoopView<'_>,
    m: &LoopMetrics,
    base: &[(&str, &str)],
) {
    for (kind, (counts, count, total_ns)) in &m.gc {
        families.add(
            "loopbpf_gc_duration_seconds",
            "V8 garbage-collection pauses of the loop thread by kind (minor, major, incremental, weakcb), as Node's perf_hooks 'gc' entries time them.",
            MetricType::HISTOGRAM,
            histogram(
                {
                let mut pairs = base.to_vec();
                pairs.push(("kind", kind.label()));
                labels(&pairs)
            },
                &GC_BUCKETS,
                counts,
                *count,
                *total_ns as f64 / 1e9,
            ),
        );
    }
    if let Some((rss_bytes, warnings)) = view.memory {
        families.add(
            "loopbpf_memory_after_major_gc_bytes",
            "The process's resident memory right after its last major GC.",
            MetricType::GAUGE,
            gauge(labels(base), rss_bytes as f64),
        );
        families.add(
            "loopbpf_leak_warnings_total",
            "Suspected leaks: memory after major GC grew over 5 major GCs in a row, or the floor of resident memory rose for 16 s.",
            MetricType::COUNTER,
            counter(labels(base), warnings as f64),
        );
    }
}

fn health_series(families: &mut Families, loops: usize, health: &Health) {
    let (cpu_seconds, rss_bytes) = own_usage();
    let none = Vec::new;
    families.add(
        "loopbpf_processes_watched",
        "Processes whose event loops loopbpf watches.",
        MetricType::GAUGE,
        gauge(none(), health.processes as f64),
    );
    families.add(
        "loopbpf_loop_threads_watched",
        "Event loop threads (main and workers) loopbpf watches.",
        MetricType::GAUGE,
        gauge(none(), loops as f64),
    );
    // One name for both kinds, as before the kinds were told apart: sum() over it is the total.
    for (kind, lost) in [
        ("control", health.losses.control),
        ("stack", health.losses.stacks),
    ] {
        families.add(
            "loopbpf_lost_events_total",
            "Events the kernel side could not hand over (ring buffer full), by kind: control \
             (loops found, blocks, exits, GC pauses) or stack records.",
            MetricType::COUNTER,
            counter(labels(&[("kind", kind)]), lost as f64),
        );
    }
    for (i, (map, _)) in Losses::MAPS.into_iter().enumerate() {
        families.add(
            "loopbpf_kernel_map_full_total",
            "Entries the kernel side could not make because the map was full, by map.",
            MetricType::COUNTER,
            counter(labels(&[("map", map)]), health.losses.map_full[i] as f64),
        );
    }
    families.add(
        "loopbpf_stacks_rate_limited_total",
        "Stack records not taken because their process was over its stack rate, all processes.",
        MetricType::COUNTER,
        counter(none(), health.losses.rate_limited as f64),
    );
    for (pid, limited) in &health.stacks_limited {
        let pid = pid.to_string();
        families.add(
            "loopbpf_process_stacks_rate_limited_total",
            "Stack records of one process not taken because it was over its stack rate.",
            MetricType::COUNTER,
            counter(labels(&[("pid", pid.as_str())]), *limited as f64),
        );
    }
    families.add(
        "loopbpf_attach_failures_total",
        "Processes loopbpf found but could not attach to.",
        MetricType::COUNTER,
        counter(none(), health.attach_failures as f64),
    );
    naming_series(families, health);
    if let Some(otlp) = health.otlp {
        families.add(
            "loopbpf_otlp_spans_exported_total",
            "Blocks sent as OpenTelemetry spans (--otlp) and accepted by the receiver.",
            MetricType::COUNTER,
            counter(none(), otlp.exported as f64),
        );
        families.add(
            "loopbpf_otlp_spans_dropped_total",
            "Blocks not sent as OpenTelemetry spans: the export queue was full (the receiver \
             down or slow) or the export failed after its retries.",
            MetricType::COUNTER,
            counter(none(), otlp.dropped as f64),
        );
    }
    families.add(
        "loopbpf_cpu_seconds_total",
        "CPU time loopbpf itself used (user and system).",
        MetricType::COUNTER,
        counter(none(), cpu_seconds),
    );
    families.add(
        "loopbpf_resident_memory_bytes",
        "loopbpf's own resident memory.",
        MetricType::GAUGE,
        gauge(none(), rss_bytes),
    );
}

/// What the limits on naming left out: frames, files, samples, whole profiles.
fn naming_series(families: &mut Families, health: &Health) {
    let none = Vec::new;
    for (pid, hit) in &health.naming_limits {
        let pid = pid.to_string();
        families.add(
            "loopbpf_naming_budget_exceeded_total",
            "Samples whose JS frames were left unnamed because the process's read budget was spent.",
            MetricType::COUNTER,
            counter(labels(&[("pid", &pid)]), hit.budget_exceeded as f64),
        );
        families.add(
            "loopbpf_naming_frames_refused_total",
            "JS frames left unnamed because the process's table of named frames was full.",
            MetricType::COUNTER,
            counter(labels(&[("pid", &pid)]), hit.frames_refused as f64),
        );
        families.add(
            "loopbpf_naming_cache_evictions_total",
            "Times a naming cache of the process was cleared when full, or refused an entry.",
            MetricType::COUNTER,
            counter(labels(&[("pid", &pid)]), hit.cache_evictions as f64),
        );
    }
    families.add(
        "loopbpf_target_files_skipped_total",
        "Files of watched processes not read: over their size cap, or not regular files.",
        MetricType::COUNTER,
        counter(none(), crate::target::files::refused_files() as f64),
    );
    families.add(
        "loopbpf_debug_links_not_followed_total",
        "Objects named without their debug files (no file and line): the watched process could \
         plant the file their debug link names.",
        MetricType::COUNTER,
        counter(
            none(),
            crate::naming::objects::debug_links_not_followed() as f64,
        ),
    );
    families.add(
        "loopbpf_naming_timeouts_total",
        "Blocks and ongoing blocks reported without stacks: naming them took too long.",
        MetricType::COUNTER,
        counter(none(), health.naming_timeouts as f64),
    );
    families.add(
        "loopbpf_stack_samples_dropped_total",
        "Stack samples dropped because naming fell behind: stacks of blocks may be missing.",
        MetricType::COUNTER,
        counter(none(), health.samples_dropped as f64),
    );
}

/// loopbpf's CPU seconds and resident bytes, from /proc/self.
fn own_usage() -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let myself = Process::myself();
    let cpu = myself
        .stat()
        .map_or(0.0, |stat| stat.cpu_ticks as f64 / ticks.max(1) as f64);
    let rss = myself.rss().map_or(0.0, |bytes| bytes as f64);
    (cpu, rss)
}

/// Binds the metrics address now, so that a port in use fails before anything is attached.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot serve metrics on {addr} (is the port in use?)"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves the exposition on `/metrics` until the runtime ends.
pub async fn serve(listener: std::net::TcpListener, exposition: Arc<Mutex<Bytes>>) {
    let Ok(listener) = TcpListener::from_std(listener) else {
        warning!("the metrics listener could not be used");
        return;
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Backoff::default();
    loop {
        // A free slot first: past the cap, clients wait in the accept queue, not in memory.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff.succeeded();
                stream
            }
            Err(e) => {
                tokio::time::sleep(backoff.failed(&e)).await;
                continue;
            }
        };
        let exposition = Arc::clone(&exposition);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let exposition = Arc::clone(&exposition);
                async move { Ok::<_, Infallible>(respond(request.uri().path(), &exposition)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_BUFFER)
                .serve_connection(TokioIo::new(stream), service);
            // A scraper that hangs up early, or too late, is its business.
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            drop(slot);
        });
    }
}

/// The pause after a failed `accept`: the cause (no file descriptor left, in this process or
/// the system) lasts until connections close, so retrying at once would only spin.
#[derive(Debug, Default)]
struct Backoff {
    /// The pause after the last failure; zero while accepting works.
    pause: Duration,
}

impl Backoff {
    fn succeeded(&mut self) {
        self.pause = Duration::ZERO;
    }

    /// The pause before the next try, [`ACCEPT_BACKOFF_MIN`] doubling to
    /// [`ACCEPT_BACKOFF_MAX`]; the first failure of a run is reported.
    fn failed(&mut self, error: &std::io::Error) -> Duration {
        if self.pause.is_zero() {
            warning!("the metrics server cannot accept connections ({error}); retrying");
            self.pause = ACCEPT_BACKOFF_MIN;
        } else {
            self.pause = (self.pause * 2).min(ACCEPT_BACKOFF_MAX);
        }
        self.pause
    }
}

fn respond(path: &str, exposition: &Mutex<Bytes>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            exposition.lock().map(|e| e.clone()).unwrap_or_default(),
        ),
        "/" => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"loopbpf: event-loop metrics are at /metrics\n"),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"not found: metrics are at /metrics\n"),
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        abi::{ROLE_MAIN, ThreadState},
        aggregate::{LoopId, ThreadLabel},
    };

    const S: u64 = 1_000_000_000;

    fn view_of<'a>(state: &'a ThreadState, process: &'a ProcessLabels) -> LoopView<'a> {
        LoopView {
            status: LoopStatus::new(
                LoopId {
                    pid: 7,
                    tid: 7,
                    label: ThreadLabel::Main,
                },
                state,
            ),
            process,
            memory: None,
        }
    }

    fn text(metrics: &Metrics) -> String {
        String::from_utf8(metrics.exposition().lock().unwrap().to_vec()).unwrap()
    }

    #[test]
    fn buckets_start_at_the_threshold() {
        assert_eq!(Metrics::new(100_000_000).buckets[..3], [0.1, 0.25, 0.5]);
        assert_eq!(Metrics::new(30_000_000).buckets[..3], [0.03, 0.05, 0.1]);
        assert_eq!(Metrics::new(60 * S).buckets, [60.0]);
    }

    #[test]
    fn series_have_base_units_labels_and_consistent_histograms() {
        let mut metrics = Metrics::new(100_000_000);
        metrics.on_block(7, 7, 150_000_000, 0);
        metrics.on_block(7, 7, 3 * S, S / 2);
        metrics.on_gc(7, 7, GcKind::Minor, 2_000_000);
        metrics.on_gc(7, 7, GcKind::Minor, 500_000);
        metrics.on_gc(7, 7, GcKind::Major, 7 * S);
        let mut state = ThreadState {
            pid: 7,
            role: ROLE_MAIN,
            discovered_ns: 10 * S,
            idle_ns: 4 * S,
            iterations: 12,
            busy_since_ns: 15 * S,
            ..ThreadState::default()
        };
        state.busy_hist[0] = 10;
        state.busy_hist[17] = 2;
        let process = ProcessLabels {
            comm: "node".into(),
            container: "3f1e0c5bd2a9".into(),
            pod: "web-0".into(),
        };
        metrics.refresh(
            20 * S,
            &[view_of(&state, &process)],
            &Health {
                processes: 1,
                losses: Losses {
                    control: 1,
                    stacks: 2,
                    rate_limited: 40,
                    map_full: [0, 5, 0, 0],
                },
                stacks_limited: vec![(7, 40)],
                attach_failures: 0,
                naming_limits: vec![(
                    7,
                    LimitsHit {
                        budget_exceeded: 2,
                        ..LimitsHit::default()
                    },
                )],
                naming_timeouts: 0,
                samples_dropped: 0,
                otlp: Some(crate::output::otlp::Counts {
                    exported: 9,
                    dropped: 3,
                }),
            },
        );
        let text = text(&metrics);
        let labels =
            r#"pid="7",tid="7",thread="main",comm="node",container="3f1e0c5bd2a9",pod="web-0""#;
        for line in [
            format!("loopbpf_event_loop_time_seconds_total{{{labels},state=\"active\"}} 6"),
            format!("loopbpf_event_loop_time_seconds_total{{{labels},state=\"idle\"}} 4"),
            format!("loopbpf_event_loop_iterations_total{{{labels}}} 12"),
            format!("loopbpf_event_loop_blocked_duration_seconds_bucket{{{labels},le=\"0.1\"}} 0"),
            format!("loopbpf_event_loop_blocked_duration_seconds_bucket{{{labels},le=\"0.25\"}} 1"),
            format!("loopbpf_event_loop_blocked_duration_seconds_bucket{{{labels},le=\"5\"}} 2"),
            format!("loopbpf_event_loop_blocked_duration_seconds_bucket{{{labels},le=\"+Inf\"}} 2"),
            format!("loopbpf_event_loop_blocked_duration_seconds_sum{{{labels}}} 3.15"),
            format!("loopbpf_event_loop_blocked_seconds_total{{{labels}}} 3.15"),
            format!("loopbpf_event_loop_blocked_cpu_wait_seconds_total{{{labels}}} 0.5"),
            format!("loopbpf_event_loop_ongoing_block_seconds{{{labels}}} 5"),
            format!(
                "loopbpf_event_loop_iteration_busy_seconds_bucket{{{labels},le=\"0.000002\"}} 10"
            ),
            format!("loopbpf_event_loop_iteration_busy_seconds_count{{{labels}}} 12"),
            format!("loopbpf_gc_duration_seconds_bucket{{{labels},kind=\"minor\",le=\"0.001\"}} 1"),
            format!("loopbpf_gc_duration_seconds_bucket{{{labels},kind=\"minor\",le=\"0.01\"}} 2"),
            format!("loopbpf_gc_duration_seconds_sum{{{labels},kind=\"minor\"}} 0.0025"),
            format!("loopbpf_gc_duration_seconds_bucket{{{labels},kind=\"major\",le=\"5\"}} 0"),
            format!("loopbpf_gc_duration_seconds_count{{{labels},kind=\"major\"}} 1"),
            "loopbpf_processes_watched 1".to_owned(),
            "loopbpf_loop_threads_watched 1".to_owned(),
            r#"loopbpf_lost_events_total{kind="control"} 1"#.to_owned(),
            r#"loopbpf_lost_events_total{kind="stack"} 2"#.to_owned(),
            r#"loopbpf_kernel_map_full_total{map="threads"} 0"#.to_owned(),
            r#"loopbpf_kernel_map_full_total{map="asleep"} 5"#.to_owned(),
            "loopbpf_stacks_rate_limited_total 40".to_owned(),
            r#"loopbpf_process_stacks_rate_limited_total{pid="7"} 40"#.to_owned(),
            "loopbpf_naming_budget_exceeded_total{pid=\"7\"} 2".to_owned(),
            "loopbpf_naming_frames_refused_total{pid=\"7\"} 0".to_owned(),
            "loopbpf_otlp_spans_exported_total 9".to_owned(),
            "loopbpf_otlp_spans_dropped_total 3".to_owned(),
            "# TYPE loopbpf_event_loop_blocked_duration_seconds histogram".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
        assert!(text.contains("loopbpf_resident_memory_bytes "));
    }

    #[test]
    fn elu_is_over_the_last_ten_seconds() {
        let mut metrics = Metrics::new(100_000_000);
        let process = ProcessLabels::default();
        let mut state = ThreadState {
            pid: 7,
            role: ROLE_MAIN,
            discovered_ns: 0,
            ..ThreadState::default()
        };
        // Idle for the first 20 s, then fully busy for 10 s.
        for second in 1..=30 {
            state.idle_ns = second.min(20) * S;
            metrics.refresh(second * S, &[view_of(&state, &process)], &Health::default());
        }
        let text = text(&metrics);
        let elu = text
            .lines()
            .find_map(|l| l.strip_prefix("loopbpf_event_loop_utilization_ratio{"))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap();
        assert_eq!(elu, "1", "{text}");
    }

    #[test]
    fn label_values_are_printable_and_bounded() {
        assert_eq!(label_value("node"), "node");
        assert_eq!(label_value("evil\x1b[31m\n"), "evil\\x1b[31m\\n");
        let long = "é".repeat(100);
        let cut = label_value(&long);
        assert!(
            cut.len() <= MAX_LABEL_BYTES && cut.ends_with("..."),
            "{cut}"
        );
        assert_eq!(cut.len(), 124 + 3, "cut on a character boundary: {cut}");
        assert_eq!(label_value(&"a".repeat(128)), "a".repeat(128));
        assert_eq!(
            label_value(&"a".repeat(129)),
            format!("{}...", "a".repeat(125))
        );

        let mut metrics = Metrics::new(100_000_000);
        let state = ThreadState {
            pid: 7,
            role: ROLE_MAIN,
            ..ThreadState::default()
        };
        let process = ProcessLabels {
            comm: "ev\"il\\\x1b[2J\n}x".into(),
            container: String::new(),
            pod: "p".repeat(300),
        };
        metrics.refresh(S, &[view_of(&state, &process)], &Health::default());
        let text = text(&metrics);
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("loopbpf_event_loop_iterations_total{"))
            .unwrap();
        assert!(
            line.contains(&format!(
                r#"comm="ev\"il\\\\x1b[2J\\n}}x",container="",pod="{}...""#,
                "p".repeat(125)
            )),
            "{line}"
        );
    }

    #[test]
    fn accept_failures_back_off_to_a_second() {
        let mut backoff = Backoff::default();
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<u64> = (0..6)
            .map(|_| backoff.failed(&e).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failed(&e), ACCEPT_BACKOFF_MIN);
    }

    #[test]
    fn forgotten_loops_leave_no_series() {
        let mut metrics = Metrics::new(100_000_000);
        metrics.on_block(7, 7, S, 0);
        metrics.forget(7, 7);
        metrics.refresh(S, &[], &Health::default());
        assert!(!text(&metrics).contains("pid=\"7\""));
        assert!(metrics.loops.is_empty());
    }

    #[test]
    fn blocked_time_by_route_keeps_fifty_routes_and_the_rest_as_other() {
        let mut metrics = Metrics::new(100_000_000);
        for i in 0..60 {
            metrics.on_route_block(7, 7, &format!("/r/{i}/:id"), S / 10);
        }
        // A known route keeps counting under its own name.
        metrics.on_route_block(7, 7, "/r/0/:id", S);
        metrics.on_route_block(7, 7, "/evil\n\x1b", S);
        let state = ThreadState {
            pid: 7,
            role: ROLE_MAIN,
            ..ThreadState::default()
        };
        let process = ProcessLabels::default();
        metrics.refresh(S, &[view_of(&state, &process)], &Health::default());
        let text = text(&metrics);
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("loopbpf_event_loop_blocked_by_route_seconds_total{"))
            .collect();
        assert_eq!(series.len(), 51, "{text}");
        assert!(
            series
                .iter()
                .any(|l| l.contains("route=\"/r/0/:id\"") && l.ends_with(" 1.1")),
            "{text}"
        );
        assert!(
            series
                .iter()
                .any(|l| l.contains("route=\"other\"") && l.ends_with(" 2")),
            "{text}"
        );
        assert!(!series.iter().any(|l| l.contains("/r/55/")), "{text}");
    }
}
