//! The command line: what to watch, for how long, and how to report it.

use std::{
    ffi::OsString,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{ArgGroup, Parser, Subcommand};

const EXAMPLES: &str = "\
EXAMPLES:
    sudo loopbpf --pid 1234                  blocked intervals of process 1234 (>= 100ms) until Ctrl-C
    sudo loopbpf --pid 1234 --threshold 20ms report busy intervals of 20 ms and more
    sudo loopbpf --pid 1234 --interval 1s    also one line per loop thread per second: ELU, iterations
    sudo loopbpf --pid 1234 --duration 30s --json > blocks.jsonl
    sudo loopbpf --pid 1234 --duration 1m --flamegraph blocked.svg   what ran while the loop was blocked
    sudo loopbpf -- node app.js              run app.js and profile it from its first loop iteration
    sudo loopbpf --pid 1234 --otlp http://localhost:4318   each block as an OpenTelemetry span
    sudo loopbpf --all --metrics 9464        every Node process on the host; Prometheus metrics on
                                             http://127.0.0.1:9464/metrics (0.0.0.0:9464 for all)
    sudo loopbpf record --pid 1234 --duration 60s --out incident/   an evidence bundle (see
                                             `loopbpf record --help`)";

const RECORD_EXAMPLES: &str = "\
EXAMPLES:
    sudo loopbpf record --pid 1234 --duration 60s --out incident/
        a minute of evidence: report.txt, report.json, flamegraph.svg, timeline.svg, index.html
    sudo loopbpf record --pid 1234 --out hang/ --stop-after-blocks 1
        a process that is hung right now: the bundle holds the ongoing block within seconds
    sudo loopbpf record --pid 1234 --out dump/ --on-block core --on-block-min 2s
        a core dump (gdb's gcore) while the loop has been stuck for 2 s: the culprit is on the stack
    sudo loopbpf record --pid 1234 --out heap/ --on-block signal:SIGUSR2
        a heap snapshot from an app started with node --heapsnapshot-signal=SIGUSR2
    sudo loopbpf record --all --out fleet/ --on-block 'exec:logger blocked $LOOPBPF_PID'";

/// Finds when and why a Node.js (libuv) event loop was blocked, from outside the process.
///
/// A loop thread is busy from the return of its poll wait to the next poll; a busy interval of
/// at least the threshold is a block. loopbpf prints each block as it ends, a loop that is stuck
/// right now as "ongoing" every second, and a summary per loop thread at the end.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "loopbpf",
    version,
    after_long_help = EXAMPLES,
    after_help = "See --help for examples.",
    // `loopbpf --pid 1 record ...` would leave it unclear whose --pid counts.
    args_conflicts_with_subcommands = true,
    disable_help_subcommand = true,
    // Not COMMAND: that is the command after `--`.
    subcommand_value_name = "SUBCOMMAND",
    subcommand_help_heading = "Subcommands"
)]
pub struct Args {
    /// `record`, or none: a session that reports on the terminal.
    #[command(subcommand)]
    pub mode: Option<Mode>,

    /// What to watch and how: the options `record` takes too.
    #[command(flatten)]
    pub session: SessionArgs,

    /// Serve Prometheus metrics on `http://ADDR/metrics` (a bare port binds 127.0.0.1).
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub metrics: Option<SocketAddr>,

    /// With --all: how long an exited process's summary line and metric series are kept.
    #[arg(long, value_name = "DUR", default_value = "1m", value_parser = parse_duration)]
    pub keep_exited: Duration,

    /// Print one line per loop thread every DUR: ELU, iterations, busiest interval.
    #[arg(short, long, value_name = "DUR", value_parser = parse_interval)]
    pub interval: Option<Duration>,

    /// JSON lines on stdout instead of text (the launched command's stdout goes to stderr).
    #[arg(long)]
    pub json: bool,

