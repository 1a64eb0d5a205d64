//! index.html: the bundle on one static page that opens from disk: what was recorded, the
//! actions taken, the timeline, the flame graph of blocked time, every block with its heaviest
//! stacks, and the summary per loop thread. Rendered from the same [`Report`] as report.json,
//! so the two agree.
//!
//! The page is well-formed XML too (void elements closed, every text through [`escape`]), so
//! a strict parser reads it whatever names the targets gave their processes and functions.

use std::fmt::Write as _;

use super::timeline::escape;
use crate::{
    aggregate::BlockEnd,
    output::{
        fold::{self, Piece},
        json::{Block, BlockEvent, Frame, Report, Summary, Trigger},
    },
};

/// Stacks shown per block, and lines per stack (more when the app's own frames need them).
const STACKS_SHOWN: usize = 3;
const FRAMES_SHOWN: usize = 14;

pub fn render(report: &Report<'_>) -> String {
    let mut html = String::from(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"/><title>loopbpf recording</title>
<style>
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #ddd; }
.block { margin: 1em 0; padding: .5em 1em; border-left: 4px solid #d62728; background: #fafafa; }
.ongoing { border-left-color: #8b0000; }
pre { margin: .3em 0 .6em 0; font-size: 12px; }
img, object { max-width: 100%; border: 1px solid #ddd; }
</style></head><body>
"#,
    );
    let _ = writeln!(
        html,
        "<h1>loopbpf: {}</h1><p>Recorded from {} to {} (unix ms), loopbpf {}; blocks are busy intervals of {} ms and more.</p>",
        escape(report.recorded),
        number(report.started_unix_ms),
        number(report.ended_unix_ms),
        escape(report.loopbpf),
        number(report.threshold_ms),
    );
    let blocks = &report.blocks;
    let _ = writeln!(
        html,
        "<p><b>{} block{}</b>; files: <a href=\"report.txt\">report.txt</a>, <a href=\"report.json\">report.json</a>, <a href=\"flamegraph.svg\">flamegraph.svg</a>, <a href=\"timeline.svg\">timeline.svg</a>.</p>",
        blocks.len(),
        if blocks.len() == 1 { "" } else { "s" },
    );
    triggers(&mut html, &report.triggers);
    html.push_str("<h2>Timeline</h2>\n<img src=\"timeline.svg\" alt=\"busy time and blocks per loop thread\"/>\n");
    html.push_str("<h2>Blocked time</h2>\n<object data=\"flamegraph.svg\" type=\"image/svg+xml\" width=\"1200\">flamegraph.svg</object>\n");
    html.push_str("<h2>Blocks</h2>\n");
    if blocks.is_empty() {
        html.push_str("<p>No block was seen.</p>\n");
    }
    for block in blocks {
        block_html(&mut html, block);
    }
    if let Some(summary) = report.summary {
        summary_html(&mut html, summary);
    }
    html.push_str("</body></html>\n");
    html
}

fn triggers(html: &mut String, triggers: &[Trigger]) {
    if triggers.is_empty() {
        return;
    }
    html.push_str("<h2>Actions taken</h2>\n<table><tr><th>action</th><th>process</th><th>blocked for</th><th>outcome</th><th>file</th><th>size</th></tr>\n");
    for t in triggers {
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>pid {} {}</td><td>{} ms</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&t.action),
            t.pid,
            escape(t.thread),
            number(t.blocked_ms),
            escape(&t.outcome),
            escape(t.file.as_deref().unwrap_or("-")),
            t.size_bytes
                .map_or_else(|| "-".to_owned(), |b| format!("{b} bytes")),
        );
    }
    html.push_str("</table>\n");
}

fn block_html(html: &mut String, block: &Block) {
    let ongoing = block.event == BlockEvent::Ongoing;
    let _ = writeln!(
        html,
        "<div class=\"block{}\"><b>pid {} {}{}: {} {} ms</b>{} <small>(start {} unix ms)</small>",
        if ongoing { " ongoing" } else { "" },
        block.pid,
        escape(block.thread),
        block
            .comm
            .as_deref()
            .map(|c| format!(" ({})", escape(c)))
            .unwrap_or_default(),
        if ongoing {
            "still blocked after"
        } else {
            "blocked"
        },
        number(block.duration_ms),
        if block.end == Some(BlockEnd::Exit) {
            " until the thread exited"
        } else {
            ""
        },
        number(block.start_unix_ms),
    );
    if let Some(request) = &block.request {
        let mut notes = Vec::new();
        if let Some(route) = &request.route {
            notes.push(format!("route {}", escape(route)));
        }
        if let Some(trace) = &request.trace_id {
            notes.push(format!("trace {}", escape(trace)));
        }
        if request.others > 0 {
            notes.push(format!("{} other requests on its stacks", request.others));
        }
        let _ = writeln!(
            html,
            "<div>request <code>{} {}</code>{}</div>",
            escape(&request.method),
            escape(&request.path),
            if notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", notes.join(", "))
            }
        );
    }
    if let Some(stacks) = &block.stacks {
        let _ = writeln!(
            html,
            "<div>on-CPU {} ms ({} ms of it waiting for a CPU), off-CPU {} ms; heaviest stacks, \
             leaf first:</div>",
            block.on_cpu_ms.map_or_else(|| "-".to_owned(), number),
            number(block.cpu_wait_ms),
            block.off_cpu_ms.map_or_else(|| "-".to_owned(), number),
        );
        for stack in stacks.iter().take(STACKS_SHOWN) {
            // Escaped line by line: a name's own line ends are shown, not followed.
            let mut text = format!(
                "{} ms {}\n",
                number(stack.weight_ms),
                if stack.on_cpu { "on-CPU" } else { "off-CPU" }
            );
            // Folded as the terminal folds: the app's own frames are never left out.
            let ranks: Vec<_> = stack
                .frames
                .iter()
                .map(|f| {
                    fold::rank(
                        f.kind,
                        &f.name,
                        f.file.as_deref(),
                        f.original.as_ref().map(|o| o.file.as_str()),
                    )
                })
                .collect();
            for piece in fold::fold(&ranks, FRAMES_SHOWN) {
                match piece {
                    Piece::Frame(i) => {
                        let _ = writeln!(text, "  {}", escape(&frame_text(&stack.frames[i])));
                    }
                    Piece::Folded(n) => {
                        let _ = writeln!(text, "  ... {n} frames ...");
                    }
                }
            }
            let _ = writeln!(html, "<pre>{text}</pre>");
        }
    }
    html.push_str("</div>\n");
}

