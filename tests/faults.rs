//! Bad input and faults: one clear line and a non-zero exit, never a panic or a hang, and a
//! target that is never harmed, whatever happens to loopbpf.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::Duration,
};

use loopbpf_tests::{
    Fixture, Loopbpf, bpftool, events, fixture, installed_node, loopbpf_bin, node_bin, node_of,
    poll_until, require_root, wait_until, workspace,
};

/// Runs loopbpf to completion (through `wrapper` if given, e.g. `unshare`), with a time limit.
fn loopbpf_output(wrapper: &[&str], args: &[&str]) -> Output {
    let bin = loopbpf_bin();
    let mut command = if let Some((first, rest)) = wrapper.split_first() {
        let mut c = Command::new(first);
        c.args(rest).arg(&bin);
        c
    } else {
        Command::new(&bin)
    };
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start loopbpf");
    let pid = child.id();
    // A deadline, not a wait: a loopbpf that hangs is killed and fails its test.
    let watchdog = thread::spawn(move || {
        thread::sleep(Duration::from_secs(30));
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let output = child.wait_with_output().unwrap();
    drop(watchdog);
    output
}

/// The error a user sees: exactly one line, prefixed, saying `needle`; a failing exit code.
fn assert_one_line_error(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "must fail; stderr: {stderr}");
    assert_ne!(
        output.status.code(),
        Some(101),
        "a panic is not an error message: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of error: {stderr}");
    assert!(lines[0].starts_with("loopbpf: error: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "expected `{needle}` in: {stderr}"
    );
}

/// A node whose loop runs and waits: started, and ready once its loop ran a callback.
fn spawn_idle_node(node: &str) -> Fixture {
    let mut command = Command::new(node);
    command.args([
        "-e",
        "setInterval(() => {}, 100); setImmediate(() => console.log('{\"ready\":true}'));",
    ]);
    Fixture::start_command(command)
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn no_such_pid() {
    require_root();
    let pid_max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let last: u32 = fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // A free pid that the kernel hands out again only after every pid past its last one: not
    // the highest free pid, which loopbpf itself was given once, pids having wrapped around.
    let free = |p: &u32| !Path::new(&format!("/proc/{p}")).exists();
    let pid = (300..last.saturating_sub(100))
        .rev()
        .find(free)
        .or_else(|| (last.saturating_add(1000)..pid_max).find(free))
        .expect("a free pid");
    let output = loopbpf_output(&[], &["--pid", &pid.to_string()]);
    assert_one_line_error(&output, &format!("no process with pid {pid}"));
}

#[test]
fn a_process_that_is_not_a_libuv_program() {
    require_root();
    let sleeper = Killed(Command::new("sleep").arg("30").spawn().unwrap());
    // Judged by its mapped libraries too: past the dynamic loader's work.
    let maps = format!("/proc/{}/maps", sleeper.0.id());
    wait_until("`sleep` to map libc", Duration::from_secs(10), || {
        fs::read_to_string(&maps).is_ok_and(|m| m.contains("libc"))
    });
    let output = loopbpf_output(&[], &["--pid", &sleeper.0.id().to_string()]);
    assert_one_line_error(&output, "is not a libuv program: no `uv__io_poll`");
}

#[test]
fn a_stripped_node_binary_is_named_as_the_likely_cause() {
    require_root();
    let dir = std::env::temp_dir().join(format!("loopbpf-stripped-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let stripped = dir.join("node");
    let status = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(installed_node())
        .status()
        .expect("strip (binutils) is needed for this test");
    assert!(status.success());
    let target = spawn_idle_node(stripped.to_str().unwrap());
    let output = loopbpf_output(&[], &["--pid", &target.pid().to_string()]);
    drop(target);
    let _ = fs::remove_dir_all(&dir);
    // Node exports libuv's API: its libuv is there, without the symbols loopbpf probes.
    assert_one_line_error(
        &output,
        &format!(
            "runs a libuv without symbols: {} is stripped (it has libuv's API but no `uv__io_poll`",
            stripped.display()
        ),
    );
    assert_one_line_error(&output, "official Node.js builds do");
}

/// A file installed for a test, removed with its directory (when it made it and it is empty).
struct Installed {
    file: PathBuf,
    made_dir: bool,
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.file);
        if self.made_dir
            && let Some(dir) = self.file.parent()
        {
            let _ = fs::remove_dir(dir);
        }
    }
}

#[test]
fn a_stripped_libuv_is_watched_with_its_debug_file() {
    require_root();
    let dir = std::env::temp_dir().join(format!("loopbpf-uvdebug-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    // libuv linked in and exported (`-rdynamic`, as node does), with a build ID; its debug
    // file split off, then the program stripped, as distributions ship them.
    let program = dir.join("uv-debug");
    let status = Command::new("clang-19")
        .args(["-O1", "-rdynamic", "-Wl,--build-id=sha1", "-o"])
        .arg(&program)
        .arg(fixture("uv-loop.c"))
        .args(["/usr/lib/x86_64-linux-gnu/libuv_a.a", "-lpthread", "-ldl"])
        .status()
        .expect("clang-19: run scripts/install-deps.sh");
    assert!(status.success(), "clang-19 failed");
    let debug = dir.join("uv-debug.debug");
    for (tool, args) in [
        (
            "objcopy",
            vec![
                "--only-keep-debug".as_ref(),
                program.as_os_str(),
                debug.as_os_str(),
            ],
        ),
        ("strip", vec!["--strip-all".as_ref(), program.as_os_str()]),
    ] {
        let status = Command::new(tool).args(args).status().expect("binutils");
        assert!(status.success(), "{tool} failed");
    }
    let notes = Command::new("readelf")
        .arg("-n")
        .arg(&program)
        .output()
        .expect("binutils");
    let notes = String::from_utf8_lossy(&notes.stdout);
    let id = notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build ID: {notes}"))
        .to_owned();

    let target = Fixture::start_command(Command::new(&program));
    let pid = target.pid().to_string();
    let output = loopbpf_output(&[], &["--pid", &pid]);
    assert_one_line_error(&output, "runs a libuv without symbols: ");
    assert_one_line_error(
        &output,
        "install its debug file (under /usr/lib/debug/.build-id)",
    );

    // Installed where debug packages put it: the same stripped program is watched.
    let build_id_dir = Path::new("/usr/lib/debug/.build-id").join(&id[..2]);
    let installed = Installed {
        file: build_id_dir.join(format!("{}.debug", &id[2..])),
        made_dir: !build_id_dir.exists(),
    };
    fs::create_dir_all(&build_id_dir).unwrap();
    fs::copy(&debug, &installed.file).unwrap();
    let loopbpf = Loopbpf::attach(&["--pid", &pid, "--json", "--duration", "1500ms"]);
    let (status, output) = loopbpf.finish(Duration::from_secs(20));
    drop(installed);
    drop(target);
    let _ = fs::remove_dir_all(&dir);
    assert!(status.success(), "{status}");
    let summary = events(&output, "summary");
    assert!(
        summary[0]["loops"][0]["iterations"].as_u64().unwrap() >= 5,
        "{summary:?}"
    );
}

/// Builds tests/fixtures/uv-loop.c into `dir` against Debian's shared libuv (`static_libuv`:
/// its static `libuv_a.a`, which keeps its symbols).
fn build_uv_loop(dir: &Path, static_libuv: bool) -> PathBuf {
    assert!(
        Path::new("/usr/include/uv.h").exists(),
        "libuv1-dev is needed for this test: run scripts/install-deps.sh"
    );
    let program = dir.join(if static_libuv {
        "uv-static"
    } else {
        "uv-shared"
    });
    let mut command = Command::new("clang-19");
    command
        .args(["-O1", "-o"])
        .arg(&program)
        .arg(fixture("uv-loop.c"));
    if static_libuv {
        command.args(["/usr/lib/x86_64-linux-gnu/libuv_a.a", "-lpthread", "-ldl"]);
    } else {
        command.arg("-luv");
    }
    let status = command
        .status()
        .expect("clang-19: run scripts/install-deps.sh");
    assert!(
        status.success(),
        "clang-19 failed to build {}",
        program.display()
    );
    program
}

#[test]
fn a_stripped_shared_libuv_is_named_with_what_to_do() {
    require_root();
    let dir = std::env::temp_dir().join(format!("loopbpf-uv-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let shared = build_uv_loop(&dir, false);
    let static_build = build_uv_loop(&dir, true);

    // Debian's libuv.so.1 has libuv's API and no `uv__io_poll`: a libuv program all the same.
    let target = Fixture::start_command(Command::new(&shared));
    let output = loopbpf_output(&[], &["--pid", &target.pid().to_string()]);
    drop(target);
    let says = "runs a libuv without symbols: /usr/lib/x86_64-linux-gnu/libuv.so.1.0.0 is stripped";
    assert_one_line_error(&output, says);
    assert_one_line_error(&output, "install its debug symbols (Debian: libuv1-dbgsym");
    assert_one_line_error(&output, "run it with a libuv that keeps its symbols");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("not a libuv program"), "{stderr}");
    // The same before it starts.
    let output = loopbpf_output(&[], &["--", shared.to_str().unwrap()]);
    assert_one_line_error(&output, "runs a libuv without symbols: ");
    assert_one_line_error(&output, "libuv.so.1 is stripped");

    // What the message advises works: the static libuv keeps its symbols, and is watched.
    let target = Fixture::start_command(Command::new(&static_build));
    let pid = target.pid().to_string();
    let loopbpf = Loopbpf::attach(&["--pid", &pid, "--json", "--duration", "1500ms"]);
    let (status, output) = loopbpf.finish(Duration::from_secs(20));
    drop(target);
    let _ = fs::remove_dir_all(&dir);
    assert!(status.success(), "{status}");
    let summary = events(&output, "summary");
    assert!(
        summary[0]["loops"][0]["iterations"].as_u64().unwrap() >= 5,
        "{summary:?}"
    );
}

#[test]
fn without_root_or_capabilities() {
    require_root();
    let target = spawn_idle_node(&node_bin());
    let output = loopbpf_output(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
        &["--pid", &target.pid().to_string()],
    );
    assert_one_line_error(
        &output,
        "needs root, or the capabilities CAP_BPF and CAP_PERFMON",
    );
}

#[test]
fn tracefs_not_mounted_is_mounted_for_the_user() {
    require_root();
    let target = spawn_idle_node(&node_bin());
    let bin = loopbpf_bin();
    let script = format!(
        "umount /sys/kernel/tracing 2>/dev/null; \
         if grep -q ' /sys/kernel/tracing ' /proc/self/mounts; then echo still-mounted; exit 3; fi; \
         exec {} --pid {} --duration 1s",
        bin.display(),
        target.pid()
    );
    let output = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("Summary"),
        "{stderr}"
    );
}

/// loopbpf, attached to an idle node, in a private mount namespace set up by `setup` (shell),
/// started through `runner` (e.g. `setpriv ...`, or nothing).
fn loopbpf_in_mount_namespace(setup: &str, runner: &str) -> Output {
    let target = spawn_idle_node(&node_bin());
    let script = format!("{setup}; exec {runner} \"$0\" \"$@\"");
    let wrapper = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ];
    loopbpf_output(&wrapper, &["--pid", &target.pid().to_string()])
}

#[test]
fn tracefs_that_cannot_be_mounted_says_how() {
    require_root();
    // No CAP_SYS_ADMIN (so no mount), but CAP_BPF and CAP_PERFMON.
    let output = loopbpf_in_mount_namespace(
        "umount /sys/kernel/tracing 2>/dev/null",
        "setpriv --bounding-set=-sys_admin --inh-caps=-sys_admin",
    );
    assert_one_line_error(&output, "mount -t tracefs nodev /sys/kernel/tracing");
}

#[test]
fn a_kernel_without_btf_is_named() {
    require_root();
    let output = loopbpf_in_mount_namespace("mount -t tmpfs none /sys/kernel/btf || exit 3", "");
    assert_one_line_error(&output, "CONFIG_DEBUG_INFO_BTF");
}

#[test]
fn unparsable_durations() {
    for (flag, value, needle) in [
        ("--threshold", "10xs", "unknown unit `xs`"),
        ("--duration", "soon", "is not a duration"),
        ("--interval", "5ms", "at least 100ms"),
    ] {
        let output = loopbpf_output(&[], &["--pid", "1", flag, value]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.lines().next().unwrap().contains(needle), "{stderr}");
    }
}

#[test]
fn nothing_to_watch_and_a_missing_command() {
    require_root();
    assert_one_line_error(&loopbpf_output(&[], &[]), "nothing to watch");
    assert_one_line_error(
        &loopbpf_output(&[], &["--", "no-such-command-loopbpf"]),
        "command `no-such-command-loopbpf` not found",
    );
    assert_one_line_error(
        &loopbpf_output(&[], &["--", "sh", "-c", "true"]),
        "is not a libuv program",
    );
}

/// Program ids loopbpf holds, from its fd table.
fn bpf_prog_ids(pid: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(info) = fs::read_to_string(entry.unwrap().path()) else {
            continue;
        };
        ids.extend(
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .map(|id| id.trim().parse::<u32>().unwrap()),
        );
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The names of loopbpf's BPF programs: the functions of its C source put in a program
/// section (`SEC("uprobe/...")` on the line before), not its maps (`} name SEC(".maps");`).
fn loopbpf_program_names() -> Vec<String> {
    let source = fs::read_to_string(workspace().join("loopbpf-ebpf/loopbpf.bpf.c")).unwrap();
    let lines: Vec<&str> = source.lines().collect();
    let names: Vec<String> = lines
        .windows(2)
        .filter(|pair| pair[0].starts_with("SEC(\""))
        .filter_map(|pair| {
            let (head, rest) = pair[1].split_once('(')?;
            // `int BPF_PROG(name, args...)` declares a BTF program by a macro.
            if head.ends_with("BPF_PROG") {
                return Some(rest.split_once(',')?.0.trim().to_owned());
            }
            Some(head.split_whitespace().last()?.to_owned())
        })
        .collect();
    assert!(
        names.len() >= 8,
        "loopbpf's programs in its C source: {names:?}"
    );
    names
}

/// Programs of loopbpf's (by name) among `ids` that `bpftool prog list` still shows, and
/// links of `bpftool link list` to any of `ids`. Only `ids`: another loopbpf on the host
/// has programs of the same names.
fn programs_and_links_left(ids: &[u32]) -> (Vec<String>, Vec<u64>) {
    let names = loopbpf_program_names();
    // The kernel keeps 15 characters of a name; bpftool shows the whole one where it has BTF.
    let is_loopbpf = |name: &str| {
        names
            .iter()
            .any(|n| n == name || (name.len() == 15 && n.starts_with(name)))
    };
    let held = |id: Option<u64>| id.is_some_and(|id| ids.iter().any(|&i| u64::from(i) == id));
    let programs = bpftool(&["prog", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| held(p["id"].as_u64()))
        .filter_map(|p| p["name"].as_str())
        .filter(|name| is_loopbpf(name))
        .map(str::to_owned)
        .collect();
    let links = bpftool(&["link", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| held(l["prog_id"].as_u64()))
        .filter_map(|l| l["id"].as_u64())
        .collect();
    (programs, links)
}

#[test]
fn kill_9_leaves_no_probes_and_a_healthy_target() {
    require_root();
    let mut node = Fixture::start();
    let pid = node.pid().to_string();
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid, "--json"]);
    let ids = bpf_prog_ids(loopbpf.pid());
    assert!(ids.len() >= 8, "loopbpf should hold its programs: {ids:?}");
    // The check after the kill must be able to fail: while loopbpf runs, the same query
    // finds every program it holds, by its name, and links that run them.
    let (programs, links) = programs_and_links_left(&ids);
    assert_eq!(
        programs.len(),
        ids.len(),
        "bpftool shows loopbpf's programs {ids:?} as {programs:?}"
    );
    assert!(!links.is_empty(), "no link to loopbpf's programs {ids:?}");

    loopbpf.child.kill().unwrap(); // SIGKILL
    loopbpf.child.wait().unwrap();
    // The kernel frees them once the last fd to them closes, a moment after the exit.
    let mut left = (Vec::new(), Vec::new());
    let gone = poll_until(Duration::from_secs(5), || {
        left = programs_and_links_left(&ids);
        left.0.is_empty() && left.1.is_empty()
    });
    assert!(
        gone,
        "after kill -9, loopbpf's programs {:?} and links {:?} are still loaded",
        left.0, left.1
    );

    // The target carries on: its loop still runs callbacks and blocks as asked.
    node.send("block timer spin 120");
    let answer = node.done("block", Duration::from_secs(10));
    assert!(answer["measured_ms"].as_f64().unwrap() >= 120.0);
    assert!(node.is_running());
}

#[test]
fn sigint_and_sigterm_print_the_summary_and_detach() {
    require_root();
    for signal in [2, 15] {
        let mut node = Fixture::start();
        let pid = node.pid().to_string();
        let mut loopbpf = Loopbpf::attach(&["--pid", &pid, "--json"]);
        let ids = bpf_prog_ids(loopbpf.pid());
        assert!(ids.len() >= 8, "loopbpf should hold its programs: {ids:?}");
        node.send("block timer spin 150");
        node.done("block", Duration::from_secs(10));
        loopbpf.wait_for_block(node.pid(), Duration::from_secs(10));
        loopbpf.signal(signal);
        let (status, output) = loopbpf.finish(Duration::from_secs(10));
        assert!(status.success(), "signal {signal}: {status}");
        let summary = events(&output, "summary");
        assert_eq!(summary.len(), 1, "signal {signal}: {output:?}");
        assert_eq!(summary[0]["loops"][0]["blocks"], 1);
        // As after `kill -9`: the kernel frees a BTF tracepoint's program after a grace
        // period, a moment after the last fd to it closed.
        let mut left = (Vec::new(), Vec::new());
        let gone = poll_until(Duration::from_secs(5), || {
            left = programs_and_links_left(&ids);
            left.0.is_empty() && left.1.is_empty()
        });
        assert!(gone, "signal {signal} left programs and links {left:?}");
        assert!(node.is_running());
    }
}

#[test]
fn a_target_that_execs_another_program_ends_its_loop_and_loopbpf_with_it() {
    require_root();
    // Node 24 can replace itself (`process.execve`): a 300 ms block in a timer, then an exec of
    // `sleep 1` from the next one.
    let script = "setTimeout(() => { const end = Date.now() + 300; while (Date.now() < end); \
        setTimeout(() => process.execve('/bin/sleep', ['sleep', '1']), 50); }, 2500);";
    let mut node = Command::new(node_of(24))
        .args(["-e", script])
        .spawn()
        .expect("node 24");
    let pid = node.id().to_string();
    let loopbpf = Loopbpf::attach(&["--pid", &pid, "--json", "--no-stacks"]);
    assert!(node.wait().unwrap().success(), "the exec'd program ran");
    let (status, output) = loopbpf.finish(Duration::from_secs(15));
    assert!(status.success(), "loopbpf failed: {status}");

    let blocks = events(&output, "block");
    assert_eq!(blocks.len(), 1, "{output:?}");
    let ms = blocks[0]["duration_ms"].as_f64().unwrap();
    // Date.now() counts whole milliseconds: a 300 ms spin by it lasts at least 299 ms. A busy
    // interval that begins without a sleep (the timer already due at the poll) begins at the
    // sampler's look, within half a sampling period (0.5 ms) of the truth, as the README says.
    assert!((298.5..330.0).contains(&ms), "{ms} ms");
    // The exec ended the loop: the summary says so, and nothing runs on as a block.
    let summary = events(&output, "summary");
    let main = &summary[0]["loops"][0];
    assert_eq!(main["exited"], true, "{summary:?}");
    assert_eq!(main["ongoing_ms"], serde_json::Value::Null, "{summary:?}");
}

/// Installs, in the child about to exec, a seccomp filter that kills the process on the
/// `uretprobe` syscall (x86-64 number 335, Linux 6.11+): what container runtimes' default
/// profiles do to syscalls they do not know. A uretprobe on any function the target calls would
/// kill it on that function's first return.
fn forbid_uretprobe_syscall(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    const NR_URETPROBE: u32 = 335;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7FFF_0000;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let ld_abs = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let jeq = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let filter = [
        op(ld_abs, 0, 0, 4), // seccomp_data.arch
        op(jeq, 1, 0, AUDIT_ARCH_X86_64),
        op(ret, 0, 0, SECCOMP_RET_KILL_PROCESS),
        op(ld_abs, 0, 0, 0), // seccomp_data.nr
        op(jeq, 0, 1, NR_URETPROBE),
        op(ret, 0, 0, SECCOMP_RET_KILL_PROCESS),
        op(ret, 0, 0, SECCOMP_RET_ALLOW),
    ];
    // SAFETY: runs in the forked child before exec; prctl only reads the filter, which lives
    // until exec (the kernel copies it).
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &raw const program,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn a_target_under_seccomp_that_forbids_uretprobes_keeps_running() {
    require_root();
    let mut command = Command::new(node_bin());
    command
        .arg("--expose-gc")
        .arg(loopbpf_tests::fixture("blocker.js"));
    forbid_uretprobe_syscall(&mut command);
    let mut node = Fixture::start_command(command);
    let pid = node.pid();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.contains("Seccomp:\t2") && status.contains("Seccomp_filters:\t1"),
        "the filter is not in place: {status}"
    );
    // Every probe loopbpf has: loop finding, sampling with stacks and JS names, GC pauses.
    let loopbpf = Loopbpf::attach(&["--pid", &pid.to_string(), "--json"]);
    for ms in [150, 200] {
        node.send(&format!("block timer spin {ms}"));
        node.done("block", Duration::from_secs(10));
    }
    node.send("block timer gc 200");
    node.done("block", Duration::from_secs(10));
    node.send("worker-block 150");
    node.done("worker-block", Duration::from_secs(10));
    assert!(node.is_running(), "the target died under loopbpf");
    node.send("exit");
    let exit = node
        .wait_exit(Duration::from_secs(10))
        .expect("the target did not exit");
    assert!(exit.success(), "the target ended badly: {exit}");
    let (_, output) = loopbpf.finish(Duration::from_secs(15));
    let blocks = events(&output, "block");
    assert!(blocks.len() >= 3, "{output:?}");
}

#[test]
fn a_full_ring_buffer_is_counted_and_reported() {
    require_root();
    let mut node = Fixture::start();
    let pid = node.pid().to_string();
    // A stack on every sample: about 37 KB for each millisecond of the block.
    let mut loopbpf = Loopbpf::attach(&["--pid", &pid, "--json", "--sample-rate", "1000"]);
    // loopbpf stopped: nobody reads the 8 MiB ring buffer while 1.5 s of stacks go in.
    loopbpf.signal(libc::SIGSTOP);
    node.send("block timer spin 1500");
    node.done("block", Duration::from_secs(10));
    loopbpf.signal(libc::SIGCONT);
    // Said within a second of loopbpf running again, while it still runs.
    let warning = loopbpf.err.wait_for(Duration::from_secs(10), |l| {
        l.contains("events lost so far (ring buffer full)")
    });
    assert!(warning.is_some(), "no warning: {:?}", loopbpf.err.seen);
    let output = loopbpf.stop(Duration::from_secs(15));
    let summary = events(&output, "summary");
    let dropped = summary[0]["dropped_events"].as_u64().unwrap();
    assert!(dropped > 100, "{dropped} events dropped: {summary:?}");
    // The kernel side's own count still has the block, whatever was lost.
    assert_eq!(summary[0]["loops"][0]["blocks"], 1, "{summary:?}");
    assert!(node.is_running());
}
