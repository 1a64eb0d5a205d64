//! `cargo xtask bench target` (issue 17): what watching costs the target, from the kernel's
//! own BPF statistics, and what loopbpf `--pid` costs itself, with this build and (when
//! `LOOPBPF_BASE_BIN` names one) an older build in alternating rounds of the same run.
//!
//! Each round starts a fresh target, attaches one build with `--pid` (defaults: threshold
//! 100 ms, stacks on; `--json`, only to count blocks), waits for its `watching pid` line and
//! [`SETTLE`] more (the `uv__io_poll` discovery probe is gone by then), and reads over a window
//! of `LOOPBPF_TARGET_SECONDS` (default 15):
//!
//! - each of loopbpf's BPF programs' `run_cnt` and `run_time_ns` (from `/proc/PID/fdinfo` of
//!   loopbpf's program fds, named by `bpftool prog show`), with the kernel's BPF statistics on
//!   (`kernel.bpf_stats_enabled`, restored afterwards);
//! - the target's CPU time (all its threads' `schedstat`) and its context switches;
//! - loopbpf's CPU time (by thread) and context switches (its wake-ups).
//!
//! Cases (`LOOPBPF_TARGET_CASES`, default `chain,http,gc`): a setImmediate chain, a node HTTP
//! server saturated by wrk (its req/s too), and a loop that collects garbage all the time
//! (`bench/gc-loop.js`); none blocks. `LOOPBPF_TARGET_ROUNDS` (default 2) rounds per build.
//!
//! Programs attached to tracepoints (`on_switch`: every context switch on the host) run in
//! every process's context, not only the target's: they are reported apart, with an estimate
//! of the target's part (its own switches times the mean cost of a run).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    os::fd::{FromRawFd, OwnedFd},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{Build, Killed, builds, start_binary, wrk};
use crate::workspace;

/// Time after loopbpf's `watching pid` line before the window: its probe on every loop
/// iteration, which finds loops already running, stays 2 s.
const SETTLE: Duration = Duration::from_secs(3);
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Chain,
    Http,
    Gc,
}

impl Case {
    fn parse(name: &str) -> Result<Self> {
        match name.trim() {
            "chain" => Ok(Self::Chain),
            "http" => Ok(Self::Http),
            "gc" => Ok(Self::Gc),
            other => bail!("LOOPBPF_TARGET_CASES: no case `{other}` (chain, http, gc)"),
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Chain => "setImmediate chain (bench/iterations.js, no blocks)",
            Self::Http => "node HTTP server saturated by wrk (bench/http-server.js, no blocks)",
            Self::Gc => "GC-heavy loop (bench/gc-loop.js, no blocks)",
        }
    }
}

/// One BPF program's counters: runs and nanoseconds run.
#[derive(Default, Clone, Copy)]
struct Runs {
    count: u64,
    ns: u64,
}

/// What one round measured over its window.
#[derive(Default)]
struct Round {
    window: Duration,
    /// By program name: (attached to a tracepoint, so run for every process on the host; runs).
    programs: BTreeMap<String, (bool, Runs)>,
    target_cpu_ns: u64,
    target_switches: u64,
    loopbpf_cpu_ns: u64,
    /// loopbpf's CPU by thread name.
    loopbpf_threads: BTreeMap<String, u64>,
    loopbpf_switches: u64,
    blocks: usize,
    requests_per_s: Option<f64>,
}

