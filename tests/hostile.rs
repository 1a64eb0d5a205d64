//! Hostile tenants: watched node processes that plant traps where loopbpf reads their files (a
//! FIFO as the perf map, a source map that is `/dev/zero`, a symlink out of their root, a 64 GiB
//! sparse file, a mapped library truncated under loopbpf) must not stop loopbpf naming and timing
//! everyone else, nor make it read outside their own view, grow without bound, or harm them.
//! A second run covers the rest of the matrix (each trap at the perf map, the script itself, the
//! source map, a library's debug link, the executable) and a target whose V8 heap words the test
//! overwrites with garbage through `/proc/PID/mem` while loopbpf names its stacks.

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
    Fixture, Loopbpf, assert_block_close, fixture, installed_node, node_bin, require_root,
    wait_until,
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

/// A file the test made (a FIFO, a planted perf map), removed when dropped (even when the test
/// fails).
struct Fifo(PathBuf);

impl Drop for Fifo {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn mkfifo(path: &Path) -> Fifo {
    // A perf map left by an earlier process with this pid (pids are reused) is stale.
    let _ = fs::remove_file(path);
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

    assert_benign_served(&mut loopbpf, &mut benign, 3);

    assert_metrics_answer_and_memory_bounded(port, &loopbpf);
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

/// One cell of the matrix: a target with a trap where loopbpf reads for it, and what loopbpf's
/// warning about the refused file says (the warning also names the target's pid), when the trap
/// is one loopbpf must refuse aloud.
struct Cell {
    trap: &'static str,
    target: Fixture,
    warning: Option<&'static str>,
    /// A native frame the target's blocks show by name once loopbpf has read past the trap.
    native: Option<&'static str>,
}

/// The wrapper that runs a target in its own mount namespace, where `secret` is `decoy`: an
/// absolute symlink to a file in `secret` names the decoy for the target, the canary on the host.
fn decoy_namespace(secret: &Path, decoy: &Path) -> [String; 5] {
    [
        "unshare".into(),
        "-m".into(),
        "sh".into(),
        "-c".into(),
        format!(
            "mount --bind {} {} && exec \"$0\" \"$@\"",
            decoy.display(),
            secret.display()
        ),
    ]
}

/// A hostile target blocking `spin_ms` every 300 ms, through `wrapper`, with `env`.
fn spinning(wrapper: &[String], app: &Path, spin_ms: u32, env: &[(&str, &Path)]) -> Fixture {
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let spin = PathBuf::from(spin_ms.to_string());
    let mut env = env.to_vec();
    env.push(("HOSTILE_SPIN_MS", &spin));
    hostile(&wrapper, app, &env)
}

/// A 64 GiB sparse file at `path` (in place of whatever was there).
fn sparse(path: &Path) {
    let _ = fs::remove_file(path);
    File::create(path).unwrap().set_len(64 << 30).unwrap();
}

/// Builds the preloaded library into `dir` (made `NOBODY`'s) owned by root and not writable by
/// others, with a `.gnu_debuglink` naming `link`: root's file that trusts its debug link, in a
/// directory the target owns, where the target plants what the link names.
fn build_debuglinked(dir: &Path, link: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let library = dir.join("libdebuglinked.so");
    let status = Command::new("clang-19")
        // No tail call: its clock_gettime's own frame is on the target's stacks.
        .args(["-shared", "-fPIC", "-O0", "-fno-omit-frame-pointer", "-o"])
        .arg(&library)
        .arg(fixture("hostile-preload.c"))
        .status()
        .expect("clang-19: run scripts/install-deps.sh");
    assert!(status.success(), "clang-19 failed");
    let debug_file = dir.join(link);
    fs::write(&debug_file, "not an ELF file").unwrap();
    let status = Command::new("objcopy")
        .arg(format!("--add-gnu-debuglink={}", debug_file.display()))
        .arg(&library)
        .status()
        .expect("objcopy (binutils)");
    assert!(status.success(), "objcopy failed");
    fs::remove_file(&debug_file).unwrap();
    fs::set_permissions(
        &library,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    library
}

/// A copy of node at `path`, for a target whose executable is then deleted or replaced.
fn node_copy(path: &Path) -> PathBuf {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::copy(installed_node(), path).unwrap();
    path.to_path_buf()
}

/// The perf map of process `pid`, planted by `plant` in place of a stale one (an earlier process
/// with this pid), and removed when dropped.
fn planted_perf_map(pid: u32, plant: impl FnOnce(&Path)) -> Fifo {
    let path = PathBuf::from(format!("/tmp/perf-{pid}.map"));
    let _ = fs::remove_file(&path);
    plant(&path);
    Fifo(path)
}

/// Starts one target per cell of the matrix not in [`plant_traps`], each with its trap; and the
/// perf maps planted in /tmp, to hold until the test ends.
fn plant_more_traps(scratch: &Scratch, secret: &Path, decoy: &Path) -> (Vec<Cell>, Vec<Fifo>) {
    let dir = &scratch.0;
    let in_decoy_ns = decoy_namespace(secret, decoy);
    let canary = secret.join("canary.map");
    let quiet = 50;
    let mut cells = Vec::new();
    let mut cell = |trap, target, warning, native| {
        cells.push(Cell {
            trap,
            target,
            warning,
            native,
        });
    };

    // The perf map as a symlink out of the target's root, as /dev/zero, as a huge sparse file.
    let mut perf_maps = Vec::new();
    let target = spinning(&in_decoy_ns, &scratch.app("perf-escape", ""), quiet, &[]);
    perf_maps.push(planted_perf_map(target.pid(), |path| {
        symlink(&canary, path).unwrap();
    }));
    cell("perf map: symlink to a host file", target, None, None);
    let target = spinning(&[], &scratch.app("perf-zero", ""), quiet, &[]);
    perf_maps.push(planted_perf_map(target.pid(), |path| {
        symlink("/dev/zero", path).unwrap();
    }));
    cell("perf map: /dev/zero", target, Some("a device"), None);
    let target = spinning(&[], &scratch.app("perf-huge", ""), quiet, &[]);
    perf_maps.push(planted_perf_map(target.pid(), sparse));
    cell("perf map: 64 GiB sparse", target, Some("MiB cap"), None);

    // The script itself, replaced on disk once node has loaded it: loopbpf reads it for its
    // sourceMappingURL comment.
    let app = scratch.app("script-fifo", "");
    let target = spinning(&[], &app, quiet, &[]);
    fs::remove_file(&app).unwrap();
    std::mem::forget(mkfifo(&app)); // removed with the scratch directory
    cell("script: FIFO", target, Some("FIFO"), None);
    let app = scratch.app("script-escape", "");
    let target = spinning(&in_decoy_ns, &app, quiet, &[]);
    fs::remove_file(&app).unwrap();
    symlink(&canary, &app).unwrap();
    cell("script: symlink to a host file", target, None, None);
    let app = scratch.app("script-huge", "");
    let target = spinning(&[], &app, quiet, &[]);
    sparse(&app);
    cell("script: 64 GiB sparse", target, Some("MiB cap"), None);

    // A source map that is a FIFO.
    let app = scratch.app("map-fifo", "//# sourceMappingURL=app.js.map\n");
    std::mem::forget(mkfifo(&app.with_extension("js.map")));
    let target = spinning(&[], &app, quiet, &[]);
    cell("source map: FIFO", target, Some("FIFO"), None);

    // A root-owned library whose debug link names a FIFO (next to it) or a symlink to a root-only
    // host file (in `.debug/`), both planted by the target in its own directory.
    let nobody = [
        "setpriv".to_owned(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".to_owned(),
    ];
    let link_dir = dir.join("debuglink-fifo");
    let library = build_debuglinked(&link_dir, "fifo.debug");
    std::mem::forget(mkfifo(&link_dir.join("fifo.debug")));
    let app = scratch.app("debuglink-fifo-app", "");
    let target = spinning(&nobody, &app, quiet, &[("LD_PRELOAD", &library)]);
    cell("debug link: FIFO", target, None, Some("clock_gettime"));
    let link_dir = dir.join("debuglink-escape");
    let library = build_debuglinked(&link_dir, "escape.debug");
    fs::create_dir_all(link_dir.join(".debug")).unwrap();
    symlink(
        secret.join("debug-canary"),
        link_dir.join(".debug/escape.debug"),
    )
    .unwrap();
    let app = scratch.app("debuglink-escape-app", "");
    let target = spinning(&nobody, &app, quiet, &[("LD_PRELOAD", &library)]);
    cell(
        "debug link: symlink to a host file",
        target,
        None,
        Some("clock_gettime"),
    );

    // Its executable deleted, or replaced at its path by a FIFO.
    let node = node_copy(&dir.join("bin/node-deleted"));
    let mut command = Command::new(&node);
    command
        .arg(scratch.app("exe-deleted", ""))
        .env("HOSTILE_SPIN_MS", "50");
    let target = Fixture::start_command(command);
    fs::remove_file(&node).unwrap();
    cell("executable: deleted", target, None, None);
    let node = node_copy(&dir.join("bin/node-fifo"));
    let mut command = Command::new(&node);
    command
        .arg(scratch.app("exe-fifo", ""))
        .env("HOSTILE_SPIN_MS", "50");
    let target = Fixture::start_command(command);
    fs::remove_file(&node).unwrap();
    std::mem::forget(mkfifo(&node));
    cell("executable: replaced by a FIFO", target, None, None);
    (cells, perf_maps)
}

/// A target whose blocking function's `SharedFunctionInfo` the test overwrites with garbage
/// while it blocks: returns it and that object's address.
fn garbled_target() -> (Fixture, u64) {
    let mut command = Command::new(node_bin());
    command
        .arg("--allow-natives-syntax")
        .arg(fixture("hostile-heap.js"));
    let target = Fixture::start_command(command);
    let shared = target
        .out
        .seen
        .iter()
        .find_map(|l| l.trim().strip_prefix("- shared_info: 0x"))
        .and_then(|rest| u64::from_str_radix(rest.split_whitespace().next()?, 16).ok())
        .expect("hostile-heap.js printed its function's SharedFunctionInfo");
    (target, shared & !1)
}

/// Overwrites, for 400 ms, the fields of the `SharedFunctionInfo` at `object` in `pid`'s heap
/// that loopbpf reads to name a frame and V8 does not read to run it (node 20, no pointer
/// compression: its name or scope info at +16, its script at +32) with words loopbpf would
/// follow (a tagged pointer near it, random bits), then puts them back, so that the target can
/// call the function again. Whether the target got to see the garbage (and died of it).
fn garble(pid: u32, object: u64, seed: u64) -> bool {
    use std::os::unix::fs::FileExt;
    const FIELDS: [u64; 2] = [16, 32];
    let Ok(mem) = File::options()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
    else {
        return true;
    };
    let mut state = seed;
    let mut next = || {
        // xorshift64: garbage, but the same garbage on every run.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut original = [[0u8; 8]; 2];
    for (field, word) in FIELDS.iter().zip(&mut original) {
        mem.read_exact_at(word, object + field).unwrap();
    }
    let near = (object.wrapping_add(next() % (1 << 20)) & !7) | 1;
    for (field, garbage) in FIELDS.iter().zip([near, next()]) {
        mem.write_all_at(&garbage.to_le_bytes(), object + field)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(400));
    FIELDS
        .iter()
        .zip(original)
        .any(|(field, word)| mem.write_all_at(&word, object + field).is_err())
}

/// Asserts that `/metrics` answers within a second, with the skipped-files counter, and that
/// loopbpf's peak RSS stays under [`MAX_RSS_BYTES`].
fn assert_metrics_answer_and_memory_bounded(port: u16, loopbpf: &Loopbpf) {
    let (metrics, took) = scrape(port);
    assert!(
        metrics.contains("loopbpf_target_files_skipped_total"),
        "{metrics}"
    );
    assert!(took < Duration::from_secs(1), "/metrics took {took:?}");
    let rss = peak_rss(loopbpf.pid());
    eprintln!("loopbpf's peak RSS: {} MB", rss >> 20);
    assert!(rss < MAX_RSS_BYTES, "loopbpf's peak RSS {} MB", rss >> 20);
}

/// Asserts that loopbpf times and names the benign process's blocks.
fn assert_benign_served(loopbpf: &mut Loopbpf, benign: &mut Fixture, rounds: u32) {
    for round in 0..rounds {
        benign.send("block timer spin 300");
        let truth = benign.done("block", Duration::from_secs(10));
        let block = loopbpf.wait_for_block(benign.pid(), Duration::from_secs(15));
        assert_block_close(&block, &truth, &format!("benign block {round}"));
        let frames = block["stacks"][0]["frames"]
            .as_array()
            .unwrap_or_else(|| panic!("no stacks on the benign block: {block}"));
        assert!(
            frames
                .iter()
                .any(|f| f["kind"] == "js" && f["name"].as_str().unwrap().ends_with("spin")),
            "the benign block's blocking function is named: {frames:?}"
        );
    }
}

#[test]
fn every_trap_at_every_read_leaves_loopbpf_working_for_everyone_else() {
    require_root();
    let scratch = Scratch::new("hostile-matrix");
    let secret = scratch.0.join("secret");
    let decoy = scratch.0.join("decoy");
    for dir in [&secret, &decoy] {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("canary.map"), "{}").unwrap();
    }
    // Readable by root only: what a debug link followed as root would leak.
    fs::write(secret.join("debug-canary"), "secret").unwrap();
    fs::set_permissions(
        secret.join("debug-canary"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut canaries = [
        OpenWatch::new(&secret.join("canary.map")),
        OpenWatch::new(&secret.join("debug-canary")),
    ];
    // Held to the end: dropping them removes the planted perf maps.
    let (cells, _perf_maps) = plant_more_traps(&scratch, &secret, &decoy);
    let (mut garbled, shared) = garbled_target();
    let mut benign = Fixture::start();

    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    // The hostile targets block 50 ms at a time: short blocks keep the 2 cores free.
    let mut loopbpf = Loopbpf::watch_all(&["--metrics", &address, "--json", "--threshold", "30ms"]);
    let pids: Vec<u32> = cells.iter().map(|c| c.target.pid()).collect();
    wait_for_blocks_of(&mut loopbpf, &pids, Duration::from_mins(1));
    assert_benign_served(&mut loopbpf, &mut benign, 1);

    // The garbled target blocks only now: loopbpf names its stacks from the garbage first.
    garbled.send("go");
    for seed in 1..=3 {
        garbled
            .out
            .wait_for(Duration::from_secs(5), |l| l.contains("\"spinning\""))
            .expect("the garbled target blocks");
        // It may die of the garbage: that is its business, loopbpf's is to go on.
        if garble(garbled.pid(), shared, seed) {
            eprintln!("the garbled target died of round {seed}");
            break;
        }
    }
    assert_benign_served(&mut loopbpf, &mut benign, 3);
    // Every hostile target is still watched and its stacks named: no lane is stuck on a trap.
    loopbpf.out.seen.clear();
    for cell in &cells {
        let named = |line: &str| {
            let Ok(block) = serde_json::from_str::<Value>(line) else {
                return false;
            };
            let frames = block["stacks"][0]["frames"].as_array().cloned();
            let has = |name: &str| {
                frames
                    .iter()
                    .flatten()
                    .any(|f| f["name"].as_str() == Some(name))
            };
            block["event"] == "block"
                && block["pid"] == cell.target.pid()
                && has("hostileSpin")
                && cell.native.is_none_or(has)
        };
        let seen = loopbpf.out.seen.iter().any(|l| named(l));
        assert!(
            seen || loopbpf
                .out
                .wait_for(Duration::from_secs(15), named)
                .is_some(),
            "{}: no named block of pid {}; stderr: {:?}",
            cell.trap,
            cell.target.pid(),
            loopbpf.err.rest(Duration::ZERO)
        );
    }

    assert_metrics_answer_and_memory_bounded(port, &loopbpf);
    let warnings = loopbpf.err.rest(Duration::from_millis(200));
    for cell in &cells {
        let pid = cell.target.pid().to_string();
        if let Some(what) = cell.warning {
            assert!(
                warnings
                    .iter()
                    .any(|l| l.contains("warning") && l.contains(what) && l.contains(&pid)),
                "{}: one warning names pid {pid}'s {what}: {warnings:?}",
                cell.trap
            );
        }
    }
    for (canary, name) in canaries.iter_mut().zip(["canary.map", "debug-canary"]) {
        assert!(!canary.opened(), "loopbpf opened the host's {name}");
    }
    for mut cell in cells {
        assert!(cell.target.is_running(), "{}: target harmed", cell.trap);
    }
    assert!(benign.is_running(), "the benign target was harmed");
    let _ = loopbpf.stop(Duration::from_secs(15));
}
