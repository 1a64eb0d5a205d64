//! `cargo xtask bench fleet` (issue 17): what loopbpf costs on a host of light node processes,
//! and how soon it reports, with this build and, when `LOOPBPF_BASE_BIN` names one, an older
//! build side by side in the same run (both attached to the same processes at once, so the
//! machine's load falls on both alike).
//!
//! - attach: loopbpf `--pid` on one Node process (stacks on), time until it says it watches,
//!   then at once one 150 ms block: how long after the block's end its line arrived, and
//!   whether its stacks name the blocking function (5 rounds per build, builds alternating);
//! - fleet: `--all` on 50, then 200 `bench/light.js` processes (a little work every 20 ms, one
//!   150 ms block in `lightBlock` each per 30 s): loopbpf's CPU (from `/proc/PID/stat`) and RSS
//!   over 65 s, every block the processes made against those reported and named, and the delay
//!   from a block's end (as the process measured it) to its line, the first block of each
//!   process after attaching apart.

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Build, Killed, builds, cpu_ticks, median, rss_mb, start_binary, unix_ms};
use crate::workspace;

/// How long the fleet is watched, after both builds have attached: the first part (setting up
/// the processes found, the first blocks' symbols) and the rest, measured apart.
const SETUP: Duration = Duration::from_secs(20);
const STEADY: Duration = Duration::from_secs(45);
/// The function every block of the fixture runs in: a block is named when a stack holds it.
const BLOCK_FUNCTION: &str = "lightBlock";

pub fn fleet() -> Result<()> {
    let builds = builds();
    println!(
        "load average at the start: {}",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    );
    attach_rounds(&builds)?;
    let mut rows = Vec::new();
    for n in [50, 200] {
        rows.push((n, fleet_round(&builds, n)?));
    }
    if let [(n1, small), (n2, large)] = &rows[..] {
        for (build, (a, b)) in builds.iter().zip(small.iter().zip(large)) {
            println!(
                "{}: from {n1} to {n2} processes, CPU x{:.2} (x{:.1} the processes), RSS {:+.2} MB per process",
                build.label,
                b.cpu_ms / a.cpu_ms.max(1.0),
                f64::from(*n2) / f64::from(*n1),
                (b.rss_mb - a.rss_mb) / f64::from(n2 - n1),
            );
        }
    }
    println!(
        "load average at the end: {}",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    );
    Ok(())
}

/// A light node process, its stdout piped.
fn light(period_ms: u32, stdout: Stdio) -> Result<Killed> {
    Command::new("node")
        .arg(workspace().join("bench/light.js"))
        .args([period_ms.to_string().as_str(), "150"])
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .map(Killed)
        .context("starting node")
}

/// loopbpf's block lines as they arrive, each with the wall time of its arrival (ms).
type Arrivals = Arc<Mutex<Vec<(Value, f64)>>>;

/// Collects loopbpf's block lines; with `keep`, all its output is also written there.
fn collect_blocks(loopbpf: &mut Killed, keep: Option<PathBuf>) -> Result<Arrivals> {
    let arrivals = Arrivals::default();
    let stdout = loopbpf.0.stdout.take().unwrap();
    let sink = Arc::clone(&arrivals);
    let mut keep = keep.map(std::fs::File::create).transpose()?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let arrived = unix_ms();
            if let Some(file) = &mut keep {
                let _ = writeln!(file, "{line}");
            }
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["event"] == "block"
            {
                sink.lock().unwrap().push((v, arrived));
            }
        }
    });
    Ok(arrivals)
}

fn named(block: &Value) -> bool {
    block["stacks"].as_array().is_some_and(|stacks| {
        stacks.iter().any(|s| {
            s["frames"].as_array().is_some_and(|frames| {
                frames.iter().any(|f| {
                    f["name"]
                        .as_str()
                        .is_some_and(|n| n.contains(BLOCK_FUNCTION))
                })
            })
        })
    })
}

