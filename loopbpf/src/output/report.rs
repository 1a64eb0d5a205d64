//! Outputs: the only code that prints. Text for people (one line per event, a summary table)
//! or JSON lines for scripts, on stdout.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{self, Write},
};

use serde_json::{Value, json};

use super::clock::{Clock, human, ms};
use crate::{
    aggregate::{BlockEnd, LoopId, LoopSummary, Record, ThreadLabel, leak::Leak},
    naming::{
        frame::{Frame, FrameKind},
        stacks::{BlockProfile, above_the_loop},
    },
    target::ProcessLabels,
};

/// Writes records in the chosen format.
pub struct Reporter<W: Write> {
    out: W,
    json: bool,
    clock: Clock,
    header_done: bool,
    /// Who each process is: JSON records carry it; fleet mode's text lines too.
    processes: HashMap<u32, ProcessLabels>,
    /// Text lines name the process (fleet mode, where many are watched).
    command_column: bool,
}

impl<W: Write> Reporter<W> {
    pub fn new(out: W, json: bool, clock: Clock) -> Self {
        Self {
            out,
            json,
            clock,
            header_done: false,
            processes: HashMap::new(),
            command_column: false,
        }
    }

    /// Names the process in every text line (fleet mode).
    pub fn with_command_column(mut self) -> Self {
        self.command_column = true;
        self
    }

    pub fn name_process(&mut self, pid: u32, labels: ProcessLabels) {
        self.processes.insert(pid, labels);
    }

    /// What was written so far (a recording renders records into memory).
    pub fn out_mut(&mut self) -> &mut W {
        &mut self.out
    }

