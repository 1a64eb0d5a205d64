//! Blocks as OpenTelemetry spans (`--otlp`), as a real OTLP receiver decodes them: the
//! official protobuf definitions (Python `opentelemetry-proto`) served over gRPC and over HTTP
//! (`tests/fixtures/otlp_receiver.py`, in the venv `scripts/install-deps.sh` makes). One span per
//! block, named `event-loop-blocked`, its duration within max(2 ms, 2%) of the fixture's own
//! measure, the innermost app function and its line, one resource per process; a receiver
//! down, then slow: loopbpf goes on reporting, its memory stays bounded, drops are counted.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use loopbpf_tests::{
    Fixture, Loopbpf, assert_block_close, events, fixture, installed_node, otlp_receiver::Receiver,
    require_root,
};
use serde_json::Value;

const FIXTURE_TIMEOUT: Duration = Duration::from_secs(20);

/// The version of the node the fixtures run on, without its `v`.
fn node_version() -> String {
    let out = Command::new(installed_node())
        .arg("--version")
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .trim_start_matches('v')
        .to_owned()
}

/// A fixture blocked once for 300 ms, watched by loopbpf with `args` and `env`: the fixture's
/// answer, loopbpf's JSON lines, and the fixture's pid, once both ended.
fn one_block(args: &[&str], env: &[(&str, &str)]) -> (Value, Vec<Value>, u32) {
    require_root();
    let mut node = Fixture::start();
    let pid = node.pid().to_string();
    let mut all = vec!["--pid", pid.as_str(), "--json"];
    all.extend_from_slice(args);
    let loopbpf = Loopbpf::attach_with_env(&all, env);
    node.send("block timer spin 300");
    let answer = node.done("block", FIXTURE_TIMEOUT);
    node.send("exit");
    node.wait_exit(FIXTURE_TIMEOUT)
        .expect("fixture did not exit");
    let (status, output) = loopbpf.finish(Duration::from_secs(15));
    assert!(status.success(), "loopbpf failed: {status}");
    (answer, output, node.pid())
}

/// The span of the one block, checked against loopbpf's own JSON record and the fixture's
/// measure.
fn check_span(span: &Value, answer: &Value, output: &[Value], pid: u32) {
    let blocks = events(output, "block");
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    check_span_of(span, answer, blocks[0], pid);
}

/// The span of `block` (loopbpf's own JSON record of it).
fn check_span_of(span: &Value, answer: &Value, block: &Value, pid: u32) {
    assert_eq!(span["name"], "event-loop-blocked");
    assert_eq!(span["scope"], "loopbpf");
    let start = span["start_unix_nano"].as_u64().unwrap();
    let end = span["end_unix_nano"].as_u64().unwrap();
    let span_ms = (end - start) as f64 / 1e6;
    let mut as_block = block.clone();
    as_block["duration_ms"] = span_ms.into();
    assert_block_close(&as_block, answer, "the span's duration");
    let start_gap = start as f64 / 1e6 - answer["start_unix_ms"].as_f64().unwrap();
    assert!(
        start_gap.abs() < 50.0,
        "the span starts {start_gap:.1} ms away from the fixture's block"
    );
    let trace_id = span["trace_id"].as_str().unwrap();
    assert_eq!(trace_id.len(), 32, "{span}");
    assert_ne!(trace_id, "0".repeat(32), "a trace of its own");
    assert_eq!(span["span_id"].as_str().unwrap().len(), 16, "{span}");
    assert_eq!(span["parent_span_id"], "", "no request, no parent: {span}");

    let attributes = &span["attributes"];
    assert_eq!(attributes["thread.id"], pid, "{attributes}");
    assert_eq!(attributes["thread.name"], "main", "{attributes}");
    let on_cpu = attributes["loopbpf.on_cpu.share"].as_f64().unwrap();
    assert!(on_cpu > 0.9, "a spin is on-CPU: {attributes}");
    // The innermost app frame: the fixture's `spin`, in blocker.js, where loopbpf's own record
    // of the block places it.
    let file = attributes["code.file.path"].as_str().unwrap();
    assert_eq!(file, fixture("blocker.js").to_str().unwrap());
    let frame = block["stacks"][0]["frames"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["file"] == file)
        .unwrap_or_else(|| panic!("no blocker.js frame in loopbpf's heaviest stack: {block}"));
    // Node names it by its receiver: `works[work](ms)` runs `Object.spin`.
    let function = attributes["code.function.name"].as_str().unwrap();
    assert!(function.ends_with("spin"), "{attributes}");
    assert_eq!(frame["name"], function, "{attributes}");
    assert_eq!(
        attributes["code.line.number"], frame["line"],
        "{attributes}"
    );
    let line = attributes["code.line.number"].as_i64().unwrap();
    let source = fs::read_to_string(fixture("blocker.js")).unwrap();
    let spin_line = source
        .lines()
        .position(|l| l.starts_with("function spin("))
        .map(|i| i64::try_from(i).unwrap() + 1)
        .unwrap();
    assert!(
        (spin_line..spin_line + 3).contains(&line),
        "line {line} is not in spin (from line {spin_line}): {attributes}"
    );
    let stack = attributes["loopbpf.stack"].as_str().unwrap();
    assert!(stack.contains("spin "), "{stack}");
    assert!(stack.len() <= 4096, "the stack attribute is bounded");

    let resource = &span["resource"];
    assert_eq!(resource["process.pid"], pid, "{resource}");
    assert_eq!(resource["process.executable.name"], "node", "{resource}");
    assert_eq!(resource["process.runtime.name"], "nodejs", "{resource}");
    assert_eq!(
        resource["process.runtime.version"],
        node_version(),
        "{resource}"
    );
    let host = Command::new("uname").arg("-n").output().unwrap();
    assert_eq!(
        resource["host.name"],
        String::from_utf8(host.stdout).unwrap().trim(),
        "{resource}"
    );
}

