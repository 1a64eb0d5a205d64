//! `cargo xtask bench`: what loopbpf costs, as ratios measured side by side in interleaved
//! rounds (these machines are noisy: never compare figures from different runs).
//!
//! - iteration cost: a setImmediate chain's loop iterations per second, without and with
//!   loopbpf attached to it;
//! - host tax: how long a `getppid` syscall, and a round trip between two threads (wake-ups and
//!   context switches), take in a process loopbpf does not watch, without and with `loopbpf
//!   --all` running;
//! - target overhead: a node HTTP server saturated by wrk on loopback, its throughput and p99
//!   latency with no monitor, with what users run in-process today (an `async_hooks` monitor,
//!   blocked-at, prom-client's default metrics), and with loopbpf without and with stacks;
//! - accuracy: blocks of known length (100 ms to 5 s, several sources) against the fixture's
//!   own measure, and the delay from a block's end to its line;
//! - agent cost: loopbpf's CPU and memory watching 1, 10 and 50 node processes;
//! - churn (`churn.rs`): `--all` on a host of short-lived node processes, for half an hour,
//!   both builds attached at once;
//! - fleet (`fleet.rs`): 50 and 200 light node processes under `--all`, and attaching to one,
//!   with this build and (`LOOPBPF_BASE_BIN`) an older one side by side in the same run;
//! - target (`target.rs`): the BPF programs' run time in the target's context (the kernel's
//!   own statistics) and loopbpf `--pid`'s CPU and wake-ups, on a setImmediate chain, a
//!   saturated HTTP server and a GC-heavy loop, builds alternating (`LOOPBPF_BASE_BIN`).

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{run, workspace};

mod churn;
mod fleet;
mod target;

const ROUNDS: usize = 7;

/// Runs the benchmarks: `part` one of `overhead`, `accuracy`, `agent`, `fleet` and `target`,
/// or (`None`) all of them; `churn` (half an hour) only on its own.
pub fn bench(part: Option<&str>) -> Result<()> {
    run("cargo", &["build", "--release", "--package", "loopbpf"])?;
    match part {
        None => {
            overhead()?;
            accuracy()?;
            agent_cost()?;
            fleet::fleet()?;
            target::target()
        }
        Some("overhead") => overhead(),
        Some("accuracy") => accuracy(),
        Some("agent") => agent_cost(),
        Some("churn") => churn::churn(),
        Some("fleet") => fleet::fleet(),
        Some("target") => target::target(),
        Some(other) => {
            bail!("no benchmark `{other}`: overhead, accuracy, agent, fleet, target or churn")
        }
    }
}

