//! Which HTTP request blocked the loop, read from outside with no change to the app: a plain
//! `node:http` server, a real Express app and a real Fastify app (tests/fixtures/requests.js)
//! whose handlers block, on several Node majors. The truth is what the test itself sent: method, path, the
//! route it was written for, the `traceparent` it carried. A block with no request running
//! (a timer) names none, a request that waits while another blocks is never named, and the
//! query string stays out unless `--request-query` asks for it.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Command,
    thread,
    time::Duration,
};

use loopbpf_tests::{Fixture, Loopbpf, fixture, node_of, npm_package, poll_until, require_root};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const SPAN_ID: &str = "b7ad6b7169203331";
/// How long each blocking handler spins.
const BLOCK_MS: u64 = 300;

/// requests.js on Node `major`, as a plain `node:http` server or an Express app.
fn start(major: u32, kind: &str) -> (Fixture, u16) {
    if kind != "http" {
        npm_package(kind);
    }
    let mut command = Command::new(node_of(major));
    command.arg(fixture("requests.js")).arg(kind);
    let fixture = Fixture::start_command(command);
    let ready = fixture.ready();
    let port = u16::try_from(ready["port"].as_u64().expect("a port")).unwrap();
    (fixture, port)
}

/// Sends `GET path` (with a `traceparent` when `trace`) and returns the answer's body.
fn get(port: u16, path: &str, trace: bool) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("the fixture listens");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let header = if trace {
        format!("traceparent: 00-{TRACE_ID}-{SPAN_ID}-01\r\n")
    } else {
        String::new()
    };
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: loopbpf-test\r\n{header}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The next block of `pid` as long as a blocking handler's (shorter ones are the runtime's).
fn next_block(loopbpf: &mut Loopbpf, pid: u32) -> Value {
    loop {
        let block = loopbpf.wait_for_block(pid, TIMEOUT);
        if block["duration_ms"].as_f64().unwrap() >= (BLOCK_MS as f64) * 0.9 {
            return block;
        }
    }
}

/// The block's request, as `(method, path, route)`.
fn request_of(block: &Value) -> Option<(String, String, Option<String>)> {
    let request = &block["request"];
    assert!(
        block.get("request").is_some(),
        "a block record always has `request`: {block}"
    );
    if request.is_null() {
        return None;
    }
    let text = |key: &str| request[key].as_str().map(str::to_owned);
    Some((
        text("method").unwrap(),
        text("path").unwrap(),
        text("route"),
    ))
}

/// Every scenario against one fixture and one loopbpf.
fn requests_are_named(major: u32, kind: &str) {
    require_root();
    let (mut node, port) = start(major, kind);
    let pid = node.pid();
    let pid_arg = pid.to_string();
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid_arg, "--json"]);
    let framework = kind != "http";

    // A handler that blocks synchronously: the request it ran for, whole.
    let body = get(
        port,
        &format!("/users/42/report?ms={BLOCK_MS}&token=secret"),
        true,
    );
    assert!(body.contains("measured_ms"), "answer: {body}");
    let block = next_block(&mut loopbpf, pid);
    let request = &block["request"];
    assert_eq!(request["method"], "GET", "{block}");
    assert_eq!(
        request["path"], "/users/42/report",
        "the path, without its query: {block}"
    );
    let route = if framework {
        Value::from("/users/:id/report")
    } else {
        Value::Null
    };
    assert_eq!(request["route"], route, "{block}");
    assert_eq!(request["trace_id"], TRACE_ID, "{block}");
    assert_eq!(request["parent_span_id"], SPAN_ID, "{block}");
    assert_eq!(request["others"], 0, "{block}");
    assert!(
        !block.to_string().contains("secret"),
        "the query string stays out: {block}"
    );

    // No traceparent sent: none reported.
    get(port, &format!("/users/7/report?ms={BLOCK_MS}"), false);
    let block = next_block(&mut loopbpf, pid);
    assert_eq!(block["request"]["path"], "/users/7/report", "{block}");
    assert!(block["request"]["trace_id"].is_null(), "{block}");
    assert!(block["request"]["parent_span_id"].is_null(), "{block}");

    // Blocked after an await: that request or none, never another one.
    get(port, &format!("/later/9?ms={BLOCK_MS}"), true);
    let block = next_block(&mut loopbpf, pid);
    if let Some((method, path, _)) = request_of(&block) {
        assert_eq!(
            (method.as_str(), path.as_str()),
            ("GET", "/later/9"),
            "{block}"
        );
    }

    // Two requests at once, one of which waits while the other blocks: only the blocking one
    // is named.
    let waiting = thread::spawn(move || get(port, "/wait/1?ms=1500", true));
    thread::sleep(Duration::from_millis(300));
    get(port, &format!("/users/3/report?ms={BLOCK_MS}"), false);
    let block = next_block(&mut loopbpf, pid);
    let (_, path, _) = request_of(&block).expect("the blocking request is named");
    assert_eq!(path, "/users/3/report", "{block}");
    assert_eq!(block["request"]["others"], 0, "{block}");
    assert!(waiting.join().unwrap().contains("measured_ms"));

    // A timer with no request about: none.
    node.send(&format!("timer {BLOCK_MS}"));
    node.done("timer", TIMEOUT);
    let block = next_block(&mut loopbpf, pid);
    assert!(
        block["request"].is_null(),
        "a timer ran no request: {block}"
    );

    let records = loopbpf.stop(TIMEOUT);
    for record in records.iter().filter(|r| r["event"] == "block") {
        assert_ne!(
            record["request"]["path"], "/wait/1",
            "a request that only waited was named: {record}"
        );
    }
}

