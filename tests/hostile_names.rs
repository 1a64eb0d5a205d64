//! Names a target chose cannot take over loopbpf's outputs. The fixture's comm (not UTF-8),
//! pod name, JS function name and script path carry terminal escape sequences, line ends,
//! markup and characters XML cannot carry; loopbpf must show them escaped and keep every
//! output well-formed: the terminal's text and diagnostics hold no control character, the flame
//! graph, timeline and index.html parse as XML, the JSON lines and report.json hold none of
//! those characters raw (escaped as `\uXXXX`, they decode to the names unchanged), and the
//! metrics' label values are bounded.

use std::{
    fmt::Write as _,
    fs::{self, File},
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use loopbpf_tests::{Fixture, fixture, loopbpf_bin, node_bin, require_root, wait_until};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);
/// Longest label value loopbpf serves, in bytes.
const MAX_LABEL_BYTES: usize = 128;

/// What `diag::printable` makes of a target's text: control characters, bidirectional
/// overrides and U+FFFE/U+FFFF as visible escapes. Written out again here, from the spec, so
/// the test does not trust the code it tests.
fn escaped(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0'..='\x1f' | '\x7f' => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            '\u{80}'..='\u{9f}'
            | '\u{200e}'
            | '\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2066}'..='\u{2069}'
            | '\u{fffe}'
            | '\u{ffff}' => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// The fixture in a cgroup named like a Kubernetes pod's, with a hostile `HOSTNAME` (which
/// loopbpf takes for the pod's name), and what it says its names are.
struct Hostile {
    node: Fixture,
    cgroup: PathBuf,
    /// The blocking function's name and script, as the fixture wrote them.
    name: String,
    file: String,
    hostname: String,
}

impl Hostile {
    fn start() -> Self {
        // A pod uid: 8-4-4-4-12 hex digits.
        let uid = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            std::process::id(),
            std::time::SystemTime::UNIX_EPOCH
                .elapsed()
                .unwrap()
                .as_nanos()
                & 0xffff_ffff_ffff
        );
        let cgroup = PathBuf::from(format!("/sys/fs/cgroup/pids/loopbpf-hostile-pod{uid}"));
        fs::create_dir(&cgroup).unwrap_or_else(|e| {
            panic!(
                "cannot create the cgroup {} ({e}): the test needs a writable cgroup v1 pids hierarchy",
                cgroup.display()
            )
        });
        let hostname = format!("web\x1b[31m-{}", "p".repeat(300));
        let mut command = Command::new("sh");
        command
            .args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$1" "$2""#])
            .arg(&cgroup)
            .arg(node_bin())
            .arg(fixture("hostile-names.js"))
            .env("HOSTNAME", &hostname);
        let node = Fixture::start_command(command);
        let ready: Value = node
            .out
            .seen
            .iter()
            .find_map(|l| {
                serde_json::from_str(l)
                    .ok()
                    .filter(|v: &Value| v["ready"] == true)
            })
            .expect("the fixture's ready line");
        let comm = fs::read(format!("/proc/{}/comm", node.pid())).unwrap();
        assert_eq!(
            comm, b"evil\x1b[31m<x>&\xff\n",
            "the fixture could not give itself its comm"
        );
        Self {
            // As loopbpf reads V8's strings: a lone surrogate becomes U+FFFD.
            name: String::from_utf16_lossy(
                &ready["name"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|unit| u16::try_from(unit.as_u64().unwrap()).unwrap())
                    .collect::<Vec<u16>>(),
            ),
            file: ready["file"].as_str().unwrap().to_owned(),
            node,
            cgroup,
            hostname,
        }
    }

    fn pid(&self) -> u32 {
        self.node.pid()
    }

    /// Blocks the fixture's loop in the hostile function for 300 ms.
    fn block(&mut self) {
        self.node.send("block 300");
        self.node.done("block", TIMEOUT);
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = self.node.child.kill();
        let _ = self.node.child.wait();
        // The cgroup empties a moment after its process is reaped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.cgroup).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// loopbpf with its stdout and stderr in files, to check them byte for byte.
struct Run {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Run {
    fn start(name: &str, args: &[&str]) -> Self {
        let dir = std::env::temp_dir();
        let stdout = dir.join(format!("loopbpf-hostile-{name}-{}.out", std::process::id()));
        let stderr = dir.join(format!("loopbpf-hostile-{name}-{}.err", std::process::id()));
        let child = Command::new(loopbpf_bin())
            .args(args)
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("cannot start loopbpf");
        let run = Self {
            child,
            stdout,
            stderr,
        };
        wait_until("loopbpf to attach", TIMEOUT, || {
            run.err().contains("watching pid")
        });
        run
    }

    fn out(&self) -> String {
        text_of(&self.stdout)
    }

    fn err(&self) -> String {
        text_of(&self.stderr)
    }

    /// Ctrl-C, and a clean exit.
    fn stop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(
            unsafe { libc::kill(self.child.id().cast_signed(), libc::SIGINT) },
            0
        );
        self.wait();
    }

    fn wait(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "loopbpf did not end: {}",
                self.err()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "loopbpf failed ({status}): {}",
            self.err()
        );
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.stdout);
        let _ = fs::remove_file(&self.stderr);
    }
}