/// Target overhead (HTTP), iteration cost and host tax, in interleaved rounds; the ratios are
/// also drawn in `BENCHMARKS.svg`.
fn overhead() -> Result<()> {
    let mut series = http_overhead()?;
    let mut iteration_ratios = Vec::new();
    let mut syscall_ns = (Vec::new(), Vec::new());
    let mut switch_ns = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Alternate which side goes first, so drift over time does not favour one.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut rates = [0.0; 2];
        for with_loopbpf in order {
            rates[usize::from(with_loopbpf)] = iteration_rate(with_loopbpf)?;
        }
        let ratio = rates[1] / rates[0];
        eprintln!(
            "bench: round {round}: {:.0} -> {:.0} iterations/s ({ratio:.3})",
            rates[0], rates[1]
        );
        iteration_ratios.push(ratio);

        for with_loopbpf in order {
            let (syscall, switch) = host_tax(with_loopbpf)?;
            if with_loopbpf {
                syscall_ns.1.push(syscall);
                switch_ns.1.push(switch);
            } else {
                syscall_ns.0.push(syscall);
                switch_ns.0.push(switch);
            }
        }
    }
    let (base_ns, with_ns) = (median(&syscall_ns.0), median(&syscall_ns.1));
    let tax_ratios: Vec<f64> = syscall_ns
        .0
        .iter()
        .zip(&syscall_ns.1)
        .map(|(b, w)| b / w)
        .collect();
    println!("| measurement ({ROUNDS} interleaved rounds) | median | min | max |");
    println!("|---|---|---|---|");
    print_row(
        "setImmediate chain: iteration rate kept with loopbpf attached",
        &iteration_ratios,
    );
    print_row(
        "getppid loop in an unwatched process: rate kept while loopbpf --all runs",
        &tax_ratios,
    );
    let switch_ratios: Vec<f64> = switch_ns
        .0
        .iter()
        .zip(&switch_ns.1)
        .map(|(b, w)| b / w)
        .collect();
    print_row(
        "pipe ping-pong between two unwatched threads: round trips kept while loopbpf --all runs",
        &switch_ratios,
    );
    println!(
        "\ngetppid: {base_ns:.0} ns without loopbpf, {with_ns:.0} ns with (+{:.0} ns per syscall)",
        with_ns - base_ns
    );
    let (base_ns, with_ns) = (median(&switch_ns.0), median(&switch_ns.1));
    println!(
        "ping-pong round trip: {base_ns:.0} ns without loopbpf, {with_ns:.0} ns with (+{:.0} ns per round trip, two wake-ups and their context switches)",
        with_ns - base_ns
    );
    series.push(("setImmediate chain: iterations/s".into(), iteration_ratios));
    series.push((
        "unwatched getppid loop, loopbpf --all: calls/s".into(),
        tax_ratios,
    ));
    series.push((
        "unwatched ping-pong, loopbpf --all: round trips/s".into(),
        switch_ratios,
    ));
    write_plot(&series, &workspace().join("BENCHMARKS.svg"))
}

fn print_row(what: &str, values: &[f64]) {
    let (min, max) = range(values);
    println!("| {what} | {:.3} | {min:.3} | {max:.3} |", median(values));
}

fn range(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts loopbpf on `pid` and returns once it is fully attached.
fn attach(pid: u32) -> Result<Killed> {
    attach_with(&["--pid", &pid.to_string()])
}

/// Starts loopbpf with `args` and returns once it is fully attached: its probe on every loop
/// iteration, which finds the loops already running, is off again (about 2 s).
fn attach_with(args: &[&str]) -> Result<Killed> {
    start_loopbpf(
        &[&["--json"], args].concat(),
        "no probe left on its iterations",
        Stdio::null(),
    )
}

/// Starts loopbpf with `args` and returns once it has said `ready` on stderr, whose rest is
/// drained so that loopbpf never blocks on it.
fn start_loopbpf(args: &[&str], ready: &str, stdout: Stdio) -> Result<Killed> {
    start_binary(&loopbpf_binary(), args, ready, stdout)
}

/// The build measured: `LOOPBPF_BIN` measures another one (an older commit, side by side with
/// this one), else this workspace's release build.
fn loopbpf_binary() -> std::path::PathBuf {
    std::env::var_os("LOOPBPF_BIN")
        .map_or_else(|| workspace().join("target/release/loopbpf"), Into::into)
}

/// A loopbpf build measured, and its label in the tables.
struct Build {
    label: &'static str,
    binary: std::path::PathBuf,
}

/// This build (`now`) and, when `LOOPBPF_BASE_BIN` names one, an older one (`base`, first), to
/// measure side by side in the same run.
fn builds() -> Vec<Build> {
    let mut builds = vec![Build {
        label: "now",
        binary: loopbpf_binary(),
    }];
    if let Some(base) = std::env::var_os("LOOPBPF_BASE_BIN") {
        builds.insert(
            0,
            Build {
                label: "base",
                binary: base.into(),
            },
        );
    }
    builds
}

/// Starts `binary` (a loopbpf build) with `args`, as [`start_loopbpf`].
fn start_binary(
    binary: &std::path::Path,
    args: &[&str],
    ready: &str,
    stdout: Stdio,
) -> Result<Killed> {
    let mut child = Command::new(binary)
        .args(args)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .context("starting loopbpf")?;
    let stderr = child.stderr.take().unwrap();
    let child = Killed(child);
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains(ready) => break,
            Some(Ok(_)) => {}
            _ => bail!("loopbpf ended before saying: {ready}"),
        }
    }
    // `LOOPBPF_BENCH_LOGS` (a directory) keeps the rest, as `loopbpf-PID.stderr`.
    let log = std::env::var_os("LOOPBPF_BENCH_LOGS").and_then(|dir| {
        let path = std::path::Path::new(&dir).join(format!("loopbpf-{}.stderr", child.0.id()));
        std::fs::File::create(path).ok()
    });
    std::thread::spawn(move || {
        use std::io::Write;
        let mut log = log;
        for line in lines.map_while(Result::ok) {
            if let Some(file) = &mut log {
                let _ = writeln!(file, "{line}");
            }
        }
    });
    Ok(child)
}