#[test]
fn a_block_is_one_span_over_http_protobuf() {
    let receiver = Receiver::start("http", Duration::ZERO, 0);
    let endpoint = format!("http://127.0.0.1:{}", receiver.http_port);
    let (answer, output, pid) = one_block(
        &["--otlp", &endpoint],
        &[
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=ci,team=loop",
            ),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s3cret"),
        ],
    );
    let spans = receiver.spans();
    assert_eq!(spans.len(), 1, "one span per block: {spans:?}");
    let span = &spans[0];
    assert_eq!(span["protocol"], "http/protobuf");
    assert_eq!(
        span["api_key"], "s3cret",
        "OTEL_EXPORTER_OTLP_HEADERS are sent"
    );
    check_span(span, &answer, &output, pid);
    let resource = &span["resource"];
    assert_eq!(
        resource["service.name"], "node",
        "the process's name by default"
    );
    assert_eq!(resource["deployment.environment"], "ci", "{resource}");
    assert_eq!(resource["team"], "loop", "{resource}");
}

#[test]
fn a_block_is_one_span_over_grpc_from_the_environment() {
    let receiver = Receiver::start("grpc", Duration::ZERO, 0);
    let endpoint = format!("http://127.0.0.1:{}", receiver.grpc_port);
    let (answer, output, pid) = one_block(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", "checkout"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=shadowed"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s3cret,x-other=1"),
        ],
    );
    let spans = receiver.spans();
    assert_eq!(spans.len(), 1, "one span per block: {spans:?}");
    let span = &spans[0];
    assert_eq!(span["protocol"], "grpc");
    assert_eq!(
        span["api_key"], "s3cret",
        "OTEL_EXPORTER_OTLP_HEADERS are sent"
    );
    check_span(span, &answer, &output, pid);
    assert_eq!(span["resource"]["service.name"], "checkout");
}

#[test]
fn service_name_flag_names_the_service() {
    let receiver = Receiver::start("name", Duration::ZERO, 0);
    let endpoint = format!("http://127.0.0.1:{}", receiver.http_port);
    let (_, _, _) = one_block(
        &["--otlp", &endpoint, "--service-name", "payments"],
        &[("OTEL_SERVICE_NAME", "ignored")],
    );
    let spans = receiver.spans();
    assert_eq!(spans.len(), 1, "{spans:?}");
    assert_eq!(spans[0]["resource"]["service.name"], "payments");
}

