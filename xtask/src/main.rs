//! Developer tasks, run as `cargo xtask <task>`:
//!
//! - `test`: the whole suite as CI runs it: formatting, clippy, unit tests, then the integration
//!   tests against real node processes (root: they load eBPF programs).
//! - `demo`: builds loopbpf and profiles the bundled example app for a few seconds.
//! - `bench`: what loopbpf costs the target and the host, measured side by side.

mod bench;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

fn main() {
    let task = std::env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "test" => test(),
        "demo" => demo(),
        "bench" => bench::bench(std::env::args().nth(2).as_deref()),
        _ => {
            eprintln!(
                "usage: cargo xtask test | demo | bench [overhead|accuracy|agent|fleet|target|churn]"
            );
            std::process::exit(2);
        }
    };
    if let Err(error) = result {
        eprintln!("xtask: error: {error:#}");
        std::process::exit(1);
    }
}

pub(crate) fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub(crate) fn run(program: &str, args: &[&str]) -> Result<()> {
    run_with_env(program, args, &[])
}

fn run_with_env(program: &str, args: &[&str], env: &[(&str, &Path)]) -> Result<()> {
    eprintln!("xtask: {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace())
        .status()
        .with_context(|| format!("could not run {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The integration tests load eBPF programs: root, and the tools their fixtures use.
fn check_test_host() -> Result<()> {
    if !is_root() {
        bail!("the test suite loads eBPF programs: run it as root (sudo -E cargo xtask test)");
    }
    let missing: Vec<&str> = ["clang-19", "node", "bpftool", "strip", "setpriv", "unshare"]
        .into_iter()
        .filter(|p| !have(p))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing {}: run ./scripts/install-deps.sh first",
            missing.join(", ")
        );
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn test() -> Result<()> {
    check_test_host()?;
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The integration tests run the release build, the one users run: timing checks (ongoing
    // every second) must not depend on an unoptimized symbolizer. tests/isolation.rs needs a
    // test hook (a slowed naming lane) that the binary users run does not carry: it gets a
    // build of its own, copied aside before the plain build replaces it.
    let hooks = workspace().join("target/loopbpf-test-hooks");
    run(
        "cargo",
        &[
            "build",
            "--release",
            "--package",
            "loopbpf",
            "--features",
            "test-hooks",
        ],
    )?;
    std::fs::copy(workspace().join("target/release/loopbpf"), &hooks)
        .context("keeping the test-hooks build aside")?;
    run("cargo", &["build", "--release", "--package", "loopbpf"])?;
    run("cargo", &["test", "--package", "loopbpf"])?;
    // One at a time: the tests compare durations measured on a 2-core machine, and parallel
    // spinning fixtures would take CPU from each other's loops.
    let binary = workspace().join("target/release/loopbpf");
    run_with_env(
        "cargo",
        &[
            "test",
            "--package",
            "loopbpf-tests",
            "--",
            "--test-threads=1",
        ],
        &[("LOOPBPF_BIN", &binary), ("LOOPBPF_HOOKS_BIN", &hooks)],
    )
}

fn demo() -> Result<()> {
    run("cargo", &["build", "--release", "--package", "loopbpf"])?;
    run(
        "./target/release/loopbpf",
        &[
            "--interval",
            "2s",
            "--duration",
            "9s",
            "--",
            "node",
            "examples/blocking-app.js",
        ],
    )
}
