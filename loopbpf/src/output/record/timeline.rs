//! timeline.svg: one row per loop thread over the recording, its busy share drawn as a bar per
//! state poll (the taller and darker, the busier), every block a red span on top, so a person
//! sees when, how long and how often at a glance. Plain SVG 1.1, no script.

use std::fmt::Write as _;

use super::Mark;
use crate::{
    aggregate::LoopId,
    diag::printable,
    output::clock::{Clock, human},
};

const WIDTH: f64 = 1200.0;
const LABEL: f64 = 170.0;
const ROW: f64 = 56.0;
const TOP: f64 = 44.0;
const AXIS: f64 = 34.0;

/// One loop thread's ELU points: (time, ELU since the previous point).
pub struct Row<'a> {
    pub id: LoopId,
    pub points: &'a [(u64, f64)],
}

pub fn render(
    rows: &[Row<'_>],
    marks: &[Mark],
    start_ns: u64,
    end_ns: u64,
    threshold_ns: u64,
    clock: Clock,
) -> String {
    let span_ns = end_ns.saturating_sub(start_ns).max(1);
    let plot = WIDTH - LABEL - 20.0;
    let x = |t: u64| LABEL + t.saturating_sub(start_ns).min(span_ns) as f64 / span_ns as f64 * plot;
    let height = TOP + ROW * rows.len().max(1) as f64 + AXIS;
    let mut svg = format!(
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">
<title>loopbpf timeline</title>
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="15" font-weight="bold">Event loop busy time and blocks, {} to {}</text>
<text x="10" y="36" fill="#555">bars: share of each {} slice the loop was busy (ELU); red: blocks (busy intervals &gt;= {}), dark red: still going on</text>
"##,
        clock.time_of_day(start_ns),
        clock.time_of_day(end_ns),
        "100 ms",
        escape(&human(threshold_ns)),
    );
    if rows.is_empty() {
        let _ = writeln!(
            svg,
            r##"<text x="{LABEL}" y="{}" fill="#555">no event loop iteration was seen</text>"##,
            TOP + ROW / 2.0
        );
    }
    for (i, row) in rows.iter().enumerate() {
        let top = TOP + ROW * i as f64;
        let base = top + ROW - 8.0;
        let _ = writeln!(
            svg,
            r##"<text x="10" y="{:.1}">pid {} {}</text><line x1="{LABEL}" y1="{base:.1}" x2="{:.1}" y2="{base:.1}" stroke="#999"/>"##,
            top + ROW / 2.0 + 4.0,
            row.id.pid,
            escape(&row.id.label.to_string()),
            LABEL + plot,
        );
        let mut previous = None;
        for &(at, elu) in row.points {
            let from = previous.unwrap_or_else(|| at.saturating_sub(100_000_000));
            previous = Some(at);
            let (x0, x1) = (x(from), x(at));
            let h = (ROW - 14.0) * elu.clamp(0.0, 1.0);
            if h < 0.5 {
                continue;
            }
            let _ = writeln!(
                svg,
                r##"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#3b6fb6" fill-opacity="{:.2}"/>"##,
                base - h,
                (x1 - x0).max(0.5),
                0.35 + 0.65 * elu.clamp(0.0, 1.0),
            );
        }
        for mark in marks.iter().filter(|m| m.id.tid == row.id.tid) {
            let x0 = x(mark.start_ns);
            let x1 = x(mark.start_ns + mark.duration_ns).max(x0 + 2.0);
            let state = if mark.ongoing {
                "still blocked after"
            } else {
                "blocked"
            };
            let culprit = mark
                .culprit
                .as_deref()
                .map(|c| format!(" in {c}"))
                .unwrap_or_default();
            let _ = writeln!(
                svg,
                r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}" fill-opacity="0.75"><title>{} {state} {}{}</title></rect>"#,
                top + 4.0,
                x1 - x0,
                ROW - 12.0,
                if mark.ongoing { "#8b0000" } else { "#d62728" },
                clock.time_of_day(mark.start_ns),
                human(mark.duration_ns),
                escape(&culprit),
            );
        }
    }
    // Time axis: about eight ticks at a round step.
    let axis_y = TOP + ROW * rows.len().max(1) as f64 + 6.0;
    let step_s = nice_step(span_ns as f64 / 1e9 / 8.0);
    let mut t = 0.0;
    while t <= span_ns as f64 / 1e9 + 1e-9 {
        let at = start_ns + (t * 1e9) as u64;
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" y1="{axis_y:.1}" x2="{0:.1}" y2="{1:.1}" stroke="#555"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle" fill="#333">{3}</text>"##,
            x(at),
            axis_y + 5.0,
            axis_y + 18.0,
            format_args!("{t}s")
        );
        t += step_s;
    }
    svg.push_str("</svg>\n");
    svg
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(0.1);
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|&step| step >= raw)
        .unwrap_or(10.0 * power)
}

/// Text for XML and HTML, whatever a target wrote in it: markup escaped, and what XML 1.0
/// cannot carry even escaped (control characters, U+FFFE) shown as [`printable`] escapes.
pub fn escape(text: &str) -> String {
    printable(text)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::ThreadLabel;

    const S: u64 = 1_000_000_000;

    #[test]
    fn blocks_and_busy_time_are_drawn_where_they_happened() {
        let id = LoopId {
            pid: 7,
            tid: 7,
            label: ThreadLabel::Main,
        };
        let points: Vec<(u64, f64)> = (1..=100).map(|i| (i * S / 10, 0.5)).collect();
        let marks = [Mark {
            id,
            start_ns: 5 * S,
            duration_ns: S,
            ongoing: false,
            culprit: Some("Array<T>.sort".into()),
        }];
        let svg = render(
            &[Row {
                id,
                points: &points,
            }],
            &marks,
            0,
            10 * S,
            100_000_000,
            Clock::new(),
        );
        assert!(svg.contains("pid 7 main"));
        // The block spans the middle tenth of the plot.
        let plot = WIDTH - LABEL - 20.0;
        assert!(svg.contains(&format!(
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}""#,
            LABEL + plot / 2.0,
            TOP + 4.0,
            plot / 10.0
        )));
        assert!(
            svg.contains("blocked 1.00 s in Array&lt;T&gt;.sort"),
            "{svg}"
        );
        assert!(svg.contains(">10s</text>"));
        assert_eq!(svg.matches("<rect").count(), 102);
    }

    #[test]
    fn names_cannot_break_the_markup() {
        assert_eq!(
            escape("\x1b[2J<b a=\"1\" b='2'>&amp;\u{fffe}\0"),
            "\\x1b[2J&lt;b a=&quot;1&quot; b=&#39;2&#39;&gt;&amp;amp;\\u{fffe}\\x00"
        );
    }

    #[test]
    fn round_axis_steps() {
        assert!((nice_step(0.7) - 1.0).abs() < 1e-9);
        assert!((nice_step(1.3) - 2.0).abs() < 1e-9);
        assert!((nice_step(7.5) - 10.0).abs() < 1e-9);
        assert!((nice_step(30.0) - 50.0).abs() < 1e-9);
    }
}
