//! Hostile tenants: watched node processes that plant traps where loopbpf reads their files (a
//! FIFO as the perf map, a source map that is `/dev/zero`, a symlink out of their root, a 64 GiB
//! sparse file, a mapped library truncated under loopbpf) must not stop loopbpf naming and timing
//! everyone else, nor make it read outside their own view, grow without bound, or harm them.

use std::{
    ffi::CString,
    fs::{self, File},
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::{ffi::OsStrExt, fs::symlink},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use loopbpf_tests::{
    Fixture, Loopbpf, assert_block_close, fixture, node_bin, require_root, wait_until,
};
use serde_json::Value;

/// loopbpf's peak resident memory allowed through the run. Measured at 75 MB with the
/// six targets here; a source map read from `/dev/zero` would take it past any bound.
const MAX_RSS_BYTES: u64 = 300 << 20;
/// The uid the truncated-library target runs as, and owns its library: it could truncate it.
const NOBODY: u32 = 65534;

/// A directory for one test's files, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("loopbpf-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A copy of the hostile fixture in `DIR/NAME/app.js`, ending with `trailer`.
    fn app(&self, name: &str, trailer: &str) -> PathBuf {
        let dir = self.0.join(name);
        fs::create_dir_all(&dir).unwrap();
        let mut script = fs::read_to_string(fixture("hostile.js")).unwrap();
        script.push_str(trailer);
        let app = dir.join("app.js");
        fs::write(&app, script).unwrap();
        app
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A FIFO, removed when dropped (even when the test fails).
struct Fifo(PathBuf);

impl Drop for Fifo {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn mkfifo(path: &Path) -> Fifo {
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c_path.as_ptr(), 0o666) },
        0,
        "mkfifo {}",
        path.display()
    );
    Fifo(path.to_path_buf())
}

/// Watches a file for opens (inotify `IN_OPEN`).
struct OpenWatch(File);

impl OpenWatch {
    fn new(path: &Path) -> Self {
        // SAFETY: no pointers; the flags are valid.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1");
        // SAFETY: inotify_init1 just returned this descriptor, owned by nobody else.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid inotify descriptor and a NUL-terminated path.
        let watch = unsafe { libc::inotify_add_watch(fd, c_path.as_ptr(), libc::IN_OPEN) };
        assert!(watch >= 0, "inotify_add_watch {}", path.display());
        Self(file)
    }

    /// Whether anything opened the file since the watch began.
    fn opened(&mut self) -> bool {
        let mut events = [0u8; 4096];
        matches!(self.0.read(&mut events), Ok(n) if n > 0)
    }
}

/// Where a shared library's loadable segments end in the file: past there are only its section
/// headers and symbol tables, which loopbpf reads and the target's code never touches.
fn loaded_size(elf: &[u8]) -> u64 {
    let u16_at = |at: usize| u64::from(u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()));
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    let end = (0..phnum)
        .map(|i| usize::try_from(phoff + i * phentsize).unwrap())
        .filter(|&ph| elf[ph..ph + 4] == 1u32.to_le_bytes()) // PT_LOAD
        .map(|ph| u64_at(ph + 8) + u64_at(ph + 32))
        .max()
        .unwrap();
    end.next_multiple_of(4096)
}

/// Builds the preloaded library, owned by [`NOBODY`].
fn build_preload(dir: &Path) -> PathBuf {
    let library = dir.join("libhostile.so");
    let status = Command::new("clang-19")
        .args(["-shared", "-fPIC", "-O1", "-g", "-o"])
        .arg(&library)
        .arg(fixture("hostile-preload.c"))
        .status()
        .expect("clang-19: run scripts/install-deps.sh");
    assert!(status.success(), "clang-19 failed");
    std::os::unix::fs::chown(&library, Some(NOBODY), Some(NOBODY)).unwrap();
    library
}

/// A hostile target: node running `app` through `wrapper` (`setpriv`, `unshare`) if any.
fn hostile(wrapper: &[&str], app: &Path, env: &[(&str, &Path)]) -> Fixture {
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(node_bin());
            command
        }
        None => Command::new(node_bin()),
    };
    command.arg(app);
    for (name, value) in env {
        command.env(name, value);
    }
    Fixture::start_command(command)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `/metrics`, and how long it took to answer.
