//! JS frames named from V8's heap, from outside, with no flag on the target, on every Node
//! major loopbpf supports. The truth is the stack Node itself prints at the line the fixture
//! blocks on (`new Error().stack`): names (`Class.method`, arrows, `<anonymous>` listeners),
//! files, lines and columns must agree, and under heavy GC no frame may carry a wrong name.

use std::{path::PathBuf, time::Duration};

use loopbpf_tests::{Fixture, Loopbpf, events, fixture, require_root};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Where `scripts/install-deps.sh` puts the node binaries of each major.
fn node_of(major: u32) -> PathBuf {
    let cache = std::env::var_os("LOOPBPF_NODE_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/loopbpf-node"), PathBuf::from);
    let node = cache.join(major.to_string()).join("bin/node");
    assert!(
        node.exists(),
        "LOUD FAILURE, NOT A SKIP: no Node {major} at {}: run scripts/install-deps.sh",
        node.display()
    );
    node
}

/// A frame as Node prints it in `Error.stack`, or as loopbpf reports it.
#[derive(Debug, Clone, PartialEq)]
struct JsFrame {
    name: String,
    file: Option<String>,
    line: Option<u64>,
    column: Option<u64>,
}

/// The frames of an `Error.stack`: `at name (file:line:column)` or `at file:line:column`.
fn parse_stack(stack: &str) -> Vec<JsFrame> {
    stack
        .lines()
        .filter_map(|line| line.trim().strip_prefix("at "))
        .map(|frame| {
            let (name, location) = match frame.rsplit_once(" (") {
                Some((name, location)) => (name.to_owned(), location.trim_end_matches(')')),
                None => ("<anonymous>".to_owned(), frame),
            };
            let mut parts = location.rsplitn(3, ':');
            let column = parts.next().and_then(|c| c.parse().ok());
            let line = parts.next().and_then(|l| l.parse().ok());
            let file = parts.next().map(str::to_owned);
            JsFrame {
                name,
                file,
                line,
                column,
            }
        })
        .collect()
}

/// loopbpf's JS frames of one stack, leaf first.
fn js_frames(stack: &Value) -> Vec<JsFrame> {
    stack["frames"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "js")
        .map(|f| JsFrame {
            name: f["name"].as_str().unwrap().to_owned(),
            file: f["file"].as_str().map(str::to_owned),
            line: f["line"].as_u64(),
            column: f["column"].as_u64(),
        })
        .collect()
}

/// The line a function is defined on in the fixture (where an optimized frame is placed: its
/// current position is not read yet).
fn definition_line(function: &str) -> u64 {
    let source = std::fs::read_to_string(fixture("js-names.js")).unwrap();
    let line = source
        .lines()
        .position(|l| l.starts_with(&format!("function {function}(")))
        .unwrap_or_else(|| panic!("no function {function} in the fixture"));
    line as u64 + 1
}

/// Whether loopbpf's name is the one Node prints. Methods with a computed (symbol) name are
/// named by their function's `name` property, which loopbpf does not read: it says
/// `Class.<anonymous>` there.
fn same_name(ours: &str, truth: &str) -> bool {
    ours == truth || (ours.ends_with(".<anonymous>") && truth.starts_with('['))
}

