//! What ran during a block as a short call tree for the terminal, callers first: from the first
//! frame above the loop down to the leaves that took the time. Branches under 5% of the block
//! are left out, a long chain of frames with a single caller is folded (see [`fold`]: the
//! application's own frames are never folded away), a function calling itself shows once with
//! its depth, and C++ names lose their parameter lists and return types.

use super::fold::{self, Piece, Rank};
use crate::{
    diag::printable,
    naming::{
        frame::{Frame, FrameKind},
        stacks::{BlockProfile, above_the_loop},
    },
};

/// Branches of a block's tree shown: down to this share of the block.
const MIN_STACK_SHARE: f64 = 0.05;
/// Lines of a block's tree at most, but for its heaviest path, which is shown whole (up to
/// [`MAX_HEAVIEST_LINES`]).
const MAX_TREE_LINES: usize = 16;
const MAX_HEAVIEST_LINES: usize = 120;
/// Lines for a chain of single callers, unless its app frames need more (see [`fold`]).
const MAX_CHAIN: usize = 4;

/// The tree of a block's stacks as lines, without line ends.
pub fn lines(profile: &BlockProfile) -> Vec<String> {
    let total = profile.on_cpu_ns + profile.off_cpu_ns;
    let mut root = CallTree::default();
    for stack in &profile.stacks {
        let mut path: Vec<(String, Rank)> = above_the_loop(&stack.frames)
            .iter()
            .rev()
            .map(|frame| {
                let rank = fold::rank(
                    frame.kind,
                    &frame.name,
                    frame.file.as_deref(),
                    frame.original.as_ref().map(|o| o.file.as_str()),
                );
                (printable(&display_name(frame)).into_owned(), rank)
            })
            .collect();
        if !stack.on_cpu {
            path.push(("(asleep)".to_owned(), Rank::Work));
        }
        root.insert(&path, stack.weight_ns);
    }
    let mut lines = Vec::new();
    let mut heaviest_path = None;
    root.render(total.max(1), 0, &mut lines, &mut heaviest_path);
    lines.truncate(MAX_TREE_LINES.max(heaviest_path.unwrap_or(0).min(MAX_HEAVIEST_LINES)));
    lines
}

struct CallTree {
    weight_ns: u64,
    rank: Rank,
    children: Vec<(String, CallTree)>,
}

impl Default for CallTree {
    fn default() -> Self {
        Self {
            weight_ns: 0,
            rank: Rank::Plumbing,
            children: Vec::new(),
        }
    }
}