pub fn target() -> Result<()> {
    let seconds = env_number("LOOPBPF_TARGET_SECONDS", 15)?;
    let rounds = env_number("LOOPBPF_TARGET_ROUNDS", 2)?;
    let cases = std::env::var("LOOPBPF_TARGET_CASES")
        .unwrap_or_else(|_| "chain,http,gc".into())
        .split(',')
        .map(Case::parse)
        .collect::<Result<Vec<_>>>()?;
    let builds = builds();
    let _stats = BpfStats::enable()?;
    let window = Duration::from_secs(seconds);
    for case in cases {
        let load = std::fs::read_to_string("/proc/loadavg")?;
        let mut results: Vec<Vec<Round>> = builds.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds {
            // Alternate which build goes first, so drift over time favours neither.
            for step in 0..builds.len() {
                let b = (step + round as usize) % builds.len();
                let measured = measure(case, &builds[b], window)
                    .with_context(|| format!("{}, {}", case.title(), builds[b].label))?;
                // Per round too: a target that behaves two ways (GC helpers woken or not) shows
                // which rounds were which.
                let switch = measured
                    .programs
                    .get("on_switch")
                    .map_or_else(Runs::default, |&(_, runs)| runs);
                eprintln!(
                    "bench: target {} round {round}: {}: loopbpf {:.2}% of a core; on_switch {} \
                     runs, {:.1} ms; the target's switches {}",
                    case.title(),
                    builds[b].label,
                    percent(measured.loopbpf_cpu_ns, measured.window),
                    switch.count,
                    switch.ns as f64 / 1e6,
                    measured.target_switches
                );
                results[b].push(measured);
            }
        }
        print_case(case, &builds, &results, rounds, window, load.trim());
        println!(
            "\nload average at the end: {}",
            std::fs::read_to_string("/proc/loadavg")?.trim()
        );
    }
    Ok(())
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse::<u64>())
        .transpose()
        .with_context(|| format!("{name}: a whole number"))
        .map(|v| v.unwrap_or(default))
}