/// A frame, placed where a person would look: the original source, the script, or the module.
fn frame_text(frame: &Frame) -> String {
    let name = &frame.name;
    let place = if let Some(original) = &frame.original {
        format!(" {}:{}", original.file, original.line)
    } else if let Some(file) = &frame.file {
        match frame.line {
            Some(line) => format!(" {file}:{line}"),
            None => format!(" {file}"),
        }
    } else {
        format!(" ({})", frame.module)
    };
    format!("{name}{place}")
}

fn summary_html(html: &mut String, summary: &Summary) {
    html.push_str("<h2>Summary per loop thread</h2>\n<table><tr><th>pid</th><th>thread</th><th>iterations</th><th>blocks</th><th>longest busy</th><th>ELU</th></tr>\n");
    for l in &summary.loops {
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td></tr>",
            l.pid,
            escape(l.thread),
            l.iterations,
            l.blocks,
            number(l.max_busy_ms),
            number(l.elu),
        );
    }
    html.push_str("</table>\n");
}

/// A number as report.json writes it (`250.0`, not `250`), so the page and the file agree.
fn number(x: f64) -> String {
    serde_json::Number::from_f64(x).map_or_else(|| "-".to_owned(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        naming::frame::FrameKind,
        output::json::{LoopLine, RequestJson, Stack},
    };

    fn frame(name: &str, module: &str, file: Option<&str>, line: Option<u32>) -> Frame {
        Frame {
            column: None,
            file: file.map(Into::into),
            kind: FrameKind::Js,
            line,
            module: module.into(),
            name: name.into(),
            original: None,
        }
    }

    #[test]
    fn a_deep_stack_on_the_page_keeps_every_app_frame() {
        // Leaf first: 40 frames of builtins and node's own JS around three app frames.
        let mut frames: Vec<Frame> = (0..40)
            .map(|i| {
                frame(
                    &format!("internal{i}"),
                    "[JIT]",
                    Some("node:internal/x"),
                    None,
                )
            })
            .collect();
        for (at, name) in [(5, "spin"), (22, "blockFor"), (35, "parseHugeReport")] {
            frames[at] = frame(name, "[JIT]", Some("/srv/app.js"), Some(at as u32));
        }
        let mut html = String::new();
        let mut block = block_with(frames);
        block_html(&mut html, &block);
        for app in [
            "spin /srv/app.js:5",
            "blockFor /srv/app.js:22",
            "parseHugeReport /srv/app.js:35",
        ] {
            assert!(html.contains(app), "{app} missing: {html}");
        }
        assert!(html.contains("... "), "{html}");
        // A short stack is shown whole.
        block.stacks.as_mut().unwrap()[0].frames.truncate(6);
        html.clear();
        block_html(&mut html, &block);
        assert!(!html.contains("... "), "{html}");
    }

    fn block_with(frames: Vec<Frame>) -> Block {
        Block {
            comm: None,
            container: None,
            cpu_wait_ms: 0.0,
            duration_ms: 250.5,
            end: Some(BlockEnd::Poll),
            event: BlockEvent::Block,
            gc_ms: 0.0,
            gc_share: 0.0,
            off_cpu_ms: Some(0.5),
            on_cpu_ms: Some(250.0),
            pid: 7,
            pod: None,
            request: None,
            stacks: Some(vec![Stack {
                frames,
                on_cpu: true,
                weight_ms: 200.0,
            }]),
            naming_timed_out: false,
            start_unix_ms: 1.5,
            started_before_attach: false,
            thread: "main",
            tid: 7,
            worker: None,
        }
    }

    #[test]
    fn the_page_shows_blocks_stacks_and_actions_escaped() {
        let block = Block {
            comm: Some("node".to_owned()),
            container: None,
            cpu_wait_ms: 0.0,
            duration_ms: 250.5,
            end: Some(BlockEnd::Poll),
            event: BlockEvent::Block,
            gc_ms: 0.0,
            gc_share: 0.0,
            off_cpu_ms: Some(0.5),
            on_cpu_ms: Some(250.0),
            pid: 7,
            pod: None,
            request: Some(RequestJson {
                method: "GET".to_owned(),
                others: 0,
                parent_span_id: None,
                path: "/a<b>".to_owned(),
                route: Some("/:id".to_owned()),
                trace_id: None,
            }),
            stacks: Some(vec![Stack {
                frames: vec![
                    frame("Map<K,V>.get", "[JIT]", Some("/srv/app.js"), Some(3)),
                    frame("PKCS5_PBKDF2_HMAC", "node", None, None),
                ],
                on_cpu: true,
                weight_ms: 200.0,
            }]),
            naming_timed_out: false,
            start_unix_ms: 1.5,
            started_before_attach: false,
            thread: "main",
            tid: 7,
            worker: None,
        };
        let summary = Summary {
            dropped_events: 0,
            duration_ms: 1000.0,
            event: "summary",
            naming_limits: Vec::new(),
            loops: vec![LoopLine {
                blocks: 1,
                busy_hist_us: Vec::new(),
                comm: None,
                container: None,
                elu: 0.4,
                exited: false,
                gc: std::collections::BTreeMap::new(),
                iterations: 10,
                max_busy_ms: 250.5,
                ongoing_ms: None,
                pid: 7,
                pod: None,
                thread: "main",
                tid: 7,
                worker: None,
            }],
        };
        let report = Report {
            blocks: vec![&block],
            elu: Vec::new(),
            ended_unix_ms: 2.0,
            loopbpf: "0.1.0",
            recorded: "pid 7",
            started_unix_ms: 1.0,
            summary: Some(&summary),
            threshold_ms: 100.0,
            triggers: vec![Trigger {
                action: "core".to_owned(),
                at_unix_ms: 1.2,
                blocked_ms: 120.0,
                file: Some("/tmp/b/core.7".to_owned()),
                outcome: "done".to_owned(),
                pid: 7,
                size_bytes: Some(1024),
                thread: "main",
                tid: 7,
            }],
        };
        let html = render(&report);
        assert!(html.contains("Map&lt;K,V&gt;.get /srv/app.js:3"), "{html}");
        assert!(html.contains("PKCS5_PBKDF2_HMAC (node)"));
        assert!(
            html.contains("request <code>GET /a&lt;b&gt;</code> (route /:id)"),
            "{html}"
        );
        assert!(html.contains("blocked 250.5 ms"));
        assert!(html.contains("<td>/tmp/b/core.7</td><td>1024 bytes</td>"));
        assert!(html.contains("src=\"timeline.svg\"") && html.contains("data=\"flamegraph.svg\""));
        assert!(html.trim_end().ends_with("</html>"));
    }
}
