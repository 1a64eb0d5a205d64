//! A loop can be blocked with its code ready to run: the thread waits for a CPU, preempted by
//! other work on a crowded host or held back by its CPU limit. loopbpf says how long, checked
//! against the scheduler's own count of the thread's waits (`run_delay` in
//! `/proc/PID/task/TID/schedstat`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use loopbpf_tests::{
    Fixture, Loopbpf, assert_block_close, fixture, node_bin, require_root, stacks_summary,
};
use serde_json::Value;

const BLOCK_MS: f64 = 300.0;
/// The CPU the crowded case shares between the fixture and a busy loop.
const SHARED_CPU: &str = "1";

/// The scheduler's count of the time thread `tid` spent ready to run but waiting for a CPU, ns.
fn run_delay_ns(pid: u32, tid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).unwrap();
    stat.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A process that keeps a CPU busy until dropped.
struct Hog(Child);

impl Hog {
    fn on_cpu(cpu: &str) -> Self {
        let child = Command::new("taskset")
            .args(["-c", cpu, "sh", "-c", "while :; do :; done"])
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start a busy loop under taskset (util-linux)");
        Self(child)
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Has the fixture block its loop 300 ms, and returns loopbpf's block, the fixture's answer
/// (with its own count of its waits for a CPU in its work) and the scheduler's count of the
/// main thread's waits over the whole command (which also holds the wake-ups that led to the
/// block, and the wait for a CPU right after it).
fn block_and_wait(node: &mut Fixture) -> (Value, Value, f64) {
    let pid = node.pid().to_string();
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid, "--json"]);
    let before = run_delay_ns(node.pid(), node.pid());
    node.send(&format!("block timer spin {BLOCK_MS}"));
    let answer = node.done("block", Duration::from_secs(20));
    let waited_ms = (run_delay_ns(node.pid(), node.pid()) - before) as f64 / 1e6;
    let block = loopbpf.wait_for_block(node.pid(), Duration::from_secs(15));
    (block, answer, waited_ms)
}

/// What every such block must show: its duration right under contention, its wait between the
/// fixture's count inside its work and the scheduler's over the command, and that wait inside
/// its on-CPU time (not asleep). Returns the share of the block spent waiting.
fn assert_wait_told(block: &Value, answer: &Value, scheduler_ms: f64, what: &str) -> f64 {
    let duration = block["duration_ms"].as_f64().unwrap();
    let wait = block["cpu_wait_ms"].as_f64().unwrap();
    let on = block["on_cpu_ms"].as_f64().unwrap();
    let off = block["off_cpu_ms"].as_f64().unwrap();
    eprintln!(
        "{what}: {duration} ms, waited {wait} ms for a CPU (the scheduler: {scheduler_ms:.2} ms \
         over the command), on-CPU {on} ms, off-CPU {off} ms\n{}",
        stacks_summary(block)
    );
    // The duration, and a wait at least the fixture's own count.
    assert_block_close(block, answer, what);
    assert!(
        wait <= scheduler_ms + 1.0,
        "{what}: loopbpf says the loop waited {wait} ms for a CPU, the scheduler {scheduler_ms:.2} \
         ms over the whole command"
    );
    assert!(
        (on + off - duration).abs() < 0.1 && wait <= on,
        "{what}: on-CPU {on} (waiting {wait} of it) + off-CPU {off} is not the block's {duration} ms"
    );
    wait / duration
}

#[test]
fn a_block_that_shares_its_cpu_says_how_long_it_waited_for_it() {
    require_root();
    let mut command = Command::new("taskset");
    command
        .args(["-c", SHARED_CPU, &node_bin(), "--expose-gc"])
        .arg(fixture("blocker.js"));
    let mut node = Fixture::start_command(command);
    let _hog = Hog::on_cpu(SHARED_CPU);
    let (block, answer, scheduler_ms) = block_and_wait(&mut node);
    let share = assert_wait_told(&block, &answer, scheduler_ms, "sharing a CPU");
    // Two threads ready on one CPU: each runs about half the time.
    assert!(
        (0.3..0.7).contains(&share),
        "waited {share:.2} of the block for its CPU"
    );
}

/// A cgroup with a CPU limit (v1's cpu controller, or v2's), removed when dropped.
struct CpuLimit(PathBuf);

impl CpuLimit {
    /// `percent` of one CPU for the processes moved in.
    fn new(percent: u32) -> Self {
        let name = format!("loopbpf-test-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        let v2 = Path::new("/sys/fs/cgroup");
        let (dir, limits) = if v1.join("cpu.cfs_quota_us").exists() {
            let dir = v1.join(&name);
            fs::create_dir(&dir).unwrap();
            let limits = [
                ("cpu.cfs_period_us", "100000".to_owned()),
                ("cpu.cfs_quota_us", format!("{}", percent * 1000)),
            ];
            (dir, limits.to_vec())
        } else {
            let controllers =
                fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_else(|e| {
                    panic!("no cgroup cpu controller (v1 in /sys/fs/cgroup/cpu, v2 in /sys/fs/cgroup): {e}")
                });
            assert!(
                controllers.split_whitespace().any(|c| c == "cpu"),
                "cgroup v2 without its cpu controller: {controllers}"
            );
            fs::write(v2.join("cgroup.subtree_control"), "+cpu").unwrap();
            let dir = v2.join(&name);
            fs::create_dir(&dir).unwrap();
            (dir, vec![("cpu.max", format!("{} 100000", percent * 1000))])
        };
        for (file, value) in limits {
            fs::write(dir.join(file), value).unwrap();
        }
        Self(dir)
    }

    fn add(&self, pid: u32) {
        fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        // Empty once its processes are gone; a moment after their exit.
        for _ in 0..50 {
            if fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove the test cgroup {}", self.0.display());
    }
}

#[test]
fn a_block_held_back_by_its_cpu_limit_says_how_long_it_waited() {
    require_root();
    let limit = CpuLimit::new(20);
    let mut node = Fixture::start();
    limit.add(node.pid());
    let (block, answer, scheduler_ms) = block_and_wait(&mut node);
    let share = assert_wait_told(&block, &answer, scheduler_ms, "20% of a CPU");
    // 20% of a CPU, shared with V8's own threads: most of the block is waiting.
    assert!(share > 0.6, "waited {share:.2} of the block for a CPU");
    drop(node);
}
