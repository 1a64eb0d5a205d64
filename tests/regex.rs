//! Regular expressions named: a regex that backtracks catastrophically in a real npm package,
//! pinned to its vulnerable version (semver 7.5.1, marked 4.0.9, moment 2.29.3), blocks the
//! loop inside compiled regexp code.
//! The block's heaviest stack must name the regex (`RegExp /<source>/<flags>`, the source as
//! JavaScript gives it, cut at 60 characters) as its leaf JS frame, and below it the package's
//! function that ran it, in the package's file, at the line the package source has it.

use std::time::Duration;

use loopbpf_tests::{Fixture, Loopbpf, node_of, npm_package, require_root};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_mins(1);
/// Characters of a regexp's source loopbpf shows.
const MAX_SOURCE: usize = 60;

/// One package's catastrophic regex: the input size that blocks for a few hundred ms, the
/// function that runs the regex (in `file` of the package), the text of the line it is defined
/// on and of the line that runs the regex.
struct Redos {
    package: &'static str,
    size: u32,
    function: &'static str,
    file: &'static str,
    defined_at: &'static str,
    runs_at: &'static str,
}

const SEMVER: Redos = Redos {
    package: "semver",
    size: 150,
    function: "Range.parseRange",
    file: "classes/range.js",
    defined_at: "  parseRange (range) {",
    runs_at: "range.replace(re[t.COMPARATORTRIM], comparatorTrimReplace)",
};
const MARKED: Redos = Redos {
    package: "marked",
    size: 400,
    function: "Tokenizer.def",
    file: "lib/marked.cjs",
    defined_at: "_proto.def = function def(src) {",
    runs_at: "this.rules.block.def.exec(src)",
};
const MOMENT: Redos = Redos {
    package: "moment",
    size: 15_000,
    function: "preprocessRFC2822",
    file: "moment.js",
    defined_at: "function preprocessRFC2822(s) {",
    runs_at: ".replace(/\\([^)]*\\)|[\\n\\t]/g, ' ')",
};

/// The 1-based line of the package file whose text contains `text`.
fn line_of(path: &std::path::Path, text: &str) -> u64 {
    let source = std::fs::read_to_string(path).unwrap();
    let at = source
        .lines()
        .position(|l| l.contains(text))
        .unwrap_or_else(|| panic!("{} has no line with {text:?}", path.display()));
    at as u64 + 1
}

/// How loopbpf names a regexp with this source and these flags.
fn expected_name(source: &str, flags: &str) -> String {
    let cut: String = source.chars().take(MAX_SOURCE).collect();
    let ellipsis = if source.chars().count() > MAX_SOURCE {
        "…"
    } else {
        ""
    };
    format!("RegExp /{cut}{ellipsis}/{flags}")
}

/// The named JS frames of a stack (without `[JS]`), leaf first.
fn js_frames(stack: &Value) -> Vec<&Value> {
    stack["frames"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "js" && f["name"] != "[JS]")
        .collect()
}

fn names_the_regex(major: u32, redos: &Redos) {
    names_the_regex_with(major, redos, &[]);
}

/// The same, node run with `node_flags`.
fn names_the_regex_with(major: u32, redos: &Redos, node_flags: &[&str]) {
    require_root();
    let package = npm_package(redos.package);
    let script = package.join(redos.file);
    let (defined, runs) = (
        line_of(&script, redos.defined_at),
        line_of(&script, redos.runs_at),
    );
    let (truth, frames) = run_redos(major, redos.package, redos.size, node_flags);
    let regexp = expected_name(
        truth["source"].as_str().unwrap(),
        truth["flags"].as_str().unwrap(),
    );
    let shown: Vec<String> = frames
        .iter()
        .map(|f| format!("{} {}:{}", f["name"], f["file"], f["line"]))
        .collect();
    assert!(
        frames.len() >= 2,
        "Node {major}: {}: too few JS frames: {shown:?}",
        redos.package
    );
    assert_eq!(
        frames[0]["name"].as_str().unwrap(),
        regexp,
        "Node {major}: {}: the leaf names the regex; frames {shown:?}",
        redos.package
    );
    let caller = &frames[1];
    let name = caller["name"].as_str().unwrap();
    // The class of a method call may go unsaid (see js_names.rs), never be another.
    let method = redos.function.rsplit('.').next().unwrap();
    assert!(
        name == redos.function || name == method,
        "Node {major}: {}: {name} ran the regex, not {}; frames {shown:?}",
        redos.package,
        redos.function
    );
    assert_eq!(
        caller["file"].as_str(),
        Some(script.to_str().unwrap()),
        "Node {major}: {}",
        redos.package
    );
    // Exact for an interpreted frame; a compiled one is placed where its function starts.
    let line = caller["line"].as_u64();
    assert!(
        line == Some(runs) || line == Some(defined),
        "Node {major}: {}: {name} at line {line:?}, not {runs} (or {defined}, where it starts)",
        redos.package
    );
}

