//! The perf map node writes with `--perf-basic-prof` (`/tmp/perf-PID.map`, in the target's own
//! `/tmp`): names of JIT code, `START SIZE NAME` lines appended as V8 compiles. Kept open and
//! read as it grows, so that it names code after the target exits. Opened only inside the
//! target's root (a FIFO, device or symlink out planted there is refused, see
//! [`crate::target::files`]); one over [`MAX_PERF_MAP`] is not read.

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File},
    io::{Read, Seek, SeekFrom},
    mem::size_of,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use super::frame::Frame;
use crate::target::proc::Process;

/// A missing perf map is looked for again at most this often.
const MIN_PERF_MAP_OPEN_INTERVAL: Duration = Duration::from_secs(1);

/// Most bytes read from the perf map at one sync; the rest waits for the next (the target
/// writes the file, and could write it without end).
const MAX_PERF_MAP_READ: u64 = 64 << 20;

/// Largest perf map read: node appends one line (about 100 bytes) per compiled function, so
/// days of a busy service; a larger one is the target's doing (a sparse file).
const MAX_PERF_MAP: u64 = 1 << 30;
/// Code ranges and bytes of distinct names kept from one perf map (V8 writes a line per
/// compiled function: a large service has tens of thousands); entries past either are dropped,
/// counted and warned of once. A name longer than [`MAX_PERF_MAP_NAME`] is cut.
const MAX_PERF_MAP_RANGES: usize = 1 << 20;
const MAX_PERF_MAP_NAME_BYTES: usize = 32 << 20;
const MAX_PERF_MAP_NAME: usize = 4096;

/// Clock ticks per second in `/proc/PID/stat`: `USER_HZ`, 100 on x86-64 and arm64.
const USER_HZ: u64 = 100;

/// Clock ticks after boot (a process's start time) as wall-clock time.
fn ticks_to_system_time(ticks: u64) -> Option<SystemTime> {
    // Not the target's: the host's boot time.
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let boot_secs: u64 = stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let since_boot = Duration::from_millis(ticks.checked_mul(1000)? / USER_HZ);
    UNIX_EPOCH.checked_add(Duration::from_secs(boot_secs) + since_boot)
}

/// The name of the target's perf map: node names it after the PID it sees itself as (inside a
/// container, its namespace PID).
fn perf_map_name(process: &Process) -> String {
    let ns_pid = process
        .status()
        .and_then(|status| status.ns_pid)
        .unwrap_or(process.pid());
    format!("perf-{ns_pid}.map")
}

/// The perf map of the target (`START SIZE NAME` lines, hex without `0x`), read as it grows.
pub(super) struct PerfMap {
    process: Process,
    /// The file in the target's own `/tmp`, reachable while it lives.
    in_target: PathBuf,
    /// When the target started: an older file is left over from an earlier process with its PID.
    started_at: Option<SystemTime>,
    /// Kept open: it stays readable after the target exits, wherever it lives.
    file: Option<File>,
    last_open_attempt: Option<Instant>,
    /// Bytes of the file consumed so far (whole lines only).
    read_len: u64,
    /// Non-overlapping code ranges: start -> (end, index into `frames`). A later entry replaces
    /// whatever it overlaps, since V8 reuses the space of collected code.
    ranges: BTreeMap<u64, (u64, usize)>,
    /// One frame per distinct entry name: recompiled functions repeat theirs.
    frames: Vec<Frame>,
    frame_ids: HashMap<Box<str>, usize>,
    /// Bytes of the names in `frame_ids` (and their frames).
    name_bytes: usize,
    /// Entries dropped because the table was full.
    pub(super) dropped: u64,
    /// Synced during the current [`super::symbolize::Symbolizer::user`] call already.
    pub(super) synced_this_call: bool,
}

impl PerfMap {
    pub(super) fn new(process: Process, start_ticks: Option<u64>) -> Self {
        let name = perf_map_name(&process);
        Self {
            in_target: Path::new("/tmp").join(name),
            process,
            started_at: start_ticks.and_then(ticks_to_system_time),
            file: None,
            last_open_attempt: None,
            read_len: 0,
            ranges: BTreeMap::new(),
            frames: Vec::new(),
            frame_ids: HashMap::new(),
            name_bytes: 0,
            dropped: 0,
            synced_this_call: false,
        }
    }

