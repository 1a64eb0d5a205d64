//! Fleet mode (`loopbpf --all`): every node process of the host, those started later (on a node
//! binary not probed yet, so only its exec can give it away), one in its own pid and mount
//! namespace, many short-lived ones; and the Prometheus metrics, scraped by a real Prometheus
//! server that must answer every query of the Grafana dashboard.

use std::{
    collections::BTreeSet,
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use loopbpf_tests::{
    Fixture, Loopbpf, assert_block_close, assert_duration_close, bpftool, events, fixture,
    installed_node, map_keys, node_bin, node_of, poll_until, require_root, wait_until, workspace,
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);

/// The block loopbpf reported for `pid`, with the duration the fixture measured.
fn assert_block_of(output: &[Value], pid: u32, truth: &Value, what: &str) {
    let blocks: Vec<&Value> = events(output, "block")
        .into_iter()
        .filter(|b| b["pid"] == pid)
        .collect();
    assert_eq!(blocks.len(), 1, "{what}: blocks of pid {pid}: {output:?}");
    assert_eq!(blocks[0]["comm"], "node", "{what}: {:?}", blocks[0]);
    assert_block_close(blocks[0], truth, what);
}

#[test]
fn every_node_process_is_watched_those_started_later_too() {
    require_root();
    let mut running = Fixture::start();
    let mut loopbpf = Loopbpf::watch_all(&["--json", "--threshold", "50ms"]);
    // Another node binary, with no probe on it yet: only its exec says it is there.
    let other = node_of(22);
    let (this_file, other_file) = (
        fs::metadata(which(&node_bin())).unwrap(),
        fs::metadata(&other).unwrap(),
    );
    assert!(
        (this_file.dev(), this_file.ino()) != (other_file.dev(), other_file.ino()),
        "the later node must run another binary than the first"
    );
    let mut later = Fixture::start_on(other.to_str().unwrap(), &[]);
    // The claim under test: found within a second of its exec.
    thread::sleep(Duration::from_secs(1));
    later.send("block immediate spin 300");
    let later_truth = later.done("block", TIMEOUT);
    // Once loopbpf has named its block, it has read the new binary: on two cores, that work
    // can delay the fixture between its poll and its timer by a few ms, which loopbpf rightly
    // counts as busy.
    loopbpf.wait_for_block(later.pid(), TIMEOUT);
    running.send("block timer spin 200");
    let running_truth = running.done("block", TIMEOUT);
    loopbpf.wait_for_block(running.pid(), TIMEOUT);
    let output = loopbpf.stop(TIMEOUT);

    assert_block_of(&output, running.pid(), &running_truth, "running at start");
    assert_block_of(&output, later.pid(), &later_truth, "started later");
    let summary = events(&output, "summary");
    let pids: BTreeSet<u64> = summary[0]["loops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["pid"].as_u64().unwrap())
        .collect();
    assert!(
        pids.contains(&u64::from(running.pid())) && pids.contains(&u64::from(later.pid())),
        "{summary:?}"
    );
}

#[test]
fn a_process_in_its_own_pid_and_mount_namespace_is_found_by_its_host_pid() {
    require_root();
    let mut loopbpf = Loopbpf::watch_all(&["--json"]);
    // The binary exists only in the process's own mount namespace: a tmpfs mounted there.
    let script = format!(
        "mount -t tmpfs loopbpf-test /mnt && cp {node} /mnt/node && exec /mnt/node {fixture}",
        node = which(&node_bin()).display(),
        fixture = fixture("blocker.js").display(),
    );
    let mut command = Command::new("unshare");
    command.args([
        "--pid",
        "--fork",
        "--mount",
        "--mount-proc",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]);
    let mut contained = Fixture::start_command(command);
    let ready = contained
        .out
        .seen
        .iter()
        .find(|l| l.contains("\"ready\""))
        .cloned()
        .unwrap();
    assert!(
        ready.contains("\"pid\":1,"),
        "not in its own pid namespace: {ready}"
    );
    let host_pid = only_child(contained.pid());
    assert!(
        !Path::new("/mnt/node").exists(),
        "the binary must exist only in the process's mount namespace"
    );
    // Found within a second, and its V8 layout read (at loopbpf's once-a-second refresh) so
    // that its JS frames get their full names: nothing outside loopbpf shows when.
    thread::sleep(Duration::from_secs(1));

    contained.send("block timer spin 250");
    let truth = contained.done("block", TIMEOUT);
    loopbpf.wait_for_block(host_pid, TIMEOUT);
    let output = loopbpf.stop(TIMEOUT);

    assert_block_of(&output, host_pid, &truth, "in its own namespaces");
    let block = events(&output, "block")
        .into_iter()
        .find(|b| b["pid"] == host_pid)
        .unwrap();
    let named_spin = block["stacks"].as_array().unwrap().iter().any(|s| {
        s["frames"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "Object.spin")
    });
    assert!(named_spin, "the blocking function is named: {block}");
}

#[test]
fn short_lived_processes_leave_no_series_and_no_kernel_state() {
    require_root();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let loopbpf = Loopbpf::watch_all(&[
        "--json",
        "--no-stacks",
        "--metrics",
        &address,
        "--keep-exited",
        "2s",
    ]);
    let mut staying = Fixture::start();
    // Its exec brings the node binary in (reading its symbols takes a moment): only then are
    // processes of that binary seen from their first poll.
    wait_until("the staying node to be watched", TIMEOUT, || {
        watched_count(&address) == Some(1)
    });
    // Each blocks once for 120 ms, then ends at its next poll. The spin runs in setImmediate,
    // whose check phase comes after the loop's first poll whatever the machine's load (a timer
    // can be due before it, and a callback run before the first poll is no busy interval yet).
    let program = "const { performance } = require('perf_hooks');\
        setImmediate(() => { const end = performance.now() + 120; while (performance.now() < end); \
        setTimeout(() => {}, 20); });";
    let mut short_lived = Vec::new();
    for _ in 0..10 {
        let batch: Vec<Child> = (0..10)
            .map(|_| {
                Command::new(node_bin())
                    .args(["-e", program])
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut child in batch {
            short_lived.push(child.id());
            assert!(child.wait().unwrap().success());
        }
    }
    staying.send("block timer spin 150");
    staying.done("block", TIMEOUT);
    // Forgotten after --keep-exited (2 s), at a refresh: series and kernel state alike.
    let forgotten = || {
        let metrics = http_get(&address, "/metrics");
        short_lived
            .iter()
            .all(|pid| !metrics.contains(&format!("pid=\"{pid}\"")))
            && ["threads", "v8_layouts", "asleep"].iter().all(|map| {
                map_keys(map)
                    .iter()
                    .all(|key| Path::new(&format!("/proc/{key}")).exists())
            })
    };
    poll_until(Duration::from_secs(10), forgotten);

    let metrics = http_get(&address, "/metrics");
    let stale: Vec<&u32> = short_lived
        .iter()
        .filter(|pid| metrics.contains(&format!("pid=\"{pid}\"")))
        .collect();
    assert!(stale.is_empty(), "series left of exited pids {stale:?}");
    assert!(
        metrics.contains(&format!("pid=\"{}\"", staying.pid())),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "loopbpf_processes_watched 1"),
        "{metrics}"
    );
    for map in ["threads", "v8_layouts", "asleep"] {
        for key in map_keys(map) {
            assert!(
                Path::new(&format!("/proc/{key}")).exists(),
                "map {map} keeps an entry for {key}, which is gone"
            );
        }
    }

    let output = loopbpf.stop(TIMEOUT);
    let seen: BTreeSet<u64> = events(&output, "block")
        .iter()
        .map(|b| b["pid"].as_u64().unwrap())
        .collect();
    let reported = short_lived
        .iter()
        .filter(|pid| seen.contains(&u64::from(**pid)))
        .count();
    eprintln!("{reported} of 100 short-lived processes had their block reported");
    let missed: Vec<usize> = (0..short_lived.len())
        .filter(|&i| !seen.contains(&u64::from(short_lived[i])))
        .collect();
    eprintln!("not reported: the processes started {missed:?}th");
    assert!(
        reported >= 95,
        "only {reported} of 100 short-lived processes had their block reported"
    );
}

#[test]
fn prometheus_scrapes_the_metrics_and_answers_every_dashboard_query() {
    require_root();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let loopbpf = Loopbpf::watch_all(&["--metrics", &address]);
    let mut fixtures = [Fixture::start(), Fixture::start()];
    let prometheus = Prometheus::start(&address);

    // Blocks of known length in both, for about 15 s.
    let mut truth = [(0u32, 0.0f64); 2];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(15) {
        for (i, node) in fixtures.iter_mut().enumerate() {
            node.send(&format!("block timer spin {}", 150 + 100 * i));
            let done = node.done("block", TIMEOUT);
            truth[i].0 += 1;
            truth[i].1 += done["measured_ms"].as_f64().unwrap() / 1e3;
        }
        // Idle between blocks: an ELU well inside (0, 1) to check.
        thread::sleep(Duration::from_millis(400));
    }
    // Until Prometheus has scraped the last blocks.
    wait_until("a scrape of the last blocks", TIMEOUT, || {
        fixtures.iter().zip(truth).all(|(node, (blocks, _))| {
            let count = prometheus.query(&format!(
                "loopbpf_event_loop_blocked_duration_seconds_count{{pid=\"{}\"}}",
                node.pid()
            ));
            count.len() == 1
                && count[0]["value"][1].as_str().and_then(|v| v.parse().ok()) == Some(blocks)
        })
    });

    let exposition = http_get(&address, "/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package): run scripts/install-deps.sh");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    for (node, (blocks, seconds)) in fixtures.iter().zip(truth) {
        let pid = node.pid();
        let count = prometheus.value(&format!(
            "loopbpf_event_loop_blocked_duration_seconds_count{{pid=\"{pid}\"}}"
        ));
        assert!(
            (count - f64::from(blocks)).abs() < 0.5,
            "pid {pid}: {count} blocks counted, {blocks} made"
        );
        let total = prometheus.value(&format!(
            "loopbpf_event_loop_blocked_seconds_total{{pid=\"{pid}\"}}"
        ));
        assert_duration_close(total * 1e3, seconds * 1e3, "blocked seconds");
        let elu = prometheus.value(&format!(
            "sum(rate(loopbpf_event_loop_time_seconds_total{{pid=\"{pid}\",state=\"active\"}}[10s])) / sum(rate(loopbpf_event_loop_time_seconds_total{{pid=\"{pid}\"}}[10s]))"
        ));
        assert!((0.1..0.9).contains(&elu), "ELU of pid {pid}: {elu}");
    }

    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(workspace().join("deploy/grafana-dashboard.json"))
            .expect("deploy/grafana-dashboard.json"),
    )
    .expect("the dashboard is JSON");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 6, "{queries:?}");
    for query in queries {
        let result = prometheus.query(&query);
        assert!(
            !result.is_empty(),
            "the dashboard's query returns nothing: {query}"
        );
    }
    drop(fixtures);
    loopbpf.stop(TIMEOUT);
}

/// Every `PromQL` expression of the dashboard, with Grafana's variables as Grafana would fill
/// them in for a 5-minute view.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(expr)) = map.get("expr")
                    && !expr.is_empty()
                {
                    out.push(expr.clone());
                }
                for (key, value) in map {
                    // Template variables' own queries are label_values(), not PromQL.
                    if key != "templating" {
                        walk(value, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(dashboard, &mut exprs);
    exprs
        .into_iter()
        .map(|e| {
            let mut e = e
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace("$__interval", "15s");
            // Any other variable stands for "all": a regex matching everything.
            while let Some(start) = e.find('$') {
                let rest = &e[start + 1..];
                let len = if rest.starts_with('{') {
                    rest.find('}').map_or(rest.len(), |i| i + 1)
                } else {
                    rest.find(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len())
                };
                e.replace_range(start..=start + len, ".*");
            }
            e
        })
        .collect()
}

/// A Prometheus server of Debian's package, on loopback, scraping `target` every second.
struct Prometheus {
    child: Child,
    address: String,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("loopbpf-prometheus-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: loopbpf\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let address = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian's package): run scripts/install-deps.sh");
        let this = Self {
            child,
            address,
            dir,
        };
        wait_until("prometheus to be ready", TIMEOUT, || {
            try_http_get(&this.address, "/-/ready").is_some_and(|r| r.contains("Ready"))
        });
        this
    }

    /// The result vector of an instant query.
    fn query(&self, expr: &str) -> Vec<Value> {
        let body = http_get(
            &self.address,
            &format!("/api/v1/query?query={}", percent_encode(expr)),
        );
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("prometheus answered {body:?} to {expr}: {e}"));
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The value of a query that has one series.
    fn value(&self, expr: &str) -> f64 {
        let result = self.query(expr);
        assert_eq!(result.len(), 1, "{expr}: {result:?}");
        result[0]["value"][1].as_str().unwrap().parse().unwrap()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `loopbpf_processes_watched` on the metrics page, if it answers.
fn watched_count(address: &str) -> Option<u64> {
    try_http_get(address, "/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix("loopbpf_processes_watched "))?
        .parse()
        .ok()
}

fn try_http_get(address: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(TIMEOUT)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_owned())
}

fn http_get(address: &str, path: &str) -> String {
    try_http_get(address, path).unwrap_or_else(|| panic!("GET http://{address}{path} failed"))
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn which(program: &str) -> PathBuf {
    let output = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .unwrap();
    fs::canonicalize(String::from_utf8(output.stdout).unwrap().trim()).unwrap()
}

/// The one child of `pid` (`unshare --fork` runs the command in a child).
fn only_child(pid: u32) -> u32 {
    let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let children: Vec<u32> = children
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(children.len(), 1, "children of {pid}: {children:?}");
    children[0]
}

/// Starts `sleep` under pid `pid` (free again) by setting the kernel's last-pid counter just
/// below it; `None` when another process took the pid first.
fn sleep_under_pid(pid: u32) -> Option<Child> {
    for _ in 0..20 {
        fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
        let child = Command::new("sleep").arg("30").spawn().ok()?;
        if child.id() == pid {
            return Some(child);
        }
        let mut other = child;
        let _ = other.kill();
        let _ = other.wait();
    }
    None
}

#[test]
fn a_pid_reused_by_another_program_is_not_taken_for_the_node_that_had_it() {
    require_root();
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let loopbpf = Loopbpf::watch_all(&["--json", "--metrics", &address, "--keep-exited", "1s"]);
    let mut node = Fixture::start();
    let pid = node.pid();
    let series = format!("pid=\"{pid}\"");
    wait_until("the node to be watched", TIMEOUT, || {
        try_http_get(&address, "/metrics").is_some_and(|m| m.contains(&series))
    });
    node.send("block timer spin 150");
    node.done("block", TIMEOUT);
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    let mut sleeper = sleep_under_pid(pid).expect("could not start a process under the freed pid");
    // Forgotten after --keep-exited (1 s), at a refresh.
    poll_until(Duration::from_secs(10), || {
        try_http_get(&address, "/metrics").is_some_and(|m| !m.contains(&series))
    });
    let metrics = http_get(&address, "/metrics");
    assert!(
        !metrics.contains(&format!("pid=\"{pid}\"")),
        "series of pid {pid}, now `sleep`, remain: {metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "loopbpf_processes_watched 0"),
        "{metrics}"
    );
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "the new process was harmed"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let output = loopbpf.stop(TIMEOUT);
    assert_eq!(
        events(&output, "block")
            .iter()
            .filter(|b| b["pid"] == pid)
            .count(),
        1,
        "{output:?}"
    );
}

/// A directory removed when the test ends, whichever way.
struct RemovedAtEnd(PathBuf);

impl Drop for RemovedAtEnd {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Where process `pid` has `file` open or mapped: its fds and its maps lines.
fn files_open(pid: u32, file: &Path) -> Vec<String> {
    let name = file.to_str().unwrap();
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .map(|target| target.display().to_string());
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    fds.chain(maps.lines().map(str::to_owned))
        .filter(|line| line.contains(name))
        .collect()
}

/// How many of loopbpf's uprobes run `program` (bpftool: links, then their programs' names).
fn probes_running(program: &str) -> usize {
    let ids: BTreeSet<u64> = bpftool(&["prog", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == program)
        .filter_map(|p| p["id"].as_u64())
        .collect();
    bpftool(&["link", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .count()
}

/// Waits until `program` runs in `count` uprobes.
fn wait_for_probes(loopbpf: &mut Loopbpf, program: &str, count: usize, what: &str) {
    let mut running = 0;
    let reached = poll_until(TIMEOUT, || {
        running = probes_running(program);
        running == count
    });
    assert!(
        reached,
        "{what}: {running} {program} probes, not {count}; loopbpf said {:?}",
        loopbpf.err.rest(Duration::ZERO)
    );
}

#[test]
fn the_probes_on_a_binary_come_off_with_its_last_process() {
    require_root();
    // A host where services are upgraded: each version is another node binary, the old one
    // deleted. A uprobe on the old one would keep it open (and its disk space), and a fleet
    // agent running for weeks would run out of slots for new binaries.
    let dir =
        RemovedAtEnd(std::env::temp_dir().join(format!("loopbpf-upgrade-{}", std::process::id())));
    let (old, new) = (dir.0.join("old/node"), dir.0.join("new/node"));
    for binary in [&old, &new] {
        fs::create_dir_all(binary.parent().unwrap()).unwrap();
        fs::copy(installed_node(), binary).unwrap();
    }
    let mut loopbpf = Loopbpf::watch_all(&["--json", "--keep-exited", "1s"]);
    let (loops, gc) = (
        probes_running("uv_run_entry"),
        probes_running("gc_prologue"),
    );

    let mut before = Fixture::start_on(old.to_str().unwrap(), &[]);
    wait_for_probes(
        &mut loopbpf,
        "uv_run_entry",
        loops + 1,
        "the old binary's process started",
    );
    wait_for_probes(
        &mut loopbpf,
        "gc_prologue",
        gc + 1,
        "the old binary's process started",
    );
    // Fully watched: its block is reported.
    before.send("block immediate spin 150");
    let tag = format!("\"pid\":{}", before.pid());
    loopbpf
        .out
        .wait_for(TIMEOUT, |l| {
            l.contains("\"event\":\"block\"") && l.contains(&tag)
        })
        .expect("the old binary's process was not watched");
    // Naming its stacks opened the binary.
    assert!(
        !files_open(loopbpf.pid(), &old).is_empty(),
        "loopbpf never opened {old:?}"
    );
    fs::remove_file(&old).unwrap();
    before.send("exit");
    before
        .wait_exit(TIMEOUT)
        .expect("the old node did not exit");
    // Forgotten after --keep-exited (1 s), with the probes on its binary.
    wait_for_probes(
        &mut loopbpf,
        "uv_run_entry",
        loops,
        "the old binary's last process exited",
    );
    wait_for_probes(
        &mut loopbpf,
        "gc_prologue",
        gc,
        "the old binary's last process exited",
    );
    // Nor does loopbpf keep it open or mapped: its disk space is freed. The naming lane that
    // had the process lets go of the file as it takes in the process's end, a moment later.
    let closed = poll_until(Duration::from_secs(5), || {
        files_open(loopbpf.pid(), &old).is_empty()
    });
    let open = files_open(loopbpf.pid(), &old);
    assert!(closed, "loopbpf still has {open:?}");

    // The upgraded service runs another binary, in the freed slot: it must be watched as well.
    let mut after = Fixture::start_on(new.to_str().unwrap(), &[]);
    wait_for_probes(
        &mut loopbpf,
        "uv_run_entry",
        loops + 1,
        "the new binary's process started",
    );
    after.send("block immediate spin 200");
    let truth = after.done("block", TIMEOUT);
    after.send("exit");
    after.wait_exit(TIMEOUT).expect("the new node did not exit");
    let output = loopbpf.stop(TIMEOUT);
    assert_block_of(&output, after.pid(), &truth, "the new binary");
}