/// Median iterations per second of a setImmediate chain over 3 one-second windows, measured
/// only once loopbpf (if any) is fully attached: its `uv__io_poll` probe, which finds loops
/// already running, off again.
fn iteration_rate(with_loopbpf: bool) -> Result<f64> {
    // Both sides skip node's first 3 s (its JIT warming up; loopbpf attaching takes that long).
    let settled_ms = unix_ms() + 3000.0;
    let mut node = Command::new("node")
        .arg(workspace().join("bench/iterations.js"))
        .arg("1000")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting node")?;
    let stdout = node.stdout.take().unwrap();
    let node = Killed(node);
    let _loopbpf = if with_loopbpf {
        Some(attach(node.0.id())?)
    } else {
        None
    };
    // Only windows that began once loopbpf was fully attached (the pipe holds those from
    // before).
    let attached_ms = unix_ms().max(settled_ms);
    let mut rates = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let window: serde_json::Value = serde_json::from_str(&line?)?;
        let (Some(rate), Some(start)) = (
            window["per_second"].as_f64(),
            window["start_unix_ms"].as_f64(),
        ) else {
            bail!("bad rate line: {window}");
        };
        if start >= attached_ms {
            rates.push(rate);
        }
        if rates.len() == 3 {
            break;
        }
    }
    Ok(median(&rates))
}

/// Nanoseconds per `getppid`, and per round trip of a byte between two threads over a socket
/// pair, in this (unwatched) process, with `loopbpf --all` watching the host (an idle node
/// among its processes) or not: the tax on syscalls and on context switches.
fn host_tax(with_loopbpf: bool) -> Result<(f64, f64)> {
    let _node = Killed(
        Command::new("node")
            .args(["-e", "setInterval(() => {}, 1000)"])
            .spawn()
            .context("starting node")?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let _loopbpf = if with_loopbpf {
        Some(attach_with(&["--all"])?)
    } else {
        None
    };
    let mut samples = Vec::new();
    for _ in 0..5 {
        let calls = 2_000_000u32;
        let start = Instant::now();
        for _ in 0..calls {
            // SAFETY: getppid has no preconditions and cannot fail.
            unsafe { libc_getppid() };
        }
        samples.push(start.elapsed().as_nanos() as f64 / f64::from(calls));
    }
    Ok((median(&samples), ping_pong_ns()?))
}

/// Nanoseconds per round trip of one byte between two threads of this process.
fn ping_pong_ns() -> Result<f64> {
    use std::{
        io::{Read, Write},
        os::unix::net::UnixStream,
    };
    const TRIPS: u32 = 50_000;
    let (mut near, mut far) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut byte = [0u8];
        for _ in 0..TRIPS {
            far.read_exact(&mut byte)?;
            far.write_all(&byte)?;
        }
        Ok(())
    });
    let start = Instant::now();
    let mut byte = [7u8];
    for _ in 0..TRIPS {
        near.write_all(&byte)?;
        near.read_exact(&mut byte)?;
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(TRIPS);
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))??;
    Ok(ns)
}

