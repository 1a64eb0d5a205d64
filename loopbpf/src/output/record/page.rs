//! index.html: the bundle on one static page that opens from disk: what was recorded, the
//! actions taken, the timeline, the flame graph of blocked time, every block with its heaviest
//! stacks, and the summary per loop thread. Built from report.json, so the two agree.

use std::fmt::Write as _;

use serde_json::Value;

use super::timeline::escape;

/// Stacks shown per block, and frames per stack.
const STACKS_SHOWN: usize = 3;
const FRAMES_SHOWN: usize = 14;

pub fn render(report: &Value) -> String {
    let mut html = String::from(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>loopbpf recording</title>
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
        escape(report["recorded"].as_str().unwrap_or_default()),
        number(&report["started_unix_ms"]),
        number(&report["ended_unix_ms"]),
        escape(report["loopbpf"].as_str().unwrap_or_default()),
        number(&report["threshold_ms"]),
    );
    let blocks = report["blocks"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        html,
        "<p><b>{} block{}</b>; files: <a href=\"report.txt\">report.txt</a>, <a href=\"report.json\">report.json</a>, <a href=\"flamegraph.svg\">flamegraph.svg</a>, <a href=\"timeline.svg\">timeline.svg</a>.</p>",
        blocks.len(),
        if blocks.len() == 1 { "" } else { "s" },
    );
    triggers(&mut html, report["triggers"].as_array());
    html.push_str("<h2>Timeline</h2>\n<img src=\"timeline.svg\" alt=\"busy time and blocks per loop thread\">\n");
    html.push_str("<h2>Blocked time</h2>\n<object data=\"flamegraph.svg\" type=\"image/svg+xml\" width=\"1200\">flamegraph.svg</object>\n");
    html.push_str("<h2>Blocks</h2>\n");
    if blocks.is_empty() {
        html.push_str("<p>No block was seen.</p>\n");
    }
    for block in &blocks {
        block_html(&mut html, block);
    }
    summary(&mut html, &report["summary"]);
    html.push_str("</body></html>\n");
    html
}

fn triggers(html: &mut String, triggers: Option<&Vec<Value>>) {
    let Some(triggers) = triggers.filter(|t| !t.is_empty()) else {
        return;
    };
    html.push_str("<h2>Actions taken</h2>\n<table><tr><th>action</th><th>process</th><th>blocked for</th><th>outcome</th><th>file</th><th>size</th></tr>\n");
    for t in triggers {
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>pid {} {}</td><td>{} ms</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(t["action"].as_str().unwrap_or_default()),
            number(&t["pid"]),
            escape(t["thread"].as_str().unwrap_or_default()),
            number(&t["blocked_ms"]),
            escape(t["outcome"].as_str().unwrap_or_default()),
            escape(t["file"].as_str().unwrap_or("-")),
            t["size_bytes"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |b| format!("{b} bytes")),
        );
    }
    html.push_str("</table>\n");
}

fn block_html(html: &mut String, block: &Value) {
    let ongoing = block["event"] == "ongoing";
    let _ = writeln!(
        html,
        "<div class=\"block{}\"><b>pid {} {}{}: {} {} ms</b>{} <small>(start {} unix ms)</small>",
        if ongoing { " ongoing" } else { "" },
        number(&block["pid"]),
        escape(block["thread"].as_str().unwrap_or_default()),
        block["comm"]
            .as_str()
            .map(|c| format!(" ({})", escape(c)))
            .unwrap_or_default(),
        if ongoing {
            "still blocked after"
        } else {
            "blocked"
        },
        number(&block["duration_ms"]),
        if block["end"] == "exit" {
            " until the thread exited"
        } else {
            ""
        },
        number(&block["start_unix_ms"]),
    );
    if let Some(stacks) = block["stacks"].as_array() {
        let _ = writeln!(
            html,
            "<div>on-CPU {} ms, off-CPU {} ms; heaviest stacks, leaf first:</div>",
            number(&block["on_cpu_ms"]),
            number(&block["off_cpu_ms"]),
        );
        for stack in stacks.iter().take(STACKS_SHOWN) {
            let mut text = format!(
                "{} ms {}\n",
                number(&stack["weight_ms"]),
                if stack["on_cpu"] == true {
                    "on-CPU"
                } else {
                    "off-CPU"
                }
            );
            let frames = stack["frames"].as_array().cloned().unwrap_or_default();
            for frame in frames.iter().take(FRAMES_SHOWN) {
                let _ = writeln!(text, "  {}", frame_text(frame));
            }
            if frames.len() > FRAMES_SHOWN {
                let _ = writeln!(text, "  ... {} more", frames.len() - FRAMES_SHOWN);
            }
            let _ = writeln!(html, "<pre>{}</pre>", escape(&text));
        }
    }
    html.push_str("</div>\n");
}