/// Runs the fixture's `which` catastrophic regex on input `size` under loopbpf: the regex's source and
/// flags as JavaScript gives them, and the named JS frames of the block's heaviest on-CPU
/// stack, leaf first.
fn run_redos(major: u32, which: &str, size: u32, node_flags: &[&str]) -> (Value, Vec<Value>) {
    let node = node_of(major);
    let mut fixture = Fixture::start_script(node.to_str().unwrap(), "redos.js", node_flags);
    let ready = fixture.ready();
    let truth = ready["regexps"][which].clone();
    let pid = fixture.pid();
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid.to_string(), "--json"]);
    fixture.send(&format!("{which} {size}"));
    let done = fixture.done(which, TIMEOUT);
    let ms = done["ms"].as_f64().unwrap();
    assert!(
        ms >= 150.0,
        "Node {major}: the {which} ReDoS blocked only {ms:.0} ms: the input is too small"
    );
    let block = loopbpf.wait_for_block(pid, TIMEOUT);
    loopbpf.stop(TIMEOUT);
    let heaviest = block["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["on_cpu"] == true)
        .max_by(|a, b| {
            a["weight_ms"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["weight_ms"].as_f64().unwrap())
        })
        .expect("a block with no on-CPU stack");
    let frames = js_frames(heaviest).into_iter().cloned().collect();
    (truth, frames)
}

/// An app's own pattern with a raw control character (BEL) and flags: the control character
/// is shown escaped, the flags in the order `RegExp.prototype.flags` gives them.
#[test]
fn node20_control_characters_and_flags_are_shown_escaped() {
    require_root();
    let (truth, frames) = run_redos(20, "control", 20, &[]);
    assert_eq!(truth["source"], "^(\\w+\\s?)*\u{7}$");
    assert_eq!(truth["flags"], "dgimsy");
    assert_eq!(
        frames.first().and_then(|f| f["name"].as_str()),
        Some("RegExp /^(\\w+\\s?)*\\x07$/dgimsy"),
        "frames {frames:?}"
    );
}

#[test]
fn node20_semver_range_names_the_regex() {
    names_the_regex(20, &SEMVER);
}

#[test]
fn node20_marked_definition_names_the_regex() {
    names_the_regex(20, &MARKED);
}

#[test]
fn node20_moment_parens_names_the_regex() {
    names_the_regex(20, &MOMENT);
}

/// V8's regexp interpreter (bytecode, as before a regexp tiers up): the leaf is native code of
/// the node binary, and the regex is named above the builtin that was called with it.
#[test]
fn node20_semver_range_in_the_regexp_interpreter_names_the_regex() {
    names_the_regex_with(20, &SEMVER, &["--regexp-interpret-all"]);
}

#[test]
fn node22_semver_range_in_the_regexp_interpreter_names_the_regex() {
    names_the_regex_with(22, &SEMVER, &["--regexp-interpret-all"]);
}

#[test]
fn node18_semver_range_in_the_regexp_interpreter_names_the_regex() {
    names_the_regex_with(18, &SEMVER, &["--regexp-interpret-all"]);
}

#[test]
fn node24_semver_range_in_the_regexp_interpreter_names_the_regex() {
    names_the_regex_with(24, &SEMVER, &["--regexp-interpret-all"]);
}

#[test]
fn node26_semver_range_in_the_regexp_interpreter_names_the_regex() {
    names_the_regex_with(26, &SEMVER, &["--regexp-interpret-all"]);
}

#[test]
fn node26_semver_range_names_the_regex() {
    names_the_regex(26, &SEMVER);
}

#[test]
fn node18_semver_range_names_the_regex() {
    names_the_regex(18, &SEMVER);
}

#[test]
fn node22_semver_range_names_the_regex() {
    names_the_regex(22, &SEMVER);
}

#[test]
fn node24_semver_range_names_the_regex() {
    names_the_regex(24, &SEMVER);
}
