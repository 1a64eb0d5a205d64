//! Golden tests of the JSON outputs: representative records, and the exact bytes they were
//! emitted as when the schema moved into serde structs. The JSON lines, report.json and
//! index.html must not change by accident; `LOOPBPF_BLESS=1 cargo test` rewrites the fixtures
//! after a change on purpose.

use std::{fs, path::Path};

use super::{Named, clock::Clock, report::Reporter};
use crate::{
    abi::HIST_SLOTS,
    aggregate::{
        BlockEnd, GcStats, LoopId, LoopSummary, Record, ThreadLabel,
        leak::{Leak, LeakRule},
    },
    decode::GcKind,
    naming::{
        frame::{Frame, FrameKind, Original},
        stacks::{BlockProfile, NamedStack},
    },
    target::ProcessLabels,
};

const MS: u64 = 1_000_000;

/// The wall clock of the fixtures: monotonic zero is 2026-01-01T00:00:00.123456789Z.
pub(crate) fn clock() -> Clock {
    Clock::fixed(1_767_225_600_123_456_789)
}

pub(crate) const MAIN: LoopId = LoopId {
    pid: 4242,
    tid: 4242,
    label: ThreadLabel::Main,
};
pub(crate) const WORKER: LoopId = LoopId {
    pid: 4242,
    tid: 4250,
    label: ThreadLabel::Worker(2),
};
/// A process nothing is known of (no comm, container or pod).
pub(crate) const STRANGER: LoopId = LoopId {
    pid: 9000,
    tid: 9001,
    label: ThreadLabel::Main,
};

/// Labels of the processes in [`records`] (the stranger has none).
pub(crate) fn processes() -> Vec<(u32, ProcessLabels)> {
    vec![(
        MAIN.pid,
        ProcessLabels {
            comm: "node".to_owned(),
            container: "0123456789ab".to_owned(),
            pod: "checkout-7d9f".to_owned(),
        },
    )]
}

fn native(name: &str, module: &str) -> Frame {
    Frame {
        name: name.into(),
        module: module.into(),
        file: None,
        line: None,
        column: None,
        original: None,
        kind: FrameKind::Native,
    }
}

