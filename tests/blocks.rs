//! What a user sees when a real Node.js process blocks its loop: one block per blocked
//! interval, whatever ran in it, with the right thread and a duration within max(2 ms, 2%).

use std::time::Duration;

use loopbpf_tests::{
    Fixture, Loopbpf, assert_duration_close, events, fixture, installed_node, node_bin,
    require_root, thread_state, wait_until, wait_until_stuck,
};
use serde_json::Value;

const BLOCK_MS: u64 = 300;
const FIXTURE_TIMEOUT: Duration = Duration::from_secs(20);

/// Attaches to a fresh fixture, runs `commands`, returns the fixture's answers and loopbpf's
/// JSON once the fixture has exited.
fn run(extra_args: &[&str], commands: &[(&str, &str)]) -> (Vec<Value>, Vec<Value>, u32) {
    require_root();
    let mut node = Fixture::start();
    let pid = node.pid().to_string();
    let mut args = vec!["--pid", pid.as_str(), "--json"];
    args.extend_from_slice(extra_args);
    let loopbpf = Loopbpf::attach(&args);
    let answers = commands
        .iter()
        .map(|(command, done)| {
            node.send(command);
            node.done(done, FIXTURE_TIMEOUT)
        })
        .collect();
    node.send("exit");
    node.wait_exit(FIXTURE_TIMEOUT)
        .expect("fixture did not exit");
    let (status, output) = loopbpf.finish(Duration::from_secs(10));
    assert!(status.success(), "loopbpf failed: {status}");
    (answers, output, node.pid())
}

/// One block of `work` in a `trigger` callback, and one below the threshold that must not show.
fn check_block_source(trigger: &str, work: &str) {
    let block = format!("block {trigger} {work} {BLOCK_MS}");
    let short = format!("block {trigger} spin 60");
    let (answers, output, pid) = run(&[], &[(&block, "block"), (&short, "block")]);
    let blocks = events(&output, "block");
    assert_eq!(
        blocks.len(),
        1,
        "exactly the one blocked interval, none below 100 ms: {blocks:?}"
    );
    let b = blocks[0];
    assert_eq!(b["pid"], pid);
    assert_eq!(b["tid"], pid, "the main thread's loop");
    assert_eq!(b["thread"], "main");
    assert_eq!(b["end"], "poll");
    let truth = answers[0]["measured_ms"].as_f64().unwrap();
    assert_duration_close(
        b["duration_ms"].as_f64().unwrap(),
        truth,
        &format!("{trigger}/{work}"),
    );
    let start_gap =
        b["start_unix_ms"].as_f64().unwrap() - answers[0]["start_unix_ms"].as_f64().unwrap();
    assert!(
        start_gap.abs() < 50.0,
        "block start is {start_gap:.1} ms away from the fixture's"
    );

    let summary = events(&output, "summary");
    assert_eq!(summary.len(), 1);
    assert!(
        std::ptr::eq(summary[0], output.last().unwrap()),
        "the summary comes last"
    );
    let loops = summary[0]["loops"].as_array().unwrap();
    assert_eq!(loops.len(), 1, "only the main loop: {loops:?}");
    let main = &loops[0];
    assert_eq!(main["blocks"], 1);
    // Commands follow each other at once, so the fixture iterates only a few times.
    assert!(main["iterations"].as_u64().unwrap() >= 1, "{main}");
    assert_duration_close(
        main["max_busy_ms"].as_f64().unwrap(),
        truth,
        "summary max busy",
    );
}

macro_rules! block_source_tests {
    ($($name:ident: $trigger:literal, $work:literal;)*) => {$(
        #[test]
        fn $name() {
            check_block_source($trigger, $work);
        }
    )*};
}