#[test]
fn a_receiver_unavailable_for_a_moment_gets_the_span_on_retry() {
    let receiver = Receiver::start_with("retry", Duration::ZERO, 0, 1);
    let endpoint = format!("http://127.0.0.1:{}", receiver.http_port);
    let (answer, output, pid) = one_block(
        &["--otlp", &endpoint],
        &[("OTEL_RESOURCE_ATTRIBUTES", "service.name=billing")],
    );
    let refused = receiver.refused();
    assert_eq!(
        refused.len(),
        1,
        "the first export was refused: {refused:?}"
    );
    let spans = receiver.spans();
    assert_eq!(spans.len(), 1, "the retry delivered the span: {spans:?}");
    let waited = spans[0]["received_unix"].as_f64().unwrap() - refused[0];
    assert!(
        waited >= 0.9,
        "the retry came {waited:.2} s after the 503, not after its Retry-After: 1"
    );
    check_span(&spans[0], &answer, &output, pid);
    assert_eq!(
        spans[0]["resource"]["service.name"], "billing",
        "OTEL_RESOURCE_ATTRIBUTES's service.name beats the process's name"
    );
}

#[test]
fn record_exports_its_blocks_too() {
    require_root();
    let receiver = Receiver::start("record", Duration::ZERO, 0);
    let endpoint = format!("http://127.0.0.1:{}", receiver.http_port);
    let out = std::env::temp_dir().join(format!("loopbpf-otlp-record-{}", std::process::id()));
    let _ = fs::remove_dir_all(&out);
    let mut node = Fixture::start();
    let pid = node.pid().to_string();
    let loopbpf = Loopbpf::attach(&[
        "record",
        "--pid",
        &pid,
        "--out",
        out.to_str().unwrap(),
        "--otlp",
        &endpoint,
    ]);
    node.send("block timer spin 300");
    let answer = node.done("block", FIXTURE_TIMEOUT);
    node.send("exit");
    node.wait_exit(FIXTURE_TIMEOUT)
        .expect("fixture did not exit");
    let (output, _) = finish_with_stderr(loopbpf, Duration::from_secs(30));
    assert!(output.is_empty(), "record writes its bundle, not stdout");
    let report: Value =
        serde_json::from_slice(&fs::read(out.join("report.json")).unwrap()).unwrap();
    let blocks = report["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    let spans = receiver.spans();
    assert_eq!(spans.len(), 1, "{spans:?}");
    check_span_of(&spans[0], &answer, &blocks[0], node.pid());
    let _ = fs::remove_dir_all(&out);
}

#[test]
fn fleet_mode_gives_each_process_its_own_resource() {
    require_root();
    let receiver = Receiver::start("fleet", Duration::ZERO, 0);
    let endpoint = format!("http://127.0.0.1:{}", receiver.http_port);
    let mut nodes = [Fixture::start(), Fixture::start()];
    let mut loopbpf = Loopbpf::watch_all(&["--json", "--otlp", &endpoint]);
    for node in &mut nodes {
        node.send("block timer spin 200");
        node.done("block", FIXTURE_TIMEOUT);
        loopbpf.wait_for_block(node.pid(), Duration::from_secs(20));
    }
    loopbpf.signal(libc::SIGINT);
    let _ = finish_with_stderr(loopbpf, Duration::from_secs(30));
    // Other node processes of the host may have blocked too: only the fixtures' spans count.
    let spans = receiver.spans();
    for node in &nodes {
        let pid = node.pid();
        let theirs: Vec<&Value> = spans
            .iter()
            .filter(|s| s["resource"]["process.pid"] == pid)
            .collect();
        assert_eq!(theirs.len(), 1, "one span for pid {pid}: {spans:?}");
        let span = theirs[0];
        assert_eq!(span["attributes"]["thread.id"], pid, "{span}");
        assert_eq!(span["resource"]["service.name"], "node", "{span}");
        assert!(
            span["attributes"]["code.function.name"]
                .as_str()
                .is_some_and(|f| f.ends_with("spin")),
            "{span}"
        );
    }
}

/// loopbpf's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The first number in the last stderr line that holds `marker`.
fn number_in(lines: &[String], marker: &str) -> Option<u64> {
    lines
        .iter()
        .rev()
        .find(|l| l.contains(marker))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|word| word.parse::<u64>().ok())
        })
}

