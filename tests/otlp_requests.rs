//! Blocks as spans in the trace of the request that blocked, end to end: a real Express app
//! (tests/fixtures/requests.js) instrumented as apps instrument themselves, with
//! `@opentelemetry/sdk-node` and its HTTP instrumentation preloaded (tests/fixtures/otel.js),
//! exporting its own spans to the same real OTLP receiver loopbpf exports to. The test client
//! sends a W3C `traceparent` of its own making with each request: that is the truth. loopbpf's
//! `event-loop-blocked` span must sit in that trace with the caller's span as its parent, carry
//! the request's HTTP attributes and the innermost app frame, and share its trace with the
//! app's own server span; a block after an `await` names its own request or none, of two
//! requests at once only the blocking one is named, and a timer's block is in a trace of its
//! own with no HTTP attributes.

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    thread,
    time::Duration,
};

use loopbpf_tests::{
    Fixture, Loopbpf, assert_block_close, fixture, node_of, npm_package, otlp_receiver::Receiver,
    poll_until, require_root,
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);
/// How long each blocking handler spins.
const BLOCK_MS: u64 = 300;
/// The instrumentation scope of the app's own HTTP spans.
const HTTP_SCOPE: &str = "@opentelemetry/instrumentation-http";
/// OTLP's `SPAN_KIND_SERVER`.
const SERVER: u64 = 2;

/// A caller's trace context: `(trace id, its span id)`, as the test client sends them.
type Caller = (&'static str, &'static str);
const SYNC: Caller = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
const LATER: Caller = ("5cf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8");
const WAITING: Caller = ("6df92f3577b34da6a3ce929d0e0e4738", "20f067aa0ba902b9");
const BLOCKING: Caller = ("7ef92f3577b34da6a3ce929d0e0e4739", "30f067aa0ba902ba");
const WARM_UP: Caller = ("8af92f3577b34da6a3ce929d0e0e473a", "40f067aa0ba902bb");

/// requests.js as an Express app on Node `major`, with OpenTelemetry preloaded and exporting
/// to `receiver` over http/protobuf; and its port.
fn start_app(major: u32, receiver: &Receiver) -> (Fixture, u16) {
    for package in [
        "express",
        "@opentelemetry/sdk-node",
        "@opentelemetry/instrumentation-http",
        "@opentelemetry/exporter-trace-otlp-proto",
    ] {
        npm_package(package);
    }
    let mut command = Command::new(node_of(major));
    command
        .arg("--require")
        .arg(fixture("otel.js"))
        .arg(fixture("requests.js"))
        .arg("express")
        .env(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            format!("http://127.0.0.1:{}/v1/traces", receiver.http_port),
        )
        .env("OTEL_SERVICE_NAME", "shop")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        // Traces only: no exporter of logs or metrics to a collector that is not there.
        .env("OTEL_LOGS_EXPORTER", "none")
        .env("OTEL_METRICS_EXPORTER", "none");
    let fixture = Fixture::start_command(command);
    let ready = fixture.ready();
    let port = u16::try_from(ready["port"].as_u64().expect("a port")).unwrap();
    (fixture, port)
}

/// Sends `GET path` with the caller's `traceparent` on a connection kept open, and returns
/// the answer's body (by its `Content-Length`) and the connection.
fn get_kept(port: u16, path: &str, caller: Caller) -> (String, TcpStream) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("the fixture listens");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\ntraceparent: 00-{}-{}-01\r\n\r\n",
        caller.0, caller.1
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream
            .read_exact(&mut byte)
            .unwrap_or_else(|e| panic!("the answer to {path} ended early: {e}"));
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"));
    let mut body = vec![0; length];
    stream.read_exact(&mut body).unwrap();
    (String::from_utf8(body).unwrap(), stream)
}

/// Sends `GET path` with the caller's `traceparent` and returns the answer's body.
fn get(port: u16, path: &str, caller: Caller) -> String {
    get_kept(port, path, caller).0
}