block_source_tests! {
    timer_callback: "timer", "spin";
    set_immediate: "immediate", "spin";
    io_callback: "io", "spin";
    promise_microtasks: "microtask", "spin";
    synchronous_fs: "timer", "fs-sync";
    // spawnSync's private loop polls inside the outer block: it must neither end nor split it.
    exec_sync: "timer", "exec-sync";
    crypto_pbkdf2_sync: "timer", "crypto";
    zlib_gzip_sync: "timer", "zlib";
    json_of_a_large_object: "timer", "json";
    catastrophic_regex: "timer", "regex";
    garbage_collection: "timer", "gc";
    // The fixture sits in its poll wait when loopbpf attaches; the first callback blocks.
    first_block_after_attaching_to_an_idle_process: "stdin", "spin";
    // ... and the first thing it does is a spawnSync, whose private loop polls first.
    first_block_after_attaching_is_an_exec_sync: "stdin", "exec-sync";
}

#[test]
fn block_ended_by_process_exit_reports_the_time_until_exit() {
    check_block_until_exit("block-exit", 3);
}

#[test]
fn block_ended_by_a_crash_reports_the_time_until_exit() {
    check_block_until_exit("block-crash", 128 + 6);
}

fn check_block_until_exit(command: &str, expected_code: i32) {
    require_root();
    let mut node = Fixture::start();
    let pid = node.pid().to_string();
    let loopbpf = Loopbpf::attach(&["--pid", &pid, "--json"]);
    node.send(&format!("{command} {BLOCK_MS}"));
    let status = node
        .wait_exit(FIXTURE_TIMEOUT)
        .expect("fixture did not exit");
    let code = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap()
    });
    assert_eq!(code, expected_code);
    let (_, output) = loopbpf.finish(Duration::from_secs(10));
    let blocks = events(&output, "block");
    assert_eq!(blocks.len(), 1, "{output:?}");
    assert_eq!(blocks[0]["end"], "exit");
    assert_eq!(blocks[0]["thread"], "main");
    let ms = blocks[0]["duration_ms"].as_f64().unwrap();
    // The spin, then the way out: exit handlers and teardown (or abort's core dump).
    assert!(
        (BLOCK_MS as f64..BLOCK_MS as f64 + 2000.0).contains(&ms),
        "until exit: {ms} ms"
    );
    let summary = &events(&output, "summary")[0]["loops"][0];
    assert_eq!(summary["exited"], true);
    assert_eq!(summary["blocks"], 1);
}

#[test]
fn worker_thread_blocks_are_reported_per_worker() {
    let (answers, output, pid) = run(&[], &[("worker-block 300", "worker-block")]);
    let blocks = events(&output, "block");
    assert_eq!(blocks.len(), 1, "only the worker blocked: {blocks:?}");
    let b = blocks[0];
    assert_eq!(b["thread"], "worker");
    assert_eq!(b["worker"], 1);
    assert_eq!(b["pid"], pid);
    assert_ne!(b["tid"], pid);
    assert_duration_close(
        b["duration_ms"].as_f64().unwrap(),
        answers[0]["measured_ms"].as_f64().unwrap(),
        "worker block",
    );
    let loops = events(&output, "summary")[0]["loops"]
        .as_array()
        .unwrap()
        .clone();
    let main = loops
        .iter()
        .find(|l| l["thread"] == "main")
        .expect("main loop in summary");
    let worker = loops
        .iter()
        .find(|l| l["thread"] == "worker")
        .expect("worker loop in summary");
    assert_eq!(
        main["blocks"], 0,
        "the worker's block is not mixed into the main loop"
    );
    assert_eq!(worker["blocks"], 1);
    assert_eq!(worker["exited"], true);
}