/// A file loopbpf wrote, which must be UTF-8.
fn text_of(path: &Path) -> String {
    String::from_utf8(fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not UTF-8: {e}", path.display()))
}

/// Panics on any control character but the line end in what a terminal would show.
fn assert_no_control_characters(what: &str, text: &str) {
    if let Some(c) = text.chars().find(|&c| c.is_control() && c != '\n') {
        panic!("{what} holds the raw control character {c:?}:\n{text:?}");
    }
}

/// Panics on any character a terminal acts on but the line end in JSON loopbpf wrote: JSON
/// itself requires only C0 escaped, loopbpf escapes DEL, C1, the bidirectional overrides and
/// U+FFFE/U+FFFF too (as `\uXXXX`, which decodes to the same string).
fn assert_json_escapes_all(what: &str, json: &str) {
    let raw = |c: char| {
        matches!(
            c,
            '\0'..='\x09'
                | '\x0b'..='\x1f'
                | '\x7f'..='\u{9f}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{fffe}'
                | '\u{ffff}'
        )
    };
    if let Some(c) = json.chars().find(|&c| raw(c)) {
        panic!("{what} holds the raw character {c:?}:\n{json:?}");
    }
}

/// Parses XML (an SVG, index.html) and returns all its text, unescaped.
fn xml_text(path: &Path) -> String {
    let text = text_of(path);
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(&text, options)
        .unwrap_or_else(|e| panic!("{} is not well-formed XML: {e}", path.display()));
    let mut all = String::new();
    for node in doc.descendants().filter(roxmltree::Node::is_text) {
        all.push_str(node.text().unwrap_or_default());
    }
    assert_no_control_characters(&path.display().to_string(), &all);
    all
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(address: &str) -> Option<String> {
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(TIMEOUT)).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response.split_once("\r\n\r\n")?.1.to_owned())
}

/// The value of label `name` in an exposition line, unescaped.
fn label(line: &str, name: &str) -> String {
    let start = line
        .find(&format!("{name}=\""))
        .unwrap_or_else(|| panic!("no {name} label in {line}"))
        + name.len()
        + 2;
    let mut value = String::new();
    let mut chars = line[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return value,
            '\\' => match chars.next() {
                Some('n') => value.push('\n'),
                Some(other) => value.push(other),
                None => break,
            },
            c => value.push(c),
        }
    }
    panic!("unterminated {name} label in {line}");
}

#[test]
fn terminal_flame_graph_and_metrics_show_hostile_names_escaped() {
    require_root();
    let mut hostile = Hostile::start();
    let pid = hostile.pid().to_string();
    let svg = std::env::temp_dir().join(format!("loopbpf-hostile-{}.svg", std::process::id()));
    let address = format!("127.0.0.1:{}", free_port());
    let mut run = Run::start(
        "text",
        &[
            "--pid",
            &pid,
            "--flamegraph",
            svg.to_str().unwrap(),
            "--metrics",
            &address,
        ],
    );
    hostile.block();
    let name = escaped(&hostile.name);
    let file = escaped(&hostile.file);
    wait_until("the block's call tree on the terminal", TIMEOUT, || {
        run.out().contains(&name)
    });
    let mut exposition = String::new();
    wait_until("the process's series on /metrics", TIMEOUT, || {
        exposition = scrape(&address).unwrap_or_default();
        exposition.contains(&format!("pid=\"{pid}\""))
    });
    run.stop();

    // The terminal: the block's tree names the function and its script, escaped, on one line;
    // the diagnostics name the comm, escaped and lossily decoded.
    let out = run.out();
    let err = run.err();
    assert_no_control_characters("loopbpf's stdout", &out);
    assert_no_control_characters("loopbpf's stderr", &err);
    assert!(
        out.lines()
            .any(|l| l.contains(&name) && l.contains(&format!("{file}:"))),
        "no tree line names `{name}` in `{file}`:\n{out}"
    );
    let comm = r"evil\x1b[31m<x>&\u{fffd}".replace(r"\u{fffd}", "\u{fffd}");
    assert!(
        err.contains(&format!("watching pid {pid} ({comm})")),
        "the comm is not shown escaped:\n{err}"
    );

    // The flame graph: well-formed, the frame named as the terminal names it (`;` separates
    // frames in the folded format, so it shows as `:`).
    let text = xml_text(&svg);
    let _ = fs::remove_file(&svg);
    assert!(
        text.contains(&name.replace(';', ":")),
        "the flame graph does not name `{name}`:\n{text}"
    );

    // The metrics: printable label values, the pod name cut to the bound.
    let line = exposition
        .lines()
        .find(|l| l.starts_with("loopbpf_event_loop_iterations_total{"))
        .unwrap_or_else(|| panic!("no iterations series:\n{exposition}"));
    assert_no_control_characters("/metrics", &exposition);
    assert_eq!(label(line, "comm"), comm, "{line}");
    let pod = label(line, "pod");
    assert!(
        pod.len() <= MAX_LABEL_BYTES && pod.ends_with("..."),
        "pod label of {} bytes: {pod}",
        pod.len()
    );
    assert!(
        escaped(&hostile.hostname).starts_with(pod.trim_end_matches("...")),
        "{pod}"
    );
}