/// Attaches each build to a fresh node process 5 times (builds alternating), then blocks it.
fn attach_rounds(builds: &[Build]) -> Result<()> {
    let mut results: Vec<(Vec<f64>, Vec<f64>, usize)> = vec![Default::default(); builds.len()];
    for _ in 0..5 {
        for (build, result) in builds.iter().zip(&mut results) {
            let mut node = light(3_600_000, Stdio::piped())?;
            let mut fixture = BufReader::new(node.0.stdout.take().unwrap()).lines();
            fixture.next().context("the fixture did not start")??;
            std::thread::sleep(Duration::from_secs(1));
            let pid = node.0.id().to_string();
            let start = Instant::now();
            let mut loopbpf = start_binary(
                &build.binary,
                &["--pid", &pid, "--json"],
                "watching pid",
                Stdio::piped(),
            )?;
            result.0.push(start.elapsed().as_secs_f64() * 1000.0);
            let arrivals = collect_blocks(&mut loopbpf, None)?;
            if !Command::new("kill")
                .args(["-USR2", &pid])
                .status()?
                .success()
            {
                bail!("could not signal pid {pid}");
            }
            let done: Value = serde_json::from_str(&fixture.next().context("no block")??)?;
            let end = done["end_unix_ms"].as_f64().unwrap_or_default();
            let deadline = Instant::now() + Duration::from_secs(10);
            let block = loop {
                if let Some(b) = arrivals.lock().unwrap().first() {
                    break b.clone();
                }
                if Instant::now() > deadline {
                    bail!("{}: no block reported after attaching", build.label);
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            result.1.push(block.1 - end);
            result.2 += usize::from(named(&block.0));
        }
    }
    println!(
        "\n| build | attach (`--pid`, stacks on): median, max | first block's line after its end: median, max | named |"
    );
    println!("|---|---|---|---|");
    for (build, (attach, delay, named)) in builds.iter().zip(&results) {
        println!(
            "| {} | {:.0} ms, {:.0} ms | {:.0} ms, {:.0} ms | {named} of {} |",
            build.label,
            median(attach),
            attach.iter().copied().fold(0.0, f64::max),
            median(delay),
            delay.iter().copied().fold(0.0, f64::max),
            delay.len()
        );
    }
    Ok(())
}

struct Cost {
    /// CPU over the first [`SETUP`] after attaching.
    setup_cpu_ms: f64,
    /// CPU over the [`STEADY`] part after it.
    cpu_ms: f64,
    rss_mb: f64,
}

/// `--all` with `n` light processes: each build's CPU, RSS, blocks found and named, delays.
fn fleet_round(builds: &[Build], n: u32) -> Result<Vec<Cost>> {
    let ends_path = std::env::temp_dir().join(format!("loopbpf-fleet-{n}.jsonl"));
    std::fs::File::create(&ends_path)?;
    // One file in append mode for all: each line is one small write, whole.
    let append = std::fs::OpenOptions::new().append(true).open(&ends_path)?;
    let nodes: Vec<Killed> = (0..n)
        .map(|_| light(30_000, Stdio::from(append.try_clone()?)))
        .collect::<Result<_>>()?;
    let pids: HashSet<u64> = nodes.iter().map(|k| u64::from(k.0.id())).collect();
    let deadline = Instant::now() + Duration::from_mins(2);
    while std::fs::read_to_string(&ends_path)?
        .lines()
        .filter(|l| l.contains("ready"))
        .count()
        < n as usize
    {
        if Instant::now() > deadline {
            bail!("{n} node processes did not all start in 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut running = Vec::new();
    for build in builds {
        let start = Instant::now();
        let mut loopbpf = start_binary(
            &build.binary,
            &["--all", "--json"],
            "watching every libuv process",
            Stdio::piped(),
        )?;
        let attach = start.elapsed();
        let keep = std::env::temp_dir().join(format!("loopbpf-fleet-{n}-{}.jsonl", build.label));
        let arrivals = collect_blocks(&mut loopbpf, Some(keep))?;
        println!("{} is pid {}", build.label, loopbpf.0.id());
        running.push((loopbpf, arrivals, unix_ms(), attach));
    }
    let watch_start = unix_ms();
    let cpu = |running: &[(Killed, Arrivals, f64, Duration)]| -> Result<Vec<u64>> {
        running.iter().map(|r| cpu_ticks(r.0.0.id())).collect()
    };
    let cpu_start = cpu(&running)?;
    std::thread::sleep(SETUP);
    let cpu_setup = cpu(&running)?;
    std::thread::sleep(STEADY);
    let cpu_end = cpu(&running)?;
    let mut costs = Vec::new();
    for (i, r) in running.iter().enumerate() {
        costs.push(Cost {
            // USER_HZ is 100.
            setup_cpu_ms: ((cpu_setup[i] - cpu_start[i]) * 10) as f64,
            cpu_ms: ((cpu_end[i] - cpu_setup[i]) * 10) as f64,
            rss_mb: rss_mb(r.0.0.id())?,
        });
    }
    // Blocks made while every build watched, ended 1 s before the end (its line's time).
    let last_end = unix_ms() - 1000.0;
    let made: Vec<(u64, f64, f64)> = std::fs::read_to_string(&ends_path)?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            Some((
                v["pid"].as_u64()?,
                v["end_unix_ms"].as_f64()?,
                v["measured_ms"].as_f64()?,
            ))
        })
        // A block under way at the attach is reported only if it lasts the threshold after it.
        .filter(|(_, end, measured)| *end - *measured > watch_start && *end < last_end)
        .collect();
    drop(nodes);
    println!(
        "\n`--all`, {n} light node processes, {} s: {} blocks made",
        (SETUP + STEADY).as_secs(),
        made.len()
    );
    println!(
        "| build | attach | loopbpf CPU: first 20 s, then 45 s | RSS | blocks reported | named | duration - measured: median | line after the block's end: median, max (first after attaching: median) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for ((build, (loopbpf, arrivals, _, attach)), cost) in builds.iter().zip(running).zip(&costs) {
        drop(loopbpf);
        print_row(
            build.label,
            &arrivals.lock().unwrap(),
            &made,
            &pids,
            attach,
            cost,
        );
    }
    Ok(costs)
}

/// One build's row: the blocks `made` (pid, end, measured length) against those reported.
fn print_row(
    label: &str,
    arrivals: &[(Value, f64)],
    made: &[(u64, f64, f64)],
    pids: &HashSet<u64>,
    attach: Duration,
    cost: &Cost,
) {
    let mut first_seen = HashSet::new();
    let (mut found, mut named_n, mut timed_out, mut stackless) = (0, 0, 0, 0);
    let (mut errors, mut delays, mut first_delays) = (Vec::new(), Vec::new(), Vec::new());
    let mut by_pid: HashMap<u64, Vec<&(Value, f64)>> = HashMap::new();
    for a in arrivals.iter().filter(|a| a.0["thread"] == "main") {
        by_pid
            .entry(a.0["pid"].as_u64().unwrap_or(0))
            .or_default()
            .push(a);
    }
    let mut made_sorted = made.to_vec();
    made_sorted.sort_by(|a, b| a.1.total_cmp(&b.1));
    for (pid, end, measured) in &made_sorted {
        let first = first_seen.insert(*pid);
        let reported = by_pid.get(pid).and_then(|blocks| {
            blocks.iter().find(|(b, _)| {
                let b_end = b["start_unix_ms"].as_f64().unwrap_or_default()
                    + b["duration_ms"].as_f64().unwrap_or_default();
                (b_end - end).abs() < 50.0
            })
        });
        let Some((block, arrived)) = reported else {
            continue;
        };
        found += 1;
        named_n += usize::from(named(block));
        timed_out += usize::from(block["naming_timed_out"] == true);
        stackless += usize::from(block["stacks"].as_array().is_none_or(Vec::is_empty));
        errors.push(block["duration_ms"].as_f64().unwrap_or_default() - measured);
        delays.push(arrived - end);
        if first {
            first_delays.push(arrived - end);
        }
    }
    let pct = cost.cpu_ms / STEADY.as_secs_f64() / 10.0;
    let stray = arrivals
        .iter()
        .filter(|a| pids.contains(&a.0["pid"].as_u64().unwrap_or(0)))
        .count()
        .saturating_sub(found);
    let median_or_0 = |v: &[f64]| if v.is_empty() { 0.0 } else { median(v) };
    println!(
        "| {label} | {:.2} s | {:.0} ms, then {:.0} ms ({pct:.2}% of a core) | {:.0} MB | {found} of {} ({stray} others) | {named_n} ({timed_out} naming timed out, {stackless} without stacks) | {:+.1} ms | {:.0} ms, {:.0} ms ({:.0} ms) |",
        attach.as_secs_f64(),
        cost.setup_cpu_ms,
        cost.cpu_ms,
        cost.rss_mb,
        made.len(),
        median_or_0(&errors),
        median_or_0(&delays),
        delays.iter().copied().fold(0.0, f64::max),
        median_or_0(&first_delays),
    );
}