#[test]
fn hung_loop_is_reported_while_it_is_stuck() {
    require_root();
    let mut node = Fixture::start();
    let pid = node.pid().to_string();
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid, "--json"]);
    node.send("hang");
    let mut ongoing = Vec::new();
    for _ in 0..3 {
        let line = loopbpf
            .out
            .wait_for(Duration::from_secs(5), |l| l.contains("\"ongoing\""))
            .expect("no ongoing report while the loop is stuck");
        ongoing.push(
            serde_json::from_str::<Value>(&line).unwrap()["duration_ms"]
                .as_f64()
                .unwrap(),
        );
    }
    // About a second past the threshold, then every second with the growing duration.
    assert!(
        (1000.0..1700.0).contains(&ongoing[0]),
        "first ongoing at {ongoing:?}"
    );
    assert!(
        (800.0..1400.0).contains(&(ongoing[1] - ongoing[0])),
        "{ongoing:?}"
    );
    assert!(
        (800.0..1400.0).contains(&(ongoing[2] - ongoing[1])),
        "{ongoing:?}"
    );
    assert!(node.is_running(), "loopbpf must not disturb the target");
    node.child.kill().unwrap();
    let (_, output) = loopbpf.finish(Duration::from_secs(10));
    let blocks = events(&output, "block");
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0]["end"], "exit");
    assert!(blocks[0]["duration_ms"].as_f64().unwrap() > ongoing[2]);
}

#[test]
fn elu_agrees_with_the_process_own_event_loop_utilization() {
    let (answers, output, _) = run(&["--interval", "1s"], &[("elu 5", "elu")]);
    let (start, end) = (
        answers[0]["start_unix_ms"].as_f64().unwrap(),
        answers[0]["end_unix_ms"].as_f64().unwrap(),
    );
    // loopbpf's one-second windows that lie inside the fixture's own measurement window.
    let inside: Vec<f64> = events(&output, "interval")
        .iter()
        .filter(|v| v["thread"] == "main")
        .filter(|v| {
            let window_end = v["unix_ms"].as_f64().unwrap();
            window_end - 1000.0 >= start - 5.0 && window_end <= end + 5.0
        })
        .map(|v| v["elu"].as_f64().unwrap())
        .collect();
    assert!(inside.len() >= 3, "intervals inside the window: {inside:?}");
    let ours = inside.iter().sum::<f64>() / inside.len() as f64;
    let node = answers[0]["elu"].as_f64().unwrap();
    assert!(
        (0.3..0.8).contains(&node),
        "the fixture's pattern is about half busy: {node}"
    );
    assert!(
        (ours - node).abs() <= 0.02,
        "loopbpf ELU {ours:.4} vs the process's own {node:.4}"
    );
    for v in events(&output, "interval") {
        assert!(
            v["iterations"].as_u64().is_some() && v["max_busy_ms"].as_f64().is_some(),
            "{v}"
        );
    }
}

#[test]
fn launched_command_is_profiled_from_its_first_iteration() {
    require_root();
    let app = fixture("startup-block.js");
    let node = node_bin();
    let loopbpf = Loopbpf::spawn(&["--json", "--", &node, app.to_str().unwrap()]);
    let (status, output) = loopbpf.finish(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(7),
        "loopbpf exits with the command's status"
    );
    let blocks = events(&output, "block");
    assert_eq!(blocks.len(), 1, "{output:?}");
    assert_eq!(blocks[0]["thread"], "main");
    let ms = blocks[0]["duration_ms"].as_f64().unwrap();
    assert!(
        (200.0..215.0).contains(&ms),
        "the first timer's 200 ms spin: {ms}"
    );
    // Node's platform runs a libuv loop of its own on a helper thread (delayed tasks); it
    // polls at startup and is not a JS event loop, so it must not be reported.
    let loops = events(&output, "summary")[0]["loops"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(loops.len(), 1, "only the main loop: {loops:?}");
    assert!(loops[0]["iterations"].as_u64().unwrap() >= 2, "{loops:?}");
    // The app's own stdout went to stderr, so stdout is JSON only (parsing above proved it).
}

#[test]
fn text_output_names_the_thread_and_the_duration() {
    require_root();
    let mut node = Fixture::start();
    let pid = node.pid().to_string();
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid, "--threshold", "150ms"]);
    node.send("block timer spin 250");
    let truth = node.done("block", FIXTURE_TIMEOUT)["measured_ms"]
        .as_f64()
        .unwrap();
    node.send("worker-block 200");
    node.done("worker-block", FIXTURE_TIMEOUT);
    node.send("exit");
    node.wait_exit(FIXTURE_TIMEOUT).unwrap();
    let text = loopbpf.out.rest(Duration::from_secs(10)).join("\n");
    let block_lines: Vec<&str> = text.lines().filter(|l| l.contains("blocked")).collect();
    assert_eq!(block_lines.len(), 2, "{text}");
    // `18:53:30.632  15682    main       blocked   252.8 ms`, then `, GC 3.2 ms (1%)` when
    // the block had GC pauses.
    let fields: Vec<&str> = block_lines[0].split_whitespace().collect();
    assert_eq!(fields[1..4], [pid.as_str(), "main", "blocked"], "{text}");
    assert_eq!(fields[5].trim_end_matches(','), "ms", "{text}");
    assert_duration_close(fields[4].parse().unwrap(), truth, "text line");
    assert!(block_lines[1].contains("worker 1"), "{text}");
    assert!(
        text.contains("Summary:") && text.contains("ITERATIONS"),
        "{text}"
    );
}

