//! `cargo xtask bench churn` (issue 17): `--all` on a host of short-lived node processes
//! (`tests/fixtures/churn.js`): 15 alive at a time, each living 5 to 20 s, every third with a
//! worker, each blocking 60 ms about once a second (threshold 50 ms, so every block counts),
//! for `LOOPBPF_CHURN_MINUTES` (default 30). Each build (this one and, with
//! `LOOPBPF_BASE_BIN`, an older one) is attached to the same churn at once, so the machine's
//! load falls on both alike. Per build: CPU per new process (goal: under 20 ms), RSS at minute 5
//! (a sixth of a shorter run) and at the end and the growth between (goal: under 5 MB), the
//! main threads' blocks of the processes that ended by themselves against those reported, and
//! the events the kernel side dropped (from loopbpf's summary line, as it ends on SIGINT).

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::Value;

use super::{Killed, builds, cpu_ticks, rss_mb, start_binary};
use crate::workspace;

/// One build watching the churn.
struct Watcher {
    label: &'static str,
    loopbpf: Killed,
    out: PathBuf,
    cpu_start: u64,
    /// (seconds since the churn began, RSS in MB) every 10 s.
    rss: Vec<(u64, f64)>,
}

pub fn churn() -> Result<()> {
    let minutes: u64 = std::env::var("LOOPBPF_CHURN_MINUTES")
        .ok()
        .map(|m| m.parse())
        .transpose()
        .context("LOOPBPF_CHURN_MINUTES: a whole number of minutes")?
        .unwrap_or(30);
    println!(
        "load average at the start: {}",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    );
    let mut watchers = Vec::new();
    for build in builds() {
        // With this bench's pid: two benches on one host must not write each other's output.
        let out = std::env::temp_dir().join(format!(
            "loopbpf-churn-{}-{}.json",
            build.label,
            std::process::id()
        ));
        let loopbpf = start_binary(
            &build.binary,
            &["--all", "--json", "--threshold", "50ms"],
            "watching every libuv process",
            Stdio::from(std::fs::File::create(&out)?),
        )?;
        watchers.push(Watcher {
            label: build.label,
            cpu_start: cpu_ticks(loopbpf.0.id())?,
            loopbpf,
            out,
            rss: Vec::new(),
        });
    }
    let mut churn = Command::new("node")
        .arg(workspace().join("tests/fixtures/churn.js"))
        .args(["15", "60", &(minutes * 60).to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the churn")?;
    let started = Instant::now();
    while churn.try_wait()?.is_none() {
        std::thread::sleep(Duration::from_secs(10));
        for w in &mut watchers {
            w.rss
                .push((started.elapsed().as_secs(), rss_mb(w.loopbpf.0.id())?));
        }
    }
    let elapsed = started.elapsed();
    let mut cpu_ms = Vec::new();
    for w in &mut watchers {
        cpu_ms.push((cpu_ticks(w.loopbpf.0.id())? - w.cpu_start) * 10); // USER_HZ is 100
    }
    for w in &mut watchers {
        end_with_summary(&mut w.loopbpf)?;
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut churn.stdout.take().context("churn stdout")?, &mut text)?;
    let mut made = HashMap::new();
    let mut started_n = 0;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)?;
        if let Some(child) = v["pid"].as_u64() {
            made.insert(child, v["blocks"].as_u64().unwrap_or(0));
        } else {
            started_n = v["started"].as_u64().unwrap_or(0);
        }
    }
    // From minute 5 (a sixth of a shorter run) to the end.
    let settled = (minutes * 60 / 6).min(300);
    println!(
        "\nchurn, {minutes} min ({:.0} s): {started_n} processes started; {} ended by themselves, their main threads making {} blocks",
        elapsed.as_secs_f64(),
        made.len(),
        made.values().sum::<u64>()
    );
    println!(
        "| build | loopbpf CPU | per new process | RSS at {settled} s | at the end | growth from {settled} s to the end (peak after {settled} s) | blocks not reported | events dropped |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (w, cpu_ms) in watchers.iter().zip(cpu_ms) {
        print_row(w, cpu_ms, started_n, elapsed, settled, &made)?;
    }
    Ok(())
}

/// Ends loopbpf as Ctrl-C does, so that it writes its summary line, waiting up to 10 s.
fn end_with_summary(loopbpf: &mut Killed) -> Result<()> {
    let pid = loopbpf.0.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while loopbpf.0.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn print_row(
    w: &Watcher,
    cpu_ms: u64,
    started_n: u64,
    elapsed: Duration,
    settled: u64,
    made: &HashMap<u64, u64>,
) -> Result<()> {
    let mut reported: HashMap<u64, u64> = HashMap::new();
    let mut dropped = None;
    for line in std::fs::read_to_string(&w.out)?.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["event"] == "block" && v["thread"] == "main" {
            *reported.entry(v["pid"].as_u64().unwrap_or(0)).or_insert(0) += 1;
        } else if v["event"] == "summary" {
            dropped = v["dropped_events"].as_u64();
        }
    }
    let missing: u64 = made
        .iter()
        .map(|(child, n)| n.saturating_sub(*reported.get(child).unwrap_or(&0)))
        .sum();
    let at = |secs: u64| w.rss.iter().find(|(t, _)| *t >= secs).map_or(0.0, |r| r.1);
    let end = w.rss.last().map_or(0.0, |r| r.1);
    let peak_after = w
        .rss
        .iter()
        .filter(|(t, _)| *t >= settled)
        .map(|r| r.1)
        .fold(0.0, f64::max);
    println!(
        "| {} | {cpu_ms} ms ({:.1}% of a core) | {:.1} ms | {:.0} MB | {end:.0} MB | {:+.1} MB ({peak_after:.0} MB) | {missing} | {} |",
        w.label,
        cpu_ms as f64 / elapsed.as_secs_f64().max(1.0) / 10.0,
        cpu_ms as f64 / started_n.max(1) as f64,
        at(settled),
        end - at(settled),
        dropped.map_or_else(|| "no summary".into(), |d| d.to_string()),
    );
    Ok(())
}
