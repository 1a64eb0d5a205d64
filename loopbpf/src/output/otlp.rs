//! OpenTelemetry export (`--otlp`, `OTEL_EXPORTER_OTLP_*`): each block becomes one span named
//! `event-loop-blocked`, from the start to the end of the busy interval, with the thread, its
//! on/off-CPU and GC shares, the innermost application frame, the heaviest stack and the HTTP
//! request it ran for; with the request's `traceparent`, inside the request's own trace.
//!
//! The transport, encoding and retries (exponential backoff for transient errors, honoring
//! `Retry-After` and gRPC `RetryInfo`) are `opentelemetry-otlp`'s exporter. Its batch span
//! processor is not used: a `TracerProvider` has one resource, and fleet mode needs one per
//! process, and it does not tell how many spans it dropped. So the batching is ours: a bounded
//! queue, one export thread (a slow or absent receiver never holds up the session, and never
//! grows its memory: spans that do not fit are dropped and counted), batches grouped by process
//! with that process's resource set on the exporter before each export.

use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    fmt::Write as _,
    fs::File,
    io::Read,
    sync::{Arc, Condvar, Mutex, OnceLock, mpsc},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    resource::EnvResourceDetector,
    trace::{IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanExporter, SpanLinks},
};

use super::{Named, clock::Clock};
use crate::{
    aggregate::{BlockEnd, Record, ThreadLabel},
    naming::{
        frame::{Frame, FrameKind},
        request::Request,
    },
    target::ProcessLabels,
};

/// The span's name, as the in-process monitors name theirs.
pub const SPAN_NAME: &str = "event-loop-blocked";
/// Spans waiting for export at most (`OTEL_BSP_MAX_QUEUE_SIZE`); more are dropped and counted.
const MAX_QUEUE: usize = 2048;
/// Spans in one export at most (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
const MAX_BATCH: usize = 512;
/// How long a span waits for others to share its export (`OTEL_BSP_SCHEDULE_DELAY`, in ms).
const SCHEDULE_DELAY: Duration = Duration::from_secs(1);
/// How long the end of a session waits for the spans still queued to be exported.
pub const FINISH_WAIT: Duration = Duration::from_secs(5);
/// The heaviest stack attribute's size at most, in bytes.
const MAX_STACK_ATTRIBUTE: usize = 4096;
/// A name or path from the target at most, in bytes (the stack attribute has its own bound).
const MAX_NAME: usize = 512;
/// How much of a process's executable is searched for Node's version.
const MAX_EXE_SCAN: u64 = 512 << 20;

/// Which OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    HttpProtobuf,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Where and how to export, from the command line and the standard environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The full URL spans are sent to (`/v1/traces` appended for HTTP where the spec says).
    pub endpoint: String,
    pub transport: Transport,
    /// `--service-name`, else `OTEL_SERVICE_NAME`; `None`: each process's name.
    pub service_name: Option<String>,
    pub max_queue: usize,
    pub max_batch: usize,
    pub schedule_delay: Duration,
}

impl Config {
    /// The export configured by `--otlp ENDPOINT`, `--service-name` and the environment, or
    /// `None` when neither `--otlp` nor an `OTEL_EXPORTER_OTLP_*ENDPOINT` variable asks for it.
    pub fn resolve(
        flag: Option<&str>,
        service_name: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>> {
        let env = |name: &str| env(name).filter(|value| !value.trim().is_empty());
        let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .unwrap_or_else(|| "http/protobuf".to_owned());
        let transport = match protocol.trim() {
            "grpc" => Transport::Grpc,
            "http/protobuf" => Transport::HttpProtobuf,
            other => bail!(
                "OTLP protocol `{other}` is not supported: set OTEL_EXPORTER_OTLP_PROTOCOL to grpc or http/protobuf"
            ),
        };
        // The signal's own variable is the URL as it is; the general one (and --otlp, which
        // stands for it) is a base to which HTTP adds the signal's path.
        let (endpoint, is_base) = if let Some(flag) = flag {
            (flag.trim().to_owned(), true)
        } else if let Some(url) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            (url.trim().to_owned(), false)
        } else if let Some(url) = env("OTEL_EXPORTER_OTLP_ENDPOINT") {
            (url.trim().to_owned(), true)
        } else {
            return Ok(None);
        };
        let endpoint = check_endpoint(&endpoint)?;
        let endpoint = if is_base && transport == Transport::HttpProtobuf {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        } else {
            endpoint
        };
        let number = |name: &str, default: usize| -> Result<usize> {
            match env(name) {
                None => Ok(default),
                Some(text) => match text.trim().parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => bail!("{name}=`{text}` is not a positive whole number"),
                },
            }
        };
        let max_queue = number("OTEL_BSP_MAX_QUEUE_SIZE", MAX_QUEUE)?.min(1 << 16);
        let max_batch = number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", MAX_BATCH)?.min(max_queue);
        let delay_ms = number(
            "OTEL_BSP_SCHEDULE_DELAY",
            SCHEDULE_DELAY.as_millis() as usize,
        )?;
        let service_name = service_name
            .map(str::to_owned)
            .or_else(|| env("OTEL_SERVICE_NAME"))
            .map(|name| bounded(&name, MAX_NAME).into_owned());
        Ok(Some(Self {
            endpoint,
            transport,
            service_name,
            max_queue,
            max_batch,
            schedule_delay: Duration::from_millis(delay_ms.min(60_000) as u64),
        }))
    }
}