#[test]
fn node_20_http() {
    requests_are_named(20, "http");
}

#[test]
fn node_20_express() {
    requests_are_named(20, "express");
}

#[test]
fn node_20_fastify() {
    requests_are_named(20, "fastify");
}

#[test]
fn node_18_express() {
    requests_are_named(18, "express");
}

#[test]
fn node_22_express() {
    requests_are_named(22, "express");
}

#[test]
fn node_24_http() {
    requests_are_named(24, "http");
}

#[test]
fn node_26_express() {
    requests_are_named(26, "express");
}

/// `--request-query` keeps the query string; the text output shows the request on the block's
/// line.
#[test]
fn the_query_string_only_when_asked() {
    require_root();
    let (node, port) = start(20, "express");
    let pid = node.pid().to_string();
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid, "--request-query"]);
    get(
        port,
        &format!("/users/5/report?ms={BLOCK_MS}&token=abc"),
        false,
    );
    let line = loopbpf
        .out
        .wait_for(TIMEOUT, |l| {
            l.contains(" blocked ") && l.contains("/users/5")
        })
        .unwrap_or_else(|| panic!("no block line named the request: {:?}", loopbpf.out.seen));
    assert!(
        line.contains(&format!(
            "  GET /users/5/report?ms={BLOCK_MS}&token=abc (route /users/:id/report)"
        )),
        "{line}"
    );
    loopbpf.stop(TIMEOUT);
}

/// Prometheus: blocked time by route template (never by URL), for the app's own routes.
#[test]
fn blocked_time_by_route_in_prometheus() {
    require_root();
    let (node, port) = start(20, "express");
    let pid = node.pid();
    let pid_arg = pid.to_string();
    let metrics_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{metrics_port}");
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid_arg, "--json", "--metrics", &address]);
    let mut blocked_ms = 0.0;
    for user in [1, 2] {
        get(port, &format!("/users/{user}/report?ms={BLOCK_MS}"), false);
        let block = next_block(&mut loopbpf, pid);
        assert_eq!(block["request"]["route"], "/users/:id/report", "{block}");
        blocked_ms += block["duration_ms"].as_f64().unwrap();
    }
    let series = format!(
        "loopbpf_event_loop_blocked_by_route_seconds_total{{pid=\"{pid}\",tid=\"{pid}\",thread=\"main\",comm=\"node\",container=\"\",pod=\"\",route=\"/users/:id/report\"}} "
    );
    let mut text = String::new();
    let found = poll_until(TIMEOUT, || {
        text = get(metrics_port, "/metrics", false);
        text.contains(&series)
    });
    assert!(found, "no route series {series} in {text}");
    let seconds: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(
        (seconds * 1e3 - blocked_ms).abs() < 1.0,
        "{seconds} s by route, {blocked_ms} ms blocked"
    );
    assert!(
        !text.contains("/users/1/report") && !text.contains("/users/2/report"),
        "no URL is a label: {text}"
    );
    loopbpf.stop(TIMEOUT);
}

/// A loop still stuck in a handler: the ongoing reports name the request already.
#[test]
fn an_ongoing_block_names_its_request() {
    require_root();
    let (node, port) = start(20, "express");
    let pid = node.pid();
    let pid_arg = pid.to_string();
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid_arg, "--json"]);
    let client = thread::spawn(move || get(port, "/users/8/report?ms=2500", true));
    let line = loopbpf
        .out
        .wait_for(TIMEOUT, |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == "ongoing")
        })
        .unwrap_or_else(|| panic!("no ongoing record: {:?}", loopbpf.err.seen));
    let ongoing: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ongoing["request"]["path"], "/users/8/report", "{ongoing}");
    assert_eq!(
        ongoing["request"]["route"], "/users/:id/report",
        "{ongoing}"
    );
    assert_eq!(ongoing["request"]["trace_id"], TRACE_ID, "{ongoing}");
    assert!(client.join().unwrap().contains("measured_ms"));
    let block = loopbpf.wait_for_block(pid, TIMEOUT);
    assert_eq!(block["request"]["path"], "/users/8/report", "{block}");
    loopbpf.stop(TIMEOUT);
}
