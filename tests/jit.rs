//! Blocks in optimized code, on every Node major loopbpf supports: `TurboFan` code with
//! inlined calls (the issue's `priceAll`/`weigh`), a loop replaced on the stack (OSR), Maglev
//! code, and code that deoptimizes halfway through the block. The truth is `new Error().stack` taken
//! at the hot line by the optimized code itself: the functions inlined into a frame must be
//! there, named and placed as Node prints them, and no frame may carry a wrong name.

use std::time::Duration;

use loopbpf_tests::{Fixture, Loopbpf, events, fixture, node_of, require_root};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A frame as Node prints it in `Error.stack`, or as loopbpf reports it.
#[derive(Debug, Clone, PartialEq)]
struct JsFrame {
    name: String,
    line: Option<u64>,
    column: Option<u64>,
}

fn script() -> String {
    fixture("jit.js").display().to_string()
}

/// The frames of an `Error.stack` in the fixture's file, past the helper that takes it.
fn parse_stack(stack: &str) -> Vec<JsFrame> {
    let script = script();
    stack
        .lines()
        .filter_map(|line| line.trim().strip_prefix("at "))
        .filter_map(|frame| {
            let (name, location) = match frame.rsplit_once(" (") {
                Some((name, location)) => (name.to_owned(), location.trim_end_matches(')')),
                None => ("<anonymous>".to_owned(), frame),
            };
            let mut parts = location.rsplitn(3, ':');
            let column = parts.next().and_then(|c| c.parse().ok());
            let line = parts.next().and_then(|l| l.parse().ok());
            (parts.next() == Some(script.as_str())).then_some(JsFrame { name, line, column })
        })
        .skip_while(|f| f.name == "take")
        .collect()
}

/// loopbpf's JS frames of one stack in the fixture's file, leaf first.
fn own_frames(stack: &Value) -> Vec<JsFrame> {
    let script = script();
    stack["frames"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "js" && f["file"].as_str() == Some(script.as_str()))
        .map(|f| JsFrame {
            name: f["name"].as_str().unwrap().to_owned(),
            line: f["line"].as_u64(),
            column: f["column"].as_u64(),
        })
        .collect()
}

/// The line a function starts on in the fixture, where a frame whose position is not known is
/// placed (without a column).
fn definition_line(function: &str) -> Option<u64> {
    let short = function.rsplit('.').next().unwrap();
    let source = std::fs::read_to_string(fixture("jit.js")).unwrap();
    let line = source.lines().position(|l| {
        let l = l.trim_start();
        l.starts_with(&format!("function {short}(")) || l.starts_with(&format!("{short}: ("))
    })?;
    Some(line as u64 + 1)
}

/// Whether loopbpf placed a frame as Node does: at Node's line and column, or without a
/// column at the start of its function (an anonymous one: before Node's line).
fn same_place(ours: &JsFrame, truth: &JsFrame, leaf: bool) -> bool {
    match ours.column {
        Some(_) if leaf => ours.line == truth.line,
        Some(_) => (ours.line, ours.column) == (truth.line, truth.column),
        None => match definition_line(&truth.name) {
            Some(start) => ours.line == Some(start),
            None => ours
                .line
                .is_some_and(|l| truth.line.is_some_and(|t| l <= t)),
        },
    }
}

fn weight(stack: &Value) -> f64 {
    stack["weight_ms"].as_f64().unwrap()
}

