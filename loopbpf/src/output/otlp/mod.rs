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
//!
//! [`config`] reads the settings, [`span`] makes a block's span; this module runs the export.

mod config;
mod span;

use std::{
    collections::{HashMap, VecDeque},
    fs::File,
    io::Read,
    path::Path,
    sync::{Arc, Condvar, Mutex, OnceLock, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use opentelemetry::{
    Key, KeyValue,
    trace::{SpanContext, TraceFlags, TraceId, TraceState},
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::{
    Resource,
    resource::EnvResourceDetector,
    trace::{IdGenerator, RandomIdGenerator, SpanData, SpanExporter},
};

pub use config::{Config, Transport};
use span::{MAX_NAME, bounded, span};

use super::{Named, clock::Clock};
use crate::{
    aggregate::Record,
    target::{ProcessLabels, files::open_magic_link, proc::Process},
};

/// How long the end of a session waits for the spans still queued to be exported.
pub const FINISH_WAIT: Duration = Duration::from_secs(5);
/// Executables whose Node version is remembered at most.
const MAX_EXECUTABLES: usize = 256;
/// How often dropped spans are told at most.
const TELL_EVERY: Duration = Duration::from_secs(10);
/// How much of a process's executable is searched for Node's version.
const MAX_EXE_SCAN: u64 = 512 << 20;

/// What the session tells a process's resource from.
#[derive(Debug)]
struct ProcessEntry {
    pid: u32,
    labels: ProcessLabels,
    /// Its pod's namespace, where the pod's service account says it.
    namespace: Option<String>,
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
    /// Drops already told, and when.
    dropped_told: u64,
    told_at: Option<Instant>,
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
            dropped_told: 0,
            told_at: None,
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
        let exe = open_magic_link(
            Path::new(&format!("/proc/{pid}/exe")),
            MAX_EXE_SCAN,
            &format!("the executable of pid {pid}"),
        )
        .ok();
        let namespace = if labels.pod.is_empty() {
            None
        } else {
            k8s_namespace(pid)
        };
        self.processes.insert(
            pid,
            Arc::new(ProcessEntry {
                pid,
                labels: labels.clone(),
                namespace,
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

    /// Says on stderr that spans were dropped since the last time, and the last export error:
    /// at most every [`TELL_EVERY`] (a receiver down for long is one line a while, not a
    /// flood), or now when `now` is set.
    pub fn warn_of_drops(&mut self, now: bool) {
        let dropped = self.counts().dropped;
        if dropped <= self.dropped_told
            || (!now && self.told_at.is_some_and(|at| at.elapsed() < TELL_EVERY))
        {
            return;
        }
        let error = lock(&self.shared.error)
            .take()
            .map(|e| format!("; last error: {}", crate::diag::printable(&e)))
            .unwrap_or_default();
        loss!(
            "{dropped} OTLP spans dropped so far: the receiver at {} is down or slow (its queue was full, or an export failed after its retries){error}; the blocks are still reported here",
            self.describe()
        );
        self.dropped_told = dropped;
        self.told_at = Some(Instant::now());
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
        status!(
            "OTLP: {} spans exported to {}",
            counts.exported,
            self.describe()
        );
        self.warn_of_drops(true);
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
    let from_env = Resource::builder_empty()
        .with_detector(Box::new(EnvResourceDetector::new()))
        .build();
    // OTEL_SERVICE_NAME (or --service-name), else OTEL_RESOURCE_ATTRIBUTES's, else the process's.
    let service = config.service_name.clone().or_else(|| {
        from_env
            .get(&Key::from_static_str("service.name"))
            .map(|name| name.to_string())
    });
    let mut attributes = vec![
        KeyValue::new(
            "service.name",
            service.unwrap_or_else(|| bounded(&labels.comm, MAX_NAME).into_owned()),
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
    if let Some(namespace) = &entry.namespace {
        attributes.push(KeyValue::new("k8s.namespace.name", namespace.clone()));
    }
    Resource::builder_empty()
        .with_attributes(
            from_env
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .with_attributes(attributes)
        .build()
}

/// The namespace of a process's pod, as the service account mounted into its containers
/// says it (read inside its own root; a DNS label, else nothing).
fn k8s_namespace(pid: u32) -> Option<String> {
    let mut file = Process::new(pid)
        .open_file(
            Path::new("/var/run/secrets/kubernetes.io/serviceaccount/namespace"),
            256,
        )
        .ok()?;
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    let name = text.trim();
    let label = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    label.then(|| name.to_owned())
}

/// Node's version in its executable, once per file (by device and inode).
fn node_version_cached(
    file: File,
    versions: &mut HashMap<(u64, u64), Option<String>>,
) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    // Each distinct executable is one entry: a host that churns through many stays bounded.
    if versions.len() >= MAX_EXECUTABLES {
        versions.clear();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