/// A fresh target for `case`, ready to be watched (its JIT warmed up), and wrk's arguments
/// for an HTTP case.
fn start_target(case: Case) -> Result<(Killed, Option<String>)> {
    let script = match case {
        Case::Chain => "bench/iterations.js",
        Case::Http => "bench/http-server.js",
        Case::Gc => "bench/gc-loop.js",
    };
    let mut node = Command::new("node")
        .arg(workspace().join(script))
        .stdout(if case == Case::Chain {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stderr(Stdio::null())
        .spawn()
        .context("starting node")?;
    let stdout = node.stdout.take();
    let node = Killed(node);
    let mut url = None;
    if let Some(stdout) = stdout {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().context("the target did not start")??;
        if case == Case::Http {
            let u = format!("http://127.0.0.1:{}/", first.trim());
            // Warm up the JIT before attaching.
            wrk(&u, "2s")?;
            url = Some(u);
        }
        // Drain the rest (the GC loop's line a second), so the target never blocks on it.
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    }
    if case != Case::Http {
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok((node, url))
}

/// One round: a fresh target, `build` attached with `--pid`, counters over `window`.
fn measure(case: Case, build: &Build, window: Duration) -> Result<Round> {
    let (node, url) = start_target(case)?;
    let target = node.0.id();
    let mut loopbpf = start_binary(
        &build.binary,
        &["--pid", &target.to_string(), "--json"],
        "watching pid",
        Stdio::piped(),
    )?;
    let blocks = Arc::new(AtomicUsize::new(0));
    let stdout = loopbpf.0.stdout.take().context("loopbpf's stdout")?;
    let seen = Arc::clone(&blocks);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("\"event\":\"block\"") {
                seen.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let watcher = loopbpf.0.id();
    let wrk_run = url.map(|url| {
        let duration = format!("{}s", (SETTLE + window).as_secs() + 1);
        std::thread::spawn(move || wrk(&url, &duration))
    });
    std::thread::sleep(SETTLE);
    let names = program_names();
    let before = Snapshot::take(target, watcher)?;
    std::thread::sleep(window);
    let after = Snapshot::take(target, watcher)?;
    let requests_per_s = match wrk_run {
        Some(run) => {
            let output = run
                .join()
                .map_err(|_| anyhow::anyhow!("the wrk thread panicked"))??;
            Some(
                output
                    .lines()
                    .find_map(|l| l.strip_prefix("Requests/sec:"))
                    .and_then(|v| v.trim().parse().ok())
                    .context("no Requests/sec in wrk's output")?,
            )
        }
        None => None,
    };
    drop(loopbpf);
    drop(node);
    let mut programs: BTreeMap<String, (bool, Runs)> = BTreeMap::new();
    for (id, end) in &after.programs {
        let start = before.programs.get(id).copied().unwrap_or_default();
        let (name, host_wide) = names
            .get(id)
            .map_or_else(|| (format!("program {id}"), false), Clone::clone);
        let entry = programs.entry(name).or_insert((host_wide, Runs::default()));
        entry.1.count += end.count.saturating_sub(start.count);
        entry.1.ns += end.ns.saturating_sub(start.ns);
    }
    let mut loopbpf_threads = BTreeMap::new();
    for (tid, (name, ns)) in &after.watcher_threads {
        let start = before.watcher_threads.get(tid).map_or(0, |t| t.1);
        *loopbpf_threads.entry(name.clone()).or_insert(0) += ns.saturating_sub(start);
    }
    Ok(Round {
        window: after.at - before.at,
        programs,
        target_cpu_ns: after.target_cpu_ns.saturating_sub(before.target_cpu_ns),
        target_switches: after.target_switches.saturating_sub(before.target_switches),
        loopbpf_cpu_ns: loopbpf_threads.values().sum(),
        loopbpf_threads,
        loopbpf_switches: after
            .watcher_switches
            .saturating_sub(before.watcher_switches),
        blocks: blocks.load(Ordering::Relaxed),
        requests_per_s,
    })
}

/// The counters read at one moment.
struct Snapshot {
    at: Instant,
    /// loopbpf's BPF programs by id.
    programs: BTreeMap<u32, Runs>,
    target_cpu_ns: u64,
    target_switches: u64,
    /// loopbpf's threads by tid: (name, CPU ns).
    watcher_threads: BTreeMap<u32, (String, u64)>,
    watcher_switches: u64,
}

impl Snapshot {
    fn take(target: u32, watcher: u32) -> Result<Self> {
        let at = Instant::now();
        let programs = bpf_programs(watcher)?;
        let target_threads = threads(target)?;
        let watcher_threads = threads(watcher)?;
        Ok(Self {
            at,
            programs,
            target_cpu_ns: target_threads.iter().map(|t| t.cpu_ns).sum(),
            target_switches: target_threads.iter().map(|t| t.switches).sum(),
            watcher_switches: watcher_threads.iter().map(|t| t.switches).sum(),
            watcher_threads: watcher_threads
                .into_iter()
                .map(|t| {
                    // The main thread is named after the binary, which differs between builds.
                    let name = if t.tid == watcher {
                        "main".into()
                    } else {
                        t.name
                    };
                    (t.tid, (name, t.cpu_ns))
                })
                .collect(),
        })
    }
}

/// The run counters of the BPF programs `pid` holds open, from `/proc/PID/fdinfo`.
fn bpf_programs(pid: u32) -> Result<BTreeMap<u32, Runs>> {
    let mut programs = BTreeMap::new();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing the fds of loopbpf (pid {pid})"))?;
    for fd in fds {
        let fd = fd?;
        // A fd closed since the listing is skipped.
        let Ok(link) = std::fs::read_link(fd.path()) else {
            continue;
        };
        if link.as_os_str() != "anon_inode:bpf-prog" {
            continue;
        }
        let Ok(info) =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().display()))
        else {
            continue;
        };
        let Some((id, runs)) = program_runs(&info) else {
            bail!(
                "no prog_id, run_cnt or run_time_ns in the fdinfo of a BPF program (Linux 5.1 or newer reports them)"
            );
        };
        programs.insert(id, runs);
    }
    if programs.is_empty() {
        bail!("loopbpf (pid {pid}) holds no BPF program");
    }
    Ok(programs)
}

/// A BPF program's id and run counters from its fdinfo text.
fn program_runs(fdinfo: &str) -> Option<(u32, Runs)> {
    let field = |name: &str| {
        fdinfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((
        u32::try_from(field("prog_id:")?).ok()?,
        Runs {
            count: field("run_cnt:")?,
            ns: field("run_time_ns:")?,
        },
    ))
}

/// Every loaded BPF program's name by id, and whether it is attached to a tracepoint (run in
/// every process's context), from `bpftool prog show`; empty if bpftool fails (programs are
/// then shown by id).
fn program_names() -> BTreeMap<u32, (String, bool)> {
    let Ok(output) = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
    else {
        eprintln!("bench: bpftool did not run: programs are shown by id");
        return BTreeMap::new();
    };
    let Ok(serde_json::Value::Array(programs)) = serde_json::from_slice(&output.stdout) else {
        return BTreeMap::new();
    };
    programs
        .iter()
        .filter_map(|p| {
            let id = p["id"].as_u64()? as u32;
            let name = p["name"].as_str()?.to_owned();
            let kind = p["type"].as_str().unwrap_or_default();
            Some((id, (name, kind.contains("tracepoint") || kind == "tracing")))
        })
        .collect()
}

struct Thread {
    tid: u32,
    name: String,
    cpu_ns: u64,
    switches: u64,
}

/// Each live thread of `pid`: its name, CPU time (`schedstat`, ns) and context switches
/// (voluntary and not).
fn threads(pid: u32) -> Result<Vec<Thread>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing the threads of pid {pid} (did it end?)"))?;
    let mut threads = Vec::new();
    for task in tasks {
        let task = task?;
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that ended since the listing is skipped.
        let (Ok(schedstat), Ok(status), Ok(name)) = (
            std::fs::read_to_string(task.path().join("schedstat")),
            std::fs::read_to_string(task.path().join("status")),
            std::fs::read_to_string(task.path().join("comm")),
        ) else {
            continue;
        };
        let cpu_ns = schedstat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .context("a thread's schedstat has no run time")?;
        let switches = status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum();
        threads.push(Thread {
            tid,
            name: name.trim().to_owned(),
            cpu_ns,
            switches,
        });
    }
    Ok(threads)
}

/// `ns` as a percentage of one core over `window`.
fn percent(ns: u64, window: Duration) -> f64 {
    ns as f64 / window.as_nanos().max(1) as f64 * 100.0
}

/// The case's tables: BPF programs (runs summed over the rounds), then loopbpf's own cost.
fn print_case(
    case: Case,
    builds: &[Build],
    results: &[Vec<Round>],
    rounds: u64,
    window: Duration,
    load: &str,
) {
    println!(
        "\n### {}: {rounds} rounds of {} s per build, builds alternating; load average at the start: {load}\n",
        case.title(),
        window.as_secs()
    );
    println!(
        "| program | build | runs | run time | per run | share of the target's CPU |\n|---|---|---|---|---|---|"
    );
    let names: std::collections::BTreeSet<(bool, &String)> = results
        .iter()
        .flatten()
        .flat_map(|r| r.programs.iter().map(|(name, (host, _))| (*host, name)))
        .collect();
    let total = |rounds: &[Round], pick: &dyn Fn(&Round) -> u64| rounds.iter().map(pick).sum();
    // Programs no build ran in the window (the discovery probes, gone by then) in one line.
    let idle: Vec<&str> = names
        .iter()
        .filter(|(_, name)| {
            sum_runs(results.iter().flatten(), |n, _| n == name.as_str()).count == 0
        })
        .map(|(_, name)| name.as_str())
        .collect();
    for host_wide in [false, true] {
        for (_, name) in names
            .iter()
            .filter(|(h, name)| *h == host_wide && !idle.contains(&name.as_str()))
        {
            for (build, rounds) in builds.iter().zip(results) {
                let runs = sum_runs(rounds, |n, _| n == *name);
                let target_cpu: u64 = total(rounds, &|r| r.target_cpu_ns);
                let share = if !host_wide {
                    format!("{:.3}%", runs.ns as f64 / target_cpu.max(1) as f64 * 100.0)
                } else if name.as_str() == "on_switch" {
                    // Run in the target's context about once per switch of its threads.
                    let switches: u64 = total(rounds, &|r| r.target_switches);
                    let per_run = runs.ns as f64 / runs.count.max(1) as f64;
                    format!(
                        "host-wide: {:.3}% of a core; the target's {} switches at that cost: ~{:.3}%",
                        percent(runs.ns, rounds.iter().map(|r| r.window).sum()),
                        thousands(switches),
                        per_run * switches as f64 / target_cpu.max(1) as f64 * 100.0
                    )
                } else {
                    format!(
                        "host-wide: {:.3}% of a core",
                        percent(runs.ns, rounds.iter().map(|r| r.window).sum())
                    )
                };
                print_program_row(name, build.label, runs, &share);
            }
        }
        if !host_wide {
            for (build, rounds) in builds.iter().zip(results) {
                let runs = sum_runs(rounds, |_, host| !host);
                let target_cpu: u64 = total(rounds, &|r| r.target_cpu_ns);
                let share = format!(
                    "**{:.3}%**",
                    runs.ns as f64 / target_cpu.max(1) as f64 * 100.0
                );
                print_program_row("**all run only in the target**", build.label, runs, &share);
            }
        }
    }
    for (build, rounds) in builds.iter().zip(results) {
        // What the target pays in all: its own programs, and on_switch for its own switches.
        let own = sum_runs(rounds, |_, host| !host);
        let switch = sum_runs(rounds, |name, host| host && name == "on_switch");
        let switches: u64 = total(rounds, &|r| r.target_switches);
        let estimate = switch.ns as f64 / switch.count.max(1) as f64 * switches as f64;
        let target_cpu: u64 = total(rounds, &|r| r.target_cpu_ns);
        println!(
            "| **in the target's context: all of its own, and on_switch's estimate** | {} | | ~{:.1} ms | | **~{:.3}%** |",
            build.label,
            (own.ns as f64 + estimate) / 1e6,
            (own.ns as f64 + estimate) / target_cpu.max(1) as f64 * 100.0
        );
    }
    if !idle.is_empty() {
        println!("\nNot run in the window by any build: {}.", idle.join(", "));
    }
    print_agent(case, builds, results);
}

/// loopbpf's own cost per build, and what the target did.
fn print_agent(case: Case, builds: &[Build], results: &[Vec<Round>]) {
    let total = |rounds: &[Round], pick: &dyn Fn(&Round) -> u64| rounds.iter().map(pick).sum();
    let rps = if case == Case::Http { " req/s |" } else { "" };
    println!(
        "\n| build | target CPU (% of a core) | loopbpf CPU (% of a core; each round) | loopbpf CPU by thread | loopbpf context switches/s | blocks reported |{rps}"
    );
    println!(
        "|---|---|---|---|---|---|{}",
        if case == Case::Http { "---|" } else { "" }
    );
    for (build, rounds) in builds.iter().zip(results) {
        let span: Duration = rounds.iter().map(|r| r.window).sum();
        let each: Vec<String> = rounds
            .iter()
            .map(|r| format!("{:.2}", percent(r.loopbpf_cpu_ns, r.window)))
            .collect();
        let mut by_thread: BTreeMap<&str, u64> = BTreeMap::new();
        for r in rounds {
            for (name, ns) in &r.loopbpf_threads {
                *by_thread.entry(name).or_insert(0) += ns;
            }
        }
        let by_thread: Vec<String> = by_thread
            .iter()
            .filter(|(_, ns)| **ns > 0)
            .map(|(name, ns)| {
                format!(
                    "{name} {:.1} ms/10 s",
                    *ns as f64 / 1e6 / span.as_secs_f64() * 10.0
                )
            })
            .collect();
        let rps = if case == Case::Http {
            let each: Vec<String> = rounds
                .iter()
                .filter_map(|r| r.requests_per_s)
                .map(|v| format!("{v:.0}"))
                .collect();
            format!(" {} |", each.join(", "))
        } else {
            String::new()
        };
        println!(
            "| {} | {:.1}% | **{:.2}%** ({}) | {} | {:.0} | {} |{rps}",
            build.label,
            percent(total(rounds, &|r| r.target_cpu_ns), span),
            percent(total(rounds, &|r| r.loopbpf_cpu_ns), span),
            each.join(", "),
            by_thread.join(", "),
            total(rounds, &|r| r.loopbpf_switches) as f64 / span.as_secs_f64().max(1e-9),
            rounds.iter().map(|r| r.blocks).sum::<usize>(),
        );
    }
    // The chain and the GC loop never wait: short of a core, they were kept off the CPU.
    let starved = case != Case::Http
        && results
            .iter()
            .flatten()
            .any(|r| percent(r.target_cpu_ns, r.window) < 80.0);
    if starved {
        println!(
            "\nNote: the target, busy all the time, got under 80% of a core in some rounds: the machine was busy. Shares of its CPU still hold; blocks reported are iterations it spent waiting for a CPU."
        );
    }
}

/// The programs' runs matching `keep(name, host_wide)`, summed over `rounds`.
fn sum_runs<'a>(
    rounds: impl IntoIterator<Item = &'a Round>,
    keep: impl Fn(&str, bool) -> bool,
) -> Runs {
    let mut sum = Runs::default();
    for (name, (host, runs)) in rounds.into_iter().flat_map(|r| &r.programs) {
        if keep(name, *host) {
            sum.count += runs.count;
            sum.ns += runs.ns;
        }
    }
    sum
}

fn print_program_row(name: &str, build: &str, runs: Runs, share: &str) {
    println!(
        "| {name} | {build} | {} | {:.1} ms | {:.2} µs | {share} |",
        thousands(runs.count),
        runs.ns as f64 / 1e6,
        runs.ns as f64 / 1e3 / runs.count.max(1) as f64
    );
}

/// 1234567 -> "1,234,567".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The kernel's BPF run-time statistics on for as long as this lives: the sysctl set to 1
/// (its old value written back on drop, on error too), and a `BPF_ENABLE_STATS` fd held, which
/// keeps them on even if someone else on the host sets the sysctl back to 0 meanwhile.
struct BpfStats {
    old: String,
    _fd: Option<OwnedFd>,
}

impl BpfStats {
    fn enable() -> Result<Self> {
        let old = std::fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("reading {STATS_SYSCTL}"))?;
        std::fs::write(STATS_SYSCTL, "1")
            .with_context(|| format!("enabling BPF statistics in {STATS_SYSCTL} (run as root)"))?;
        let fd = enable_stats_fd();
        if fd.is_none() {
            eprintln!(
                "bench: BPF_ENABLE_STATS failed: the statistics depend on the sysctl alone (another user setting it to 0 would stop them)"
            );
        }
        Ok(Self {
            old: old.trim().to_owned(),
            _fd: fd,
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(error) = std::fs::write(STATS_SYSCTL, &self.old) {
            eprintln!(
                "bench: could not restore {STATS_SYSCTL} to {}: {error}",
                self.old
            );
        }
    }
}

/// `bpf(BPF_ENABLE_STATS, {type: BPF_STATS_RUN_TIME})`: statistics on while the fd is open.
fn enable_stats_fd() -> Option<OwnedFd> {
    #[cfg(target_arch = "x86_64")]
    const SYS_BPF: i64 = 321;
    #[cfg(target_arch = "aarch64")]
    const SYS_BPF: i64 = 280;
    const BPF_ENABLE_STATS: i64 = 32;
    unsafe extern "C" {
        fn syscall(number: i64, ...) -> i64;
    }
    // union bpf_attr's enable_stats member: { __u32 type; }, BPF_STATS_RUN_TIME = 0.
    let attr: u32 = 0;
    // SAFETY: the kernel reads 4 bytes of `attr`, which lives across the call; the fd it
    // returns is new and owned by nobody else.
    let fd = unsafe {
        syscall(
            SYS_BPF,
            BPF_ENABLE_STATS,
            std::ptr::from_ref(&attr),
            4_i64, // size_of::<u32>()
        )
    };
    // SAFETY: a non-negative result is a new fd that this process owns alone.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_programs_counters_from_its_fdinfo() {
        // As Linux 6.x writes it for a loopbpf program.
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1039\nprog_type:\t5\nprog_jited:\t1\nprog_tag:\t4490e0fe4fb16215\nmemlock:\t4096\nprog_id:\t37158\nrun_time_ns:\t19958\nrun_cnt:\t92\nrecursion_misses:\t0\nverified_insns:\t104\n";
        let (id, runs) = program_runs(fdinfo).unwrap();
        assert_eq!((id, runs.count, runs.ns), (37158, 92, 19958));
        // Statistics a kernel before 5.1 does not report: no counters, not zeros.
        assert!(program_runs("prog_type:\t5\nprog_id:\t7\n").is_none());
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(340_742), "340,742");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