/// Checks a block against the truth: in its heaviest stack through Node's leaf, loopbpf's
/// frames in the fixture are Node's, by name, in order, with the functions inlined into
/// optimized frames; the first `exact` of them at Node's position (the leaf at its line), the
/// others at Node's or at their function's start; and such stacks are most of the block.
fn check_block(block: &Value, truth: &[JsFrame], exact: usize, what: &str) {
    let names = |frames: &[JsFrame]| frames.iter().map(|f| f.name.clone()).collect::<Vec<_>>();
    let total = block["duration_ms"].as_f64().unwrap();
    let through_leaf: Vec<&Value> = block["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| own_frames(s).first().map(|f| &f.name) == Some(&truth[0].name))
        .collect();
    let heaviest = through_leaf
        .iter()
        .max_by(|a, b| weight(a).total_cmp(&weight(b)))
        .unwrap_or_else(|| panic!("{what}: no stack through {:?}: {block}", truth[0]));
    let ours = own_frames(heaviest);
    assert_eq!(names(&ours), names(truth), "{what}: {heaviest}");
    for (i, (frame, expected)) in ours.iter().zip(truth).enumerate() {
        let exactly = frame.column.is_some() && same_place(frame, expected, i == 0);
        assert!(
            if i < exact {
                exactly
            } else {
                same_place(frame, expected, i == 0)
            },
            "{what}: {frame:?} placed elsewhere than Node's {expected:?}"
        );
    }
    let all_named: f64 = through_leaf
        .iter()
        .filter(|s| names(&own_frames(s)) == names(truth))
        .map(|s| weight(s))
        .sum();
    assert!(
        all_named > 0.5 * total,
        "{what}: only {all_named} of {total} ms in stacks naming all of {truth:#?}: {block}"
    );
}

/// Checks that no stack through `leaf` names a frame Node does not print, or places one
/// elsewhere (the leaf inside its function, its callers at Node's place or their start); and
/// that most of the block is in `leaf`. (The block's other stacks are the fixture's own
/// work before and after the spin: taking the stack, answering.)
fn check_no_wrong_name(block: &Value, truth: &[JsFrame], leaf: &str, what: &str) {
    let total = block["duration_ms"].as_f64().unwrap();
    let start = definition_line(leaf).unwrap();
    let mut in_leaf = 0.0;
    for stack in block["stacks"].as_array().unwrap() {
        let ours = own_frames(stack);
        if ours.first().is_none_or(|f| f.name != leaf) {
            continue;
        }
        in_leaf += weight(stack);
        // Its three lines, from `function` to `return`.
        assert!(
            ours[0]
                .line
                .is_some_and(|l| (start..=start + 2).contains(&l)),
            "{what}: {:?} is outside {leaf}",
            ours[0]
        );
        // Callers, as Node's: each one of Node's, at or above the one before.
        let mut next = 1;
        for frame in &ours[1..] {
            let Some(found) = truth[next..].iter().position(|t| t.name == frame.name) else {
                panic!("{what}: {frame:?} is not among Node's frames {truth:#?}: {stack}");
            };
            let expected = &truth[next + found];
            assert!(
                same_place(frame, expected, false),
                "{what}: {frame:?} placed elsewhere than Node's {expected:?}"
            );
            next += found + 1;
        }
    }
    assert!(
        in_leaf > 0.3 * total,
        "{what}: only {in_leaf} of {total} ms in {leaf}: {block}"
    );
}

fn optimized_frames_are_named_like_node(major: u32) {
    require_root();
    let node = node_of(major);
    // V8 11 has Maglev, off unless asked for.
    let flags: &[&str] = if major == 20 {
        &["--allow-natives-syntax", "--maglev"]
    } else {
        &["--allow-natives-syntax"]
    };
    let mut app = Fixture::start_script(node.to_str().unwrap(), "jit.js", flags);
    let pid = app.pid().to_string();
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid, "--json"]);
    // V8 10 (Node 18) has no Maglev.
    let mut commands = vec!["inline", "osr", "deopt"];
    if major >= 20 {
        commands.push("maglev");
    }
    let mut truths = Vec::new();
    for command in &commands {
        let ms = if *command == "deopt" { 400 } else { 300 };
        app.send(&format!("{command} {ms}"));
        let answer = app.done(command, TIMEOUT);
        truths.push(parse_stack(answer["stack"].as_str().unwrap()));
        loopbpf
            .out
            .wait_for(TIMEOUT, |l| l.contains("\"event\":\"block\""))
            .expect("loopbpf reported no block");
    }
    app.send("exit");
    app.wait_exit(TIMEOUT).expect("fixture did not exit");
    let (status, output) = loopbpf.finish(Duration::from_secs(15));
    assert!(status.success(), "loopbpf failed: {status}");
    let blocks = events(&output, "block");
    assert_eq!(blocks.len(), commands.len(), "Node {major}: {output:?}");
    for ((command, truth), block) in commands.iter().zip(&truths).zip(&blocks) {
        let what = format!("Node {major} {command}");
        let leaf = match *command {
            "inline" => "weigh",
            "maglev" => "weighM",
            "osr" => "osrLoop",
            _ => "sumTo",
        };
        assert_eq!(truth[0].name, leaf, "{what}: the fixture's own truth");
        match *command {
            // TurboFan: the leaf at its line, the calls inlined at their line and column.
            "inline" => check_block(block, truth, 3, &what),
            // Code replaced on the stack: TurboFan's up to V8 13, Maglev's in V8 14.
            "osr" => check_block(block, truth, usize::from(major < 26), &what),
            // Maglev from V8 13 inlines and places calls at their statements: the calls
            // inlined are at their function's start there.
            "maglev" => check_block(block, truth, if major >= 24 { 0 } else { 3 }, &what),
            _ => check_no_wrong_name(block, truth, leaf, &what),
        }
    }
}

#[test]
fn node18_optimized_frames_are_named_like_node() {
    optimized_frames_are_named_like_node(18);
}

#[test]
fn node20_optimized_frames_are_named_like_node() {
    optimized_frames_are_named_like_node(20);
}

#[test]
fn node22_optimized_frames_are_named_like_node() {
    optimized_frames_are_named_like_node(22);
}

#[test]
fn node24_optimized_frames_are_named_like_node() {
    optimized_frames_are_named_like_node(24);
}

#[test]
fn node26_optimized_frames_are_named_like_node() {
    optimized_frames_are_named_like_node(26);
}

#[test]
fn stack_traces_parse() {
    let script = script();
    let stack = format!(
        "Error\n    at take ({script}:20:38)\n    at weigh ({script}:23:82)\n    at {script}:116:41\n    at Socket.emit (node:events:514:28)"
    );
    let frames = parse_stack(&stack);
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0].name, "weigh");
    assert_eq!((frames[1].line, frames[1].column), (Some(116), Some(41)));
    assert_eq!(frames[1].name, "<anonymous>");
}
