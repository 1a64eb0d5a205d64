//! What ran during a block as a short call tree for the terminal, callers first: from the first
//! frame above the loop down to the leaves that took the time. Branches under 5% of the block
//! are left out, a long chain of frames with a single caller is shortened to its ends, and C++
//! names lose their parameter lists and return types.

use crate::{
    diag::printable,
    naming::{
        frame::{Frame, FrameKind},
        stacks::{BlockProfile, above_the_loop},
    },
};

/// Branches of a block's tree shown: down to this share of the block.
const MIN_STACK_SHARE: f64 = 0.05;
/// Lines of a block's tree at most.
const MAX_TREE_LINES: usize = 16;
/// A chain of single callers longer than this shows its first and last frames only.
const MAX_CHAIN: usize = 4;

/// The tree of a block's stacks as lines, without line ends.
pub fn lines(profile: &BlockProfile) -> Vec<String> {
    let total = profile.on_cpu_ns + profile.off_cpu_ns;
    let mut root = CallTree::default();
    for stack in &profile.stacks {
        let mut path: Vec<String> = above_the_loop(&stack.frames)
            .iter()
            .rev()
            .map(|frame| printable(&display_name(frame)).into_owned())
            .collect();
        if !stack.on_cpu {
            path.push("(asleep)".to_owned());
        }
        root.insert(&path, stack.weight_ns);
    }
    let mut lines = Vec::new();
    root.render(total.max(1), 0, &mut lines);
    lines.truncate(MAX_TREE_LINES);
    lines
}

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
