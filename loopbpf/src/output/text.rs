//! The terminal's text: a column header, one line per event (with the call tree of a block
//! under it), and the summary table with its histograms at the end. What a target named (its
//! comm, its functions and scripts) is printed through [`printable`]: a name cannot move the
//! cursor, colour the terminal or start a line of its own.

use std::{collections::HashMap, fmt::Write as _};

use super::{
    Named,
    clock::{Clock, human},
    json::bucket_low,
    tree,
};
use crate::{
    aggregate::{
        BlockEnd, LoopId, LoopSummary, Record,
        leak::{Leak, LeakRule},
    },
    diag::printable,
    naming::{stacks::BlockProfile, v8::LimitsHit},
    target::ProcessLabels,
};

/// Renders records as text, the column header before the first.
pub struct Text {
    clock: Clock,
    header_done: bool,
    /// Lines name the process (fleet mode, where many are watched).
    command_column: bool,
}

impl Text {
    pub fn new(clock: Clock, command_column: bool) -> Self {
        Self {
            clock,
            header_done: false,
            command_column,
        }
    }

    /// The column titles, before the first line.
    fn header(&self) -> String {
        format!(
            "TIME          PID      {}THREAD     EVENT     DURATION\n",
            self.command_title()
        )
    }

    fn command_title(&self) -> &'static str {
        if self.command_column {
            "COMMAND         "
        } else {
            ""
        }
    }

    /// The PID column: `1234` or, with the command column, `1234     node`.
    fn who(&self, pid: u32, processes: &HashMap<u32, ProcessLabels>) -> String {
        if !self.command_column {
            return format!("{pid:<8}");
        }
        let comm = processes.get(&pid).map_or("?", |p| p.comm.as_str());
        format!("{pid:<8} {:<15}", printable(comm))
    }

    /// A record's lines; `now_ns` stamps interval and leak lines.
    #[expect(clippy::too_many_lines, reason = "one arm per kind of record")]
    pub fn record(
        &mut self,
        named: Named<'_>,
        now_ns: u64,
        processes: &HashMap<u32, ProcessLabels>,
    ) -> String {
        let record = named.record;
        let mut text = String::new();
        if !self.header_done && !matches!(record, Record::Summary { .. }) {
            self.header_done = true;
            text = self.header();
        }
        let line = |at_ns: u64, id: &LoopId, event: &str, rest: &str| {
            format!(
                "{}  {} {:<10} {event:<9} {rest}\n",
                self.clock.time_of_day(at_ns),
                self.who(id.pid, processes),
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
                cpu_wait_ns,
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
                        "{prefix}{}{}{}{suffix}{note}{}",
                        human(*duration_ns),
                        gc_share(*gc_ns, *duration_ns),
                        cpu_wait_share(*cpu_wait_ns, *duration_ns),
                        request_text(named.profile)
                    ),
                );
                text += &profile_text(named.profile, named.naming_timed_out);
            }
            Record::Ongoing {
                id,
                start_ns,
                duration_ns,
                before_attach,
                gc_ns,
                cpu_wait_ns,
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
                        "{} and counting{}{} ({note}){}",
                        human(*duration_ns),
                        gc_share(*gc_ns, *duration_ns),
                        cpu_wait_share(*cpu_wait_ns, *duration_ns),
                        request_text(named.profile)
                    ),
                );
                text += &profile_text(named.profile, named.naming_timed_out);
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
                naming_limits,
            } => {
                text += &self.summary(loops, *elapsed_ns, *dropped_events, processes);
                text += &naming_limits_text(naming_limits);
            }
        }
        text
    }

    fn summary(
        &self,
        loops: &[LoopSummary],
        elapsed_ns: u64,
        dropped_events: u64,
        processes: &HashMap<u32, ProcessLabels>,
    ) -> String {
        let mut text = format!(
            "\nSummary: {} watched, {} loop thread{}\n",
            human(elapsed_ns),
            loops.len(),
            if loops.len() == 1 { "" } else { "s" }
        );
        if loops.is_empty() {
            text.push_str("No libuv loop iteration was seen (is the process's loop running?)\n");
        } else {
            let _ = writeln!(
                text,
                "PID      {}THREAD     ITERATIONS  BLOCKS  MAX BUSY     ELU",
                self.command_title()
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
                self.who(l.id.pid, processes),
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

/// The request a block ran for, after its duration: `  GET /deps/check (route /deps/check)`,
/// with `, 2 other requests` when more were on its stacks.
fn request_text(profile: Option<&BlockProfile>) -> String {
    let Some(request) = profile.and_then(|p| p.request.as_ref()) else {
        return String::new();
    };
    let mut text = format!(
        "  {} {}",
        printable(&request.method),
        printable(&request.path)
    );
    let mut notes = Vec::new();
    if let Some(route) = &request.route {
        notes.push(format!("route {}", printable(route)));
    }
    match request.others {
        0 => {}
        1 => notes.push("1 other request".to_owned()),
        n => notes.push(format!("{n} other requests")),
    }
    if !notes.is_empty() {
        let _ = write!(text, " ({})", notes.join(", "));
    }
    text
}

/// A block's on- and off-CPU time, and what ran as a short tree (see [`tree`]).
fn profile_text(profile: Option<&BlockProfile>, naming_timed_out: bool) -> String {
    if naming_timed_out {
        return format!("{:14}(no stacks: naming them took too long)\n", "");
    }
    let Some(profile) = profile else {
        return String::new();
    };
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
    for line in tree::lines(profile) {
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// The warning, with the rule that fired (see [`crate::aggregate::leak`]).
fn leak_text(leak: &Leak) -> String {
    match leak.rule {
        LeakRule::AfterMajorGc => format!(
            "memory after major GC grew {} times in a row, to {} (+{:.1} MB/min)",
            leak.major_gcs,
            megabytes(leak.rss_bytes),
            leak.growth_bytes_per_min / 1e6
        ),
        LeakRule::Floor => format!(
            "resident memory rose {} in {:.0} s and never fell back, to {} (+{:.1} MB/min)",
            megabytes(leak.growth_bytes),
            leak.span_ns as f64 / 1e9,
            megabytes(leak.rss_bytes),
            leak.growth_bytes_per_min / 1e6
        ),
    }
}

/// `135.7 MB`, `1.25 GB`.
fn megabytes(bytes: u64) -> String {
    if bytes >= 1_000_000_000 {
        format!("{:.2} GB", bytes as f64 / 1e9)
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
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

/// `, waited 120.4 ms for a CPU (40%)` when the thread spent at least 1% of a block ready to run
/// but off the CPU: a host short of CPU, or a CPU limit's throttling. Less is the usual
/// preemption, left to the JSON.
fn cpu_wait_share(cpu_wait_ns: u64, duration_ns: u64) -> String {
    if duration_ns == 0 || cpu_wait_ns * 100 < duration_ns {
        return String::new();
    }
    format!(
        ", waited {} for a CPU ({:.0}%)",
        human(cpu_wait_ns),
        cpu_wait_ns as f64 * 100.0 / duration_ns as f64
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

/// The summary's lines on JS frames the naming limits left unnamed, one per process.
fn naming_limits_text(limits: &[(u32, LimitsHit)]) -> String {
    let mut text = String::new();
    for (pid, hit) in limits {
        if hit.budget_exceeded > 0 {
            let _ = writeln!(
                text,
                "warning: JS frames of pid {pid} left unnamed in {} samples: naming budget spent",
                hit.budget_exceeded
            );
        }
        if hit.frames_refused > 0 {
            let _ = writeln!(
                text,
                "warning: {} JS frames of pid {pid} left unnamed: too many distinct frames",
                hit.frames_refused
            );
        }
        if hit.cache_evictions > 0 {
            let _ = writeln!(
                text,
                "note: naming caches of pid {pid} were full {} times (read again as needed)",
                hit.cache_evictions
            );
        }
    }
    if !text.is_empty() {
        text.insert(0, '\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_tells_where_naming_limits_left_js_frames_unnamed() {
        let hit = LimitsHit {
            budget_exceeded: 12,
            frames_refused: 0,
            cache_evictions: 0,
        };
        assert_eq!(
            naming_limits_text(&[(7, hit)]),
            "\nwarning: JS frames of pid 7 left unnamed in 12 samples: naming budget spent\n"
        );
        assert_eq!(naming_limits_text(&[]), "");
    }

    #[test]
    fn a_leak_warning_says_which_rule_fired() {
        let leak = Leak {
            rss_bytes: 1_512_000_000,
            growth_bytes_per_min: 3_600_000_000.0,
            major_gcs: 1,
            rule: LeakRule::Floor,
            growth_bytes: 1_200_000_000,
            span_ns: 20_000_000_000,
        };
        assert_eq!(
            leak_text(&leak),
            "resident memory rose 1.20 GB in 20 s and never fell back, to 1.51 GB (+3600.0 MB/min)"
        );
        let leak = Leak {
            rule: LeakRule::AfterMajorGc,
            major_gcs: 5,
            rss_bytes: 135_700_000,
            ..leak
        };
        assert_eq!(
            leak_text(&leak),
            "memory after major GC grew 5 times in a row, to 135.7 MB (+3600.0 MB/min)"
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(850_000), "850 us");
        assert_eq!(human(12_340_000), "12.3 ms");
        assert_eq!(human(1_520_000_000), "1.52 s");
    }

    #[test]
    fn a_wait_for_a_cpu_is_told_from_one_percent_of_the_block() {
        assert_eq!(
            cpu_wait_share(120_400_000, 301_000_000),
            ", waited 120.4 ms for a CPU (40%)"
        );
        assert_eq!(
            cpu_wait_share(3_010_000, 301_000_000),
            ", waited 3.0 ms for a CPU (1%)"
        );
        assert_eq!(cpu_wait_share(3_000_000, 301_000_000), "");
        assert_eq!(cpu_wait_share(0, 0), "");
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
