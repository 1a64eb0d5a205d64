//! What blocked the loop: every block comes with named stacks of what ran (on-CPU) and where
//! the loop thread slept (off-CPU), and the flame graph of blocked time names the culprit.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use loopbpf_tests::{Fixture, Loopbpf, events, fixture, node_bin, node_of, require_root};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `commands` on a fixture started with `node_flags`, loopbpf attached with `args`;
/// returns loopbpf's JSON lines once the fixture has exited.
fn run(node_flags: &[&str], args: &[&str], commands: &[(&str, &str)]) -> Vec<Value> {
    require_root();
    let mut node = Fixture::start_with(node_flags);
    let pid = node.pid().to_string();
    let mut all_args = vec!["--pid", pid.as_str(), "--json"];
    all_args.extend_from_slice(args);
    let loopbpf = Loopbpf::attach(&all_args);
    for (command, done) in commands {
        node.send(command);
        node.done(done, TIMEOUT);
    }
    node.send("exit");
    node.wait_exit(TIMEOUT).expect("fixture did not exit");
    let (status, output) = loopbpf.finish(Duration::from_secs(15));
    assert!(status.success(), "loopbpf failed: {status}");
    output
}

fn the_block(output: &[Value]) -> &Value {
    let blocks = events(output, "block");
    assert_eq!(blocks.len(), 1, "{output:?}");
    blocks[0]
}

