//! Shared pieces of the integration tests: real node fixtures, a real loopbpf binary, and
//! the checks on what a user would see. These tests need root (`cargo xtask test` runs them).
#![expect(
    clippy::missing_panics_doc,
    clippy::must_use_candidate,
    reason = "test helpers: panicking with a clear message is how they report"
)]

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError, channel},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod otlp_receiver;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The loopbpf binary under test: `$LOOPBPF_BIN`, or the workspace's debug build.
pub fn loopbpf_bin() -> PathBuf {
    let path = std::env::var_os("LOOPBPF_BIN")
        .map_or_else(|| workspace().join("target/debug/loopbpf"), PathBuf::from);
    assert!(
        path.exists(),
        "{} does not exist: build it first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// The node binary the fixtures run on: `$LOOPBPF_TEST_NODE`, or `node` on PATH.
pub fn node_bin() -> String {
    std::env::var("LOOPBPF_TEST_NODE").unwrap_or_else(|_| "node".to_owned())
}

/// Where the node binary the fixtures run on is installed.
pub fn installed_node() -> PathBuf {
    let output = Command::new("sh")
        .args(["-c", &format!("command -v {}", node_bin())])
        .output()
        .expect("sh");
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// Where `scripts/install-deps.sh` puts the node binaries of each major.
pub fn node_of(major: u32) -> PathBuf {
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

pub fn fixture(name: &str) -> PathBuf {
    workspace().join("tests/fixtures").join(name)
}

/// An npm package of tests/fixtures/package.json, installed there by scripts/install-deps.sh
/// (fixtures in tests/fixtures `require` it as usual); fails loudly when it is missing.
pub fn npm_package(name: &str) -> PathBuf {
    let dir = fixture("node_modules").join(name);
    assert!(
        dir.join("package.json").exists(),
        "LOUD FAILURE, NOT A SKIP: npm package {name} is not in tests/fixtures/node_modules: run scripts/install-deps.sh"
    );
    dir
}

/// These tests attach eBPF programs: without root they would only test the error path.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "LOUD SKIP REFUSED: loopbpf's integration tests need root (run `sudo cargo xtask test`)"
    );
}

/// Lines of a child's output, read on a thread so a test can wait with a timeout.
pub struct Lines {
    rx: Receiver<String>,
    pub seen: Vec<String>,
}

impl Lines {
    pub fn spawn(reader: impl std::io::Read + Send + 'static) -> Self {
        let (tx, rx) = channel();
        thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line matching `pred`, keeping every line seen.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Everything until the writer closes (or `timeout`).
    pub fn rest(&mut self, timeout: Duration) -> Vec<String> {
        let _ = self.wait_for(timeout, |_| false);
        self.seen.clone()
    }
}

/// A running `tests/fixtures/blocker.js`.
pub struct Fixture {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub out: Lines,
}

impl Fixture {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts the fixture with extra node flags (e.g. `--perf-basic-prof`).
    pub fn start_with(node_flags: &[&str]) -> Self {
        Self::start_on(&node_bin(), node_flags)
    }

    /// Starts the fixture on a given node binary.
    pub fn start_on(node: &str, node_flags: &[&str]) -> Self {
        Self::start_script(node, "blocker.js", node_flags)
    }

    /// Starts a fixture script (in tests/fixtures) on a given node binary.
    pub fn start_script(node: &str, script: &str, node_flags: &[&str]) -> Self {
        let mut command = Command::new(node);
        command
            .arg("--expose-gc")
            .args(node_flags)
            .arg(fixture(script));
        Self::start_command(command)
    }

    /// Starts a fixture by a command of the test's making (one that ends up running a
    /// fixture script, e.g. through `unshare`).
    pub fn start_command(mut command: Command) -> Self {
        let mut child = command
            // node's own files (perf maps, V8 logs) land there, not in the source tree.
            .current_dir(std::env::temp_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot start node: is it installed (quickstart.sh installs it)?");
        let stdin = child.stdin.take();
        let mut out = Lines::spawn(child.stdout.take().unwrap());
        out.wait_for(Duration::from_secs(20), |l| l.contains("\"ready\""))
            .expect("the node fixture did not start");
        Self { child, stdin, out }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The line the fixture said it was ready with (its ports, its truths), as JSON.
    pub fn ready(&self) -> Value {
        let line = self
            .out
            .seen
            .iter()
            .find(|l| l.contains("\"ready\""))
            .expect("the fixture said it is ready");
        serde_json::from_str(line).expect("the fixture's ready line is JSON")
    }

    pub fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the fixture's answer to a command: its own measurement.
    pub fn done(&mut self, what: &str, timeout: Duration) -> Value {
        let tag = format!("\"done\":\"{what}\"");
        let line = self
            .out
            .wait_for(timeout, |l| l.contains(&tag))
            .unwrap_or_else(|| {
                panic!(
                    "fixture never finished `{what}`; it said {:?}",
                    self.out.seen
                )
            });
        serde_json::from_str(&line).unwrap()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        poll_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running loopbpf.
pub struct Loopbpf {
    pub child: Child,
    pub out: Lines,
    pub err: Lines,
}

impl Loopbpf {
    /// Starts loopbpf with `args` and waits until its probes are attached.
    pub fn attach(args: &[&str]) -> Self {
        Self::attach_with_env(args, &[])
    }

    /// Starts loopbpf with `args` and these environment variables, and waits until its probes
    /// are attached.
    pub fn attach_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut this = Self::spawn_with_env(args, env);
        let attached = this
            .err
            .wait_for(Duration::from_secs(30), |l| l.contains("watching pid"));
        assert!(
            attached.is_some(),
            "loopbpf did not attach; stderr: {:?}",
            this.err.seen
        );
        this
    }

    /// Starts `loopbpf --all` with more `args` and waits until it watches the host.
    pub fn watch_all(args: &[&str]) -> Self {
        let mut this = Self::spawn(&[&["--all"], args].concat());
        let attached = this.err.wait_for(Duration::from_mins(1), |l| {
            l.contains("watching every libuv process")
        });
        assert!(
            attached.is_some(),
            "loopbpf --all did not start; stderr: {:?}",
            this.err.seen
        );
        this
    }

    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_with_env(args, &[])
    }

    /// Starts loopbpf with `args` and these environment variables set.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(loopbpf_bin())
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start loopbpf");
        let out = Lines::spawn(child.stdout.take().unwrap());
        let err = Lines::spawn(child.stderr.take().unwrap());
        Self { child, out, err }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. `libc::SIGINT` = 2) to loopbpf.
    pub fn signal(&self, signal: i32) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the JSON `block` record (`--json`) of process `pid`: loopbpf has taken the
    /// block in and named it. Returns it.
    pub fn wait_for_block(&mut self, pid: u32, timeout: Duration) -> Value {
        let line = self
            .out
            .wait_for(timeout, |l| {
                serde_json::from_str::<Value>(l)
                    .is_ok_and(|v| v["event"] == "block" && v["pid"] == pid)
            })
            .unwrap_or_else(|| {
                panic!(
                    "loopbpf reported no block of pid {pid} within {timeout:?}; stderr: {:?}",
                    self.err.rest(Duration::ZERO)
                )
            });
        serde_json::from_str(&line).unwrap()
    }

    /// Ends loopbpf as a user would, with Ctrl-C (SIGINT): it must exit cleanly within
    /// `timeout`. Returns its JSON lines.
    pub fn stop(self, timeout: Duration) -> Vec<Value> {
        self.signal(libc::SIGINT);
        let (status, output) = self.finish(timeout);
        assert!(status.success(), "loopbpf failed on SIGINT: {status}");
        output
    }

    /// Waits for loopbpf to end; returns its status and its JSON lines.
    pub fn finish(mut self, timeout: Duration) -> (ExitStatus, Vec<Value>) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "loopbpf did not end within {timeout:?}; stderr: {:?}",
                    self.err.rest(Duration::ZERO)
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        let lines = self.out.rest(Duration::from_secs(5));
        let values = lines
            .iter()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
            .collect();
        (status, values)
    }
}

impl Drop for Loopbpf {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` until it holds or `timeout` passes; says whether it held.
pub fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `condition` holds; panics naming `what` it waited for after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, condition: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, condition),
        "waited {timeout:?} in vain for {what}"
    );
}

/// The scheduler state of thread `tid` of process `pid` (`R`, `S`, ...), `None` once gone.
pub fn thread_state(pid: u32, tid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // After the command name, which may hold spaces and parentheses.
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Waits until the main thread of `pid` is stuck on the CPU: running at every look for
/// 200 ms (an idle loop sleeps in its poll wait).
pub fn wait_until_stuck(pid: u32) {
    let mut running_since: Option<Instant> = None;
    wait_until(
        &format!("the loop of pid {pid} to be stuck on the CPU"),
        Duration::from_secs(10),
        || {
            if thread_state(pid, pid) == Some('R') {
                let since = *running_since.get_or_insert_with(Instant::now);
                since.elapsed() >= Duration::from_millis(200)
            } else {
                running_since = None;
                false
            }
        },
    );
}

/// Records of one kind (`block`, `ongoing`, `interval`, `summary`).
pub fn events<'a>(values: &'a [Value], kind: &str) -> Vec<&'a Value> {
    values.iter().filter(|v| v["event"] == kind).collect()
}

/// A fixture's own measure of a block: its wall-clock time, and the thread's waits for a CPU
/// inside it where the fixture counted them (blocker.js answers `cpu_wait_ms`).
#[derive(Debug, Clone, Copy)]
pub struct Truth {
    pub ms: f64,
    pub cpu_wait_ms: Option<f64>,
}

impl From<f64> for Truth {
    fn from(ms: f64) -> Self {
        Self {
            ms,
            cpu_wait_ms: None,
        }
    }
}

impl From<&Value> for Truth {
    /// A fixture's answer: `measured_ms`, and `cpu_wait_ms` when it has one.
    fn from(answer: &Value) -> Self {
        Self {
            ms: answer["measured_ms"]
                .as_f64()
                .unwrap_or_else(|| panic!("no measured_ms in {answer}")),
            cpu_wait_ms: answer["cpu_wait_ms"].as_f64(),
        }
    }
}

/// A block loopbpf reported (JSON) against the fixture's own timing of its work. The fixture
/// times only its work; loopbpf the whole busy interval, which may also hold a scavenge before
/// or after it (a young process still has garbage to collect), or a wait for a CPU there (a
/// preemption on a loaded host). loopbpf says how much GC the block had: up to that much more
/// is right. Where the fixture counted its own waits for a CPU, loopbpf's waits beyond those
/// were outside its clock: up to that much more is right too, and loopbpf must have seen at
/// least the fixture's (as waits, or as sleeps: a wait right after a wake-up is the sleep's).
pub fn assert_block_close(block: &Value, truth: impl Into<Truth>, what: &str) {
    let truth = truth.into();
    let reported = block["duration_ms"].as_f64().unwrap();
    let gc = block["gc_ms"].as_f64().unwrap_or(0.0);
    let cpu_wait = block["cpu_wait_ms"].as_f64().unwrap();
    let off_cpu = block["off_cpu_ms"].as_f64().unwrap_or(0.0);
    eprintln!(
        "{what}: loopbpf {reported} ms with {gc} ms of GC, {cpu_wait} ms waiting for a CPU \
         (the fixture: {} in its work), {off_cpu} ms off the CPU",
        truth
            .cpu_wait_ms
            .map_or_else(|| "not counted".to_owned(), |ms| format!("{ms:.2} ms")),
    );
    let wait_outside = truth.cpu_wait_ms.map_or(0.0, |inside| {
        // A wait for a CPU right after a wake-up from a sleep is counted in the sleep.
        let tolerance = (inside * 0.05).max(2.0);
        assert!(
            cpu_wait + off_cpu >= inside - tolerance,
            "{what}: loopbpf says the loop waited {cpu_wait} ms for a CPU and slept {off_cpu} \
             ms, the fixture counted {inside:.2} ms of waits for a CPU in its work alone"
        );
        (cpu_wait - inside).max(0.0)
    });
    let outside_the_work = (gc + wait_outside).min(reported - truth.ms).max(0.0);
    if (reported - outside_the_work - truth.ms).abs() > 1.0 {
        eprintln!("{what}: where its time went:\n{}", stacks_summary(block));
    }
    assert_duration_close(reported - outside_the_work, truth.ms, what);
}

/// A block's stacks, heaviest first, a line each: weight, on or off the CPU, leaf frames.
pub fn stacks_summary(block: &Value) -> String {
    let Some(stacks) = block["stacks"].as_array() else {
        return "  (no stacks)".to_owned();
    };
    let line = |stack: &Value| {
        let frames = stack["frames"].as_array().map_or(&[][..], Vec::as_slice);
        let names: Vec<&str> = frames
            .iter()
            .take(6)
            .map(|f| f["name"].as_str().unwrap_or("?"))
            .collect();
        format!(
            "  {:>8.2} ms {} {}",
            stack["weight_ms"].as_f64().unwrap_or(0.0),
            if stack["on_cpu"] == true {
                "on "
            } else {
                "off"
            },
            names.join(" < ")
        )
    };
    stacks
        .iter()
        .take(12)
        .map(line)
        .collect::<Vec<_>>()
        .join("\n")
}

/// loopbpf must measure busy time within max(2 ms, 2%) of the truth.
pub fn assert_duration_close(reported_ms: f64, true_ms: f64, what: &str) {
    let tolerance = (true_ms * 0.02).max(2.0);
    eprintln!("{what}: loopbpf {reported_ms:.2} ms, fixture {true_ms:.2} ms");
    assert!(
        (reported_ms - true_ms).abs() <= tolerance,
        "{what}: loopbpf reported {reported_ms:.2} ms, the fixture measured {true_ms:.2} ms (tolerance {tolerance:.2} ms)"
    );
}

/// What `bpftool -j ARGS` prints.
pub fn bpftool(args: &[&str]) -> Value {
    let output = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool: run scripts/install-deps.sh");
    assert!(
        output.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Keys of a loopbpf map (`bpftool map dump`), as numbers.
pub fn map_keys(name: &str) -> Vec<u64> {
    let dump = bpftool(&["map", "dump", "name", name]);
    let entries = match &dump {
        // With several maps of that name bpftool nests them; loopbpf has one.
        Value::Array(items) => items.clone(),
        _ => Vec::new(),
    };
    entries
        .iter()
        .filter_map(|e| e.get("formatted").unwrap_or(e).get("key"))
        .filter_map(|k| {
            k.as_u64().or_else(|| {
                // Without BTF, keys are byte arrays ("0x12", ...), little endian.
                let bytes = k.as_array()?;
                bytes.iter().rev().try_fold(0u64, |acc, b| {
                    let b = u64::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok()?;
                    Some(acc << 8 | b)
                })
            })
        })
        .collect()
}