/// Checks one block against the truth: the stacks through `leaf` carry most of its time; in
/// each, `leaf` and every caller in the fixture file are named, placed and ordered as Node
/// prints them, and every other named caller is one Node prints too (no wrong names).
fn check_block(block: &Value, truth: &[JsFrame], leaf: &str, major: u32) {
    let script = fixture("js-names.js").display().to_string();
    let total = block["duration_ms"].as_f64().unwrap();
    let mut through_leaf = 0.0;
    for stack in block["stacks"].as_array().unwrap() {
        let ours = js_frames(stack);
        let Some(at) = ours.iter().position(|f| f.name == leaf) else {
            continue;
        };
        through_leaf += stack["weight_ms"].as_f64().unwrap();
        let (ours_leaf, callers) = (&ours[at], &ours[at + 1..]);
        assert_eq!(ours_leaf.file.as_deref(), Some(script.as_str()), "Node {major}");
        let line = ours_leaf.line.unwrap();
        assert!(
            line == truth[0].line.unwrap() || line == definition_line(leaf),
            "Node {major}: {leaf} placed at line {line}, Node says {:?}",
            truth[0]
        );
        // Callers: a subsequence of Node's, by name; exactly Node's in the fixture's file.
        let mut next = 1;
        for frame in callers.iter().filter(|f| f.name != "[JS]") {
            let found = truth[next..]
                .iter()
                .position(|t| same_name(&frame.name, &t.name))
                .unwrap_or_else(|| {
                    panic!("Node {major}: {frame:?} is not among Node's frames {truth:#?}")
                });
            let expected = &truth[next + found];
            if expected.file.as_deref() == Some(script.as_str()) {
                assert_eq!(frame, expected, "Node {major}");
            }
            next += found + 1;
        }
        for expected in truth.iter().filter(|t| t.file.as_deref() == Some(script.as_str())) {
            assert!(
                ours.iter().any(|f| f.name == expected.name),
                "Node {major}: {expected:?} missing from {ours:#?}"
            );
        }
    }
    assert!(
        through_leaf > 0.8 * total,
        "Node {major}: only {through_leaf} of {total} ms in stacks through {leaf}: {block}"
    );
}

fn names_js_frames_like_node(major: u32) {
    require_root();
    let node = node_of(major);
    let mut app = Fixture::start_script(node.to_str().unwrap(), "js-names.js", &[]);
    let pid = app.pid().to_string();
    let loopbpf = Loopbpf::attach(&["--pid", &pid, "--json"]);
    let mut truths = Vec::new();
    for (command, done) in [
        ("block 300", "block"),
        ("gc-block 600", "gc-block"),
        ("worker-block 300", "worker-block"),
    ] {
        app.send(command);
        let answer = app.done(done, TIMEOUT);
        truths.push(parse_stack(answer["stack"].as_str().unwrap()));
    }
    app.send("exit");
    app.wait_exit(TIMEOUT).expect("fixture did not exit");
    let (status, output) = loopbpf.finish(Duration::from_secs(15));
    assert!(status.success(), "loopbpf failed: {status}");
    let blocks = events(&output, "block");
    assert_eq!(blocks.len(), 3, "Node {major}: {output:?}");
    assert_eq!(truths[0][1].name, "Ledger.settle", "the fixture's own truth");
    check_block(blocks[0], &truths[0], "blockOnce", major);
    check_block(blocks[1], &truths[1], "blockOnce", major);
    assert_eq!(blocks[2]["thread"], "worker");
    check_block(blocks[2], &truths[2], "workerSpin", major);
}

#[test]
fn node18_js_frames_are_named_like_node() {
    names_js_frames_like_node(18);
}

#[test]
fn node20_js_frames_are_named_like_node() {
    names_js_frames_like_node(20);
}

#[test]
fn node22_js_frames_are_named_like_node() {
    names_js_frames_like_node(22);
}

#[test]
fn node24_js_frames_are_named_like_node() {
    names_js_frames_like_node(24);
}

#[test]
fn node26_js_frames_are_named_like_node() {
    names_js_frames_like_node(26);
}

#[test]
fn stack_traces_parse() {
    let frames = parse_stack(
        "Error\n    at blockOnce (/a/js-names.js:27:53)\n    at Ledger.settle (/a/b.js:33:12)\n    at node:internal/main:4:1",
    );
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[1].name, "Ledger.settle");
    assert_eq!(frames[1].line, Some(33));
    assert_eq!(frames[2].file.as_deref(), Some("node:internal/main"));
    assert_eq!(frames[2].name, "<anonymous>");
}