    /// Write the folded stacks of all blocked time to FILE at the end.
    #[arg(long, value_name = "FILE", conflicts_with = "no_stacks")]
    pub folded: Option<PathBuf>,

    /// Write a flame graph (SVG) of all blocked time to FILE at the end.
    #[arg(long, value_name = "FILE", conflicts_with = "no_stacks")]
    pub flamegraph: Option<PathBuf>,

    /// Run the launched command as USER (a name or a uid), with that user's groups. Under sudo
    /// it runs as the invoking user (`SUDO_UID`, `SUDO_GID`) unless this says otherwise.
    #[arg(long, value_name = "USER", requires = "command")]
    pub user: Option<String>,

    /// Command to launch and profile from its first loop iteration (after `--`).
    #[arg(last = true, value_name = "COMMAND", conflicts_with_all = ["pid", "all"])]
    pub command: Vec<OsString>,
}

impl Args {
    /// The options the session runs with, and `record`'s own when that is the command.
    ///
    /// Under `record` the top level's options are all at their defaults (clap takes none of
    /// them with a subcommand), which is what a recording wants; its session options are
    /// record's.
    pub fn resolve(&self) -> (Args, Option<&RecordArgs>) {
        match &self.mode {
            None => (self.clone(), None),
            Some(Mode::Record(record)) => {
                let args = Args {
                    mode: None,
                    session: record.session.clone(),
                    ..self.clone()
                };
                (args, Some(record))
            }
        }
    }
}

/// The subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Mode {
    Record(RecordArgs),
}

/// The options of every session, with or without `record`: declared once, flattened into both.
#[expect(clippy::struct_excessive_bools, reason = "each is a command-line flag")]
#[derive(Debug, Clone, clap::Args)]
pub struct SessionArgs {
    /// Process to attach to (a running Node.js or other libuv program).
    #[arg(short, long, value_parser = parse_pid)]
    pub pid: Option<u32>,

    /// Watch every libuv process on the host, those in containers and those started later.
    #[arg(short, long, conflicts_with = "pid")]
    pub all: bool,

    /// Report busy intervals at or over this duration (e.g. 50ms, 1.5s; a bare number is ms).
    #[arg(short, long, value_name = "DUR", default_value = "100ms", value_parser = parse_threshold)]
    pub threshold: Duration,

    /// Stop after this long (default: until Ctrl-C or the target exits).
    #[arg(short, long, value_name = "DUR", value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,

    /// Stack samples per second of a busy loop thread's CPU time (at most 1000, the rate the
    /// loop threads are sampled at; each stack is taken on the nearest whole number of samples).
    /// A busy interval younger than half the threshold gets half as many, each weighing double.
    #[arg(long, value_name = "HZ", default_value_t = 199, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    pub sample_rate: u64,

    /// Do not collect stacks (only durations, ELU and counts).
    #[arg(long)]
    pub no_stacks: bool,

    /// Keep the query string in the URL of the request a block ran for (dropped by default:
    /// queries carry secrets).
    #[arg(long)]
    pub request_query: bool,

    /// No notes, warnings or status lines on stderr (errors and lost events are still told).
    #[arg(short, long)]
    pub quiet: bool,

    /// Send each block as an OpenTelemetry span to this OTLP receiver (`http://HOST:PORT`;
    /// default protocol http/protobuf, `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` for gRPC). Without it,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` turns the export on.
    #[arg(long, value_name = "ENDPOINT")]
    pub otlp: Option<String>,