fn frame_text(frame: &Value) -> String {
    let name = frame["name"].as_str().unwrap_or("?");
    let place = if let Some(original) = frame["original"].as_object() {
        format!(
            " {}:{}",
            original
                .get("file")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            original
                .get("line")
                .map(ToString::to_string)
                .unwrap_or_default()
        )
    } else if let Some(file) = frame["file"].as_str() {
        match frame["line"].as_u64() {
            Some(line) => format!(" {file}:{line}"),
            None => format!(" {file}"),
        }
    } else {
        format!(" ({})", frame["module"].as_str().unwrap_or_default())
    };
    format!("{name}{place}")
}

fn summary(html: &mut String, summary: &Value) {
    let Some(loops) = summary["loops"].as_array() else {
        return;
    };
    html.push_str("<h2>Summary per loop thread</h2>\n<table><tr><th>pid</th><th>thread</th><th>iterations</th><th>blocks</th><th>longest busy</th><th>ELU</th></tr>\n");
    for l in loops {
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td></tr>",
            number(&l["pid"]),
            escape(l["thread"].as_str().unwrap_or_default()),
            number(&l["iterations"]),
            number(&l["blocks"]),
            number(&l["max_busy_ms"]),
            number(&l["elu"]),
        );
    }
    html.push_str("</table>\n");
}

fn number(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        _ => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_page_shows_blocks_stacks_and_actions_escaped() {
        let report = json!({
            "recorded": "pid 7", "loopbpf": "0.1.0", "started_unix_ms": 1, "ended_unix_ms": 2,
            "threshold_ms": 100.0,
            "blocks": [{
                "event": "block", "pid": 7, "thread": "main", "comm": "node", "duration_ms": 250.5,
                "end": "poll", "start_unix_ms": 1.5, "on_cpu_ms": 250.0, "off_cpu_ms": 0.5,
                "stacks": [{"weight_ms": 200.0, "on_cpu": true, "frames": [
                    {"name": "Map<K,V>.get", "file": "/srv/app.js", "line": 3, "module": "[JIT]", "original": null},
                    {"name": "PKCS5_PBKDF2_HMAC", "file": null, "line": null, "module": "node", "original": null}
                ]}]
            }],
            "summary": {"loops": [{"pid": 7, "thread": "main", "iterations": 10, "blocks": 1, "max_busy_ms": 250.5, "elu": 0.4}]},
            "triggers": [{"action": "core", "pid": 7, "thread": "main", "blocked_ms": 120.0,
                          "outcome": "done", "file": "/tmp/b/core.7", "size_bytes": 1024}],
        });
        let html = render(&report);
        assert!(html.contains("Map&lt;K,V&gt;.get /srv/app.js:3"), "{html}");
        assert!(html.contains("PKCS5_PBKDF2_HMAC (node)"));
        assert!(html.contains("blocked 250.5 ms"));
        assert!(html.contains("<td>/tmp/b/core.7</td><td>1024 bytes</td>"));
        assert!(html.contains("src=\"timeline.svg\"") && html.contains("data=\"flamegraph.svg\""));
        assert!(html.trim_end().ends_with("</html>"));
    }
}
