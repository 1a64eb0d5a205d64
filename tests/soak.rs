//! A long run compressed: thousands of blocks and millions of iterations, with stacks, and
//! loopbpf's memory and the kernel side's maps staying flat.

use std::{
    fs,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use loopbpf_tests::{Loopbpf, events, fixture, map_keys, node_bin, require_root};

/// 40 s of cycles: 3000 setImmediate iterations, then a 6 ms spin (a block at a 5 ms
/// threshold), then a 1 ms timer. About 3,500 blocks and 10 million iterations: an hour of a
/// service that blocks once a second, and hours of its iterations.
const CHURN: &str = "
const end = Date.now() + 40000;
const spin = (ms) => { const t = performance.now(); while (performance.now() - t < ms); };
function storm(k) {
  if (k > 0) return setImmediate(storm, k - 1);
  spin(6);
  if (Date.now() < end) setTimeout(() => storm(3000), 1); else process.exit(0);
}
storm(3000);
";

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

#[test]
fn thousands_of_blocks_keep_memory_and_maps_flat() {
    require_root();
    let mut node = Command::new(node_bin())
        .args(["-e", CHURN])
        .spawn()
        .expect("node");
    let pid = node.id().to_string();
    // Half the default stack rate: 75 blocks a second is not a rate any service keeps up,
    // and naming every block's stacks on a 2-core machine the target keeps 93% busy would
    // fall behind the ring buffer (lost events are counted; see below).
    let loopbpf = Loopbpf::attach(&[
        "--pid",
        &pid,
        "--json",
        "--threshold",
        "5ms",
        "--sample-rate",
        "100",
    ]);
    let started = Instant::now();
    // Past attaching, the first naming of the binary's symbols and the first JS frames.
    thread::sleep(Duration::from_secs(10));
    let early_kib = rss_kib(loopbpf.pid());
    let early_entries = map_keys("threads").len();
    let mut late = (early_kib, early_entries);
    while started.elapsed() < Duration::from_secs(37) {
        thread::sleep(Duration::from_secs(3));
        late = (
            rss_kib(loopbpf.pid()).max(late.0),
            map_keys("threads").len().max(late.1),
        );
    }
    assert!(node.wait().unwrap().success(), "the target failed");
    let (status, output) = loopbpf.finish(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    let summary = &events(&output, "summary")[0];
    let main = &summary["loops"][0];
    let (blocks, iterations) = (
        main["blocks"].as_u64().unwrap(),
        main["iterations"].as_u64().unwrap(),
    );
    println!(
        "soak: {blocks} blocks, {iterations} iterations; loopbpf RSS {early_kib} KiB at 10 s, at most {} KiB after; threads map {early_entries} -> at most {} entries",
        late.0, late.1
    );
    assert!(blocks >= 2000, "{main}");
    assert!(iterations >= 3_000_000, "{main}");
    // About 3,700 stacks go through the ring buffer: at most 1% may be lost (and counted).
    let dropped = summary["dropped_events"].as_u64().unwrap();
    assert!(dropped <= 37, "{dropped} events lost: {summary}");
    assert!(
        late.0 <= early_kib + 16 * 1024,
        "loopbpf grew from {early_kib} KiB to {} KiB",
        late.0
    );
    // The main loop, and runtime-internal loop threads: a handful, never one per block.
    assert!(
        late.1 <= early_entries.max(4),
        "threads map grew to {}",
        late.1
    );
}

/// Churn compressed (issue 17): `--all` on a host of short-lived node processes (8 at a time,
/// each living 5 to 20 s, every third with a worker, each blocking 60 ms about once a second)
/// for 100 s. loopbpf's memory grows by at most 12 MiB after its first 40 s (what it kept per
/// block and per exited process grew it by tens of MB a minute), and every block of every
/// process that ended by itself is reported. (Blocks were lost mid-life, about one process in
/// 60, when a sample came late on the loaded host: the kernel side started the next interval at
/// the late look, cutting the 60 ms spins under the 50 ms threshold. Later, about one spin in
/// 700 still began at the thread's next preemption, mid-spin: the kernel had not traced its
/// wake from an idle CPU, and this test failed in 3 of 6 runs. With that wake placed from the
/// thread's CPU time it passed 5 of 5.)
#[test]
fn churn_keeps_memory_flat_and_loses_no_block() {
    require_root();
    let loopbpf = Loopbpf::watch_all(&["--json", "--threshold", "50ms"]);
    let churn = Command::new(node_bin())
        .arg(fixture("churn.js"))
        .args(["8", "60", "100"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("node");
    let started = Instant::now();
    // Past the first processes' attach and the first naming of the node binary.
    thread::sleep(Duration::from_secs(40));
    let early_kib = rss_kib(loopbpf.pid());
    let mut late_kib = early_kib;
    while started.elapsed() < Duration::from_secs(98) {
        thread::sleep(Duration::from_secs(4));
        late_kib = late_kib.max(rss_kib(loopbpf.pid()));
    }
    let churned = churn.wait_with_output().expect("churn");
    assert!(churned.status.success(), "the churn failed");
    let output = loopbpf.stop(Duration::from_secs(30));
    let blocks = events(&output, "block");
    let mut children = 0;
    for line in String::from_utf8_lossy(&churned.stdout).lines() {
        let child: serde_json::Value = serde_json::from_str(line).expect("churn line");
        let Some(pid) = child["pid"].as_u64() else {
            continue;
        };
        children += 1;
        let made = child["blocks"].as_u64().unwrap();
        let reported = blocks
            .iter()
            .filter(|b| b["pid"].as_u64() == Some(pid) && b["thread"] == "main")
            .count() as u64;
        assert!(
            reported >= made,
            "pid {pid} made {made} blocks, {reported} reported"
        );
    }
    println!(
        "churn: {children} processes ended by themselves, {} blocks; loopbpf RSS {early_kib} KiB at 40 s, at most {late_kib} KiB after",
        blocks.len()
    );
    assert!(children >= 20, "{children} processes ended by themselves");
    // Base grew about 36 MB a minute here; this build 6 MB in the minute measured on a loaded
    // machine (issue 17's goal, flat from minute 5 of 30, is not reached yet).
    assert!(
        late_kib <= early_kib + 12 * 1024,
        "loopbpf grew from {early_kib} KiB to {late_kib} KiB under churn"
    );
}