    /// The spans' `service.name` (default: `OTEL_SERVICE_NAME`, else each process's name).
    #[arg(long, value_name = "NAME")]
    pub service_name: Option<String>,
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

/// An evidence bundle of a recording, with actions taken while a loop is blocked.
///
/// Records the blocks of a process (or of every libuv process) into a directory that holds
/// everything: report.txt, report.json, flamegraph.svg (blocked time only), timeline.svg (each
/// loop thread's busy and idle time, every block marked) and index.html, which shows it all
/// from disk. The bundle is rewritten every few seconds while recording, and once more at the
/// end (`--duration`, `--stop-after-blocks`, Ctrl-C, or the target's exit).
#[derive(Debug, Clone, clap::Args)]
#[command(
    version,
    display_name = "loopbpf record",
    after_long_help = RECORD_EXAMPLES,
    after_help = "See --help for examples.",
    group(ArgGroup::new("target").args(["pid", "all"]).required(true))
)]
pub struct RecordArgs {
    #[command(flatten)]
    pub session: SessionArgs,

    /// Directory to write the bundle into (created; files in it are replaced).
    #[arg(short, long, value_name = "DIR")]
    pub out: PathBuf,

    /// Stop once this many blocks were seen (one still going on counts).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub stop_after_blocks: Option<u64>,

    /// While a loop is blocked: `core` (a core dump by gdb's gcore), `signal:SIG` (e.g.
    /// signal:SIGUSR2 for node --heapsnapshot-signal=SIGUSR2), or `exec:CMD` (run by sh with
    /// `LOOPBPF_PID`, `LOOPBPF_TID`, `LOOPBPF_THREAD`, `LOOPBPF_BLOCKED_MS`, `LOOPBPF_OUT` set).
    #[arg(long, value_name = "ACTION", value_parser = parse_action)]
    pub on_block: Option<BlockAction>,

    /// Take the action once a loop has been blocked this long (default: the threshold).
    #[arg(long, value_name = "DUR", value_parser = parse_threshold, requires = "on_block")]
    pub on_block_min: Option<Duration>,

    /// Take the action at most this many times.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_triggers: u32,
}

/// What `record` does while a loop is blocked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockAction {
    /// A core dump of the target, with gdb's `gcore`.
    Core,
    /// A signal to the target: its number and its name.
    Signal(i32, String),
    /// A shell command.
    Exec(String),
}

impl std::fmt::Display for BlockAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Core => f.write_str("core"),
            Self::Signal(_, name) => write!(f, "signal:{name}"),
            Self::Exec(command) => write!(f, "exec:{command}"),
        }
    }
}