/// An `http://host:port[/path]` URL; a clear message for anything else.
fn check_endpoint(url: &str) -> Result<String> {
    let Some(rest) = url.strip_prefix("http://") else {
        if url.starts_with("https://") {
            bail!(
                "OTLP endpoint `{url}`: this build of loopbpf has no TLS; send to a collector over http:// (a local agent or sidecar)"
            );
        }
        bail!("OTLP endpoint `{url}` is not a URL: write it as http://HOST:PORT");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || url.parse::<hyper::Uri>().is_err() {
        bail!("OTLP endpoint `{url}` is not a URL: write it as http://HOST:PORT");
    }
    Ok(url.to_owned())
}

/// What the session tells a process's resource from.
#[derive(Debug)]
struct ProcessEntry {
    pid: u32,
    labels: ProcessLabels,
    /// Its executable, opened when it was found (read on the export thread for Node's version).
    exe: Mutex<Option<File>>,
    resource: OnceLock<Resource>,
}

/// The spans waiting for export, bounded.
#[derive(Default)]
struct Queue {
    spans: VecDeque<(Arc<ProcessEntry>, SpanData)>,
    closing: bool,
}

/// What the session and the export thread share.
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Spans exported, dropped (they did not fit in the queue, or their export failed after
    /// its retries) and being exported, counted together so that a span is never in two.
    tally: Mutex<Tally>,
    /// The last export error, to be told once.
    error: Mutex<Option<String>>,
}

#[derive(Default)]
struct Tally {
    exported: u64,
    dropped: u64,
    in_flight: u64,
}

/// Counts of the export so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub exported: u64,
    pub dropped: u64,
}

/// The export of a session: takes blocks and queues them as spans for the export thread.
pub struct Otlp {
    config: Config,
    shared: Arc<Shared>,
    processes: HashMap<u32, Arc<ProcessEntry>>,
    clock: Clock,
    ids: RandomIdGenerator,
    done: Option<mpsc::Receiver<()>>,
    /// The counts as the session ended (the export thread may still be at its last export).
    last: Option<Counts>,
}