fn names(stack: &Value) -> Vec<String> {
    stack["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The share of the block's time whose stack has a frame matching `pred`.
fn share_with(block: &Value, pred: impl Fn(&str) -> bool) -> f64 {
    let total: f64 = block["duration_ms"].as_f64().unwrap();
    let matching: f64 = block["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| names(s).iter().any(|n| pred(n)))
        .map(|s| s["weight_ms"].as_f64().unwrap())
        .sum();
    matching / total
}

fn assert_blocked_in(work: &str, pred: impl Fn(&str) -> bool, what: &str) {
    let output = run(&[], &[], &[(&format!("block timer {work} 300"), "block")]);
    let block = the_block(&output);
    let stacks = block["stacks"].as_array().expect("stacks on every block");
    assert!(!stacks.is_empty(), "{block}");
    let share = share_with(block, &pred);
    assert!(
        share > 0.6,
        "{what}: only {share:.2} of the block's time has it on the stack; top stack: {:?}",
        names(&stacks[0])
    );
    // The default rate gives a 100 ms block at least 10 samples: this one had 300 ms.
    let on_cpu = block["on_cpu_ms"].as_f64().unwrap();
    assert!(on_cpu > 250.0, "{block}");
}

#[test]
fn pbkdf2_sync_names_openssl_pbkdf2() {
    assert_blocked_in(
        "crypto",
        |n| n.to_ascii_lowercase().contains("pbkdf2"),
        "OpenSSL's PBKDF2",
    );
}

#[test]
fn json_stringify_names_v8_json_code() {
    assert_blocked_in("json", |n| n.contains("Json"), "V8's JSON code");
}

#[test]
fn gzip_sync_names_zlib_deflate() {
    assert_blocked_in(
        "zlib",
        |n| n.contains("deflate") || n.contains("longest_match"),
        "zlib's deflate",
    );
}

#[test]
fn exec_sync_is_off_cpu_in_the_synchronous_process_runner() {
    let output = run(&[], &[], &[("block timer exec-sync 400", "block")]);
    let block = the_block(&output);
    let duration = block["duration_ms"].as_f64().unwrap();
    let off = block["off_cpu_ms"].as_f64().unwrap();
    assert!(off / duration > 0.9, "off-CPU {off} of {duration} ms");
    let share = share_with(block, |n| n.contains("SyncProcessRunner"));
    assert!(
        share > 0.85,
        "share through node::SyncProcessRunner: {share:.2}; {block}"
    );
    let slept = block["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["on_cpu"] == false)
        .expect("an off-CPU stack");
    assert_eq!(
        slept["frames"][0]["kind"], "kernel",
        "the kernel side of the sleep first"
    );
    let own: Vec<String> = names(slept)
        .into_iter()
        .filter(|n| n.starts_with("bpf_prog_") || n.starts_with("bpf_trace_run"))
        .collect();
    assert!(
        own.is_empty(),
        "loopbpf's own frames in the sleep's stack: {own:?}"
    );
}

#[test]
fn perf_basic_prof_names_the_hot_js_function() {
    let output = run(
        &["--perf-basic-prof"],
        &[],
        &[("block timer spin 300", "block")],
    );
    let block = the_block(&output);
    let top = &block["stacks"][0];
    let spin = top["frames"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "Object.spin")
        .unwrap_or_else(|| panic!("no `Object.spin` frame: {:?}", names(top)));
    assert_eq!(spin["kind"], "js");
    assert!(
        spin["file"].as_str().unwrap().ends_with("blocker.js"),
        "{spin}"
    );
    assert!(share_with(block, |n| n == "Object.spin") > 0.9);
}

#[test]
fn js_without_a_perf_map_is_named_from_v8s_heap() {
    let output = run(&[], &[], &[("block timer spin 200", "block")]);
    let block = the_block(&output);
    for stack in block["stacks"].as_array().unwrap() {
        let frames = names(stack);
        let adjacent_js = frames.windows(2).any(|w| w[0] == "[JS]" && w[1] == "[JS]");
        assert!(
            !adjacent_js,
            "unnamed JS collapses into one frame: {frames:?}"
        );
    }
    // Called as `works[work](ms)`: a method of a plain object, as Node's stack traces say.
    assert!(share_with(block, |n| n == "Object.spin") > 0.9, "{block}");
    assert!(
        share_with(block, |n| n == "[unknown]") < 0.1,
        "unwinding gets lost: {block}"
    );
}

#[test]
fn a_block_right_before_exit_is_still_named() {
    require_root();
    let mut node = Fixture::start_with(&["--perf-basic-prof"]);
    let pid = node.pid().to_string();
    let loopbpf = Loopbpf::attach(&["--pid", &pid, "--json"]);
    node.send("block-exit 300");
    node.wait_exit(TIMEOUT).unwrap();
    let (_, output) = loopbpf.finish(Duration::from_secs(15));
    let block = the_block(&output);
    assert_eq!(block["end"], "exit");
    assert!(share_with(block, |n| n == "spin") > 0.8, "{block}");
}

#[test]
fn a_worker_block_has_the_worker_stack() {
    let output = run(
        &["--perf-basic-prof"],
        &[],
        &[("worker-block 300", "worker-block")],
    );
    let block = the_block(&output);
    assert_eq!(block["thread"], "worker");
    assert!(share_with(block, |n| n == "workerSpin") > 0.8, "{block}");
}

#[test]
fn flame_graph_of_blocked_time_names_the_blocking_function() {
    let dir = std::env::temp_dir().join(format!("loopbpf-flame-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("blocked.svg");
    let folded = dir.join("blocked.folded");
    let output = run(
        &[],
        &[
            "--flamegraph",
            svg.to_str().unwrap(),
            "--folded",
            folded.to_str().unwrap(),
        ],
        &[("block timer crypto 300", "block")],
    );
    assert_eq!(events(&output, "block").len(), 1);
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    let folded_text = std::fs::read_to_string(&folded).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(svg_text.starts_with("<?xml") && svg_text.trim_end().ends_with("</svg>"));
    assert!(
        svg_text.to_ascii_lowercase().contains("pbkdf2"),
        "the SVG names PBKDF2"
    );
    // Folded lines: `pid N main;frame;...;leaf MICROSECONDS`, about 300 ms in all.
    let total_us: u64 = folded_text
        .lines()
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum();
    assert!(
        (280_000..340_000).contains(&total_us),
        "{total_us} us of blocked time"
    );
    assert!(
        folded_text.lines().all(|l| l.starts_with("pid ")),
        "{folded_text}"
    );
}

#[test]
fn a_loop_still_stuck_when_stopped_is_in_the_flame_graph() {
    require_root();
    let dir = std::env::temp_dir().join(format!("loopbpf-stuck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let folded = dir.join("stuck.folded");
    let mut node = Fixture::start();
    let pid = node.pid().to_string();
    let mut loopbpf = Loopbpf::attach(&[
        "--pid",
        &pid,
        "--json",
        "--folded",
        folded.to_str().unwrap(),
    ]);
    node.send("hang");
    // Stopped once loopbpf has seen the loop stuck for over a second.
    let ongoing = loopbpf.out.wait_for(Duration::from_secs(10), |l| {
        serde_json::from_str::<Value>(l)
            .is_ok_and(|v| v["event"] == "ongoing" && v["duration_ms"].as_f64() > Some(1000.0))
    });
    assert!(
        ongoing.is_some(),
        "loopbpf never reported the stuck loop as ongoing for over a second: {:?}",
        loopbpf.out.seen
    );
    loopbpf.signal(2); // Ctrl-C while the loop is stuck
    let (status, output) = loopbpf.finish(Duration::from_secs(15));
    assert!(status.success());
    let summary = &events(&output, "summary")[0]["loops"][0];
    assert!(
        summary["ongoing_ms"].as_f64().unwrap() > 1000.0,
        "{summary}"
    );
    let folded_text = std::fs::read_to_string(&folded).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let total_us: u64 = folded_text
        .lines()
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum();
    assert!(
        total_us > 1_000_000,
        "the stuck time is blocked time: {folded_text}"
    );
}

#[test]
fn a_deep_stack_in_the_terminal_keeps_every_app_frame() {
    require_root();
    let script = fixture("deep-stack.js");
    let app = Fixture::start_script(&node_bin(), "deep-stack.js", &[]);
    let pid = app.pid().to_string();
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid]);
    std::thread::sleep(Duration::from_secs(5));
    loopbpf.signal(libc::SIGINT);
    let lines = loopbpf.out.rest(TIMEOUT);
    let status = loopbpf.child.wait().unwrap();
    drop(app);
    let text = lines.join("\n");
    assert!(status.success(), "loopbpf failed: {status}\n{text}");
    // Each block's tree: the lines under its `blocked` line, up to the next event.
    let trees: Vec<&[String]> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains(" blocked "))
        .map(|(at, _)| {
            let rest = &lines[at + 1..];
            let end = rest
                .iter()
                .position(|l| !l.starts_with("              "))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    assert!(trees.len() >= 3, "too few blocks:\n{text}");
    let file = script.to_str().unwrap();
    // Every frame of the app's own script on the stack, whatever folded between them (in most
    // blocks: a block's first samples may come before V8's heap is read to name them).
    let app = [
        "spin",
        "blockFor",
        "onRow",
        "reviveRow",
        "parseHugeReportSynchronously",
        "onReportTimer",
    ];
    let complete = trees.iter().filter(|tree| {
        app.iter().all(|name| {
            // With or without its receiver (`Timeout.onReportTimer`).
            tree.iter().any(|l| l.contains(&format!("{name} {file}:")))
        })
    });
    assert!(
        complete.count() * 2 >= trees.len(),
        "blocks whose tree hides an app frame:\n{text}"
    );
    assert!(text.contains(" frames ..."), "nothing was folded:\n{text}");
}

/// 40 ms in one function, then 360 ms in another: a 400 ms block at the default 100 ms
/// threshold, whose first tenth is all younger than half the threshold.
const FIRST_TENTH: &str = "
const spin = (ms) => { const t = performance.now(); while (performance.now() - t < ms); };
function firstTenth() { spin(40); }
function theRest() { spin(360); }
process.stdin.once('data', () => setTimeout(() => {
  firstTenth();
  theRest();
  setTimeout(() => process.exit(0), 300);
}, 20));
";

/// A node process running `script`, watched by loopbpf (`--pid`, `--json`), told to go once
/// loopbpf has watched it a second (past the first naming of the binary, so that what the
/// script does next is the only thing going on).
fn watched_until_go(script: &str) -> (std::process::Child, Loopbpf) {
    let mut node = Command::new(node_bin())
        .args(["-e", script])
        .stdin(Stdio::piped())
        .spawn()
        .expect("node");
    let pid = node.id().to_string();
    let loopbpf = Loopbpf::attach(&["--pid", &pid, "--json"]);
    std::thread::sleep(Duration::from_secs(1));
    node.stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("write to node");
    (node, loopbpf)
}

/// A block's first tenth still has its stacks (issue 17): samples of a busy interval younger
/// than half the threshold are kept raw and unwound only once it grows older, and they must
/// still name what ran first.
#[test]
fn a_blocks_first_tenth_has_its_stacks() {
    require_root();
    let (mut node, loopbpf) = watched_until_go(FIRST_TENTH);
    assert!(node.wait().expect("node").success(), "the target failed");
    let (status, output) = loopbpf.finish(Duration::from_secs(15));
    assert!(status.success(), "loopbpf failed: {status}");
    let block = the_block(&output);
    let first = share_with(block, |n| n == "firstTenth");
    let rest = share_with(block, |n| n == "theRest");
    assert!(
        (0.04..0.25).contains(&first),
        "the first tenth has {first:.2} of the block's stacks: {block}"
    );
    assert!(
        rest > 0.6,
        "the rest has {rest:.2} of the block's stacks: {block}"
    );
}

/// A launched command that blocks in its first second (before the once-a-second refresh of
/// its mappings): the naming lane looks for its V8 as soon as its loop is found, after the
/// exec, so the first block's JS frames are named, not `[JS]`.
#[test]
fn a_launched_commands_first_block_has_named_js_frames() {
    require_root();
    let node = node_of(20);
    let app = fixture("early-block.js");
    let loopbpf = Loopbpf::spawn(&[
        "--json",
        "--",
        node.to_str().unwrap(),
        app.to_str().unwrap(),
    ]);
    let (status, output) = loopbpf.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    let block = the_block(&output);
    let ms = block["duration_ms"].as_f64().unwrap();
    assert!((480.0..700.0).contains(&ms), "the 500 ms spin: {ms}");
    let frames = block["stacks"][0]["frames"].as_array().unwrap();
    let named = |name: &str| {
        frames
            .iter()
            .find(|f| f["kind"] == "js" && f["name"] == name)
            .unwrap_or_else(|| panic!("no JS frame `{name}`: {:?}", names(&block["stacks"][0])))
    };
    let warm = named("warmCaches");
    assert!(
        warm["file"].as_str().unwrap().ends_with("early-block.js"),
        "{warm}"
    );
    assert_eq!(warm["line"], 9, "{warm}");
    assert_eq!(named("Timeout.startUp")["line"], 14);
    assert!(
        share_with(block, |n| n == "warmCaches") > 0.8,
        "most of the block is in warmCaches"
    );
}

const CHAIN_THEN_BLOCK: &str = "
const spin = (ms) => { const t = performance.now(); while (performance.now() - t < ms); };
function afterTheChain() { spin(300); }
process.stdin.once('data', () => {
  const until = Date.now() + 5000;
  (function tick() {
    if (Date.now() < until) return setImmediate(tick);
    afterTheChain();
    setTimeout(() => process.exit(0), 300);
  })();
});
";

/// Wake-ups of loopbpf's threads so far (each wake-up of a sleeping thread is one).
fn voluntary_switches(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("loopbpf's threads");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .sum()
}

/// A loop busy all the time in intervals far shorter than the threshold (a setImmediate chain)
/// costs loopbpf few wake-ups (issue 17): the stack records of young intervals wait for its
/// next look instead of waking its main and naming threads for each record (about 290 and
/// 260 a second before). A block after the chain still has its stacks.
#[test]
fn stacks_of_short_busy_intervals_wake_loopbpf_only_on_its_look() {
    require_root();
    // The chain runs for 5 s: 3 s of it, past its start.
    let (per_second, after) = wakeups_then_share(CHAIN_THEN_BLOCK, 3, "afterTheChain");
    // Its looks and their naming jobs: about 16 a second on a quiet machine.
    assert!(
        per_second < 120,
        "loopbpf woke {per_second} times a second watching a setImmediate chain"
    );
    // On a loaded host the chain waits for a CPU now and then, which can make blocks of its
    // own: the one after the chain is the one with its stacks.
    assert!(
        after > 0.8,
        "the block after the chain has {after:.2} of its stacks there"
    );
}

/// Runs `script` under `--pid` until it exits: loopbpf's wake-ups a second over `seconds`
/// from the script's first second on, and the largest share of a block's stacks in `function`.
fn wakeups_then_share(script: &str, seconds: u64, function: &str) -> (u64, f64) {
    let (mut node, loopbpf) = watched_until_go(script);
    std::thread::sleep(Duration::from_secs(1));
    let before = voluntary_switches(loopbpf.child.id());
    std::thread::sleep(Duration::from_secs(seconds));
    let per_second = (voluntary_switches(loopbpf.child.id()) - before) / seconds;
    eprintln!("loopbpf woke {per_second} times a second");
    assert!(node.wait().expect("node").success(), "the target failed");
    let (status, output) = loopbpf.finish(Duration::from_secs(15));
    assert!(status.success(), "loopbpf failed: {status}");
    let share = events(&output, "block")
        .into_iter()
        .map(|block| share_with(block, |n| n == function))
        .fold(0.0, f64::max);
    (per_second, share)
}

const LONG_BLOCK: &str = "
const spin = (ms) => { const t = performance.now(); while (performance.now() - t < ms); };
function longSpin() { spin(4000); }
process.stdin.once('data', () => {
  longSpin();
  setTimeout(() => process.exit(0), 300);
});
";

/// A long block costs loopbpf few wake-ups while it runs (issue 17): its stack records (one
/// every 5 ms) wake loopbpf at most every 20 ms, not one by one (each of those was a wake-up of
/// its main thread and of a naming thread: about 400 a second). The block still has its stacks.
#[test]
fn a_long_blocks_stacks_wake_loopbpf_a_few_at_a_time() {
    require_root();
    // The spin runs for 4 s: 2 s of it, past its first second.
    let (per_second, block) = wakeups_then_share(LONG_BLOCK, 2, "longSpin");
    // At most 50 record wake-ups a second, each waking two threads, and the ongoing lines.
    assert!(
        per_second < 150,
        "loopbpf woke {per_second} times a second during a 4 s block"
    );
    assert!(
        block > 0.8,
        "the long block has {block:.2} of its stacks in longSpin"
    );
}