fn parse_action(text: &str) -> Result<BlockAction, String> {
    const SIGNALS: [(&str, i32); 8] = [
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("TERM", libc::SIGTERM),
        ("ABRT", libc::SIGABRT),
        ("PROF", libc::SIGPROF),
    ];
    if text == "core" {
        return Ok(BlockAction::Core);
    }
    if let Some(signal) = text.strip_prefix("signal:") {
        let bare = signal.trim_start_matches("SIG");
        // Neither can be caught: they would end or freeze the target, not make it write evidence.
        if ["KILL", "STOP"]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(bare))
            || [libc::SIGKILL, libc::SIGSTOP]
                .iter()
                .any(|n| n.to_string() == signal)
        {
            return Err(format!(
                "signal:{signal} would kill or stop the target, not make it write evidence: use a signal it handles, e.g. signal:SIGUSR2, or `core` for a core dump"
            ));
        }
        let number = SIGNALS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(bare))
            .map(|&(_, n)| n)
            .or_else(|| signal.parse().ok().filter(|n| (1..=31).contains(n)));
        return number
            .map(|n| BlockAction::Signal(n, format!("SIG{}", bare.to_ascii_uppercase())))
            .ok_or_else(|| format!("unknown signal `{signal}`: write e.g. signal:SIGUSR2"));
    }
    if let Some(command) = text.strip_prefix("exec:") {
        if command.trim().is_empty() {
            return Err("exec: needs a command, e.g. exec:'logger blocked'".into());
        }
        return Ok(BlockAction::Exec(command.to_owned()));
    }
    Err(format!(
        "`{text}` is no action: write core, signal:SIGUSR2 or exec:COMMAND"
    ))
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
    fn block_actions() {
        assert_eq!(parse_action("core"), Ok(BlockAction::Core));
        assert_eq!(
            parse_action("signal:SIGUSR2"),
            Ok(BlockAction::Signal(libc::SIGUSR2, "SIGUSR2".into()))
        );
        assert_eq!(
            parse_action("signal:usr1"),
            Ok(BlockAction::Signal(libc::SIGUSR1, "SIGUSR1".into()))
        );
        assert_eq!(
            parse_action("exec:echo $LOOPBPF_PID"),
            Ok(BlockAction::Exec("echo $LOOPBPF_PID".into()))
        );
        assert!(parse_action("signal:NOPE").unwrap_err().contains("SIGUSR2"));
        for fatal in [
            "signal:KILL",
            "signal:SIGKILL",
            "signal:9",
            "signal:stop",
            "signal:19",
        ] {
            let error = parse_action(fatal).unwrap_err();
            assert!(
                error.contains("would kill or stop the target"),
                "{fatal}: {error}"
            );
        }
        assert!(parse_action("signal:40").is_err());
        assert!(parse_action("dump").unwrap_err().contains("core"));
        assert!(parse_action("exec:").is_err());
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("loopbpf").chain(argv.iter().copied()))
    }

    fn kind(argv: &[&str]) -> clap::error::ErrorKind {
        parse(argv).unwrap_err().kind()
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn without_a_subcommand_the_top_level_watches() {
        let args = parse(&["--pid", "42", "-t", "20ms", "--json", "-i", "1s"]).unwrap();
        assert!(args.mode.is_none());
        assert_eq!(args.session.pid, Some(42));
        assert_eq!(args.session.threshold, Duration::from_millis(20));
        assert!(args.json);
        assert_eq!(args.interval, Some(Duration::from_secs(1)));
        let (resolved, record) = args.resolve();
        assert!(record.is_none());
        assert_eq!(resolved.session.pid, Some(42));

        let args = parse(&["--all", "--metrics", "9464"]).unwrap();
        assert!(args.session.all);
        assert_eq!(args.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(args.keep_exited, Duration::from_mins(1));
        assert_eq!(args.session.sample_rate, 199);
    }

    #[test]
    fn record_takes_the_session_options_and_its_own() {
        let command_line = [
            "record",
            "--pid",
            "7",
            "--out",
            "dir",
            "-t",
            "50ms",
            "-d",
            "1m",
            "--sample-rate",
            "1000",
            "--stop-after-blocks",
            "2",
            "--on-block",
            "signal:USR2",
            "--on-block-min",
            "2s",
            "--max-triggers",
            "3",
        ];
        let args = parse(&command_line).unwrap();
        let (resolved, record) = args.resolve();
        let record = record.unwrap();
        assert_eq!(record.out, PathBuf::from("dir"));
        assert_eq!(record.stop_after_blocks, Some(2));
        assert_eq!(
            record.on_block,
            Some(BlockAction::Signal(libc::SIGUSR2, "SIGUSR2".into()))
        );
        assert_eq!(record.on_block_min, Some(Duration::from_secs(2)));
        assert_eq!(record.max_triggers, 3);
        // The session runs with record's options, and the top level's defaults for the rest.
        assert!(resolved.mode.is_none());
        assert_eq!(resolved.session.pid, Some(7));
        assert_eq!(resolved.session.threshold, Duration::from_millis(50));
        assert_eq!(resolved.session.duration, Some(Duration::from_mins(1)));
        assert_eq!(resolved.session.sample_rate, 1000);
        assert_eq!(resolved.keep_exited, Duration::from_mins(1));
        assert!(!resolved.json && resolved.metrics.is_none() && resolved.command.is_empty());

        let args = parse(&["record", "--all", "--out", "fleet", "--no-stacks"]).unwrap();
        let (resolved, record) = args.resolve();
        assert!(resolved.session.all && resolved.session.no_stacks);
        assert_eq!(record.unwrap().max_triggers, 1);
        assert_eq!(resolved.session.threshold, Duration::from_millis(100));
    }

    #[test]
    fn record_needs_a_target_and_a_directory() {
        use clap::error::ErrorKind::{ArgumentConflict, MissingRequiredArgument};
        assert_eq!(kind(&["record", "--out", "x"]), MissingRequiredArgument);
        assert!(
            parse(&["record", "--out", "x"])
                .unwrap_err()
                .to_string()
                .contains("--pid")
        );
        assert_eq!(kind(&["record", "--pid", "1"]), MissingRequiredArgument);
        let on_block_min = ["record", "--pid", "1", "--out", "x", "--on-block-min", "1s"];
        assert_eq!(kind(&on_block_min), MissingRequiredArgument);
        assert_eq!(
            kind(&["record", "--all", "--pid", "1", "--out", "x"]),
            ArgumentConflict
        );
    }

    #[test]
    fn record_takes_no_terminal_options_nor_a_command() {
        use clap::error::ErrorKind::UnknownArgument;
        let record = ["record", "--pid", "1", "--out", "x"];
        for extra in [
            &["--json"][..],
            &["--metrics", "9464"],
            &["-i", "1s"],
            &["--", "node"],
        ] {
            let argv: Vec<&str> = record.iter().chain(extra).copied().collect();
            assert_eq!(kind(&argv), UnknownArgument, "{argv:?}");
        }
        // Options before the subcommand would be ambiguous: whose --pid?
        assert_eq!(
            kind(&["--pid", "1", "record", "--out", "x"]),
            UnknownArgument
        );
    }

    #[test]
    fn bad_values_are_refused_by_the_parser() {
        use clap::error::ErrorKind::ValueValidation;
        for prefix in [&[][..], &["record", "--out", "x"]] {
            for bad in [
                &["--threshold", "0"][..],
                &["--threshold", "fast"],
                &["-t", "10xs"],
                &["--sample-rate", "0"],
                &["--sample-rate", "1001"],
                &["--duration", "0"],
                &["--pid", "0"],
                &["--pid", "me"],
            ] {
                let argv: Vec<&str> = prefix.iter().chain(bad).copied().collect();
                assert_eq!(kind(&argv), ValueValidation, "{argv:?}");
            }
        }
        let err = parse(&["--pid", "1", "--threshold", "fast"]).unwrap_err();
        assert!(err.to_string().contains("write e.g. 100ms"), "{err}");
        let err = parse(&["--pid", "1", "--sample-rate", "1001"]).unwrap_err();
        assert!(err.to_string().contains("1..=1000"), "{err}");
        assert_eq!(kind(&["--pid", "1", "-i", "10ms"]), ValueValidation);
        assert_eq!(
            kind(&["record", "--pid", "1", "--out", "x", "--max-triggers", "0"]),
            ValueValidation
        );
        assert_eq!(
            kind(&["record", "--pid", "1", "--out", "x", "--on-block", "dump"]),
            ValueValidation
        );
        assert_eq!(
            parse(&["--pid", "1", "-t", "1.5s"])
                .unwrap()
                .session
                .threshold,
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn quiet_is_a_session_option() {
        assert!(parse(&["--pid", "1", "-q"]).unwrap().session.quiet);
        assert!(!parse(&["--pid", "1"]).unwrap().session.quiet);
        let args = parse(&["record", "--pid", "1", "--out", "x", "--quiet"]).unwrap();
        assert!(args.resolve().0.session.quiet);
    }

    #[test]
    fn no_stacks_excludes_stack_files() {
        for file in ["--folded", "--flamegraph"] {
            assert_eq!(
                kind(&["--pid", "1", "--no-stacks", file, "f"]),
                clap::error::ErrorKind::ArgumentConflict
            );
        }
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
        assert_eq!(args.session.threshold, Duration::from_millis(100));
    }
}
