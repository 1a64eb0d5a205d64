//! The entry point of the outputs that print: [`Reporter`] writes each record as text for
//! people ([`super::text`]) or as a JSON line for scripts ([`super::json`]).

use std::{
    collections::HashMap,
    io::{self, Write},
};

use super::{Named, clock::Clock, json, safe_json, text::Text};
use crate::target::ProcessLabels;

/// Writes records in the chosen format.
pub struct Reporter<W: Write> {
    out: W,
    json: bool,
    clock: Clock,
    text: Text,
    /// Who each process is: JSON records carry it; fleet mode's text lines too.
    processes: HashMap<u32, ProcessLabels>,
}

impl<W: Write> Reporter<W> {
    pub fn new(out: W, json: bool, clock: Clock) -> Self {
        Self {
            out,
            json,
            clock,
            text: Text::new(clock, false),
            processes: HashMap::new(),
        }
    }

    /// Names the process in every text line (fleet mode).
    pub fn with_command_column(mut self) -> Self {
        self.text = Text::new(self.clock, true);
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

    /// Reports one record; `now_ns` stamps interval and leak lines.
    pub fn report(&mut self, named: Named<'_>, now_ns: u64) -> io::Result<()> {
        if self.json {
            let line = safe_json::to_string(&self.json_line(named, now_ns))?;
            writeln!(self.out, "{line}")?;
        } else {
            let text = self.text.record(named, now_ns, &self.processes);
            self.out.write_all(text.as_bytes())?;
        }
        self.out.flush()
    }

    /// A record as its JSON line, whatever the chosen format.
    pub fn json_line(&self, named: Named<'_>, now_ns: u64) -> json::Line {
        json::line(named, now_ns, self.clock, &self.processes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::{BlockEnd, LoopId, Record, ThreadLabel},
        naming::{
            frame::{Frame, FrameKind},
            stacks::{BlockProfile, NamedStack},
        },
    };

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
        let record = Record::Block {
            id: id(),
            start_ns: 5 * MS,
            duration_ns: 123_456_789,
            end: BlockEnd::Exit,
            before_attach: false,
            gc_ns: 0,
            cpu_wait_ns: 0,
        };
        let profile = profile();
        let named = Named {
            record: &record,
            profile: Some(&profile),
            naming_timed_out: false,
        };
        let line = reporter.json_line(named, 0);
        let v = serde_json::to_value(line).unwrap();
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
            cpu_wait_ns: 0,
        };
        let profile = profile();
        let named = Named {
            record: &record,
            profile: Some(&profile),
            naming_timed_out: false,
        };
        reporter.report(named, 0).unwrap();
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

    /// What a block of pid 42 (its comm `comm`) looks like when its JS frame is named `name`
    /// in script `file`: the text or the JSON line.
    fn hostile_block(json: bool, comm: &str, name: &str, file: &str) -> String {
        let mut reporter = Reporter::new(Vec::new(), json, Clock::new());
        if !json {
            reporter = reporter.with_command_column();
        }
        reporter.name_process(
            42,
            ProcessLabels {
                comm: comm.to_owned(),
                ..ProcessLabels::default()
            },
        );
        let record = Record::Block {
            id: id(),
            start_ns: 0,
            duration_ns: 200 * MS,
            end: BlockEnd::Poll,
            before_attach: false,
            gc_ns: 0,
            cpu_wait_ns: 0,
        };
        let mut profile = profile();
        profile.stacks[0].frames[1].name = name.into();
        profile.stacks[0].frames[1].file = Some(file.into());
        let named = Named {
            record: &record,
            profile: Some(&profile),
            naming_timed_out: false,
        };
        reporter.report(named, 0).unwrap();
        String::from_utf8(reporter.out).unwrap()
    }

    #[test]
    fn text_shows_hostile_names_escaped() {
        let text = hostile_block(
            false,
            "evil\x1b[31m<x>&\u{fffd}",
            "\x1b]0;pwned\x07\nloopbpf: forged",
            "/tmp/\x1b[2J/a.js",
        );
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert!(
            text.contains("42       evil\\x1b[31m<x>&\u{fffd}"),
            "{text}"
        );
        assert!(
            text.contains(r"\x1b]0;pwned\x07\nloopbpf: forged /tmp/\x1b[2J/a.js:12"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 5, "no line of a name's own: {text}");
    }

    #[test]
    fn json_lines_escape_what_a_terminal_acts_on() {
        // DEL, C1's CSI, bidi overrides and a noncharacter: JSON lets them through raw.
        const NAME: &str = "fib\u{9b}2J\u{202e}gpj.exe\u{7f}\u{2066}\u{fffe}\x1b";
        let line = hostile_block(true, NAME, NAME, &format!("/tmp/{NAME}.js"));
        assert_eq!(line.lines().count(), 1, "{line:?}");
        assert!(
            !line
                .chars()
                .any(|c| c != '\n' && crate::diag::unprintable(c)),
            "{line:?}"
        );
        let escaped = r"fib\u009b2J\u202egpj.exe\u007f\u2066\ufffe\u001b";
        assert!(line.contains(&format!(r#""comm":"{escaped}""#)), "{line}");
        assert!(line.contains(&format!(r#""name":"{escaped}""#)), "{line}");
        assert!(
            line.contains(&format!(r#""file":"/tmp/{escaped}.js""#)),
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["comm"], NAME);
        assert_eq!(v["stacks"][0]["frames"][1]["name"], NAME);
        assert_eq!(
            v["stacks"][0]["frames"][1]["file"],
            format!("/tmp/{NAME}.js")
        );
    }

    fn profile() -> BlockProfile {
        let frame = |name: &str, module: &str, kind, file: Option<&str>, line| Frame {
            name: name.into(),
            module: module.into(),
            file: file.map(Into::into),
            line,
            column: None,
            original: None,
            kind,
        };
        BlockProfile {
            request: None,
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
}