/// Sends `GET target` as the caller; the fixture's own measure of all the time the request held
/// the loop (from when Node's server had it, or the handler came back from its await, until
/// the loop had run what its answer set off: Express's and OpenTelemetry's work too), as
/// `{"held_ms","start_unix_ms"}`. The connection stays open until then: its closing is none of
/// the request's busy time.
fn held(node: &mut Fixture, port: u16, target: &str, caller: Caller) -> Value {
    let (body, connection) = get_kept(port, target, caller);
    assert!(body.contains("measured_ms"), "answer: {body}");
    let held = node.done(&format!("request {target}"), TIMEOUT);
    drop(connection);
    held
}

fn duration_ms(span: &Value) -> f64 {
    let start = span["start_unix_nano"].as_u64().unwrap();
    let end = span["end_unix_nano"].as_u64().unwrap();
    (end - start) as f64 / 1e6
}

/// loopbpf, watching the fixture `pid`.
struct Watch {
    loopbpf: Loopbpf,
    pid: u32,
}

impl Watch {
    /// The block in which the fixture's own measure (`held`) began, as loopbpf's JSON record
    /// and as the span the receiver decoded. Others (a warm-up's compiling, slow under load)
    /// are passed over.
    fn block_of(&mut self, receiver: &Receiver, held: &Value) -> (Value, Value) {
        let began = held["start_unix_ms"].as_f64().expect("the fixture's start");
        let block = loop {
            let block = self.loopbpf.wait_for_block(self.pid, TIMEOUT);
            let start = block["start_unix_ms"].as_f64().unwrap();
            let end = start + block["duration_ms"].as_f64().unwrap();
            if block["duration_ms"].as_f64().unwrap() >= long_enough()
                // (Two clocks: the fixture's time origin is as good as a millisecond.)
                && start <= began + 5.0
                && began <= end
            {
                break block;
            }
        };
        let start_ms = block["start_unix_ms"].as_f64().unwrap();
        let mut span = None;
        poll_until(TIMEOUT, || {
            span = receiver.spans().into_iter().find(|s| {
                s["scope"] == "loopbpf"
                    && (s["start_unix_nano"].as_f64().unwrap() / 1e6 - start_ms).abs() < 1.0
            });
            span.is_some()
        });
        let span = span.unwrap_or_else(|| {
            panic!(
                "no span for the block {block} arrived; the receiver has {:?}",
                receiver.spans()
            )
        });
        (block, span)
    }
}

fn long_enough() -> f64 {
    BLOCK_MS as f64 * 0.9
}

/// The app's own server span of the request for `path` (its `http.target`, with the query).
fn server_span(receiver: &Receiver, path: &str) -> Value {
    let mut found = None;
    poll_until(TIMEOUT, || {
        found = receiver.spans().into_iter().find(|s| {
            s["scope"] == HTTP_SCOPE
                && s["kind"] == SERVER
                && s["attributes"]["http.target"].as_str() == Some(path)
        });
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "the app exported no server span for {path}: {:?}",
            receiver.spans()
        )
    })
}

/// The span covers the fixture's own measure of its block, within max(2 ms, 2%) (or the GC
/// loopbpf's record of the block says ran with it).
fn check_duration(span: &Value, block: &Value, measured: f64, what: &str) {
    assert_eq!(span["name"], "event-loop-blocked", "{span}");
    let mut as_block = block.clone();
    as_block["duration_ms"] = duration_ms(span).into();
    assert_block_close(&as_block, measured, what);
}

/// The innermost app frame is the fixture's `spin`, in requests.js, at a line of it, where
/// loopbpf's own record of the block places it.
fn check_code(span: &Value, block: &Value) {
    let attributes = &span["attributes"];
    let file = fixture("requests.js");
    assert_eq!(
        attributes["code.file.path"],
        file.to_str().unwrap(),
        "{attributes}"
    );
    assert_eq!(attributes["code.function.name"], "spin", "{attributes}");
    let line = attributes["code.line.number"]
        .as_i64()
        .unwrap_or_else(|| panic!("no line: {attributes}"));
    let source = fs::read_to_string(&file).unwrap();
    let spin_line = source
        .lines()
        .position(|l| l.starts_with("function spin("))
        .map(|i| i64::try_from(i).unwrap() + 1)
        .unwrap();
    assert!(
        (spin_line..spin_line + 4).contains(&line),
        "line {line} is not in spin (from line {spin_line}): {attributes}"
    );
    let frame = block["stacks"][0]["frames"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "spin")
        .unwrap_or_else(|| panic!("no spin in loopbpf's heaviest stack: {block}"));
    assert_eq!(frame["line"], line, "{block}");
}