fn scrape(port: u16) -> (String, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    (response, started.elapsed())
}

/// Peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix(" kB")?.trim().parse().ok())
        .unwrap();
    kib << 10
}

/// Waits until loopbpf has reported a block of each of `pids`.
fn wait_for_blocks_of(loopbpf: &mut Loopbpf, pids: &[u32], timeout: Duration) {
    let block_pid = |line: &str| {
        serde_json::from_str::<Value>(line)
            .ok()
            .filter(|v| v["event"] == "block")
            .and_then(|v| v["pid"].as_u64())
    };
    let mut missing: Vec<u32> = pids.to_vec();
    missing.retain(|&pid| {
        !loopbpf
            .out
            .seen
            .iter()
            .any(|l| block_pid(l) == Some(u64::from(pid)))
    });
    let deadline = Instant::now() + timeout;
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = loopbpf.out.wait_for(left, |l| {
            block_pid(l).is_some_and(|pid| missing.iter().any(|&m| u64::from(m) == pid))
        });
        let Some(line) = line else {
            panic!(
                "no block of pids {missing:?} within {timeout:?}; stderr: {:?}",
                loopbpf.err.rest(Duration::ZERO)
            );
        };
        let pid = block_pid(&line).unwrap();
        missing.retain(|&m| u64::from(m) != pid);
    }
}

/// Starts the hostile targets, each with its trap; returns them in order (FIFO perf map,
/// `/dev/zero` source map, symlink out of its root, sparse source map, truncatable library),
/// the watch on the canary, the library and the FIFO.
fn plant_traps(scratch: &Scratch) -> ([Fixture; 5], OpenWatch, PathBuf, Fifo) {
    let dir = &scratch.0;
    // 1. Its perf map is a FIFO: opening it for reading would wait for a writer forever.
    let fifo_target = hostile(&[], &scratch.app("fifo", ""), &[]);
    let fifo = mkfifo(Path::new(&format!("/tmp/perf-{}.map", fifo_target.pid())));
    // 2. Its script's source map is /dev/zero: read to the end, it never ends.
    let zero_target = hostile(
        &[],
        &scratch.app("zero", "//# sourceMappingURL=/dev/zero\n"),
        &[],
    );
    // 3. Its source map is an absolute symlink to a file loopbpf must never read. In the
    //    target's own mount namespace that path is a decoy; on the host, the canary.
    let secret = dir.join("secret");
    let decoy = dir.join("decoy");
    fs::create_dir_all(&secret).unwrap();
    fs::create_dir_all(&decoy).unwrap();
    fs::write(secret.join("canary.map"), "{}").unwrap();
    fs::write(decoy.join("canary.map"), "{}").unwrap();
    let escape_app = scratch.app("escape", "//# sourceMappingURL=app.js.map\n");
    symlink(
        secret.join("canary.map"),
        escape_app.with_extension("js.map"),
    )
    .unwrap();
    let canary = OpenWatch::new(&secret.join("canary.map"));
    let mount_decoy = format!(
        "mount --bind {} {} && exec \"$0\" \"$@\"",
        decoy.display(),
        secret.display()
    );
    let escape_target = hostile(
        &["unshare", "-m", "sh", "-c", &mount_decoy],
        &escape_app,
        &[],
    );
    // 4. Its source map is a 64 GiB sparse file.
    let huge_app = scratch.app("huge", "//# sourceMappingURL=huge.map\n");
    File::create(huge_app.with_file_name("huge.map"))
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    let huge_target = hostile(&[], &huge_app, &[]);
    // 5. It maps a library of its own (it owns the file), truncated while loopbpf maps it.
    let library = build_preload(dir);
    let nobody = format!("--reuid={NOBODY}");
    let nobody_group = format!("--regid={NOBODY}");
    let preload_app = scratch.app("preload", "");
    let preload_target = hostile(
        &["setpriv", &nobody, &nobody_group, "--clear-groups"],
        &preload_app,
        &[("LD_PRELOAD", &library)],
    );
    (
        [
            fifo_target,
            zero_target,
            escape_target,
            huge_target,
            preload_target,
        ],
        canary,
        library,
        fifo,
    )
}