    pub fn forget_process(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// The column titles, before the first line.
    fn header(&self) -> String {
        let command = if self.command_column {
            "COMMAND         "
        } else {
            ""
        };
        format!("TIME          PID      {command}THREAD     EVENT     DURATION\n")
    }

    /// The PID column: `1234` or, with the command column, `1234     node`.
    fn who(&self, pid: u32) -> String {
        if !self.command_column {
            return format!("{pid:<8}");
        }
        let comm = self.processes.get(&pid).map_or("?", |p| p.comm.as_str());
        format!("{pid:<8} {comm:<15}")
    }

    fn json_id(&self, event: &str, id: &LoopId) -> Value {
        let mut v = json_id(event, id);
        if let Some(process) = self.processes.get(&id.pid) {
            v["comm"] = json!(process.comm);
            if !process.container.is_empty() {
                v["container"] = json!(process.container);
            }
            if !process.pod.is_empty() {
                v["pod"] = json!(process.pod);
            }
        }
        v
    }

    /// Reports one record; `now_ns` stamps interval lines.
    pub fn report(&mut self, record: &Record, now_ns: u64) -> io::Result<()> {
        if self.json {
            let line = self.json_record(record, now_ns);
            writeln!(self.out, "{line}")?;
        } else {
            let text = self.text_record(record, now_ns);
            self.out.write_all(text.as_bytes())?;
        }
        self.out.flush()
    }

    fn json_record(&self, record: &Record, now_ns: u64) -> Value {
        match record {
            Record::Block {
                id,
                start_ns,
                duration_ns,
                end,
                before_attach,
                gc_ns,
                profile,
                ..
            } => {
                let mut v = self.json_id("block", id);
                v["start_unix_ms"] = json!(self.clock.unix_ms(*start_ns));
                v["duration_ms"] = json!(ms(*duration_ns));
                v["gc_ms"] = json!(ms(*gc_ns));
                v["gc_share"] = json!(round4(*gc_ns as f64 / (*duration_ns).max(1) as f64));
                v["end"] = json!(end);
                v["started_before_attach"] = json!(before_attach);
                json_profile(&mut v, profile.as_ref());
                v
            }
            Record::Ongoing {
                id,
                start_ns,
                duration_ns,
                before_attach,
                gc_ns,
                profile,
                ..
            } => {
                let mut v = self.json_id("ongoing", id);
                v["start_unix_ms"] = json!(self.clock.unix_ms(*start_ns));
                v["duration_ms"] = json!(ms(*duration_ns));
                v["gc_ms"] = json!(ms(*gc_ns));
                v["gc_share"] = json!(round4(*gc_ns as f64 / (*duration_ns).max(1) as f64));
                v["started_before_attach"] = json!(before_attach);
                json_profile(&mut v, profile.as_ref());
                v
            }
            Record::Interval {
                id,
                elu,
                iterations,
                max_busy_ns,
            } => {
                let mut v = self.json_id("interval", id);
                v["unix_ms"] = json!(self.clock.unix_ms(now_ns));
                v["elu"] = json!(round4(*elu));
                v["iterations"] = json!(iterations);
                v["max_busy_ms"] = json!(ms(*max_busy_ns));
                v
            }
            Record::Leak { id, leak } => {
                let mut v = self.json_id("leak", id);
                v["unix_ms"] = json!(self.clock.unix_ms(now_ns));
                v["rss_bytes"] = json!(leak.rss_bytes);
                v["growth_bytes_per_min"] = json!(leak.growth_bytes_per_min.round());
                v["major_gcs"] = json!(leak.major_gcs);
                v
            }
            Record::Summary {
                loops,
                elapsed_ns,
                dropped_events,
            } => {
                let loops: Vec<Value> = loops
                    .iter()
                    .map(|l| {
                        let mut v = self.json_id("", &l.id);
                        v.as_object_mut().map(|o| o.remove("event"));
                        v["elu"] = json!(round4(l.elu));
                        v["iterations"] = json!(l.iterations);
                        v["blocks"] = json!(l.blocks);
                        v["max_busy_ms"] = json!(ms(l.max_busy_ns));
                        v["ongoing_ms"] = json!(l.ongoing_ns.map(ms));
                        v["exited"] = json!(l.exited);
                        v["busy_hist_us"] = histogram_json(&l.busy_hist);
                        v["gc"] = gc_json(l);
                        v
                    })
                    .collect();
                json!({
                    "event": "summary",
                    "duration_ms": ms(*elapsed_ns),
                    "dropped_events": dropped_events,
                    "loops": loops,
                })
            }
        }
    }

    fn text_record(&mut self, record: &Record, now_ns: u64) -> String {
        let mut text = String::new();
        if !self.header_done && !matches!(record, Record::Summary { .. }) {
            self.header_done = true;
            text = self.header();
        }
        let line = |at_ns: u64, id: &LoopId, event: &str, rest: &str| {
            format!(
                "{}  {} {:<10} {event:<9} {rest}\n",
                self.clock.time_of_day(at_ns),
                self.who(id.pid),
                id.label.to_string()
            )
        };
        match record {
            Record::Block {
                id,
                start_ns,
                duration_ns,
                end,
                before_attach,
                gc_ns,
                profile,
                ..
            } => {
                let suffix = match end {
                    BlockEnd::Poll => "",
                    BlockEnd::Exit => " until the thread exited",
                };
                let (prefix, note) = if *before_attach {
                    ("at least ", " (began before loopbpf attached)")
                } else {
                    ("", "")
                };
                text += &line(
                    *start_ns,
                    id,
                    "blocked",
                    &format!(
                        "{prefix}{}{}{suffix}{note}",
                        human(*duration_ns),
                        gc_share(*gc_ns, *duration_ns)
                    ),
                );
                text += &profile_text(profile.as_ref());
            }
            Record::Ongoing {
                id,
                start_ns,
                duration_ns,
                before_attach,
                gc_ns,
                profile,
                ..
            } => {
                let note = if *before_attach {
                    "still blocked; began before loopbpf attached"
                } else {
                    "still blocked"
                };
                text += &line(
                    *start_ns,
                    id,
                    "ongoing",
                    &format!(
                        "{} and counting{} ({note})",
                        human(*duration_ns),
                        gc_share(*gc_ns, *duration_ns)
                    ),
                );
                text += &profile_text(profile.as_ref());
            }
            Record::Interval {
                id,
                elu,
                iterations,
                max_busy_ns,
            } => {
                text += &line(
                    now_ns,
                    id,
                    "interval",
                    &format!(
                        "ELU {elu:.2}  iterations {iterations}  busiest {}",
                        human(*max_busy_ns)
                    ),
                );
            }
            Record::Leak { id, leak } => {
                text += &line(now_ns, id, "leak?", &leak_text(leak));
            }
            Record::Summary {
                loops,
                elapsed_ns,
                dropped_events,
            } => {
                text += &self.summary_text(loops, *elapsed_ns, *dropped_events);
            }
        }
        text
    }
}

/// Branches of a block's tree shown: down to this share of the block.
const MIN_STACK_SHARE: f64 = 0.05;

fn json_profile(v: &mut Value, profile: Option<&BlockProfile>) {
    let Some(profile) = profile else { return };
    v["on_cpu_ms"] = json!(ms(profile.on_cpu_ns));
    v["off_cpu_ms"] = json!(ms(profile.off_cpu_ns));
    v["stacks"] = profile
        .stacks
        .iter()
        .map(|s| json!({ "weight_ms": ms(s.weight_ns), "on_cpu": s.on_cpu, "frames": s.frames }))
        .collect();
}

/// What ran during a block as a short tree, callers first: from the first frame above the
/// loop down to the leaves that took the time. Branches under 5% of the block are left out, and
/// a long chain of frames with a single caller is shortened to its ends.
fn profile_text(profile: Option<&BlockProfile>) -> String {
    let Some(profile) = profile else {
        return String::new();
    };
    let total = profile.on_cpu_ns + profile.off_cpu_ns;
    let mut text = format!(
        "{:14}on-CPU {}, off-CPU {}\n",
        "",
        human(profile.on_cpu_ns),
        human(profile.off_cpu_ns)
    );
    if profile.stacks.is_empty() {
        let _ = writeln!(text, "{:14}(no stack samples)", "");
        return text;
    }
    let mut root = CallTree::default();
    for stack in &profile.stacks {
        let mut path: Vec<String> = above_the_loop(&stack.frames)
            .iter()
            .rev()
            .map(display_name)
            .collect();
        if !stack.on_cpu {
            path.push("(asleep)".to_owned());
        }
        root.insert(&path, stack.weight_ns);
    }
    let mut lines = Vec::new();
    root.render(total.max(1), 0, &mut lines);
    for line in lines.into_iter().take(MAX_TREE_LINES) {
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// Lines of a block's tree at most.
const MAX_TREE_LINES: usize = 16;
/// A chain of single callers longer than this shows its first and last frames only.
const MAX_CHAIN: usize = 4;

#[derive(Default)]
struct CallTree {
    weight_ns: u64,
    children: Vec<(String, CallTree)>,
}

impl CallTree {
    fn insert(&mut self, path: &[String], weight_ns: u64) {
        self.weight_ns += weight_ns;
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        let i = self
            .children
            .iter()
            .position(|(name, _)| name == first)
            .unwrap_or_else(|| {
                self.children.push((first.clone(), CallTree::default()));
                self.children.len() - 1
            });
        self.children[i].1.insert(rest, weight_ns);
    }

    fn significant(&self, total_ns: u64) -> Vec<&(String, CallTree)> {
        let mut children: Vec<_> = self
            .children
            .iter()
            .filter(|(_, c)| c.weight_ns as f64 >= total_ns as f64 * MIN_STACK_SHARE)
            .collect();
        children.sort_by_key(|(_, c)| std::cmp::Reverse(c.weight_ns));
        children
    }

    /// Appends this node's children: a chain of only children at one indentation, shortened
    /// when long; each branch point one level deeper.
    fn render(&self, total_ns: u64, depth: usize, lines: &mut Vec<String>) {
        for (name, child) in self.significant(total_ns) {
            let mut chain = vec![(name, child)];
            let mut end = child;
            loop {
                let next = end.significant(total_ns);
                match next.as_slice() {
                    [(n, c)] if c.weight_ns == end.weight_ns => {
                        chain.push((n, c));
                        end = c;
                    }
                    _ => break,
                }
            }
            let indent = "  ".repeat(depth.min(8));
            let share = 100.0 * child.weight_ns as f64 / total_ns as f64;
            let shown: Vec<_> = if chain.len() > MAX_CHAIN {
                let skipped = chain.len() - 3;
                let mut shown: Vec<String> = chain[..2].iter().map(|(n, _)| (*n).clone()).collect();
                shown.push(format!("... {skipped} frames ..."));
                shown.push(chain[chain.len() - 1].0.clone());
                shown
            } else {
                chain.iter().map(|(n, _)| (*n).clone()).collect()
            };
            for (i, frame) in shown.iter().enumerate() {
                if i == 0 {
                    lines.push(format!("{:14}{share:>5.1}%  {indent}{frame}", ""));
                } else {
                    lines.push(format!("{:14}{:>6}  {indent}{frame}", "", ""));
                }
            }
            end.render(total_ns, depth + 1, lines);
        }
    }
}

/// A frame for a terminal line: a C++ name without its parameter list, the module for native
/// code, the script location for JS.
fn display_name(frame: &Frame) -> String {
    let name = strip_parameters(&frame.name);
    if let Some(original) = &frame.original {
        return format!(
            "{name} {}:{}:{}",
            original.file, original.line, original.column
        );
    }
    match (frame.kind, &frame.file, frame.line) {
        (FrameKind::Js, Some(file), Some(line)) => match frame.column {
            Some(column) => format!("{name} {file}:{line}:{column}"),
            None => format!("{name} {file}:{line}"),
        },
        (FrameKind::Js, Some(file), None) => format!("{name} {file}"),
        (FrameKind::Js, _, _) => name.to_owned(),
        (FrameKind::Kernel, _, _) => format!("{name} [kernel]"),
        (FrameKind::Native, _, _) => format!("{name} ({})", frame.module),
    }
}

/// `void ns::f<int>(int, char const*) const` -> `ns::f<int>`.
fn strip_parameters(name: &str) -> &str {
    strip_return_type(strip_parameter_list(name))
}

/// `Result ns::f<true>` -> `ns::f<true>`: the last space outside brackets ends a return type.
fn strip_return_type(name: &str) -> &str {
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in name.char_indices() {
        match c {
            '<' | '(' => depth += 1,
            '>' | ')' => depth -= 1,
            ' ' if depth == 0 => start = i + 1,
            _ => {}
        }
    }
    &name[start..]
}

fn strip_parameter_list(name: &str) -> &str {
    let trimmed = name.strip_suffix(" const").unwrap_or(name);
    if !trimmed.ends_with(')') {
        return name;
    }
    let mut depth = 0;
    for (i, c) in trimmed.char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' => {
                depth -= 1;
                if depth == 0 {
                    return if i == 0 { name } else { &trimmed[..i] };
                }
            }
            _ => {}
        }
    }
    name
}