/// The span is in the caller's trace, with the caller's span as its parent, and names the
/// request by the HTTP semantic conventions: path without its query, the Express route.
fn check_request(span: &Value, caller: Caller, path: &str, route: &str) {
    let attributes = &span["attributes"];
    assert_eq!(span["trace_id"], caller.0, "the request's trace: {span}");
    assert_eq!(
        span["parent_span_id"], caller.1,
        "the caller's span: {span}"
    );
    assert_eq!(attributes["http.request.method"], "GET", "{attributes}");
    assert_eq!(attributes["url.path"], path, "{attributes}");
    assert_eq!(attributes["http.route"], route, "{attributes}");
    assert!(
        attributes.get("loopbpf.request.others").is_none(),
        "one request on the stack: {attributes}"
    );
}

/// The app's own server span of the request is in the same trace, under the same caller, and
/// the block overlaps it (the busy interval starts as the loop wakes up, before the request is
/// parsed and its span started, and may go on past the answer).
fn check_server_span(receiver: &Receiver, span: &Value, target: &str, caller: Caller, pid: u32) {
    let server = server_span(receiver, target);
    assert_eq!(server["trace_id"], span["trace_id"], "one trace: {server}");
    assert_eq!(server["parent_span_id"], caller.1, "{server}");
    assert_eq!(server["resource"]["process.pid"], pid, "{server}");
    assert_eq!(span["resource"]["process.pid"], pid, "{span}");
    let time = |span: &Value, key: &str| span[key].as_u64().unwrap();
    assert!(
        time(span, "start_unix_nano") <= time(&server, "end_unix_nano")
            && time(&server, "start_unix_nano") <= time(span, "end_unix_nano"),
        "the block overlaps its request's span: {span} {server}"
    );
}