/// A 300 ms spin in a timer, then the fixture's exit: its own measurement and loopbpf's JSON.
fn spin_then_exit(node: &mut Fixture, loopbpf: Loopbpf) -> (f64, Vec<Value>) {
    node.send("block timer spin 300");
    let truth = node.done("block", FIXTURE_TIMEOUT)["measured_ms"]
        .as_f64()
        .unwrap();
    node.send("exit");
    node.wait_exit(FIXTURE_TIMEOUT).unwrap();
    let (_, output) = loopbpf.finish(Duration::from_secs(10));
    (truth, output)
}

#[test]
fn attaching_to_a_loop_that_is_stuck_reports_it_at_once() {
    require_root();
    let mut node = Fixture::start();
    node.send("hang");
    // Stuck before loopbpf attaches: the block must have begun before the attach.
    wait_until_stuck(node.pid());
    let pid = node.pid().to_string();
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid, "--json"]);
    let line = loopbpf
        .out
        .wait_for(Duration::from_secs(5), |l| l.contains("\"ongoing\""))
        .expect("a loop stuck before loopbpf attached is reported while it is stuck");
    let ongoing: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ongoing["thread"], "main");
    assert_eq!(ongoing["started_before_attach"], true, "{ongoing}");
    // Counted from the attach, a lower bound: about a second past the threshold.
    let ms = ongoing["duration_ms"].as_f64().unwrap();
    assert!((1000.0..2000.0).contains(&ms), "{ongoing}");
    node.child.kill().unwrap();
    let (_, output) = loopbpf.finish(Duration::from_secs(10));
    let blocks = events(&output, "block");
    assert_eq!(blocks.len(), 1, "{output:?}");
    assert_eq!(blocks[0]["end"], "exit");
    assert_eq!(blocks[0]["started_before_attach"], true);
}

/// Waits until the main thread of `pid` sleeps in an `execSync`: its child runs and it waits.
fn wait_until_in_exec_sync(pid: u32) {
    wait_until(
        &format!("pid {pid} to sleep in execSync"),
        Duration::from_secs(10),
        || {
            let children =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
            !children.trim().is_empty() && thread_state(pid, pid) == Some('S')
        },
    );
}

#[test]
fn attaching_during_a_long_exec_sync_times_the_rest_and_then_the_loop() {
    require_root();
    let mut node = Fixture::start();
    // The main thread sleeps in the poll wait of execSync's private loop, not its own.
    node.send("block timer exec-sync 4000");
    wait_until_in_exec_sync(node.pid());
    // The experiment: attach partway through the 4 s call, so that what loopbpf times is
    // its rest, well under the whole.
    std::thread::sleep(Duration::from_millis(800));
    let pid = node.pid().to_string();
    let loopbpf = Loopbpf::attach(&["--pid", &pid, "--json"]);
    node.done("block", FIXTURE_TIMEOUT);
    let (truth, output) = spin_then_exit(&mut node, loopbpf);
    let blocks = events(&output, "block");
    assert_eq!(blocks.len(), 2, "{output:?}");
    assert_eq!(blocks[0]["started_before_attach"], true, "{}", blocks[0]);
    let rest = blocks[0]["duration_ms"].as_f64().unwrap();
    assert!(
        (200.0..3200.0).contains(&rest),
        "the rest of the execSync: {rest} ms"
    );
    // The main loop was found behind the private one: the next block is exact.
    assert_eq!(blocks[1]["started_before_attach"], false);
    assert_duration_close(
        blocks[1]["duration_ms"].as_f64().unwrap(),
        truth,
        "after attach",
    );
}