    /// Reads what was appended since the last call; `open_now` looks for a missing file even if
    /// it was looked for less than a second ago.
    pub(super) fn sync(&mut self, open_now: bool) {
        self.synced_this_call = true;
        if self.file.is_none() {
            let due = self
                .last_open_attempt
                .is_none_or(|at| at.elapsed() >= MIN_PERF_MAP_OPEN_INTERVAL);
            if !open_now && !due {
                return;
            }
            self.last_open_attempt = Some(Instant::now());
            self.file = self.open();
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let Ok(len) = file.metadata().map(|meta| meta.len()) else {
            return;
        };
        if len < self.read_len {
            // Rewritten from the start: forget what it said.
            self.read_len = 0;
            self.ranges.clear();
            self.frames.clear();
            self.frame_ids.clear();
            self.name_bytes = 0;
        }
        if len == self.read_len || self.read_len >= MAX_PERF_MAP {
            return;
        }
        let mut appended = Vec::new();
        if file.seek(SeekFrom::Start(self.read_len)).is_err()
            || file
                .take(MAX_PERF_MAP_READ)
                .read_to_end(&mut appended)
                .is_err()
        {
            return;
        }
        let Some(last_newline) = appended.iter().rposition(|&byte| byte == b'\n') else {
            // A full read with no line in it is no perf map: skip it rather than read it again.
            if appended.len() as u64 == MAX_PERF_MAP_READ {
                self.read_len += MAX_PERF_MAP_READ;
            }
            return;
        };
        let complete = &appended[..=last_newline];
        self.read_len += complete.len() as u64;
        if self.read_len >= MAX_PERF_MAP {
            warning!(
                "{} of pid {}: read up to its {} MiB cap, JIT code named after that is not",
                self.in_target.display(),
                self.process.pid(),
                MAX_PERF_MAP >> 20
            );
        }
        for line in String::from_utf8_lossy(complete).lines() {
            if let Some((start, end, name)) = parse_perf_map_line(line) {
                let name = cut(name, MAX_PERF_MAP_NAME);
                let Some(frame) = self
                    .frame_id(name)
                    .filter(|_| self.ranges.len() < MAX_PERF_MAP_RANGES)
                else {
                    if self.dropped == 0 {
                        warning!(
                            "pid {}: perf map entries past {MAX_PERF_MAP_RANGES} code ranges or \
                             {} MiB of names are dropped: JIT frames may stay unnamed",
                            self.process.pid(),
                            MAX_PERF_MAP_NAME_BYTES >> 20
                        );
                    }
                    self.dropped += 1;
                    continue;
                };
                self.insert(start, end, frame);
            }
        }
    }

    /// The frame of a name; `None` when a new name would be over the bound on names.
    fn frame_id(&mut self, name: &str) -> Option<usize> {
        if let Some(&id) = self.frame_ids.get(name) {
            return Some(id);
        }
        // The key, and the frame's name and file.
        let bytes = 3 * name.len() + size_of::<Frame>() + 64;
        if self.name_bytes + bytes > MAX_PERF_MAP_NAME_BYTES {
            return None;
        }
        self.name_bytes += bytes;
        self.frames.push(js_frame_from_perf_map(name));
        self.frame_ids.insert(name.into(), self.frames.len() - 1);
        Some(self.frames.len() - 1)
    }

    fn open(&self) -> Option<File> {
        // Its own /tmp is the only right place, even once it is gone (then it is not read).
        let file = self.process.open_file(&self.in_target, MAX_PERF_MAP).ok()?;
        let modified = file.metadata().and_then(|meta| meta.modified()).ok();
        let stale = match (modified, self.started_at) {
            (Some(modified), Some(started_at)) => modified + Duration::from_secs(2) < started_at,
            _ => false,
        };
        (!stale).then_some(file)
    }

    fn insert(&mut self, start: u64, end: u64, frame: usize) {
        // An older range that starts before this one keeps its parts outside [start, end).
        if let Some((&old_start, &(old_end, old_frame))) = self.ranges.range(..start).next_back()
            && old_end > start
        {
            self.ranges.insert(old_start, (start, old_frame));
            if old_end > end {
                self.ranges.insert(end, (old_end, old_frame));
            }
        }
        let inside: Vec<u64> = self
            .ranges
            .range(start..end)
            .map(|(&old_start, _)| old_start)
            .collect();
        for old_start in inside {
            if let Some((old_end, old_frame)) = self.ranges.remove(&old_start)
                && old_end > end
            {
                self.ranges.insert(end, (old_end, old_frame));
            }
        }
        self.ranges.insert(start, (end, frame));
    }

    pub(super) fn lookup(&self, addr: u64) -> Option<&Frame> {
        let (_, &(end, frame)) = self.ranges.range(..=addr).next_back()?;
        (addr < end).then(|| &self.frames[frame])
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `START SIZE NAME` -> (start, end, name); `None` for a malformed or empty entry.
pub(super) fn parse_perf_map_line(line: &str) -> Option<(u64, u64, &str)> {
    let mut fields = line.splitn(3, ' ');
    let start = u64::from_str_radix(fields.next()?, 16).ok()?;
    let size = u64::from_str_radix(fields.next()?, 16).ok()?;
    let name = fields.next()?.trim_end();
    let end = start.checked_add(size)?;
    (size > 0).then_some((start, end, name))
}

/// Turns a V8 perf map name into a frame: `JS:*fib /app.js:3:13` is `fib` at `/app.js` line 3.
fn js_frame_from_perf_map(entry: &str) -> Frame {
    let Some((kind, rest)) = entry.split_once(':') else {
        return Frame::js(entry, None, None);
    };
    if !matches!(kind, "JS" | "LazyCompile" | "Function" | "Script" | "Eval") {
        // Builtin:, BytecodeHandler:, Stub:, RegExp:, ...: the whole entry is the name.
        return Frame::js(entry, None, None);
    }
    // The tier: ~ interpreted, ^ baseline, + Maglev, * optimized.
    let rest = rest.strip_prefix(['~', '^', '+', '*']).unwrap_or(rest);
    let (name, script) = split_name_and_script(rest);
    let name = if name.is_empty() { "<anonymous>" } else { name };
    let (file, line) = script.map_or((None, None), parse_script_location);
    Frame::js(name, file.map(Arc::from), line)
}

/// Splits `NAME SCRIPT:LINE:COL`, where the name may be empty or hold spaces (`get x`).
fn split_name_and_script(text: &str) -> (&str, Option<&str>) {
    const SCRIPT_STARTS: [&str; 4] = ["/", "file:", "node:", "."];
    // `[eval]:1:1`, `[eval]-wrapper:6:14`, `[worker eval]:1:1`, but not `[Symbol.iterator] ...`,
    // the name of a computed method.
    let is_bracketed_script = |script: &str| {
        script.starts_with('[')
            && script
                .split_once(']')
                .is_some_and(|(_, after)| after.starts_with([':', '-']))
    };
    let mut last_located = None;
    for (space, _) in text.match_indices(' ') {
        let script = &text[space + 1..];
        if SCRIPT_STARTS.iter().any(|start| script.starts_with(start))
            || is_bracketed_script(script)
        {
            return (&text[..space], Some(script));
        }
        if has_line_suffix(script) {
            last_located = Some(space);
        }
    }
    match last_located {
        Some(space) => (&text[..space], Some(&text[space + 1..])),
        None => (text, None),
    }
}

fn has_line_suffix(script: &str) -> bool {
    script.rsplit_once(':').is_some_and(|(_, number)| {
        !number.is_empty() && number.bytes().all(|byte| byte.is_ascii_digit())
    })
}

/// `file:///x.js:1:1` -> (`/x.js`, 1).
fn parse_script_location(script: &str) -> (Option<String>, Option<u32>) {
    let mut path = script;
    let mut numbers = Vec::new();
    while numbers.len() < 2
        && let Some((rest, number)) = path.rsplit_once(':')
        && let Ok(number) = number.parse::<u32>()
    {
        numbers.push(number);
        path = rest;
    }
    // Trailing numbers were popped last first: the line is the first of `:LINE:COL` (or `:LINE`).
    let line = numbers.last().copied();
    let path = path.strip_prefix("file://").unwrap_or(path);
    ((!path.is_empty()).then(|| path.to_owned()), line)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::naming::frame::FrameKind;

    #[test]
    fn perf_map_names_follow_v8() {
        let cases = [
            (
                "JS:*fib /abs/path/app.js:3:13",
                "fib",
                Some("/abs/path/app.js"),
                Some(3),
            ),
            ("JS:~main file:///x.js:1:1", "main", Some("/x.js"), Some(1)),
            (
                "LazyCompile:*foo /p.js:10:20",
                "foo",
                Some("/p.js"),
                Some(10),
            ),
            (
                "Function:^bar node:internal/util:598:30",
                "bar",
                Some("node:internal/util"),
                Some(598),
            ),
            ("JS:+maglevd /m.js:7:1", "maglevd", Some("/m.js"), Some(7)),
            ("JS:~ [eval]:1:1", "<anonymous>", Some("[eval]"), Some(1)),
            (
                "Script:~ /srv/app.js:1:1",
                "<anonymous>",
                Some("/srv/app.js"),
                Some(1),
            ),
            (
                "JS:^get size /a dir/b.js:4:2",
                "get size",
                Some("/a dir/b.js"),
                Some(4),
            ),
            (
                "JS:~run evalmachine.<anonymous>:2:5",
                "run",
                Some("evalmachine.<anonymous>"),
                Some(2),
            ),
            (
                "JS:~ [worker eval]:1:1",
                "<anonymous>",
                Some("[worker eval]"),
                Some(1),
            ),
            (
                "JS:~ [eval]-wrapper:6:14",
                "<anonymous>",
                Some("[eval]-wrapper"),
                Some(6),
            ),
            (
                "JS:~get [Symbol.toStringTag] node:internal/url:9:2",
                "get [Symbol.toStringTag]",
                Some("node:internal/url"),
                Some(9),
            ),
            ("JS:*noScript", "noScript", None, None),
            ("Builtin:JsonStringify", "Builtin:JsonStringify", None, None),
            ("BytecodeHandler:Star0", "BytecodeHandler:Star0", None, None),
            ("Stub:CEntry", "Stub:CEntry", None, None),
        ];
        for (entry, name, file, line) in cases {
            let frame = js_frame_from_perf_map(entry);
            assert_eq!(&*frame.name, name, "{entry}");
            assert_eq!(frame.file.as_deref(), file, "{entry}");
            assert_eq!(frame.line, line, "{entry}");
            assert_eq!(
                (frame.kind, frame.module.as_ref()),
                (FrameKind::Js, "[JIT]"),
                "{entry}"
            );
        }
        assert_eq!(
            parse_perf_map_line("7f00 10 JS:*f /a.js:1:1"),
            Some((0x7f00, 0x7f10, "JS:*f /a.js:1:1"))
        );
        assert_eq!(parse_perf_map_line("7f00 0 JS:*f"), None);
        assert_eq!(parse_perf_map_line("ffffffffffffffff 10 x"), None);
        assert_eq!(parse_perf_map_line("zz 10 x"), None);
    }

    #[test]
    fn later_perf_map_entries_replace_what_they_overlap() {
        let mut perf_map = PerfMap::new(Process::new(0), None);
        let mut add = |start: u64, end: u64, name: &str| {
            let frame = perf_map.frame_id(name).unwrap();
            perf_map.insert(start, end, frame);
        };
        add(0x100, 0x200, "old");
        add(0x140, 0x160, "inner");
        add(0x1f0, 0x300, "tail");
        add(0x80, 0x110, "head");
        add(0x400, 0x410, "old");
        let name_at = |addr| perf_map.lookup(addr).map(|frame| frame.name.as_ref());
        assert_eq!(name_at(0x7f), None);
        assert_eq!(name_at(0x80), Some("head"));
        assert_eq!(name_at(0x110), Some("old"));
        assert_eq!(name_at(0x150), Some("inner"));
        assert_eq!(name_at(0x160), Some("old"));
        assert_eq!(name_at(0x1f0), Some("tail"));
        assert_eq!(name_at(0x2ff), Some("tail"));
        assert_eq!(name_at(0x300), None);
        assert_eq!(name_at(0x405), Some("old"));
        assert_eq!(perf_map.frames.len(), 4, "a repeated name shares its frame");
    }

    #[test]
    fn perf_map_lines_take_any_text() {
        use crate::target::fuzz::fuzz;
        let seeds = [
            b"7f00 10 JS:*fib /abs/path/app.js:3:13".to_vec(),
            b"7f00 10 JS:~get [Symbol.toStringTag] node:internal/url:9:2".to_vec(),
            b"ffffffffffffff00 ff JS:^ [eval]-wrapper:6:14".to_vec(),
        ];
        // A frame of at most the line's text, a few times over.
        fuzz(&seeds, 20_000, 8 << 16, |input| {
            let line = String::from_utf8_lossy(input);
            if let Some((start, end, name)) = parse_perf_map_line(&line) {
                assert!(start < end);
                let frame = js_frame_from_perf_map(cut(name, MAX_PERF_MAP_NAME));
                assert!(frame.name.len() <= MAX_PERF_MAP_NAME);
            }
        });
    }

    #[test]
    fn a_perf_map_keeps_no_more_names_than_its_bound() {
        let mut perf_map = PerfMap::new(Process::new(0), None);
        let long = "x".repeat(MAX_PERF_MAP_NAME);
        let mut kept = 0;
        while perf_map.frame_id(&format!("{kept} {long}")).is_some() {
            kept += 1;
        }
        assert!(perf_map.name_bytes <= MAX_PERF_MAP_NAME_BYTES);
        assert!(kept > 1000, "{kept}");
        assert_eq!(cut("aé", 2), "a", "cut at a character boundary");
    }
}