/// Every scenario against one instrumented app, one receiver and one loopbpf (with
/// `--request-query` when `keep_query`).
fn blocks_join_their_requests_traces(major: u32, keep_query: bool) {
    require_root();
    let receiver = Receiver::start(&format!("requests-{major}"), Duration::ZERO, 0);
    let endpoint = format!("http://127.0.0.1:{}", receiver.http_port);
    let (mut node, port) = start_app(major, &receiver);
    let pid = node.pid();
    let pid_arg = pid.to_string();
    let mut args = vec!["--pid", &pid_arg, "--json", "--otlp", &endpoint];
    if keep_query {
        args.push("--request-query");
    }
    let loopbpf = Loopbpf::attach_with_env(&args, &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    let mut watch = Watch { loopbpf, pid };
    // Each handler once first, so Express's and OpenTelemetry's code is compiled before a
    // block is timed; and their spans exported, so the app's first export (its timer due
    // during a block) is not in a block's busy time either.
    let warm_ups = ["/users/0/report?ms=0", "/later/0?ms=0", "/wait/0?ms=0"];
    for warm_up in warm_ups {
        get(port, warm_up, WARM_UP);
    }
    for warm_up in warm_ups {
        server_span(&receiver, warm_up);
    }

    // A handler that blocks synchronously.
    let target = format!("/users/42/report?ms={BLOCK_MS}&token=secret");
    let measured = held(&mut node, port, &target, SYNC);
    let (block, span) = watch.block_of(&receiver, &measured);
    let measured = measured["held_ms"].as_f64().unwrap();
    check_duration(&span, &block, measured, "the synchronous block's span");
    check_code(&span, &block);
    check_request(&span, SYNC, "/users/42/report", "/users/:id/report");
    if keep_query {
        assert_eq!(
            span["attributes"]["url.query"],
            format!("ms={BLOCK_MS}&token=secret"),
            "--request-query keeps the query, as url.query: {span}"
        );
    } else {
        assert!(
            !span.to_string().contains("secret"),
            "the query string stays out: {span}"
        );
    }
    check_server_span(&receiver, &span, &target, SYNC, pid);

    // Blocked after an await: that request or none, never another one.
    let target = format!("/later/9?ms={BLOCK_MS}");
    let measured = held(&mut node, port, &target, LATER);
    let (block, span) = watch.block_of(&receiver, &measured);
    let measured = measured["held_ms"].as_f64().unwrap();
    check_duration(&span, &block, measured, "the after-await block's span");
    check_code(&span, &block);
    let named = span["attributes"].get("url.path").is_some();
    eprintln!("the after-await block named its request: {named}");
    if named {
        check_request(&span, LATER, "/later/9", "/later/:id");
        check_server_span(&receiver, &span, &target, LATER, pid);
    } else {
        check_no_request(&span);
    }

    // Two requests at once, one of which waits while the other blocks: only the blocking one
    // is named.
    let waiting = thread::spawn(move || get(port, "/wait/1?ms=1500", WAITING));
    thread::sleep(Duration::from_millis(300));
    let target = format!("/users/3/report?ms={BLOCK_MS}");
    let measured = held(&mut node, port, &target, BLOCKING);
    let (block, span) = watch.block_of(&receiver, &measured);
    let measured = measured["held_ms"].as_f64().unwrap();
    check_duration(&span, &block, measured, "the concurrent block's span");
    check_code(&span, &block);
    check_request(&span, BLOCKING, "/users/3/report", "/users/:id/report");
    check_server_span(&receiver, &span, &target, BLOCKING, pid);
    assert!(waiting.join().unwrap().contains("measured_ms"));
    // The waiting request was traced by the app all the same.
    server_span(&receiver, "/wait/1?ms=1500");

    // A timer with no request about: a trace of its own, no HTTP attributes. (A moment first,
    // for the app's last export to be answered and the waiting request's connection closed:
    // neither in the timer's turn of the loop.)
    thread::sleep(Duration::from_millis(200));
    node.send(&format!("timer {BLOCK_MS}"));
    let answer = node.done("timer", TIMEOUT);
    let (block, span) = watch.block_of(&receiver, &answer);
    check_duration(
        &span,
        &block,
        answer["measured_ms"].as_f64().unwrap(),
        "the timer's span",
    );
    check_code(&span, &block);
    check_no_request(&span);
    let timer_trace = span["trace_id"].clone();

    watch.loopbpf.stop(TIMEOUT);
    let spans = receiver.spans();
    let in_timer_trace: Vec<&Value> = spans
        .iter()
        .filter(|s| s["trace_id"] == timer_trace)
        .collect();
    assert_eq!(
        in_timer_trace.len(),
        1,
        "the timer's block is alone in a fresh trace: {in_timer_trace:?}"
    );
    // No span of loopbpf's, of any length, was in the waiting request's trace.
    for span in spans.iter().filter(|s| s["scope"] == "loopbpf") {
        assert_ne!(
            span["trace_id"], WAITING.0,
            "a request that only waited was named: {span}"
        );
        assert_ne!(span["attributes"]["url.path"], "/wait/1", "{span}");
    }
}

/// A span of a block that ran no request: a fresh trace of its own (none of the callers'),
/// no parent, no HTTP attributes.
fn check_no_request(span: &Value) {
    let trace_id = span["trace_id"].as_str().unwrap();
    assert_eq!(trace_id.len(), 32, "{span}");
    assert_ne!(trace_id, "0".repeat(32), "{span}");
    for caller in [SYNC, LATER, WAITING, BLOCKING, WARM_UP] {
        assert_ne!(trace_id, caller.0, "no request, no request's trace: {span}");
    }
    assert_eq!(span["parent_span_id"], "", "no request, no parent: {span}");
    let attributes = span["attributes"].as_object().unwrap();
    assert!(
        attributes
            .keys()
            .all(|k| !k.starts_with("http.") && !k.starts_with("url.")),
        "no request, no HTTP attributes: {attributes:?}"
    );
}

#[test]
fn node_20_express_with_opentelemetry() {
    blocks_join_their_requests_traces(20, false);
}

/// A newer major, and `--request-query`.
#[test]
fn node_24_express_with_opentelemetry_and_request_query() {
    blocks_join_their_requests_traces(24, true);
}

#[test]
fn node_26_express_with_opentelemetry() {
    blocks_join_their_requests_traces(26, false);
}