#[test]
fn a_node_binary_deleted_under_the_running_process_is_still_probed() {
    require_root();
    // An upgrade replaces the binary of a service that keeps running: /proc/PID/maps then says
    // "(deleted)" and the path names another file, or none.
    let dir = std::env::temp_dir().join(format!("loopbpf-deleted-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("node");
    std::fs::copy(installed_node(), &copy).unwrap();
    let mut node = Fixture::start_on(copy.to_str().unwrap(), &["--expose-gc"]);
    std::fs::remove_dir_all(&dir).unwrap();
    let pid = node.pid().to_string();
    let loopbpf = Loopbpf::attach(&["--pid", &pid, "--json"]);
    let (truth, output) = spin_then_exit(&mut node, loopbpf);
    let blocks = events(&output, "block");
    assert_eq!(blocks.len(), 1, "{output:?}");
    assert_duration_close(
        blocks[0]["duration_ms"].as_f64().unwrap(),
        truth,
        "deleted binary",
    );
    assert!(
        blocks[0]["stacks"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    );
}

/// Hundreds of short blocks, each begun by a wake from the loop's poll wait: none is lost or cut
/// short. Some kernels (6.18 on our machines) trace no `sched_switch` for some switches of an
/// idle CPU to the woken thread; the probes then find the thread running while it is marked
/// asleep. Before they placed that unseen wake, this test failed in 4 of 6 runs: a block lost,
/// or begun at the thread's next preemption, mid-spin.
///
/// A block may hold more than the fixture's callback: the loop's whole busy stretch, such as a
/// page fault that sleeps for milliseconds after the poll returns (seen in about one block in
/// 200 here), or the wait for a CPU before the next poll. So only the typical excess is bounded.
#[test]
fn every_block_begun_by_a_wake_is_measured_whole() {
    const BLOCKS: usize = 200;
    let commands = vec![("block timer spin 10", "block"); BLOCKS];
    let (answers, output, _) = run(&["--threshold", "5ms"], &commands);
    let blocks = events(&output, "block");
    let mut wrong = Vec::new();
    let mut excess = Vec::new();
    for answer in &answers {
        let start = answer["start_unix_ms"].as_f64().unwrap();
        let truth = answer["measured_ms"].as_f64().unwrap();
        let over: Vec<_> = blocks
            .iter()
            .filter(|b| {
                let b_start = b["start_unix_ms"].as_f64().unwrap();
                b_start < start + truth && b_start + b["duration_ms"].as_f64().unwrap() > start
            })
            .collect();
        // The longest block over the fixture's own span of the callback.
        let reported = over
            .iter()
            .map(|b| b["duration_ms"].as_f64().unwrap())
            .fold(0.0, f64::max);
        excess.push(reported - truth);
        if reported < truth - (truth * 0.02).max(2.0) {
            let over: Vec<_> = over
                .iter()
                .map(|b| {
                    let offset = b["start_unix_ms"].as_f64().unwrap() - start;
                    format!(
                        "{:.2} ms from {offset:+.2} ms (GC {}, off-CPU {})",
                        b["duration_ms"], b["gc_ms"], b["off_cpu_ms"]
                    )
                })
                .collect();
            wrong.push(format!("{truth:.2} ms at {start:.1}: {over:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {BLOCKS} blocks lost or measured short by over max(2 ms, 2%): {wrong:?}",
        wrong.len()
    );
    excess.sort_by(f64::total_cmp);
    let median = excess[excess.len() / 2];
    assert!(
        median.abs() < 1.0,
        "the typical block is {median:.2} ms off the fixture's callback"
    );
}