/// Throughput and p99 latency of a saturated node HTTP server under each kind of watching,
/// in interleaved rounds; prints the ratios to the unwatched server and returns them.
fn http_overhead() -> Result<Vec<Series>> {
    // (name, in-process monitor, loopbpf arguments)
    const MODES: [(&str, &str, Option<&[&str]>); 6] = [
        ("no monitor", "none", None),
        ("async_hooks before/after monitor", "async-hooks", None),
        ("blocked-at", "blocked-at", None),
        ("prom-client collectDefaultMetrics", "prom-client", None),
        ("loopbpf --no-stacks", "none", Some(&["--no-stacks"])),
        ("loopbpf (stacks, default)", "none", Some(&[])),
    ];
    run(
        "npm",
        &[
            "install",
            "--silent",
            "--prefix",
            "bench",
            "--no-audit",
            "--no-fund",
        ],
    )?;
    let mut throughput: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    let mut p99: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    for round in 0..ROUNDS {
        for step in 0..MODES.len() {
            let mode = (step + round) % MODES.len();
            let (_, monitor, loopbpf_args) = MODES[mode];
            let (rps, p99_ms) = http_round(monitor, loopbpf_args)?;
            eprintln!(
                "bench: http round {round}: {}: {rps:.0} req/s, p99 {p99_ms:.2} ms",
                MODES[mode].0
            );
            throughput[mode].push(rps);
            p99[mode].push(p99_ms);
        }
    }
    println!(
        "| target: saturated HTTP server ({ROUNDS} interleaved rounds) | throughput kept (median, min, max) | p99 latency, median |"
    );
    println!("|---|---|---|");
    let mut series = Vec::new();
    for (mode, (name, _, _)) in MODES.iter().enumerate() {
        let ratios: Vec<f64> = throughput[mode]
            .iter()
            .zip(&throughput[0])
            .map(|(with, without)| with / without)
            .collect();
        let (min, max) = range(&ratios);
        println!(
            "| {name} ({:.0} req/s) | {:.3} ({min:.3}, {max:.3}) | {:.2} ms |",
            median(&throughput[mode]),
            median(&ratios),
            median(&p99[mode])
        );
        if mode > 0 {
            series.push((format!("HTTP throughput: {name}"), ratios));
        }
    }
    Ok(series)
}

/// A plot's row: what was measured, and its ratios from each round.
type Series = (String, Vec<f64>);