#[test]
fn hostile_targets_leave_loopbpf_working_for_everyone_else() {
    require_root();
    let scratch = Scratch::new("hostile");

    let (targets, mut canary, library, _fifo) = plant_traps(&scratch);
    let [
        fifo_target,
        zero_target,
        escape_target,
        huge_target,
        preload_target,
    ] = targets;
    let mut benign = Fixture::start();

    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let mut loopbpf = Loopbpf::watch_all(&["--metrics", &address, "--json"]);
    let hostile_pids = [
        fifo_target.pid(),
        zero_target.pid(),
        escape_target.pid(),
        huge_target.pid(),
        preload_target.pid(),
    ];
    // Their blocks are reported, so loopbpf has tried to name their stacks.
    wait_for_blocks_of(&mut loopbpf, &hostile_pids, Duration::from_mins(1));
    let elf = fs::read(&library).unwrap();
    let keep = loaded_size(&elf);
    assert!(
        keep < elf.len() as u64,
        "nothing to truncate in {library:?}"
    );
    File::options()
        .write(true)
        .open(&library)
        .unwrap()
        .set_len(keep)
        .unwrap();
    // loopbpf names the truncated library's frames again, after the truncation.
    loopbpf.out.seen.clear();
    wait_for_blocks_of(
        &mut loopbpf,
        &[preload_target.pid()],
        Duration::from_secs(30),
    );

    for round in 0..3 {
        benign.send("block timer spin 300");
        let truth = benign.done("block", Duration::from_secs(10));
        let block = loopbpf.wait_for_block(benign.pid(), Duration::from_secs(15));
        assert_block_close(
            &block,
            truth["measured_ms"].as_f64().unwrap(),
            &format!("benign block {round}"),
        );
        let frames = block["stacks"][0]["frames"].as_array().unwrap();
        assert!(
            frames
                .iter()
                .any(|f| f["kind"] == "js" && f["name"].as_str().unwrap().ends_with("spin")),
            "the benign block's blocking function is named: {frames:?}"
        );
    }

    let (metrics, took) = scrape(port);
    assert!(
        metrics.contains("loopbpf_target_files_skipped_total"),
        "{metrics}"
    );
    assert!(took < Duration::from_secs(1), "/metrics took {took:?}");
    let rss = peak_rss(loopbpf.pid());
    eprintln!("loopbpf's peak RSS: {} MB", rss >> 20);
    assert!(rss < MAX_RSS_BYTES, "loopbpf's peak RSS {} MB", rss >> 20);
    let warnings = loopbpf.err.rest(Duration::from_millis(200));
    for (what, pid) in [("FIFO", fifo_target.pid()), ("MiB cap", huge_target.pid())] {
        assert!(
            warnings
                .iter()
                .any(|l| l.contains("warning") && l.contains(what) && l.contains(&pid.to_string())),
            "one warning names pid {pid}'s {what}: {warnings:?}"
        );
    }
    assert!(!canary.opened(), "loopbpf opened the host's canary");
    for mut target in [
        fifo_target,
        zero_target,
        escape_target,
        huge_target,
        preload_target,
        benign,
    ] {
        assert!(target.is_running(), "pid {} was harmed", target.pid());
    }
    let _ = loopbpf.stop(Duration::from_secs(15));
}

#[test]
fn a_fifo_as_the_perf_map_does_not_hang_attaching() {
    require_root();
    let mut target = Fixture::start();
    let perf_map = PathBuf::from(format!("/tmp/perf-{}.map", target.pid()));
    let _fifo = mkfifo(&perf_map);
    let mut loopbpf = Loopbpf::attach(&["--pid", &target.pid().to_string(), "--json"]);
    target.send("block timer spin 200");
    target.done("block", Duration::from_secs(10));
    loopbpf.wait_for_block(target.pid(), Duration::from_secs(15));
    loopbpf.stop(Duration::from_secs(15));
    wait_until("the target to still run", Duration::from_secs(1), || {
        target.is_running()
    });
}
