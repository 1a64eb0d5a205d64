//! `loopbpf record`: the evidence bundle of a real node process, and the actions taken while
//! its loop is still blocked: a core dump that gdb opens with the blocking native code on the
//! stack, a heap snapshot from node's own signal handler, a command, at most `--max-triggers`
//! times. A hung process and Ctrl-C still leave a whole bundle.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use loopbpf_tests::{
    Fixture, Loopbpf, assert_block_close, installed_node, require_root, wait_until,
    wait_until_stuck,
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_mins(1);

/// A fresh bundle directory for one test.
fn bundle_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loopbpf-bundle-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

fn record(pid: u32, dir: &Path, more: &[&str]) -> Loopbpf {
    let pid = pid.to_string();
    let dir = dir.to_str().unwrap();
    let mut args = vec!["record", "--pid", &pid, "--out", dir];
    args.extend_from_slice(more);
    Loopbpf::attach(&args)
}

fn report(dir: &Path) -> Value {
    serde_json::from_slice(&fs::read(dir.join("report.json")).expect("report.json"))
        .expect("report.json is JSON")
}

/// Parses an SVG file as XML and returns its text.
fn valid_svg(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // inferno's flame graphs declare the SVG DTD.
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(&text, options)
        .unwrap_or_else(|e| panic!("{} is not well-formed XML: {e}", path.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    text
}

/// Waits until the bundle's report (rewritten every few seconds while recording) holds
/// `count` blocks: loopbpf has taken them in.
fn wait_for_blocks_in_report(dir: &Path, count: usize) {
    let path = dir.join("report.json");
    wait_until(
        &format!("{count} blocks in {}", path.display()),
        TIMEOUT,
        || {
            fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
                .is_some_and(|r| r["blocks"].as_array().map(Vec::len) == Some(count))
        },
    );
}

/// Waits until node (in the fixtures' working directory) has written a whole heap snapshot
/// of `pid`: one that ends its JSON.
fn wait_for_heap_snapshot(pid: u32) {
    let tag = format!(".{pid}.");
    wait_until(
        &format!("node's heap snapshot of pid {pid}"),
        TIMEOUT,
        || {
            fs::read_dir(std::env::temp_dir()).unwrap().any(|entry| {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                name.contains(&tag)
                    && name.ends_with(".heapsnapshot")
                    && fs::read(&path).is_ok_and(|b| b.trim_ascii_end().ends_with(b"}"))
            })
        },
    );
}

fn frame_names(block: &Value) -> Vec<String> {
    block["stacks"]
        .as_array()
        .map(|stacks| {
            stacks
                .iter()
                .flat_map(|s| s["frames"].as_array().cloned().unwrap_or_default())
                .filter_map(|f| f["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_bundle_holds_every_file_and_they_agree() {
    require_root();
    let mut node = Fixture::start();
    let dir = bundle_dir("files");
    let loopbpf = record(node.pid(), &dir, &[]);
    node.send("block timer spin 300");
    let spin = node.done("block", TIMEOUT);
    node.send("block immediate crypto 250");
    let crypto = node.done("block", TIMEOUT);
    wait_for_blocks_in_report(&dir, 2);
    // Ended by Ctrl-C, mid-recording.
    loopbpf.stop(TIMEOUT);

    for file in [
        "report.txt",
        "report.json",
        "flamegraph.svg",
        "timeline.svg",
        "index.html",
    ] {
        assert!(dir.join(file).exists(), "{file} missing from the bundle");
    }
    let report = report(&dir);
    let blocks = report["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    assert_block_close(&blocks[0], &spin, "spin in report.json");
    assert_block_close(&blocks[1], &crypto, "crypto in report.json");
    assert!(frame_names(&blocks[0]).iter().any(|n| n == "Object.spin"));
    assert!(frame_names(&blocks[1]).iter().any(|n| n.contains("PBKDF2")));
    assert_eq!(report["summary"]["loops"][0]["blocks"], 2);
    assert!(!report["elu"][0]["points"].as_array().unwrap().is_empty());

    // The text report tells the same blocks, with the terminal's wording.
    let text = fs::read_to_string(dir.join("report.txt")).unwrap();
    // `01:04:41.093  16605    main       blocked   303.5 ms, GC 2.8 ms (1%)`
    let text_ms: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split_once(" blocked   "))
        .filter_map(|(_, rest)| rest.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(text_ms.len(), blocks.len(), "{text}");
    for (block, shown) in blocks.iter().zip(&text_ms) {
        let ms = block["duration_ms"].as_f64().unwrap();
        // The text shows 0.1 ms, the JSON 0.01 ms.
        assert!(
            (ms - shown).abs() <= 0.06,
            "report.txt shows {shown} ms for the {ms} ms block:\n{text}"
        );
    }
    // The tree folds a chain of frames between its branches, so a native frame such as
    // OpenSSL's PBKDF2 may be folded away; the app's own frames never are.
    assert!(
        text.contains("Object.crypto") && text.contains("Object.spin") && text.contains("Summary:"),
        "report.txt does not name the blocking functions, or has no summary:\n{text}"
    );

    let flame = valid_svg(&dir.join("flamegraph.svg"));
    assert!(flame.contains("Object.spin") && flame.contains("PBKDF2"));
    let timeline = valid_svg(&dir.join("timeline.svg"));
    assert!(
        timeline.contains("in Object.spin"),
        "the timeline names the blocking function"
    );
    assert_eq!(
        timeline.matches("fill=\"#d62728\"").count(),
        2,
        "two blocks"
    );
    let page = fs::read_to_string(dir.join("index.html")).unwrap();
    assert!(page.contains("timeline.svg") && page.contains("flamegraph.svg"));
    assert!(page.contains("Object.spin") && page.contains("2 blocks"));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_hung_process_gets_its_bundle_within_seconds() {
    require_root();
    let mut node = Fixture::start();
    node.send("hang");
    // Stuck before loopbpf attaches: the block must have begun before the attach.
    wait_until_stuck(node.pid());
    let dir = bundle_dir("hung");
    let started = Instant::now();
    let loopbpf = record(node.pid(), &dir, &["--stop-after-blocks", "1"]);
    let (status, _) = loopbpf.finish(TIMEOUT);
    let took = started.elapsed();
    assert!(status.success(), "loopbpf record failed: {status}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    let report = report(&dir);
    let blocks = report["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 1, "{blocks:?}");
    assert_eq!(blocks[0]["event"], "ongoing");
    assert_eq!(blocks[0]["started_before_attach"], true);
    assert!(
        frame_names(&blocks[0]).iter().any(|n| n.ends_with("hang")),
        "{:?}",
        frame_names(&blocks[0])
    );
    assert!(node.is_running(), "the target must survive");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn the_core_trigger_dumps_the_process_while_it_runs_the_blocking_code() {
    require_root();
    let mut node = Fixture::start();
    let dir = bundle_dir("core");
    let loopbpf = record(
        node.pid(),
        &dir,
        &["--on-block", "core", "--on-block-min", "500ms"],
    );
    // gcore starts gdb before it stops the target: on a loaded machine that has taken over
    // 2.5 s, and a core taken after the block shows the loop after it.
    node.send("block timer crypto 6000");
    node.done("block", TIMEOUT);
    loopbpf.stop(TIMEOUT);

    let report = report(&dir);
    let triggers = report["triggers"].as_array().unwrap();
    assert_eq!(triggers.len(), 1, "{triggers:?}");
    assert_eq!(triggers[0]["outcome"], "done", "{triggers:?}");
    let core = PathBuf::from(triggers[0]["file"].as_str().unwrap());
    assert_eq!(
        fs::metadata(&core).unwrap().len(),
        triggers[0]["size_bytes"].as_u64().unwrap()
    );
    assert!(triggers[0]["blocked_ms"].as_f64().unwrap() >= 500.0);
    // A core holds the target's secrets: only loopbpf's user reads it, and gdb's log.
    for file in [core.clone(), dir.join("gcore-1.log")] {
        let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", file.display());
    }
    let gdb = Command::new("gdb")
        .args(["-batch", "-ex", "bt 30"])
        .arg(installed_node())
        .arg(&core)
        .output()
        .expect("gdb (Debian's gdb): run scripts/install-deps.sh");
    let backtrace = String::from_utf8_lossy(&gdb.stdout);
    assert!(
        backtrace.contains("PKCS5_PBKDF2_HMAC") && backtrace.contains("node::crypto"),
        "the loop thread's backtrace is not in the blocking code:\n{backtrace}"
    );
    assert!(node.is_running(), "the target must survive its core dump");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn the_signal_trigger_gets_a_heap_snapshot() {
    require_root();
    let mut node = Fixture::start_with(&["--heapsnapshot-signal=SIGUSR2"]);
    let dir = bundle_dir("heap");
    let loopbpf = record(
        node.pid(),
        &dir,
        &["--on-block", "signal:SIGUSR2", "--on-block-min", "200ms"],
    );
    node.send("block timer spin 1000");
    node.done("block", TIMEOUT);
    // Node writes the snapshot once its loop is free again.
    wait_for_heap_snapshot(node.pid());
    loopbpf.stop(TIMEOUT);

    let report = report(&dir);
    let trigger = &report["triggers"][0];
    assert_eq!(trigger["action"], "signal:SIGUSR2");
    assert_eq!(trigger["outcome"], "done", "{trigger}");
    let snapshot = PathBuf::from(trigger["file"].as_str().unwrap());
    assert!(
        snapshot.extension().is_some_and(|e| e == "heapsnapshot"),
        "{snapshot:?}"
    );
    let head = fs::read(&snapshot).unwrap();
    assert!(head.starts_with(b"{\"snapshot\":"), "not a heap snapshot");
    assert!(node.is_running());
    let _ = fs::remove_file(snapshot);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn max_triggers_holds_under_a_burst_of_blocks() {
    require_root();
    let mut node = Fixture::start();
    let dir = bundle_dir("burst");
    let fired = dir.join("fired.txt");
    let action = format!(
        "exec:echo $LOOPBPF_PID $LOOPBPF_THREAD $LOOPBPF_BLOCKED_MS >> {}",
        fired.display()
    );
    let loopbpf = record(
        node.pid(),
        &dir,
        &["--on-block", &action, "--max-triggers", "2"],
    );
    for _ in 0..5 {
        node.send("block timer spin 250");
        node.done("block", TIMEOUT);
    }
    wait_for_blocks_in_report(&dir, 5);
    loopbpf.stop(TIMEOUT);

    let lines: Vec<String> = fs::read_to_string(&fired)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields[0], node.pid().to_string());
        assert_eq!(fields[1], "main");
        let blocked: f64 = fields[2].parse().unwrap();
        assert!((100.0..250.0).contains(&blocked), "{line}");
    }
    let report = report(&dir);
    assert_eq!(report["triggers"].as_array().unwrap().len(), 2);
    assert_eq!(report["blocks"].as_array().unwrap().len(), 5);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn bad_record_arguments_say_what_to_do() {
    require_root();
    for (args, expected) in [
        (&["record", "--out", "/tmp/x"][..], "--pid"),
        (
            &[
                "record",
                "--pid",
                "1",
                "--out",
                "/tmp/x",
                "--on-block",
                "dump",
            ],
            "core",
        ),
        (
            &[
                "record",
                "--pid",
                "999999999",
                "--out",
                "/tmp/loopbpf-never",
            ],
            "no process",
        ),
    ] {
        let output = Command::new(loopbpf_tests::loopbpf_bin())
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert!(!Path::new("/tmp/loopbpf-never").exists());
    let node = Fixture::start();
    let output = Command::new(loopbpf_tests::loopbpf_bin())
        .args(["record", "--pid", &node.pid().to_string()])
        .args(["--out", "/proc/no/such/dir"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot create"));
}
