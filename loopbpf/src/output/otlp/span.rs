//! A block as its span: the busy interval's times, the thread, the on/off-CPU and GC shares,
//! the innermost application frame (`code.*`), the heaviest stack, and the request's HTTP
//! attributes and trace. Every name from the target is bounded.

use std::{
    borrow::Cow,
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use crate::{
    aggregate::{BlockEnd, Record, ThreadLabel},
    naming::{
        frame::{Frame, FrameKind},
        request::Request,
    },
    output::{Named, clock::Clock},
};

/// The span's name, as the in-process monitors name theirs.
pub const SPAN_NAME: &str = "event-loop-blocked";
/// The heaviest stack attribute's size at most, in bytes.
const MAX_STACK_ATTRIBUTE: usize = 4096;
/// A name or path from the target at most, in bytes (the stack attribute has its own bound).
pub(super) const MAX_NAME: usize = 512;

/// A finished block as its span, with the request's trace and parent ids where it had a
/// `traceparent` (else the trace id is `INVALID`, for the caller to make one) and no span id.
pub(super) fn span(named: Named<'_>, clock: Clock) -> Option<SpanData> {
    let Record::Block {
        id,
        start_ns,
        duration_ns,
        end,
        before_attach,
        gc_ns,
        cpu_wait_ns,
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
        KeyValue::new("loopbpf.cpu_wait.share", share(cpu_wait_ns)),
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
fn app_frame(frames: &[Frame]) -> Option<&Frame> {
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

/// The request's attributes by the HTTP semantic conventions: `url.path` is the path alone;
/// the query string (there only with `--request-query`) is `url.query`, without its `?`.
fn request_attributes(request: &Request) -> Vec<KeyValue> {
    let (path, query) = match request.path.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (request.path.as_str(), None),
    };
    let mut attributes = vec![
        KeyValue::new(
            "http.request.method",
            bounded(&request.method, 32).into_owned(),
        ),
        KeyValue::new("url.path", bounded(path, MAX_NAME).into_owned()),
    ];
    if let Some(query) = query {
        attributes.push(KeyValue::new(
            "url.query",
            bounded(query, MAX_NAME).into_owned(),
        ));
    }
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

/// `text` cut to at most `max` bytes, on a character boundary.
pub(super) fn bounded(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(text[..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::LoopId,
        naming::{request::TraceParent, stacks::BlockProfile, stacks::NamedStack},
    };

    const MS: u64 = 1_000_000;

    fn frame(name: &str, kind: FrameKind, file: Option<&str>, line: Option<u32>) -> Frame {
        Frame {
            name: name.into(),
            module: if kind == FrameKind::Js {
                "[JIT]"
            } else {
                "node"
            }
            .into(),
            file: file.map(Into::into),
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
            cpu_wait_ns: 20 * MS,
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
        assert_eq!(get("loopbpf.cpu_wait.share"), "0.1");
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
        assert!(attribute(&span, "url.query").is_none());
    }

    #[test]
    fn a_kept_query_string_is_url_query_not_part_of_the_path() {
        let request = Request {
            method: "GET".to_owned(),
            path: "/users/5/report?ms=300&token=abc".to_owned(),
            ..Request::default()
        };
        let (record, profile) = block(Some(request));
        let named = Named {
            record: &record,
            profile: Some(&profile),
            naming_timed_out: false,
        };
        let span = super::span(named, Clock::new()).unwrap();
        let get = |key| attribute(&span, key).unwrap().to_string();
        assert_eq!(get("url.path"), "/users/5/report");
        assert_eq!(get("url.query"), "ms=300&token=abc");
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
            cpu_wait_ns: 0,
        };
        assert!(super::span(Named::bare(&ongoing), Clock::new()).is_none());
    }

    #[test]
    fn hostile_names_are_bounded() {
        let (record, mut profile) = block(None);
        let huge = "é".repeat(100_000);
        for frame in &mut profile.stacks[0].frames {
            frame.name = huge.as_str().into();
            frame.file = frame.file.as_ref().map(|_| huge.as_str().into());
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
}