impl CallTree {
    fn insert(&mut self, path: &[(String, Rank)], weight_ns: u64) {
        self.weight_ns += weight_ns;
        let Some(((first, rank), rest)) = path.split_first() else {
            return;
        };
        let i = self
            .children
            .iter()
            .position(|(name, _)| name == first)
            .unwrap_or_else(|| {
                let child = CallTree {
                    rank: *rank,
                    ..CallTree::default()
                };
                self.children.push((first.clone(), child));
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

    /// Appends this node's children: a chain of only children at one indentation, folded
    /// when long; each branch point one level deeper. `heaviest_path` is set to the line count
    /// once the first (heaviest) path reaches its leaf.
    fn render(
        &self,
        total_ns: u64,
        depth: usize,
        lines: &mut Vec<String>,
        heaviest_path: &mut Option<usize>,
    ) {
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
            // A function calling itself takes one line, with its depth.
            let mut groups: Vec<(&String, usize, Rank)> = Vec::new();
            for (n, c) in &chain {
                match groups.last_mut() {
                    Some((last, count, _)) if *last == *n => *count += 1,
                    _ => groups.push((n, 1, c.rank)),
                }
            }
            let ranks: Vec<Rank> = groups.iter().map(|(_, _, rank)| *rank).collect();
            let mut next = 0;
            let shown = fold::fold(&ranks, MAX_CHAIN)
                .into_iter()
                .map(|piece| match piece {
                    Piece::Frame(i) => {
                        next = i + 1;
                        match groups[i] {
                            (name, 1, _) => name.clone(),
                            (name, count, _) => format!("{name} ({count} deep, recursive)"),
                        }
                    }
                    Piece::Folded(n) => {
                        let frames: usize = groups[next..next + n].iter().map(|g| g.1).sum();
                        next += n;
                        format!("... {frames} frames ...")
                    }
                });
            for (i, frame) in shown.enumerate() {
                if i == 0 {
                    lines.push(format!("{:14}{share:>5.1}%  {indent}{frame}", ""));
                } else {
                    lines.push(format!("{:14}{:>6}  {indent}{frame}", "", ""));
                }
            }
            if heaviest_path.is_none() && end.significant(total_ns).is_empty() {
                *heaviest_path = Some(lines.len());
            }
            end.render(total_ns, depth + 1, lines, heaviest_path);
        }
    }
}

/// A frame for a terminal line (before [`printable`]): a C++ name without its parameter
/// list, the module for native code, the script location for JS.
fn display_name(frame: &Frame) -> String {
    // A JS name is shown whole: its spaces (`get size`) are no C++ return type.
    let name = match frame.kind {
        FrameKind::Native => strip_parameters(&frame.name),
        FrameKind::Js | FrameKind::Kernel => &frame.name,
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::stacks::NamedStack;

    fn js(name: &str, file: &str, line: u32) -> Frame {
        Frame::js(name, Some(file.into()), Some(line))
    }

    fn native(name: &str) -> Frame {
        Frame {
            name: name.into(),
            module: "node".into(),
            file: None,
            line: None,
            column: None,
            original: None,
            kind: FrameKind::Native,
        }
    }

    fn one_stack(frames: Vec<Frame>) -> BlockProfile {
        BlockProfile {
            on_cpu_ns: 100,
            off_cpu_ns: 0,
            stacks: vec![NamedStack {
                weight_ns: 100,
                on_cpu: true,
                frames,
            }],
            request: None,
        }
    }

    /// The frames of tree lines, without shares and indentation.
    fn frames_of(lines: &[String]) -> Vec<String> {
        lines.iter().map(|l| l[22..].trim().to_owned()).collect()
    }

    #[test]
    fn a_stack_deeper_than_the_budget_keeps_every_app_frame() {
        // Leaf first, as sampled: 30 frames of app code, a dependency and node's plumbing
        // between the loop and the leaf.
        let mut frames = vec![
            native("sha512_block_data_order_avx2"),
            native("SHA512_Final"),
        ];
        for i in 0..6 {
            frames.push(native(&format!("Builtins_Stub{i}")));
        }
        frames.push(js("spin", "/srv/app/report.js", 3));
        frames.push(js("blockFor", "/srv/app/report.js", 9));
        frames.push(js(
            "Layer.handle",
            "/srv/app/node_modules/express/lib/layer.js",
            95,
        ));
        for i in 0..5 {
            frames.push(js(&format!("internal{i}"), "node:internal/timers", 500 + i));
        }
        frames.push(js("parseHugeReportSynchronously", "/srv/app/report.js", 20));
        frames.push(js("listOnTimeout", "node:internal/timers", 581));
        frames.push(js("processTimers", "node:internal/timers", 519));
        for name in [
            "Builtins_JSEntry",
            "v8::internal::Execution::Call",
            "node::Environment::RunTimers",
            "uv__run_timers",
        ] {
            frames.push(native(name));
        }
        frames.push(native("uv_run"));
        frames.push(native("node::Start"));
        let lines = lines(&one_stack(frames));
        let shown = frames_of(&lines);
        for app in [
            "spin /srv/app/report.js:3",
            "blockFor /srv/app/report.js:9",
            "parseHugeReportSynchronously /srv/app/report.js:20",
        ] {
            assert!(
                shown.iter().any(|l| l == app),
                "{app} hidden in:\n{}",
                lines.join("\n")
            );
        }
        // The ends stay; the plumbing between them is folded, counted.
        assert_eq!(shown[0], "uv__run_timers (node)", "{lines:#?}");
        assert_eq!(
            shown[shown.len() - 1],
            "sha512_block_data_order_avx2 (node)"
        );
        let folded: usize = shown
            .iter()
            .filter_map(|l| {
                l.strip_prefix("... ")?
                    .strip_suffix(" frames ...")?
                    .parse::<usize>()
                    .ok()
            })
            .sum();
        assert_eq!(
            folded + shown.iter().filter(|l| !l.starts_with("... ")).count(),
            23
        );
        assert!(
            !shown.iter().any(|l| l.starts_with("internal")),
            "{lines:#?}"
        );
    }

    #[test]
    fn recursion_takes_one_line_and_the_heaviest_path_is_never_cut() {
        let mut frames = vec![native("leaf")];
        for _ in 0..40 {
            frames.push(js("walk", "/srv/app/tree.js", 4));
        }
        for i in 0..20 {
            frames.push(js(&format!("step{i}"), "/srv/app/steps.js", i + 1));
        }
        frames.push(native("uv_run"));
        let lines = lines(&one_stack(frames));
        let shown = frames_of(&lines);
        assert!(shown.contains(&"walk /srv/app/tree.js:4 (40 deep, recursive)".to_owned()));
        // 20 app frames, the recursion and the leaf: over the tree's 16 lines, all shown.
        assert_eq!(shown.len(), 22, "{lines:#?}");
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
}