fn profile() -> BlockProfile {
    let mut transpiled = Frame::js_at(
        "Checkout.priceAll".to_owned(),
        Some("/srv/dist/checkout.js".into()),
        Some((120, Some(7))),
    );
    transpiled.original = Some(Original {
        file: "src/checkout.ts".to_owned(),
        line: 26,
        column: 12,
    });
    let mut kernel = native("do_sys_openat2", "[kernel]");
    kernel.kind = FrameKind::Kernel;
    BlockProfile {
        request: crate::naming::request::from_parts(
            "POST",
            "/login",
            Some("/login".to_owned()),
            crate::naming::request::parse_traceparent(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            false,
        ),
        on_cpu_ns: 150_333_333,
        off_cpu_ns: 26_027_901,
        stacks: vec![
            NamedStack {
                weight_ns: 150_333_333,
                on_cpu: true,
                frames: vec![
                    native(
                        "void node::crypto::PBKDF2Traits::DeriveBits(node::Environment*, char const*) const",
                        "node",
                    ),
                    Frame::js(
                        "hashPassword".to_owned(),
                        Some("/srv/login.js".into()),
                        Some(12),
                    ),
                    transpiled,
                    Frame::unnamed_js(),
                    native("uv_run", "node"),
                ],
            },
            NamedStack {
                weight_ns: 26_027_901,
                on_cpu: false,
                frames: vec![
                    kernel,
                    native("__open64", "libc.so.6"),
                    Frame::js("readFileSync", Some("node:fs".into()), None),
                ],
            },
        ],
    }
}

fn hist(slots: &[(usize, u64)]) -> [u64; HIST_SLOTS] {
    let mut hist = [0; HIST_SLOTS];
    for &(slot, count) in slots {
        hist[slot] = count;
    }
    hist
}

/// One record of each kind, with the now they are reported at.
pub(crate) fn records() -> Vec<(Record, Option<BlockProfile>, u64)> {
    vec![
        (
            Record::Block {
                id: MAIN,
                start_ns: 5_000_123_456,
                duration_ns: 176_361_234,
                end: BlockEnd::Poll,
                before_attach: false,
                gc_ns: 12_345_678,
                cpu_wait_ns: 1_234_567,
            },
            Some(profile()),
            5_200 * MS,
        ),
        (
            Record::Block {
                id: WORKER,
                start_ns: 6_000 * MS,
                duration_ns: 250 * MS,
                end: BlockEnd::Exit,
                before_attach: false,
                gc_ns: 0,
                cpu_wait_ns: 0,
            },
            None,
            6_300 * MS,
        ),
        (
            Record::Ongoing {
                id: STRANGER,
                start_ns: 1_000 * MS,
                duration_ns: 2_100_000_001,
                before_attach: true,
                gc_ns: 700 * MS,
                cpu_wait_ns: 300 * MS,
            },
            Some(BlockProfile {
                request: None,
                on_cpu_ns: 2_100 * MS,
                off_cpu_ns: 0,
                stacks: Vec::new(),
            }),
            3_100 * MS,
        ),
        (
            Record::Interval {
                id: MAIN,
                elu: 0.123_456_7,
                iterations: 981,
                max_busy_ns: 176_361_234,
            },
            None,
            10_000 * MS,
        ),
        (
            Record::Leak {
                id: MAIN,
                leak: Leak {
                    rss_bytes: 135_700_000,
                    growth_bytes_per_min: 1_280_600.4,
                    major_gcs: 5,
                    rule: LeakRule::AfterMajorGc,
                    growth_bytes: 640_300,
                    span_ns: 30_000 * MS,
                },
            },
            None,
            11_000 * MS,
        ),
        (summary(), None, 12_000 * MS),
    ]
}

/// A summary of three loop threads: with GC pauses of several kinds, exited, still blocked.
fn summary() -> Record {
    Record::Summary {
        loops: vec![
            LoopSummary {
                id: MAIN,
                elu: 0.184_449,
                iterations: 207,
                blocks: 1,
                max_busy_ns: 176_361_234,
                ongoing_ns: None,
                busy_hist: hist(&[(0, 150), (6, 50), (17, 1)]),
                exited: false,
                gc: vec![
                    (
                        GcKind::Minor,
                        GcStats {
                            count: 12,
                            total_ns: 9_876_543,
                            max_ns: 2_000_001,
                            hist: hist(&[(9, 10), (10, 2)]),
                        },
                    ),
                    (
                        GcKind::Major,
                        GcStats {
                            count: 1,
                            total_ns: 12_345_678,
                            max_ns: 12_345_678,
                            hist: hist(&[(13, 1)]),
                        },
                    ),
                    (
                        GcKind::WeakCallbacks,
                        GcStats {
                            count: 2,
                            total_ns: 40_000,
                            max_ns: 30_000,
                            hist: hist(&[(3, 1), (4, 1)]),
                        },
                    ),
                ],
            },
            LoopSummary {
                id: WORKER,
                elu: 1.0,
                iterations: 3,
                blocks: 1,
                max_busy_ns: 250 * MS,
                ongoing_ns: None,
                busy_hist: hist(&[(17, 1), (2, 2)]),
                exited: true,
                gc: Vec::new(),
            },
            LoopSummary {
                id: STRANGER,
                elu: 0.999_95,
                iterations: 0,
                blocks: 0,
                max_busy_ns: 0,
                ongoing_ns: Some(2_100_000_001),
                busy_hist: [0; HIST_SLOTS],
                exited: false,
                gc: Vec::new(),
            },
        ],
        elapsed_ns: 12_003_640_000,
        dropped_events: 3,
        naming_limits: Vec::new(),
    }
}

/// Compares `actual` with the fixture `name` under testdata/, or rewrites it when blessing.
pub(crate) fn check(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/output/testdata")
        .join(name);
    if std::env::var_os("LOOPBPF_BLESS").is_some() {
        fs::write(&path, actual).unwrap();
        return;
    }
    let expected = fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (LOOPBPF_BLESS=1 writes it)", path.display()));
    if actual != expected {
        let line = actual
            .lines()
            .zip(expected.lines())
            .position(|(a, e)| a != e)
            .unwrap_or_else(|| actual.lines().count().min(expected.lines().count()));
        panic!(
            "{name} differs from the fixture at line {}:\n  actual:   {}\n  expected: {}",
            line + 1,
            actual.lines().nth(line).unwrap_or("(end)"),
            expected.lines().nth(line).unwrap_or("(end)"),
        );
    }
}

#[test]
fn json_lines_are_unchanged() {
    let mut reporter = Reporter::new(Vec::new(), true, clock());
    for (pid, labels) in processes() {
        reporter.name_process(pid, labels);
    }
    for (record, profile, now_ns) in records() {
        let named = Named {
            record: &record,
            profile: profile.as_ref(),
            naming_timed_out: false,
        };
        reporter.report(named, now_ns).unwrap();
    }
    check(
        "records.jsonl",
        &String::from_utf8(std::mem::take(reporter.out_mut())).unwrap(),
    );
}