fn json_id(event: &str, id: &LoopId) -> Value {
    let mut v = json!({ "event": event, "pid": id.pid, "tid": id.tid, "thread": id.label.kind() });
    if let ThreadLabel::Worker(n) = id.label {
        v["worker"] = json!(n);
    }
    v
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// A loop thread's GC pauses by kind.
fn gc_json(l: &LoopSummary) -> Value {
    l.gc.iter()
        .map(|(kind, g)| {
            let stats = json!({
                "count": g.count,
                "total_ms": ms(g.total_ns),
                "max_ms": ms(g.max_ns),
                "hist_us": histogram_json(&g.hist),
            });
            (kind.label().to_owned(), stats)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn histogram_json(hist: &[u64]) -> Value {
    let buckets: Vec<Value> = hist
        .iter()
        .enumerate()
        .filter(|&(_, &count)| count > 0)
        .map(|(slot, &count)| json!({ "from": bucket_low(slot), "to": 1u64 << (slot + 1), "count": count }))
        .collect();
    Value::Array(buckets)
}

fn bucket_low(slot: usize) -> u64 {
    if slot == 0 { 0 } else { 1u64 << slot }
}

impl<W: Write> Reporter<W> {
    fn summary_text(&self, loops: &[LoopSummary], elapsed_ns: u64, dropped_events: u64) -> String {
        let mut text = format!(
            "\nSummary: {} watched, {} loop thread{}\n",
            human(elapsed_ns),
            loops.len(),
            if loops.len() == 1 { "" } else { "s" }
        );
        if loops.is_empty() {
            text.push_str("No libuv loop iteration was seen (is the process's loop running?)\n");
        } else {
            let command = if self.command_column {
                "COMMAND         "
            } else {
                ""
            };
            let _ = writeln!(
                text,
                "PID      {command}THREAD     ITERATIONS  BLOCKS  MAX BUSY     ELU"
            );
        }
        for l in loops {
            let note = match (l.ongoing_ns, l.exited) {
                (Some(ns), _) => format!("  still blocked for {}", human(ns)),
                (None, true) => "  (exited)".to_owned(),
                (None, false) => String::new(),
            };
            let _ = writeln!(
                text,
                "{} {:<10} {:>10}  {:>6}  {:>10}  {:>5.2}{note}",
                self.who(l.id.pid),
                l.id.label.to_string(),
                l.iterations,
                l.blocks,
                human(l.max_busy_ns),
                l.elu
            );
        }
        for l in loops.iter().filter(|l| l.iterations > 0) {
            let _ = writeln!(
                text,
                "\nBusy time per iteration, pid {} {}:",
                l.id.pid, l.id.label
            );
            text.push_str(&histogram_text(&l.busy_hist));
        }
        for l in loops.iter().filter(|l| !l.gc.is_empty()) {
            let _ = writeln!(text, "\nGC pauses, pid {} {}:", l.id.pid, l.id.label);
            for (kind, g) in &l.gc {
                let _ = writeln!(
                    text,
                    "  {:<12} {:>6} pauses  {:>10} in all  longest {}",
                    kind.label(),
                    g.count,
                    human(g.total_ns),
                    human(g.max_ns)
                );
            }
            for (kind, g) in &l.gc {
                let _ = writeln!(text, "{} pauses:", kind.label());
                text.push_str(&histogram_text(&g.hist));
            }
        }
        if dropped_events > 0 {
            let _ = writeln!(
                text,
                "\nwarning: {dropped_events} events were lost (ring buffer full); counts above may be low"
            );
        }
        text
    }
}

fn leak_text(leak: &Leak) -> String {
    format!(
        "memory after major GC grew {} times in a row, to {:.1} MB (+{:.1} MB/min)",
        leak.major_gcs,
        leak.rss_bytes as f64 / 1e6,
        leak.growth_bytes_per_min / 1e6
    )
}

/// `, GC 80.1 ms (65%)` when part of a block was garbage collection.
fn gc_share(gc_ns: u64, duration_ns: u64) -> String {
    if gc_ns == 0 || duration_ns == 0 {
        return String::new();
    }
    format!(
        ", GC {} ({:.0}%)",
        human(gc_ns),
        gc_ns as f64 * 100.0 / duration_ns as f64
    )
}

/// A log2 histogram like bcc's tools print it.
fn histogram_text(hist: &[u64]) -> String {
    let Some(first) = hist.iter().position(|&c| c > 0) else {
        return String::new();
    };
    let last = hist.iter().rposition(|&c| c > 0).unwrap_or(first);
    let max = hist[first..=last].iter().copied().max().unwrap_or(1).max(1);
    let mut text = String::from("           usecs            : count     distribution\n");
    for (slot, &count) in hist.iter().enumerate().take(last + 1).skip(first) {
        let stars = (count * 40).div_ceil(max) as usize;
        let _ = writeln!(
            text,
            "{:>12} -> {:<12}: {count:<9} |{:<40}|",
            bucket_low(slot),
            (1u64 << (slot + 1)) - 1,
            "*".repeat(stars.min(40))
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::stacks::{NamedStack, RawStacks};

    const MS: u64 = 1_000_000;

    fn id() -> LoopId {
        LoopId {
            pid: 42,
            tid: 43,
            label: ThreadLabel::Worker(1),
        }
    }

    #[test]
    fn json_block_has_the_documented_fields() {
        let reporter = Reporter::new(Vec::new(), true, Clock::new());
        let v = reporter.json_record(
            &Record::Block {
                id: id(),
                start_ns: 5 * MS,
                duration_ns: 123_456_789,
                end: BlockEnd::Exit,
                before_attach: false,
                gc_ns: 0,
                stacks: RawStacks::default(),
                profile: Some(profile()),
            },
            0,
        );
        assert_eq!(v["on_cpu_ms"], 100.0);
        assert_eq!(v["stacks"][0]["weight_ms"], 90.0);
        assert_eq!(v["stacks"][0]["on_cpu"], true);
        assert_eq!(v["stacks"][0]["frames"][0]["name"], "PKCS5_PBKDF2_HMAC");
        assert_eq!(v["stacks"][0]["frames"][0]["kind"], "native");
        assert_eq!(v["stacks"][0]["frames"][1]["kind"], "js");
        assert_eq!(v["stacks"][0]["frames"][1]["line"], 12);
        assert_eq!(v["event"], "block");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["tid"], 43);
        assert_eq!(v["thread"], "worker");
        assert_eq!(v["worker"], 1);
        assert_eq!(v["duration_ms"], 123.46);
        assert_eq!(v["end"], "exit");
        assert!(v["start_unix_ms"].as_f64().unwrap() > 1.6e12);
    }

    #[test]
    fn text_lines_name_thread_and_duration() {
        let mut reporter = Reporter::new(Vec::new(), false, Clock::new());
        let record = Record::Ongoing {
            id: id(),
            start_ns: 0,
            duration_ns: 4200 * MS,
            before_attach: true,
            gc_ns: 0,
            stacks: RawStacks::default(),
            profile: Some(profile()),
        };
        reporter.report(&record, 0).unwrap();
        let text = String::from_utf8(reporter.out).unwrap();
        assert!(text.starts_with("TIME"), "{text}");
        assert!(text.contains("worker 1"), "{text}");
        assert!(
            text.contains("4.20 s and counting (still blocked; began before loopbpf attached)"),
            "{text}"
        );
        assert!(text.contains("on-CPU 100.0 ms, off-CPU 0 us"), "{text}");
        // Callers first: the JS function, then what it called; the 2% stack is left out.
        let tree: Vec<&str> = text.lines().skip(3).collect();
        assert_eq!(
            tree,
            [
                "               90.0%  hashPassword /app/login.js:12",
                "                      PKCS5_PBKDF2_HMAC (libcrypto.so.3)",
            ],
            "{text}"
        );
        assert!(
            !text.contains("uv_run") && !text.contains("main (node)"),
            "plumbing folded: {text}"
        );
        assert!(
            !text.contains("tiny"),
            "stacks under 5% are not shown: {text}"
        );
    }

    fn profile() -> BlockProfile {
        let frame = |name: &str, module: &str, kind, file: Option<&str>, line| Frame {
            name: name.to_owned(),
            module: module.to_owned(),
            file: file.map(str::to_owned),
            line,
            column: None,
            original: None,
            kind,
        };
        BlockProfile {
            on_cpu_ns: 100 * MS,
            off_cpu_ns: 0,
            stacks: vec![
                NamedStack {
                    weight_ns: 90 * MS,
                    on_cpu: true,
                    frames: vec![
                        frame(
                            "PKCS5_PBKDF2_HMAC",
                            "libcrypto.so.3",
                            FrameKind::Native,
                            None,
                            None,
                        ),
                        frame(
                            "hashPassword",
                            "[JIT]",
                            FrameKind::Js,
                            Some("/app/login.js"),
                            Some(12),
                        ),
                        frame("uv_run", "node", FrameKind::Native, None, None),
                        frame("main", "node", FrameKind::Native, None, None),
                    ],
                },
                NamedStack {
                    weight_ns: 2 * MS,
                    on_cpu: true,
                    frames: vec![frame("tiny", "node", FrameKind::Native, None, None)],
                },
            ],
        }
    }

    #[test]
    fn cpp_parameter_lists_are_dropped_for_the_terminal() {
        assert_eq!(
            strip_parameters("node::crypto::Run(int, char const*) const"),
            "node::crypto::Run"
        );
        assert_eq!(
            strip_parameters("(anonymous namespace)::f()"),
            "(anonymous namespace)::f"
        );
        assert_eq!(strip_parameters("uv_run"), "uv_run");
        assert_eq!(strip_parameters("(weird)"), "(weird)");
        assert_eq!(
            strip_parameters(
                "v8::internal::JsonStringifier::Result v8::internal::JsonStringifier::Serialize_<true>(v8::internal::Handle<v8::internal::Object>, bool)"
            ),
            "v8::internal::JsonStringifier::Serialize_<true>"
        );
        assert_eq!(
            strip_parameters(
                "void node::(anonymous namespace)::Stream<node::Z>::Write<false>(v8::FunctionCallbackInfo<v8::Value> const&)"
            ),
            "node::(anonymous namespace)::Stream<node::Z>::Write<false>"
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(850_000), "850 us");
        assert_eq!(human(12_340_000), "12.3 ms");
        assert_eq!(human(1_520_000_000), "1.52 s");
    }

    #[test]
    fn histogram_spans_only_used_buckets() {
        let mut hist = [0u64; 32];
        hist[3] = 10;
        hist[5] = 5;
        let text = histogram_text(&hist);
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(text.contains("8 -> 15"), "{text}");
    }
}