#[test]
fn record_bundle_is_well_formed_with_hostile_names() {
    require_root();
    let mut hostile = Hostile::start();
    let pid = hostile.pid().to_string();
    let dir = std::env::temp_dir().join(format!("loopbpf-hostile-bundle-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let mut run = Run::start(
        "record",
        &[
            "record",
            "--pid",
            &pid,
            "--out",
            dir.to_str().unwrap(),
            "--stop-after-blocks",
            "1",
        ],
    );
    hostile.block();
    run.wait();
    assert_no_control_characters("loopbpf record's stderr", &run.err());

    let name = escaped(&hostile.name);
    let page = xml_text(&dir.join("index.html"));
    assert!(
        page.contains(&format!("{name} {}:", escaped(&hostile.file))),
        "index.html does not name `{name}`:\n{page}"
    );
    assert!(
        page.contains("(evil\\x1b[31m<x>&\u{fffd})"),
        "index.html does not name the comm:\n{page}"
    );
    let flame = xml_text(&dir.join("flamegraph.svg"));
    assert!(flame.contains(&name.replace(';', ":")), "{flame}");
    let timeline = xml_text(&dir.join("timeline.svg"));
    assert!(
        timeline.contains(&name),
        "the timeline's tooltip: {timeline}"
    );
    // report.json: escaped, and decoding to the names as the fixture wrote them.
    let json = text_of(&dir.join("report.json"));
    assert_json_escapes_all("report.json", &json);
    let report: Value = serde_json::from_str(&json).expect("report.json parses");
    let block = &report["blocks"][0];
    assert_eq!(block["comm"], "evil\x1b[31m<x>&\u{fffd}", "{block}");
    assert!(
        frames_of(block)
            .any(|f| f["name"] == hostile.name.as_str() && f["file"] == hostile.file.as_str()),
        "report.json does not name `{name}`: {block}"
    );
    let report = text_of(&dir.join("report.txt"));
    assert_no_control_characters("report.txt", &report);
    assert!(report.contains(&name), "{report}");
    let _ = fs::remove_dir_all(&dir);
}

/// Every frame of every stack of a JSON block.
fn frames_of(block: &Value) -> impl Iterator<Item = &Value> {
    block["stacks"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|stack| stack["frames"].as_array().into_iter().flatten())
}

#[test]
fn json_lines_escape_hostile_names() {
    require_root();
    let mut hostile = Hostile::start();
    let pid = hostile.pid().to_string();
    let mut run = Run::start("json", &["--pid", &pid, "--json"]);
    hostile.block();
    let named = |line: &str| {
        serde_json::from_str::<Value>(line).is_ok_and(|v| {
            v["event"] == "block" && frames_of(&v).any(|f| f["name"] == hostile.name.as_str())
        })
    };
    wait_until("the block's JSON line naming the function", TIMEOUT, || {
        run.out().lines().any(named)
    });
    run.stop();

    // Raw, the lines hold nothing a terminal acts on; parsed, they give the names unchanged.
    let out = run.out();
    assert_json_escapes_all("loopbpf --json", &out);
    assert_no_control_characters("loopbpf's stderr", &run.err());
    assert!(
        out.contains("\\u009b\\u007f\\ufffe\u{fffd}\\u202e 5"),
        "the function's name is not escaped as expected:\n{out}"
    );
    let block: Value = out
        .lines()
        .find(|l| named(l))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap();
    assert_eq!(block["comm"], "evil\x1b[31m<x>&\u{fffd}", "{block}");
    assert!(
        frames_of(&block).any(|f| f["file"] == hostile.file.as_str()),
        "no frame in `{}`: {block}",
        hostile.file
    );
    for line in out.lines() {
        serde_json::from_str::<Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
    }
}