impl Otlp {
    /// Builds the exporter and starts its thread.
    pub fn start(config: Config, clock: Clock) -> Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            tally: Mutex::new(Tally::default()),
            error: Mutex::new(None),
        });
        let (built_tx, built_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let thread_config = config.clone();
        let thread_shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("loopbpf-otlp".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = built_tx.send(Err(format!("no async runtime: {e}")));
                        return;
                    }
                };
                let exporter = {
                    let _entered = runtime.enter();
                    build_exporter(&thread_config)
                };
                match exporter {
                    Ok(exporter) => {
                        let _ = built_tx.send(Ok(()));
                        export_loop(&runtime, exporter, &thread_config, &thread_shared);
                    }
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                    }
                }
                let _ = done_tx.send(());
            })
            .context("could not start the OTLP export thread")?;
        match built_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("OTLP exporter for {}: {e}", config.endpoint),
            Err(_) => bail!("the OTLP export thread ended before it started"),
        }
        Ok(Self {
            config,
            shared,
            processes: HashMap::new(),
            clock,
            ids: RandomIdGenerator::default(),
            done: Some(done_rx),
            last: None,
        })
    }

    /// Where the spans go, as the status line says it.
    pub fn describe(&self) -> String {
        format!(
            "{} ({})",
            self.config.endpoint,
            self.config.transport.name()
        )
    }

    /// A process found: its spans carry its resource.
    pub fn name_process(&mut self, pid: u32, labels: &ProcessLabels) {
        let exe = File::open(format!("/proc/{pid}/exe")).ok();
        self.processes.insert(
            pid,
            Arc::new(ProcessEntry {
                pid,
                labels: labels.clone(),
                exe: Mutex::new(exe),
                resource: OnceLock::new(),
            }),
        );
    }

    /// A process gone (its spans still queued keep its resource).
    pub fn forget_process(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// Queues a finished block as a span; anything else is not exported.
    pub fn take(&mut self, named: Named<'_>) {
        let Record::Block { id, .. } = named.record else {
            return;
        };
        let Some(entry) = self.processes.get(&id.pid).cloned() else {
            return;
        };
        let Some(mut span) = span(named, self.clock) else {
            return;
        };
        span.span_context = SpanContext::new(
            span.span_context.trace_id(),
            self.ids.new_span_id(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        if span.span_context.trace_id() == TraceId::INVALID {
            span.span_context = SpanContext::new(
                self.ids.new_trace_id(),
                span.span_context.span_id(),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            );
        }
        let mut queue = lock(&self.shared.queue);
        if queue.spans.len() >= self.config.max_queue {
            lock(&self.shared.tally).dropped += 1;
            return;
        }
        queue.spans.push_back((entry, span));
        drop(queue);
        self.shared.ready.notify_one();
    }

    /// Spans exported and dropped so far.
    pub fn counts(&self) -> Counts {
        if let Some(last) = self.last {
            return last;
        }
        let tally = lock(&self.shared.tally);
        Counts {
            exported: tally.exported,
            dropped: tally.dropped,
        }
    }

    /// The last export error not told yet.
    pub fn take_error(&self) -> Option<String> {
        lock(&self.shared.error).take()
    }

    /// Exports what is still queued, waiting at most `wait`; what is left then (queued or
    /// being exported) is counted as dropped.
    pub fn finish(&mut self, wait: Duration) -> Counts {
        if let Some(last) = self.last {
            return last;
        }
        lock(&self.shared.queue).closing = true;
        self.shared.ready.notify_one();
        let ended = self
            .done
            .take()
            .is_some_and(|done| done.recv_timeout(wait).is_ok());
        let mut counts = self.counts();
        if !ended {
            let mut queue = lock(&self.shared.queue);
            let tally = lock(&self.shared.tally);
            counts = Counts {
                exported: tally.exported,
                dropped: tally.dropped + tally.in_flight + queue.spans.len() as u64,
            };
            queue.spans.clear();
        }
        self.last = Some(counts);
        counts
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `opentelemetry-otlp`'s exporter for `config` (it reads the headers and timeout variables).
fn build_exporter(config: &Config) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let built = match config.transport {
        Transport::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(config.endpoint.clone())
            .with_protocol(Protocol::Grpc)
            .build(),
        Transport::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(config.endpoint.clone())
            .with_protocol(Protocol::HttpBinary)
            .build(),
    };
    built.map_err(|e| e.to_string())
}

/// The export thread: batches of up to `max_batch` spans, each sent once it is full or its
/// first span has waited `schedule_delay`, until the session closes the queue.
fn export_loop(
    runtime: &tokio::runtime::Runtime,
    mut exporter: opentelemetry_otlp::SpanExporter,
    config: &Config,
    shared: &Shared,
) {
    let mut versions: HashMap<(u64, u64), Option<String>> = HashMap::new();
    loop {
        let batch: Vec<(Arc<ProcessEntry>, SpanData)> = {
            let mut queue = lock(&shared.queue);
            let mut due: Option<Instant> = None;
            loop {
                if queue.closing || queue.spans.len() >= config.max_batch {
                    break;
                }
                if queue.spans.is_empty() {
                    queue = shared
                        .ready
                        .wait(queue)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                } else {
                    let until = *due.get_or_insert_with(|| Instant::now() + config.schedule_delay);
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    queue = shared
                        .ready
                        .wait_timeout(queue, left)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            }
            let n = queue.spans.len().min(config.max_batch);
            if n == 0 && queue.closing {
                return;
            }
            lock(&shared.tally).in_flight = n as u64;
            queue.spans.drain(..n).collect()
        };
        // One export per process run in the batch: the exporter carries one resource.
        let mut rest = batch.into_iter().peekable();
        while let Some((entry, first)) = rest.next() {
            let mut spans = vec![first];
            while let Some((_, span)) = rest.next_if(|(next, _)| Arc::ptr_eq(next, &entry)) {
                spans.push(span);
            }
            let resource = entry
                .resource
                .get_or_init(|| resource(&entry, config, &mut versions));
            exporter.set_resource(resource);
            let n = spans.len() as u64;
            let result = runtime.block_on(exporter.export(spans));
            let mut tally = lock(&shared.tally);
            tally.in_flight -= n;
            match result {
                Ok(()) => tally.exported += n,
                Err(e) => {
                    tally.dropped += n;
                    *lock(&shared.error) = Some(e.to_string());
                }
            }
        }
    }
}

/// A process's resource: `OTEL_RESOURCE_ATTRIBUTES`, then what loopbpf knows of it.
fn resource(
    entry: &ProcessEntry,
    config: &Config,
    versions: &mut HashMap<(u64, u64), Option<String>>,
) -> Resource {
    let labels = &entry.labels;
    let mut attributes = vec![
        KeyValue::new(
            "service.name",
            config
                .service_name
                .clone()
                .unwrap_or_else(|| bounded(&labels.comm, MAX_NAME).into_owned()),
        ),
        KeyValue::new("process.pid", i64::from(entry.pid)),
        KeyValue::new(
            "process.executable.name",
            bounded(&labels.comm, MAX_NAME).into_owned(),
        ),
        KeyValue::new("host.name", host_name()),
    ];
    let exe = lock(&entry.exe).take();
    if let Some(version) = exe.and_then(|file| node_version_cached(file, versions)) {
        attributes.push(KeyValue::new("process.runtime.name", "nodejs"));
        attributes.push(KeyValue::new("process.runtime.version", version));
    }
    if !labels.container.is_empty() {
        attributes.push(KeyValue::new(
            "container.id",
            bounded(&labels.container, MAX_NAME).into_owned(),
        ));
    }
    if !labels.pod.is_empty() {
        attributes.push(KeyValue::new(
            "k8s.pod.name",
            bounded(&labels.pod, MAX_NAME).into_owned(),
        ));
    }
    Resource::builder_empty()
        .with_detector(Box::new(EnvResourceDetector::new()))
        .with_attributes(attributes)
        .build()
}

/// Node's version in its executable, once per file (by device and inode).
fn node_version_cached(
    file: File,
    versions: &mut HashMap<(u64, u64), Option<String>>,
) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    versions
        .entry((meta.dev(), meta.ino()))
        .or_insert_with(|| node_version(file))
        .clone()
}

/// Node's version as its binary holds it for `process.release.headersUrl`
/// (`.../download/release/v20.11.1/...`): digits and dots only, bounded.
fn node_version(file: File) -> Option<String> {
    const MARK: &[u8] = b"/download/release/v";
    const CHUNK: usize = 1 << 20;
    let mut reader = file.take(MAX_EXE_SCAN);
    let mut buf = vec![0u8; CHUNK + 64];
    let mut kept = 0;
    loop {
        let n = reader.read(&mut buf[kept..]).ok()?;
        if n == 0 {
            return None;
        }
        let filled = kept + n;
        if let Some(at) = memchr::memmem::find(&buf[..filled], MARK) {
            let after = &buf[at + MARK.len()..filled];
            let version: String = after
                .iter()
                .take_while(|b| b.is_ascii_digit() || **b == b'.')
                .take(32)
                .map(|&b| char::from(b))
                .collect();
            if version.split('.').count() == 3 && version.split('.').all(|p| !p.is_empty()) {
                return Some(version);
            }
        }
        // Keep the tail: the mark and version may straddle two reads.
        let tail = 64.min(filled);
        buf.copy_within(filled - tail..filled, 0);
        kept = tail;
    }
}

fn host_name() -> String {
    bounded(
        &rustix::system::uname().nodename().to_string_lossy(),
        MAX_NAME,
    )
    .into_owned()
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn bounded(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(text[..end].to_owned())
}

/// A finished block as its span, with the request's trace and parent ids where it had a
/// `traceparent` (else the trace id is `INVALID`, for the caller to make one) and no span id.
pub fn span(named: Named<'_>, clock: Clock) -> Option<SpanData> {
    let Record::Block {
        id,
        start_ns,
        duration_ns,
        end,
        before_attach,
        gc_ns,
    } = *named.record
    else {
        return None;
    };
    let start = unix_time(clock.unix_ns(start_ns));
    let end_time = unix_time(clock.unix_ns(start_ns.saturating_add(duration_ns)));
    let share = |ns: u64| {
        if duration_ns == 0 {
            0.0
        } else {
            (ns as f64 / duration_ns as f64).min(1.0)
        }
    };
    let mut attributes = vec![
        KeyValue::new("thread.id", i64::from(id.tid)),
        KeyValue::new("thread.name", id.label.to_string()),
        KeyValue::new(
            "loopbpf.thread.kind",
            match id.label {
                ThreadLabel::Main => "main",
                ThreadLabel::Worker(_) => "worker",
            },
        ),
        KeyValue::new("loopbpf.gc.share", share(gc_ns)),
        KeyValue::new(
            "loopbpf.block.end",
            match end {
                BlockEnd::Poll => "poll",
                BlockEnd::Exit => "exit",
            },
        ),
    ];
    if before_attach {
        attributes.push(KeyValue::new("loopbpf.block.before_attach", true));
    }
    let mut parent = (TraceId::INVALID, SpanId::INVALID);
    if let Some(profile) = named.profile {
        attributes.push(KeyValue::new(
            "loopbpf.on_cpu.share",
            share(profile.on_cpu_ns),
        ));
        attributes.push(KeyValue::new(
            "loopbpf.off_cpu.share",
            share(profile.off_cpu_ns),
        ));
        if let Some(heaviest) = profile.stacks.first() {
            if let Some(frame) = app_frame(&heaviest.frames) {
                attributes.extend(code_attributes(frame));
            }
            attributes.push(KeyValue::new("loopbpf.stack", stack_text(&heaviest.frames)));
            attributes.push(KeyValue::new(
                "loopbpf.stack.share",
                share(heaviest.weight_ns),
            ));
        }
        if let Some(request) = &profile.request {
            attributes.extend(request_attributes(request));
            if let Some(trace) = request.trace {
                parent = (
                    TraceId::from_bytes(trace.trace_id),
                    SpanId::from_bytes(trace.parent_span_id),
                );
            }
        }
    }
    if named.naming_timed_out {
        attributes.push(KeyValue::new("loopbpf.stacks.timed_out", true));
    }
    Some(SpanData {
        span_context: SpanContext::new(
            parent.0,
            SpanId::INVALID,
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: parent.1,
        parent_span_is_remote: parent.1 != SpanId::INVALID,
        span_kind: SpanKind::Internal,
        name: Cow::Borrowed(SPAN_NAME),
        start_time: start,
        end_time,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: InstrumentationScope::builder("loopbpf")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    })
}

fn unix_time(unix_ns: i128) -> SystemTime {
    let ns = u64::try_from(unix_ns.max(0)).unwrap_or(u64::MAX);
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// The innermost frame of the application's own code: a JS frame in a script of the app's,
/// not Node's (`node:...`) nor a dependency's (`node_modules`).
pub fn app_frame(frames: &[Frame]) -> Option<&Frame> {
    frames.iter().find(|frame| {
        frame.kind == FrameKind::Js
            && frame.file.as_deref().is_some_and(|file| {
                !file.starts_with("node:")
                    && !file.contains("/node_modules/")
                    && !file.starts_with("internal/")
            })
    })
}

/// `code.*` attributes of a frame: where the source map says the code was written, when it
/// says so.
fn code_attributes(frame: &Frame) -> Vec<KeyValue> {
    let mut attributes = vec![KeyValue::new(
        "code.function.name",
        bounded(&frame.name, MAX_NAME).into_owned(),
    )];
    let (file, line, column) = match &frame.original {
        Some(original) => (
            Some(original.file.as_str()),
            Some(original.line),
            Some(original.column),
        ),
        None => (frame.file.as_deref(), frame.line, frame.column),
    };
    if let Some(file) = file {
        attributes.push(KeyValue::new(
            "code.file.path",
            bounded(file, MAX_NAME).into_owned(),
        ));
    }
    if let Some(line) = line {
        attributes.push(KeyValue::new("code.line.number", i64::from(line)));
    }
    if let Some(column) = column {
        attributes.push(KeyValue::new("code.column.number", i64::from(column)));
    }
    attributes
}

/// A stack as text, leaf first, one frame a line, at most [`MAX_STACK_ATTRIBUTE`] bytes.
fn stack_text(frames: &[Frame]) -> String {
    let mut text = String::new();
    for (i, frame) in frames.iter().enumerate() {
        let mut line = bounded(&frame.name, MAX_NAME).into_owned();
        let _ = match (&frame.file, frame.line, frame.column) {
            (Some(file), Some(at), Some(column)) => {
                write!(line, " {}:{at}:{column}", bounded(file, MAX_NAME))
            }
            (Some(file), Some(at), None) => write!(line, " {}:{at}", bounded(file, MAX_NAME)),
            (Some(file), None, _) => write!(line, " {}", bounded(file, MAX_NAME)),
            (None, ..) => write!(line, " ({})", bounded(&frame.module, MAX_NAME)),
        };
        let more = format!("... {} more frames", frames.len() - i);
        if text.len() + line.len() + 1 + more.len() > MAX_STACK_ATTRIBUTE && i + 1 < frames.len() {
            text.push_str(&more);
            return text;
        }
        text.push_str(&line);
        text.push('\n');
    }
    text.pop();
    text
}

/// The request's attributes by the HTTP semantic conventions.
fn request_attributes(request: &Request) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new(
            "http.request.method",
            bounded(&request.method, 32).into_owned(),
        ),
        KeyValue::new("url.path", bounded(&request.path, MAX_NAME).into_owned()),
    ];
    if let Some(route) = &request.route {
        attributes.push(KeyValue::new(
            "http.route",
            bounded(route, MAX_NAME).into_owned(),
        ));
    }
    if request.others > 0 {
        attributes.push(KeyValue::new(
            "loopbpf.request.others",
            i64::from(request.others),
        ));
    }
    attributes
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{
        aggregate::LoopId,
        naming::{request::TraceParent, stacks::BlockProfile, stacks::NamedStack},
    };

    const MS: u64 = 1_000_000;

    fn resolve(flag: Option<&str>, vars: &[(&str, &str)]) -> Result<Option<Config>> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::resolve(flag, None, |name| vars.get(name).cloned())
    }

    #[test]
    fn endpoints_follow_the_otlp_exporter_spec() {
        assert_eq!(resolve(None, &[]).unwrap(), None, "nothing asks for it");
        let http = resolve(Some("http://collector:4318"), &[])
            .unwrap()
            .unwrap();
        assert_eq!(http.transport, Transport::HttpProtobuf);
        assert_eq!(http.endpoint, "http://collector:4318/v1/traces");
        let base = resolve(
            None,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/otlp/")],
        )
        .unwrap()
        .unwrap();
        assert_eq!(base.endpoint, "http://collector:4318/otlp/v1/traces");
        let signal = resolve(
            None,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:1"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/custom"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(signal.endpoint, "http://c:4318/custom", "taken as it is");
        let grpc = resolve(
            Some("http://collector:4317"),
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
        )
        .unwrap()
        .unwrap();
        assert_eq!(grpc.transport, Transport::Grpc);
        assert_eq!(grpc.endpoint, "http://collector:4317");
        let traces_protocol = resolve(
            Some("http://c:4317"),
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(traces_protocol.transport, Transport::Grpc);
    }

    #[test]
    fn bad_settings_say_what_is_wrong() {
        let error = |flag, vars: &[(&str, &str)]| resolve(flag, vars).unwrap_err().to_string();
        assert!(
            error(
                Some("http://c:4318"),
                &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]
            )
            .contains("`http/json` is not supported"),
        );
        assert!(error(Some("https://c:4318"), &[]).contains("no TLS"));
        assert!(error(Some("collector:4318"), &[]).contains("write it as http://HOST:PORT"));
        assert!(error(Some("http://"), &[]).contains("is not a URL"));
        assert!(
            error(Some("http://c:1"), &[("OTEL_BSP_MAX_QUEUE_SIZE", "-3")])
                .contains("OTEL_BSP_MAX_QUEUE_SIZE=`-3` is not a positive whole number")
        );
    }

    #[test]
    fn service_name_flag_beats_the_environment() {
        let vars = |name: &str| (name == "OTEL_SERVICE_NAME").then(|| "from-env".to_owned());
        let flag = Config::resolve(Some("http://c:1"), Some("payments"), vars)
            .unwrap()
            .unwrap();
        assert_eq!(flag.service_name.as_deref(), Some("payments"));
        let env = Config::resolve(Some("http://c:1"), None, vars)
            .unwrap()
            .unwrap();
        assert_eq!(env.service_name.as_deref(), Some("from-env"));
    }

    fn frame(name: &str, kind: FrameKind, file: Option<&str>, line: Option<u32>) -> Frame {
        Frame {
            name: name.to_owned(),
            module: if kind == FrameKind::Js {
                "[JIT]"
            } else {
                "node"
            }
            .to_owned(),
            file: file.map(str::to_owned),
            line,
            column: line.map(|_| 7),
            original: None,
            kind,
        }
    }

    fn block(request: Option<Request>) -> (Record, BlockProfile) {
        let record = Record::Block {
            id: LoopId {
                pid: 42,
                tid: 43,
                label: ThreadLabel::Worker(2),
            },
            start_ns: 1_000 * MS,
            duration_ns: 200 * MS,
            end: BlockEnd::Poll,
            before_attach: false,
            gc_ns: 50 * MS,
        };
        let profile = BlockProfile {
            on_cpu_ns: 150 * MS,
            off_cpu_ns: 50 * MS,
            stacks: vec![NamedStack {
                weight_ns: 100 * MS,
                on_cpu: true,
                frames: vec![
                    frame("PKCS5_PBKDF2_HMAC", FrameKind::Native, None, None),
                    frame(
                        "pbkdf2Sync",
                        FrameKind::Js,
                        Some("node:internal/crypto/pbkdf2"),
                        None,
                    ),
                    frame(
                        "semver.satisfies",
                        FrameKind::Js,
                        Some("/app/node_modules/semver/index.js"),
                        Some(3),
                    ),
                    frame(
                        "hashPassword",
                        FrameKind::Js,
                        Some("/app/login.js"),
                        Some(12),
                    ),
                    frame("handler", FrameKind::Js, Some("/app/server.js"), Some(40)),
                ],
            }],
            request,
        };
        (record, profile)
    }

    fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a opentelemetry::Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    #[test]
    fn a_block_is_a_span_of_its_busy_interval() {
        let (record, profile) = block(None);
        let clock = Clock::fixed(5_000_000_000_000);
        let named = Named {
            record: &record,
            profile: Some(&profile),
            naming_timed_out: false,
        };
        let span = super::span(named, clock).unwrap();
        assert_eq!(span.name, SPAN_NAME);
        assert_eq!(
            span.end_time.duration_since(span.start_time).unwrap(),
            Duration::from_millis(200)
        );
        assert_eq!(
            span.start_time,
            unix_time(clock.unix_ns(1_000 * MS)),
            "starts where the busy interval did"
        );
        assert_eq!(span.span_context.trace_id(), TraceId::INVALID, "no request");
        assert_eq!(span.parent_span_id, SpanId::INVALID);
        let get = |key| attribute(&span, key).unwrap().to_string();
        assert_eq!(get("thread.id"), "43");
        assert_eq!(get("thread.name"), "worker 2");
        assert_eq!(get("loopbpf.gc.share"), "0.25");
        assert_eq!(get("loopbpf.on_cpu.share"), "0.75");
        assert_eq!(get("loopbpf.off_cpu.share"), "0.25");
        assert_eq!(get("loopbpf.stack.share"), "0.5");
        // Past the native, Node's own and the dependency's frames: the app's.
        assert_eq!(get("code.function.name"), "hashPassword");
        assert_eq!(get("code.file.path"), "/app/login.js");
        assert_eq!(get("code.line.number"), "12");
        assert_eq!(get("code.column.number"), "7");
        assert!(
            get("loopbpf.stack")
                .starts_with("PKCS5_PBKDF2_HMAC (node)\npbkdf2Sync node:internal/crypto/pbkdf2\n"),
            "{}",
            get("loopbpf.stack")
        );
        assert!(attribute(&span, "http.request.method").is_none());
    }

    #[test]
    fn the_request_gives_http_attributes_and_its_trace() {
        let request = Request {
            method: "GET".to_owned(),
            path: "/deps/check".to_owned(),
            route: Some("/deps/:name".to_owned()),
            trace: Some(TraceParent {
                trace_id: [0x4b; 16],
                parent_span_id: [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
                flags: 1,
            }),
            others: 2,
        };
        let (record, profile) = block(Some(request));
        let named = Named {
            record: &record,
            profile: Some(&profile),
            naming_timed_out: false,
        };
        let span = super::span(named, Clock::new()).unwrap();
        assert_eq!(
            span.span_context.trace_id().to_string(),
            "4b".repeat(16),
            "the request's trace"
        );
        assert_eq!(span.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(span.parent_span_is_remote);
        let get = |key| attribute(&span, key).unwrap().to_string();
        assert_eq!(get("http.request.method"), "GET");
        assert_eq!(get("url.path"), "/deps/check");
        assert_eq!(get("http.route"), "/deps/:name");
        assert_eq!(get("loopbpf.request.others"), "2");

        let without_trace = Request {
            method: "POST".to_owned(),
            path: "/login".to_owned(),
            ..Request::default()
        };
        let (record, profile) = block(Some(without_trace));
        let named = Named {
            record: &record,
            profile: Some(&profile),
            naming_timed_out: false,
        };
        let span = super::span(named, Clock::new()).unwrap();
        assert_eq!(span.span_context.trace_id(), TraceId::INVALID);
        assert_eq!(span.parent_span_id, SpanId::INVALID);
        assert!(attribute(&span, "http.route").is_none());
        assert_eq!(attribute(&span, "url.path").unwrap().to_string(), "/login");
    }

    #[test]
    fn only_finished_blocks_are_spans() {
        let ongoing = Record::Ongoing {
            id: LoopId {
                pid: 1,
                tid: 1,
                label: ThreadLabel::Main,
            },
            start_ns: 0,
            duration_ns: 2_000 * MS,
            before_attach: false,
            gc_ns: 0,
        };
        assert!(super::span(Named::bare(&ongoing), Clock::new()).is_none());
    }

    #[test]
    fn hostile_names_are_bounded() {
        let (record, mut profile) = block(None);
        let huge = "é".repeat(100_000);
        for frame in &mut profile.stacks[0].frames {
            frame.name.clone_from(&huge);
            frame.file = frame.file.as_ref().map(|_| huge.clone());
        }
        profile.stacks[0].frames = (0..1_000)
            .flat_map(|_| profile.stacks[0].frames.clone())
            .collect();
        profile.request = Some(Request {
            method: huge.clone(),
            path: huge.clone(),
            route: Some(huge.clone()),
            trace: None,
            others: 0,
        });
        let named = Named {
            record: &record,
            profile: Some(&profile),
            naming_timed_out: false,
        };
        let span = super::span(named, Clock::new()).unwrap();
        for kv in &span.attributes {
            let len = kv.value.as_str().len();
            assert!(len <= MAX_STACK_ATTRIBUTE, "{} is {len} bytes", kv.key);
        }
        let stack = attribute(&span, "loopbpf.stack").unwrap().to_string();
        assert!(
            stack.ends_with("more frames"),
            "{}",
            &stack[stack.len() - 40..]
        );
    }

    #[test]
    fn node_version_is_read_from_the_release_url() {
        let dir = std::env::temp_dir().join(format!("loopbpf-otlp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("node");
        // The mark straddles two reads, and a bogus one comes first.
        let mut bytes = vec![0u8; (1 << 20) - 5];
        bytes.extend_from_slice(b"/download/release/vX/ ");
        bytes.extend_from_slice(
            b"https://nodejs.org/download/release/v22.11.0/node-v22.11.0-headers.tar.gz",
        );
        std::fs::write(&exe, &bytes).unwrap();
        assert_eq!(
            node_version(File::open(&exe).unwrap()).as_deref(),
            Some("22.11.0")
        );
        std::fs::write(&exe, b"no version here").unwrap();
        assert_eq!(node_version(File::open(&exe).unwrap()), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