/// Draws `series` as horizontal bars (median) with whiskers (min to max), against a line at 1
/// (no cost), as SVG at `path`.
fn write_plot(series: &[Series], path: &std::path::Path) -> Result<()> {
    use std::fmt::Write;
    const LABEL_W: f64 = 430.0;
    const PLOT_W: f64 = 420.0;
    const ROW_H: f64 = 26.0;
    let scale_max = 1.6_f64;
    let x = |ratio: f64| LABEL_W + ratio.clamp(0.0, scale_max) / scale_max * PLOT_W;
    let height = 50.0 + ROW_H * series.len() as f64;
    let mut svg = String::new();
    writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#,
        w = LABEL_W + PLOT_W + 20.0
    )?;
    writeln!(
        svg,
        r#"<text x="10" y="18" font-weight="bold">Share kept of the unwatched rate (median; whiskers: min and max over the rounds)</text>"#
    )?;
    for (i, (name, values)) in series.iter().enumerate() {
        let y = 34.0 + ROW_H * i as f64;
        let (min, max) = range(values);
        let med = median(values);
        let name = name.replace('&', "&amp;").replace('<', "&lt;");
        writeln!(svg, r#"<text x="10" y="{}">{name}</text>"#, y + 14.0)?;
        writeln!(
            svg,
            r##"<rect x="{LABEL_W}" y="{}" width="{:.1}" height="16" fill="#6a9fd4"/>"##,
            y + 2.0,
            x(med) - LABEL_W
        )?;
        writeln!(
            svg,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{yc}" y2="{yc}" stroke="black"/>"#,
            x(min),
            x(max),
            yc = y + 10.0
        )?;
        writeln!(
            svg,
            r#"<text x="{:.1}" y="{}">{med:.3}</text>"#,
            x(max) + 4.0,
            y + 14.0
        )?;
    }
    let one = x(1.0);
    writeln!(
        svg,
        r##"<line x1="{one:.1}" x2="{one:.1}" y1="26" y2="{}" stroke="#c00" stroke-dasharray="4 3"/>"##,
        height - 8.0
    )?;
    writeln!(svg, "</svg>")?;
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// One 4-second wrk run against a fresh server with an in-process `monitor`, and loopbpf (given
/// arguments) attached or not.
fn http_round(monitor: &str, loopbpf_args: Option<&[&str]>) -> Result<(f64, f64)> {
    let mut server = Command::new("node")
        .arg(workspace().join("bench/http-server.js"))
        .env("MONITOR", monitor)
        .stderr(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting node")?;
    let stdout = server.stdout.take().unwrap();
    let server = Killed(server);
    let port = BufReader::new(stdout)
        .lines()
        .next()
        .context("the server did not start")??;
    let _loopbpf = match loopbpf_args {
        Some(args) => {
            let pid = server.0.id().to_string();
            Some(attach_with(&[&["--pid", pid.as_str()], args].concat())?)
        }
        None => None,
    };
    let url = format!("http://127.0.0.1:{}/", port.trim());
    // Warm up the JIT, then measure.
    wrk(&url, "1s")?;
    let output = wrk(&url, "4s")?;
    let rps = output
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Requests/sec in wrk's output")?;
    let p99 = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| parse_wrk_duration(v.trim()))
        .context("no 99% latency in wrk's output")?;
    Ok((rps, p99))
}

fn wrk(url: &str, duration: &str) -> Result<String> {
    let output = Command::new("wrk")
        .args(["-t1", "-c32", "-d", duration, "--latency", url])
        .output()
        .context("running wrk (scripts/install-deps.sh installs it)")?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `1.23ms`, `850.00us`, `1.05s` -> milliseconds.
fn parse_wrk_duration(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let value: f64 = text[..split].parse().ok()?;
    match &text[split..] {
        "us" => Some(value / 1000.0),
        "ms" => Some(value),
        "s" => Some(value * 1000.0),
        _ => None,
    }
}

unsafe extern "C" {
    #[link_name = "getppid"]
    fn libc_getppid() -> i32;
}

/// Blocks of known length, from 100 ms to 5 s, made by the test fixture in several ways:
/// loopbpf's duration against the fixture's own measure of its work, and how long after the
/// block's end loopbpf's line arrived.
pub fn accuracy() -> Result<()> {
    const WORKS: [&str; 5] = ["spin", "crypto", "json", "regex", "gc"];
    const LENGTHS_MS: [u32; 3] = [100, 300, 1000];
    let mut node = Command::new("node")
        .arg("--expose-gc")
        .arg(workspace().join("tests/fixtures/blocker.js"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting node")?;
    let mut fixture_in = node.stdin.take().unwrap();
    let mut fixture_out = BufReader::new(node.stdout.take().unwrap()).lines();
    let node = Killed(node);
    fixture_out.next().context("the fixture did not start")??;
    let pid = node.0.id().to_string();
    let mut loopbpf = start_loopbpf(
        &["--pid", &pid, "--json", "--threshold", "50ms"],
        "no probe left on its iterations",
        Stdio::piped(),
    )?;
    let stdout = loopbpf.0.stdout.take().unwrap();
    // loopbpf's block lines as they arrive, each with the wall time of its arrival.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("\"event\":\"block\"") {
                let _ = tx.send((line, unix_ms()));
            }
        }
    });
    let mut rows = Vec::new();
    let mut plan: Vec<(&str, u32)> = WORKS
        .iter()
        .flat_map(|w| LENGTHS_MS.iter().map(move |ms| (*w, *ms)))
        .collect();
    plan.push(("spin", 5000));
    for (work, ms) in plan {
        for _ in 0..3 {
            use std::io::Write;
            writeln!(fixture_in, "block timer {work} {ms}")?;
            let done = loop {
                let line = fixture_out.next().context("the fixture ended")??;
                if line.contains("\"done\":\"block\"") {
                    break serde_json::from_str::<serde_json::Value>(&line)?;
                }
            };
            let (line, arrived_ms) = rx
                .recv_timeout(Duration::from_secs(10))
                .context("loopbpf reported no block")?;
            let block: serde_json::Value = serde_json::from_str(&line)?;
            let reported = block["duration_ms"].as_f64().unwrap_or_default();
            let truth = done["measured_ms"].as_f64().unwrap_or_default();
            let end_ms = block["start_unix_ms"].as_f64().unwrap_or_default() + reported;
            rows.push((work, ms, reported - truth, arrived_ms - end_ms));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    print_accuracy(&rows);
    Ok(())
}

/// (work, length, error ms, print delay ms) rows, per kind and length of block, as a table.
fn print_accuracy(rows: &[(&str, u32, f64, f64)]) {
    println!(
        "| block (3 each) | error vs the fixture's own measure: median, max (ms) | line printed after the block's end: median, max (ms) |"
    );
    println!("|---|---|---|");
    let kinds: std::collections::BTreeSet<(&str, u32)> = rows.iter().map(|r| (r.0, r.1)).collect();
    for (work, ms) in kinds {
        let of_kind = rows.iter().filter(|r| (r.0, r.1) == (work, ms));
        let errors: Vec<f64> = of_kind.clone().map(|r| r.2).collect();
        let delays: Vec<f64> = of_kind.map(|r| r.3).collect();
        println!(
            "| {work} {ms} ms | {:+.2}, {:+.2} | {:.1}, {:.1} |",
            median(&errors),
            range(&errors).1,
            median(&delays),
            range(&delays).1
        );
    }
    let errors: Vec<f64> = rows.iter().map(|r| r.2).collect();
    let delays: Vec<f64> = rows.iter().map(|r| r.3).collect();
    println!(
        "\nall {} blocks: error median {:+.2} ms, min {:+.2}, max {:+.2}; printed a median {:.1} ms (max {:.1}) after the block ended",
        rows.len(),
        median(&errors),
        range(&errors).0,
        range(&errors).1,
        median(&delays),
        range(&delays).1
    );
}

/// loopbpf --all watching N node processes that each block 20 ms of every second (threshold
/// 10 ms, so every such block is reported and named): time to attach, CPU over 30 s, RSS.
pub fn agent_cost() -> Result<()> {
    const SCRIPT: &str =
        "setInterval(() => { const t = Date.now(); while (Date.now() - t < 20); }, 1000);";
    println!("| node processes watched | time to attach | loopbpf CPU over 30 s | loopbpf RSS |");
    println!("|---|---|---|---|");
    for n in [1, 10, 50] {
        let nodes: Vec<Killed> = (0..n)
            .map(|_| {
                Command::new("node")
                    .args(["-e", SCRIPT])
                    .spawn()
                    .map(Killed)
                    .context("starting node")
            })
            .collect::<Result<_>>()?;
        std::thread::sleep(Duration::from_secs(2));
        let start = Instant::now();
        let loopbpf = start_loopbpf(
            &["--all", "--json", "--threshold", "10ms"],
            "watching every libuv process",
            Stdio::null(),
        )?;
        let attach = start.elapsed();
        let pid = loopbpf.0.id();
        let cpu_before = cpu_ticks(pid)?;
        std::thread::sleep(Duration::from_secs(30));
        let cpu_ms = (cpu_ticks(pid)? - cpu_before) * 10; // USER_HZ is 100
        let rss_mb = std::fs::read_to_string(format!("/proc/{pid}/status"))?
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok())
            .context("no VmRSS")?
            / 1024.0;
        println!(
            "| {n} | {:.2} s | {cpu_ms} ms ({:.1}% of a core) | {rss_mb:.0} MB |",
            attach.as_secs_f64(),
            cpu_ms as f64 / 300.0
        );
        drop(loopbpf);
        drop(nodes);
    }
    Ok(())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat[stat.rfind(')').context("bad stat")? + 2..]
        .split_whitespace()
        .collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn rss_mb(pid: u32) -> Result<f64> {
    Ok(std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok())
        .context("no VmRSS")?
        / 1024.0)
}
