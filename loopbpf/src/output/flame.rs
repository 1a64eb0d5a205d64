//! Blocked time as folded stacks (`--folded`) and as a flame graph (`--flamegraph`, inferno):
//! every block's stacks, weighted in microseconds, rooted at the loop thread they blocked.
//!
//! Frame names are the target's: inferno escapes markup (`<`, `&`, quotes) in the SVG, and
//! [`folded_name`] makes the rest safe (control characters, which XML 1.0 cannot carry even
//! escaped, and what the folded format gives a meaning).

use std::{collections::BTreeMap, fs::File, io::Write, path::Path};

use anyhow::{Context, Result};

use crate::{
    aggregate::LoopId,
    diag::printable,
    naming::{
        frame::{Frame, FrameKind},
        stacks::{BlockProfile, above_the_loop},
    },
};

/// Folded stacks of all blocked time: `root;caller;...;leaf` -> microseconds.
#[derive(Debug, Default, Clone)]
pub struct Flame {
    folded: BTreeMap<String, u64>,
}

impl Flame {
    /// Adds one block's stacks, under a root frame naming its process and loop thread.
    pub fn add(&mut self, id: &LoopId, profile: &BlockProfile) {
        for stack in &profile.stacks {
            let mut line = format!("pid {} {}", id.pid, id.label);
            if !stack.on_cpu {
                line.push_str(";[off-CPU]");
            }
            for frame in above_the_loop(&stack.frames).iter().rev() {
                line.push(';');
                line.push_str(&folded_name(frame));
            }
            let micros = stack.weight_ns / 1000;
            if micros > 0 {
                *self.folded.entry(line).or_insert(0) += micros;
            }
        }
    }

    pub fn lines(&self) -> impl Iterator<Item = String> + '_ {
        self.folded
            .iter()
            .map(|(stack, micros)| format!("{stack} {micros}"))
    }

    pub fn write_folded(&self, path: &Path) -> Result<()> {
        let mut file =
            File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        for line in self.lines() {
            writeln!(file, "{line}")?;
        }
        Ok(())
    }

    pub fn write_svg(&self, path: &Path, title: &str) -> Result<()> {
        let file =
            File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        self.write_svg_to(file, title)
    }

    pub fn write_svg_to(&self, file: impl Write, title: &str) -> Result<()> {
        let lines: Vec<String> = self.lines().collect();
        let mut options = inferno::flamegraph::Options::default();
        title.clone_into(&mut options.title);
        "us".clone_into(&mut options.count_name);
        if lines.is_empty() {
            // inferno refuses an empty profile; an empty graph still says what happened.
            let empty = ["no blocked time 1".to_owned()];
            return inferno::flamegraph::from_lines(
                &mut options,
                empty.iter().map(String::as_str),
                file,
            )
            .context("writing the flame graph");
        }
        inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), file)
            .context("writing the flame graph")
    }
}

/// A frame's name as a folded-stack component, whatever the target named it: printable (no
/// line end, nothing XML cannot carry), no `;` (which separates frames); kernel and JS frames
/// marked the way inferno colours them, and a native name not ending in a word of digits,
/// which inferno would take for a sample count when the frame is a leaf.
fn folded_name(frame: &Frame) -> String {
    let mut name = printable(&frame.name).replace(';', ":");
    match frame.kind {
        FrameKind::Kernel => format!("{name}_[k]"),
        FrameKind::Js => format!("{name}_[j]"),
        FrameKind::Native => {
            if let Some(space) = name.rfind(' ')
                && name[space + 1..]
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.')
            {
                name.replace_range(space..=space, "_");
            }
            name
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{aggregate::ThreadLabel, naming::stacks::NamedStack};

    fn frame(name: &str, kind: FrameKind) -> Frame {
        Frame {
            name: name.into(),
            module: "node".into(),
            file: None,
            line: None,
            column: None,
            original: None,
            kind,
        }
    }

    fn profile() -> BlockProfile {
        BlockProfile {
            request: None,
            on_cpu_ns: 300_000_000,
            off_cpu_ns: 0,
            stacks: vec![
                NamedStack {
                    weight_ns: 200_000_000,
                    on_cpu: true,
                    frames: vec![
                        frame("PBKDF2", FrameKind::Native),
                        frame("a;b", FrameKind::Js),
                        frame("uv_run", FrameKind::Native),
                        frame("main", FrameKind::Native),
                    ],
                },
                NamedStack {
                    weight_ns: 100_000_000,
                    on_cpu: false,
                    frames: vec![frame("schedule", FrameKind::Kernel)],
                },
            ],
        }
    }

    #[test]
    fn folded_lines_are_rooted_at_the_thread_and_skip_the_loop_plumbing() {
        let mut flame = Flame::default();
        let id = LoopId {
            pid: 7,
            tid: 7,
            label: ThreadLabel::Main,
        };
        flame.add(&id, &profile());
        flame.add(&id, &profile());
        let lines: Vec<String> = flame.lines().collect();
        assert_eq!(
            lines,
            [
                "pid 7 main;[off-CPU];schedule_[k] 200000",
                "pid 7 main;a:b_[j];PBKDF2 400000",
            ]
        );
    }

    #[test]
    fn hostile_names_keep_the_folded_format_and_the_svg_well_formed() {
        let hostile = NamedStack {
            weight_ns: 50_000_000,
            on_cpu: true,
            frames: vec![
                frame("leaf 12", FrameKind::Native),
                frame("\x1b[2J<b>&amp;\"';x\n5\u{fffe}\0 7", FrameKind::Js),
            ],
        };
        let mut flame = Flame::default();
        let id = LoopId {
            pid: 7,
            tid: 7,
            label: ThreadLabel::Main,
        };
        flame.add(
            &id,
            &BlockProfile {
                request: None,
                on_cpu_ns: 50_000_000,
                off_cpu_ns: 0,
                stacks: vec![hostile],
            },
        );
        let lines: Vec<String> = flame.lines().collect();
        assert_eq!(
            lines,
            [r#"pid 7 main;\x1b[2J<b>&amp:"':x\n5\u{fffe}\x00 7_[j];leaf_12 50000"#]
        );
        let mut svg = Vec::new();
        flame.write_svg_to(&mut svg, "blocked time").unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(
            !svg.chars().any(|c| c.is_control() && !"\n\t\r".contains(c)),
            "{svg}"
        );
        assert!(svg.contains(r"\x1b[2J&lt;b&gt;&amp;amp:"), "{svg}");
        // The whole stack's time is the leaf's: no count was read from its name.
        assert!(svg.contains("leaf_12 (50,000 us, 100.00%)"), "{svg}");
    }

    #[test]
    fn svg_names_the_blocking_function() {
        let mut flame = Flame::default();
        let id = LoopId {
            pid: 7,
            tid: 8,
            label: ThreadLabel::Worker(1),
        };
        flame.add(&id, &profile());
        let path = std::env::temp_dir().join(format!("loopbpf-flame-{}.svg", std::process::id()));
        flame.write_svg(&path, "blocked time").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<?xml"), "{}", &svg[..100]);
        assert!(svg.contains("PBKDF2") && svg.contains("pid 7 worker 1"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