#[test]
fn a_receiver_down_then_slow_neither_stops_nor_grows_loopbpf() {
    require_root();
    // A port nothing listens on yet.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let metrics_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let mut node = Fixture::start();
    let pid = node.pid().to_string();
    let mut loopbpf = Loopbpf::attach_with_env(
        &[
            "--pid",
            &pid,
            "--json",
            "--threshold",
            "5ms",
            "--otlp",
            &endpoint,
            "--metrics",
            &metrics_port,
        ],
        &[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "16"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let mut blocks = 0;
    let block = |node: &mut Fixture, loopbpf: &mut Loopbpf| {
        node.send("block timer spin 10");
        node.done("block", FIXTURE_TIMEOUT);
        loopbpf.wait_for_block(node.pid(), Duration::from_secs(10));
    };
    // Down: every block is still reported here, at once.
    for _ in 0..20 {
        block(&mut node, &mut loopbpf);
        blocks += 1;
    }
    let rss_before = rss_kib(loopbpf.pid());
    for _ in 0..80 {
        block(&mut node, &mut loopbpf);
        blocks += 1;
    }
    let dropped_line = loopbpf.err.wait_for(Duration::from_secs(5), |l| {
        l.contains("OTLP spans dropped so far")
    });
    assert!(
        dropped_line.is_some(),
        "the drops are told on stderr: {:?}",
        loopbpf.err.seen
    );
    // The metric says so too (rendered once a second).
    std::thread::sleep(Duration::from_millis(1500));
    let exposition = scrape(&format!("127.0.0.1:{metrics_port}"));
    let dropped_metric = exposition
        .lines()
        .find_map(|l| l.strip_prefix("loopbpf_otlp_spans_dropped_total "))
        .unwrap_or_else(|| panic!("no drop counter in the metrics: {exposition}"));
    assert!(
        dropped_metric.parse::<f64>().unwrap() > 0.0,
        "{dropped_metric}"
    );
    // Slow: it answers each export half a second late.
    let receiver = Receiver::start("slow", Duration::from_millis(500), port);
    for _ in 0..100 {
        block(&mut node, &mut loopbpf);
        blocks += 1;
    }
    let rss_after = rss_kib(loopbpf.pid());
    node.send("exit");
    node.wait_exit(FIXTURE_TIMEOUT)
        .expect("fixture did not exit");
    let (output, err) = finish_with_stderr(loopbpf, Duration::from_secs(20));
    let reported = events(&output, "block").len() as u64;
    assert!(
        reported >= blocks,
        "every block reported on stdout: {reported} of {blocks}"
    );
    eprintln!("loopbpf RSS {rss_before} KiB after 20 blocks, {rss_after} KiB after {blocks}");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "loopbpf's memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    let arrived = receiver.spans().len() as u64;
    assert!(arrived > 0, "the slow receiver got spans once it was up");
    let exported = number_in(&err, "spans exported to").expect("the export's count on stderr");
    let dropped = number_in(&err, "OTLP spans dropped so far").expect("the drops on stderr");
    eprintln!("{blocks} blocks: {exported} spans exported, {dropped} dropped, {arrived} arrived");
    assert_eq!(exported, arrived, "what loopbpf counts as exported arrived");
    assert!(dropped > 0, "a receiver down drops spans: {err:?}");
    assert_eq!(
        exported + dropped,
        reported,
        "every block's span is exported or counted as dropped: {err:?}"
    );
}

/// The Prometheus exposition at `address`.
fn scrape(address: &str) -> String {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: loopbpf\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

/// Waits for loopbpf to end cleanly; its JSON lines and its stderr.
fn finish_with_stderr(mut loopbpf: Loopbpf, timeout: Duration) -> (Vec<Value>, Vec<String>) {
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = loopbpf.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "loopbpf did not end within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = loopbpf.err.rest(Duration::from_secs(5));
    assert!(
        status.success(),
        "loopbpf failed: {status}; stderr: {err:?}"
    );
    let output = loopbpf
        .out
        .rest(Duration::from_secs(5))
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (output, err)
}
