//! The command line: what to watch, for how long, and how to report it.

use std::{
    ffi::OsString,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::Parser;

const EXAMPLES: &str = "\
EXAMPLES:
    sudo loopbpf --pid 1234                  blocked intervals of process 1234 (>= 100ms) until Ctrl-C
    sudo loopbpf --pid 1234 --threshold 20ms report busy intervals of 20 ms and more
    sudo loopbpf --pid 1234 --interval 1s    also one line per loop thread per second: ELU, iterations
    sudo loopbpf --pid 1234 --duration 30s --json > blocks.jsonl
    sudo loopbpf --pid 1234 --duration 1m --flamegraph blocked.svg   what ran while the loop was blocked
    sudo loopbpf -- node app.js              run app.js and profile it from its first loop iteration
    sudo loopbpf --all --metrics 9464        every Node process on the host; Prometheus metrics on
                                             http://127.0.0.1:9464/metrics (0.0.0.0:9464 for all)";

/// Finds when and why a Node.js (libuv) event loop was blocked, from outside the process.
///
/// A loop thread is busy from the return of its poll wait to the next poll; a busy interval of
/// at least the threshold is a block. loopbpf prints each block as it ends, a loop that is stuck
/// right now as "ongoing" every second, and a summary per loop thread at the end.
#[derive(Debug, Parser)]
#[command(name = "loopbpf", version, after_long_help = EXAMPLES, after_help = "See --help for examples.")]
pub struct Args {
    /// Process to attach to (a running Node.js or other libuv program).
    #[arg(short, long, value_parser = parse_pid, conflicts_with = "command")]
    pub pid: Option<u32>,

    /// Watch every libuv process on the host, those in containers and those started later.
    #[arg(short, long, conflicts_with_all = ["pid", "command"])]
    pub all: bool,

    /// Serve Prometheus metrics on `http://ADDR/metrics` (a bare port binds 127.0.0.1).
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub metrics: Option<SocketAddr>,

    /// With --all: how long an exited process's summary line and metric series are kept.
    #[arg(long, value_name = "DUR", default_value = "1m", value_parser = parse_duration)]
    pub keep_exited: Duration,

    /// Report busy intervals at or over this duration (e.g. 50ms, 1.5s; a bare number is ms).
    #[arg(short, long, value_name = "DUR", default_value = "100ms", value_parser = parse_threshold)]
    pub threshold: Duration,

    /// Stop after this long (default: until Ctrl-C or the target exits).
    #[arg(short, long, value_name = "DUR", value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,

    /// Print one line per loop thread every DUR: ELU, iterations, busiest interval.
    #[arg(short, long, value_name = "DUR", value_parser = parse_interval)]
    pub interval: Option<Duration>,

    /// JSON lines on stdout instead of text (the launched command's stdout goes to stderr).
    #[arg(long)]
    pub json: bool,

    /// Stack samples per second of a busy loop thread's CPU time.
    #[arg(long, value_name = "HZ", default_value_t = 199, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub sample_rate: u64,

    /// Do not collect stacks (only durations, ELU and counts).
    #[arg(long, conflicts_with_all = ["folded", "flamegraph"])]
    pub no_stacks: bool,

    /// Write the folded stacks of all blocked time to FILE at the end.
    #[arg(long, value_name = "FILE")]
    pub folded: Option<PathBuf>,

    /// Write a flame graph (SVG) of all blocked time to FILE at the end.
    #[arg(long, value_name = "FILE")]
    pub flamegraph: Option<PathBuf>,

    /// Command to launch and profile from its first loop iteration (after `--`).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Parses `1.5s`, `250ms`, `100us`, `2m`, `1h`, or a bare number of milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: write e.g. 100ms, 1.5s or 2m"))?;
    let seconds_per_unit = match unit.trim() {
        "" | "ms" => 1e-3,
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`: use ns, us, ms, s, m or h"
            ));
        }
    };
    let seconds = value * seconds_per_unit;
    if !seconds.is_finite() || seconds > 1e9 {
        return Err(format!("`{text}` is too long"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

fn parse_threshold(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < Duration::from_millis(1) {
        return Err("must be at least 1ms".into());
    }
    Ok(d)
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < Duration::from_millis(100) {
        return Err("must be at least 100ms".into());
    }
    Ok(d)
}

fn parse_metrics_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    text.parse().map_err(|_| {
        format!("`{text}` is not an address: write a port (9464) or an address (0.0.0.0:9464)")
    })
}

fn parse_pid(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(0) | Err(_) => Err(format!("`{text}` is not a process id")),
        Ok(pid) => Ok(pid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_mins(2)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration(" 1h "), Ok(Duration::from_hours(1)));
    }

    #[test]
    fn bad_durations_say_what_to_write() {
        assert!(parse_duration("fast").unwrap_err().contains("100ms"));
        assert!(parse_duration("10xs").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_threshold("0").is_err());
        assert!(parse_interval("10ms").is_err());
    }

    #[test]
    fn a_bare_metrics_port_binds_loopback() {
        assert_eq!(
            parse_metrics_addr("9464"),
            Ok("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(
            parse_metrics_addr("0.0.0.0:9464"),
            Ok("0.0.0.0:9464".parse().unwrap())
        );
        assert_eq!(
            parse_metrics_addr("[::]:80"),
            Ok("[::]:80".parse().unwrap())
        );
        assert!(
            parse_metrics_addr("localhost")
                .unwrap_err()
                .contains("9464")
        );
    }

    #[test]
    fn all_excludes_pid_and_command() {
        for argv in [
            &["loopbpf", "--all", "--pid", "1"][..],
            &["loopbpf", "--all", "--", "node"],
        ] {
            let err = Args::try_parse_from(argv).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        }
    }

    #[test]
    fn pid_and_command_exclude_each_other() {
        let err = Args::try_parse_from(["loopbpf", "--pid", "1", "--", "node"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let args = Args::try_parse_from(["loopbpf", "--", "node", "app.js"]).unwrap();
        assert_eq!(args.command, ["node", "app.js"]);
        assert_eq!(args.threshold, Duration::from_millis(100));
    }
}
